"""SimpleOptimizerNet(input_norm="rms"): the gradient over its running rms as the net's input.

The rule is the same 132-parameter net; what changes is its input and one more state tensor.
Every path that runs it (the net's forward, the optimizer's kernels, the population runner of
meta-training) must compute the same thing, and it must be blind to the gradient's scale.
"""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from l2l_optim import SimpleOptimizer
from l2l_optim.functional import simple_update
from l2l_optim.meta.es import ESConfig, meta_train_es
from l2l_optim.meta.families import build_task, sample_spec
from l2l_optim.meta.population import flatten, run_population
from l2l_optim.nets import SimpleOptimizerNet, rms_normalise
from l2l_optim.meta.init_rules import init_net
from l2l_optim.weights import load_weights, save_weights


def rms_net(lr: float = 3e-3) -> SimpleOptimizerNet:
    net = init_net(SimpleOptimizerNet(input_norm="rms"), "adam", lr=lr)
    with torch.no_grad():  # make every unit matter, not only the diagonal init
        net.w_hh.add_(0.05 * torch.randn(10, 10, generator=torch.Generator().manual_seed(0)))
        net.w_out[10:].fill_(1e-4)
    return net


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 1))


def train(m: torch.nn.Module, opt, steps: int = 15, scale: float = 1.0) -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        opt.zero_grad()
        (scale * m(torch.randn(16, 5, generator=g)).pow(2).mean()).backward()
        opt.step()


def flat(m: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in m.parameters()])


@settings(max_examples=50, deadline=None)
@given(st.integers(-10, 30), st.integers(0, 2**31 - 1))
def test_rms_normalise_is_blind_to_the_gradient_scale(exponent, seed):
    gen = torch.Generator().manual_seed(seed)
    # magnitudes 5e-4..1.5e-3, so that eps (1e-12) stays below 1e-5 of every rms here
    g1, g2 = torch.randn(2, 64, generator=gen).sign() * (0.5 + torch.rand(2, 64, generator=gen)) * 1e-3
    # a power of two scales exactly
    c = 2.0 ** exponent
    v, vc, ones, ones_c = torch.zeros(64), torch.zeros(64), torch.zeros(64), torch.zeros(64)
    for g in (g1, g2):
        x, v, ones = rms_normalise(g, v, ones)
        xc, vc, ones_c = rms_normalise(c * g, vc, ones_c)
        torch.testing.assert_close(xc, x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(vc, v * c * c, rtol=1e-6, atol=0)


def test_rms_normalise_is_adams_bias_corrected_second_moment():
    g = torch.randn(30, 5, generator=torch.Generator().manual_seed(0))
    v, c = torch.zeros(5), torch.zeros(5)
    for t in range(1, 31):
        x, v, c = rms_normalise(g[t - 1], v, c)
        # Adam: v_hat_t = sum_i beta^(t-i) (1 - beta) g_i^2 / (1 - beta^t)
        w = 0.999 ** torch.arange(t - 1, -1, -1, dtype=torch.float64)[:, None] * 0.001
        v_hat = (w * g[:t].double() ** 2).sum(0) / (1 - 0.999 ** t)
        torch.testing.assert_close(x.double(), g[t - 1].double() / v_hat.sqrt(), rtol=1e-5, atol=1e-6)
    assert c[0].item() == pytest.approx(1 - 0.999 ** 30, rel=1e-5)
    # the first step is the sign; a zero gradient gives a zero input
    x, _, _ = rms_normalise(torch.tensor([2.0, -0.5, 0.0]), torch.zeros(3), torch.zeros(3))
    assert x.tolist() == [1.0, -1.0, 0.0]


@pytest.mark.parametrize("dtype,huge", [(torch.float32, 2e19), (torch.float32, 3e38),
                                         (torch.float32, -3e38), (torch.float64, 1e160),
                                         (torch.float64, 1.7e308)])
def test_rms_normalise_keeps_the_running_squares_finite_for_every_finite_gradient(dtype, huge):
    # (1 - beta) g^2 is beyond float32 above ~5.8e20: v saturates instead of overflowing
    g = torch.tensor([huge, 1.0, 0.0], dtype=dtype)
    x, v, c = rms_normalise(g, torch.zeros(3, dtype=dtype), torch.zeros(3, dtype=dtype))
    assert torch.isfinite(v).all() and torch.isfinite(x).all()
    assert x[0].item() * huge > 0 and x[1].item() == pytest.approx(1.0) and x[2].item() == 0.0
    for _ in range(3):  # a later ordinary gradient still reaches the net
        x, v, c = rms_normalise(torch.ones(3, dtype=dtype), v, c)
        assert torch.isfinite(v).all() and (x > 0).all()
    # an infinite gradient is not finite: it still poisons v (the optimizer skips such steps)
    _, v, _ = rms_normalise(torch.tensor([float("inf")], dtype=dtype), torch.zeros(1, dtype=dtype),
                            torch.zeros(1, dtype=dtype))
    assert v.isinf().all()
    _, v, _ = rms_normalise(torch.tensor([float("nan")], dtype=dtype), torch.zeros(1, dtype=dtype),
                            torch.zeros(1, dtype=dtype))
    assert v.isnan().all()


@pytest.mark.parametrize("huge", [2e19, 3e38])
@pytest.mark.parametrize("impl", ["cpu", "reference"])
def test_one_huge_finite_gradient_leaves_the_parameter_trainable(impl, huge):
    from l2l_optim import kernels

    if impl == "cpu" and kernels.resolve_impl("auto", "cpu") != "cpu":
        pytest.skip("no CPU kernel in this build")
    p = torch.nn.Parameter(torch.zeros(3))
    opt = SimpleOptimizer([p], impl=impl)  # the shipped default normalises its input
    p.grad = torch.full((3,), huge)
    opt.step()
    for _ in range(5):
        before = p.detach().clone()
        p.grad = torch.ones(3)
        opt.step()
        assert torch.isfinite(opt.state[p]["v"]).all()
        assert torch.isfinite(p).all() and not torch.equal(p.detach(), before)


@pytest.mark.parametrize("impl", ["cpu", "reference"])
def test_optimizer_kernels_match_the_nets_forward(impl):
    from l2l_optim import kernels

    if impl == "cpu" and kernels.resolve_impl("auto", "cpu") != "cpu":
        pytest.skip("no CPU kernel in this build")
    net = rms_net()
    m = model()
    opt = SimpleOptimizer(m.parameters(), weights=net, impl=impl, state_dtype=torch.float32)
    train(m, opt)
    # the net's own forward, over all coordinates at once, as the paper writes the rule
    ref = model()
    ps = list(ref.parameters())
    state = net.init_state(sum(p.numel() for p in ps))
    g = torch.Generator().manual_seed(1)
    for _ in range(15):
        for p in ps:
            p.grad = None
        ref(torch.randn(16, 5, generator=g)).pow(2).mean().backward()
        with torch.no_grad():
            u, state = net(torch.cat([p.grad.reshape(-1) for p in ps]), state)
            i = 0
            for p in ps:
                p.add_(u[i:i + p.numel()].view_as(p))
                i += p.numel()
    torch.testing.assert_close(flat(m), flat(ref), rtol=1e-5, atol=1e-6)
    got = torch.cat([opt.state[p]["v"] for p in m.parameters()])
    torch.testing.assert_close(got, state["v"], rtol=1e-6, atol=0)
    # c, one value per tensor or one per coordinate: the same number everywhere
    c = state["c"].reshape(-1)[:1]
    for p in m.parameters():
        got = opt.state[p]["c"].reshape(-1)
        torch.testing.assert_close(got, c.expand_as(got), rtol=1e-6, atol=0)
    assert not torch.equal(flat(m), flat(model()))


def test_optimizer_is_blind_to_the_loss_scale():
    a, b = model(), model()
    train(a, SimpleOptimizer(a.parameters(), weights=rms_net()))
    train(b, SimpleOptimizer(b.parameters(), weights=rms_net()), scale=2.0 ** -8)
    torch.testing.assert_close(flat(a), flat(b), rtol=1e-4, atol=1e-6)
    # the paper's raw-gradient rule is not
    c, d = model(), model()
    train(c, SimpleOptimizer(c.parameters(), weights="simple-raw"))
    train(d, SimpleOptimizer(d.parameters(), weights="simple-raw"), scale=2.0 ** -8)
    assert not torch.allclose(flat(c), flat(d), rtol=1e-3)


def test_a_skipped_step_leaves_the_running_squares_untouched():
    m = model()
    opt = SimpleOptimizer(m.parameters(), weights=rms_net())
    train(m, opt, steps=3)
    before = {p: {k: t.clone() for k, t in opt.state[p].items()} for p in m.parameters()}
    params = flat(m)
    opt.zero_grad()
    m(torch.randn(4, 5)).pow(2).mean().backward()
    last = list(m.parameters())[-1]
    last.grad.view(-1)[-1] = float("nan")
    with pytest.warns(RuntimeWarning, match="step skipped"):
        opt.step()
    assert torch.equal(flat(m), params)
    for p in m.parameters():
        for k, t in opt.state[p].items():
            assert torch.equal(t, before[p][k]), k


@pytest.mark.parametrize("impl", ["reference", "cpu"])
def test_a_device_skip_flag_keeps_the_running_means(impl):
    from l2l_optim import kernels

    if impl == "cpu" and kernels.resolve_impl("auto", "cpu") != "cpu":
        pytest.skip("no CPU kernel in this build")
    net, p, h = rms_net(), [torch.zeros(2)], [torch.zeros(10, 2)]
    v, c = [torch.tensor([4.0, 1.0])], [torch.tensor([0.5, 0.5])]
    g = [torch.tensor([1.0, 1.0])]
    simple_update(p, g, h, [1.0], net, impl=impl, skip=torch.tensor(True), rms=(v, c))
    assert v[0].tolist() == [4.0, 1.0] and c[0].tolist() == [0.5, 0.5]
    simple_update(p, g, h, [1.0], net, impl=impl, skip=torch.tensor(False), rms=(v, c))
    assert v[0].tolist() == pytest.approx([4.0 * 0.999 + 0.001, 1.0])
    assert c[0].tolist() == pytest.approx([0.5 * 0.999 + 0.001] * 2)


def test_state_dict_round_trip_keeps_float32_squares_under_bfloat16_state():
    m = model()
    opt = SimpleOptimizer(m.parameters(), weights=rms_net(), state_dtype=torch.bfloat16)
    train(m, opt, steps=2)
    state = opt.state[m[0].weight]
    assert state["h"].dtype == torch.bfloat16 and state["v"].dtype == state["c"].dtype == torch.float32
    again = SimpleOptimizer(copy.deepcopy(m).parameters(), weights=rms_net(), state_dtype=torch.bfloat16)
    again.load_state_dict(opt.state_dict())
    loaded = next(iter(again.state.values()))
    assert loaded["v"].dtype == torch.float32
    assert torch.equal(loaded["v"], opt.state[m[0].weight]["v"])


@pytest.mark.parametrize("impl", ["cpu", "reference"])
def test_a_state_dict_with_one_bias_correction_per_coordinate_loads(impl):
    # c saved with one value per coordinate (all equal: every coordinate of a tensor takes the
    # same steps) loads into the layout init_state gives and carries on bitwise
    from l2l_optim import kernels

    if impl == "cpu" and kernels.resolve_impl("auto", "cpu") != "cpu":
        pytest.skip("no CPU kernel in this build")
    m = model()
    opt = SimpleOptimizer(m.parameters(), weights=rms_net(), impl=impl)
    train(m, opt, steps=3)
    saved = copy.deepcopy(opt.state_dict())
    for state in saved["state"].values():
        state["c"] = state["c"].reshape(-1)[:1].expand(state["v"].numel()).clone()
    twin = copy.deepcopy(m)
    other = SimpleOptimizer(twin.parameters(), weights=rms_net(), impl=impl)
    other.load_state_dict(saved)
    train(m, opt, steps=2)
    train(twin, other, steps=2)
    assert torch.equal(flat(m), flat(twin))
    for p, q in zip(m.parameters(), twin.parameters()):
        assert all(torch.equal(opt.state[p][k], other.state[q][k]) for k in opt.state[p])


def test_the_default_weights_normalise_their_input():
    assert SimpleOptimizer([torch.zeros(2, requires_grad=True)]).net.input_norm == "rms"


def test_weight_files_carry_the_input_norm(tmp_path):
    net = rms_net()
    save_weights(net, tmp_path / "w.safetensors")
    loaded = load_weights(tmp_path / "w.safetensors").net
    assert loaded.input_norm == "rms" and loaded.num_parameters() == 132
    assert "input_norm" not in SimpleOptimizerNet().config  # the paper's nets are unchanged
    with pytest.raises(ValueError, match="Invalid input_norm"):
        SimpleOptimizerNet(input_norm="l2")
    with pytest.raises(ValueError, match="needs a SimpleOptimizerNet"):
        init_net(SimpleOptimizerNet(), "adam")


def test_population_runner_trains_as_the_optimizer_does():
    spec = sample_spec(random.Random(0), ("regression",))
    net = rms_net()
    theta = flatten(net).unsqueeze(0)
    losses = run_population(build_task(spec, 1, 1, seed=3), theta, 12, input_norm="rms")
    # the same task, trained member by member through the net's own forward
    task = build_task(spec, 1, 1, seed=3)
    params = task.init_params()
    keys = list(params)
    state = net.init_state(sum(params[k][0].numel() for k in keys))
    ref = []
    for t in range(13):
        leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
        f = task.losses(leaves, task.sample_batch())
        ref.append(float(f[0].detach()))
        if t == 12:
            break
        grads = torch.autograd.grad(f.sum(), [leaves[k] for k in keys])
        with torch.no_grad():
            u, state = net(torch.cat([g[0].reshape(-1) for g in grads]), state)
            i = 0
            for k in keys:
                n = params[k][0].numel()
                params[k] = params[k] + u[i:i + n].view_as(params[k][0]).unsqueeze(0)
                i += n
    torch.testing.assert_close(losses[:, 0], torch.tensor(ref), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="Invalid input_norm"):
        run_population(build_task(spec, 1, 1, seed=3), theta, 2, input_norm="l2")


def test_es_trains_a_normalised_rule_from_the_adam_init(tmp_path):
    cfg = ESConfig(families=("quadratic",), instances=1, pairs=2, horizons=(10,), generations=2,
                   input_norm="rms")
    out = meta_train_es(tmp_path, init="adam", config=cfg, progress=False, init_lr=2e-3)
    assert out.input_norm == "rms"
    assert load_weights(tmp_path / "weights.safetensors").net.input_norm == "rms"
    assert json.loads((tmp_path / "config.json").read_text())["input_norm"] == "rms"
    with pytest.raises(ValueError, match="input_norm"):
        meta_train_es(tmp_path / "other", init="simple-v0", config=cfg, progress=False)
