"""The vectorised task population and the ES engine (no dataset files: fake images)."""

from __future__ import annotations

import json
import random

import pytest
import torch

from l2l_optim.meta.es import ESConfig, es_generation, meta_train_es
from l2l_optim.meta.families import FAMILIES, VARIANTS, ImageData, TaskSpec, build_task, sample_spec
from l2l_optim.meta.population import (
    fitness,
    flatten,
    load_flat,
    population_step,
    run_population,
    unflatten,
)
from l2l_optim.nets import SimpleOptimizerNet
from l2l_optim.meta.init_rules import init_net


def fake_images() -> ImageData:
    gen = torch.Generator().manual_seed(0)
    data = {name: (torch.randn(200, 1, 28, 28, generator=gen), torch.randint(0, 10, (200,), generator=gen))
            for name in ("mnist", "fashion-mnist")}
    return ImageData(lambda name: data[name])


def random_net(seed: int) -> SimpleOptimizerNet:
    torch.manual_seed(seed)
    net = SimpleOptimizerNet()
    with torch.no_grad():
        net.w_out.normal_(0, 0.01)
        net.beta.fill_(0.7)
        net.alpha.fill_(1.3)
    return net


def test_population_step_is_the_net_forward_for_every_member():
    nets = [random_net(s) for s in range(3)]
    theta = torch.stack([flatten(n) for n in nets])
    g = torch.randn(3, 50)
    h = torch.randn(3, 10, 50) * 0.5
    u, h_new = population_step(unflatten(theta), g, h)
    for m, net in enumerate(nets):
        u_ref, s_ref = net(g[m], {"h": h[m]})
        torch.testing.assert_close(u[m], u_ref, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(h_new[m], s_ref["h"], rtol=1e-5, atol=1e-7)


def test_flatten_and_load_flat_round_trip():
    net = random_net(0)
    theta = flatten(net)
    assert theta.numel() == 132
    other = load_flat(SimpleOptimizerNet(), theta)
    for a, b in zip(net.parameters(), other.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="no bias, with aggregation"):
        flatten(SimpleOptimizerNet(bias=True))


@pytest.mark.parametrize("family", FAMILIES + tuple(VARIANTS))
def test_every_family_trains_and_members_of_an_instance_agree(family):
    spec = sample_spec(random.Random(3), (family,))
    task = build_task(spec, 2, 3, seed=1, images=fake_images(), scaled_fraction=0.5)
    theta = flatten(init_net(SimpleOptimizerNet(), "sign")).expand(task.M, -1).clone()
    losses = run_population(task, theta, 20)
    assert losses.shape == (21, 6) and torch.isfinite(losses).all()
    # the three members of one instance share init, batches and scales, and the same rule
    for a, b in [(0, 1), (0, 2), (3, 4), (3, 5)]:
        torch.testing.assert_close(losses[:, a], losses[:, b])
    assert not torch.allclose(losses[:, 0], losses[:, 3])  # instances differ


@pytest.mark.parametrize("family", ["mlp", "lm", "regression"])
@pytest.mark.parametrize("input_norm,averaging", [(None, 0.0), ("rms", 0.0), ("rms", 0.9)])
def test_fused_kernel_path_matches_the_torch_path(family, input_norm, averaging):
    # the kernel path runs the input norm and the averaging in the kernel's passes, the torch
    # path as torch ops around population_step
    spec = sample_spec(random.Random(5), (family,))
    nets = [random_net(s) for s in range(4)]
    theta = torch.stack([flatten(n) for n in nets])
    runs = [run_population(build_task(spec, 2, 2, seed=2, images=fake_images()), theta, 15, impl=impl,
                           input_norm=input_norm, averaging=averaging) for impl in ("auto", "torch")]
    torch.testing.assert_close(runs[0], runs[1], rtol=2e-4, atol=1e-5)


def test_scale_augmentation_scales_the_gradients_the_rule_sees():
    spec = TaskSpec("regression", {"batch_size": 16, "init_scale": 1.0, "inputs": 4, "hidden": [8], "act": "tanh",
                                   "noise": 0.1})
    task = build_task(spec, 4, 1, seed=0, scaled_fraction=1.0, scale_range=(1e-3, 1e3))
    s = task.param_scales
    assert s.min() < 0.1 and s.max() > 10
    assert not torch.allclose(task.loss_scales, torch.ones(4))
    plain = build_task(spec, 4, 1, seed=0, scaled_fraction=0.0)
    assert torch.equal(plain.param_scales, torch.ones_like(plain.param_scales))


def test_a_diverging_member_is_frozen_at_the_bound():
    spec = TaskSpec("quadratic", {"batch_size": 1, "init_scale": 1.0, "dim": 8, "cond": 10.0, "noise": 0.1})
    task = build_task(spec, 1, 2, seed=0)
    good = flatten(init_net(SimpleOptimizerNet(), "sign"))
    bad = good.clone()
    bad[-20:-10] *= -1e4  # huge steps uphill
    losses = run_population(task, torch.stack([good, bad]), 30)
    assert torch.isfinite(losses).all()
    assert float(losses[-1, 1]) == pytest.approx(float(losses[0, 1]) * 1e3, rel=1e-5)
    assert losses[-1, 0] < losses[0, 0]


class _RootTask:
    """Two members minimising sum sqrt(|p|) from p = [0, 1] and [1, 1]: member 0's loss is
    finite, its gradient infinite at p = 0."""

    M = 2

    def init_params(self):
        return {"p": torch.tensor([[0.0, 1.0], [1.0, 1.0]])}

    def sample_batch(self):
        return None

    def losses(self, params, batch):
        return params["p"].abs().sqrt().sum(1) + 1.0


@pytest.mark.parametrize("impl", ["auto", "torch"])
def test_a_member_with_a_non_finite_gradient_is_frozen(impl):
    losses = run_population(_RootTask(), flatten(init_net(SimpleOptimizerNet(), "sign")).expand(2, -1),
                            5, impl=impl)
    assert torch.isfinite(losses).all()
    # frozen at once: every loss, the first included, reads as the bound (1e3 x the loss of 2)
    assert (losses[:, 0] == 2000.0).all()
    assert losses[-1, 1] < losses[0, 1]  # the other member trains


def test_fitness_is_the_weighted_log_ratio():
    losses = torch.tensor([[2.0, 2.0], [1.0, 2.0], [0.5, 2.0]])
    f = fitness(losses)
    expected = (1 * torch.log(torch.tensor(0.5)) + 2 * torch.log(torch.tensor(0.25))) / 3
    assert f[0] == pytest.approx(float(expected)) and f[1] == pytest.approx(0.0)


def test_es_gradient_points_downhill_on_a_known_direction():
    """Members with a larger step size do better on a plain quadratic: the estimate says so."""
    cfg = ESConfig(families=("quadratic",), instances=2, pairs=16, horizons=(30,), sigma=0.1)
    net = init_net(SimpleOptimizerNet(), "sign", lr=1e-4)  # steps far too small for this task
    theta = flatten(net)
    scales = theta.abs().clamp_min(1e-3)
    grad, entry = es_generation(theta, scales, cfg, 0, None)
    out_idx = slice(112, 122)  # w_out[:10]: negative; larger |w_out| = larger steps
    # descent moves z against the gradient: the output weights should grow in magnitude
    assert (grad[out_idx] > 0).float().mean() > 0.8
    assert entry["family"] == "quadratic" and entry["optimizee_steps"] == 2 * 33 * 30


def test_es_run_resumes_to_the_same_weights(tmp_path):
    cfg = dict(families=("regression", "quadratic"), instances=1, pairs=2, horizons=(10,))
    straight = meta_train_es(tmp_path / "a", init=init_net(SimpleOptimizerNet(), "sign"),
                             config=ESConfig(generations=4, **cfg), progress=False)
    meta_train_es(tmp_path / "b", init=init_net(SimpleOptimizerNet(), "sign"),
                  config=ESConfig(generations=2, **cfg), progress=False)
    resumed = meta_train_es(tmp_path / "b", config=ESConfig(generations=4, **cfg), progress=False)
    for p, q in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    log = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [e["generation"] for e in log] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="another configuration"):
        meta_train_es(tmp_path / "b", config=ESConfig(generations=5, **dict(cfg, pairs=3)), progress=False)


def test_bptt_engine_agrees_with_es_on_a_known_direction(tmp_path):
    from l2l_optim.meta.population_bptt import bptt_generation

    cfg = ESConfig(families=("quadratic",), instances=2, pairs=16, horizons=(30,), sigma=0.1)
    net = init_net(SimpleOptimizerNet(), "sign", lr=1e-4)
    theta = flatten(net)
    scales = theta.abs().clamp_min(1e-3)
    grad, entry = bptt_generation(theta / scales, scales, cfg, 0, None, unroll=10)
    assert (grad[112:122] > 0).float().mean() > 0.8  # larger steps, as ES finds
    assert entry["optimizee_steps"] == 2 * 30
    # and the engine runs inside the resumable loop
    meta_train_es(tmp_path, init=net, config=ESConfig(families=("quadratic",), instances=1, pairs=1,
                                                       horizons=(20,), generations=2), engine="bptt", progress=False)
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 2


def test_max_recurrent_norm_keeps_w_hh_a_contraction(tmp_path):
    net = init_net(SimpleOptimizerNet(), "sign")
    with torch.no_grad():
        net.w_hh.copy_(1.3 * torch.eye(10))  # above 1: the rule would keep stepping on its own
    cfg = ESConfig(families=("quadratic",), instances=1, pairs=2, horizons=(10,), generations=3,
                   meta_lr=0.2, max_recurrent_norm=0.97)
    out = meta_train_es(tmp_path, init=net, config=cfg, progress=False)
    assert torch.linalg.matrix_norm(out.w_hh.detach().double(), 2).item() <= 0.97 + 1e-6
    # the projection is part of the run's definition: recorded, and resumed with it
    assert json.loads((tmp_path / "config.json").read_text())["max_recurrent_norm"] == 0.97
    with pytest.raises(ValueError, match="another configuration"):
        meta_train_es(tmp_path, config=ESConfig(**{**cfg.__dict__, "max_recurrent_norm": None,
                                                   "generations": 4}), progress=False)
    with pytest.raises(ValueError, match="max_recurrent_norm must be positive"):
        ESConfig(max_recurrent_norm=0.0).validate()


def test_mlp_wide_draws_wide_full_size_mlps_and_leaves_mlp_draws_unchanged():
    specs = [sample_spec(random.Random(s), ("mlp-wide",)) for s in range(40)]
    assert {sp.family for sp in specs} == {"mlp"}
    assert all(sp.config["side"] == 28 and 1 <= len(sp.config["hidden"]) <= 2 for sp in specs)
    assert {w for sp in specs for w in sp.config["hidden"]} == {96, 128, 192}
    # the validation suite's wide MLP (784-256-256-10) is not in the family
    assert all(256 not in sp.config["hidden"] for sp in specs)
    # a run that never names the variant draws what it always drew
    narrow = [sample_spec(random.Random(s), ("mlp",)).config["hidden"] for s in range(40)]
    assert max(w for h in narrow for w in h) <= 128
    ESConfig(families=("mlp-wide", "quadratic")).validate()
    with pytest.raises(ValueError, match="unknown task families"):
        ESConfig(families=("mlp-huge",)).validate()
