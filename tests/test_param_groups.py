"""Per-group options as torch's own optimizer tests use them: every option in one group of two,
the other group on the optimizer's defaults, with the shipped weights, in float32 and float64.
Two checks of torch's generic suite, written for these optimizers: a weight group with weight
decay and a bias group without it train a linear model; a group at a learning rate of 1e-28
stays where it is while the other group trains."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.nn import Parameter

from l2l_optim import DMOptimizer, RNNProp, SimpleOptimizer

# each group's own options, the optimizer's defaults left for the other group
OPTIONS = [
    {},
    {"lr": 0.5},
    {"lr": torch.tensor(0.5)},
    {"weight_decay": 1e-3},
    {"maximize": True},
    {"nonfinite": "raise"},
    {"lr": 0.7, "nonfinite": "raise", "weight_decay": 1e-3, "state_dtype": torch.bfloat16},
    {"lr": 0.7, "nonfinite": "raise", "maximize": True},
]
CLASSES = [SimpleOptimizer, DMOptimizer, RNNProp]


def _model(dtype):
    torch.manual_seed(0)
    weight = Parameter(torch.randn(10, 5, dtype=dtype))
    bias = Parameter(torch.randn(10, dtype=dtype))
    x = torch.randn(5, dtype=dtype)
    return weight, bias, lambda: (weight.mv(x) + bias).pow(2).sum()


def _moved_the_right_way(options, before, after) -> bool:
    return after > before if options.get("maximize") else after < before


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_a_group_without_weight_decay_beside_one_with_all_options(cls, dtype):
    for options in OPTIONS:
        weight, bias, loss = _model(dtype)
        opt = cls([dict(params=[weight], **options),
                   dict(params=[bias], **{**options, "weight_decay": 0.0})])
        before = loss().item()
        for _ in range(20):
            opt.zero_grad()
            loss().backward()
            opt.step()
        assert _moved_the_right_way(options, before, loss().item()), options


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_a_group_at_a_vanishing_lr_stays_while_the_other_trains(cls, dtype):
    for options in OPTIONS:
        weight, bias, loss = _model(dtype)
        still = Parameter(torch.randn(2, dtype=dtype))
        start = still.detach().clone()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # lr=1e-28 is far below the learned scale, on purpose
            opt = cls([dict(params=[weight, bias], **{"lr": 1.0, **options}), dict(params=[still])],
                      lr=1e-28)
        before = loss().item()
        for _ in range(20):
            opt.zero_grad()
            loss().backward()
            still.grad = torch.rand_like(still)
            opt.step()
        assert _moved_the_right_way(options, before, loss().item()), options
        assert torch.equal(still, start), options
