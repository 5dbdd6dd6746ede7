"""The paper's transfer protocol (RESULTS.md, fig4a / fig5a: 10,000 steps, lr=1, batch 128)
with weights="simple-sf": the runs are those of `python -m experiments.repro` (train_task on
the same registered task and seeds, final loss = its tail mean), the other optimizers' finals
read from results/<fig>/.

    python results/paper-protocol-simple-sf/run.py fig4a 0 1 2
"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from experiments.repro.claims import final_loss  # noqa: E402
from experiments.repro.experiments import EXPERIMENTS  # noqa: E402
from l2l_optim import SimpleOptimizer  # noqa: E402
from l2l_optim.tasks import make_task  # noqa: E402
from l2l_optim.training import train_task  # noqa: E402

torch.set_num_threads(1)
fig, seeds = sys.argv[1], [int(s) for s in sys.argv[2:]]
exp = EXPERIMENTS[fig]
task = make_task(exp.task, batch_size=128)
out = Path(__file__).parent / f"{fig}.jsonl"
for seed in seeds:
    r = train_task(task, lambda params: SimpleOptimizer(params, weights="simple-sf"),
                   steps=exp.steps, seed=seed, progress=False)
    row = {"fig": fig, "task": exp.task, "seed": seed, "steps": len(r.losses), "diverged": r.diverged,
           "final_loss": final_loss(r.losses) if not r.diverged else float("nan"),
           "s_per_step": r.seconds / max(1, len(r.losses))}
    with open(out, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(row, flush=True)
