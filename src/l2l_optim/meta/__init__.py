"""Meta-training: learn a coordinate-wise optimizer net's weights on optimizee tasks.

* :mod:`.init_rules`: the starting points of meta-training (a net set to SGD, Adam-like
  momentum, Schedule-Free AdamW's base step, sign momentum).
* :mod:`.losses`: the meta-losses (weighted difference, uniform, last).
* :mod:`.trajectory`: one optimizee trajectory, as an evaluation run or with truncated-BPTT
  meta-updates.
* :mod:`.fit`: :func:`meta_fit`, the seeded, logged, checkpointed loop over trajectories.
* :mod:`.families`: a vectorised population of small optimizees (six task families, scale
  augmentation), :mod:`.population`: all of them trained at once, each by its own rule.
* :mod:`.es`: antithetic ES over the population, long horizons, resumable
  (:func:`~.es.meta_train_es`).
"""

from .fit import MetaFitConfig, MetaFitResult, main, meta_fit
from .losses import META_LOSSES, meta_loss_coefficients
from .trajectory import meta_lr_scales, run_trajectory

__all__ = [
    "MetaFitConfig",
    "MetaFitResult",
    "meta_fit",
    "main",
    "META_LOSSES",
    "meta_loss_coefficients",
    "meta_lr_scales",
    "run_trajectory",
]
