"""How optimizer state is stored: dtype names where it leaves the process, and the 8-bit
hidden state's codec.

``torch.distributed.checkpoint`` (and JSON) take plain values only, so a param group's
``state_dtype`` travels as its name and comes back as the dtype.

**The 8-bit state** (``state_dtype=torch.int8``): SimpleOptimizer's hidden state
``h`` (H units per coordinate) is kept as int8 codes, block-scaled as 8-bit Adam keeps its
moments: per hidden unit, the coordinates form blocks of :data:`INT8_BLOCK`, and each block
keeps its absolute maximum ``s`` (float32, the state's ``"h_scale"``, shape
``(H, ceil(n / INT8_BLOCK))``); a value is ``code * (s / 127)``. The codes are rounded
stochastically (:func:`encode_hidden`), so rounding is unbiased: a hidden unit that moves by
less than half a code step per step (a slowly decaying unit) still moves on average instead
of sticking at its code. The random numbers are those of the bfloat16 state's rounding
(:mod:`l2l_optim.rounding`: a hash of a per-tensor key, from the tensor's step count, and of
the coordinate), not a generator: the step stays a function of its inputs, reproducible,
independent of the thread count, and the user's random streams are not touched. The CPU
kernel runs the codec inside its pass over the coordinates, a block at a time, bit for bit
as defined here; for the other kernels :func:`decoded_hiddens` runs it around the step as
torch ops on a float32 working copy. The 8-bit state keeps the rms input norm's running mean
of squares ``v`` in bfloat16, rounded stochastically with bits of its own
(:func:`~l2l_optim.rounding.round_squares_bf16`; :func:`float_squares` for the kernels that
read it in float32): 12.01 bytes of state per parameter in all.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

from .rounding import round_squares_bf16, stochastic_bits

__all__ = ["dtype_name", "dtype_from_name", "INT8_BLOCK", "int8_blocks", "encode_hidden",
           "decode_hidden", "decoded_hiddens", "float_squares", "state_bytes_per_parameter"]


def dtype_name(dtype: torch.dtype | str) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (a name passes through)."""
    return dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")


def dtype_from_name(name: torch.dtype | str) -> torch.dtype | str:
    """``"bfloat16"`` -> ``torch.bfloat16``; a dtype passes through, an unknown name too (for
    the option check to reject)."""
    if isinstance(name, str) and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)
    return name


#: coordinates per block of the 8-bit hidden state: one float32 scale per hidden unit and
#: block, 4 * H / INT8_BLOCK bytes per parameter (0.01 for H = 10)
INT8_BLOCK = 4096


def int8_blocks(n: int) -> int:
    """Blocks of :data:`INT8_BLOCK` coordinates that ``n`` coordinates make (the last one
    partial)."""
    return -(-n // INT8_BLOCK)


def _blocks(t: Tensor) -> list[tuple[Tensor, slice]]:
    """``t`` ``(H, n)`` as views ``(H, blocks, width)`` of its whole blocks and of its partial
    last block, each with the slice of block indices it covers."""
    n = t.shape[-1]
    whole = n // INT8_BLOCK
    parts = []
    if whole:
        parts.append((t[:, : whole * INT8_BLOCK].view(t.shape[0], whole, INT8_BLOCK), slice(0, whole)))
    if n > whole * INT8_BLOCK:
        parts.append((t[:, whole * INT8_BLOCK :].unsqueeze(1), slice(whole, whole + 1)))
    return parts


def encode_hidden(h: Tensor, key: int | Tensor, codes: Tensor, scales: Tensor) -> None:
    """Write hidden states ``h`` into the 8-bit codes and block scales, in place.

    Per unit and block, ``s = max |h|`` and ``code = floor(h * (127 / s) + u)``, clamped to
    [-127, 127], with ``u`` uniform in [0, 1): stochastic rounding, the code's expected value
    is ``127 h / s``. ``u`` is the element's 16 random bits of
    :func:`~l2l_optim.rounding.stochastic_bits` over 2^16 (float32 throughout, the product
    and the sum rounded separately). A block of zeros keeps ``s = 0``.

    Args:
        h: ``(H, n)`` float hidden states (finite, as the rule's tanh gives).
        key: the tensor's rounding key (:func:`~l2l_optim.rounding.rounding_keys`), an int or
            an integer tensor of one element.
        codes: ``(H, n)`` int8, written.
        scales: ``(H, int8_blocks(n))`` float32, written.

    Example:
        >>> h = torch.tensor([[0.5, -0.25, 0.0], [1e-3, 0.0, -1e-3]])
        >>> codes = torch.empty(2, 3, dtype=torch.int8)
        >>> scales = torch.empty(2, 1)
        >>> encode_hidden(h, 0, codes, scales)  # -63.5 rounds down or up, by the key
        >>> scales.flatten().tolist(), codes[0].tolist()
        ([0.5, 0.0010000000474974513], [127, -64, 0])
        >>> bool(torch.allclose(decode_hidden(codes, scales), h, atol=0.5 / 127))
        True
    """
    H, n = h.shape
    y = h.to(torch.float32, copy=True)
    s = torch.empty(H, int8_blocks(n), dtype=torch.float32, device=h.device)
    for part, where in _blocks(y):
        s[:, where] = torch.linalg.vector_norm(part, ord=float("inf"), dim=-1)
        block = s[:, where]
        # 127 / s in one division (a Python number over a tensor is a reciprocal and a
        # product in torch, two roundings)
        part.mul_(torch.where(block > 0, torch.full_like(block, 127.0) / block, 0.0).unsqueeze(-1))
    if isinstance(key, Tensor):
        key = key.reshape(())
    u = stochastic_bits(key, n, H, device=h.device).to(torch.float32).mul_(2.0 ** -16)
    y.add_(u).floor_().clamp_(-127.0, 127.0)
    scales.copy_(s)
    codes.copy_(y)


def decode_hidden(codes: Tensor, scales: Tensor) -> Tensor:
    """The float32 hidden states ``code * s / 127`` of 8-bit ``codes`` ``(H, n)`` and block
    ``scales`` ``(H, int8_blocks(n))``."""
    h = codes.to(torch.float32)
    for part, where in _blocks(h):
        part.mul_((scales[:, where] / 127.0).unsqueeze(-1))
    return h


@contextlib.contextmanager
def decoded_hiddens(hiddens: list[Tensor], scales: list[Tensor | None],
                    keys: list[int] | Tensor, skip: Tensor | None = None) -> Iterator[list[Tensor]]:
    """The hidden states to hand a kernel without the codec: each 8-bit one (int8 codes with
    their scales) as a float32 working copy, encoded back when the block exits without an
    error; the others as they are.

    Args:
        hiddens: per parameter, its hidden state.
        scales: per parameter, its 8-bit state's scales (None for the others).
        keys: per parameter, its rounding key (a list of ints or an integer tensor).
        skip: a 0-dim bool tensor; where true the codes and scales stay as they were.
    """
    work = [decode_hidden(h, s) if h.dtype == torch.int8 else h for h, s in zip(hiddens, scales)]
    yield work
    for i, (h, s, x) in enumerate(zip(hiddens, scales, work)):
        if h.dtype != torch.int8:
            continue
        codes, new = torch.empty_like(h), torch.empty_like(s)
        encode_hidden(x, keys[i], codes, new)
        if skip is not None:
            codes, new = torch.where(skip, h, codes), torch.where(skip, s, new)
        h.copy_(codes)
        s.copy_(new)


@contextlib.contextmanager
def float_squares(squares: list[Tensor], keys: list[int] | Tensor,
                  skip: Tensor | None = None) -> Iterator[list[Tensor]]:
    """The running means of squares to hand a kernel that reads them in float32: each
    bfloat16 one (the 8-bit state's ``v``) as a float32 working copy, rounded back
    stochastically (:func:`~l2l_optim.rounding.round_squares_bf16`) when the block exits
    without an error; the others as they are.

    Args:
        squares: per parameter, its ``v``.
        keys: per parameter, its rounding key (a list of ints or an integer tensor).
        skip: a 0-dim bool tensor; where true the bfloat16 values stay as they were.
    """
    work = [v.float() if v.dtype == torch.bfloat16 else v for v in squares]
    yield work
    for i, (v, x) in enumerate(zip(squares, work)):
        if v.dtype != torch.bfloat16:
            continue
        new = round_squares_bf16(x.reshape(-1), keys[i]).view(v.shape)
        v.copy_(new if skip is None else torch.where(skip, v, new))


def state_bytes_per_parameter(state: dict[str, Tensor], numel: int) -> float:
    """Bytes of ``state`` (every tensor, ``step`` included) per coordinate of a parameter
    of ``numel`` elements."""
    total = sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, Tensor))
    return total / max(numel, 1)
