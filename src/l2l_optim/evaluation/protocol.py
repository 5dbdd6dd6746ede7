"""The validation protocol: a learned optimizer against tuned and tuning-free peers.

For every task of a suite (:mod:`.suite`) and every seed, every optimizer starts from the same
initial weights and sees the same minibatches. The *final loss* at a horizon ``H`` is the mean
training loss over the last 10% of the first ``H`` steps (:func:`~l2l_optim.training.tail_mean`);
a fixed-lr run's prefix is the shorter run, so one long run serves every horizon, while a
scheduled run (warm-up and cosine decay over ``H``) is its own run per horizon. A run whose
loss turned NaN/Inf before ``H`` ranks last.

The peers (:mod:`.peers`): Adam and SGD with momentum at fixed learning rates, each tuned per
horizon on a fine grid; AdamW with warm-up and cosine decay, tuned per horizon; Schedule-Free
AdamW and Prodigy at their defaults. The learned optimizer runs through its public
``torch.optim`` class at ``lr=1`` with no schedule; unless ``quick``, also at the lr
multipliers 0.3 and 3 (does ``lr=1`` sit at the rule's own best?) and under the same
warm-up-cosine multiplier as the scheduled AdamW.

Each row reports the learned loss over: Adam at its default lr 1e-3; the best fixed-lr Adam or
SGD; the best scheduled AdamW (with the learned rule under the same schedule); Schedule-Free
AdamW; Prodigy. Below 1 the learned optimizer wins.

Baseline runs do not depend on the learned weights, so they are cached: a JSON file maps a
hash of each (task name, task config, data fingerprint, seed, grids, torch major.minor) to the
runs (their length, tail means at the horizons and every 2% of the run, a 100-bin loss curve,
the step of divergence). The shipped file ``validation/baselines.json`` in the weights
directory is read first, then ``cache_dir``; what is missing is computed and written to
``cache_dir`` after every run, so an interrupted job resumes.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..optimizer import optimizer_class
from ..training import tail_mean, train_task
from ..hub import resolve_net
from ..nonfinite import SkippedStepWarning
from ..weights import weights_dirs
from .peers import PEERS, TUNED, UNTUNED, START_LRS, make_peer, search_grid, warmup_cosine
from .results import RATIOS, EvalResult, TaskResult, lr_key, mean_curve, tail_of, geometric_mean, task_rows
from .suite import SuiteTask, get_suite

__all__ = ["MULTIPLIERS", "TaskResult", "EvalResult", "evaluate", "baseline_entry", "cache_key",
           "geometric_mean", "task_rows"]

TAIL = 0.1  # final loss: the mean over the last 10% of the steps
CURVE_POINTS = 100
INITIAL_BATCHES = 10  # the initial loss: the initial model's mean over the first batches
#: the learned optimizer's lr multipliers: does lr=1 sit at the rule's own best?
MULTIPLIERS = (0.3, 1.0, 3.0)
_FORMAT = "l2l-optim-eval-baselines/2"
_PROTOCOL = 2  # bumped when the way a run is scored changes


# ------------------------------------------------------------------------------ runs


def _train(task: SuiteTask, make_opt: Callable, steps: int, seed: int,
           schedule: Callable[[int], float] | None = None) -> dict[str, Any]:
    """One run of :func:`~l2l_optim.training.train_task` as the cache records it: ``{"losses",
    "seconds", "cpu_seconds", "skipped"}``; a learned optimizer's skipped-step warnings are
    silenced (the count is reported instead)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedStepWarning)
        r = train_task(task, make_opt, steps=steps, seed=seed, schedule=schedule)
    return {"losses": r.losses, "seconds": r.seconds, "cpu_seconds": r.cpu_seconds, "skipped": r.skipped}


@torch.no_grad()
def _initial_loss(task: SuiteTask, seed: int) -> float:
    """The initial model's mean loss over the first batches of the run's batch stream: the
    reference of the "stalled" flag, less noisy than the first step's loss alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = task.model_fn()
    model.train()  # as the runs see it (BatchNorm on batch statistics)
    gen = torch.Generator().manual_seed(seed)
    values = [float(task.loss_fn(model(x), y)) for x, y in (task.sample_batch(gen) for _ in range(INITIAL_BATCHES))]
    return sum(values) / len(values)


def _tail(losses: list[float], horizon: int) -> float:
    """The final loss at ``horizon``; inf if the run ended before."""
    return tail_mean(losses[:horizon], TAIL) if len(losses) >= horizon else math.inf


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


# ----------------------------------------------------------------------------- cache


def _run_key(peer: str, horizon: int | None = None) -> str:
    return peer if horizon is None else f"{peer}@{horizon}"


def cache_key(task: SuiteTask, seed: int) -> str:
    """The cache key of one task's baselines for one seed (16 hex characters).

    It hashes the task's name, config and data fingerprint, the seed, the peers and their
    grids, the scoring protocol and torch's major.minor version. The run length is not part
    of it: a record serves every evaluation of at most its length."""
    ident = {
        "protocol": _PROTOCOL, "name": task.name, "config": task.config,
        "data": task.data_fn() if task.data_fn is not None else None,
        "seed": seed, "tail": TAIL, "warmup": "5% linear, cosine to 0",
        "peers": {k: [lr_key(x) for x in v[1]] if v[1] else None for k, v in sorted(PEERS.items())},
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


def _covers(rec: dict[str, Any] | None, steps: int, horizons: Sequence[int]) -> bool:
    return rec is not None and rec["steps"] >= steps and all(str(h) in rec["tails"] for h in horizons)


def _merge(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """One entry holding every run of ``entries`` (the longer record of two)."""
    out = copy.deepcopy(entries[0])
    for e in entries[1:]:
        for peer, runs in e["runs"].items():
            for k, rec in runs.items():
                old = out["runs"].setdefault(peer, {}).get(k)
                if old is None or rec["steps"] > old["steps"]:
                    out["runs"][peer][k] = rec
    return out


def baseline_entry(task: SuiteTask, *, steps: int, seed: int, horizons: Sequence[int],
                   cache_dir: str | os.PathLike | None = None, progress: bool = False) -> dict[str, Any]:
    """Every peer's runs for one task and seed: from the shipped file or the cache, or run.

    Each tuned peer's grid is searched per horizon (:func:`~.peers.search_grid`); a run that
    the files already hold costs nothing, so an entry that covers the request runs nothing.

    Args:
        task: the task.
        steps: the run length of the fixed-lr and untuned peers.
        seed: the init and minibatch seed.
        horizons: the horizons to tune for (each at most ``steps``).
        cache_dir: where computed entries are written (default ``~/.cache/l2l_optim/eval``).
        progress: print one line per computed run to stderr.

    Returns:
        ``{"task", "config", "seed", "torch", "initial_loss", "runs": {run key: {lr: record}}}``;
        run keys are the peer names, and ``"adamw-cosine@H"`` for the scheduled runs of
        horizon H; an untuned peer's lr key is ``"default"``.
    """
    key = cache_key(task, seed)
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "l2l_optim" / "eval"
    cache_path = Path(cache_dir or default) / "baselines.json"
    found = [e for path in [*shipped_baselines(), cache_path] if (e := _read_entries(path).get(key))]
    entry = _merge(found) if found else {
        "task": task.name, "config": task.config, "seed": seed, "torch": torch.__version__,
        "initial_loss": _initial_loss(task, seed), "runs": {}}

    def get(peer: str, lr: float | None, length: int, horizon: int | None = None) -> dict[str, Any]:
        runs = entry["runs"].setdefault(_run_key(peer, horizon), {})
        rec = runs.get(lr_key(lr))
        hs = [h for h in horizons if h <= length]
        if _covers(rec, length, hs):
            return rec
        # a rerun keeps the old horizons and length: the longer run holds the shorter one
        if rec is not None:
            length = max(length, rec["steps"])
            hs = sorted(set(hs) | {int(h) for h in rec["tails"]})
        schedule = (lambda t: warmup_cosine(t, horizon)) if horizon is not None else None
        run = _train(task, lambda ps: make_peer(peer, ps, lr), length, seed, schedule)
        runs[lr_key(lr)] = _record(run, length, hs)
        _write_entry(cache_path, key, entry)
        if progress:
            print(f"  baseline {task.name} seed {seed} {_run_key(peer, horizon)} lr={lr_key(lr)}: "
                  f"{run['seconds']:.1f} s" + (f", diverged at step {len(run['losses'])}"
                                                if len(run["losses"]) < length else ""),
                  file=sys.stderr, flush=True)
        return runs[lr_key(lr)]

    for peer in TUNED:
        grid, scheduled = PEERS[peer][1], PEERS[peer][2]
        for h in horizons:
            length, sched_h = (h, h) if scheduled else (steps, None)
            cached = entry["runs"].get(_run_key(peer, sched_h), {})
            search_grid(grid, lambda lr: tail_of(get(peer, lr, length, sched_h), h), START_LRS[peer],
                        known=lambda lr: _covers(cached.get(lr_key(lr)), length, [h]))
    for peer in UNTUNED:
        get(peer, None, steps)
    return entry


def horizons_upto(steps: int, horizons: Sequence[int]) -> list[int]:
    """The horizons a run of ``steps`` scores: those within it, and ``steps`` itself."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return sorted({int(h) for h in horizons if 1 <= int(h) <= steps} | {steps})


def evaluate(weights: Any, *, suite: str | Sequence[SuiteTask] = "default", steps: int = 5000,
             horizons: Sequence[int] = (1000, 5000), seeds: Sequence[int] = (0,),
             tasks: Sequence[str] | None = None, cache_dir: str | os.PathLike | None = None,
             data_root: str | os.PathLike | None = None, progress: bool = True,
             threads: int | None = None, optimizer_kwargs: dict[str, Any] | None = None,
             quick: bool = False) -> EvalResult:
    """Run a learned optimizer on the validation suite and compare it with its peers.

    Args:
        weights: anything :func:`l2l_optim.weights.resolve_net` accepts: a shipped name such
            as ``"simple"``, a ``.safetensors`` path, a run directory, an ``hf://`` address,
            or a net. The net's registered optimizer class runs it.
        suite: a suite name (``"default"``) or a list of :class:`~.suite.SuiteTask`.
        steps: the length of the fixed-lr runs; a task with a smaller ``max_steps`` runs that
            long and leaves out the longer horizons.
        horizons: the step counts at which final losses are compared; those above ``steps``
            are dropped and ``steps`` itself is always one.
        seeds: the init and minibatch seeds; losses are averaged over seeds.
        tasks: the names of the suite's tasks to run (default: all).
        cache_dir: where computed baselines are cached (default ``~/.cache/l2l_optim/eval``).
        data_root: a directory to look for the datasets in first.
        progress: print one line per run to stderr.
        threads: torch threads for the duration of the call (default: leave as is).
        optimizer_kwargs: extra keyword arguments of the learned optimizer, e.g.
            ``{"state_dtype": torch.bfloat16}`` (the baselines do not change).
        quick: the learned optimizer at lr=1 only: no multiplier sweep, no scheduled runs
            (their columns read n/a).

    Returns:
        An :class:`EvalResult`; :func:`~.report.format_table` makes it a markdown table.

    Raises:
        ValueError: an unknown suite or task name, ``steps < 1``, no seeds, or
            ``optimizer_kwargs`` that set ``lr`` or ``weights``.
        DatasetNotFoundError: a task's dataset is not available locally.
        ImportError: ``schedulefree`` or ``prodigyopt`` is missing (``pip install 'l2l-optim[eval]'``).

    Example:
        The default suite reads MNIST and Fashion-MNIST from local files:

        >>> result = evaluate("simple", steps=1000, horizons=(1000,))  # doctest: +SKIP
        >>> from l2l_optim.evaluation import format_table
        >>> print(format_table(result))  # doctest: +SKIP

        Any list of :class:`~.suite.SuiteTask` works as a suite, e.g. a tiny regression (with
        a temporary cache, since its baselines are computed here):

        >>> import tempfile
        >>> import torch.nn.functional as F
        >>> from torch import nn
        >>> from l2l_optim.evaluation import SuiteTask
        >>> def batch(gen):
        ...     x = torch.randn(16, 4, generator=gen)
        ...     return x, x.sum(dim=1, keepdim=True)
        >>> tiny = SuiteTask(name="tiny", config={"features": 4}, model_fn=lambda: nn.Linear(4, 1),
        ...                  batch_fn=batch, loss_fn=F.mse_loss)
        >>> with tempfile.TemporaryDirectory() as cache:
        ...     result = evaluate("simple", suite=[tiny], steps=20, horizons=(20,), quick=True,
        ...                       cache_dir=cache, progress=False)
        >>> [(row.task, row.horizon) for row in result.rows], sorted(result.geomeans["vs_schedule_free"])
        ([('tiny', 20)], [20])
    """
    t_start = time.perf_counter()
    hs = horizons_upto(steps, horizons)
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
    opt_cls = optimizer_class(net.arch)
    kwargs = dict(optimizer_kwargs or {})
    if "lr" in kwargs or "weights" in kwargs:
        raise ValueError("optimizer_kwargs may not set lr or weights (the suite runs the net at lr=1.0)")
    if kwargs:
        opt_cls(torch.nn.Linear(1, 1).parameters(), weights=net, **kwargs)  # invalid options fail here
        description = f"{description} ({', '.join(f'{k}={v}' for k, v in sorted(kwargs.items()))})"
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    rows, curves, ms, info = [], {}, {}, {}
    try:
        for task in suite_tasks:
            t_steps = min(steps, task.max_steps or steps)
            t_hs = [h for h in hs if h <= t_steps]
            entries = [baseline_entry(task, steps=t_steps, seed=s, horizons=t_hs, cache_dir=cache_dir,
                                      progress=progress) for s in seeds]
            runs: dict[str, list[dict[str, Any]]] = {}
            plan = [(f"{m:g}", m, t_steps, None) for m in (MULTIPLIERS if not quick else (1.0,))]
            plan += [] if quick else [(f"cosine@{h}", 1.0, h, h) for h in t_hs]
            for name, mult, length, sched_h in plan:
                for s in seeds:
                    schedule = (lambda t, h=sched_h: warmup_cosine(t, h)) if sched_h else None
                    run = _train(task, lambda ps: opt_cls(ps, lr=mult, weights=net, **kwargs), length, s, schedule)
                    runs.setdefault(name, []).append(_record(run, length, t_hs))
                    if name == "1":
                        ms.setdefault(task.name, []).append(run)
                    if progress:
                        print(f"  learned  {task.name} seed {s} {name}: {run['seconds']:.1f} s",
                              file=sys.stderr, flush=True)
            ms[task.name] = {k: 1e3 * sum(r[k] for r in ms[task.name]) / (t_steps * len(seeds))
                             for k in ("seconds", "cpu_seconds")}
            info[task.name] = {"description": task.description, "params": task.num_params(),
                               "batch_size": task.config.get("batch_size")}
            rows += task_rows(task.name, entries, runs, t_hs)
            last = rows[-1]
            curves[task.name] = {"learned": mean_curve(runs["1"], t_steps)}
            for peer, lr in (("adam", last.adam_lr), ("sgd", last.sgd_lr), ("schedule-free", None)):
                recs = [e["runs"][peer][lr_key(lr)] for e in entries if lr_key(lr) in e["runs"].get(peer, {})]
                if len(recs) == len(entries):
                    curves[task.name][peer] = mean_curve(recs, t_steps)
    finally:
        torch.set_num_threads(old_threads)
    geomeans = {col: {h: geometric_mean([getattr(r, col) for r in rows if r.horizon == h]) for h in hs}
                for col in RATIOS}
    return EvalResult(weights=description, suite=suite if isinstance(suite, str) else "custom",
                      steps=steps, horizons=hs, seeds=seeds, rows=rows, geomean=geomeans["ratio"],
                      geomeans=geomeans, curves=curves, ms_per_step=ms, tasks=info,
                      seconds=time.perf_counter() - t_start, quick=quick)

