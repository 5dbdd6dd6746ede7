"""The shipped SimpleOptimizer weights beyond the paper's task, against tuned Adam and SGD.

    python examples/beyond_paper.py                      # default: 1,000 steps, seed 0, weights "simple"
    python examples/beyond_paper.py --weights simple --weights runs/v2/weights.safetensors
    python examples/beyond_paper.py --steps 20 --tasks base-mlp transformer --out-dir /tmp/beyond

The evaluation set (each task: batch 128, small enough that a 1,000-step run is quick on a
CPU):

  resnet-bn    small residual CNN with BatchNorm on MNIST, cross-entropy (~25k parameters;
               raw-gradient learned optimizers are known to fail on it)
  regression   MLP 16-64-64-1 on y = sin(3 <w, x>) + 0.1 noise, MSE (a loss of another scale)
  autoencoder  MNIST autoencoder 784-256-32-256-784 with sigmoid output, MSE on pixels in [0, 1]
  transformer  2-layer pre-LayerNorm causal transformer (d_model 64, 4 heads) on 4-digit
               addition (a+b=, sum reversed), cross-entropy on the 5 sum digits; batches are
               generated on the fly. (Addition rather than reversal or sorting, which Adam
               solves in ~20-300 steps, too easily to tell optimizers apart; addition has a late
               phase change: Adam lr 1e-3 goes 1.8 -> 0.003 between steps 400 and 800.)
  base-mlp     the paper's 784-500-10 MLP on MNIST, cross-entropy (the anchor)

Protocol (the paper's): SimpleOptimizer runs with lr=1.0, the update as
meta-trained. Adam and SGD (no momentum) run every learning rate of ``--lrs`` (default
{1, 0.1, 0.01, 0.001}) and the best is picked by the mean training loss over the last 10% of
the steps; a run whose loss turns NaN/Inf ranks last. The "final loss" of every run is that
same score. For a given seed, every optimizer starts from the same initial weights and sees
the same minibatches. With several seeds, scores are averaged over seeds.

Outputs in ``--out-dir`` (default ``results/beyond``):

  <task>_<optimizer>.csv   columns step,loss (loss averaged over seeds; with several seeds
                           also loss_seed<s>); <optimizer> is simpleopt-<label>, adam-lr<lr>
                           or sgd-lr<lr>. A non-finite loss ends the run: NaN from there on.
  <task>_<optimizer>.json  what the run was (steps, seeds, weights fingerprint) and its result
  summary.json             every run's score, the chosen learning rates, the ratios
  table.md, beyond.png     the markdown table (also printed) and one loss panel per task

Resumable: a run whose CSV and JSON exist and match the configuration (steps, seeds, and
for SimpleOptimizer the weights' fingerprint) is loaded, not rerun. ``--force`` reruns all.

The learning-rate search is a local loop rather than ``l2l_optim.training.search_lr``:
search_lr returns only the per-lr scores, while this script keeps every run's loss curve
and resumes run by run. The protocol (grid, last-10% mean, divergence ranks last, ties to
the earlier grid entry) is the same.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from l2l_optim import SimpleOptimizer, SkippedStepWarning
from l2l_optim.data import load_dataset
from l2l_optim.models import base_mlp
from l2l_optim.tasks import Task
from l2l_optim.training import tail_mean, train_task
from l2l_optim.weights import fingerprint, load_weights

# ----------------------------------------------------------------------------- config


@dataclass
class Config:
    steps: int = 1000
    seeds: list[int] = field(default_factory=lambda: [0])
    lrs: list[float] = field(default_factory=lambda: [1.0, 0.1, 0.01, 0.001])
    # shipped names, .safetensors paths or run directories; "label=source" names the label
    weights: list[str] = field(default_factory=lambda: ["simple"])
    tasks: list[str] = field(default_factory=lambda: list(TASK_NAMES))
    batch_size: int = 128
    out_dir: str = "results/beyond"
    data_root: str | None = None
    tail: float = 0.1  # the score: mean training loss over the last `tail` of the steps
    # torch threads: 1 by default, because several processes sharing a few cores with
    # several threads each oversubscribe them and slow every run down
    threads: int = 1
    force: bool = False
    plot: bool = True


TASK_NAMES = ("resnet-bn", "regression", "autoencoder", "transformer", "base-mlp")

# ------------------------------------------------------------------------------ tasks
# Each task: make_model() (called under the run's seed), batch(gen) -> (x, y) from a seeded
# generator, loss(out, y) -> scalar.

_MNIST: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def mnist(root):
    if "train" not in _MNIST:
        _MNIST["train"] = load_dataset("mnist", "train", root=root)
    return _MNIST["train"]


class Block(nn.Module):
    """Residual basic block: conv-BN-ReLU-conv-BN plus identity (or 1x1 conv-BN) shortcut."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.c2, self.b2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.b1(self.c1(x)))
        return F.relu(self.b2(self.c2(out)) + self.short(x))


def resnet_bn():
    # 28 -> 14 (stem, stride 2) -> 14 (block) -> 7 (block, stride 2) -> GAP -> 10
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        Block(16, 16, 1), Block(16, 32, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )


def autoencoder():
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 32), nn.ReLU(),
        nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 784), nn.Sigmoid(),
    )


class CausalSelfAttention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class TBlock(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(d), CausalSelfAttention(d, heads)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


ADD_DIGITS = 4  # a + b with 4-digit operands; the 5-digit sum is written least significant first
ADD_PLUS, ADD_EQ = 10, 11  # tokens 0-9 are digits


class TinyTransformer(nn.Module):
    def __init__(self, vocab=12, ctx=3 * ADD_DIGITS + 2, d=64, heads=4, layers=2):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        self.blocks = nn.Sequential(*[TBlock(d, heads) for _ in range(layers)])
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        return self.head(self.ln(self.blocks(x)))


def addition_batch(gen, bs):
    """`a + b = s` as tokens, a and b most significant digit first, s reversed (the order a
    carry propagates); next-token targets, scored only on the N+1 digits of s."""
    n = ADD_DIGITS
    a, b = (torch.randint(0, 10**n, (bs,), generator=gen) for _ in range(2))

    def digits(v, k):  # least significant first
        return torch.stack([(v // 10**i) % 10 for i in range(k)], 1)

    seq = torch.cat([digits(a, n).flip(1), torch.full((bs, 1), ADD_PLUS), digits(b, n).flip(1),
                     torch.full((bs, 1), ADD_EQ), digits(a + b, n + 1)], 1)
    x, y = seq[:, :-1], seq[:, 1:].clone()
    y[:, : 2 * n + 1] = -100  # ignore the prompt
    return x, y


def seq_ce(out, y):
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), ignore_index=-100)


REG_DIM = 16
_REG_W = torch.randn(REG_DIM, generator=torch.Generator().manual_seed(1234)) / math.sqrt(REG_DIM)


def regression_batch(gen, bs):
    x = torch.randn(bs, REG_DIM, generator=gen)
    y = torch.sin(3.0 * (x @ _REG_W)) + 0.1 * torch.randn(bs, generator=gen)
    return x, y.unsqueeze(1)


def mnist_batch(root, bs, target):
    def batch(gen):
        x, y = mnist(root)
        idx = torch.randint(0, x.shape[0], (bs,), generator=gen)
        xb = x[idx]
        if target == "pixels":  # back to [0, 1] for the autoencoder's sigmoid output
            return xb, (xb * 0.3081 + 0.1307).flatten(1)
        return xb, y[idx]
    return batch


def make_tasks(cfg: Config) -> dict[str, tuple[Task, str]]:
    """name -> (task, description)."""
    bs, root = cfg.batch_size, cfg.data_root
    specs = {
        "resnet-bn": (resnet_bn, mnist_batch(root, bs, "labels"), F.cross_entropy,
                      "residual CNN + BatchNorm, MNIST, CE"),
        "regression": (lambda: nn.Sequential(nn.Linear(REG_DIM, 64), nn.ReLU(), nn.Linear(64, 64),
                                             nn.ReLU(), nn.Linear(64, 1)),
                       lambda g: regression_batch(g, bs), F.mse_loss, "MLP regression, sin of a projection, MSE"),
        "autoencoder": (autoencoder, mnist_batch(root, bs, "pixels"), F.mse_loss, "MNIST autoencoder, MSE"),
        "transformer": (TinyTransformer, lambda g: addition_batch(g, bs), seq_ce,
                        "2-layer transformer, 4-digit addition, CE"),
        "base-mlp": (base_mlp, mnist_batch(root, bs, "labels"), F.cross_entropy,
                     "base MLP 784-500-10, MNIST, CE (the paper's task)"),
    }
    return {name: (Task(name, model, batch_fn=batch, loss_fn=loss), desc)
            for name, (model, batch, loss, desc) in specs.items()}


# ------------------------------------------------------------------------- one run


def train(task, make_opt, steps, seed):
    """:func:`l2l_optim.training.train_task` without the skipped-step warnings (the count is
    reported instead). Returns (losses, skipped_steps, seconds); losses stops before the first
    non-finite loss."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedStepWarning)
        r = train_task(task, make_opt, steps=steps, seed=seed)
    return r.losses, r.skipped, r.seconds


def score(losses, steps, tail):
    """Mean training loss over the last `tail` of `steps`; inf if the run did not finish finite."""
    if len(losses) < steps or not all(math.isfinite(v) for v in losses):
        return math.inf
    return tail_mean(losses, tail)


def run_or_load(cfg, task_name, task, opt_name, make_opt, meta):
    """One (task, optimizer) over all seeds, or its saved result if it matches `meta`."""
    out = Path(cfg.out_dir)
    csv_path, json_path = out / f"{task_name}_{opt_name}.csv", out / f"{task_name}_{opt_name}.json"
    meta = dict(meta, task=task_name, optimizer=opt_name, steps=cfg.steps, seeds=list(cfg.seeds),
                batch_size=cfg.batch_size, tail=cfg.tail)
    if not cfg.force and csv_path.exists() and json_path.exists():
        saved = json.loads(json_path.read_text())
        if all(saved.get(k) == v for k, v in meta.items()):
            print(f"  {task_name:12s} {opt_name:24s} (saved) final {saved['final']:.4g}", flush=True)
            return saved
        print(f"  {task_name:12s} {opt_name:24s} saved run does not match the config: rerunning", flush=True)
    curves, per_seed, skipped, secs = {}, [], 0, 0.0
    for seed in cfg.seeds:
        losses, sk, s = train(task, make_opt, cfg.steps, seed)
        curves[seed] = losses + [math.nan] * (cfg.steps - len(losses))
        per_seed.append(score(losses, cfg.steps, cfg.tail))
        skipped, secs = skipped + sk, secs + s
    bad = [next((i for i, v in enumerate(c) if not math.isfinite(v)), None) for c in curves.values()]
    result = dict(
        meta,
        final=sum(per_seed) / len(per_seed),  # inf if any seed diverged
        final_per_seed=per_seed,
        first_loss=sum(c[0] for c in curves.values()) / len(curves),
        nonfinite_step=min((b for b in bad if b is not None), default=None),
        skipped_steps=skipped,
        seconds=round(secs, 2),
    )
    out.mkdir(parents=True, exist_ok=True)
    tmp = csv_path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "loss"] + ([f"loss_seed{s}" for s in cfg.seeds] if len(cfg.seeds) > 1 else []))
        for i in range(cfg.steps):
            vals = [curves[s][i] for s in cfg.seeds]
            w.writerow([i, f"{sum(vals) / len(vals):.6g}"] + ([f"{v:.6g}" for v in vals] if len(vals) > 1 else []))
    os.replace(tmp, csv_path)
    json_path.write_text(json.dumps(result, indent=1, allow_nan=True) + "\n")
    flag = f" NaN/Inf at step {result['nonfinite_step']}" if result["nonfinite_step"] is not None else ""
    flag += f" ({skipped} skipped steps)" if skipped else ""
    print(f"  {task_name:12s} {opt_name:24s} first {result['first_loss']:.4g} final {result['final']:.4g} "
          f"({secs:.1f} s){flag}", flush=True)
    return result


# ---------------------------------------------------------------------------- main


def weights_label(source: str) -> tuple[str, str]:
    if "=" in source:
        label, source = source.split("=", 1)
        return label, source
    p = Path(source)
    if len(p.parts) == 1 and not p.suffix:  # a shipped name
        return source, source
    if p.is_dir():
        return p.name, source
    return (p.parent.name if p.stem == "weights" else p.stem), source


def load_curve(cfg, task_name, opt_name):
    with open(Path(cfg.out_dir) / f"{task_name}_{opt_name}.csv") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def fmt(v):
    return "inf" if not math.isfinite(v) else f"{v:.4g}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Config()
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--seeds", type=int, nargs="+", default=d.seeds)
    p.add_argument("--lrs", type=float, nargs="+", default=d.lrs)
    p.add_argument("--weights", action="append", default=None,
                   help="shipped name, .safetensors path or run dir (label=source to name it); repeatable")
    p.add_argument("--tasks", nargs="+", choices=TASK_NAMES, default=d.tasks)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--out-dir", default=d.out_dir)
    p.add_argument("--data-root", default=d.data_root)
    p.add_argument("--tail", type=float, default=d.tail)
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads (0: torch's default)")
    p.add_argument("--force", action="store_true", help="rerun runs whose results exist")
    p.add_argument("--no-plot", dest="plot", action="store_false")
    args = vars(p.parse_args(argv))
    args["weights"] = args["weights"] or d.weights
    cfg = Config(**args)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)

    weights = {}  # label -> (source, net, fingerprint)
    for src in cfg.weights:
        label, source = weights_label(src)
        if label in weights:
            sys.exit(f"two --weights share the label {label!r}; name them with label=source")
        net = load_weights(source, arch="simple").net
        weights[label] = (source, net, fingerprint(net))
    tasks = make_tasks(cfg)
    command = "python examples/beyond_paper.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"{command}\nconfig: {asdict(cfg)}", flush=True)
    print("weights: " + ", ".join(f"{k} = {v[0]} ({v[2]})" for k, v in weights.items()), flush=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)

    summary = {"command": command, "config": asdict(cfg), "torch": torch.__version__,
               "weights": {k: {"source": v[0], "fingerprint": v[2]} for k, v in weights.items()},
               "tasks": {}}
    for tname in cfg.tasks:
        task, desc = tasks[tname]
        nparams = task.num_params()
        print(f"\n{tname}: {desc} ({nparams:,} parameters)", flush=True)
        entry = {"desc": desc, "params": nparams, "simple": {}, "adam": {}, "sgd": {}}
        for label, (source, net, fp) in weights.items():
            entry["simple"][label] = run_or_load(
                cfg, tname, task, f"simpleopt-{label}", lambda ps, net=net: SimpleOptimizer(ps, weights=net),
                {"weights": source, "fingerprint": fp, "lr": 1.0})
        for name, cls in (("adam", torch.optim.Adam), ("sgd", torch.optim.SGD)):
            runs = {lr: run_or_load(cfg, tname, task, f"{name}-lr{lr:g}", lambda ps, lr=lr, cls=cls: cls(ps, lr=lr),
                                    {"lr": lr}) for lr in cfg.lrs}
            best = min(cfg.lrs, key=lambda lr: runs[lr]["final"])  # first of equal scores
            entry[name] = {"best_lr": best, "best_final": runs[best]["final"],
                           "by_lr": {f"{lr:g}": runs[lr]["final"] for lr in cfg.lrs},
                           "diverged_lrs": [lr for lr in cfg.lrs if runs[lr]["nonfinite_step"] is not None]}
        ref = min(entry["adam"]["best_final"], entry["sgd"]["best_final"])
        for label, r in entry["simple"].items():
            r["ratio_to_best_baseline"] = r["final"] / ref if math.isfinite(ref) and ref > 0 else None
        summary["tasks"][tname] = entry

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, allow_nan=True) + "\n")

    # the table
    head = ["task", "start loss"]
    for label in weights:
        head += [f"SimpleOptimizer[{label}] final", f"ratio[{label}]", f"NaN?[{label}]"]
    head += ["best Adam (lr)", "best SGD (lr)"]
    if len(weights) == 1:  # the brief's column order for the common case
        label = next(iter(weights))
        head = ["task", "start loss", "SimpleOptimizer final loss", "best Adam (lr)", "best SGD (lr)",
                "ratio to best of Adam/SGD", "NaN?"]
    rows = []
    for tname, e in summary["tasks"].items():
        adam = f"{fmt(e['adam']['best_final'])} ({e['adam']['best_lr']:g})"
        sgd = f"{fmt(e['sgd']['best_final'])} ({e['sgd']['best_lr']:g})"
        start = fmt(next(iter(e["simple"].values()))["first_loss"])
        cells = []
        for label, r in e["simple"].items():
            ratio = "n/a" if r["ratio_to_best_baseline"] is None else f"{r['ratio_to_best_baseline']:.2f}x"
            nan = "no"
            if r["nonfinite_step"] is not None:
                nan = f"yes (step {r['nonfinite_step']})"
            elif r["skipped_steps"]:
                nan = f"{r['skipped_steps']} skipped steps"
            cells.append((fmt(r["final"]), ratio, nan))
        if len(weights) == 1:
            (f, ratio, nan), = cells
            rows.append([tname, start, f, adam, sgd, ratio, nan])
        else:
            rows.append([tname, start] + [c for cell in cells for c in cell] + [adam, sgd])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    note = (f"Training loss, mean of the last {cfg.tail:.0%} of {cfg.steps} steps, batch {cfg.batch_size}, "
            f"seeds {cfg.seeds}; Adam/SGD: best lr of {[f'{lr:g}' for lr in cfg.lrs]}; "
            f"SimpleOptimizer lr=1.0; start loss = loss at step 0. Command: `{command}`")
    table = "\n".join(lines) + "\n\n" + note + "\n"
    (out / "table.md").write_text(table)
    print("\n" + table)

    if cfg.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        n = len(summary["tasks"])
        ncols = min(n, 3)
        nrows = -(-n // ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.6 * nrows), squeeze=False)
        axes = axes.ravel()
        for ax in axes[n:]:
            ax.set_visible(False)
        win = max(1, min(20, cfg.steps // 10))
        for ax, (tname, e) in zip(axes, summary["tasks"].items()):
            curves = [(f"SimpleOptimizer[{label}]", f"simpleopt-{label}") for label in e["simple"]]
            curves += [(f"Adam lr={e['adam']['best_lr']:g}", f"adam-lr{e['adam']['best_lr']:g}"),
                       (f"SGD lr={e['sgd']['best_lr']:g}", f"sgd-lr{e['sgd']['best_lr']:g}")]
            for legend, opt_name in curves:
                y = torch.tensor(load_curve(cfg, tname, opt_name))
                smooth = F.avg_pool1d(y.view(1, 1, -1), win, 1).view(-1)  # NaN spreads: the run ended
                ax.plot(range(win, len(y) + 1), smooth, label=legend)
            ax.set_yscale("log")
            ax.set_title(f"{tname} ({e['params']:,} params)", fontsize=10)
            ax.set_xlabel("step")
            ax.set_ylabel(f"training loss ({win}-step mean)", fontsize=8)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "beyond.png", dpi=110)
        print(f"wrote {out / 'beyond.png'}")
    return summary


if __name__ == "__main__":
    main()
