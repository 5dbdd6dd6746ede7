"""Running one experiment: weights, fine-tuning, learning-rate searches, the runs, the summary.

Every optimizer runs in an ordinary ``torch.optim`` training loop (``train_task``): the learned
ones through their public classes, SGD and Adam with the best fixed learning rate that
``search_lr`` finds on the same task (on the fine-tuning subsample where fine-tuning is used).
Each step is cached under ``<out>/<experiment>/``: a run whose files hold the same settings is
skipped, so an interrupted experiment resumes where it stopped (``force`` reruns), and several
processes can share an experiment (:mod:`.store`'s run claims).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

# the library this experiment runner uses, all in one place
from l2l_optim.finetuning import finetune, subsample_loader
from l2l_optim.tasks import Task, make_task, subsample_task
from l2l_optim.training import evaluate_model, search_lr, train_task
from l2l_optim.weights import fingerprint, resolve_net

from . import claims
from .experiments import CLI, EXPERIMENTS, Experiment, OptSpec, Settings
from .learned import learned_factory, resolve_weights
from .plots import plot_curves
from .report import format_experiment, trend
from .seeding import seeded
from .store import claim_run, file_lock, log, machine, now, read_json, seed_curves, write_curve, write_json

__all__ = ["run_experiment", "summarize", "FINETUNE_KWARGS"]

#: finetune()'s keyword for each fine-tuning setting of :data:`.experiments.FINETUNE_DEFAULTS`
#: (and for the output path): the one place that knows finetune()'s argument names
FINETUNE_KWARGS = {"subsample": "subsample", "trajectories": "trajectories", "unroll": "unroll",
                   "max_unrolls": "max_unrolls", "meta_lr": "meta_lr",
                   "relative_meta_lr": "relative_meta_lr", "seed": "seed", "out": "out_dir"}


# ----------------------------------------------------------------------------------------
# fine-tuning and learning-rate searches (cached)


def _data_loader(task: Task, batch_size: int):
    # no shuffling: finetune's subsample is drawn by its own seeded generator
    return DataLoader(TensorDataset(*task.train), batch_size=batch_size, shuffle=False)


def _ensure_finetune(exp: Experiment, task: Task, s: Settings, out: Path, base: tuple[Any, dict]) -> dict:
    """Fine-tune (or reuse the cached result): ``{"path", "info", "record", "subsample", "net"}``."""
    ft = s.finetune_settings(exp)
    net, info = base
    settings = {"task": task.name, "batch_size": s.batch_size, "base_weights": info["name"],
                "base_fingerprint": info["fingerprint"], **ft}
    path, record_path = out / "finetuned.safetensors", out / "finetune.json"
    loader = _data_loader(task, s.batch_size)
    # the lock makes a second process on the same experiment wait for the fine-tuning, not repeat it
    with file_lock(out / "finetune.lock"):
        record = _finetune_or_reuse(exp, task, s, ft, net, info, settings, loader, path, record_path)
    x, y, _ = subsample_loader(loader, ft["subsample"], seed=ft["seed"], batch_size=s.batch_size)
    tuned, _ = resolve_net(path, arch=info["arch"])
    ft_info = {"name": f"{info['name']} fine-tuned", "arch": info["arch"], "fingerprint": fingerprint(tuned),
               "random": info["random"], "path": str(path)}
    return {"path": path, "info": ft_info, "record": record, "subsample": (x, y), "net": tuned}


def _finetune_or_reuse(exp: Experiment, task: Task, s: Settings, ft: dict, net: Any, info: dict, settings: dict,
                       loader: DataLoader, path: Path, record_path: Path) -> dict:
    """The fine-tuning record of ``settings``: the cached one, or a new fine-tuning's."""
    record = read_json(record_path)
    if not s.force and path.exists() and record and record.get("settings") == settings:
        log(f"[{exp.name}] fine-tuned weights: reusing {path}", s.quiet)
        return record
    log(f"[{exp.name}] fine-tuning {info['name']} on a {ft['subsample']:g} subsample of {task.name} "
        f"({ft['trajectories']} trajectories, unrolls of {ft['unroll']} steps, at most "
        f"{ft['max_unrolls']} per trajectory)", s.quiet)
    model = seeded(task.model_fn)
    t0 = time.perf_counter()
    kwargs = {FINETUNE_KWARGS[k]: v for k, v in {**ft, "out": path}.items()}
    r = finetune(model, loader, weights=net, loss_fn=task.loss_fn, progress=not s.quiet, **kwargs)
    record = {"settings": settings, "log": r.log, "seconds": round(time.perf_counter() - t0, 1),
              "subsample_examples": int(r.subsample[0].shape[0]), "machine": machine()}
    write_json(record_path, record)
    return record


def _ensure_lr(exp: Experiment, kind: str, task: Task, s: Settings, out: Path, steps: int, data: str) -> dict:
    """search_lr for ``kind`` (or its cached result): ``{"best_lr", "scores", "steps", "data", ...}``."""
    # the lock makes a second process on the same experiment wait for the search, not repeat it
    with file_lock(out / "lr_search.lock"):
        path = out / "lr_search.json"
        settings = {"task": task.name, "data": data, "steps": steps, "seed": 0, "batch_size": s.batch_size,
                    "train_examples": int(task.train[0].shape[0])}
        hit = (read_json(path) or {}).get(kind)
        if hit and hit.get("settings") == settings and (not s.force or hit.get("searched_by") == os.getpid()):
            return hit
        log(f"[{exp.name}] learning-rate search for {kind} on {data}: {steps} steps per lr", s.quiet)
        t0 = time.perf_counter()
        best, scores = search_lr(task, kind, steps=steps, seed=0, progress=not s.quiet)
        entry = {"best_lr": best, "scores": {f"{lr:g}": v for lr, v in scores.items()}, "steps": steps,
                 "data": data, "settings": settings, "seconds": round(time.perf_counter() - t0, 1),
                 "searched_by": os.getpid()}
        cache = read_json(path) or {}
        cache[kind] = entry
        write_json(path, cache)
        log(f"[{exp.name}]   {kind}: best lr {best:g}  ("
             + ", ".join(f"{lr:g}: {v:.4g}" for lr, v in scores.items()) + ")", s.quiet)
        return read_json(path)[kind]


# ----------------------------------------------------------------------------------------
# the runs


def _run_one(exp: Experiment, opt: OptSpec, task: Task, seed: int, steps: int, factory: Callable,
             config: dict, s: Settings, out: Path) -> dict | None:
    stem = out / f"{opt.key}_seed{seed}"
    csv_path, json_path = stem.with_suffix(".csv"), stem.with_suffix(".json")

    def finished() -> tuple[bool, dict | None]:
        record = read_json(json_path)
        return not s.force and csv_path.exists() and bool(record) and record.get("config") == config, record

    done, record = finished()
    if done:
        log(f"[{exp.name}] {opt.key} seed {seed}: done, skipped", s.quiet)
        return record
    claim = stem.with_suffix(".claim")
    if not claim_run(claim):
        log(f"[{exp.name}] {opt.key} seed {seed}: another process is running it, skipped "
             f"(rerun the command after it finishes to include it in the summary)", s.quiet)
        return None
    try:
        # another process may have finished it between our check and our claim
        done, record = finished()
        if done:
            return record
        return _train_one(exp, opt, task, seed, steps, factory, config, s, csv_path, json_path, record)
    finally:
        claim.unlink(missing_ok=True)


def _train_one(exp: Experiment, opt: OptSpec, task: Task, seed: int, steps: int, factory: Callable,
               config: dict, s: Settings, csv_path: Path, json_path: Path, record: dict | None) -> dict:
    if csv_path.exists() and record:
        changed = sorted(k for k in config if record.get("config", {}).get(k) != config[k])
        log(f"[{exp.name}] {opt.key} seed {seed}: rerun (settings changed: {', '.join(changed) or 'forced'})",
             s.quiet)
    started_on = machine()
    r = train_task(task, factory, steps=steps, seed=seed, progress=not s.quiet, desc=f"{exp.name} {opt.key} s{seed}")
    metrics = {"test_loss": float("nan"), "test_acc": float("nan")}
    if not r.diverged and task.test is not None:
        metrics = evaluate_model(r.model, task.test, task.loss_fn)
    write_curve(csv_path, r.losses)
    n = len(r.losses)
    record = {
        "config": config, "label": opt.label, "steps_done": n, "diverged": r.diverged,
        "diverged_at": n if r.diverged else None,
        "final_loss": claims.final_loss(r.losses) if n and not r.diverged else float("nan"),
        "test_loss": metrics["test_loss"], "test_acc": metrics["test_acc"], "wall_s": round(r.seconds, 2),
        "s_per_step": r.seconds / max(1, n), "machine": started_on, "finished": now(),
    }
    write_json(json_path, record)
    state = f"diverged at step {n}" if r.diverged else f"final loss {record['final_loss']:.4g}"
    log(f"[{exp.name}] {opt.key} seed {seed}: {state}, test acc {metrics['test_acc']:.4f}, "
         f"{r.seconds:.0f} s ({1000 * r.seconds / max(1, n):.1f} ms/step)", s.quiet)
    return record


def run_experiment(name: str, s: Settings) -> dict:
    """Run (or resume) one figure's experiment; write its CSVs, summary.json and plot; return the summary."""
    exp = EXPERIMENTS[name]
    out = s.out / name
    out.mkdir(parents=True, exist_ok=True)
    task_name = s.task or exp.task
    task = make_task(task_name, root=s.data_root, batch_size=s.batch_size, with_test=True)
    plan = s.plan(exp)
    max_steps = max(st for st, _ in plan.values())
    search_steps = s.search_steps or min(exp.search_steps, max_steps)
    t_start = time.perf_counter()

    weights: dict[str, tuple[Any, dict]] = {}
    for o in exp.opts:
        if o.kind in ("learned", "finetuned") and o.weights not in weights:
            weights[o.weights] = resolve_weights(o.weights, s.allow_random_weights)

    ft = None
    search_task, search_data = task, f"the full training set ({task.train[0].shape[0]} examples)"
    if exp.finetune is not None:
        base = weights[next(o.weights for o in exp.opts if o.kind == "finetuned")]
        ft = _ensure_finetune(exp, task, s, out, base)
        x, y = ft["subsample"]
        search_task = subsample_task(task, x, y)
        search_data = f"the fine-tuning subsample ({x.shape[0]} examples)"

    lr_search: dict[str, dict] = {}
    for o in exp.opts:
        steps, seeds = plan[o.key]
        base_config = {"task": task_name, "batch_size": s.batch_size, "steps": steps, "kind": o.kind}
        if o.kind in ("sgd", "adam"):
            if o.kind not in lr_search:
                lr_search[o.kind] = _ensure_lr(exp, o.kind, search_task, s, out, search_steps, search_data)
            lr = lr_search[o.kind]["best_lr"]
            cls = torch.optim.SGD if o.kind == "sgd" else torch.optim.Adam
            factory = lambda p, cls=cls, lr=lr: cls(p, lr=lr)  # noqa: E731
            base_config["lr"] = lr
        else:
            net, info = (ft["net"], ft["info"]) if o.kind == "finetuned" else weights[o.weights]
            factory = learned_factory(net, info["arch"])
            base_config["weights"] = info["fingerprint"]
        for seed in range(seeds):
            _run_one(exp, o, task, seed, steps, factory, dict(base_config, seed=seed), s, out)

    summary = summarize(exp, s, task, plan, lr_search, ft, search_steps, time.perf_counter() - t_start,
                        {name: info for name, (_, info) in weights.items()})
    plot_curves(exp.name, out, summary)
    log(format_experiment(summary), s.quiet)
    return summary


# ----------------------------------------------------------------------------------------
# the summary


def summarize(exp: Experiment, s: Settings, task: Task, plan: dict, lr_search: dict, ft: dict | None,
              search_steps: int, seconds: float, weights_info: dict[str, dict]) -> dict:
    """Build ``<exp>/summary.json`` from the runs' CSV and JSON files."""
    out = s.out / exp.name
    optimizers: dict[str, dict] = {}
    curves: dict[str, list[list[float]]] = {}
    runs: dict[str, list[claims.Run]] = {}
    for o in exp.opts:
        steps, seeds = plan[o.key]
        recs = [read_json(out / f"{o.key}_seed{k}.json") or {} for k in range(seeds)]
        by_seed = seed_curves(out, o.key, seeds)
        curves[o.key] = list(by_seed.values())
        runs[o.key] = [(c, bool(recs[k].get("diverged"))) for k, c in by_seed.items()]
        finals = [r.get("final_loss") if not r.get("diverged") else float("inf") for r in recs]
        entry = {
            "label": o.label, "kind": o.kind, "steps": steps, "seeds": seeds,
            "final_loss": claims.stats([f for f in finals if f is not None]),
            "final_loss_per_seed": finals,
            "test_acc": claims.stats([r.get("test_acc") for r in recs]),
            "wall_s": claims.stats([r.get("wall_s") for r in recs]),
            "ms_per_step": claims.stats([1000 * r["s_per_step"] for r in recs if "s_per_step" in r]),
            "diverged": sum(bool(r.get("diverged")) for r in recs),
            "diverged_at": [r.get("diverged_at") for r in recs if r.get("diverged")],
        }
        if o.kind in ("sgd", "adam"):
            entry["lr"] = lr_search[o.kind]["best_lr"]
        else:
            entry["weights"] = ft["info"] if o.kind == "finetuned" else weights_info[o.weights]
        optimizers[o.key] = entry

    comparisons = []
    for c in exp.claims:
        if c.better not in optimizers or c.worse not in optimizers:
            continue
        horizon = min(plan[c.better][0], plan[c.worse][0])
        comparisons.append({"better": c.better, "worse": c.worse, "claimed": c.claimed, "horizon": horizon,
                            "at_shorter_horizon": horizon != max(plan[c.better][0], plan[c.worse][0]),
                            "better_label": optimizers[c.better]["label"], "worse_label": optimizers[c.worse]["label"],
                            **claims.compare(runs[c.better], runs[c.worse], horizon)})

    observations = [o for key, cs in curves.items() if (o := trend(optimizers[key], cs))]
    random = [k for k, e in optimizers.items() if e.get("weights", {}).get("random")]
    summary = {
        "experiment": exp.name, "title": exp.title, "task": task.name, "task_params": task.num_params(),
        "batch_size": s.batch_size, "command": s.command, "default_command": f"{CLI} {exp.name}",
        "paper": exp.paper, "note": exp.note, "overrides": {"steps": s.steps, "seeds": s.seeds, "task": s.task},
        "final_loss_rule": "mean training loss of the last min(500, 10% of the steps) steps",
        "optimizers": optimizers,
        "lr_search": {k: {kk: v[kk] for kk in ("best_lr", "scores", "steps", "data")} for k, v in lr_search.items()},
        "search_steps": search_steps,
        "finetune": None if ft is None else {"settings": ft["record"]["settings"], "log": ft["record"]["log"],
                                             "seconds": ft["record"].get("seconds"),
                                             "subsample_examples": ft["record"].get("subsample_examples")},
        "comparisons": comparisons, "observations": observations, "random_weights": random,
        "machine": machine(), "seconds": round(seconds, 1), "plot": f"{exp.name}.png", "written": now(),
    }
    write_json(out / "summary.json", summary)
    return read_json(out / "summary.json")
