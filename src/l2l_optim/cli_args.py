"""The argument parsers of the delegated commands (``eval``, ``meta-fit``, ``meta-es``), without torch.

Importing torch takes seconds, so ``l2l-optim --help``, each command's ``--help`` and every
argument error are answered from this module, which imports only the standard library; torch
comes in once a command's arguments are known to be good. The command's own ``main(argv)``
(in :mod:`l2l_optim.evaluation.report`, :mod:`l2l_optim.meta.fit`, :mod:`l2l_optim.meta.es`)
parses with the same parser.

The names a command offers as choices (architectures, tasks, inits, meta-losses, objectives)
and the meta-training defaults are defined beside code that imports torch; they are spelled
out here, and ``tests/test_cli.py`` checks that each matches its source.

Example:
    >>> args = parse_eval(["simple", "--quick"])
    >>> args.tasks, args.steps, args.horizons
    (['sine-regression', 'fmnist-logreg', 'mnist-mlp-narrow'], 300, [300])
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

__all__ = ["PROG", "PARSERS", "parse", "QUICK_TASKS", "QUICK_STEPS", "positive_int", "non_negative_int",
           "positive_float", "fraction", "eval_parser", "parse_eval", "meta_fit_parser", "meta_es_parser"]

PROG = "l2l-optim"

# mirrors of names defined beside torch (tests/test_cli.py pins each to its source)
ARCHITECTURES = ("dm", "rnnprop", "simple")  # registry.ARCHITECTURES
META_FIT_TASKS = ("fmnist-lenet", "fmnist-mlp", "fmnist-resnet", "fmnist-resnet16", "mnist-lenet",
                  "mnist-mlp", "mnist-mlp5")  # tasks.TASKS
INITS = ("default", "sign", "sgd", "adam", "schedule-free", "small-output")  # meta.init_rules.INITS
META_LOSSES = ("weighted", "uniform", "last")  # meta.losses.META_LOSSES
OBJECTIVES = ("final", "weighted")  # meta.population.OBJECTIVES
FAMILIES = ("mlp", "conv", "autoencoder", "lm", "regression", "quadratic")  # meta.families.FAMILIES

#: ``eval --quick``: three cheap tasks (a synthetic regression and two small image models on
#: 28x28 inputs) at a few hundred steps, about a minute on one core
QUICK_TASKS = ("sine-regression", "fmnist-logreg", "mnist-mlp-narrow")
QUICK_STEPS = 300
EVAL_STEPS = 5000
EVAL_HORIZONS = (1000, 5000)


# ---------------------------------------------------------------------- argument types


def _number(kind: Callable[[str], float], check: Callable[[float], bool], what: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not check(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value

    parse.__name__ = what  # argparse names the type in its messages
    return parse


positive_int = _number(int, lambda v: v >= 1, "a positive integer")
non_negative_int = _number(int, lambda v: v >= 0, "a non-negative integer")
positive_float = _number(float, lambda v: v > 0 and v != float("inf"), "a positive number")
#: a number in (0, 1]
fraction = _number(float, lambda v: 0 < v <= 1, "a fraction in (0, 1]")
open_fraction = _number(float, lambda v: 0 < v < 1, "a fraction in (0, 1)")


# --------------------------------------------------------------------------------- eval


def eval_parser() -> argparse.ArgumentParser:
    """The ``l2l-optim eval`` parser; :func:`parse_eval` also fills in the ``--quick`` defaults."""
    p = argparse.ArgumentParser(
        prog=f"{PROG} eval",
        description="Evaluate meta-weights on the validation suite against tuned Adam/SGD, scheduled "
                    "AdamW, Schedule-Free AdamW and Prodigy; print a table and write eval.json and "
                    "eval.png. Start with --quick (three cheap tasks, 300 steps).",
    )
    p.add_argument("weights", nargs="*", metavar="WEIGHTS",
                   help="shipped names (e.g. simple), .safetensors paths, run directories or hf:// addresses")
    p.add_argument("--quick", action="store_true",
                   help=f"a first look: --steps {QUICK_STEPS} --horizons {QUICK_STEPS} and, on the default "
                        f"suite, --tasks {' '.join(QUICK_TASKS)}, unless given; the learned rule at "
                        "lr=1 only (no lr-multiplier sweep, no scheduled runs)")
    p.add_argument("--steps", type=positive_int, default=None,
                   help=f"length of the fixed-lr runs (default: {EVAL_STEPS}; {QUICK_STEPS} with --quick)")
    p.add_argument("--horizons", type=positive_int, nargs="+", default=None,
                   help="horizons compared; those above --steps are dropped and --steps always is one "
                        f"(default: {' '.join(map(str, EVAL_HORIZONS))}; {QUICK_STEPS} with --quick)")
    p.add_argument("--tasks", nargs="+", default=None, metavar="TASK",
                   help="a subset of the suite's tasks (default: all; with --quick, the three above)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="init and minibatch seeds (default: 0)")
    p.add_argument("--suite", default="default", help="the suite's name (default: default)")
    p.add_argument("--out-dir", default="runs/eval", help="where eval.json and eval.png go (default: runs/eval)")
    p.add_argument("--cache-dir", default=None,
                   help="the baseline cache (default: ~/.cache/l2l_optim/eval)")
    p.add_argument("--data-root", default=None,
                   help="a directory holding the MNIST / Fashion-MNIST IDX files, searched first")
    p.add_argument("--threads", type=non_negative_int, default=1,
                   help="torch threads (default: 1; 0: torch's default)")
    p.add_argument("--baselines-only", action="store_true",
                   help="compute the baseline cache and stop (no WEIGHTS needed)")
    p.add_argument("--no-plot", dest="plot", action="store_false", help="do not write eval.png")
    p.add_argument("--quiet", action="store_true", help="no per-run progress lines")
    p.add_argument("--state-dtype", default=None, choices=["float32", "bfloat16"],
                   help="hidden-state dtype of the learned optimizer (default: the optimizer's)")
    return p


def parse_eval(argv: Sequence[str] | None, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """Parse ``l2l-optim eval`` arguments and fill in the defaults that depend on ``--quick``.

    Exits (status 2) on an argument error, as argparse does, without importing torch.
    """
    p = parser or eval_parser()
    args = p.parse_args(argv)
    if not args.weights and not args.baselines_only:
        p.error("give at least one WEIGHTS (or --baselines-only); try: l2l-optim eval simple --quick")
    if args.steps is None:
        args.steps = QUICK_STEPS if args.quick else EVAL_STEPS
    if args.horizons is None:
        args.horizons = [QUICK_STEPS] if args.quick else list(EVAL_HORIZONS)
    if args.tasks is None and args.quick and args.suite == "default":
        args.tasks = list(QUICK_TASKS)
    return args


# ----------------------------------------------------------------------------- meta-fit


def meta_fit_parser() -> argparse.ArgumentParser:
    """The ``l2l-optim meta-fit`` parser (its defaults are :class:`~l2l_optim.meta.MetaFitConfig`'s)."""
    p = argparse.ArgumentParser(
        prog=f"{PROG} meta-fit",
        description="Meta-train a learned optimizer's net with truncated BPTT and write its weights, "
                    "training log and checkpoint to --out-dir (a stopped run resumes).",
    )
    p.add_argument("--arch", default="simple", choices=ARCHITECTURES, help="the net to meta-train (default: simple)")
    p.add_argument("--bias", action="store_true", help="SimpleOptimizerNet with biases (ablation)")
    p.add_argument("--no-aggregate", action="store_true", help="SimpleOptimizerNet without the mean (ablation)")
    p.add_argument("--task", default="mnist-mlp", choices=META_FIT_TASKS,
                   help="the optimizee task (default: mnist-mlp)")
    p.add_argument("--meta-loss", default="weighted", choices=META_LOSSES,
                   help="meta-loss over an unroll's training losses (default: weighted)")
    p.add_argument("--trajectories", type=non_negative_int, default=20,
                   help="optimizee trajectories (fresh inits) to meta-train on (default: 20)")
    p.add_argument("--steps", type=positive_int, default=200,
                   help="optimizee steps per trajectory, a multiple of --unroll (default: 200)")
    p.add_argument("--unroll", type=positive_int, default=20,
                   help="optimizee steps per truncated-BPTT unroll (default: 20)")
    p.add_argument("--meta-lr", type=positive_float, default=1e-3,
                   help="Adam learning rate on the net's weights (default: 0.001)")
    p.add_argument("--absolute-meta-lr", action="store_true",
                   help="plain Adam steps (no per-element scaling by the weights' initial magnitude)")
    p.add_argument("--grad-clip", type=float, default=1.0,
                   help="max norm of the meta-gradient (default: 1)")
    p.add_argument("--init", default=None, choices=INITS,
                   help="the net's starting point (default: the architecture's own, see l2l_optim.registry)")
    p.add_argument("--init-lr", type=positive_float, default=1e-3,
                   help="step size of the 'sign' and 'sgd' inits (default: 0.001)")
    p.add_argument("--batch-size", type=positive_int, default=128, help="optimizee minibatch size (default: 128)")
    p.add_argument("--seed", type=int, default=0, help="seeds the net's init and every trajectory (default: 0)")
    p.add_argument("--eval-every", type=non_negative_int, default=0,
                   help="every this many trajectories, evaluate on a held-out init and keep the best "
                        "net (default: 0, keep the last)")
    p.add_argument("--eval-steps", type=positive_int, default=1000,
                   help="length of each evaluation run in optimizee steps (default: 1000)")
    p.add_argument("--threads", type=non_negative_int, default=None,
                   help="torch intra-op threads (default: torch's)")
    p.add_argument("--data-root", default=None,
                   help="a directory with the IDX dataset files, searched first (default: $L2L_DATA, ...)")
    p.add_argument("--out-dir", required=True, help="output directory (log, checkpoint, weights)")
    p.add_argument("--no-resume", action="store_true", help="start over even if --out-dir holds a checkpoint")
    return p


# ------------------------------------------------------------------------------ meta-es


def meta_es_parser() -> argparse.ArgumentParser:
    """The ``l2l-optim meta-es`` parser (its defaults are :class:`~l2l_optim.meta.es_config.ESConfig`'s)."""
    p = argparse.ArgumentParser(prog=f"{PROG} meta-es",
                                description="Run or resume ES meta-training of SimpleOptimizer in --out-dir.")
    p.add_argument("--out-dir", required=True, help="run directory (config, log, checkpoint, weights)")
    p.add_argument("--init", default="simple-raw",
                   help="starting weights (a shipped name or a path), or an init rule of "
                        "l2l_optim.meta.init_rules.init_net (adam: with --input-norm rms) "
                        "(default: simple-raw)")
    p.add_argument("--families", nargs="+", default=list(FAMILIES), metavar="FAMILY",
                   help="task families to draw from (a family named twice is drawn twice as often; "
                        f"mlp-wide: MLPs on 28x28 with 96-192 units) (default: {' '.join(FAMILIES)})")
    p.add_argument("--instances", type=positive_int, default=4, help="task instances per generation (default: 4)")
    p.add_argument("--pairs", type=positive_int, default=8, help="antithetic pairs per generation (default: 8)")
    p.add_argument("--horizons", type=positive_int, nargs="+", default=[300, 1000, 2000],
                   help="optimizee steps, drawn per generation (default: 300 1000 2000)")
    p.add_argument("--sigma", type=positive_float, default=0.05, help="perturbation size, relative (default: 0.05)")
    p.add_argument("--meta-lr", type=positive_float, default=0.01, help="Adam learning rate, relative (default: 0.01)")
    p.add_argument("--generations", type=positive_int, default=500, help="length of the whole run (default: 500)")
    p.add_argument("--scaled-fraction", type=float, default=0.25,
                   help="fraction of instances with scale augmentation (default: 0.25)")
    p.add_argument("--scale-range", type=positive_float, nargs=2, default=[1e-3, 1e3], metavar=("LO", "HI"),
                   help="log-uniform range of the scale augmentation, parameter and loss scales "
                        "(default: 0.001 1000)")
    p.add_argument("--slow-horizon", type=positive_int, default=500,
                   help="horizon cap of the conv and lm families (default: 500)")
    p.add_argument("--seed", type=int, default=0, help="seeds every generation (default: 0)")
    p.add_argument("--objective", choices=OBJECTIVES, default="weighted",
                   help="weighted: t-weighted mean log loss ratio over the run; final: log loss ratio "
                        "over the last 10%% of the steps, the validation suite's measure (default: weighted)")
    p.add_argument("--max-recurrent-norm", type=float, default=None,
                   help="keep W_hh's largest singular value at or below this (below 1: steps vanish with "
                        "the gradients; default: no bound)")
    p.add_argument("--init-lr", type=positive_float, default=1e-3,
                   help="step size of an init rule given as --init (default: 0.001)")
    p.add_argument("--input-norm", choices=["rms"], default=None,
                   help="feed the net the gradient over its running rms (beyond the paper; default: the raw gradient)")
    p.add_argument("--averaging", type=float, default=0.0,
                   help="Schedule-Free averaging around the rule's step with this interpolation weight "
                        "(0.9: Schedule-Free AdamW's; default 0: off)")
    p.add_argument("--snapshot-every", type=non_negative_int, default=0,
                   help="also save the rule every this many generations, and the starting rule, under "
                        "snapshots/ (default: 0, never)")
    p.add_argument("--engine", choices=["es", "bptt"], default="es",
                   help="es: antithetic evolution strategies; bptt: truncated backpropagation through "
                        "the same generations (default: es)")
    p.add_argument("--until", type=non_negative_int, default=None, help="stop after this generation (resumable)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="stop after this many seconds (resumable)")
    p.add_argument("--threads", type=positive_int, default=1, help="torch intra-op threads (default: 1)")
    p.add_argument("--data-root", default=None,
                   help="a directory with the MNIST / Fashion-MNIST IDX files, searched first")
    return p


#: delegated command -> its parser
PARSERS: dict[str, Callable[[], argparse.ArgumentParser]] = {
    "meta-fit": meta_fit_parser,
    "eval": eval_parser,
    "meta-es": meta_es_parser,
}


def parse(command: str, argv: Sequence[str]) -> argparse.Namespace:
    """Parse a delegated command's arguments as its ``main`` will (``--help`` and argument
    errors exit here, with status 0 and 2)."""
    if command == "eval":
        return parse_eval(argv)
    return PARSERS[command]().parse_args(argv)
