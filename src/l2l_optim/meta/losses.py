"""Meta-losses: what meta-training minimises over one trajectory of the optimizee.

With f_t the optimizee's minibatch loss after step t (t = 1..T over the whole trajectory):

* ``"weighted"`` (the paper's): sum_t w_t (f_t - f_{t-1}) with w_t = (t/T)^2. Minimising it
  maximises the weighted *decrease* f_{t-1} - f_t, with later steps weighing more. Each term
  is the decrease made by step t from where it started, so f_{t-1} enters it as a constant.
  Why: differentiated literally, the sum telescopes to w_T f_T - sum_t (w_{t+1} - w_t) f_t,
  which *rewards* high losses at every intermediate step (the coefficients are negative); an
  optimizer that climbs early and descends late would score well. The value logged is the
  same either way.
* ``"uniform"`` (Andrychowicz et al. 2016): sum_t f_t.
* ``"last"`` (Lv et al. 2017): f at the last step of each unroll.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["META_LOSSES", "meta_loss_coefficients", "check_meta_loss"]

META_LOSSES = ("weighted", "uniform", "last")


def check_meta_loss(meta_loss: str) -> None:
    """Raises ValueError naming the valid choices when ``meta_loss`` is not one of them."""
    if meta_loss not in META_LOSSES:
        raise ValueError(f"Invalid meta_loss: {meta_loss!r}; expected one of {META_LOSSES}")


def meta_loss_coefficients(meta_loss: str, steps: int) -> Tensor:
    """The per-step coefficients w_1..w_T of a meta-loss ((t/T)^2 for ``"weighted"``, else 1).

    Example:
        >>> meta_loss_coefficients("weighted", 4).tolist()
        [0.0625, 0.25, 0.5625, 1.0]
    """
    check_meta_loss(meta_loss)
    t = torch.arange(1, steps + 1, dtype=torch.float64)
    if meta_loss == "weighted":
        return (t / steps) ** 2
    return torch.ones(steps, dtype=torch.float64)
