"""meta_fit: meta-train a coordinate-wise optimizer net with truncated BPTT.

Trajectory after trajectory (:func:`~l2l_optim.meta.trajectory.run_trajectory`), each on a
fresh optimizee init, with optional periodic evaluation on a held-out init that keeps the best
net. Everything is seeded, logged (``log.jsonl``) and checkpointed after every trajectory, so
a run that is stopped resumes where it was and ends with the same weights.
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..nets import CoordinatewiseNet
from .init_rules import INITS, init_net
from ..registry import build_net, get_architecture
from ..tasks import Task, make_task
from .losses import check_meta_loss
from ..training import tail_mean
from .trajectory import meta_lr_scales, run_trajectory

__all__ = ["MetaFitConfig", "MetaFitResult", "meta_fit", "build_parser", "main"]


@dataclass
class MetaFitConfig:
    """Settings of meta-training (every field is recorded in the weight file).

    The names are shared with :func:`~l2l_optim.finetuning.finetune` and the command line
    (``--meta-loss``, ``--unroll``, ...).

    Args:
        arch: ``"simple"``, ``"dm"`` or ``"rnnprop"`` (:mod:`l2l_optim.registry`); taken from
            the net when a net is passed to :func:`meta_fit`.
        net_config: constructor arguments of the net (e.g. ``{"bias": True}``).
        task: registered task name (``l2l_optim.tasks.TASKS``).
        meta_loss: ``"weighted"``, ``"uniform"`` or ``"last"`` (:mod:`l2l_optim.meta.losses`).
        trajectories: number of optimizee trajectories (fresh inits) to meta-train on.
        steps: optimizee steps per trajectory (T).
        unroll: optimizee steps per truncated-BPTT unroll.
        meta_lr: Adam learning rate on the net's parameters.
        relative_meta_lr: scale each element's meta step by its initial magnitude
            (:func:`~l2l_optim.meta.trajectory.meta_lr_scales`); needed for the ``"sign"``
            init, a no-op for the LSTMs.
        grad_clip: max norm of the meta-gradient (None: no clipping). Guards the rare
            exploding unroll; Adam's own normalisation does the rest.
        init: the starting point (:func:`~l2l_optim.meta.init_rules.init_net`): ``"default"``,
            ``"sign"``, ``"sgd"`` or ``"small-output"``; None means the architecture's own
            default (``"sign"`` for simple, ``"small-output"`` for the LSTM nets).
        init_lr: the step size of the ``"sign"`` and ``"sgd"`` inits.
        batch_size: optimizee minibatch size.
        seed: seeds the net's init and every trajectory's optimizee init and batches.
        eval_every: every this many trajectories, run the net for ``eval_steps`` on a fixed
            held-out init and keep the best net by the mean loss of the last 10% of steps
            (0: keep the last net).
        eval_steps: length of that evaluation run.
    """

    arch: str = "simple"
    net_config: dict = field(default_factory=dict)
    task: str = "mnist-mlp"
    meta_loss: str = "weighted"
    trajectories: int = 20
    steps: int = 200
    unroll: int = 20
    meta_lr: float = 1e-3
    relative_meta_lr: bool = True
    grad_clip: float | None = 1.0
    init: str | None = None
    init_lr: float = 1e-3
    batch_size: int = 128
    seed: int = 0
    eval_every: int = 0
    eval_steps: int = 1000

    def validate(self) -> None:
        """Raises ValueError on the first invalid field."""
        get_architecture(self.arch)
        check_meta_loss(self.meta_loss)
        if self.steps <= 0 or self.unroll <= 0 or self.steps % self.unroll:
            raise ValueError(f"steps ({self.steps}) must be a positive multiple of unroll ({self.unroll})")
        if self.trajectories < 0:
            raise ValueError(f"Invalid number of trajectories: {self.trajectories}")
        if not self.meta_lr > 0:
            raise ValueError(f"Invalid meta learning rate: {self.meta_lr}")
        if self.init is not None and self.init not in INITS:
            raise ValueError(f"Invalid init: {self.init!r}; expected one of {INITS}")


@dataclass
class MetaFitResult:
    """What :func:`meta_fit` returns.

    Attributes:
        net: the selected net (best by evaluation if ``eval_every`` > 0, else the last).
        log: one dict per trajectory (meta-loss, final optimizee loss, seconds, ...).
        weights_path: the saved ``weights.safetensors`` (None without ``out_dir``).
    """

    net: CoordinatewiseNet
    log: list[dict]
    weights_path: Path | None = None


def meta_fit(
    net: CoordinatewiseNet | str | None = None,
    task: Task | str | None = None,
    *,
    config: MetaFitConfig | None = None,
    out_dir: str | Path | None = None,
    resume: bool = True,
    progress: bool = True,
    command: str | None = None,
    data_root: str | None = None,
    **overrides,
) -> MetaFitResult:
    """Meta-train an optimizer net with truncated BPTT.

    Args:
        net: a net to continue training (copied; yours is not modified), an architecture
            name, or None for ``config.arch``.
        task: a :class:`~l2l_optim.tasks.Task`, a registered task name, or None for
            ``config.task``.
        config: a :class:`MetaFitConfig` (default: its defaults); keyword ``overrides``
            replace its fields, and ``net``/``task`` given here replace ``arch``/``task``.
        out_dir: where ``log.jsonl``, ``checkpoint.pt``, ``config.json`` and the final
            ``weights.safetensors`` go. ``None`` keeps everything in memory.
        resume: continue from ``out_dir/checkpoint.pt`` if present (same config required).
        progress: show a tqdm progress bar.
        command: the command line recorded in the weight file's metadata.
        data_root: where to look for the dataset first.

    Returns:
        A :class:`MetaFitResult`.

    Raises:
        ValueError: bad configuration, or a checkpoint from another configuration.
        TypeError: a keyword that is not a :class:`MetaFitConfig` field.
        DatasetNotFoundError: a registered task whose dataset is not available locally.

    Example:
        The paper's recipe on its task (MNIST from local files; minutes per trajectory):

        >>> result = meta_fit("simple", "mnist-mlp", trajectories=20, out_dir="runs/mine")  # doctest: +SKIP

        Any model and data make a task; here a toy one, two short trajectories:

        >>> import torch
        >>> from l2l_optim import SimpleOptimizer
        >>> from l2l_optim.tasks import task_from_model
        >>> _ = torch.manual_seed(0)
        >>> x = torch.randn(256, 8)
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
        >>> task = task_from_model(model, (x, (x[:, 0] > 0).long()), batch_size=32)
        >>> result = meta_fit("simple", task, trajectories=2, steps=10, unroll=5, progress=False)
        >>> len(result.log), result.net.num_parameters(), result.weights_path
        (2, 132, None)
        >>> opt = SimpleOptimizer(model.parameters(), weights=result)
    """
    cfg = copy.deepcopy(config) if config is not None else MetaFitConfig()
    for k, v in overrides.items():
        if not hasattr(cfg, k):
            raise TypeError(f"meta_fit() got an unexpected keyword argument {k!r}")
        setattr(cfg, k, v)
    if isinstance(net, CoordinatewiseNet):
        net = copy.deepcopy(net)
        cfg.arch, cfg.net_config = net.arch, net.config
    elif net is not None:
        cfg.arch = net
    if cfg.init is None:
        cfg.init = get_architecture(cfg.arch).default_init
    cfg.validate()
    if isinstance(task, Task):
        cfg.task = task.name
    else:
        if task is not None:
            cfg.task = task
        task = make_task(cfg.task, root=data_root, batch_size=cfg.batch_size)

    if not isinstance(net, CoordinatewiseNet):
        # the net's own init draws from the global RNG: seed a fork of it, not the user's
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            net = init_net(build_net(cfg.arch, cfg.net_config), cfg.init, lr=cfg.init_lr)
    net.train()
    meta_opt = torch.optim.Adam(net.parameters(), lr=cfg.meta_lr)
    lr_scales = meta_lr_scales(net) if cfg.relative_meta_lr else None
    log: list[dict] = []
    best = {"score": float("inf"), "state": copy.deepcopy(net.state_dict()), "trajectory": -1}
    start = 0

    out = Path(out_dir) if out_dir is not None else None
    ckpt_path = out / "checkpoint.pt" if out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
        cfg_json = json.dumps(asdict(cfg), sort_keys=True)
        if resume and ckpt_path.exists():
            ckpt = torch.load(ckpt_path, weights_only=False)
            if ckpt["config"] != json.loads(cfg_json) | {"trajectories": ckpt["config"]["trajectories"]}:
                raise ValueError(f"{ckpt_path} was written with another configuration: {ckpt['config']}")
            net.load_state_dict(ckpt["net"])
            meta_opt.load_state_dict(ckpt["meta_opt"])
            log, best, start = ckpt["log"], ckpt["best"], ckpt["next_trajectory"]
            lr_scales = ckpt.get("lr_scales", lr_scales)
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2, sort_keys=True) + "\n")

    from tqdm.auto import tqdm

    bar = tqdm(range(start, cfg.trajectories), desc=f"meta-fit {cfg.arch}/{cfg.meta_loss}", disable=not progress,
               initial=start, total=cfg.trajectories)
    # held-out evaluation init: a seed no training trajectory uses
    eval_seed = 10_000_019 + cfg.seed
    if cfg.eval_every and start == 0:
        ev = run_trajectory(net, task, seed=eval_seed, steps=cfg.eval_steps, meta_loss=cfg.meta_loss)
        entry = {"trajectory": -1, "eval_loss": tail_mean(ev["losses"]) if not ev["diverged"] else float("inf"),
                 "note": "the initialisation, before meta-training (not selectable)"}
        log.append(entry)
        if out:
            with open(out / "log.jsonl", "a") as f:
                f.write(json.dumps(entry) + "\n")
    for k in bar:
        t0 = time.perf_counter()
        r = run_trajectory(net, task, seed=cfg.seed * 1_000_003 + k, steps=cfg.steps, unroll=cfg.unroll,
                           meta_loss=cfg.meta_loss, meta_opt=meta_opt, grad_clip=cfg.grad_clip, lr_scales=lr_scales)
        entry = {
            "trajectory": k,
            "meta_loss": r["meta_loss"],
            "final_loss": tail_mean(r["losses"]),
            "first_loss": r["losses"][0] if r["losses"] else float("nan"),
            "diverged": r["diverged"],
            "seconds": round(time.perf_counter() - t0, 2),
        }
        if cfg.eval_every and ((k + 1) % cfg.eval_every == 0 or k + 1 == cfg.trajectories):
            ev = run_trajectory(net, task, seed=eval_seed, steps=cfg.eval_steps, meta_loss=cfg.meta_loss)
            score = tail_mean(ev["losses"]) if not ev["diverged"] else float("inf")
            entry["eval_loss"] = score
            if score < best["score"]:
                best = {"score": score, "state": copy.deepcopy(net.state_dict()), "trajectory": k}
        log.append(entry)
        bar.set_postfix(final=f"{entry['final_loss']:.4f}", meta=f"{entry['meta_loss']:.4f}")
        if out:
            with open(out / "log.jsonl", "a") as f:
                f.write(json.dumps(entry) + "\n")
            torch.save({"config": json.loads(cfg_json), "net": net.state_dict(), "meta_opt": meta_opt.state_dict(),
                        "log": log, "best": best, "next_trajectory": k + 1, "lr_scales": lr_scales}, ckpt_path.with_suffix(".tmp"))
            ckpt_path.with_suffix(".tmp").replace(ckpt_path)

    if cfg.eval_every and best["trajectory"] >= 0:
        net.load_state_dict(best["state"])
    net.eval()
    weights_path = None
    if out:
        from ..weights import save_weights

        final = [e["final_loss"] for e in log[-5:] if "final_loss" in e]
        meta = {
            "recipe": asdict(cfg),
            "command": command or "",
            "seed": cfg.seed,
            "final_meta_loss": log[-1].get("meta_loss") if log else None,
            "init_eval_loss": next((e["eval_loss"] for e in log if e["trajectory"] == -1), None),
            "final_optimizee_loss_last5": sum(final) / len(final) if final else None,
            "selected_trajectory": best["trajectory"] if cfg.eval_every else (len(log) - 1),
            "selected_eval_loss": best["score"] if cfg.eval_every else None,
        }
        weights_path = save_weights(net, out / "weights.safetensors", metadata=meta)
    return MetaFitResult(net=net, log=log, weights_path=weights_path)


def build_parser() -> argparse.ArgumentParser:
    """The ``l2l-optim meta-fit`` argument parser (every option has a help text); built in
    :mod:`l2l_optim.cli_args`, without torch, so that ``--help`` answers at once."""
    from ..cli_args import meta_fit_parser

    return meta_fit_parser()


def main(argv: list[str] | None = None) -> int:
    """``l2l-optim meta-fit``: meta-train and write the weights to ``--out-dir``.

    Args:
        argv: the arguments after the command name (default: ``sys.argv[1:]``).

    Returns:
        0 on success (argparse exits with 2 on bad arguments).
    """
    p = build_parser()
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    net_config = {}
    if args.arch == "simple":
        net_config = {"bias": args.bias, "aggregate": not args.no_aggregate}
    cfg = MetaFitConfig(
        arch=args.arch, net_config=net_config, task=args.task, meta_loss=args.meta_loss, trajectories=args.trajectories,
        steps=args.steps, unroll=args.unroll, meta_lr=args.meta_lr,
        relative_meta_lr=not args.absolute_meta_lr, grad_clip=args.grad_clip,
        init=args.init, init_lr=args.init_lr,
        batch_size=args.batch_size, seed=args.seed, eval_every=args.eval_every, eval_steps=args.eval_steps,
    )
    command = "l2l-optim meta-fit " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    result = meta_fit(config=cfg, out_dir=args.out_dir, resume=not args.no_resume,
                      command=command, data_root=args.data_root)
    print(f"wrote {result.weights_path}")
    return 0
