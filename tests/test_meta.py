"""meta_fit and run_trajectory on a tiny in-memory task (no dataset files needed): settings,
seeding, resuming, and that meta-training lowers the meta-loss with a correct meta-gradient."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from l2l_optim.meta import MetaFitConfig, meta_fit, meta_loss_coefficients, run_trajectory
from l2l_optim.nets import DMOptimizerNet, RNNPropNet, SimpleOptimizerNet
from l2l_optim.meta.init_rules import init_net
from l2l_optim.tasks import Task


def tiny_task() -> Task:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 6, generator=gen)
    y = (x[:, 0] > 0).long()
    return Task(name="tiny", model_fn=lambda: nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2)),
                train=(x, y), batch_size=32)


QUICK = dict(trajectories=2, steps=8, unroll=4, progress=False)


def test_meta_loss_coefficients():
    assert meta_loss_coefficients("weighted", 4).tolist() == [0.0625, 0.25, 0.5625, 1.0]
    assert meta_loss_coefficients("uniform", 3).tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="Invalid meta_loss: 'nope'"):
        meta_loss_coefficients("nope", 3)


@pytest.mark.parametrize("arch, cls", [("dm", DMOptimizerNet), ("rnnprop", RNNPropNet)])
def test_the_config_decides_the_architecture(arch, cls):
    """The signature's defaults must not override the config (config arch=dm must train a DMOptimizerNet)."""
    r = meta_fit(task=tiny_task(), config=MetaFitConfig(arch=arch, **{k: v for k, v in QUICK.items() if k != "progress"}),
                 progress=False)
    assert type(r.net) is cls


@pytest.mark.parametrize("arch, init", [("dm", "small-output"), ("rnnprop", "small-output"), ("simple", "sign")])
def test_an_arch_name_gets_its_own_default_init(arch, init, tmp_path):
    r = meta_fit(arch, tiny_task(), out_dir=tmp_path, trajectories=0, steps=8, unroll=4, progress=False)
    recorded = json.loads((tmp_path / "config.json").read_text())
    assert recorded["arch"] == arch and recorded["init"] == init
    # trajectories=0: the net is its starting point, which the init decides
    torch.manual_seed(0)
    expected = init_net(type(r.net)(), init)
    for a, b in zip(r.net.parameters(), expected.parameters()):
        assert torch.equal(a, b)


def test_a_wrong_init_for_the_architecture_is_refused():
    with pytest.raises(ValueError, match="init='sign' applies to SimpleOptimizerNet only"):
        meta_fit("dm", tiny_task(), init="sign", **QUICK)


def test_meta_fit_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    meta_fit("simple", tiny_task(), **QUICK)
    assert torch.equal(torch.get_rng_state(), before)


def test_meta_training_moves_the_net_and_is_seeded():
    a = meta_fit("simple", tiny_task(), seed=3, **QUICK)
    b = meta_fit("simple", tiny_task(), seed=3, **QUICK)
    start = meta_fit("simple", tiny_task(), seed=3, **dict(QUICK, trajectories=0))
    for pa, pb in zip(a.net.parameters(), b.net.parameters()):
        assert torch.equal(pa, pb)
    assert any(not torch.equal(pa, ps) for pa, ps in zip(a.net.parameters(), start.net.parameters()))
    assert [e["trajectory"] for e in a.log] == [0, 1]


def test_a_stopped_run_resumes_to_the_same_weights(tmp_path):
    straight = meta_fit("simple", tiny_task(), out_dir=tmp_path / "a", **dict(QUICK, trajectories=3))
    meta_fit("simple", tiny_task(), out_dir=tmp_path / "b", **dict(QUICK, trajectories=1))
    resumed = meta_fit("simple", tiny_task(), out_dir=tmp_path / "b", **dict(QUICK, trajectories=3))
    for p, q in zip(straight.net.parameters(), resumed.net.parameters()):
        assert torch.equal(p, q)
    lines = (tmp_path / "b" / "log.jsonl").read_text().splitlines()
    assert [json.loads(l)["trajectory"] for l in lines] == [0, 1, 2]
    with pytest.raises(ValueError, match="another configuration"):
        meta_fit("simple", tiny_task(), out_dir=tmp_path / "b", meta_lr=0.5, **dict(QUICK, trajectories=4))


def test_unknown_settings_are_refused():
    with pytest.raises(TypeError, match="unexpected keyword argument 'loss'"):
        meta_fit("simple", tiny_task(), loss="uniform", **QUICK)
    with pytest.raises(ValueError, match="unknown meta-optimizer architecture 'lstm'"):
        meta_fit("lstm", tiny_task(), **QUICK)


def test_run_trajectory_should_stop_ends_after_the_unroll():
    net = init_net(SimpleOptimizerNet(), "sign")
    seen = []

    def stop(losses):
        seen.append(len(losses))
        return len(losses) >= 8

    r = run_trajectory(net, tiny_task(), seed=0, steps=40, unroll=4, should_stop=stop)
    assert r["stopped"] and len(r["losses"]) == 8 and seen == [4, 8]


# ------------------------------------------------------------------ the science itself


def held_out_meta_loss(net, task, steps: int = 40) -> float:
    """The weighted meta-loss of ``net`` (lower: larger late decreases of the optimizee's
    loss), averaged over two inits no training trajectory uses."""
    return sum(run_trajectory(net, task, seed=s, steps=steps)["meta_loss"] for s in (10_001, 10_002)) / 2


def test_meta_fit_lowers_the_meta_loss():
    # a sign rule whose steps are too small for the task: following the meta-gradient makes
    # them useful; climbing it (a flipped sign) makes the rule worse than where it started
    task = tiny_task()
    config = dict(trajectories=3, steps=40, unroll=10, meta_lr=0.2, init_lr=1e-3, progress=False)
    start = meta_fit("simple", task, **dict(config, trajectories=0)).net
    trained = meta_fit("simple", task, **config).net
    before, after = held_out_meta_loss(start, task), held_out_meta_loss(trained, task)
    # (about 4x the start's weighted decrease here; about 1.1x with the sign flipped)
    assert before < 0 and after < 2 * before, (before, after)


class Float64State(SimpleOptimizerNet):
    """SimpleOptimizerNet with float64 state (run_trajectory asks for the default dtype)."""

    def init_state(self, n, *, device=None, dtype=torch.float32):
        return super().init_state(n, device=device, dtype=torch.float64)


class RecordGradients(torch.optim.Optimizer):
    """A meta-optimizer that keeps the meta-gradient and changes nothing."""

    def __init__(self, params):
        super().__init__(params, {})
        self.grads = []

    def step(self, closure=None):
        self.grads.append([p.grad.clone() for g in self.param_groups for p in g["params"]])


@pytest.mark.parametrize("meta_loss", ["weighted", "uniform", "last"])
def test_the_bptt_meta_gradient_matches_central_differences(meta_loss):
    """The meta-gradient is first order: the optimizee's gradient g_t enters the net as a
    constant, and f_{t-1} enters the weighted loss as one, so it is the derivative of
    sum_t c_t f_t with the g_t held fixed. An optimizee whose loss is linear in its parameters
    has g_t independent of them, so there the meta-gradient is exactly the derivative of
    sum_t c_t f_t over the run's losses, which central differences give; what the check covers
    is the backward pass through the recurrence, the mean over coordinates, the parameters'
    accumulation and the loss coefficients."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, generator=gen, dtype=torch.float64)
    y = torch.randn(64, generator=gen, dtype=torch.float64)
    task = Task(name="linear", model_fn=lambda: nn.Linear(5, 2).double(), train=(x, y), batch_size=8,
                loss_fn=lambda out, y: (out.sum(-1) * y).mean())
    torch.manual_seed(0)
    net = Float64State().double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    steps = 6
    c = meta_loss_coefficients(meta_loss, steps) if meta_loss != "last" else torch.eye(steps)[-1]

    def objective() -> float:
        with torch.no_grad():
            losses = run_trajectory(net, task, seed=1, steps=steps, meta_loss=meta_loss)["losses"]
        return sum(ci * f for ci, f in zip(c.tolist(), losses))

    recorder = RecordGradients(net.parameters())
    run_trajectory(net, task, seed=1, steps=steps, unroll=steps, meta_loss=meta_loss, meta_opt=recorder)
    (grads,) = recorder.grads
    names = [name for name, _ in net.named_parameters()]
    eps = 1e-6
    for name, index in [("w_ih", (3, 0)), ("w_hh", (2, 7)), ("w_hh", (5, 5)), ("alpha", ()),
                        ("beta", ()), ("w_out", (1,)), ("w_out", (14,))]:
        p = dict(net.named_parameters())[name]
        with torch.no_grad():
            p[index] += eps
            up = objective()
            p[index] -= 2 * eps
            down = objective()
            p[index] += eps
        bptt = grads[names.index(name)][index].item()
        assert bptt != 0.0, name
        assert (up - down) / (2 * eps) == pytest.approx(bptt, rel=1e-6, abs=1e-12), (name, index)
