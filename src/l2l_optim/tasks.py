"""Optimizee tasks: datasets read from local IDX files, models, and a functional wrapper.

A :class:`Task` pairs a model factory with in-memory training (and test) tensors. Meta-training
and fine-tuning never touch an ``nn.Module``'s own parameters: they hold the optimizee's
parameters as a ``dict[str, Tensor]`` and call the model through
``torch.func.functional_call``, so the updates stay differentiable.

Data is looked for locally first, in this order: the ``root`` argument, ``$L2L_DATA``,
``../shared/data`` beside the working directory, ``/usr/share/datasets`` (Debian's
``dataset-fashion-mnist`` package), ``~/.cache/l2l_optim``. Each root may hold the four IDX
files directly or in a ``mnist/`` / ``fashion-mnist/`` subfolder, gzipped or not. Only if
nothing is found and ``download=True`` does torchvision fetch the files.
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

__all__ = [
    "DatasetNotFoundError",
    "load_idx",
    "load_dataset",
    "Task",
    "make_task",
    "TASKS",
    "base_mlp",
]

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_SUBDIRS = {"mnist": ("mnist", "MNIST/raw"), "fashion-mnist": ("fashion-mnist", "FashionMNIST/raw")}
# per-dataset pixel statistics of the training split, so both datasets reach the nets at the
# same scale (which matters for a learned optimizer fed raw gradients)
_STATS = {"mnist": (0.1307, 0.3081), "fashion-mnist": (0.2860, 0.3530)}


class DatasetNotFoundError(FileNotFoundError):
    """No local copy of a dataset was found (and downloading was not allowed or failed)."""


def load_idx(path: str | os.PathLike) -> Tensor:
    """Read one IDX file (optionally gzipped) into a uint8 tensor.

    Raises:
        ValueError: a malformed header or a size that does not match it.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    offset = 4 + 4 * ndim
    expected = 1
    for d in dims:
        expected *= d
    if len(data) - offset != expected:
        raise ValueError(f"{path}: header says {dims} ({expected} bytes) but holds {len(data) - offset}")
    return torch.frombuffer(bytearray(data[offset:]), dtype=torch.uint8).reshape(dims)


def _candidate_roots(root: str | os.PathLike | None) -> list[Path]:
    roots = []
    if root is not None:
        roots.append(Path(root))
    if os.environ.get("L2L_DATA"):
        roots.append(Path(os.environ["L2L_DATA"]))
    roots += [Path.cwd().parent / "shared" / "data", Path("/usr/share/datasets"), _cache_dir()]
    return roots


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "l2l_optim"


def _find_file(dirs: list[Path], stem: str) -> Path | None:
    for d in dirs:
        for name in (stem + ".gz", stem):
            if (d / name).is_file():
                return d / name
    return None


def load_dataset(
    name: str = "mnist",
    split: str = "train",
    root: str | os.PathLike | None = None,
    download: bool = False,
) -> tuple[Tensor, Tensor]:
    """Load MNIST or Fashion-MNIST as normalised float images ``(N, 1, 28, 28)`` and labels.

    Args:
        name: ``"mnist"`` or ``"fashion-mnist"``.
        split: ``"train"`` or ``"test"``.
        root: a directory to look in first (see the module docstring for the search order).
        download: fall back to torchvision's download into ``~/.cache/l2l_optim``.

    Returns:
        ``(images, labels)``: float32 normalised with the training split's mean/std, int64.

    Raises:
        DatasetNotFoundError: no local copy, naming every place that was looked in.
    """
    if name not in _SUBDIRS:
        raise ValueError(f"unknown dataset {name!r}; known: {sorted(_SUBDIRS)}")
    if split not in _FILES:
        raise ValueError(f"unknown split {split!r}; expected 'train' or 'test'")
    dirs = []
    for r in _candidate_roots(root):
        dirs += [r] + [r / sub for sub in _SUBDIRS[name]]
    img_stem, lbl_stem = _FILES[split]
    img_path, lbl_path = _find_file(dirs, img_stem), _find_file(dirs, lbl_stem)
    if (img_path is None or lbl_path is None) and download:
        _download(name)
        img_path, lbl_path = _find_file(dirs, img_stem), _find_file(dirs, lbl_stem)
    if img_path is None or lbl_path is None:
        looked = "\n  ".join(str(d) for d in dirs)
        raise DatasetNotFoundError(
            f"{name} ({split}) not found: looked for {img_stem}[.gz] and {lbl_stem}[.gz] in\n  {looked}\n"
            f"Point --data-root or $L2L_DATA at a folder holding the IDX files, or pass download=True."
        )
    images = load_idx(img_path)
    labels = load_idx(lbl_path).long()
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{img_path} has {images.shape[0]} images but {lbl_path} {labels.shape[0]} labels")
    mean, std = _STATS[name]
    x = (images.float().div_(255.0).sub_(mean).div_(std)).unsqueeze(1)
    return x, labels


def _download(name: str) -> None:
    import torchvision

    cls = torchvision.datasets.MNIST if name == "mnist" else torchvision.datasets.FashionMNIST
    try:
        cls(str(_cache_dir()), train=True, download=True)
        cls(str(_cache_dir()), train=False, download=True)
    except Exception as e:  # network errors come in many types; the message is what matters
        raise DatasetNotFoundError(f"could not download {name}: {e}") from e


# ----------------------------------------------------------------------------------------
# models


def base_mlp() -> nn.Module:
    """The paper's base optimizee: 784-500-10 MLP with ReLU (397,510 parameters)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 500), nn.ReLU(), nn.Linear(500, 10))


# ----------------------------------------------------------------------------------------
# the functional task


@dataclass
class Task:
    """A model factory plus in-memory data, exposed functionally for meta-training.

    Args:
        name: a label for logs.
        model_fn: builds a freshly initialised model (called under a fixed seed).
        train: ``(x, y)`` training tensors.
        test: optional ``(x, y)`` test tensors.
        batch_size: minibatch size of every optimizee step.
        loss_fn: ``loss_fn(output, y) -> scalar``; cross-entropy by default.
    """

    name: str
    model_fn: Callable[[], nn.Module]
    train: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor] | None = None
    batch_size: int = 128
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy
    _module: nn.Module | None = field(default=None, repr=False)

    @property
    def module(self) -> nn.Module:
        """A template module whose structure (not parameters) functional calls use."""
        if self._module is None:
            self._module = self.model_fn()
        return self._module

    def init_params(self, seed: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Fresh parameters and buffers from the model's own initialisation under ``seed``."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = self.model_fn()
        params = {k: v.detach().clone() for k, v in model.named_parameters()}
        buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
        return params, buffers

    def num_params(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    def sample_batch(self, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        x, y = self.train
        idx = torch.randint(0, x.shape[0], (self.batch_size,), generator=generator)
        return x[idx], y[idx]

    def loss(self, params: dict[str, Tensor], buffers: dict[str, Tensor], batch) -> Tensor:
        x, y = batch
        out = functional_call(self.module, {**params, **buffers}, (x,))
        return self.loss_fn(out, y)

    @torch.no_grad()
    def evaluate(self, params, buffers, batch_size: int = 2000) -> dict[str, float]:
        """Test loss and accuracy (``{}`` without a test split). Uses eval mode (BatchNorm stats)."""
        if self.test is None:
            return {}
        module = self.module
        module.eval()
        try:
            x, y = self.test
            total, correct = 0.0, 0
            for i in range(0, x.shape[0], batch_size):
                out = functional_call(module, {**params, **buffers}, (x[i : i + batch_size],))
                total += float(self.loss_fn(out, y[i : i + batch_size])) * out.shape[0]
                correct += int((out.argmax(1) == y[i : i + batch_size]).sum())
        finally:
            module.train()
        return {"test_loss": total / x.shape[0], "test_acc": correct / x.shape[0]}


# name -> (dataset, model factory). The reproduction adds its models here.
TASKS: dict[str, tuple[str, Callable[[], nn.Module]]] = {
    "mnist-mlp": ("mnist", base_mlp),
}


def make_task(
    name: str = "mnist-mlp",
    *,
    root: str | os.PathLike | None = None,
    batch_size: int = 128,
    with_test: bool = False,
    download: bool = False,
) -> Task:
    """Build a registered task with its data loaded from local files.

    Raises:
        ValueError: unknown task name.
        DatasetNotFoundError: the dataset is not available locally.
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {sorted(TASKS)}")
    dataset, model_fn = TASKS[name]
    train = load_dataset(dataset, "train", root=root, download=download)
    test = load_dataset(dataset, "test", root=root, download=download) if with_test else None
    return Task(name=name, model_fn=model_fn, train=train, test=test, batch_size=batch_size)
