"""Train a small transformer with FSDP2 (fully_shard) and SimpleOptimizer, on CPUs or GPUs.

    torchrun --nproc-per-node 2 examples/fsdp_train.py [--steps 200] [--save DIR]

On CPU the processes talk through gloo; with one GPU per process (``torchrun`` on a GPU
machine) through NCCL. Every parameter becomes a DTensor shard (``Shard(0)``); SimpleOptimizer
steps the local shards with its fused kernel and all-reduces one scalar per step (the
mean-hidden-state term), so the run takes the same steps as one process would on the whole
batch, up to float rounding (``tests/test_distributed.py``).

The task: next-token prediction on sequences that repeat a random 4-token motif, which a
2-layer transformer learns within a few hundred steps. Rank 0 prints the training loss; with
``--save DIR`` the model and optimizer are saved with ``torch.distributed.checkpoint`` (sharded:
each rank writes its shards; ``dcp.load`` reads them back on any number of ranks).
"""

from __future__ import annotations

import argparse
import gc
import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
from torch.distributed.fsdp import fully_shard

from l2l_optim import SimpleOptimizer

VOCAB, SEQ, MOTIF = 16, 32, 4


class TinyTransformer(nn.Module):
    def __init__(self, d_model: int = 32, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d_model)
        self.pos = nn.Parameter(torch.randn(SEQ, d_model) * 0.02)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(d_model, nhead=4, dim_feedforward=64, dropout=0.0,
                                       batch_first=True)
            for _ in range(layers)
        )
        self.head = nn.Linear(d_model, VOCAB)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(SEQ))

    def forward(self, tokens):
        """Logits of shape ``(batch * length, VOCAB)``."""
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for layer in self.layers:
            x = layer(x, src_mask=self.mask[: tokens.shape[1], : tokens.shape[1]], is_causal=True)
        # flat, so that the output is not a view: a Linear on a 3-D input returns one, and
        # FSDP2 cannot hook an in-place change of a view its root module returns (it warns)
        return self.head(x.flatten(0, 1))


def batch(step: int, size: int, rank: int, device) -> torch.Tensor:
    """This rank's part of the global batch of ``step``: motifs repeated to SEQ + 1 tokens."""
    g = torch.Generator().manual_seed(step * 1000 + rank)
    motif = torch.randint(0, VOCAB, (size, MOTIF), generator=g)
    return motif.repeat(1, SEQ // MOTIF + 1)[:, : SEQ + 1].to(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-per-rank", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1.0, help="multiplier of the learned update")
    ap.add_argument("--save", default=None, help="directory for a distributed checkpoint")
    args = ap.parse_args()

    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
        torch.set_num_threads(1)  # one core per process
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()

    torch.manual_seed(0)  # the same initial weights on every rank, before sharding
    model = TinyTransformer().to(device)
    for layer in model.layers:
        fully_shard(layer)
    fully_shard(model)
    opt = SimpleOptimizer(model.parameters(), lr=args.lr)
    if rank == 0:
        n = sum(p.numel() for p in model.parameters())
        print(f"{world} processes ({backend}), {n} parameters in DTensor shards, "
              f"SimpleOptimizer with meta-weights {opt.meta_fingerprint}")

    loss = logits = mean = None
    for step in range(args.steps):
        tokens = batch(step, args.batch_per_rank, rank, device)
        logits = model(tokens[:, :-1]).view(len(tokens), SEQ, VOCAB)
        # the first motif is unpredictable; the loss counts the positions after it
        targets = tokens[:, MOTIF + 1 :]
        loss = F.cross_entropy(logits[:, MOTIF:].reshape(-1, VOCAB), targets.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 20 == 0 or step == args.steps - 1:
            mean = loss.detach().clone()
            dist.all_reduce(mean)  # the loss on the whole batch, for the printout
            if rank == 0:
                print(f"step {step:4d}  loss {mean.item() / world:.4f}", flush=True)

    if args.save:
        dcp.save({"model": get_model_state_dict(model),
                  "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=args.save)
        if rank == 0:
            print(f"saved a sharded checkpoint to {args.save}")
    # every rank leaves its last collective before any tears the group down: gloo can
    # abort (SIGABRT) a process that destroys its group while a peer is still in one
    dist.barrier()
    # the sharded model and its optimizer hold the device mesh and so the group: freed here,
    # not by the interpreter's shutdown, where gloo's threads can abort the process
    del model, opt, loss, logits, mean
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
