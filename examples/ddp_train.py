"""Data-parallel training (DDP) with SimpleOptimizer: nothing to change in the optimizer.

    torchrun --nproc-per-node 2 examples/ddp_train.py [--steps 300]

DDP keeps a full copy of the model on every process and averages the gradients during
``backward()``, so every process hands the optimizer the same gradients and takes the same step;
the optimizer sees plain tensors and needs no communication of its own. Two processes on half
batches take the steps one process would take on the whole batch, up to float rounding
(``tests/test_distributed.py``). gloo on CPU, NCCL with one GPU per process.

The task: regression onto a fixed random 2-layer teacher network. Rank 0 prints the loss, and at
the end checks that both processes hold the same parameters.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from l2l_optim import SimpleOptimizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-per-rank", type=int, default=64)
    args = ap.parse_args()

    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
        torch.set_num_threads(1)
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()

    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 1)).to(device)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 1)).to(device)
    ddp = DistributedDataParallel(model)
    opt = SimpleOptimizer(ddp.parameters())  # as for one process

    for step in range(args.steps):
        g = torch.Generator().manual_seed(step * 1000 + rank)  # each rank its own half
        x = torch.randn(args.batch_per_rank, 20, generator=g).to(device)
        with torch.no_grad():
            y = teacher(x)
        loss = F.mse_loss(ddp(x), y)
        loss.backward()  # gradients averaged over the processes here
        opt.step()
        opt.zero_grad()
        if step % 50 == 0 or step == args.steps - 1:
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            if rank == 0:
                print(f"step {step:4d}  loss {mean.item() / world:.5f}", flush=True)

    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    spread = flat.clone()
    dist.all_reduce(spread, op=dist.ReduceOp.MAX)
    dist.all_reduce(flat, op=dist.ReduceOp.MIN)
    if rank == 0:
        print(f"max parameter difference between processes: {(spread - flat).abs().max().item()}")
    # every rank leaves its last collective before any tears the group down: gloo can
    # abort (SIGABRT) a process that destroys its group while a peer is still in one
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
