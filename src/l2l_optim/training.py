"""The plain training loop, test evaluation, and the fair learning-rate search for SGD/Adam.

:func:`train_task` trains a fresh model of a :class:`~l2l_optim.tasks.Task` with any
``torch.optim`` optimizer (hand-written or learned); :func:`evaluate_model` gives the test
loss and accuracy of a module, or of parameters held outside it; :func:`search_lr` is the
paper's baseline protocol: the best fixed learning rate of SGD or Adam from
``{1, 0.1, 0.01, 0.001}``, scored by :func:`tail_mean` of the training losses of a short run.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from tqdm.auto import tqdm

from .tasks import Task, task_from_model

__all__ = ["TrainResult", "train_task", "evaluate_model", "search_lr", "tail_mean", "DEFAULT_LRS"]

#: the paper's learning-rate grid for the hand-written baselines
DEFAULT_LRS = (1.0, 0.1, 0.01, 0.001)


def tail_mean(losses: list[float], frac: float = 0.1, max_window: int | None = None) -> float:
    """Mean of the last ``frac`` of ``losses`` (at least one, at most ``max_window`` values)."""
    if not losses:
        return float("nan")
    k = max(1, int(len(losses) * frac))
    if max_window is not None:
        k = min(k, max_window)
    tail = losses[-k:]
    return sum(tail) / len(tail)


@dataclass
class TrainResult:
    """What :func:`train_task` returns.

    Attributes:
        losses: the minibatch training loss of every step, computed before that step's update
            (stops at the first non-finite loss).
        model: the trained module.
        diverged: a non-finite loss stopped the run.
        seconds: wall time of the training loop.
        cpu_seconds: CPU time of the whole process during the loop (the cost that does not
            depend on what else the machine runs).
        skipped: steps the optimizer skipped (its ``skipped_steps``; 0 for optimizers without).
    """

    losses: list[float]
    model: nn.Module
    diverged: bool
    seconds: float
    cpu_seconds: float = 0.0
    skipped: int = 0


def train_task(
    task: Task,
    make_optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer],
    *,
    steps: int,
    seed: int = 0,
    schedule: Callable[[int], float] | None = None,
    progress: bool = False,
    desc: str = "train",
) -> TrainResult:
    """Train a fresh model of ``task`` with an ordinary ``torch.optim`` loop.

    The model is ``task.model_fn()`` under ``seed`` (the same init as ``task.init_params(seed)``)
    and the minibatches come from ``task.sample_batch`` with a generator seeded by ``seed``, so
    every optimizer sees the same init and the same batches for a given seed. The run stops
    before the first non-finite loss. An optimizer with ``eval()`` (Schedule-Free averaging)
    is switched to it at the end, so the returned model holds the parameters to evaluate.

    Args:
        task: the model factory and data.
        make_optimizer: ``params -> optimizer`` (the trainable parameters), e.g.
            ``lambda p: torch.optim.SGD(p, lr=0.1)`` or
            ``lambda p: SimpleOptimizer(p, weights="simple")``.
        steps: number of optimizer steps.
        seed: the seed of the init and of the minibatch stream.
        schedule: optional ``schedule(t) -> m``: every group's lr at step ``t`` is its
            starting lr times ``m``.
        progress: show a progress bar.
        desc: the progress bar's label.

    Returns:
        A :class:`TrainResult`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from l2l_optim.tasks import Task
        >>> x = torch.randn(64, 4); y = x.sum(1, keepdim=True)
        >>> task = Task("sum", lambda: nn.Linear(4, 1), (x, y), batch_size=16,
        ...             loss_fn=torch.nn.functional.mse_loss)
        >>> r = train_task(task, lambda p: torch.optim.SGD(p, lr=0.1), steps=50)
        >>> len(r.losses), r.losses[-1] < r.losses[0]
        (50, True)
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = task.model_fn()
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(trainable)
    base = [g["lr"] for g in opt.param_groups]
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    diverged = False
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False, mininterval=1.0)
    t0, c0 = time.perf_counter(), time.process_time()
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
        if schedule is not None:
            m = schedule(step)
            for g, lr in zip(opt.param_groups, base):
                g["lr"] = lr * m
        opt.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{value:.4f}", refresh=False)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    bar.close()
    if callable(getattr(opt, "eval", None)):
        # Schedule-Free averaging (SimpleOptimizer's default weights, schedulefree's
        # optimizers): the model returned holds the average, the parameters to evaluate
        opt.eval()
    return TrainResult(losses=losses, model=model, diverged=diverged, seconds=seconds,
                       cpu_seconds=cpu_seconds, skipped=int(getattr(opt, "skipped_steps", 0)))


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    data: tuple[Tensor, Tensor],
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    *,
    state: Mapping[str, Tensor] | None = None,
    batch_size: int = 1000,
) -> dict[str, float]:
    """Loss and accuracy on ``(x, y)``, in eval mode (BatchNorm uses its running statistics).

    Args:
        model: the module, evaluated with its own parameters; or, with ``state``, only its
            structure (as a :class:`~l2l_optim.tasks.Task`'s template module is).
        data: ``(x, y)``, evaluated in chunks of ``batch_size``.
        state: parameters and buffers by name (e.g. ``{**params, **buffers}`` of a functional
            run) to evaluate instead of the module's own, through ``functional_call``.

    Returns:
        ``{"test_loss": ..., "test_acc": ...}``; the module's train/eval mode is restored.
    """
    def forward(x: Tensor) -> Tensor:
        return model(x) if state is None else functional_call(model, dict(state), (x,))

    was_training = model.training
    model.eval()
    try:
        x, y = data
        total, correct = 0.0, 0
        for i in range(0, x.shape[0], batch_size):
            out = forward(x[i : i + batch_size])
            total += float(loss_fn(out, y[i : i + batch_size])) * out.shape[0]
            correct += int((out.argmax(1) == y[i : i + batch_size]).sum())
    finally:
        model.train(was_training)
    n = max(1, x.shape[0])
    return {"test_loss": total / n, "test_acc": correct / n}


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
            ``data`` given as ``(x, y)`` tensors or a loader (see
            :func:`~l2l_optim.tasks.task_from_model`; pass the fine-tuning subsample here to
            search on the same data).
        optimizer: ``"sgd"`` (plain, no momentum) or ``"adam"`` (torch defaults otherwise).
        lrs: the grid (default: ``(1, 0.1, 0.01, 0.001)``).
        steps: length of each search run.
        seed: seeds the init and the minibatches, the same for every learning rate.
        batch_size, loss_fn: used only when a ``(model, data)`` pair is given.
        progress: show a tqdm progress bar per run.

    Returns:
        ``(best_lr, {lr: score})``.

    Raises:
        ValueError: an unknown optimizer, an empty grid or ``steps < 1``.
        TypeError: neither a Task nor a ``(model, data)`` pair.

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> x = torch.randn(256, 8)
        >>> y = (x[:, 0] > 0).long()
        >>> model = torch.nn.Linear(8, 2)
        >>> best, scores = search_lr((model, (x, y)), "sgd", lrs=(1.0, 0.1, 0.001), steps=30,
        ...                          batch_size=32)
        >>> sorted(scores), best in scores, scores[best] == min(scores.values())
        ([0.001, 0.1, 1.0], True, True)

        A registered task reads its dataset from local files:

        >>> from l2l_optim.tasks import make_task
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
