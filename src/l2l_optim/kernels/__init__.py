"""SimpleOptimizer update kernels: one file per path, chosen by ``impl``.

Every path has the signature of :func:`simple_update_reference` and must agree with it.
``impl="auto"`` picks the fastest path available for the parameters' device.
"""

from __future__ import annotations

from .reference import simple_update_reference

__all__ = ["simple_update_reference", "IMPLS", "resolve_impl", "get_kernel"]

IMPLS = ("auto", "reference", "cpu", "triton")


def resolve_impl(impl: str, device_type: str) -> str:
    """Map ``impl`` (possibly ``"auto"``) to a concrete path for ``device_type``."""
    if impl not in IMPLS:
        raise ValueError(f"Invalid impl: {impl!r}; expected one of {IMPLS}")
    if impl != "auto":
        return impl
    return "reference"


def get_kernel(impl: str):
    if impl == "reference":
        return simple_update_reference
    raise RuntimeError(f"SimpleOptimizer impl={impl!r} is not available in this build")
