"""The package's optimizers: :class:`SimpleOptimizer` and the paper's LSTM baselines.

Each is a :class:`~l2l_optim.learned_optimizer.LearnedOptimizer` (the ``torch.optim``
contract, re-exported here) with its architecture and shipped weights as class attributes.
:class:`SimpleOptimizer` runs :func:`l2l_optim.functional.simple_update` and its fused
kernels; :class:`DMOptimizer` and :class:`RNNProp` run their nets' plain ``forward``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import distributed, kernels
from .averaging import AveragingModes, averaged_update
from .functional import RunningRms, simple_update
from .rounding import rounding_keys
from .learned_optimizer import LearnedOptimizer
from .nets import SimpleOptimizerNet
from .registry import get_architecture

__all__ = ["LearnedOptimizer", "SimpleOptimizer", "DMOptimizer", "RNNProp", "optimizer_class"]


class SimpleOptimizer(AveragingModes, LearnedOptimizer):
    r"""The paper's 132-parameter SimpleOptimizer, run by a fused update kernel.

    Per coordinate ``i`` with gradient ``g_i`` and hidden state ``h_i``:
    ``h_i' = tanh(W_ih g_i + W_hh h_i)``, ``u_i = w_a . h_i' + w_b . mean_j h_j'``,
    ``theta_i <- theta_i + lr * u_i``, where the mean runs over every coordinate of every
    parameter stepped (all groups). :func:`l2l_optim.functional.simple_update` folds the net's
    weights (cached per device and dtype) and runs the kernel chosen by ``impl``.
    Everything else (groups, NaN policy, state, ``state_dict``) is as in
    :class:`LearnedOptimizer`.

    The default weights, ``"simple-sf"``, were meta-trained inside Schedule-Free averaging
    (:mod:`l2l_optim.averaging`): the parameters hold the point where gradients are taken,
    and, as with Schedule-Free AdamW, :meth:`eval` moves them to the running average (call it
    before evaluating or saving the model) and :meth:`train` back. Training without the two
    calls works; evaluating at the average is what the rule is meta-trained for. Weights
    without averaging (``weights="simple"``) ignore both calls.

    Args:
        params: iterable of parameters or of dicts defining parameter groups.
        lr: multiplier of the learned update (default: 1.0, as meta-trained).
        weights: a SimpleOptimizerNet's weights in any form :class:`LearnedOptimizer`
            accepts (default: the shipped ``"simple-sf"``).
        impl: ``"auto"``, ``"reference"``, ``"cpu"`` or ``"triton"``, the kernel path
            (see :mod:`l2l_optim.kernels`); one for the whole step.
        state_dtype: the hidden state of non-float64 parameters: ``torch.bfloat16`` (the
            default: 24 bytes of state per parameter with the rms input norm: ``h`` 20,
            rounded stochastically every step (:mod:`l2l_optim.rounding`); ``v`` 4 and ``c``
            one value per tensor, both float32), ``torch.float32`` (44: ``h`` 40) or
            ``torch.int8`` (12.01: ``h`` as block-scaled 8-bit codes and ``v`` in bfloat16, both
            rounded stochastically, :mod:`l2l_optim.state`). Weights with averaging (the
            default) keep the base sequence ``z`` besides (float32; float64 for float64
            parameters): 28, 48 and 16.01. Computation is float32 in every case. The CPU
            kernel decodes, steps and encodes the 8-bit state a block at a time inside its
            pass; the other paths run the codec around the step as torch ops (a float32
            working copy, 40 bytes per parameter while the step runs). The 8-bit state is not
            available for DTensor (FSDP2) parameters.
        nonfinite: ``"skip"`` or ``"raise"``, per group.
        weight_decay: decoupled (AdamW-style) weight decay, off by default.
        maximize: step along the gradient instead of against it (default: False).
        **kwargs: ``impl``; torch's options of other optimizers raise a TypeError that says
            what applies instead (``impl`` for ``foreach`` and ``fused``).

    Raises:
        ValueError: as :class:`LearnedOptimizer`, an invalid ``impl``, or weights that are
            not a SimpleOptimizerNet's.
        RuntimeError: ``impl`` names a path that is not available in this build.

    Example:
        The one-line swap from Adam, with the shipped weights:

        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = SimpleOptimizer(model.parameters())  # instead of torch.optim.Adam(...)
        >>> before = model.weight.detach().clone()
        >>> for _ in range(3):
        ...     opt.zero_grad()
        ...     model(torch.randn(8, 3)).pow(2).mean().backward()
        ...     opt.step()
        >>> bool((model.weight != before).any())
        True
        >>> opt.state[model.weight]["h"].shape, int(opt.state[model.weight]["step"])
        (torch.Size([10, 3]), 3)

        Any SimpleOptimizerNet works as weights, e.g. an untrained one:

        >>> from l2l_optim.nets import SimpleOptimizerNet
        >>> opt = SimpleOptimizer(model.parameters(), weights=SimpleOptimizerNet(), lr=0.5)
        >>> opt.meta_fingerprint != SimpleOptimizer(model.parameters()).meta_fingerprint
        True

        Learning-rate schedulers scale ``lr``; ``OneCycleLR`` and ``CyclicLR`` also cycle the
        groups' ``momentum``, which the learned rule does not read:

        >>> opt = SimpleOptimizer(model.parameters())
        >>> sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=100)
        >>> for _ in range(10):
        ...     opt.zero_grad()
        ...     model(torch.randn(8, 3)).pow(2).mean().backward()
        ...     opt.step()
        ...     sched.step()
        >>> round(opt.param_groups[0]["lr"], 2), round(opt.param_groups[0]["momentum"], 2)
        (0.3, 0.92)
    """

    _required_arch = SimpleOptimizerNet.arch
    _default_weights = "simple-sf"
    _own_options = {"impl": "auto"}
    _step_options = ("impl",)
    _state_dtypes = (torch.float32, torch.bfloat16, torch.int8)
    # stochastically rounded bfloat16 trains as float32 state does on the validation suite
    # (docs/state.md) at 24 instead of 44 bytes per parameter
    _default_state_dtype = torch.bfloat16
    # bfloat16 hidden states round stochastically (False: to nearest even, for comparisons)
    _round_stochastically = True

    def _check_options(self, options: dict[str, Any]) -> None:
        # the name here; whether the kernel runs on the parameters' device in _check_device
        if options["impl"] not in kernels.IMPLS:
            raise ValueError(f"Invalid impl: {options['impl']!r}; expected one of {kernels.IMPLS}")
        super()._check_options(options)

    def _check_device(self, device: torch.device) -> None:
        # fail when the parameters arrive, not at the first step
        kernels.get_kernel(kernels.resolve_impl(self.defaults["impl"], device.type))

    def _couples_coordinates(self) -> bool:
        # the kernels take the mean over other processes' shards through ``aggregate``
        return False

    def _init_state(self, p: Tensor, group: dict[str, Any]) -> dict[str, Tensor]:
        if group["state_dtype"] == torch.int8 and distributed.is_dtensor(p):
            # the codes' blocks run over the flat local coordinates, not the shards' layout
            raise NotImplementedError(
                "SimpleOptimizer: state_dtype=torch.int8 does not support DTensor parameters; "
                "use torch.float32 or torch.bfloat16")
        state = super()._init_state(p, group)
        if "z" in state:
            # the base sequence starts where the parameter is (x = y = z); a DTensor's z is a
            # DTensor of the parameter's shape and placements, so its shard is the shard's
            z = state["z"]
            z.copy_(p.detach() if distributed.is_dtensor(p) else p.detach().reshape(-1))
        return state

    def _update(self, params, grads, states, lrs, skip, aggregate=None, offsets=None) -> None:
        self._check_train_mode()
        # aggregate: the mean over other processes' shards too (l2l_optim.distributed)
        # the rms input norm's running means go to the kernel, which updates them as it reads g
        rms = None
        if self.net.input_norm is not None:
            rms = RunningRms([s["v"] for s in states], [s["c"] for s in states])
        # bfloat16 and 8-bit hidden states round stochastically, with keys from the step
        # counts (l2l_optim.rounding): a slow unit's small increments survive on average
        rounding, scales = None, None
        coded = any(s["h"].dtype == torch.int8 for s in states)
        if coded:
            scales = [s.get("h_scale") for s in states]
        if coded or (self._round_stochastically
                     and any(s["h"].dtype == torch.bfloat16 for s in states)):
            # (a shard of a sharded parameter draws the whole tensor's bits: offsets)
            rounding = rounding_keys([s["step"] for s in states], offsets, self.net.hidden_size)

        def step(targets: list[Tensor], averaged=None) -> None:
            simple_update(targets, grads, [s["h"] for s in states], lrs, self.net,
                          impl=self.defaults["impl"], skip=skip, aggregate=aggregate, rms=rms,
                          rounding=rounding, hidden_scales=scales, averaged=averaged)

        if not self.net.averaging:
            step(params)
            return
        averaged_update(params, states, self.net.averaging, skip, step)


class DMOptimizer(LearnedOptimizer):
    r"""Andrychowicz et al. (2016)'s coordinate-wise LSTM optimizer (a baseline).

    Args:
        weights: DMOptimizerNet weights in any form :class:`LearnedOptimizer` accepts
            (default: the shipped ``"dm"``).
        params, lr, nonfinite, state_dtype, weight_decay, maximize, **kwargs: as
            :class:`LearnedOptimizer`.

    Raises:
        ValueError: as :class:`LearnedOptimizer`, or weights that are not a DMOptimizerNet's.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = DMOptimizer(model.parameters())  # the shipped weights "dm"
        >>> model(torch.ones(2, 3)).pow(2).sum().backward()
        >>> opt.step()
        >>> opt.net.num_parameters(), sorted(opt.state[model.bias])
        (5301, ['c1', 'c2', 'h1', 'h2', 'step'])
    """

    _required_arch = "dm"
    _default_weights = "dm"


class RNNProp(LearnedOptimizer):
    r"""Lv et al. (2017)'s RNNProp: Adam-like inputs into a coordinate-wise LSTM (a baseline).

    Args:
        weights: RNNPropNet weights in any form :class:`LearnedOptimizer` accepts
            (default: the shipped ``"rnnprop"``).
        params, lr, nonfinite, state_dtype, weight_decay, maximize, **kwargs: as
            :class:`LearnedOptimizer`.

    Raises:
        ValueError: as :class:`LearnedOptimizer`, or weights that are not an RNNPropNet's.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = RNNProp(model.parameters())  # the shipped weights "rnnprop"
        >>> model(torch.ones(2, 3)).pow(2).sum().backward()
        >>> opt.step()
        >>> opt.net.num_parameters(), sorted(opt.state[model.bias])
        (6801, ['c1', 'c2', 'h1', 'h2', 'm', 'step', 't', 'v'])
    """

    _required_arch = "rnnprop"
    _default_weights = "rnnprop"


def optimizer_class(arch: str) -> type[LearnedOptimizer]:
    """The optimizer class of the registry's architecture ``arch``.

    Raises:
        ValueError: an unknown architecture.

    Example:
        >>> optimizer_class("simple").__name__, optimizer_class("dm").__name__
        ('SimpleOptimizer', 'DMOptimizer')
    """
    name = get_architecture(arch).optimizer_name
    return {cls.__name__: cls for cls in (SimpleOptimizer, DMOptimizer, RNNProp)}[name]
