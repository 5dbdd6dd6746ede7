"""What an ES meta-training run is set to, and what each of its generations draws.

Shared by the ES estimator (:mod:`.es`) and the truncated-BPTT estimator on the same
generations (:mod:`.population_bptt`), so that both see the same tasks and horizons.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..rule import INPUT_NORMS
from .families import FAMILIES, VARIANTS, TaskSpec, sample_spec
from .population import OBJECTIVES

__all__ = ["ESConfig", "draw_generation"]

# the families whose step costs several times the others' (meta-bench prints the rates)
_SLOW_FAMILIES = ("conv", "lm")


@dataclass
class ESConfig:
    """Settings of ES meta-training (all recorded in the checkpoint and the weight file).

    Args:
        families: the task families generations draw from (:data:`~.families.FAMILIES`, or
            a size variant of one, :data:`~.families.VARIANTS`).
        instances: task instances (inits, batches, scales) per generation.
        pairs: antithetic direction pairs per generation (shared by all instances).
        horizons: optimizee steps of a generation, drawn uniformly from this tuple.
        sigma: perturbation size in relative coordinates.
        meta_lr: Adam's learning rate in relative coordinates.
        generations: total generations of the run.
        scaled_fraction: fraction of instances with scale augmentation.
        scale_range: the log-uniform range of parameter and loss scales.
        slow_horizon: the longest horizon of the families that cost several times more per
            step (``conv``, ``lm``), so one generation never takes many times the median.
        seed: seeds every generation.
        objective: ``"weighted"`` (:func:`~.population.fitness`: the t-weighted mean of
            ``log(f_t / f_0)`` over the run) or ``"final"`` (:func:`~.population.final_fitness`:
            ``log`` of the mean loss over the last 10% of the steps, the validation suite's
            measure, relative to ``f_0``).
        max_recurrent_norm: if set, the largest singular value of ``W_hh`` is kept at or below
            it (:func:`project_recurrent_norm` after every step and on the starting weights).
            Below 1 the recurrence is a contraction: the hidden state, and so the step, decays
            to zero as the gradients do, so the rule cannot keep stepping on its own late in
            training. Unconstrained ES drifts above 1 (why: weights/README.md).
        input_norm: the net's input (:data:`~l2l_optim.nets.INPUT_NORMS`): ``None``, the
            paper's raw gradient, or ``"rms"``, the gradient over its running root mean
            square. It must match the starting weights' (or, for an init name such as
            ``"adam"``, it is the net that init builds).
        averaging: the net's Schedule-Free interpolation weight
            (:class:`~l2l_optim.nets.SimpleOptimizerNet`; 0 is off). Like ``input_norm``
            it must match the starting weights'.
    """

    families: tuple[str, ...] = FAMILIES
    instances: int = 4
    pairs: int = 8
    horizons: tuple[int, ...] = (300, 1000, 2000)
    sigma: float = 0.05
    meta_lr: float = 0.01
    generations: int = 500
    scaled_fraction: float = 0.25
    scale_range: tuple[float, float] = (1e-3, 1e3)
    slow_horizon: int = 500
    seed: int = 0
    objective: str = "weighted"
    max_recurrent_norm: float | None = None
    input_norm: str | None = None
    averaging: float = 0.0

    def validate(self) -> None:
        known = FAMILIES + tuple(VARIANTS)
        bad = [f for f in self.families if f not in known]
        if bad or not self.families:
            raise ValueError(f"unknown task families {bad}; known: {known}")
        if self.instances < 1 or self.pairs < 1 or not self.horizons or min(self.horizons) < 1:
            raise ValueError("instances, pairs and every horizon must be >= 1")
        if not (self.sigma > 0 and self.meta_lr > 0):
            raise ValueError(f"sigma and meta_lr must be positive, got {self.sigma}, {self.meta_lr}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; known: {sorted(OBJECTIVES)}")
        if self.input_norm not in INPUT_NORMS:
            raise ValueError(f"Invalid input_norm: {self.input_norm!r}; expected one of {INPUT_NORMS}")
        if not 0.0 <= self.averaging < 1.0:
            raise ValueError(f"averaging must be in [0, 1), got {self.averaging}")
        if self.max_recurrent_norm is not None and not self.max_recurrent_norm > 0:
            raise ValueError(f"max_recurrent_norm must be positive, got {self.max_recurrent_norm}")


def draw_generation(cfg: ESConfig, generation: int) -> tuple[int, TaskSpec, int]:
    """A generation's seed, task and horizon: a function of ``(cfg.seed, generation)`` only."""
    seed = cfg.seed * 1_000_003 + generation
    rng = random.Random(seed)
    spec = sample_spec(rng, cfg.families)
    horizon = rng.choice(cfg.horizons)
    if spec.family in _SLOW_FAMILIES:
        horizon = min(horizon, cfg.slow_horizon)
    return seed, spec, horizon
