"""The validation suite's protocol: a learned optimizer against tuned Adam and SGD.

(About 630 lines: the protocol, its baseline cache, the table, the plot and the command line
share one result type and are read together; the task definitions live in suite.py.)

For every task of a suite (:mod:`l2l_optim.suite`) and every seed, every optimizer starts
from the same initial weights and sees the same minibatches. The learned optimizer runs
through its public ``torch.optim`` class with ``lr=1.0`` and no schedule, the update as
meta-trained. Adam and SGD (no momentum) run once per learning rate of
:data:`EVAL_LRS` for ``steps`` steps. The *final loss* at a horizon ``H`` is the mean
training loss over the last 10% of the first ``H`` steps: a fixed-lr run's prefix is the
shorter run, so one long run serves every horizon. The best learning rate is chosen per
horizon and per optimizer; a run whose loss turned NaN/Inf before ``H`` ranks last. The
reported ratio is ``learned / min(best Adam, best SGD)`` (below 1: the learned optimizer
wins), with its geometric mean over tasks.

Baseline runs do not depend on the learned weights, so they are cached: a JSON file maps a
hash of each (task name, task config, data fingerprint, seed, lr grid, torch major.minor)
to the per-lr runs (their length, tail means at the horizons and every 2% of the run, a
100-bin loss curve, the step of divergence); a run serves every evaluation up to its length. The shipped file ``validation/baselines.json`` in the weights directory
is read first, then ``cache_dir``; what is missing is computed and written to ``cache_dir``.

Command line: ``python -m l2l_optim eval WEIGHTS [WEIGHTS ...]`` (see :func:`main`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .registry import get_architecture
from .suite import SuiteTask, get_suite
from .weights import resolve_net, weights_dirs

__all__ = ["EVAL_LRS", "TaskResult", "EvalResult", "evaluate", "baseline_entry", "format_table",
           "plot_results", "main"]

#: the learning-rate grid of the Adam and SGD baselines
EVAL_LRS = (1.0, 0.1, 0.01, 0.001, 1e-4)
TAIL = 0.1  # final loss: the mean over the last 10% of the steps
STALL = 0.95  # "stalled": final loss at least this fraction of the initial loss
CURVE_POINTS = 100
INITIAL_BATCHES = 10  # the initial loss: the initial model's mean over the first batches
_BASELINES = ("adam", "sgd")
_MAKERS = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}
_FORMAT = "l2l-optim-eval-baselines/1"
_PROTOCOL = 1  # bumped when the way a run is scored changes


# ------------------------------------------------------------------------------ runs


def _train(task: SuiteTask, make_opt: Callable, steps: int, seed: int) -> dict[str, Any]:
    """One training run: init under ``seed``, batches from a generator seeded by ``seed``.

    Returns ``{"losses", "seconds", "cpu_seconds", "skipped"}``; ``losses`` stops before the
    first non-finite loss. CPU time (of the whole process) is the cost that does not depend
    on what else the machine runs."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = task.model_fn()
    model.train()
    opt = make_opt([p for p in model.parameters() if p.requires_grad])
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    t0, c0 = time.perf_counter(), time.process_time()
    with warnings.catch_warnings():
        # a learned optimizer's skipped-step warning; the count is reported instead
        warnings.simplefilter("ignore", RuntimeWarning)
        for _ in range(steps):
            x, y = task.batch_fn(gen)
            loss = task.loss_fn(model(x), y)
            value = loss.item()
            if not math.isfinite(value):
                break
            losses.append(value)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return {"losses": losses, "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
            "skipped": int(getattr(opt, "skipped_steps", 0))}


@torch.no_grad()
def _initial_loss(task: SuiteTask, seed: int) -> float:
    """The initial model's mean loss over the first batches of the run's batch stream: the
    reference of the "stalled" flag, less noisy than the first step's loss alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = task.model_fn()
    model.train()  # as the runs see it (BatchNorm on batch statistics)
    gen = torch.Generator().manual_seed(seed)
    values = [float(task.loss_fn(model(x), y)) for x, y in (task.batch_fn(gen) for _ in range(INITIAL_BATCHES))]
    return sum(values) / len(values)


def _tail(losses: list[float], horizon: int) -> float:
    """Mean of the last 10% of the first ``horizon`` losses; inf if the run ended before."""
    if len(losses) < horizon:
        return math.inf
    k = max(1, int(horizon * TAIL))
    return sum(losses[horizon - k : horizon]) / k


def _record(run: dict[str, Any], steps: int, horizons: Sequence[int]) -> dict[str, Any]:
    """What is kept of a run: tail means at ``horizons`` and at every 2% of ``steps`` (so that
    shorter evaluations reuse the run), a CURVE_POINTS-bin mean curve, the divergence step."""
    losses, n = run["losses"], min(CURVE_POINTS, steps)
    grid = set(range(max(1, steps // 50), steps + 1, max(1, steps // 50)))
    tails = {str(h): _tail(losses, h) for h in sorted(grid | {h for h in horizons if h <= steps})}
    curve = [float(f"{sum(losses[lo:hi]) / (hi - lo):.6g}") if len(losses) >= hi else None
             for lo, hi in ((i * steps // n, (i + 1) * steps // n) for i in range(n))]
    return {"steps": steps, "tails": {h: (v if math.isfinite(v) else None) for h, v in tails.items()},
            "curve": curve, "diverged_at": len(losses) if len(losses) < steps else None,
            "skipped": run["skipped"], "seconds": round(run["seconds"], 2),
            "cpu_seconds": round(run.get("cpu_seconds", math.nan), 2)}


def _curve_upto(rec: dict[str, Any], steps: int) -> tuple[list[float], list[float | None]]:
    """The record's curve over its first ``steps`` steps, as (bin centres, bin means)."""
    n, total = len(rec["curve"]), rec["steps"]
    idx = [i for i in range(n) if (i + 1) * total // n <= steps]
    return [(i + 0.5) * total / n for i in idx], [rec["curve"][i] for i in idx]


# ----------------------------------------------------------------------------- cache


def _lr_key(lr: float) -> str:
    return f"{lr:g}"


def cache_key(task: SuiteTask, seed: int, lrs: Sequence[float] = EVAL_LRS) -> str:
    """The cache key of one task's baselines for one seed (16 hex characters).

    It hashes the task's name, config and data fingerprint, the seed, the lr grid, the
    scoring protocol and torch's major.minor version. The run length is not part of it: a
    record serves every evaluation of at most its length (a fixed-lr run's prefix is the
    shorter run)."""
    ident = {
        "protocol": _PROTOCOL, "name": task.name, "config": task.config,
        "data": task.data_fn() if task.data_fn is not None else None,
        "seed": seed, "lrs": [_lr_key(lr) for lr in lrs], "tail": TAIL,
        "torch": ".".join(torch.__version__.split(".")[:2]),
    }
    text = json.dumps(ident, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def shipped_baselines() -> list[Path]:
    """The shipped baseline files (``validation/baselines.json`` in the weights directories)."""
    return [p for d in weights_dirs() if (p := d / "validation" / "baselines.json").is_file()]


def _read_entries(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}  # a missing or unreadable cache only costs recomputation
    return data.get("entries", {}) if isinstance(data, dict) and data.get("format") == _FORMAT else {}


def _write_entry(path: Path, key: str, entry: dict[str, Any]) -> None:
    # re-read and merge, so that processes sharing the file lose none of each other's entries
    path.parent.mkdir(parents=True, exist_ok=True)
    entries = _read_entries(path)
    entries[key] = entry
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"format": _FORMAT, "entries": dict(sorted(entries.items()))}, indent=1) + "\n")
    os.replace(tmp, path)


def _missing(entry: dict[str, Any] | None, steps: int, horizons: Sequence[int],
             lrs: Sequence[float]) -> set[tuple[str, str]]:
    """The (optimizer, lr) runs that ``entry`` lacks, holds too short, or without a horizon."""
    wanted = {(o, _lr_key(lr)) for o in _BASELINES for lr in lrs}
    runs = (entry or {}).get("runs", {})
    return {(o, k) for o, k in wanted if (rec := runs.get(o, {}).get(k)) is None
            or rec["steps"] < steps or any(str(h) not in rec["tails"] for h in horizons)}


def baseline_entry(task: SuiteTask, *, steps: int, seed: int, horizons: Sequence[int],
                   cache_dir: str | os.PathLike | None = None, lrs: Sequence[float] = EVAL_LRS,
                   progress: bool = False) -> dict[str, Any]:
    """The Adam and SGD runs of one task and seed: from the shipped file or the cache, or run.

    Args:
        task: the task.
        steps: the run length needed.
        seed: the init and minibatch seed.
        horizons: the horizons whose tail means the entry must hold.
        cache_dir: where computed entries are written (default ``~/.cache/l2l_optim/eval``).
        lrs: the learning-rate grid.
        progress: print one line per computed run to stderr.

    Returns:
        ``{"task", "config", "seed", "torch", "initial_loss", "runs": {opt: {lr: record}}}``, each
        record holding its ``steps``, ``tails`` (horizon -> final loss, None if diverged),
        ``curve``, ``diverged_at``, ``skipped`` and ``seconds``.
    """
    key = cache_key(task, seed, lrs)
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "l2l_optim" / "eval"
    cache_path = Path(cache_dir or default) / "baselines.json"
    found = [e for path in [*shipped_baselines(), cache_path] if (e := _read_entries(path).get(key))]
    for e in found:  # the shipped file first
        if not _missing(e, steps, horizons, lrs):
            return e
    # resume from the most complete entry, or start one
    entry = min(found, key=lambda e: len(_missing(e, steps, horizons, lrs)), default=None) or {
        "task": task.name, "config": task.config, "seed": seed, "torch": torch.__version__,
        "initial_loss": _initial_loss(task, seed), "runs": {o: {} for o in _BASELINES}}
    for opt_name, lr_key in sorted(_missing(entry, steps, horizons, lrs), key=lambda m: (m[0], -float(m[1]))):
        old = entry["runs"][opt_name].get(lr_key, {"steps": 0, "tails": {}})
        # a rerun keeps the old horizons and length: the longer run holds the shorter one
        length = max(steps, old["steps"])
        hs = sorted(set(horizons) | {int(h) for h in old["tails"]})
        cls, lr = _MAKERS[opt_name], float(lr_key)
        run = _train(task, lambda ps: cls(ps, lr=lr), length, seed)
        entry["runs"][opt_name][lr_key] = _record(run, length, hs)
        _write_entry(cache_path, key, entry)  # after every run: an interrupted job resumes
        if progress:
            print(f"  baseline {task.name} seed {seed} {opt_name} lr={lr_key}: {run['seconds']:.1f} s"
                  + (f", diverged at step {len(run['losses'])}" if len(run["losses"]) < length else ""),
                  file=sys.stderr, flush=True)
    return entry


# --------------------------------------------------------------------------- results


@dataclass
class TaskResult:
    """One task at one horizon. Losses are final losses averaged over seeds, inf where a
    run diverged before the horizon.

    Attributes:
        initial_loss: the initial model's mean loss over the first 10 batches.
        adam_lr, adam_loss, sgd_lr, sgd_loss: the best learning rate and its final loss.
        learned_loss: the learned optimizer's final loss.
        ratio: ``learned_loss / min(adam_loss, sgd_loss)``; NaN when no baseline is finite.
        diverged: the learned run hit a NaN/Inf loss before the horizon (in some seed).
        stalled: ``learned_loss >= 0.95 * initial_loss``.
        skipped: steps the learned optimizer skipped for non-finite gradients (whole run).
        adam_by_lr, sgd_by_lr: every learning rate's final loss.
    """

    task: str
    horizon: int
    initial_loss: float
    adam_lr: float
    adam_loss: float
    sgd_lr: float
    sgd_loss: float
    learned_loss: float
    ratio: float
    diverged: bool
    stalled: bool
    skipped: int = 0
    adam_by_lr: dict[str, float] = field(default_factory=dict)
    sgd_by_lr: dict[str, float] = field(default_factory=dict)

    @property
    def flags(self) -> str:
        out = (["NaN/Inf"] if self.diverged else []) + (["stalled"] if self.stalled else [])
        return ", ".join(out + ([f"{self.skipped} skipped"] if self.skipped else []))


@dataclass
class EvalResult:
    """What :func:`evaluate` returns.

    Attributes:
        weights: the weights' description (source and fingerprint).
        rows: one :class:`TaskResult` per task and horizon.
        geomean: horizon -> geometric mean of the finite-baseline ratios over tasks.
        curves: task -> {"learned", "adam", "sgd"} -> {"step", "loss"}: binned loss curves
            (the baselines at their best lr for the longest horizon), averaged over seeds.
        ms_per_step: task -> {"seconds": wall, "cpu_seconds": CPU} milliseconds per step of
            the learned runs.
        tasks: task -> {"description", "params", "batch_size"}.
    """

    weights: str
    suite: str
    steps: int
    horizons: list[int]
    seeds: list[int]
    rows: list[TaskResult]
    geomean: dict[int, float]
    curves: dict[str, dict[str, dict[str, list]]]
    ms_per_step: dict[str, dict[str, float]]
    tasks: dict[str, dict[str, Any]]
    seconds: float

    def table(self) -> str:
        """The result as a markdown table (see :func:`format_table`)."""
        return format_table(self)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict; non-finite numbers become None."""
        return _jsonable(asdict(self))


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


def _tail_of(rec: dict[str, Any], h: int) -> float:
    v = rec["tails"][str(h)]
    return math.inf if v is None else v


def _best(by_lr: dict[str, float]) -> tuple[str, float]:
    # min keeps the first of equal scores (the larger lr); inf (diverged) ranks last, and
    # NaN, which never compares smaller, too
    return min(by_lr.items(), key=lambda kv: math.inf if math.isnan(kv[1]) else kv[1])


def _mean_curve(recs: list[dict[str, Any]], steps: int) -> dict[str, list]:
    """The records' curves up to ``steps``, averaged over seeds (None where a run had ended)."""
    curves = [_curve_upto(r, steps) for r in recs]
    xs = curves[0][0]
    same = [ys for x, ys in curves if x == xs]  # records of other lengths bin otherwise
    return {"step": xs, "loss": [None if any(c[i] is None for c in same) else sum(c[i] for c in same) / len(same)
                                 for i in range(len(xs))]}


def geometric_mean(ratios: Sequence[float]) -> float:
    """exp(mean(log r)) over the ratios that are not NaN; inf if any is inf."""
    vals = [r for r in ratios if not math.isnan(r)]
    if not vals:
        return math.nan
    if any(math.isinf(r) or r <= 0 for r in vals):
        return math.inf if any(math.isinf(r) for r in vals) else 0.0
    return math.exp(sum(math.log(r) for r in vals) / len(vals))


def task_rows(name: str, entries: list[dict[str, Any]], learned: list[dict[str, Any]],
              horizons: Sequence[int]) -> list[TaskResult]:
    """One task's results per horizon, from its baseline entries and learned records (one per
    seed, as :func:`baseline_entry` and the learned runs give them)."""
    init = sum(e["initial_loss"] for e in entries) / len(entries)
    rows = []
    for h in horizons:
        best = {}
        for o in _BASELINES:
            lrs = sorted(entries[0]["runs"][o], key=lambda k: -float(k))  # the grid's order
            by_lr = {k: _mean([_tail_of(e["runs"][o][k], h) for e in entries]) for k in lrs}
            best[o] = (by_lr, *_best(by_lr))
        loss = _mean([_tail_of(r, h) for r in learned])
        ref = min(best["adam"][2], best["sgd"][2])
        diverged = any(r["diverged_at"] is not None and r["diverged_at"] < h for r in learned)
        rows.append(TaskResult(
            task=name, horizon=h, initial_loss=init,
            adam_lr=float(best["adam"][1]), adam_loss=best["adam"][2],
            sgd_lr=float(best["sgd"][1]), sgd_loss=best["sgd"][2], learned_loss=loss,
            ratio=loss / ref if math.isfinite(ref) and ref > 0 else math.nan,
            diverged=diverged, stalled=not diverged and loss >= STALL * init,
            skipped=sum(r["skipped"] for r in learned),
            adam_by_lr=best["adam"][0], sgd_by_lr=best["sgd"][0]))
    return rows


def _horizons(steps: int, horizons: Sequence[int]) -> list[int]:
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return sorted({int(h) for h in horizons if 1 <= int(h) <= steps} | {steps})


def evaluate(weights: Any, *, suite: str | Sequence[SuiteTask] = "default", steps: int = 5000,
             horizons: Sequence[int] = (1000, 5000), seeds: Sequence[int] = (0,),
             tasks: Sequence[str] | None = None, cache_dir: str | os.PathLike | None = None,
             data_root: str | os.PathLike | None = None, progress: bool = True,
             threads: int | None = None, optimizer_kwargs: dict[str, Any] | None = None) -> EvalResult:
    """Run a learned optimizer on the validation suite and compare it with tuned Adam and SGD.

    Args:
        weights: anything :func:`l2l_optim.weights.resolve_net` accepts: a shipped name such
            as ``"simple"``, a ``.safetensors`` path, a run directory, an ``hf://`` address,
            or a net. The net's registered optimizer class runs it with ``lr=1.0``.
        suite: a suite name (``"default"``) or a list of :class:`~l2l_optim.suite.SuiteTask`.
        steps: the length of every run.
        horizons: the step counts at which final losses are compared; those above ``steps``
            are dropped and ``steps`` itself is always one.
        seeds: the init and minibatch seeds; losses are averaged over seeds.
        tasks: the names of the suite's tasks to run (default: all).
        cache_dir: where computed baselines are cached (default ``~/.cache/l2l_optim/eval``).
        data_root: a directory to look for the datasets in first.
        progress: print one line per run to stderr.
        threads: torch threads for the duration of the call (default: leave as is).
        optimizer_kwargs: extra keyword arguments of the learned optimizer, e.g.
            ``{"state_dtype": torch.bfloat16}`` (``lr`` stays 1.0; the baselines do not change).

    Returns:
        An :class:`EvalResult`; ``result.table()`` is the markdown table.

    Raises:
        ValueError: an unknown suite or task name, ``steps < 1`` or no seeds.
        DatasetNotFoundError: a task's dataset is not available locally.

    Example:
        The default suite reads MNIST and Fashion-MNIST from local files:

        >>> result = evaluate("simple", steps=1000)  # doctest: +SKIP
        >>> print(result.table())  # doctest: +SKIP

        Any list of :class:`~l2l_optim.suite.SuiteTask` works as a suite, e.g. a tiny
        regression (with a temporary cache, since its baselines are computed here):

        >>> import tempfile
        >>> import torch.nn.functional as F
        >>> from torch import nn
        >>> from l2l_optim.suite import SuiteTask
        >>> def batch(gen):
        ...     x = torch.randn(16, 4, generator=gen)
        ...     return x, x.sum(dim=1, keepdim=True)
        >>> tiny = SuiteTask(name="tiny", config={"features": 4}, model_fn=lambda: nn.Linear(4, 1),
        ...                  batch_fn=batch, loss_fn=F.mse_loss)
        >>> with tempfile.TemporaryDirectory() as cache:
        ...     result = evaluate("simple", suite=[tiny], steps=20, horizons=(20,),
        ...                       cache_dir=cache, progress=False)
        >>> [(row.task, row.horizon) for row in result.rows], sorted(result.geomean)
        ([('tiny', 20)], [20])
        >>> result.table().splitlines()[0]
        '| task | steps | best Adam (lr) | best SGD (lr) | learned | ratio | flags |'
    """
    t_start = time.perf_counter()
    hs = _horizons(steps, horizons)
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("seeds is empty")
    suite_tasks = get_suite(suite, data_root)
    if tasks is not None:
        unknown = sorted(set(tasks) - {t.name for t in suite_tasks})
        if unknown:
            raise ValueError(f"unknown tasks {unknown}; the suite has {[t.name for t in suite_tasks]}")
        suite_tasks = [t for t in suite_tasks if t.name in set(tasks)]
    net, description = resolve_net(weights)
    opt_cls = get_architecture(net.arch).optimizer_class
    kwargs = dict(optimizer_kwargs or {})
    if "lr" in kwargs or "weights" in kwargs:
        raise ValueError("optimizer_kwargs may not set lr or weights (the suite runs the net at lr=1.0)")
    if kwargs:
        opt_cls(torch.nn.Linear(1, 1).parameters(), weights=net)  # invalid options fail here, before any run
        description = f"{description} ({', '.join(f'{k}={v}' for k, v in sorted(kwargs.items()))})"
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    rows, curves, ms, info = [], {}, {}, {}
    try:
        for task in suite_tasks:
            entries = [baseline_entry(task, steps=steps, seed=s, horizons=hs, cache_dir=cache_dir,
                                      progress=progress) for s in seeds]
            learned = []
            for s in seeds:
                run = _train(task, lambda ps: opt_cls(ps, lr=1.0, weights=net, **kwargs), steps, s)
                learned.append(_record(run, steps, hs))
                if progress:
                    print(f"  learned  {task.name} seed {s}: {run['seconds']:.1f} s", file=sys.stderr, flush=True)
            ms[task.name] = {k: 1e3 * sum(r[k] for r in learned) / (steps * len(seeds))
                             for k in ("seconds", "cpu_seconds")}
            info[task.name] = {"description": task.description, "params": task.num_params(),
                               "batch_size": task.config.get("batch_size")}
            rows += task_rows(task.name, entries, learned, hs)
            # the baselines' curves at their best lr for the longest horizon (the last row)
            best_lr = {"adam": rows[-1].adam_lr, "sgd": rows[-1].sgd_lr}
            curves[task.name] = {"learned": _mean_curve(learned, steps)}
            for o in _BASELINES:
                curves[task.name][o] = _mean_curve([e["runs"][o][_lr_key(best_lr[o])] for e in entries], steps)
    finally:
        torch.set_num_threads(old_threads)
    geomean = {h: geometric_mean([r.ratio for r in rows if r.horizon == h]) for h in hs}
    return EvalResult(weights=description, suite=suite if isinstance(suite, str) else "custom",
                      steps=steps, horizons=hs, seeds=seeds, rows=rows, geomean=geomean, curves=curves,
                      ms_per_step=ms, tasks=info, seconds=time.perf_counter() - t_start)


# ------------------------------------------------------------------- table and plot


def _fmt(v: float) -> str:
    return "inf" if math.isinf(v) else "nan" if math.isnan(v) else f"{v:.4g}"


def format_table(result: EvalResult) -> str:
    """A markdown table: one row per task and horizon, then the geometric means."""
    head = ["task", "steps", "best Adam (lr)", "best SGD (lr)", "learned", "ratio", "flags"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(result.rows, key=lambda r: r.horizon):
        ratio = "n/a" if math.isnan(r.ratio) else f"{_fmt(r.ratio)}x"
        lines.append(f"| {r.task} | {r.horizon} | {_fmt(r.adam_loss)} ({r.adam_lr:g}) | "
                     f"{_fmt(r.sgd_loss)} ({r.sgd_lr:g}) | {_fmt(r.learned_loss)} | {ratio} | {r.flags} |")
    for h, g in result.geomean.items():
        lines.append(f"| **geometric mean** | {h} | | | | **{_fmt(g)}x** | |")
    note = (f"weights: {result.weights}; suite {result.suite}, seeds {result.seeds}; final loss = mean "
            f"training loss over the last 10% of the steps; learned lr=1.0; Adam/SGD: best lr of "
            f"{[f'{lr:g}' for lr in EVAL_LRS]} per horizon; ratio = learned / min(Adam, SGD).")
    return "\n".join(lines) + "\n\n" + note + "\n"


def plot_results(results: Sequence[EvalResult], path: str | os.PathLike) -> Path:
    """One panel per task: each learned curve against the best Adam and SGD (log-y).

    Raises:
        ImportError: matplotlib is not installed.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results[0].curves)
    ncols = min(len(names), 4)
    nrows = -(-len(names) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.3 * nrows), squeeze=False)
    for ax in axes.ravel()[len(names):]:
        ax.set_visible(False)
    for ax, name in zip(axes.ravel(), names):
        first = results[0]
        best = {r.task: r for r in first.rows if r.horizon == first.steps}[name]

        def draw(curve, label, **kw):
            pts = [(x, y) for x, y in zip(curve["step"], curve["loss"]) if y is not None and y > 0]
            if pts:
                ax.plot(*zip(*pts), label=label, **kw)

        draw(first.curves[name]["adam"], f"Adam lr={best.adam_lr:g}", color="tab:blue", ls="--")
        draw(first.curves[name]["sgd"], f"SGD lr={best.sgd_lr:g}", color="tab:green", ls="--")
        for res, color in zip(results, ["tab:red", "tab:purple", "tab:orange", "tab:brown", "black"] * 9):
            draw(res.curves[name]["learned"], res.weights.split(" (")[0], color=color)
        ax.set_yscale("log")
        ax.set_title(f"{name} ({first.tasks[name]['params']:,} params)", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel("training loss", fontsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """``python -m l2l_optim eval WEIGHTS [WEIGHTS ...]``: the table, eval.json and eval.png."""
    p = argparse.ArgumentParser(prog="l2l-optim eval", description=__doc__.split("\n\n")[0])
    p.add_argument("weights", nargs="*", help="shipped names, .safetensors paths or run directories")
    p.add_argument("--steps", type=int, default=5000, help="run length (default 5000)")
    p.add_argument("--horizons", type=int, nargs="+", default=[1000, 5000],
                   help="horizons compared (those above --steps are dropped; --steps always is one)")
    p.add_argument("--tasks", nargs="+", default=None, help="a subset of the suite's tasks")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--suite", default="default")
    p.add_argument("--out-dir", default="runs/eval", help="where eval.json and eval.png go")
    p.add_argument("--cache-dir", default=None, help="baseline cache (default ~/.cache/l2l_optim/eval)")
    p.add_argument("--data-root", default=None, help="a directory holding the datasets")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1; 0: torch's default)")
    p.add_argument("--baselines-only", action="store_true", help="compute the baseline cache and stop")
    p.add_argument("--no-plot", dest="plot", action="store_false")
    p.add_argument("--quiet", action="store_true", help="no per-run progress lines")
    p.add_argument("--state-dtype", default=None, choices=["float32", "bfloat16", "float64"],
                   help="hidden-state dtype of the learned optimizer (default: the optimizer's)")
    args = p.parse_args(argv)
    if not args.weights and not args.baselines_only:
        p.error("give at least one WEIGHTS (or --baselines-only)")
    threads = args.threads or None
    if args.baselines_only:
        torch.set_num_threads(threads or torch.get_num_threads())
        hs = _horizons(args.steps, args.horizons)
        for task in get_suite(args.suite, args.data_root):
            for s in args.seeds if not args.tasks or task.name in args.tasks else ():
                baseline_entry(task, steps=args.steps, seed=s, horizons=hs, cache_dir=args.cache_dir,
                               progress=not args.quiet)
        return 0
    results = []
    opt_kwargs = {"state_dtype": getattr(torch, args.state_dtype)} if args.state_dtype else None
    for w in args.weights:
        try:
            res = evaluate(w, suite=args.suite, steps=args.steps, horizons=args.horizons, seeds=args.seeds,
                           tasks=args.tasks, cache_dir=args.cache_dir, data_root=args.data_root,
                           progress=not args.quiet, threads=threads, optimizer_kwargs=opt_kwargs)
        except (ValueError, TypeError, FileNotFoundError) as e:  # bad names, weights or datasets
            print(f"l2l-optim eval: error: {e}", file=sys.stderr)
            return 2
        results.append(res)
        print(f"\n{res.table()}")
        print("learned ms/step (wall/CPU): " + ", ".join(
            f"{k} {v['seconds']:.1f}/{v['cpu_seconds']:.1f}" for k, v in res.ms_per_step.items())
            + f"; total {res.seconds:.0f} s", flush=True)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m l2l_optim eval " + " ".join(sys.argv[1:] if argv is None else argv)
    meta = {"command": command, "torch": torch.__version__, "threads": threads or torch.get_num_threads()}
    (out / "eval.json").write_text(json.dumps({**meta, "results": [r.to_dict() for r in results]}, indent=1) + "\n")
    print(f"wrote {out / 'eval.json'}")
    if args.plot:
        print(f"wrote {plot_results(results, out / 'eval.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
