"""SimpleOptimizer update kernels: one file per path, chosen by ``impl``.

Every path has the signature of :func:`simple_update_reference` and must agree with it
(``tests/test_kernels.py``):

==============  ========================================================================
``reference``   plain torch ops (``reference.py``): the oracle; any device, slow.
``cpu``         fused C++/OpenMP kernel (``cpu.py``; ``simple_cpu.cpp``, a library with a C
                ABI called through ctypes), CPU tensors; built when the package is
                installed, with its instruction set chosen at run time.
``triton``      fused Triton kernels (``triton.py``), CUDA tensors (or CPU tensors under
                ``TRITON_INTERPRET=1``, which is how the tests run it without a GPU).
==============  ========================================================================

``impl="auto"`` picks, per device type: ``cpu`` on CPU when the library loads (otherwise
``reference``, with a one-line warning), ``triton`` on CUDA when Triton is importable
(otherwise ``reference``), ``reference`` anywhere else. A forced ``impl`` that cannot run
raises :class:`RuntimeError` saying why.

The checks, the precision rule, the contiguity handling and the one cache of packed weights
that every path uses live in ``_common.py``; :func:`l2l_optim.functional.simple_update` is
the public entry point that picks a path and folds the net.
"""

from __future__ import annotations

import warnings

from ._common import compute_dtype
from .reference import simple_update_reference

__all__ = [
    "simple_update_reference",
    "compute_dtype",
    "IMPLS",
    "resolve_impl",
    "get_kernel",
    "available_impls",
]

IMPLS = ("auto", "reference", "cpu", "triton")


# whether the CPU kernel's library loads, once known; a plain global (no lru_cache, no lock),
# so that torch.compile reads it as a constant instead of breaking the graph
_CPU_OK: bool | None = None
_WARNED = False


def _cpu_available(warn: bool) -> bool:
    global _CPU_OK, _WARNED
    if _CPU_OK is None:
        from . import cpu

        _CPU_OK = cpu.is_available()
    if not _CPU_OK and warn and not _WARNED:
        from . import cpu

        _WARNED = True
        warnings.warn(
            f"l2l_optim: fused CPU kernel unavailable ({cpu.build_error()}); using the slower "
            "reference update",
            RuntimeWarning,
            stacklevel=4,
        )
    return _CPU_OK


def _triton_importable() -> bool:
    from . import triton as triton_kernels

    return triton_kernels.is_available()


def resolve_impl(impl: str, device_type: str) -> str:
    """Map ``impl`` (possibly ``"auto"``) to a concrete, runnable path for ``device_type``.

    The first ``"auto"`` resolution on CPU loads the kernel's library (in a checkout without
    an installed one, it compiles it into the developer cache first).

    Raises:
        ValueError: ``impl`` is not one of :data:`IMPLS`.
        RuntimeError: a forced ``impl`` that cannot run here (the CPU library does not load,
            no Triton, wrong device type).
    """
    if impl not in IMPLS:
        raise ValueError(f"Invalid impl: {impl!r}; expected one of {IMPLS}")
    if impl == "auto":
        if device_type == "cpu":
            return "cpu" if _cpu_available(True) else "reference"
        if device_type == "cuda":
            return "triton" if _triton_importable() else "reference"
        return "reference"
    if impl == "cpu":
        if device_type != "cpu":
            raise RuntimeError(
                f"impl='cpu' runs on CPU tensors, not {device_type!r}; use impl='auto'"
            )
        if not _cpu_available(False):
            from . import cpu

            raise RuntimeError(
                f"impl='cpu' is unavailable: {cpu.build_error()}; {cpu.build_advice()}. "
                "Use impl='auto' (falls back to the reference) or impl='reference'."
            )
    elif impl == "triton":
        from . import triton as triton_kernels

        if not triton_kernels.is_available():
            raise RuntimeError(
                f"impl='triton' is unavailable: Triton cannot be imported "
                f"({triton_kernels.import_error()}); use impl='auto' or impl='reference'."
            )
        if device_type != "cuda" and not (device_type == "cpu" and triton_kernels.interpret_mode()):
            raise RuntimeError(
                f"impl='triton' runs on CUDA tensors, not {device_type!r} "
                "(CPU tensors only under TRITON_INTERPRET=1); use impl='auto'"
            )
    return impl


def get_kernel(impl: str):
    """The update function of a concrete ``impl`` (as returned by :func:`resolve_impl`)."""
    if impl == "reference":
        return simple_update_reference
    if impl == "cpu":
        from .cpu import simple_update_cpu

        return simple_update_cpu
    if impl == "triton":
        from .triton import simple_update_triton

        return simple_update_triton
    if impl == "auto":
        raise ValueError("get_kernel needs a concrete impl: call resolve_impl first")
    raise ValueError(f"Invalid impl: {impl!r}; expected one of {IMPLS}")


def available_impls(device_type: str) -> list[str]:
    """The concrete paths that can run on ``device_type`` here (never builds twice)."""
    out = []
    for impl in ("reference", "cpu", "triton"):
        try:
            resolve_impl(impl, device_type)
        except RuntimeError:
            continue
        out.append(impl)
    return out
