"""Fine-tuning a meta-optimizer on a new model, and the fair learning-rate search for SGD/Adam.

:func:`finetune` is the paper's fine-tuning loop (method.md, "Fine-tuning"): take a random
subsample (5% by default) of a data loader's examples, then run *episodes*. Each episode
trains a fresh copy of the user's model with the meta-optimizer, unroll by unroll, with one
meta-update (Adam on the net's weights) after every unroll, exactly as ``meta_fit`` does
(it reuses :func:`l2l_optim.meta.run_trajectory`), until the average training loss of an
unroll falls below half of the episode's initial loss, or a cap on the unrolls is reached.

:func:`search_lr` is the baseline protocol: the best fixed learning rate of SGD or Adam from
``{1, 0.1, 0.01, 0.001}`` by the mean training loss over the last 10% of a short run, on the
same data (the subsample, when fine-tuning is used).

:func:`train_task` is the plain training loop both use for the hand-written optimizers, and
that :mod:`l2l_optim.reproduce` uses for every optimizer.

Example:
    >>> import torch, torch.nn as nn
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> from l2l_optim import SimpleOptimizer, finetune
    >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    >>> data = TensorDataset(torch.randn(4000, 8), torch.randint(0, 3, (4000,)))
    >>> result = finetune(model, DataLoader(data, batch_size=32))      # doctest: +SKIP
    >>> opt = SimpleOptimizer(model.parameters(), weights=result.net)  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .meta import tail_mean  # re-exported: search_lr scores runs with it
from .nets import CoordinatewiseNet
from .tasks import Task

__all__ = [
    "FinetuneResult",
    "TrainResult",
    "finetune",
    "search_lr",
    "subsample_loader",
    "materialize",
    "task_from_model",
    "train_task",
    "tail_mean",
    "evaluate_model",
    "subsample_task",
    "DEFAULT_LRS",
]

#: the paper's learning-rate grid for the hand-written baselines
DEFAULT_LRS = (1.0, 0.1, 0.01, 0.001)


# ----------------------------------------------------------------------------------------
# data


def _split_batch(batch: Any) -> tuple[Tensor, Tensor]:
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and all(isinstance(t, Tensor) for t in batch):
        return batch[0], batch[1]
    raise TypeError(
        "the loader must yield (inputs, targets) pairs of tensors, got "
        f"{type(batch).__name__}" + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
    )


def materialize(loader: Iterable) -> tuple[Tensor, Tensor, int]:
    """Run through a loader once and concatenate its ``(x, y)`` batches on the CPU.

    Returns:
        ``(x, y, batch_size)``, where ``batch_size`` is the loader's ``batch_size`` if it has
        one, else the size of its first batch.

    Raises:
        ValueError: the loader yields no batches (or only empty ones).
        TypeError: a batch is not an ``(inputs, targets)`` pair of tensors.
    """
    xs, ys = [], []
    for batch in loader:
        x, y = _split_batch(batch)
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"a batch has {x.shape[0]} inputs but {y.shape[0]} targets")
        if x.shape[0]:
            xs.append(x.detach().cpu())
            ys.append(y.detach().cpu())
    if not xs:
        raise ValueError("the data loader is empty: it yielded no examples")
    batch_size = getattr(loader, "batch_size", None) or xs[0].shape[0]
    return torch.cat(xs), torch.cat(ys), int(batch_size)


def subsample_loader(
    loader: Iterable, rate: float = 0.05, *, seed: int = 0, batch_size: int | None = None
) -> tuple[Tensor, Tensor, int]:
    """A random subsample of ``round(rate * N)`` of a loader's N examples (without replacement).

    The loader is run through once and its batches materialised on the CPU (the whole
    dataset passes through memory once), then the subsample is drawn with a generator seeded
    by ``seed``: the same loader contents, rate and seed always give the same subsample.
    Give a loader that does not shuffle (or is seeded) for a reproducible selection.

    Returns:
        ``(x, y, batch_size)`` with the subsample's tensors.

    Raises:
        ValueError: ``rate`` outside (0, 1], an empty loader, or a subsample smaller than
            one batch.
    """
    if not (isinstance(rate, (int, float)) and 0.0 < rate <= 1.0):
        raise ValueError(f"subsample must be a fraction in (0, 1], got {rate!r}")
    x, y, loader_bs = materialize(loader)
    batch_size = batch_size or loader_bs
    n_total = x.shape[0]
    n = int(round(rate * n_total))
    if n < batch_size:
        raise ValueError(
            f"a {rate:g} subsample of the loader's {n_total} examples has {n} examples, fewer than "
            f"one batch of {batch_size}; raise `subsample`, use a smaller batch size or more data"
        )
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(n_total, generator=gen)[:n].sort().values
    return x[idx], y[idx], batch_size


# ----------------------------------------------------------------------------------------
# a Task around any nn.Module


def _fresh_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` on the CPU, re-initialised by every submodule's ``reset_parameters``.

    Call it under a seed. Frozen parameters (``requires_grad=False``) keep the values of
    ``model`` (a pretrained part stays pretrained), and so do parameters of modules without
    ``reset_parameters`` (custom ``nn.Parameter`` attributes).
    """
    fresh = copy.deepcopy(model).cpu()
    frozen = {k: p.detach().clone() for k, p in fresh.named_parameters() if not p.requires_grad}
    with torch.no_grad():
        for module in fresh.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
        named = dict(fresh.named_parameters())
        for k, v in frozen.items():
            named[k].copy_(v)
    for p in fresh.parameters():
        p.grad = None
    return fresh.train()


class _ModuleTask(Task):
    """A :class:`Task` whose model is a copy of a user's module; frozen parameters
    (``requires_grad=False``) are passed as buffers, so only trainable ones are optimized."""

    def init_params(self, seed: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        params, buffers = super().init_params(seed)
        frozen = [k for k, p in self.module.named_parameters() if not p.requires_grad]
        for k in frozen:
            buffers[k] = params.pop(k)
        return params, buffers


def task_from_model(
    model: nn.Module,
    data: tuple[Tensor, Tensor] | Iterable,
    *,
    batch_size: int | None = None,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    test: tuple[Tensor, Tensor] | None = None,
    name: str | None = None,
) -> Task:
    """Wrap a module and data as a :class:`~l2l_optim.tasks.Task`.

    ``task.init_params(seed)`` gives a fresh initialisation of a copy of ``model`` (see
    :func:`_fresh_copy`); ``model`` itself is never touched.

    Args:
        model: any ``nn.Module`` mapping a batch of inputs to outputs ``loss_fn`` accepts.
        data: ``(x, y)`` tensors, or a loader of ``(x, y)`` batches (materialised).
        batch_size: minibatch size (default: the loader's, or 128 for tensors).
    """
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        x, y = data
        batch_size = batch_size or 128
    else:
        x, y, loader_bs = materialize(data)
        batch_size = batch_size or loader_bs
    template = _fresh_copy(model)
    return _ModuleTask(
        name=name or f"{type(model).__name__}",
        model_fn=lambda: _fresh_copy(template),
        train=(x, y),
        test=test,
        batch_size=batch_size,
        loss_fn=loss_fn,
    )


def _as_task(task_or_model_and_data, batch_size: int | None, loss_fn) -> Task:
    if isinstance(task_or_model_and_data, Task):
        return task_or_model_and_data
    if isinstance(task_or_model_and_data, (tuple, list)) and len(task_or_model_and_data) == 2:
        model, data = task_or_model_and_data
        if isinstance(model, nn.Module):
            return task_from_model(model, data, batch_size=batch_size, loss_fn=loss_fn)
    raise TypeError(
        "expected a Task or a (model, data) pair, where data is (x, y) tensors or a loader; got "
        f"{type(task_or_model_and_data).__name__}"
    )


# ----------------------------------------------------------------------------------------
# the plain training loop


@dataclass
class TrainResult:
    """What :func:`train_task` returns.

    Attributes:
        losses: the minibatch training loss of every step, computed before that step's update
            (stops at the first non-finite loss).
        model: the trained module.
        diverged: a non-finite loss stopped the run.
        seconds: wall time of the training loop.
    """

    losses: list[float]
    model: nn.Module
    diverged: bool
    seconds: float


def train_task(
    task: Task,
    make_optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer],
    *,
    steps: int,
    seed: int = 0,
    progress: bool = False,
    desc: str = "train",
) -> TrainResult:
    """Train a fresh model of ``task`` with an ordinary ``torch.optim`` loop.

    The model is ``task.model_fn()`` under ``seed`` (the same init as ``task.init_params(seed)``)
    and the minibatches come from ``task.sample_batch`` with a generator seeded by ``seed``, so
    every optimizer sees the same init and the same batches for a given seed.

    Args:
        make_optimizer: ``params -> optimizer``, e.g. ``lambda p: torch.optim.SGD(p, lr=0.1)``
            or ``lambda p: SimpleOptimizer(p, weights="simple")``.
        steps: number of optimizer steps.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = task.model_fn()
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(trainable)
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    diverged = False
    from tqdm.auto import tqdm

    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False, mininterval=1.0)
    t0 = time.perf_counter()
    for step in bar:
        x, y = task.sample_batch(gen)
        loss = task.loss_fn(model(x), y)
        value = float(loss.detach())
        if not math.isfinite(value):
            diverged = True
            break
        losses.append(value)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{value:.4f}", refresh=False)
    seconds = time.perf_counter() - t0
    bar.close()
    return TrainResult(losses=losses, model=model, diverged=diverged, seconds=seconds)


@torch.no_grad()
def evaluate_model(model: nn.Module, data: tuple[Tensor, Tensor], loss_fn=F.cross_entropy,
                   batch_size: int = 1000) -> dict[str, float]:
    """Loss and accuracy of ``model`` on ``(x, y)`` in eval mode (restores the previous mode)."""
    was_training = model.training
    model.eval()
    try:
        x, y = data
        total, correct = 0.0, 0
        for i in range(0, x.shape[0], batch_size):
            out = model(x[i : i + batch_size])
            total += float(loss_fn(out, y[i : i + batch_size])) * out.shape[0]
            correct += int((out.argmax(1) == y[i : i + batch_size]).sum())
    finally:
        model.train(was_training)
    n = max(1, x.shape[0])
    return {"test_loss": total / n, "test_acc": correct / n}


# ----------------------------------------------------------------------------------------
# the fair learning-rate search


def search_lr(
    task_or_model_and_data: Task | tuple[nn.Module, Any],
    optimizer: str = "sgd",
    lrs: Sequence[float] = DEFAULT_LRS,
    *,
    steps: int = 1000,
    seed: int = 0,
    batch_size: int | None = None,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    progress: bool = False,
) -> tuple[float, dict[float, float]]:
    """The paper's baseline protocol: the best fixed learning rate of SGD or Adam.

    Every learning rate trains the same fresh init on the same minibatches (``seed``) for
    ``steps`` steps; the score is the mean training loss over the last 10% of the steps. A
    run that diverges (a non-finite loss) scores ``inf`` and ranks last; ties go to the
    earlier ``lrs`` entry.

    Args:
        task_or_model_and_data: a :class:`~l2l_optim.tasks.Task`, or ``(model, data)`` with
            ``data`` given as ``(x, y)`` tensors or a loader (see :func:`task_from_model`;
            pass the fine-tuning subsample here to search on the same data).
        optimizer: ``"sgd"`` (plain, no momentum) or ``"adam"`` (torch defaults otherwise).
        lrs: the grid (default: ``(1, 0.1, 0.01, 0.001)``).
        steps: length of each search run.
        batch_size, loss_fn: used only when a ``(model, data)`` pair is given.

    Returns:
        ``(best_lr, {lr: score})``.

    Raises:
        ValueError: an unknown optimizer, an empty grid or ``steps < 1``.

    Example:
        >>> best, scores = search_lr(make_task("mnist-mlp"), "adam", steps=200)  # doctest: +SKIP
    """
    makers = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}
    if optimizer not in makers:
        raise ValueError(f"optimizer must be one of {sorted(makers)}, got {optimizer!r}")
    if not lrs:
        raise ValueError("lrs is empty")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    task = _as_task(task_or_model_and_data, batch_size, loss_fn)
    cls = makers[optimizer]
    scores: dict[float, float] = {}
    for lr in lrs:
        r = train_task(task, lambda p, lr=lr: cls(p, lr=lr), steps=steps, seed=seed, progress=progress,
                       desc=f"{optimizer} lr={lr:g}")
        score = tail_mean(r.losses)
        scores[float(lr)] = float("inf") if r.diverged or not math.isfinite(score) else score
    best = min(scores, key=lambda lr: scores[lr])  # min keeps the first of equal scores
    if math.isinf(scores[best]):
        warnings.warn(f"search_lr: every {optimizer} run diverged; returning lr={best:g}", stacklevel=2)
    return best, scores


# ----------------------------------------------------------------------------------------
# fine-tuning


@dataclass
class FinetuneResult:
    """What :func:`finetune` returns.

    Attributes:
        net: the fine-tuned meta-optimizer net; ``SimpleOptimizer(params, weights=result.net)``.
        weights_path: the saved ``.safetensors`` file (None without ``out``).
        log: one dict per episode: ``episode``, ``seed``, ``initial_loss``, ``target``,
            ``final_avg_loss`` (mean loss of the last unroll), ``reached_target``, ``unrolls``,
            ``steps``, ``diverged``, ``seconds``.
        subsample: the ``(x, y)`` tensors fine-tuned on (use them for :func:`search_lr`).
        batch_size: the minibatch size used.
    """

    net: CoordinatewiseNet
    weights_path: Path | None
    log: list[dict]
    subsample: tuple[Tensor, Tensor] = field(repr=False)
    batch_size: int = 128

    @property
    def reached_target(self) -> int:
        """How many episodes reached the target loss."""
        return sum(bool(e["reached_target"]) for e in self.log)


class _StopEpisode(Exception):
    """Raised inside the optimizee loss to end an episode at an unroll boundary."""


class _EpisodeMonitor:
    """Watches the losses ``run_trajectory`` computes and ends the episode at the target.

    ``run_trajectory`` evaluates the loss once at the initial parameters, then once per step.
    After every complete unroll the monitor compares the unroll's mean loss with
    ``target_frac`` times the initial loss; once it is below, the next loss evaluation (the
    first of the next unroll, after the meta-update of the finished one) raises
    :class:`_StopEpisode`.
    """

    def __init__(self, unroll: int, target_frac: float, on_unroll: Callable[[int, float], None]):
        self.unroll = unroll
        self.target_frac = target_frac
        self.on_unroll = on_unroll
        self.initial: float | None = None
        self.losses: list[float] = []
        self.reached = False

    @property
    def target(self) -> float:
        return self.target_frac * self.initial if self.initial is not None else float("nan")

    def before(self) -> None:
        if self.reached:
            raise _StopEpisode

    def after(self, value: float) -> None:
        if self.initial is None:
            self.initial = value
            return
        self.losses.append(value)
        if len(self.losses) % self.unroll == 0:
            avg = sum(self.losses[-self.unroll :]) / self.unroll
            self.reached = avg < self.target
            self.on_unroll(len(self.losses) // self.unroll, avg)

    def last_avg(self) -> float:
        n = len(self.losses) % self.unroll or self.unroll
        tail = self.losses[-n:]
        return sum(tail) / len(tail) if tail else float("nan")


class _MonitoredTask(_ModuleTask):
    monitor: _EpisodeMonitor | None = None

    def loss(self, params, buffers, batch) -> Tensor:
        mon = self.monitor
        if mon is not None:
            mon.before()
        f = super().loss(params, buffers, batch)
        if mon is not None:
            mon.after(float(f.detach()))
        return f


def _resolve_net(weights) -> tuple[CoordinatewiseNet, str]:
    from .weights import LoadedWeights, fingerprint, load_weights

    if isinstance(weights, CoordinatewiseNet):
        net, source = copy.deepcopy(weights), "net"
    elif isinstance(weights, LoadedWeights):
        net, source = copy.deepcopy(weights.net), str(weights.path)
    elif isinstance(weights, (str, Path)):
        loaded = load_weights(weights)
        net, source = loaded.net, str(weights)
    else:
        raise TypeError(
            f"weights must be a shipped name, a path, LoadedWeights or a CoordinatewiseNet, "
            f"got {type(weights).__name__}"
        )
    net = net.cpu().float()
    net.requires_grad_(True)
    net.train()
    return net, f"{source} ({fingerprint(net)})"


def finetune(
    model: nn.Module,
    loader: Iterable,
    *,
    weights: str | Path | CoordinatewiseNet | Any = "simple",
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    subsample: float = 0.05,
    episodes: int = 5,
    steps_per_unroll: int = 20,
    max_unrolls_per_episode: int = 50,
    target: float = 0.5,
    meta_lr: float = 1e-3,
    relative_meta_lr: bool = True,
    meta_loss: str = "weighted",
    grad_clip: float | None = 1.0,
    batch_size: int | None = None,
    seed: int = 0,
    progress: bool = True,
    out: str | Path | None = None,
) -> FinetuneResult:
    """Fine-tune a meta-optimizer on a new model and data (the paper's fine-tuning loop).

    1. Draw a random ``subsample`` fraction of the loader's examples
       (:func:`subsample_loader`, seeded by ``seed``).
    2. For each of ``episodes`` episodes: initialise a fresh copy of ``model`` (a deep copy
       whose submodules' ``reset_parameters`` run under the episode's seed) and train it with
       the meta-optimizer in unrolls of ``steps_per_unroll`` steps, one meta-update (Adam,
       ``meta_lr``, gradient norm clipped to ``grad_clip``) after each unroll, as ``meta_fit``
       does, until the mean training loss of an unroll is below ``target`` (0.5) times the
       episode's initial loss, or ``max_unrolls_per_episode`` unrolls have run. The log says
       whether each episode reached the target.

    The model runs through ``torch.func.functional_call`` on copies of its parameters and
    buffers (BatchNorm statistics included): ``model`` itself is never modified. Fine-tuning
    runs on the CPU (the copies and the data are moved there). Parameters with
    ``requires_grad=False`` keep your model's values and are held fixed.

    Args:
        model: any ``nn.Module``; ``loss_fn(model(x), y)`` must be a scalar.
        loader: an iterable of ``(x, y)`` batches, e.g. a ``DataLoader`` (run through once).
        weights: the starting meta-weights: a shipped name, a ``.safetensors`` path, a
            ``LoadedWeights`` or a net (copied; yours is not modified).
        loss_fn: the training loss (default: cross-entropy).
        subsample: fraction of the data to fine-tune on (the paper: 3%-5%).
        episodes: number of episodes (the paper: 5).
        steps_per_unroll: optimizee steps per truncated-BPTT unroll.
        max_unrolls_per_episode: cap on the unrolls of one episode, so it always ends.
        target: an episode ends once an unroll's mean loss is below ``target`` x its
            initial loss.
        meta_lr: Adam learning rate on the meta-optimizer's weights.
        relative_meta_lr: scale each weight's Adam step by its magnitude, as ``meta_fit``
            does (:func:`l2l_optim.meta.meta_lr_scales`). Without it, one absolute 1e-3 step
            on the shipped SimpleOptimizer's ~1e-4 output weights wrecks the optimizer (seen:
            fine-tuned weights that left LeNet at ln 10).
        meta_loss: ``"weighted"`` (the paper's), ``"uniform"`` or ``"last"``.
        grad_clip: max norm of the meta-gradient (None: no clipping).
        batch_size: minibatch size (default: the loader's ``batch_size``).
        seed: seeds the subsample, every episode's init and minibatches.
        progress: show a tqdm progress bar.
        out: save the fine-tuned weights there (a ``.safetensors`` file, or a directory for
            ``<out>/weights.safetensors``) with the fine-tuning settings and log as metadata.

    Returns:
        A :class:`FinetuneResult`; ``SimpleOptimizer(model.parameters(), weights=result.net)``
        (or ``weights=result.weights_path``) uses the fine-tuned optimizer.

    Raises:
        ValueError: an empty loader, a subsample smaller than one batch, or an invalid
            setting.
        TypeError: the loader does not yield ``(x, y)`` tensor pairs, or ``weights`` has an
            unsupported type.
    """
    from .meta import META_LOSSES, meta_lr_scales, run_trajectory

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    for name, value in (("episodes", episodes), ("steps_per_unroll", steps_per_unroll),
                        ("max_unrolls_per_episode", max_unrolls_per_episode)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not 0.0 < target < 1.0:
        raise ValueError(f"target must be in (0, 1), got {target!r}")
    if not meta_lr > 0:
        raise ValueError(f"meta_lr must be positive, got {meta_lr!r}")
    if meta_loss not in META_LOSSES:
        raise ValueError(f"meta_loss must be one of {META_LOSSES}, got {meta_loss!r}")

    net, source = _resolve_net(weights)
    x, y, batch_size = subsample_loader(loader, subsample, seed=seed, batch_size=batch_size)
    template = _fresh_copy(model)
    task = _MonitoredTask(
        name=f"finetune:{type(model).__name__}",
        model_fn=lambda: _fresh_copy(template),
        train=(x, y),
        batch_size=batch_size,
        loss_fn=loss_fn,
    )
    meta_opt = torch.optim.Adam(net.parameters(), lr=meta_lr)
    lr_scales = meta_lr_scales(net) if relative_meta_lr else None
    steps_cap = steps_per_unroll * max_unrolls_per_episode

    from tqdm.auto import tqdm

    bar = tqdm(total=episodes * max_unrolls_per_episode, desc="finetune", unit="unroll", disable=not progress)
    log: list[dict] = []
    for episode in range(episodes):
        ep_seed = seed * 1_000_003 + episode

        def on_unroll(k: int, avg: float, episode=episode) -> None:
            bar.update(1)
            bar.set_postfix(episode=episode, loss=f"{avg:.4f}", target=f"{monitor.target:.4f}", refresh=False)

        monitor = _EpisodeMonitor(steps_per_unroll, target, on_unroll)
        task.monitor = monitor
        t0 = time.perf_counter()
        diverged = False
        try:
            r = run_trajectory(net, task, seed=ep_seed, steps=steps_cap, unroll=steps_per_unroll,
                               meta_loss=meta_loss, meta_opt=meta_opt, grad_clip=grad_clip, lr_scales=lr_scales)
            diverged = bool(r["diverged"])
        except _StopEpisode:
            pass
        finally:
            task.monitor = None
        unrolls = math.ceil(len(monitor.losses) / steps_per_unroll)
        bar.update(max_unrolls_per_episode - min(unrolls, max_unrolls_per_episode))
        entry = {
            "episode": episode,
            "seed": ep_seed,
            "initial_loss": monitor.initial,
            "target": monitor.target,
            "final_avg_loss": monitor.last_avg(),
            "reached_target": bool(monitor.reached),
            "unrolls": unrolls,
            "steps": len(monitor.losses),
            "diverged": diverged,
            "seconds": round(time.perf_counter() - t0, 2),
        }
        log.append(entry)
        if progress:
            state = "reached" if entry["reached_target"] else ("diverged" if diverged else "did not reach")
            bar.write(f"episode {episode}: {state} the target {entry['target']:.4f} "
                      f"(loss {entry['initial_loss']:.4f} -> {entry['final_avg_loss']:.4f}) "
                      f"in {unrolls} unroll(s), {entry['seconds']:.1f} s")
    bar.close()
    net.eval()
    net.requires_grad_(False)

    weights_path = None
    if out is not None:
        from .weights import save_weights

        meta = {
            "finetune": {
                "base_weights": source,
                "model": type(model).__name__,
                "subsample": subsample,
                "subsample_examples": int(x.shape[0]),
                "batch_size": batch_size,
                "episodes": episodes,
                "steps_per_unroll": steps_per_unroll,
                "max_unrolls_per_episode": max_unrolls_per_episode,
                "target": target,
                "meta_lr": meta_lr,
                "relative_meta_lr": relative_meta_lr,
                "meta_loss": meta_loss,
                "grad_clip": grad_clip,
                "seed": seed,
            },
            "finetune_log": log,
        }
        weights_path = save_weights(net, out, metadata=meta)
    return FinetuneResult(net=net, weights_path=weights_path, log=log, subsample=(x, y), batch_size=batch_size)


def subsample_task(task: Task, x: Tensor, y: Tensor) -> Task:
    """``task`` with its training data replaced by ``(x, y)`` (e.g. the fine-tuning subsample)."""
    return replace(task, train=(x, y), _module=None)
