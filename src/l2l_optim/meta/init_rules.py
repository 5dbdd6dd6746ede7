"""Starting points for meta-training: init rules that set a freshly built net to a known
optimizer (SGD with momentum, Adam-like normalised momentum, Schedule-Free AdamW's base step,
soft sign momentum), so that meta-training starts from that optimizer and improves on it.

:func:`init_net` applies one by name (:data:`INITS`); :mod:`l2l_optim.registry` says which one
each architecture starts from.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..nets import CoordinatewiseNet, SimpleOptimizerNet

__all__ = [
    "INITS",
    "init_net",
    "init_simple_sgd_like",
    "init_simple_sign_momentum",
    "init_simple_normalised_momentum",
    "init_simple_schedule_free",
]


INITS = ("default", "sign", "sgd", "adam", "schedule-free", "small-output")


def init_net(net: CoordinatewiseNet, init: str, *, lr: float = 1e-3) -> CoordinatewiseNet:
    """Set a freshly built net's starting point for meta-training, in place.

    Args:
        net: the net (its own random init, drawn from torch's global RNG, is the
            ``"default"``; callers that must not touch the user's RNG fork it around the
            constructor and this call).
        init: ``"default"`` (leave the net as built); ``"sign"`` (SimpleOptimizerNet: a soft
            sign-momentum rule with step ``lr``, :func:`init_simple_sign_momentum`); ``"sgd"``
            (SimpleOptimizerNet: SGD with momentum at learning rate ``lr``,
            :func:`init_simple_sgd_like`); ``"adam"`` (SimpleOptimizerNet with
            ``input_norm="rms"``: momentum on the normalised gradient, Adam-like,
            :func:`init_simple_normalised_momentum`); ``"schedule-free"`` (SimpleOptimizerNet
            with ``input_norm="rms"``: the normalised gradient step of Schedule-Free AdamW,
            no momentum, :func:`init_simple_schedule_free`); ``"small-output"`` (the LSTM nets: output layer
            scaled by 0.01 and its bias zeroed, so the first updates are ~1e-3 per coordinate
            instead of ~0.05, which blows up a 400k-parameter MLP within a few steps).
        lr: the step size of the ``"sign"``, ``"sgd"`` and ``"adam"`` starting rules.

    Returns:
        ``net``.

    Raises:
        ValueError: an unknown ``init``, or one that does not apply to the net's architecture.
    """
    if init not in INITS:
        raise ValueError(f"Invalid init: {init!r}; expected one of {INITS}")
    if init in ("sign", "sgd", "adam", "schedule-free"):
        if not isinstance(net, SimpleOptimizerNet):
            raise ValueError(
                f"init={init!r} applies to SimpleOptimizerNet only; use 'small-output' or 'default'"
            )
        if init in ("adam", "schedule-free") and net.input_norm != "rms":
            raise ValueError(f"init={init!r} needs a SimpleOptimizerNet(input_norm='rms')")
        rules = {"sign": init_simple_sign_momentum, "sgd": init_simple_sgd_like,
                 "adam": init_simple_normalised_momentum, "schedule-free": init_simple_schedule_free}
        rules[init](net, lr)
    elif init == "small-output":
        out = getattr(net, "out", None)
        if not isinstance(out, nn.Linear):
            raise ValueError(
                f"init='small-output' applies to the LSTM nets only, not {type(net).__name__}; "
                "use 'sign', 'sgd' or 'default'"
            )
        with torch.no_grad():
            out.weight.mul_(0.01)
            if out.bias is not None:
                out.bias.zero_()
    return net


def init_simple_sgd_like(net: SimpleOptimizerNet, lr: float) -> None:
    """Start a SimpleOptimizerNet as SGD with momentum and step size ``lr``.

    In the tanh's linear regime h' = w_ih g + W_hh h, so a constant gradient g settles at
    h* = (I - W_hh)^-1 w_ih g. Choosing w_a = -lr v / |v|^2 with v = (I - W_hh)^-1 w_ih makes
    the steady-state update -lr g. W_hh is shrunk to spectral radius 0.5 (momentum-like
    memory), and the aggregate's weights start at zero. A random-sign output, the default
    init, starts half the time as gradient *ascent*, which meta-training must first undo.
    """
    H = net.hidden_size
    with torch.no_grad():
        radius = torch.linalg.eigvals(net.w_hh).abs().max().clamp_min(1e-6)
        net.w_hh.mul_(0.5 / radius)
        v = torch.linalg.solve(torch.eye(H) - net.w_hh, net.w_ih.reshape(H))
        net.alpha.fill_(1.0)
        net.w_out[:H].copy_(-lr * v / v.dot(v))
        if net.aggregate:
            net.beta.fill_(1.0)
            net.w_out[H:].zero_()


def _start_output(net: SimpleOptimizerNet, w_a: float) -> None:
    """The output part of the init rules that average their units: every unit's output weight
    ``w_a`` (alpha 1), the aggregate's weights zero (beta 1), biases zero."""
    H = net.hidden_size
    net.alpha.fill_(1.0)
    net.w_out[:H].fill_(w_a)
    if net.aggregate:
        net.beta.fill_(1.0)
        net.w_out[H:].zero_()
    if net.bias:
        net.b_h.zero_()
        net.b_out.zero_()


def init_simple_normalised_momentum(
    net: SimpleOptimizerNet, lr: float, decay_range: tuple[float, float] = (0.3, 0.02), gain: float = 0.1
) -> None:
    """Start a SimpleOptimizerNet with ``input_norm="rms"`` as momentum on the normalised gradient.

    With ``x = g / rms(g)`` as input, unit k keeps ``h_k' = tanh(c_k x + (1 - c_k) h_k)``
    with ``c_k = gain * d_k``, a running average of ``gain * x`` at decay ``1 - d_k``, ``d_k``
    log-spaced over ``decay_range`` (momentum time scales of 3 to 50 steps). ``gain`` keeps
    the tanh near its linear range for inputs of a few rms, so the output
    ``-lr / (gain H) * sum_k h_k`` is about ``-lr * mean_k EMA_k(x)``: Adam's update (a
    running mean of the gradient over its root mean square) with a mixture of momenta, and a
    consistent gradient moves each coordinate by about ``lr`` per step. The aggregate's
    weights start at zero.
    """
    H = net.hidden_size
    with torch.no_grad():
        d = torch.logspace(math.log10(decay_range[0]), math.log10(decay_range[1]), H)
        net.w_ih.copy_((gain * d).view(H, 1))
        net.w_hh.copy_(torch.diag(1 - d))
        _start_output(net, -lr / (gain * H))


def init_simple_schedule_free(
    net: SimpleOptimizerNet, lr: float, gain_range: tuple[float, float] = (1e-3, 1e-2)
) -> None:
    """Start a SimpleOptimizerNet with ``input_norm="rms"`` as Schedule-Free AdamW's base step.

    Schedule-Free AdamW moves its base sequence by ``-lr * g / rms(g)``, with no momentum
    (the interpolation ``y`` between ``z`` and its average plays that part). Unit k computes
    ``h_k' = tanh(k_k x)`` with no recurrence and a small gain ``k_k`` (log-spaced over
    ``gain_range``), so the tanh is linear to 1e-4 for inputs of a few rms, and the output
    ``sum_k -lr / (k_k H) * h_k`` is ``-lr * x``. With ``averaging=0.9`` the rule is then
    Schedule-Free AdamW at learning rate ``lr`` (a test compares the two). ``W_hh`` and the
    aggregate's weights start at zero, free for meta-training to use.
    """
    H = net.hidden_size
    with torch.no_grad():
        gains = torch.logspace(math.log10(gain_range[0]), math.log10(gain_range[1]), H)
        net.w_ih.copy_(gains.view(H, 1))
        net.w_hh.zero_()
        _start_output(net, 0.0)
        net.w_out[:H].copy_(-lr / (gains * H))


def init_simple_sign_momentum(
    net: SimpleOptimizerNet, lr: float, momentum: float = 0.9, gain_range: tuple[float, float] = (10.0, 1e4)
) -> None:
    """Start a SimpleOptimizerNet as a soft sign-momentum rule (Lion-like) with step ``lr``.

    Unit k gets input gain k_k, log-spaced over ``gain_range``, and W_hh = ``momentum`` * I, so
    h_k' = tanh(k_k g + momentum h_k): units with a large gain saturate to the sign of a running
    gradient average, units with a small gain stay linear in g. The output averages them with
    weight -lr/H, so a consistent gradient moves each coordinate by about ``lr`` per step
    whatever its scale, and a vanishing gradient (the linear units) gives a vanishing update:
    no bias is needed to stop at a minimum. Raw gradients of the base MLP are 1e-5..1e-1, which
    this range of gains covers; the default random init (gains ~0.3) leaves the tanh linear
    there and starts meta-training from plain SGD.
    """
    H = net.hidden_size
    with torch.no_grad():
        gains = torch.logspace(math.log10(gain_range[0]), math.log10(gain_range[1]), H)
        net.w_ih.copy_(gains.view(H, 1))
        net.w_hh.copy_(momentum * torch.eye(H))
        _start_output(net, -lr / H)
