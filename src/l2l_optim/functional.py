"""Functional forms of the optimizers' updates (as :func:`torch.optim.adam.adam` is Adam's).

:class:`~l2l_optim.optimizer.SimpleOptimizer` keeps the state and the policies (parameter
groups, non-finite gradients, ``state_dict``); :func:`simple_update` is the step itself, for
callers that hold their own state. :func:`coordinatewise_update` is the same for any
coordinate-wise net run through its plain ``forward`` (the generic path of
:class:`~l2l_optim.optimizer.LearnedOptimizer`, used by DMOptimizer and RNNProp).
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from . import kernels
from .kernels._common import (
    Aggregate,
    RunningRms,
    check_lengths,
    compute_dtype,
    packed_weights,
    split_skip,
)
from .nets import CoordinatewiseNet, SimpleOptimizerNet, SimpleWeights
from .rule import averaged_step
from .state import decoded_hiddens, float_squares, int8_blocks

__all__ = ["simple_update", "RunningRms", "coordinatewise_update"]


def simple_update(
    params: list[Tensor],
    grads: list[Tensor],
    hiddens: list[Tensor],
    lrs: list[float | Tensor],
    weights: SimpleOptimizerNet | SimpleWeights,
    *,
    impl: str = "auto",
    skip: Tensor | bool | None = None,
    aggregate: Aggregate | None = None,
    rms: RunningRms | tuple[list[Tensor], list[Tensor]] | None = None,
    rounding: list[int] | Tensor | None = None,
    hidden_scales: list[Tensor | None] | None = None,
    averaged: tuple[list[Tensor], float, float] | None = None,
) -> None:
    r"""One SimpleOptimizer step, in place, on ``params`` and their hidden states.

    Per coordinate ``i`` of every tensor in the call, with gradient ``g_i`` and hidden state
    ``h_i``: ``h_i' = tanh(w_ih x_i + w_hh h_i + b_h)``, where ``x_i = g_i`` or, with ``rms``,
    the gradient over its running root mean square (:func:`~l2l_optim.nets.rms_normalise`), and
    ``theta_i <- theta_i + lr * (w_a . h_i' + w_b . mean_j h_j' + b_out)``, the mean running
    over every coordinate of every tensor in the call. Coordinates of float64 parameters are
    computed in float64, all others in float32; bfloat16 / float16 storage is rounded once.

    Args:
        params: parameter tensors of any shape, float32 / float64 / bfloat16 / float16, all on
            one device (updated in place; non-contiguous ones keep their strides).
        grads: their dense gradients, one per parameter, with as many elements.
        hiddens: one hidden state per parameter, of shape ``(H, p.numel())`` and dtype
            float32 / bfloat16 / float64, or int8 codes with their ``hidden_scales`` (not for
            float64 parameters) (updated in place); ``net.init_state(p.numel())`` makes one.
        lrs: one learning rate per parameter: a float, or a 0-dim / 1-element tensor (on
            CUDA a device tensor keeps the step free of host synchronisation).
        weights: a :class:`~l2l_optim.nets.SimpleOptimizerNet`, folded here in float64 if
            any parameter is float64 and float32 otherwise, on the parameters' device; or
            :class:`~l2l_optim.nets.SimpleWeights` already folded, used as given. The folded
            and packed forms are cached and derived afresh when a weight changes (in place
            or re-bound).
        impl: the kernel: ``"auto"`` (the fastest available for the parameters' device),
            ``"reference"``, ``"cpu"`` or ``"triton"`` (see :mod:`l2l_optim.kernels`).
        skip: a Python bool, or a 0-dim bool tensor on the parameters' device read inside the
            kernel (no host synchronisation); when true nothing is changed.
        aggregate: for a mean over more coordinates than this call holds (shards of
            parameters in other processes): a callable that receives, per tensor of the call,
            the sum of ``w_b . h'`` over its coordinates (a float64 tensor of shape
            ``(len(params),)`` on the parameters' device, computed after the hidden states
            are updated) and returns the one-element tensor ``w_b . mean(h')`` that every
            coordinate receives. :mod:`l2l_optim.distributed` passes one that all-reduces the
            sums and divides by the global coordinate count. It is called exactly once per
            call with parameters, also when a tensor ``skip`` is true (then with zeros), so
            it may be a collective; when it raises, pass 1 (the hidden states and the
            per-coordinate part of the update) has already been applied. ``None`` (the
            default): the mean over this call's coordinates, in one fused pass.
        rms: the running means of a net with ``input_norm="rms"`` (required for such a
            net, ``None`` for the others): ``RunningRms(squares, ones)``, or a pair of lists,
            per parameter in its compute dtype (float64 for float64 parameters, else
            float32), zeros before the first step: ``squares`` flat tensors of ``p.numel()``
            elements, ``ones`` (the bias correction) one element per tensor, or one per
            coordinate (the same numbers); updated in place by the same pass that reads the
            gradient (SimpleOptimizer's states ``"v"`` and ``"c"``). Skipped steps leave
            them unchanged. ``squares`` may be bfloat16 (the 8-bit state keeps them so) for
            float32 compute; they then round stochastically with keys from ``rounding``
            (:func:`~l2l_optim.rounding.round_squares_bf16`).
        rounding: for bfloat16 hidden states, the keys of their stochastic rounding, one per
            parameter (a list of ints, or an integer tensor on the parameters' device):
            ``l2l_optim.rounding.rounding_keys(step_counts)``, which SimpleOptimizer passes.
            The random bits are a function of the key and the coordinate
            (:mod:`l2l_optim.rounding`), so every path and thread count gives the same bits.
            ``None`` (the default): they round to nearest even. 8-bit hidden states need
            keys (their rounding is always stochastic). Other hidden dtypes ignore it.
        hidden_scales: for 8-bit hidden states, per parameter the float32 block scales of
            its codes, shape ``(H, l2l_optim.state.int8_blocks(p.numel()))`` (updated in
            place; ``None`` entries for the other states): the codec of
            :mod:`l2l_optim.state`, which the CPU kernel runs inside its pass and the other
            kernels around the step. ``None`` (the default): no hidden state is 8-bit.
        averaged: Schedule-Free averaging around the step, ``(ys, c, b)``: ``params`` are
            then the base sequences ``z``, and the parameters ``ys`` (one per ``z``, as many
            elements) move as :func:`~l2l_optim.rule.averaged_step` defines, with ``c`` the
            newest ``z``'s weight in the average (``1 / t`` at step ``t``) and ``b`` the
            interpolation weight. The CPU kernel moves them in its own passes (float32 /
            float64 contiguous parameters of their ``z``'s dtype); the other paths run
            ``averaged_step`` around the step. ``None`` (the default): no averaging.

    Returns:
        None; ``params`` and ``hiddens`` are updated in place and their autograd version
        counters bumped.

    Raises:
        ValueError: an unknown ``impl``, lists of different lengths, a sparse gradient, an
            unsupported dtype, a hidden state of the wrong shape, a net with
            ``input_norm="rms"`` without ``rms``, running means that do not fit, not one
            rounding key per parameter, or an 8-bit hidden state without keys or scales that
            fit.
        TypeError: ``weights`` is neither a SimpleOptimizerNet nor SimpleWeights, a tensor
            is a subclass the kernels cannot address (e.g. DTensor: pass its ``to_local()``),
            ``aggregate`` is not callable or returns no one-element tensor, or ``rounding``
            is neither a list of ints nor an integer tensor.
        RuntimeError: ``impl`` cannot run here (no compiler, no Triton, another device), or
            the tensors are on several devices for a fused kernel.

    Example:
        >>> import torch
        >>> from l2l_optim.nets import SimpleOptimizerNet
        >>> from l2l_optim.functional import simple_update
        >>> net = SimpleOptimizerNet()
        >>> w = torch.zeros(3)
        >>> h = net.init_state(w.numel())["h"]
        >>> simple_update([w], [torch.ones(3)], [h], [0.1], net, impl="reference")
        >>> w.shape, h.shape
        (torch.Size([3]), torch.Size([10, 3]))
    """
    if impl not in kernels.IMPLS:
        raise ValueError(f"Invalid impl: {impl!r}; expected one of {kernels.IMPLS}")
    if not isinstance(weights, (SimpleOptimizerNet, SimpleWeights)):
        raise TypeError(
            "simple_update needs a SimpleOptimizerNet or SimpleWeights, got "
            f"{type(weights).__name__}"
        )
    if aggregate is not None and not callable(aggregate):
        raise TypeError(f"aggregate must be callable, got {type(aggregate).__name__}")
    if rms is None and getattr(weights, "input_norm", None) is not None:
        raise ValueError(
            f"this net normalises its input (input_norm={weights.input_norm!r}): pass its "
            "running means as rms=RunningRms(squares, ones)"
        )
    check_lengths(params, grads, hiddens, lrs)
    done, skip = split_skip(skip)
    if done or not params:
        return
    device = params[0].device
    resolved = kernels.resolve_impl(impl, device.type)
    kernel = kernels.get_kernel(resolved)
    if isinstance(weights, SimpleOptimizerNet):
        weights = packed_weights(weights, device, compute_dtype(*(p.dtype for p in params)))
    coded = isinstance(hiddens, (list, tuple)) and any(
        isinstance(h, Tensor) and h.dtype == torch.int8 for h in hiddens)
    if coded:
        _check_hidden_scales(params, hiddens, hidden_scales, rounding, weights.w_ih.numel())
    bf16_squares = rms is not None and isinstance(rms, tuple) and len(rms) == 2 and any(
        isinstance(v, Tensor) and v.dtype == torch.bfloat16 for v in rms[0])
    if bf16_squares and rounding is None:
        raise ValueError("bfloat16 running means of squares need rounding keys: pass rounding="
                         "l2l_optim.rounding.rounding_keys(step_counts)")
    if averaged is not None and len(averaged[0]) != len(params):
        raise ValueError(f"averaged needs one parameter per base sequence: {len(params)}, got "
                         f"{len(averaged[0])}")
    with torch.no_grad():
        if resolved == "cpu":
            # the fused CPU kernel runs the 8-bit codec and the averaging in its passes
            extra = {"hidden_scales": hidden_scales} if coded else {}
            if averaged is not None:
                extra["averaged"] = averaged
            kernel(params, grads, hiddens, lrs, weights, skip, aggregate, rms, rounding, **extra)
            return

        def step() -> None:
            # the other kernels read the 8-bit codes and bfloat16 running means as float32
            # working copies, encoded back after the step
            with contextlib.ExitStack() as stack:
                hs, norm = hiddens, rms
                if coded:
                    hs = stack.enter_context(decoded_hiddens(hiddens, hidden_scales, rounding, skip))
                if bf16_squares:
                    vs = stack.enter_context(float_squares(list(rms[0]), rounding, skip))
                    norm = RunningRms(vs, rms[1])
                kernel(params, grads, hs, lrs, weights, skip, aggregate, norm, rounding)

        if averaged is None:
            step()
        else:
            ys, c, b = averaged
            averaged_step(list(ys), params, c, b, step)


def _check_hidden_scales(params, hiddens, scales, rounding, hidden_size: int) -> None:
    """ValueError unless every 8-bit hidden state has a rounding key and scales that fit."""
    if rounding is None:
        raise ValueError("8-bit hidden states need rounding keys: pass rounding="
                         "l2l_optim.rounding.rounding_keys(step_counts)")
    if scales is None or len(scales) != len(hiddens):
        raise ValueError("8-bit hidden states need hidden_scales, one entry per parameter")
    for i, (p, h, s) in enumerate(zip(params, hiddens, scales)):
        if h.dtype != torch.int8:
            continue
        if p.dtype == torch.float64:
            raise ValueError(f"parameter {i} is float64, whose hidden state cannot be 8-bit")
        shape = (hidden_size, int8_blocks(p.numel()))
        if (not isinstance(s, Tensor) or s.dtype != torch.float32 or tuple(s.shape) != shape
                or s.device != h.device):
            got = (f"{s.dtype} of shape {tuple(s.shape)} on {s.device}"
                   if isinstance(s, Tensor) else type(s).__name__)
            raise ValueError(f"hidden_scales {i} must be float32 of shape {shape} on "
                             f"{h.device}, got {got}")


def coordinatewise_update(
    net: CoordinatewiseNet,
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Tensor]],
    lrs: list[float | Tensor],
    *,
    skip: Tensor | None = None,
) -> None:
    """One step of any coordinate-wise net on ``params``, in place (the generic path).

    A net that couples coordinates (the mean aggregation) sees them all in one call. A net
    whose coordinates are independent runs once per parameter, which gives the same result
    without concatenating and splitting every state tensor.

    Args:
        net: the net, already in the compute dtype and on the parameters' device.
        params: the parameters (updated in place: ``p += lr * u``).
        grads: their gradients.
        states: one state dict per parameter (the net's tensors, coordinate last; other keys
            such as ``"step"`` are left alone); updated in place.
        lrs: one learning rate per parameter, a float or a 0-dim tensor.
        skip: optional 0-dim bool tensor; where true, nothing changes (read on the device,
            never on the host).

    Returns:
        None; ``params`` and ``states`` are updated in place.

    Example:
        >>> import torch
        >>> from l2l_optim.nets import DMOptimizerNet
        >>> net = DMOptimizerNet()
        >>> w = torch.zeros(3)
        >>> state = net.init_state(w.numel())
        >>> with torch.no_grad():
        ...     coordinatewise_update(net, [w], [torch.ones(3)], [state], [1.0])
        >>> bool(w.ne(0).all()), state["h1"].shape
        (True, torch.Size([20, 3]))
    """
    if net.independent_coordinates and len(params) > 1:
        for i in range(len(params)):
            _net_update(net, params[i : i + 1], grads[i : i + 1], states[i : i + 1], lrs[i : i + 1], skip)
    elif params:
        _net_update(net, params, grads, states, lrs, skip)


def _net_update(net, params, grads, states, lrs, skip) -> None:
    cd = compute_dtype(*(p.dtype for p in params))
    keys = [k for k in states[0] if k != "step"]
    sizes = [p.numel() for p in params]
    # per-tensor keys (one value per tensor) are spread over their tensor's coordinates when
    # several tensors run together, and read back from each tensor's first coordinate
    spread = set(net.per_tensor_state) if len(params) > 1 else set()
    if len(params) == 1:
        g = grads[0].reshape(-1).to(cd)
        old = {k: states[0][k].to(cd) for k in keys}
    else:
        g = torch.cat([gr.reshape(-1).to(cd) for gr in grads])
        old = {k: torch.cat([s[k].to(cd).expand(*s[k].shape[:-1], n) if k in spread else s[k].to(cd)
                             for s, n in zip(states, sizes)], dim=-1) for k in keys}
    update, new = net(g, old)
    if skip is not None:
        # keep NaN/Inf out of the state without reading the flag on the host
        new = {k: torch.where(skip, old[k], new[k]) for k in keys}
    for k in keys:
        if len(params) == 1 and new[k].dtype == states[0][k].dtype and new[k].shape == states[0][k].shape:
            states[0][k] = new[k]  # a fresh tensor from the net: no copy needed
            continue
        for s, part in zip(states, new[k].split(sizes, dim=-1)):
            if k in spread:
                part = part[..., :1]
                if part.shape[-1] == 0:  # a tensor without coordinates keeps its value
                    continue
            s[k].copy_(part)
    for p, u, lr in zip(params, update.split(sizes), lrs):
        if not isinstance(lr, Tensor) and lr == 0.0:
            continue
        u = u.view(p.shape)
        if skip is None:
            if isinstance(lr, Tensor):
                p.add_(u * lr.to(u.dtype))
            else:
                p.add_(u, alpha=lr)
        else:
            p.copy_(torch.where(skip, p, p + lr * u))
