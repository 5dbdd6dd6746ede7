"""Schedule-Free averaging as an option of the SimpleOptimizer rule (``averaging``)."""

from __future__ import annotations

import copy

import pytest
import torch

from l2l_optim import SimpleOptimizer
from l2l_optim.meta.families import TaskSpec, build_task
from l2l_optim.meta.population import flatten, run_population
from l2l_optim.nets import SimpleOptimizerNet, averaged_step
from l2l_optim.meta.init_rules import init_net
from l2l_optim.weights import fingerprint, load_weights, save_weights

schedulefree = pytest.importorskip("schedulefree")


def sf_net(lr: float = 2.5e-3, averaging: float = 0.9) -> SimpleOptimizerNet:
    return init_net(SimpleOptimizerNet(input_norm="rms", averaging=averaging), "schedule-free", lr=lr)


def small_model() -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def train(model, opt, steps, seed=0, skip_grad=None):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(32, 8, generator=gen)
        y = torch.sin(x.sum(1, keepdim=True))
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        if skip_grad is not None:
            skip_grad(model)
        opt.step()


@pytest.mark.parametrize("impl", ["reference", "cpu"])
def test_schedule_free_init_is_schedule_free_adamw(impl):
    # the init rule with averaging 0.9 is Schedule-Free AdamW at its defaults, to the tanh's
    # linearity (gains of 1e-3..1e-2 on inputs of a few rms)
    if impl == "cpu":
        from l2l_optim import kernels
        if kernels.resolve_impl("auto", "cpu") != "cpu":
            pytest.skip("the fused CPU kernel is not built")
    ours, theirs = small_model(), small_model()
    train(ours, SimpleOptimizer(ours.parameters(), weights=sf_net(), impl=impl), 200)
    ref = schedulefree.AdamWScheduleFree(theirs.parameters(), warmup_steps=0)
    ref.train()
    train(theirs, ref, 200)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=2e-5)
    # and without averaging it is a different rule (plain normalised SGD): the test can fail
    plain = small_model()
    train(plain, SimpleOptimizer(plain.parameters(), weights=sf_net(averaging=0.0), impl=impl), 200)
    assert max((a - b).abs().max() for a, b in zip(plain.parameters(), theirs.parameters())) > 1e-3


def test_averaged_step_matches_the_explicit_three_sequences():
    torch.manual_seed(0)
    b = 0.9
    z = torch.randn(5)
    x = z.clone()
    y = z.clone()
    zs = z.clone()
    for t in range(1, 6):
        u = torch.randn(5)
        c = 1.0 / t
        z_new, x_new = z + u, None
        x_new = (1 - c) * x + c * z_new
        y_expected = (1 - b) * z_new + b * x_new

        def move():
            zs.add_(u)

        averaged_step([y], [zs], c, b, move)
        torch.testing.assert_close(y, y_expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(zs, z_new)
        z, x = z_new, x_new


def test_population_paths_agree_with_averaging():
    spec = TaskSpec("regression", dict(batch_size=16, init_scale=1.0, inputs=4, hidden=[8], act="tanh", noise=0.1))
    theta = flatten(sf_net())[None].repeat(2, 1)
    theta[1] *= 1.05
    runs = [run_population(build_task(spec, 1, 2, seed=3), theta, 60, input_norm="rms", averaging=0.9, impl=impl)
            for impl in ("auto", "torch")]
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-4, atol=1e-6)
    plain = run_population(build_task(spec, 1, 2, seed=3), theta, 60, input_norm="rms", impl="torch")
    assert not torch.allclose(plain, runs[1])


def test_population_averaging_is_the_optimizer():
    # one member of the population against SimpleOptimizer on the same model and batches
    spec = TaskSpec("quadratic", dict(batch_size=8, init_scale=1.0, dim=16, cond=100.0, noise=0.1))
    net = sf_net(lr=1e-2)
    task = build_task(spec, 1, 1, seed=5)
    losses = run_population(task, flatten(net)[None], 30, input_norm="rms", averaging=0.9, impl="torch")
    task = build_task(spec, 1, 1, seed=5)
    params = {k: v[0].clone().requires_grad_() for k, v in task.init_params().items()}
    opt = SimpleOptimizer(list(params.values()), weights=net, impl="reference")
    mine = []
    for _ in range(31):
        batch = task.sample_batch()
        f = task.losses({k: v[None] for k, v in params.items()}, batch)
        mine.append(float(f[0].detach()))
        opt.zero_grad()
        f.sum().backward()
        opt.step()
    torch.testing.assert_close(torch.tensor(mine), losses[:, 0], rtol=1e-4, atol=1e-6)


def test_skipped_step_changes_nothing_and_resume_is_exact():
    model = small_model()
    opt = SimpleOptimizer(model.parameters(), weights=sf_net())
    train(model, opt, 5)
    before = [p.detach().clone() for p in model.parameters()]
    z_before = [opt.state[p]["z"].clone() for p in model.parameters()]

    def poison(m):
        next(m.parameters()).grad[0, 0] = float("nan")

    with pytest.warns(RuntimeWarning, match="step skipped"):
        train(model, opt, 1, seed=9, skip_grad=poison)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(torch.equal(a, opt.state[p]["z"]) for a, p in zip(z_before, model.parameters()))
    # resume: a copy of model and optimizer continues bit for bit
    twin = copy.deepcopy(model)
    opt2 = SimpleOptimizer(twin.parameters(), weights=sf_net())
    opt2.load_state_dict(opt.state_dict())
    train(model, opt, 5, seed=2)
    train(twin, opt2, 5, seed=2)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


def _solo(b0: torch.Tensor, steps: int) -> torch.Tensor:
    solo = torch.nn.Parameter(b0.clone())
    opt = SimpleOptimizer([solo], weights=sf_net(lr=0.1))
    for _ in range(steps):
        opt.zero_grad()
        (solo.float() ** 2).sum().backward()
        opt.step()
    return solo.detach()


def test_parameters_with_different_step_counts_and_dtypes():
    # the init rule has no aggregate term, so parameters do not interact: a parameter that
    # joins late (its own c = 1 / t) and a bfloat16 one (slow path) each move as if alone
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(4))
    b0 = torch.randn(3)
    b = torch.nn.Parameter(b0.clone())
    opt = SimpleOptimizer([a, b], weights=sf_net(lr=0.1))
    for t in range(5):
        opt.zero_grad()
        (a.sum() + (b ** 2).sum() * (t >= 2)).backward()
        if t < 2:
            b.grad = None
        opt.step()
    assert int(opt.state[a]["step"]) == 5 and int(opt.state[b]["step"]) == 3
    torch.testing.assert_close(b.detach(), _solo(b0, 3))
    assert not torch.allclose(_solo(b0, 3), _solo(b0, 5))  # step counts matter: it can fail
    low = _solo(b0.bfloat16(), 3)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), _solo(b0, 3), rtol=2e-2, atol=2e-2)


def test_weight_file_keeps_the_averaging_flag(tmp_path):
    net = sf_net()
    path = tmp_path / "sf.safetensors"
    save_weights(net, path)
    loaded = load_weights(path)
    again = loaded.net if hasattr(loaded, "net") else loaded
    assert again.config["averaging"] == 0.9 and again.config["input_norm"] == "rms"
    assert fingerprint(again) == fingerprint(net)
    assert fingerprint(sf_net(averaging=0.0)) != fingerprint(net)
    assert "averaging" not in SimpleOptimizerNet().config


def test_invalid_averaging():
    with pytest.raises(ValueError, match="Invalid averaging"):
        SimpleOptimizerNet(averaging=1.0)
    with pytest.raises(ValueError, match="Invalid averaging"):
        SimpleOptimizerNet(averaging=-0.1)


def test_train_and_eval_swap_between_the_interpolation_point_and_the_average():
    ours, theirs = small_model(), small_model()
    opt = SimpleOptimizer(ours.parameters(), weights=sf_net())
    ref = schedulefree.AdamWScheduleFree(theirs.parameters(), warmup_steps=0)
    ref.train()
    train(ours, opt, 50)
    train(theirs, ref, 50)
    y = [p.detach().clone() for p in ours.parameters()]
    opt.eval()
    ref.eval()
    for a, b in zip(ours.parameters(), theirs.parameters()):  # both at their average x
        torch.testing.assert_close(a, b, rtol=1e-3, atol=2e-5)
    with pytest.raises(RuntimeError, match="call opt.train"):
        train(ours, opt, 1)
    opt.eval()  # idempotent
    opt.train()
    for a, b in zip(y, ours.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)
    # the mode travels with the state dict; weights without averaging ignore both calls
    assert opt.state_dict()["param_groups"][0]["train_mode"] is True
    plain = small_model()
    opt2 = SimpleOptimizer(plain.parameters(), weights="simple")
    before = [p.detach().clone() for p in plain.parameters()]
    opt2.eval()
    train(plain, opt2, 1)
    assert any(not torch.equal(a, b) for a, b in zip(before, plain.parameters()))


@pytest.mark.slow
def test_a_compiled_step_with_averaging_is_one_graph_and_skips_on_the_device():
    # the step counts and the skip flag stay on the device: fullgraph compiles, a step with a
    # non-finite gradient changes nothing, and the compiled run follows the eager one
    import warnings

    a, b = small_model(), small_model()
    eager = SimpleOptimizer(a.parameters(), weights=sf_net(lr=1e-2))
    compiled = SimpleOptimizer(b.parameters(), weights=sf_net(lr=1e-2))
    step = torch.compile(compiled.step, fullgraph=True)

    def poison(m):
        next(m.parameters()).grad[0, 0] = float("nan")

    gen = torch.Generator().manual_seed(3)
    for i in range(6):
        x = torch.randn(32, 8, generator=gen)
        for m, opt, run in ((a, eager, eager.step), (b, compiled, step)):
            opt.zero_grad()
            ((m(x) - torch.sin(x.sum(1, keepdim=True))) ** 2).mean().backward()
            if i == 3:
                poison(m)
                before = ([p.detach().clone() for p in m.parameters()],
                          [opt.state[p]["z"].clone() for p in m.parameters()])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                run()
            if i == 3:
                assert all(torch.equal(p, q) for p, q in zip(before[0], m.parameters()))
                assert all(torch.equal(z, opt.state[p]["z"]) for z, p in zip(before[1], m.parameters()))
    def gap(m, n):
        return max(float((p - q).detach().abs().max()) for p, q in zip(m.parameters(), n.parameters()))

    moved = gap(a, small_model())
    assert moved > 1e-2 and gap(a, b) < 1e-4 * max(1.0, moved)
    eager.eval(), compiled.eval()
    assert gap(a, b) < 1e-4


def _averaging_case(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    net = sf_net(lr=1e-2)
    with torch.no_grad():
        net.w_out[10:].fill_(0.05)  # the shared term, which pass 2 adds
    shapes = [(), (7,), (2100,), (3, 50)]
    ys = [torch.randn(s, generator=g, dtype=dtype) for s in shapes]
    zs = [y.reshape(-1) + 0.1 * torch.randn(y.numel(), generator=g, dtype=dtype) for y in ys]
    # gradients mostly positive: the hidden units' mean, and so the shared term, is not ~0
    grads = [torch.randn(s, generator=g, dtype=dtype) + 1.0 for s in shapes]
    hs = [torch.tanh(torch.randn(10, y.numel(), generator=g)).to(dtype) for y in ys]
    from l2l_optim.kernels._common import RunningRms

    cd = torch.float64 if dtype == torch.float64 else torch.float32
    rms = RunningRms([torch.rand(y.numel(), generator=g, dtype=cd) for y in ys],
                     [torch.full((1,), 0.4, dtype=cd) for _ in ys])
    return net, ys, zs, grads, hs, rms


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("two_pass", [False, True])
def test_the_cpu_kernel_moves_the_averaged_parameters_as_the_definition(dtype, two_pass):
    # the kernel's own passes (fused) against averaged_step around the same kernel (the one
    # definition): the same z, y within rounding of the ways y' = y + c (z - y) + k (z' - z) is summed
    from l2l_optim.functional import simple_update
    from l2l_optim.kernels import resolve_impl
    from l2l_optim.kernels._common import RunningRms

    if resolve_impl("auto", "cpu") != "cpu":
        pytest.skip("no CPU kernel in this build")
    net, ys, zs, grads, hs, rms = _averaging_case(dtype)
    zs = [z.view(y.shape) for z, y in zip(zs, ys)]
    c, b = 1.0 / 7, 0.9
    agg = (lambda sums: sums.sum() / sum(z.numel() for z in zs)) if two_pass else None
    runs = []
    for fused in (True, False):
        y, z, h = ([t.clone() for t in ts] for ts in (ys, zs, hs))
        r = RunningRms([t.clone() for t in rms.squares], [t.clone() for t in rms.ones])
        lrs = [1.0] * len(y)
        if fused:
            simple_update(z, grads, h, lrs, net, impl="cpu", rms=r, aggregate=agg,
                          averaged=(y, c, b))
        else:
            averaged_step(y, z, c, b, lambda: simple_update(z, grads, h, lrs, net, impl="cpu",
                                                            rms=r, aggregate=agg))
        runs.append((y, z, h))
    (y1, z1, h1), (y2, z2, h2) = runs
    assert all(torch.equal(a, b) for a, b in zip(z1 + h1, z2 + h2))
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    moved = max(float((a - b).abs().max()) for a, b in zip(y1, ys))
    assert moved > 1e-3
    assert max(float((a - b).abs().max()) for a, b in zip(y1, y2)) <= tol * max(1.0, moved) * 10


def test_averaging_falls_back_to_the_definition_where_the_kernel_cannot_fuse_it():
    # a transposed parameter (not contiguous): averaged_step
    # around the kernel, the same result as writing it out
    from l2l_optim.functional import simple_update

    net, ys, zs, grads, hs, rms = _averaging_case(torch.float32)
    ys = [y.t() if y.dim() == 2 else y for y in ys]
    zs = [z.view(y.shape) for z, y in zip(zs, ys)]
    grads = [g.reshape(y.shape) for g, y in zip(grads, ys)]
    c, b = 0.25, 0.9
    y1, z1 = [t.clone() for t in ys], [t.clone() for t in zs]
    from l2l_optim.kernels._common import RunningRms

    r1 = RunningRms([t.clone() for t in rms.squares], [t.clone() for t in rms.ones])
    r2 = RunningRms([t.clone() for t in rms.squares], [t.clone() for t in rms.ones])
    h1, h2 = [t.clone() for t in hs], [t.clone() for t in hs]
    simple_update(z1, grads, h1, [1.0] * 4, net, rms=r1, averaged=(y1, c, b))
    y2, z2 = [t.clone() for t in ys], [t.clone() for t in zs]
    averaged_step(y2, z2, c, b, lambda: simple_update(z2, grads, h2, [1.0] * 4, net, rms=r2))
    assert all(torch.equal(a, b) for a, b in zip(y1 + z1, y2 + z2))
    with pytest.raises(ValueError, match="one parameter per base sequence"):
        simple_update(z1, grads, h1, [1.0] * 4, net, rms=r1, averaged=(y1[:2], c, b))
