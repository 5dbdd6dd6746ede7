"""Meta-training throughput: optimizee steps meta-trained per CPU-second, engine against engine.

``python -m benchmarks.meta_throughput`` (the second half of ``make bench``) runs, in one process
and one after the other:

* **BPTT on the base MLP** (what :func:`~l2l_optim.meta.meta_fit` does with its defaults):
  trajectories of the paper's 784-500-10 MLP, unrolls of 20 steps, one meta-gradient per unroll;
* **ES on the task population** (:mod:`l2l_optim.meta.es`): one generation of every family at
  the given horizon, ``instances x (2 pairs + 1)`` optimizees at once.

Time is process CPU time (``time.process_time``), so another job on the machine slows the
wall clock but not the figure much; the ratio of the two rates is the comparison. An
"optimizee step" is one gradient evaluation and one update of one optimizee.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from l2l_optim.data import load_dataset
from l2l_optim.meta.es import ESConfig, es_generation
from l2l_optim.meta.families import FAMILIES, ImageData
from l2l_optim.meta.population import flatten
from l2l_optim.meta.trajectory import meta_lr_scales, run_trajectory
from l2l_optim.nets import SimpleOptimizerNet
from l2l_optim.meta.init_rules import init_net
from l2l_optim.tasks import make_task

__all__ = ["bptt_rate", "es_rate", "main"]


def bptt_rate(steps: int = 60, unroll: int = 20, data_root: str | None = None) -> dict:
    """Optimizee steps per CPU-second of truncated BPTT on the base MLP (meta_fit's defaults)."""
    task = make_task("mnist-mlp", root=data_root)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = init_net(SimpleOptimizerNet(), "sign")
    meta_opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    t0, w0 = time.process_time(), time.perf_counter()
    r = run_trajectory(net, task, seed=0, steps=steps, unroll=unroll, meta_opt=meta_opt,
                       grad_clip=1.0, lr_scales=meta_lr_scales(net))
    cpu, wall = time.process_time() - t0, time.perf_counter() - w0
    n = len(r["losses"])
    return {"engine": "bptt", "task": "base MLP 784-500-10", "optimizee_steps": n,
            "meta_steps": n // unroll, "cpu_seconds": round(cpu, 2), "wall_seconds": round(wall, 2),
            "steps_per_cpu_second": n / cpu, "meta_steps_per_hour": 3600 * (n // unroll) / cpu}


def es_rate(horizon: int = 200, instances: int = 4, pairs: int = 8, families: tuple[str, ...] | None = None,
            data_root: str | None = None) -> dict:
    """Optimizee steps per CPU-second of ES generations, one per family."""
    images = ImageData(lambda name: load_dataset(name, "train", root=data_root))
    fams = families or FAMILIES
    net = init_net(SimpleOptimizerNet(), "sign")
    theta = flatten(net)
    scales = torch.cat([s.reshape(-1) for s in meta_lr_scales(net).values()])
    per_family, steps, cpu_total, wall_total = {}, 0, 0.0, 0.0
    for i, fam in enumerate(fams):
        cfg = ESConfig(families=(fam,), instances=instances, pairs=pairs, horizons=(horizon,), seed=i)
        t0, w0 = time.process_time(), time.perf_counter()
        _, entry = es_generation(theta, scales, cfg, 0, images)
        cpu, wall = time.process_time() - t0, time.perf_counter() - w0
        per_family[fam] = round(entry["optimizee_steps"] / cpu, 1)
        steps += entry["optimizee_steps"]
        cpu_total += cpu
        wall_total += wall
    return {"engine": "es", "families": list(fams), "horizon": horizon,
            "population": instances * (2 * pairs + 1), "optimizee_steps": steps,
            "generations": len(fams), "cpu_seconds": round(cpu_total, 2), "wall_seconds": round(wall_total, 2),
            "steps_per_cpu_second": steps / cpu_total,
            "meta_steps_per_hour": 3600 * len(fams) / cpu_total,
            "steps_per_cpu_second_by_family": per_family}


def main(argv: list[str] | None = None) -> int:
    """Meta-training throughput, BPTT against ES, one run; 0."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.meta_throughput", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bptt-steps", type=int, default=60, help="base-MLP steps of BPTT (default 60)")
    ap.add_argument("--horizon", type=int, default=200, help="ES horizon per generation (default 200)")
    ap.add_argument("--instances", type=int, default=4)
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--out", default=None, help="also write the results (JSON) to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    bptt = bptt_rate(args.bptt_steps, data_root=args.data_root)
    es = es_rate(args.horizon, args.instances, args.pairs, data_root=args.data_root)
    ratio = es["steps_per_cpu_second"] / bptt["steps_per_cpu_second"]
    load = "%.1f/%.1f/%.1f" % os.getloadavg() if hasattr(os, "getloadavg") else "?"
    command = "python -m benchmarks.meta_throughput " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"command: {command}\nthreads: {args.threads}, load average at the end: {load}\n")
    print("| engine | optimizee steps | CPU s | steps / CPU-s | meta-steps / CPU-hour |")
    print("|---|---|---|---|---|")
    for r, what in ((bptt, "BPTT, base MLP (meta_fit)"), (es, f"ES, population of {es['population']}, T={es['horizon']}")):
        print(f"| {what} | {r['optimizee_steps']} | {r['cpu_seconds']} | {r['steps_per_cpu_second']:.0f} | "
              f"{r['meta_steps_per_hour']:.0f} |")
    print(f"\nES / BPTT optimizee steps per CPU-second: {ratio:.1f}x")
    print("ES by family (steps / CPU-s): " + ", ".join(f"{k} {v:.0f}" for k, v in es["steps_per_cpu_second_by_family"].items()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": command, "load": load, "bptt": bptt, "es": es, "ratio": ratio}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
