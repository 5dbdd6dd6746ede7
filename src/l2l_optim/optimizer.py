"""torch.optim wrappers around the meta-trained coordinate-wise nets.

:class:`LearnedOptimizer` knows the ``torch.optim`` contract (parameter groups, lazy state,
closures, ``state_dict``, validation) and nothing about how an update is computed: it hands
all gradients and states of a step to :func:`l2l_optim.functional.coordinatewise_update`
(the generic path) or, for :class:`SimpleOptimizer`, to
:func:`l2l_optim.functional.simple_update` and its fused kernels.

The file is longer than most in the package (about 870 lines, much of them docstrings)
because it is the one place that holds the whole ``torch.optim`` contract: options,
validation, the non-finite policy, and checkpoints; the three optimizers are thin subclasses
that only configure it.

Example:
    >>> import torch
    >>> from l2l_optim import SimpleOptimizer
    >>> model = torch.nn.Linear(4, 2)
    >>> opt = SimpleOptimizer(model.parameters())  # the shipped weights "simple"
    >>> model(torch.randn(8, 4)).pow(2).mean().backward()
    >>> opt.step()
"""

from __future__ import annotations

import contextlib
import copy
import math
import numbers
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import distributed, kernels
from .nonfinite import finite_flags
from .state import dtype_from_name, dtype_name
from .functional import RunningRms, coordinatewise_update, simple_update
from .hub import HubMixin
from .kernels._common import compute_dtype
from .nets import CoordinatewiseNet, SimpleOptimizerNet, averaged_step
from .hub import resolve_net
from .weights import LoadedWeights, WeightsError, fingerprint

__all__ = ["LearnedOptimizer", "SimpleOptimizer", "DMOptimizer", "RNNProp"]

WeightsT = str | os.PathLike | CoordinatewiseNet | LoadedWeights
_NONFINITE = ("skip", "raise")
_TORCH_DIR = os.path.dirname(torch.__file__)


def _caller_stacklevel() -> int:
    """The ``stacklevel`` that attributes a warning raised in ``_step`` to the user's call.

    torch wraps ``step`` in hook and profiling decorators whose depth varies between
    versions, so count the frames instead of hard-coding them.
    """
    level, frame = 1, sys._getframe(2)  # 0: this function, 1: its caller
    while frame is not None and (
        frame.f_code.co_filename == __file__ or frame.f_code.co_filename.startswith(_TORCH_DIR)
    ):
        frame, level = frame.f_back, level + 1
    return level + 1


def _is_real(x: Any) -> bool:
    # numbers.Real covers int, float and numpy's scalars; a bool is not a rate
    return isinstance(x, numbers.Real) and not isinstance(x, (bool, Tensor))


def _check_lr(lr: Any) -> None:
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        lr = lr.item()
    if not _is_real(lr) or not math.isfinite(lr) or lr < 0.0:
        raise ValueError(f"Invalid learning rate: {lr!r}")


def _outside_inference_mode(groups: list[dict[str, Any]]):
    """A context in which the state a step creates is made of normal tensors.

    Under ``torch.inference_mode()`` new tensors are inference tensors, which later steps
    outside it can neither update in place nor version; the step leaves inference mode for
    its own work unless the parameters themselves are inference tensors.
    """
    if torch.compiler.is_compiling():  # a graph has no inference mode to leave
        return contextlib.nullcontext()
    if torch.is_inference_mode_enabled() and not any(
        p.is_inference() for g in groups for p in g["params"]
    ):
        return torch.inference_mode(False)
    return contextlib.nullcontext()


class LearnedOptimizer(HubMixin, Optimizer):
    r"""An optimizer whose update rule is a meta-trained coordinate-wise network.

    Every step gathers the gradient of every parameter that has one, across all parameter
    groups, and runs the net once on all of them together: nets that aggregate over
    coordinates (SimpleOptimizer's mean hidden state) see every coordinate the optimizer
    steps. The update is ``theta <- theta + lr * u``, so ``lr=1.0`` applies the update as
    meta-trained and learning-rate schedulers and per-group ``lr`` scale it.

    This base class runs any :class:`~l2l_optim.nets.CoordinatewiseNet` through its plain
    ``forward`` (the generic path); :class:`SimpleOptimizer` replaces that with a fused
    kernel.

    **Options** live where torch keeps them: in ``defaults`` and every parameter group, so
    ``state_dict``, pickling and ``copy.deepcopy`` carry them. ``lr``, ``state_dtype``,
    ``weight_decay`` and ``maximize`` may differ between groups; ``nonfinite`` (and SimpleOptimizer's ``impl``) apply to the whole
    step, so a group that sets another value is refused.

    **Non-finite gradients.** With ``nonfinite="skip"`` (the default), a step in which any
    gradient holds NaN or Inf changes nothing: parameters, hidden states and step counts stay
    as they were. The check is one flag computed on the parameters' device; on CPU the step
    returns early, warns (once per call site) and increments ``skipped_steps``; on an
    accelerator the flag is handed to the update so that no host synchronisation happens,
    and ``skipped_steps`` synchronises only when it is read. With ``nonfinite="raise"``, the
    step raises :class:`FloatingPointError` naming the first bad parameter before changing
    anything (this synchronises).

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
    (from :class:`~l2l_optim.hub.HubMixin`) read and write the meta-weights with a model
    card, in a local directory or a Hugging Face Hub repo.

    **Checkpoints.** :meth:`state_dict` stamps the fingerprint of the meta-weights into every
    parameter group (``"meta_fingerprint"``), where torch's distributed checkpoint tools keep
    group options, so a dict rebuilt from ``state`` and ``param_groups`` still loads.
    :meth:`load_state_dict` refuses a state saved with other meta-weights.

    Args:
        params: iterable of parameters or of dicts defining parameter groups.
        lr: multiplier of the learned update (default: 1.0, the update as meta-trained).
        weights: the meta-weights: a shipped name, a ``.safetensors`` path, a run directory,
            an ``hf://`` address (see :func:`~l2l_optim.weights.load_weights`), a
            :class:`~l2l_optim.weights.LoadedWeights`, a
            :class:`~l2l_optim.nets.CoordinatewiseNet` or the result of ``finetune`` or
            ``meta_fit`` (deep-copied: later changes to it do not reach the optimizer).
        nonfinite: ``"skip"`` or ``"raise"``, the policy for NaN/Inf gradients (see above).
        state_dtype: dtype of the state for non-float64 parameters, ``torch.float32`` or
            ``torch.bfloat16`` (halves the state memory; computation stays float32).
        weight_decay: decoupled weight decay, as in AdamW: each step first multiplies every
            parameter by ``1 - lr * weight_decay`` (default: 0, off; not part of the paper).
        maximize: maximize the objective instead: the net sees the negated gradient
            (default: False; not part of the paper).

    Raises:
        ValueError: invalid ``lr``, ``nonfinite``, ``state_dtype``, ``weight_decay`` or
            ``maximize``; an empty parameter
            list; complex or non-floating parameters; parameters on several devices;
            weights of the wrong architecture or a weight file that fails validation.
        TypeError: ``weights`` of an unsupported type, or a parameter that is a tensor
            subclass other than DTensor.
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
    """

    #: the architecture the weights must have (None: any)
    _required_arch: str | None = None
    _state_dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16)
    #: options that apply to the whole step, not to one group
    _step_options: tuple[str, ...] = ("nonfinite",)

    def __init__(
        self,
        params,
        lr: float | Tensor = 1.0,
        *,
        weights: WeightsT,
        nonfinite: str = "skip",
        state_dtype: torch.dtype = torch.float32,
        weight_decay: float = 0.0,
        maximize: bool = False,
    ) -> None:
        self._setup(params, weights, dict(lr=lr, nonfinite=nonfinite, state_dtype=state_dtype,
                                          weight_decay=weight_decay, maximize=maximize))

    # ----------------------------------------------------------------------------- setup

    def _setup(self, params, weights: WeightsT, defaults: dict[str, Any]) -> None:
        """Validate ``defaults``, resolve the net, then build the optimizer (torch's __init__)."""
        self._check_options(defaults)
        self.net = self._resolve_net(weights)
        self._init_runtime()
        super().__init__(params, defaults)

    def _check_options(self, options: dict[str, Any]) -> None:
        _check_lr(options["lr"])
        wd = options["weight_decay"]
        if not _is_real(wd) or not math.isfinite(wd) or wd < 0.0:
            raise ValueError(f"Invalid weight_decay value: {wd!r}")
        if not isinstance(options["maximize"], bool):
            raise ValueError(f"Invalid maximize: {options['maximize']!r}; expected True or False")
        if options["nonfinite"] not in _NONFINITE:
            raise ValueError(
                f"Invalid nonfinite policy: {options['nonfinite']!r}; expected one of {_NONFINITE}"
            )
        if options["state_dtype"] not in self._state_dtypes:
            allowed = ", ".join(str(d) for d in self._state_dtypes)
            raise ValueError(
                f"Invalid state_dtype: {options['state_dtype']}; expected one of {allowed}"
            )

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

    def _init_runtime(self) -> None:
        # derived data, rebuilt after unpickling: copies of the net per (device, dtype)
        self._net_copies: dict[tuple, tuple[tuple, CoordinatewiseNet]] = {}
        self._skipped_host = 0
        self._skipped_device: Tensor | None = None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group (see :meth:`torch.optim.Optimizer.add_param_group`).

        Raises:
            ValueError: the group's ``lr`` or ``state_dtype`` is invalid, it sets a whole-step
                option (``nonfinite``, ``impl``) to another value than the optimizer's, or a
                parameter is complex, not floating point, or on another device than the
                other parameters.
            TypeError, NotImplementedError: a parameter of a kind the optimizer cannot step
                (see :mod:`l2l_optim.distributed` for what is supported).
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
            devices = {p.device for g in self.param_groups for p in g["params"]}
            for p in group["params"]:
                if torch.is_complex(p):
                    raise ValueError(
                        f"{name} does not support complex parameters "
                        f"(got one of dtype {p.dtype}); optimize torch.view_as_real(p) instead"
                    )
                if not p.is_floating_point():
                    raise ValueError(
                        f"{name} supports only floating-point parameters, got dtype {p.dtype}"
                    )
            first = sum(len(g["params"]) for g in self.param_groups[:-1])
            for i, p in enumerate(group["params"]):
                distributed.check_param(name, first + i, p)
            if len(devices) > 1:
                raise ValueError(
                    f"{name} needs all parameters on one device (the update "
                    f"aggregates over all coordinates), got {sorted(map(str, devices))}"
                )
        except (ValueError, TypeError, NotImplementedError):
            self.param_groups.pop()
            raise
        self._make_skip_counter()

    def _make_skip_counter(self) -> None:
        # the device counter of skipped steps exists before any step is traced: a compiled
        # step updates the tensors an optimizer holds but drops attributes it creates
        if self._skipped_device is None and self.param_groups and self.param_groups[0]["params"]:
            device = self.param_groups[0]["params"][0].device
            self._skipped_device = torch.zeros((), dtype=torch.int64, device=device)

    # ---------------------------------------------------------------------------- helpers

    @property
    def meta_fingerprint(self) -> str:
        """The :func:`~l2l_optim.weights.fingerprint` of the optimizer's meta-weights."""
        return fingerprint(self.net)

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for non-finite gradients (reading it synchronises on accelerators)."""
        n = self._skipped_host
        if self._skipped_device is not None:
            n += int(self._skipped_device.item())
        return n

    @staticmethod
    def _state_dtype_for(p: Tensor, group: dict[str, Any]) -> torch.dtype:
        return torch.float64 if p.dtype == torch.float64 else group["state_dtype"]

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
        dtype = self._state_dtype_for(p, group)
        if distributed.is_dtensor(p):  # the state of the local shard, as DTensors
            state = distributed.init_state(self.net, p, dtype)
        else:
            state = self.net.init_state(p.numel(), device=p.device, dtype=dtype)
        if "step" in state:
            raise RuntimeError(f"{type(self.net).__name__} uses the reserved state key 'step'")
        state["step"] = torch.zeros((), dtype=torch.int64, device=p.device)
        return state

    # ------------------------------------------------------------------------------- step

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
            FloatingPointError: a non-finite gradient with ``nonfinite="raise"``.
            NotImplementedError, TypeError: DTensor parameters in a step that
                :mod:`l2l_optim.distributed` cannot run (mixed with plain ones, on several
                meshes, with non-DTensor gradients, or with a net that couples coordinates in
                its own forward).
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
        params: list[Tensor] = []
        grads: list[Tensor] = []
        lrs: list[float | Tensor] = []
        groups: list[dict] = []
        where: list[tuple[int, int]] = []  # (index across groups, group) of each stepped param
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
        """Apply the non-finite policy: ``(go_on, skip_flag)``.

        ``go_on`` is False when the step must change nothing and the host already knows it
        (CPU); on an accelerator ``skip_flag`` is a device bool handed to the update instead.
        ``finite``: per-tensor flags computed by the caller (for sharded parameters, agreed
        on by every process), else computed here from ``grads``.
        """
        name = type(self).__name__
        bad = None  # the first non-finite gradient's index (-1: none), where a scan says
        if finite is None:
            bad = self._first_nonfinite(params, grads)
            if bad is None:
                finite = self._finite_flags(grads)
        if self.defaults["nonfinite"] == "raise":
            if bad is None and not bool(finite.all()):
                bad = int((~finite).nonzero()[0, 0])
            if bad is not None and bad >= 0:
                i, gi = where[bad]
                raise FloatingPointError(
                    f"{name}: non-finite gradient in parameter {i} (group {gi}, shape "
                    f"{tuple(params[bad].shape)}); nothing was changed"
                )
            return True, None
        # reading the flag is free on the host, but not in a compiled graph, where the
        # device-flag path below keeps the step in one graph
        if params[0].device.type == "cpu" and not torch.compiler.is_compiling():
            all_finite = bad == -1 if bad is not None else bool(finite.all())
            if all_finite:
                return True, None
            self._skipped_host += 1
            warnings.warn(
                f"{name}: non-finite gradient, step skipped (parameters and state "
                "unchanged); see skipped_steps, or pass nonfinite='raise' to stop",
                RuntimeWarning,
                stacklevel=_caller_stacklevel(),
            )
            return False, None
        skip = ~finite.all()
        if self._skipped_device is None or self._skipped_device.device != skip.device:
            if self._skipped_device is not None:
                self._skipped_host += int(self._skipped_device.item())
            self._skipped_device = torch.zeros((), dtype=torch.int64, device=skip.device)
        self._skipped_device.add_(skip)
        return True, skip

    def _first_nonfinite(self, params: list[Tensor], grads: list[Tensor]) -> int | None:
        """The index of the first non-finite gradient (-1: none) from a fast scan, or None
        where this optimizer has none (then :meth:`_finite_flags` decides)."""
        return None

    def _finite_flags(self, grads: list[Tensor]) -> Tensor:
        """Per gradient, whether it is finite, as a device bool tensor (no host sync)."""
        return finite_flags(grads)

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
            self._update(sharded.params, local_grads, given, lrs, skip, aggregate=sharded.aggregate)
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

    def _update(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        states: list[dict[str, Tensor]],
        lrs: list[float | Tensor],
        skip: Tensor | None,
        aggregate=None,
    ) -> None:
        # aggregate: unused, the nets run here average over nothing (_couples_coordinates)
        cd = compute_dtype(*(p.dtype for p in params))
        coordinatewise_update(
            self._net_for(params[0].device, cd), params, grads, states, lrs, skip=skip
        )

    # ------------------------------------------------------------------------ persistence

    def state_dict(self) -> dict[str, Any]:
        """The optimizer state (see :meth:`torch.optim.Optimizer.state_dict`).

        Every parameter group carries ``"meta_fingerprint"``, the fingerprint of the
        meta-weights the state belongs to, and its ``state_dtype`` as a name (``"float32"``),
        since torch's distributed checkpoint tools keep plain values only. The tensors are
        the live state, not copies (as in torch).

        Returns:
            ``{"state": ..., "param_groups": ...}`` as in torch, plus the two group entries
            above.
        """
        sd = super().state_dict()
        fp = self.meta_fingerprint
        for group in sd["param_groups"]:
            group["meta_fingerprint"] = fp
            # a name, not a torch.dtype: torch.distributed.checkpoint takes plain values only
            group["state_dtype"] = dtype_name(group["state_dtype"])
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by :meth:`state_dict` of an optimizer with the same weights.

        Also loads a dict rebuilt from ``{"state": ..., "param_groups": ...}`` (the
        fingerprint travels in the groups). Group options (``lr``, ``state_dtype``) come from
        the saved groups, as in torch; whole-step options (``nonfinite``, ``impl``) stay this
        optimizer's, since they say how to run, not what was learned. Each state tensor is
        cast to the dtype this optimizer keeps for its parameter (float64 for float64
        parameters, else the group's ``state_dtype``), not to the parameter's dtype as
        torch's default would (which would round a float32 hidden state of a bfloat16
        parameter to bfloat16).

        Raises:
            ValueError: the state carries no fingerprint or another one (saved with other
                meta-weights or by another optimizer), or its per-parameter state does not
                fit this optimizer's net and parameters. Nothing is changed then.

        Example:
            >>> import torch
            >>> from l2l_optim import SimpleOptimizer
            >>> from l2l_optim.nets import SimpleOptimizerNet
            >>> model = torch.nn.Linear(3, 1)
            >>> opt = SimpleOptimizer(model.parameters())
            >>> model(torch.ones(2, 3)).sum().backward()
            >>> opt.step()
            >>> saved = opt.state_dict()
            >>> SimpleOptimizer(model.parameters()).load_state_dict(saved)  # same weights: resumes
            >>> other = SimpleOptimizer(model.parameters(), weights=SimpleOptimizerNet())
            >>> other.load_state_dict(saved)  # doctest: +ELLIPSIS
            Traceback (most recent call last):
                ...
            ValueError: SimpleOptimizer.load_state_dict: ...
        """
        name = type(self).__name__
        sd = dict(state_dict)
        saved_groups = [dict(g) for g in sd.get("param_groups", [])]
        # a top-level key is where earlier versions of the package kept the fingerprint
        found = {g.pop("meta_fingerprint") for g in saved_groups if "meta_fingerprint" in g}
        if "meta_fingerprint" in sd:
            found.add(sd.pop("meta_fingerprint"))
        sd["param_groups"] = saved_groups
        mine = self.meta_fingerprint
        if not found:
            raise ValueError(
                f"{name}.load_state_dict: the state_dict has no 'meta_fingerprint'; it was not "
                "saved by a LearnedOptimizer"
            )
        if found != {mine}:
            other = sorted(found - {mine})[0]
            raise ValueError(
                f"{name}.load_state_dict: the state was saved with meta-weights {other}, but "
                f"this optimizer has {mine}; create the optimizer with the same weights"
            )
        groups = self.param_groups
        same_layout = len(groups) == len(saved_groups) and all(
            len(g["params"]) == len(s["params"]) for g, s in zip(groups, saved_groups)
        )
        if not same_layout:
            super().load_state_dict(sd)  # raises torch's usual message
            return
        for g in saved_groups:
            for key, value in self.defaults.items():
                g[key] = self.defaults[key] if key in self._step_options else g.get(key, value)
            g["state_dtype"] = dtype_from_name(g["state_dtype"])
            self._check_options(g)
        saved_of = {}
        for g in saved_groups:
            for pid in g["params"]:
                saved_of[pid] = g
        id_map = dict(
            zip(
                (i for s in saved_groups for i in s["params"]),
                (p for g in groups for p in g["params"]),
            )
        )
        saved_state = sd.get("state", {})
        flat_shapes, state_dtypes = {}, {}
        for pid, value in saved_state.items():
            p = id_map.get(pid)
            if p is None:
                raise ValueError(f"{name}.load_state_dict: state for unknown parameter id {pid}")
            expected = self.net.init_state(p.numel(), device="meta",
                                           dtype=self._state_dtype_for(p, saved_of[pid]))
            flat_shapes[pid] = {k: t.shape for k, t in expected.items()}
            state_dtypes[pid] = {k: t.dtype for k, t in expected.items()}
            want = set(expected) | {"step"}
            if not isinstance(value, dict) or set(value) != want:
                got = sorted(value) if isinstance(value, dict) else type(value).__name__
                raise ValueError(
                    f"{name}.load_state_dict: parameter {pid} has state keys {got}, "
                    f"expected {sorted(want)}"
                )
            for k, t in expected.items():
                # (a full state dict of sharded parameters has (*lead, *p.shape) tensors)
                distributed.check_state(value[k], p, t.shape,
                                        f"{name}.load_state_dict: parameter {pid} state {k!r}")
        super().load_state_dict(sd)
        for pid, value in saved_state.items():
            p = id_map[pid]
            state = self.state[p]
            for k, t in value.items():
                if not isinstance(t, Tensor):  # a plain-number step count
                    t = torch.tensor(t)
                # (the net's own choice per key: e.g. a running mean of squares stays float32)
                dtype = torch.int64 if k == "step" else state_dtypes[pid][k]
                state[k] = t.to(
                    device=p.device, dtype=dtype, memory_format=torch.contiguous_format, copy=True
                )
                if k != "step":  # the layout kept for p (flat, or DTensor for a DTensor p)
                    state[k] = distributed.place_state(state[k], p, flat_shapes[pid][k])

    # torch's Optimizer pickles defaults, state and param_groups; the net is not an option
    # but the update rule itself, so it travels beside them (with the skipped-step count)
    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["net"] = self.net
        state["skipped_steps"] = self.skipped_steps
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # torch's load_state_dict also calls this, with state and param_groups only
        unpickling = "net" in state
        net = state.pop("net", None)
        skipped = state.pop("skipped_steps", 0)
        super().__setstate__(state)
        if unpickling:
            self.net = net
            self._init_runtime()
            self._skipped_host = skipped
            self._make_skip_counter()

    def __repr__(self) -> str:
        head = super().__repr__()
        return head.replace(" (", f" (meta-weights: {self.net.arch} {self.meta_fingerprint}", 1)


class SimpleOptimizer(LearnedOptimizer):
    r"""The paper's 132-parameter SimpleOptimizer, run by a fused update kernel.

    Per coordinate ``i`` with gradient ``g_i`` and hidden state ``h_i``:
    ``h_i' = tanh(W_ih g_i + W_hh h_i)``, ``u_i = w_a . h_i' + w_b . mean_j h_j'``,
    ``theta_i <- theta_i + lr * u_i``, where the mean runs over every coordinate of every
    parameter stepped (all groups). :func:`l2l_optim.functional.simple_update` folds the net's
    weights (cached per device and dtype) and runs the kernel chosen by ``impl``.
    Everything else (groups, NaN policy, state, ``state_dict``) is as in
    :class:`LearnedOptimizer`.

    Args:
        params: iterable of parameters or of dicts defining parameter groups.
        lr: multiplier of the learned update (default: 1.0, as meta-trained).
        weights: a SimpleOptimizerNet's weights in any form :class:`LearnedOptimizer`
            accepts (default: the shipped ``"simple"``).
        impl: ``"auto"``, ``"reference"``, ``"cpu"`` or ``"triton"``, the kernel path
            (see :mod:`l2l_optim.kernels`).
        state_dtype: ``torch.float32`` or ``torch.bfloat16`` hidden state for non-float64
            parameters.
        nonfinite: ``"skip"`` or ``"raise"``.
        weight_decay: decoupled (AdamW-style) weight decay, off by default.
        maximize: step along the gradient instead of against it (default: False).

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
    """

    _required_arch = SimpleOptimizerNet.arch
    _step_options = LearnedOptimizer._step_options + ("impl",)

    def __init__(
        self,
        params,
        lr: float | Tensor = 1.0,
        *,
        weights: WeightsT = "simple",
        impl: str = "auto",
        state_dtype: torch.dtype = torch.float32,
        nonfinite: str = "skip",
        weight_decay: float = 0.0,
        maximize: bool = False,
    ) -> None:
        defaults = dict(lr=lr, nonfinite=nonfinite, state_dtype=state_dtype, impl=impl,
                        weight_decay=weight_decay, maximize=maximize)
        self._setup(params, weights, defaults)
        # fail now, not at the first step, when the kernel cannot run on these parameters
        device = self.param_groups[0]["params"][0].device
        kernels.get_kernel(kernels.resolve_impl(impl, device.type))

    def _check_options(self, options: dict[str, Any]) -> None:
        # the name first: availability depends on the parameters' device, checked in __init__
        if options["impl"] not in kernels.IMPLS:
            raise ValueError(f"Invalid impl: {options['impl']!r}; expected one of {kernels.IMPLS}")
        super()._check_options(options)

    def _first_nonfinite(self, params, grads) -> int | None:
        # on the fused CPU path the kernel's library scans the gradients at memory speed
        # (a max-norm per tensor costs a quarter of a step); compiled steps keep the
        # device-flag path, which traces
        if params[0].device.type != "cpu" or torch.compiler.is_compiling():
            return None
        if kernels.resolve_impl(self.defaults["impl"], "cpu") != "cpu":
            return None
        from .kernels import cpu

        return cpu.first_nonfinite(grads)

    def _finite_flags(self, grads) -> Tensor:
        # on the Triton path one read of the gradients in a Triton kernel (bit test of the
        # exponent) gives the flags on the device; compiled steps keep the traceable max-norm
        device, impl = grads[0].device.type, self.defaults["impl"]
        # (on CPU only an explicit impl='triton', i.e. Triton's interpreter, gets there)
        if ((device != "cpu" or impl == "triton") and not torch.compiler.is_compiling()
                and kernels.resolve_impl(impl, device) == "triton"):
            from .kernels import triton as triton_kernels

            return triton_kernels.finite_flags_triton(grads)
        return super()._finite_flags(grads)

    def _couples_coordinates(self) -> bool:
        # the kernels take the mean over other processes' shards through ``aggregate``
        return False

    def _init_state(self, p: Tensor, group: dict[str, Any]) -> dict[str, Tensor]:
        state = super()._init_state(p, group)
        if "z" in state:
            if distributed.is_dtensor(p):
                raise NotImplementedError(
                    "SimpleOptimizer: weights with averaging do not support DTensor parameters")
            # the base sequence starts where the parameter is (x = y = z)
            state["z"].copy_(p.detach().reshape(-1))
        return state

    def _update(self, params, grads, states, lrs, skip, aggregate=None) -> None:
        # aggregate: the mean over other processes' shards too (l2l_optim.distributed)
        # the rms input norm's running means go to the kernel, which updates them as it reads g
        rms = None
        if self.net.input_norm is not None:
            rms = RunningRms([s["v"] for s in states], [s["c"] for s in states])

        def step(targets: list[Tensor]) -> None:
            simple_update(targets, grads, [s["h"] for s in states], lrs, self.net,
                          impl=self.defaults["impl"], skip=skip, aggregate=aggregate, rms=rms)

        if not self.net.averaging:
            step(params)
            return
        # Schedule-Free averaging: the rule moves z, the parameters hold the interpolation
        # point y; a skipped step must change neither (the host reads the device flag here)
        if skip is not None and bool(skip):
            return
        zs = [s["z"].view(p.shape) for s, p in zip(states, params)]
        # c = 1 / t from each parameter's own step count (all equal in the usual case)
        cs = [1.0 / (int(s["step"]) + 1) for s in states]
        if all(p.dtype == z.dtype for p, z in zip(params, zs)) and len(set(cs)) == 1:
            averaged_step(params, zs, cs[0], self.net.averaging, lambda: step(zs))
            return
        # mixed step counts or parameter dtypes: y in z's precision, one parameter at a time
        ys = [p.detach().to(z.dtype, copy=True) for p, z in zip(params, zs)]
        b = self.net.averaging
        for y, z, c in zip(ys, zs, cs):
            y.mul_(1.0 - c).add_(z, alpha=c - (1.0 - b * (1.0 - c)))
        step(zs)
        for p, y, z, c in zip(params, ys, zs, cs):
            p.copy_(y.add_(z, alpha=1.0 - b * (1.0 - c)))


class DMOptimizer(LearnedOptimizer):
    r"""Andrychowicz et al. (2016)'s coordinate-wise LSTM optimizer (a baseline).

    Args:
        params: iterable of parameters or of dicts defining parameter groups.
        lr: multiplier of the learned update (default: 1.0, as meta-trained).
        weights: DMOptimizerNet weights in any form :class:`LearnedOptimizer` accepts
            (default: the shipped ``"dm"``).
        nonfinite: ``"skip"`` or ``"raise"``.
        weight_decay: decoupled (AdamW-style) weight decay, off by default.
        maximize: step along the gradient instead of against it (default: False).

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

    def __init__(
        self,
        params,
        lr: float | Tensor = 1.0,
        *,
        weights: WeightsT = "dm",
        nonfinite: str = "skip",
        weight_decay: float = 0.0,
        maximize: bool = False,
    ) -> None:
        super().__init__(params, lr, weights=weights, nonfinite=nonfinite,
                         weight_decay=weight_decay, maximize=maximize)


class RNNProp(LearnedOptimizer):
    r"""Lv et al. (2017)'s RNNProp: Adam-like inputs into a coordinate-wise LSTM (a baseline).

    Args:
        params: iterable of parameters or of dicts defining parameter groups.
        lr: multiplier of the learned update (default: 1.0, as meta-trained).
        weights: RNNPropNet weights in any form :class:`LearnedOptimizer` accepts
            (default: the shipped ``"rnnprop"``).
        nonfinite: ``"skip"`` or ``"raise"``.
        weight_decay: decoupled (AdamW-style) weight decay, off by default.
        maximize: step along the gradient instead of against it (default: False).

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

    def __init__(
        self,
        params,
        lr: float | Tensor = 1.0,
        *,
        weights: WeightsT = "rnnprop",
        nonfinite: str = "skip",
        weight_decay: float = 0.0,
        maximize: bool = False,
    ) -> None:
        super().__init__(params, lr, weights=weights, nonfinite=nonfinite,
                         weight_decay=weight_decay, maximize=maximize)
