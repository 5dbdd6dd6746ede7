"""What the optimizers accept: options, keywords and parameters.

Every option lives in ``defaults`` and the parameter groups, as in torch; :func:`check_group`
checks one group's values with torch's messages. :func:`own_options` sorts the keywords a
constructor gets beyond the common ones: a class's own options (SimpleOptimizer's ``impl``)
are kept, another optimizer's option raises a TypeError that says what applies instead.
:func:`warn_small_lr` warns when a float ``lr`` is far below the learned scale,
:func:`warn_strong_decay` when ``lr * weight_decay`` decays the parameters fast, and
:func:`check_params` refuses parameters an optimizer cannot step.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any

import torch
from torch import Tensor

from . import distributed
from .nonfinite import POLICIES, user_stacklevel

__all__ = ["SMALL_LR", "STRONG_DECAY", "FOREIGN_OPTIONS", "is_real", "check_group", "own_options",
           "warn_small_lr", "warn_strong_decay", "check_params"]

#: below this, a float lr is far from the learned scale (1.0 applies the step as trained)
SMALL_LR = 0.05
#: above this, ``lr * weight_decay`` shrinks the parameters fast: by half in under 700 steps
STRONG_DECAY = 1e-3
_LEARNED = "nothing replaces it: the update rule is learned (its memory is the net's hidden state)"
_KERNEL = "{impl}"
#: other optimizers' options: (whose, what applies here instead)
FOREIGN_OPTIONS = {
    "betas": ("torch.optim.Adam", _LEARNED),
    "eps": ("torch.optim.Adam", _LEARNED),
    "amsgrad": ("torch.optim.Adam", _LEARNED),
    "foreach": ("torch.optim.Adam", _KERNEL),
    "fused": ("torch.optim.Adam", _KERNEL),
    "capturable": ("torch.optim.Adam", "a step needs no option to be traced: "
                   "torch.compile(opt.step, fullgraph=True) compiles it"),
    "differentiable": ("torch.optim.Adam", "the step runs without autograd; to differentiate "
                       "through the learned rule, meta-train it with l2l_optim.meta"),
    "momentum": ("torch.optim.SGD", "the learned rule keeps its own memory in the net's hidden "
                 "state (the groups' 'momentum' entry is inert, for schedulers that cycle it)"),
}


def is_real(x: Any) -> bool:
    """Whether ``x`` is a real number: int, float or a numpy scalar, not a bool or a tensor."""
    return isinstance(x, numbers.Real) and not isinstance(x, (bool, Tensor))


def _check_lr(lr: Any) -> None:
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        lr = lr.item()
    if not is_real(lr) or not math.isfinite(lr) or lr < 0.0:
        raise ValueError(f"Invalid learning rate: {lr!r}")


def check_group(group: dict[str, Any], state_dtypes: tuple[torch.dtype, ...]) -> None:
    """Check the common options of ``defaults`` or of one parameter group.

    Args:
        group: the options (``lr``, ``weight_decay``, ``maximize``, ``nonfinite``,
            ``state_dtype``).
        state_dtypes: the ``state_dtype`` values allowed.

    Raises:
        ValueError: the first invalid option.
    """
    _check_lr(group["lr"])
    wd = group["weight_decay"]
    if not is_real(wd) or not math.isfinite(wd) or wd < 0.0:
        raise ValueError(f"Invalid weight_decay value: {wd!r}")
    if not isinstance(group["maximize"], bool):
        raise ValueError(f"Invalid maximize: {group['maximize']!r}; expected True or False")
    if group["nonfinite"] not in POLICIES:
        raise ValueError(
            f"Invalid nonfinite policy: {group['nonfinite']!r}; expected one of {POLICIES}")
    if group["state_dtype"] not in state_dtypes:
        allowed = ", ".join(str(d) for d in state_dtypes)
        raise ValueError(f"Invalid state_dtype: {group['state_dtype']}; expected one of {allowed}")


def own_options(name: str, kwargs: dict[str, Any], own: dict[str, Any],
                kernels: tuple[str, ...]) -> dict[str, Any]:
    """``own`` (a class's own options and their defaults) updated from ``kwargs``.

    Args:
        name: the optimizer's class name, for the messages.
        kwargs: the constructor's extra keywords.
        own: the class's own options and their defaults.
        kernels: the ``impl`` values, for the message about ``foreach`` and ``fused``.

    Returns:
        The class's own options.

    Raises:
        TypeError: another optimizer's option (saying what applies instead) or an unknown
            keyword (as Python says it).
    """
    own = dict(own)
    for key, value in kwargs.items():
        if key in own:
            own[key] = value
        elif key in FOREIGN_OPTIONS:
            whose, instead = FOREIGN_OPTIONS[key]
            if instead == _KERNEL:
                instead = (f"impl= picks the kernel, one of {', '.join(map(repr, kernels))} "
                           "('auto', the default, takes the fused kernel of the parameters' "
                           "device)" if "impl" in own else
                           f"{name} runs its net's forward; SimpleOptimizer's impl= picks a fused "
                           "kernel")
            raise TypeError(f"{name} has no {key!r} option ({whose}'s); {instead}")
        else:
            raise TypeError(f"{name}.__init__() got an unexpected keyword argument {key!r}")
    return own


def warn_small_lr(name: str, lr: Any) -> bool:
    """Warn when ``lr`` is a float far below the learned scale; return whether it warned.

    Args:
        name: the optimizer's class name, for the message.
        lr: a group's ``lr`` (a tensor is left alone: reading it may synchronise).

    Returns:
        Whether it warned.
    """
    if not (is_real(lr) and 0.0 < lr < SMALL_LR):
        return False
    warnings.warn(
        f"{name}: lr={lr:g} is far below the learned scale: lr multiplies the meta-trained "
        "step, and lr=1.0 applies it as trained (the default). If this is Adam's 1e-3, as it "
        f"probably is, it does not carry over: it makes every step {round(1 / lr):,} times smaller; "
        "leave lr out, or tune it around 1.0",
        UserWarning, stacklevel=user_stacklevel(),
    )
    return True


def warn_strong_decay(name: str, lr: Any, weight_decay: Any) -> bool:
    """Warn when ``lr * weight_decay`` (the decoupled decay of one step) is above
    :data:`STRONG_DECAY`; return whether it warned.

    AdamW multiplies the parameters by ``1 - lr * weight_decay`` with an lr of about 1e-3,
    so its ``weight_decay=0.01`` decays by 1e-5 per step; here lr is about 1 and the same
    value decays by 1% per step, which drives every parameter to zero within a few hundred
    steps.

    Args:
        name: the optimizer's class name, for the message.
        lr: a group's ``lr`` (a tensor is left alone: reading it may synchronise).
        weight_decay: the group's ``weight_decay``.

    Returns:
        Whether it warned.
    """
    if not (is_real(lr) and is_real(weight_decay) and lr * weight_decay > STRONG_DECAY):
        return False
    per_step = lr * weight_decay
    effect = (f"multiplies every parameter by {1 - per_step:g} at every step (half of it is gone "
              f"after {math.log(0.5) / math.log1p(-per_step):,.0f} steps)" if per_step < 1
              else "sets every parameter to zero or flips its sign at every step")
    warnings.warn(
        f"{name}: weight_decay={weight_decay:g} at lr={lr:g} {effect}: the decay is "
        "1 - lr * weight_decay, and lr is about 1 here, not AdamW's 1e-3, so AdamW's "
        "weight_decay does not carry over; for the decay AdamW applies at lr=1e-3, pass "
        "weight_decay=1e-3 * (AdamW's weight_decay)",
        UserWarning, stacklevel=user_stacklevel(),
    )
    return True


def check_params(name: str, groups: list[dict[str, Any]]) -> None:
    """Refuse the parameters of the last of ``groups`` that the optimizer cannot step.

    Args:
        name: the optimizer's class name, for the messages.
        groups: the optimizer's parameter groups, the new one last.

    Raises:
        ValueError: a complex or non-floating parameter, parameters on several devices, or
            one on the meta device (named by its index across groups).
        TypeError, NotImplementedError: a tensor subclass or DTensor placement the
            optimizers do not step (:func:`l2l_optim.distributed.check_param`).
    """
    params = groups[-1]["params"]
    for p in params:
        if torch.is_complex(p):
            raise ValueError(f"{name} does not support complex parameters (got one of dtype "
                             f"{p.dtype}); optimize torch.view_as_real(p) instead")
        if not p.is_floating_point():
            raise ValueError(f"{name} supports only floating-point parameters, got dtype {p.dtype}")
    first = sum(len(g["params"]) for g in groups[:-1])
    for i, p in enumerate(params):
        distributed.check_param(name, first + i, p)
    devices = {p.device for g in groups for p in g["params"]}
    if len(devices) > 1:
        raise ValueError(f"{name} needs all parameters on one device (the update aggregates over "
                         f"all coordinates), got {sorted(map(str, devices))}")
    for i, p in enumerate(params):
        if p.device.type == "meta":
            raise ValueError(
                f"{name}: parameter {first + i} (shape {tuple(p.shape)}) is on the meta device: "
                "it has a shape but no values to optimize; materialise the model first "
                "(model.to_empty(device=...), then initialise it) and create the optimizer from "
                "its parameters"
            )
