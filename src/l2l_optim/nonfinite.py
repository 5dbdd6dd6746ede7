"""Which gradients hold a NaN or an Inf: the test behind the optimizers' non-finite policy.

The optimizers skip a step (``nonfinite="skip"``) or raise (``"raise"``) when any gradient of
the step is not finite; on the host the check reads one flag, on an accelerator it stays a
device tensor that the update reads, so that the step never synchronises.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["finite_flags"]


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
