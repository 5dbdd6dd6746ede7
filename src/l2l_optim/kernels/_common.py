"""What every SimpleOptimizer kernel path shares, written once.

* :func:`compute_dtype`: the precision rule (float64 for float64 parameters, float32 for
  everything else), used per tensor by the kernels and per call to fold the net's weights.
* :func:`check_inputs`, :func:`split_skip`: the argument checks and the ``skip`` convention,
  so that every path accepts and rejects the same calls with the same messages.
* :data:`Aggregate`, :func:`call_aggregate`: the external reduction between the two passes
  (a mean over coordinates that other processes hold).
* :class:`RunningRms`, :func:`check_rms`: the running means of the rms input norm
  (``SimpleOptimizerNet(input_norm="rms")``), which every path updates in the same call.
* :func:`check_rounding`: the keys of a bf16 hidden state's stochastic rounding.
* :func:`contiguous_inplace`: contiguous working copies of non-contiguous tensors, copied back
  after the kernel, and the autograd version bump that in-place writes through raw pointers
  need.
* :data:`CACHE` and :func:`packed_weights`: the one cache of everything the kernels derive
  from their arguments (the net folded to :class:`~l2l_optim.nets.SimpleWeights`, the weights
  cast or packed into the flat vector a fused kernel reads, Triton's launch tables). It is
  bounded (least recently used entries go first) and guarded by a lock.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from typing import Any, Callable, Iterator, NamedTuple

import torch
from torch import Tensor

from ..nets import SimpleOptimizerNet
from ..rule import RMS_BETA, RMS_EPS, SimpleWeights

__all__ = [
    "PARAM_DTYPES",
    "HIDDEN_DTYPES",
    "compute_dtype",
    "squares_dtypes",
    "split_skip",
    "Aggregate",
    "call_aggregate",
    "RunningRms",
    "RMS_CONSTANTS",
    "check_rms",
    "check_rounding",
    "check_lengths",
    "check_inputs",
    "contiguous_inplace",
    "bump_versions",
    "KernelCache",
    "CACHE",
    "packed_weights",
]

# what the fused kernels implement; the reference accepts the same, so that every path takes
# the same calls (impl="auto" may fall back to the reference)
PARAM_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
HIDDEN_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 when any of ``dtypes`` is float64, else float32.

    Per tensor (``compute_dtype(p.dtype)``) it is the precision a coordinate's update is
    computed in; per call (``compute_dtype(*(p.dtype for p in params))``) it is the precision
    the net's weights are folded in, so that float64 parameters never see a float32 fold.
    """
    return torch.float64 if torch.float64 in dtypes else torch.float32


def squares_dtypes(cd: torch.dtype) -> tuple[torch.dtype, ...]:
    """The dtypes the CPU kernel reads a running mean of squares ``v`` in, for compute dtype
    ``cd``: ``cd`` itself, and bfloat16 where ``cd`` is float32 (the 8-bit state's ``v``)."""
    return (cd, torch.bfloat16) if cd == torch.float32 else (cd,)


def split_skip(skip: Tensor | bool | None) -> tuple[bool, Tensor | None]:
    """``(done, flag)``: ``done`` for a true Python ``skip`` (nothing to do); ``flag`` is the
    tensor the kernel must read (``None`` for no flag). A tensor flag is never read on the
    host here: on an accelerator that would synchronise every step."""
    if skip is None or isinstance(skip, Tensor):
        return False, skip
    return bool(skip), None


#: ``aggregate(sums) -> shared``: ``sums`` is a float64 tensor with one entry per tensor of the
#: call (the sum of ``w_b . h'`` over that tensor's coordinates), ``shared`` the one-element
#: tensor ``w_b . mean(h')`` that pass 2 adds to every coordinate.
Aggregate = Callable[[Tensor], Tensor]

# the tensor types whose memory the fused kernels address directly
_PLAIN_TYPES = (Tensor, torch.nn.Parameter)


def call_aggregate(aggregate: Aggregate, sums: Tensor) -> Tensor:
    """``aggregate(sums)`` checked and cast: a 0-dim float64 tensor on ``sums``' device.

    Raises:
        TypeError: the result is not a plain one-element floating-point tensor.
    """
    shared = aggregate(sums)
    if (
        type(shared) not in _PLAIN_TYPES
        or shared.numel() != 1
        or not shared.is_floating_point()
    ):
        got = f"{type(shared).__name__} {tuple(getattr(shared, 'shape', ()))}"
        raise TypeError(f"aggregate must return a one-element floating-point tensor, got {got}")
    return shared.reshape(()).to(device=sums.device, dtype=torch.float64)


class RunningRms(NamedTuple):
    """The running means of the rms input norm (:func:`~l2l_optim.rule.rms_normalise`), one
    of each per parameter, in the parameter's compute dtype (:func:`compute_dtype`), updated
    in place by the step (SimpleOptimizer's states ``"v"`` and ``"c"``).
    :func:`~l2l_optim.functional.simple_update` needs them for a net with
    ``input_norm="rms"``, such as the shipped default.

    Args:
        squares: ``v``, the running means of squared gradients: ``p.numel()`` elements each.
        ones: ``c``, the running means of ones (the bias correction): one element per
            parameter (every coordinate of a tensor takes the same steps, so one value
            serves them all), or ``p.numel()`` elements, one per coordinate, with the same
            numbers.

    Example:
        >>> import torch
        >>> from l2l_optim import RunningRms, SimpleOptimizerNet, simple_update
        >>> from l2l_optim.weights import load_weights
        >>> net = load_weights("simple").net
        >>> p, g = torch.zeros(3), torch.ones(3)
        >>> h = torch.zeros(net.hidden_size, 3)
        >>> rms = RunningRms([torch.zeros(3)], [torch.zeros(3)])
        >>> simple_update([p], [g], [h], [1.0], net, rms=rms)
        >>> bool((p < 0).all()), rms.ones[0].tolist() == [0.0010000000474974513] * 3
        (True, True)
    """

    squares: list[Tensor]  # v: the running mean of squared gradients
    ones: list[Tensor]  # c: the running mean of ones (the bias correction)


#: the rms input norm's constants as the fused kernels take them: beta, 1 - beta (rounded as
#: nets.rms_normalise rounds it: a Python float, cast to the compute dtype), eps
RMS_CONSTANTS = (RMS_BETA, 1 - RMS_BETA, RMS_EPS)


def check_rms(impl: str, rms: Any, params: list[Tensor], *, device: torch.device | None = None,
              device_rule: str = "", bf16_squares: bool = False) -> None:
    """Raise unless ``rms`` is a :class:`RunningRms` that fits ``params`` (see check_inputs);
    ``bf16_squares``: the kernel also reads bfloat16 squares where it computes in float32.

    Raises:
        TypeError: not a pair of lists, or a tensor subclass.
        ValueError: a length, element count or dtype that does not fit.
        RuntimeError: a tensor on another device than ``device``.
    """
    if not (isinstance(rms, tuple) and len(rms) == 2 and all(isinstance(x, (list, tuple))
                                                          for x in rms)):
        raise TypeError("rms must be a RunningRms(squares, ones) of two lists of tensors, got "
                        f"{type(rms).__name__}")
    squares, ones = rms
    if not len(squares) == len(ones) == len(params):
        raise ValueError(f"rms needs one running mean of each kind per parameter, got "
                         f"{len(squares)} and {len(ones)} for {len(params)} parameters")
    for i, (p, v, c) in enumerate(zip(params, squares, ones)):
        cd = compute_dtype(p.dtype)
        for x, what, one in ((v, "rms squares", False), (c, "rms ones", True)):
            _check_plain(x, what, i)
            if device is not None and x.device != device:
                raise RuntimeError(f"impl={impl!r} {device_rule}; got a tensor on {x.device}")
            ok = x.dtype in (squares_dtypes(cd) if bf16_squares and not one else (cd,))
            if x.numel() not in ((1, p.numel()) if one else (p.numel(),)) or not ok:
                count = f"1 or {p.numel()}" if one else f"{p.numel()}"
                raise ValueError(
                    f"impl={impl!r}: {what} {i} must hold {count} {cd} values (the "
                    f"compute dtype of a {p.dtype} parameter), got {x.numel()} {x.dtype}"
                )


def check_rounding(impl: str, rounding: Any, n: int, *,
                   device: torch.device | None = None) -> list[int] | Tensor | None:
    """The stochastic rounding keys of a call (:mod:`l2l_optim.rounding`) in the form the
    kernels read: None; a list of ``n`` ints in ``[0, 2**32)``; or, as given, an integer
    tensor of shape ``(n,)`` whose values' low 32 bits are the keys.

    Raises:
        TypeError: neither None, a sequence of ints nor an integer tensor.
        ValueError: not one key per parameter.
        RuntimeError: a tensor on another device than ``device``.
    """
    if rounding is None:
        return None
    if isinstance(rounding, Tensor):
        if rounding.dtype not in (torch.int64, torch.int32) or rounding.dim() != 1:
            raise TypeError(f"rounding must be a 1-D integer tensor, got {rounding.dtype} "
                            f"of {rounding.dim()} dimensions")
        if rounding.shape[0] != n:
            raise ValueError(f"rounding needs one key per parameter: {n}, got {rounding.shape[0]}")
        if device is not None and rounding.device != device:
            raise RuntimeError(f"impl={impl!r}: the rounding keys must be on {device}, got "
                               f"{rounding.device}")
        return rounding.to(torch.int64)
    if not isinstance(rounding, (list, tuple)) or not all(
            isinstance(k, int) and not isinstance(k, bool) for k in rounding):
        raise TypeError("rounding must be a list of ints or an integer tensor, got "
                        f"{type(rounding).__name__}")
    if len(rounding) != n:
        raise ValueError(f"rounding needs one key per parameter: {n}, got {len(rounding)}")
    return [k & 0xFFFFFFFF for k in rounding]


def _check_plain(x: Any, what: str, i: int) -> None:
    """Raise unless ``x`` is a plain dense tensor (what the kernels can address)."""
    if type(x) not in _PLAIN_TYPES:
        hint = (
            "; for a DTensor pass its .to_local() (SimpleOptimizer does this for FSDP2 "
            "parameters, see l2l_optim.distributed)"
            if type(x).__name__ == "DTensor"
            else ""
        )
        raise TypeError(
            f"SimpleOptimizer kernels take plain torch.Tensor / nn.Parameter inputs; {what} {i} "
            f"is a {type(x).__module__}.{type(x).__qualname__}{hint}"
        )
    if x.layout != torch.strided or x.is_nested:
        kind = "nested" if x.is_nested else str(x.layout)
        raise ValueError(
            f"SimpleOptimizer kernels take dense strided tensors; {what} {i} is {kind}"
        )


def check_lengths(params, grads, hiddens, lrs) -> None:
    """Raise ValueError unless the four lists have one entry per parameter."""
    n = len(params)
    if not (len(grads) == len(hiddens) == len(lrs) == n):
        raise ValueError(
            f"params, grads, hiddens and lrs must have the same length, got "
            f"{n}, {len(grads)}, {len(hiddens)}, {len(lrs)}"
        )


def check_inputs(
    impl: str,
    params: list[Tensor],
    grads: list[Tensor],
    hiddens: list[Tensor],
    lrs: list,
    hidden_size: int,
    *,
    device: torch.device | None = None,
    device_rule: str = "",
    hidden_dtypes: tuple[torch.dtype, ...] = HIDDEN_DTYPES,
) -> None:
    """The checks every path makes before it touches anything.

    Args:
        impl: the path's name, for the messages.
        hidden_size: ``H``; each hidden state must have shape ``(H, p.numel())``.
        device: when given, every tensor must be on it (the fused paths); ``None`` allows any
            devices (the reference).
        device_rule: the phrase that says which device, e.g. ``"runs on CPU tensors only"``.
        hidden_dtypes: the hidden-state dtypes the path takes.

    Raises:
        ValueError: lists of different lengths, a sparse gradient, a sparse or nested tensor,
            an unsupported dtype or a hidden state of the wrong shape.
        TypeError: a tensor subclass (e.g. DTensor, FakeTensor) or a non-tensor.
        RuntimeError: a tensor on another device than ``device``.
    """
    check_lengths(params, grads, hiddens, lrs)
    for i, (p, g, h) in enumerate(zip(params, grads, hiddens)):
        if type(g) in _PLAIN_TYPES and (g.is_sparse or g.layout != torch.strided):
            raise ValueError("SimpleOptimizer kernels do not support sparse gradients")
        for x, what in ((p, "param"), (g, "grad"), (h, "hidden state")):
            _check_plain(x, what, i)
        if device is not None:
            for x in (p, g, h):
                if x.device != device:
                    raise RuntimeError(
                        f"impl={impl!r} {device_rule}; got a tensor on {x.device}"
                    )
        if p.dtype not in PARAM_DTYPES or g.dtype not in PARAM_DTYPES:
            raise ValueError(f"impl={impl!r}: unsupported dtype {p.dtype} / {g.dtype}")
        if h.dtype not in hidden_dtypes:
            raise ValueError(
                f"impl={impl!r}: unsupported hidden-state dtype {h.dtype} "
                "(use float32, bfloat16 or float64)"
            )
        if g.numel() != p.numel():
            raise ValueError(
                f"a gradient of {g.numel()} elements for a parameter of {p.numel()}"
            )
        if tuple(h.shape) != (hidden_size, p.numel()):
            raise ValueError(
                f"hidden state must have shape ({hidden_size}, {p.numel()}), "
                f"got {tuple(h.shape)}"
            )


def bump_versions(*lists: list[Tensor]) -> None:
    """Increment the autograd version counter of every tensor in ``lists``."""
    from torch.autograd.graph import increment_version

    # one call for all of them (it takes an iterable): a step bumps four tensors per parameter
    increment_version([t for ts in lists for t in ts])


@contextlib.contextmanager
def contiguous_inplace(
    params: list[Tensor], grads: list[Tensor], hiddens: list[Tensor], *more: list[Tensor]
) -> Iterator[tuple[list[Tensor], ...]]:
    """Yield contiguous ``(params, grads, hiddens, *more)`` for a kernel that writes raw memory.

    Non-contiguous parameters, hidden states and tensors of ``more`` (other state the kernel
    updates in place, such as the rms input norm's running means) get contiguous copies,
    written back into the originals (strides kept) when the block ends without an exception.
    Then the version counters of the originals are bumped: the kernel's writes bypass
    autograd, and a backward through a graph that saved these tensors must fail loudly, as
    after ``p.add_()``.
    """
    copy_back = []

    def working(ts: list[Tensor]) -> list[Tensor]:
        out = []
        for t in ts:
            tc = t if t.is_contiguous() else t.contiguous()
            if tc is not t:
                copy_back.append((t, tc))
            out.append(tc)
        return out

    gs = [g if g.is_contiguous() else g.contiguous() for g in grads]
    yield (working(params), gs, working(hiddens), *(working(ts) for ts in more))
    for dst, src in copy_back:
        dst.copy_(src)
    bump_versions(params, hiddens, *more)


# ---------------------------------------------------------------------------------- cache


class KernelCache:
    """A small least-recently-used map from keys to values derived from kernel arguments.

    Keys name their source tensors by ``id``, ``data_ptr`` and version counter; the entry
    keeps those sources alive (``keep``), so an ``id`` in a live key can never be reused by
    another object. An in-place edit bumps the version and a re-bound tensor changes
    ``data_ptr`` or ``id``: either way the key changes and the value is derived afresh.
    """

    def __init__(self, maxsize: int = 16) -> None:
        if maxsize < 1:
            raise ValueError(f"maxsize must be at least 1, got {maxsize}")
        self.maxsize = maxsize
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple, tuple[Any, Any]] = OrderedDict()

    def get(self, key: tuple, make: Callable[[], Any], keep: Any = None) -> Any:
        """The value for ``key``, made by ``make()`` (and stored with ``keep``) on a miss."""
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None:
                self._entries.move_to_end(key)
                return hit[1]
            value = make()
            self._entries[key] = (keep, value)
            while len(self._entries) > self.maxsize:
                self._entries.popitem(last=False)
            return value

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


# One step of an optimizer uses a fold, one or two packings and (Triton) one launch plan;
# sixteen entries hold that for a few optimizers stepping in turn.
CACHE = KernelCache(16)


def _tensor_key(tensors) -> tuple:
    return tuple((id(t), t.data_ptr(), t._version) for t in tensors)


def packed_weights(
    weights: SimpleWeights | SimpleOptimizerNet,
    device: torch.device | str,
    dtype: torch.dtype,
    *,
    flat: bool = False,
) -> SimpleWeights | Tensor:
    """``weights`` in the form a kernel reads, on ``device`` in ``dtype``, from :data:`CACHE`.

    A :class:`SimpleOptimizerNet` is folded with ``net.fused_weights(dtype=dtype,
    device=device)``; :class:`SimpleWeights` are cast tensor by tensor. With ``flat`` the
    result is one contiguous vector ``[w_ih, w_hh, b_h, w_a, w_b, b_out]`` (the fused
    kernels' layout), else a :class:`SimpleWeights`. The values are detached; treat them as
    read-only (they are shared by every call with the same weights).
    """
    device = torch.device(device)
    if isinstance(weights, SimpleOptimizerNet):
        sources = tuple(weights.parameters())
        # the net's identity too: its flags (bias, aggregate) shape the fold
        key = ("net", id(weights)) + _tensor_key(sources)
    elif isinstance(weights, SimpleWeights):
        sources = tuple(weights)
        key = ("weights",) + _tensor_key(sources)
    else:
        raise TypeError(
            "expected a SimpleOptimizerNet or SimpleWeights, got " f"{type(weights).__name__}"
        )

    def fold() -> SimpleWeights:
        if isinstance(weights, SimpleOptimizerNet):
            return weights.fused_weights(dtype=dtype, device=device)
        return SimpleWeights(*(t.detach().to(device=device, dtype=dtype) for t in weights))

    def pack() -> Tensor:
        return torch.cat([t.reshape(-1) for t in fold()]).contiguous()

    if torch.compiler.is_compiling():
        # inside a compiled step the fold is a few traced ops, and the cache's lock and
        # id-based keys are what a graph cannot hold
        return pack() if flat else fold()
    return CACHE.get(key + (device, dtype, flat), pack if flat else fold, keep=(weights, sources))
