"""The command line: ``l2l-optim <command>``, the same program as ``python -m l2l_optim``.

Commands:

=============  ==========================================================================
``info``       the fused CPU kernel in use (instruction set, library), the shipped weights
               and the l2l-optim weights in the local Hugging Face cache, with their
               metadata and fingerprints
``meta-fit``   meta-train an optimizer net with truncated BPTT (:mod:`l2l_optim.meta.fit`)
``meta-es``    meta-train SimpleOptimizer by ES on the task population (:mod:`l2l_optim.meta.es`)
``finetune``   fine-tune meta-weights on a model (``module:factory``) and a dataset name or
               an ``ImageFolder`` directory; writes the weights, a model card and a plot
``eval``       evaluate meta-weights (:mod:`l2l_optim.evaluation`)
=============  ==========================================================================

``info`` and ``finetune`` are parsed here; every other command is a module with a
``main(argv)`` function that gets the arguments after the command name, so a module plugs
in by its entry in :data:`DELEGATED`. Its parser lives in :mod:`l2l_optim.cli_args`, which
imports no torch: ``--help``, ``--version``, each command's ``--help`` and every argument
error answer at once, and torch is imported only when a command runs.

Exit status: 0 on success, 2 for a usage error (an argument argparse refuses, or one that
names nothing usable: a MODEL that cannot be imported, DATA that is not there, unknown
weights), 1 when a command fails while it runs.

Example:
    >>> from l2l_optim.cli import main
    >>> main(["info"])  # doctest: +SKIP
    l2l-optim 0.1.0 (torch ..., Python ...)
    <BLANKLINE>
    shipped weights (...):
    name            arch     params  fingerprint       recipe
    dm              dm       5301    ...
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .cli_args import PROG, fraction, non_negative_int, open_fraction, positive_float, positive_int
from .cli_args import parse as parse_command

__all__ = ["PROG", "DELEGATED", "UsageError", "build_parser", "main"]

#: command -> (module whose ``main(argv)`` runs it, one-line help); imported when used
DELEGATED: dict[str, tuple[str, str]] = {
    "meta-fit": ("l2l_optim.meta.fit", "meta-train an optimizer net and write its weights"),
    "eval": ("l2l_optim.evaluation", "evaluate meta-weights against tuned baselines"),
    "meta-es": ("l2l_optim.meta.es", "meta-train SimpleOptimizer by ES on the task population"),
}
_DATASETS = ("mnist", "fashion-mnist")


class UsageError(ValueError):
    """An argument that names nothing usable (exit status 2, like argparse's errors)."""


def _torch_version() -> str:
    """torch's ``__version__`` (with its local part, e.g. ``+cpu``), read from its
    ``version.py`` without importing torch; the distribution's version if that fails."""
    try:
        spec = importlib.util.find_spec("torch")
        for folder in (spec.submodule_search_locations or []) if spec else []:
            text = (Path(folder) / "version.py").read_text()
            found = re.search(r"^__version__\s*(?::\s*str\s*)?=\s*['\"]([^'\"]+)['\"]", text, re.M)
            if found:
                return found.group(1)
    except (OSError, ValueError, ImportError):
        pass
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _version() -> str:
    from . import __version__

    return f"{PROG} {__version__} (torch {_torch_version()}, Python {platform.python_version()})"


# --------------------------------------------------------------------------------- info

# the recipe fields worth a glance in the table, in order (MetaFitConfig names; "loss" is
# what older files call meta_loss)
_RECIPE_FIELDS = ("task", "meta_loss", "loss", "trajectories", "steps", "unroll", "meta_lr", "init", "seed")


def _recipe_summary(meta: dict[str, str], width: int = 60) -> str:
    recipe = meta.get("recipe", "")
    if not recipe and "finetune" in meta:
        try:
            settings = json.loads(meta["finetune"])
        except (json.JSONDecodeError, RecursionError):
            settings = None
        base = settings.get("base_weights", "?") if isinstance(settings, dict) else "?"
        recipe = f"fine-tuned from {base}"
    try:
        parsed = json.loads(recipe)
    except (json.JSONDecodeError, RecursionError):  # free text, or JSON nested too deep to read
        parsed = None
    if isinstance(parsed, dict):
        picked = [f"{k}={parsed[k]}" for k in _RECIPE_FIELDS if k in parsed]
        if parsed.get("net_config"):
            picked.insert(0, json.dumps(parsed["net_config"], sort_keys=True, separators=(",", ":")))
        recipe = " ".join(picked) if picked else recipe
    return recipe if len(recipe) <= width else recipe[: width - 3] + "..."


def _num_params(entries: dict[str, dict]) -> int:
    total = 0
    for entry in entries.values():
        n = 1
        for s in entry["shape"]:
            n *= int(s)
        total += n
    return total


def _cached_weights() -> tuple[Path | None, dict[str, Path], str | None]:
    """``(cache dir, hf:// address -> file, problem)`` of l2l-optim weights in the local HF cache.

    Reads the cache directory and each ``.safetensors`` file's header, never the network.
    """
    try:
        from huggingface_hub import constants, scan_cache_dir
    except ImportError:
        return None, {}, "huggingface_hub is not installed"
    from .weight_file import FORMAT, WeightsError, read_header

    cache = Path(os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE)
    if not cache.is_dir():
        return cache, {}, None
    try:
        info = scan_cache_dir(cache)
    except Exception as e:  # a corrupted cache: say so, list nothing
        return cache, {}, f"cannot read the cache ({type(e).__name__}: {e})"
    found: dict[str, Path] = {}
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        for rev in repo.revisions:
            ref = sorted(rev.refs)[0] if rev.refs else rev.commit_hash[:12]
            at = "" if ref == "main" else f"@{ref}"
            for f in sorted(rev.files, key=lambda f: str(f.file_path)):
                if not f.file_name.endswith(".safetensors"):
                    continue
                try:
                    if read_header(f.file_path)[0].get("format") != FORMAT:
                        continue
                except WeightsError:
                    continue
                rel = f.file_path.relative_to(rev.snapshot_path).as_posix()
                found[f"hf://{repo.repo_id}{at}/{rel}"] = f.file_path
    return cache, found, None


def _table(files: dict[str, Path]) -> list[str]:
    from .weight_file import WeightsError, read_header

    rows = [("name", "arch", "params", "fingerprint", "recipe")]
    for name, path in files.items():
        try:
            meta, entries = read_header(path)
            rows.append((name, meta.get("arch", "?"), str(_num_params(entries)),
                         meta.get("fingerprint", "?"), _recipe_summary(meta)))
        except WeightsError as e:
            rows.append((name, "?", "?", "?", f"error: {e}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows]


def _kernel_line(info: dict) -> str:
    """One line on the fused CPU kernel: its instruction set and library, or why it is off."""
    if not info["available"]:
        return f"fused CPU kernel: unavailable ({info['error']}; {info['advice']})"
    threads = f"{info['threads']} thread{'s' if info['threads'] != 1 else ''}"
    return (f"fused CPU kernel: {info['isa']} (this CPU runs {', '.join(info['supported'])}), "
            f"{threads}, {info['origin']} library {info['path']}")


def _info(args: argparse.Namespace) -> int:
    from .kernels.cpu import kernel_info
    from .weight_file import WeightsError, read_header
    from .weights import shipped_files, weights_dirs

    shipped = shipped_files()
    cache, cached, problem = _cached_weights()
    if args.json:
        def headers(files: dict[str, Path]) -> dict[str, Any]:
            out = {}
            for name, path in files.items():
                try:
                    out[name] = read_header(path)[0]
                except WeightsError as e:
                    out[name] = {"error": str(e)}
            return out

        print(json.dumps({"shipped": headers(dict(sorted(shipped.items()))), "cached": headers(cached),
                          "cpu_kernel": kernel_info()}, indent=2, sort_keys=True))
        return 0
    print(_version())
    print(_kernel_line(kernel_info()))
    dirs = ", ".join(str(d) for d in weights_dirs()) or "no weights directory found"
    print(f"\nshipped weights ({dirs}):")
    print("\n".join(_table(dict(sorted(shipped.items())))) if shipped else "  none")
    print(f"\nl2l-optim weights in the local Hugging Face cache ({cache or 'none'}):")
    if problem:
        print(f"  {problem}")
    else:
        print("\n".join(_table(cached)) if cached else "  none")
    return 0


# ----------------------------------------------------------------------------- finetune


def _load_factory(spec: str) -> Callable[[], Any]:
    """``module:factory`` or ``path/to/file.py:factory`` -> the factory (UsageError if not)."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"MODEL must be module:factory or path/to/file.py:factory, got {spec!r}")
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise UsageError(f"MODEL {spec!r}: no such file {path}")
        loaded = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(loaded)
        try:
            loaded.loader.exec_module(module)
        except ImportError as e:
            raise UsageError(f"MODEL {spec!r}: cannot import {path} ({e})") from None
    else:
        # as `python -m` does: modules in the working directory are importable
        if "" not in sys.path and os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            raise UsageError(f"MODEL {spec!r}: cannot import {module_name!r} ({e})") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise UsageError(f"MODEL {spec!r}: {module_name} has no callable {attr!r}")
    return factory


def _load_data(args: argparse.Namespace):
    from torch.utils.data import DataLoader, TensorDataset

    if args.data in _DATASETS:
        from .data import load_dataset

        x, y = load_dataset(args.data, "train", root=args.data_root)
        return DataLoader(TensorDataset(x, y), batch_size=args.batch_size)
    root = Path(args.data)
    if not root.is_dir():
        raise UsageError(f"DATA must be one of {', '.join(_DATASETS)} or an ImageFolder directory; "
                         f"{args.data!r} is neither")
    try:
        from torchvision import datasets, transforms
    except ImportError:
        raise UsageError("an ImageFolder directory needs torchvision (pip install torchvision)") from None
    steps = [transforms.Resize((args.image_size, args.image_size))] if args.image_size else []
    try:
        folder = datasets.ImageFolder(str(root), transform=transforms.Compose([*steps, transforms.ToTensor()]))
    except (FileNotFoundError, RuntimeError) as e:
        raise UsageError(f"{root}: not an ImageFolder directory ({e})") from None
    sizes = {tuple(folder[i][0].shape) for i in range(min(len(folder), 64))}
    if len(sizes) > 1:
        raise UsageError(f"{root}: images of different sizes {sorted(sizes)}; pass --image-size")
    return DataLoader(folder, batch_size=args.batch_size)


def _plot_finetune(result, path: Path) -> Path | None:
    """A bar chart of each trajectory's initial and final loss and its target (None: no matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ks = [e["trajectory"] for e in result.log]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(ks) + 2), 3.5))
    ax.bar([k - 0.2 for k in ks], [e["initial_loss"] for e in result.log], 0.4, label="initial loss")
    ax.bar([k + 0.2 for k in ks], [e["final_avg_loss"] for e in result.log], 0.4, label="final loss (last unroll)")
    ax.scatter(ks, [e["target"] for e in result.log], color="black", marker="_", s=400, label="target", zorder=3)
    ax.set_xlabel("trajectory")
    ax.set_ylabel("training loss")
    ax.set_xticks(ks)
    ax.set_title(f"finetune: {result.reached_target} of {len(ks)} trajectories reached the target")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _finetune(args: argparse.Namespace) -> int:
    import torch
    import torch.nn.functional as F

    from .finetuning import finetune
    from .hub import load_weights

    if args.threads:
        torch.set_num_threads(args.threads)
    model = _load_factory(args.model)()
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"MODEL {args.model!r} returned a {type(model).__name__}, not an nn.Module")
    try:
        load_weights(args.weights)  # an unknown name or a bad file, before any data is read
    except ValueError as e:
        raise UsageError(f"--weights: {e}") from None
    loader = _load_data(args)
    loss_fn = {"cross-entropy": F.cross_entropy, "mse": F.mse_loss}[args.loss]
    result = finetune(
        model, loader, weights=args.weights, loss_fn=loss_fn, subsample=args.subsample,
        trajectories=args.trajectories, unroll=args.unroll, max_unrolls=args.max_unrolls,
        target=args.target, meta_lr=args.meta_lr, batch_size=args.batch_size, seed=args.seed,
        progress=not args.quiet,
    )
    out = result.save_pretrained(args.out_dir, repo_id=args.push_to_hub)
    plot = _plot_finetune(result, out / "finetune.png")
    print(f"{result.reached_target} of {len(result.log)} trajectories reached the target")
    print(f"wrote {out / 'weights.safetensors'} and {out / 'README.md'}"
          + (f", plot {plot}" if plot else " (no plot: matplotlib is not installed)"))
    print(f'use: SimpleOptimizer.from_pretrained("{out}", model.parameters())')
    if args.push_to_hub:
        result.push_to_hub(args.push_to_hub)
        print(f"pushed to https://huggingface.co/{args.push_to_hub}")
    return 0


# ------------------------------------------------------------------------------- parser


def _add_finetune(sub) -> None:
    p = sub.add_parser(
        "finetune", help="fine-tune meta-weights on a model and a dataset",
        description="Fine-tune meta-weights on a model and data (l2l_optim.finetuning), then write "
                    "weights.safetensors, a README.md model card and finetune.png into --out-dir.",
    )
    p.add_argument("model", metavar="MODEL",
                   help="module:factory or path/to/file.py:factory; factory() returns the nn.Module")
    p.add_argument("data", metavar="DATA",
                   help=f"{' or '.join(_DATASETS)} (local IDX files), or an ImageFolder directory "
                        "(one subfolder of images per class)")
    p.add_argument("--out-dir", required=True, help="directory for the weights, model card and plot")
    p.add_argument("--weights", default="simple",
                   help="starting meta-weights: a shipped name, a path or hf://owner/repo (default: simple)")
    p.add_argument("--loss", choices=("cross-entropy", "mse"), default="cross-entropy",
                   help="training loss of the model (default: cross-entropy)")
    p.add_argument("--subsample", type=fraction, default=0.05,
                   help="fraction of the data fine-tuned on (default: 0.05)")
    p.add_argument("--trajectories", type=positive_int, default=5, help="fine-tuning trajectories (default: 5)")
    p.add_argument("--unroll", type=positive_int, default=20, help="optimizee steps per unroll (default: 20)")
    p.add_argument("--max-unrolls", type=positive_int, default=50,
                   help="cap on the unrolls of a trajectory (default: 50)")
    p.add_argument("--target", type=open_fraction, default=0.5,
                   help="a trajectory ends below this fraction of its initial loss (default: 0.5)")
    p.add_argument("--meta-lr", type=positive_float, default=1e-3,
                   help="Adam learning rate on the meta-weights (default: 1e-3)")
    p.add_argument("--batch-size", type=positive_int, default=128, help="minibatch size (default: 128)")
    p.add_argument("--image-size", type=positive_int, default=None,
                   help="resize ImageFolder images to this square size (default: keep their size)")
    p.add_argument("--seed", type=int, default=0, help="seeds the subsample, inits and batches (default: 0)")
    p.add_argument("--data-root", default=None, help="directory with the IDX files of mnist / fashion-mnist")
    p.add_argument("--threads", type=non_negative_int, default=None,
                   help="torch intra-op threads (default: torch's)")
    p.add_argument("--push-to-hub", metavar="REPO_ID", default=None,
                   help="also upload the weights and card to this Hugging Face Hub repo")
    p.add_argument("--quiet", action="store_true",
                   help="no progress (default: a bar on a terminal, one line per trajectory otherwise)")
    p.set_defaults(func=_finetune)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser; delegated commands appear in its help with their one-line text.

    Returns:
        The parser (``l2l-optim``).

    Example:
        >>> parser = build_parser()
        >>> parser.prog, parser.parse_args(["info", "--json"]).json
        ('l2l-optim', True)
    """
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Learned optimizers for PyTorch: SimpleOptimizer, DMOptimizer and RNNProp, "
                    "with meta-training, fine-tuning and the Hugging Face Hub.",
        epilog=f"`{PROG} <command> --help` describes a command. `python -m l2l_optim` is the same program.",
    )
    parser.add_argument("--version", action="version", version=_version(),
                        help="print the version of l2l-optim, torch and Python, then exit")
    sub = parser.add_subparsers(dest="command", metavar="<command>", title="commands")
    info = sub.add_parser("info", help="the CPU kernel in use, and the shipped and cached weights with their fingerprints",
                          description="Show the fused CPU kernel in use (instruction set, library) and "
                                      "list the shipped weights and the l2l-optim weights in the "
                                      "local Hugging Face cache (no network).")
    info.add_argument("--json", action="store_true", help="print name -> metadata as JSON")
    info.set_defaults(func=_info)
    _add_finetune(sub)
    for name, (_, text) in DELEGATED.items():
        # parsed by the command's own module; listed here for the help
        sub.add_parser(name, help=text, add_help=False)
    return parser


def _delegate(command: str, argv: list[str]) -> int:
    # parsed here first, without torch: --help and argument errors exit before the import
    parse_command(command, argv)
    module_name = DELEGATED[command][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise
        print(f"{PROG} {command}: not available in this installation (no module {module_name})",
              file=sys.stderr)
        return 2
    return int(module.main(argv) or 0)


def main(argv: list[str] | None = None) -> int:
    """Run one command.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 2 for a usage error (an argument that names nothing
        usable), 1 when a command fails while it runs (the message is on stderr).

    Raises:
        SystemExit: from ``--help`` and ``--version`` (status 0) and from argument errors
            of a command (status 2), as argparse does.

    Example:
        >>> import contextlib, io, json
        >>> out = io.StringIO()
        >>> with contextlib.redirect_stdout(out):
        ...     status = main(["info", "--json"])
        >>> status, json.loads(out.getvalue())["shipped"]["simple"]["arch"]
        (0, 'simple')
        >>> main([])  # no command: the usage goes to stderr
        2

        From a shell, the same program:

        >>> main(["--version"])  # doctest: +SKIP
        l2l-optim 0.1.0 (torch ..., Python ...)
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv:
        parser.print_help(sys.stderr)
        print(f"\n{PROG}: error: a command is required", file=sys.stderr)
        return 2
    if argv[0] in DELEGATED:
        return _delegate(argv[0], argv[1:])
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UsageError as e:
        print(f"{PROG} {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:  # a failure on the input: one line, no traceback
        print(f"{PROG} {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
