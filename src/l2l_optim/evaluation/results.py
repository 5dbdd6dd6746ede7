"""What an evaluation reports: per task and horizon, the learned loss against each peer's.

:func:`task_rows` turns a task's cached baseline runs and the learned runs into
:class:`TaskResult` rows (the best lr per peer and horizon, the ratios, the flags);
:class:`EvalResult` holds them with the geometric means, the curves and the timings.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .peers import UNTUNED

__all__ = ["RATIOS", "SELF_TUNED", "TaskResult", "EvalResult", "geometric_mean", "merge_results", "task_rows"]

STALL = 0.95  # "stalled": final loss at least this fraction of the initial loss
ADAM_DEFAULT = 1e-3
SELF_TUNED = 1.05  # lr=1 counts as self-tuned within 5% of the best multiplier


def lr_key(lr: float | None) -> str:
    """How a run's lr names it in the records (``"default"`` for a peer at its defaults)."""
    return "default" if lr is None else f"{lr:g}"


def tail_of(rec: dict[str, Any], h: int) -> float:
    """A record's final loss at horizon ``h`` (inf where the run had diverged)."""
    v = rec["tails"].get(str(h))
    return math.inf if v is None else v


def _curve_upto(rec: dict[str, Any], steps: int) -> tuple[list[float], list[float | None]]:
    """The record's curve over its first ``steps`` steps, as (bin centres, bin means)."""
    n, total = len(rec["curve"]), rec["steps"]
    idx = [i for i in range(n) if (i + 1) * total // n <= steps]
    return [(i + 0.5) * total / n for i in idx], [rec["curve"][i] for i in idx]


@dataclass
class TaskResult:
    """One task at one horizon. Losses are final losses averaged over seeds, inf where a
    run diverged before the horizon; ratios are the learned loss over a peer's (NaN where
    the peer has no finite loss).

    Attributes:
        initial_loss: the initial model's mean loss over the first 10 batches.
        adam_default_loss: Adam at lr 1e-3.
        adam_lr, adam_loss, sgd_lr, sgd_loss: each fixed-lr peer's best lr and its loss.
        cosine_lr, cosine_loss: the scheduled AdamW's best lr for this horizon and its loss.
        schedule_free_loss, prodigy_loss: the untuned peers at their defaults.
        learned_loss: the learned optimizer at lr=1.
        learned_cosine_loss: the learned optimizer under the warm-up-cosine multiplier.
        learned_by_multiplier: lr multiplier -> loss.
        ratio: learned / min(best Adam, best SGD).
        vs_adam_default, vs_cosine, vs_schedule_free, vs_prodigy: the other ratios
            (``vs_cosine`` compares the two scheduled runs).
        best_multiplier: the multiplier of lowest loss.
        diverged: the learned run hit a NaN/Inf loss before the horizon (in some seed).
        stalled: ``learned_loss >= 0.95 * initial_loss``.
        skipped: steps the learned optimizer skipped for non-finite gradients (lr=1 run).
        adam_by_lr, sgd_by_lr, cosine_by_lr: every searched lr's loss.
    """

    task: str
    horizon: int
    initial_loss: float
    adam_default_loss: float
    adam_lr: float
    adam_loss: float
    sgd_lr: float
    sgd_loss: float
    cosine_lr: float
    cosine_loss: float
    schedule_free_loss: float
    prodigy_loss: float
    learned_loss: float
    learned_cosine_loss: float
    learned_by_multiplier: dict[str, float]
    ratio: float
    vs_adam_default: float
    vs_cosine: float
    vs_schedule_free: float
    vs_prodigy: float
    best_multiplier: float
    diverged: bool
    stalled: bool
    skipped: int = 0
    adam_by_lr: dict[str, float] = field(default_factory=dict)
    sgd_by_lr: dict[str, float] = field(default_factory=dict)
    cosine_by_lr: dict[str, float] = field(default_factory=dict)

    @property
    def flags(self) -> str:
        out = (["NaN/Inf"] if self.diverged else []) + (["stalled"] if self.stalled else [])
        return ", ".join(out + ([f"{self.skipped} skipped"] if self.skipped else []))

    @property
    def self_tuned(self) -> bool:
        """lr=1 is within 5% of the rule's best multiplier."""
        best = min(self.learned_by_multiplier.values(), default=math.nan)
        return self.learned_loss <= SELF_TUNED * best if math.isfinite(best) else math.isfinite(self.learned_loss)


#: the ratio columns of a row, in table order
RATIOS = ("vs_adam_default", "ratio", "vs_cosine", "vs_schedule_free", "vs_prodigy")


@dataclass
class EvalResult:
    """What :func:`evaluate` returns.

    Attributes:
        weights: the weights' description (source and fingerprint).
        rows: one :class:`TaskResult` per task and horizon.
        geomean: horizon -> geometric mean of ``ratio`` over tasks.
        geomeans: ratio column -> horizon -> geometric mean over tasks.
        curves: task -> {"learned", "adam", "sgd", "schedule-free"} -> {"step", "loss"}:
            binned loss curves (the tuned peers at their best lr for the longest horizon),
            averaged over seeds.
        ms_per_step: task -> {"seconds": wall, "cpu_seconds": CPU} milliseconds per step of
            the learned lr=1 runs.
        tasks: task -> {"description", "params", "batch_size"}.
    """

    weights: str
    suite: str
    steps: int
    horizons: list[int]
    seeds: list[int]
    rows: list[TaskResult]
    geomean: dict[int, float]
    geomeans: dict[str, dict[int, float]]
    curves: dict[str, dict[str, dict[str, list]]]
    ms_per_step: dict[str, dict[str, float]]
    tasks: dict[str, dict[str, Any]]
    seconds: float
    quick: bool = False

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict; non-finite numbers become None."""
        return _jsonable(asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EvalResult":
        """The inverse of :meth:`to_dict` (None read back as inf for losses, NaN for ratios).

        Raises:
            KeyError: ``d`` lacks a field.
        """
        rows = [TaskResult(**{k: _unjson(k, v) for k, v in row.items()}) for row in d["rows"]]
        ints = lambda m: {int(h): (math.nan if v is None else v) for h, v in m.items()}  # noqa: E731
        return cls(weights=d["weights"], suite=d["suite"], steps=d["steps"], horizons=list(d["horizons"]),
                   seeds=list(d["seeds"]), rows=rows, geomean=ints(d["geomean"]),
                   geomeans={c: ints(m) for c, m in d["geomeans"].items()}, curves=d["curves"],
                   ms_per_step=d["ms_per_step"], tasks=d["tasks"], seconds=d["seconds"],
                   quick=d.get("quick", False))


def _unjson(name: str, v: Any) -> Any:
    # to_dict wrote non-finite numbers as None: losses are inf (diverged), ratios NaN
    if name in ("learned_by_multiplier", "adam_by_lr", "sgd_by_lr", "cosine_by_lr"):
        return {k: math.inf if x is None else x for k, x in v.items()}
    if v is None:
        return math.nan if name in RATIOS or name.endswith("_lr") or name == "best_multiplier" else math.inf
    return v


def merge_results(results: Sequence[EvalResult]) -> EvalResult:
    """One result from evaluations of the same weights on different tasks (for example one
    run per task), with the geometric means over all of their rows.

    Args:
        results: evaluations with the same weights, steps, seeds and mode, on disjoint tasks.

    Returns:
        An :class:`EvalResult` over the union of the tasks, at the horizons they share.

    Raises:
        ValueError: no results, different weights/steps/seeds/mode, or a task in two results.

    Example:
        >>> row = lambda task: TaskResult(task, 100, 1.0, *[0.5] * 11, {"1": 0.5}, *[1.0] * 5, 1.0, False, False)
        >>> part = lambda task, r: EvalResult("w", "default", 100, [100], [0], [row(task)], {100: r},
        ...                                   {c: {100: r} for c in RATIOS}, {}, {}, {}, 1.0)
        >>> merged = merge_results([part("a", 1.0), part("b", 1.0)])
        >>> [r.task for r in merged.rows], merged.seconds
        (['a', 'b'], 2.0)
    """
    if not results:
        raise ValueError("no results to merge")
    first = results[0]
    for r in results[1:]:
        if (r.weights, r.steps, r.seeds, r.quick) != (first.weights, first.steps, first.seeds, first.quick):
            raise ValueError(f"cannot merge evaluations of {r.weights!r} ({r.steps} steps, seeds {r.seeds}, "
                             f"quick={r.quick}) and {first.weights!r} ({first.steps} steps, seeds "
                             f"{first.seeds}, quick={first.quick})")
    names = [t for r in results for t in dict.fromkeys(row.task for row in r.rows)]
    if len(names) != len(set(names)):
        raise ValueError(f"a task appears in more than one result: {sorted({t for t in names if names.count(t) > 1})}")
    rows = [row for r in results for row in r.rows]
    hs = sorted({row.horizon for row in rows})
    geomeans = {col: {h: geometric_mean([getattr(r, col) for r in rows if r.horizon == h]) for h in hs}
                for col in RATIOS}
    merged = lambda attr: {k: v for r in results for k, v in getattr(r, attr).items()}  # noqa: E731
    return EvalResult(weights=first.weights, suite=first.suite, steps=first.steps, horizons=hs,
                      seeds=first.seeds, rows=rows, geomean=geomeans["ratio"], geomeans=geomeans,
                      curves=merged("curves"), ms_per_step=merged("ms_per_step"), tasks=merged("tasks"),
                      seconds=sum(r.seconds for r in results), quick=first.quick)


def _jsonable(v: Any) -> Any:
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if all(math.isfinite(v) for v in values) else math.inf


def _best(by_lr: dict[str, float]) -> tuple[str, float]:
    # min keeps the first of equal scores (the larger lr); inf (diverged) ranks last, and
    # NaN, which never compares smaller, too
    if not by_lr:
        return "nan", math.inf
    return min(sorted(by_lr.items(), key=lambda kv: -float(kv[0])),
               key=lambda kv: math.inf if math.isnan(kv[1]) else kv[1])


def mean_curve(recs: list[dict[str, Any]], steps: int) -> dict[str, list]:
    """The records' curves up to ``steps``, averaged over seeds (None where a run had ended)."""
    curves = [_curve_upto(r, steps) for r in recs]
    xs = curves[0][0]
    same = [ys for x, ys in curves if x == xs]  # records of other lengths bin otherwise
    return {"step": xs, "loss": [None if any(c[i] is None for c in same) else sum(c[i] for c in same) / len(same)
                                 for i in range(len(xs))]}


def geometric_mean(ratios: Sequence[float]) -> float:
    """exp(mean(log r)) over the ratios that are not NaN; inf if any is inf.

    Example:
        >>> geometric_mean([0.5, 2.0, math.nan])
        1.0
    """
    vals = [r for r in ratios if not math.isnan(r)]
    if not vals:
        return math.nan
    if any(math.isinf(r) or r <= 0 for r in vals):
        return math.inf if any(math.isinf(r) for r in vals) else 0.0
    return math.exp(sum(math.log(r) for r in vals) / len(vals))


def _div(a: float, b: float) -> float:
    return a / b if math.isfinite(b) and b > 0 else math.nan


def _by_lr(entries: list[dict[str, Any]], run_key: str, h: int) -> dict[str, float]:
    """lr -> seed-mean final loss at ``h``, over the lrs every seed's entry holds."""
    common = set.intersection(*(set(e["runs"].get(run_key, {})) for e in entries))
    return {k: _mean([tail_of(e["runs"][run_key][k], h) for e in entries]) for k in common
            if all(str(h) in e["runs"][run_key][k]["tails"] for e in entries)}


def task_rows(name: str, entries: list[dict[str, Any]], learned: dict[str, list[dict[str, Any]]],
              horizons: Sequence[int]) -> list[TaskResult]:
    """One task's results per horizon, from its baseline entries (one per seed) and learned
    records (run name -> one record per seed: ``"1"``, the other multipliers, ``"cosine@H"``)."""
    init = sum(e["initial_loss"] for e in entries) / len(entries)
    rows = []
    for h in horizons:
        adam, sgd, cos = _by_lr(entries, "adam", h), _by_lr(entries, "sgd", h), _by_lr(entries, f"adamw-cosine@{h}", h)
        (adam_lr, adam_loss), (sgd_lr, sgd_loss), (cos_lr, cos_loss) = _best(adam), _best(sgd), _best(cos)
        untuned = {p: _mean([tail_of(e["runs"][p]["default"], h) for e in entries])
                   if all(p in e["runs"] for e in entries) else math.nan for p in UNTUNED}
        loss = _mean([tail_of(r, h) for r in learned["1"]])
        mults = {k: _mean([tail_of(r, h) for r in learned[k]]) for k in learned if not k.startswith("cosine")}
        cos_runs = learned.get(f"cosine@{h}")
        learned_cos = _mean([tail_of(r, h) for r in cos_runs]) if cos_runs else math.nan
        diverged = any(r["diverged_at"] is not None and r["diverged_at"] < h for r in learned["1"])
        best_mult = _best({k: v for k, v in mults.items()})[0]
        rows.append(TaskResult(
            task=name, horizon=h, initial_loss=init, adam_default_loss=adam.get(lr_key(ADAM_DEFAULT), math.nan),
            adam_lr=float(adam_lr), adam_loss=adam_loss, sgd_lr=float(sgd_lr), sgd_loss=sgd_loss,
            cosine_lr=float(cos_lr), cosine_loss=cos_loss,
            schedule_free_loss=untuned["schedule-free"], prodigy_loss=untuned["prodigy"],
            learned_loss=loss, learned_cosine_loss=learned_cos, learned_by_multiplier=mults,
            ratio=_div(loss, min(adam_loss, sgd_loss)),
            vs_adam_default=_div(loss, adam.get(lr_key(ADAM_DEFAULT), math.nan)),
            vs_cosine=_div(learned_cos, cos_loss),
            vs_schedule_free=_div(loss, untuned["schedule-free"]), vs_prodigy=_div(loss, untuned["prodigy"]),
            best_multiplier=float(best_mult),
            diverged=diverged, stalled=not diverged and loss >= STALL * init,
            skipped=sum(r["skipped"] for r in learned["1"]),
            adam_by_lr=adam, sgd_by_lr=sgd, cosine_by_lr=cos))
    return rows
