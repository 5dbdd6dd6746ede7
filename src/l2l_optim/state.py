"""How optimizer state is named where it leaves the process: dtypes as plain strings.

``torch.distributed.checkpoint`` (and JSON) take plain values only, so a param group's
``state_dtype`` travels as its name and comes back as the dtype.
"""

from __future__ import annotations

import torch

__all__ = ["dtype_name", "dtype_from_name"]


def dtype_name(dtype: torch.dtype | str) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (a name passes through)."""
    return dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")


def dtype_from_name(name: torch.dtype | str) -> torch.dtype | str:
    """``"bfloat16"`` -> ``torch.bfloat16``; a dtype passes through, an unknown name too (for
    the option check to reject)."""
    if isinstance(name, str) and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)
    return name
