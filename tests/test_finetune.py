"""Tests for l2l_optim.finetuning: fine-tuning on an unseen model, where trajectories stop, side effects."""

from __future__ import annotations

import importlib
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from l2l_optim.finetuning import FinetuneResult, finetune, subsample_loader
from l2l_optim.nets import SimpleOptimizerNet
from l2l_optim.meta.init_rules import init_simple_sgd_like
from l2l_optim.optimizer import SimpleOptimizer
from l2l_optim.tasks import task_from_model
from l2l_optim.weights import fingerprint, load_weights


class TinyNet(nn.Module):
    """A model none of our tasks uses: BatchNorm, a custom module, a GELU head."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.GELU())
        self.head = nn.Linear(12, 4)

    def forward(self, x):
        return self.head(self.body(x))


def make_data(n=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, :4] + 0.1 * torch.randn(n, 4, generator=g)).argmax(1)
    return x, y


def start_net() -> SimpleOptimizerNet:
    torch.manual_seed(0)
    net = SimpleOptimizerNet()
    init_simple_sgd_like(net, 0.1)
    return net


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


QUICK = dict(subsample=0.5, trajectories=2, unroll=5, max_unrolls=4, progress=False)


def test_finetune_on_an_unseen_model_leaves_it_untouched_and_returns_loadable_weights(tmp_path):
    torch.manual_seed(1)
    model = TinyNet()
    model.eval()  # the user's mode must survive too
    before = snapshot(model)
    x, y = make_data()
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    net0 = start_net()
    fp0 = fingerprint(net0)

    result = finetune(model, loader, weights=net0, out_dir=tmp_path / "ft.safetensors", **QUICK)

    assert isinstance(result, FinetuneResult)
    after = snapshot(model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # params and BatchNorm buffers
    assert not model.training
    assert all(p.grad is None for p in model.parameters())
    assert fingerprint(net0) == fp0  # the starting net was copied, not trained in place
    assert fingerprint(result.net) != fp0  # meta-updates happened

    assert len(result.log) == 2
    for e in result.log:
        assert set(e) == {"trajectory", "seed", "initial_loss", "target", "final_avg_loss", "reached_target",
                          "unrolls", "steps", "diverged", "seconds"}
        assert 1 <= e["unrolls"] <= 4 and e["steps"] == 5 * e["unrolls"]
        assert e["target"] == pytest.approx(0.5 * e["initial_loss"])
        assert e["reached_target"] is (e["final_avg_loss"] < e["target"])
    assert result.subsample[0].shape == (200, 6) and result.batch_size == 32

    # the weights load into SimpleOptimizer, from the net and from the saved file
    loaded = load_weights(result.weights_path, arch="simple")
    assert loaded.fingerprint == fingerprint(result.net)
    settings = json.loads(loaded.metadata["finetune"])
    assert {k: settings[k] for k in ("trajectories", "unroll", "max_unrolls", "subsample_examples")} == {
        "trajectories": 2, "unroll": 5, "max_unrolls": 4, "subsample_examples": 200}
    assert json.loads(loaded.metadata["finetune_log"]) == result.log
    for weights in (result.net, result.weights_path):
        m = TinyNet()
        opt = SimpleOptimizer(m.parameters(), weights=weights)
        old = [p.detach().clone() for p in m.parameters()]
        F.cross_entropy(m(x[:32]), y[:32]).backward()
        opt.step()
        assert any(not torch.equal(a, b) for a, b in zip(old, m.parameters()))


def test_finetune_is_deterministic():
    x, y = make_data()
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    r1 = finetune(TinyNet(), loader, weights=start_net(), seed=3, **QUICK)
    r2 = finetune(TinyNet(), loader, weights=start_net(), seed=3, **QUICK)
    assert fingerprint(r1.net) == fingerprint(r2.net)
    assert [e["final_avg_loss"] for e in r1.log] == [e["final_avg_loss"] for e in r2.log]


def test_trajectory_stops_at_the_target_or_the_cap():
    x, y = make_data()
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    # an unreachable target: every trajectory runs to the cap and says so
    r = finetune(TinyNet(), loader, weights=start_net(), subsample=0.5, trajectories=1, unroll=3,
                 max_unrolls=2, target=1e-6, progress=False)
    assert r.log[0]["unrolls"] == 2 and r.log[0]["steps"] == 6 and not r.log[0]["reached_target"]
    # an easy target (99% of the initial loss): reached by the first unroll, which ends it
    r = finetune(TinyNet(), loader, weights=start_net(), subsample=0.5, trajectories=1, unroll=5,
                 max_unrolls=50, target=0.99, progress=False)
    assert r.log[0]["reached_target"] and r.log[0]["unrolls"] == 1 and r.log[0]["steps"] == 5


def test_trajectory_stops_after_the_first_unroll_whose_mean_loss_is_below_target(monkeypatch):
    # record every trajectory's losses, then check the stop point against them
    module = importlib.import_module("l2l_optim.finetuning")
    original, runs = module.run_trajectory, []

    def recording(*args, **kwargs):
        r = original(*args, **kwargs)
        if kwargs["steps"] > 0:
            runs.append(r)
        return r

    monkeypatch.setattr(module, "run_trajectory", recording)
    x, y = make_data()
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    unroll, cap = 5, 8
    result = finetune(TinyNet(), loader, weights=start_net(), subsample=0.5, trajectories=3, unroll=unroll,
                      max_unrolls=cap, progress=False)
    assert len(runs) == 3
    outcomes = []
    for entry, r in zip(result.log, runs):
        assert entry["initial_loss"] == r["initial_loss"]
        means = [sum(r["losses"][i : i + unroll]) / unroll for i in range(0, len(r["losses"]), unroll)]
        below = [m < 0.5 * r["initial_loss"] for m in means]
        expected = below.index(True) + 1 if True in below else cap
        assert entry["unrolls"] == len(means) == expected
        assert entry["reached_target"] is below[-1]
        outcomes.append((entry["reached_target"], entry["unrolls"]))
    # the case covers a trajectory that hit the cap and one stopped early by the target
    assert (False, cap) in outcomes and any(reached and n < cap for reached, n in outcomes)


def test_finetune_leaves_the_global_rng_alone():
    x, y = make_data()
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)  # shuffling draws from it
    model, net = TinyNet(), start_net()
    state = torch.get_rng_state()
    finetune(model, loader, weights=net, **QUICK)
    assert torch.equal(torch.get_rng_state(), state)


def test_frozen_parameters_keep_their_values_and_the_rest_is_reinitialised():
    torch.manual_seed(123)
    model = TinyNet()
    model.body[0].weight.requires_grad_(False)
    x, y = make_data()
    task = task_from_model(model, (x, y), batch_size=16)
    params, buffers = task.init_params(0)
    assert "body.0.weight" in buffers and "body.0.weight" not in params
    assert torch.equal(buffers["body.0.weight"], model.body[0].weight)  # frozen: the user's values
    assert not torch.equal(params["head.weight"], model.head.weight)  # fresh init, not the user's values
    p2, _ = task.init_params(0)
    assert torch.equal(params["head.weight"], p2["head.weight"])
    r = finetune(model, DataLoader(TensorDataset(x, y), batch_size=16), weights=start_net(), subsample=0.5,
                 trajectories=1, unroll=3, max_unrolls=1, progress=False)
    assert r.log[0]["steps"] == 3


def test_finetune_errors():
    x, y = make_data(100)
    net = start_net()
    empty = DataLoader(TensorDataset(x[:0], y[:0]), batch_size=8)
    with pytest.raises(ValueError, match="empty"):
        finetune(TinyNet(), empty, weights=net, progress=False)
    with pytest.raises(ValueError, match="empty"):
        finetune(TinyNet(), [], weights=net, progress=False)
    # 5% of 100 examples is 5, fewer than one batch of 32
    with pytest.raises(ValueError, match="fewer than one batch"):
        finetune(TinyNet(), DataLoader(TensorDataset(x, y), batch_size=32), weights=net, progress=False)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="subsample"):
            finetune(TinyNet(), loader, weights=net, subsample=bad, progress=False)
    for name in ("trajectories", "unroll", "max_unrolls"):
        with pytest.raises(ValueError, match=name):
            finetune(TinyNet(), loader, weights=net, subsample=0.5, progress=False, **{name: 0})
    with pytest.raises(ValueError, match="target"):
        finetune(TinyNet(), loader, weights=net, subsample=0.5, target=1.5, progress=False)
    with pytest.raises(TypeError, match=r"\(inputs, targets\)"):
        finetune(TinyNet(), [x[:8]], weights=net, subsample=1.0, progress=False)
    with pytest.raises(TypeError, match="weights"):
        finetune(TinyNet(), loader, weights=3, subsample=0.5, progress=False)
    # the unrolls run no Schedule-Free averaging: weights meta-trained with it are refused
    with pytest.raises(ValueError, match="averaging=0.9"):
        finetune(TinyNet(), loader, weights="simple-sf", subsample=0.5, progress=False)
    with pytest.raises(TypeError, match="nn.Module"):
        finetune(lambda t: t, loader, weights=net, subsample=0.5, progress=False)


def test_subsample_loader_is_exact_seeded_and_without_replacement():
    x = torch.arange(1000).float().unsqueeze(1)
    y = torch.arange(1000)
    loader = DataLoader(TensorDataset(x, y), batch_size=50)
    xs, ys, bs = subsample_loader(loader, 0.05, seed=0)
    assert xs.shape == (50, 1) and bs == 50
    assert ys.unique().numel() == 50
    assert torch.equal(xs[:, 0].long(), ys)  # pairs stay together
    assert torch.equal(subsample_loader(loader, 0.05, seed=0)[1], ys)
    assert not torch.equal(subsample_loader(loader, 0.05, seed=1)[1], ys)


def regression_data(n=400):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 5, generator=g)
    return x, x.sum(1, keepdim=True)


def test_a_loss_that_ignores_the_output_is_refused_with_the_fix():
    x, y = regression_data()
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1))
    loader = DataLoader(TensorDataset(x, y), batch_size=20)
    with pytest.raises(ValueError, match=r"^loss_fn \(cross_entropy\) does not change with the model's "
                                         r"output \(20, 1\) .* pass loss_fn=torch.nn.functional.mse_loss\.$"):
        finetune(model, loader, weights=start_net(), **QUICK)
    result = finetune(model, loader, weights=start_net(), loss_fn=F.mse_loss, **QUICK)
    assert fingerprint(result.net) != fingerprint(start_net())


def test_a_loss_no_trainable_parameter_moves_is_refused():
    class Unused(nn.Module):
        """Trainable weights the output does not depend on; the layer that matters is frozen."""

        def __init__(self):
            super().__init__()
            self.frozen = nn.Linear(5, 1).requires_grad_(False)
            self.unused = nn.Parameter(torch.zeros(3))

        def forward(self, x):
            return self.frozen(x)

    x, y = regression_data()
    loader = DataLoader(TensorDataset(x, y), batch_size=20)
    with pytest.raises(ValueError, match=r"^the loss \(mse_loss\) does not change with any trainable "
                                         r"parameter of the model"):
        finetune(Unused(), loader, weights=start_net(), loss_fn=F.mse_loss, **QUICK)
    with pytest.raises(ValueError, match=r"^model has no trainable parameters"):
        finetune(nn.Linear(5, 1).requires_grad_(False), loader, weights=start_net(),
                 loss_fn=F.mse_loss, **QUICK)
    with pytest.raises(ValueError, match=r"^loss_fn \(<lambda>\) must return a scalar, got Tensor\(20, 1\)"):
        finetune(nn.Linear(5, 1), loader, weights=start_net(), loss_fn=lambda o, t: (o - t) ** 2, **QUICK)


def test_finetune_from_the_shipped_weights_leaves_the_global_rng_alone():
    x, y = make_data()
    model = TinyNet()
    state = torch.get_rng_state()
    finetune(model, DataLoader(TensorDataset(x, y), batch_size=32), weights="simple",
             subsample=0.5, trajectories=1, unroll=2, max_unrolls=1, progress=False)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("where", ["parameter", "buffer"])
def test_a_model_on_the_meta_device_is_refused_by_name(where):
    with torch.device("meta"):
        model = TinyNet()
    if where == "buffer":  # real parameters, one statistic left on the meta device
        model = TinyNet()
        model.body[1].register_buffer("running_var", torch.empty(12, device="meta"))
    x, y = make_data()
    name = "body.0.weight" if where == "parameter" else "body.1.running_var"
    with pytest.raises(ValueError, match=rf"model {where} '{name}' is on the meta device.*to_empty"):
        finetune(model, [(x, y)], weights=start_net(), batch_size=32, **QUICK)


def test_progress_off_a_terminal_is_one_line_per_trajectory(capsys):
    x, y = make_data()
    finetune(TinyNet(), [(x, y)], weights=start_net(), batch_size=32, **dict(QUICK, progress=True))
    out, err = capsys.readouterr()  # neither is a terminal here
    assert out == "" and "\r" not in err
    lines = err.splitlines()
    assert [line.split(":")[0] for line in lines] == ["trajectory 0", "trajectory 1"], err
    assert all("the target" in line and "unroll(s)" in line for line in lines)


def test_finetune_lowers_the_meta_loss():
    # a sign rule whose steps are too small for the model: following the meta-gradient makes
    # them useful; climbing it (a flipped sign) makes the rule worse than where it started
    from l2l_optim.meta import run_trajectory
    from l2l_optim.meta.init_rules import init_net

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(400, 6, generator=gen)
    y = (x[:, 0] > 0).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
    start = init_net(SimpleOptimizerNet(), "sign", lr=3e-3)
    result = finetune(model, [(x, y)], weights=start, subsample=0.5, batch_size=32, trajectories=2,
                      unroll=10, max_unrolls=3, meta_lr=0.1, progress=False)
    task = task_from_model(model, result.subsample, batch_size=result.batch_size)

    def meta_loss(net) -> float:  # the weighted meta-loss from two inits fine-tuning never used
        return sum(run_trajectory(net, task, seed=s, steps=40)["meta_loss"] for s in (10_001, 10_002)) / 2

    before, after = meta_loss(start), meta_loss(result.net)
    # (about 3x the start's weighted decrease here; less than the start's with the sign flipped)
    assert before < 0 and after < 2 * before, (before, after)
