"""Nets with every weight random, for tests that need weights unlike the shipped ones."""

from __future__ import annotations

import torch

from l2l_optim.nets import SimpleOptimizerNet


def random_simple(seed: int = 0, **config) -> SimpleOptimizerNet:
    """A SimpleOptimizerNet with every weight drawn from N(0, 1) under ``seed``."""
    torch.manual_seed(seed)
    net = SimpleOptimizerNet(**config)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p))
    return net
