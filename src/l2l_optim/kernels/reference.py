"""The plain SimpleOptimizer update: the oracle every fused path is tested against.

Readable first, fast never. It loops over tensors with ordinary torch ops and computes in
float64 for float64 parameters and float32 otherwise (a bf16 hidden state is read and
written in bf16 but computed in float32).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..rounding import round_bf16_stochastic
from ..rule import SimpleWeights, output, recur, rms_normalise, shared_term
from ._common import (
    Aggregate,
    RunningRms,
    call_aggregate,
    check_inputs,
    check_rms,
    check_rounding,
    compute_dtype,
    packed_weights,
    split_skip,
)

__all__ = ["simple_update_reference"]


def simple_update_reference(
    params: list[Tensor],
    grads: list[Tensor],
    hiddens: list[Tensor],
    lrs: list[float | Tensor],
    weights: SimpleWeights,
    skip: Tensor | None = None,
    aggregate: Aggregate | None = None,
    rms: RunningRms | None = None,
    rounding: list[int] | Tensor | None = None,
) -> None:
    """Apply one SimpleOptimizer step in place to ``params`` and ``hiddens``.

    Args:
        params: parameter tensors of any shape and floating dtype (updated in place).
        grads: their gradients, same shapes (dense, finite unless ``skip`` is set).
        hiddens: hidden states, one ``(H, p.numel())`` contiguous tensor per parameter
            (updated in place).
        lrs: one learning rate per parameter, a float or a 1-element tensor; the update
            applied is ``lr * u``.
        weights: the folded net weights (``SimpleOptimizerNet.fused_weights``).
        skip: optional 0-dim bool tensor or Python bool; when true nothing is changed (the
            non-finite gradient policy).
        aggregate: optional; when given, the per-tensor sums of ``w_b . h'`` (a float64
            tensor on the first parameter's device) go through it and the scalar it returns
            replaces ``w_b . mean(h')`` (see :data:`~._common.Aggregate`). It is called once
            per call with parameters, also when a tensor ``skip`` is true (with zeros).
        rms: for a net with the rms input norm, its running means (updated in place); the
            RNN's input is then :func:`~l2l_optim.nets.rms_normalise` of the gradient, in the
            compute dtype. ``None``: the raw gradient.
        rounding: optional keys, one per parameter, of the stochastic rounding of bfloat16
            hidden states (:func:`~l2l_optim.rounding.round_bf16_stochastic`); ``None``: they
            round to nearest. Other hidden dtypes ignore them.

    The aggregate is the mean of ``h'`` over every coordinate of every tensor in the call.

    Raises:
        ValueError: the lists differ in length, a gradient is sparse, a dtype is unsupported
            or a hidden state has the wrong shape.
        TypeError: a tensor subclass (e.g. DTensor), or ``aggregate`` returns no scalar.
    """
    H = weights.w_ih.numel()
    check_inputs("reference", params, grads, hiddens, lrs, H)
    if rms is not None:
        check_rms("reference", rms, params)
        rms = RunningRms(*rms)
    rounding = check_rounding("reference", rounding, len(params))
    done, skip = split_skip(skip)
    if done or not params:
        return
    if skip is not None and not torch.compiler.is_compiling():
        # eager: read the flag once; a compiled graph cannot, so it masks the writes instead
        if bool(skip):
            if aggregate is not None:
                # the callback may be a collective that every process must enter
                call_aggregate(aggregate, torch.zeros(len(params), dtype=torch.float64,
                                                      device=params[0].device))
            return
        skip = None
    new_hiddens, new_rms = [], []
    sums = []  # per tensor: sum of w_b . h' over its coordinates (for aggregate)
    total = torch.zeros(H, dtype=torch.float64)
    count = 0
    for i, (p, g, h) in enumerate(zip(params, grads, hiddens)):
        cd = compute_dtype(p.dtype)
        w = packed_weights(weights, p.device, cd)
        g_flat = g.reshape(-1).to(cd)
        if rms is not None:
            g_flat, v_new, c_new = rms_normalise(g_flat, rms.squares[i].reshape(-1),
                                                 rms.ones[i].reshape(-1))
            new_rms.append((v_new, c_new))
        h_new = recur(w.w_ih, w.w_hh, w.b_h, g_flat, h.to(cd))
        new_hiddens.append(h_new)
        h_sum = h_new.sum(dim=1).to(device="cpu", dtype=torch.float64)
        total += h_sum
        if aggregate is not None:
            sums.append(w.w_b.to(device="cpu", dtype=torch.float64) @ h_sum)
        count += g_flat.numel()
    mean = total / max(count, 1)
    if aggregate is not None:
        agg = call_aggregate(aggregate, torch.stack(sums).to(params[0].device))
    for i, (p, h, h_new, lr) in enumerate(zip(params, hiddens, new_hiddens, lrs)):
        cd = h_new.dtype
        w = packed_weights(weights, p.device, cd)
        if aggregate is None:
            shared = shared_term(w.w_b.to(torch.float64).cpu(), mean).to(device=p.device, dtype=cd)
        else:
            shared = agg.to(device=p.device, dtype=cd)
        update = output(w.w_a, h_new, shared, w.b_out)
        p_new = p.to(cd) + lr * update.reshape(p.shape)
        if rounding is not None and h.dtype == torch.bfloat16:
            # float64 compute rounds to float32 first, as every conversion to bfloat16 does
            h_new = round_bf16_stochastic(h_new.float(), rounding[i])
        if skip is not None:
            p_new, h_new = torch.where(skip, p, p_new), torch.where(skip, h, h_new)
        p.copy_(p_new)
        h.copy_(h_new)
    if rms is None:
        return
    for v, c, (v_new, c_new) in zip(rms.squares, rms.ones, new_rms):
        for old, new in ((v, v_new), (c, c_new)):
            if skip is not None:
                new = torch.where(skip, old.reshape(-1), new)
            old.copy_(new.view(old.shape))
