"""The SimpleOptimizer update rule, defined once.

Per coordinate i, with input x_i (the gradient, or the gradient over its running root mean
square with ``input_norm="rms"``) and hidden state h_i:

    h_i' = tanh(w_ih x_i + W_hh h_i + b_h)          (:func:`recur`)
    m    = mean_j h_j'                               (over every coordinate of the step)
    u_i  = w_a . h_i' + w_b . m + b_out              (:func:`output`, :func:`shared_term`)

and the parameter moves by ``lr * u_i`` (or, with Schedule-Free averaging, its base sequence
does: :func:`averaged_step`). :class:`~l2l_optim.nets.SimpleOptimizerNet` (the differentiable
module), the reference kernel (:mod:`l2l_optim.kernels.reference`) and the meta-training
population (:mod:`l2l_optim.meta.population`) all call these functions; the fused C++ and
Triton kernels are separate implementations, pinned to them by tests. Every function takes
optional leading batch dimensions (one set of weights per population member).

The folded weights :class:`SimpleWeights` are also the fused kernels' packed layout, in field
order (:data:`PACKED_FIELDS`, :func:`packed_size`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["SimpleWeights", "PACKED_FIELDS", "packed_size", "packed_offsets", "hidden_size_of_packed", "INPUT_NORMS",
           "RMS_BETA", "RMS_EPS", "rms_normalise", "recur", "shared_term", "output",
           "averaging_coefficients", "averaged_step"]


class SimpleWeights(NamedTuple):
    """SimpleOptimizerNet's weights folded for the fused kernels (all fp32 or fp64, detached).

    The update is ``h' = tanh(w_ih * g + w_hh @ h + b_h)``,
    ``u = w_a . h' + w_b . mean(h') + b_out``. Without bias, ``b_h`` is zeros and ``b_out`` 0;
    without aggregation, ``w_b`` is zeros. Adding those zeros is exact, so one kernel serves
    every variant.
    """

    w_ih: Tensor  # (H,)
    w_hh: Tensor  # (H, H)
    b_h: Tensor  # (H,)
    w_a: Tensor  # (H,)
    w_b: Tensor  # (H,)
    b_out: Tensor  # () scalar


#: the fused kernels read the folded weights as one flat vector, these fields in this order
PACKED_FIELDS = SimpleWeights._fields


def packed_size(hidden_size: int) -> int:
    """Elements of the packed weights for ``hidden_size`` hidden units: ``4H + H^2 + 1``."""
    return sum(n for _, n in packed_offsets(hidden_size).values())


def packed_offsets(hidden_size: int) -> dict[str, tuple[int, int]]:
    """Field -> ``(start, length)`` in the packed weights of ``hidden_size`` hidden units.

    Example:
        >>> packed_offsets(10)["w_a"], packed_offsets(10)["b_out"]
        ((120, 10), (140, 1))
    """
    H = hidden_size
    lengths = {"w_ih": H, "w_hh": H * H, "b_h": H, "w_a": H, "w_b": H, "b_out": 1}
    out, start = {}, 0
    for name in PACKED_FIELDS:
        out[name] = (start, lengths[name])
        start += lengths[name]
    return out


def hidden_size_of_packed(n: int) -> int:
    """The hidden size whose packed weights have ``n`` elements.

    Raises:
        ValueError: no hidden size gives ``n``.
    """
    h = int(round(-2 + (4 + n - 1) ** 0.5))
    if h < 1 or packed_size(h) != n:
        raise ValueError(f"{n} packed weights fit no hidden size (expected 4H + H^2 + 1)")
    return h


#: what SimpleOptimizerNet may do to the raw gradient before its RNN: ``None`` (the paper's
#: raw gradient) or ``"rms"`` (:func:`rms_normalise`)
INPUT_NORMS = (None, "rms")
RMS_BETA = 0.999
# small enough that gradients down to ~1e-10 still come out at unit scale
RMS_EPS = 1e-12


def rms_normalise(grad: Tensor, v: Tensor, c: Tensor, beta: float = RMS_BETA,
                  eps: float = RMS_EPS) -> tuple[Tensor, Tensor, Tensor]:
    """The gradient divided by a running root mean square of itself, per coordinate (Adam's).

    ``v' = beta * v + (1 - beta) * g**2`` and ``c' = beta * c + (1 - beta)``, both starting
    at zero, so ``c' = 1 - beta**t`` after t steps and ``v' / c'`` is Adam's bias-corrected
    second moment; the input is ``g / (sqrt(v') / sqrt(c') + eps)``. ``c`` is a running mean
    of ones instead of a step counter, so the rule stays a function of its input and its
    state (and a skipped step skips it too). The result is invariant to the gradient's
    scale: the same rule suits a loss scaled by 1e-3 or 1e3.

    No finite gradient makes ``v`` infinite: ``(1 - beta) g**2`` is computed as
    ``((1 - beta) g) g`` (as Adam does), which stays finite where ``g**2`` alone would not
    (above ~1.8e19 in float32), and a square beyond the dtype's range saturates ``v`` at the
    largest finite value. An infinite ``v`` would make every later input 0 and freeze the
    coordinate. For the same reason the root mean square is ``sqrt(v') / sqrt(c')``: ``v' / c'``
    overflows while ``c'`` is small. An infinite gradient still gives an infinite ``v``.

    Args:
        grad: gradients, any shape.
        v: the running mean of squared gradients, same shape, float32 or float64.
        c: the running mean of ones (the bias correction), in v's dtype: one value per
            coordinate or one for the whole tensor (any shape that broadcasts against v).
        beta: the running means' decay.
        eps: added to the root mean square.

    Returns:
        ``(normalised gradient in v's dtype, new v, new c)``; the inputs are not modified.

    Example:
        >>> x, v, c = rms_normalise(torch.tensor([-3.0, 0.0]), torch.zeros(2), torch.zeros(2))
        >>> [round(value, 6) for value in x.tolist()], c.tolist()
        ([-1.0, 0.0], [0.0010000000474974513, 0.0010000000474974513])
    """
    g = grad.to(v.dtype)
    v_new = v * beta + ((1 - beta) * g) * g
    v_new = torch.where(g.isinf(), v_new, v_new.clamp(max=torch.finfo(v.dtype).max))
    c_new = c * beta + (1 - beta)
    return g / (v_new.sqrt() * c_new.sqrt().reciprocal() + eps), v_new, c_new


def recur(w_ih: Tensor, w_hh: Tensor, b_h: Tensor | None, x: Tensor, h: Tensor) -> Tensor:
    """The new hidden state ``tanh(w_ih x + W_hh h + b_h)`` of every coordinate.

    Args:
        w_ih: ``(..., H)`` input weights.
        w_hh: ``(..., H, H)`` recurrent weights.
        b_h: ``(..., H)`` hidden bias, or None (no bias).
        x: ``(..., N)`` inputs, one per coordinate.
        h: ``(..., H, N)`` hidden states (the coordinate is the last dimension).

    Returns:
        ``(..., H, N)``.
    """
    pre = w_ih.unsqueeze(-1) * x.unsqueeze(-2) + w_hh @ h
    if b_h is not None:
        pre = pre + b_h.unsqueeze(-1)
    return torch.tanh(pre)


def shared_term(w_b: Tensor, mean_h: Tensor) -> Tensor:
    """The aggregate's part of the update, ``w_b . m``, the same for every coordinate.

    Args:
        w_b: ``(..., H)``.
        mean_h: ``(..., H)``, the mean of the new hidden states over the step's coordinates.

    Returns:
        ``(...)`` (0-dim without batch dimensions), or ``(..., 1)`` with them, ready to add to
        ``(..., N)`` updates.
    """
    if w_b.dim() == 1:
        return w_b @ mean_h
    return (w_b * mean_h).sum(-1, keepdim=True)


def output(w_a: Tensor, h_new: Tensor, shared: Tensor | None, b_out: Tensor | None = None) -> Tensor:
    """The update ``u = w_a . h' + shared + b_out`` of every coordinate.

    Args:
        w_a: ``(..., H)``.
        h_new: ``(..., H, N)`` new hidden states.
        shared: :func:`shared_term` (or its value reduced over several processes); None
            for a net without the aggregate.
        b_out: optional output bias (0-dim, or ``(..., 1)``).

    Returns:
        ``(..., N)``.
    """
    u = w_a @ h_new if w_a.dim() == 1 else torch.bmm(w_a.unsqueeze(1), h_new).squeeze(1)
    if shared is not None:
        u = u + shared
    return u if b_out is None else u + b_out


def averaging_coefficients(c, averaging: float):
    """``(c, k)`` with ``y' = y + c (z - y) + k (z' - z)`` for one step of
    :func:`averaged_step`: ``k = 1 - b (1 - c)`` (``b`` = ``averaging``). ``c`` may be a
    float or a tensor (a compiled step keeps the step count on the device)."""
    return c, 1.0 - averaging * (1.0 - c)


def averaged_step(y: list[Tensor], z: list[Tensor], c: float | Sequence[float], averaging: float,
                  step_z) -> None:
    """One Schedule-Free step around any update of the base sequence, in place.

    With ``x`` the running average of the ``z``s and ``y = (1 - b) z + b x`` (``b`` =
    ``averaging``), a step ``z' = z + u`` and ``x' = (1 - c) x + c z'`` give
    ``y' = y + c (z - y) + k u`` with ``k = 1 - b (1 - c)``: only ``y`` (the parameters) and
    ``z`` are kept, ``x`` is implied. ``step_z()`` moves ``z`` in place (any rule's update),
    so ``u`` is taken as ``z' - z``. Written as two differences, a parameter whose ``z`` does
    not move (a group at ``lr=0``, where ``y = z``) keeps its exact value.

    Args:
        y: the parameters (the interpolation point, where gradients are taken).
        z: the base sequence, one tensor per parameter.
        c: the newest ``z``'s weight in the average: ``1 / t`` at step t (uniform weights);
            one for all tensors, or one per tensor (tensors whose step counts differ).
        averaging: the interpolation weight ``b`` in [0, 1).
        step_z: called once, between the two halves, to move ``z`` in place.
    """
    cs = list(c) if isinstance(c, (list, tuple)) else [c]
    before = [t.clone() for t in z]
    if len(set(cs)) > 1:
        coeffs = [averaging_coefficients(ci, averaging) for ci in cs]
        for yi, zi, (ci, _) in zip(y, before, coeffs):
            yi.lerp_(zi, ci)  # y + c (z - y)
        step_z()
        for yi, zi, znew, (_, k) in zip(y, before, z, coeffs):
            yi.sub_(zi.sub_(znew), alpha=k)  # - k (z - z')
        return
    c, k = averaging_coefficients(cs[0], averaging)
    torch._foreach_lerp_(y, before, c)  # y + c (z - y)
    step_z()
    torch._foreach_sub_(before, z)  # z - z'
    torch._foreach_sub_(y, before, alpha=k)
