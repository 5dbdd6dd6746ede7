"""Training-step table of ``python -m benchmarks.bench``: whole steps against fused Adam.

What a user pays per training step is ``zero_grad``, the forward and backward passes and
``opt.step()`` together; this module times that whole step for SimpleOptimizer (the default
weights ``simple-sf``; the weights ``simple`` with bf16, fp32 and 8-bit state, the state
options the bandwidth table leans; fused kernel, ``nonfinite="skip"``),
and torch's Adam (fused and foreach) on the models of :data:`TRAIN_MODELS`, and reports each
optimizer's whole step as a ratio to fused Adam's in the same run.

The gradients come from real forward and backward passes on random inputs of realistic scale
(``randn`` images, the normalised MNIST pixels' scale, and random labels; the transformer's
own random addition problems), cycled through a few pre-drawn batches so that drawing them
is not timed. Training runs for only tens of steps, so the loss is nowhere near zero and the
gradients keep their magnitude; each row counts the subnormal gradient values after timing
(``torch.set_flush_denormal`` stays at torch's default, off) and the steps SimpleOptimizer
skipped for non-finite gradients, both 0 in a sound measurement.

Each (model, optimizer) trains its own copy of one initial model. The timing is interleaved:
``rounds`` rounds, each of which warms up and times every optimizer in turn.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import math
import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from l2l_optim.evaluation.suite import default_suite
from l2l_optim.models import base_mlp, lenet, mlp5
from l2l_optim.optimizer import SimpleOptimizer

from .common import (count_subnormal, fmt_ms, resolved_impl, seeded, state_bytes_per_param,
                     step_bytes_per_coord, time_steps)

__all__ = ["TrainConfig", "TrainModel", "TrainRow", "TRAIN_MODELS", "TRAIN_OPTIMIZERS",
           "TARGET_OPTIMIZERS", "TARGET_STATE_DTYPES", "run_train", "format_train", "train_targets"]

Batch = tuple[Tensor, Tensor]


@dataclass(frozen=True)
class TrainModel:
    """A model to time whole training steps on.

    Args:
        label: one line for the table.
        build: a freshly initialised model.
        batch: ``batch(generator) -> (x, y)``, one training minibatch.
        loss: ``loss(model(x), y) -> scalar``.
        batch_size: for the table.
    """

    label: str
    build: Callable[[], nn.Module]
    batch: Callable[[torch.Generator], Batch]
    loss: Callable[[Tensor, Tensor], Tensor]
    batch_size: int


def _mnist_batch(gen: torch.Generator, batch_size: int = 128) -> Batch:
    # normalised MNIST pixels have mean 0 and std 1: randn is that scale
    return (torch.randn(batch_size, 1, 28, 28, generator=gen),
            torch.randint(0, 10, (batch_size,), generator=gen))


def _mnist_model(label: str, build: Callable[[], nn.Module]) -> TrainModel:
    return TrainModel(label, build, _mnist_batch, F.cross_entropy, 128)


def _transformer() -> TrainModel:
    # the validation suite's transformer, reused as it is (model, batches, loss)
    task = next(t for t in default_suite() if t.name == "addition-transformer")
    return TrainModel(f"transformer: {task.description}", task.model_fn, task.batch_fn,
                      task.loss_fn, task.config["batch_size"])


#: model name -> factory of its :class:`TrainModel` (built when used)
TRAIN_MODELS: dict[str, Callable[[], TrainModel]] = {
    "base": lambda: _mnist_model("base MLP 784-500-10", base_mlp),
    "lenet": lambda: _mnist_model("LeNet-5", lenet),
    "mlp5": lambda: _mnist_model("5-layer MLP 784-1330x4-10", mlp5),
    # the 4M-parameter target: mlp5's layout at width 1024 (3,962,890 parameters)
    "mlp4m": lambda: _mnist_model("MLP 784-1024x4-10 (4M)", functools.partial(mlp5, 1024)),
    # a model where the optimizer's state is gigabytes: mlp5's layout at width 3960
    # (50,204,890 parameters; SimpleOptimizer's fp32 state 2.2 GB, fused Adam's 0.4 GB)
    "mlp50m": lambda: _mnist_model("MLP 784-3960x4-10 (50M)", functools.partial(mlp5, 3960)),
    "transformer": _transformer,
}
DEFAULT_MODELS = ["base", "lenet", "mlp5", "mlp4m", "mlp50m", "transformer"]

#: optimizer name -> builder from parameters; Adam's lr is its usual one, SimpleOptimizer's
#: its default (the update as meta-trained)
TRAIN_OPTIMIZERS: dict[str, Callable] = {
    "adam-fused": lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True),
    "adam-foreach": lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=True),
    "simple": lambda ps: SimpleOptimizer(ps, weights="simple"),
    "simple-fp32": lambda ps: SimpleOptimizer(ps, weights="simple", state_dtype=torch.float32),
    "simple-int8": lambda ps: SimpleOptimizer(ps, weights="simple", state_dtype=torch.int8),
    # the default weights, with Schedule-Free averaging (one more state value per parameter)
    "simple-sf": lambda ps: SimpleOptimizer(ps, weights="simple-sf"),
}
DEFAULT_TRAIN_OPTIMIZERS = ["adam-fused", "adam-foreach", "simple", "simple-fp32", "simple-int8",
                            "simple-sf"]

#: the targets: SimpleOptimizer's whole step at most this many times fused Adam's
TRAIN_TARGETS = {"base": 1.5, "mlp4m": 1.3}
#: the rows the targets are read on, with their names in the targets summary: the weights
#: without averaging with the default state (bfloat16 hidden state) and float32 state, and the
#: default weights
TARGET_OPTIMIZERS = {"simple": "SimpleOptimizer, weights simple",
                     "simple-fp32": "SimpleOptimizer, weights simple (float32 state)",
                     "simple-sf": "SimpleOptimizer, default weights (simple-sf)"}
#: their hidden-state dtypes: the bandwidth table's row whose copy speed (and bytes, for a row
#: without its own count) give each one's memory bound
TARGET_STATE_DTYPES = {"simple": "bfloat16", "simple-fp32": "float32", "simple-sf": "bfloat16"}


@dataclass
class TrainConfig:
    """What the training-step table measures.

    Args:
        models: names in :data:`TRAIN_MODELS`.
        optimizers: names in :data:`TRAIN_OPTIMIZERS`; ``adam-fused`` is the ratios' base.
        steps: timed steps per (model, optimizer), split over the rounds.
        warmup: untimed steps per (model, optimizer) in every round.
        rounds: interleaved rounds.
        budget: about the most seconds of timed steps per (model, optimizer).
        batches: minibatches drawn before timing and cycled through.
        device: ``"cpu"`` or ``"cuda"``.
        seed: for the initial model and the batches.
    """

    models: list[str] = field(default_factory=lambda: list(DEFAULT_MODELS))
    optimizers: list[str] = field(default_factory=lambda: list(DEFAULT_TRAIN_OPTIMIZERS))
    steps: int = 50
    warmup: int = 2
    rounds: int = 5
    budget: float = 60.0
    batches: int = 8
    device: str = "cpu"
    seed: int = 0


@dataclass
class TrainRow:
    """One (model, optimizer) of the training-step table; times in seconds."""

    model: str
    label: str
    n_params: int
    batch_size: int
    optimizer: str
    #: SimpleOptimizer's update path (``"cpu"``: the fused kernel); ``""`` for Adam
    impl: str = ""
    #: whole steps (zero_grad, forward, backward, opt.step()) and opt.step() alone
    whole_s: list[float] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)
    #: median whole step over fused Adam's (NaN without an adam-fused row)
    x_adam: float = math.nan
    last_loss: float = math.nan
    #: subnormal gradient values after timing, steps skipped for non-finite gradients
    subnormal_grads: int = 0
    skipped_steps: int = 0
    #: the optimizer's state in bytes per parameter
    state_bytes_per_param: float = math.nan
    #: SimpleOptimizer: the bytes its step moves per coordinate, at the least (NaN for Adam)
    bytes_per_coord: float = math.nan

    @property
    def whole_median(self) -> float:
        return statistics.median(self.whole_s) if self.whole_s else math.nan

    @property
    def step_median(self) -> float:
        return statistics.median(self.step_s) if self.step_s else math.nan

    def to_json(self) -> dict:
        """The row as JSON-ready data: the raw times and the medians."""
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out["whole_median_s"], out["step_median_s"] = self.whole_median, self.step_median
        return out


def run_train(cfg: TrainConfig, log: Callable[[str], object] = print) -> list[TrainRow]:
    """Measure the training-step table.

    Args:
        cfg: what to measure.
        log: receives progress lines.

    Returns:
        One :class:`TrainRow` per (model, optimizer), models in order, optimizers in order.
    """
    device = torch.device(cfg.device)
    per_round = max(1, math.ceil(cfg.steps / cfg.rounds))
    rows: list[TrainRow] = []
    for name in cfg.models:
        spec = TRAIN_MODELS[name]()
        init = seeded(spec.build, cfg.seed)
        n = sum(p.numel() for p in init.parameters() if p.requires_grad)
        gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
        batches = [tuple(t.to(device) for t in spec.batch(gen)) for _ in range(cfg.batches)]
        log(f"[train {name}] {spec.label}: {n:,} parameters, batch {spec.batch_size}")
        runs = []
        for opt_name in cfg.optimizers:
            model = copy.deepcopy(init).to(device)
            opt = TRAIN_OPTIMIZERS[opt_name]([p for p in model.parameters() if p.requires_grad])
            row = TrainRow(name, spec.label, n, spec.batch_size, opt_name)
            runs.append((row, model, opt, itertools.cycle(batches)))
        for r in range(cfg.rounds):
            for row, model, opt, data in runs:
                def prepare(model=model, opt=opt, data=data, row=row):
                    opt.zero_grad()
                    x, y = next(data)
                    loss = spec.loss(model(x), y)
                    loss.backward()
                    row.last_loss = loss.detach()  # read after timing: no sync in the loop

                step_s, whole_s = time_steps(opt, per_round, warmup=cfg.warmup, prepare=prepare,
                                             device=device, budget=cfg.budget / cfg.rounds)
                row.step_s.extend(step_s)
                row.whole_s.extend(whole_s)
            log(f"  round {r + 1}/{cfg.rounds} done")
        for row, model, opt, _ in runs:
            row.last_loss = float(row.last_loss)
            row.subnormal_grads = count_subnormal([p.grad for p in model.parameters() if p.grad is not None])
            row.skipped_steps = int(getattr(opt, "skipped_steps", 0))
            row.impl = resolved_impl(opt)
            row.state_bytes_per_param = state_bytes_per_param(opt)
            if isinstance(opt, SimpleOptimizer):
                row.bytes_per_coord = step_bytes_per_coord(opt)
        model_rows = [row for row, *_ in runs]
        adam = next((r for r in model_rows if r.optimizer == "adam-fused" and r.whole_s), None)
        for row in model_rows:
            row.x_adam = row.whole_median / adam.whole_median if adam else math.nan
        rows.extend(model_rows)
        log(format_train(model_rows))
        del runs, init, batches
    return rows


# ------------------------------------------------------------------------------ reporting


def memory_bound(row: TrainRow, rows: list[TrainRow], copy_gbs: float | None) -> float:
    """The whole-step ratio to fused Adam that ``row``'s optimizer would reach if its step moved
    its bytes (:attr:`TrainRow.bytes_per_coord`) at the copy's speed (``copy_gbs``, GB/s):
    ``(fused Adam's forward and backward + bytes / bandwidth) / fused Adam's whole step``, the
    best it can be on this machine. NaN where a number is missing."""
    adam = next((r for r in rows if r.model == row.model and r.optimizer == "adam-fused"
                 and r.whole_s), None)
    if adam is None or not copy_gbs or math.isnan(row.bytes_per_coord):
        return math.nan
    floor_s = row.bytes_per_coord * row.n_params / (copy_gbs * 1e9)
    return (adam.whole_median - adam.step_median + floor_s) / adam.whole_median


def format_train(rows: list[TrainRow],
                 copy_gbs: float | Mapping[str, float] | None = None) -> str:
    """The training-step table in Markdown (medians); with the run's copy bandwidth
    (``copy_gbs``, GB/s: one number, or one per optimizer name as measured beside its state
    dtype) also each SimpleOptimizer row's memory bound (:func:`memory_bound`)."""
    lines = [
        "| model | params | batch | optimizer | state B/param | step B/coord | whole ms "
        "| fwd+bwd ms | step ms | x fused Adam | bound | target | last loss | subnormal g "
        "| skipped |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        fwd_bwd = r.whole_median - r.step_median
        target = TRAIN_TARGETS.get(r.model) if r.optimizer in TARGET_OPTIMIZERS else None
        gbs = copy_gbs.get(r.optimizer) if isinstance(copy_gbs, Mapping) else copy_gbs
        bound = memory_bound(r, rows, gbs)
        per_coord = "" if math.isnan(r.bytes_per_coord) else f"{r.bytes_per_coord:.0f}"
        lines.append(
            f"| {r.model} | {r.n_params:,} | {r.batch_size} | {r.optimizer}"
            f"{f' ({r.impl})' if r.impl else ''} | {r.state_bytes_per_param:.0f} | {per_coord} "
            f"| {fmt_ms(r.whole_median)} | {fmt_ms(fwd_bwd)} | {fmt_ms(r.step_median)} "
            f"| {r.x_adam:.2f} | {'' if math.isnan(bound) else f'{bound:.2f}'} "
            f"| {f'<= {target}' if target else ''} | {r.last_loss:.3g} | {r.subnormal_grads} "
            f"| {r.skipped_steps} |"
        )
    return "\n".join(lines)


def train_targets(rows: list[TrainRow], copy_gbs: float | Mapping[str, float] | None = None,
                  bytes_per_param: float | Mapping[str, float] | None = None) -> list[dict]:
    """The whole-step targets (SimpleOptimizer against fused Adam).

    The ``simple`` rows' targets are always listed (unmeasured where the row is missing); the
    ``simple-fp32`` and ``simple-sf`` rows' where the table has any.

    Args:
        rows: the training-step table.
        copy_gbs, bytes_per_param: the same run's streaming-copy bandwidth (GB/s) and the
            bytes SimpleOptimizer's step moves per parameter (used where a row does not carry
            its own count, :attr:`TrainRow.bytes_per_coord`), each a number (for the
            ``simple`` rows) or a mapping from the optimizer's name in :data:`TARGET_OPTIMIZERS`
            to one; when known for a row, its target also gets ``bound``: the ratio a step
            moving those bytes at the copy's speed would reach, ``(fused Adam's forward and
            backward + bytes / bandwidth) / fused Adam's whole step``, the best the target can
            be on this machine.

    Returns:
        One dict per target: ``target``, ``measured`` (the ratio, or None), ``unit``
        (``"x"``: a ratio), ``met`` (True / False, None when not measured) and ``bound``
        (a ratio or None).
    """
    def per_optimizer(x) -> Mapping[str, float]:
        return x if isinstance(x, Mapping) else {"simple": x}

    copies, sizes = per_optimizer(copy_gbs), per_optimizer(bytes_per_param)
    names = [o for o in TARGET_OPTIMIZERS if o == "simple" or any(r.optimizer == o for r in rows)]
    out = []
    for name in names:
        for model, limit in TRAIN_TARGETS.items():
            row = next((r for r in rows if r.model == model and r.optimizer == name
                        and not math.isnan(r.x_adam)), None)
            adam = next((r for r in rows if r.model == model and r.optimizer == "adam-fused"), None)
            bound = None
            gbs, size = copies.get(name), sizes.get(name)
            if row is not None and adam is not None and gbs:
                if math.isnan(row.bytes_per_coord) and size:  # a row without its own count
                    row = dataclasses.replace(row, bytes_per_coord=size)
                b = memory_bound(row, rows, gbs)
                bound = None if math.isnan(b) else b
            out.append(dict(target=f"{model}: {TARGET_OPTIMIZERS[name]} whole step <= {limit}x "
                                   "fused Adam's",
                            measured=None if row is None else row.x_adam, unit="x",
                            met=None if row is None else row.x_adam <= limit, bound=bound))
    return out


def describe() -> str:
    """The paragraph printed above the training-step table."""
    return (
        "Training step: zero_grad + forward + backward + opt.step() (`whole`), and opt.step() "
        "alone (`step`), medians of interleaved rounds; `x fused Adam` = whole / fused Adam's "
        "whole in the same run; `bound`: the ratio a SimpleOptimizer step moving its `step "
        "B/coord` at the bandwidth table's copy speed would give (fused Adam's fwd+bwd + bytes / "
        "copy GB/s, over fused Adam's whole), the best on this machine; `state B/param`: the "
        "optimizer's state in bytes per parameter. Gradients from real backward passes on random inputs of "
        "realistic scale (randn images, random labels; the suite's addition problems), tens of "
        "steps from initialisation: the loss stays far from zero, `subnormal g` counts "
        "subnormal gradient values after timing (flush-denormal off, torch's default)."
    )
