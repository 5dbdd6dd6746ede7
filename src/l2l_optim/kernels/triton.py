"""The fused SimpleOptimizer update on CUDA, in Triton. ``impl="auto"`` picks it for CUDA tensors.

(About 590 lines: the update's kernels, the non-finite scan that guards it, and the host side
that builds both from one kind of cached block table share the dtype maps, the upload and the
interpreter switch, so they stay in one module.)

Structure (the same two passes as the CPU kernel, see ``simple_cpu.cpp``):

1. **pass 1**, one launch per (param dtype, grad dtype, hidden dtype) group, covering every
   tensor of the group: each program takes one block of ``BLOCK`` coordinates of one tensor
   (a block table maps program id -> (tensor, start); a pointer table holds the tensors'
   addresses), reads g, the ``(H, BLOCK)`` hidden tile (coalesced: coordinate last) and theta,
   computes ``h' = tanh(w_ih g + w_hh h + b_h)`` (with the rms input norm, ``g`` is first
   divided by its running rms, whose running means it reads and writes in the same
   program), writes ``h'``, applies
   ``theta += lr (w_a . h' + b_out)`` and writes the block's sum of ``w_b . h'`` to a partials
   buffer. bf16/fp16 parameters instead write ``u = w_a . h' + b_out`` to an fp32 scratch
   buffer so that theta is rounded once, as in the reference.
2. **reduce**: one program sums the partials in a fixed order (fp64) and writes
   ``shared = S / N`` to a one-element device buffer. No atomics, no host synchronisation.
3. **pass 2**, one launch per group: ``theta += lr * shared`` (or, for bf16/fp16,
   ``theta = round(theta + lr (u + shared))``).

With an ``aggregate`` callback (sharded parameters, see ``l2l_optim.distributed``) step 2 is
replaced: one program per tensor sums that tensor's partials in a fixed order, and the callback
turns the per-tensor sums into ``shared`` (an all-reduce, on the device) before pass 2.

So a step is ``2 * groups + 1`` launches whatever the number of tensors, reads no value back
to the host (no ``.item()``) and is CUDA-graph capturable once warmed up: the pointer/block
tables are built on the host and uploaded on the first call for a given set of tensors, and
kept in the kernels' one cache (``_common.CACHE``, keyed on the tensors' addresses), so a
captured step finds them ready. Learning rates given as Python floats are part of a small
cached table too; pass 0-dim device tensors as ``lrs`` to change them inside a captured graph.

The weights live in a tiny device tensor (fp32 or fp64), read with scalar loads that the
compiler keeps in registers; ``H`` is a compile-time constant. The ``skip`` flag (0-dim bool
device tensor) is read inside the kernels and masks every load and store.

Precision matches the reference: fp64 parameters compute in fp64, all others in fp32.
``tanh`` is computed from ``exp`` (``_tanh`` below: a minimax polynomial for ``|x| < 0.55``,
``1 - 2 / (1 + exp(2|x|))`` above) because Triton's interpreter has no ``libdevice``, so the
tests on CPU (``TRITON_INTERPRET=1``) run the same code as the GPU. bf16 stores round to
nearest even with explicit bit operations, identical on GPU and in the interpreter.

Determinism: the block partition, the in-block reduction tree and the reduction of partials
are fixed, so results are bitwise reproducible run to run on the same GPU and ``BLOCK``.

Limits: all tensors on one device (the reference handles a multi-device call); non-contiguous
parameters are copied to contiguous and back (a copy per step, and a table rebuild when the
copy lands at a new address).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from ..rule import SimpleWeights
from ._common import (
    CACHE,
    RMS_CONSTANTS,
    Aggregate,
    RunningRms,
    call_aggregate,
    check_inputs,
    check_rms,
    compute_dtype,
    contiguous_inplace,
    packed_weights,
    split_skip,
)

__all__ = ["simple_update_triton", "finite_flags_triton", "is_available", "import_error", "interpret_mode"]

try:
    import triton
    import triton.language as tl

    _IMPORT_ERROR: str | None = None
except Exception as e:  # noqa: BLE001 - no triton (CPU-only torch build, macOS, ...)
    triton = None
    tl = None
    _IMPORT_ERROR = f"{type(e).__name__}: {e}"


def is_available() -> bool:
    """Whether Triton is importable (the kernels also need a CUDA device or interpret mode)."""
    return triton is not None


def import_error() -> str | None:
    return _IMPORT_ERROR


def interpret_mode() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# block sizes: coordinates per program of pass 1 / pass 2, partials per step of the reduction
BLOCK_GPU = 512
BLOCK_INTERPRET = 4096  # the interpreter runs programs one by one: fewer, larger blocks
REDUCE_BLOCK = 1024
NUM_WARPS = 4


if triton is not None:

    @triton.jit
    def _tanh(x, F64: tl.constexpr):
        # |x| < 0.55: x + x^3 P(x^2), P a minimax fit of (tanh(x) - x) / x^3
        # (degree 4 for fp32, 10 for fp64); otherwise sign(x) (1 - 2 / (1 + exp(2|x|))).
        a = tl.abs(x)
        t = x * x
        if F64:
            # (literals meet a tensor first: Triton then builds them in the tensor's dtype)
            p = t * -2.060276537636634e-05 + 8.511313685577672e-05
            p = p * t + -0.0002346347410887237
            p = p * t + 0.0005889360520074057
            p = p * t + -0.001455661830100716
            p = p * t + 0.003592110378689024
            p = p * t + -0.008863234397814355
            p = p * t + 0.021869488493666944
            p = p * t + -0.053968253967434016
            p = p * t + 0.13333333333332714
            p = p * t + -0.3333333333333333
            lim = 40.0
        else:
            p = t * -0.0062823668122291565 + 0.021077677607536316
            p = p * t + -0.0538538359105587
            p = p * t + 0.13332600891590118
            p = p * t + -0.33333319425582886
            lim = 20.0
        small = x + (x * t) * p
        y = 2.0 * a
        y = tl.where(y > lim, lim, y)  # keeps NaN
        e = tl.exp(y)
        if F64:
            big = 1.0 - 2.0 / (1.0 + e)  # fp64 division is IEEE-rounded
        else:
            big = 1.0 - tl.math.div_rn(2.0 + 0.0 * y, 1.0 + e)  # fp32 '/' may be approximate
        big = tl.where(x < 0, -big, big)
        return tl.where(a < 0.55, small, big)

    @triton.jit
    def _to_bf16(x):
        # fp32 -> bf16, round to nearest even, NaN -> 0x7FC0 (== c10::BFloat16), with bit ops so
        # that the interpreter (which truncates in .to(tl.bfloat16)) and the GPU agree.
        u = x.to(tl.uint32, bitcast=True)
        r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        r = tl.where(x != x, 0x7FC0, r)
        return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)

    @triton.jit
    def _store_cast(ptr, x, mask, DT: tl.constexpr):
        if DT == tl.bfloat16:
            tl.store(ptr, _to_bf16(x.to(tl.float32)), mask=mask)
        else:
            tl.store(ptr, x.to(DT), mask=mask)

    @triton.jit
    def _pass1_kernel(
        p_tab, g_tab, h_tab, v_tab, c_tab, n_tab, sc_tab, lr_tab, blk_t, blk_s,
        w_ptr, norm_ptr, part_ptr, scratch_ptr, skip_ptr,
        H: tl.constexpr, HP: tl.constexpr, BLOCK: tl.constexpr,
        P_DT: tl.constexpr, G_DT: tl.constexpr, H_DT: tl.constexpr, C_DT: tl.constexpr,
        INPLACE: tl.constexpr, HAS_SKIP: tl.constexpr, RMS: tl.constexpr,
    ):
        pid = tl.program_id(0)
        t = tl.load(blk_t + pid)
        start = tl.load(blk_s + pid)
        n = tl.load(n_tab + t)
        gp = tl.load(g_tab + t).to(tl.pointer_type(G_DT))
        hp = tl.load(h_tab + t).to(tl.pointer_type(H_DT))
        offs = start + tl.arange(0, BLOCK).to(tl.int64)
        mask = offs < n
        if HAS_SKIP:
            mask = mask & (tl.load(skip_ptr) == 0)
        rows = tl.arange(0, HP)
        rmask = rows < H

        g = tl.load(gp + offs, mask=mask, other=0.0).to(C_DT)
        if RMS:
            # nets.rms_normalise: v, c (compute dtype) updated in place; correctly rounded
            # sqrt and division, as torch's (fp32 `/` on a GPU is an approximation)
            vp = tl.load(v_tab + t).to(tl.pointer_type(C_DT))
            cp = tl.load(c_tab + t).to(tl.pointer_type(C_DT))
            beta = tl.load(norm_ptr).to(C_DT)
            omb = tl.load(norm_ptr + 1).to(C_DT)
            eps = tl.load(norm_ptr + 2).to(C_DT)
            v = tl.load(vp + offs, mask=mask, other=0.0) * beta + (g * g) * omb
            c = tl.load(cp + offs, mask=mask, other=0.0) * beta + omb
            tl.store(vp + offs, v, mask=mask)
            tl.store(cp + offs, c, mask=mask)
            if C_DT == tl.float64:  # fp64 division and sqrt round correctly as they are
                g = g / (tl.sqrt(v / c) + eps)
            else:
                g = tl.div_rn(g, tl.sqrt_rn(tl.div_rn(v, c)) + eps)
        hmask = rmask[:, None] & mask[None, :]
        h = tl.load(hp + rows[:, None].to(tl.int64) * n + offs[None, :], mask=hmask, other=0.0)
        h = h.to(C_DT)

        # weights: [w_ih (H), w_hh (H*H), b_h (H), w_a (H), w_b (H), b_out]
        u = tl.zeros([BLOCK], dtype=C_DT) + tl.load(w_ptr + 4 * H + H * H)
        s = tl.zeros([BLOCK], dtype=C_DT)
        for j in tl.static_range(H):
            w_row = tl.load(w_ptr + H + j * H + rows, mask=rmask, other=0.0)
            pre = tl.load(w_ptr + j) * g + tl.load(w_ptr + H + H * H + j)
            pre = pre + tl.sum(w_row[:, None] * h, axis=0)
            hn = _tanh(pre, C_DT == tl.float64)
            _store_cast(hp + j * n + offs, hn, mask, H_DT)
            u = u + tl.load(w_ptr + 2 * H + H * H + j) * hn
            s = s + tl.load(w_ptr + 3 * H + H * H + j) * hn

        if INPLACE:
            pp = tl.load(p_tab + t).to(tl.pointer_type(P_DT))
            lr = tl.load(lr_tab + t).to(C_DT)
            theta = tl.load(pp + offs, mask=mask, other=0.0).to(C_DT)
            tl.store(pp + offs, (theta + lr * u).to(P_DT), mask=mask)
        else:
            base = tl.load(sc_tab + t)
            tl.store(scratch_ptr + base + offs, u.to(tl.float32), mask=mask)
        s = tl.where(mask, s, 0.0)
        tl.store(part_ptr + pid, tl.sum(s, axis=0).to(tl.float64))

    # (ints equal to 1 would otherwise become compile-time constants, with no .to())
    @triton.jit(do_not_specialize=["n_part", "n_total"])
    def _reduce_kernel(part_ptr, n_part, shared_ptr, n_total, R: tl.constexpr):
        # fixed-order sum of the partials: R interleaved fp64 accumulators, then a fixed tree
        acc = tl.zeros([R], dtype=tl.float64)
        for i in range(0, n_part, R):
            offs = i + tl.arange(0, R)
            acc += tl.load(part_ptr + offs, mask=offs < n_part, other=0.0)
        total = tl.sum(acc, axis=0)
        tl.store(shared_ptr, total / n_total.to(tl.float64))  # n_total: an int (exact)

    @triton.jit(do_not_specialize=["T"])
    def _segment_kernel(part_ptr, seg_ptr, out_ptr, T, R: tl.constexpr):
        # per tensor t: the sum of its blocks' partials, which are contiguous from
        # seg[t] (first block) for seg[T + t] blocks; a fixed order, as in _reduce_kernel
        t = tl.program_id(0)
        first = tl.load(seg_ptr + t)
        count = tl.load(seg_ptr + T + t)
        acc = tl.zeros([R], dtype=tl.float64)
        for i in range(0, count, R):
            offs = i + tl.arange(0, R)
            acc += tl.load(part_ptr + first + offs, mask=offs < count, other=0.0)
        tl.store(out_ptr + t, tl.sum(acc, axis=0))

    @triton.jit
    def _pass2_kernel(
        p_tab, n_tab, sc_tab, lr_tab, blk_t, blk_s, shared_ptr, scratch_ptr, skip_ptr,
        BLOCK: tl.constexpr, P_DT: tl.constexpr, C_DT: tl.constexpr,
        INPLACE: tl.constexpr, HAS_SKIP: tl.constexpr,
    ):
        pid = tl.program_id(0)
        t = tl.load(blk_t + pid)
        start = tl.load(blk_s + pid)
        n = tl.load(n_tab + t)
        pp = tl.load(p_tab + t).to(tl.pointer_type(P_DT))
        offs = start + tl.arange(0, BLOCK).to(tl.int64)
        mask = offs < n
        if HAS_SKIP:
            mask = mask & (tl.load(skip_ptr) == 0)
        shared = tl.load(shared_ptr).to(C_DT)
        lr = tl.load(lr_tab + t).to(C_DT)
        theta = tl.load(pp + offs, mask=mask, other=0.0).to(C_DT)
        if INPLACE:
            new = theta + lr * shared
        else:
            base = tl.load(sc_tab + t)
            u = tl.load(scratch_ptr + base + offs, mask=mask, other=0.0)
            new = theta + lr * (u + shared)
        _store_cast(pp + offs, new, mask, P_DT)


    @triton.jit
    def _nonfinite_kernel(g_tab, n_tab, blk_t, blk_s, out_ptr, BLOCK: tl.constexpr,
                          U_DT: tl.constexpr, EXP: tl.constexpr):
        # one block of one gradient: 1 if it holds a NaN or an Inf, i.e. a value whose
        # exponent bits are all ones. The gradient is read as unsigned integers of its width:
        # exact for every float format, and free of the float conversions of Triton's
        # interpreter (which widens bf16 and narrows fp64 on the way)
        pid = tl.program_id(0)
        t = tl.load(blk_t + pid)
        start = tl.load(blk_s + pid)
        n = tl.load(n_tab + t)
        gp = tl.load(g_tab + t).to(tl.pointer_type(U_DT))
        offs = start + tl.arange(0, BLOCK).to(tl.int64)
        u = tl.load(gp + offs, mask=offs < n, other=0)
        bad = (u & EXP) == EXP
        tl.store(out_ptr + pid, tl.max(bad.to(tl.int32), axis=0))

# ------------------------------------------------------------------------------------------
# host side

_TL_DTYPES = {}
if triton is not None:
    _TL_DTYPES = {
        torch.float32: tl.float32,
        torch.float64: tl.float64,
        torch.bfloat16: tl.bfloat16,
        torch.float16: tl.float16,
    }


class _Group:
    """One (param dtype, grad dtype, hidden dtype) group and its device tables."""

    __slots__ = ("pdt", "gdt", "hdt", "idx", "n_blocks", "part_base", "tab", "inplace", "cdt")


class _Plan:
    # lr_tables: (the float lrs, their device tables), replaced as one tuple so that two
    # threads stepping with one plan never pair one's lrs with the other's tables
    __slots__ = ("groups", "n_blocks", "n_total", "scratch_numel", "block", "lr_tables",
                 "seg_host", "seg")


def _upload(values: list[int] | list[float], dtype: torch.dtype, device: torch.device) -> Tensor:
    host = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def _plan(params, grads, hiddens, squares, ones, device, block) -> _Plan:
    # the tables hold addresses, not tensors: a key of addresses, sizes and dtypes is exact
    # (a tensor freed and another allocated at the same address reuses a correct table)
    key = ("triton-plan", device, block) + tuple(
        (p.data_ptr(), g.data_ptr(), h.data_ptr(), p.numel(), p.dtype, g.dtype, h.dtype)
        for p, g, h in zip(params, grads, hiddens)
    ) + tuple(x.data_ptr() for x in (*squares, *ones))
    return CACHE.get(key, lambda: _make_plan(params, grads, hiddens, squares, ones, device, block))


def _make_plan(params, grads, hiddens, squares, ones, device, block) -> _Plan:
    # squares, ones: the rms input norm's running means, or empty lists (then 0 addresses)
    groups: dict[tuple, list[int]] = {}
    for i, (p, g, h) in enumerate(zip(params, grads, hiddens)):
        if p.numel() == 0:
            continue
        groups.setdefault((p.dtype, g.dtype, h.dtype), []).append(i)
    plan = _Plan()
    plan.block = block
    plan.groups = []
    plan.n_total = sum(p.numel() for p in params)
    part_base = 0
    scratch = 0
    # per tensor (call order): first block in the partials and number of blocks
    seg_first = [0] * len(params)
    seg_count = [0] * len(params)
    for (pdt, gdt, hdt), idx in groups.items():
        grp = _Group()
        grp.pdt, grp.gdt, grp.hdt, grp.idx = pdt, gdt, hdt, idx
        grp.cdt = compute_dtype(pdt)
        grp.inplace = pdt in (torch.float32, torch.float64)
        T = len(idx)
        p_tab = [params[i].data_ptr() for i in idx]
        g_tab = [grads[i].data_ptr() for i in idx]
        h_tab = [hiddens[i].data_ptr() for i in idx]
        v_tab = [squares[i].data_ptr() if squares else 0 for i in idx]
        c_tab = [ones[i].data_ptr() if ones else 0 for i in idx]
        n_tab = [params[i].numel() for i in idx]
        sc_tab = []
        blk_t, blk_s = [], []
        for k, i in enumerate(idx):
            n = params[i].numel()
            sc_tab.append(scratch)
            if not grp.inplace:
                scratch += n
            seg_first[i] = part_base + len(blk_t)
            seg_count[i] = -(-n // block)
            for s in range(0, n, block):
                blk_t.append(k)
                blk_s.append(s)
        grp.n_blocks = len(blk_t)
        grp.part_base = part_base
        part_base += grp.n_blocks
        tab = _upload(p_tab + g_tab + h_tab + v_tab + c_tab + n_tab + sc_tab + blk_t + blk_s,
                      torch.int64, device)
        o = 0
        views = {}
        for name, length in (("p", T), ("g", T), ("h", T), ("v", T), ("c", T), ("n", T), ("sc", T),
                             ("bt", grp.n_blocks), ("bs", grp.n_blocks)):
            views[name] = tab[o : o + length]
            o += length
        grp.tab = views
        plan.groups.append(grp)
    plan.n_blocks = part_base
    plan.scratch_numel = scratch
    plan.lr_tables = (None, None)
    plan.seg_host = seg_first + seg_count
    plan.seg = None  # uploaded on the first call with an aggregate
    return plan


def _lr_tables(plan: _Plan, lrs, device) -> list[Tensor]:
    if any(isinstance(lr, Tensor) for lr in lrs):
        # device tensors: gathered on the device every call (capturable, no host sync)
        out = []
        for grp in plan.groups:
            out.append(torch.stack([
                torch.as_tensor(lrs[i], dtype=torch.float64).to(device).reshape(())
                for i in grp.idx
            ]))
        return out
    key = tuple(float(lr) for lr in lrs)
    cached_key, tabs = plan.lr_tables
    if cached_key != key:
        tabs = [_upload([key[i] for i in grp.idx], torch.float64, device) for grp in plan.groups]
        plan.lr_tables = (key, tabs)
    return tabs



# float dtype -> (the unsigned integer type of its width, the mask of its exponent bits)
_EXPONENT_BITS = {}
if triton is not None:
    _EXPONENT_BITS = {
        torch.float64: (tl.uint64, 0x7FF0000000000000),
        torch.float32: (tl.uint32, 0x7F800000),
        torch.bfloat16: (tl.uint16, 0x7F80),
        torch.float16: (tl.uint16, 0x7C00),
    }


class _FinitePlan:
    __slots__ = ("groups", "n_blocks", "owner")


def _finite_plan(grads, device, block) -> _FinitePlan:
    key = ("triton-finite", device, block) + tuple((g.data_ptr(), g.numel(), g.dtype) for g in grads)
    return CACHE.get(key, lambda: _make_finite_plan(grads, device, block))


def _make_finite_plan(grads, device, block) -> _FinitePlan:
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, g in enumerate(grads):
        if g.numel():
            by_dtype.setdefault(g.dtype, []).append(i)
    plan = _FinitePlan()
    plan.groups, owner, base = [], [], 0
    for dt, idx in by_dtype.items():
        blk_t, blk_s = [], []
        for k, i in enumerate(idx):
            for s in range(0, grads[i].numel(), block):
                blk_t.append(k)
                blk_s.append(s)
                owner.append(i)
        T, B = len(idx), len(blk_t)
        tab = _upload([grads[i].data_ptr() for i in idx] + [grads[i].numel() for i in idx] + blk_t + blk_s,
                      torch.int64, device)
        plan.groups.append((dt, base, B, tab[:T], tab[T : 2 * T], tab[2 * T : 2 * T + B], tab[2 * T + B :]))
        base += B
    plan.n_blocks = base
    plan.owner = _upload(owner or [0], torch.int64, device)
    return plan


def finite_flags_triton(grads: list[Tensor]) -> Tensor:
    """Per gradient, whether it holds no NaN or Inf, from one read of every gradient.

    One launch per gradient dtype over the same kind of block table as the update (cached on
    the tensors' addresses), then one per-tensor reduction on the device: no host
    synchronisation, so the non-finite policy's flag stays on the GPU. Empty tensors are finite.

    Args:
        grads: tensors on one CUDA device (CPU tensors in interpret mode), any float dtype.

    Returns:
        A bool tensor with one entry per gradient, on their device.

    Raises:
        RuntimeError: Triton is unavailable, or the tensors are not on one CUDA device.
    """
    if triton is None:
        raise RuntimeError(f"impl='triton' needs Triton, which cannot be imported: {_IMPORT_ERROR}")
    if not grads:
        return torch.ones(0, dtype=torch.bool)
    device = grads[0].device
    if device.type != "cuda" and not (interpret_mode() and device.type == "cpu"):
        raise RuntimeError(f"finite_flags_triton runs on CUDA tensors (got {device})")
    if any(g.device != device for g in grads):
        raise RuntimeError("finite_flags_triton needs all tensors on one device")
    gs = [g if g.is_contiguous() else g.contiguous() for g in grads]
    block = BLOCK_INTERPRET if interpret_mode() else BLOCK_GPU
    plan = _finite_plan(gs, device, block)
    bad = torch.zeros(len(gs), dtype=torch.int32, device=device)
    if plan.n_blocks:
        per_block = torch.empty(plan.n_blocks, dtype=torch.int32, device=device)
        warps = {} if interpret_mode() else {"num_warps": NUM_WARPS}
        for dt, base, nb, g_tab, n_tab, bt, bs in plan.groups:
            u_dt, exp = _EXPONENT_BITS[dt]
            _nonfinite_kernel[(nb,)](g_tab, n_tab, bt, bs, per_block[base:], BLOCK=block,
                                     U_DT=u_dt, EXP=exp, **warps)
        bad.scatter_reduce_(0, plan.owner, per_block, "amax")
    return bad == 0


def simple_update_triton(
    params: list[Tensor],
    grads: list[Tensor],
    hiddens: list[Tensor],
    lrs: list[float | Tensor],
    weights: SimpleWeights,
    skip: Tensor | bool | None = None,
    aggregate: Aggregate | None = None,
    rms: RunningRms | None = None,
) -> None:
    """The fused Triton update; same contract as :func:`~.reference.simple_update_reference`.

    With ``rms`` the input norm runs inside pass 1 (its running means are read and written
    in the same program as the gradient).

    Raises:
        RuntimeError: Triton is unavailable, or the tensors are not on one CUDA device (CPU
            tensors are accepted in interpret mode, ``TRITON_INTERPRET=1``).
        ValueError: as the reference.
        TypeError: as the reference (a tensor subclass such as DTensor).
    """
    if triton is None:
        raise RuntimeError(f"impl='triton' needs Triton, which cannot be imported: {_IMPORT_ERROR}")
    device = params[0].device if params else None
    interp = interpret_mode()
    if device is not None and device.type != "cuda" and not (interp and device.type == "cpu"):
        raise RuntimeError(
            f"impl='triton' runs on CUDA tensors (got {device}); on CPU use impl='cpu' or "
            "'reference' (or set TRITON_INTERPRET=1 to run the kernels in Triton's interpreter)"
        )
    H = weights.w_ih.numel()
    rule = "needs all tensors on one device (impl='reference' takes several)"
    check_inputs("triton", params, grads, hiddens, lrs, H, device=device, device_rule=rule)
    if rms is not None:
        check_rms("triton", rms, params, device=device, device_rule=rule)
    done, skip = split_skip(skip)
    if done or not params:
        return
    squares, ones = rms if rms is not None else ([], [])
    with torch.no_grad(), contiguous_inplace(params, grads, hiddens, list(squares),
                                             list(ones)) as (ps, gs, hs, vs, cs):
        block = BLOCK_INTERPRET if interp else BLOCK_GPU
        plan = _plan(ps, gs, hs, vs, cs, device, block)
        # the rms input norm's constants, read by pass 1 in the compute dtype
        norm = CACHE.get(("triton-rms-norm", device),
                         lambda: _upload(list(RMS_CONSTANTS), torch.float64, device))
        if plan.n_total == 0:
            if aggregate is not None:  # a collective that every process must enter
                call_aggregate(aggregate, torch.zeros(len(ps), dtype=torch.float64, device=device))
            return
        lr_tabs = _lr_tables(plan, lrs, device)
        partials = torch.empty(plan.n_blocks, dtype=torch.float64, device=device)
        shared = torch.empty(1, dtype=torch.float64, device=device)
        scratch = torch.empty(max(plan.scratch_numel, 1), dtype=torch.float32, device=device)
        has_skip = skip is not None
        skip_t = skip.reshape(()).to(device=device, dtype=torch.bool) if has_skip else shared
        HP = triton.next_power_of_2(H)
        warps = {} if interp else {"num_warps": NUM_WARPS}

        for grp, lr_tab in zip(plan.groups, lr_tabs):
            w = packed_weights(weights, device, grp.cdt, flat=True)
            tb = grp.tab
            _pass1_kernel[(grp.n_blocks,)](
                tb["p"], tb["g"], tb["h"], tb["v"], tb["c"], tb["n"], tb["sc"], lr_tab, tb["bt"],
                tb["bs"], w, norm, partials[grp.part_base :], scratch, skip_t,
                H=H, HP=HP, BLOCK=block,
                P_DT=_TL_DTYPES[grp.pdt], G_DT=_TL_DTYPES[grp.gdt], H_DT=_TL_DTYPES[grp.hdt],
                C_DT=_TL_DTYPES[grp.cdt], INPLACE=grp.inplace, HAS_SKIP=has_skip,
                RMS=rms is not None, **warps,
            )
        if aggregate is None:
            _reduce_kernel[(1,)](partials, plan.n_blocks, shared, plan.n_total,
                                 R=REDUCE_BLOCK, **warps)
        else:
            if plan.seg is None:
                plan.seg = _upload(plan.seg_host, torch.int64, device)
            sums = torch.empty(len(ps), dtype=torch.float64, device=device)
            _segment_kernel[(len(ps),)](partials, plan.seg, sums, len(ps), R=REDUCE_BLOCK,
                                        **warps)
            shared = call_aggregate(aggregate, sums).reshape(1)
        for grp, lr_tab in zip(plan.groups, lr_tabs):
            tb = grp.tab
            _pass2_kernel[(grp.n_blocks,)](
                tb["p"], tb["n"], tb["sc"], lr_tab, tb["bt"], tb["bs"], shared, scratch, skip_t,
                BLOCK=block, P_DT=_TL_DTYPES[grp.pdt], C_DT=_TL_DTYPES[grp.cdt],
                INPLACE=grp.inplace, HAS_SKIP=has_skip, **warps,
            )
