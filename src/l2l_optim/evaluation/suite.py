"""The validation suite: optimizee tasks that meta-training never sees.

Each :class:`SuiteTask` is a :class:`~l2l_optim.tasks.Task` (a model factory, a minibatch
sampler driven by an explicit ``torch.Generator``, and a loss) plus a ``config`` dict that names every choice defining the
task (dataset, architecture, sizes, batch size). :func:`l2l_optim.evaluation.evaluate` hashes
``name`` and ``config`` to key its cache of baseline runs, so changing a task changes its key
and its baselines are recomputed.

The default suite (:func:`default_suite`) is chosen to resemble real use and to stay outside
the meta-training population (small MLPs and CNNs on 7x7/14x14 downsampled images, tiny
transformers on Markov chains, regression on a tanh teacher, a noisy quadratic): full 28x28
inputs, other architectures, other sizes and other losses. Every task is sized to a few
milliseconds per step on one CPU thread.

============================  ==========================================================
``fmnist-mlp-wide``           MLP 784-256-256-10 (ReLU) on Fashion-MNIST, cross-entropy
``mnist-cnn``                 conv 3x3 (16) - pool - conv 3x3 (32) - pool - linear, MNIST
``mnist-resnet-bn``           residual CNN with BatchNorm (two basic blocks), MNIST
``mnist-autoencoder``         deep MLP autoencoder 784-128-64-16-64-128-784, sigmoid, MSE
``addition-transformer``      2-layer causal transformer (d 32, 4 heads) on 4-digit addition
``sine-regression``           MLP 16-64-64-1 on ``sin(3 <w, x>)`` plus noise, MSE
``fmnist-logreg``             logistic regression (linear 784-10) on Fashion-MNIST
``fmnist-mlp-4096``           MLP 784-4096-10 (ReLU) on Fashion-MNIST, 3.2M parameters
``mnist-mlp-narrow``          MLP 784-16-16-16-16-10 (tanh) on MNIST
``fmnist-cnn-gn``             CNN with GroupNorm (conv 32 - conv 64, stride 2) on Fashion-MNIST
``text-gru``                  GRU language model (embedding 32, hidden 128) on Markov text
``text-transformer``          2-layer causal transformer (d 64) on the same Markov text
``wide-target-regression``    linear regression 64-1 onto weights of size ~10, MSE
============================  ==========================================================

The best fixed learning rate of Adam differs by more than two decades across these tasks
(the wide MLP wants small steps, the large-target regression large ones), so a rule that
takes one step size everywhere cannot do well on all of them.

Example:
    >>> from l2l_optim.evaluation.suite import default_suite
    >>> [t.name for t in default_suite()][:2]
    ['fmnist-mlp-wide', 'mnist-cnn']
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import NORMALISATION, load_dataset
from ..tasks import Task

__all__ = ["SuiteTask", "SUITES", "default_suite", "get_suite"]

Batch = tuple[Tensor, Tensor]


@dataclass(kw_only=True, eq=False)
class SuiteTask(Task):
    """One validation task: a :class:`~l2l_optim.tasks.Task` with the identity that keys its
    cached baselines.

    Args:
        name: a short unique label.
        config: every choice that defines the task, JSON-serialisable; hashed into the
            baseline cache key, so it must change whenever the task's behaviour changes.
        model_fn: builds a freshly initialised model (called under the run's seed).
        batch_fn: ``batch_fn(generator) -> (x, y)``, one training minibatch.
        loss_fn: ``loss_fn(model(x), y) -> scalar``.
        description: one line for tables.
        data_fn: optional; returns a fingerprint of the task's data, also hashed into the
            cache key, so that baselines computed on other data are not reused.
        max_steps: the longest run the protocol gives this task (None: any); the costly
            tasks stop at 5,000 steps, and longer horizons leave them out.
    """

    config: dict[str, Any]
    description: str = ""
    data_fn: Callable[[], str] | None = field(default=None, repr=False)
    max_steps: int | None = None


# ----------------------------------------------------------------------------- data


@functools.lru_cache(maxsize=4)
def _dataset(name: str, root: str | None) -> Batch:
    return load_dataset(name, "train", root=root)


@functools.lru_cache(maxsize=4)
def _data_fingerprint(name: str, root: str | None) -> str:
    # a strided sample of the images and all labels: cheap, and enough to tell datasets apart
    x, y = _dataset(name, root)
    h = hashlib.sha256()
    h.update(str(tuple(x.shape)).encode())
    h.update(x[::97].contiguous().numpy().tobytes())
    h.update(y.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _image_batch(gen: torch.Generator, *, dataset: str, batch_size: int, target: str,
                 root: str | None) -> Batch:
    x, y = _dataset(dataset, root)
    idx = torch.randint(0, x.shape[0], (batch_size,), generator=gen)
    xb = x[idx]
    if target == "pixels":  # undo the normalisation: pixels in [0, 1] for a sigmoid output
        mean, std = NORMALISATION[dataset]
        return xb, (xb * std + mean).flatten(1)
    return xb, y[idx]


# ---------------------------------------------------------------------------- models


def _mlp(dims: list[int], out_act: nn.Module | None = None) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    if out_act is not None:
        layers.append(out_act)
    return nn.Sequential(*layers)


def _cnn(c1: int, c2: int) -> nn.Sequential:
    # 28 -> 14 -> 7
    return nn.Sequential(
        nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(c2 * 7 * 7, 10),
    )


class _Block(nn.Module):
    """Residual basic block: conv-BN-ReLU-conv-BN plus identity (or 1x1 conv-BN) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.c2, self.b2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.b1(self.c1(x)))
        return F.relu(self.b2(self.c2(out)) + self.short(x))


def _resnet_bn(width: int) -> nn.Sequential:
    # stem 28 -> 14, max-pool 14 -> 7, block at 7x7, block 7 -> 4, global average pool
    return nn.Sequential(
        nn.Conv2d(1, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        nn.MaxPool2d(2),
        _Block(width, width, 1), _Block(width, 2 * width, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 10),
    )


class _SelfAttention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class _TBlock(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(d), _SelfAttention(d, heads)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


_PLUS, _EQ = 10, 11  # tokens 0-9 are digits


class _Transformer(nn.Module):
    """Pre-LayerNorm causal transformer with learned positions."""

    def __init__(self, vocab: int, ctx: int, d: int, heads: int, layers: int):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        self.blocks = nn.Sequential(*[_TBlock(d, heads) for _ in range(layers)])
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        return self.head(self.ln(self.blocks(x)))


def _addition_batch(gen: torch.Generator, *, digits: int, batch_size: int) -> Batch:
    """``a + b = s`` as tokens, ``a`` and ``b`` most significant digit first and ``s``
    reversed (the order in which a carry propagates); next-token targets, scored only on the
    ``digits + 1`` digits of ``s``."""
    n = digits
    a, b = (torch.randint(0, 10**n, (batch_size,), generator=gen) for _ in range(2))

    def split(v: Tensor, k: int) -> Tensor:  # least significant first
        return torch.stack([(v // 10**i) % 10 for i in range(k)], 1)

    seq = torch.cat([split(a, n).flip(1), torch.full((batch_size, 1), _PLUS), split(b, n).flip(1),
                     torch.full((batch_size, 1), _EQ), split(a + b, n + 1)], 1)
    x, y = seq[:, :-1], seq[:, 1:].clone()
    y[:, : 2 * n + 1] = -100  # the prompt is not scored
    return x, y


def _cnn_gn(c1: int, c2: int, groups: int) -> nn.Sequential:
    # 28 -> 14 -> 7, GroupNorm after each convolution
    return nn.Sequential(
        nn.Conv2d(1, c1, 3, 2, 1), nn.GroupNorm(groups, c1), nn.ReLU(),
        nn.Conv2d(c1, c2, 3, 2, 1), nn.GroupNorm(groups, c2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c2, 10),
    )


def _tanh_mlp(dims: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


class _GRULM(nn.Module):
    def __init__(self, vocab: int, d: int, hidden: int):
        super().__init__()
        self.emb, self.rnn, self.head = nn.Embedding(vocab, d), nn.GRU(d, hidden, batch_first=True), nn.Linear(hidden, vocab)

    def forward(self, idx: Tensor) -> Tensor:
        return self.head(self.rnn(self.emb(idx))[0])


@functools.lru_cache(maxsize=2)
def _markov_text(vocab: int, order: int, length: int, seed: int) -> Tensor:
    """A fixed corpus from a random sparse order-``order`` Markov chain over ``vocab`` tokens:
    each context allows a handful of next tokens, so the text has structure to learn at
    several ranges (loss falls from log(vocab) to the chain's entropy)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(vocab**order, vocab, generator=g) * 2.5
    probs = torch.softmax(logits, -1)
    out = torch.empty(length, dtype=torch.long)
    out[:order] = torch.randint(0, vocab, (order,), generator=g)
    draws = torch.rand(length, generator=g)
    cdf = probs.cumsum(-1)
    ctx = 0
    for i in range(order):
        ctx = ctx * vocab + int(out[i])
    for i in range(order, length):
        nxt = min(int(torch.searchsorted(cdf[ctx], draws[i])), vocab - 1)
        out[i] = nxt
        ctx = (ctx * vocab + nxt) % vocab**order
    return out


def _text_batch(gen: torch.Generator, *, vocab: int, order: int, ctx: int, batch_size: int,
                corpus: int, text_seed: int) -> Batch:
    text = _markov_text(vocab, order, corpus, text_seed)
    start = torch.randint(0, corpus - ctx - 1, (batch_size, 1), generator=gen)
    seq = text[start + torch.arange(ctx + 1)]
    return seq[:, :-1], seq[:, 1:]


def _regression_batch(gen: torch.Generator, *, dim: int, batch_size: int, scale: float, noise: float,
                      teacher_seed: int) -> Batch:
    # targets from weights of size ~scale: the optimum lies far from the init, so the best
    # fixed step is large
    w = scale * torch.randn(dim, 1, generator=torch.Generator().manual_seed(teacher_seed))
    x = torch.randn(batch_size, dim, generator=gen)
    return x, x @ w + noise * torch.randn(batch_size, 1, generator=gen)


def _seq_ce(out: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), ignore_index=-100)


def _sine_batch(gen: torch.Generator, *, dim: int, batch_size: int, noise: float, teacher_seed: int) -> Batch:
    # the teacher direction is fixed by the task, the inputs by the run's generator
    w = torch.randn(dim, generator=torch.Generator().manual_seed(teacher_seed)) / math.sqrt(dim)
    x = torch.randn(batch_size, dim, generator=gen)
    y = torch.sin(3.0 * (x @ w)) + noise * torch.randn(batch_size, generator=gen)
    return x, y.unsqueeze(1)


# ----------------------------------------------------------------------------- suite

#: bumped whenever the code behind a config changes what a task computes
SUITE_VERSION = 1


def _image_task(name: str, dataset: str, model: str, model_fn: Callable[[], nn.Module], *,
                batch_size: int, target: str, loss: str, description: str, root: str | None,
                max_steps: int | None = None, **model_config: Any) -> SuiteTask:
    config = dict(suite_version=SUITE_VERSION, dataset=dataset, model=model, batch_size=batch_size,
                  target=target, loss=loss, **model_config)
    return SuiteTask(
        name=name,
        config=config,
        model_fn=model_fn,
        batch_fn=functools.partial(_image_batch, dataset=dataset, batch_size=batch_size,
                                   target=target, root=root),
        loss_fn=F.cross_entropy if loss == "ce" else F.mse_loss,
        description=description,
        data_fn=functools.partial(_data_fingerprint, dataset, root),
        max_steps=max_steps,
    )


def default_suite(root: str | os.PathLike | None = None) -> list[SuiteTask]:
    """The thirteen tasks of the default validation suite (datasets are loaded on first use).

    Args:
        root: a directory to look for the datasets in first (see
            :func:`l2l_optim.data.load_dataset`).

    Returns:
        A list of :class:`SuiteTask`, in table order.
    """
    r = None if root is None else os.fspath(root)
    ae_dims = [784, 128, 64, 16, 64, 128, 784]
    tf = dict(digits=4, d_model=32, heads=4, layers=2, batch_size=32)
    sine = dict(dim=16, hidden=64, noise=0.1, teacher_seed=1234, batch_size=128)
    narrow = [784, 16, 16, 16, 16, 10]
    text = dict(vocab=32, order=2, ctx=32, batch_size=32, corpus=200_000, text_seed=7)
    reg = dict(dim=64, batch_size=64, scale=10.0, noise=0.1, teacher_seed=99)
    return [
        _image_task("fmnist-mlp-wide", "fashion-mnist", "mlp", functools.partial(_mlp, [784, 256, 256, 10]),
                    batch_size=128, target="labels", loss="ce", root=r, dims=[784, 256, 256, 10],
                    description="MLP 784-256-256-10, Fashion-MNIST, CE"),
        _image_task("mnist-cnn", "mnist", "cnn", functools.partial(_cnn, 16, 32),
                    batch_size=32, target="labels", loss="ce", root=r, channels=[16, 32],
                    description="CNN conv16-pool-conv32-pool-linear, MNIST, CE"),
        _image_task("mnist-resnet-bn", "mnist", "resnet-bn", functools.partial(_resnet_bn, 16),
                    batch_size=32, target="labels", loss="ce", root=r, width=16,
                    description="residual CNN + BatchNorm, MNIST, CE"),
        _image_task("mnist-autoencoder", "mnist", "mlp-sigmoid", functools.partial(_mlp, ae_dims, nn.Sigmoid()),
                    batch_size=64, target="pixels", loss="mse", root=r, dims=ae_dims,
                    description="autoencoder 784-128-64-16-64-128-784, MNIST, MSE"),
        SuiteTask(
            name="addition-transformer",
            config=dict(suite_version=SUITE_VERSION, model="transformer", loss="seq-ce", **tf),
            model_fn=functools.partial(_Transformer, vocab=12, ctx=3 * tf["digits"] + 2, d=tf["d_model"],
                                       heads=tf["heads"], layers=tf["layers"]),
            batch_fn=functools.partial(_addition_batch, digits=tf["digits"], batch_size=tf["batch_size"]),
            loss_fn=_seq_ce,
            description="2-layer causal transformer d32, 4-digit addition, CE",
        ),
        SuiteTask(
            name="sine-regression",
            config=dict(suite_version=SUITE_VERSION, model="mlp", loss="mse", **sine),
            model_fn=functools.partial(_mlp, [sine["dim"], sine["hidden"], sine["hidden"], 1]),
            batch_fn=functools.partial(_sine_batch, dim=sine["dim"], batch_size=sine["batch_size"],
                                       noise=sine["noise"], teacher_seed=sine["teacher_seed"]),
            loss_fn=F.mse_loss,
            description="MLP 16-64-64-1, sin(3<w,x>) + noise, MSE",
        ),
        _image_task("fmnist-logreg", "fashion-mnist", "linear", functools.partial(_mlp, [784, 10]),
                    batch_size=128, target="labels", loss="ce", root=r, dims=[784, 10],
                    description="logistic regression 784-10, Fashion-MNIST, CE"),
        _image_task("fmnist-mlp-4096", "fashion-mnist", "mlp", functools.partial(_mlp, [784, 4096, 10]),
                    batch_size=128, target="labels", loss="ce", root=r, dims=[784, 4096, 10],
                    description="MLP 784-4096-10, Fashion-MNIST, CE (3.2M params)", max_steps=5000),
        _image_task("mnist-mlp-narrow", "mnist", "mlp-tanh", functools.partial(_tanh_mlp, narrow),
                    batch_size=64, target="labels", loss="ce", root=r, dims=narrow,
                    description="MLP 784-16-16-16-16-10 tanh, MNIST, CE"),
        _image_task("fmnist-cnn-gn", "fashion-mnist", "cnn-gn", functools.partial(_cnn_gn, 32, 64, 8),
                    batch_size=32, target="labels", loss="ce", root=r, channels=[32, 64], groups=8,
                    description="CNN conv32-conv64 (stride 2) + GroupNorm, Fashion-MNIST, CE", max_steps=5000),
        SuiteTask(
            name="text-gru",
            config=dict(suite_version=SUITE_VERSION, model="gru", loss="seq-ce", d=32, hidden=128, **text),
            model_fn=functools.partial(_GRULM, vocab=text["vocab"], d=32, hidden=128),
            batch_fn=functools.partial(_text_batch, **text),
            loss_fn=_seq_ce,
            description="GRU LM (emb 32, hidden 128) on order-2 Markov text, CE",
            max_steps=5000,
        ),
        SuiteTask(
            name="text-transformer",
            config=dict(suite_version=SUITE_VERSION, model="transformer", loss="seq-ce", d_model=64, heads=4,
                        layers=2, **text),
            model_fn=functools.partial(_Transformer, vocab=text["vocab"], ctx=text["ctx"], d=64, heads=4, layers=2),
            batch_fn=functools.partial(_text_batch, **text),
            loss_fn=_seq_ce,
            description="2-layer causal transformer d64 on order-2 Markov text, CE",
            max_steps=5000,
        ),
        SuiteTask(
            name="wide-target-regression",
            config=dict(suite_version=SUITE_VERSION, model="linear", loss="mse", **reg),
            model_fn=functools.partial(nn.Linear, reg["dim"], 1),
            batch_fn=functools.partial(_regression_batch, **reg),
            loss_fn=F.mse_loss,
            description="linear regression 64-1 onto weights ~N(0, 10^2), MSE",
        ),
    ]


#: suite name -> factory(root) -> tasks
SUITES: dict[str, Callable[..., list[SuiteTask]]] = {"default": default_suite}


def get_suite(suite: str | list[SuiteTask], root: str | os.PathLike | None = None) -> list[SuiteTask]:
    """The tasks of a named suite, or ``suite`` itself when it is already a list of tasks.

    Raises:
        ValueError: an unknown suite name, an empty list or two tasks with the same name.
        TypeError: a list entry that is not a :class:`SuiteTask`.
    """
    if isinstance(suite, str):
        if suite not in SUITES:
            raise ValueError(f"unknown suite {suite!r}; known: {sorted(SUITES)}")
        tasks = SUITES[suite](root)
    else:
        tasks = list(suite)
        for t in tasks:
            if not isinstance(t, SuiteTask):
                raise TypeError(f"suite entries must be SuiteTask, got {type(t).__name__}")
    if not tasks:
        raise ValueError("the suite has no tasks")
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"task names must be unique, got {names}")
    return tasks
