"""One optimizee trajectory with a learned optimizer: evaluation, or truncated-BPTT meta-training.

A *trajectory* trains a freshly initialised optimizee for ``steps`` steps with the net as its
optimizer. For meta-training it is cut into unrolls of ``unroll`` steps (truncated BPTT):
after each unroll the meta-loss of that unroll is back-propagated into the net and one step
of the meta-optimizer is taken on the net's parameters; the optimizee's parameters and the
net's state carry over, detached.

The optimizee's gradient g_t is fed to the net as a constant (first order, as Andrychowicz et
al. 2016): the meta-gradient flows through theta_t = theta_{t-1} + u_{t-1} and the net's
hidden state, not through the Hessian. f_t is evaluated on the minibatch of step t, and that
one forward/backward pass gives both the meta-loss term and (detached) the gradient g_t the
net sees next.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from ..nets import CoordinatewiseNet, SimpleOptimizerNet
from ..tasks import Task
from .losses import meta_loss_coefficients

__all__ = ["run_trajectory", "meta_lr_scales"]


def meta_lr_scales(net: CoordinatewiseNet) -> dict[str, Tensor]:
    """Per-element multipliers of the meta learning rate (Adam's step on element i is ~lr * s_i).

    SimpleOptimizerNet's parameters live on very different scales once initialised as a sign
    rule: input gains 10..1e4, output weights ~1e-4. One absolute Adam step of 1e-3 would move
    the output weights by ten times their size and blow up the optimizee in a single unroll
    (the optimizee's loss went from 2.3 to 15 within one trajectory). Scaling each element's step by its own magnitude (with a floor for entries
    that start at zero) makes every step a similar *relative* change. The LSTM nets start on
    the scale of PyTorch's default init and keep plain Adam (all ones).
    """
    ones = {k: torch.ones_like(v) for k, v in net.named_parameters()}
    if not isinstance(net, SimpleOptimizerNet):
        return ones
    H = net.hidden_size
    with torch.no_grad():
        rms = lambda t: t.pow(2).mean().sqrt()  # noqa: E731
        out_scale = rms(net.w_out[:H]).clamp_min(1e-12)
        scales = dict(ones)
        scales["w_ih"] = net.w_ih.abs().clamp_min(rms(net.w_ih) * 1e-3 + 1e-12)
        # a rule that starts without recurrence (the schedule-free init) still needs W_hh to move
        hh_floor = 0.1 * rms(net.w_hh) if bool(net.w_hh.any()) else torch.tensor(0.05)
        scales["w_hh"] = net.w_hh.abs().clamp_min(hh_floor + 1e-12)
        scales["w_out"] = net.w_out.abs().clamp_min(out_scale)
        if net.bias:
            scales["b_out"] = out_scale.expand_as(net.b_out).clone()
    return scales


def _scaled_step(meta_opt: torch.optim.Optimizer, params: dict[str, Tensor], scales: dict[str, Tensor]) -> None:
    # Adam's moments depend on the gradients only, so scaling the step it takes afterwards
    # is exactly Adam with a per-element learning rate.
    before = {k: p.detach().clone() for k, p in params.items()}
    meta_opt.step()
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(before[k] + (p - before[k]) * scales[k])


def _flat(tensors) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _split_like(flat: Tensor, params: dict[str, Tensor]) -> dict[str, Tensor]:
    out, i = {}, 0
    for k, p in params.items():
        out[k] = flat[i : i + p.numel()].view_as(p)
        i += p.numel()
    return out


def run_trajectory(
    net: CoordinatewiseNet,
    task: Task,
    *,
    seed: int,
    steps: int,
    unroll: int | None = None,
    meta_loss: str = "weighted",
    meta_opt: torch.optim.Optimizer | None = None,
    grad_clip: float | None = None,
    loss_coefficients: Tensor | None = None,
    lr_scales: dict[str, Tensor] | None = None,
    should_stop: Callable[[list[float]], bool] | None = None,
    device: torch.device | str | None = None,
) -> dict:
    """Train one fresh optimizee for ``steps`` steps with ``net``; meta-update if ``meta_opt``.

    With ``meta_opt=None`` this is a plain (no-grad) evaluation run of the learned optimizer.
    ``should_stop(losses)`` is asked after every unroll (after its meta-update) and ends the
    run early when it returns True (fine-tuning stops an episode at its loss target).
    ``device`` is where the optimizee's parameters and the net's state live (the task's data
    and the net must already be there); by default, where the task's parameters are made.

    Returns:
        ``{"losses": [f_1..f_T], "initial_loss": f_0, "meta_loss": float, "diverged": bool,
        "stopped": bool, "params": ..., "buffers": ...}``; ``diverged`` means a non-finite
        optimizee loss ended the run, ``stopped`` that ``should_stop`` did.
    """
    if getattr(net, "averaging", 0.0):
        # the unroll steps the parameters with the net's update alone: a rule meta-trained
        # inside Schedule-Free averaging would be trained (and judged) without it
        raise ValueError(
            f"truncated BPTT runs the rule without Schedule-Free averaging, and these weights "
            f"have averaging={net.averaging}; use weights without averaging (the shipped "
            f"'simple'), or ES (l2l-optim meta-es --averaging) for a rule with it")
    train = meta_opt is not None
    unroll = unroll or steps
    w = meta_loss_coefficients(meta_loss, steps) if loss_coefficients is None else loss_coefficients
    gen = torch.Generator().manual_seed(seed)
    params, buffers = task.init_params(seed)
    if device is not None:
        params = {k: v.to(device) for k, v in params.items()}
        buffers = {k: v.to(device) for k, v in buffers.items()}
    n = sum(p.numel() for p in params.values())
    state = net.init_state(n, device=next(iter(params.values())).device)

    def forward(params):
        # the optimizee's gradient is needed even in evaluation runs, so autograd stays on here;
        # parameters the net did not produce (start of an unroll, evaluation) become leaves
        with torch.enable_grad():
            ps = {k: v if v.requires_grad else v.detach().requires_grad_() for k, v in params.items()}
            f = task.loss(ps, buffers, task.sample_batch(gen))
            g = torch.autograd.grad(f, list(ps.values()), retain_graph=train)
        return f, _flat(g).detach()

    f_prev, g = forward(params)
    f_prev = f_prev.detach()
    initial_loss = f_prev.item()
    losses, meta_total, diverged, stopped = [], 0.0, False, False
    for start in range(0, steps, unroll):
        params = {k: v.detach() for k, v in params.items()}
        state = {k: v.detach() for k, v in state.items()}
        total = torch.zeros((), dtype=torch.float64)  # this unroll's meta-loss
        with torch.set_grad_enabled(train):
            flat = _flat(params.values())
            for t in range(start, min(start + unroll, steps)):
                update, state = net(g, state)
                flat = flat + update
                params = _split_like(flat, params)
                f, g = forward(params)
                losses.append(f.item())
                if not math.isfinite(losses[-1]):
                    diverged = True
                    break
                if meta_loss == "weighted":
                    total = total + w[t] * (f - f_prev)
                elif meta_loss == "uniform":
                    total = total + w[t] * f
                elif t == min(start + unroll, steps) - 1:
                    total = total + f
                f_prev = f.detach()
        if diverged:
            break
        meta_total += total.item()
        if train and total.requires_grad:
            meta_opt.zero_grad(set_to_none=True)
            total.backward()
            grads_ok = all(p.grad is None or torch.isfinite(p.grad).all() for p in net.parameters())
            if grads_ok:
                if grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
                if lr_scales is None:
                    meta_opt.step()
                else:
                    _scaled_step(meta_opt, dict(net.named_parameters()), lr_scales)
        # release the unroll's graph before the next one starts
        params = {k: v.detach() for k, v in params.items()}
        if should_stop is not None and should_stop(losses):
            stopped = True
            break
    return {
        "losses": losses,
        "initial_loss": initial_loss,
        "meta_loss": meta_total,
        "diverged": diverged,
        "stopped": stopped,
        "params": {k: v.detach() for k, v in params.items()},
        "buffers": buffers,
    }
