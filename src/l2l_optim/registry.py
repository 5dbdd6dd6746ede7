"""One table of the learned-optimizer architectures: name -> net, optimizer, weights, init.

Everything that goes from an architecture's name to something concrete (the optimizer
classes, weight files, meta-training, the benchmark, the reproduction) asks this table, so an
architecture is added in one place.

Example:
    >>> from l2l_optim.registry import get_architecture, build_net
    >>> arch = get_architecture("simple")
    >>> arch.default_weights, arch.default_init
    ('simple-sf', 'sign')
    >>> build_net("simple").num_parameters()
    132
"""

from __future__ import annotations

from dataclasses import dataclass

from .nets import CoordinatewiseNet, DMOptimizerNet, RNNPropNet, SimpleOptimizerNet

__all__ = ["Architecture", "ARCHITECTURES", "get_architecture", "build_net"]


@dataclass(frozen=True)
class Architecture:
    """One learned-optimizer architecture.

    Attributes:
        name: the registry name, stored in weight files (``net.arch``).
        net_class: the :class:`~l2l_optim.nets.CoordinatewiseNet` subclass.
        optimizer_name: the name of its ``torch.optim`` class in :mod:`l2l_optim.optimizer`
            (:func:`l2l_optim.optimizer.optimizer_class` hands out the class).
        default_weights: the shipped weights its optimizer uses by default.
        default_init: the :func:`~l2l_optim.meta.init_rules.init_net` starting point
            meta-training uses.
    """

    name: str
    net_class: type[CoordinatewiseNet]
    optimizer_name: str
    default_weights: str
    default_init: str


ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (
        Architecture("simple", SimpleOptimizerNet, "SimpleOptimizer", "simple-sf", "sign"),
        Architecture("dm", DMOptimizerNet, "DMOptimizer", "dm", "small-output"),
        Architecture("rnnprop", RNNPropNet, "RNNProp", "rnnprop", "small-output"),
    )
}


def get_architecture(name: str) -> Architecture:
    """The registry entry of ``name``.

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    try:
        return ARCHITECTURES[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown meta-optimizer architecture {name!r}; known: {sorted(ARCHITECTURES)}"
        ) from None


def build_net(arch: str, config: dict | None = None) -> CoordinatewiseNet:
    """Build a net from its architecture name and constructor config.

    Raises:
        ValueError: unknown ``arch``, or a config the constructor does not accept.
    """
    cls = get_architecture(arch).net_class
    try:
        return cls(**(config or {}))
    except TypeError as e:
        raise ValueError(f"bad config for architecture {arch!r}: {config!r} ({e})") from None
