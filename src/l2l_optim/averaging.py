"""Schedule-Free iterate averaging around a learned step, in the optimizer.

With ``SimpleOptimizerNet(averaging=b)`` the rule moves a base sequence ``z`` (one state
tensor per parameter) and the parameters hold the interpolation point ``y = (1 - b) z + b x``
between ``z`` and the uniform running average ``x`` of the ``z`` values
(:func:`l2l_optim.rule.averaged_step` is the one definition of the step).
:class:`AveragingModes` gives an optimizer Schedule-Free AdamW's ``train()`` / ``eval()``;
:func:`averaged_update` runs one step around any update of ``z``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .rule import averaged_step, averaging_coefficients

__all__ = ["AveragingModes", "averaged_update"]


class AveragingModes:
    """``train()`` / ``eval()`` for an optimizer whose net has ``averaging`` (a mixin of
    :class:`~l2l_optim.optimizer.SimpleOptimizer`; the mode is kept in each param group as
    ``train_mode``, so it travels with the state dict)."""

    def train(self) -> None:
        """Put the parameters back at the point where gradients are taken (after :meth:`eval`).

        Only weights with ``averaging`` change anything: as Schedule-Free AdamW's
        ``optimizer.train()``, it moves each parameter from the average ``x`` back to the
        interpolation point ``y = (1 - b) z + b x``. Call it before training resumes.

        Example:
            >>> import torch
            >>> from l2l_optim import SimpleOptimizer
            >>> from l2l_optim.meta.init_rules import init_net
            >>> from l2l_optim.nets import SimpleOptimizerNet
            >>> rule = init_net(SimpleOptimizerNet(input_norm="rms", averaging=0.9), "schedule-free", lr=0.1)
            >>> w = torch.nn.Parameter(torch.zeros(2))
            >>> opt = SimpleOptimizer([w], weights=rule)
            >>> for _ in range(3):
            ...     opt.zero_grad(); (w - 1).pow(2).sum().backward(); opt.step()
            >>> y = w.detach().clone()
            >>> opt.eval(); x = w.detach().clone(); opt.train()
            >>> bool(torch.allclose(w, y)), bool((x < y).all())
            (True, True)
        """
        self._swap(train=True)

    def eval(self) -> None:
        """Put the parameters at the running average ``x`` (for evaluation and saving the model).

        Only weights with ``averaging`` change anything; then :meth:`step` refuses to run
        until :meth:`train` is called, as in Schedule-Free AdamW.
        """
        self._swap(train=False)

    def _swap(self, train: bool) -> None:
        b = self.net.averaging
        if not b or all(g.get("train_mode", True) == train for g in self.param_groups):
            return
        with torch.no_grad():
            for group in self.param_groups:
                if group.get("train_mode", True) == train:
                    continue
                for p in group["params"]:
                    z = self.state[p].get("z") if p in self.state else None
                    if z is not None:
                        # y = x + (1 - b)(z - x);  x = y + (1 - 1/b)(z - y)
                        p.lerp_(z.view(p.shape).to(p.dtype), (1.0 - b) if train else (1.0 - 1.0 / b))
                group["train_mode"] = train

    def _check_train_mode(self) -> None:
        if self.net.averaging and not all(g.get("train_mode", True) for g in self.param_groups):
            raise RuntimeError("SimpleOptimizer: the parameters hold the average (opt.eval() was "
                               "called); call opt.train() before step()")


def averaged_update(params: list[Tensor], states: list[dict[str, Tensor]], averaging: float,
                    skip: Tensor | None, step: Callable[..., None]) -> None:
    """One Schedule-Free step of ``params`` (the interpolation points) around ``step``, which
    moves the base sequences ``state["z"]`` in place.

    Args:
        params: the parameters.
        states: their states, each with ``"z"`` (flat) and ``"step"`` (the count, already
            advanced for this step).
        averaging: the interpolation weight ``b``.
        skip: a device flag; a skipped step changes neither ``params`` nor ``z``.
        step: ``step(zs)`` moves the tensors it is given (the ``z`` values, shaped as the
            parameters); ``step(zs, (params, c, b))`` moves the parameters with them, as
            ``simple_update(..., averaged=...)`` does (used where every parameter has its
            ``z``'s dtype and all share one step count).
    """
    if torch.compiler.is_compiling():
        _traced_averaged_update(params, states, averaging, skip, step)
        return
    # the host reads the device flag here: the averaging's coefficients depend on it
    if skip is not None and bool(skip):
        return
    zs = [s["z"].view(p.shape) for s, p in zip(states, params)]
    # c = 1 / t from each parameter's own step count (all equal in the usual case)
    cs = [1.0 / (int(s["step"]) + 1) for s in states]
    if all(p.dtype == z.dtype for p, z in zip(params, zs)) and len(set(cs)) == 1:
        step(zs, (params, cs[0], averaging))
        return
    # mixed step counts or parameter dtypes: y in z's precision, each with its own c
    ys = [p.detach().to(z.dtype, copy=True) for p, z in zip(params, zs)]
    averaged_step(ys, zs, cs, averaging, lambda: step(zs))
    for p, y in zip(params, ys):
        p.copy_(y)


def _traced_averaged_update(params: list[Tensor], states: list[dict[str, Tensor]],
                            averaging: float, skip: Tensor | None,
                            step: Callable[[list[Tensor]], None]) -> None:
    """:func:`averaged_update` as a compiled graph holds it: the step counts and the skip flag
    stay on the device (no host read, so ``fullgraph=True`` compiles the step as one graph);
    ``y`` is computed out of place and a skipped step keeps the old one."""
    zs = [s["z"].view(p.shape) for s, p in zip(states, params)]
    coeffs = [averaging_coefficients(1.0 / (s["step"].to(z.dtype) + 1.0), averaging)
              for s, z in zip(states, zs)]
    befores = [z.clone() for z in zs]
    halves = [p.detach().to(z0.dtype).lerp(z0, c) for p, z0, (c, _) in zip(params, befores, coeffs)]
    step(zs)  # moves z in place; a skipped step leaves it
    for p, y, z0, z, (_, k) in zip(params, halves, befores, zs, coeffs):
        new = (y - (z0 - z) * k).to(p.dtype)
        p.copy_(new if skip is None else torch.where(skip, p, new))
