"""The meta-weights an experiment runs with: the shipped files, or untrained stand-ins.

A stand-in is a net of the weights' architecture (and, for the ablations, their net config)
at its meta-training starting point. It exists only for smoke runs
(``--allow-random-weights``) and for timing, where the weights' values do not matter; every
summary records which runs used one.
"""

from __future__ import annotations

from collections.abc import Callable

from l2l_optim.nets import CoordinatewiseNet
from l2l_optim.meta.init_rules import init_net
from l2l_optim.optimizer import optimizer_class
from l2l_optim.registry import ARCHITECTURES, build_net, get_architecture
from l2l_optim.weights import WeightsError, fingerprint, resolve_net

from .experiments import STANDIN_NETS
from .seeding import seeded

__all__ = ["resolve_weights", "learned_factory"]


def _standin(name: str) -> CoordinatewiseNet:
    arch = next((a.name for a in ARCHITECTURES.values() if a.default_weights == name), None)
    arch, config = STANDIN_NETS.get(name, (arch, {}))
    if arch is None:
        raise ValueError(f"no untrained stand-in for unknown weights {name!r}")
    # seeded: the same stand-in every run, so the runs cached with it stay valid
    return seeded(lambda: init_net(build_net(arch, config), get_architecture(arch).default_init))


def resolve_weights(name: str, allow_random: bool) -> tuple[CoordinatewiseNet, dict]:
    """The shipped weights ``name``, or (``allow_random``) an untrained stand-in.

    Returns:
        ``(net, info)``: the net and ``{"name", "arch", "fingerprint", "random"}``.

    Raises:
        SystemExit: the weights are not shipped and ``allow_random`` is False.
        ValueError: ``allow_random`` and no stand-in is known for ``name``.
    """
    try:
        net, _ = resolve_net(name)
        random = False
    except WeightsError as e:
        if not allow_random:
            raise SystemExit(f"error: {e}\n(pass --allow-random-weights for a smoke run with untrained weights)")
        net, random = _standin(name), True
    return net, {"name": name, "arch": net.arch, "fingerprint": fingerprint(net), "random": random}


def learned_factory(net: CoordinatewiseNet, arch: str) -> Callable:
    """``params -> optimizer`` of architecture ``arch`` with the meta-weights ``net``."""
    cls = optimizer_class(arch)
    return lambda params: cls(params, weights=net)
