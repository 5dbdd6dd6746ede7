"""The fused SimpleOptimizer update on CUDA, in Triton. ``impl="auto"`` picks it for CUDA tensors.

(The update's kernels, the non-finite scan that guards it, the ops torch.compile traces around
them and the host side that launches both share the dtype maps, the block decoding and the
interpreter switch, so they stay in one module; the tables they read and the handle that owns
them are in ``_triton_tables.py``.)

Structure (the same two passes as the CPU kernel, see ``simple_cpu.cpp``). Tensors are grouped
by (param dtype, grad dtype, hidden dtype, rms layout, alignment); one launch covers a group,
each program one block of ``BLOCK`` coordinates of one tensor (the block and tensor tables of
``_triton_tables`` say which):

1. **pass 1**: each program reads g, the ``H`` rows of its block's hidden state (coordinate
   last, so every row is one coalesced read) and, with the rms input norm, the running means;
   computes ``h' = tanh(w_ih x + w_hh h + b_h)`` and writes the block's sum of ``w_b . h'`` to
   a partials buffer. fp32/fp64 parameters also write ``h'`` (and the running means) and
   apply ``theta += lr (w_a . h' + b_out)`` here. bf16/fp16 parameters write nothing else in
   pass 1: their ``theta`` must be rounded once, from ``theta + lr (u + shared)``, so pass 2
   recomputes their ``h'`` from the same inputs instead of keeping ``u`` in a full-size fp32
   buffer between the passes (no scratch memory; the recomputation reads the inputs again).
2. **reduce**: one program sums the partials in a fixed order (fp64) and writes
   ``shared = S / N`` to a one-element device buffer. No atomics, no host synchronisation.
3. **pass 2**: fp32/fp64 parameters ``theta += lr * shared``; bf16/fp16 parameters the whole
   step with ``theta = round(theta + lr (u + shared))``.

With an ``aggregate`` callback (sharded parameters, see ``l2l_optim.distributed``) step 2 is
replaced: one program per tensor sums that tensor's partials in a fixed order, and the callback
turns the per-tensor sums into ``shared`` (an all-reduce, on the device) before pass 2.

A step reads no value back to the host and is CUDA-graph capturable once warmed up: the tables
are built and uploaded on the first call for a set of tensors and kept by a
:class:`~._triton_tables.TritonTables` handle that lives as long as the optimizer's state
(see there). Learning rates given as Python floats are a small table too; pass 0-dim device
tensors as ``lrs`` to change them inside a captured graph.

**torch.compile.** The update and the scan are ``torch.library.custom_op``\\ s
(``torch.ops.l2l_optim_triton.*``, with fake implementations and declared mutations), so a
compiled ``opt.step()`` holds them as opaque ops; the tables are built eagerly inside them.
Eager calls go to the same implementations without the dispatcher.

**Precision.** fp64 parameters compute in fp64, all others in fp32. The fp32 ``tanh``
(:func:`_tanh`) is division-free: an odd polynomial for ``|x| < 0.55`` and
``1 + e Q(e)`` with ``e = exp(-2|x|)`` and ``Q`` a degree-6 polynomial above, within 2.5e-7 of
``torch.tanh`` everywhere (``tests/test_triton_cuda.py``). It uses ``exp2`` only, which
Triton's interpreter has too (no ``libdevice``), so the tests on CPU (``TRITON_INTERPRET=1``)
run the code the GPU runs. The rms input norm's ``g / (sqrt(v) / sqrt(c) + eps)`` is
division-free in fp32 too (hardware reciprocal square roots, each refined by a Newton step:
within an ulp or two of torch's correctly rounded operations, whose slow paths would cost more
instructions than a hidden unit's recurrence); fp64 keeps IEEE division and square root.
bf16 stores use the GPU's conversion instruction (round to nearest even); the interpreter,
whose conversion truncates, rounds with bit operations instead.

**Memory access.** When every tensor of a group starts on a 16-byte boundary and has a
multiple of 8 elements (``ALIGNED``, decided on the host), the kernels tell Triton so and every
load and store is 128 bits wide; other groups take element-wise accesses.

Determinism: the block partition, the in-block reduction tree and the reduction of partials
are fixed, so results are bitwise reproducible run to run on the same GPU and ``BLOCK``.

Limits: all tensors on one device (the reference handles a multi-device call); non-contiguous
parameters are copied to contiguous and back (a copy per step, and a tensor table per new
address of the copy).
"""

from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch
from torch import Tensor

from ..rule import SimpleWeights
from ._common import (
    RMS_CONSTANTS,
    Aggregate,
    RunningRms,
    call_aggregate,
    check_inputs,
    check_rms,
    check_rounding,
    compute_dtype,
    contiguous_inplace,
    packed_weights,
    split_skip,
)
from ._triton_tables import (
    TritonTables,
    build_layout,
    build_tensor_tables,
    tables_for,
    upload,
)

__all__ = [
    "simple_update_triton",
    "finite_flags_triton",
    "kernel_tanh_triton",
    "TritonTables",
    "is_available",
    "import_error",
    "interpret_mode",
]

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


# Triton picks the interpreter when it decorates the kernels, i.e. at this import: one answer
# for the process, and a constant that torch.compile can read
_INTERPRET = interpret_mode()

# coordinates per program of the update's passes: 4 per thread of NUM_WARPS warps, so that
# an fp32 access is 128 bits wide; 8 per thread where a parameter, gradient or hidden state
# is 16-bit, for the same reason (at about twice the registers, and no spill)
BLOCK_GPU = 512
BLOCK_GPU_16BIT = 1024
BLOCK_INTERPRET = 4096  # the interpreter runs programs one by one: fewer, larger blocks
SCAN_BLOCK_GPU = 4096  # the non-finite scan's: 32 values per thread
REDUCE_BLOCK = 1024
NUM_WARPS = 4

# the rms input norm's per-tensor layout of c (running mean of ones): none, one value per
# coordinate, one value per tensor
_NO_RMS, _C_PER_COORDINATE, _C_PER_TENSOR = 0, 1, 2


if triton is not None:
    from ._triton_device import (  # noqa: F401 - launched here, compiled by benchmarks/triton_sm90.py
        _tanh,
        _rms_input32,
        _to_bf16,
        _store,
        _locate,
        _base,
        _w_hh_times_h,
        _step_kernel,
        _shift_kernel,
        _ones_kernel,
        _reduce_kernel,
        _segment_kernel,
        _nonfinite_kernel,
        _tanh_kernel,
    )

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

# float dtype -> (the unsigned integer type of its width, the mask of its exponent bits)
_EXPONENT_BITS = {}
if triton is not None:
    _EXPONENT_BITS = {
        torch.float64: (tl.uint64, 0x7FF0000000000000),
        torch.float32: (tl.uint32, 0x7F800000),
        torch.bfloat16: (tl.uint16, 0x7F80),
        torch.float16: (tl.uint16, 0x7C00),
    }

_LOW_PRECISION = (torch.bfloat16, torch.float16)
# beta, 1 - beta, eps, then the largest finite fp32 and fp64 (where v saturates)
_NORM = (*RMS_CONSTANTS, torch.finfo(torch.float32).max, torch.finfo(torch.float64).max)


def _aligned(tensors, n: int) -> bool:
    """Whether 128-bit accesses fit: every address 16-byte aligned and ``n % 8 == 0`` (then
    every block, and every row of a hidden state, starts on a 16-byte boundary too)."""
    return n % 8 == 0 and all(x.data_ptr() % 16 == 0 for x in tensors)


def _launch_context(device: torch.device):
    """Launches go to the tensors' device (and its current stream), whatever the current one."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


class _Step:
    """What one call launches with: its layout, tensor and lr tables, and the flags."""

    __slots__ = ("layout", "tabs", "lrs", "norm", "weights", "H", "skip", "keys")


def _prepare(ps, gs, hs, vs, cs, lrs, weights, skip, tables, rounding=None) -> _Step:
    """The tables of one call, from its handle (built on first use). ``lrs``: Python floats
    (a cached table) or a float64 vector on the device, one per tensor. ``rounding``: None,
    or the stochastic rounding keys as ints (uploaded) or an int64 vector on the device."""
    device = ps[0].device
    keys, numels, rows = [], [], []
    for i, (p, g, h) in enumerate(zip(ps, gs, hs)):
        n = p.numel()
        layout_c = _NO_RMS if not vs else (_C_PER_COORDINATE if cs[i].numel() == n else _C_PER_TENSOR)
        state = [] if not vs else ([vs[i], cs[i]] if layout_c == _C_PER_COORDINATE else [vs[i]])
        keys.append((p.dtype, g.dtype, h.dtype, layout_c, _aligned([p, g, h, *state], n)))
        numels.append(n)
        rows.append([p.data_ptr(), g.data_ptr(), h.data_ptr(),
                     vs[i].data_ptr() if vs else 0, cs[i].data_ptr() if vs else 0, n, i])
    handle = tables if tables is not None else tables_for(hs[0])
    layout_key = ("triton-layout", device, tuple(keys), tuple(numels))
    step = _Step()
    step.layout = handle.get(layout_key, lambda: build_layout(keys, numels, _block, device),
                             device, "block tables")
    address_key = ("triton-tensors", layout_key, tuple(tuple(r[:5]) for r in rows))
    step.tabs = handle.get(address_key, lambda: build_tensor_tables(step.layout, rows, device),
                           device, "tensor tables")
    if isinstance(lrs, Tensor):
        if lrs.shape != (len(ps),) or lrs.dtype != torch.float64 or lrs.device != device:
            raise RuntimeError(f"l2l_optim triton: lrs must be a float64 vector of {len(ps)} "
                               f"learning rates on {device}")
        step.lrs = lrs
    else:
        step.lrs = handle.get(("triton-lrs", device, tuple(lrs)), lambda: upload(
            torch.tensor(lrs, dtype=torch.float64), device), device, "learning rates")
    step.norm = handle.get(("triton-norm", device), lambda: upload(
        torch.tensor(_NORM, dtype=torch.float64), device), device, "rms constants")
    handle.hold_if_capturing(weights, device)  # a captured graph reads them at this address
    step.weights = weights
    step.H = hs[0].shape[0]
    step.skip = skip
    if rounding is None or isinstance(rounding, Tensor):
        step.keys = rounding
    else:  # a new set of keys every step: uploaded, not cached
        step.keys = torch.tensor(rounding, dtype=torch.int64).to(device, non_blocking=True)
    return step


def _block(key: tuple) -> int:
    """Coordinates per program of the update's group ``key``."""
    if _INTERPRET:
        return BLOCK_INTERPRET
    return BLOCK_GPU_16BIT if any(dt in _LOW_PRECISION for dt in key[:3]) else BLOCK_GPU


def _scan_block(key: tuple) -> int:
    return BLOCK_INTERPRET if _INTERPRET else SCAN_BLOCK_GPU


def _warps() -> dict:
    return {} if _INTERPRET else {"num_warps": NUM_WARPS}


def _pass(step: _Step, mode: str, partials: Tensor | None, shared: Tensor | None) -> None:
    """Pass 1 (``mode="pass1"``) or pass 2 of every group of ``step``."""
    has_skip = step.skip is not None
    skip_t = step.skip.reshape(()) if has_skip else step.norm
    layout = step.layout
    for grp, tab in zip(layout.groups, step.tabs):
        pdt, gdt, hdt, layout_c, aligned = grp.key
        cdt = compute_dtype(pdt)
        low = pdt in _LOW_PRECISION
        if mode == "pass2" and not low:
            _shift_kernel[(grp.n_blocks,)](
                tab, grp.blocks, step.lrs, shared, skip_t, BLOCK=grp.block,
                P_DT=_TL_DTYPES[pdt], C_DT=_TL_DTYPES[cdt], HAS_SKIP=has_skip,
                ALIGNED=aligned, **_warps())
            continue
        kernel_mode = (1 if low else 0) if mode == "pass1" else 2
        stochastic = step.keys is not None and hdt == torch.bfloat16
        _step_kernel[(grp.n_blocks,)](
            tab, grp.blocks, step.lrs, step.weights, step.norm,
            partials[grp.part_base :] if partials is not None else step.norm,
            shared if shared is not None else step.norm, skip_t,
            step.keys if stochastic else step.norm,
            H=step.H, BLOCK=grp.block, P_DT=_TL_DTYPES[pdt], G_DT=_TL_DTYPES[gdt],
            H_DT=_TL_DTYPES[hdt], C_DT=_TL_DTYPES[cdt], MODE=kernel_mode,
            HAS_SKIP=has_skip, C_LAYOUT=layout_c, ALIGNED=aligned,
            NATIVE_BF16=not _INTERPRET, STOCHASTIC=stochastic, **_warps())
    if mode == "pass2":
        for grp, tab in zip(layout.groups, step.tabs):
            if grp.key[3] == _C_PER_TENSOR:
                _ones_kernel[(len(grp.idx),)](tab, step.norm, skip_t,
                                              C_DT=_TL_DTYPES[compute_dtype(grp.key[0])],
                                              HAS_SKIP=has_skip, **_warps())


def _update(params, grads, hiddens, lrs, weights, skip, squares, ones, rounding, mode: str,
            shared: Tensor | None = None, tables: TritonTables | None = None) -> Tensor | None:
    """The update's implementation (eager, or inside the ops): ``mode`` ``"step"`` (both
    passes), ``"pass1"`` (returns the per-tensor sums) or ``"pass2"`` (with ``shared``)."""
    device = params[0].device
    # (the tables are looked up, built and uploaded on the tensors' device and stream too)
    with _launch_context(device):
        step = _prepare(params, grads, hiddens, squares, ones, lrs, weights, skip, tables, rounding)
        layout = step.layout
        if layout.n_total == 0:
            return (torch.zeros(len(params), dtype=torch.float64, device=device)
                    if mode == "pass1" else None)
        if mode == "pass2":
            _pass(step, "pass2", None, shared.reshape(1).to(torch.float64))
            return None
        partials = torch.empty(layout.n_blocks, dtype=torch.float64, device=device)
        _pass(step, "pass1", partials, None)
        if mode == "pass1":
            sums = torch.empty(len(params), dtype=torch.float64, device=device)
            _segment_kernel[(len(params),)](partials, layout.segments, sums, len(params),
                                            R=REDUCE_BLOCK, **_warps())
            return sums
        shared = torch.empty(1, dtype=torch.float64, device=device)
        _reduce_kernel[(1,)](partials, layout.n_blocks, shared, layout.n_total, R=REDUCE_BLOCK,
                             **_warps())
        _pass(step, "pass2", None, shared)
    return None


def _finite_flags(grads: list[Tensor], tables: TritonTables | None = None) -> Tensor:
    """The scan's implementation (eager, or inside its op): 1 per gradient with a NaN/Inf."""
    device = grads[0].device
    keys = [(g.dtype, _aligned([g], g.numel())) for g in grads]
    numels = [g.numel() for g in grads]
    # the handle of the first gradient: static gradients (what a captured graph reads) keep
    # their tables as long as they live; fresh ones each step find them in the shared cache
    handle = tables if tables is not None else tables_for(grads[0])
    layout_key = ("triton-scan-layout", device, tuple(keys), tuple(numels))
    rows = [[0, g.data_ptr(), 0, 0, 0, g.numel(), i] for i, g in enumerate(grads)]
    with _launch_context(device):
        layout = handle.get(layout_key, lambda: build_layout(keys, numels, _scan_block, device),
                            device, "block tables", shared=True)
        tabs = handle.get(("triton-scan-tensors", layout_key, tuple(r[1] for r in rows)),
                          lambda: build_tensor_tables(layout, rows, device), device,
                          "tensor tables", shared=True)
        bad = torch.zeros(len(grads), dtype=torch.int32, device=device)
        for grp, tab in zip(layout.groups, tabs):
            dtype, aligned = grp.key
            u_dt, exp = _EXPONENT_BITS[dtype]
            _nonfinite_kernel[(grp.n_blocks,)](tab, grp.blocks, bad, BLOCK=grp.block, U_DT=u_dt,
                                               EXP=exp, ALIGNED=aligned, **_warps())
    return bad == 0


# ------------------------------------------------------------------ the ops torch.compile sees

# (under the interpreter the kernels run on CPU tensors, so the ops take those too)
_DEVICE_TYPES = ("cuda", "cpu") if _INTERPRET else ("cuda",)
_MUTATED = ("params", "hiddens", "squares", "ones")


# The ops take the learning rates as one float64 vector on the device (_lr_vector): a list of
# floats among an op's arguments would be a constant of the graph, guarded by value, and every
# step of a learning-rate schedule would compile the step again. squares, ones: the rms input
# norm's running means, or empty lists for none (an op's arguments cannot be None lists);
# rounding: the stochastic rounding keys as an int64 vector on the device, or None.
def _op_update(params: list[Tensor], grads: list[Tensor], hiddens: list[Tensor], lrs: Tensor,
               weights: Tensor, skip: Optional[Tensor], squares: list[Tensor],
               ones: list[Tensor], rounding: Optional[Tensor] = None) -> None:
    _update(params, grads, hiddens, lrs, weights, skip, squares, ones, rounding, "step")


def _op_pass1(params: list[Tensor], grads: list[Tensor], hiddens: list[Tensor], lrs: Tensor,
              weights: Tensor, skip: Optional[Tensor], squares: list[Tensor],
              ones: list[Tensor], rounding: Optional[Tensor] = None) -> Tensor:
    return _update(params, grads, hiddens, lrs, weights, skip, squares, ones, rounding, "pass1")


def _op_pass2(params: list[Tensor], grads: list[Tensor], hiddens: list[Tensor], lrs: Tensor,
              weights: Tensor, skip: Optional[Tensor], squares: list[Tensor],
              ones: list[Tensor], shared: Tensor, rounding: Optional[Tensor] = None) -> None:
    _update(params, grads, hiddens, lrs, weights, skip, squares, ones, rounding, "pass2", shared)


def _op_finite_flags(grads: list[Tensor]) -> Tensor:
    return _finite_flags(grads)


def _register_ops() -> None:
    """``torch.ops.l2l_optim_triton.*`` with the shape-only versions torch.compile traces:
    the update (``simple_update``; ``simple_update_pass1`` / ``_pass2`` around an aggregate)
    mutates its inputs in place and returns nothing (pass 1: the per-tensor sums), the scan
    returns one flag per gradient."""
    lib = "l2l_optim_triton"
    update = torch.library.custom_op(f"{lib}::simple_update", _op_update, mutates_args=_MUTATED,
                                     device_types=_DEVICE_TYPES)
    pass1 = torch.library.custom_op(f"{lib}::simple_update_pass1", _op_pass1,
                                    mutates_args=_MUTATED, device_types=_DEVICE_TYPES)
    pass2 = torch.library.custom_op(f"{lib}::simple_update_pass2", _op_pass2,
                                    mutates_args=_MUTATED, device_types=_DEVICE_TYPES)
    flags = torch.library.custom_op(f"{lib}::finite_flags", _op_finite_flags, mutates_args=(),
                                    device_types=_DEVICE_TYPES)
    update.register_fake(
        lambda params, grads, hiddens, lrs, weights, skip, squares, ones, rounding=None: None)
    pass1.register_fake(lambda params, grads, hiddens, lrs, weights, skip, squares, ones, rounding=None:
                        weights.new_empty((len(params),), dtype=torch.float64))
    pass2.register_fake(lambda params, grads, hiddens, lrs, weights, skip, squares, ones,
                        shared, rounding=None: None)
    flags.register_fake(lambda grads: grads[0].new_empty((len(grads),), dtype=torch.bool))


if triton is not None and not hasattr(torch.ops.l2l_optim_triton, "simple_update"):
    _register_ops()  # (not again after a module reload)


# ------------------------------------------------------------------------- public entries


def _check_device(device: torch.device | None, what: str) -> None:
    if triton is None:
        raise RuntimeError(f"impl='triton' needs Triton, which cannot be imported: {_IMPORT_ERROR}")
    if device is not None and device.type != "cuda" and not (_INTERPRET and device.type == "cpu"):
        raise RuntimeError(
            f"{what} runs on CUDA tensors (got {device}); on CPU use impl='cpu' or "
            "'reference' (or set TRITON_INTERPRET=1 to run the kernels in Triton's interpreter)"
        )


def _lr_vector(lrs, device: torch.device) -> Tensor:
    """The learning rates as one float64 vector on ``device``, made on the device (no host
    synchronisation). A float enters as a factor of a product with a device tensor (exact: a
    product with one), which torch.compile makes an input of the graph rather than a constant
    it specialises on; a tensor is read where it is."""
    one = torch.ones((), dtype=torch.float64, device=device)
    return torch.stack([lr.detach().reshape(()).to(device=device, dtype=torch.float64)
                        if isinstance(lr, Tensor) else one * lr for lr in lrs])


def simple_update_triton(
    params: list[Tensor],
    grads: list[Tensor],
    hiddens: list[Tensor],
    lrs: list[float | Tensor],
    weights: SimpleWeights,
    skip: Tensor | bool | None = None,
    aggregate: Aggregate | None = None,
    rms: RunningRms | None = None,
    rounding: list[int] | Tensor | None = None,
    *,
    tables: TritonTables | None = None,
) -> None:
    """The fused Triton update; same contract as :func:`~.reference.simple_update_reference`.

    With ``rms`` the input norm runs inside the kernels (the running means are read and
    written in the program that reads the gradient). ``c`` may hold one value per coordinate
    or one per tensor.

    Args:
        tables: the handle that owns the step's device tables (keep one per optimizer for
            CUDA graphs, see :class:`~._triton_tables.TritonTables`); default: the one tied to
            ``hiddens[0]``. Eager calls only: inside a compiled step the op uses the default.

    Raises:
        RuntimeError: Triton is unavailable, the tensors are not on one CUDA device (CPU
            tensors are accepted in interpret mode, ``TRITON_INTERPRET=1``), or a table must
            be built while the stream captures a CUDA graph.
        ValueError: as the reference.
        TypeError: as the reference (a tensor subclass such as DTensor).
    """
    device = params[0].device if params else None
    _check_device(device, "impl='triton'")
    H = weights.w_ih.numel()
    rule = "needs all tensors on one device (impl='reference' takes several)"
    check_inputs("triton", params, grads, hiddens, lrs, H, device=device, device_rule=rule)
    if rms is not None:
        check_rms("triton", rms, params, device=device, device_rule=rule)
    rounding = check_rounding("triton", rounding, len(params), device=device)
    done, skip = split_skip(skip)
    if done or not params:
        return
    if skip is not None:
        skip = skip.to(device=device, dtype=torch.bool)
    squares, ones = rms if rms is not None else ([], [])
    # the fold's dtype: the kernels round each weight to a tensor's compute dtype themselves
    packed = packed_weights(weights, device, weights.w_ih.dtype, flat=True)
    compiling = torch.compiler.is_compiling()
    if compiling or any(isinstance(lr, Tensor) for lr in lrs):
        lrs = _lr_vector(lrs, device)
    else:  # floats: a table uploaded once per set of values
        lrs = [float(lr) for lr in lrs]
    with torch.no_grad(), contiguous_inplace(params, grads, hiddens, list(squares),
                                             list(ones)) as (ps, gs, hs, vs, cs):
        if compiling and rounding is not None and not isinstance(rounding, Tensor):
            rounding = torch.tensor(rounding, dtype=torch.int64, device=device)
        args = (ps, gs, hs, lrs, packed, skip, vs, cs)
        if compiling:
            ops = torch.ops.l2l_optim_triton
            if aggregate is None:
                ops.simple_update(*args, rounding)
            else:
                sums = ops.simple_update_pass1(*args, rounding)
                ops.simple_update_pass2(*args, call_aggregate(aggregate, sums), rounding)
            return
        if aggregate is None:
            _update(*args, rounding, "step", tables=tables)
        else:
            sums = _update(*args, rounding, "pass1", tables=tables)
            _update(*args, rounding, "pass2", call_aggregate(aggregate, sums), tables=tables)


def finite_flags_triton(grads: list[Tensor], *, tables: TritonTables | None = None) -> Tensor:
    """Per gradient, whether it holds no NaN or Inf, from one read of every gradient.

    One launch per (gradient dtype, alignment) over the same kind of block table as the update,
    each block raising its tensor's flag when it holds a bad value: no host synchronisation,
    so the non-finite policy's flag stays on the GPU. Empty tensors are finite.

    Args:
        grads: tensors on one CUDA device (CPU tensors in interpret mode), any float dtype.
        tables: the handle that owns the scan's tables (default: the one tied to
            ``grads[0]``); eager calls only.

    Returns:
        A bool tensor with one entry per gradient, on their device.

    Raises:
        RuntimeError: Triton is unavailable, or the tensors are not on one CUDA device.
    """
    if not grads:
        _check_device(None, "finite_flags_triton")
        return torch.ones(0, dtype=torch.bool)
    device = grads[0].device
    _check_device(device, "finite_flags_triton")
    if any(g.device != device for g in grads):
        raise RuntimeError("finite_flags_triton needs all tensors on one device")
    gs = [g if g.is_contiguous() else g.contiguous() for g in grads]
    if torch.compiler.is_compiling():
        return torch.ops.l2l_optim_triton.finite_flags(gs)
    return _finite_flags(gs, tables)


def kernel_tanh_triton(x: Tensor) -> Tensor:
    """The kernels' tanh applied to a float32 or float64 tensor (for accuracy tests)."""
    _check_device(x.device, "kernel_tanh_triton")
    if x.dtype not in (torch.float32, torch.float64):
        raise RuntimeError("float32 / float64 tensors only")
    xc = x.contiguous()
    out = torch.empty_like(xc)
    if xc.numel():
        block = 1024
        with _launch_context(xc.device):
            _tanh_kernel[(triton.cdiv(xc.numel(), block),)](
                xc, out, xc.numel(), BLOCK=block, F64=x.dtype == torch.float64, **_warps())
    return out
