"""A population of optimizees, each trained by its own SimpleOptimizer weights, in one batched loop.

Member m of a :class:`~l2l_optim.meta.families.BatchedTask` is trained by SimpleOptimizerNet
weights ``theta[m]`` (a row of a ``(M, 132)`` matrix in the net's ``named_parameters`` order),
so an ES generation (``theta +- sigma * eps``) or a population of BPTT trajectories is one
loop of batched tensor ops. :func:`population_step` is the net's own ``forward`` with a
leading member dimension; a test pins the two together, so the rule meta-trained here is the
rule the optimizer runs.
"""

from __future__ import annotations


from typing import NamedTuple

import torch
from torch import Tensor

from ..nets import SimpleOptimizerNet
from ..rule import INPUT_NORMS, averaged_step, output, recur, rms_normalise, shared_term
from .families import BatchedTask

__all__ = ["PopulationWeights", "unflatten", "flatten", "population_step", "run_population", "fitness"]


class PopulationWeights(NamedTuple):
    """Per-member SimpleOptimizerNet weights, folded: ``u = w_a . h' + w_b . mean(h')``."""

    w_ih: Tensor  # (M, H)
    w_hh: Tensor  # (M, H, H)
    w_a: Tensor  # (M, H)
    w_b: Tensor  # (M, H)


def flatten(net: SimpleOptimizerNet) -> Tensor:
    """The net's parameters as one vector, in ``named_parameters`` order (bias-free nets only)."""
    if net.bias or not net.aggregate:
        raise ValueError("population training supports the paper's net (no bias, with aggregation)")
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()])


def unflatten(theta: Tensor, hidden_size: int = 10) -> PopulationWeights:
    """``(M, P)`` parameter rows -> :class:`PopulationWeights` (differentiable)."""
    H = hidden_size
    M = theta.shape[0]
    w_ih = theta[:, :H]
    w_hh = theta[:, H : H + H * H].reshape(M, H, H)
    alpha, beta = theta[:, H + H * H], theta[:, H + H * H + 1]
    w_out = theta[:, H + H * H + 2 : H + H * H + 2 + 2 * H]
    return PopulationWeights(w_ih, w_hh, alpha[:, None] * w_out[:, :H], beta[:, None] * w_out[:, H:])


def load_flat(net: SimpleOptimizerNet, theta: Tensor) -> SimpleOptimizerNet:
    """Write a parameter vector (one row of ``theta``) into ``net``; returns ``net``."""
    with torch.no_grad():
        i = 0
        for p in net.parameters():
            p.copy_(theta[i : i + p.numel()].view_as(p))
            i += p.numel()
    return net


def population_step(w: PopulationWeights, g: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
    """One step for every member: gradients ``g`` ``(M, N)``, hidden ``h`` ``(M, H, N)``.

    Returns:
        ``(update (M, N), new hidden (M, H, N))``, as ``SimpleOptimizerNet.forward`` computes
        them for each member.
    """
    h_new = recur(w.w_ih, w.w_hh, None, g, h)
    return output(w.w_a, h_new, shared_term(w.w_b, h_new.mean(2))), h_new


def flat_members(params: dict[str, Tensor]) -> Tensor:
    """Every member's optimizee parameters as one row: ``(M, total)`` from ``{name: (M, ...)}``."""
    return torch.cat([t.reshape(t.shape[0], -1) for t in params.values()], 1)


def unflat_members(flat: Tensor, like: dict[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of :func:`flat_members`, shaped like ``like``."""
    out, i = {}, 0
    for k, t in like.items():
        n = t[0].numel()
        out[k] = flat[:, i : i + n].view_as(t)
        i += n
    return out


def _kernel_stepper(theta: Tensor, hidden_size: int):
    """Per-member calls of the fused CPU kernel (the optimizer's own), or None if unavailable.

    The step it returns, ``step(z, g, h, alive, rms=None, averaged=None)``, moves every live
    member's ``z`` (its parameters, or its base sequence with averaging) and ``h`` in place
    from its raw gradient ``g``; ``rms = (v, c)`` runs the input norm inside the kernel's pass
    on the members' running means (``(M, N)`` and ``(M, 1)``), and ``averaged = (y, c, b)``
    moves the parameters ``y`` of Schedule-Free averaging in the same passes, as the
    optimizer's step does."""
    from .. import kernels
    from ..functional import RunningRms

    if theta.device.type != "cpu" or kernels.resolve_impl("auto", "cpu") != "cpu":
        return None
    kernel = kernels.get_kernel("cpu")
    net = SimpleOptimizerNet(hidden_size)
    folded = [load_flat(net, row).fused_weights() for row in theta]

    def step(z: Tensor, g: Tensor, h: Tensor, alive: Tensor,
             rms: tuple[Tensor, Tensor] | None = None,
             averaged: tuple[Tensor, float, float] | None = None) -> None:
        for m in alive.nonzero().flatten().tolist():
            kernel([z[m]], [g[m]], [h[m]], [1.0], folded[m],
                   rms=None if rms is None else RunningRms([rms[0][m]], [rms[1][m]]),
                   averaged=None if averaged is None else ([averaged[0][m]], *averaged[1:]))

    return step


def run_population(task: BatchedTask, theta: Tensor, steps: int, *, hidden_size: int = 10,
                   diverge_factor: float = 1e3, impl: str = "auto", input_norm: str | None = None,
                   averaging: float = 0.0) -> Tensor:
    """Train every member for ``steps`` steps with its own weights; no meta-gradient.

    A member whose loss turns non-finite or exceeds ``diverge_factor`` times its initial loss,
    or whose gradient holds a NaN or an infinity, is frozen from then on (its parameters stop
    moving) and its later losses read as that bound, so one diverged member cannot poison the
    batch.

    Args:
        impl: ``"auto"`` runs each member's update through the fused CPU kernel (one call per
            member, in place, with the input norm and the averaging in its passes) when it is
            available, else :func:`population_step` and torch ops; ``"torch"`` forces those.
        input_norm: the nets' ``input_norm`` (``SimpleOptimizerNet``): ``"rms"`` feeds every
            member :func:`~l2l_optim.nets.rms_normalise` of its gradient, as the optimizer does.
        averaging: the nets' ``averaging``: each member's rule moves a base sequence ``z``
            and the losses are taken at Schedule-Free's interpolation point (the optimizer's
            :func:`~l2l_optim.nets.averaged_step`, at a constant lr: ``c = 1 / t``).

    Returns:
        ``(steps + 1, M)`` losses: the initial loss, then the loss after each step (each on
        that step's minibatch, before the update it feeds).
    """
    if input_norm not in INPUT_NORMS:
        raise ValueError(f"Invalid input_norm: {input_norm!r}; expected one of {INPUT_NORMS}")
    with torch.no_grad():
        params = task.init_params()
        flat = flat_members(params).contiguous()
        M, N = flat.shape
        h = torch.zeros(M, hidden_size, N)
        kernel_step = _kernel_stepper(theta, hidden_size) if impl == "auto" else None
        # the running means of the input norm: one bias correction per member (every
        # coordinate of a member counts the same steps)
        v = torch.zeros(M, N) if input_norm == "rms" else None
        c = torch.zeros(M, 1) if v is not None else None
        # with averaging, `flat` holds y (where gradients are taken) and the rule moves z
        z = flat.clone() if averaging else flat
        w = unflatten(theta, hidden_size)
        losses = torch.empty(steps + 1, M)
        alive = torch.ones(M, dtype=torch.bool)
        bound = None
        for t in range(steps + 1):
            # one leaf per tensor, each a view of `flat`: a leaf sliced out of one flat vector
            # would make every slice's backward allocate and zero a full-size gradient
            leaves = {k: v.detach().requires_grad_() for k, v in unflat_members(flat, params).items()}
            with torch.enable_grad():
                f = task.losses(leaves, task.sample_batch())
                g = torch.cat([gr.reshape(M, -1) for gr in torch.autograd.grad(f.sum(), list(leaves.values()))], 1)
            f = f.detach()
            if bound is None:
                bound = f.abs().clamp_min(1e-12) * diverge_factor
            # a NaN or an infinity in a member's gradient makes its sum non-finite (so does a
            # finite sum beyond float32's range, from gradients a member reaches only by
            # diverging); one pass over g, a tenth of isfinite(g).all(1)'s time
            bad = ~torch.isfinite(f) | (f > bound) | ~torch.isfinite(g.sum(1))
            alive &= ~bad
            losses[t] = torch.where(alive, f, bound)
            if t == steps:
                break
            if kernel_step is not None:
                # the kernel's own input norm and averaging, in its passes: a live member
                # moves as the optimizer would move it
                kernel_step(z, g, h, alive, rms=None if v is None else (v, c),
                            averaged=(flat, 1.0 / (t + 1), averaging) if averaging else None)
                continue
            if v is not None:
                # frozen members' v and c are never read again: no need to hold them
                g, v, c = rms_normalise(g, v, c)
            def step_z() -> None:
                nonlocal h
                u, h = population_step(w, torch.where(alive[:, None], g, torch.zeros((), dtype=g.dtype)), h)
                z.add_(torch.where(alive[:, None], u, torch.zeros((), dtype=u.dtype)))

            if averaging:
                y_old = flat.clone()
                # the newest z's weight in the uniform average
                averaged_step([flat], [z], 1.0 / (t + 1), averaging, step_z)
                # frozen members keep their parameters
                flat.copy_(torch.where(alive[:, None], flat, y_old))
            else:
                step_z()
        return losses


def fitness(losses: Tensor, *, floor: float = 1e-6) -> Tensor:
    """Per-member score (lower is better): mean of ``log(f_t / f_0)`` over the run, weighted by t.

    The log of the loss relative to the initial loss is comparable across tasks of any loss
    scale; weighting step t by t puts the end of training first without ignoring the way
    there. ``floor`` (relative to f_0) keeps a task that reaches zero loss from dominating.
    """
    f0 = losses[0].abs().clamp_min(1e-12)
    rel = (losses[1:].clamp_min(0) / f0).clamp_min(floor).log()
    t = torch.arange(1, losses.shape[0], dtype=rel.dtype)[:, None]
    return (rel * t).sum(0) / t.sum()


def final_fitness(losses: Tensor, *, tail: float = 0.1, floor: float = 1e-6) -> Tensor:
    """Per-member score (lower is better): ``log(mean f_t / f_0)`` over the last ``tail`` of the run.

    The validation suite's measure (the mean training loss of the last 10% of the steps),
    relative to the initial loss. It ignores the way there, so a rule that plateaus late
    scores as badly as its plateau, however fast it got there.
    """
    f0 = losses[0].abs().clamp_min(1e-12)
    k = max(1, int(round((losses.shape[0] - 1) * tail)))
    last = losses[-k:].clamp_min(0).mean(0)
    return (last / f0).clamp_min(floor).log()


OBJECTIVES = {"weighted": fitness, "final": final_fitness}


def diverged(losses: Tensor, factor: float = 1e3) -> Tensor:
    """Which members hit the divergence bound (``(M,)`` bool)."""
    f0 = losses[0].abs().clamp_min(1e-12)
    return (losses[-1] >= f0 * factor * (1 - 1e-6)) | ~torch.isfinite(losses[-1])
