"""The ``torch.optim`` contract around a meta-trained coordinate-wise net.

:class:`LearnedOptimizer` knows parameter groups, lazy state, closures and validation, and
nothing about how an update is computed: it hands all gradients and states of a step to
:meth:`LearnedOptimizer._update`, which runs the net's plain ``forward`` through
:func:`l2l_optim.functional.coordinatewise_update`; :mod:`l2l_optim.optimizer`'s subclasses
run fused kernels instead. Options and parameters are checked in :mod:`l2l_optim.validation`,
the non-finite policy is :class:`l2l_optim.nonfinite.NonfiniteGuard`, and the ``state_dict``
hooks are :class:`l2l_optim.checkpointing.Checkpointing`, with pickling.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import distributed, kernels
from .checkpointing import Checkpointing
from .functional import coordinatewise_update
from .hub import HubMixin, resolve_net
from .kernels._common import compute_dtype
from .nets import CoordinatewiseNet
from .nonfinite import NonfiniteGuard
from .validation import check_group, check_params, own_options, warn_small_lr, warn_strong_decay
from .weights import LoadedWeights, WeightsError, fingerprint

__all__ = ["LearnedOptimizer", "WeightsT"]

WeightsT = str | os.PathLike | CoordinatewiseNet | LoadedWeights


def _outside_inference_mode(groups: list[dict[str, Any]]):
    """Outside ``torch.inference_mode()`` unless the parameters are inference tensors: state
    a step creates there could be neither updated in place nor versioned by later steps."""
    if torch.compiler.is_compiling():  # a graph has no inference mode to leave
        return contextlib.nullcontext()
    if torch.is_inference_mode_enabled() and not any(
        p.is_inference() for g in groups for p in g["params"]
    ):
        return torch.inference_mode(False)
    return contextlib.nullcontext()


class LearnedOptimizer(HubMixin, Checkpointing, Optimizer):
    r"""An optimizer whose update rule is a meta-trained coordinate-wise network.

    Every step gathers the gradient of every parameter that has one, across all parameter
    groups, and runs the net once on all of them together: nets that aggregate over
    coordinates (SimpleOptimizer's mean hidden state) see every coordinate the optimizer
    steps. The update is ``theta <- theta + lr * u``, so ``lr=1.0`` applies the update as
    meta-trained and learning-rate schedulers and per-group ``lr`` scale it. A float ``lr``
    below 0.05 (Adam's 1e-3, say) warns once per optimizer.

    This base class runs any :class:`~l2l_optim.nets.CoordinatewiseNet` through its plain
    ``forward`` (the generic path); :class:`~l2l_optim.optimizer.SimpleOptimizer` runs a
    fused kernel instead.

    **Options** live where torch keeps them: in ``defaults`` and every parameter group, so
    ``state_dict``, pickling and ``copy.deepcopy`` carry them. ``lr``, ``nonfinite``,
    ``state_dtype``, ``weight_decay`` and ``maximize`` may differ between groups;
    SimpleOptimizer's ``impl`` applies to the whole step (one kernel call), so a group that
    sets another value is refused. Every group also holds ``momentum`` (0.0), which nothing
    reads: it is there for schedulers that cycle momentum (``OneCycleLR`` and ``CyclicLR``
    with their default ``cycle_momentum=True``), whose learning rates then apply as usual.

    **Non-finite gradients.** A NaN or Inf in any gradient stops the whole step (the update
    spans every group); the group holding the first one (in the order of the groups and
    their parameters) decides how. ``nonfinite="skip"`` (the default): nothing changes, not
    even step counts; on CPU the step warns (once per call site) and counts in
    ``skipped_steps``; on an accelerator, when every group skips, the check stays a device
    flag that the update reads (no host synchronisation; reading ``skipped_steps`` syncs).
    ``"raise"``: a :class:`FloatingPointError` naming the parameter, before anything changes.

    **torch.compile.** ``torch.compile(opt.step, fullgraph=True)`` traces one graph with
    ``nonfinite="skip"``: inside it a CPU step takes the device-flag path too (no warning;
    ``skipped_steps`` counts), and the fused kernel is one opaque op. ``nonfinite="raise"``
    reads the flag on the host, which breaks the graph once.

    **State.** Per parameter, created at its first step: the net's state tensors for
    ``p.numel()`` coordinates (coordinate last) and ``step``, the number of updates applied
    (an int64 tensor on the parameter's device). The state is float64 for float64
    parameters and the group's ``state_dtype`` otherwise; float16 and bfloat16 parameters
    are computed in float32. For a DTensor parameter (FSDP2) the state tensors are DTensors
    sharded like it (see :mod:`l2l_optim.distributed`).

    **The Hub.** :meth:`from_pretrained`, :meth:`save_pretrained` and :meth:`push_to_hub`
    (:class:`~l2l_optim.hub.HubMixin`) read and write the meta-weights with a model card.

    **Checkpoints.** ``state_dict`` and ``load_state_dict`` are torch's, with the hooks of
    :mod:`l2l_optim.checkpointing`: every saved group carries the meta-weights' fingerprint
    (``"meta_fingerprint"``); a state saved with other weights, or one that does not fit the
    net and the parameters, is refused with a ValueError before anything changes; the state
    loads in the dtypes this optimizer keeps, not in the parameter's.

    Args:
        params: iterable of parameters or of dicts defining parameter groups.
        lr: multiplier of the learned update (default: 1.0, the update as meta-trained).
        weights: the meta-weights (required here; the subclasses default to their shipped
            ones): a shipped name, a ``.safetensors`` path, a run directory, an ``hf://``
            address (:func:`~l2l_optim.weights.load_weights`), a ``LoadedWeights``, a
            :class:`~l2l_optim.nets.CoordinatewiseNet` or a ``finetune`` or ``meta_fit``
            result (deep-copied: later changes to it do not reach the optimizer).
        nonfinite: ``"skip"`` or ``"raise"``, the policy for NaN/Inf gradients (see above).
        state_dtype: dtype of the state for non-float64 parameters, ``torch.float32`` or
            ``torch.bfloat16`` (halves the state memory; computation stays float32); default:
            the class's (float32 here, bfloat16 for SimpleOptimizer).
        weight_decay: decoupled weight decay, as in AdamW: each step first multiplies every
            parameter by ``1 - lr * weight_decay`` (default: 0, off; not part of the paper).
            With lr about 1 this is the decay per step: AdamW's ``weight_decay=0.01`` at its
            lr of 1e-3 is ``weight_decay=1e-5`` here; above ``lr * weight_decay = 1e-3`` the
            optimizer warns once.
        maximize: maximize the objective instead: the net sees the negated gradient
            (default: False; not part of the paper).
        **kwargs: a subclass's own options (SimpleOptimizer's ``impl``). Another optimizer's
            option (Adam's ``betas``, ``eps``, ``amsgrad``, ``foreach``, ``fused``,
            ``capturable``, ``differentiable``; SGD's ``momentum``) raises a TypeError that
            says what applies instead.

    Raises:
        ValueError: an invalid option; an empty parameter list; complex or non-floating
            parameters, on several devices or on the meta device; weights of the wrong
            architecture or a weight file that fails validation.
        TypeError: ``weights`` missing or of an unsupported type, an unknown keyword or
            another optimizer's option, a tensor subclass other than DTensor as parameter.
        NotImplementedError: a DTensor parameter with placements other than Shard / Replicate.

    Example:
        >>> import torch
        >>> from l2l_optim.nets import DMOptimizerNet
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = LearnedOptimizer(model.parameters(), weights=DMOptimizerNet())
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = model(torch.ones(2, 3)).pow(2).sum()
        ...     loss.backward()
        ...     return loss
        >>> loss = opt.step(closure)

        A checkpoint resumes with the same weights and is refused with others:

        >>> saved = opt.state_dict()
        >>> saved["param_groups"][0]["meta_fingerprint"] == opt.meta_fingerprint
        True
        >>> LearnedOptimizer(model.parameters(), weights=opt.net).load_state_dict(saved)
        >>> other = LearnedOptimizer(model.parameters(), weights=DMOptimizerNet(hidden_size=4))
        >>> other.load_state_dict(saved)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
            ...
        ValueError: LearnedOptimizer.load_state_dict: the state was saved with meta-weights ...
    """

    #: the architecture the weights must have (None: any)
    _required_arch: str | None = None
    #: the shipped weights used when none are given (None: ``weights`` is required)
    _default_weights: str | None = None
    #: the subclass's own options and their defaults
    _own_options: dict[str, Any] = {}
    #: options that apply to the whole step, not to one group
    _step_options: tuple[str, ...] = ()
    _state_dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16)
    #: the state dtype when none is given
    _default_state_dtype: torch.dtype = torch.float32

    def __init__(
        self,
        params,
        lr: float | Tensor = 1.0,
        *,
        weights: WeightsT | None = None,
        nonfinite: str = "skip",
        state_dtype: torch.dtype | None = None,
        weight_decay: float = 0.0,
        maximize: bool = False,
        **kwargs: Any,
    ) -> None:
        name = type(self).__name__
        own = own_options(name, kwargs, self._own_options, kernels.IMPLS)
        weights = self._default_weights if weights is None else weights
        if weights is None:
            raise TypeError(f"{name}.__init__() missing 1 required keyword-only argument: 'weights'")
        if state_dtype is None:
            state_dtype = self._default_state_dtype
        defaults = dict(lr=lr, nonfinite=nonfinite, state_dtype=state_dtype,
                        weight_decay=weight_decay, maximize=maximize, momentum=0.0, **own)
        self._check_options(defaults)
        self.net = self._resolve_net(weights)
        self._init_runtime()
        super().__init__(params, defaults)
        self._register_state_dict_hooks()

    def _check_options(self, options: dict[str, Any]) -> None:
        check_group(options, self._state_dtypes)

    def _resolve_net(self, weights: WeightsT) -> CoordinatewiseNet:
        name = type(self).__name__
        try:
            net, _ = resolve_net(weights, arch=self._required_arch)
        except TypeError as e:
            raise TypeError(f"{name}: {e}") from None
        except WeightsError:
            raise
        except ValueError as e:
            raise ValueError(f"{name} {e}") from None
        net.eval()
        net.requires_grad_(False)
        return net

    def _init_runtime(self, skipped: int = 0) -> None:
        # derived data, rebuilt after unpickling: copies of the net per (device, dtype)
        self._net_copies: dict[tuple, tuple[tuple, CoordinatewiseNet]] = {}
        self._nonfinite = NonfiniteGuard(type(self).__name__, skipped)
        self._lr_warned = False
        self._decay_warned = False
        if getattr(self, "param_groups", None) and self.param_groups[0]["params"]:
            self._nonfinite.track(self.param_groups[0]["params"][0].device)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group (see :meth:`torch.optim.Optimizer.add_param_group`).

        Args:
            param_group: the group's ``params`` and its options (the optimizer's by default).

        Raises:
            ValueError, TypeError, NotImplementedError: an invalid option, a whole-step option
                (``impl``) other than the optimizer's, or parameters the optimizer cannot step
                (:func:`l2l_optim.validation.check_params`); the group is not added.
            RuntimeError: ``impl`` names a kernel not available for the parameters' device.
        """
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        name = type(self).__name__
        try:
            self._check_options(group)
            for key in self._step_options:
                if group[key] != self.defaults[key]:
                    raise ValueError(
                        f"{name}: {key!r} applies to the whole step, so every group must use the "
                        f"optimizer's {key}={self.defaults[key]!r}; got {group[key]!r}"
                    )
            check_params(name, self.param_groups)
            if group["params"]:
                self._check_device(group["params"][0].device)
        except (ValueError, TypeError, NotImplementedError, RuntimeError):
            self.param_groups.pop()
            raise
        if group["params"]:
            self._nonfinite.track(group["params"][0].device)
        # once per optimizer
        self._lr_warned = self._lr_warned or warn_small_lr(name, group["lr"])
        self._decay_warned = self._decay_warned or warn_strong_decay(name, group["lr"], group["weight_decay"])

    def _check_device(self, device: torch.device) -> None:
        """Raise unless this optimizer can step parameters on ``device``."""

    @property
    def meta_fingerprint(self) -> str:
        """The :func:`~l2l_optim.weights.fingerprint` of the optimizer's meta-weights."""
        return fingerprint(self.net)

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for non-finite gradients (reading it synchronises on accelerators)."""
        return self._nonfinite.skipped

    def _net_for(self, device: torch.device, dtype: torch.dtype) -> CoordinatewiseNet:
        """The net on ``device`` in ``dtype``: the net itself, or a copy kept until it changes."""
        ref = next(self.net.parameters(), None)
        if ref is None or (ref.device == device and ref.dtype == dtype):
            return self.net
        # in-place edits of the net (fine-tuning it) bump its parameters' versions
        version = (id(self.net),) + tuple(p._version for p in self.net.parameters())
        hit = self._net_copies.get((device, dtype))
        if hit is None or hit[0] != version:
            hit = (version, copy.deepcopy(self.net).to(device=device, dtype=dtype))
            self._net_copies[(device, dtype)] = hit
        return hit[1]

    def _init_state(self, p: Tensor, group: dict[str, Any]) -> dict[str, Tensor]:
        dtype = torch.float64 if p.dtype == torch.float64 else group["state_dtype"]
        if distributed.is_dtensor(p):  # the state of the local shard, as DTensors
            state = distributed.init_state(self.net, p, dtype)
        else:
            state = self.net.init_state(p.numel(), device=p.device, dtype=dtype)
        if "step" in state:
            raise RuntimeError(f"{type(self.net).__name__} uses the reserved state key 'step'")
        state["step"] = torch.zeros((), dtype=torch.int64, device=p.device)
        return state

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform a single optimization step.

        Args:
            closure: a closure that reevaluates the model and returns the loss; it runs
                with gradients enabled.

        Returns:
            The closure's loss, or None.

        Raises:
            RuntimeError: a sparse gradient, or parameters on several devices.
            ValueError: a complex gradient.
            FloatingPointError: a non-finite gradient first found in a group with
                ``nonfinite="raise"``.
            NotImplementedError, TypeError: DTensor parameters in a step that
                :func:`l2l_optim.distributed.prepare_step` refuses.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # grad mode off last: leaving inference mode turns it back on
        with _outside_inference_mode(self.param_groups), torch.no_grad():
            self._step()
        return loss

    def _gather(self) -> tuple[list[Tensor], list[Tensor], list[float | Tensor], list[dict], list[tuple[int, int]]]:
        """Every parameter with a gradient, its gradient, lr and group, across all groups."""
        name = type(self).__name__
        params, grads, lrs, groups = [], [], [], []
        where = []  # (index across groups, group index) of each stepped parameter
        index = 0
        for gi, group in enumerate(self.param_groups):
            lr = group["lr"]
            # a tensor lr stays a tensor: .item() on a CUDA tensor would sync the host every step
            lr = lr.detach().reshape(()) if isinstance(lr, Tensor) else float(lr)
            for p in group["params"]:
                # a parameter with no elements has nothing to update
                if p.grad is not None and p.numel() > 0:
                    g = p.grad
                    if g.is_sparse or g.layout != torch.strided:
                        raise RuntimeError(f"{name} does not support sparse gradients")
                    if g.is_complex():
                        raise ValueError(f"{name} does not support complex gradients")
                    params.append(p)
                    grads.append(g)
                    lrs.append(lr)
                    groups.append(group)
                    where.append((index, gi))
                index += 1
        if params:
            device = params[0].device
            for p in params:
                if p.device != device:
                    raise RuntimeError(
                        f"{name} needs all parameters on one device (the update aggregates over "
                        f"all coordinates), got {p.device} and {device}"
                    )
        return params, grads, lrs, groups, where

    def _check_finite(
        self, params: list[Tensor], grads: list[Tensor], where, finite: Tensor | None = None
    ) -> tuple[bool, Tensor | None]:
        """Apply the groups' non-finite policies: ``(go_on, skip_flag)``, see
        :meth:`~l2l_optim.nonfinite.NonfiniteGuard.check`."""
        policies = [self.param_groups[gi]["nonfinite"] for _, gi in where]
        return self._nonfinite.check(params, grads, policies, where,
                                     impl=self.defaults.get("impl"), finite=finite)

    def _step(self) -> None:
        params, grads, lrs, groups, where = self._gather()
        if not params:
            return
        # DTensor (FSDP2) parameters: their local shards, and the agreement between processes
        sharded = distributed.prepare_step(type(self).__name__, params, grads, where,
                                           couples_coordinates=self._couples_coordinates())
        finite = None if sharded is None else sharded.finite()
        go_on, skip = self._check_finite(params, grads, where, finite)
        if go_on:
            self._apply(params, grads, lrs, groups, skip, sharded)

    def _apply(self, params, grads, lrs, groups, skip: Tensor | None, sharded=None) -> None:
        """Create missing state, run the update (``skip``: a device flag that may veto it;
        ``sharded``: the :class:`~l2l_optim.distributed.ShardedStep` of DTensor parameters)."""
        states = []
        for p, group in zip(params, groups):
            state = self.state[p]
            if not state:
                state.update(self._init_state(p, group))
            states.append(state)
        local_params, local_grads = (params, grads) if sharded is None else (sharded.params, sharded.grads)
        if any(group["maximize"] for group in groups):
            local_grads = [g.neg() if group["maximize"] else g for g, group in zip(local_grads, groups)]
        # sharded parameters decay shard by shard, in place on their local tensors
        for p, lr, group in zip(local_params, lrs, groups):
            if group["weight_decay"]:
                # decoupled, as AdamW: shrink the parameter before the update is added
                factor = 1.0 - lr * group["weight_decay"]
                p.mul_(factor if skip is None else torch.where(skip, 1.0, factor))
        if sharded is None:
            self._update(params, local_grads, states, lrs, skip)
        else:
            views = sharded.local_states(states)
            given = [dict(v) for v in views]
            self._update(sharded.params, local_grads, given, lrs, skip, aggregate=sharded.aggregate,
                         offsets=sharded.offsets)
            sharded.write_back(views, given)
        steps = [s["step"] for s in states]
        if skip is None:
            torch._foreach_add_(steps, 1)
        else:
            # a list of tensors: a 0-dim tensor as the scalar operand is read on the host
            torch._foreach_add_(steps, [(~skip).to(torch.int64)] * len(steps))

    def _couples_coordinates(self) -> bool:
        """Whether the update averages over the coordinates it is given by itself (a net's
        forward that is not coordinate-independent), out of reach of a sharded aggregate."""
        return not self.net.independent_coordinates

    def _update(self, params: list[Tensor], grads: list[Tensor], states: list[dict[str, Tensor]],
                lrs: list[float | Tensor], skip: Tensor | None, aggregate=None,
                offsets=None) -> None:
        # aggregate: unused, the nets run here average over nothing (_couples_coordinates);
        # offsets (where sharded parameters' local shards start): unused too
        cd = compute_dtype(*(p.dtype for p in params))
        coordinatewise_update(
            self._net_for(params[0].device, cd), params, grads, states, lrs, skip=skip
        )

    def __repr__(self) -> str:
        head = super().__repr__()
        return head.replace(" (", f" (meta-weights: {self.net.arch} {self.meta_fingerprint}", 1)
