"""Tests for l2l_optim.optimizer: the torch.optim contract around the learned update, in
sections that share the fixtures and optimizer factories: validation, the weights' forms, the
step contract, the update maths on both paths, the non-finite policy, state_dict and resuming,
copy and pickle, and the rough edges a new user runs into.
"""

from __future__ import annotations

import copy
import functools
import io
import math
import pickle
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from l2l_optim import SkippedStepWarning
from l2l_optim import hub
from l2l_optim import weights as W
from l2l_optim.nets import CoordinatewiseNet, DMOptimizerNet, RNNPropNet, SimpleOptimizerNet
from l2l_optim.optimizer import DMOptimizer, LearnedOptimizer, RNNProp, SimpleOptimizer
from l2l_optim.weights import WeightsError, fingerprint, load_weights, save_weights

SETTINGS = settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def random_simple(seed: int = 0, **config) -> SimpleOptimizerNet:
    """A SimpleOptimizerNet with every weight random (alpha and beta too)."""
    torch.manual_seed(seed)
    net = SimpleOptimizerNet(**config)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return net


def leaf(*shape, dtype=torch.float32, seed=None):
    if seed is not None:
        torch.manual_seed(seed)
    return torch.randn(shape, dtype=dtype).requires_grad_()


def twin(params):
    return [p.detach().clone().requires_grad_() for p in params]


def set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone().to(p.dtype)


def snapshot(opt):
    """Copies of every parameter and state tensor, to check that nothing changed."""
    params = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
    state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    return params, state


def assert_unchanged(opt, snap):
    params, state = snap
    now = [p.detach() for g in opt.param_groups for p in g["params"]]
    assert all(torch.equal(a, b) for a, b in zip(params, now))
    assert set(state) == {id(p) for p in opt.state}
    for p, s in opt.state.items():
        assert all(torch.equal(s[k], state[id(p)][k]) for k in s)


def net_step_reference(net, params, grads, hiddens, lrs, dtype=torch.float32):
    """theta + lr * u computed directly with the net's forward over all coordinates."""
    net = copy.deepcopy(net).to(dtype)
    sizes = [p.numel() for p in params]
    g = torch.cat([x.reshape(-1).to(dtype) for x in grads])
    h = torch.cat([x.to(dtype) for x in hiddens], dim=-1)
    with torch.no_grad():
        u, new = net(g, {"h": h})
    out = [
        (p.detach().to(dtype) + lr * ui.view(p.shape)).to(p.dtype)
        for p, ui, lr in zip(params, u.split(sizes), lrs)
    ]
    return out, list(new["h"].split(sizes, dim=-1))


class ScaledSignNet(CoordinatewiseNet):
    """A custom net outside the registry: u = -scale * sign(g), state counts steps."""

    arch = "scaled-sign-test"

    def __init__(self, scale: float = 0.1):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(scale))

    @property
    def config(self):
        return {}

    def init_state(self, n, *, device=None, dtype=torch.float32):
        return {"n": torch.zeros(n, device=device, dtype=dtype)}

    def forward(self, grad, state):
        return -self.scale * torch.sign(grad), {"n": state["n"] + 1}


# ------------------------------------------------------------------------- validation


@pytest.mark.parametrize("cls", [SimpleOptimizer, LearnedOptimizer])
@pytest.mark.parametrize("lr", [-1.0, -1e-9, float("nan"), float("inf")])
def test_invalid_lr(cls, lr):
    with pytest.raises(ValueError, match=f"^Invalid learning rate: {lr}$"):
        cls([leaf(2)], lr=lr, weights=random_simple())


def test_invalid_options():
    net = random_simple()
    with pytest.raises(ValueError, match="^Invalid nonfinite policy: 'ignore'"):
        SimpleOptimizer([leaf(2)], weights=net, nonfinite="ignore")
    with pytest.raises(ValueError, match="^Invalid state_dtype: torch.float16"):
        SimpleOptimizer([leaf(2)], weights=net, state_dtype=torch.float16)
    with pytest.raises(ValueError, match="^Invalid impl: 'cuda'"):
        SimpleOptimizer([leaf(2)], weights=net, impl="cuda")
    with pytest.raises(ValueError, match="^optimizer got an empty parameter list$"):
        SimpleOptimizer([], weights=net)
    with pytest.raises(TypeError, match="weights must be"):
        SimpleOptimizer([leaf(2)], weights=42)
    with pytest.raises(ValueError, match="^Invalid state_dtype: torch.float16"):
        DMOptimizer([leaf(2)], weights=DMOptimizerNet(), state_dtype=torch.float16)
    # the LSTM baselines take the base's options, bfloat16 state included
    assert DMOptimizer([leaf(2)], weights=DMOptimizerNet(), state_dtype=torch.bfloat16).defaults[
        "state_dtype"] == torch.bfloat16
    with pytest.raises(ValueError, match="^Tensor lr must be 1-element$"):
        SimpleOptimizer([leaf(2)], lr=torch.ones(2), weights=net)


def test_wrong_architecture_is_refused(tmp_path):
    with pytest.raises(ValueError, match="SimpleOptimizer needs SimpleOptimizerNet weights"):
        SimpleOptimizer([leaf(2)], weights=DMOptimizerNet())
    with pytest.raises(ValueError, match="DMOptimizer needs DMOptimizerNet weights"):
        DMOptimizer([leaf(2)], weights=random_simple())
    with pytest.raises(ValueError, match="RNNProp needs RNNPropNet weights"):
        RNNProp([leaf(2)], weights=DMOptimizerNet())
    path = save_weights(DMOptimizerNet(hidden_size=3), tmp_path / "dm.safetensors")
    with pytest.raises(WeightsError, match="holds 'dm' weights, but 'simple' was requested"):
        SimpleOptimizer([leaf(2)], weights=path)


def test_complex_and_integer_params_are_refused():
    with pytest.raises(ValueError, match="does not support complex parameters"):
        SimpleOptimizer([torch.zeros(2, dtype=torch.cfloat, requires_grad=True)],
                        weights=random_simple())
    with pytest.raises(ValueError, match="only floating-point parameters"):
        SimpleOptimizer([torch.zeros(2, dtype=torch.int64)], weights=random_simple())


def test_complex_grad_at_step_is_refused():
    p = leaf(3)
    opt = SimpleOptimizer([p], weights=random_simple())
    p.data = torch.randn(3, dtype=torch.cfloat)  # turned complex after construction
    p.grad = torch.randn(3, dtype=torch.cfloat)
    with pytest.raises(ValueError, match="does not support complex gradients"):
        opt.step()


def test_params_on_several_devices_are_refused():
    with pytest.raises(ValueError, match="all parameters on one device"):
        SimpleOptimizer([leaf(2), torch.empty(2, device="meta", requires_grad=True)],
                        weights=random_simple())


def test_bad_group_is_refused_and_not_added():
    opt = SimpleOptimizer([leaf(2)], weights=random_simple())
    with pytest.raises(ValueError, match="^Invalid learning rate: -0.5$"):
        opt.add_param_group({"params": [leaf(3)], "lr": -0.5})
    with pytest.raises(ValueError, match="one device"):
        opt.add_param_group({"params": [torch.empty(2, device="meta", requires_grad=True)]})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("cls, net", [(SimpleOptimizer, random_simple()),
                                      (DMOptimizer, DMOptimizerNet(hidden_size=3))])
def test_sparse_gradients_are_refused(cls, net):
    emb = nn.Embedding(5, 2, sparse=True)
    opt = cls(emb.parameters(), weights=net)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match=f"^{cls.__name__} does not support sparse gradients$"):
        opt.step()


# ---------------------------------------------------------------------- weights forms


def test_weights_forms(tmp_path, monkeypatch):
    net = random_simple(1)
    path = save_weights(net, tmp_path / "run")  # a run directory
    fp = fingerprint(net)
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    save_weights(net, shipped / "simple-sf.safetensors")
    monkeypatch.setattr(W, "weights_dirs", lambda: [shipped])
    forms = [net, load_weights(path), path, str(path), tmp_path / "run", "simple-sf", None]
    for form in forms:  # None: the default, the shipped "simple-sf"
        opt = SimpleOptimizer([leaf(2)], weights=form)
        assert opt.meta_fingerprint == fp
        assert not opt.net.training
        assert not any(p.requires_grad for p in opt.net.parameters())


def test_missing_default_weights_say_so(monkeypatch, tmp_path):
    monkeypatch.setattr(W, "weights_dirs", lambda: [])
    with pytest.raises(WeightsError, match="unknown weights 'simple-sf'"):
        SimpleOptimizer([leaf(2)])
    with pytest.raises(WeightsError, match="unknown weights 'dm'"):
        DMOptimizer([leaf(2)])
    with pytest.raises(WeightsError, match="unknown weights 'rnnprop'"):
        RNNProp([leaf(2)])


def test_user_net_is_copied_not_touched():
    net = random_simple(2)
    net.train()
    before = copy.deepcopy(net.state_dict())
    p = leaf(4, seed=0)
    opt = SimpleOptimizer([p], weights=net)
    assert opt.net is not net
    assert net.training and all(q.requires_grad for q in net.parameters())
    with torch.no_grad():
        net.w_hh.zero_()  # later edits of the user's net do not reach the optimizer
    p.grad = torch.ones(4)
    opt.step()
    assert not torch.equal(opt.net.w_hh, net.w_hh)
    assert torch.equal(before["w_ih"], net.w_ih)


def test_in_place_edits_of_opt_net_are_picked_up():
    p = leaf(5, seed=0)
    q = twin([p])[0]
    a = SimpleOptimizer([p], weights=random_simple(3))
    b = SimpleOptimizer([q], weights=random_simple(4))
    set_grads([p], [torch.ones(5)])
    a.step()  # fills the folded-weight cache
    with torch.no_grad():
        for x, y in zip(a.net.parameters(), b.net.parameters()):
            x.copy_(y)
    for s in a.state.values():
        s["h"].zero_()
    p.data.copy_(q.data)
    set_grads([p, q], [torch.ones(5), torch.ones(5)])
    a.step()
    b.step()
    assert torch.equal(p, q)


# ---------------------------------------------------------------------- step contract


def test_step_closure_and_return_value():
    model = nn.Linear(3, 1)
    opt = SimpleOptimizer(model.parameters(), weights=random_simple())
    x = torch.randn(4, 3)

    def closure():
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()  # needs grad mode even when step runs under no_grad
        return loss

    with torch.no_grad():
        loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.requires_grad
    assert opt.step() is None
    assert opt.state[model.weight]["step"].item() == 2
    assert opt.state[model.weight]["h"].shape == (10, 3)
    assert opt.state[model.bias]["h"].shape == (10, 1)
    assert opt.state[model.weight]["step"].dtype == torch.int64


def test_params_without_grad_are_skipped_and_not_in_the_mean():
    net = random_simple(5)
    a, b, c = leaf(4, seed=1), leaf(3, seed=2), leaf(2, seed=3)
    a2, c2 = twin([a, c])
    opt = SimpleOptimizer([a, b, c], weights=net)
    solo = SimpleOptimizer([a2, c2], weights=net)
    b_before = b.detach().clone()
    for seed in range(3):
        torch.manual_seed(seed)
        g = [torch.randn(4), None, torch.randn(2)]
        set_grads([a, b, c], g)
        set_grads([a2, c2], [g[0], g[2]])
        opt.step()
        solo.step()
    assert torch.equal(b, b_before) and b not in opt.state
    assert torch.equal(a, a2) and torch.equal(c, c2)
    set_grads([a, b, c], [None, None, None])
    snap = snapshot(opt)
    opt.step()  # nothing has a gradient: a no-op
    assert_unchanged(opt, snap)


def test_the_mean_runs_over_all_groups_and_lr_zero_still_counts():
    net = random_simple(6)
    p1, p2 = leaf(6, seed=1), leaf(5, seed=2)
    q1, q2 = twin([p1, p2])
    grouped = SimpleOptimizer([{"params": [p1]}, {"params": [p2], "lr": 0.0}], weights=net)
    single = SimpleOptimizer([q1, q2], weights=net)
    p2_before = p2.detach().clone()
    for seed in range(3):
        torch.manual_seed(seed)
        g = [torch.randn(6), torch.randn(5)]
        set_grads([p1, p2], g)
        set_grads([q1, q2], g)
        grouped.step()
        single.step()
    assert torch.equal(p2, p2_before)  # lr = 0: does not move ...
    assert torch.equal(p1, q1)  # ... but its coordinates count in the mean
    assert torch.equal(grouped.state[p2]["h"], single.state[q2]["h"])


def test_lr_multiplies_the_update_and_schedulers_work():
    net = random_simple(7)
    p = leaf(8, seed=0)
    q, r = twin([p]), twin([p])
    full = SimpleOptimizer([p], lr=1.0, weights=net)
    half = SimpleOptimizer(q, lr=0.5, weights=net)
    sched_opt = SimpleOptimizer(r, lr=1.0, weights=net)
    sched = torch.optim.lr_scheduler.LambdaLR(sched_opt, lambda epoch: 0.5)
    start = p.detach().clone()
    g = torch.randn(8)
    set_grads([p, q[0], r[0]], [g, g, g])
    full.step()
    half.step()
    sched_opt.step()
    sched.step()
    assert torch.allclose(q[0] - start, 0.5 * (p - start), atol=1e-6)
    assert torch.equal(q[0], r[0])  # the scheduler's lr is the one used
    lr_t = SimpleOptimizer(twin([start]), lr=torch.tensor(0.5), weights=net)
    set_grads(lr_t.param_groups[0]["params"], [g])
    lr_t.step()
    assert torch.equal(lr_t.param_groups[0]["params"][0], q[0])


def test_new_param_group_joins_later():
    opt = SimpleOptimizer([leaf(2, seed=0)], weights=random_simple())
    p = leaf(3, seed=1)
    opt.add_param_group({"params": [p], "lr": 0.1})
    p.grad = torch.randn(3)
    before = p.detach().clone()
    opt.step()
    assert not torch.equal(p, before) and opt.state[p]["h"].shape == (10, 3)


# ------------------------------------------------------- update maths and the two paths


@pytest.mark.parametrize("config", [{}, {"aggregate": False}, {"hidden_size": 4}])
@pytest.mark.parametrize("cls", [SimpleOptimizer, LearnedOptimizer])
def test_zero_grad_zero_state_gives_exactly_zero_update(cls, config):
    for seed in range(3):
        params = [leaf(3, 4, seed=seed), leaf(seed=seed + 9), leaf(7, dtype=torch.float64)]
        before = [p.detach().clone() for p in params]
        opt = cls(params, weights=random_simple(seed, **config))
        set_grads(params, [torch.zeros_like(p) for p in params])
        for _ in range(3):
            opt.step()
        assert all(torch.equal(a, b) for a, b in zip(params, before))
        assert all(not s["h"].any() for s in opt.state.values())


def test_bias_variant_moves_on_zero_gradient():
    net = random_simple(8, bias=True)
    p = leaf(4, seed=0)
    before = p.detach().clone()
    opt = SimpleOptimizer([p], weights=net)
    p.grad = torch.zeros(4)
    opt.step()
    assert not torch.equal(p, before)


@SETTINGS
@given(
    shapes=st.lists(
        st.lists(st.integers(1, 5), min_size=0, max_size=3).map(tuple), min_size=1, max_size=4
    ),
    log_scale=st.floats(-6, 3),
    seed=st.integers(0, 2**16),
    aggregate=st.booleans(),
    lr=st.sampled_from([1.0, 0.3, 0.0]),
)
def test_generic_path_matches_kernel_path(shapes, log_scale, seed, aggregate, lr):
    net = random_simple(seed, aggregate=aggregate)
    params = [leaf(*s, seed=seed + i) for i, s in enumerate(shapes)]
    twins = twin(params)
    groups = [{"params": params[:1]}, {"params": params[1:], "lr": lr}]
    twin_groups = [{"params": twins[:1]}, {"params": twins[1:], "lr": lr}]
    if not params[1:]:
        groups, twin_groups = groups[:1], twin_groups[:1]
    # float32 state on both sides (SimpleOptimizer's default, bfloat16, rounds stochastically)
    kernel = SimpleOptimizer(groups, weights=net, impl="reference", state_dtype=torch.float32)
    generic = LearnedOptimizer(twin_groups, weights=net)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(4):
        grads = [torch.randn(p.shape, generator=gen) * 10**log_scale for p in params]
        set_grads(params, grads)
        set_grads(twins, grads)
        kernel.step()
        generic.step()
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(
            kernel.state[p]["h"], generic.state[q]["h"], rtol=1e-6, atol=1e-6
        )


@pytest.mark.parametrize("cls", [SimpleOptimizer, LearnedOptimizer])
def test_update_matches_the_net_forward(cls):
    """One step equals theta + lr * u with u from the net's own forward."""
    net = random_simple(9)
    params = [leaf(4, 3, seed=1), leaf(seed=2), leaf(6, seed=3)]
    lrs = [1.0, 1.0, 0.25]
    opt = cls([{"params": params[:2]}, {"params": params[2:], "lr": 0.25}], weights=net,
              state_dtype=torch.float32)
    h = [torch.zeros(10, p.numel()) for p in params]
    for step in range(3):
        grads = [torch.randn(p.shape) for p in params]
        want, h = net_step_reference(net, params, grads, h, lrs)
        set_grads(params, grads)
        opt.step()
        for p, w, hh in zip(params, want, h):
            torch.testing.assert_close(p.detach(), w, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(opt.state[p]["h"], hh, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cls", [SimpleOptimizer, LearnedOptimizer])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_param_dtypes(cls, dtype):
    net = random_simple(10)
    params = [leaf(3, 4, dtype=dtype, seed=0), leaf(dtype=dtype, seed=1)]
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    opt = cls(params, weights=net, state_dtype=torch.float32)
    h = [torch.zeros(10, p.numel(), dtype=compute) for p in params]
    for _ in range(2):
        grads = [torch.randn(p.shape, dtype=compute).to(dtype) for p in params]
        want, h = net_step_reference(net, params, grads, h, [1.0, 1.0], dtype=compute)
        set_grads(params, grads)
        opt.step()
        tol = {torch.float64: 1e-12, torch.float32: 1e-6}.get(dtype, 1e-2)
        for p, w in zip(params, want):
            assert p.dtype == dtype
            torch.testing.assert_close(p.detach(), w, rtol=tol, atol=tol)
    for p in params:
        assert opt.state[p]["h"].dtype == compute


def test_bf16_state():
    net = random_simple(11)
    p32, p64 = leaf(5, seed=0), leaf(3, dtype=torch.float64, seed=1)
    q32, q64 = twin([p32, p64])
    opt = SimpleOptimizer([p32, p64], weights=net, state_dtype=torch.bfloat16)
    ref = SimpleOptimizer([q32, q64], weights=net)
    g = [torch.randn(5), torch.randn(3, dtype=torch.float64)]
    set_grads([p32, p64, q32, q64], g + g)
    opt.step()
    ref.step()
    assert opt.state[p32]["h"].dtype == torch.bfloat16
    assert opt.state[p64]["h"].dtype == torch.float64  # float64 params keep float64 state
    torch.testing.assert_close(p32, q32)  # first step: the stored h does not matter yet
    torch.testing.assert_close(opt.state[p32]["h"], ref.state[q32]["h"].bfloat16())


@pytest.mark.parametrize("cls", [SimpleOptimizer, LearnedOptimizer])
def test_non_contiguous_and_zero_dim_params(cls):
    net = random_simple(12)
    nc = torch.randn(4, 3).t().requires_grad_()  # a non-contiguous leaf
    zero_dim = leaf(seed=5)
    assert not nc.is_contiguous()
    c, z = (t.detach().contiguous().requires_grad_() for t in (nc, zero_dim))
    opt, ref = cls([nc, zero_dim], weights=net), cls([c, z], weights=net)
    for _ in range(2):
        g = [torch.randn(4, 3).t(), torch.randn(())]
        set_grads([nc, zero_dim], g)
        set_grads([c, z], [g[0].contiguous(), g[1]])
        opt.step()
        ref.step()
    assert not nc.is_contiguous() and zero_dim.shape == ()
    assert torch.equal(nc, c) and torch.equal(zero_dim, z)


@pytest.mark.parametrize("cls, net", [(DMOptimizer, DMOptimizerNet()), (RNNProp, RNNPropNet())])
def test_baselines_train_least_squares_without_nan(cls, net):
    torch.manual_seed(0)
    A, b = torch.randn(20, 5), torch.randn(20)
    x = torch.zeros(5, requires_grad=True)
    opt = cls([x], weights=net)
    losses = []
    for _ in range(40):
        def closure():
            opt.zero_grad()
            loss = (A @ x - b).pow(2).mean()
            loss.backward()
            return loss
        losses.append(opt.step(closure).item())
    assert all(math.isfinite(v) for v in losses)
    assert torch.isfinite(x).all() and x.abs().sum() > 0
    assert all(torch.isfinite(t).all() for t in opt.state[x].values())
    assert set(opt.state[x]) == set(net.init_state(1)) | {"step"}
    assert opt.skipped_steps == 0


def test_custom_net_runs_on_the_generic_path():
    p = leaf(4, seed=0)
    before = p.detach().clone()
    opt = LearnedOptimizer([p], lr=2.0, weights=ScaledSignNet(0.1))
    p.grad = torch.tensor([1.0, -2.0, 0.0, 3.0])
    opt.step()
    torch.testing.assert_close(p.detach(), before - 0.2 * torch.sign(p.grad))
    assert torch.equal(opt.state[p]["n"], torch.ones(4))


# ------------------------------------------------------------------- non-finite policy


def _nan_setup(cls, net):
    params = [leaf(3, 2, seed=0), leaf(4, seed=1)]
    opt = cls(params, weights=net)
    for _ in range(2):
        set_grads(params, [torch.randn(p.shape) for p in params])
        opt.step()
    return params, opt


NETS_FOR_NAN = [
    (SimpleOptimizer, lambda: random_simple(13)),  # impl="auto": the fused CPU kernel here
    (functools.partial(SimpleOptimizer, impl="reference"), lambda: random_simple(13)),
    (LearnedOptimizer, lambda: random_simple(13)),
    (DMOptimizer, lambda: DMOptimizerNet(hidden_size=4)),
    (RNNProp, lambda: RNNPropNet(hidden_size=4)),
]
NAN_IDS = ["SimpleOptimizer", "SimpleOptimizer-reference", "LearnedOptimizer", "DMOptimizer",
           "RNNProp"]


@pytest.mark.parametrize("device_flag", [False, True], ids=["host-check", "device-flag"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("cls, make", NETS_FOR_NAN, ids=NAN_IDS)
def test_nonfinite_skip_changes_nothing(cls, make, bad, device_flag):
    params, opt = _nan_setup(cls, make())
    ref = copy.deepcopy(opt)  # the same optimizer, on copies of the params, minus the bad step
    twins = ref.param_groups[0]["params"]
    snap = snapshot(opt)
    grads = [torch.randn(p.shape) for p in params]
    grads[1][2] = bad
    set_grads(params, grads)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if device_flag:
            # what step() does on an accelerator: the update runs, vetoed by a device flag that
            # is never read on the host
            with torch.no_grad():
                ps, gs, lrs, groups, _ = opt._gather()
                opt._apply(ps, gs, lrs, groups, skip=torch.tensor(True))
        else:
            opt.step()
    assert_unchanged(opt, snap)
    if device_flag:
        assert caught == []
    else:
        assert opt.skipped_steps == 1
        assert [w.category for w in caught] == [SkippedStepWarning]
        assert "non-finite gradient" in str(caught[0].message)
        assert caught[0].filename == __file__  # points at the caller's step()
    # and training goes on exactly as if the bad step had never happened
    good = [torch.randn(p.shape) for p in params]
    set_grads(params, good)
    set_grads(twins, good)
    opt.step()
    ref.step()
    for p, t in zip(params, twins):
        assert torch.equal(p, t)
        assert all(torch.isfinite(v).all() for v in opt.state[p].values())
        assert opt.state[p]["step"].item() == 3


def test_nonfinite_on_the_first_step_creates_no_state():
    p = leaf(3, seed=0)
    opt = SimpleOptimizer([p], weights=random_simple())
    p.grad = torch.tensor([0.0, float("nan"), 1.0])
    with pytest.warns(RuntimeWarning):
        opt.step()
    assert len(opt.state) == 0 and opt.skipped_steps == 1


@pytest.mark.parametrize("cls, make", NETS_FOR_NAN, ids=NAN_IDS)
def test_nonfinite_raise(cls, make):
    params = [leaf(3, seed=0), leaf(2, seed=1), leaf(4, seed=2)]
    opt = cls([{"params": params[:1]}, {"params": params[1:]}], weights=make(),
              nonfinite="raise")
    set_grads(params, [torch.randn(p.shape) for p in params])
    opt.step()
    snap = snapshot(opt)
    grads = [torch.randn(p.shape) for p in params]
    grads[2][0] = float("nan")
    set_grads(params, grads)
    with pytest.raises(FloatingPointError, match=r"parameter 2 \(group 1, shape \(4,\)\)"):
        opt.step()
    assert_unchanged(opt, snap)
    assert opt.skipped_steps == 0


@pytest.mark.parametrize("policy", ["skip", "raise"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("impl", ["cpu", "reference"])
def test_nonfinite_at_the_very_last_coordinate_is_caught(impl, dtype, policy):
    # the fused path scans the gradients in blocks of vectors: the last element of the last
    # tensor (past every whole block and vector) must be seen, in every gradient dtype
    from l2l_optim.kernels import available_impls

    if impl not in available_impls("cpu"):
        pytest.skip(f"impl={impl!r} is unavailable here")
    params = [leaf(3, 2, dtype=dtype, seed=0), leaf(70001, dtype=dtype, seed=1)]
    opt = SimpleOptimizer(params, weights=random_simple(13), impl=impl, nonfinite=policy)
    set_grads(params, [torch.randn(p.shape) for p in params])
    opt.step()
    snap = snapshot(opt)
    for bad in (float("nan"), float("inf"), -float("inf")):
        grads = [torch.randn(p.shape) for p in params]
        set_grads(params, grads)
        params[1].grad[-1] = bad
        assert params[1].grad.dtype == dtype
        if policy == "raise":
            with pytest.raises(FloatingPointError, match=r"parameter 1 \(group 0, shape \(70001,\)\)"):
                opt.step()
        else:
            # its own category, so a loop that reports skipped_steps can silence exactly it
            with pytest.warns(SkippedStepWarning, match="non-finite gradient"):
                opt.step()
        assert_unchanged(opt, snap)
    assert opt.skipped_steps == (3 if policy == "skip" else 0)
    assert all(s["step"].item() == 1 for s in opt.state.values())


def test_nonfinite_in_a_bfloat16_gradient_of_a_float32_parameter_is_caught():
    # gradients may have another dtype than their parameter; the scan reads each as stored
    p = leaf(5000, seed=3)
    opt = SimpleOptimizer([p], weights=random_simple(13), nonfinite="raise")
    g = torch.randn(5000).to(torch.bfloat16)
    g[4321] = float("inf")
    if hasattr(p, "grad_dtype"):  # torch >= 2.9 checks a gradient's dtype unless told not to
        p.grad_dtype = None
    p.grad = g
    with pytest.raises(FloatingPointError, match="parameter 0"):
        opt.step()
    g[4321] = 1.0
    opt.step()
    assert opt.state[p]["step"].item() == 1


# ------------------------------------------------------------- state_dict and resuming


def _train(opt, model, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    x = torch.randn(16, 4, generator=gen).to(dtype)
    y = torch.randn(16, 2, generator=gen).to(dtype)
    for i in range(steps):
        idx = torch.randint(0, 16, (8,), generator=gen)

        def closure():
            opt.zero_grad()
            loss = (model(x[idx]) - y[idx]).pow(2).mean()
            loss.backward()
            return loss

        opt.step(closure)


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).to(dtype)


RESUME_CASES = [
    ("simple", lambda m, **kw: SimpleOptimizer(m, weights=random_simple(14), **kw), {}),
    ("simple-bf16-state", lambda m, **kw: SimpleOptimizer(
        m, weights=random_simple(14), state_dtype=torch.bfloat16, **kw), {}),
    ("simple-bf16-params", lambda m, **kw: SimpleOptimizer(m, weights=random_simple(14), **kw),
     {"dtype": torch.bfloat16}),
    ("generic-f64", lambda m, **kw: LearnedOptimizer(m, weights=random_simple(14), **kw),
     {"dtype": torch.float64}),
    ("dm", lambda m, **kw: DMOptimizer(m, weights=DMOptimizerNet(hidden_size=4), **kw), {}),
    ("rnnprop", lambda m, **kw: RNNProp(m, weights=RNNPropNet(hidden_size=4), **kw), {}),
]


@pytest.mark.parametrize("make, model_kw", [c[1:] for c in RESUME_CASES],
                         ids=[c[0] for c in RESUME_CASES])
def test_resume_is_bit_identical(make, model_kw):
    straight_model = _model(**model_kw)
    straight = make(straight_model.parameters(), lr=0.5)
    _train(straight, straight_model, 10, seed=0)
    _train(straight, straight_model, 10, seed=1)

    first_model = _model(**model_kw)
    first = make(first_model.parameters(), lr=0.5)
    _train(first, first_model, 10, seed=0)
    buf = io.BytesIO()
    torch.save({"model": first_model.state_dict(), "opt": first.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    resumed_model = _model(**model_kw)
    resumed_model.load_state_dict(ckpt["model"])
    resumed = make(resumed_model.parameters(), lr=123.0)  # lr comes back from the state
    resumed.net.load_state_dict(first.net.state_dict())
    resumed.load_state_dict(ckpt["opt"])
    for p, q in zip(first_model.parameters(), resumed_model.parameters()):
        for k, v in first.state[p].items():
            assert resumed.state[q][k].dtype == v.dtype and torch.equal(resumed.state[q][k], v)
    _train(resumed, resumed_model, 10, seed=1)
    for p, q in zip(straight_model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)
    assert resumed.param_groups[0]["lr"] == 0.5


def test_state_dict_carries_the_fingerprint_and_load_checks_it():
    net = random_simple(15)
    p = leaf(3, seed=0)
    opt = SimpleOptimizer([p], weights=net)
    p.grad = torch.ones(3)
    opt.step()
    sd = opt.state_dict()
    assert [g["meta_fingerprint"] for g in sd["param_groups"]] == [fingerprint(net)]
    assert fingerprint(net) == opt.meta_fingerprint
    other = SimpleOptimizer([leaf(3)], weights=random_simple(16))
    snap = snapshot(other)
    with pytest.raises(ValueError, match=f"saved with meta-weights {fingerprint(net)}") as err:
        other.load_state_dict(sd)
    assert "weights=" not in str(err.value)  # not shipped: no name to give
    assert_unchanged(other, snap)
    # a state saved with shipped weights names them (a state from before a change of default)
    shipped = SimpleOptimizer([p], weights="simple")
    shipped.step()
    with pytest.raises(ValueError, match=r"with the same weights \(weights='simple'\)$"):
        SimpleOptimizer([leaf(3)]).load_state_dict(shipped.state_dict())
    plain = {"state": sd["state"], "param_groups": [
        {k: v for k, v in g.items() if k != "meta_fingerprint"} for g in sd["param_groups"]]}
    with pytest.raises(ValueError, match="no 'meta_fingerprint'"):
        SimpleOptimizer([leaf(3)], weights=net).load_state_dict(plain)
    assert "meta_fingerprint" in sd["param_groups"][0]  # the caller's dict is not modified
    # the live groups never hold a (possibly stale) fingerprint
    assert all("meta_fingerprint" not in g for g in opt.param_groups)


def test_a_state_dict_rebuilt_from_state_and_param_groups_loads():
    """What distributed checkpointing does: keep only "state" and "param_groups", copied."""
    net = random_simple(15)
    model = _model()
    opt = SimpleOptimizer(model.parameters(), weights=net, lr=0.5)
    _train(opt, model, 3, seed=0)
    sd = opt.state_dict()
    rebuilt = {
        "state": {k: {n: t.clone() for n, t in v.items()} for k, v in sd["state"].items()},
        "param_groups": [dict(g) for g in sd["param_groups"]],
    }
    model2 = copy.deepcopy(model)
    opt2 = SimpleOptimizer(model2.parameters(), weights=net)
    opt2.load_state_dict(rebuilt)
    assert opt2.param_groups[0]["lr"] == 0.5
    _train(opt, model, 3, seed=1)
    _train(opt2, model2, 3, seed=1)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


def test_a_state_dict_with_the_fingerprint_at_the_top_still_loads():
    net = random_simple(15)
    p = leaf(3, seed=0)
    opt = SimpleOptimizer([p], weights=net)
    p.grad = torch.ones(3)
    opt.step()
    sd = opt.state_dict()
    legacy = {"state": sd["state"], "meta_fingerprint": fingerprint(net), "param_groups": [
        {k: v for k, v in g.items() if k not in ("meta_fingerprint", "impl", "nonfinite", "state_dtype")}
        for g in sd["param_groups"]]}
    q = leaf(3, seed=0)
    opt2 = SimpleOptimizer([q], weights=net)
    opt2.load_state_dict(legacy)
    assert torch.equal(opt2.state[q]["h"], opt.state[p]["h"])
    # the groups take the optimizer's defaults
    assert opt2.param_groups[0]["impl"] == "auto" and opt2.param_groups[0]["state_dtype"] == torch.bfloat16


def test_impl_is_refused_per_group_and_state_dtype_is_not():
    # one step is one kernel call over every group, so the kernel is the optimizer's
    net = random_simple(15)
    with pytest.raises(ValueError, match="'impl' applies to the whole step"):
        SimpleOptimizer([{"params": [leaf(2)], "impl": "reference"}], weights=net, impl="auto")
    opt = SimpleOptimizer([{"params": [leaf(2)], "state_dtype": torch.float32}, {"params": [leaf(3)]}],
                          weights=net)  # the second group takes the default
    for g in opt.param_groups:
        for p in g["params"]:
            p.grad = torch.ones_like(p)
    opt.step()
    dtypes = [opt.state[p]["h"].dtype for g in opt.param_groups for p in g["params"]]
    assert dtypes == [torch.float32, torch.bfloat16]


def test_load_state_dict_rejects_a_state_that_does_not_fit():
    net = random_simple(17)
    p = leaf(3, seed=0)
    opt = SimpleOptimizer([p], weights=net)
    p.grad = torch.ones(3)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    target = SimpleOptimizer([leaf(5)], weights=net)  # same weights, other shape
    with pytest.raises(ValueError, match=r"state 'h' has shape .*expected \(10, 5\)"):
        target.load_state_dict(sd)
    assert len(target.state) == 0
    sd["state"][0]["extra"] = torch.zeros(1)
    with pytest.raises(ValueError, match="state keys"):
        SimpleOptimizer([leaf(3)], weights=net).load_state_dict(sd)
    with pytest.raises(ValueError, match="different number of parameter groups"):
        SimpleOptimizer([{"params": [leaf(3)]}, {"params": [leaf(1)]}],
                        weights=net).load_state_dict(opt.state_dict())


# -------------------------------------------------------------------- copy and pickle


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize(
    "make",
    [
        lambda ps: SimpleOptimizer(ps, weights=random_simple(18), impl="reference",
                                   state_dtype=torch.bfloat16, nonfinite="raise"),
        lambda ps: DMOptimizer(ps, weights=DMOptimizerNet(hidden_size=3)),
        lambda ps: LearnedOptimizer(ps, weights=ScaledSignNet(0.3)),
    ],
    ids=["simple", "dm", "custom-net"],
)
def test_copies_keep_the_meta_weights_and_options(make, how):
    model = _model()
    opt = make(model.parameters())
    _train(opt, model, 3, seed=0)
    if how == "deepcopy":
        model2, opt2 = copy.deepcopy((model, opt))
    else:
        model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    assert type(opt2) is type(opt) and type(opt2.net) is type(opt.net)
    assert opt2.meta_fingerprint == opt.meta_fingerprint
    assert opt2.net is not opt.net and not opt2.net.training
    assert {"lr", "nonfinite", "state_dtype"} <= set(opt.defaults)
    for key in opt.defaults:
        assert opt2.defaults[key] == opt2.param_groups[0][key] == opt.param_groups[0][key] == opt.defaults[key]
    _train(opt, model, 3, seed=1)
    _train(opt2, model2, 3, seed=1)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


def test_repr_names_the_meta_weights():
    opt = SimpleOptimizer([leaf(2)], weights=random_simple(19))
    text = repr(opt)
    assert text.startswith("SimpleOptimizer (meta-weights: simple ")
    assert opt.meta_fingerprint in text and "lr: 1.0" in text


def test_public_api_exports():
    import l2l_optim

    assert l2l_optim.SimpleOptimizer is SimpleOptimizer
    assert l2l_optim.DMOptimizer is DMOptimizer and l2l_optim.RNNProp is RNNProp
    assert l2l_optim.LearnedOptimizer is LearnedOptimizer
    assert l2l_optim.load_weights is hub.load_weights


@pytest.mark.parametrize("input_size", [2, 20])
def test_coordinate_last_lstm_step_is_nn_lstmcell(input_size):
    """nets._lstm_step (gates as row blocks) computes what nn.LSTMCell computes, gradients too."""
    from l2l_optim.nets import _lstm_step

    torch.manual_seed(0)
    cell = nn.LSTMCell(input_size, 20).double()
    x, h, c = (torch.randn(k, 37, dtype=torch.float64, requires_grad=True) for k in (input_size, 20, 20))
    h_new, c_new = _lstm_step(cell, x, h, c)
    h_ref, c_ref = cell(x.t(), (h.t(), c.t()))
    torch.testing.assert_close(h_new, h_ref.t(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(c_new, c_ref.t(), rtol=1e-12, atol=1e-12)
    ours = torch.autograd.grad((h_new.sum() + 2 * c_new.sum()), [x, h, c, *cell.parameters()])
    ref = torch.autograd.grad((h_ref.sum() + 2 * c_ref.sum()), [x, h, c, *cell.parameters()])
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cls", [DMOptimizer, RNNProp])
def test_per_parameter_path_matches_one_batched_call(cls):
    """Independent-coordinate nets run per parameter; that equals one call over all of them."""
    torch.manual_seed(3)
    params = [leaf(4, 3, seed=1), leaf(seed=2), leaf(6, seed=3)]
    twins = [p.detach().clone().requires_grad_() for p in params]
    per_param = cls(params)
    batched = cls(twins)
    batched.net.independent_coordinates = False  # an instance override: the concatenating path
    assert type(per_param.net).independent_coordinates
    for _ in range(4):
        grads = [torch.randn(p.shape) * 1e-2 for p in params]
        set_grads(params, grads)
        set_grads(twins, grads)
        per_param.step()
        batched.step()
    for p, q in zip(params, twins):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)
        for k in per_param.state[p]:
            torch.testing.assert_close(per_param.state[p][k], batched.state[q][k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make", [
    lambda p, lr: SimpleOptimizer(p, lr=lr, impl="reference"),
    lambda p, lr: SimpleOptimizer(p, lr=lr, impl="cpu"),
    lambda p, lr: DMOptimizer(p, lr=lr),
    lambda p, lr: RNNProp(p, lr=lr),
])
def test_tensor_lr_is_used_as_a_tensor_and_matches_a_float(make, monkeypatch):
    """A tensor lr is never read with .item() (a host sync on CUDA) and acts like the float."""
    params = [leaf(5, 4, seed=1), leaf(3, seed=2)]
    twins = [p.detach().clone().requires_grad_() for p in params]
    lr = torch.tensor(0.5)
    with_tensor = make(params, lr)
    with_float = make(twins, 0.5)
    calls = []
    real_item = torch.Tensor.item

    def counting_item(self):
        if self is lr or self._base is lr:
            calls.append(1)
        return real_item(self)

    monkeypatch.setattr(torch.Tensor, "item", counting_item)
    for step in range(3):
        if step == 2:
            lr.fill_(0.25)  # a scheduler editing the tensor in place
            for g in with_float.param_groups:
                g["lr"] = 0.25
        grads = [torch.randn(p.shape) * 1e-2 for p in params]
        set_grads(params, grads)
        set_grads(twins, grads)
        with_tensor.step()
        with_float.step()
    assert not calls
    for p, q in zip(params, twins):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)


# ------------------------------------------------- rough edges a new user runs into

def seeded(cls, **config):
    torch.manual_seed(0)
    return cls(**config)


EVERY_PATH = [
    pytest.param(lambda p, **kw: SimpleOptimizer(p, weights=random_simple(3), impl="cpu", **kw), id="simple-cpu"),
    pytest.param(lambda p, **kw: SimpleOptimizer(p, weights=random_simple(3), impl="reference", **kw),
                 id="simple-reference"),
    pytest.param(lambda p, **kw: DMOptimizer(p, weights=seeded(DMOptimizerNet, hidden_size=4), **kw),
                 id="dm"),
    pytest.param(lambda p, **kw: RNNProp(p, weights=seeded(RNNPropNet, hidden_size=4), **kw),
                 id="rnnprop"),
]


def _steps(opt, params, grads_per_step):
    for grads in grads_per_step:
        set_grads(params, grads)
        opt.step()


def _grads(params, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=g) for p in params] for _ in range(steps)]


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")
@pytest.mark.parametrize("make", EVERY_PATH)
def test_zero_element_parameters_step_and_leave_the_others_as_without_them(make):
    model = nn.Linear(0, 3)  # weight (3, 0): no elements, yet a gradient
    model(torch.randn(2, 0)).pow(2).sum().backward()
    assert model.weight.grad is not None and model.weight.grad.numel() == 0
    other = leaf(4, seed=1)
    alone = twin([other])
    grads = _grads([other], 3)
    opt = make([model.weight, other])
    ref = make(alone)
    for step_grads in grads:
        other.grad = step_grads[0].clone()
        alone[0].grad = step_grads[0].clone()
        opt.step()
        ref.step()
    assert torch.equal(other, alone[0]) and model.weight.shape == (3, 0)
    only_empty = make([model.weight])
    only_empty.step()  # nothing to update, and no error
    assert len(only_empty.state) == 0


@pytest.mark.parametrize("make", EVERY_PATH)
def test_a_first_step_under_inference_mode_does_not_break_later_steps(make):
    params = [leaf(3, 2, seed=0), leaf(4, seed=1)]
    twins = twin(params)
    grads = _grads(params, 4)
    opt, ref = make(params), make(twins)
    set_grads(params, grads[0])
    with torch.inference_mode():
        opt.step()
    _steps(opt, params, grads[1:])
    _steps(ref, twins, grads)
    for p, q in zip(params, twins):
        assert torch.equal(p, q)
        assert all(torch.equal(opt.state[p][k], ref.state[q][k]) for k in opt.state[p])
        assert not any(t.is_inference() for t in opt.state[p].values())


@pytest.mark.parametrize("lr", [np.float32(0.5), np.float64(0.5), np.int64(2)], ids=str)
def test_numpy_scalars_are_accepted_as_lr(lr):
    params = [leaf(5, seed=0)]
    twins = twin(params)
    opt = SimpleOptimizer(params, lr=lr, weights=random_simple(4))
    ref = SimpleOptimizer(twins, lr=float(lr), weights=random_simple(4))
    _steps(opt, params, _grads(params, 2))
    _steps(ref, twins, _grads(params, 2))
    assert torch.equal(params[0], twins[0])


@pytest.mark.parametrize("bad, match", [
    (dict(weight_decay=-0.1), r"^Invalid weight_decay value: -0.1$"),
    (dict(weight_decay=float("nan")), r"^Invalid weight_decay value: nan$"),
    (dict(weight_decay="0.1"), r"^Invalid weight_decay value: '0.1'$"),
    (dict(maximize="yes"), r"^Invalid maximize: 'yes'; expected True or False$"),
    (dict(lr=True), r"^Invalid learning rate: True$"),
])
def test_invalid_weight_decay_maximize_and_bool_lr(bad, match):
    with pytest.raises(ValueError, match=match):
        SimpleOptimizer([leaf(2)], weights=random_simple(), **bad)
    opt = SimpleOptimizer([leaf(2)], weights=random_simple())
    with pytest.raises(ValueError, match=match):
        opt.add_param_group({"params": [leaf(3)], **bad})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("make", EVERY_PATH)
def test_weight_decay_is_decoupled_and_scaled_by_lr_per_group(make):
    """With decay d and rate lr, a step is the undecayed step taken from p * (1 - lr * d)."""
    a, b = leaf(3, 2, seed=0), leaf(4, seed=1)
    a2, b2 = twin([a, b])
    grads = _grads([a, b], 1)[0]
    opt = make([{"params": [a], "weight_decay": 0.1}, {"params": [b], "lr": 0.5}], weight_decay=0.2)
    ref = make([{"params": [a2]}, {"params": [b2], "lr": 0.5}])
    with torch.no_grad():
        a2.mul_(1.0 - 1.0 * 0.1)
        b2.mul_(1.0 - 0.5 * 0.2)
    set_grads([a, b], grads)
    set_grads([a2, b2], grads)
    opt.step()
    ref.step()
    assert torch.equal(a, a2) and torch.equal(b, b2)
    assert opt.state_dict()["param_groups"][0]["weight_decay"] == 0.1


@pytest.mark.parametrize("make", EVERY_PATH)
def test_maximize_steps_on_the_negated_gradient(make):
    params = [leaf(3, 2, seed=0), leaf(4, seed=1)]
    twins = twin(params)
    grads = _grads(params, 3)
    opt, ref = make(params, maximize=True), make(twins)
    _steps(opt, params, grads)
    _steps(ref, twins, [[-g for g in step] for step in grads])
    assert all(torch.equal(p, q) for p, q in zip(params, twins))


def test_a_skipped_step_does_not_decay_either():
    params = [leaf(3, seed=0)]
    opt = SimpleOptimizer(params, weights=random_simple(), weight_decay=0.5)
    before = params[0].detach().clone()
    params[0].grad = torch.tensor([1.0, float("nan"), 0.0])
    with pytest.warns(RuntimeWarning):
        opt.step()
    assert torch.equal(params[0], before)
    with torch.no_grad():  # the device-flag path, as on an accelerator
        ps, gs, lrs, groups, _ = opt._gather()
        opt._apply(ps, gs, lrs, groups, skip=torch.tensor(True))
    assert torch.equal(params[0], before)


def test_a_finetune_or_meta_fit_result_is_accepted_as_weights():
    from l2l_optim.finetuning import FinetuneResult
    from l2l_optim.meta.fit import MetaFitResult

    net = random_simple(5)
    for result in (FinetuneResult(net=net, weights_path=None, log=[], subsample=(None, None)),
                   MetaFitResult(net=net, log=[])):
        opt = SimpleOptimizer([leaf(2)], weights=result)
        assert opt.meta_fingerprint == fingerprint(net) and opt.net is not net
    with pytest.raises(ValueError, match="needs DMOptimizerNet weights, got SimpleOptimizerNet"):
        DMOptimizer([leaf(2)], weights=MetaFitResult(net=net, log=[]))


COMPILED = [
    pytest.param(lambda p, **kw: SimpleOptimizer(p, weights=random_simple(3), **kw), id="simple-auto"),
    *EVERY_PATH[1:],
]


@pytest.mark.parametrize("make", COMPILED)
def test_a_compiled_step_has_no_graph_breaks(make):
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    opt = make(model.parameters(), weight_decay=0.01)
    model(torch.randn(5, 4)).pow(2).sum().backward()
    explained = torch._dynamo.explain(opt.step)()  # the first step: the state is created in it
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    model(torch.randn(5, 4)).pow(2).sum().backward()
    explained = torch._dynamo.explain(opt.step)()
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def _compiled_against_eager(make, backend):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    twin_model = copy.deepcopy(model)
    opt = make(model.parameters(), weight_decay=0.01)
    ref = make(twin_model.parameters(), weight_decay=0.01)
    step = torch.compile(opt.step, backend=backend, fullgraph=True)
    for i in range(4):
        x = torch.randn(5, 4)
        for m in (model, twin_model):
            m.zero_grad()
            m(x).pow(2).sum().backward()
            if i == 2:
                m[0].weight.grad[0, 0] = float("nan")  # skipped by both, without a graph break
        step()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            ref.step()
    assert opt.skipped_steps == ref.skipped_steps == 1
    for p, q in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(p, q)
        assert all(torch.equal(opt.state[p][k], ref.state[q][k]) for k in opt.state[p])


@pytest.mark.parametrize("make", COMPILED)
def test_a_compiled_fullgraph_step_matches_the_eager_one(make):
    _compiled_against_eager(make, "aot_eager")


@pytest.mark.slow
def test_an_inductor_compiled_step_matches_the_eager_one():
    _compiled_against_eager(COMPILED[0].values[0], "inductor")


@pytest.mark.parametrize("cls, make", NETS_FOR_NAN, ids=NAN_IDS)
def test_empty_parameter_steps_with_the_others(cls, make):
    # a parameter with no elements has no max-abs for the non-finite check: it is finite, and
    # the others step as they would without it (and a NaN beside it is still caught)
    net = make()
    params = [leaf(0, seed=1), leaf(5, seed=2)]
    alone = [leaf(5, seed=2)]
    opt, ref = cls(params, weights=net), cls(alone, weights=net)
    grads = [torch.zeros(0), torch.randn(5)]
    set_grads(params, grads)
    set_grads(alone, grads[1:])
    opt.step()
    ref.step()
    assert torch.equal(params[1], alone[0])
    grads[1][0] = float("nan")
    set_grads(params, grads)
    with pytest.warns(RuntimeWarning, match="non-finite gradient"):
        opt.step()
    assert opt.skipped_steps == 1


def test_state_dtype_is_saved_by_name_and_loads_either_way():
    # torch.distributed.checkpoint keeps plain values only, so the dict holds "bfloat16"; a
    # dict from an earlier save with the torch.dtype itself still loads
    net = random_simple()
    p = leaf(4, seed=3)
    opt = SimpleOptimizer([p], weights=net, state_dtype=torch.bfloat16)
    set_grads([p], [torch.randn(4)])
    opt.step()
    sd = opt.state_dict()
    assert sd["param_groups"][0]["state_dtype"] == "bfloat16"
    for saved in ("bfloat16", torch.bfloat16):
        sd["param_groups"][0]["state_dtype"] = saved
        other = SimpleOptimizer([leaf(4, seed=3)], weights=net)
        other.load_state_dict(copy.deepcopy(sd))
        assert other.param_groups[0]["state_dtype"] == torch.bfloat16
        assert other.state[other.param_groups[0]["params"][0]]["h"].dtype == torch.bfloat16
    sd["param_groups"][0]["state_dtype"] = "float16"
    with pytest.raises(ValueError, match="Invalid state_dtype: torch.float16"):
        SimpleOptimizer([leaf(4)], weights=net).load_state_dict(sd)


# ------------------------------------------------------------ what a newcomer tries first


@pytest.mark.parametrize("cls, net", [(SimpleOptimizer, random_simple()), (DMOptimizer, DMOptimizerNet(hidden_size=3))])
def test_an_adam_sized_lr_warns_once_that_lr_scales_the_learned_step(cls, net):
    with pytest.warns(UserWarning) as caught:
        opt = cls([leaf(2)], 1e-3, weights=net)
    assert len(caught) == 1 and caught[0].filename == __file__
    text = str(caught[0].message)
    assert "lr=0.001" in text and "multiplies the meta-trained step" in text
    assert "lr=1.0 applies it as trained" in text and "Adam's 1e-3" in text
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.add_param_group({"params": [leaf(3)], "lr": 1e-4})  # once per optimizer
        for lr in (0.05, 1.0, 0.0, torch.tensor(1e-3)):  # at the learned scale, off, a tensor
            cls([leaf(2)], lr, weights=net)
    with pytest.warns(UserWarning, match="lr=0.01 "):  # a group's own lr
        cls([{"params": [leaf(2)]}, {"params": [leaf(3)], "lr": 0.01}], weights=net)


def test_adamws_weight_decay_warns_once_that_it_decays_per_step_here():
    net = random_simple()
    with pytest.warns(UserWarning) as caught:
        opt = SimpleOptimizer([leaf(2)], weights=net, weight_decay=0.01)
    assert len(caught) == 1 and caught[0].filename == __file__
    text = str(caught[0].message)
    assert "weight_decay=0.01 at lr=1 multiplies every parameter by 0.99 at every step" in text
    assert "after 69 steps" in text and "weight_decay=1e-3 * (AdamW's weight_decay)" in text
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.add_param_group({"params": [leaf(3)], "weight_decay": 0.1})  # once per optimizer
        for lr, wd in ((1.0, 1e-3), (1.0, 1e-5), (0.1, 0.01), (torch.tensor(1.0), 0.1)):
            SimpleOptimizer([leaf(2)], lr, weights=net, weight_decay=wd)
    with pytest.warns(UserWarning, match="sets every parameter to zero or flips its sign"):
        SimpleOptimizer([leaf(2)], weights=net, weight_decay=2.0)
    # the decay the warning names is the decay a step applies
    p = leaf(2)
    with torch.no_grad():
        p.fill_(1.0)
    with pytest.warns(UserWarning):
        opt = SimpleOptimizer([p], weights=net, weight_decay=0.01, impl="reference")
    p.grad = torch.zeros(2)
    opt.step()
    # a zero gradient moves nothing but the decay: 1 - lr * weight_decay
    assert torch.allclose(p.detach(), torch.full((2,), 0.99), rtol=0, atol=1e-7)


ADAM_OPTIONS = [
    ("betas", (0.9, 0.999), "nothing replaces it: the update rule is learned"),
    ("eps", 1e-8, "nothing replaces it: the update rule is learned"),
    ("amsgrad", True, "nothing replaces it: the update rule is learned"),
    ("foreach", True, "impl="),
    ("fused", True, "impl="),
    ("capturable", True, "torch.compile"),
    ("differentiable", True, "l2l_optim.meta"),
]


@pytest.mark.parametrize("key, value, hint", ADAM_OPTIONS, ids=[o[0] for o in ADAM_OPTIONS])
@pytest.mark.parametrize("cls, net", [(SimpleOptimizer, random_simple()), (RNNProp, RNNPropNet(hidden_size=3))])
def test_adams_options_are_refused_with_what_applies_instead(cls, net, key, value, hint):
    with pytest.raises(TypeError, match=rf"^{cls.__name__} has no {key!r} option \(torch\.optim\.Adam's\); ") as e:
        cls([leaf(2)], weights=net, **{key: value})
    assert hint in str(e.value)
    if key in ("foreach", "fused") and cls is RNNProp:
        assert "SimpleOptimizer's impl=" in str(e.value)


def test_an_unknown_keyword_is_refused_as_python_does():
    with pytest.raises(TypeError, match=r"^SimpleOptimizer.__init__\(\) got an unexpected keyword argument 'colour'$"):
        SimpleOptimizer([leaf(2)], weights=random_simple(), colour="red")
    with pytest.raises(TypeError, match=r"^DMOptimizer.__init__\(\) got an unexpected keyword argument 'impl'$"):
        DMOptimizer([leaf(2)], weights=DMOptimizerNet(), impl="cpu")
    with pytest.raises(TypeError, match=r"missing 1 required keyword-only argument: 'weights'"):
        LearnedOptimizer([leaf(2)])


CYCLIC = [
    pytest.param(lambda opt, **kw: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=12, **kw),
                 id="OneCycleLR"),
    pytest.param(lambda opt, **kw: torch.optim.lr_scheduler.CyclicLR(
        opt, base_lr=0.1, max_lr=1.0, step_size_up=3, **kw), id="CyclicLR"),
]


@pytest.mark.parametrize("make_scheduler", CYCLIC)
@pytest.mark.parametrize("make", EVERY_PATH)
def test_cyclic_schedulers_run_with_their_default_momentum_cycling(make, make_scheduler):
    # the groups hold an inert "momentum" for schedulers that cycle it: the steps are those
    # of cycle_momentum=False
    runs = []
    for kw in ({}, {"cycle_momentum": False}):
        model = _model()
        opt = make(model.parameters())
        sched = make_scheduler(opt, **kw)
        lrs, momenta = [], []
        for seed in range(6):
            _train(opt, model, 1, seed=seed)
            sched.step()
            lrs.append(opt.param_groups[0]["lr"])
            momenta.append(opt.param_groups[0]["momentum"])
        runs.append((model, lrs, momenta))
    (cycled, lrs, momenta), (plain, plain_lrs, plain_momenta) = runs
    assert lrs == plain_lrs and len(set(lrs)) > 1
    assert len(set(momenta)) > 1 and set(plain_momenta) == {0.0}
    for p, q in zip(cycled.parameters(), plain.parameters()):
        assert torch.equal(p, q)


def test_meta_device_parameters_are_refused_by_name():
    for cls, net in ((SimpleOptimizer, random_simple()), (DMOptimizer, DMOptimizerNet(hidden_size=3))):
        model = nn.Linear(2, 3, device="meta")
        with pytest.raises(ValueError, match=rf"^{cls.__name__}: parameter 0 \(shape \(3, 2\)\) is on the "
                                             r"meta device.*to_empty"):
            cls(model.parameters(), weights=net)
    with pytest.raises(ValueError, match=r"parameter 0 \(shape \(3,\)\) is on the meta device"):
        LearnedOptimizer([torch.empty(3, device="meta")], weights=ScaledSignNet())


@pytest.mark.parametrize("cls, make", NETS_FOR_NAN, ids=NAN_IDS)
def test_nonfinite_is_a_group_option_and_the_first_bad_gradients_group_decides(cls, make):
    params = [leaf(3, seed=0), leaf(4, seed=1)]
    opt = cls([{"params": params[:1]}, {"params": params[1:], "nonfinite": "raise"}], weights=make())
    assert opt.defaults["nonfinite"] == "skip"
    assert [g["nonfinite"] for g in opt.param_groups] == ["skip", "raise"]
    set_grads(params, [torch.randn(3), torch.randn(4)])
    opt.step()
    snap = snapshot(opt)
    # first bad gradient in the "raise" group: raise, nothing changed
    set_grads(params, [torch.randn(3), torch.tensor([1.0, float("nan"), 0.0, 0.0])])
    with pytest.raises(FloatingPointError, match=r"parameter 1 \(group 1"):
        opt.step()
    assert_unchanged(opt, snap)
    # first bad gradient in the "skip" group: the whole step is skipped, the other group too
    set_grads(params, [torch.tensor([float("inf"), 0.0, 0.0]), torch.tensor([float("nan")] * 4)])
    with pytest.warns(RuntimeWarning, match="non-finite gradient"):
        opt.step()
    assert_unchanged(opt, snap)
    assert opt.skipped_steps == 1
    # the per-group policy travels in state_dict
    other = cls([{"params": [leaf(3)]}, {"params": [leaf(4)]}], weights=make())
    other.net.load_state_dict(opt.net.state_dict())
    other.load_state_dict(opt.state_dict())
    assert [g["nonfinite"] for g in other.param_groups] == ["skip", "raise"]


def test_one_group_holding_every_option_is_accepted():
    # what torch's own optimizer tests do: every option, non-defaults included, in one group
    net = random_simple()
    options = dict(lr=0.5, nonfinite="raise", state_dtype=torch.bfloat16, weight_decay=0.1, maximize=True)
    opt = SimpleOptimizer([dict(params=[leaf(3)], **options)], weights=net)
    assert all(opt.param_groups[0][k] == v for k, v in options.items())


# ---------------------------------------------------------------- state_dict as torch's


def test_state_dict_and_load_state_dict_are_torchs_with_hooks_that_survive_copies():
    assert LearnedOptimizer.state_dict is torch.optim.Optimizer.state_dict
    assert LearnedOptimizer.load_state_dict is torch.optim.Optimizer.load_state_dict
    net = random_simple(15)
    model = _model()
    opt = SimpleOptimizer(model.parameters(), weights=net)
    _train(opt, model, 2, seed=0)
    for copied in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        sd = copied.state_dict()
        assert [g["meta_fingerprint"] for g in sd["param_groups"]] == [fingerprint(net)]
        with pytest.raises(ValueError, match="saved with meta-weights"):
            SimpleOptimizer(_model().parameters(), weights=random_simple(16)).load_state_dict(sd)


def test_user_hooks_run_around_the_fingerprint_and_the_casts():
    net = random_simple(15)
    model = _model()
    opt = SimpleOptimizer(model.parameters(), weights=net)
    _train(opt, model, 2, seed=0)
    seen = []
    opt.register_state_dict_post_hook(lambda o, sd: seen.append(sd["param_groups"][0]["meta_fingerprint"]))
    sd = opt.state_dict()
    assert seen == [fingerprint(net)]
    # a dict without the fingerprint loads when a hook that runs first supplies it
    plain = {"state": sd["state"], "param_groups": [
        {k: v for k, v in g.items() if k != "meta_fingerprint"} for g in sd["param_groups"]]}
    target = SimpleOptimizer(_model().parameters(), weights=net)

    def stamp(o, d):
        return {**d, "param_groups": [{**g, "meta_fingerprint": o.meta_fingerprint} for g in d["param_groups"]]}

    target.register_load_state_dict_pre_hook(stamp, prepend=True)
    loaded = []
    target.register_load_state_dict_post_hook(lambda o: loaded.append(o.state[next(iter(o.state))]["h"].dtype))
    target.load_state_dict(plain)
    assert loaded == [torch.bfloat16]  # SimpleOptimizer's default state dtype
    for p, q in zip(opt.param_groups[0]["params"], target.param_groups[0]["params"]):
        assert all(torch.equal(opt.state[p][k], target.state[q][k]) for k in opt.state[p])


def test_loaded_state_is_cast_to_what_the_optimizer_keeps():
    net = random_simple(15)
    p = leaf(3, dtype=torch.bfloat16, seed=0)
    opt = SimpleOptimizer([p], weights=net, state_dtype=torch.bfloat16)
    set_grads([p], [torch.randn(3)])
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][0]["state_dtype"] = "float32"
    sd["state"][0]["step"] = 7  # a plain number, as some converters write it
    sd["state"][0]["h"] = sd["state"][0]["h"].double() + 1e-6
    q = leaf(3, dtype=torch.bfloat16, seed=0)
    target = SimpleOptimizer([q], weights=net)
    target.load_state_dict(sd)
    state = target.state[q]
    assert state["h"].dtype == torch.float32  # the group's state_dtype, not the parameter's
    assert state["step"].dtype == torch.int64 and int(state["step"]) == 7
    assert torch.equal(state["h"], sd["state"][0]["h"].float())
    assert state["h"].data_ptr() != sd["state"][0]["h"].data_ptr()
