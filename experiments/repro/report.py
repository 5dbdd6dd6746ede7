"""The text of the results: the tables and sentences printed after a run, and RESULTS.md.

Everything here is generated from the summaries (``<out>/<experiment>/summary.json``), so
RESULTS.md can be rebuilt at any time without rerunning anything.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

# the library this report names, in one place
from l2l_optim.training import search_lr, tail_mean

from .claims import final_loss, final_window, finite
from .experiments import ALL, CLI
from .store import read_json

__all__ = ["comparison_text", "experiment_table", "format_experiment", "trend", "write_report"]


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "inf" if x == float("inf") else "n/a"
    return f"{x:.{digits}g}"


def _pm(st: dict | None, digits: int = 4, scale: float = 1.0) -> str:
    """``mean [min, max]`` of a :func:`~.claims.stats` dict (the mean alone for one value)."""
    if not st:
        return "n/a"
    if st["n"] == 1:
        return _fmt(st["mean"] * scale, digits)
    return f"{_fmt(st['mean'] * scale, digits)} [{_fmt(st['min'] * scale, digits)}, {_fmt(st['max'] * scale, digits)}]"


def comparison_text(c: dict) -> str:
    """The sentence for one comparison of a summary, generated from its numbers."""
    if "better_loss" not in c:
        return c["text"]
    a, b = c["better_loss"], c["worse_loss"]
    a = float("inf") if a is None else a  # JSON stores a diverged (inf) loss as null
    b = float("inf") if b is None else b
    at = f" at {c['horizon']:,} steps" if c.get("at_shorter_horizon") else ""
    diff = f", {100 * (a - b) / b:+.1f}%" if finite(a) and finite(b) and b else ""
    verdict = ("agrees" if c["holds"] else "disagrees") if c["claimed"] else "context, not a claim of the paper"
    noise = " (but the seeds' ranges overlap: within run-to-run noise)" if c.get("seed_ranges_overlap") else ""
    return (f"the final loss{at} of {c['better_label']} ({_fmt(a)}) is {'below' if c['holds'] else 'not below'} "
            f"that of {c['worse_label']} ({_fmt(b)}{diff}): {verdict}{noise}")


def trend(entry: dict, curves: list[list[float]]) -> str | None:
    """How the first seed's loss moved over the second half of its run (or where the runs diverged).

    Args:
        entry: the optimizer's summary entry (``label``, ``seeds``, ``diverged``, ``diverged_at``).
        curves: its runs' curves, seed 0 first.
    """
    if entry["diverged"]:
        return (f"{entry['label']} diverged (non-finite loss) in {entry['diverged']} of {entry['seeds']} run(s), "
                f"at step(s) {entry['diverged_at']}.")
    if not curves or len(curves[0]) < 20:
        return None
    c = curves[0]
    n, half = len(c), len(c) // 2
    mid, end = final_loss(c[:half]), final_loss(c)
    w = final_window(n)
    # the lowest mean over windows of the final loss's length, every half window
    best = min(tail_mean(c[:i], 1.0, max_window=w) for i in range(w, n + 1, max(1, w // 2)))
    text = (f"{entry['label']} (seed 0): windowed loss {_fmt(mid)} at step {half:,}, {_fmt(end)} at step {n:,} "
            f"({100 * (end - mid) / mid:+.1f}% over the second half)")
    if end > 1.2 * best:
        text += f"; it rose after its best windowed loss {_fmt(best)}"
    return text + "."


def experiment_table(summary: dict) -> list[str]:
    """Markdown table rows of one summary."""
    if summary["experiment"] == "table1":
        lines = ["| optimizer | parameters (paper) | ms per step, median [p10, p90] | paper ms | whole training "
                 "step ms | update path |", "|---|---|---|---|---|---|"]
        for r in summary["rows"]:
            paper_p = f" ({r['paper_params']})" if r["paper_params"] else ""
            params = "-" if r["params"] is None else f"{r['params']}{paper_p}"
            lines.append(f"| {r['label']} | {params} | {r['step_ms_median']:.2f} "
                         f"[{r['step_ms_p10']:.2f}, {r['step_ms_p90']:.2f}] | {r['paper_step_ms'] or '-'} | "
                         f"{r['train_step_ms_median']:.2f} | {r.get('impl') or '-'} |")
        return lines
    lines = ["| optimizer | steps | seeds | final train loss, mean [min, max] | test accuracy % | wall time s | "
             "ms/step | lr |", "|---|---|---|---|---|---|---|---|"]
    for e in summary["optimizers"].values():
        final = _pm(e["final_loss"])
        if e["diverged"]:
            final = f"diverged in {e['diverged']}/{e['seeds']}" + (f"; others {final}" if e["final_loss"] else "")
        label = e["label"] + (" (untrained weights)" if e.get("weights", {}).get("random") else "")
        lr = f"{e['lr']:g}" if "lr" in e else "1 (as meta-trained)"
        lines.append(f"| {label} | {e['steps']:,} | {e['seeds']} | {final} | {_pm(e['test_acc'], 4, 100)} | "
                     f"{_pm(e['wall_s'], 4)} | {_pm(e['ms_per_step'], 3)} | {lr} |")
    return lines


def format_experiment(summary: dict) -> str:
    """The experiment's table and comparisons as printed at the end of a run (and in RESULTS.md)."""
    lines = [f"== {summary['title']} ==", *experiment_table(summary)]
    for c in summary.get("comparisons", []):
        lines.append(f"- {comparison_text(c)}")
    return "\n".join(lines)


def _rel(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path, start)).as_posix()


def _cpus(summaries: dict) -> str:
    counts = sorted({str(sm.get("machine", {}).get("cpu_count")) for sm in summaries.values()})
    return "/".join(counts) or str(os.cpu_count())


def _preamble(summaries: dict) -> list[str]:
    L = ["# Reproducing the paper's experiments", "",
         f"<!-- generated by `{CLI} report`; do not edit by hand -->", "",
         "Every number below is read from `results/<experiment>/summary.json`, written by the command shown with "
         f"it; `make reproduce` (= `{CLI} all`) reruns everything, skipping runs whose "
         "CSVs are already there, and rebuilds this file. Training loss is the minibatch cross-entropy of "
         "each step (batch 128), before the step's update; the *final* training loss is the mean of the last "
         "min(500, 10% of the steps) steps, averaged over seeds, with [min, max] over seeds. Learned "
         "optimizers run with `lr=1` (the update as meta-trained) through the public optimizer classes; SGD "
         "(no momentum) and Adam use the best fixed learning rate from {1, 0.1, 0.01, 0.001} found by "
         f"`{search_lr.__module__}.{search_lr.__qualname__}` on the same task (on the fine-tuning subsample "
         "where fine-tuning is used), scored by the mean training loss of the last 10% of a shorter run.", "",
         f"**Hardware.** Everything ran on the CPU ({_cpus(summaries)} cores, no GPU), possibly shared with other "
         "work (the load average is given per experiment): wall times and step times are noisy and only "
         "comparable within one experiment. Where the paper's 10,000 steps and 3 seeds were too expensive, the "
         "experiment says so.", ""]
    missing = [n for n in ALL if n not in summaries]
    if missing:
        L += [f"Not run yet: {', '.join(missing)}.", ""]
    untrained = {n: sm["random_weights"] for n, sm in summaries.items() if sm.get("random_weights")}
    if untrained:
        L += ["> **Warning: smoke-test numbers.** These experiments used *untrained* meta-weights because the "
              "shipped ones were missing (`--allow-random-weights`): "
              + "; ".join(f"{n}: {', '.join(v)}" for n, v in untrained.items())
              + ". Their numbers say nothing about the method.", ""]
    return L


def _section(name: str, sm: dict, out: Path, report_dir: Path) -> list[str]:
    L = [f"## {sm['title']}", "", f"*The paper:* {sm['paper']}", ""]
    if sm.get("note"):
        L += [f"*Budget:* {sm['note']}", ""]
    L += [f"Command: `{sm['default_command']}`" + (
        f" (these numbers: `{sm['command']}`)" if sm.get("command") and sm["command"] != sm["default_command"]
        else ""), ""]
    if name != "table1":
        L += [f"Task `{sm['task']}` ({sm['task_params']:,} parameters), batch {sm['batch_size']}.", ""]
    L += experiment_table(sm) + [""]
    if sm.get("lr_search"):
        L += ["Learning-rate search (score: mean training loss of the last 10% of the steps; inf: diverged):", ""]
        for kind, ls in sm["lr_search"].items():
            scores = ", ".join(f"{lr}: {_fmt(v)}" if v is not None else f"{lr}: inf" for lr, v in ls["scores"].items())
            L.append(f"- {kind}: best lr **{ls['best_lr']:g}** ({ls['steps']} steps on {ls['data']}; {scores})")
        L.append("")
    if sm.get("finetune"):
        ft = sm["finetune"]
        st = ft["settings"]
        reached = sum(bool(e["reached_target"]) for e in ft["log"])
        L += [f"Fine-tuning: {st['trajectories']} trajectories on a {st['subsample']:g} subsample "
              f"({ft.get('subsample_examples')} examples), unrolls of {st['unroll']} steps (at most "
              f"{st['max_unrolls']} per trajectory), meta-lr {st['meta_lr']:g}, "
              f"{_fmt(ft.get('seconds'), 3)} s; {reached} of {len(ft['log'])} trajectories reached half the "
              "initial loss:", ""]
        for e in ft["log"]:
            L.append(f"- trajectory {e['trajectory']}: loss {_fmt(e['initial_loss'])} -> {_fmt(e['final_avg_loss'])} "
                     f"(target {_fmt(e['target'])}) in {e['unrolls']} unroll(s): "
                     + ("reached" if e["reached_target"] else ("diverged" if e["diverged"] else "not reached")))
        L.append("")
    plot = out / name / sm["plot"]
    if plot.exists():
        L += [f"![{name}]({_rel(plot, report_dir)})", ""]
    if sm.get("observations"):
        L += [f"- {o}" for o in sm["observations"]] + [""]
    m = sm.get("machine", {})
    L += [f"<sub>{m.get('cpu_count')} CPUs, {m.get('torch_threads')} torch threads, load average "
          f"{m.get('loadavg')}, torch {m.get('torch')}; written {sm.get('written')}.</sub>", ""]
    return L


def _agreement(summaries: dict) -> list[str]:
    agreement = [(name, c) for name, sm in summaries.items() for c in sm.get("comparisons", [])]
    L = ["## Agreement with the paper", "",
         "Generated from the numbers above: a claim *agrees* when the optimizer the paper favours reaches the "
         "lower mean final training loss (at the shorter of the two runs' lengths when they differ).", ""]
    claimed = [(n, c) for n, c in agreement if c.get("claimed", True)]
    for name, c in claimed:
        L.append(f"- **{name}**: {comparison_text(c)}")
    context = [(n, c) for n, c in agreement if not c.get("claimed", True)]
    if context:
        L += ["", "For context (not claims of the paper):", ""]
        L += [f"- {name}: {comparison_text(c)}" for name, c in context]
    n_ok = sum(c["holds"] for _, c in claimed)
    if claimed:
        L += ["", f"{n_ok} of {len(claimed)} checked claims agree."
              + (" Disagreements are reported as measured, not tuned away." if n_ok < len(claimed) else ""), ""]
    else:
        L += ["No experiment has been run yet.", ""]
    return L


def _remedies_section(out: Path, report_dir: Path) -> list[str]:
    """``<out>/remedies/`` (examples/transfer_remedies.py), quoted as written, when it exists."""
    readme = out / "remedies" / "README.md"
    if not readme.exists():
        return []
    L = ["## Beyond the paper's protocol: what helps where tuned SGD wins", "",
         "Not part of the paper's protocol (there, every optimizer runs with a fixed learning rate). Written by "
         "`examples/transfer_remedies.py`, not by this script; quoted from `results/remedies/`.", ""]
    body = [line for line in readme.read_text().splitlines() if not line.startswith("# ")]
    while body and not body[0].strip():
        body.pop(0)
    L += body + [""]
    for summary in sorted(readme.parent.glob("*/summary*.md")):
        L += [f"`{_rel(summary, report_dir)}`:", "", summary.read_text().strip(), ""]
    return L


def write_report(out: Path, report: Path) -> Path:
    """Rebuild RESULTS.md (``report``) from ``<out>/*/summary.json``."""
    report_dir = report.parent.resolve()
    summaries = {name: sm for name in ALL if (sm := read_json(out / name / "summary.json"))}
    L = _preamble(summaries)
    for name, sm in summaries.items():
        L += _section(name, sm, out, report_dir)
    L += _agreement(summaries)
    L += _remedies_section(out, report_dir)
    report.write_text("\n".join(L))
    return report
