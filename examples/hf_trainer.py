"""SimpleOptimizer in the Hugging Face ``Trainer``: a small GPT-2 learns a synthetic sequence task.

    pip install 'transformers[torch]'   # transformers and accelerate (not dependencies of l2l-optim)
    python examples/hf_trainer.py [--steps 150] [--out-dir runs/hf_trainer]

The ``Trainer`` takes any ``torch.optim.Optimizer`` through ``optimizers=(optimizer, scheduler)``.
With ``None`` for the scheduler it builds its own from ``lr_scheduler_type``; the default
weights average their iterates as Schedule-Free AdamW does and want ``lr=1`` throughout, so
the example asks for ``"constant"`` (the Trainer's default, a linear decay, suits weights
without averaging such as ``"simple"``), and calls ``optimizer.eval()`` before the model is
evaluated, which moves the parameters to their running average. ``learning_rate`` in
``TrainingArguments`` only configures the optimizer the Trainer would have built, so it is
unused here. The model is built from a config (nothing is
downloaded) and runs on the CPU.

The task: sequences that count up by a fixed stride modulo the vocabulary; the next token
follows from the two before it, so the loss falls from ln(32) ~ 3.5 towards 0.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

try:
    import accelerate  # noqa: F401  (the Trainer needs it on torch)
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
except ImportError:
    sys.exit("this example needs transformers and accelerate: pip install 'transformers[torch]'")

from l2l_optim import SimpleOptimizer

VOCAB = 32
LENGTH = 16


class CountingSequences(torch.utils.data.Dataset):
    """``start, start + stride, start + 2 stride, ...`` modulo ``VOCAB``, seeded."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, VOCAB, (n, 1), generator=g)
        stride = torch.randint(1, 4, (n, 1), generator=g)
        self.ids = (start + stride * torch.arange(LENGTH)) % VOCAB

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=150, help="optimizer steps (default: 150)")
    p.add_argument("--out-dir", default="runs/hf_trainer", help="the Trainer's output directory")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_positions=LENGTH, n_embd=64, n_layer=2, n_head=4,
                        bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    optimizer = SimpleOptimizer(model.parameters())  # lr=1.0: the learned update as meta-trained
    training = TrainingArguments(
        output_dir=args.out_dir, max_steps=args.steps, per_device_train_batch_size=32,
        logging_steps=max(1, args.steps // 5), save_strategy="no", report_to=[], use_cpu=True,
        disable_tqdm=not sys.stderr.isatty(), seed=0, lr_scheduler_type="constant",
    )
    trainer = Trainer(model=model, args=training, train_dataset=CountingSequences(4096, seed=0),
                      optimizers=(optimizer, None))  # None: the Trainer's own (constant) schedule

    held_out = CountingSequences(256, seed=1)
    model.eval()
    with torch.no_grad():
        before = model(input_ids=held_out.ids, labels=held_out.ids).loss.item()
    trainer.train()
    optimizer.eval()  # the parameters at their running average (optimizer.train() to go on)
    model.eval()
    with torch.no_grad():
        after = model(input_ids=held_out.ids, labels=held_out.ids).loss.item()
    print(f"held-out loss: {before:.3f} before, {after:.3f} after {args.steps} steps "
          f"(uniform guessing: {math.log(VOCAB):.3f})")
    return {"before": before, "after": after}


if __name__ == "__main__":
    main()
