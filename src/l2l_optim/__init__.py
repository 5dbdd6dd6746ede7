"""l2l-optim: learned optimizers for PyTorch, starting with the 132-parameter SimpleOptimizer.

Example:
    >>> import torch
    >>> from l2l_optim import SimpleOptimizer
    >>> model = torch.nn.Linear(4, 2)
    >>> opt = SimpleOptimizer(model.parameters())          # shipped meta-trained weights
    >>> model(torch.randn(8, 4)).pow(2).mean().backward()
    >>> opt.step()
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Public name -> defining module. Imported lazily so that `import l2l_optim` stays cheap and
# a missing optional piece (a compiler, Triton) cannot break the import of the rest.
_EXPORTS = {
    "SimpleOptimizer": "optimizer",
    "DMOptimizer": "optimizer",
    "RNNProp": "optimizer",
    "LearnedOptimizer": "optimizer",
    "SimpleOptimizerNet": "nets",
    "DMOptimizerNet": "nets",
    "RNNPropNet": "nets",
    "simple_update": "functional",
    "meta_fit": "meta",
    "finetune": "finetuning",
    "list_weights": "weights",
    "load_weights": "hub",
    "save_weights": "weights",
    "WeightsError": "weights",
    "RunningRms": "functional",
    "SkippedStepWarning": "nonfinite",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return __all__
