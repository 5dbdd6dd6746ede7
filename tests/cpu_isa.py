"""Run a block on one instruction-set copy of the CPU kernel's loops (a test helper)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest


@contextlib.contextmanager
def cpu_isa(isa: str) -> Iterator[object]:
    """The CPU kernel's copy for ``isa`` (``"avx512"``, ``"avx2"``, ``"baseline"``) selected
    inside the block, the copy in use before restored after it; yields the
    :mod:`l2l_optim.kernels.cpu` module. Skips the test where the library is unavailable or
    this CPU does not run ``isa``."""
    from l2l_optim.kernels import cpu

    if not cpu.is_available():
        pytest.skip(f"fused CPU kernel unavailable: {cpu.build_error()}")
    if isa not in cpu.kernel_info()["supported"]:
        pytest.skip(f"this CPU does not run {isa}")
    before = cpu.kernel_info()["isa"]
    cpu.select_isa(isa)
    try:
        yield cpu
    finally:
        cpu.select_isa(before)
