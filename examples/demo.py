"""Train the paper's base MLP on MNIST with SimpleOptimizer and with Adam, side by side.

    python examples/demo.py [--steps 1000] [--data-root DIR] [--out demo.png]

Both runs start from the same initial weights and see the same minibatches. Prints a table of
the training loss (mean of the last 50 steps at each checkpoint) and the final test accuracy,
and writes a plot of training loss against step.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from l2l_optim import SimpleOptimizer
from l2l_optim.data import load_dataset
from l2l_optim.models import base_mlp


@dataclass
class Config:
    steps: int = 1000
    batch_size: int = 128
    seed: int = 0
    adam_lr: float = 1e-3  # the best of {1, 0.1, 0.01, 0.001} for Adam on this task (weights/README.md)
    data_root: str | None = None
    out: str = "demo.png"


def train(make_opt, cfg: Config, x, y):
    torch.manual_seed(cfg.seed)
    model = base_mlp()
    opt = make_opt(model.parameters())
    gen = torch.Generator().manual_seed(cfg.seed)
    losses = []
    t0 = time.perf_counter()
    for _ in range(cfg.steps):
        idx = torch.randint(0, x.shape[0], (cfg.batch_size,), generator=gen)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    if isinstance(opt, SimpleOptimizer):
        opt.eval()  # the default weights' running average, the parameters to evaluate
    return model, losses, time.perf_counter() - t0


@torch.no_grad()
def accuracy(model, x, y) -> float:
    return (model(x).argmax(1) == y).float().mean().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in vars(Config()).items():
        p.add_argument("--" + name.replace("_", "-"), type=type(default) if default is not None else str, default=default)
    cfg = Config(**vars(p.parse_args()))

    x, y = load_dataset("mnist", "train", root=cfg.data_root)
    xt, yt = load_dataset("mnist", "test", root=cfg.data_root)
    runs = {
        "SimpleOptimizer": lambda params: SimpleOptimizer(params),
        f"Adam (lr={cfg.adam_lr:g})": lambda params: torch.optim.Adam(params, lr=cfg.adam_lr),
    }
    results = {}
    for name, make_opt in runs.items():
        model, losses, secs = train(make_opt, cfg, x, y)
        results[name] = (losses, accuracy(model, xt, yt), secs)
        print(f"trained with {name}: {secs:.1f} s", flush=True)

    checkpoints = sorted({min(cfg.steps, s) for s in (100, 200, 500, 1000, 2000, 5000, cfg.steps)})
    names = list(results)
    print("\ntraining loss (mean of the 50 steps up to each step)")
    print(f"{'step':>8} " + " ".join(f"{n:>18}" for n in names))
    for s in checkpoints:
        row = [sum(results[n][0][max(0, s - 50) : s]) / len(results[n][0][max(0, s - 50) : s]) for n in names]
        print(f"{s:>8} " + " ".join(f"{v:>18.4f}" for v in row))
    print(f"{'test acc':>8} " + " ".join(f"{results[n][1]:>18.4f}" for n in names))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for n in names:
        losses = torch.tensor(results[n][0])
        smooth = torch.nn.functional.avg_pool1d(losses.view(1, 1, -1), 20, 1).view(-1)
        ax.plot(range(20, len(losses) + 1), smooth, label=n)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (20-step mean)")
    ax.set_title("Base MLP (784-500-10) on MNIST, batch 128")
    ax.legend()
    fig.tight_layout()
    fig.savefig(cfg.out, dpi=120)
    print(f"\nwrote {cfg.out}")


if __name__ == "__main__":
    main()
