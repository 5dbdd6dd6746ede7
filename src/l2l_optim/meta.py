"""meta_fit: meta-train a coordinate-wise optimizer net with truncated BPTT.

One *trajectory* trains a freshly initialised optimizee for ``steps`` steps with the net as
its optimizer. The trajectory is cut into unrolls of ``unroll`` steps (truncated BPTT): after
each unroll the meta-loss of that unroll is back-propagated into the net and one Adam step is
taken on the net's parameters; optimizee parameters and net state carry over, detached.

The optimizee's gradient g_t is fed to the net as a constant (first order, as Andrychowicz et
al. 2016): the meta-gradient flows through theta_t = theta_{t-1} + u_{t-1} and the net's
hidden state, not through the Hessian.

Meta-losses (``loss=``), with f_t the optimizee's minibatch loss at theta_t and t the step
index in the whole trajectory (1..T):

* ``"weighted"`` (the paper's): sum_t w_t (f_t - f_{t-1}) with w_t = (t/T)^2. Minimising it
  maximises the weighted *decrease* f_{t-1} - f_t, with later steps weighing more. Each term
  is the decrease made by step t from where it started, so f_{t-1} enters it as a constant.
  Why: differentiated literally, the sum telescopes to w_T f_T - sum_t (w_{t+1} - w_t) f_t,
  which *rewards* high losses at every intermediate step (the coefficients are negative); an
  optimizer that climbs early and descends late scores well. The value we log is the same.
* ``"uniform"`` (Andrychowicz et al.): sum_t f_t.
* ``"last"`` (Lv et al.): f at the last step of each unroll.

f_t is evaluated on the minibatch of step t, and that one forward/backward pass gives both
the meta-loss term and (detached) the gradient g_t the net sees next.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from .nets import INITS, CoordinatewiseNet, SimpleOptimizerNet, init_net
from .registry import build_net
from .tasks import Task, make_task
from .training import tail_mean

__all__ = ["MetaFitConfig", "MetaFitResult", "meta_fit", "meta_loss_weights", "meta_lr_scales", "run_trajectory", "tail_mean", "main"]

META_LOSSES = ("weighted", "uniform", "last")


@dataclass
class MetaFitConfig:
    """Hyperparameters of meta-training (every field is recorded in the weight file).

    Args:
        arch: ``"simple"``, ``"dm"`` or ``"rnnprop"`` (ignored if a net is passed in).
        net_config: constructor arguments of the net (e.g. ``{"bias": True}``).
        task: registered task name (``l2l_optim.tasks.TASKS``).
        loss: ``"weighted"``, ``"uniform"`` or ``"last"``.
        trajectories: number of optimizee trajectories (fresh inits) to meta-train on.
        steps: optimizee steps per trajectory (T).
        unroll: steps per truncated-BPTT unroll.
        meta_lr: Adam learning rate on the net's parameters.
        relative_meta_lr: scale each element's meta step by its initial magnitude
            (:func:`meta_lr_scales`); needed for the ``"sign"`` init, a no-op for the LSTMs.
        grad_clip: max norm of the meta-gradient (None: no clipping). Guards the rare
            exploding unroll; Adam's own normalisation does the rest.
        init: ``"default"`` (the net's own init), ``"sign"`` (SimpleOptimizerNet only: start
            as a soft sign-momentum rule with step ``init_lr``; see
            :func:`init_simple_sign_momentum`), ``"sgd"`` (SimpleOptimizerNet only: start as
            SGD with momentum, lr ``init_lr``; see :func:`init_simple_sgd_like`) or
            ``"small-output"`` (the LSTM nets: output layer scaled by 0.01, bias zero, so the
            first updates are ~1e-3 per coordinate instead of ~0.05, which blows up a
            397k-parameter MLP in a few steps).
        init_lr: the effective learning rate of the ``"sgd"`` init.
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
    loss: str = "weighted"
    trajectories: int = 20
    steps: int = 200
    unroll: int = 20
    meta_lr: float = 1e-3
    relative_meta_lr: bool = True
    grad_clip: float | None = 1.0
    init: str = "sign"
    init_lr: float = 1e-3
    batch_size: int = 128
    seed: int = 0
    eval_every: int = 0
    eval_steps: int = 1000

    def validate(self) -> None:
        if self.loss not in META_LOSSES:
            raise ValueError(f"Invalid meta-loss: {self.loss!r}; expected one of {META_LOSSES}")
        if self.steps <= 0 or self.unroll <= 0 or self.steps % self.unroll:
            raise ValueError(f"steps ({self.steps}) must be a positive multiple of unroll ({self.unroll})")
        if self.trajectories < 0:
            raise ValueError(f"Invalid number of trajectories: {self.trajectories}")
        if not self.meta_lr > 0:
            raise ValueError(f"Invalid meta learning rate: {self.meta_lr}")
        if self.init not in INITS:
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


def meta_loss_weights(loss: str, steps: int) -> Tensor:
    """The per-step weights w_1..w_T of a meta-loss (for "weighted": (t/T)^2)."""
    t = torch.arange(1, steps + 1, dtype=torch.float64)
    if loss == "weighted":
        return (t / steps) ** 2
    return torch.ones(steps, dtype=torch.float64)


def meta_lr_scales(net: CoordinatewiseNet) -> dict[str, Tensor]:
    """Per-element multipliers of the meta learning rate (Adam's step on element i is ~lr * s_i).

    SimpleOptimizerNet's parameters live on very different scales once initialised as a sign
    rule: input gains 10..1e4, output weights ~1e-4. One absolute Adam step of 1e-3 would move
    the output weights by ten times their size and blow up the optimizee in a single unroll
    (seen here). Scaling each element's step by its own magnitude (with a floor for entries
    that start at zero) makes every step a similar *relative* change. The LSTM nets start on
    the scale of PyTorch's default init and keep plain Adam (all ones).
    """
    ones = {k: torch.ones_like(v) for k, v in net.named_parameters()}
    if not isinstance(net, SimpleOptimizerNet):
        return ones
    H = net.hidden_size
    with torch.no_grad():
        rms = lambda t: t.pow(2).mean().sqrt()  # noqa: E731
        out_scale = rms(net.w_out[:H]).clamp_min(1e-12)
        scales = dict(ones)
        scales["w_ih"] = net.w_ih.abs().clamp_min(rms(net.w_ih) * 1e-3 + 1e-12)
        scales["w_hh"] = net.w_hh.abs().clamp_min(0.1 * rms(net.w_hh) + 1e-12)
        scales["w_out"] = net.w_out.abs().clamp_min(out_scale)
        if net.bias:
            scales["b_out"] = out_scale.expand_as(net.b_out).clone()
    return scales


def _scaled_step(meta_opt: torch.optim.Optimizer, params: dict[str, Tensor], scales: dict[str, Tensor]) -> None:
    # Adam's moments depend on the gradients only, so scaling the step it takes afterwards
    # is exactly Adam with a per-element learning rate.
    before = {k: p.detach().clone() for k, p in params.items()}
    meta_opt.step()
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(before[k] + (p - before[k]) * scales[k])


def _flat(tensors) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _split_like(flat: Tensor, params: dict[str, Tensor]) -> dict[str, Tensor]:
    out, i = {}, 0
    for k, p in params.items():
        out[k] = flat[i : i + p.numel()].view_as(p)
        i += p.numel()
    return out


def run_trajectory(
    net: CoordinatewiseNet,
    task: Task,
    *,
    seed: int,
    steps: int,
    unroll: int | None = None,
    loss: str = "weighted",
    meta_opt: torch.optim.Optimizer | None = None,
    grad_clip: float | None = None,
    weights: Tensor | None = None,
    lr_scales: dict[str, Tensor] | None = None,
    should_stop: Callable[[list[float]], bool] | None = None,
    device: torch.device | str | None = None,
) -> dict:
    """Train one fresh optimizee for ``steps`` steps with ``net``; meta-update if ``meta_opt``.

    With ``meta_opt=None`` this is a plain (no-grad) evaluation run of the learned optimizer.
    ``should_stop(losses)`` is asked after every unroll (after its meta-update) and ends the
    run early when it returns True (fine-tuning stops an episode at its loss target).
    ``device`` is where the optimizee's parameters and the net's state live (the task's data
    and the net must already be there); by default, where the task's parameters are made.

    Returns:
        ``{"losses": [f_1..f_T], "initial_loss": f_0, "meta_loss": float, "diverged": bool,
        "stopped": bool, "params": ..., "buffers": ...}``; ``diverged`` means a non-finite
        optimizee loss ended the run, ``stopped`` that ``should_stop`` did.
    """
    train = meta_opt is not None
    unroll = unroll or steps
    w = meta_loss_weights(loss, steps) if weights is None else weights
    gen = torch.Generator().manual_seed(seed)
    params, buffers = task.init_params(seed)
    if device is not None:
        params = {k: v.to(device) for k, v in params.items()}
        buffers = {k: v.to(device) for k, v in buffers.items()}
    n = sum(p.numel() for p in params.values())
    state = net.init_state(n, device=next(iter(params.values())).device)

    def forward(params):
        # the optimizee's gradient is needed even in evaluation runs, so autograd stays on here;
        # parameters the net did not produce (start of an unroll, evaluation) become leaves
        with torch.enable_grad():
            ps = {k: v if v.requires_grad else v.detach().requires_grad_() for k, v in params.items()}
            f = task.loss(ps, buffers, task.sample_batch(gen))
            g = torch.autograd.grad(f, list(ps.values()), retain_graph=train)
        return f, _flat(g).detach()

    f_prev, g = forward(params)
    f_prev = f_prev.detach()
    initial_loss = f_prev.item()
    losses, meta_total, diverged, stopped = [], 0.0, False, False
    for start in range(0, steps, unroll):
        params = {k: v.detach() for k, v in params.items()}
        state = {k: v.detach() for k, v in state.items()}
        meta_loss = torch.zeros((), dtype=torch.float64)
        with torch.set_grad_enabled(train):
            flat = _flat(params.values())
            for t in range(start, min(start + unroll, steps)):
                update, state = net(g, state)
                flat = flat + update
                params = _split_like(flat, params)
                f, g = forward(params)
                losses.append(f.item())
                if not math.isfinite(losses[-1]):
                    diverged = True
                    break
                if loss == "weighted":
                    meta_loss = meta_loss + w[t] * (f - f_prev)
                elif loss == "uniform":
                    meta_loss = meta_loss + w[t] * f
                elif t == min(start + unroll, steps) - 1:
                    meta_loss = meta_loss + f
                f_prev = f.detach()
        if diverged:
            break
        meta_total += meta_loss.item()
        if train and meta_loss.requires_grad:
            meta_opt.zero_grad(set_to_none=True)
            meta_loss.backward()
            grads_ok = all(p.grad is None or torch.isfinite(p.grad).all() for p in net.parameters())
            if grads_ok:
                if grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
                if lr_scales is None:
                    meta_opt.step()
                else:
                    _scaled_step(meta_opt, dict(net.named_parameters()), lr_scales)
        # release the unroll's graph before the next one starts
        params = {k: v.detach() for k, v in params.items()}
        if should_stop is not None and should_stop(losses):
            stopped = True
            break
    return {
        "losses": losses,
        "initial_loss": initial_loss,
        "meta_loss": meta_total,
        "diverged": diverged,
        "stopped": stopped,
        "params": {k: v.detach() for k, v in params.items()},
        "buffers": buffers,
    }


def meta_fit(
    net: CoordinatewiseNet | str = "simple",
    task: Task | str = "mnist-mlp",
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
        net: a net to continue training (copied; yours is not modified), or an arch name.
        task: a :class:`~l2l_optim.tasks.Task`, or a registered task name.
        config: a :class:`MetaFitConfig`; keyword ``overrides`` replace its fields.
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

    Example:
        >>> result = meta_fit("simple", trajectories=2, steps=40, unroll=20)  # doctest: +SKIP
        >>> opt = SimpleOptimizer(model.parameters(), weights=result.net)     # doctest: +SKIP
    """
    cfg = copy.deepcopy(config) if config is not None else MetaFitConfig()
    for k, v in overrides.items():
        if not hasattr(cfg, k):
            raise TypeError(f"meta_fit() got an unexpected keyword argument {k!r}")
        setattr(cfg, k, v)
    if isinstance(net, CoordinatewiseNet):
        net = copy.deepcopy(net)
        cfg.arch, cfg.net_config = net.arch, net.config
    else:
        cfg.arch = net
    cfg.validate()
    if isinstance(task, str):
        cfg.task = task
        task = make_task(task, root=data_root, batch_size=cfg.batch_size)
    else:
        cfg.task = task.name

    torch.manual_seed(cfg.seed)
    if isinstance(net, str):
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

    bar = tqdm(range(start, cfg.trajectories), desc=f"meta-fit {cfg.arch}/{cfg.loss}", disable=not progress,
               initial=start, total=cfg.trajectories)
    # held-out evaluation init: a seed no training trajectory uses
    eval_seed = 10_000_019 + cfg.seed
    if cfg.eval_every and start == 0:
        ev = run_trajectory(net, task, seed=eval_seed, steps=cfg.eval_steps, loss=cfg.loss)
        entry = {"trajectory": -1, "eval_loss": tail_mean(ev["losses"]) if not ev["diverged"] else float("inf"),
                 "note": "the initialisation, before meta-training (not selectable)"}
        log.append(entry)
        if out:
            with open(out / "log.jsonl", "a") as f:
                f.write(json.dumps(entry) + "\n")
    for k in bar:
        t0 = time.perf_counter()
        r = run_trajectory(net, task, seed=cfg.seed * 1_000_003 + k, steps=cfg.steps, unroll=cfg.unroll,
                           loss=cfg.loss, meta_opt=meta_opt, grad_clip=cfg.grad_clip, lr_scales=lr_scales)
        entry = {
            "trajectory": k,
            "meta_loss": r["meta_loss"],
            "final_loss": tail_mean(r["losses"]),
            "first_loss": r["losses"][0] if r["losses"] else float("nan"),
            "diverged": r["diverged"],
            "seconds": round(time.perf_counter() - t0, 2),
        }
        if cfg.eval_every and ((k + 1) % cfg.eval_every == 0 or k + 1 == cfg.trajectories):
            ev = run_trajectory(net, task, seed=eval_seed, steps=cfg.eval_steps, loss=cfg.loss)
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
        from .weights import save_weights

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


def main(argv: list[str] | None = None) -> int:
    """``python -m l2l_optim meta-fit``: meta-train and write weights to ``--out``."""
    p = argparse.ArgumentParser(prog="python -m l2l_optim meta-fit", description=main.__doc__)
    d = MetaFitConfig()
    p.add_argument("--arch", default=d.arch, choices=["simple", "dm", "rnnprop"])
    p.add_argument("--bias", action="store_true", help="SimpleOptimizerNet with biases (ablation)")
    p.add_argument("--no-aggregate", action="store_true", help="SimpleOptimizerNet without the mean (ablation)")
    p.add_argument("--task", default=d.task)
    p.add_argument("--loss", default=d.loss, choices=META_LOSSES)
    p.add_argument("--trajectories", type=int, default=d.trajectories)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--unroll", type=int, default=d.unroll)
    p.add_argument("--meta-lr", type=float, default=d.meta_lr)
    p.add_argument("--absolute-meta-lr", action="store_true", help="plain Adam steps (no per-element scaling)")
    p.add_argument("--grad-clip", type=float, default=d.grad_clip)
    p.add_argument("--init", default=None, choices=INITS,
                   help="default: 'sign' for simple, 'small-output' for the LSTM nets")
    p.add_argument("--init-lr", type=float, default=d.init_lr)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--eval-steps", type=int, default=d.eval_steps)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--data-root", default=None)
    p.add_argument("--out", required=True, help="output directory (log, checkpoint, weights)")
    p.add_argument("--no-resume", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    net_config = {}
    if args.arch == "simple":
        net_config = {"bias": args.bias, "aggregate": not args.no_aggregate}
    cfg = MetaFitConfig(
        arch=args.arch, net_config=net_config, task=args.task, loss=args.loss, trajectories=args.trajectories,
        steps=args.steps, unroll=args.unroll, meta_lr=args.meta_lr,
        relative_meta_lr=not args.absolute_meta_lr, grad_clip=args.grad_clip,
        init=args.init or ("sign" if args.arch == "simple" else "small-output"), init_lr=args.init_lr,
        batch_size=args.batch_size, seed=args.seed, eval_every=args.eval_every, eval_steps=args.eval_steps,
    )
    command = "python -m l2l_optim meta-fit " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    result = meta_fit(args.arch, args.task, config=cfg, out_dir=args.out, resume=not args.no_resume,
                      command=command, data_root=args.data_root)
    print(f"wrote {result.weights_path}")
    return 0
