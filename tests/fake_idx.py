"""Tiny fake MNIST / Fashion-MNIST IDX files for tests (no network, a few hundred images).

The images carry their label in their brightness, so a model can learn them quickly.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import torch


def write_idx(path: Path, t: torch.Tensor) -> None:
    dims = t.shape
    head = bytes([0, 0, 8, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)
    with gzip.open(path, "wb") as f:
        f.write(head + t.contiguous().numpy().tobytes())


def make_fake_datasets(root: Path, n_train: int = 640, n_test: int = 200) -> Path:
    """Write ``root/mnist`` and ``root/fashion-mnist`` with IDX files; return ``root``."""
    for i, name in enumerate(("mnist", "fashion-mnist")):
        d = Path(root) / name
        d.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(i)
        for split, n in (("train", n_train), ("t10k", n_test)):
            y = torch.randint(0, 10, (n,), generator=g)
            x = (torch.rand(n, 28, 28, generator=g) * 60 + y.view(-1, 1, 1) * 18).to(torch.uint8)
            write_idx(d / f"{split}-images-idx3-ubyte.gz", x)
            write_idx(d / f"{split}-labels-idx1-ubyte.gz", y.to(torch.uint8))
    return Path(root)
