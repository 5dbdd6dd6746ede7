"""Stochastic rounding of a bfloat16 hidden state: the one definition the kernels follow.

A hidden unit moves by small increments; rounded to the nearest bfloat16 every step, an
increment below half the unit's last bit is lost every time, and a slow unit stops moving.
Rounded stochastically (up with probability equal to the dropped fraction), the stored value
is right on average, as 8-bit and bfloat16 optimizer states are rounded elsewhere.

The random bits are a function of a per-tensor *key* and the coordinate, not of a generator's
state, so that a step is deterministic, independent of the thread count and of how the
kernel splits the work, resumable bit for bit (the key derives from the step count), and the
same on every implementation:

* ``key = rounding_key(step, position)``: one 32-bit value per tensor and step, from the
  tensor's step count and its position in the call (:func:`rounding_key`);
* the 16 bits added below the bfloat16 mantissa of hidden unit ``j`` of coordinate ``i``
  (``H`` units per coordinate) are the high half of ``(key + i * H + j) * GOLDEN``, modulo
  2**32 (:func:`stochastic_bits`): for one coordinate a fresh draw per step (the key is
  hashed), across coordinates an equidistributed sequence;
* the float32 value's bit pattern plus those 16 bits, truncated to its high half, is the
  bfloat16 value; NaN stays NaN (``0x7FC0``), as in round-to-nearest.

A shard of a tensor whose coordinates start at ``offset`` uses ``key + offset * H``: the same
bits as the whole tensor's (:func:`shard_key`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["GOLDEN", "rounding_key", "rounding_keys", "shard_key", "squares_key", "stochastic_bits",
           "round_bf16_stochastic", "round_squares_bf16"]

#: the multiplier of the coordinate sequence (2**32 over the golden ratio, odd)
GOLDEN = 0x9E3779B1
_MASK = 0xFFFFFFFF
_STEP_MIX = 0x85EBCA77
_POSITION_MIX = 0xC2B2AE3D


def rounding_key(step: int, position: int) -> int:
    """The 32-bit key of a tensor's stochastic rounding at ``step``.

    Args:
        step: the tensor's step count (before the step).
        position: the tensor's index among the tensors of the call.

    Returns:
        An int in ``[0, 2**32)``.

    Example:
        >>> rounding_key(0, 0) != rounding_key(1, 0) != rounding_key(0, 1)
        True
    """
    return _fmix32((step * _STEP_MIX + position * _POSITION_MIX) & _MASK)


def _mul32(x: int | Tensor, c: int) -> int | Tensor:
    # (x * c) mod 2**32; for an int64 tensor x in [0, 2**32) in 16-bit halves, so that the
    # product does not overflow int64
    if not isinstance(x, Tensor):
        return (x * c) & _MASK
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _MASK


def _fmix32(x: int | Tensor) -> int | Tensor:
    # MurmurHash3's finaliser (every input bit moves every output bit), on an int or
    # elementwise on an int64 tensor of values in [0, 2**32)
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def rounding_keys(steps: Sequence[Tensor], offsets: Sequence[int | None] | None = None,
                  hidden_size: int = 10) -> list[int] | Tensor:
    """Every tensor's key, from its step count.

    Args:
        steps: per tensor, its step count (a 0-dim integer tensor).
        offsets: optional, per tensor that is a shard of a larger one, the index of its
            first coordinate in the whole (None or absent: 0); see :func:`shard_key`.
        hidden_size: hidden units per coordinate (for the offsets).

    Returns:
        Element ``i`` is ``shard_key(rounding_key(steps[i], i), offsets[i], hidden_size)``:
        a list of ints when the counts are on the CPU (read on the host, no kernel
        launches), else an int64 tensor on their device computed there (no host
        synchronisation).
    """
    if not steps:
        return []
    shifts = [((o or 0) * hidden_size) & _MASK for o in offsets] if offsets is not None else None
    if steps[0].device.type == "cpu" and not torch.compiler.is_compiling():
        keys = [rounding_key(int(s), i) for i, s in enumerate(steps)]
        return keys if shifts is None else [(k + d) & _MASK for k, d in zip(keys, shifts)]
    return _device_keys(steps, shifts)


def _device_keys(steps: Sequence[Tensor], shifts: list[int] | None) -> Tensor:
    # rounding_key in torch ops on the counts' device
    s = torch.stack([t.reshape(()) for t in steps]).to(torch.int64) & _MASK
    pos = torch.arange(len(steps), device=s.device, dtype=torch.int64)
    keys = _fmix32((_mul32(s, _STEP_MIX) + _mul32(pos, _POSITION_MIX)) & _MASK)
    if shifts is not None:
        keys = (keys + torch.tensor(shifts, dtype=torch.int64).to(keys.device)) & _MASK
    return keys


def shard_key(key: int, offset: int, hidden_size: int) -> int:
    """The key of a shard whose first coordinate is the whole tensor's ``offset``-th: its
    coordinate ``i`` then draws the bits of the whole tensor's ``offset + i``."""
    return (key + offset * hidden_size) & _MASK


def stochastic_bits(key: int | Tensor, numel: int, hidden_size: int, device=None) -> Tensor:
    """The 16 random bits of every element of an ``(hidden_size, numel)`` hidden state, as
    int64 in ``[0, 2**16)``, in the state's layout (row ``j`` is hidden unit ``j``)."""
    i = torch.arange(numel, device=device, dtype=torch.int64)
    j = torch.arange(hidden_size, device=device, dtype=torch.int64)
    index = (i * hidden_size).unsqueeze(0) + j.unsqueeze(1)
    if isinstance(key, Tensor):
        key = key.to(device=index.device, dtype=torch.int64)
    return _mul32((index + key) & _MASK, GOLDEN) >> 16


def round_bf16_stochastic(x: Tensor, key: int | Tensor) -> Tensor:
    """``x`` (float32, shape ``(H, n)``) rounded stochastically to bfloat16 with ``key``.

    Example:
        >>> x = torch.full((10, 4096), 1.0 + 2.0 ** -10)  # 1/8 of a bfloat16 ulp above 1
        >>> y = round_bf16_stochastic(x, rounding_key(0, 0)).float()
        >>> sorted(set(y.flatten().tolist())), round(float(y.mean() - 1) * 2 ** 10, 1)
        ([1.0, 1.0078125], 1.0)
    """
    if x.dtype != torch.float32 or x.dim() != 2:
        raise ValueError(f"round_bf16_stochastic: needs a 2-D float32 tensor, got {x.dtype} "
                         f"of shape {tuple(x.shape)}")
    bits = stochastic_bits(key, x.shape[1], x.shape[0], device=x.device)
    u = x.contiguous().view(torch.int32).to(torch.int64) & _MASK
    high = (u + bits) >> 16  # < 2**16: a finite pattern plus 16 bits cannot pass 2**32
    # int16 holds the bfloat16 pattern: shift the unsigned half into its signed range
    high = torch.where(torch.isnan(x), 0x7FC0, high)
    return torch.where(high >= 0x8000, high - 0x10000, high).to(torch.int16).view(torch.bfloat16)


#: mixed into a tensor's key for the bits of its bfloat16 running mean of squares, so that
#: they are not the bits of its hidden state
_SQUARES_MIX = 0x5BD1E995
#: the largest finite bfloat16, as its bit pattern
_BF16_MAX = 0x7F7F


def squares_key(key: int | Tensor) -> int | Tensor:
    """The key of a tensor's bfloat16 running mean of squares ``v`` (the 8-bit state keeps
    ``v`` in bfloat16), from the tensor's rounding key: its coordinate ``i`` draws the bits of
    :func:`stochastic_bits` with ``hidden_size`` 1, ``(squares_key + i) * GOLDEN``. (A shard
    would need the whole tensor's key: the 8-bit state takes no sharded parameters.)"""
    if isinstance(key, Tensor):
        return _fmix32((key.to(torch.int64) & _MASK) ^ _SQUARES_MIX)
    return _fmix32((key & _MASK) ^ _SQUARES_MIX)


def round_squares_bf16(v: Tensor, key: int | Tensor) -> Tensor:
    """A running mean of squares ``v`` (float32, 1-D, non-negative) rounded stochastically to
    bfloat16 with the tensor's rounding ``key`` (:func:`squares_key` derives its bits). A
    finite value stays finite (the largest bfloat16 where rounding up would reach infinity),
    as the float32 running mean saturates below infinity: an infinite ``v`` would freeze the
    coordinate.

    Example:
        >>> v = torch.full((4096,), 1.0 + 2.0 ** -10)
        >>> r = round_squares_bf16(v, rounding_key(3, 0)).float()
        >>> sorted(set(r.tolist())), round(float(r.mean() - 1) * 2 ** 10, 1)
        ([1.0, 1.0078125], 1.0)
    """
    if isinstance(key, Tensor):
        key = key.reshape(())
    out = round_bf16_stochastic(v.reshape(1, -1), squares_key(key)).reshape(v.shape)
    top = torch.tensor(_BF16_MAX, dtype=torch.int16, device=v.device).view(torch.bfloat16)
    return torch.where(torch.isinf(out) & torch.isfinite(v), top, out)
