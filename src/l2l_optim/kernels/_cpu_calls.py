"""The fused CPU kernel's C calls: tensors to pointers and dtype codes, and the two passes.

:mod:`~l2l_optim.kernels.cpu` checks the arguments of a call and calls :func:`pass1_call` and
:func:`pass2_call` (eagerly, or through the ops a compiled step holds); this module turns tensors
into the arrays the C ABI takes (``simple_cpu.cpp``) and the library's error codes into
exceptions.
"""

from __future__ import annotations

import array
import ctypes
from typing import NamedTuple

import torch
from torch import Tensor

from ..rule import hidden_size_of_packed
from ..state import int8_blocks
from ._common import RMS_CONSTANTS, compute_dtype, squares_dtypes
from ._cpu_library import load_library

__all__ = ["DTYPE_CODES", "HIDDEN_CODES", "INT8", "VOID_P", "CPU", "ERRORS", "address", "pointer",
           "c_array", "check_rc", "all_plain_contiguous_cpu", "plain_plan", "pass1_call",
           "pass2_call"]

# dtype codes of the C ABI (the enum at the top of simple_cpu.cpp)
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
HIDDEN_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.int8: 4}
INT8 = HIDDEN_CODES[torch.int8]
BF16 = DTYPE_CODES[torch.bfloat16]
VOID_P = ctypes.c_void_p
CPU = torch.device("cpu")
ERRORS = {-1: "a packed weight vector of a bad length", -2: "an unsupported dtype",
           -3: "out of memory", -4: "a null pointer for a non-empty tensor"}


# ------------------------------------------------------------------------- the C calls


def address(t: Tensor, codes: dict) -> tuple[int, int] | None:
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


def pointer(t: Tensor, what: str, i: int, codes: dict) -> tuple[int, int]:
    """:func:`address`, or RuntimeError saying why the tensor is refused."""
    found = address(t, codes)
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
_TYPECODES = {VOID_P: "Q", ctypes.c_int32: "i", ctypes.c_int64: "q", ctypes.c_uint32: "I", ctypes.c_double: "d"}
if any(array.array(code).itemsize != ctypes.sizeof(ctype) for ctype, code in _TYPECODES.items()):
    raise ImportError("l2l_optim cpu kernel: array.array and ctypes disagree on an element size")


def c_array(ctype, values):
    """A C array of ``values`` (for pointers, None is null), at least one element long.

    Built through array.array, which packs a list of Python numbers several times faster
    than ctypes' own constructor: a step passes a dozen arrays with one entry per tensor.
    """
    buf = array.array(_TYPECODES[ctype],
                      [0 if v is None else v for v in values] if ctype is VOID_P else values)
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
    ptr, _ = pointer(flag, "skip flag", 0, {torch.bool: 0})
    return ptr, flag


def _weights_pointer(weights: Tensor) -> tuple[int, int]:
    if weights.dtype != torch.float64 or weights.dim() != 1:
        raise RuntimeError("l2l_optim cpu kernel: weights must be a packed contiguous fp64 vector")
    ptr, _ = pointer(weights, "weights", 0, {torch.float64: 1})
    return ptr, weights.numel()


def check_rc(rc: int) -> None:
    if rc != 0:
        raise RuntimeError(f"l2l_optim cpu kernel: {ERRORS.get(rc, f'error {rc}')}")


_NORM = (ctypes.c_double * 3)(*RMS_CONSTANTS)


def _pointers(tensors) -> list[int | None]:
    """Data pointers for the C arrays (None for an empty tensor's)."""
    return [t.data_ptr() or None for t in tensors]


def _scale_shape_ok(scale, h_size: int, k: int) -> bool:
    return (isinstance(scale, Tensor) and scale.dtype == torch.float32
            and tuple(scale.shape) == (h_size, int8_blocks(k)))


def _check_tensors(params, grads, hiddens, scales, squares, ones, h_size: int) -> None:
    """RuntimeError unless every tensor is one the library may address, of the right size."""
    for i, (p, g, h) in enumerate(zip(params, grads, hiddens)):
        pointer(p, "param", i, DTYPE_CODES)
        pointer(g, "grad", i, DTYPE_CODES)
        pointer(h, "hidden", i, HIDDEN_CODES)
        k = p.numel()
        if h.dtype == torch.int8:
            if p.dtype == torch.float64:
                raise RuntimeError(f"l2l_optim cpu kernel: hidden {i} is 8-bit, which float64 "
                                   "parameters do not take")
            if scales is None or not _scale_shape_ok(scales[i], h_size, k):
                raise RuntimeError(f"l2l_optim cpu kernel: hidden {i} is 8-bit and needs float32 "
                                   f"scales of shape ({h_size}, {int8_blocks(k)})")
            pointer(scales[i], "hidden scale", i, {torch.float32: 0})
        if g.numel() != k:
            raise RuntimeError(f"l2l_optim cpu kernel: grad {i} has {g.numel()} elements, "
                               f"param has {k}")
        if h.dim() != 2 or tuple(h.shape) != (h_size, k):
            raise RuntimeError(f"l2l_optim cpu kernel: hidden {i} must have shape ({h_size}, {k}), "
                               f"got {tuple(h.shape)}")
        if squares:
            # in the compute dtype, as the library reads them (v also bfloat16 for float32
            # compute); c: one per tensor or coordinate
            cd = compute_dtype(p.dtype)
            v_dtypes = {d: 0 for d in squares_dtypes(cd)}
            for x, what, sizes, dts in ((squares[i], "rms squares", (k,), v_dtypes),
                                        (ones[i], "rms ones", (1, k), {cd: 0})):
                pointer(x, what, i, dts)
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
    s_ptrs: list | None  # the 8-bit hidden states' scales (None when there are none)
    v_ptrs: list
    v_codes: list  # the running means of squares' dtype codes: the compute dtype's or bf16's
    c_ptrs: list
    c_numels: list  # 1 (one bias correction per tensor) or the tensor's numel
    numels: list


def all_plain_contiguous_cpu(tensors: list) -> bool:
    """Whether every one is a plain tensor or parameter, dense, strided, contiguous and on the
    CPU: what :func:`address` asks of each, a list at a time (list comprehensions cost less
    per tensor than a loop with its branches, and this runs for every tensor of every step)."""
    plain, strided = (Tensor, torch.nn.Parameter), torch.strided
    return (all([type(x) in plain for x in tensors])
            and all([x.layout == strided and not x.is_nested and x.is_cpu and x.is_contiguous()
                     for x in tensors]))


def plain_plan(params, grads, hiddens, lrs, squares, ones, h_size: int,
               scales=None) -> _Plan | None:
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
    if not all_plain_contiguous_cpu(tensors):
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
    s_ptrs = None
    if INT8 in h_codes:
        s_ptrs = _scale_pointers(params, hiddens, scales, h_size, numels)
        if s_ptrs is None:
            return None
    c_numels = [c.numel() for c in ones]
    v_codes = [DTYPE_CODES.get(v.dtype) for v in squares]
    if norm:
        # the compute dtype (compute_dtype): float64 for float64 parameters, else float32;
        # v may be bfloat16 where it is float32
        cds = [torch.float64 if code == 1 else torch.float32 for code in p_codes]
        if ([c.dtype for c in ones] != cds
                or not all([v.dtype in squares_dtypes(cd) for v, cd in zip(squares, cds)])
                or [v.numel() for v in squares] != numels
                or not all([m == 1 or m == k for m, k in zip(c_numels, numels)])):
            return None
    ptrs = [x.data_ptr() or None for x in tensors]
    return _Plan(ptrs[:n], p_codes, ptrs[n:2 * n], g_codes, ptrs[2 * n:3 * n], h_codes, s_ptrs,
                 ptrs[3 * n:4 * n], v_codes, ptrs[4 * n:], c_numels, numels)


def _scale_pointers(params, hiddens, scales, h_size: int, numels: list) -> list | None:
    """The 8-bit hidden states' scale pointers (None for the other states), or None when one is
    missing or not a plain contiguous float32 CPU tensor of the right shape."""
    if scales is None or len(scales) != len(hiddens):
        return None
    ptrs = []
    for p, h, s, k in zip(params, hiddens, scales, numels):
        if h.dtype != torch.int8:
            ptrs.append(None)
            continue
        if p.dtype == torch.float64 or not _scale_shape_ok(s, h_size, k):
            return None
        found = address(s, {torch.float32: 0})
        if found is None:
            return None
        ptrs.append(found[0] or None)
    return ptrs


def pass1_call(params, grads, hiddens, lrs, weights, skip, want_sums: bool, squares, ones,
           rounding: list[int] | None = None, checked: bool = False, plan: _Plan | None = None,
           scales: list | None = None, averaged=None):
    """Run pass 1 (``want_sums``) or the whole step; returns ``(sums, scratch)``.

    ``checked``: the caller has run check_inputs (and check_rms) and made every tensor
    contiguous, in eager mode (simple_update_cpu): then the pointers are read without
    checking each tensor again, which is most of the call's cost for small tensors.
    ``plan``: the arrays :func:`plain_plan` read from these tensors (implies ``checked``).
    ``rounding``: the bf16 and 8-bit hidden states' stochastic rounding keys (None: bf16
    rounds to nearest; an 8-bit state needs keys).
    ``scales``: per tensor, its 8-bit hidden state's float32 scales (other entries are
    ignored), or None when no hidden state is 8-bit.
    ``averaged``: None, or Schedule-Free averaging: ``(ys, coeffs)``, per tensor the parameter
    ``y`` (``params`` are the base sequences ``z``; same dtype, float32 or float64, as many
    elements) and its ``(c, k)``, ``y' = y + c (z - y) + k (z' - z)``.
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
        h_size = _hidden_size(w_len)
        if not checked:
            _check_tensors(params, grads, hiddens, scales, squares, ones, h_size)
        h_codes = [HIDDEN_CODES[h.dtype] for h in hiddens]
        numels = [p.numel() for p in params]
        s_ptrs = None
        if INT8 in h_codes:
            s_ptrs = _scale_pointers(params, hiddens, scales, h_size, numels)
            if s_ptrs is None:
                _check_tensors(params, grads, hiddens, scales, squares, ones, h_size)  # says why
        plan = _Plan(_pointers(params), [DTYPE_CODES[p.dtype] for p in params], _pointers(grads),
                     [DTYPE_CODES[g.dtype] for g in grads], _pointers(hiddens), h_codes, s_ptrs,
                     _pointers(squares), [DTYPE_CODES[v.dtype] for v in squares],
                     _pointers(ones), [c.numel() for c in ones], numels)
    if plan.s_ptrs is not None and rounding is None:
        raise RuntimeError("l2l_optim cpu kernel: 8-bit hidden states need rounding keys")
    if BF16 in plan.v_codes and rounding is None:
        raise RuntimeError("l2l_optim cpu kernel: bfloat16 running means of squares need "
                           "rounding keys")
    p_codes, numels = plan.p_codes, plan.numels
    # bf16 / fp16 parameters: u waits in fp32 between the passes, theta is rounded once
    scratch = [torch.zeros(k, dtype=torch.float32) if c >= 2 else None
               for k, c in zip(numels, p_codes)]
    skip_ptr, _flag = _skip_pointer(skip)
    y_ptrs, coeffs = _averaged_arrays(params, averaged)
    sums = torch.zeros(n, dtype=torch.float64) if want_sums else None
    rc = lib.l2l_simple_pass1(
        n, c_array(VOID_P, plan.p_ptrs), c_array(ctypes.c_int32, p_codes),
        c_array(VOID_P, plan.g_ptrs), c_array(ctypes.c_int32, plan.g_codes),
        c_array(VOID_P, plan.h_ptrs), c_array(ctypes.c_int32, plan.h_codes),
        None if plan.s_ptrs is None else c_array(VOID_P, plan.s_ptrs),
        None if rounding is None else c_array(ctypes.c_uint32, rounding),
        c_array(VOID_P, plan.v_ptrs) if norm else None,
        c_array(ctypes.c_int32, plan.v_codes) if norm else None,
        c_array(VOID_P, plan.c_ptrs) if norm else None,
        c_array(ctypes.c_int64, plan.c_numels) if norm else None,
        _NORM if norm else None, c_array(ctypes.c_int64, numels), c_array(ctypes.c_double, lrs),
        c_array(VOID_P, [None if s is None else s.data_ptr() or None for s in scratch]),
        y_ptrs, coeffs, w_ptr, w_len, skip_ptr, None if sums is None else sums.data_ptr(),
        torch.get_num_threads())
    check_rc(rc)
    return sums, scratch


def _averaged_arrays(params, averaged):
    """The C arrays of Schedule-Free averaging (see :func:`pass1_call`), or ``(None, None)``."""
    if averaged is None:
        return None, None
    ys, coeffs = averaged
    if len(ys) != len(params) or len(coeffs) != len(params):
        raise RuntimeError("l2l_optim cpu kernel: averaging needs one parameter and one set of "
                           "coefficients per tensor")
    ptrs = []
    for i, (z, y) in enumerate(zip(params, ys)):
        if y.dtype != z.dtype or y.dtype not in (torch.float32, torch.float64) or y.numel() != z.numel():
            raise RuntimeError(f"l2l_optim cpu kernel: averaged parameter {i} must be float32 or "
                               f"float64 with the dtype and size of its base sequence")
        ptrs.append(pointer(y, "averaged param", i, DTYPE_CODES)[0] or None)
    flat = [float(a) for c in coeffs for a in c]
    return c_array(VOID_P, ptrs), c_array(ctypes.c_double, flat)


def _hidden_size(w_len: int) -> int:
    """``H`` of a packed weight vector (:func:`l2l_optim.rule.hidden_size_of_packed`)."""
    try:
        h = hidden_size_of_packed(w_len)
    except ValueError:
        h = 0
    if not 1 <= h <= 64:
        raise RuntimeError(f"l2l_optim cpu kernel: bad packed weight length {w_len}")
    return h


def pass2_call(params, scratch, lrs: list[float], weights: Tensor, shared: Tensor,
           skip: Tensor | None, averaged=None) -> None:
    """Run pass 2 after :func:`pass1_call` with sums: ``theta += lr * shared`` (with
    ``averaged``, as there, ``y += a3 lr shared`` too)."""
    lib = load_library()
    n = len(params)
    if not (len(scratch) == len(lrs) == n):
        raise RuntimeError("l2l_optim cpu kernel: params, scratch and lrs differ in length")
    w_ptr, w_len = _weights_pointer(weights)
    _hidden_size(w_len)
    skip_ptr, _flag = _skip_pointer(skip)
    if shared.numel() != 1 or not shared.is_floating_point():
        raise RuntimeError("l2l_optim cpu kernel: shared must be a one-element floating tensor")
    pointer(shared.reshape(()), "shared", 0, {shared.dtype: 0})
    p_ptrs, p_codes, numels, s_ptrs = [], [], [], []
    for i, (p, s) in enumerate(zip(params, scratch)):
        pp, pc = pointer(p, "param", i, DTYPE_CODES)
        k = p.numel()
        if pc >= 2:
            sp, _ = pointer(s, "scratch", i, {torch.float32: 0})
            if s.numel() != k:
                raise RuntimeError(f"l2l_optim cpu kernel: scratch {i} must be the float32 buffer "
                                   f"of {k} elements that simple_update_pass1 returned")
            s_ptrs.append(sp or None)
        else:
            s_ptrs.append(None)
        p_ptrs.append(pp), p_codes.append(pc), numels.append(k)
    y_ptrs, coeffs = _averaged_arrays(params, averaged)
    rc = lib.l2l_simple_pass2(
        n, c_array(VOID_P, p_ptrs), c_array(ctypes.c_int32, p_codes), c_array(ctypes.c_int64, numels),
        c_array(ctypes.c_double, lrs), c_array(VOID_P, s_ptrs), y_ptrs, coeffs, w_ptr, w_len,
        float(shared.item()), skip_ptr, torch.get_num_threads())
    check_rc(rc)
