"""Fine-tuning a meta-optimizer on a new model: the paper's fine-tuning loop.

:func:`finetune` takes a random subsample (5% by default) of a data loader's examples, then
runs *trajectories*, with the same settings vocabulary as :func:`~l2l_optim.meta.meta_fit`.
Each trajectory trains a fresh copy of the user's model with the meta-optimizer, unroll by
unroll, with one meta-update (Adam on the net's weights) after every unroll, through
:func:`l2l_optim.meta.run_trajectory`, until the mean training loss of an unroll falls below
``target`` (half) of the trajectory's initial loss, or a cap on the unrolls is reached.

The baselines a fine-tuned optimizer is compared with live in :mod:`l2l_optim.training`
(:func:`~l2l_optim.training.search_lr`, run on :attr:`FinetuneResult.subsample`).

Example:
    >>> import torch, torch.nn as nn
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> from l2l_optim import SimpleOptimizer, finetune
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    >>> data = TensorDataset(torch.randn(4000, 8), torch.randint(0, 3, (4000,)))
    >>> result = finetune(model, DataLoader(data, batch_size=32), trajectories=2, max_unrolls=2,
    ...                   progress=False)
    >>> opt = SimpleOptimizer(model.parameters(), weights=result.net)
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from torch.func import functional_call

from .data import materialize
from .meta import META_LOSSES, meta_lr_scales, run_trajectory
from .nets import CoordinatewiseNet
from .tasks import task_from_model
from .hub import resolve_net
from .weights import attach_metadata, save_weights

__all__ = ["FinetuneResult", "finetune", "subsample_loader"]


def subsample_loader(
    loader: Iterable, rate: float = 0.05, *, seed: int = 0, batch_size: int | None = None
) -> tuple[Tensor, Tensor, int]:
    """A random subsample of ``round(rate * N)`` of a loader's N examples (without replacement).

    The loader is run through once and its batches materialised on the CPU (the whole
    dataset passes through memory once), then the subsample is drawn with a generator seeded
    by ``seed``: the same loader contents, rate and seed always give the same subsample.
    Give a loader that does not shuffle (or is seeded) for a reproducible selection.

    Args:
        loader: an iterable of ``(x, y)`` tensor batches.
        rate: the fraction of the examples to keep.
        seed: seeds the selection.
        batch_size: the minibatch size the subsample must hold at least once (default: the
            loader's).

    Returns:
        ``(x, y, batch_size)`` with the subsample's tensors.

    Raises:
        ValueError: ``rate`` outside (0, 1], an empty loader, or a subsample smaller than
            one batch.

    Example:
        >>> import torch
        >>> batches = [(torch.randn(50, 3), torch.zeros(50, dtype=torch.long))] * 4
        >>> x, y, batch_size = subsample_loader(batches, 0.1, batch_size=16)
        >>> x.shape, y.shape, batch_size
        (torch.Size([20, 3]), torch.Size([20]), 16)
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


@dataclass
class FinetuneResult:
    """What :func:`finetune` returns.

    Attributes:
        net: the fine-tuned meta-optimizer net; ``SimpleOptimizer(params, weights=result.net)``.
        weights_path: the saved ``.safetensors`` file (None without ``out_dir``).
        log: one dict per trajectory: ``trajectory``, ``seed``, ``initial_loss``, ``target``
            (the loss to reach), ``final_avg_loss`` (mean loss of the last unroll),
            ``reached_target``, ``unrolls``, ``steps``, ``diverged``, ``seconds``.
        subsample: the ``(x, y)`` tensors fine-tuned on (use them for
            :func:`~l2l_optim.training.search_lr`).
        batch_size: the minibatch size used.
        metadata: what a weight file of the result records: ``finetune`` (the settings and
            the base weights) and ``finetune_log``.

    ``weights=result`` passes the fine-tuned net to an optimizer; :meth:`save_pretrained`
    and :meth:`push_to_hub` share it with a model card.
    """

    net: CoordinatewiseNet
    weights_path: Path | None
    log: list[dict]
    subsample: tuple[Tensor, Tensor] = field(repr=False)
    batch_size: int = 128
    metadata: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def reached_target(self) -> int:
        """How many trajectories reached the target loss."""
        return sum(bool(e["reached_target"]) for e in self.log)

    def save_pretrained(self, save_directory: str | Path, *, repo_id: str | None = None) -> Path:
        """Write the fine-tuned weights and a model card (settings, log) into a directory.

        Args:
            save_directory: the directory (created if missing).
            repo_id: the Hub repo the card's usage example names.

        Returns:
            The directory; ``SimpleOptimizer.from_pretrained(directory, params)`` loads it.

        Example:
            >>> import tempfile, torch
            >>> data = [(torch.randn(64, 4), torch.randint(0, 2, (64,)))]
            >>> result = finetune(torch.nn.Linear(4, 2), data, subsample=0.5, batch_size=16,
            ...                   trajectories=1, max_unrolls=1, progress=False)
            >>> with tempfile.TemporaryDirectory() as folder:
            ...     print(sorted(p.name for p in result.save_pretrained(folder).iterdir()))
            ['README.md', 'weights.safetensors']
        """
        from .hub import save_pretrained

        return save_pretrained(self.net, save_directory, metadata=self.metadata, repo_id=repo_id)

    def push_to_hub(self, repo_id: str, **kwargs) -> Any:
        """Upload the fine-tuned weights and a model card to a Hub repo.

        Args:
            repo_id: ``"<owner>/<name>"``.
            **kwargs: ``private``, ``token``, ``revision``, ``commit_message``
                (see :func:`l2l_optim.hub.push_to_hub`).

        Returns:
            The commit info of the upload.

        Raises:
            WeightsError: the upload failed.

        Example:
            Needs a Hub token with write access and the network, so it is not run here:

            >>> result.push_to_hub("me/my-finetuned-optimizer")  # doctest: +SKIP
        """
        from .hub import push_to_hub

        return push_to_hub(self.net, repo_id, metadata=self.metadata, **kwargs)


def _mean_of_last_unroll(losses: list[float], unroll: int) -> float:
    """Mean loss of the last unroll, complete or cut short by a divergence."""
    tail = losses[-(len(losses) % unroll or unroll) :]
    return sum(tail) / len(tail) if tail else float("nan")


def _check_settings(model, trajectories, unroll, max_unrolls, target, meta_lr, meta_loss) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    # a model built under torch.device("meta") (or with init_empty_weights) has shapes but no
    # values: fine-tuning copies it, which cannot work until its tensors are materialised
    for kind, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in named:
            if t.is_meta:
                raise ValueError(
                    f"model {kind} {name!r} is on the meta device (a shape without values); fine-tuning "
                    "needs a model with real tensors: materialise it first, e.g. "
                    "model.to_empty(device='cpu') and then initialise or load its weights"
                )
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("model has no trainable parameters (requires_grad=True); nothing to fine-tune on")
    for name, value in (("trajectories", trajectories), ("unroll", unroll), ("max_unrolls", max_unrolls)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not 0.0 < target < 1.0:
        raise ValueError(f"target must be in (0, 1), got {target!r}")
    if not meta_lr > 0:
        raise ValueError(f"meta_lr must be positive, got {meta_lr!r}")
    if meta_loss not in META_LOSSES:
        raise ValueError(f"meta_loss must be one of {META_LOSSES}, got {meta_loss!r}")


def _bar_wanted() -> bool:
    """Whether a progress bar can redraw in place: on a terminal, or as a notebook widget.

    Elsewhere (a log file, a pipe, CI) each redraw would be a new line mixed with the
    per-trajectory lines, so those lines are all that is printed there.
    """
    if any(c.__module__.startswith("tqdm.notebook") for c in tqdm.__mro__):
        return True
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed streams
        return False


def _loss_name(loss_fn: Callable) -> str:
    return getattr(loss_fn, "__name__", type(loss_fn).__name__)


def _check_loss_moves(task, loss_fn: Callable, seed: int) -> None:
    """Refuse a loss that fine-tuning cannot move, before any trajectory runs.

    One forward and backward pass on the first minibatch of the subsample, from the first
    trajectory's initialisation: the loss must be a scalar whose gradient is not zero both
    with respect to the model's output and with respect to its trainable parameters. The
    default cross-entropy on a one-output regression model fails the first (a softmax over
    one logit is always 1): every trajectory would log a constant loss and return the
    starting weights.
    """
    params, buffers = task.init_params(seed)
    x, y = task.train
    x, y = x[: task.batch_size], y[: task.batch_size]
    name = _loss_name(loss_fn)
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        params = {k: v.requires_grad_() for k, v in params.items()}
        out = functional_call(task.module, {**params, **buffers}, (x,))
        loss = loss_fn(out, y)
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else ""
            raise ValueError(f"loss_fn ({name}) must return a scalar, got {type(loss).__name__}{shape}")
        wrt = [out] if isinstance(out, Tensor) and out.requires_grad else []
        grads = []
        if loss.requires_grad:
            grads = torch.autograd.grad(loss, wrt + list(params.values()), allow_unused=True)
    moves = [g is not None and bool(g.ne(0).any()) for g in grads]
    if wrt and moves and not moves[0]:
        hint = (" For regression, pass loss_fn=torch.nn.functional.mse_loss."
                if y.is_floating_point() else "")
        raise ValueError(
            f"loss_fn ({name}) does not change with the model's output {tuple(out.shape)} (its "
            f"gradient is zero on the first batch, loss {float(loss.detach()):.4g}), so fine-tuning "
            f"would change nothing.{hint}"
        )
    if not any(moves[len(wrt):]):
        raise ValueError(
            f"the loss ({name}) does not change with any trainable parameter of the model (its "
            "gradient is zero on the first batch), so fine-tuning would change nothing"
        )


def finetune(
    model: nn.Module,
    loader: Iterable,
    *,
    weights: str | Path | CoordinatewiseNet | Any = "simple",  # BPTT runs no averaging
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    subsample: float = 0.05,
    trajectories: int = 5,
    unroll: int = 20,
    max_unrolls: int = 50,
    target: float = 0.5,
    meta_lr: float = 1e-3,
    relative_meta_lr: bool = True,
    meta_loss: str = "weighted",
    grad_clip: float | None = 1.0,
    batch_size: int | None = None,
    seed: int = 0,
    progress: bool = True,
    out_dir: str | Path | None = None,
) -> FinetuneResult:
    """Fine-tune a meta-optimizer on a new model and data (the paper's fine-tuning loop).

    1. Draw a random ``subsample`` fraction of the loader's examples
       (:func:`subsample_loader`, seeded by ``seed``).
    2. For each of ``trajectories`` trajectories: initialise a fresh copy of ``model`` (a
       deep copy whose submodules' ``reset_parameters`` run under the trajectory's seed) and
       train it with the meta-optimizer in unrolls of ``unroll`` steps, one meta-update
       (Adam, ``meta_lr``, gradient norm clipped to ``grad_clip``) after each unroll, as
       ``meta_fit`` does, until the mean training loss of an unroll is below ``target``
       (0.5) times the trajectory's initial loss, or ``max_unrolls`` unrolls have run. The
       log says whether each trajectory reached the target.

    The model runs through ``torch.func.functional_call`` on copies of its parameters and
    buffers (BatchNorm statistics included): ``model`` itself is never modified, and neither
    is torch's global random state. Fine-tuning runs on the CPU (the copies and the data are
    moved there). Parameters with ``requires_grad=False`` keep your model's values and are
    held fixed.

    Args:
        model: any ``nn.Module``; ``loss_fn(model(x), y)`` must be a scalar.
        loader: an iterable of ``(x, y)`` batches, e.g. a ``DataLoader`` (run through once).
        weights: the starting meta-weights, anything
            :func:`~l2l_optim.weights.resolve_net` accepts: a shipped name, a
            ``.safetensors`` path, a ``LoadedWeights`` or a net (copied; yours is not
            modified). The default is ``"simple"``, not the optimizer's default
            ``"simple-sf"``: the fine-tuning loop runs the rule without Schedule-Free
            averaging, so weights with averaging are refused.
        loss_fn: the training loss (default: cross-entropy).
        subsample: fraction of the data to fine-tune on (the paper: 3%-5%).
        trajectories: number of trajectories (the paper: 5 "episodes").
        unroll: optimizee steps per truncated-BPTT unroll.
        max_unrolls: cap on the unrolls of one trajectory, so it always ends.
        target: a trajectory ends once an unroll's mean loss is below ``target`` x its
            initial loss.
        meta_lr: Adam learning rate on the meta-optimizer's weights.
        relative_meta_lr: scale each weight's Adam step by its magnitude, as ``meta_fit``
            does (:func:`l2l_optim.meta.meta_lr_scales`). Without it, one absolute 1e-3 step
            on the shipped SimpleOptimizer's ~1e-4 output weights is ten times their size and
            wrecks the optimizer.
        meta_loss: ``"weighted"`` (the paper's), ``"uniform"`` or ``"last"``.
        grad_clip: max norm of the meta-gradient (None: no clipping).
        batch_size: minibatch size (default: the loader's ``batch_size``).
        seed: seeds the subsample, every trajectory's init and minibatches.
        progress: report progress: a tqdm bar on a terminal (or in a notebook) and one line
            per trajectory; where output is not a terminal, the lines alone.
        out_dir: save the fine-tuned weights there (a ``.safetensors`` file, or a directory
            for ``<out_dir>/weights.safetensors``) with the fine-tuning settings and log as
            metadata.

    Returns:
        A :class:`FinetuneResult`; ``SimpleOptimizer(model.parameters(), weights=result.net)``
        (or ``weights=result.weights_path``) uses the fine-tuned optimizer.

    Raises:
        ValueError: an empty loader, a subsample smaller than one batch, an invalid
            setting, weights with Schedule-Free averaging, a model without trainable
            parameters, or a loss whose gradient with respect to the model's output or to all
            its trainable parameters is zero on the first batch (such as the default
            cross-entropy on a one-output regression model), which no fine-tuning can move.
        TypeError: the loader does not yield ``(x, y)`` tensor pairs, or ``weights`` has an
            unsupported type.

    Example:
        A regression model needs its own loss (cross-entropy is the default):

        >>> import torch
        >>> import torch.nn.functional as F
        >>> from l2l_optim import SimpleOptimizer
        >>> _ = torch.manual_seed(0)
        >>> x = torch.randn(2000, 4)
        >>> data = [(x, x @ torch.ones(4, 1))]
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        >>> result = finetune(model, data, loss_fn=F.mse_loss, batch_size=32, trajectories=2,
        ...                   unroll=10, max_unrolls=3, progress=False)
        >>> len(result.log), result.subsample[0].shape
        (2, torch.Size([100, 4]))
        >>> sorted(result.log[0])[:4]
        ['diverged', 'final_avg_loss', 'initial_loss', 'reached_target']
        >>> opt = SimpleOptimizer(model.parameters(), weights=result)  # the fine-tuned rule
        >>> finetune(model, data, batch_size=32, progress=False)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
            ...
        ValueError: ...
    """
    _check_settings(model, trajectories, unroll, max_unrolls, target, meta_lr, meta_loss)
    net, source = resolve_net(weights)
    net = net.cpu().float().requires_grad_(True).train()
    # a shuffling loader draws from the global RNG; the caller's stream stays where it was
    with torch.random.fork_rng(devices=[]):
        x, y, batch_size = subsample_loader(loader, subsample, seed=seed, batch_size=batch_size)
    task = task_from_model(model, (x, y), batch_size=batch_size, loss_fn=loss_fn,
                           name=f"finetune:{type(model).__name__}")
    _check_loss_moves(task, loss_fn, seed)
    meta_opt = torch.optim.Adam(net.parameters(), lr=meta_lr)
    lr_scales = meta_lr_scales(net) if relative_meta_lr else None
    bar = tqdm(total=trajectories * max_unrolls, desc="finetune", unit="unroll",
               disable=not (progress and _bar_wanted()))
    log: list[dict] = []
    for k in range(trajectories):
        traj_seed = seed * 1_000_003 + k
        t0 = time.perf_counter()
        # the loss this trajectory starts from (its init, its first minibatch), which the
        # target is relative to: what run_trajectory computes before its first step
        initial = run_trajectory(net, task, seed=traj_seed, steps=0, unroll=1)["initial_loss"]
        goal = target * initial

        def reached(losses: list[float], k=k, goal=goal) -> bool:
            avg = _mean_of_last_unroll(losses, unroll)
            bar.update(1)
            bar.set_postfix(trajectory=k, loss=f"{avg:.4f}", target=f"{goal:.4f}", refresh=False)
            return avg < goal

        r = run_trajectory(net, task, seed=traj_seed, steps=unroll * max_unrolls, unroll=unroll,
                           meta_loss=meta_loss,
                           meta_opt=meta_opt, grad_clip=grad_clip, lr_scales=lr_scales, should_stop=reached)
        losses = r["losses"]
        unrolls = math.ceil(len(losses) / unroll)
        bar.update((k + 1) * max_unrolls - bar.n)
        entry = {
            "trajectory": k,
            "seed": traj_seed,
            "initial_loss": initial,
            "target": goal,
            "final_avg_loss": _mean_of_last_unroll(losses, unroll),
            "reached_target": bool(r["stopped"]),
            "unrolls": unrolls,
            "steps": len(losses),
            "diverged": bool(r["diverged"]),
            "seconds": round(time.perf_counter() - t0, 2),
        }
        log.append(entry)
        if progress:
            state = "reached" if entry["reached_target"] else ("diverged" if entry["diverged"] else "did not reach")
            # tqdm.write clears the bar (when one is drawn) before the line and redraws it after
            tqdm.write(f"trajectory {k}: {state} the target {goal:.4f} "
                       f"(loss {initial:.4f} -> {entry['final_avg_loss']:.4f}) "
                       f"in {unrolls} unroll(s), {entry['seconds']:.1f} s", file=sys.stderr)
    bar.close()
    net.eval()
    net.requires_grad_(False)

    settings = {
        "base_weights": source,
        "model": type(model).__name__,
        "subsample": subsample,
        "subsample_examples": int(x.shape[0]),
        "batch_size": batch_size,
        "trajectories": trajectories,
        "unroll": unroll,
        "max_unrolls": max_unrolls,
        "target": target,
        "meta_lr": meta_lr,
        "relative_meta_lr": relative_meta_lr,
        "meta_loss": meta_loss,
        "grad_clip": grad_clip,
        "seed": seed,
    }
    metadata = {"finetune": settings, "finetune_log": log}
    attach_metadata(net, metadata)
    weights_path = None if out_dir is None else save_weights(net, out_dir, metadata=metadata)
    return FinetuneResult(net=net, weights_path=weights_path, log=log, subsample=(x, y),
                          batch_size=batch_size, metadata=metadata)
