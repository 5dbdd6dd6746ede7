"""The evaluation's table, plot and command line (``l2l-optim eval``)."""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .peers import ADAM_GRID, SGD_GRID
from .protocol import MULTIPLIERS, RATIOS, EvalResult, horizons_upto, baseline_entry, evaluate
from .suite import get_suite

__all__ = ["format_table", "plot_results", "main"]

_HEADS = {"vs_adam_default": "/ Adam 1e-3", "ratio": "/ best fixed", "vs_cosine": "/ cosine (sched.)",
          "vs_schedule_free": "/ SF-AdamW", "vs_prodigy": "/ Prodigy"}


def _fmt(v: float) -> str:
    return "inf" if math.isinf(v) else "n/a" if math.isnan(v) else f"{v:.4g}"


def _x(v: float) -> str:
    return "n/a" if math.isnan(v) else f"{_fmt(v)}x"


def format_table(result: EvalResult) -> str:
    """A markdown table: one row per task and horizon, then the geometric means and counts."""
    head = ["task", "steps", "Adam 1e-3", "best fixed (lr)", "cosine AdamW (lr)", "SF-AdamW", "learned",
            *(_HEADS[c] for c in RATIOS), "best mult.", "flags"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(result.rows, key=lambda r: r.horizon):
        fixed = (f"{_fmt(r.adam_loss)} (Adam {r.adam_lr:g})" if r.adam_loss <= r.sgd_loss
                 else f"{_fmt(r.sgd_loss)} (SGD {r.sgd_lr:g})")
        cosine = f"{_fmt(r.cosine_loss)} ({r.cosine_lr:g})" if math.isfinite(r.cosine_loss) else _fmt(r.cosine_loss)
        mult = "n/a" if result.quick else f"{r.best_multiplier:g}" + ("" if r.self_tuned else " (!)")
        lines.append(f"| {r.task} | {r.horizon} | {_fmt(r.adam_default_loss)} | {fixed} | {cosine} | "
                     f"{_fmt(r.schedule_free_loss)} | {_fmt(r.learned_loss)} | "
                     + " | ".join(_x(getattr(r, c)) for c in RATIOS) + f" | {mult} | {r.flags} |")
    for h in result.horizons:
        rows = [r for r in result.rows if r.horizon == h]
        means = " | ".join(f"**{_x(result.geomeans[c][h])}**" for c in RATIOS)
        lines.append(f"| **geometric mean** ({len(rows)} tasks) | {h} | | | | | | {means} | | |")
    counts = []
    for h in result.horizons:
        rows = [r for r in result.rows if r.horizon == h]
        at_sf = sum(1 for r in rows if r.vs_schedule_free <= 1.0)
        fixed = sum(1 for r in rows if r.ratio <= 1.05)
        tuned = "" if result.quick else f", lr=1 within 5% of its best multiplier on {sum(r.self_tuned for r in rows)}"
        counts.append(f"{h} steps: at or below SF-AdamW on {at_sf} of {len(rows)}, at most 1.05x the best "
                      f"fixed lr on {fixed}{tuned}")
    note = (f"weights: {result.weights}; suite {result.suite}, seeds {result.seeds}; final loss = mean "
            f"training loss over the last 10% of the steps; learned: lr=1, no schedule"
            + ("" if result.quick else f" (multipliers {list(MULTIPLIERS)}; '(!)': lr=1 more than 5% behind the "
               "best; '/ cosine' compares the learned rule and AdamW under the same 5%-warm-up cosine schedule)")
            + f". Tuned per horizon on 1-2-5 grids: Adam and cosine AdamW {ADAM_GRID[0]:g}..{ADAM_GRID[-1]:g}, "
            f"SGD (momentum 0.9) {SGD_GRID[0]:g}..{SGD_GRID[-1]:g}; Schedule-Free AdamW and Prodigy at their "
            "defaults.")
    return "\n".join(lines) + "\n\n" + "\n".join(f"* {c}" for c in counts) + "\n\n" + note + "\n"


def plot_results(results: Sequence[EvalResult], path: str | os.PathLike) -> Path:
    """One panel per task: each learned curve against the best Adam, SGD and Schedule-Free (log-y).

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
    first = results[0]
    for ax, name in zip(axes.ravel(), names):
        last = max((r for r in first.rows if r.task == name), key=lambda r: r.horizon)

        def draw(curve, label, **kw):
            pts = [(x, y) for x, y in zip(curve["step"], curve["loss"]) if y is not None and y > 0]
            if pts:
                ax.plot(*zip(*pts), label=label, **kw)

        peers = first.curves[name]
        for key, label, color in (("adam", f"Adam lr={last.adam_lr:g}", "tab:blue"),
                                  ("sgd", f"SGD lr={last.sgd_lr:g}", "tab:green"),
                                  ("schedule-free", "SF-AdamW", "tab:gray")):
            if key in peers:
                draw(peers[key], label, color=color, ls="--")
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


def main(argv: list[str] | None = None) -> int:
    """``l2l-optim eval WEIGHTS [WEIGHTS ...]``: the table, eval.json and eval.png.

    The arguments are parsed by :func:`l2l_optim.cli_args.parse_eval` (``--quick`` is a
    first look: three cheap tasks at 300 steps); the suite, the task names and every WEIGHTS
    are checked before anything runs.

    Returns:
        0 on success, 1 when a run fails (a missing dataset or optional dependency, an
        unwritable output); a usage error (unknown task, suite or weights) exits with 2.
    """
    import torch

    from ..cli_args import eval_parser, parse_eval
    from ..hub import resolve_net

    p = eval_parser()
    args = parse_eval(argv, p)
    threads = args.threads or None
    # usage errors, found before the first run: the suite, its task names and every WEIGHTS
    try:
        suite_tasks = get_suite(args.suite, args.data_root)
        unknown = sorted(set(args.tasks or ()) - {t.name for t in suite_tasks})
        if unknown:
            raise ValueError(f"unknown tasks {unknown}; the suite has {[t.name for t in suite_tasks]}")
        for w in args.weights:
            resolve_net(w)
    except (ValueError, TypeError) as e:
        p.error(str(e))
    try:
        if args.baselines_only:
            torch.set_num_threads(threads or torch.get_num_threads())
            hs = horizons_upto(args.steps, args.horizons)
            for task in suite_tasks:
                if args.tasks and task.name not in args.tasks:
                    continue
                t_steps = min(args.steps, task.max_steps or args.steps)
                for s in args.seeds:
                    baseline_entry(task, steps=t_steps, seed=s, horizons=[h for h in hs if h <= t_steps],
                                   cache_dir=args.cache_dir, progress=not args.quiet)
            return 0
        results = []
        opt_kwargs = {"state_dtype": getattr(torch, args.state_dtype)} if args.state_dtype else None
        for w in args.weights:
            res = evaluate(w, suite=args.suite, steps=args.steps, horizons=args.horizons, seeds=args.seeds,
                           tasks=args.tasks, cache_dir=args.cache_dir, data_root=args.data_root,
                           progress=not args.quiet, threads=threads, optimizer_kwargs=opt_kwargs,
                           quick=args.quick)
            results.append(res)
            print(f"\n{format_table(res)}")
            print("learned ms/step (wall/CPU): " + ", ".join(
                f"{k} {v['seconds']:.1f}/{v['cpu_seconds']:.1f}" for k, v in res.ms_per_step.items())
                + f"; total {res.seconds:.0f} s", flush=True)
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        command = "l2l-optim eval " + " ".join(sys.argv[1:] if argv is None else argv)
        meta = {"command": command, "torch": torch.__version__, "threads": threads or torch.get_num_threads()}
        (out / "eval.json").write_text(json.dumps({**meta, "results": [r.to_dict() for r in results]}, indent=1)
                                       + "\n")
        print(f"wrote {out / 'eval.json'}")
        if args.plot:
            try:
                print(f"wrote {plot_results(results, out / 'eval.png')}")
            except ImportError:
                print("no plot: matplotlib is not installed (pip install matplotlib)")
    except (ValueError, TypeError, OSError, ImportError) as e:  # datasets, extras, the output directory
        print(f"l2l-optim eval: error: {e}", file=sys.stderr)
        return 1
    return 0
