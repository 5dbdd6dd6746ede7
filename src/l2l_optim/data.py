"""Datasets read from local IDX files, and data loaders turned into tensors.

:func:`load_dataset` looks for MNIST / Fashion-MNIST locally, in this order: the ``root``
argument, ``$L2L_DATA``, ``/usr/share/datasets`` (Debian's ``dataset-fashion-mnist``
package), ``~/.cache/l2l_optim``. Each root may hold the four IDX files directly or in a
``mnist/`` / ``fashion-mnist/`` subfolder, gzipped or not. Only if nothing is found and
``download=True`` does torchvision fetch the files.

:func:`materialize` runs through a loader of ``(x, y)`` batches once and concatenates them,
which is how a user's ``DataLoader`` becomes the in-memory data of a
:class:`~l2l_optim.tasks.Task`.
"""

from __future__ import annotations

import gzip
import os
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["DatasetNotFoundError", "load_idx", "load_dataset", "materialize"]

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# Debian's dataset packages install here
_SYSTEM_ROOT = Path("/usr/share/datasets")
_SUBDIRS = {"mnist": ("mnist", "MNIST/raw"), "fashion-mnist": ("fashion-mnist", "FashionMNIST/raw")}
# per-dataset pixel statistics of the training split, so both datasets reach the nets at the
# same scale (which matters for a learned optimizer fed raw gradients)
NORMALISATION = {"mnist": (0.1307, 0.3081), "fashion-mnist": (0.2860, 0.3530)}


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
    roots += [_SYSTEM_ROOT, _cache_dir()]
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
    mean, std = NORMALISATION[name]
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


def _split_batch(batch: Any) -> tuple[Tensor, Tensor]:
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and all(isinstance(t, Tensor) for t in batch):
        return batch[0], batch[1]
    raise TypeError(
        "the loader must yield (inputs, targets) pairs of tensors, got "
        f"{type(batch).__name__}" + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
    )


def materialize(loader: Iterable) -> tuple[Tensor, Tensor, int]:
    """Run through a loader once and concatenate its ``(x, y)`` batches on the CPU.

    Returns:
        ``(x, y, batch_size)``, where ``batch_size`` is the loader's ``batch_size`` if it has
        one, else the size of its first batch.

    Raises:
        ValueError: the loader yields no batches (or only empty ones).
        TypeError: a batch is not an ``(inputs, targets)`` pair of tensors.
    """
    xs, ys = [], []
    for batch in loader:
        x, y = _split_batch(batch)
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"a batch has {x.shape[0]} inputs but {y.shape[0]} targets")
        if x.shape[0]:
            xs.append(x.detach().cpu())
            ys.append(y.detach().cpu())
    if not xs:
        raise ValueError("the data loader is empty: it yielded no examples")
    batch_size = getattr(loader, "batch_size", None) or xs[0].shape[0]
    return torch.cat(xs), torch.cat(ys), int(batch_size)
