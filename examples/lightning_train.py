"""SimpleOptimizer in PyTorch Lightning: ``configure_optimizers`` returns it like any optimizer.

    pip install lightning               # not a dependency of l2l-optim
    python examples/lightning_train.py [--steps 300]

A small MLP learns a synthetic regression. ``configure_optimizers`` returns SimpleOptimizer
(``lr=1.0``: the learned update as meta-trained) and no schedule: the default weights average
their iterates as Schedule-Free AdamW does (weights without averaging, such as ``"simple"``,
want a decay of the multiplier in long runs). Lightning's automatic optimization passes a
closure to ``optimizer.step``, which SimpleOptimizer runs as any ``torch.optim.Optimizer``
does. After training, ``optimizer.eval()`` moves the parameters to their running average.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

try:
    import lightning as L
except ImportError:
    sys.exit("this example needs Lightning: pip install lightning")

from l2l_optim import SimpleOptimizer


class Regressor(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self.net(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return SimpleOptimizer(self.parameters())


def make_data(n: int = 4096, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = torch.sin(x[:, :1]) + 0.5 * x[:, 1:2] * x[:, 2:3]
    return TensorDataset(x, y)


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (default: 300)")
    args = p.parse_args(argv)

    L.seed_everything(0, verbose=False)
    data = make_data()
    model = Regressor()
    x, y = data.tensors
    with torch.no_grad():
        before = F.mse_loss(model.net(x), y).item()
    trainer = L.Trainer(max_steps=args.steps, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_model_summary=False,
                        enable_progress_bar=sys.stderr.isatty())
    trainer.fit(model, DataLoader(data, batch_size=64, shuffle=True))
    for optimizer in trainer.optimizers:
        optimizer.eval()  # the parameters at their running average (optimizer.train() to go on)
    with torch.no_grad():
        after = F.mse_loss(model.net(x), y).item()
    print(f"training loss (whole set): {before:.4f} before, {after:.4f} after {args.steps} steps")
    return {"before": before, "after": after}


if __name__ == "__main__":
    main()
