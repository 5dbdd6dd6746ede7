"""Training quality of the learned optimizer by hidden-state dtype, on the validation suite.

Runs SimpleOptimizer (the shipped weights ``--weights``, by default the optimizer's own, lr=1)
on tasks of the default suite with
each state option and records the suite's score, the final loss (mean over the last 10% of
the steps), one JSON line per run (resumable: runs already in the file are skipped). No
baselines are run: the comparison is each option against float32 state, paired by seed.

Options: ``float32``, ``bfloat16`` (rounded stochastically, as the optimizer does), ``int8``
(the state dtypes), ``float32-reference`` (float32 state on the reference kernel, whose
float32 results differ from the C++ kernel's in the last bits: the noise floor of the
trajectories themselves) and ``bfloat16-nearest`` (bfloat16 state rounded to nearest even:
what stochastic rounding is measured against).

    python -m benchmarks.state_quality --tasks sine-regression fmnist-logreg --seeds 0 1 2 \\
        --options float32 bfloat16 int8 --steps 1000 --out runs/state-quality/results.jsonl
    python -m benchmarks.state_quality --report runs/state-quality/results.jsonl --steps 1000
"""

from __future__ import annotations

import argparse
import json
import math
import os
import warnings

OPTIONS = ("float32", "bfloat16", "int8", "float32-reference", "bfloat16-nearest")


def nearest_bf16_optimizer(params, weights=None):
    """A SimpleOptimizer (lr 1) whose bfloat16 hidden state rounds to nearest even instead of
    stochastically."""
    import torch

    from l2l_optim import SimpleOptimizer

    class NearestBf16(SimpleOptimizer):
        _round_stochastically = False

    return NearestBf16(params, weights=weights, lr=1.0, state_dtype=torch.bfloat16)


def run(tasks: list[str], seeds: list[int], options: list[str], steps: int, out: str,
        weights: str | None = None) -> None:
    import torch

    from l2l_optim import SimpleOptimizer, SkippedStepWarning
    from l2l_optim.evaluation.suite import default_suite
    from l2l_optim.training import tail_mean, train_task

    warnings.simplefilter("ignore", SkippedStepWarning)  # the count is recorded instead

    torch.set_num_threads(1)
    done = set()
    if os.path.exists(out):
        done = {(r["task"], r["seed"], r["option"], r["steps"]) for r in map(json.loads, open(out))}
    suite = {t.name: t for t in default_suite()}
    for task in tasks:
        for seed in seeds:
            for option in options:
                if (task, seed, option, steps) in done:
                    continue
                if option == "bfloat16-nearest":
                    make = lambda ps: nearest_bf16_optimizer(ps, weights)  # noqa: E731
                else:
                    dtype = getattr(torch, option.removesuffix("-reference"))
                    impl = "reference" if option.endswith("-reference") else "auto"
                    make = lambda ps, dtype=dtype, impl=impl: SimpleOptimizer(  # noqa: E731
                        ps, weights=weights, lr=1.0, state_dtype=dtype, impl=impl)
                result = train_task(suite[task], make, steps=steps, seed=seed)
                losses = result.losses
                finished = len(losses) >= steps
                record = {"task": task, "seed": seed, "option": option, "steps": steps,
                          "final": tail_mean(losses, 0.1) if finished else math.inf,
                          "diverged_at": None if finished else len(losses),
                          "skipped": result.skipped, "seconds": round(result.seconds, 1)}
                print(json.dumps(record), flush=True)
                with open(out, "a") as f:
                    f.write(json.dumps(record) + "\n")


def report(paths: list[str], steps: int) -> str:
    """A markdown table: per task, each option's final loss over float32's, the geometric mean
    over the seeds run with both (and the worst seed); the geometric mean over the tasks."""
    rows = [r for path in paths for r in map(json.loads, open(path)) if r["steps"] == steps]
    final = {(r["task"], r["seed"], r["option"]): r["final"] for r in rows}
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    others = [o for o in OPTIONS[1:] if any(r["option"] == o for r in rows)]
    lines = [f"| task ({steps} steps) | " + " | ".join(f"{o} / float32 (worst seed, seeds)" for o in others) + " |",
             "|---|" + "---:|" * len(others)]
    per_option = {o: [] for o in others}
    for task in tasks:
        cells = []
        for option in others:
            ratios = []
            for seed in sorted({s for (t, s, _) in final if t == task}):
                a, b = final.get((task, seed, "float32")), final.get((task, seed, option))
                if a is not None and b is not None:
                    ratios.append(b / a if a and b and math.isfinite(a) and math.isfinite(b) else math.inf)
            if ratios:
                g = math.exp(sum(map(math.log, ratios)) / len(ratios))
                per_option[option].append(g)
                cells.append(f"{g:.4f} ({max(ratios):.4f}, {len(ratios)})")
            else:
                cells.append("")
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    summary = []
    for option, values in per_option.items():
        if values:
            gm = math.exp(sum(map(math.log, values)) / len(values))
            summary.append(f"{gm:.4f} over {len(values)} tasks, worst {max(values):.4f}")
        else:
            summary.append("")
    lines.append("| **geometric mean** | " + " | ".join(summary) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=None, help="suite tasks (default: all)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--options", nargs="+", choices=OPTIONS, default=list(OPTIONS[:3]))
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--weights", default=None,
                        help="shipped weights or a file (default: SimpleOptimizer's default)")
    parser.add_argument("--out", default="runs/state-quality/results.jsonl")
    parser.add_argument("--report", nargs="+", metavar="JSONL", help="print the table of these files")
    args = parser.parse_args(argv)
    if args.report:
        print(report(args.report, args.steps))
        return
    if args.tasks is None:
        from l2l_optim.evaluation.suite import default_suite

        args.tasks = [t.name for t in default_suite()]
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    run(args.tasks, args.seeds, args.options, args.steps, args.out, args.weights)


if __name__ == "__main__":
    main()
