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
hidden state in float32 / bfloat16 / float64, one learning rate per tensor, the ``skip`` flag.
Compute precision is that of the reference: float64 for float64 parameters, float32 otherwise.

The same library checks gradients for NaN/Inf at memory speed (:func:`first_nonfinite`),
which SimpleOptimizer uses on this path instead of a norm per tensor.
"""

from __future__ import annotations

import array
import ctypes
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ..rule import SimpleWeights, hidden_size_of_packed
from . import _cpu_library
from ._common import (
    Aggregate,
    RMS_CONSTANTS,
    RunningRms,
    bump_versions,
    call_aggregate,
    check_inputs,
    check_rms,
    check_rounding,
    compute_dtype,
    contiguous_inplace,
    packed_weights,
    split_skip,
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

# dtype codes of the C ABI (the enum at the top of simple_cpu.cpp)
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
HIDDEN_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2}
_P = ctypes.c_void_p
_CPU = torch.device("cpu")
_ERRORS = {-1: "a packed weight vector of a bad length", -2: "an unsupported dtype",
           -3: "out of memory", -4: "a null pointer for a non-empty tensor"}


# ------------------------------------------------------------------------- the C calls


def _address(t: Tensor, codes: dict) -> tuple[int, int] | None:
    """``(data pointer, dtype code)`` of a tensor the loops can address, else None.

    Addressable: a plain tensor (not a subclass such as DTensor or FakeTensor, nor a
    functional wrapper), dense, strided, contiguous, on the CPU, of a dtype in ``codes``, with
    storage. Anything else would hand C a null or foreign pointer. One pass of cheap tests,
    since it runs for every tensor of every step.
    """
    code = codes.get(t.dtype) if type(t) is Tensor or type(t) is torch.nn.Parameter else None
    if (code is None or not t.is_cpu or t.layout != torch.strided or t.is_nested
            or not t.is_contiguous() or torch._is_functional_tensor(t)):
        return None
    ptr = t.data_ptr()
    return (ptr, code) if ptr or not t.numel() else None


def _pointer(t: Tensor, what: str, i: int, codes: dict) -> tuple[int, int]:
    """:func:`_address`, or RuntimeError saying why the tensor is refused."""
    found = _address(t, codes)
    if found is not None:
        return found
    prefix = f"l2l_optim cpu kernel: {what} {i}"
    if type(t) is not Tensor and type(t) is not torch.nn.Parameter:
        raise RuntimeError(f"{prefix} is a {type(t).__qualname__}, a tensor subclass or wrapper "
                           "(e.g. DTensor); the kernel takes plain CPU tensors (for a DTensor, "
                           "pass its .to_local())")
    if t.layout != torch.strided or t.is_nested:
        raise RuntimeError(f"{prefix} is not a dense strided tensor (layout {t.layout}"
                           f"{', nested' if t.is_nested else ''})")
    if not t.is_cpu:
        raise RuntimeError(f"l2l_optim cpu kernel: all tensors must be on the CPU ({what} {i} "
                           f"is on {t.device})")
    if not t.is_contiguous():
        raise RuntimeError(f"{prefix}: tensors must be contiguous")
    if t.dtype not in codes:
        raise RuntimeError(f"{prefix} has an unsupported dtype {t.dtype}")
    raise RuntimeError(f"{prefix} has no addressable storage (a functional or storage-less tensor)")


# array.array type codes of the C arrays' element types (same sizes, checked below)
_TYPECODES = {_P: "Q", ctypes.c_int32: "i", ctypes.c_int64: "q", ctypes.c_uint32: "I", ctypes.c_double: "d"}
if any(array.array(code).itemsize != ctypes.sizeof(ctype) for ctype, code in _TYPECODES.items()):
    raise ImportError("l2l_optim cpu kernel: array.array and ctypes disagree on an element size")


def _array(ctype, values):
    """A C array of ``values`` (for pointers, None is null), at least one element long.

    Built through array.array, which packs a list of Python numbers several times faster
    than ctypes' own constructor: a step passes a dozen arrays with one entry per tensor.
    """
    buf = array.array(_TYPECODES[ctype],
                      [0 if v is None else v for v in values] if ctype is _P else values)
    if not buf:
        buf.append(0)
    return (ctype * len(buf)).from_buffer(buf)  # shares buf's memory and keeps it alive


def _skip_pointer(skip: Tensor | None) -> tuple[int | None, Tensor | None]:
    """The address of the skip flag's one byte (and the tensor that owns it), or None."""
    if skip is None:
        return None, None
    if skip.numel() != 1:
        raise RuntimeError("l2l_optim cpu kernel: the skip flag must have one element")
    flag = skip.reshape(()).to(torch.bool)
    ptr, _ = _pointer(flag, "skip flag", 0, {torch.bool: 0})
    return ptr, flag


def _weights_pointer(weights: Tensor) -> tuple[int, int]:
    if weights.dtype != torch.float64 or weights.dim() != 1:
        raise RuntimeError("l2l_optim cpu kernel: weights must be a packed contiguous fp64 vector")
    ptr, _ = _pointer(weights, "weights", 0, {torch.float64: 1})
    return ptr, weights.numel()


def _check(rc: int) -> None:
    if rc != 0:
        raise RuntimeError(f"l2l_optim cpu kernel: {_ERRORS.get(rc, f'error {rc}')}")


_NORM = (ctypes.c_double * 3)(*RMS_CONSTANTS)


def _pointers(tensors) -> list[int | None]:
    """Data pointers for the C arrays (None for an empty tensor's)."""
    return [t.data_ptr() or None for t in tensors]


def _check_tensors(params, grads, hiddens, squares, ones, h_size: int) -> None:
    """RuntimeError unless every tensor is one the library may address, of the right size."""
    for i, (p, g, h) in enumerate(zip(params, grads, hiddens)):
        _pointer(p, "param", i, DTYPE_CODES)
        _pointer(g, "grad", i, DTYPE_CODES)
        _pointer(h, "hidden", i, HIDDEN_CODES)
        k = p.numel()
        if g.numel() != k:
            raise RuntimeError(f"l2l_optim cpu kernel: grad {i} has {g.numel()} elements, "
                               f"param has {k}")
        if h.dim() != 2 or tuple(h.shape) != (h_size, k):
            raise RuntimeError(f"l2l_optim cpu kernel: hidden {i} must have shape ({h_size}, {k}), "
                               f"got {tuple(h.shape)}")
        if squares:
            # in the compute dtype, as the library reads them; c: one per tensor or coordinate
            cd = compute_dtype(p.dtype)
            for x, what, sizes in ((squares[i], "rms squares", (k,)), (ones[i], "rms ones", (1, k))):
                _pointer(x, what, i, {cd: 0})
                if x.numel() not in sizes:
                    raise RuntimeError(f"l2l_optim cpu kernel: {what} {i} has {x.numel()} "
                                       f"elements, param has {k}")


class _Plan(NamedTuple):
    """Pass 1's per-tensor arrays, read from tensors the library takes as they are."""

    p_ptrs: list
    p_codes: list
    g_ptrs: list
    g_codes: list
    h_ptrs: list
    h_codes: list
    v_ptrs: list
    c_ptrs: list
    c_numels: list  # 1 (one bias correction per tensor) or the tensor's numel
    numels: list


def _all_plain_contiguous_cpu(tensors: list) -> bool:
    """Whether every one is a plain tensor or parameter, dense, strided, contiguous and on the
    CPU: what :func:`_address` asks of each, a list at a time (list comprehensions cost less
    per tensor than a loop with its branches, and this runs for every tensor of every step)."""
    plain, strided = (Tensor, torch.nn.Parameter), torch.strided
    return (all([type(x) in plain for x in tensors])
            and all([x.layout == strided and not x.is_nested and x.is_cpu and x.is_contiguous()
                     for x in tensors]))


def _plain_plan(params, grads, hiddens, lrs, squares, ones, h_size: int) -> _Plan | None:
    """The arrays of pass 1 when every tensor is one the library reads and writes as it is,
    else None (then the full checks say what is wrong, or contiguous copies are made).

    As it is: a plain tensor or parameter, dense, strided, contiguous, on the CPU, of a dtype
    the kernel takes, of the right size (the running means in the compute dtype, ``c`` one
    value per tensor or per coordinate). Whatever
    passes here passes check_inputs, check_rms and _check_tensors too. It runs for every
    tensor of every step, so it reads each property once, a list at a time.
    """
    n = len(params)
    norm = bool(squares)
    if not len(grads) == len(hiddens) == len(lrs) == n:
        return None
    if (len(squares), len(ones)) != ((n, n) if norm else (0, 0)):
        return None
    tensors = [*params, *grads, *hiddens, *squares, *ones]
    if not _all_plain_contiguous_cpu(tensors):
        return None
    p_codes = [DTYPE_CODES.get(p.dtype) for p in params]
    g_codes = [DTYPE_CODES.get(g.dtype) for g in grads]
    h_codes = [HIDDEN_CODES.get(h.dtype) for h in hiddens]
    if None in p_codes or None in g_codes or None in h_codes:
        return None
    numels = [p.numel() for p in params]
    if [g.numel() for g in grads] != numels:
        return None
    if [h.shape for h in hiddens] != [(h_size, k) for k in numels]:  # torch.Size == tuple
        return None
    c_numels = [c.numel() for c in ones]
    if norm:
        # the compute dtype (compute_dtype): float64 for float64 parameters, else float32
        cds = [torch.float64 if code == 1 else torch.float32 for code in p_codes]
        if ([v.dtype for v in squares] != cds or [c.dtype for c in ones] != cds
                or [v.numel() for v in squares] != numels
                or not all([m == 1 or m == k for m, k in zip(c_numels, numels)])):
            return None
    ptrs = [x.data_ptr() or None for x in tensors]
    return _Plan(ptrs[:n], p_codes, ptrs[n:2 * n], g_codes, ptrs[2 * n:3 * n], h_codes,
                 ptrs[3 * n:4 * n], ptrs[4 * n:], c_numels, numels)


def _pass1(params, grads, hiddens, lrs, weights, skip, want_sums: bool, squares, ones,
           rounding: list[int] | None = None, checked: bool = False, plan: _Plan | None = None):
    """Run pass 1 (``want_sums``) or the whole step; returns ``(sums, scratch)``.

    ``checked``: the caller has run check_inputs (and check_rms) and made every tensor
    contiguous, in eager mode (simple_update_cpu): then the pointers are read without
    checking each tensor again, which is most of the call's cost for small tensors.
    ``plan``: the arrays :func:`_plain_plan` read from these tensors (implies ``checked``).
    ``rounding``: the bf16 hidden states' stochastic rounding keys (None: round to nearest).
    """
    lib = load_library()
    n = len(params)
    if not (len(grads) == len(hiddens) == len(lrs) == n):
        raise RuntimeError("l2l_optim cpu kernel: params, grads, hiddens and lrs differ in length")
    norm = bool(squares)
    if norm and not len(squares) == len(ones) == n:
        raise RuntimeError("l2l_optim cpu kernel: the rms running means differ in length from params")
    w_ptr, w_len = _weights_pointer(weights)
    if plan is None:
        if not checked:
            _check_tensors(params, grads, hiddens, squares, ones, _hidden_size(w_len))
        plan = _Plan(_pointers(params), [DTYPE_CODES[p.dtype] for p in params], _pointers(grads),
                     [DTYPE_CODES[g.dtype] for g in grads], _pointers(hiddens),
                     [HIDDEN_CODES[h.dtype] for h in hiddens], _pointers(squares),
                     _pointers(ones), [c.numel() for c in ones], [p.numel() for p in params])
    p_codes, numels = plan.p_codes, plan.numels
    # bf16 / fp16 parameters: u waits in fp32 between the passes, theta is rounded once
    scratch = [torch.zeros(k, dtype=torch.float32) if c >= 2 else None
               for k, c in zip(numels, p_codes)]
    skip_ptr, _flag = _skip_pointer(skip)
    sums = torch.zeros(n, dtype=torch.float64) if want_sums else None
    rc = lib.l2l_simple_pass1(
        n, _array(_P, plan.p_ptrs), _array(ctypes.c_int32, p_codes),
        _array(_P, plan.g_ptrs), _array(ctypes.c_int32, plan.g_codes),
        _array(_P, plan.h_ptrs), _array(ctypes.c_int32, plan.h_codes),
        None if rounding is None else _array(ctypes.c_uint32, rounding),
        _array(_P, plan.v_ptrs) if norm else None,
        _array(_P, plan.c_ptrs) if norm else None,
        _array(ctypes.c_int64, plan.c_numels) if norm else None,
        _NORM if norm else None, _array(ctypes.c_int64, numels), _array(ctypes.c_double, lrs),
        _array(_P, [None if s is None else s.data_ptr() or None for s in scratch]), w_ptr,
        w_len, skip_ptr, None if sums is None else sums.data_ptr(), torch.get_num_threads())
    _check(rc)
    return sums, scratch


def _hidden_size(w_len: int) -> int:
    """``H`` of a packed weight vector (:func:`l2l_optim.rule.hidden_size_of_packed`)."""
    try:
        h = hidden_size_of_packed(w_len)
    except ValueError:
        h = 0
    if not 1 <= h <= 64:
        raise RuntimeError(f"l2l_optim cpu kernel: bad packed weight length {w_len}")
    return h


def _pass2(params, scratch, lrs: list[float], weights: Tensor, shared: Tensor,
           skip: Tensor | None) -> None:
    """Run pass 2 after :func:`_pass1` with sums: ``theta += lr * shared``."""
    lib = load_library()
    n = len(params)
    if not (len(scratch) == len(lrs) == n):
        raise RuntimeError("l2l_optim cpu kernel: params, scratch and lrs differ in length")
    w_ptr, w_len = _weights_pointer(weights)
    _hidden_size(w_len)
    skip_ptr, _flag = _skip_pointer(skip)
    if shared.numel() != 1 or not shared.is_floating_point():
        raise RuntimeError("l2l_optim cpu kernel: shared must be a one-element floating tensor")
    _pointer(shared.reshape(()), "shared", 0, {shared.dtype: 0})
    p_ptrs, p_codes, numels, s_ptrs = [], [], [], []
    for i, (p, s) in enumerate(zip(params, scratch)):
        pp, pc = _pointer(p, "param", i, DTYPE_CODES)
        k = p.numel()
        if pc >= 2:
            sp, _ = _pointer(s, "scratch", i, {torch.float32: 0})
            if s.numel() != k:
                raise RuntimeError(f"l2l_optim cpu kernel: scratch {i} must be the float32 buffer "
                                   f"of {k} elements that simple_update_pass1 returned")
            s_ptrs.append(sp or None)
        else:
            s_ptrs.append(None)
        p_ptrs.append(pp), p_codes.append(pc), numels.append(k)
    rc = lib.l2l_simple_pass2(
        n, _array(_P, p_ptrs), _array(ctypes.c_int32, p_codes), _array(ctypes.c_int64, numels),
        _array(ctypes.c_double, lrs), _array(_P, s_ptrs), w_ptr, w_len, float(shared.item()),
        skip_ptr, torch.get_num_threads())
    _check(rc)


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
    return torch.stack([lr.detach().reshape(()).to(device=_CPU, dtype=torch.float64)
                        if isinstance(lr, Tensor) else one * lr for lr in lrs])


def _key_list(rounding: Tensor | None, n: int) -> list[int] | None:
    """An op's rounding keys (an int64 CPU vector) as the library takes them."""
    if rounding is None:
        return None
    if rounding.shape != (n,) or rounding.dtype != torch.int64 or not rounding.is_cpu:
        raise RuntimeError(f"l2l_optim cpu kernel: rounding must be a CPU int64 vector of {n} "
                           f"keys, got {rounding.dtype} of shape {tuple(rounding.shape)}")
    return [k & 0xFFFFFFFF for k in rounding.tolist()]


# The registered ops take the learning rates as a tensor (see _lr_tensor); squares, ones: the
# rms input norm's running means, or empty lists for none (an op's arguments cannot be None
# lists); rounding: the stochastic rounding keys as an int64 vector, or None.
def _simple_update(params: list[Tensor], grads: list[Tensor], hiddens: list[Tensor],
                   lrs: Tensor, weights: Tensor, skip: Optional[Tensor],
                   squares: list[Tensor], ones: list[Tensor],
                   rounding: Optional[Tensor] = None) -> None:
    _pass1(params, grads, hiddens, _lr_list(lrs, len(params)), weights, skip, False, squares,
           ones, _key_list(rounding, len(params)))


def _simple_update_pass1(params: list[Tensor], grads: list[Tensor], hiddens: list[Tensor],
                         lrs: Tensor, weights: Tensor, skip: Optional[Tensor],
                         squares: list[Tensor], ones: list[Tensor],
                         rounding: Optional[Tensor] = None) -> tuple[Tensor, list[Tensor]]:
    sums, scratch = _pass1(params, grads, hiddens, _lr_list(lrs, len(params)), weights, skip,
                           True, squares, ones, _key_list(rounding, len(params)))
    # an empty buffer for the parameters that need none (an op returns tensors, not None)
    return sums, [torch.empty(0) if s is None else s for s in scratch]


def _simple_update_pass2(params: list[Tensor], scratch: list[Tensor], lrs: Tensor,
                         weights: Tensor, shared: Tensor, skip: Optional[Tensor]) -> None:
    _pass2(params, scratch, _lr_list(lrs, len(params)), weights, shared, skip)


def _register_ops() -> None:
    """``torch.ops.l2l_optim_cpu.*``, with the shape-only versions torch.compile traces.

    The updates mutate their inputs in place (``mutates_args`` says which) and return nothing
    (pass 1: fresh tensors), so a compiled ``opt.step()`` holds the call as one opaque op
    instead of breaking the graph around it. CPU kernels only: a sparse, nested or other
    backend's tensor gets torch's "could not run" error before anything runs.
    """
    lib = "l2l_optim_cpu"
    update = torch.library.custom_op(f"{lib}::simple_update", _simple_update,
                                     mutates_args=("params", "hiddens", "squares", "ones"),
                                     device_types="cpu")
    pass1 = torch.library.custom_op(f"{lib}::simple_update_pass1", _simple_update_pass1,
                                    mutates_args=("params", "hiddens", "squares", "ones"),
                                    device_types="cpu")
    pass2 = torch.library.custom_op(f"{lib}::simple_update_pass2", _simple_update_pass2,
                                    mutates_args=("params",), device_types="cpu")
    update.register_fake(
        lambda params, grads, hiddens, lrs, weights, skip, squares, ones, rounding=None: None)
    pass2.register_fake(lambda params, scratch, lrs, weights, shared, skip: None)

    @pass1.register_fake
    def _(params, grads, hiddens, lrs, weights, skip, squares, ones, rounding=None):
        sums = weights.new_empty((len(params),), dtype=torch.float64)
        low = (torch.bfloat16, torch.float16)
        return sums, [weights.new_empty((p.numel() if p.dtype in low else 0,), dtype=torch.float32)
                      for p in params]


if not hasattr(torch.ops.l2l_optim_cpu, "simple_update"):  # not after a module reload
    _register_ops()


def _ops():
    """The registered ops, which a compiled graph holds as opaque calls (eager calls go to
    :func:`_pass1` and :func:`_pass2` directly: the dispatcher adds nothing there but time)."""
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
) -> None:
    """The fused CPU update; same contract as :func:`~.reference.simple_update_reference`.

    With ``rms`` the input norm runs inside pass 1, on each block as it is read.

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
        plan = _plain_plan(params, grads, hiddens, lrs, sq, on, weights.w_ih.numel())
    if plan is None:
        check_inputs("cpu", params, grads, hiddens, lrs, weights.w_ih.numel(), device=_CPU,
                     device_rule="runs on CPU tensors only")
        if rms is not None:
            check_rms("cpu", rms, params, device=_CPU, device_rule="runs on CPU tensors only")
    rounding = check_rounding("cpu", rounding, len(params), device=_CPU)
    done, skip = split_skip(skip)
    if skip is not None and skip.device.type != "cpu":
        raise RuntimeError("impl='cpu': the skip flag must be a CPU tensor")
    if done or not params:
        return
    # the kernel reads every weight in fp64 and rounds to the compute dtype itself
    packed = packed_weights(weights, _CPU, torch.float64, flat=True)
    squares, ones = rms if rms is not None else ([], [])

    def eager(ps, gs, hs, vs, cs, plan=None):
        # every tensor was checked above (or planned), so pass 1 reads the pointers unchecked
        lr_list = [float(lr) for lr in lrs]
        keys = rounding.tolist() if isinstance(rounding, Tensor) else rounding
        sums, scratch = _pass1(ps, gs, hs, lr_list, packed, skip, aggregate is not None, vs, cs,
                               keys, checked=True, plan=plan)
        if aggregate is not None:
            _pass2(ps, scratch, lr_list, packed, call_aggregate(aggregate, sums), skip)

    if plan is not None:
        eager(params, grads, hiddens, squares, ones, plan)
        # the kernel's writes bypass autograd, as in contiguous_inplace
        bump_versions(params, hiddens, list(squares), list(ones))
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
        if aggregate is None:
            update(ps, gs, hs, lr_t, packed, skip, vs, cs, keys)
            return
        sums, scratch = pass1(ps, gs, hs, lr_t, packed, skip, vs, cs, keys)
        shared = call_aggregate(aggregate, sums)
        pass2(ps, scratch, lr_t, packed, shared, skip)


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
    # _address takes, for every tensor
    ptrs = numels = None
    if (_all_plain_contiguous_cpu(tensors)
            and not any([torch._is_functional_tensor(t) for t in tensors])
            and None not in (codes := [DTYPE_CODES.get(t.dtype) for t in tensors])):
        ptrs, numels = [t.data_ptr() for t in tensors], [t.numel() for t in tensors]
        if not all([ptr or not k for ptr, k in zip(ptrs, numels)]):
            ptrs = None
    if ptrs is None:
        ptrs, codes, numels = [], [], []
        for t in tensors:
            found = _address(t, DTYPE_CODES)
            if found is None and type(t) is Tensor and t.layout == torch.strided and not t.is_contiguous():
                copies.append(t.contiguous())  # a non-contiguous gradient: scan a copy
                found = _address(copies[-1], DTYPE_CODES)
            if found is None:
                return None
            ptrs.append(found[0] or None), codes.append(found[1]), numels.append(t.numel())
    bad = lib.l2l_first_nonfinite(len(tensors), _array(_P, ptrs), _array(ctypes.c_int32, codes),
                                  _array(ctypes.c_int64, numels), torch.get_num_threads())
    if bad < -1:
        raise RuntimeError(f"l2l_optim cpu kernel: {_ERRORS.get(bad + 1, f'error {bad}')}")
    return int(bad)


def kernel_tanh(x: Tensor) -> Tensor:
    """The kernel's tanh applied to a float32 or float64 CPU tensor (for accuracy tests): the
    tanh of the selected instruction set's loop for the default hidden size, bit for bit."""
    lib = load_library()
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        raise RuntimeError("float32 / float64 CPU tensors only")
    xc = x.contiguous()
    out = torch.empty_like(xc)
    ptr, code = _pointer(xc, "x", 0, DTYPE_CODES)
    _check(lib.l2l_tanh(code, ptr, out.data_ptr(), xc.numel(), torch.get_num_threads()))
    return out
