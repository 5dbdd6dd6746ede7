"""The rules that turn training curves into the verdicts of RESULTS.md, as pure functions.

A *run* is ``(curve, diverged)``: the per-step training losses and whether a non-finite loss
stopped it. The final loss of a run (:func:`final_loss`) is the package's tail mean
(:func:`l2l_optim.training.tail_mean`) over its last :func:`final_window` steps; a
diverged run's final loss is ``inf``, so it ranks below every finite one. A claim "A reaches
a lower loss than B" holds when A's mean final loss over seeds is finite and below B's
(:func:`beats`); when both sides have several seeds whose ranges overlap, the order of the
means is within run-to-run noise, and the comparison says so (:func:`seed_ranges_overlap`).
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from l2l_optim.training import tail_mean

__all__ = ["final_window", "final_loss", "finite", "stats", "loss_at", "mean_loss_at", "beats",
           "seed_ranges_overlap", "compare"]

Run = tuple[list[float], bool]


#: the longest window of the final loss: long runs are scored on their last 500 steps
FINAL_MAX_WINDOW = 500


def final_window(n: int) -> int:
    """Steps averaged for the final loss of ``n`` steps: the last 500, or the last 10% when fewer."""
    return min(FINAL_MAX_WINDOW, max(1, n // 10))


def final_loss(values: list[float]) -> float:
    """The final loss of a curve: the mean of its last :func:`final_window` values (nan when
    empty)."""
    return tail_mean(values, 0.1, max_window=FINAL_MAX_WINDOW)


def finite(x: Any) -> bool:
    """``x`` is a finite number (None, a string or an infinity is not)."""
    return isinstance(x, (int, float)) and math.isfinite(x)


def stats(values: list[float]) -> dict | None:
    """Mean, min, max and standard deviation of the finite values (None if there are none)."""
    vals = [v for v in values if finite(v)]
    if not vals:
        return None
    return {"mean": statistics.fmean(vals), "min": min(vals), "max": max(vals),
            "std": statistics.pstdev(vals) if len(vals) > 1 else 0.0, "n": len(vals)}


def loss_at(curve: list[float], diverged: bool, horizon: int) -> float:
    """The final loss of one run cut at step ``horizon``: inf if it diverged before getting there."""
    if diverged and len(curve) < horizon:
        return float("inf")
    return final_loss(curve[:horizon])


def mean_loss_at(runs: list[Run], horizon: int) -> float:
    """Mean over seeds of :func:`loss_at` (inf if any seed diverged, nan if there is no run)."""
    return _mean_over_seeds([loss_at(c, d, horizon) for c, d in runs])


def _mean_over_seeds(vals: list[float]) -> float:
    if any(math.isinf(v) for v in vals):
        return float("inf")
    return statistics.fmean(vals) if vals else float("nan")


def beats(a: float, b: float) -> bool:
    """Whether final loss ``a`` is below ``b``: a diverged ``b`` (inf) loses to any finite ``a``;
    a diverged ``a`` never wins; a missing side (nan) decides nothing."""
    return finite(a) and not math.isnan(b) and (math.isinf(b) or b > a)


def seed_ranges_overlap(per_a: list[float], per_b: list[float]) -> bool:
    """Both sides have several finite seeds and their [min, max] ranges intersect."""
    return (len(per_a) > 1 and len(per_b) > 1 and all(map(finite, per_a + per_b))
            and min(per_a) <= max(per_b) and min(per_b) <= max(per_a))


def compare(better: list[Run], worse: list[Run], horizon: int) -> dict:
    """The claim "``better`` reaches a lower loss than ``worse``" at step ``horizon``.

    Returns:
        ``{"better_loss", "worse_loss", "holds", "seed_ranges_overlap"}``.
    """
    per_a = [loss_at(c, d, horizon) for c, d in better]
    per_b = [loss_at(c, d, horizon) for c, d in worse]
    a, b = _mean_over_seeds(per_a), _mean_over_seeds(per_b)
    return {"better_loss": a, "worse_loss": b, "holds": beats(a, b),
            "seed_ranges_overlap": seed_ranges_overlap(per_a, per_b)}
