"""Benchmarks: ``python -m benchmarks.bench`` from the repository's root (``make bench``).

Three tables, chosen with ``--tables`` (default: all three):

* ``bandwidth`` (:mod:`benchmarks.bandwidth`): per state option (fp32 or bf16 hidden state,
  the rms input norm's bias correction c per tensor or per coordinate) the state's bytes per
  parameter, the bytes a step moves per coordinate (108 B with an fp32 hidden state and c per
  tensor, 68 B with bf16), the fused SimpleOptimizer step's achieved GB/s beside the
  streaming-copy GB/s measured in the same run on as many bytes, and the share of the step
  that the non-finite check and bookkeeping take, on one 10M-coordinate tensor and the
  parameter sets below;
* ``train`` (:mod:`benchmarks.train`): whole training steps (zero_grad, forward,
  backward, step) of SimpleOptimizer against fused and foreach Adam, as ratios to fused Adam,
  each beside its memory bound (the ratio at the copy's bandwidth), on the base MLP, LeNet-5,
  the 5-layer MLP, a 4M- and a 50M-parameter MLP and a small transformer;
* ``step`` (:mod:`benchmarks.step`): ``optimizer.step()`` alone, described below.

A summary at the end checks the targets (10M step >= 80% of the copy bandwidth,
non-finite handling <= 5% of the step, whole step <= 1.5x fused Adam on the base MLP and
<= 1.3x on the 4M MLP). ``--json PATH`` writes every raw time and derived column.

The step table times ``optimizer.step()`` alone for SimpleOptimizer (reference, fused, kernel
only, bf16 state), torch's Adam (foreach and fused), SGD, DMOptimizer and RNNProp on ``base``
(the base MLP), ``mlp5`` (6.4M parameters), ``100m`` (25 x 2000 x 2000) and ``many`` (300 x
128: the cost per tensor), with random meta-weights (step time does not depend on their
values); see :mod:`benchmarks.step`. The other tables use shipped weights: the bandwidth
table ``simple``, the train table those each row names (``simple-sf``, the default, in its
own row).

The machines this runs on are shared, so every table is measured in interleaved rounds: in
each round every variant is warmed up and timed in turn, so that a burst of load from another
process falls on all of them alike. The first lines of the output give the machine and its
load average at the start and the end; only runs on a quiet machine are worth quoting.

Examples:
    python -m benchmarks.bench                               # everything, 2 threads
    python -m benchmarks.bench --quick                       # bandwidth and train, small sets
    python -m benchmarks.bench --tables bandwidth --bw-sizes 10m --json bw.json
    python -m benchmarks.bench --tables train --models base,mlp4m
    python -m benchmarks.bench --tables step --sizes base --steps 50
    python -m benchmarks.bench --device cuda --tables step --sizes 100m    # on a GPU
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import textwrap
from dataclasses import asdict

import torch

from .bandwidth import (BW_SIZES, C_LAYOUTS, DEFAULT_BW_SIZES, STATE_DTYPES, BandwidthConfig,
                        bandwidth_targets, format_bandwidth, resolve_size, run_bandwidth)
from .bandwidth import describe as describe_bandwidth
from .common import GRAD_SCALE, SIZES, machine_info
from .step import DEFAULT_OPTIMIZERS, OPTIMIZERS, format_table, run
from .train import (DEFAULT_MODELS, DEFAULT_TRAIN_OPTIMIZERS, TARGET_STATE_DTYPES, TRAIN_MODELS,
                    TRAIN_OPTIMIZERS, TrainConfig, format_train, run_train, train_targets)
from .train import describe as describe_train

__all__ = ["main", "TABLES", "QUICK", "format_targets"]

TABLES = ("bandwidth", "train", "step")
#: ``--quick``: the bandwidth and whole-step tables on the target sizes that take seconds, few steps
QUICK = dict(tables="bandwidth,train", bw_sizes="10m,base",
             models="base,lenet,mlp4m,mlp50m,transformer",
             steps=10, rounds=2, budget=10.0)
#: a 1-minute load average at the start at or above this marks the targets as not for quoting
LOAD_WARNING = 1.0


def _wrap(text: str) -> str:
    return textwrap.fill(text, 100)


def _csv(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


def _finite_or_none(x):
    """JSON-ready data with NaN and infinities as null (strict JSON has neither)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite_or_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite_or_none(v) for v in x]
    return x


def format_targets(targets: list[dict]) -> str:
    """The targets summary in Markdown: target, measured value, met or not, and for a
    whole-step ratio the best it could be at the copy's bandwidth (``bound``) when known."""
    lines = ["| target | measured | | at the memory bound |", "|---|---:|---|---:|"]
    for t in targets:
        m = t["measured"]
        bound = t.get("bound")
        at_bound = "" if bound is None else f"{bound:.2f}x"
        if m is None or (isinstance(m, float) and math.isnan(m)):
            lines.append(f"| {t['target']} | - | not measured | {at_bound} |")
            continue
        value = f"{m:.0%}" if t["unit"] == "%" else f"{m:.2f}x"
        lines.append(f"| {t['target']} | {value} | {'met' if t['met'] else 'NOT met'} | {at_bound} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks; see the module docstring (``--help``) for the options.

    Args:
        argv: the command's arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status, 0.
    """
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tables", default=None,
                    help=f"comma-separated, from {','.join(TABLES)} (default: all)")
    ap.add_argument("--quick", action="store_true",
                    help="a few minutes: --tables bandwidth,train --bw-sizes 10m,base --models "
                         "base,lenet,mlp4m,mlp50m,transformer --steps 10 --rounds 2 --budget 10 "
                         "(options given explicitly win)")
    ap.add_argument("--sizes", default="base,mlp5,100m,many",
                    help=f"step table: comma-separated, from {','.join(SIZES)} (default: all)")
    ap.add_argument("--optimizers", default=",".join(DEFAULT_OPTIMIZERS),
                    help=f"step table: comma-separated, from {','.join(OPTIMIZERS)} (default: all)")
    ap.add_argument("--bw-sizes", default=None,
                    help=f"bandwidth table: comma-separated, from {','.join(BW_SIZES)} or "
                         f"coordinate counts such as 1e6 (default: {','.join(DEFAULT_BW_SIZES)})")
    ap.add_argument("--state-dtypes", default=",".join(STATE_DTYPES),
                    help=f"bandwidth table: hidden-state dtypes (default: {','.join(STATE_DTYPES)})")
    ap.add_argument("--c-layouts", default=",".join(C_LAYOUTS),
                    help="bandwidth table: layouts of the rms input norm's bias correction c "
                         f"(default: {','.join(C_LAYOUTS)})")
    ap.add_argument("--models", default=None,
                    help=f"train table: comma-separated, from {','.join(TRAIN_MODELS)} "
                         f"(default: {','.join(DEFAULT_MODELS)})")
    ap.add_argument("--train-optimizers", default=",".join(DEFAULT_TRAIN_OPTIMIZERS),
                    help=f"train table: comma-separated, from {','.join(TRAIN_OPTIMIZERS)} "
                         f"(default: {','.join(DEFAULT_TRAIN_OPTIMIZERS)}); adam-fused is the "
                         "ratios' base")
    ap.add_argument("--steps", type=int, default=None,
                    help="timed steps per variant (default: 50 step and train, 30 bandwidth)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed steps per variant and round (default: 3 step, 2 the others)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="interleaved rounds the steps are split into (default 5)")
    ap.add_argument("--budget", type=float, default=None,
                    help="about the most seconds spent on one variant; slower ones get fewer "
                         "timed steps (default: 120 step, 60 the others)")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--out", default=None, help="also write the tables (Markdown) to this file")
    ap.add_argument("--json", default=None, metavar="PATH",
                    help="also write every raw time, derived column and target to this file")
    args = ap.parse_args(argv)

    fill = dict(tables=",".join(TABLES), bw_sizes=",".join(DEFAULT_BW_SIZES),
                models=",".join(DEFAULT_MODELS))
    if args.quick:
        fill.update(QUICK)
    for k, v in fill.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    tables = _csv(args.tables)
    sizes, opts = _csv(args.sizes), _csv(args.optimizers)
    bw_sizes, dtypes = _csv(args.bw_sizes), _csv(args.state_dtypes)
    c_layouts = _csv(args.c_layouts)
    models, train_opts = _csv(args.models), _csv(args.train_optimizers)
    for name, chosen, allowed in (("table", tables, TABLES), ("size", sizes, SIZES),
                                  ("optimizer", opts, OPTIMIZERS), ("state dtype", dtypes, STATE_DTYPES),
                                  ("c layout", c_layouts, C_LAYOUTS),
                                  ("model", models, TRAIN_MODELS),
                                  ("train optimizer", train_opts, TRAIN_OPTIMIZERS)):
        for x in chosen:
            if x not in allowed:
                ap.error(f"unknown {name} {x!r}; choose from {', '.join(allowed)}")
    for s in bw_sizes:
        try:
            resolve_size(s)
        except ValueError as e:
            ap.error(str(e))
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but no CUDA device is available")
    torch.set_num_threads(args.threads)
    # only the options given: each table keeps its own defaults for the rest
    common = {k: getattr(args, k) for k in ("steps", "warmup", "rounds", "budget")
              if getattr(args, k) is not None}

    def log(m):
        print(m, file=sys.stderr, flush=True)

    before = machine_info(device)
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    print(before, flush=True)
    sections: list[str] = []
    data: dict = dict(machine=before, threads=args.threads, device=args.device, tables=tables)
    targets: list[dict] = []
    for table in tables:
        if table == "bandwidth":
            rows = run_bandwidth(BandwidthConfig(sizes=bw_sizes, state_dtypes=dtypes,
                                                 c_layouts=c_layouts, device=args.device,
                                                 **common), log=log)
            sections.append(f"## Bandwidth\n\n{_wrap(describe_bandwidth())}\n\n{format_bandwidth(rows)}")
            data["bandwidth"] = [r.to_json() for r in rows]
            targets += bandwidth_targets(rows)
        elif table == "train":
            rows = run_train(TrainConfig(models=models, optimizers=train_opts,
                                         device=args.device, **common), log=log)
            # the bandwidth table's 10M rows, where they ran: per state dtype (the optimizer's
            # own c layout) the copy speed and the step's bytes
            copy_gbs, step_bytes = {}, {}
            for name, dtype in {**TARGET_STATE_DTYPES, "simple-int8": "int8"}.items():
                bw = next((r for r in data.get("bandwidth", []) if r.get("size") == "10m"
                           and r.get("state_dtype") == dtype and r.get("c_default", True)
                           and r.get("copy_gbs")), None)
                if bw is not None:
                    copy_gbs[name], step_bytes[name] = bw["copy_gbs"], bw["bytes_per_coord"]
            sections.append(f"## Training step\n\n{_wrap(describe_train())}\n\n"
                            f"{format_train(rows, copy_gbs)}")
            data["train"] = [r.to_json() for r in rows]
            targets += train_targets(rows, copy_gbs, step_bytes)
        else:
            kw = dict(steps=50, warmup=3, rounds=5, budget=120.0) | common
            results = run(sizes, opts, device=args.device, log=log, **kw)
            note = ("optimizer.step() alone, medians of interleaved rounds; gradients randn x "
                    f"{GRAD_SCALE:g} (no subnormal values), random meta-weights")
            sections.append(f"## Step time\n\n{_wrap(note)}\n\n{format_table(results)}")
            data["step"] = [asdict(r) | dict(median_s=r.median, best_s=r.best) for r in results]
    if targets:
        warn = ""
        if load_start >= LOAD_WARNING:
            # other processes on the cores: multi-threaded medians wait for them
            warn = _wrap(f"Load average {load_start:.1f} at the start: other processes were "
                         "running, and these values are not for quoting; rerun on a quiet "
                         "machine.") + "\n\n"
        sections.append(f"## Targets\n\n{warn}{format_targets(targets)}")
    data["targets"] = targets
    after = "load average at the end %.1f/%.1f/%.1f" % os.getloadavg() if hasattr(
        os, "getloadavg") else ""
    command = "python -m benchmarks.bench " + " ".join(argv if argv is not None else sys.argv[1:])
    data.update(load_end=after, command=command)
    text = f"{before}\n{after}\ncommand: {command}\n\n" + "\n\n".join(sections) + "\n"
    print()
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(_finite_or_none(data), f, indent=1)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
