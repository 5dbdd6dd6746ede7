"""Meta-training by antithetic evolution strategies over a vectorised task population.

Each *generation* draws one task from the families (:mod:`.families`), ``instances`` fresh
inits of it, a horizon, and ``pairs`` random directions ``eps_p`` in the net's 132-dimensional
parameter space. Every instance is trained by ``2 * pairs + 1`` members at once: the current
rule and ``theta +- sigma * eps_p`` (common random numbers: a pair shares the init, the
minibatches and the scale augmentation, so their difference measures the rule alone). Only
forward runs are needed, so the update is the optimizer's own fused kernel, horizons can be
thousands of steps, and the objective (:func:`~.population.fitness`, the horizon-weighted
log of the loss relative to its start) need not be differentiable.

Perturbations and steps are taken in *relative* coordinates ``z = theta / s``, where ``s`` is
each element's starting magnitude (:func:`~.trajectory.meta_lr_scales`): the starting rule
spans input gains of 10..1e4 and output weights of 1e-4, and one absolute step size cannot
suit both.

The gradient estimate of ``E[fitness]`` with respect to ``z`` is

    g = 1 / (2 sigma P) * sum_p mean_i (F_ip+ - F_ip-) / scale_i * eps_p

where ``scale_i`` is the spread of instance i's fitness values (fitness shaping: an easy and
a hard task contribute on the same footing). Adam takes the step. Every generation is
seeded from ``(seed, generation)``, and the checkpoint holds ``z``, Adam's state and the
generation, so a stopped run resumes to the same weights.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor

from ..hub import resolve_net
from ..nets import SimpleOptimizerNet
from ..weights import save_weights
from .es_config import ESConfig, draw_generation
from .families import IMAGE_FAMILIES, VARIANTS, ImageData, build_task
from .init_rules import INITS, init_net
from .population import OBJECTIVES, diverged, flatten, load_flat, run_population
from .population_bptt import bptt_generation
from .trajectory import meta_lr_scales

__all__ = ["ESConfig", "es_generation", "meta_train_es", "net_from_checkpoint", "project_recurrent_norm", "main"]

def project_recurrent_norm(theta: Tensor, max_norm: float, hidden_size: int = 10) -> Tensor:
    """``theta`` (one flat parameter vector) with ``W_hh`` scaled so that its spectral norm is
    at most ``max_norm``; unchanged where it already is.

    Args:
        theta: the net's parameters in :func:`~.population.flatten` order.
        max_norm: the largest singular value allowed.
        hidden_size: the net's hidden units.

    Returns:
        A new vector.

    Example:
        >>> theta = flatten(SimpleOptimizerNet())
        >>> H = 10
        >>> theta[H:H + H * H] = 2 * torch.eye(H).reshape(-1)
        >>> out = project_recurrent_norm(theta, 0.9)
        >>> round(torch.linalg.matrix_norm(out[H:H + H * H].view(H, H), 2).item(), 4)
        0.9
    """
    H = hidden_size
    out = theta.clone()
    w_hh = out[H : H + H * H].view(H, H)
    norm = torch.linalg.matrix_norm(w_hh.double(), 2).item()
    if norm > max_norm:
        w_hh.mul_(max_norm / norm)
    return out


def es_generation(theta: Tensor, scales: Tensor, cfg: ESConfig, generation: int,
                  images: ImageData | None) -> tuple[Tensor, dict]:
    """One generation: the gradient estimate in relative coordinates and a log entry."""
    seed, spec, horizon = draw_generation(cfg, generation)
    P, K = cfg.pairs, cfg.instances
    gen = torch.Generator().manual_seed(seed)
    eps = torch.randn(P, theta.numel(), generator=gen)
    # members of one instance: [centre, +eps_1, -eps_1, +eps_2, -eps_2, ...]
    signs = torch.tensor([0.0] + [1.0, -1.0] * P)
    dirs = torch.cat([torch.zeros(1, theta.numel()), eps.repeat_interleave(2, 0)])
    members = theta + (cfg.sigma * signs[:, None] * dirs) * scales
    task = build_task(spec, K, 2 * P + 1, seed=seed, images=images,
                      scale_range=cfg.scale_range, scaled_fraction=cfg.scaled_fraction)
    t0 = time.perf_counter()
    losses = run_population(task, members.repeat(K, 1), horizon, input_norm=cfg.input_norm,
                            averaging=cfg.averaging)
    seconds = time.perf_counter() - t0
    fit = OBJECTIVES[cfg.objective](losses).view(K, 2 * P + 1)
    div = diverged(losses).view(K, 2 * P + 1)
    diff = fit[:, 1::2] - fit[:, 2::2]  # (K, P): F+ - F-
    spread = fit.std(1, keepdim=True).clamp_min(1e-8)
    grad = ((diff / spread).mean(0) @ eps) / (2 * cfg.sigma * P)
    entry = {
        "generation": generation,
        "family": spec.family,
        "config": spec.config,
        "horizon": horizon,
        "fitness_centre": fit[:, 0].mean().item(),
        "fitness_perturbed": fit[:, 1:].mean().item(),
        "diverged_centre": int(div[:, 0].sum()),
        "diverged_perturbed": int(div[:, 1:].sum()),
        "final_over_initial": (losses[-1, ::2 * P + 1] / losses[0, ::2 * P + 1]).tolist(),
        "optimizee_steps": losses.shape[1] * horizon,
        "seconds": round(seconds, 2),
    }
    return grad, entry


def meta_train_es(
    out_dir: str | Path,
    *,
    init: str | Path | SimpleOptimizerNet = "simple-raw",
    config: ESConfig | None = None,
    images: ImageData | None = None,
    until: int | None = None,
    time_budget: float | None = None,
    progress: bool = True,
    engine: str = "es",
    init_lr: float = 1e-3,
    snapshot_every: int = 0,
) -> SimpleOptimizerNet:
    """Run (or resume) ES meta-training in ``out_dir``; returns the current net.

    Args:
        out_dir: holds ``config.json``, ``log.jsonl`` (one line per generation),
            ``checkpoint.pt`` (written after every generation) and ``weights.safetensors``.
        init: the starting weights (anything :func:`~l2l_optim.weights.resolve_net` takes), or
            the name of an init rule (:data:`~.init_rules.INITS`, e.g. ``"adam"``) applied to a
            fresh ``SimpleOptimizerNet(input_norm=config.input_norm)``. Its ``input_norm``
            must be the configuration's (the default ``"simple-raw"`` is a raw-gradient rule,
            as ``ESConfig()`` is; the shipped ``"simple"`` goes with ``input_norm="rms"``).
        config: the settings (ignored when resuming: the checkpoint's are used, and a
            different config raises).
        images: image data for the image families (None: those families are skipped).
        until: stop after this generation (default: ``config.generations``).
        time_budget: stop after the first generation that ends past this many seconds.
        progress: print one line per generation.
        init_lr: the step size of an init rule named by ``init`` (unused for weights).
        snapshot_every: also save the rule every this many generations, as
            ``snapshots/genNNNNN.safetensors`` (0: never).
        engine: ``"es"`` (this module's estimator) or ``"bptt"``
            (:func:`~.population_bptt.bptt_generation`: the same generations, the same
            objective, a truncated-BPTT gradient), for comparing the two on one budget.

    Returns:
        The net after the last generation run (also saved as ``weights.safetensors``).

    Raises:
        ValueError: an invalid configuration or ``engine``, or a checkpoint written with
            another configuration.

    Example:
        The shipped default's run (``weights/README.md`` has its recipe):

        >>> meta_train_es("runs/simple-es", init="simple-v0", until=53)  # doctest: +SKIP

        Two generations on the noisy-quadratic family alone (no data files needed):

        >>> import tempfile
        >>> cfg = ESConfig(families=("quadratic",), instances=1, pairs=1, horizons=(20,),
        ...                generations=2)
        >>> with tempfile.TemporaryDirectory() as out:
        ...     net = meta_train_es(out, config=cfg, progress=False)
        ...     print(sorted(p.name for p in Path(out).iterdir()))
        ['checkpoint.pt', 'config.json', 'log.jsonl', 'weights.safetensors']
        >>> net.num_parameters()
        132
    """

    cfg = config or ESConfig()
    if images is None or not images.available:
        cfg.families = tuple(f for f in cfg.families if VARIANTS.get(f, f) not in IMAGE_FAMILIES)
    cfg.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.pt"
    if engine not in ("es", "bptt"):
        raise ValueError(f"Invalid engine: {engine!r}; expected 'es' or 'bptt'")
    cfg_json = json.loads(json.dumps(asdict(cfg))) | {"engine": engine}
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, weights_only=False)
        # a resumed run may ask for more generations; nothing else may change
        # (a checkpoint without an objective key was written with the weighted objective)
        if {"engine": "es", "objective": "weighted", "max_recurrent_norm": None, "input_norm": None,
                "averaging": 0.0, **ckpt["config"], "generations": cfg.generations} != cfg_json:
            raise ValueError(f"{ckpt_path} was written with another configuration: {ckpt['config']}")
        net = SimpleOptimizerNet(input_norm=cfg.input_norm, averaging=cfg.averaging)
        z0, scales, start = ckpt["z"], ckpt["scales"], ckpt["next_generation"]
        adam_state = ckpt["adam"]
    else:
        if isinstance(init, str) and init in INITS:
            net = init_net(SimpleOptimizerNet(input_norm=cfg.input_norm, averaging=cfg.averaging), init,
                           lr=init_lr)
        else:
            net, _ = resolve_net(init, arch="simple")
        if net.input_norm != cfg.input_norm:
            raise ValueError(f"the starting weights have input_norm={net.input_norm!r}, the "
                             f"configuration {cfg.input_norm!r}")
        if net.averaging != cfg.averaging:
            raise ValueError(f"the starting weights have averaging={net.averaging!r}, the "
                             f"configuration {cfg.averaging!r}")
        scales = torch.cat([s.reshape(-1) for s in meta_lr_scales(net).values()])
        theta0 = flatten(net)
        if cfg.max_recurrent_norm is not None:
            theta0 = project_recurrent_norm(theta0, cfg.max_recurrent_norm, net.hidden_size)
        z0 = theta0 / scales
        start, adam_state = 0, None
        (out / "config.json").write_text(json.dumps(cfg_json, indent=2) + "\n")
        if snapshot_every:
            # generation 0, the starting rule: the validation trend's reference point
            (out / "snapshots").mkdir(exist_ok=True)
            save_weights(load_flat(SimpleOptimizerNet(input_norm=cfg.input_norm, averaging=cfg.averaging),
                                   z0 * scales).eval(), out / "snapshots" / "gen00000.safetensors",
                         metadata={"es_config": cfg_json, "generations": 0})
    # z is the state (theta = z * scales does not round-trip exactly through theta / scales)
    z = z0.clone().requires_grad_()
    adam = torch.optim.Adam([z], lr=cfg.meta_lr)
    if adam_state is not None:
        adam.load_state_dict(adam_state)
    t_start = time.perf_counter()
    last = min(cfg.generations, until if until is not None else cfg.generations)
    for g in range(start, last):
        if engine == "es":
            grad, entry = es_generation((z * scales).detach(), scales, cfg, g, images)
        else:
            grad, entry = bptt_generation(z.detach(), scales, cfg, g, images)
        adam.zero_grad()
        # Adam minimises: the fitness is a loss, so its estimated gradient is the gradient
        z.grad = grad.clone()
        adam.step()
        if cfg.max_recurrent_norm is not None:
            with torch.no_grad():
                z.copy_(project_recurrent_norm(z * scales, cfg.max_recurrent_norm, net.hidden_size) / scales)
        entry["z_step_norm"] = round(float(grad.norm()), 4)
        with open(out / "log.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")
        state = {"config": cfg_json, "z": z.detach().clone(), "scales": scales,
                 "adam": adam.state_dict(), "next_generation": g + 1}
        torch.save(state, ckpt_path.with_suffix(".tmp"))
        ckpt_path.with_suffix(".tmp").replace(ckpt_path)
        if snapshot_every and (g + 1) % snapshot_every == 0:
            # the rule at this generation, for tracking the validation score along the run
            snap = SimpleOptimizerNet(input_norm=cfg.input_norm, averaging=cfg.averaging)
            load_flat(snap, (z * scales).detach())
            (out / "snapshots").mkdir(exist_ok=True)
            save_weights(snap.eval(), out / "snapshots" / f"gen{g + 1:05d}.safetensors",
                         metadata={"es_config": cfg_json, "generations": g + 1})
        if progress:
            fit = entry.get("fitness_centre", entry.get("fitness"))
            print(f"gen {g:5d} {entry['family']:11s} T={entry['horizon']:5d} fit {fit:+.4f} "
                  f"{entry['seconds']:.1f}s", flush=True)
        if time_budget is not None and time.perf_counter() - t_start > time_budget:
            break
    load_flat(net, (z * scales).detach())
    net.eval()
    save_weights(net, out / "weights.safetensors",
                 metadata={"es_config": cfg_json, "generations": int(torch.load(ckpt_path, weights_only=False)["next_generation"])
                           if ckpt_path.exists() else 0})
    return net


def net_from_checkpoint(path: str | Path) -> tuple[SimpleOptimizerNet, dict]:
    """The rule an ES checkpoint holds, and ``{"generation", "config"}`` for its metadata."""
    ckpt = torch.load(path, weights_only=False)
    net = SimpleOptimizerNet(input_norm=ckpt["config"].get("input_norm"),
                             averaging=ckpt["config"].get("averaging", 0.0))
    net = load_flat(net, (ckpt["z"] * ckpt["scales"]).detach())
    net.eval()
    return net, {"generation": int(ckpt["next_generation"]), "config": ckpt["config"]}


def main(argv: list[str] | None = None) -> int:
    """``l2l-optim meta-es``: run or resume ES meta-training in ``--out-dir``.

    Args:
        argv: the arguments after the command name (default: ``sys.argv[1:]``).

    Returns:
        0; the weights are in ``<out-dir>/weights.safetensors``.
    """
    # the parser is built without torch (l2l_optim.cli_args), so that --help answers at once
    from ..cli_args import meta_es_parser

    p = meta_es_parser()
    args = p.parse_args(argv)
    from ..data import load_dataset

    torch.set_num_threads(args.threads)
    cfg = ESConfig(families=tuple(args.families), instances=args.instances, pairs=args.pairs,
                   horizons=tuple(args.horizons), sigma=args.sigma, meta_lr=args.meta_lr,
                   generations=args.generations, scaled_fraction=args.scaled_fraction,
                   scale_range=tuple(args.scale_range),
                   slow_horizon=args.slow_horizon, seed=args.seed, objective=args.objective,
                   max_recurrent_norm=args.max_recurrent_norm, input_norm=args.input_norm,
                   averaging=args.averaging)
    images = ImageData(lambda name: load_dataset(name, "train", root=args.data_root))
    meta_train_es(args.out_dir, init=args.init, config=cfg, images=images, until=args.until,
                  time_budget=args.time_budget, engine=args.engine, init_lr=args.init_lr,
                  snapshot_every=args.snapshot_every)
    command = "python -m l2l_optim meta-es " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    print(f"wrote {Path(args.out_dir) / 'weights.safetensors'} ({command})")
    return 0
