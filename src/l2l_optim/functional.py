"""Functional forms of the optimizers' updates (as :func:`torch.optim.adam.adam` is Adam's).

:class:`~l2l_optim.optimizer.SimpleOptimizer` keeps the state and the policies (parameter
groups, non-finite gradients, ``state_dict``); :func:`simple_update` is the step itself, for
callers that hold their own state.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import kernels
from .kernels._common import check_lengths, compute_dtype, packed_weights, split_skip
from .nets import SimpleOptimizerNet, SimpleWeights

__all__ = ["simple_update"]


def simple_update(
    params: list[Tensor],
    grads: list[Tensor],
    hiddens: list[Tensor],
    lrs: list[float | Tensor],
    weights: SimpleOptimizerNet | SimpleWeights,
    *,
    impl: str = "auto",
    skip: Tensor | bool | None = None,
) -> None:
    r"""One SimpleOptimizer step, in place, on ``params`` and their hidden states.

    Per coordinate ``i`` of every tensor in the call, with gradient ``g_i`` and hidden state
    ``h_i``: ``h_i' = tanh(w_ih g_i + w_hh h_i + b_h)`` and
    ``theta_i <- theta_i + lr * (w_a . h_i' + w_b . mean_j h_j' + b_out)``, the mean running
    over every coordinate of every tensor in the call. Coordinates of float64 parameters are
    computed in float64, all others in float32; bfloat16 / float16 storage is rounded once.

    Args:
        params: parameter tensors of any shape, float32 / float64 / bfloat16 / float16, all on
            one device (updated in place; non-contiguous ones keep their strides).
        grads: their dense gradients, one per parameter, with as many elements.
        hiddens: one hidden state per parameter, of shape ``(H, p.numel())`` and dtype
            float32 / bfloat16 / float64 (updated in place); ``net.init_state(p.numel())``
            makes one.
        lrs: one learning rate per parameter: a float, or a 0-dim / 1-element tensor (on
            CUDA a device tensor keeps the step free of host synchronisation).
        weights: a :class:`~l2l_optim.nets.SimpleOptimizerNet`, folded here in float64 if
            any parameter is float64 and float32 otherwise, on the parameters' device; or
            :class:`~l2l_optim.nets.SimpleWeights` already folded, used as given. The folded
            and packed forms are cached and derived afresh when a weight changes (in place
            or re-bound).
        impl: the kernel: ``"auto"`` (the fastest available for the parameters' device),
            ``"reference"``, ``"cpu"`` or ``"triton"`` (see :mod:`l2l_optim.kernels`).
        skip: a Python bool, or a 0-dim bool tensor on the parameters' device read inside the
            kernel (no host synchronisation); when true nothing is changed.

    Returns:
        None; ``params`` and ``hiddens`` are updated in place and their autograd version
        counters bumped.

    Raises:
        ValueError: an unknown ``impl``, lists of different lengths, a sparse gradient, an
            unsupported dtype or a hidden state of the wrong shape.
        TypeError: ``weights`` is neither a SimpleOptimizerNet nor SimpleWeights.
        RuntimeError: ``impl`` cannot run here (no compiler, no Triton, another device), or
            the tensors are on several devices for a fused kernel.

    Example:
        >>> import torch
        >>> from l2l_optim.nets import SimpleOptimizerNet
        >>> from l2l_optim.functional import simple_update
        >>> net = SimpleOptimizerNet()
        >>> w = torch.zeros(3)
        >>> h = net.init_state(w.numel())["h"]
        >>> simple_update([w], [torch.ones(3)], [h], [0.1], net, impl="reference")
        >>> w.shape, h.shape
        (torch.Size([3]), torch.Size([10, 3]))
    """
    if impl not in kernels.IMPLS:
        raise ValueError(f"Invalid impl: {impl!r}; expected one of {kernels.IMPLS}")
    if not isinstance(weights, (SimpleOptimizerNet, SimpleWeights)):
        raise TypeError(
            "simple_update needs a SimpleOptimizerNet or SimpleWeights, got "
            f"{type(weights).__name__}"
        )
    check_lengths(params, grads, hiddens, lrs)
    done, skip = split_skip(skip)
    if done or not params:
        return
    device = params[0].device
    kernel = kernels.get_kernel(kernels.resolve_impl(impl, device.type))
    if isinstance(weights, SimpleOptimizerNet):
        weights = packed_weights(weights, device, compute_dtype(*(p.dtype for p in params)))
    with torch.no_grad():
        kernel(params, grads, hiddens, lrs, weights, skip)
