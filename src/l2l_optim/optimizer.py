"""torch.optim wrappers around the meta-trained coordinate-wise nets.

:class:`LearnedOptimizer` knows the ``torch.optim`` contract (parameter groups, lazy state,
closures, ``state_dict``, validation) and nothing about how an update is computed: it hands
all gradients and states of a step to the net (the generic path) or, for
:class:`SimpleOptimizer`, to a fused kernel from :mod:`l2l_optim.kernels`.

Example:
    >>> import torch
    >>> from l2l_optim import SimpleOptimizer
    >>> model = torch.nn.Linear(4, 2)
    >>> opt = SimpleOptimizer(model.parameters())  # doctest: +SKIP
    >>> model(torch.randn(8, 4)).pow(2).mean().backward()
    >>> opt.step()  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import math
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import kernels
from .nets import CoordinatewiseNet, SimpleOptimizerNet, SimpleWeights
from .registry import ARCHITECTURES, build_net
from .weights import LoadedWeights, WeightsError, fingerprint, resolve_net

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


def _check_lr(lr: Any) -> None:
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        lr = lr.item()
    if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0.0:
        raise ValueError(f"Invalid learning rate: {lr}")


class LearnedOptimizer(Optimizer):
    r"""An optimizer whose update rule is a meta-trained coordinate-wise network.

    Every step gathers the gradient of every parameter that has one, across all parameter
    groups, and runs the net once on all of them together: nets that aggregate over
    coordinates (SimpleOptimizer's mean hidden state) see every coordinate the optimizer
    steps. The update is ``theta <- theta + lr * u``, so ``lr=1.0`` applies the update as
    meta-trained and learning-rate schedulers and per-group ``lr`` scale it.

    This base class runs any :class:`~l2l_optim.nets.CoordinatewiseNet` through its plain
    ``forward`` (the generic path); :class:`SimpleOptimizer` replaces that with a fused
    kernel.

    **Non-finite gradients.** With ``nonfinite="skip"`` (the default), a step in which any
    gradient holds NaN or Inf changes nothing: parameters, hidden states and step counts stay
    as they were. The check is one flag computed on the parameters' device; on CPU the step
    returns early, warns (once per call site) and increments ``skipped_steps``; on an
    accelerator the flag is handed to the update so that no host synchronisation happens,
    and ``skipped_steps`` synchronises only when it is read. With ``nonfinite="raise"``, the
    step raises :class:`FloatingPointError` naming the first bad parameter before changing
    anything (this synchronises).

    **State.** Per parameter, created at its first step: the net's state tensors for
    ``p.numel()`` coordinates (coordinate last) and ``step``, the number of updates applied
    (an int64 tensor on the parameter's device). The state is float64 for float64
    parameters and ``state_dtype`` otherwise; float16 and bfloat16 parameters are computed in
    float32. :meth:`state_dict` records the fingerprint of the meta-weights, and
    :meth:`load_state_dict` refuses a state saved with other weights.

    Args:
        params: iterable of parameters or of dicts defining parameter groups.
        lr: multiplier of the learned update (default: 1.0, the update as meta-trained).
        weights: the meta-weights: a shipped name, a ``.safetensors`` path, a run directory,
            an ``hf://`` address (see :func:`~l2l_optim.weights.load_weights`), a
            :class:`~l2l_optim.weights.LoadedWeights`, or a
            :class:`~l2l_optim.nets.CoordinatewiseNet` (deep-copied: later changes to it do
            not reach the optimizer).
        nonfinite: ``"skip"`` or ``"raise"``, the policy for NaN/Inf gradients (see above).
        state_dtype: dtype of the state for non-float64 parameters, ``torch.float32`` or
            ``torch.bfloat16`` (halves the state memory; computation stays float32).

    Raises:
        ValueError: invalid ``lr``, ``nonfinite`` or ``state_dtype``; an empty parameter
            list; complex or non-floating parameters; parameters on several devices;
            weights of the wrong architecture or a weight file that fails validation.
        TypeError: ``weights`` of an unsupported type.

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
    # plain attributes that pickle/deepcopy must carry (torch's __getstate__ drops extras)
    _pickled_options: tuple[str, ...] = ("nonfinite", "state_dtype")

    def __init__(
        self,
        params,
        lr: float | Tensor = 1.0,
        *,
        weights: WeightsT,
        nonfinite: str = "skip",
        state_dtype: torch.dtype = torch.float32,
    ) -> None:
        _check_lr(lr)
        if nonfinite not in _NONFINITE:
            raise ValueError(
                f"Invalid nonfinite policy: {nonfinite!r}; expected one of {_NONFINITE}"
            )
        if state_dtype not in self._state_dtypes:
            allowed = ", ".join(str(d) for d in self._state_dtypes)
            raise ValueError(f"Invalid state_dtype: {state_dtype}; expected one of {allowed}")
        self.nonfinite = nonfinite
        self.state_dtype = state_dtype
        self.net = self._resolve_net(weights)
        self._init_runtime()
        super().__init__(params, {"lr": lr})

    # ----------------------------------------------------------------------------- setup

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
        # derived data, rebuilt after unpickling: nets/weights per (device, dtype)
        self._cache: dict[tuple, tuple[tuple, Any]] = {}
        self._skipped_host = 0
        self._skipped_device: Tensor | None = None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group (see :meth:`torch.optim.Optimizer.add_param_group`).

        Raises:
            ValueError: the group's ``lr`` is invalid, a parameter is complex or not
                floating point, or it lives on another device than the other parameters.
        """
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            _check_lr(group["lr"])
            devices = {p.device for g in self.param_groups for p in g["params"]}
            for p in group["params"]:
                if torch.is_complex(p):
                    raise ValueError(
                        f"{type(self).__name__} does not support complex parameters "
                        f"(got one of dtype {p.dtype}); optimize torch.view_as_real(p) instead"
                    )
                if not p.is_floating_point():
                    raise ValueError(
                        f"{type(self).__name__} supports only floating-point parameters, "
                        f"got dtype {p.dtype}"
                    )
            if len(devices) > 1:
                raise ValueError(
                    f"{type(self).__name__} needs all parameters on one device (the update "
                    f"aggregates over all coordinates), got {sorted(map(str, devices))}"
                )
        except ValueError:
            self.param_groups.pop()
            raise

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

    def _state_dtype_for(self, p: Tensor) -> torch.dtype:
        return torch.float64 if p.dtype == torch.float64 else self.state_dtype

    @staticmethod
    def _compute_dtype(params: list[Tensor]) -> torch.dtype:
        return torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32

    def _net_version(self) -> tuple:
        # in-place edits of the net (e.g. fine-tuning it) bump the parameters' versions,
        # which invalidates the derived copies below
        return (id(self.net),) + tuple(p._version for p in self.net.parameters())

    def _cached(self, key: tuple, make: Callable[[], Any]) -> Any:
        version = self._net_version()
        hit = self._cache.get(key)
        if hit is None or hit[0] != version:
            hit = (version, make())
            self._cache[key] = hit
        return hit[1]

    def _net_for(self, device: torch.device, dtype: torch.dtype) -> CoordinatewiseNet:
        ref = next(self.net.parameters(), None)
        if ref is None or (ref.device == device and ref.dtype == dtype):
            return self.net
        return self._cached(
            ("net", device, dtype), lambda: copy.deepcopy(self.net).to(device=device, dtype=dtype)
        )

    def _sync_on(self, device: torch.device) -> bool:
        """Whether the non-finite check may read its flag on the host (free on CPU)."""
        return device.type == "cpu"

    def _init_state(self, p: Tensor) -> dict[str, Tensor]:
        state = self.net.init_state(p.numel(), device=p.device, dtype=self._state_dtype_for(p))
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
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            self._step()
        return loss

    def _step(self) -> None:
        name = type(self).__name__
        params: list[Tensor] = []
        grads: list[Tensor] = []
        lrs: list[float | Tensor] = []
        where: list[tuple[int, int]] = []  # (index across groups, group) of each stepped param
        index = 0
        for gi, group in enumerate(self.param_groups):
            lr = group["lr"]
            # a tensor lr stays a tensor: .item() on a CUDA tensor would sync the host every step
            lr = lr.detach().reshape(()) if isinstance(lr, Tensor) else float(lr)
            for p in group["params"]:
                if p.grad is not None:
                    g = p.grad
                    if g.is_sparse or g.layout != torch.strided:
                        raise RuntimeError(f"{name} does not support sparse gradients")
                    if torch.is_complex(g):
                        raise ValueError(f"{name} does not support complex gradients")
                    params.append(p)
                    grads.append(g)
                    lrs.append(lr)
                    where.append((index, gi))
                index += 1
        if not params:
            return
        device = params[0].device
        for p in params:
            if p.device != device:
                raise RuntimeError(
                    f"{name} needs all parameters on one device (the update aggregates over "
                    f"all coordinates), got {p.device} and {device}"
                )

        # one fused max-abs per tensor (NaN and Inf survive it) instead of a full isfinite()
        # pass and a reduction per tensor: the check was 20-60% of a fused step
        finite = torch.stack(torch._foreach_norm(grads, float("inf"))).isfinite()
        skip: Tensor | None = None
        if self.nonfinite == "raise":
            if not bool(finite.all()):
                bad = int((~finite).nonzero()[0, 0])
                i, gi = where[bad]
                raise FloatingPointError(
                    f"{name}: non-finite gradient in parameter {i} (group {gi}, shape "
                    f"{tuple(params[bad].shape)}); nothing was changed"
                )
        elif self._sync_on(device):
            if not bool(finite.all()):
                self._skipped_host += 1
                warnings.warn(
                    f"{name}: non-finite gradient, step skipped (parameters and state "
                    "unchanged); see skipped_steps, or pass nonfinite='raise' to stop",
                    RuntimeWarning,
                    stacklevel=_caller_stacklevel(),
                )
                return
        else:
            skip = ~finite.all()
            if self._skipped_device is None or self._skipped_device.device != skip.device:
                if self._skipped_device is not None:
                    self._skipped_host += int(self._skipped_device.item())
                self._skipped_device = torch.zeros((), dtype=torch.int64, device=skip.device)
            self._skipped_device.add_(skip)

        states = []
        for p in params:
            state = self.state[p]
            if not state:
                state.update(self._init_state(p))
            states.append(state)

        self._update(params, grads, states, lrs, skip)

        steps = [s["step"] for s in states]
        if skip is None:
            torch._foreach_add_(steps, 1)
        else:
            torch._foreach_add_(steps, (~skip).to(torch.int64))

    def _update(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        states: list[dict[str, Tensor]],
        lrs: list[float | Tensor],
        skip: Tensor | None,
    ) -> None:
        """Generic path: the net over all coordinates at once, or per parameter.

        A net that couples coordinates (the mean aggregation) sees them all in one call. A net
        whose coordinates are independent runs once per parameter, which gives the same
        result without concatenating and splitting every state tensor (a third of an LSTM
        step on the base MLP).
        """
        cd = self._compute_dtype(params)
        net = self._net_for(params[0].device, cd)
        if net.independent_coordinates and len(params) > 1:
            for i in range(len(params)):
                self._update_batch(net, cd, params[i : i + 1], grads[i : i + 1], states[i : i + 1], lrs[i : i + 1],
                                   skip)
        else:
            self._update_batch(net, cd, params, grads, states, lrs, skip)

    @staticmethod
    def _update_batch(
        net: CoordinatewiseNet,
        cd: torch.dtype,
        params: list[Tensor],
        grads: list[Tensor],
        states: list[dict[str, Tensor]],
        lrs: list[float | Tensor],
        skip: Tensor | None,
    ) -> None:
        keys = [k for k in states[0] if k != "step"]
        sizes = [p.numel() for p in params]
        if len(params) == 1:
            g = grads[0].reshape(-1).to(cd)
            old = {k: states[0][k].to(cd) for k in keys}
        else:
            g = torch.cat([gr.reshape(-1).to(cd) for gr in grads])
            old = {k: torch.cat([s[k].to(cd) for s in states], dim=-1) for k in keys}
        update, new = net(g, old)
        if skip is not None:
            # keep NaN/Inf out of the state without reading the flag on the host
            new = {k: torch.where(skip, old[k], new[k]) for k in keys}
        for k in keys:
            if len(params) == 1 and new[k].dtype == states[0][k].dtype and new[k].shape == states[0][k].shape:
                states[0][k] = new[k]  # a fresh tensor from the net: no copy needed
                continue
            for s, part in zip(states, new[k].split(sizes, dim=-1)):
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

    # ------------------------------------------------------------------------ persistence

    def state_dict(self) -> dict[str, Any]:
        """The optimizer state (see :meth:`torch.optim.Optimizer.state_dict`).

        Adds ``"meta_fingerprint"``, the fingerprint of the meta-weights the state belongs
        to. The tensors are the live state, not copies (as in torch).
        """
        sd = super().state_dict()
        sd["meta_fingerprint"] = self.meta_fingerprint
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by :meth:`state_dict` of an optimizer with the same weights.

        The state keeps its saved precision (torch's default would cast it to each
        parameter's dtype, losing float32 hidden states of bfloat16 parameters).

        Raises:
            ValueError: the state was saved with other meta-weights or by another
                optimizer, or its per-parameter state does not fit this optimizer's net
                and parameters. Nothing is changed then.
        """
        name = type(self).__name__
        sd = dict(state_dict)
        saved_fp = sd.pop("meta_fingerprint", None)
        mine = self.meta_fingerprint
        if saved_fp is None:
            raise ValueError(
                f"{name}.load_state_dict: the state_dict has no 'meta_fingerprint'; it was not "
                "saved by a LearnedOptimizer"
            )
        if saved_fp != mine:
            raise ValueError(
                f"{name}.load_state_dict: the state was saved with meta-weights {saved_fp}, but "
                f"this optimizer has {mine}; create the optimizer with the same weights"
            )
        groups, saved_groups = self.param_groups, sd.get("param_groups", [])
        same_layout = len(groups) == len(saved_groups) and all(
            len(g["params"]) == len(s["params"]) for g, s in zip(groups, saved_groups)
        )
        if not same_layout:
            super().load_state_dict(sd)  # raises torch's usual message
            return
        id_map = dict(
            zip(
                (i for s in saved_groups for i in s["params"]),
                (p for g in groups for p in g["params"]),
            )
        )
        saved_state = sd.get("state", {})
        for pid, value in saved_state.items():
            p = id_map.get(pid)
            if p is None:
                raise ValueError(f"{name}.load_state_dict: state for unknown parameter id {pid}")
            expected = self.net.init_state(p.numel(), device="meta")
            want = set(expected) | {"step"}
            if not isinstance(value, dict) or set(value) != want:
                got = sorted(value) if isinstance(value, dict) else type(value).__name__
                raise ValueError(
                    f"{name}.load_state_dict: parameter {pid} has state keys {got}, "
                    f"expected {sorted(want)}"
                )
            for k, t in expected.items():
                if not isinstance(value[k], Tensor) or value[k].shape != t.shape:
                    shape = getattr(value[k], "shape", None)
                    raise ValueError(
                        f"{name}.load_state_dict: parameter {pid} state {k!r} has shape "
                        f"{shape}, expected {tuple(t.shape)}"
                    )
        super().load_state_dict(sd)
        for pid, value in saved_state.items():
            p = id_map[pid]
            state = self.state[p]
            for k, t in value.items():
                if not isinstance(t, Tensor):  # a plain-number step count
                    t = torch.tensor(t)
                dtype = torch.int64 if k == "step" else self._state_dtype_for(p)
                state[k] = t.to(
                    device=p.device, dtype=dtype, memory_format=torch.contiguous_format, copy=True
                )

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        net = self.net
        if net.arch in ARCHITECTURES and ARCHITECTURES[net.arch].net_class is type(net):
            state["_meta_net"] = {
                "arch": net.arch,
                "config": net.config,
                "state_dict": {k: v.detach().clone() for k, v in net.state_dict().items()},
            }
        else:  # a custom net class: pickle the module itself
            state["_meta_net"] = {"module": net}
        options = {k: getattr(self, k) for k in self._pickled_options}
        options["_skipped_host"] = self.skipped_steps
        state["_options"] = options
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        meta = state.pop("_meta_net", None)
        options = state.pop("_options", {})
        super().__setstate__(state)
        self._init_runtime()
        for k, v in options.items():
            setattr(self, k, v)
        if meta is not None:
            if "module" in meta:
                net = meta["module"]
            else:
                net = build_net(meta["arch"], meta["config"])
                net.load_state_dict(meta["state_dict"])
            net.eval()
            net.requires_grad_(False)
            self.net = net

    def __repr__(self) -> str:
        head = super().__repr__()
        return head.replace(" (", f" (meta-weights: {self.net.arch} {self.meta_fingerprint}", 1)


class SimpleOptimizer(LearnedOptimizer):
    r"""The paper's 132-parameter SimpleOptimizer, run by a fused update kernel.

    Per coordinate ``i`` with gradient ``g_i`` and hidden state ``h_i``:
    ``h_i' = tanh(W_ih g_i + W_hh h_i)``, ``u_i = w_a . h_i' + w_b . mean_j h_j'``,
    ``theta_i <- theta_i + lr * u_i``, where the mean runs over every coordinate of every
    parameter stepped (all groups). The net's weights are folded once per device and dtype
    (``SimpleOptimizerNet.fused_weights``) and the kernel chosen by ``impl`` does the rest.
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

    Raises:
        ValueError: as :class:`LearnedOptimizer`, an invalid ``impl``, or weights that are
            not a SimpleOptimizerNet's.
        RuntimeError: ``impl`` names a path that is not available in this build.

    Example:
        >>> import torch
        >>> from l2l_optim.nets import SimpleOptimizerNet
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = SimpleOptimizer(model.parameters(), weights=SimpleOptimizerNet())
        >>> model(torch.ones(2, 3)).pow(2).sum().backward()
        >>> opt.step()
    """

    _required_arch = SimpleOptimizerNet.arch
    _pickled_options = LearnedOptimizer._pickled_options + ("impl",)

    def __init__(
        self,
        params,
        lr: float | Tensor = 1.0,
        *,
        weights: WeightsT = "simple",
        impl: str = "auto",
        state_dtype: torch.dtype = torch.float32,
        nonfinite: str = "skip",
    ) -> None:
        # validate the name before loading anything; availability on the parameters' device
        # is checked below (resolving for "cpu" here would reject impl="triton" on CUDA)
        if impl not in kernels.IMPLS:
            raise ValueError(f"Invalid impl: {impl!r}; expected one of {kernels.IMPLS}")
        self.impl = impl
        super().__init__(
            params, lr, weights=weights, nonfinite=nonfinite, state_dtype=state_dtype
        )
        if not isinstance(self.net, SimpleOptimizerNet):
            raise ValueError(
                f"SimpleOptimizer needs SimpleOptimizerNet weights, got {type(self.net).__name__}"
            )
        device = self.param_groups[0]["params"][0].device
        kernels.get_kernel(kernels.resolve_impl(impl, device.type))

    def _fused_weights(self, device: torch.device, dtype: torch.dtype) -> SimpleWeights:
        # fold from a copy already in `dtype`: fused_weights multiplies alpha * w_out in the
        # net's own dtype, and a float32 product would cost float64 parameters ~1e-8
        net = self._net_for(device, dtype)
        assert isinstance(net, SimpleOptimizerNet)
        return self._cached(
            ("fused", device, dtype), lambda: net.fused_weights(dtype=dtype, device=device)
        )

    def _update(self, params, grads, states, lrs, skip) -> None:
        device = params[0].device
        kernel = kernels.get_kernel(kernels.resolve_impl(self.impl, device.type))
        weights = self._fused_weights(device, self._compute_dtype(params))
        kernel(params, grads, [s["h"] for s in states], lrs, weights, skip)


class DMOptimizer(LearnedOptimizer):
    r"""Andrychowicz et al. (2016)'s coordinate-wise LSTM optimizer (a baseline).

    Args:
        params: iterable of parameters or of dicts defining parameter groups.
        lr: multiplier of the learned update (default: 1.0, as meta-trained).
        weights: DMOptimizerNet weights in any form :class:`LearnedOptimizer` accepts
            (default: the shipped ``"dm"``).
        nonfinite: ``"skip"`` or ``"raise"``.

    Raises:
        ValueError: as :class:`LearnedOptimizer`, or weights that are not a DMOptimizerNet's.

    Example:
        >>> import torch
        >>> from l2l_optim.nets import DMOptimizerNet
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = DMOptimizer(model.parameters(), weights=DMOptimizerNet())
    """

    _required_arch = "dm"

    def __init__(
        self, params, lr: float | Tensor = 1.0, *, weights: WeightsT = "dm", nonfinite: str = "skip"
    ) -> None:
        super().__init__(params, lr, weights=weights, nonfinite=nonfinite)


class RNNProp(LearnedOptimizer):
    r"""Lv et al. (2017)'s RNNProp: Adam-like inputs into a coordinate-wise LSTM (a baseline).

    Args:
        params: iterable of parameters or of dicts defining parameter groups.
        lr: multiplier of the learned update (default: 1.0, as meta-trained).
        weights: RNNPropNet weights in any form :class:`LearnedOptimizer` accepts
            (default: the shipped ``"rnnprop"``).
        nonfinite: ``"skip"`` or ``"raise"``.

    Raises:
        ValueError: as :class:`LearnedOptimizer`, or weights that are not an RNNPropNet's.

    Example:
        >>> import torch
        >>> from l2l_optim.nets import RNNPropNet
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = RNNProp(model.parameters(), weights=RNNPropNet())
    """

    _required_arch = "rnnprop"

    def __init__(
        self,
        params,
        lr: float | Tensor = 1.0,
        *,
        weights: WeightsT = "rnnprop",
        nonfinite: str = "skip",
    ) -> None:
        super().__init__(params, lr, weights=weights, nonfinite=nonfinite)
