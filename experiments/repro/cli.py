"""Command line of the experiments: ``python -m experiments.repro``, from the repository's root."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

from . import __doc__ as _package_doc
from .experiments import ALL, CLI, EXPERIMENTS, Settings
from .report import write_report
from .runner import run_experiment
from .store import log
from .table1 import run_table1

__all__ = ["main"]


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _list() -> str:
    lines = ["table1: parameter counts and optimizer step time on the base MLP (--steps: timed steps, default 100)"]
    for e in EXPERIMENTS.values():
        opts = ", ".join(f"{o.key} ({o.steps or e.steps} steps x {_plural(o.seeds or e.seeds, 'seed')})"
                         for o in e.opts)
        search = any(o.kind in ("sgd", "adam") for o in e.opts)
        lines.append(f"{e.name}: {e.task}: {opts}" + (f"; lr search {e.search_steps} steps" if search else "")
                     + (f"; fine-tuning {e.finetune}" if e.finetune else ""))
        if e.note:
            lines.append(f"    budget: {e.note}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=CLI, description=_package_doc.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_list())
    p.add_argument("experiments", nargs="+", metavar="experiment",
                   help=f"one or more of {', '.join(ALL)}, or all, report, list")
    p.add_argument("--steps", type=int, help="steps of every run (default: each experiment's)")
    p.add_argument("--seeds", type=int, help="seeds of every curve (default: each experiment's)")
    p.add_argument("--search-steps", type=int, help="steps of each learning-rate search run")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--out", default="results", help="results directory (default: results)")
    p.add_argument("--report", default=None, help="report path (default: RESULTS.md beside --out)")
    p.add_argument("--data-root", default=None, help="folder with the IDX files (searched first)")
    p.add_argument("--task", default=None, help="run the experiment's protocol on another registered task")
    p.add_argument("--trajectories", type=int, help="fine-tuning trajectories")
    p.add_argument("--max-unrolls", type=int, help="fine-tuning: max unrolls per trajectory")
    p.add_argument("--unroll", type=int, help="fine-tuning: steps per unroll")
    p.add_argument("--subsample", type=float, help="fine-tuning subsample fraction")
    p.add_argument("--threads", type=int, help="torch.set_num_threads")
    p.add_argument("--allow-random-weights", action="store_true",
                   help="use untrained meta-weights where shipped ones are missing (smoke runs only)")
    p.add_argument("--force", action="store_true", help="rerun finished runs")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the named experiments (and/or ``report``, ``all``, ``list``); 0 on success."""
    argv = list(sys.argv[1:] if argv is None else argv)
    p = _parser()
    args = p.parse_args(argv)

    names = args.experiments
    if names == ["list"]:
        print(_list())
        return 0
    if "all" in names:
        names = [*ALL, "report"]
    unknown = [n for n in names if n not in (*ALL, "report")]
    if unknown:
        p.error(f"unknown experiment(s) {unknown}; choose from {', '.join((*ALL, 'all', 'report', 'list'))}")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    report = Path(args.report) if args.report else out.resolve().parent / "RESULTS.md"
    settings = Settings(
        out=out, steps=args.steps, seeds=args.seeds, search_steps=args.search_steps, batch_size=args.batch_size,
        data_root=args.data_root, task=args.task, trajectories=args.trajectories, max_unrolls=args.max_unrolls,
        unroll=args.unroll, subsample=args.subsample,
        allow_random_weights=args.allow_random_weights, force=args.force, quiet=args.quiet,
    )
    rest = [a for a in argv if a not in (*ALL, "all", "report")]
    for name in names:
        if name == "report":
            log(f"wrote {write_report(out, report)}", args.quiet)
            continue
        settings.command = f"{CLI} " + " ".join(shlex.quote(a) for a in [name, *rest])
        if name == "table1":
            run_table1(settings)
        else:
            run_experiment(name, settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
