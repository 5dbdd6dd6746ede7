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
    "lenet",
    "mlp5",
    "resnet_small",
    "MLP5_WIDTH",
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


def lenet() -> nn.Module:
    """LeNet-5 for 1x28x28 inputs, with ReLU and max-pooling (61,706 parameters).

    conv 5x5 (1 -> 6, padding 2) -> ReLU -> maxpool 2 -> conv 5x5 (6 -> 16) -> ReLU ->
    maxpool 2 -> 400 -> 120 -> 84 -> 10 (ReLU between the linear layers).
    """
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120), nn.ReLU(),
        nn.Linear(120, 84), nn.ReLU(),
        nn.Linear(84, 10),
    )


#: hidden width of :func:`mlp5`: 784-1330-1330-1330-1330-10 has 6,368,050 parameters,
#: 16.02x the base MLP's 397,510 (the paper's "16x" 5-layer MLP)
MLP5_WIDTH = 1330


def mlp5(width: int = MLP5_WIDTH) -> nn.Module:
    """A 5-layer MLP on MNIST: 784-w-w-w-w-10 with ReLU (6,368,050 parameters at w=1330)."""
    dims = [784, width, width, width, width, 10]
    layers: list[nn.Module] = [nn.Flatten()]
    for i in range(5):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < 4:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class _BasicBlock(nn.Module):
    """ResNet's basic block: two 3x3 conv-BN layers and an identity (or 1x1 conv-BN) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetSmall(nn.Module):
    """ResNet-18 (4 stages of 2 basic blocks, BatchNorm) for 1x28x28 inputs.

    The layout is ResNet-18's with the ImageNet-style downsampling stem, so that 2 CPU cores
    can afford it: conv 3x3 stride 2 (28 -> 14) + BN + ReLU, max-pool 3x3 stride 2 (14 -> 7),
    then stages of ``w, 2w, 4w, 8w`` channels at 7x7, 4x4, 2x2, 1x1, global average pool
    and a linear classifier. With ``width=64`` (ResNet-18's own widths) it has 11,172,810
    parameters, 28.1x the base MLP.

    Cost measured on the 2-core development machine (1 torch thread, shared with other jobs,
    load average 3-9): forward + backward at batch 128 takes 0.5-0.9 s at ``width=64``
    (~72 MFLOP per image forward) and ~0.13 s at ``width=32`` (2.8M parameters); a
    SimpleOptimizer step on the 11.2M coordinates adds ~0.3 s with the fused CPU kernel.
    For comparison: base MLP 7-11 ms, LeNet 26-45 ms, 5-layer MLP 0.13-0.2 s.
    """

    def __init__(self, width: int = 64, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.MaxPool2d(3, 2, 1),
        )
        stages, cin = [], width
        for i, mult in enumerate((1, 2, 4, 8)):
            cout = width * mult
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(_BasicBlock(cin, cout, stride), _BasicBlock(cout, cout, 1)))
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnet_small(width: int = 64) -> nn.Module:
    """:class:`ResNetSmall`, the ResNet-18-style CNN of the large-model experiment (fig5b)."""
    return ResNetSmall(width=width)


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
            with torch.random.fork_rng(devices=[]):  # its values are never used
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
    "fmnist-mlp": ("fashion-mnist", base_mlp),
    "mnist-lenet": ("mnist", lenet),
    "fmnist-lenet": ("fashion-mnist", lenet),
    "mnist-mlp5": ("mnist", mlp5),
    "fmnist-resnet": ("fashion-mnist", resnet_small),
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
