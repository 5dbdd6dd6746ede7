"""What the benchmark tables share: the parameter sets, the timer, seeded construction, the
machine line and the number formats."""

from __future__ import annotations

import math
import os
import platform
import time
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor

from l2l_optim.kernels import resolve_impl
from l2l_optim.models import base_mlp, mlp5
from l2l_optim.meta.init_rules import init_net
from l2l_optim.registry import build_net

__all__ = ["GRAD_SCALE", "SIZES", "seeded", "untrained_net", "resolved_impl", "time_steps",
           "available_memory", "count_subnormal", "machine_info", "fmt_ms", "state_bytes_per_param",
           "step_bytes_per_coord", "set_c_layout", "c_layout"]

T = TypeVar("T")

#: standard deviation of the random gradients of the step and bandwidth tables: the magnitude
#: of real training gradients, far above the subnormal range (below 1.2e-38 in float32)
GRAD_SCALE = 1e-3


# ------------------------------------------------------------------------ parameter sets


def _model_shapes(builder) -> list[tuple[int, ...]]:
    with torch.device("meta"):  # shapes only: no memory, no draws from the global RNG
        return [tuple(p.shape) for p in builder().parameters()]


SIZES: dict[str, tuple[str, Callable[[], list[tuple[int, ...]]]]] = {
    "base": ("base MLP 784-500-10", lambda: _model_shapes(base_mlp)),
    "mlp5": ("5-layer MLP 784-1330x4-10 (16x)", lambda: _model_shapes(mlp5)),
    "100m": ("synthetic 25 x (2000, 2000)", lambda: [(2000, 2000)] * 25),
    # a step's fixed cost per tensor, which dominates on models of many small tensors
    "many": ("synthetic 300 x (128,): the cost per tensor", lambda: [(128,)] * 300),
}


# ------------------------------------------------------------------------- construction


def seeded(build: Callable[[], T], seed: int = 0) -> T:
    """``build()`` with torch's global RNG seeded by ``seed``; the caller's RNG state is restored
    afterwards, so seeded construction (module inits draw from the global RNG) has no side effect."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def untrained_net(arch: str, config: dict | None = None, *, init: str = "default", seed: int = 0):
    """A net of ``arch`` drawn under ``seed`` and started with
    :func:`~l2l_optim.meta.init_rules.init_net`:
    for timing, where a step's cost does not depend on the weights' values."""
    return seeded(lambda: init_net(build_net(arch, config), init), seed)


def resolved_impl(opt) -> str:
    """The concrete update path of a SimpleOptimizer (``"cpu"``, ``"triton"``, ...); ``""`` for
    optimizers without one."""
    impl = opt.param_groups[0].get("impl", getattr(opt, "impl", None))
    if impl is None:
        return ""
    p = opt.param_groups[0]["params"][0]
    return resolve_impl(impl, p.device.type)


# ------------------------------------------------------------------------ state and bytes


def _tensors(opt):
    """(parameter, its state's tensors) for every parameter of ``opt`` that has state."""
    for group in opt.param_groups:
        for p in group["params"]:
            state = opt.state.get(p)
            if state:
                yield p, [v for v in state.values() if torch.is_tensor(v)]


def state_bytes_per_param(opt) -> float:
    """The optimizer's state in bytes per parameter: every tensor it keeps, over the parameters
    that have state (NaN before its first step)."""
    nbytes = n = 0
    for p, tensors in _tensors(opt):
        nbytes += sum(t.numel() * t.element_size() for t in tensors)
        n += p.numel()
    return nbytes / n if n else math.nan


def step_bytes_per_coord(opt) -> float:
    """The bytes one fused SimpleOptimizer step moves per coordinate, at the least: the
    gradient read, the parameter read and written by each of the two passes (the second adds
    the aggregate's shared term), and every state tensor that grows with the parameter (h,
    v, the 8-bit state's block scales) read and written once; state with one value per tensor
    (the rms norm's c in that layout) moves next to nothing. With Schedule-Free averaging the
    passes move the base sequence ``z`` as they move the parameter, which they also read and
    write: ``z`` counts twice. NaN before the first step."""
    nbytes = n = 0
    for p, tensors in _tensors(opt):
        k = p.numel()
        if k == 0:
            continue
        g = p.grad.element_size() if p.grad is not None else p.element_size()
        per = g + 4 * p.element_size()
        per += sum(2 * t.numel() * t.element_size() / k for t in tensors
                   if t.numel() > 1 or t.numel() == k)
        z = opt.state[p].get("z")
        if torch.is_tensor(z) and z.numel() == k:
            per += 2 * z.element_size()
        nbytes += per * k
        n += k
    return nbytes / n if n else math.nan


def c_layout(opt) -> str:
    """The rms input norm's bias correction ``c`` in ``opt``'s state: ``"tensor"`` (one value per
    tensor), ``"coordinate"`` (one per coordinate) or ``""`` (none)."""
    for p, _ in _tensors(opt):
        c = opt.state[p].get("c")
        if torch.is_tensor(c) and p.numel() > 1:
            return "tensor" if c.numel() == 1 else "coordinate"
    return ""


def set_c_layout(opt, layout: str) -> None:
    """Keep ``c`` in ``layout`` (``"tensor"`` or ``"coordinate"``): the same values, which
    every step of the optimizer accepts in either layout (after its first step)."""
    for p, _ in _tensors(opt):
        state = opt.state[p]
        c = state.get("c")
        if not torch.is_tensor(c):
            continue
        if layout == "tensor" and c.numel() != 1:
            state["c"] = c.reshape(-1)[:1].clone()
        elif layout == "coordinate" and c.numel() == 1 and p.numel() != 1:
            state["c"] = c.reshape(1).expand(p.numel()).clone()


# -------------------------------------------------------------------------------- timing


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(opt, steps: int, *, warmup: int = 3, prepare: Callable[[], object] | None = None,
               device: torch.device | str = "cpu",
               budget: float = math.inf) -> tuple[list[float], list[float]]:
    """Time ``steps`` calls of ``opt.step()`` after ``warmup`` untimed ones.

    Args:
        prepare: called before every step, e.g. a forward and backward pass that fills the
            gradients; timed into the whole-step times only. Without it the gradients in
            place are reused.
        device: synchronised after ``prepare`` and after each step (CUDA runs asynchronously).
        budget: stop timing after about this many seconds of timed steps.

    Returns:
        ``(step_seconds, whole_seconds)``: per timed step, ``opt.step()`` alone, and
        ``prepare`` plus ``opt.step()``.
    """
    device = torch.device(device)
    step_s: list[float] = []
    whole_s: list[float] = []
    t_timed = math.inf
    for i in range(warmup + steps):
        if i == warmup:
            t_timed = time.perf_counter()
        t0 = time.perf_counter()
        if prepare is not None:
            prepare()
            _sync(device)
        t1 = time.perf_counter()
        opt.step()
        _sync(device)
        t2 = time.perf_counter()
        if i >= warmup:
            step_s.append(t2 - t1)
            whole_s.append(t2 - t0)
            if t2 - t_timed > budget:
                break
    return step_s, whole_s


# ------------------------------------------------------------------------------ the machine


def available_memory(device: torch.device) -> float:
    """Bytes free on ``device`` (``MemAvailable`` on the CPU; inf where that cannot be read)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return float(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return math.inf


def count_subnormal(tensors: list[Tensor]) -> int:
    """The number of subnormal (denormal) values in ``tensors``, each judged in its own dtype."""
    total = 0
    for t in tensors:
        if t.is_floating_point():
            a = t.detach().abs()
            total += int(((a < torch.finfo(t.dtype).tiny) & (a > 0)).sum())
    return total


def machine_info(device: torch.device) -> str:
    """One line: the CPU, its cores, torch's version and threads, the load average, the GPU."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    parts = [f"CPU {cpu}, {os.cpu_count()} logical cores, torch {torch.__version__}, "
             f"{torch.get_num_threads()} intra-op threads"]
    if device.type == "cpu":
        from l2l_optim.kernels import cpu as cpu_kernel

        if cpu_kernel.is_available():
            info = cpu_kernel.kernel_info()
            parts.append(f"CPU kernel ISA {info['isa']} (this CPU runs {','.join(info['supported'])})")
    if hasattr(os, "getloadavg"):
        parts.append("load average %.1f/%.1f/%.1f" % os.getloadavg())
    if device.type == "cuda":
        parts.append(f"GPU {torch.cuda.get_device_name(device)}")
    return "; ".join(parts)


# ------------------------------------------------------------------------------ reporting


def fmt_ms(t: float) -> str:
    """Seconds as milliseconds, three significant digits (``-`` for nan)."""
    if math.isnan(t):
        return "-"
    ms = t * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"
