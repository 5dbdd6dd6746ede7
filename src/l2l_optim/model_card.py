"""The model card of a weights repo: the ``README.md`` that the Hub shows beside the weights.

:func:`model_card` writes YAML front matter (library, tags, the base weights of a fine-tune)
and what the weights are: architecture, fingerprint, recipe and command, results, and how to
load them.
"""

from __future__ import annotations

import json
from typing import Any

from .nets import CoordinatewiseNet
from .registry import get_architecture
from .weight_file import fingerprint

__all__ = ["model_card"]

_LIBRARY = "l2l-optim"

_RESULTS = {
    "selected_eval_loss": "held-out evaluation loss of the selected net",
    "init_eval_loss": "held-out evaluation loss of the starting point",
    "final_optimizee_loss_last5": "final optimizee training loss, mean of the last 5 trajectories",
    "final_meta_loss": "meta-loss of the last trajectory",
    "selected_trajectory": "trajectory the saved net was selected after",
}


def _json_or_text(value: str) -> Any:
    try:
        return json.loads(value)
    except (TypeError, json.JSONDecodeError, RecursionError):
        # text, or JSON nested too deeply to be worth showing as structure
        return value


def model_card(net: CoordinatewiseNet, metadata: dict[str, str], *, repo_id: str | None = None) -> str:
    """The ``README.md`` of a weights repo: YAML front matter, then what the weights are.

    Args:
        net: the net the card describes.
        metadata: the weights' metadata (recipe, command, results, fine-tuning settings and
            log), as stored in a weight file.
        repo_id: the Hub repo, used in the usage example (default: a local directory).

    Returns:
        The card's text.

    Example:
        >>> from l2l_optim.nets import SimpleOptimizerNet
        >>> model_card(SimpleOptimizerNet(), {}).splitlines()[1]
        'library_name: l2l-optim'
    """
    from . import __version__

    arch = get_architecture(net.arch)
    fp = fingerprint(net)
    tags = [_LIBRARY, "learned-optimizer", "meta-learning", "optimizer", "pytorch", f"l2l-optim-{net.arch}"]
    finetune = _json_or_text(metadata["finetune"]) if "finetune" in metadata else None
    if isinstance(finetune, dict):
        tags.append("fine-tuned")
    front = [
        "---",
        f"library_name: {_LIBRARY}",
        "license: apache-2.0",
        "tags:",
        *(f"- {t}" for t in tags),
        "---",
    ]
    where = repo_id or "path/to/this/directory"
    body = [
        "",
        f"# {arch.optimizer_name} meta-weights" + (f": {repo_id}" if repo_id else ""),
        "",
        "A learned optimizer for PyTorch from l2l-optim (`pip install l2l-optim`): the coordinate-wise net of "
        f"`{arch.optimizer_name}` (`{type(net).__name__}`), {net.num_parameters()} meta-trained "
        "parameters, stored as safetensors.",
        "",
        "| | |",
        "|---|---|",
        f"| architecture | `{net.arch}`, config `{json.dumps(net.config, sort_keys=True)}` |",
        f"| parameters | {net.num_parameters()} |",
        f"| fingerprint | `{fp}` |",
        f"| written by | l2l-optim {__version__} |",
        "",
        "## Usage",
        "",
        "```python",
        f"from l2l_optim import {arch.optimizer_name}",
        "",
        f'opt = {arch.optimizer_name}.from_pretrained("{where}", model.parameters())',
        "```",
        "",
        "The update is applied as meta-trained with `lr=1.0`; schedulers and per-group `lr` "
        "scale it.",
    ]
    if getattr(net, "averaging", 0.0):
        body += ["", f"The rule runs inside Schedule-Free averaging (`averaging={net.averaging}`), "
                     "meta-trained at a constant `lr`: no schedule is needed. As with Schedule-Free "
                     "AdamW, call `opt.eval()` before evaluating or saving the model (the parameters "
                     "move to the running average) and `opt.train()` before training goes on."]
    recipe = _json_or_text(metadata["recipe"]) if "recipe" in metadata else None
    if recipe is not None or "command" in metadata:
        body += ["", "## Meta-training recipe", ""]
        if "command" in metadata and metadata["command"]:
            body += ["Command:", "", "```", metadata["command"], "```", ""]
        if recipe is not None:
            body += ["```json", json.dumps(recipe, indent=2, sort_keys=True), "```"]
    if isinstance(finetune, dict):
        body += ["", "## Fine-tuning", "",
                 "Fine-tuned with `l2l_optim.finetuning` from "
                 f"`{finetune.get('base_weights', 'unknown weights')}`; settings:", "",
                 "```json", json.dumps(finetune, indent=2, sort_keys=True), "```"]
    results = [(label, metadata[key]) for key, label in _RESULTS.items() if metadata.get(key) not in (None, "null")]
    log = _json_or_text(metadata["finetune_log"]) if "finetune_log" in metadata else None
    body += ["", "## Results", ""]
    if results:
        body += ["Measured during meta-training (command above):", "", "| measure | value |", "|---|---|"]
        body += [f"| {label} | {value} |" for label, value in results]
    if isinstance(log, list) and log:
        body += ([""] if results else []) + ["Fine-tuning trajectories (settings above):", "",
                 "| trajectory | initial loss | final loss | target | reached |", "|---|---|---|---|---|"]
        for e in log:
            body.append(
                f"| {e.get('trajectory')} | {e.get('initial_loss', float('nan')):.4g} | "
                f"{e.get('final_avg_loss', float('nan')):.4g} | {e.get('target', float('nan')):.4g} | "
                f"{'yes' if e.get('reached_target') else 'no'} |"
            )
    if not results and not (isinstance(log, list) and log):
        body.append("No measured results travel with these weights.")
    if "derived_from" in metadata:
        body += ["", f"These weights were changed after they were loaded from weights with fingerprint "
                     f"`{metadata['derived_from']}`; that file's recipe does not describe them."]
    return "\n".join(front + body) + "\n"
