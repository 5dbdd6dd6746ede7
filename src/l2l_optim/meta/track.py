"""The validation trend of a meta-training run: its snapshots scored on the validation suite.

``meta-es --snapshot-every N`` saves the rule every N generations under
``<run>/snapshots/``; :func:`track` scores every snapshot not yet scored on a few cheap
tasks of the validation suite (the learned rule at ``lr=1``, as
:func:`~l2l_optim.evaluation.evaluate` with ``quick=True``), appends one line per snapshot to
``<run>/validation.jsonl`` and redraws ``<run>/validation.png``: the geometric means of the
learned loss over Schedule-Free AdamW's and over the best fixed-lr Adam or SGD, per
generation. The tasks are never trained on, so the trend shows whether meta-training
generalises, and a snapshot can be selected on it.

Command line: ``python -m l2l_optim.meta.track RUN_DIR [--tasks ...] [--steps 1000]``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

import torch

from ..evaluation.protocol import evaluate

__all__ = ["TRACK_TASKS", "track", "score_reference", "plot_trend", "main"]

#: cheap validation tasks whose best step sizes differ by decades
TRACK_TASKS = ("sine-regression", "fmnist-logreg", "mnist-mlp-narrow", "wide-target-regression",
               "mnist-autoencoder", "fmnist-mlp-wide")
_GEN = re.compile(r"gen(\d+)\.safetensors$")


def _lines(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _scored(path: Path) -> dict[int, dict]:
    return {int(e["generation"]): e for e in _lines(path) if "generation" in e}


def _score(weights: str, tasks: Sequence[str], steps: int, cache_dir, data_root) -> dict:
    # float32 state: the rule as the population trains it, comparable over a run's history
    res = evaluate(weights, tasks=list(tasks), steps=steps, horizons=(steps,), quick=True,
                   cache_dir=cache_dir, data_root=data_root, progress=False, threads=1,
                   optimizer_kwargs={"state_dtype": torch.float32})
    rows = [r for r in res.rows if r.horizon == steps]
    return {"steps": steps, **{k: res.geomeans[k][steps] for k in ("vs_schedule_free", "ratio", "vs_adam_default")},
            "per_task": {r.task: r.vs_schedule_free for r in rows}, "seconds": round(res.seconds, 1)}


def track(run_dir: str | Path, *, tasks: Sequence[str] = TRACK_TASKS, steps: int = 1000,
          cache_dir: str | Path | None = None, data_root: str | None = None, every: int = 1,
          progress: bool = False) -> list[dict]:
    """Score the run's unscored snapshots; returns every line of ``validation.jsonl``.

    Args:
        run_dir: the ``meta-es`` run directory.
        tasks: validation tasks to run.
        steps: run length (also the one horizon).
        cache_dir: the baseline cache (see :func:`~l2l_optim.evaluation.baseline_entry`).
        data_root: where the datasets are.
        every: score only snapshots whose generation is a multiple of ``every`` times the
            snapshot spacing (1: all).
        progress: print one line per snapshot.

    Returns:
        One dict per scored snapshot, by generation: ``{"generation", "vs_schedule_free",
        "ratio", "vs_adam_default", "per_task": {task: learned / SF}}``.

    Raises:
        FileNotFoundError: ``run_dir`` has no snapshots.
    """
    run = Path(run_dir)
    snaps = sorted(run.glob("snapshots/gen*.safetensors"))
    if not snaps:
        raise FileNotFoundError(f"{run}/snapshots holds no genNNNNN.safetensors (meta-es --snapshot-every N)")
    gens = {int(_GEN.search(p.name).group(1)): p for p in snaps}
    spacing = min((g for g in gens if g > 0), default=1)
    out_path = run / "validation.jsonl"
    done = _scored(out_path)
    for gen, path in sorted(gens.items()):
        if gen in done or (gen // spacing) % every:
            continue
        entry = {"generation": gen, **_score(str(path), tasks, steps, cache_dir, data_root)}
        with open(out_path, "a") as f:
            f.write(json.dumps(entry) + "\n")
        done[gen] = entry
        if progress:
            print(f"gen {gen:5d}: learned / SF-AdamW {entry['vs_schedule_free']:.4f}, / best fixed "
                  f"{entry['ratio']:.4f} ({entry['seconds']:.0f} s)", flush=True)
    return [done[g] for g in sorted(done)]


def score_reference(run_dir: str | Path, weights: str, *, tasks: Sequence[str] = TRACK_TASKS,
                    steps: int = 1000, cache_dir: str | Path | None = None,
                    data_root: str | None = None) -> dict:
    """Score other weights (for example the shipped default) on the same tasks, once, as a
    reference line for the trend; kept in ``validation.jsonl`` under ``"reference"``.

    Returns:
        The reference's line: ``{"reference": weights, "vs_schedule_free", ...}``.
    """
    out_path = Path(run_dir) / "validation.jsonl"
    for entry in _lines(out_path):
        if entry.get("reference") == weights and entry["steps"] == steps:
            return entry
    entry = {"reference": weights, **_score(weights, tasks, steps, cache_dir, data_root)}
    with open(out_path, "a") as f:
        f.write(json.dumps(entry) + "\n")
    return entry


def plot_trend(entries: list[dict], path: str | Path, title: str = "",
               references: Sequence[dict] = ()) -> Path:
    """The geometric means per generation (log-y), one line per ratio column; each
    reference (a :func:`score_reference` line) as dashed lines in the columns' colours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, per) = plt.subplots(1, 2, figsize=(11, 4.2))
    gens = [e["generation"] for e in entries]
    for key, label in (("vs_schedule_free", "learned / Schedule-Free AdamW"),
                       ("ratio", "learned / best fixed-lr Adam or SGD"),
                       ("vs_adam_default", "learned / Adam 1e-3")):
        ys = [e[key] if e[key] is not None and math.isfinite(e[key]) else float("nan") for e in entries]
        (line,) = ax.plot(gens, ys, marker="o", ms=3, label=label)
        for ref, style in zip(references, ("--", "-.", ":")):
            if ref.get(key) is not None and math.isfinite(ref[key]):
                ax.axhline(ref[key], color=line.get_color(), lw=0.9, ls=style,
                           label=f"{ref['reference']} (reference)" if key == "vs_schedule_free" else None)
    ax.axhline(1.0, color="gray", lw=0.8, ls=":")
    ax.set_yscale("log")
    ax.set_xlabel("generation")
    ax.set_ylabel("geometric mean of loss ratios")
    ax.set_title("\n".join(textwrap.wrap(title, 70)), fontsize=8)
    ax.legend(fontsize=7)
    # the geometric mean can hide a trade between tasks: each task's ratio to Schedule-Free
    tasks = sorted({t for e in entries for t in e.get("per_task", {})})
    for task in tasks:
        ys = [e.get("per_task", {}).get(task) for e in entries]
        (line,) = per.plot(gens, [float("nan") if y is None else y for y in ys], marker="o", ms=2, lw=1,
                           label=task)
        for ref in references[:1]:
            if ref.get("per_task", {}).get(task) is not None:
                per.axhline(ref["per_task"][task], color=line.get_color(), lw=0.7, ls="--")
    per.axhline(1.0, color="gray", lw=0.8, ls=":")
    per.set_yscale("log")
    per.set_xlabel("generation")
    per.set_ylabel("learned / Schedule-Free AdamW, per task")
    per.set_title("per task" + (f" (dashed: {references[0]['reference']})" if references else ""), fontsize=8)
    per.legend(fontsize=6)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    """``python -m l2l_optim.meta.track RUN_DIR``: score new snapshots, redraw the plot."""
    p = argparse.ArgumentParser(prog="l2l-optim meta-track", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="a meta-es run directory with snapshots/")
    p.add_argument("--tasks", nargs="+", default=list(TRACK_TASKS), help="validation tasks to run")
    p.add_argument("--steps", type=int, default=1000, help="run length and horizon (default 1000)")
    p.add_argument("--every", type=int, default=1, help="score every k-th snapshot (default: all)")
    p.add_argument("--cache-dir", default=None, help="baseline cache (default ~/.cache/l2l_optim/eval)")
    p.add_argument("--data-root", default=None, help="a directory holding the datasets")
    p.add_argument("--reference", nargs="+", default=[], metavar="WEIGHTS",
                   help="weights scored once on the same tasks and drawn as dashed lines (e.g. simple)")
    args = p.parse_args(argv)
    try:
        entries = track(args.run_dir, tasks=args.tasks, steps=args.steps, cache_dir=args.cache_dir,
                        data_root=args.data_root, every=args.every, progress=True)
        refs = [score_reference(args.run_dir, w, tasks=args.tasks, steps=args.steps, cache_dir=args.cache_dir,
                                data_root=args.data_root) for w in args.reference]
    except (FileNotFoundError, ValueError) as e:
        print(f"l2l-optim meta-track: error: {e}", file=sys.stderr)
        return 2
    out = plot_trend(entries, Path(args.run_dir) / "validation.png",
                     f"{Path(args.run_dir).name}: {', '.join(args.tasks)}; {args.steps} steps", refs)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
