"""Bandwidth table of ``python -m benchmarks.bench``: how far the fused step is from the memory bound.

The fused SimpleOptimizer step streams every coordinate's state through memory about once, so
its speed limit is the machine's memory bandwidth. Per parameter set and hidden-state dtype this
module times, in the same interleaved rounds:

* ``step``: ``SimpleOptimizer(params, weights="simple", state_dtype=...).step()`` (the public
  optimizer, with its default ``nonfinite="skip"`` check and bookkeeping; the rule without
  averaging, whose state the table's options lean; the default ``simple-sf`` keeps and moves
  its averaging's base sequence besides, as the training-step table shows);
* ``update``: :func:`l2l_optim.functional.simple_update` on the same parameters and the same
  hidden states: the update alone, without the optimizer's non-finite check (the functional
  form has none) and without its per-step bookkeeping;
* ``copy``: ``dst.copy_(src)`` on float32 buffers of half the step's bytes each, so that the
  read of ``src`` plus the write of ``dst`` moves as many bytes as the step (capped by
  ``copy_max_bytes``): the streaming-copy bandwidth this machine gives under this run's load;
* ``check``: the optimizer's non-finite handling alone, as ``step()`` runs it on these
  gradients (the scan of every gradient and the policy that reads its result), so that its
  share of the step is a ratio of two medians, not the difference of two (``step`` minus
  ``update``, which the table also gives: the check plus the optimizer's bookkeeping).

Each round times the copy first, then the step and the update, whose order alternates from round
to round: on sets that fit in the last-level cache the second one would otherwise always find
the state the first left there (use an even number of rounds).

A step's achieved bandwidth counts the bytes it moves per coordinate at the least, computed from
the optimizer's state after its first step (:func:`~benchmarks.common.step_bytes_per_coord`):
read g 4, theta read and written by each of the two passes 16, every per-coordinate state
tensor read and written once. With an fp32 hidden state h is 40 + 40 and the rms input norm's
running mean v 4 + 4: 108 B with one bias correction c per tensor, 116 B with c per coordinate
(4 + 4 more); with a bf16 hidden state h is 20 + 20: 68 and 76 B. Each row also gives the
state's bytes per parameter (every tensor the optimizer keeps). The rows cover each hidden-state
dtype with c in either layout (``c_layouts``; the optimizer's own layout is marked). The copy
counts its read and its write, as STREAM's copy does (on x86 both the kernel's stores and the
copy's incur the same write-allocate reads, which neither count).

Gradients are ``randn * grad_scale`` (1e-3 by default), fixed for the run: the magnitude of
real training gradients, with no subnormal values. ``torch.set_flush_denormal`` stays at torch's
default (off), as in user code, so a subnormal value would cost what it costs there; every row
counts the subnormal values in the gradients and hidden states after timing, to show that
none were timed.
"""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from l2l_optim.functional import RunningRms, simple_update
from l2l_optim.optimizer import SimpleOptimizer
from l2l_optim.rounding import rounding_keys
from l2l_optim.weights import resolve_net

from .common import (GRAD_SCALE, SIZES, available_memory, c_layout, count_subnormal, fmt_ms,
                     resolved_impl, set_c_layout, state_bytes_per_param, step_bytes_per_coord,
                     time_steps)

__all__ = ["BandwidthConfig", "BandwidthRow", "BW_SIZES", "C_LAYOUTS", "STATE_DTYPES",
           "resolve_size", "run_bandwidth", "format_bandwidth", "bandwidth_targets"]

#: the rms input norm's bias correction c: one value per tensor or one per coordinate
C_LAYOUTS = ("tensor", "coordinate")
#: the hidden-state dtypes by name
STATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.int8}
#: state bytes per coordinate, for the memory check (10 hidden values, v and c)
_STATE_BYTES = {"float32": 48, "bfloat16": 28, "int8": 18}

#: parameter sets: the step table's plus one 10M-coordinate tensor (the bandwidth target's size)
BW_SIZES: dict[str, tuple[str, Callable[[], list[tuple[int, ...]]]]] = {
    "10m": ("one tensor of 10,000,000", lambda: [(10_000_000,)]),
    **SIZES,
}
DEFAULT_BW_SIZES = ["10m", "base", "mlp5", "100m"]


def resolve_size(size: str) -> tuple[str, list[tuple[int, ...]]]:
    """The label and tensor shapes of a parameter set.

    Args:
        size: a name in :data:`BW_SIZES`, or a coordinate count (``"4096"``, ``"1e6"``) for
            one tensor of that many coordinates.

    Returns:
        ``(label, shapes)``.

    Raises:
        ValueError: neither a known name nor a positive count.
    """
    if size in BW_SIZES:
        label, shapes = BW_SIZES[size]
        return label, shapes()
    try:
        n = int(float(size))
    except ValueError:
        n = 0
    if n <= 0:
        raise ValueError(f"unknown size {size!r}; choose from {', '.join(BW_SIZES)} or a count")
    return f"one tensor of {n:,}", [(n,)]


@dataclass
class BandwidthConfig:
    """What the bandwidth table measures.

    Args:
        sizes: parameter sets (see :func:`resolve_size`).
        state_dtypes: hidden-state dtypes, names in :data:`STATE_DTYPES`.
        c_layouts: layouts of the rms input norm's bias correction, from :data:`C_LAYOUTS`
            (a net without the norm gets one row per dtype).
        steps: timed calls per (row, variant), split over the rounds.
        warmup: untimed calls per (row, variant) in every round.
        rounds: interleaved rounds: each times copy, step and update of every row in turn,
            so that a burst of load from another process falls on all of them alike.
        budget: about the most seconds of timed calls per (row, variant).
        copy_max_bytes: cap on the bytes one copy moves (read plus write); above it the copy
            runs on a smaller buffer (still far beyond the caches) to spare memory.
        grad_scale: standard deviation of the random gradients.
        device: ``"cpu"`` or ``"cuda"``.
        seed: for the parameters, gradients and copy buffers.
    """

    sizes: list[str] = field(default_factory=lambda: list(DEFAULT_BW_SIZES))
    state_dtypes: list[str] = field(default_factory=lambda: ["float32", "bfloat16"])
    c_layouts: list[str] = field(default_factory=lambda: list(C_LAYOUTS))
    steps: int = 30
    warmup: int = 2
    rounds: int = 5
    budget: float = 60.0
    copy_max_bytes: int = 2 * 2**30
    grad_scale: float = GRAD_SCALE
    device: str = "cpu"
    seed: int = 0


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else math.nan


@dataclass
class BandwidthRow:
    """One (parameter set, hidden-state dtype) of the bandwidth table; times in seconds."""

    size: str
    label: str
    n_coords: int
    n_tensors: int
    state_dtype: str
    #: the rms input norm's c: "tensor", "coordinate" or "" (no norm)
    c_layout: str = ""
    #: whether c_layout is the one the optimizer keeps by itself
    c_default: bool = True
    #: bytes the step moves per coordinate, at the least (from the state)
    bytes_per_coord: float = math.nan
    #: the optimizer's state in bytes per parameter
    state_bytes_per_param: float = math.nan
    copy_bytes: int = 0
    #: the update path ``impl="auto"`` resolved to (``"cpu"``: the fused kernel)
    impl: str = ""
    step_s: list[float] = field(default_factory=list)
    update_s: list[float] = field(default_factory=list)
    copy_s: list[float] = field(default_factory=list)
    #: the non-finite handling alone (the optimizer's check, as step() runs it)
    check_s: list[float] = field(default_factory=list)
    #: subnormal values in the gradients and hidden states after timing (0 expected)
    subnormals: int = 0
    #: steps the optimizer skipped for non-finite gradients (0 expected)
    skipped_steps: int = 0
    skipped: str = ""

    @property
    def step_bytes(self) -> float:
        return self.bytes_per_coord * self.n_coords

    @property
    def state(self) -> str:
        """The state option: dtype and, with the rms norm, c's layout."""
        return self.state_dtype + (f", c per {self.c_layout}" if self.c_layout else "")

    @property
    def step_gbs(self) -> float:
        return self.step_bytes / _median(self.step_s) / 1e9

    @property
    def update_gbs(self) -> float:
        return self.step_bytes / _median(self.update_s) / 1e9

    @property
    def copy_gbs(self) -> float:
        return self.copy_bytes / _median(self.copy_s) / 1e9

    @property
    def step_fraction(self) -> float:
        """The step's achieved bandwidth as a fraction of the same run's copy bandwidth."""
        return self.step_gbs / self.copy_gbs

    @property
    def update_fraction(self) -> float:
        return self.update_gbs / self.copy_gbs

    @property
    def check_share(self) -> float:
        """The non-finite handling's share of the step: its median time over the step's."""
        return _median(self.check_s) / _median(self.step_s)

    @property
    def overhead_share(self) -> float:
        """The share of the step that is not the update: the non-finite check and the
        optimizer's bookkeeping (median step minus median update, over median step)."""
        step = _median(self.step_s)
        return (step - _median(self.update_s)) / step

    def to_json(self) -> dict:
        """The row as JSON-ready data: the raw times and the derived columns."""
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        for k in ("step_gbs", "update_gbs", "copy_gbs", "step_fraction", "update_fraction",
                  "check_share", "overhead_share"):
            out[k] = getattr(self, k)
        for k in ("step_s", "update_s", "copy_s", "check_s"):
            out[k.replace("_s", "_median_s")] = _median(getattr(self, k))
        return out


class _Call:
    """``step()`` runs ``fn``: lets :func:`~benchmarks.common.time_steps` time any callable."""

    def __init__(self, fn: Callable[[], object]):
        self.step = fn


def _copy_bytes(row: BandwidthRow, cap: int) -> int:
    # a whole number of float32 pairs (one in src, one in dst), at most the cap
    return max(8, int(min(row.step_bytes, cap)) // 8 * 8)


def run_bandwidth(cfg: BandwidthConfig, log: Callable[[str], object] = print) -> list[BandwidthRow]:
    """Measure the bandwidth table.

    Args:
        cfg: what to measure.
        log: receives progress lines.

    Returns:
        One :class:`BandwidthRow` per (size, state dtype), in that order; rows that did not fit
        in memory have ``skipped`` set and no times.
    """
    device = torch.device(cfg.device)
    per_round = max(1, math.ceil(cfg.steps / cfg.rounds))
    rows: list[BandwidthRow] = []
    # the optimizers use the shipped default weights; with the rms input norm, c has a layout
    norm = _shipped_input_norm() == "rms"
    layouts = list(cfg.c_layouts) if norm else [""]
    options = [(d, lay) for d in cfg.state_dtypes for lay in layouts]
    for size in cfg.sizes:
        label, shapes = resolve_size(size)
        n = sum(math.prod(s) for s in shapes)
        size_rows = [BandwidthRow(size, label, n, len(shapes), d, c_layout=lay)
                     for d, lay in options]
        rows.extend(size_rows)
        # parameters and gradients (8 B), every option's state, the copy buffers (at most a
        # step's bytes, ~116 B per coordinate)
        need = n * (8 + sum(_STATE_BYTES[d] for d, _ in options)) + min(
            116 * n, cfg.copy_max_bytes)
        avail = available_memory(device)
        if need > 0.6 * avail:  # the machine is shared: leave the others room
            for row in size_rows:
                row.skipped = f"needs ~{need / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB available"
            log(f"[bandwidth {size}] skipped: {size_rows[0].skipped}")
            continue
        log(f"[bandwidth {size}] {label}: {n:,} coordinates in {len(shapes)} tensors")
        gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
        params = [torch.randn(s, generator=gen).to(device).requires_grad_() for s in shapes]
        for p in params:
            p.grad = (torch.randn(p.shape, generator=gen) * cfg.grad_scale).to(device)
        grads = [p.grad for p in params]
        opts = []
        for row in size_rows:
            opt = SimpleOptimizer(params, weights="simple", state_dtype=STATE_DTYPES[row.state_dtype])
            opt.step()  # creates the hidden states that the functional update reuses
            if row.c_layout:
                row.c_default = c_layout(opt) == row.c_layout
                set_c_layout(opt, row.c_layout)
                opt.step()  # the optimizer takes c in this layout
            row.bytes_per_coord = step_bytes_per_coord(opt)
            row.state_bytes_per_param = state_bytes_per_param(opt)
            row.copy_bytes = _copy_bytes(row, cfg.copy_max_bytes)
            opts.append(opt)
        # one pair of buffers per size; each row copies a prefix of its own byte count
        copy_max = max(row.copy_bytes for row in size_rows)
        src = torch.randn(copy_max // 8, generator=gen).to(device)
        dst = torch.empty_like(src)
        # the check's inputs as step() gathers them: (params, grads, where), per optimizer
        checked = []
        for opt in opts:
            ps, gs, _, _, where = opt._gather()
            checked.append((ps, gs, where))
        for r in range(cfg.rounds):
            for row, opt, check_args in zip(size_rows, opts, checked):
                hiddens = [opt.state[p]["h"] for p in params]
                # the optimizer's rounding keys and 8-bit scales, as its step passes them
                keys = rounding_keys([opt.state[p]["step"] for p in params], None,
                                     opt.net.hidden_size)
                scales = [opt.state[p].get("h_scale") for p in params]
                lrs = [opt.param_groups[0]["lr"]] * len(params)
                rms = (RunningRms([opt.state[p]["v"] for p in params],
                                  [opt.state[p]["c"] for p in params]) if norm else None)
                k = row.copy_bytes // 8
                variants = (
                    ("copy_s", lambda s=src[:k], d=dst[:k]: d.copy_(s)),
                    ("step_s", opt.step),
                    ("update_s", lambda o=opt, h=hiddens, lr=lrs, m=rms, ps=params, gs=grads,
                            k=keys, sc=scales:
                        simple_update(ps, gs, h, lr, o.net, rms=m, rounding=k, hidden_scales=sc)),
                    ("check_s", functools.partial(_check_nonfinite, opt, *check_args)),
                )
                if r % 2:  # step and update take turns right after the copy, which evicts
                    # what the other warmed
                    variants = (variants[0], variants[2], variants[1], variants[3])
                for attr, fn in variants:
                    times, _ = time_steps(_Call(fn), per_round, warmup=cfg.warmup, device=device,
                                          budget=cfg.budget / cfg.rounds)
                    getattr(row, attr).extend(times)
            log(f"  round {r + 1}/{cfg.rounds} done")
        for row, opt in zip(size_rows, opts):
            row.subnormals = count_subnormal(grads + [opt.state[p]["h"] for p in params])
            row.skipped_steps = int(opt.skipped_steps)
            row.impl = resolved_impl(opt)
        log(format_bandwidth(size_rows))
        del opts, params, grads, src, dst
    return rows


def _check_nonfinite(opt: SimpleOptimizer, params: list[Tensor], grads: list[Tensor],
                     where: list) -> None:
    """The non-finite handling of ``opt.step()`` alone, on what its ``_gather`` returned."""
    go_on, _ = opt._check_finite(params, grads, where)
    if not go_on:
        raise RuntimeError("the benchmark's gradients are meant to be finite")


def _shipped_input_norm() -> str | None:
    """The input norm of the shipped weights ``simple``, which the table's optimizers use."""
    return getattr(resolve_net("simple")[0], "input_norm", None)


# ------------------------------------------------------------------------------ reporting


def _fmt(x: float, spec: str) -> str:
    return "-" if math.isnan(x) else format(x, spec)


def format_bandwidth(rows: list[BandwidthRow]) -> str:
    """The bandwidth table in Markdown (medians; GB = 1e9 bytes)."""
    lines = [
        "| params | state | state B/param | B/coord | step ms | step GB/s | update ms | update GB/s | copy MB "
        "| copy GB/s | step / copy | update / copy | check ms | check share | step - update "
        "| subnormals |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        impl = f" ({r.impl})" if r.impl else ""
        mark = "" if r.c_default or not r.c_layout else " (not the default)"
        head = (f"| {r.size} ({r.n_coords:,} in {r.n_tensors}) | {r.state}{mark}{impl} "
                f"| {r.state_bytes_per_param:.0f} | {r.bytes_per_coord:.0f}")
        if r.skipped or not (r.step_s and r.copy_s and r.check_s):
            lines.append(f"{head} | skipped: {r.skipped or 'no data'} | | | | | | | | | | | |")
            continue
        skipped = f" ({r.skipped_steps} skipped steps)" if r.skipped_steps else ""
        lines.append(
            f"{head} | {fmt_ms(_median(r.step_s))} | {r.step_gbs:.1f} | {fmt_ms(_median(r.update_s))} "
            f"| {_fmt(r.update_gbs, '.1f')} | {r.copy_bytes / 1e6:.0f} | {r.copy_gbs:.1f} "
            f"| {r.step_fraction:.0%} | {_fmt(r.update_fraction, '.0%')} | {fmt_ms(_median(r.check_s))} "
            f"| {r.check_share:.1%} | {_fmt(r.overhead_share, '.1%')} | {r.subnormals}{skipped} |"
        )
    return "\n".join(lines)


def bandwidth_targets(rows: list[BandwidthRow]) -> list[dict]:
    """The bandwidth targets, checked on the 10M-coordinate rows.

    Returns:
        One dict per target: ``target``, ``measured`` (a fraction, or None), ``unit``
        (``"%"``: print it as a percentage) and ``met`` (True / False, None when not measured).
    """
    out = []
    for dtype in ("float32", "bfloat16"):
        row = next((r for r in rows if r.size == "10m" and r.state_dtype == dtype
                    and r.c_default and r.step_s and r.copy_s), None)
        # the bytes a row counts depend on the net (the rms norm's running means): unmeasured,
        # there is no row to say them
        nbytes = "" if row is None else f" ({row.bytes_per_coord:.0f} B/coord)"
        out.append(dict(target=f"10M step, {dtype} state{nbytes}: >= 80% of copy GB/s",
                        measured=None if row is None else row.step_fraction, unit="%",
                        met=None if row is None else row.step_fraction >= 0.8))
    row = next((r for r in rows if r.size == "10m" and r.state_dtype == "float32"
                and r.c_default and r.step_s and r.check_s), None)
    out.append(dict(target="10M step, float32 state: non-finite check <= 5% of the step",
                    measured=None if row is None else row.check_share, unit="%",
                    met=None if row is None else row.check_share <= 0.05))
    return out


def describe() -> str:
    """The paragraph printed above the bandwidth table."""
    return (
        "Bandwidth: `state B/param`: the optimizer's state in bytes per parameter; `B/coord`: "
        "the bytes a step moves per coordinate at the least (g read, theta read and written by "
        "both passes, per-coordinate state read and written once). "
        "SimpleOptimizer.step() (`step`), functional.simple_update on the same state "
        "without the non-finite check (`update`) and dst.copy_(src) moving as many bytes (`copy`, "
        "read + write), interleaved. GB/s = B/coord x coordinates / median time. Gradients: "
        "randn x 1e-3, fixed (real gradients' magnitude, no subnormal values); flush-denormal "
        "left off (torch's default); `subnormals` counts those in g and h after timing. "
        "`check`: the optimizer's non-finite check alone, as step() runs it; `check share` = "
        "check / step; `step - update` = (step - update) / step, the check plus the optimizer's "
        "bookkeeping. int8: the 8-bit hidden state (its codec inside the CPU kernel's pass)."
    )

