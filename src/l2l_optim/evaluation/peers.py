"""The optimizers a learned rule is measured against, their learning-rate grids and the search.

Four kinds of peer, each a way a user trains today:

================  ============================================================================
``adam``          Adam at a fixed learning rate, tuned on :data:`ADAM_GRID`
``sgd``           SGD with momentum 0.9 at a fixed learning rate, tuned on :data:`SGD_GRID`
``adamw-cosine``  AdamW with 5% linear warm-up and cosine decay to zero over the horizon,
                  tuned on :data:`ADAM_GRID` for each horizon separately
``schedule-free`` Schedule-Free AdamW at its defaults (``schedulefree``; losses in train mode)
``prodigy``       Prodigy at its defaults (``prodigyopt``, lr 1)
================  ============================================================================

The grids hold three points per decade (1, 2 and 5 times a power of ten). A grid is searched
rather than swept (:func:`search_grid`): one point per decade from the usual default until
the loss rises, then the fine neighbours of the best, so the best fine-grid point is found in
about half the runs of a full sweep wherever the loss is unimodal in the learning rate, and
the search widens past either end of the grid if the best point sits there.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch

__all__ = ["ADAM_GRID", "SGD_GRID", "PEERS", "TUNED", "UNTUNED", "make_peer", "warmup_cosine",
           "search_grid", "fine_grid"]


def fine_grid(lo: float, hi: float) -> tuple[float, ...]:
    """1, 2 and 5 times each power of ten from ``lo`` to ``hi`` (both included when on it).

    Example:
        >>> fine_grid(1e-3, 1e-1)
        (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)
    """
    out = []
    for e in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1):
        for m in (1, 2, 5):
            v = float(f"{m}e{e}")
            if lo * (1 - 1e-9) <= v <= hi * (1 + 1e-9):
                out.append(v)
    return tuple(out)


#: Adam's (and the scheduled AdamW's) grid: 1e-5 .. 1
ADAM_GRID = fine_grid(1e-5, 1.0)
#: SGD with momentum's grid: 1e-4 .. 5
SGD_GRID = fine_grid(1e-4, 5.0)
WARMUP = 0.05  # the scheduled baseline's linear warm-up, as a fraction of the horizon


def warmup_cosine(step: int, horizon: int, warmup: float = WARMUP) -> float:
    """The lr multiplier at ``step`` (0-based) of a run of ``horizon`` steps: linear warm-up over
    the first ``warmup`` of the run, then cosine decay to zero at the horizon.

    Example:
        >>> [round(warmup_cosine(t, 100), 3) for t in (0, 4, 5, 52, 99)]
        [0.2, 1.0, 1.0, 0.5, 0.0]
    """
    w = max(1, math.ceil(warmup * horizon))
    if step < w:
        return (step + 1) / w
    span = max(1, horizon - 1 - w)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - w) / span)))


def _schedule_free(params, lr):
    import schedulefree

    opt = schedulefree.AdamWScheduleFree(params) if lr is None else schedulefree.AdamWScheduleFree(params, lr=lr)
    opt.train()  # the parameters hold the point where gradients are taken; losses are read there
    return opt


def _prodigy(params, lr):
    from prodigyopt import Prodigy

    return Prodigy(params) if lr is None else Prodigy(params, lr=lr)


#: peer name -> (factory(params, lr), the grid it is tuned on or None, scheduled over the horizon)
PEERS: dict[str, tuple[Callable, tuple[float, ...] | None, bool]] = {
    "adam": (lambda ps, lr: torch.optim.Adam(ps, lr=lr), ADAM_GRID, False),
    "sgd": (lambda ps, lr: torch.optim.SGD(ps, lr=lr, momentum=0.9), SGD_GRID, False),
    "adamw-cosine": (lambda ps, lr: torch.optim.AdamW(ps, lr=lr), ADAM_GRID, True),
    "schedule-free": (_schedule_free, None, False),
    "prodigy": (_prodigy, None, False),
}
#: the peers tuned on a grid, and those run once at their defaults
TUNED = tuple(k for k, v in PEERS.items() if v[1] is not None)
UNTUNED = tuple(k for k, v in PEERS.items() if v[1] is None)
# where a grid search starts: the usual default of each optimizer
START_LRS = {"adam": 1e-3, "sgd": 1e-2, "adamw-cosine": 1e-3}


def make_peer(name: str, params: Iterable[torch.Tensor], lr: float | None = None) -> torch.optim.Optimizer:
    """A peer optimizer over ``params`` (``lr``: None for an untuned peer's default).

    Raises:
        ValueError: an unknown peer, or a tuned peer without an lr.
        ImportError: ``schedulefree`` or ``prodigyopt`` is not installed (``pip install
            'l2l-optim[eval]'``).
    """
    if name not in PEERS:
        raise ValueError(f"unknown peer {name!r}; known: {sorted(PEERS)}")
    factory, grid, _ = PEERS[name]
    if grid is not None and lr is None:
        raise ValueError(f"peer {name!r} is tuned: give its lr")
    try:
        return factory(list(params), lr)
    except ModuleNotFoundError as e:
        raise ImportError(f"peer {name!r} needs {e.name}: pip install 'l2l-optim[eval]'") from e


def search_grid(grid: Sequence[float], score: Callable[[float], float], start: float,
                known: Callable[[float], bool] = lambda lr: False) -> float:
    """The grid point of lowest ``score``, by a walk over decades and a fine refinement.

    Decade points (every third point of a 1-2-5 grid) are scored from ``start`` outwards, in
    the better direction, until the score rises; then the fine points within one decade of
    the best are scored. Points that ``known`` says are already available (cached runs) are
    scored first, for free. If the best point is at an end of ``grid``, the grid is extended
    by a decade on that side, and so on while the score keeps falling.

    Args:
        grid: ascending learning rates (:func:`fine_grid`).
        score: lr -> loss (inf or NaN for a diverged run: ranked last).
        start: the first point scored (snapped to the grid).
        known: whether an lr's score costs nothing (then it joins the search).

    Returns:
        The best lr found (the larger of equal scores).

    Example:
        >>> calls = []
        >>> best = search_grid(fine_grid(1e-4, 1.0), lambda lr: calls.append(lr) or abs(math.log10(lr / 0.02)), 1e-3)
        >>> best, len(calls) < len(fine_grid(1e-4, 1.0))
        (0.02, True)
    """
    grid = list(grid)
    scores: dict[float, float] = {}

    def at(lr: float) -> float:
        if lr not in scores:
            s = score(lr)
            scores[lr] = math.inf if math.isnan(s) else s
        return scores[lr]

    def best() -> float:
        return min(sorted(scores, reverse=True), key=lambda lr: scores[lr])

    for lr in grid:
        if known(lr):
            at(lr)
    i = min(range(len(grid)), key=lambda j: abs(math.log(grid[j] / start)))
    at(grid[i])
    for direction in (1, -1):
        j = i
        while 0 <= j + 3 * direction < len(grid):
            prev = at(grid[j])
            j += 3 * direction
            if at(grid[j]) > prev:
                break
    while True:
        # the fine neighbours of the best, until the best stops moving
        b = None
        while b != grid.index(best()):
            b = grid.index(best())
            for j in range(max(0, b - 2), min(len(grid), b + 3)):
                at(grid[j])
        if b == 0 and grid[0] > 1e-8:
            grid = list(fine_grid(grid[0] / 10, grid[0] / 2)) + grid
        elif b == len(grid) - 1 and grid[-1] < 1e3:
            grid = grid + list(fine_grid(grid[-1] * 2, grid[-1] * 10))
        else:
            return best()
