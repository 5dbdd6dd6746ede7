"""examples/rule_response.py: the response curve of a rule, checked on rules with known answers."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from l2l_optim.nets import SimpleOptimizerNet

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "rule_response.py"


@pytest.fixture(scope="module")
def rr():
    spec = importlib.util.spec_from_file_location("rule_response", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def linear_rule(w_hh: float) -> SimpleOptimizerNet:
    """One active unit: h' = tanh(g + w_hh h), u = -h'; the others silent."""
    net = SimpleOptimizerNet()
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        net.w_ih[0, 0] = 1.0
        net.w_hh[0, 0] = w_hh
        net.alpha.fill_(1.0)
        net.w_out[0] = -1.0
    return net


def test_small_constant_gradients_give_momentum_sgd(rr):
    r = rr.response(linear_rule(0.5), gradients=(1e-6,), noise_stds=(1e-6,))
    # linear regime: h* = g / (1 - 0.5), so u / g = -2
    assert r["u_over_g"][0] == pytest.approx(-2.0, rel=1e-4)
    assert r["w_hh_spectral_norm"] == pytest.approx(0.5) and r["w_hh_spectral_radius"] == pytest.approx(0.5)
    # white noise through h' = 0.5 h + g: rms = std / sqrt(1 - 0.25)
    assert r["noise_rms_step"][0] == pytest.approx(1e-6 / 0.75**0.5, rel=0.05)


def test_large_gradients_saturate_to_a_fixed_step(rr):
    r = rr.response(linear_rule(0.5), gradients=(10.0, 100.0), noise_stds=(1e-3,))
    assert [10 * u for u in r["u_over_g"]] == pytest.approx([-1.0, -0.1], rel=1e-3)  # |u| -> 1


def test_an_expanding_recurrence_keeps_stepping_without_gradient_signal(rr):
    # |w_hh| > 1: tanh(1.5 h) has nonzero fixed points, so the step stays O(1) as g -> 0
    r = rr.response(linear_rule(1.5), gradients=(1e-8,), noise_stds=(1e-8,))
    assert abs(r["u_over_g"][0]) > 1e6 and r["noise_rms_step"][0] > 0.5
