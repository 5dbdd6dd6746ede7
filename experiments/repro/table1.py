"""Table 1: parameter counts and time per optimizer step on the base MLP.

Per optimizer, the step times are ``opt.step()`` alone and the whole training step (forward,
backward, step) on a fixed batch of random inputs, after three warm-up steps.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

# the library this experiment uses, all in one place
from l2l_optim.kernels import resolve_impl
from l2l_optim.models import base_mlp

from .experiments import CLI, PAPER_TABLE1, Settings
from .learned import learned_factory, resolve_weights
from .plots import plot_table1
from .report import format_experiment
from .seeding import seeded
from .store import log, machine, now, read_json, write_json

__all__ = ["run_table1"]

_ENTRIES = [("simple", "SimpleOptimizer"), ("dm", "DMOptimizer"), ("rnnprop", "RNNProp"), ("adam", "Adam"),
            ("sgd", "SGD")]
_WARMUP = 3


def _quantile(vals: list[float], q: float) -> float:
    v = sorted(vals)
    return v[min(len(v) - 1, int(q * len(v)))]


def _update_path(opt: torch.optim.Optimizer) -> str:
    """The concrete update path of a SimpleOptimizer (``"cpu"``, ``"reference"``, ...); ``""``
    for optimizers without one."""
    impl = opt.param_groups[0].get("impl", getattr(opt, "impl", None))
    return "" if impl is None else resolve_impl(impl, opt.param_groups[0]["params"][0].device.type)


def _time_steps(opt: torch.optim.Optimizer, steps: int,
                prepare: Callable[[], object]) -> tuple[list[float], list[float]]:
    """``(step_seconds, whole_seconds)`` of ``steps`` steps after :data:`_WARMUP` untimed ones:
    ``opt.step()`` alone, and ``prepare()`` (the forward and backward pass) plus the step."""
    step_s, whole_s = [], []
    for i in range(_WARMUP + steps):
        t0 = time.perf_counter()
        prepare()
        t1 = time.perf_counter()
        opt.step()
        t2 = time.perf_counter()
        if i >= _WARMUP:
            step_s.append(t2 - t1)
            whole_s.append(t2 - t0)
    return step_s, whole_s


def _optimizer(key: str, model: torch.nn.Module) -> tuple[torch.optim.Optimizer, int | None, dict | None, str]:
    """``(optimizer, meta-parameters, weights info, update path)`` of table row ``key``."""
    if key not in PAPER_TABLE1:
        opt = (torch.optim.Adam if key == "adam" else torch.optim.SGD)(model.parameters(), lr=1e-3)
        return opt, None, None, "torch (foreach)"
    # timing does not depend on the weights' values: untrained ones stand in for missing files
    net, info = resolve_weights(key, True)
    opt = learned_factory(net, info["arch"])(model.parameters())
    return opt, net.num_parameters(), info, _update_path(opt) or "generic (net forward)"


def _time_row(key: str, label: str, batch: tuple[torch.Tensor, torch.Tensor], steps: int) -> dict:
    model = seeded(base_mlp)
    opt, n_params, info, impl = _optimizer(key, model)
    x, y = batch

    def forward_backward():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()

    step_s, whole_s = _time_steps(opt, steps, forward_backward)
    step_ms, train_ms = [1000 * t for t in step_s], [1000 * t for t in whole_s]
    paper_params, paper_ms = PAPER_TABLE1.get(key, (None, None))
    return {"optimizer": key, "label": label, "params": n_params, "step_ms_median": statistics.median(step_ms),
            "step_ms_p10": _quantile(step_ms, 0.1), "step_ms_p90": _quantile(step_ms, 0.9),
            "train_step_ms_median": statistics.median(train_ms), "timed_steps": steps,
            "paper_params": paper_params, "paper_step_ms": paper_ms, "weights": info, "impl": impl}


def _comparisons(rows: list[dict]) -> list[dict]:
    by = {r["optimizer"]: r for r in rows}
    comparisons = []
    for key, (n, _) in PAPER_TABLE1.items():
        ok = by[key]["params"] == n
        comparisons.append({"claimed": True, "holds": ok, "text": f"{by[key]['label']} has {by[key]['params']} "
                            f"parameters, the paper {n}: {'agrees' if ok else 'disagrees'}"})
    for a, b in (("simple", "dm"), ("simple", "rnnprop"), ("dm", "rnnprop")):
        ta, tb = by[a]["step_ms_median"], by[b]["step_ms_median"]
        ok = ta < tb
        comparisons.append({"claimed": True, "holds": ok, "text": (
            f"{by[a]['label']}'s step {ta:.2f} ms is {'below' if ok else 'not below'} {by[b]['label']}'s "
            f"{tb:.2f} ms (paper: {PAPER_TABLE1[a][1]} vs {PAPER_TABLE1[b][1]} ms): "
            f"{'agrees' if ok else 'disagrees'}")})
    return comparisons


def _write_csv(path, rows: list[dict]) -> None:
    cols = ["optimizer", "params", "step_ms_median", "step_ms_p10", "step_ms_p90", "train_step_ms_median",
            "paper_params", "paper_step_ms"]
    with open(path, "w") as f:
        f.write(",".join(cols) + "\n")
        for r in rows:
            f.write(",".join("" if r[c] is None else (f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]))
                             for c in cols) + "\n")


def run_table1(s: Settings) -> dict:
    """Time every optimizer (``s.steps`` timed steps, default 100); write table1.csv, the summary, the plot."""
    out = s.out / "table1"
    out.mkdir(parents=True, exist_ok=True)
    steps = s.steps or 100
    gen = torch.Generator().manual_seed(0)
    batch = (torch.randn(s.batch_size, 1, 28, 28, generator=gen),
             torch.randint(0, 10, (s.batch_size,), generator=gen))
    rows = []
    for key, label in _ENTRIES:
        row = _time_row(key, label, batch, steps)
        rows.append(row)
        log(f"[table1] {label}: {row['params'] or '-'} params, step {row['step_ms_median']:.2f} ms (median of "
            f"{steps}), whole training step {row['train_step_ms_median']:.2f} ms", s.quiet)
    _write_csv(out / "table1.csv", rows)
    summary = {
        "experiment": "table1", "title": "Table 1: parameters and time per optimizer step on the base MLP",
        "task": "mnist-mlp (random inputs for timing)", "batch_size": s.batch_size, "command": s.command,
        "default_command": f"{CLI} table1",
        "paper": "132 / 5301 / 6801 parameters; 1.96 / 21.88 / 37.02 ms per step (device unknown).",
        "note": f"opt.step() alone and whole training steps (forward, backward, step), median of {steps} after "
                f"{_WARMUP} warm-up steps, batch of random inputs; CPU times depend on the load (loadavg below).",
        "rows": rows, "comparisons": _comparisons(rows), "machine": machine(), "plot": "table1.png",
        "random_weights": [r["optimizer"] for r in rows if r["weights"] and r["weights"]["random"]],
        "written": now(),
    }
    write_json(out / "summary.json", summary)
    plot_table1(out, rows)
    log(format_experiment(summary), s.quiet)
    return read_json(out / "summary.json")
