"""Truncated BPTT over the task population: the gradient-based counterpart of :mod:`.es`.

A generation draws its task, instances and horizon exactly as an ES generation does (same
seed, same draws), trains ``instances`` optimizees with the current rule through the
differentiable :func:`~.population.population_step`, and back-propagates the fitness terms of
each unroll of ``unroll`` steps into the rule (first order: the optimizee's gradient is a
constant input, as in :mod:`.trajectory`). The unrolls' gradients are summed into one
estimate of the gradient of the same objective ES estimates, so the two engines can be
compared step for step and CPU-second for CPU-second (``python -m l2l_optim meta-bench``).
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from .es_config import ESConfig, draw_generation
from .families import ImageData, build_task
from .population import flat_members, unflat_members, population_step, unflatten

__all__ = ["bptt_generation"]


def bptt_generation(z: Tensor, scales: Tensor, cfg: ESConfig, generation: int, images: ImageData | None,
                    *, unroll: int = 20, floor: float = 1e-6) -> tuple[Tensor, dict]:
    """The gradient of the generation's fitness with respect to ``z`` (theta = z * scales)."""
    if cfg.input_norm is not None:
        raise ValueError("the bptt engine trains the raw-gradient net only (input_norm=None)")
    seed, spec, horizon = draw_generation(cfg, generation)
    task = build_task(spec, cfg.instances, 1, seed=seed, images=images,
                      scale_range=cfg.scale_range, scaled_fraction=cfg.scaled_fraction)
    z = z.detach().requires_grad_()
    t0 = time.perf_counter()
    params = task.init_params()
    flat = flat_members(params)
    M, N = flat.shape
    h = torch.zeros(M, 10, N)
    norm = horizon * (horizon + 1) / 2  # sum of the weights t = 1..T, as in fitness()
    grad = torch.zeros_like(z)
    f0 = None
    total = torch.zeros(M)
    alive = torch.ones(M, dtype=torch.bool)
    for start in range(0, horizon, unroll):
        w = unflatten((z * scales).expand(M, -1))
        # the unroll starts from detached parameters: truncated BPTT
        flat, h = flat.detach().requires_grad_(), h.detach()
        meta_loss = torch.zeros(())
        for t in range(start, min(start + unroll, horizon) + (1 if start + unroll >= horizon else 0)):
            f = task.losses(unflat_members(flat, params), task.sample_batch())
            # the optimizee's gradient is a constant input (first order)
            (g,) = torch.autograd.grad(f.sum(), flat, retain_graph=True)
            if f0 is None:
                f0 = f.detach().abs().clamp_min(1e-12)
            elif t > start:  # f depends on z through this unroll's updates
                rel = (f.clamp_min(0) / f0).clamp_min(floor).log()
                alive = alive & torch.isfinite(rel.detach()) & (f.detach() < f0 * 1e3)
                term = torch.where(alive, rel, torch.zeros(())) * (t / norm)
                meta_loss = meta_loss + term.mean()
                total += term.detach()
            if t == horizon:
                break
            g = torch.where(alive[:, None], g.detach(), torch.zeros(()))
            u, h = population_step(w, g, h)
            flat = flat + torch.where(alive[:, None], u, torch.zeros(()))
        if meta_loss.requires_grad:
            (gz,) = torch.autograd.grad(meta_loss, z)
            if torch.isfinite(gz).all():
                grad += gz
    entry = {"generation": generation, "family": spec.family, "horizon": horizon,
             "fitness": total.mean().item(), "optimizee_steps": M * horizon,
             "seconds": round(time.perf_counter() - t0, 2)}
    return grad, entry
