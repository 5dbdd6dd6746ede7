"""Tests of the shipped meta-trained weights and of the optimizers' default ``weights=``.

These need the files in ``weights/`` (written by meta-training, shipped in the repository and
the wheel): every planned name must be present and valid, so a missing or broken file fails.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from l2l_optim import weights as W
from l2l_optim.nets import DMOptimizerNet, RNNPropNet, SimpleOptimizerNet
from l2l_optim.optimizer import DMOptimizer, LearnedOptimizer, RNNProp, SimpleOptimizer

# name -> (net class, parameter count, config the file must hold)
_BASE = {"hidden_size": 10, "bias": False, "aggregate": True}
PLANNED = {
    "simple": (SimpleOptimizerNet, 132, dict(_BASE, input_norm="rms")),
    "simple-raw": (SimpleOptimizerNet, 132, _BASE),
    "simple-sf": (SimpleOptimizerNet, 132, dict(_BASE, input_norm="rms", averaging=0.9)),
    "simple-v0": (SimpleOptimizerNet, 132, _BASE),
    "simple-bias": (SimpleOptimizerNet, 143, dict(_BASE, bias=True)),
    "simple-noagg": (SimpleOptimizerNet, 121, dict(_BASE, aggregate=False)),
    "simple-uniform": (SimpleOptimizerNet, 132, _BASE),
    "dm": (DMOptimizerNet, 5301, None),
    "rnnprop": (RNNPropNet, 6801, None),
}


def test_every_planned_name_is_shipped():
    assert set(PLANNED) <= set(W.list_weights())


@pytest.mark.parametrize("name", sorted(PLANNED))
def test_shipped_file_is_valid_and_documented(name):
    cls, n_params, config = PLANNED[name]
    loaded = W.load_weights(name)  # verifies shapes, dtypes and the fingerprint
    assert type(loaded.net) is cls
    assert loaded.net.num_parameters() == n_params
    assert config is None or loaded.net.config == config  # None: the LSTMs' own defaults
    assert config is not None or loaded.net.config == cls().config
    md = loaded.metadata
    assert md["fingerprint"] == loaded.fingerprint == W.fingerprint(loaded.net)
    for key in ("recipe", "command", "seed"):  # the model card's provenance
        assert key in md, f"{name}: metadata lacks {key!r}"
    assert math.isfinite(float(json.loads(md["final_meta_loss"])))


def test_cli_lists_the_shipped_weights(capsys):
    from l2l_optim.cli import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for name in PLANNED:
        assert name in out


@pytest.mark.parametrize(
    "cls, name", [(SimpleOptimizer, "simple-sf"), (DMOptimizer, "dm"), (RNNProp, "rnnprop")]
)
def test_default_weights_run(cls, name):
    torch.manual_seed(0)
    A, b = torch.randn(32, 8), torch.randn(32)
    x = torch.zeros(8, requires_grad=True)
    opt = cls([x])  # no weights argument: the shipped default
    assert opt.meta_fingerprint == W.load_weights(name).fingerprint
    for _ in range(50):
        def closure():
            opt.zero_grad()
            loss = (A @ x - b).pow(2).mean()
            loss.backward()
            return loss
        loss = opt.step(closure)
        assert math.isfinite(loss.item())
    assert torch.isfinite(x).all() and opt.skipped_steps == 0


def test_shipped_simple_kernel_and_generic_paths_agree():
    torch.manual_seed(0)
    params = [torch.randn(50, 20).requires_grad_(), torch.randn(20).requires_grad_()]
    twins = [p.detach().clone().requires_grad_() for p in params]
    # float32 state, as the generic path keeps it
    kernel = SimpleOptimizer(params, weights="simple", state_dtype=torch.float32)
    generic = LearnedOptimizer(twins, weights="simple")
    for _ in range(5):
        grads = [torch.randn(p.shape) * 0.01 for p in params]
        for p, q, g in zip(params, twins, grads):
            p.grad, q.grad = g.clone(), g.clone()
        kernel.step()
        generic.step()
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)


def test_the_schedule_free_rule_trains_as_a_drop_in():
    # weights="simple-sf": the parameters hold the interpolation point while training,
    # eval() moves them to the average, train() back, as Schedule-Free AdamW does
    torch.manual_seed(0)
    A, b = torch.randn(64, 8), torch.randn(64)
    x = torch.zeros(8, requires_grad=True)
    opt = SimpleOptimizer([x], weights="simple-sf")
    first = None
    for _ in range(200):
        opt.zero_grad()
        loss = (A @ x - b).pow(2).mean()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert opt.skipped_steps == 0 and sorted(opt.state[x]) == ["c", "h", "step", "v", "z"]
    y = x.detach().clone()
    opt.eval()
    at_average = (A @ x - b).pow(2).mean().item()
    opt.train()
    assert torch.equal(x.detach(), y)
    best = torch.linalg.lstsq(A, b.unsqueeze(1)).solution.squeeze(1)
    floor = (A @ best - b).pow(2).mean().item()
    assert at_average - floor < 0.1 * (first - floor)
