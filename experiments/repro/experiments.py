"""The experiment registry: what each of the paper's experiments runs and what it claims.

Each :class:`Experiment` names a task, the optimizers whose training curves it compares
(:class:`OptSpec`), the paper's claims about them (:class:`Claim`) and its budget. Where the
paper's 10,000 steps and 3 seeds cost too much on a CPU, the override is stated in ``note``,
which ``list`` prints and RESULTS.md quotes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["CLI", "OptSpec", "Claim", "Experiment", "EXPERIMENTS", "ALL", "FINETUNE_DEFAULTS", "PAPER_TABLE1",
           "STANDIN_NETS", "Settings"]


#: the command that runs the experiments (written into the summaries and RESULTS.md)
CLI = "python -m experiments.repro"


@dataclass(frozen=True)
class OptSpec:
    """One curve of an experiment.

    Attributes:
        key: file stem and summary key (``simple``, ``sgd``, ``simple-finetuned``, ...).
        label: the name in tables and legends.
        kind: ``"learned"`` (shipped weights ``weights``), ``"finetuned"`` (the experiment's
            fine-tuned weights, starting from ``weights``), ``"sgd"`` or ``"adam"``.
        weights: shipped weights name for the learned kinds.
        steps, seeds: per-optimizer defaults (None: the experiment's).
    """

    key: str
    label: str
    kind: str
    weights: str | None = None
    steps: int | None = None
    seeds: int | None = None


@dataclass(frozen=True)
class Claim:
    """The paper claims that ``better`` reaches a lower training loss than ``worse``."""

    better: str
    worse: str
    claimed: bool = True  # False: reported for context, not a claim of the paper


@dataclass(frozen=True)
class Experiment:
    name: str
    title: str
    task: str
    opts: tuple[OptSpec, ...]
    paper: str
    claims: tuple[Claim, ...] = ()
    steps: int = 10_000
    seeds: int = 3
    search_steps: int = 1000
    finetune: dict | None = None
    note: str = ""


SIMPLE = OptSpec("simple", "SimpleOptimizer", "learned", "simple-v0")
# the shipped default weights (meta-trained by ES on a task population, rms-normalised input),
# beside the paper-faithful ones on the paper's transfer tasks: context, not a claim of the paper
DEFAULT = OptSpec("simple-default", "SimpleOptimizer, default weights (simple-sf)", "learned", "simple-sf")
SGD = OptSpec("sgd", "SGD (tuned lr)", "sgd")
ADAM = OptSpec("adam", "Adam (tuned lr)", "adam")
# a step of the LSTM optimizers costs far more than SimpleOptimizer's (table1), so one seed each
DM_ONE_SEED = OptSpec("dm", "DMOptimizer", "learned", "dm", seeds=1)
RNNPROP_ONE_SEED = OptSpec("rnnprop", "RNNProp", "learned", "rnnprop", seeds=1)
# fig4a compares them only for context (not a claim of the paper), so 500 steps there
DM_SHORT = OptSpec("dm", "DMOptimizer", "learned", "dm", steps=500, seeds=1)
RNNPROP_SHORT = OptSpec("rnnprop", "RNNProp", "learned", "rnnprop", steps=500, seeds=1)
FINETUNED = OptSpec("simple-finetuned", "SimpleOptimizer fine-tuned", "finetuned", "simple-v0")

#: The fine-tuning settings of the experiments that fine-tune. The keys are the names stored
#: in ``<exp>/finetune.json`` and shown in RESULTS.md (a change of key invalidates the cached
#: fine-tunings); ``runner.FINETUNE_KWARGS`` maps each to ``finetune()``'s keyword.
FINETUNE_DEFAULTS = {"subsample": 0.05, "trajectories": 5, "unroll": 20, "max_unrolls": 50,
                     "meta_lr": 1e-3, "relative_meta_lr": True, "seed": 0}

#: The net config of the paper-faithful and ablation weights, for the untrained stand-in that
#: ``--allow-random-weights`` builds when a shipped file is missing. The other weights names
#: are an architecture's default weights (:mod:`l2l_optim.registry`).
STANDIN_NETS: dict[str, tuple[str, dict]] = {
    "simple": ("simple", {}),
    "simple-sf": ("simple", {"input_norm": "rms", "averaging": 0.9}),
    "simple-v0": ("simple", {}),
    "simple-bias": ("simple", {"bias": True}),
    "simple-noagg": ("simple", {"aggregate": False}),
    "simple-uniform": ("simple", {}),
}

EXPERIMENTS: dict[str, Experiment] = {
    e.name: e
    for e in [
        Experiment(
            "fig2", "Figure 2: the meta-optimizers on the base MLP, far beyond their 200 meta-training steps",
            "mnist-mlp", (SIMPLE, DM_ONE_SEED, RNNPROP_ONE_SEED, SGD, ADAM),
            paper="All three are meta-trained on the base MLP for 200 steps and run for 10,000; RNNProp and "
                  "DMOptimizer stall or diverge while SimpleOptimizer keeps decreasing.",
            claims=(Claim("simple", "dm"), Claim("simple", "rnnprop"),
                    Claim("simple", "sgd", claimed=False), Claim("simple", "adam", claimed=False)),
            search_steps=1000,
            note="DMOptimizer and RNNProp: 1 seed each (~0.25 s per step on the base MLP on one CPU core, "
                 "~45 min a run). Tuned SGD and Adam are added for context.",
        ),
        Experiment(
            "fig3", "Figure 3: ablations of SimpleOptimizer on the base MLP", "mnist-mlp",
            (SIMPLE,
             OptSpec("simple-bias", "ablation: with biases", "learned", "simple-bias"),
             OptSpec("simple-noagg", "ablation: no aggregation", "learned", "simple-noagg"),
             OptSpec("simple-uniform", "ablation: uniform meta-loss", "learned", "simple-uniform")),
            paper="Putting the biases back, removing the mean aggregation, or meta-training with the uniform "
                  "loss each makes the optimizer worse.",
            claims=(Claim("simple", "simple-bias"), Claim("simple", "simple-noagg"),
                    Claim("simple", "simple-uniform")),
        ),
        Experiment(
            "fig4a", "Figure 4a: transfer to LeNet on MNIST (no fine-tuning)", "mnist-lenet",
            (SIMPLE, SGD, ADAM, DM_SHORT, RNNPROP_SHORT, DEFAULT),
            paper="Meta-trained on the base MLP only, SimpleOptimizer trains LeNet better than well-tuned SGD.",
            claims=(Claim("simple", "sgd"), Claim("simple", "adam", claimed=False),
                    Claim("simple-default", "sgd", claimed=False),
                    Claim("simple", "dm", claimed=False), Claim("simple", "rnnprop", claimed=False)),
            search_steps=500,
            note="500-step lr searches; DMOptimizer and RNNProp (context, not a claim): 500 steps and 1 seed.",
        ),
        Experiment(
            "fig4b", "Figure 4b: LeNet on Fashion-MNIST (the paper: CIFAR-10), with and without fine-tuning",
            "fmnist-lenet", (SIMPLE, FINETUNED, SGD, ADAM),
            paper="On a new dataset, SimpleOptimizer fine-tuned on a 5% subsample beats SGD and Adam whose "
                  "learning rates were tuned on the same subsample. (The paper uses CIFAR-10, which is not "
                  "available offline here; Fashion-MNIST is the new dataset.)",
            claims=(Claim("simple-finetuned", "sgd"), Claim("simple-finetuned", "adam"),
                    Claim("simple-finetuned", "simple", claimed=False)),
            finetune=dict(FINETUNE_DEFAULTS, max_unrolls=10),
            search_steps=500,
            note="500-step lr searches; fine-tuning trajectories capped at 10 unrolls of 20 steps.",
        ),
        Experiment(
            "fig5a", "Figure 5a: a 5-layer MLP with 16x the parameters on MNIST (no fine-tuning)", "mnist-mlp5",
            (SIMPLE, SGD, ADAM, DEFAULT),
            paper="Without fine-tuning, SimpleOptimizer trains a 5-layer MLP with 16x the base MLP's "
                  "parameters better than the tuned hand-written optimizers.",
            claims=(Claim("simple", "sgd"), Claim("simple", "adam"),
                    Claim("simple-default", "sgd", claimed=False)),
            search_steps=1000,
            note="1,000-step learning-rate searches. A step of the 6.4M-parameter MLP costs 0.05-0.12 s on "
                 "one core (SGD-SimpleOptimizer), ~70 min on 2 cores with two processes side by side.",
        ),
        Experiment(
            "fig5b", "Figure 5b: a ResNet-18-style CNN (28x the base MLP) on Fashion-MNIST, with fine-tuning",
            "fmnist-resnet", (FINETUNED, SIMPLE, SGD, ADAM),
            paper="On a much larger CNN (GoogLeNet on CIFAR-10 in the paper, 250x the base MLP), SimpleOptimizer "
                  "fine-tuned on a 5% subsample beats tuned SGD and Adam.",
            claims=(Claim("simple-finetuned", "sgd"), Claim("simple-finetuned", "adam"),
                    Claim("simple-finetuned", "simple", claimed=False)),
            steps=150, seeds=1, search_steps=50,
            finetune=dict(FINETUNE_DEFAULTS, trajectories=2, unroll=5, max_unrolls=4),
            note="150 steps, 1 seed, 50-step learning-rate searches, and fine-tuning of 2 trajectories of at most 4 "
                 "unrolls of 5 steps: an 11.2M-parameter ResNet step costs ~0.5-1 s on 2 CPU cores, and an "
                 "unroll's graph holds ~1.5 GB per step.",
        ),
        Experiment(
            "fig5b-long", "Figure 5b, longer: ResNet-18's layout at width 16 (1.76x the base MLP) on "
            "Fashion-MNIST, with fine-tuning", "fmnist-resnet16", (FINETUNED, SIMPLE, SGD, ADAM),
            paper="On a much larger CNN (GoogLeNet on CIFAR-10 in the paper, 250x the base MLP), SimpleOptimizer "
                  "fine-tuned on a 5% subsample beats tuned SGD and Adam.",
            claims=(Claim("simple-finetuned", "sgd"), Claim("simple-finetuned", "adam"),
                    Claim("simple-finetuned", "simple", claimed=False)),
            steps=2000, seeds=3, search_steps=300,
            finetune=dict(FINETUNE_DEFAULTS),
            note="fig5b's protocol for 2,000 steps x 3 seeds, on ResNet-18's layout at a quarter of its width "
                 "(701,178 parameters, 1.76x the base MLP, where fig5b's has 28x and the paper's GoogLeNet 250x): "
                 "a step of this one costs ~45-60 ms on one CPU core (timed alone; a run sharing the cores with "
                 "other jobs takes 2-4x that), of fig5b's ~0.5-1 s on two. 300-step learning-rate searches. "
                 "Fine-tuning with the default settings (5 trajectories, unrolls of 20 steps, at most 50 per "
                 "trajectory): a trajectory stops when an unroll's mean loss falls below half its initial loss, "
                 "which here takes one unroll (6-23 s per trajectory), so the cap costs nothing.",
        ),
    ]
}

ALL = ("table1", "fig2", "fig3", "fig4a", "fig4b", "fig5a", "fig5b", "fig5b-long")

#: the paper's Table 1: parameters and ms per optimizer step (its device is not stated)
PAPER_TABLE1 = {"simple": (132, 1.96), "dm": (5301, 21.88), "rnnprop": (6801, 37.02)}


@dataclass
class Settings:
    """Command-line settings shared by every experiment."""

    out: Path = Path("results")
    steps: int | None = None
    seeds: int | None = None
    search_steps: int | None = None
    batch_size: int = 128
    data_root: str | None = None
    task: str | None = None
    trajectories: int | None = None
    max_unrolls: int | None = None
    unroll: int | None = None
    subsample: float | None = None
    allow_random_weights: bool = False
    force: bool = False
    quiet: bool = False
    command: str = ""

    def plan(self, exp: Experiment) -> dict[str, tuple[int, int]]:
        """Optimizer key -> (steps, seeds) of ``exp`` after the command-line overrides."""
        return {o.key: (self.steps or o.steps or exp.steps, self.seeds or o.seeds or exp.seeds) for o in exp.opts}

    def finetune_settings(self, exp: Experiment) -> dict:
        """``exp``'s fine-tuning settings after the command-line overrides."""
        ft = dict(exp.finetune or {})
        for key, value in (("trajectories", self.trajectories), ("max_unrolls", self.max_unrolls),
                           ("unroll", self.unroll), ("subsample", self.subsample)):
            if value is not None:
                ft[key] = value
        return ft
