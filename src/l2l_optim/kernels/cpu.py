"""The fused SimpleOptimizer update on CPU: a C++/OpenMP shared library called through ctypes.

The library (``simple_cpu.cpp``, ``simple_cpu_isa.h``, ``simple_cpu_simd.h``) is plain C++ with
a C ABI: it takes data pointers, dtype codes, sizes, learning rates and the packed fp64 weights,
and links against nothing from torch, so one build serves every torch version. It is compiled at
install time (``hatch_build.py``, for wheels and for ``pip install -e .``) into this directory
as ``libl2l_simple_cpu.so.1``, without ``-march``: it holds an AVX-512, an AVX2 + FMA and a
baseline copy of its loops and picks the best one the CPU runs when it loads
(:func:`kernel_info` says which; ``L2L_OPTIM_CPU_ISA=avx2`` or ``baseline`` forces a lower one).

Where no library was installed (a checkout on ``PYTHONPATH``) or the installed one was built
from other sources (an editable install whose sources changed since), the first use compiles
one with the system compiler into a per-checkout cache directory, ``$L2L_OPTIM_KERNEL_CACHE``
(default ``~/.cache/l2l_optim/kernels``): the developer path, described in
:mod:`._cpu_library`. Installed packages do not compile.

``impl="auto"`` uses this kernel on CPU when the library loads and falls back to the
reference update with a one-line warning when it does not; ``impl="cpu"`` raises the reason
instead. ``L2L_OPTIM_NO_CPU_KERNEL=1`` disables the kernel (as if it did not load).

The ops are registered with :func:`torch.library.custom_op` as ``torch.ops.l2l_optim_cpu.*``
(``simple_update``, and ``simple_update_pass1`` / ``simple_update_pass2`` for a mean over
more coordinates than one call holds, see :mod:`l2l_optim.distributed`), with fake
implementations, so that a compiled ``opt.step()`` holds the update as one opaque op. The ops
take the learning rates as one float64 tensor, an input of the graph rather than constants
it is specialised on, so that a new rate (a schedule's next step) compiles nothing. Eager
calls go to the same code without the dispatcher. Every tensor is checked in Python before a
pointer reaches C: plain, dense, contiguous CPU tensors only.

What the kernel does and why it is deterministic is described at the top of ``simple_cpu.cpp``:
one pass computes ``h'``, writes it, applies ``lr * (w_a . h' + b_out)`` and stores per-block
partial sums of ``w_b . h'``; the partials are reduced in a fixed order and a second, cheap
pass adds ``lr * w_b . mean(h')``. With the rms input norm (``rms=``) the first pass also
reads and writes the running means and feeds the RNN the normalised gradient, block by block.
Results are bitwise independent of the thread count (the kernel uses
``torch.get_num_threads()`` threads).

Supported: parameters in float32 / float64 / bfloat16 / float16 (any shape, 0-dim included;
non-contiguous ones are copied to contiguous and back), gradients of any of these dtypes,
hidden state in float32 / bfloat16 / float64, or 8-bit codes with their block scales
(:mod:`l2l_optim.state`'s codec, run inside pass 1 a block at a time), one learning rate per
tensor, the ``skip`` flag.
Compute precision is that of the reference: float64 for float64 parameters, float32 otherwise.

The same library checks gradients for NaN/Inf at memory speed (:func:`first_nonfinite`),
which SimpleOptimizer uses on this path instead of a norm per tensor.
"""

from __future__ import annotations

import ctypes
from typing import Optional

import torch
from torch import Tensor

from ..rule import SimpleWeights, averaged_step, averaging_coefficients
from . import _cpu_library
from ._common import (
    HIDDEN_DTYPES,
    Aggregate,
    RunningRms,
    bump_versions,
    call_aggregate,
    check_inputs,
    check_rms,
    check_rounding,
    contiguous_inplace,
    packed_weights,
    split_skip,
)
from ._cpu_calls import (
    CPU,
    DTYPE_CODES,
    address,
    all_plain_contiguous_cpu,
    c_array,
    check_rc,
    ERRORS,
    VOID_P,
    pass1_call,
    pass2_call,
    plain_plan,
    pointer,
)
from ._cpu_library import (  # re-exported: this module is the CPU path's interface
    CACHE_ENV,
    DISABLE_ENV,
    ISA_ENV,
    build_advice,
    build_error,
    is_available,
    kernel_info,
    load_library,
    select_isa,
)

__all__ = [
    "simple_update_cpu",
    "first_nonfinite",
    "kernel_tanh",
    "kernel_info",
    "select_isa",
    "is_available",
    "build_error",
    "build_advice",
    "load_library",
    "DISABLE_ENV",
    "ISA_ENV",
    "CACHE_ENV",
]

def _lr_list(lrs: Tensor, n: int) -> list[float]:
    """The ops' learning rates (a float64 CPU vector, one per tensor) as the C call takes them."""
    if type(lrs) not in (Tensor, torch.nn.Parameter) or lrs.shape != (n,) or not lrs.is_cpu:
        raise RuntimeError(f"l2l_optim cpu kernel: lrs must be a CPU vector of {n} learning "
                           f"rates, one per tensor")
    return lrs.tolist()


def _lr_tensor(lrs: list) -> Tensor:
    """The learning rates as one float64 CPU vector, for the ops inside a compiled graph.

    A list of floats among an op's arguments is a constant of the graph, guarded by value, so
    every new value (every step of an lr schedule) would compile the step again; a tensor is
    an input of the graph. A tensor lr is read where it is. A float lr enters as a factor of
    a tensor product (exact: a product with one), which the compiler turns into an input of
    the graph; ``torch.tensor(lr)`` would specialise the graph on its value instead.
    """
    one = torch.ones((), dtype=torch.float64)
    return torch.stack([lr.detach().reshape(()).to(device=CPU, dtype=torch.float64)
                        if isinstance(lr, Tensor) else one * lr for lr in lrs])


def _key_list(rounding: Tensor | None, n: int) -> list[int] | None:
    """An op's rounding keys (an int64 CPU vector) as the library takes them."""
    if rounding is None:
        return None
    if rounding.shape != (n,) or rounding.dtype != torch.int64 or not rounding.is_cpu:
        raise RuntimeError(f"l2l_optim cpu kernel: rounding must be a CPU int64 vector of {n} "
                           f"keys, got {rounding.dtype} of shape {tuple(rounding.shape)}")
    return [k & 0xFFFFFFFF for k in rounding.tolist()]


def _scale_list(scales: list[Tensor]) -> list[Tensor] | None:
    """An op's 8-bit scales (an empty list for none; an empty tensor for a state that is not
    8-bit) as pass1_call takes them."""
    return list(scales) if scales else None


def _scale_args(hiddens: list[Tensor], scales) -> list[Tensor]:
    """The 8-bit scales as an op takes them: an empty list when no hidden state is 8-bit, else
    one tensor per hidden state (an empty one for the others)."""
    if scales is None or not any(h.dtype == torch.int8 for h in hiddens):
        return []
    return [torch.empty(0) if s is None else s for s in scales]


# The registered ops take the learning rates as a tensor (see _lr_tensor); squares, ones: the
# rms input norm's running means, or empty lists for none (an op's arguments cannot be None
# lists); scales: the 8-bit hidden states' scales (see _scale_args); rounding: the stochastic
# rounding keys as an int64 vector, or None.
def _simple_update(params: list[Tensor], grads: list[Tensor], hiddens: list[Tensor],
                   lrs: Tensor, weights: Tensor, skip: Optional[Tensor],
                   squares: list[Tensor], ones: list[Tensor], scales: list[Tensor],
                   rounding: Optional[Tensor] = None) -> None:
    pass1_call(params, grads, hiddens, _lr_list(lrs, len(params)), weights, skip, False, squares,
           ones, _key_list(rounding, len(params)), scales=_scale_list(scales))


def _simple_update_pass1(params: list[Tensor], grads: list[Tensor], hiddens: list[Tensor],
                         lrs: Tensor, weights: Tensor, skip: Optional[Tensor],
                         squares: list[Tensor], ones: list[Tensor], scales: list[Tensor],
                         rounding: Optional[Tensor] = None) -> tuple[Tensor, list[Tensor]]:
    sums, scratch = pass1_call(params, grads, hiddens, _lr_list(lrs, len(params)), weights, skip,
                           True, squares, ones, _key_list(rounding, len(params)),
                           scales=_scale_list(scales))
    # an empty buffer for the parameters that need none (an op returns tensors, not None)
    return sums, [torch.empty(0) if s is None else s for s in scratch]


def _simple_update_pass2(params: list[Tensor], scratch: list[Tensor], lrs: Tensor,
                         weights: Tensor, shared: Tensor, skip: Optional[Tensor]) -> None:
    pass2_call(params, scratch, _lr_list(lrs, len(params)), weights, shared, skip)


def _register_ops() -> None:
    """``torch.ops.l2l_optim_cpu.*``, with the shape-only versions torch.compile traces.

    The updates mutate their inputs in place (``mutates_args`` says which) and return nothing
    (pass 1: fresh tensors), so a compiled ``opt.step()`` holds the call as one opaque op
    instead of breaking the graph around it. CPU kernels only: a sparse, nested or other
    backend's tensor gets torch's "could not run" error before anything runs.
    """
    lib = "l2l_optim_cpu"
    update = torch.library.custom_op(f"{lib}::simple_update", _simple_update,
                                     mutates_args=("params", "hiddens", "squares", "ones",
                                                   "scales"),
                                     device_types="cpu")
    pass1 = torch.library.custom_op(f"{lib}::simple_update_pass1", _simple_update_pass1,
                                    mutates_args=("params", "hiddens", "squares", "ones",
                                                  "scales"),
                                    device_types="cpu")
    pass2 = torch.library.custom_op(f"{lib}::simple_update_pass2", _simple_update_pass2,
                                    mutates_args=("params",), device_types="cpu")
    update.register_fake(
        lambda params, grads, hiddens, lrs, weights, skip, squares, ones, scales, rounding=None: None)
    pass2.register_fake(lambda params, scratch, lrs, weights, shared, skip: None)

    @pass1.register_fake
    def _(params, grads, hiddens, lrs, weights, skip, squares, ones, scales, rounding=None):
        sums = weights.new_empty((len(params),), dtype=torch.float64)
        low = (torch.bfloat16, torch.float16)
        return sums, [weights.new_empty((p.numel() if p.dtype in low else 0,), dtype=torch.float32)
                      for p in params]


if not hasattr(torch.ops.l2l_optim_cpu, "simple_update"):  # not after a module reload
    _register_ops()


def _ops():
    """The registered ops, which a compiled graph holds as opaque calls (eager calls go to
    :func:`pass1_call` and :func:`pass2_call` directly: the dispatcher adds nothing there but time)."""
    ops = torch.ops.l2l_optim_cpu
    return ops.simple_update, ops.simple_update_pass1, ops.simple_update_pass2


# ------------------------------------------------------------------------- public entries


def simple_update_cpu(
    params: list[Tensor],
    grads: list[Tensor],
    hiddens: list[Tensor],
    lrs: list[float | Tensor],
    weights: SimpleWeights,
    skip: Tensor | bool | None = None,
    aggregate: Aggregate | None = None,
    rms: RunningRms | None = None,
    rounding: list[int] | Tensor | None = None,
    hidden_scales: list[Tensor | None] | None = None,
    averaged: tuple[list[Tensor], float, float] | None = None,
) -> None:
    """The fused CPU update; same contract as :func:`~.reference.simple_update_reference`.

    With ``rms`` the input norm runs inside pass 1, on each block as it is read. An 8-bit
    hidden state (int8 codes, with its float32 scales in ``hidden_scales`` and its key in
    ``rounding``) is decoded, stepped and encoded inside pass 1 too, a block at a time
    (:mod:`l2l_optim.state`'s codec, bit for bit). With ``averaged`` (``(ys, c, b)``, see
    :func:`~l2l_optim.functional.simple_update`) the parameters ``ys`` of Schedule-Free
    averaging move in the same passes as their base sequences, which ``params`` then are
    (eager calls on plain contiguous float32 / float64 tensors; otherwise the averaging runs
    as torch ops around the kernel, :func:`~l2l_optim.rule.averaged_step`).

    Without ``aggregate`` one call runs both passes; with it, pass 1 and pass 2 are two calls
    and ``aggregate`` turns pass 1's per-tensor sums into the shared scalar in between.

    Raises:
        RuntimeError: the library is unavailable, or a tensor is not on the CPU.
        ValueError: as the reference.
        TypeError: as the reference (a tensor subclass such as DTensor).
    """
    load_library()
    plan = None
    lists = (list, tuple)
    if (not torch.compiler.is_compiling()
            and all(isinstance(x, lists) for x in (params, grads, hiddens, lrs))
            and (rms is None or (isinstance(rms, RunningRms) and isinstance(rms.squares, lists)
                                 and isinstance(rms.ones, lists)))):
        # the common case in one pass: tensors the library takes as they are
        sq, on = rms if rms is not None else ((), ())
        plan = plain_plan(params, grads, hiddens, lrs, sq, on, weights.w_ih.numel(), hidden_scales)
    if plan is None:
        check_inputs("cpu", params, grads, hiddens, lrs, weights.w_ih.numel(), device=CPU,
                     device_rule="runs on CPU tensors only",
                     hidden_dtypes=(*HIDDEN_DTYPES, torch.int8) if hidden_scales else HIDDEN_DTYPES)
        if rms is not None:
            check_rms("cpu", rms, params, device=CPU, device_rule="runs on CPU tensors only",
                      bf16_squares=True)
    rounding = check_rounding("cpu", rounding, len(params), device=CPU)
    done, skip = split_skip(skip)
    if skip is not None and skip.device.type != "cpu":
        raise RuntimeError("impl='cpu': the skip flag must be a CPU tensor")
    if done or not params:
        return
    # the kernel reads every weight in fp64 and rounds to the compute dtype itself
    packed = packed_weights(weights, CPU, torch.float64, flat=True)
    squares, ones = rms if rms is not None else ([], [])

    def eager(ps, gs, hs, vs, cs, plan=None):
        # every tensor was checked above (or planned), so pass 1 reads the pointers unchecked
        lr_list = [float(lr) for lr in lrs]
        keys = _key_list(rounding, len(ps)) if isinstance(rounding, Tensor) else rounding
        sums, scratch = pass1_call(ps, gs, hs, lr_list, packed, skip, aggregate is not None, vs, cs,
                               keys, checked=True, plan=plan, scales=hidden_scales,
                               averaged=averaged)
        if aggregate is not None:
            pass2_call(ps, scratch, lr_list, packed, call_aggregate(aggregate, sums), skip,
                       averaged)

    if averaged is not None:
        ys, c, b = averaged
        coeffs = _averaging_coefficients(params, ys, c, b) if plan is not None else None
        if coeffs is None:  # not fusable here: the one definition, around this kernel
            averaged_step(list(ys), params, c, b, lambda: simple_update_cpu(
                params, grads, hiddens, lrs, weights, skip, aggregate, rms, rounding,
                hidden_scales))
            return
        averaged = (ys, coeffs)
    if plan is not None:
        eager(params, grads, hiddens, squares, ones, plan)
        # the kernel's writes bypass autograd, as in contiguous_inplace
        bump_versions(params, hiddens, list(squares), list(ones),
                      list(averaged[0]) if averaged is not None else [])
        return
    with torch.no_grad(), contiguous_inplace(params, grads, hiddens, list(squares),
                                             list(ones)) as (ps, gs, hs, vs, cs):
        if not torch.compiler.is_compiling():
            eager(ps, gs, hs, vs, cs)
            return
        update, pass1, pass2 = _ops()
        lr_t = _lr_tensor(lrs)
        keys = rounding if rounding is None or isinstance(rounding, Tensor) else torch.tensor(
            rounding, dtype=torch.int64)
        scales = _scale_args(hs, hidden_scales)
        if aggregate is None:
            update(ps, gs, hs, lr_t, packed, skip, vs, cs, scales, keys)
            return
        sums, scratch = pass1(ps, gs, hs, lr_t, packed, skip, vs, cs, scales, keys)
        shared = call_aggregate(aggregate, sums)
        pass2(ps, scratch, lr_t, packed, shared, skip)


def _averaging_coefficients(zs, ys, c: float, b: float) -> list[tuple[float, float]] | None:
    """Per tensor ``(c, k)`` of ``y' = y + c (z - y) + k (z' - z)``
    (:func:`~l2l_optim.rule.averaging_coefficients`), when the kernel can move every ``y`` in
    its passes (plain contiguous CPU tensors of their base sequence's dtype and size, float32
    or float64), else None."""
    if len(ys) != len(zs) or not all_plain_contiguous_cpu(list(ys)):
        return None
    if not all([y.dtype == z.dtype and y.dtype in (torch.float32, torch.float64)
                and y.numel() == z.numel() for y, z in zip(ys, zs)]):
        return None
    return [averaging_coefficients(c, b)] * len(zs)


def first_nonfinite(tensors: list[Tensor]) -> int | None:
    """The index of the first tensor holding a NaN or an infinity, -1 when all are finite, or
    None when the library cannot scan them (not loaded, or a tensor that is not a plain CPU
    tensor of a floating dtype it reads): the caller then checks them another way.

    One vectorised pass over every element on ``torch.get_num_threads()`` threads.
    """
    lib = _cpu_library._lib
    if lib is None:
        return None
    copies = []
    # the common case a list at a time (it runs for every gradient of every step): what
    # address takes, for every tensor
    ptrs = numels = None
    if (all_plain_contiguous_cpu(tensors)
            and not any([torch._is_functional_tensor(t) for t in tensors])
            and None not in (codes := [DTYPE_CODES.get(t.dtype) for t in tensors])):
        ptrs, numels = [t.data_ptr() for t in tensors], [t.numel() for t in tensors]
        if not all([ptr or not k for ptr, k in zip(ptrs, numels)]):
            ptrs = None
    if ptrs is None:
        ptrs, codes, numels = [], [], []
        for t in tensors:
            found = address(t, DTYPE_CODES)
            if found is None and type(t) is Tensor and t.layout == torch.strided and not t.is_contiguous():
                copies.append(t.contiguous())  # a non-contiguous gradient: scan a copy
                found = address(copies[-1], DTYPE_CODES)
            if found is None:
                return None
            ptrs.append(found[0] or None), codes.append(found[1]), numels.append(t.numel())
    bad = lib.l2l_first_nonfinite(len(tensors), c_array(VOID_P, ptrs), c_array(ctypes.c_int32, codes),
                                  c_array(ctypes.c_int64, numels), torch.get_num_threads())
    if bad < -1:
        raise RuntimeError(f"l2l_optim cpu kernel: {ERRORS.get(bad + 1, f'error {bad}')}")
    return int(bad)


def kernel_tanh(x: Tensor) -> Tensor:
    """The kernel's tanh applied to a float32 or float64 CPU tensor (for accuracy tests): the
    tanh of the selected instruction set's loop for the default hidden size, bit for bit."""
    lib = load_library()
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        raise RuntimeError("float32 / float64 CPU tensors only")
    xc = x.contiguous()
    out = torch.empty_like(xc)
    ptr, code = pointer(xc, "x", 0, DTYPE_CODES)
    check_rc(lib.l2l_tanh(code, ptr, out.data_ptr(), xc.numel(), torch.get_num_threads()))
    return out
