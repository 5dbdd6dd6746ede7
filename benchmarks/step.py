"""The step-time table of ``python -m benchmarks.bench`` (``--tables step``).

Times ``optimizer.step()`` alone (gradients pre-filled with random values of realistic
magnitude, ``randn * GRAD_SCALE``; no forward or backward) for SimpleOptimizer (reference and
fused kernel), torch's Adam (foreach and fused), SGD, DMOptimizer and RNNProp, on four
parameter sets (:data:`benchmarks.common.SIZES`):

* ``base``: the paper's base MLP, 784-500-10 (``models.base_mlp``, 397,510 parameters);
* ``mlp5``: the 5-layer MLP with 16x the parameters, 784-1330-1330-1330-1330-10
  (``models.mlp5``, 6,368,050 parameters);
* ``100m``: a synthetic list of 25 tensors of 2000 x 2000 (100,000,000 parameters);
* ``many``: 300 tensors of 128 values: the fixed cost a step pays per tensor, which rules
  on models of many small tensors.

For each (size, optimizer) it reports the median (and the fastest) step time after warm-up,
the ratio to fused Adam measured in the same run, and the optimizer-state bytes per parameter.
The machines this runs on are shared, so the measurement is interleaved: ``--rounds`` rounds,
each of which builds every optimizer, warms it up and times ``steps / rounds`` steps, so that
a burst of load from another process hits every optimizer alike. Optimizers that would not
fit in memory (the LSTM optimizers at 100M: 320+ bytes of state per parameter) are skipped
and listed as such; ``--budget`` caps the seconds spent timing one (size, optimizer).

The meta-weights are random nets of the right architecture: step time does not depend on
their values.

Examples (from the repository's root):
    python -m benchmarks.bench --tables step                           # all sizes and optimizers
    python -m benchmarks.bench --tables step --sizes base --steps 50   # quick
    python -m benchmarks.bench --tables step --sizes 100m --optimizers simple-fused,adam-fused
    python -m benchmarks.bench --tables step --device cuda --sizes 100m    # on a GPU
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from l2l_optim.kernels import get_kernel, resolve_impl
from l2l_optim.nets import SimpleOptimizerNet
from l2l_optim.optimizer import SimpleOptimizer, optimizer_class

from .common import GRAD_SCALE, SIZES, available_memory, fmt_ms, resolved_impl, time_steps, untrained_net

__all__ = ["OPTIMIZERS", "DEFAULT_OPTIMIZERS", "run", "format_table"]


# ---------------------------------------------------------------------------- optimizers


def _learned(arch: str, **options):
    def build(params):
        return optimizer_class(arch)(params, weights=untrained_net(arch), **options)

    return build


class _KernelOnly:
    """The fused SimpleOptimizer kernel called directly (no torch.optim wrapper, no
    non-finite check): what the kernel itself costs, to set against the optimizer step."""

    def __init__(self, params):
        self.params = list(params)
        self.impl = "auto"
        self.param_groups = [{"params": self.params}]
        self.kernel = get_kernel(resolve_impl("auto", self.params[0].device.type))
        self.weights = untrained_net("simple").fused_weights(device=self.params[0].device)
        self.hiddens = [torch.zeros(10, p.numel(), device=p.device) for p in self.params]
        self.state = {p: {"h": h} for p, h in zip(self.params, self.hiddens)}
        self.lrs = [1e-3] * len(self.params)

    def step(self):
        with torch.no_grad():
            self.kernel(self.params, [p.grad for p in self.params], self.hiddens, self.lrs,
                        self.weights)


@dataclass
class Spec:
    build: Callable
    #: optimizer-state bytes per parameter, for the memory check before building
    state_bytes: float
    #: peak temporary bytes per parameter during a step (rough), same purpose
    temp_bytes: float
    note: str = ""


OPTIMIZERS: dict[str, Spec] = {
    "sgd": Spec(lambda ps: torch.optim.SGD(ps, lr=1e-3), 0, 0, "torch.optim.SGD, no momentum"),
    "adam-foreach": Spec(lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=True), 8, 8,
                         "torch.optim.Adam(foreach=True)"),
    "adam-fused": Spec(lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True), 8, 0,
                       "torch.optim.Adam(fused=True)"),
    "simple-ref": Spec(_learned("simple", impl="reference", state_dtype=torch.float32), 40, 48,
                       "SimpleOptimizer(impl='reference', state_dtype=torch.float32)"),
    "simple-fused": Spec(_learned("simple", impl="auto", state_dtype=torch.float32), 40, 0,
                         "SimpleOptimizer(impl='auto', state_dtype=torch.float32)"),
    "simple-kernel": Spec(_KernelOnly, 40, 0, "the fused kernel alone (no optimizer wrapper)"),
    # the default weights' rule: the fused kernel also normalises the input (two more values)
    "simple-rms-fused": Spec(lambda ps: SimpleOptimizer(ps, weights=SimpleOptimizerNet(input_norm="rms"),
                                                        state_dtype=torch.float32),
                             48, 0, "SimpleOptimizer(impl='auto', state_dtype=torch.float32), input_norm='rms' net"),
    "simple-fused-bf16": Spec(_learned("simple", impl="auto", state_dtype=torch.bfloat16), 20, 4,
                              "SimpleOptimizer(impl='auto', state_dtype=torch.bfloat16)"),
    "dm": Spec(_learned("dm"), 320, 1400, "DMOptimizer"),
    "rnnprop": Spec(_learned("rnnprop"), 332, 1600, "RNNProp"),
}
DEFAULT_OPTIMIZERS = ["sgd", "adam-foreach", "adam-fused", "simple-ref", "simple-fused",
                      "simple-kernel", "simple-fused-bf16", "dm", "rnnprop"]


# ------------------------------------------------------------------------------- running


@dataclass
class Result:
    size: str
    optimizer: str
    n_params: int
    times: list[float] = field(default_factory=list)
    state_bytes: int = 0
    skipped: str = ""
    impl: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.times) if self.times else math.nan

    @property
    def best(self) -> float:
        return min(self.times) if self.times else math.nan


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    total = 0
    for state in opt.state.values():
        for v in state.values():
            if isinstance(v, Tensor):
                total += v.numel() * v.element_size()
    return total


def run(sizes, optimizers, *, steps=50, warmup=3, rounds=5, budget=120.0, device="cpu",
        log=print) -> list[Result]:
    """Benchmark and return one :class:`Result` per (size, optimizer)."""
    device = torch.device(device)
    results: list[Result] = []
    per_round = max(1, math.ceil(steps / rounds))
    for size in sizes:
        label, shapes_fn = SIZES[size]
        shapes = shapes_fn()
        n = sum(math.prod(s) for s in shapes)
        gen = torch.Generator(device="cpu").manual_seed(0)
        params = [torch.randn(s, generator=gen).to(device).requires_grad_() for s in shapes]
        for p in params:
            p.grad = (torch.randn(p.shape, generator=gen) * GRAD_SCALE).to(device)
        res = {name: Result(size, name, n) for name in optimizers}
        spent = {name: 0.0 for name in optimizers}
        log(f"[{size}] {label}: {n:,} parameters in {len(shapes)} tensors")
        for r in range(rounds):
            for name in optimizers:
                result = res[name]
                if result.skipped or spent[name] > budget:
                    continue
                # memory check before every build (the machine is shared: others' use moves);
                # the parameters and gradients are already allocated and shared
                spec = OPTIMIZERS[name]
                need = n * (spec.state_bytes + spec.temp_bytes)
                avail = available_memory(device)
                if need > 0.6 * avail:
                    result.skipped = (
                        f"needs ~{need / 2**30:.1f} GiB (state {spec.state_bytes:g} B/param + "
                        f"step temporaries), {avail / 2**30:.1f} GiB available"
                    )
                    result.times.clear()
                    continue
                opt = None
                try:
                    t_build = time.perf_counter()  # building and warming up count too
                    opt = OPTIMIZERS[name].build(params)
                    times, _ = time_steps(opt, per_round, warmup=warmup, device=device,
                                          budget=budget / rounds)
                    result.times.extend(times)
                    spent[name] += time.perf_counter() - t_build
                    result.state_bytes = _state_bytes(opt)
                    result.impl = result.impl or resolved_impl(opt)
                except (RuntimeError, MemoryError) as e:  # out of memory, unavailable kernel
                    msg = str(e).strip().splitlines()[0][:120]
                    result.skipped = f"{type(e).__name__}: {msg}"
                    result.times.clear()
                finally:
                    opt = None
                    gc.collect()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
            log(f"  round {r + 1}/{rounds} done")
        results.extend(res[name] for name in optimizers)
        log(format_table([res[name] for name in optimizers]))
        del params
        gc.collect()
    return results


# ------------------------------------------------------------------------------ reporting


def format_table(results: list[Result]) -> str:
    lines = [
        "| params | optimizer | median ms | best ms | steps | x fused Adam | x fused Simple "
        "| coords/s | state B/param |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    by_size: dict[str, list[Result]] = {}
    for r in results:
        by_size.setdefault(r.size, []).append(r)
    for size, rs in by_size.items():
        adam = next((r for r in rs if r.optimizer == "adam-fused" and r.times), None)
        simple = next((r for r in rs if r.optimizer == "simple-fused" and r.times), None)
        for r in rs:
            name = r.optimizer + (f" ({r.impl})" if r.impl else "")
            if r.skipped or not r.times:
                lines.append(f"| {size} ({r.n_params:,}) | {name} | skipped: {r.skipped or 'no data'}"
                             " | | | | | | |")
                continue
            xa = f"{r.median / adam.median:.1f}" if adam else "-"
            xs = f"{r.median / simple.median:.2f}" if simple else "-"
            rate = r.n_params / r.median
            lines.append(
                f"| {size} ({r.n_params:,}) | {name} | {fmt_ms(r.median)} | {fmt_ms(r.best)} "
                f"| {len(r.times)} | {xa} | {xs} | {rate / 1e6:.0f}M "
                f"| {r.state_bytes / r.n_params:.1f} |"
            )
    return "\n".join(lines)
