"""Tests for l2l_optim.training: the plain loop, test evaluation, the lr search, tail_mean."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from l2l_optim.models import lenet
from l2l_optim.tasks import Task, task_from_model
from l2l_optim.training import evaluate_model, search_lr, tail_mean, train_task


def bn_net() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.GELU(), nn.Linear(12, 4))


def make_data(n=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, :4] + 0.1 * torch.randn(n, 4, generator=g)).argmax(1)
    return x, y


def test_tail_mean():
    losses = [float(i) for i in range(1, 21)]
    assert tail_mean(losses) == 19.5  # the last 10%: 19 and 20
    assert tail_mean(losses, frac=0.5, max_window=4) == 18.5
    assert tail_mean([3.0]) == 3.0  # at least one value
    assert math.isnan(tail_mean([]))


def test_search_lr_finds_the_known_best_learning_rate():
    # least squares with E[x x^T] = 3 I: the loss Hessian is 6 I, so plain SGD contracts by
    # |1 - 6 lr| per step: lr=1 diverges, 0.1 converges fast, 0.01 and 0.001 are slow.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 10, generator=g) * math.sqrt(3)
    y = x @ torch.randn(10, 1, generator=g)
    model = nn.Linear(10, 1, bias=False)
    best, scores = search_lr((model, (x, y)), "sgd", steps=150, batch_size=64, loss_fn=F.mse_loss)
    assert best == 0.1
    assert set(scores) == {1.0, 0.1, 0.01, 0.001}
    assert scores[1.0] == float("inf")  # diverged: ranks last
    assert scores[0.1] < scores[0.01] < scores[0.001]
    # Adam, through a loader and a custom grid
    loader = DataLoader(TensorDataset(x, y), batch_size=64)
    best, scores = search_lr((model, loader), "adam", lrs=(0.3, 1e-4), steps=150, loss_fn=F.mse_loss)
    assert best == 0.3 and scores[0.3] < scores[1e-4]


def test_search_lr_errors():
    task = Task("t", lambda: nn.Linear(2, 2), train=(torch.randn(8, 2), torch.randint(0, 2, (8,))), batch_size=4)
    with pytest.raises(ValueError, match="optimizer"):
        search_lr(task, "rmsprop")
    with pytest.raises(ValueError, match="steps"):
        search_lr(task, "sgd", steps=0)
    with pytest.raises(TypeError):
        search_lr("mnist", "sgd")


def test_train_task_is_seeded_and_stops_on_divergence():
    x, y = make_data()
    task = task_from_model(bn_net(), (x, y), batch_size=16)
    r1 = train_task(task, lambda p: torch.optim.SGD(p, lr=0.1), steps=20, seed=0)
    r2 = train_task(task, lambda p: torch.optim.SGD(p, lr=0.1), steps=20, seed=0)
    assert r1.losses == r2.losses and len(r1.losses) == 20 and not r1.diverged
    r3 = train_task(task, lambda p: torch.optim.SGD(p, lr=1e30), steps=20, seed=0)
    assert r3.diverged and len(r3.losses) < 20


def test_evaluate_model_on_a_module_and_on_functional_state_alike():
    x, y = make_data(300)
    torch.manual_seed(0)
    model = bn_net()
    with torch.no_grad():  # give BatchNorm running statistics that differ from the batch's own
        model(x[:100] * 3 + 1)
    model.train()
    # the expected values, by hand, in eval mode
    ref = bn_net()
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        out = ref.eval()(x)
    expected = {"test_loss": float(F.cross_entropy(out, y)), "test_acc": float((out.argmax(1) == y).float().mean())}

    got = evaluate_model(model, (x, y), batch_size=64)
    assert got == pytest.approx(expected, rel=1e-6)
    assert model.training  # the mode is restored
    # the same values from a template module with other values, given the state by name
    template = bn_net()
    got_functional = evaluate_model(template, (x, y), state=model.state_dict(), batch_size=64)
    assert got_functional == pytest.approx(expected, rel=1e-6)
    assert template.training
    assert not torch.equal(template[0].weight, model[0].weight)  # the template was not loaded


def test_library_calls_leave_the_global_rng_alone():
    x, y = make_data()
    model = bn_net()
    images = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    state = torch.get_rng_state()
    task = task_from_model(model, (x, y), batch_size=16)
    params, buffers = task.init_params(0)
    task.loss(params, buffers, task.sample_batch(torch.Generator().manual_seed(0)))
    search_lr(task, "sgd", lrs=(0.1,), steps=2)
    registered = Task("t", lenet, train=images, batch_size=4)
    p, b = registered.init_params(0)
    registered.loss(p, b, registered.sample_batch(torch.Generator().manual_seed(0)))  # builds its template
    assert torch.equal(torch.get_rng_state(), state)


class _RecordingSGD(torch.optim.SGD):
    """SGD that records every group's lr at each step."""

    def __init__(self, params, lr):
        super().__init__(params, lr=lr)
        self.seen: list[float] = []

    def step(self, closure=None):
        self.seen.append(self.param_groups[0]["lr"])
        return super().step(closure)


def test_train_task_applies_the_schedule_to_the_starting_lr():
    x, y = make_data()
    task = Task("bn", bn_net, (x, y), batch_size=32)
    box = {}

    def make(p):
        box["opt"] = _RecordingSGD(p, lr=0.2)
        return box["opt"]

    r = train_task(task, make, steps=5, seed=0, schedule=lambda t: 1.0 / (t + 1))
    assert box["opt"].seen == pytest.approx([0.2 / (t + 1) for t in range(5)])
    assert len(r.losses) == 5 and r.cpu_seconds > 0 and r.skipped == 0


def test_train_task_returns_the_average_of_a_schedule_free_optimizer():
    # the default weights train at y and evaluate at the running average x (opt.eval())
    from l2l_optim import SimpleOptimizer

    x, y = make_data()
    task = Task("bn", bn_net, (x, y), batch_size=32)
    box = {}

    def make(p):
        box["opt"] = SimpleOptimizer(p)
        return box["opt"]

    r = train_task(task, make, steps=5, seed=0)
    opt = box["opt"]
    assert [g["train_mode"] for g in opt.param_groups] == [False]
    at_average = [p.detach().clone() for p in r.model.parameters()]
    opt.train()  # back at the interpolation point: not the same values
    assert any(not torch.equal(a, p) for a, p in zip(at_average, r.model.parameters()))


def test_a_task_draws_batches_from_batch_fn_or_its_data():
    def batch(gen):
        return torch.randn(8, 6, generator=gen), torch.randint(0, 4, (8,), generator=gen)

    synthetic = Task("synthetic", bn_net, batch_fn=batch)
    a = synthetic.sample_batch(torch.Generator().manual_seed(3))
    b = batch(torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert train_task(synthetic, lambda p: torch.optim.SGD(p, lr=0.1), steps=3).losses
    with pytest.raises(ValueError, match="has no training data"):
        Task("empty", bn_net)


def test_the_suite_runs_through_the_one_training_loop():
    from l2l_optim.evaluation.protocol import _train
    from l2l_optim.evaluation.suite import SuiteTask

    def batch(gen):
        x = torch.randn(16, 6, generator=gen)
        return x, x[:, :4].argmax(1)

    task = SuiteTask(name="s", config={}, model_fn=bn_net, batch_fn=batch)
    assert isinstance(task, Task)
    ref = train_task(task, lambda p: torch.optim.Adam(p, lr=1e-2), steps=20, seed=4,
                     schedule=lambda t: 1 - t / 20)
    run = _train(task, lambda p: torch.optim.Adam(p, lr=1e-2), 20, 4, schedule=lambda t: 1 - t / 20)
    assert run["losses"] == ref.losses
