"""How optimizer state is stored: dtype names where it leaves the process, and the 8-bit
hidden state's codec.

``torch.distributed.checkpoint`` (and JSON) take plain values only, so a param group's
``state_dtype`` travels as its name and comes back as the dtype.

**The 8-bit hidden state** (``state_dtype=torch.int8``): SimpleOptimizer's hidden state
``h`` (H units per coordinate) is kept as int8 codes, block-scaled as 8-bit Adam keeps its
moments: per hidden unit, the coordinates form blocks of :data:`INT8_BLOCK`, and each block
keeps its absolute maximum ``s`` (float32, the state's ``"h_scale"``, shape
``(H, ceil(n / INT8_BLOCK))``); a value is ``code * s / 127``. The codes are rounded
stochastically (:func:`encode_hidden`), so rounding is unbiased: a hidden unit that moves by
less than half a code step per step (a slowly decaying unit) still moves on average instead
of sticking at its code. The random numbers are a hash of the coordinate and the bits of its
gradient (:func:`rounding_seeds`), rotated by golden-ratio steps from unit to unit, not a
generator: the step stays a function of its inputs, reproducible, independent of the thread
count, and the user's random streams are not touched. Any kernel can adopt the codec: decode
on read, the step in float32, encode on write. Until one does, :func:`decoded_hiddens` runs
it around the kernels as torch ops on a float32 working copy.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

__all__ = ["dtype_name", "dtype_from_name", "INT8_BLOCK", "int8_blocks", "rounding_seeds",
           "encode_hidden", "decode_hidden", "decoded_hiddens", "state_bytes_per_parameter"]


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
_M32 = 0xFFFFFFFF
_GOLDEN = 0.6180339887498949


def int8_blocks(n: int) -> int:
    """Blocks of :data:`INT8_BLOCK` coordinates that ``n`` coordinates make (the last one
    partial)."""
    return -(-n // INT8_BLOCK)


def _fmix32_(x: Tensor) -> Tensor:
    """MurmurHash3's 32-bit finaliser, in place on an int64 tensor of 32-bit values (a
    bijection whose every output bit depends on every input bit)."""
    x.bitwise_xor_(x >> 16).mul_(0x85EBCA6B).bitwise_and_(_M32)
    x.bitwise_xor_(x >> 13).mul_(0xC2B2AE35).bitwise_and_(_M32)
    return x.bitwise_xor_(x >> 16)


def rounding_seeds(grad: Tensor) -> Tensor:
    """Per coordinate, the seed of :func:`encode_hidden`'s rounding: the bits of the gradient
    as float32 (an int64 tensor of 32-bit values, flat).

    The gradient is new at every step, so the rounding noise is too, without any state."""
    return grad.reshape(-1).to(torch.float32).view(torch.int32).to(torch.int64) & _M32


def _uniform(seeds: Tensor, units: int) -> Tensor:
    """``(units, n)`` numbers in [0, 1): per coordinate i one hash,
    ``b_i = fmix32(i * 0x9E3779B1 xor seed_i)``'s top 24 bits over 2^24, and for unit k the
    rotation ``frac(b_i + k * 0.6180339887)`` (golden-ratio steps: every unit's number is
    uniform, one hash serves all units)."""
    n = seeds.numel()
    x = torch.arange(n, dtype=torch.int64, device=seeds.device)
    x.mul_(0x9E3779B1).bitwise_xor_(seeds).bitwise_and_(_M32)
    base = (_fmix32_(x) >> 8).to(torch.float32).mul_(2.0 ** -24)
    steps = torch.arange(units, dtype=torch.float32, device=seeds.device).mul_(_GOLDEN)
    return (base + steps.unsqueeze(1)).frac_()


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


def encode_hidden(h: Tensor, seeds: Tensor, codes: Tensor, scales: Tensor) -> None:
    """Write hidden states ``h`` into the 8-bit codes and block scales, in place.

    Per unit and block, ``s = max |h|`` and ``code = floor(127 h / s + u)`` with ``u`` uniform
    in [0, 1) (stochastic rounding: the code's expected value is ``127 h / s``); a block of
    zeros keeps ``s = 0``.

    Args:
        h: ``(H, n)`` float hidden states (finite, as the rule's tanh gives).
        seeds: ``(n,)`` :func:`rounding_seeds`.
        codes: ``(H, n)`` int8, written.
        scales: ``(H, int8_blocks(n))`` float32, written.

    Example:
        >>> h = torch.tensor([[0.5, -0.25, 0.0], [1e-3, 0.0, -1e-3]])
        >>> codes = torch.empty(2, 3, dtype=torch.int8)
        >>> scales = torch.empty(2, 1)
        >>> encode_hidden(h, rounding_seeds(torch.ones(3)), codes, scales)
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
        part.mul_(torch.where(s[:, where] > 0, 127.0 / s[:, where], 0.0).unsqueeze(-1))
    y.add_(_uniform(seeds, H)).floor_().clamp_(-127.0, 127.0)
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
def decoded_hiddens(states: list[dict[str, Tensor]], grads: list[Tensor],
                    skip: Tensor | None = None) -> Iterator[list[Tensor]]:
    """The hidden states to hand a kernel: each 8-bit one (``"h"`` int8 with ``"h_scale"``)
    as a float32 working copy, encoded back into its state when the block exits without an
    error; the others as they are.

    Args:
        states: per parameter, its state (``"h"``, and ``"h_scale"`` when 8-bit).
        grads: the step's gradients (:func:`rounding_seeds`).
        skip: a 0-dim bool tensor; where true the codes and scales stay as they were.
    """
    work = [decode_hidden(s["h"], s["h_scale"]) if s["h"].dtype == torch.int8 else s["h"]
            for s in states]
    yield work
    for s, g, h in zip(states, grads, work):
        if s["h"].dtype != torch.int8:
            continue
        codes, scales = torch.empty_like(s["h"]), torch.empty_like(s["h_scale"])
        encode_hidden(h, rounding_seeds(g), codes, scales)
        if skip is not None:
            codes, scales = torch.where(skip, s["h"], codes), torch.where(skip, s["h_scale"], scales)
        s["h"].copy_(codes)
        s["h_scale"].copy_(scales)


def state_bytes_per_parameter(state: dict[str, Tensor], numel: int) -> float:
    """Bytes of ``state`` (every tensor, ``step`` included) per coordinate of a parameter
    of ``numel`` elements."""
    total = sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, Tensor))
    return total / max(numel, 1)
