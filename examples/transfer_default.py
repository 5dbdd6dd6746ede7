"""The default weights on LeNet/MNIST for 10,000 steps at lr=1, Figure 4a's protocol, one seed a run.

    python examples/transfer_default.py --seed 0 --weights simple --data-root /path/to/data

Prints one JSON line: the final loss (the mean over the last 500 steps, as in RESULTS.md), the
seed, the steps run and the wall time. The same initial weights and minibatches as
``python -m experiments.repro fig4a`` for that seed (``l2l_optim.training.train_task``), so the
result compares with that experiment's per-seed files in ``results/fig4a/``. It exists beside
the reproduction because fig4a keeps the weights it was run with; adding a row there reruns
the figure.
"""

from __future__ import annotations

import argparse
import json

import torch

from l2l_optim import SimpleOptimizer
from l2l_optim.tasks import make_task
from l2l_optim.training import tail_mean, train_task


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights", default="simple")
    p.add_argument("--steps", type=int, default=10_000)
    p.add_argument("--data-root", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    task = make_task("mnist-lenet", root=args.data_root, batch_size=128)
    r = train_task(task, lambda ps: SimpleOptimizer(ps, weights=args.weights), steps=args.steps, seed=args.seed)
    n = len(r.losses)
    # the reproduction's final loss: the mean of the last 10% of the steps, at most 500
    final = tail_mean(r.losses, max_window=500) if n and not r.diverged else float("nan")
    print(json.dumps({"task": "mnist-lenet", "weights": args.weights, "seed": args.seed, "steps": n,
                      "diverged": r.diverged, "final_loss": final, "seconds": round(r.seconds)}))


if __name__ == "__main__":
    main()
