"""l2l_optim.functional.simple_update: every path against the reference, skip, and the one
cache of packed weights (kernels/_common.py).

The ``triton`` cases run where Triton can: on CUDA tensors when a GPU is present, else on CPU
tensors in Triton's interpreter, in a subprocess (:func:`test_triton_interpreter_functional`)
because ``TRITON_INTERPRET=1`` must be set before the kernels are decorated.
"""

from __future__ import annotations

import copy
import gc
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch

from l2l_optim import kernels
from l2l_optim.functional import RunningRms, simple_update
from l2l_optim.kernels import simple_update_reference
from l2l_optim.kernels._common import CACHE, compute_dtype, packed_weights
from l2l_optim.nets import DMOptimizerNet, SimpleOptimizerNet
from l2l_optim.optimizer import SimpleOptimizer

ROOT = Path(__file__).resolve().parents[1]
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
H = 10


def _paths() -> list[tuple[str, str]]:
    """(impl, device) pairs that run in this process; the interpreter subprocess runs triton
    only (the parent covers the rest)."""
    if INTERPRET:
        try:
            kernels.resolve_impl("triton", "cpu")  # no C++ build: this process tests triton only
        except RuntimeError:
            return []
        return [("triton", "cpu")]
    out = [(impl, "cpu") for impl in kernels.available_impls("cpu")]
    if torch.cuda.is_available():
        out += [(impl, "cuda") for impl in kernels.available_impls("cuda") if impl != "reference"]
    return out


PATHS = _paths()
FUSED = [p for p in PATHS if p[0] != "reference"]


@pytest.fixture(autouse=True)
def _one_thread():
    # shared 2-core machines: intra-op threads only add barrier waits to these small cases
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_net(seed: int = 0, **config) -> SimpleOptimizerNet:
    g = torch.Generator().manual_seed(seed)
    net = SimpleOptimizerNet(**config)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) / 10**0.5)
    return net


def make_state(specs, device, seed=0):
    """specs: (shape, param dtype, hidden dtype); returns params, grads, hiddens."""
    g = torch.Generator().manual_seed(seed)
    params, grads, hiddens = [], [], []
    for shape, pdt, hdt in specs:
        params.append(torch.randn(shape, generator=g, dtype=torch.float64).to(device, pdt))
        grads.append(torch.randn(shape, generator=g, dtype=torch.float64).to(device, pdt))
        n = params[-1].numel()
        hiddens.append(torch.tanh(torch.randn(H, n, generator=g, dtype=torch.float64)).to(device, hdt))
    return params, grads, hiddens


def clone(ts):
    return [t.clone() for t in ts]


def max_err(a, b):
    return max(((x.cpu().double() - y.cpu().double()).abs().max().item()
                for x, y in zip(a, b) if x.numel()), default=0.0)


def equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def make_rms(params, seed=1):
    """Running means of the rms input norm some steps in: positive v, c = 0.3."""
    g = torch.Generator().manual_seed(seed)
    squares, ones = [], []
    for p in params:
        c = torch.full((p.numel(),), 0.3, dtype=torch.float64)
        squares.append((torch.rand(p.numel(), generator=g, dtype=torch.float64) * c)
                       .to(p.device, compute_dtype(p.dtype)))
        ones.append(c.to(p.device, compute_dtype(p.dtype)))
    return RunningRms(squares, ones)


def step_both(impl, device, specs, net, steps=3, lrs=None):
    """`steps` steps of simple_update(impl) and of the reference on the same start; returns
    (ref params, ref hiddens, params, hiddens), and for a net with the rms input norm the
    running means after them (ref, impl) too."""
    p, g, h = make_state(specs, device)
    p_ref, g_ref, h_ref = clone(p), clone(g), clone(h)
    rms = make_rms(p) if net.input_norm else None
    rms_ref = RunningRms(clone(rms.squares), clone(rms.ones)) if rms else None
    lrs = lrs or [0.05] * len(specs)
    cd = compute_dtype(*(x.dtype for x in p))
    for _ in range(steps):
        simple_update(p, g, h, lrs, net, impl=impl, rms=rms)
        simple_update_reference(p_ref, g_ref, h_ref, lrs, net.fused_weights(dtype=cd, device=device),
                                rms=rms_ref)
    if rms:
        return p_ref, h_ref, p, h, rms_ref, rms
    return p_ref, h_ref, p, h


# ---------------------------------------------------------------------- against the reference

SPECS = {
    "fp32": [((7,), torch.float32, torch.float32), ((), torch.float32, torch.float32),
             ((3, 5), torch.float32, torch.float32)],
    "fp64": [((7,), torch.float64, torch.float64), ((), torch.float64, torch.float64),
             ((40,), torch.float64, torch.float64)],
    "bf16-hidden": [((7,), torch.float32, torch.bfloat16), ((33,), torch.float32, torch.bfloat16)],
    "mixed": [((9,), torch.float32, torch.float32), ((5,), torch.float64, torch.float64),
              ((6,), torch.bfloat16, torch.float32)],
}


@pytest.mark.parametrize("case", list(SPECS))
@pytest.mark.parametrize("impl,device", PATHS)
def test_matches_reference(impl, device, case):
    p_ref, h_ref, p, h = step_both(impl, device, SPECS[case], random_net(1))
    for a, b in zip(p + h, p_ref + h_ref):
        assert a.dtype == b.dtype and a.shape == b.shape and a.device.type == device
    if impl == "reference":
        assert equal([x.cpu() for x in p + h], p_ref + h_ref)
        return
    tol = {"fp32": 1e-6, "fp64": 1e-12, "bf16-hidden": 4 * 2.0**-8, "mixed": 3 * 2.0**-8}[case]
    assert max_err(p, p_ref) <= tol * 10 and max_err(h, h_ref) <= tol


@pytest.mark.parametrize("case", list(SPECS))
@pytest.mark.parametrize("impl,device", PATHS)
def test_matches_reference_with_the_rms_input_norm(impl, device, case):
    # the fused paths normalise inside pass 1; the running means they write must be the
    # reference's (last bits aside), and so must everything downstream of the input
    p_ref, h_ref, p, h, rms_ref, rms = step_both(impl, device, SPECS[case],
                                                 random_net(1, input_norm="rms"))
    for a, b in zip(rms.squares + rms.ones, rms_ref.squares + rms_ref.ones):
        assert a.dtype == b.dtype and a.shape == b.shape and a.device.type == device
    if impl == "reference":
        assert equal([x.cpu() for x in p + h + rms.squares + rms.ones],
                     p_ref + h_ref + rms_ref.squares + rms_ref.ones)
        return
    # v and c: a multiply-add may be fused (one rounding less), relative error ~1 ulp
    for a, b in zip(rms.squares + rms.ones, rms_ref.squares + rms_ref.ones):
        torch.testing.assert_close(a.cpu(), b, rtol=4 * torch.finfo(b.dtype).eps, atol=0)
    tol = {"fp32": 1e-6, "fp64": 1e-12, "bf16-hidden": 4 * 2.0**-8, "mixed": 3 * 2.0**-8}[case]
    assert max_err(p, p_ref) <= tol * 10 and max_err(h, h_ref) <= tol
    # and the input norm did change the result
    p_raw, h_raw, *_ = step_both("reference", device, SPECS[case], random_net(1))
    assert max_err(h_raw, h_ref) > 10 * tol


def _per_tensor(rms: RunningRms) -> RunningRms:
    """The same running means with one bias correction per tensor (every coordinate's c is
    the same number)."""
    return RunningRms(clone(rms.squares), [c[:1].clone() for c in rms.ones])


@pytest.mark.parametrize("case", ["fp32", "mixed", "bf16-hidden"])
@pytest.mark.parametrize("impl,device", PATHS)
def test_one_bias_correction_per_tensor_gives_the_per_coordinate_numbers(impl, device, case):
    # c holds one value per tensor or one per coordinate: the same numbers, bitwise, through
    # ordinary, skipped and two-pass steps
    specs = SPECS[case] + [((0,), torch.float32, torch.float32)]
    net = random_net(5, input_norm="rms")
    p, g, h = make_state(specs, device)
    rms = make_rms(p)
    # the empty tensor's c: one value in both runs (a per-tensor c that no coordinate reads)
    rms[1][-1] = torch.full((1,), 0.3, device=device)
    runs = []
    for layout in (rms, _per_tensor(rms)):
        ps, hs = clone(p), clone(h)
        total = sum(x.numel() for x in ps)
        for step, skip, aggregate in ((0, None, None), (1, torch.tensor(True, device=device), None),
                                      (2, torch.tensor(False, device=device), None),
                                      (3, None, lambda sums: (sums.sum() / total).reshape(1))):
            gs = [x * (step + 1) for x in g]
            simple_update(ps, gs, hs, [0.1] * len(ps), net, impl=impl, rms=layout, skip=skip,
                          aggregate=aggregate)
        runs.append((ps, hs, layout))
    (p1, h1, per_coord), (p2, h2, per_tensor) = runs
    assert equal(p1 + h1 + per_coord.squares, p2 + h2 + per_tensor.squares)
    # (an empty tensor's c is read by no coordinate: whether it steps is left to the path)
    for c, one in zip(per_coord.ones[:-1], per_tensor.ones[:-1]):
        assert one.shape == (1,) and torch.equal(c, one.expand_as(c))
    c0 = torch.tensor(0.3, dtype=torch.float32)
    for _ in range(3):  # three steps taken, one skipped
        c0 = c0 * 0.999 + (1 - 0.999)
    # (the fused kernels may fuse c * beta + (1 - beta) into one rounding)
    assert per_tensor.ones[0].item() == pytest.approx(c0.item(), rel=2 * torch.finfo(c0.dtype).eps)


@pytest.mark.parametrize("impl,device", PATHS)
def test_rms_running_means_may_be_strided_empty_or_aggregated(impl, device):
    # strided views are updated through their strides; an empty parameter has nothing to do;
    # with an aggregate callback (two passes) the result is the one-pass result
    specs = SPECS["fp32"] + [((0,), torch.float32, torch.float32)]
    net = random_net(4, input_norm="rms")
    p, g, h = make_state(specs, device)
    rms = make_rms(p)
    simple_update(p, g, h, [0.1] * 4, net, impl=impl, rms=rms)

    p2, g2, h2 = make_state(specs, device)
    base = make_rms(p2)
    wide = [torch.zeros(2 * x.numel(), dtype=x.dtype, device=device) for x in base.squares + base.ones]
    for w, x in zip(wide, base.squares + base.ones):
        w[::2] = x
    strided = RunningRms([w[::2] for w in wide[:4]], [w[::2] for w in wide[4:]])
    count = sum(x.numel() for x in p2)

    def mean_of_sums(sums):
        return (sums.sum() / count).reshape(1)

    simple_update(p2, g2, h2, [0.1] * 4, net, impl=impl, rms=strided, aggregate=mean_of_sums)
    tol = 0 if impl == "reference" else 1e-6
    assert max_err(p2, p) <= tol and max_err(h2, h) <= tol
    assert max_err(strided.squares + strided.ones, rms.squares + rms.ones) <= tol
    assert all(w[1::2].eq(0).all() for w in wide)  # the other elements are untouched


def test_a_net_with_the_rms_input_norm_needs_its_running_means():
    p, g, h = make_state(SPECS["fp32"], "cpu")
    net = random_net(1, input_norm="rms")
    with pytest.raises(ValueError, match="pass its running means as rms="):
        simple_update(p, g, h, [0.1] * 3, net)
    rms = make_rms(p)
    for impl, _ in PATHS:
        bad = RunningRms([x.double() for x in rms.squares], rms.ones)
        with pytest.raises(ValueError, match="rms squares 0 must hold 7 torch.float32 values"):
            simple_update(p, g, h, [0.1] * 3, net, impl=impl, rms=bad)
        with pytest.raises(ValueError, match="one running mean of each kind per parameter"):
            simple_update(p, g, h, [0.1] * 3, net, impl=impl, rms=(rms.squares[:2], rms.ones))
        with pytest.raises(TypeError, match="rms must be a RunningRms"):
            simple_update(p, g, h, [0.1] * 3, net, impl=impl, rms=rms.squares)
    assert equal(p, make_state(SPECS["fp32"], "cpu")[0])  # refused calls change nothing


@pytest.mark.parametrize("impl,device", PATHS)
def test_every_path_refuses_tensors_of_the_wrong_size_or_dtype(impl, device):
    # the fused paths take well-formed tensors in one fast pass and leave anything else to the
    # full checks: each refusal must still come, with its message, before anything is written
    p, g, h = make_state(SPECS["fp32"], device)
    net = random_net(1, input_norm="rms")
    rms = make_rms(p)
    before = clone(p) + clone(h) + clone(rms.squares) + clone(rms.ones)

    def call(p=p, g=g, h=h, rms=rms):
        simple_update(p, g, h, [0.1] * 3, net, impl=impl, rms=rms)

    with pytest.raises(ValueError, match=r"hidden state must have shape \(10, 7\), got \(4, 7\)"):
        call(h=[torch.zeros(4, 7, device=device)] + h[1:])
    with pytest.raises(ValueError, match=r"hidden state must have shape \(10, 15\), got \(10, 16\)"):
        call(h=h[:2] + [torch.zeros(H, 16, device=device)])
    with pytest.raises(ValueError, match="a gradient of 6 elements for a parameter of 7"):
        call(g=[g[0][:6]] + g[1:])
    with pytest.raises(ValueError, match="unsupported dtype torch.float32 / torch.int64"):
        call(g=g[:2] + [g[2].long()])
    with pytest.raises(ValueError, match="unsupported hidden-state dtype torch.float16"):
        call(h=h[:1] + [h[1].half()] + h[2:])
    short = RunningRms(rms.squares[:2] + [rms.squares[2][:-1]], rms.ones)
    with pytest.raises(ValueError, match="rms squares 2 must hold 15 torch.float32 values"):
        call(rms=short)
    with pytest.raises(ValueError, match=r"rms ones 0 must hold 1 or 7 torch.float32 values"):
        call(rms=RunningRms(rms.squares, [rms.ones[0][:3]] + rms.ones[1:]))
    assert equal(p + h + rms.squares + rms.ones, before)  # refused calls change nothing
    call()  # the well-formed call runs
    assert not equal(p, before[:3])


@pytest.mark.parametrize("impl", [i for i, d in PATHS if d == "cpu" and i != "triton"])
def test_matches_simple_optimizer_step(impl):
    # SimpleOptimizer.step() on CPU (a host-side non-finite check, so skip=None) with a fresh
    # zero hidden state is simple_update with the net, bitwise; float64 next to float32
    # parameters makes the fold precision (the whole call's) matter
    net = random_net(2)
    torch.manual_seed(0)
    params = [torch.randn(7, dtype=torch.float64), torch.randn(3, 4), torch.randn((), dtype=torch.bfloat16)]
    grads = [torch.randn_like(p) for p in params]
    mine = clone(params)
    opt_params = [torch.nn.Parameter(p.clone()) for p in params]
    for q, g in zip(opt_params, grads):
        q.grad = g.clone()
    opt = SimpleOptimizer(opt_params, lr=0.3, weights=net, impl=impl, state_dtype=torch.float32)
    hiddens = [torch.zeros(H, p.numel(), dtype=compute_dtype(p.dtype)) for p in params]
    for _ in range(3):
        opt.step()
        simple_update(mine, grads, hiddens, [0.3] * 3, net, impl=impl)
    assert equal([q.detach() for q in opt_params], mine)
    assert equal([opt.state[q]["h"] for q in opt_params], hiddens)


@pytest.mark.parametrize("impl", [i for i, d in PATHS if d == "cpu" and i != "triton"])
def test_the_default_bf16_state_is_simple_update_with_step_keys(impl):
    # the default state: bfloat16, rounded with rounding_keys of the step counts, bitwise
    from l2l_optim.rounding import rounding_keys

    net = random_net(2)
    torch.manual_seed(0)
    params = [torch.randn(7), torch.randn(3, 4)]
    grads = [torch.randn_like(p) for p in params]
    mine = clone(params)
    opt_params = [torch.nn.Parameter(p.clone()) for p in params]
    for q, g in zip(opt_params, grads):
        q.grad = g.clone()
    opt = SimpleOptimizer(opt_params, lr=0.3, weights=net, impl=impl)
    hiddens = [torch.zeros(H, p.numel(), dtype=torch.bfloat16) for p in params]
    for t in range(3):
        opt.step()
        simple_update(mine, grads, hiddens, [0.3] * 2, net, impl=impl,
                      rounding=rounding_keys([torch.tensor(t)] * 2))
    assert equal([q.detach() for q in opt_params], mine)
    assert equal([opt.state[q]["h"] for q in opt_params], hiddens)


# ----------------------------------------------------------------------------------- skip


@pytest.mark.parametrize("how", ["tensor", "bool"])
@pytest.mark.parametrize("impl,device", PATHS)
def test_skip_leaves_everything_untouched(impl, device, how):
    # finite gradients: only the flag can stop the step
    p, g, h = make_state(SPECS["mixed"], device)
    rms = make_rms(p)
    p0, h0, v0, c0 = clone(p), clone(h), clone(rms.squares), clone(rms.ones)
    net = random_net(3, input_norm="rms")
    skip = torch.tensor(True, device=device) if how == "tensor" else True
    simple_update(p, g, h, [0.1] * 3, net, impl=impl, skip=skip, rms=rms)
    assert equal(p, p0) and equal(h, h0) and equal(rms.squares, v0) and equal(rms.ones, c0)
    no = torch.tensor(False, device=device) if how == "tensor" else False
    simple_update(p, g, h, [0.1] * 3, net, impl=impl, skip=no, rms=rms)
    assert not equal(p, p0) and not equal(h, h0)
    assert not equal(rms.squares, v0) and not equal(rms.ones, c0)


# ---------------------------------------------------------------------------------- cache


@pytest.mark.parametrize("impl,device", PATHS)
def test_in_place_weight_change_is_repacked(impl, device):
    # the cache must notice an in-place edit (a version bump) of the net, and of SimpleWeights
    net = random_net(4)
    specs = SPECS["fp32"][:2] + SPECS["fp64"][:1]
    p, g, h = make_state(specs, device)
    simple_update(clone(p), g, clone(h), [0.1] * 3, net, impl=impl)  # fills the cache
    with torch.no_grad():
        net.w_hh.mul_(-0.5)
        net.alpha.add_(1.0)
    fresh = copy.deepcopy(net)  # the same values under new identities: packed afresh
    p1, h1, p2, h2 = clone(p), clone(h), clone(p), clone(h)
    simple_update(p1, g, h1, [0.1] * 3, net, impl=impl)
    simple_update(p2, g, h2, [0.1] * 3, fresh, impl=impl)
    assert equal(p1, p2) and equal(h1, h2)

    w = random_net(5).fused_weights(dtype=torch.float64, device=device)
    simple_update(clone(p), g, clone(h), [0.1] * 3, w, impl=impl)
    with torch.no_grad():
        w.w_ih.mul_(3.0)
    p1, h1, p2, h2 = clone(p), clone(h), clone(p), clone(h)
    simple_update(p1, g, h1, [0.1] * 3, w, impl=impl)
    simple_update(p2, g, h2, [0.1] * 3, type(w)(*(t.clone() for t in w)), impl=impl)
    assert equal(p1, p2) and equal(h1, h2)


@pytest.mark.parametrize("impl,device", PATHS)
def test_different_nets_do_not_collide(impl, device):
    # nets made and dropped one after another (their ids and addresses are free to be
    # reused) and two live nets of the same shapes: each call sees its own weights
    p, g, h = make_state(SPECS["fp32"], device)
    outs = []
    for seed in range(4):
        p1, h1 = clone(p), clone(h)
        simple_update(p1, g, h1, [0.1] * 3, random_net(seed), impl=impl)
        p2, h2 = clone(p), clone(h)
        w = random_net(seed).fused_weights(device=device)
        kernels.get_kernel(impl)(p2, g, h2, [0.1] * 3, type(w)(*(t.clone() for t in w)))
        assert equal(p1, p2) and equal(h1, h2)
        outs.append(p1)
    assert not equal(outs[0], outs[1])
    a, b = random_net(6), random_net(7)
    pa, ha, pb, hb = clone(p), clone(h), clone(p), clone(h)
    simple_update(pa, g, ha, [0.1] * 3, a, impl=impl)
    simple_update(pb, g, hb, [0.1] * 3, b, impl=impl)
    pc, hc = clone(p), clone(h)
    simple_update(pc, g, hc, [0.1] * 3, copy.deepcopy(b), impl=impl)
    assert equal(pb, pc) and not equal(pa, pb)


def test_cache_stays_bounded_and_keeps_the_newest():
    CACHE.clear()
    nets = [random_net(s) for s in range(3 * CACHE.maxsize)]
    for net in nets:
        packed_weights(net, "cpu", torch.float32)
        assert len(CACHE) <= CACHE.maxsize
    assert len(CACHE) == CACHE.maxsize
    # the newest entry is served from the cache: the same tensors, not a new fold
    assert packed_weights(nets[-1], "cpu", torch.float32) is packed_weights(nets[-1], "cpu", torch.float32)
    first = packed_weights(nets[0], "cpu", torch.float32)  # evicted long ago: folded again
    assert first is packed_weights(nets[0], "cpu", torch.float32)
    assert len(CACHE) == CACHE.maxsize


def test_cache_entries_keep_their_sources_alive():
    # keys name tensors by id and address; an entry holds its sources, so that a net dropped
    # by its owner cannot hand its id and addresses to a new net while the entry still serves
    net = random_net(9)
    packed_weights(net, "cpu", torch.float32)
    ref = weakref.ref(net)
    del net
    gc.collect()
    assert ref() is not None
    CACHE.clear()
    gc.collect()
    assert ref() is None


def test_packed_forms_match_the_fold():
    net = random_net(8, bias=True)
    w = net.fused_weights(dtype=torch.float64)
    assert all(torch.equal(a, b) for a, b in zip(packed_weights(net, "cpu", torch.float64), w))
    flat = packed_weights(w, "cpu", torch.float32, flat=True)
    assert flat.dtype == torch.float32 and flat.is_contiguous()
    assert torch.equal(flat, torch.cat([t.reshape(-1).float() for t in w]))
    assert flat.numel() == 4 * H + H * H + 1


# ---------------------------------------------------------------------------- arguments


def test_bad_arguments():
    p, g, h = make_state(SPECS["fp32"][:1], "cpu")
    with pytest.raises(ValueError, match="^Invalid impl: 'cuda'"):
        simple_update(p, g, h, [0.1], random_net(), impl="cuda")
    with pytest.raises(TypeError, match="SimpleOptimizerNet or SimpleWeights, got DMOptimizerNet"):
        simple_update(p, g, h, [0.1], DMOptimizerNet())
    with pytest.raises(ValueError, match="same length"):
        simple_update(p, g, [], [0.1], random_net())
    with pytest.raises(ValueError, match=r"hidden state must have shape \(10, 7\)"):
        simple_update(p, g, [torch.zeros(4, 7)], [0.1], random_net(), impl="reference")
    with pytest.raises(ValueError, match="sparse"):
        simple_update(p, [g[0].to_sparse()], h, [0.1], random_net(), impl="reference")
    simple_update([], [], [], [], random_net())  # nothing to do
    with pytest.raises(TypeError, match="aggregate must be callable"):
        simple_update(p, g, h, [0.1], random_net(), aggregate=1.0)
    with pytest.raises(TypeError, match="plain torch.Tensor.*param 0 is a .*TwoTensor"):
        from torch.testing._internal.two_tensor import TwoTensor

        simple_update([TwoTensor(p[0], p[0].clone())], g, h, [0.1], random_net())


@pytest.mark.parametrize("impl,device", PATHS)
def test_aggregate_spans_two_calls_like_one(impl, device):
    # two calls that share one mean through `aggregate` (as two processes holding shards do
    # through an all-reduce) step like one call over both halves, on every path
    specs = SPECS["fp32"] + [((1500,), torch.float32, torch.float32)]
    net = random_net(2)
    p, g, h = make_state(specs, device)
    p_ref, h_ref = clone(p), clone(h)
    simple_update(p_ref, g, h_ref, [0.05] * 4, net, impl="reference")
    halves = [[0, 1, 2], [3]]
    count = sum(x.numel() for x in p)
    sums = []
    for half in halves:  # the other half's sums, as the all-reduce would bring them
        simple_update([p[i].clone() for i in half], [g[i] for i in half],
                      [h[i].clone() for i in half], [0.05] * len(half), net, impl=impl,
                      aggregate=lambda s: sums.append(s.sum()) or s.sum())
    for k, half in enumerate(halves):
        other = sums[1 - k]
        simple_update([p[i] for i in half], [g[i] for i in half], [h[i] for i in half],
                      [0.05] * len(half), net, impl=impl,
                      aggregate=lambda s, other=other: (s.sum() + other) / count)
    assert max_err(p, p_ref) <= 1e-6 and max_err(h, h_ref) <= 1e-6
    # without the other half's sums the mean is wrong, by ten times the tolerance
    p2, g2, h2 = make_state(specs, device)
    simple_update([p2[i] for i in halves[0]], [g2[i] for i in halves[0]],
                  [h2[i] for i in halves[0]], [0.05] * 3, net, impl=impl)
    assert max_err([p2[i] for i in halves[0]], [p_ref[i] for i in halves[0]]) > 1e-5


def test_compute_dtype_rule():
    assert compute_dtype(torch.float32, torch.float64) == torch.float64
    assert compute_dtype(torch.bfloat16) == torch.float32
    assert compute_dtype(torch.float16, torch.float32) == torch.float32


# ---------------------------------------------------------------- triton in the interpreter


def test_triton_interpreter_functional():
    """This file's triton cases on CPU tensors in Triton's interpreter, in a subprocess."""
    if INTERPRET or torch.cuda.is_available():
        pytest.skip("the triton cases run in this process")
    from l2l_optim.kernels import triton as tk

    if not tk.is_available():
        pytest.skip(f"Triton not importable: {tk.import_error()}")
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__,
           "-k", "triton and not interpreter"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert " passed" in out and "failed" not in out and "skipped" not in out, out[-3000:]
