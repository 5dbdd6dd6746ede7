"""Optimizee tasks: a model factory plus in-memory data, exposed functionally.

A :class:`Task` pairs a model factory with training (and test) tensors. Meta-training and
fine-tuning never touch an ``nn.Module``'s own parameters: they hold the optimizee's
parameters as a ``dict[str, Tensor]`` and call the model through
``torch.func.functional_call``, so the updates stay differentiable.

Tasks come from the registry (:data:`TASKS`, :func:`make_task`: a model of
:mod:`l2l_optim.models` on a dataset of :mod:`l2l_optim.data`) or from any module and data
(:func:`task_from_model`).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from .data import load_dataset, materialize
from .models import base_mlp, lenet, mlp5, resnet_narrow, resnet_small

__all__ = ["Task", "TASKS", "make_task", "task_from_model", "subsample_task"]


@dataclass
class Task:
    """A model factory plus its training data: what every training loop of the package runs.

    The data is either in memory (``train``, minibatches drawn uniformly with replacement) or
    drawn by ``batch_fn`` (synthetic data, or data loaded on first use).

    Args:
        name: a label for logs.
        model_fn: builds a freshly initialised model (called under a fixed seed).
        train: ``(x, y)`` training tensors; may be None when ``batch_fn`` is given.
        test: optional ``(x, y)`` test tensors.
        batch_size: minibatch size of every optimizee step (of ``train``'s minibatches).
        loss_fn: ``loss_fn(output, y) -> scalar``; cross-entropy by default.
        batch_fn: optional ``batch_fn(generator) -> (x, y)``, one training minibatch; used
            instead of sampling ``train``.

    Raises:
        ValueError: neither ``train`` nor ``batch_fn`` is given.
    """

    name: str
    model_fn: Callable[[], nn.Module]
    train: tuple[Tensor, Tensor] | None = None
    test: tuple[Tensor, Tensor] | None = None
    batch_size: int = 128
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy
    batch_fn: Callable[[torch.Generator], tuple[Tensor, Tensor]] | None = field(default=None, repr=False)
    _module: nn.Module | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.train is None and self.batch_fn is None:
            raise ValueError(f"task {self.name!r} has no training data: pass train=(x, y) or batch_fn")

    @property
    def module(self) -> nn.Module:
        """A template module whose structure (not parameters) functional calls use."""
        if self._module is None:
            # its initial values are never used (every call passes parameters and buffers),
            # so building it must not draw from the caller's global RNG
            with torch.random.fork_rng(devices=[]):
                self._module = self.model_fn()
        return self._module

    def init_params(self, seed: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Fresh parameters and buffers from the model's own initialisation under ``seed``."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = self.model_fn()
        params = {k: v.detach().clone() for k, v in model.named_parameters()}
        buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
        return params, buffers

    def num_params(self) -> int:
        """The number of trainable parameters of the model."""
        return sum(p.numel() for p in self.module.parameters() if p.requires_grad)

    def sample_batch(self, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """One training minibatch, drawn with ``generator``."""
        if self.batch_fn is not None:
            return self.batch_fn(generator)
        x, y = self.train
        idx = torch.randint(0, x.shape[0], (self.batch_size,), generator=generator)
        return x[idx], y[idx]

    def loss(self, params: dict[str, Tensor], buffers: dict[str, Tensor], batch) -> Tensor:
        x, y = batch
        out = functional_call(self.module, {**params, **buffers}, (x,))
        return self.loss_fn(out, y)


# name -> (dataset, model factory)
TASKS: dict[str, tuple[str, Callable[[], nn.Module]]] = {
    "mnist-mlp": ("mnist", base_mlp),
    "fmnist-mlp": ("fashion-mnist", base_mlp),
    "mnist-lenet": ("mnist", lenet),
    "fmnist-lenet": ("fashion-mnist", lenet),
    "mnist-mlp5": ("mnist", mlp5),
    "fmnist-resnet": ("fashion-mnist", resnet_small),
    "fmnist-resnet16": ("fashion-mnist", resnet_narrow),
}


def make_task(
    name: str = "mnist-mlp",
    *,
    root: str | os.PathLike | None = None,
    batch_size: int = 128,
    with_test: bool = False,
    download: bool = False,
) -> Task:
    """Build a registered task with its data loaded from local files.

    Raises:
        ValueError: unknown task name.
        DatasetNotFoundError: the dataset is not available locally.
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {sorted(TASKS)}")
    dataset, model_fn = TASKS[name]
    train = load_dataset(dataset, "train", root=root, download=download)
    test = load_dataset(dataset, "test", root=root, download=download) if with_test else None
    return Task(name=name, model_fn=model_fn, train=train, test=test, batch_size=batch_size)


def subsample_task(task: Task, x: Tensor, y: Tensor) -> Task:
    """``task`` with its training data replaced by ``(x, y)`` (e.g. the fine-tuning subsample)."""
    return replace(task, train=(x, y), _module=None)


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
    """Wrap a module and data as a :class:`Task`.

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
    # the template's re-initialised values are never used (init_params re-runs it under a seed)
    with torch.random.fork_rng(devices=[]):
        template = _fresh_copy(model)
    return _ModuleTask(
        name=name or f"{type(model).__name__}",
        model_fn=lambda: _fresh_copy(template),
        train=(x, y),
        test=test,
        batch_size=batch_size,
        loss_fn=loss_fn,
    )
