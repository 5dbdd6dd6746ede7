"""The optimizers' non-finite gradient policy: which gradients hold a NaN or an Inf, and what
a step does then.

Every parameter group has a ``nonfinite`` option, ``"skip"`` or ``"raise"``. A step's update
spans every group (SimpleOptimizer's mean runs over all coordinates), so one non-finite
gradient stops the whole step, and the group holding the first one decides how: it raises
:class:`FloatingPointError`, or the step changes nothing. On the host the check reads one
flag; on an accelerator, when every group skips, the flag stays a device tensor that the
update reads, so that the step never synchronises.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch
from torch import Tensor

__all__ = ["POLICIES", "SkippedStepWarning", "finite_flags", "NonfiniteGuard", "user_stacklevel"]

#: the values of the ``nonfinite`` option
POLICIES = ("skip", "raise")
_OWN_DIRS = tuple(os.path.dirname(os.path.abspath(f)) + os.sep for f in (__file__, torch.__file__))


class SkippedStepWarning(RuntimeWarning):
    """A step skipped for a non-finite gradient (parameters and state unchanged).

    Its own category so that a training loop which reports the optimizer's ``skipped_steps``
    can silence these warnings without hiding other runtime warnings.

    Example:
        >>> import warnings
        >>> import torch
        >>> from l2l_optim import SimpleOptimizer, SkippedStepWarning
        >>> p = torch.nn.Parameter(torch.ones(3))
        >>> opt = SimpleOptimizer([p])
        >>> p.grad = torch.tensor([1.0, float("nan"), 0.0])
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore", SkippedStepWarning)
        ...     opt.step()
        >>> opt.skipped_steps
        1
    """


def finite_flags(grads: list[Tensor]) -> Tensor:
    """Per tensor, whether it holds no NaN or Inf (an empty tensor is finite).

    Args:
        grads: the tensors, on one device.

    Returns:
        A bool tensor with one entry per tensor, on their device (no host synchronisation).
    """
    # one fused max-abs per tensor (NaN and Inf survive it) instead of a full isfinite() pass
    # and a reduction per tensor; the max of an empty tensor is undefined, so those are left out
    if all(g.numel() for g in grads):
        return torch.stack(torch._foreach_norm(grads, float("inf"))).isfinite()
    flags = torch.ones(len(grads), dtype=torch.bool, device=grads[0].device)
    full = [i for i, g in enumerate(grads) if g.numel()]
    if full:
        norms = torch._foreach_norm([grads[i] for i in full], float("inf"))
        flags[full] = torch.stack(norms).isfinite()
    return flags


def user_stacklevel() -> int:
    """The ``stacklevel`` that attributes a warning to the first caller outside this package
    and torch, for the function that calls this one and warns (torch wraps ``step`` in
    decorators whose depth varies between versions)."""
    level, frame = 1, sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_OWN_DIRS):
        frame, level = frame.f_back, level + 1
    return level


class NonfiniteGuard:
    """Applies the policy to one step, and counts the steps skipped.

    Args:
        name: the optimizer's name, for the messages.
    """

    def __init__(self, name: str, skipped: int = 0) -> None:
        self.name = name
        self._host = skipped
        self._device: Tensor | None = None

    def track(self, device: torch.device) -> None:
        """Create the device counter of skipped steps (before any step is traced: a compiled
        step updates the tensors it is given but drops attributes it creates)."""
        if self._device is None:
            self._device = torch.zeros((), dtype=torch.int64, device=device)

    @property
    def skipped(self) -> int:
        """Steps skipped so far (reading it synchronises on accelerators)."""
        return self._host + (0 if self._device is None else int(self._device.item()))

    def check(self, params: list[Tensor], grads: list[Tensor], policies: list[str],
              where: list[tuple[int, int]], *, impl: str | None = None,
              finite: Tensor | None = None) -> tuple[bool, Tensor | None]:
        """Decide one step: ``(go_on, skip_flag)``.

        Args:
            params, grads: the parameters stepped and their gradients.
            policies: per parameter, its group's ``nonfinite``.
            where: per parameter, ``(index across groups, group index)``, for the messages.
            impl: the fused kernel path of the update (SimpleOptimizer's ``impl``), whose
                own scans are faster; None for the generic path.
            finite: per-parameter finiteness flags on the device, computed by the caller (for
                sharded parameters, agreed on by every process); else computed here.

        Returns:
            ``go_on`` is False when the step must change nothing and the host knows it;
            ``skip_flag`` is a device bool that vetoes the update instead, when every group
            skips and the flag lives on an accelerator or in a compiled graph.

        Raises:
            FloatingPointError: the first non-finite gradient's group has ``"raise"``.
        """
        first_bad = None  # the first non-finite gradient's index (-1: none), where a scan says
        if finite is None:
            first_bad = _scan(grads, impl)
            if first_bad is None:
                finite = _flags(grads, impl)
        on_host = params[0].device.type == "cpu" and not torch.compiler.is_compiling()
        if first_bad is None and not on_host and "raise" not in policies:
            skip = ~finite.all()
            if self._device is None or self._device.device != skip.device:
                self._host = self.skipped
                self._device = torch.zeros((), dtype=torch.int64, device=skip.device)
            self._device.add_(skip)
            return True, skip
        if first_bad is None:
            first_bad = -1 if bool(finite.all()) else int((~finite).nonzero()[0, 0])
        if first_bad < 0:
            return True, None
        i, gi = where[first_bad]
        if policies[first_bad] == "raise":
            raise FloatingPointError(
                f"{self.name}: non-finite gradient in parameter {i} (group {gi}, shape "
                f"{tuple(params[first_bad].shape)}); nothing was changed"
            )
        self._host += 1
        warnings.warn(
            f"{self.name}: non-finite gradient, step skipped (parameters and state unchanged); "
            "see skipped_steps, or pass nonfinite='raise' to stop",
            SkippedStepWarning, stacklevel=user_stacklevel(),
        )
        return False, None


def _scan(grads: list[Tensor], impl: str | None) -> int | None:
    """The first non-finite gradient's index (-1: none) from the fused CPU path's scan, or
    None where it does not apply."""
    # the kernel's library scans the gradients at memory speed (a max-norm per tensor costs a
    # quarter of a step); compiled steps keep the device-flag path, which traces
    if impl is None or grads[0].device.type != "cpu" or torch.compiler.is_compiling():
        return None
    from . import kernels

    if kernels.resolve_impl(impl, "cpu") != "cpu":
        return None
    from .kernels import cpu

    return cpu.first_nonfinite(grads)


def _flags(grads: list[Tensor], impl: str | None) -> Tensor:
    """:func:`finite_flags`, from a Triton kernel on the Triton path."""
    # one read of the gradients (a bit test of the exponent) gives the flags on the device;
    # compiled steps keep the traceable max-norm. On CPU only an explicit impl='triton'
    # (Triton's interpreter) gets there
    device = grads[0].device.type
    if impl is not None and (device != "cpu" or impl == "triton") \
            and not torch.compiler.is_compiling():
        from . import kernels

        if kernels.resolve_impl(impl, device) == "triton":
            from .kernels import triton as triton_kernels

            return triton_kernels.finite_flags_triton(grads)
    return finite_flags(grads)
