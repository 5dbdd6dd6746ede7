"""A compiled CPU step under a learning-rate schedule compiles a bounded number of times.

The fused CPU update is one opaque op in a compiled ``opt.step()``. Its learning rates reach
it as a tensor, an input of the graph: a list of floats would be a constant of the graph,
guarded by value, and every step of a schedule would compile the step again.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from l2l_optim import SimpleOptimizer, kernels
from l2l_optim.functional import simple_update
from l2l_optim.nets import SimpleOptimizerNet

STEPS = 12


@pytest.fixture(autouse=True)
def _cpu_kernel():
    if kernels.resolve_impl("auto", "cpu") != "cpu":
        pytest.skip("no CPU kernel in this build")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
    torch.set_num_threads(threads)


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def _train(model, step, sched, steps=STEPS):
    g = torch.Generator().manual_seed(1)
    lrs = []
    for _ in range(steps):
        model.zero_grad()
        model(torch.randn(5, 4, generator=g)).pow(2).sum().backward()
        step()
        sched.step()
        lrs.append(sched.get_last_lr()[0])
    return lrs


@pytest.mark.parametrize("weights", [None, "simple"], ids=["default", "simple"])
@pytest.mark.parametrize("lr", [0.5, "tensor"])
def test_a_compiled_step_under_cosine_annealing_compiles_a_bounded_number_of_times(lr, weights):
    lr = torch.tensor(0.5) if lr == "tensor" else lr
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    twin = copy.deepcopy(model)
    opt = SimpleOptimizer(model.parameters(), weights=weights, lr=lr, impl="cpu")
    ref = SimpleOptimizer(twin.parameters(), weights=weights, lr=copy.deepcopy(lr), impl="cpu")
    # compiled before the scheduler wraps opt.step (its wrapper is not traced)
    step = torch.compile(opt.step, backend="aot_eager", fullgraph=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "lr_scheduler.step() before optimizer.step()"
        lrs = _train(model, step, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS))
        ref_lrs = _train(twin, ref.step, torch.optim.lr_scheduler.CosineAnnealingLR(ref, T_max=STEPS))
    assert len({float(x) for x in lrs}) == STEPS and lrs == ref_lrs
    # the first step creates the state (one graph), every later one runs the second
    assert _graphs() <= 2, counters["stats"]
    # the same bits, but for the averaging: the compiled step runs it as torch ops around the
    # kernel, the eager one inside it, one rounding apart
    tol = dict(rtol=0, atol=0) if opt.net.averaging == 0 else dict(rtol=1e-6, atol=1e-7)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, **tol)
        for k in opt.state[p]:
            torch.testing.assert_close(opt.state[p][k], ref.state[q][k], **tol)


@pytest.mark.parametrize("aggregate", [False, True])
def test_a_compiled_functional_update_takes_new_lrs_without_compiling_again(aggregate):
    net = SimpleOptimizerNet()
    p, h = [torch.zeros(6), torch.zeros(2, 3)], [torch.zeros(10, 6), torch.zeros(10, 6)]
    p_ref, h_ref = [x.clone() for x in p], [x.clone() for x in h]
    mean = (lambda sums: (sums.sum() / 12).reshape(())) if aggregate else None

    def update(params, grads, hiddens, lr):
        simple_update(params, grads, hiddens, [lr, lr], net, impl="cpu", aggregate=mean)

    # (AOT autograd refuses the pass-1 op, which mutates list arguments and returns a list of
    # tensors: with an aggregate the graph is checked as dynamo captures it)
    backend = "eager" if aggregate else "aot_eager"
    compiled = torch.compile(update, backend=backend, fullgraph=True)
    for i in range(6):
        grads = [torch.full((6,), 1.0 + i), torch.full((2, 3), -0.5 * i)]
        compiled(p, grads, h, 0.1 * (i + 1))
        update(p_ref, grads, h_ref, 0.1 * (i + 1))
    assert all(torch.equal(a, b) for a, b in zip(p + h, p_ref + h_ref))
    assert _graphs() <= 2, counters["stats"]
