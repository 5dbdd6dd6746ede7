"""Task families for meta-training: many small optimizees of one shape, batched along a leading dim.

A :class:`BatchedTask` holds ``M`` members of the same architecture and trains them at once:
parameters are ``dict[str, Tensor]`` with a leading member dimension, the forward pass uses
batched matmuls (``baddbmm``) and grouped convolutions, and one ``autograd.grad`` of the summed
losses gives every member's gradient (members do not interact). ``M`` members cost far less
than ``M`` separate runs on a few cores, because each op is one large call instead of ``M``
small ones.

Members are grouped into *instances*: members of one instance share the initial parameters,
the minibatches and the scale augmentation, and differ only in the optimizer that trains
them. That is what an antithetic ES estimate needs (common random numbers: the difference
between two members measures the optimizers, not the luck of the draw).

**Scale augmentation** (Lv et al. 2017's random scaling; learned_optimization's reparameterised
weights): every parameter tensor k of an instance is stored as ``theta_hat = theta / s_k``
and used as ``s_k * theta_hat``, and the loss is multiplied by ``c``. The optimizer sees
``c * s_k * grad`` and moves ``theta_hat``: the same training problem at another gradient
scale. ``s_k`` and ``c`` are drawn log-uniformly over ``scale_range`` for a fraction
``scaled_fraction`` of the instances; the rest train at the real scale, which is what users
run.

The families (each draws its sizes, depth, activation, batch size and init scale per task):

==============  ===========================================================================
``mlp``         MLP classifier on MNIST or Fashion-MNIST, at 7x7, 14x14 or 28x28
``conv``        small CNN on 14x14 MNIST / Fashion-MNIST, with or without batch norm
``autoencoder`` MLP autoencoder on 7x7, 14x14 or 28x28 images, MSE
``lm``          one-layer causal transformer, next token of a random Markov chain
``regression``  MLP regression on a random teacher network, MSE
``quadratic``   noisy quadratic with a log-uniform spectrum
==============  ===========================================================================
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["FAMILIES", "IMAGE_FAMILIES", "VARIANTS", "BatchedTask", "TaskSpec", "sample_spec", "build_task", "ImageData"]

FAMILIES = ("mlp", "conv", "autoencoder", "lm", "regression", "quadratic")
# the families trained on MNIST / Fashion-MNIST images (they need ImageData)
IMAGE_FAMILIES = ("mlp", "conv", "autoencoder")
# Names that draw from a family with another size distribution (the task is built as that
# family): ``mlp-wide`` is an MLP classifier on 28x28 inputs with 1-2 hidden layers of 96-192
# units. Per-coordinate steps of a fixed size move a wide layer's outputs more, so a rule
# meta-trained on narrow nets alone takes steps too large for wide ones.
VARIANTS = {"mlp-wide": "mlp"}
_ACTS = {"relu": F.relu, "tanh": torch.tanh, "gelu": F.gelu}


@dataclass
class TaskSpec:
    """One task drawn from a family: everything needed to rebuild it."""

    family: str
    config: dict = field(default_factory=dict)


class ImageData:
    """MNIST / Fashion-MNIST training images at 7x7 and 14x14, loaded once per process.

    Args:
        loader: ``name -> (x, y)`` returning normalised ``(N, 1, 28, 28)`` images and labels
            (``l2l_optim.data.load_dataset`` bound to a root); None disables the image
            families.
    """

    def __init__(self, loader=None):
        self._loader = loader
        self._cache: dict[tuple[str, int], tuple[Tensor, Tensor]] = {}

    @property
    def available(self) -> bool:
        return self._loader is not None

    def get(self, name: str, side: int) -> tuple[Tensor, Tensor]:
        key = (name, side)
        if key not in self._cache:
            x, y = self._loader(name)
            x = F.adaptive_avg_pool2d(x, side) if side != x.shape[-1] else x
            self._cache[key] = (x.contiguous(), y)
        return self._cache[key]


def _log_uniform(rng: random.Random, lo: float, hi: float) -> float:
    return math.exp(rng.uniform(math.log(lo), math.log(hi)))


def sample_spec(rng: random.Random, families: tuple[str, ...] = FAMILIES) -> TaskSpec:
    """Draw a task of a random family from ``families`` with ``rng`` (a ``random.Random``)."""
    family = rng.choice(families)
    c: dict = {"batch_size": rng.choice([32, 64, 128]), "init_scale": _log_uniform(rng, 0.5, 2.0)}
    if VARIANTS.get(family, family) in IMAGE_FAMILIES:
        c["dataset"] = rng.choice(["mnist", "fashion-mnist"])
    if family == "mlp-wide":
        c["side"] = 28
        c["hidden"] = [rng.choice([96, 128, 192]) for _ in range(rng.randint(1, 2))]
        c["act"] = rng.choice(list(_ACTS))
        return TaskSpec(VARIANTS[family], c)
    if family == "mlp":
        # full-size inputs give the gradient scales of real models (fan-in 784); they are
        # drawn as often as the small ones, with narrower layers to bound the cost
        c["side"] = rng.choice([7, 14, 28, 28])
        widths = [32, 64] if c["side"] == 28 else [16, 32, 64, 128]
        c["hidden"] = [rng.choice(widths) for _ in range(rng.randint(1, 3))]
        c["act"] = rng.choice(list(_ACTS))
    elif family == "conv":
        c["channels"] = [rng.choice([4, 8, 16]) for _ in range(rng.randint(1, 2))]
        c["batch_norm"] = rng.random() < 0.5
        c["act"] = rng.choice(["relu", "gelu"])
        c["batch_size"] = rng.choice([16, 32])
    elif family == "autoencoder":
        c["side"] = rng.choice([7, 14, 28])
        c["hidden"] = [rng.choice([32, 64]), rng.choice([4, 8, 16])]
        c["act"] = rng.choice(list(_ACTS))
    elif family == "lm":
        c.update(vocab=rng.choice([8, 16, 32]), ctx=rng.choice([8, 16]), d=rng.choice([16, 24]),
                 temperature=_log_uniform(rng, 0.3, 1.0))
        c["batch_size"] = rng.choice([16, 32])
    elif family == "regression":
        c.update(inputs=rng.choice([4, 8, 16, 32]), hidden=[rng.choice([16, 32, 64]) for _ in range(rng.randint(1, 2))],
                 act=rng.choice(list(_ACTS)), noise=_log_uniform(rng, 0.01, 0.3))
    elif family == "quadratic":
        c.update(dim=rng.choice([16, 64, 256]), cond=_log_uniform(rng, 10, 1e4), noise=_log_uniform(rng, 0.01, 1.0))
    return TaskSpec(family, c)


class BatchedTask:
    """``M`` members of one task, trained at once.

    Args:
        spec: the task.
        instances: the number of distinct instances (inits, batches, scales).
        members_per_instance: members that share one instance (2 for an antithetic pair,
            more for several pairs).
        seed: seeds the task's data (teacher nets, Markov chains) and every instance.
        images: the image data for the image families.
        scale_range: ``(lo, hi)`` of the log-uniform scale augmentation.
        scaled_fraction: fraction of instances with scale augmentation (the others: 1).
    """

    def __init__(self, spec: TaskSpec, instances: int, members_per_instance: int, *, seed: int,
                 images: ImageData | None = None, scale_range: tuple[float, float] = (1e-3, 1e3),
                 scaled_fraction: float = 0.0):
        self.spec, self.c = spec, spec.config
        self.K, self.R = instances, members_per_instance
        self.M = instances * members_per_instance
        self.gen = torch.Generator().manual_seed(seed)
        rng = random.Random(seed)
        self.images = images
        self._setup_data()
        shapes = self._shapes()
        self.names = list(shapes)
        self.shapes = shapes
        # scale augmentation per instance and tensor (and the loss), 1 for unscaled instances
        lo, hi = scale_range
        scales, loss_scales = [], []
        for _ in range(self.K):
            on = rng.random() < scaled_fraction
            scales.append([_log_uniform(rng, lo, hi) if on else 1.0 for _ in shapes])
            loss_scales.append(_log_uniform(rng, lo, hi) if on else 1.0)
        self.param_scales = torch.tensor(scales).repeat_interleave(self.R, 0)  # (M, tensors)
        self.loss_scales = torch.tensor(loss_scales).repeat_interleave(self.R, 0)  # (M,)

    # ----------------------------------------------------------------------------- data

    def _setup_data(self) -> None:
        c, g = self.c, self.gen
        fam = self.spec.family
        if fam in IMAGE_FAMILIES:
            if self.images is None or not self.images.available:
                raise RuntimeError(f"family {fam!r} needs image data (ImageData with a loader)")
            self.x, self.y = self.images.get(c["dataset"], 14 if fam == "conv" else c["side"])
        elif fam == "lm":
            V = c["vocab"]
            logits = torch.randn(V, V, generator=g) / c["temperature"]
            self.transition = torch.softmax(logits, -1)
        elif fam == "regression":
            d, h = c["inputs"], 32
            self.teacher = (torch.randn(d, h, generator=g) / math.sqrt(d), torch.randn(h, 1, generator=g) / math.sqrt(h))
        elif fam == "quadratic":
            n = c["dim"]
            self.curv = torch.logspace(0, math.log10(c["cond"]), n)[torch.randperm(n, generator=g)] / c["cond"] ** 0.5
            self.centre = torch.randn(n, generator=g)

    def sample_batch(self) -> tuple[Tensor, Tensor]:
        """One minibatch per instance, repeated for its members: ``(M, B, ...)``."""
        c, g, K, B = self.c, self.gen, self.K, self.c["batch_size"]
        fam = self.spec.family
        if fam in IMAGE_FAMILIES:
            idx = torch.randint(0, self.x.shape[0], (K, B), generator=g)
            x = self.x[idx]  # (K, B, 1, s, s)
            x = x if fam == "conv" else x.flatten(2)
            y = self.y[idx] if fam != "autoencoder" else x
        elif fam == "lm":
            V, T = c["vocab"], c["ctx"] + 1
            seq = torch.empty(K, B, T, dtype=torch.long)
            seq[:, :, 0] = torch.randint(0, V, (K, B), generator=g)
            for t in range(1, T):
                probs = self.transition[seq[:, :, t - 1]]
                seq[:, :, t] = torch.multinomial(probs.reshape(-1, V), 1, generator=g).reshape(K, B)
            x, y = seq[:, :, :-1], seq[:, :, 1:]
        elif fam == "regression":
            x = torch.randn(K, B, c["inputs"], generator=g)
            w1, w2 = self.teacher
            y = torch.tanh(x @ w1) @ w2 + c["noise"] * torch.randn(K, B, 1, generator=g)
        else:  # quadratic: the noise is the batch
            x = c["noise"] * torch.randn(K, c["dim"], generator=g)
            y = torch.zeros(K)
        rep = lambda t: t.repeat_interleave(self.R, 0)  # noqa: E731
        return rep(x), rep(y)

    # ---------------------------------------------------------------------------- model

    def _shapes(self) -> dict[str, tuple[int, ...]]:
        c, fam = self.c, self.spec.family
        s: dict[str, tuple[int, ...]] = {}
        if fam in ("mlp", "autoencoder", "regression"):
            d_in = c["inputs"] if fam == "regression" else c["side"] ** 2
            d_out = {"mlp": 10, "autoencoder": d_in, "regression": 1}[fam]
            dims = [d_in] + list(c["hidden"]) + ([c["hidden"][0]] if fam == "autoencoder" else []) + [d_out]
            for i in range(len(dims) - 1):
                s[f"w{i}"], s[f"b{i}"] = (dims[i], dims[i + 1]), (dims[i + 1],)
        elif fam == "conv":
            cin = 1
            for i, ch in enumerate(c["channels"]):
                s[f"conv{i}"], s[f"cb{i}"] = (ch, cin, 3, 3), (ch,)
                if c["batch_norm"]:
                    s[f"bn{i}_g"], s[f"bn{i}_b"] = (ch,), (ch,)
                cin = ch
            s["fc"], s["fcb"] = (cin, 10), (10,)
        elif fam == "lm":
            V, d = c["vocab"], c["d"]
            s.update(emb=(V, d), pos=(c["ctx"], d), wq=(d, d), wk=(d, d), wv=(d, d), wo=(d, d),
                     w1=(d, 2 * d), b1=(2 * d,), w2=(2 * d, d), b2=(d,), ln_g=(d,), ln_b=(d,), head=(d, V))
        else:
            s["x"] = (c["dim"],)
        return s

    def init_params(self) -> dict[str, Tensor]:
        """Fresh parameters per instance (repeated for its members), divided by their scales."""
        g, c = self.gen, self.c
        out = {}
        for k, (name, shape) in enumerate(self.shapes.items()):
            if self.spec.family == "quadratic":
                p = torch.zeros(self.K, *shape)
            elif name.endswith("_g"):
                p = torch.ones(self.K, *shape)
            elif len(shape) == 1 or name in ("pos",):
                p = torch.zeros(self.K, *shape) if name != "pos" else 0.1 * torch.randn(self.K, *shape, generator=g)
            else:
                fan_in = shape[0] if len(shape) == 2 else shape[1] * shape[2] * shape[3]
                std = c["init_scale"] / math.sqrt(fan_in)
                p = std * torch.randn(self.K, *shape, generator=g)
            out[name] = p.repeat_interleave(self.R, 0) / self._scale(k, len(shape))
        return out

    def _scale(self, k: int, ndim: int) -> Tensor:
        return self.param_scales[:, k].reshape(self.M, *([1] * ndim))

    def losses(self, params_hat: dict[str, Tensor], batch: tuple[Tensor, Tensor]) -> Tensor:
        """The per-member loss ``(M,)``, times the loss scale, at ``s * params_hat``."""
        p = {n: t * self._scale(k, t.dim() - 1) for k, (n, t) in enumerate(params_hat.items())}
        x, y = batch
        fam, c = self.spec.family, self.c
        if fam in ("mlp", "autoencoder", "regression"):
            act = _ACTS[c["act"]]
            n_layers = len([n for n in p if n.startswith("w")])
            h = x
            for i in range(n_layers):
                h = torch.baddbmm(p[f"b{i}"].unsqueeze(1), h, p[f"w{i}"])
                if i < n_layers - 1:
                    h = act(h)
            if fam == "mlp":
                loss = F.cross_entropy(h.reshape(-1, 10), y.reshape(-1), reduction="none").view(self.M, -1).mean(1)
            elif fam == "autoencoder":
                loss = (h - x).pow(2).mean((1, 2))
            else:
                loss = (h - y).pow(2).mean((1, 2))
        elif fam == "conv":
            loss = self._conv_losses(p, x, y)
        elif fam == "lm":
            loss = self._lm_losses(p, x, y)
        else:
            d = p["x"] - self.centre - x  # a noisy target: E[loss] = true loss + a noise floor
            loss = 0.5 * (self.curv * d * d).sum(1)
        return loss * self.loss_scales

    def _conv_losses(self, p, x, y) -> Tensor:
        # 3x3 convolutions as im2col + one batched matmul over members: grouped convolutions
        # with a group per member are several times slower on CPU
        M, B = x.shape[:2]
        act = _ACTS[self.c["act"]]
        h = x.reshape(M * B, *x.shape[2:])
        for i in range(len(self.c["channels"])):
            w = p[f"conv{i}"]  # (M, Cout, Cin, 3, 3)
            stride = 2 if i == 0 else 1  # 14x14 -> 7x7 first: im2col of full-size maps is costly
            side = (h.shape[-1] - 1) // stride + 1
            cols = F.unfold(h, 3, padding=1, stride=stride)  # (M*B, Cin*9, L)
            L = cols.shape[-1]
            cols = cols.view(M, B, -1, L).transpose(2, 3).reshape(M, B * L, -1)
            out = torch.baddbmm(p[f"cb{i}"].unsqueeze(1), cols, w.flatten(2).transpose(1, 2))  # (M, B*L, Cout)
            if self.c["batch_norm"]:
                mean = out.mean(1, keepdim=True)
                var = out.var(1, unbiased=False, keepdim=True)
                out = (out - mean) * torch.rsqrt(var + 1e-5) * p[f"bn{i}_g"].unsqueeze(1) + p[f"bn{i}_b"].unsqueeze(1)
            h = act(out).view(M, B, side, side, -1).permute(0, 1, 4, 2, 3).reshape(M * B, -1, side, side)
        feats = h.mean((2, 3)).view(M, B, -1)  # (M, B, C)
        logits = torch.baddbmm(p["fcb"].unsqueeze(1), feats, p["fc"])
        return F.cross_entropy(logits.reshape(-1, 10), y.reshape(-1), reduction="none").view(M, -1).mean(1)

    def _lm_losses(self, p, x, y) -> Tensor:
        M, B, T = x.shape
        d = self.c["d"]
        h = p["emb"][torch.arange(M)[:, None, None], x] + p["pos"][:, None, :T]  # (M, B, T, d)
        z = F.layer_norm(h, (d,)) * p["ln_g"][:, None, None] + p["ln_b"][:, None, None]
        zf = z.reshape(M, B * T, d)
        q, k, v = (torch.bmm(zf, p[n]).view(M * B, T, d) for n in ("wq", "wk", "wv"))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True).reshape(M, B * T, d)
        h = h + torch.bmm(att, p["wo"]).view(M, B, T, d)
        hf = h.reshape(M, B * T, d)
        ff = torch.baddbmm(p["b2"].unsqueeze(1), F.gelu(torch.baddbmm(p["b1"].unsqueeze(1), hf, p["w1"])), p["w2"])
        logits = torch.bmm(hf + ff, p["head"])
        V = self.c["vocab"]
        return F.cross_entropy(logits.reshape(-1, V), y.reshape(-1), reduction="none").view(M, -1).mean(1)


def build_task(spec: TaskSpec, instances: int, members_per_instance: int, *, seed: int,
               images: ImageData | None = None, **kwargs) -> BatchedTask:
    """A :class:`BatchedTask` of ``spec`` (see its arguments)."""
    if spec.family not in FAMILIES:
        raise ValueError(f"unknown task family {spec.family!r}; known: {FAMILIES}")
    return BatchedTask(spec, instances, members_per_instance, seed=seed, images=images, **kwargs)
