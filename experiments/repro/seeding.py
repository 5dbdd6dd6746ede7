"""Seeded construction: a model or a stand-in net drawn under a seed, the caller's RNG untouched."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

__all__ = ["seeded"]

T = TypeVar("T")


def seeded(build: Callable[[], T], seed: int = 0) -> T:
    """``build()`` with torch's global RNG seeded by ``seed``; the caller's RNG state is restored
    afterwards, so seeded construction (module inits draw from the global RNG) has no side effect."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()
