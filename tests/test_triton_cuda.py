"""The Triton path's CUDA machinery, checked without a GPU wherever torch allows it.

* the ops a compiled step holds (``torch.ops.l2l_optim_triton.*``): traced on fake CUDA tensors
  (``FakeTensorMode``, no GPU needed), a whole ``torch.compile(opt.step, fullgraph=True)`` on
  CUDA parameters included, and ``torch.library.opcheck`` where the kernels run;
* the tables: built with tensor operations, owned by a handle that lives as long as its
  anchor, kept for a captured CUDA graph, never built while a stream captures;
* the kernels, where they run (a GPU, or Triton's interpreter): the tanh's error bound,
  aligned (128-bit) and unaligned groups, the rms input with one ``c`` per tensor, bf16
  parameters without scratch memory, a compiled step against the eager one under a schedule;
* on a GPU only (``examples/gpu_check.sh`` runs them): launches on a tensor's device that is
  not the current one, a captured graph whose tables were evicted from the handle's cache,
  the memory a bf16 step allocates.

Triton picks its interpreter when it decorates the kernels, so without a GPU the kernel tests
run again in a subprocess with ``TRITON_INTERPRET=1`` (:func:`test_in_interpreter`).
"""

from __future__ import annotations

import gc
import math
import os
import re
import shutil
import subprocess
import sys
import time
import warnings
import weakref
from pathlib import Path

import pytest
import torch

tk = pytest.importorskip("l2l_optim.kernels.triton")

from l2l_optim import SimpleOptimizer  # noqa: E402
from l2l_optim.kernels import _triton_tables as tables  # noqa: E402
from l2l_optim.kernels._common import RunningRms, packed_weights  # noqa: E402
from l2l_optim.kernels.reference import simple_update_reference  # noqa: E402
from l2l_optim.nets import SimpleOptimizerNet  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
IN_SUBPROCESS = os.environ.get("L2L_TRITON_CUDA_SUBPROCESS") == "1"
GPU = torch.cuda.is_available() and not INTERPRET
DEVICE = "cuda" if GPU else "cpu"
RUNS_HERE = tk.is_available() and (INTERPRET or GPU)
H = 10

# the kernel tests: where the kernels run (a GPU, or this file again in the interpreter)
kernels_here = pytest.mark.skipif(not RUNS_HERE, reason="needs a GPU or TRITON_INTERPRET=1 "
                                                        "(see test_in_interpreter)")
# the tests of the machinery around the kernels: once, in the parent process
machinery = pytest.mark.skipif(IN_SUBPROCESS or not tk.is_available(),
                               reason="runs in the parent process (needs Triton)")
gpu_only = pytest.mark.skipif(not GPU, reason="needs a CUDA device")


def random_weights(seed: int = 0, dtype=torch.float32, **config):
    g = torch.Generator().manual_seed(seed)
    net = SimpleOptimizerNet(**config)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) / 10**0.5)
    return net.fused_weights(dtype=dtype)


def state(shapes, pdt=torch.float32, hdt=torch.float32, device=DEVICE, seed=0, rms=True,
          c_per_tensor=False):
    g = torch.Generator().manual_seed(seed)
    cd = torch.float64 if pdt == torch.float64 else torch.float32
    ps = [torch.randn(s, generator=g, dtype=torch.float64).to(device, pdt) for s in shapes]
    hs = [torch.tanh(torch.randn(H, p.numel(), generator=g, dtype=torch.float64)).to(device, hdt)
          for p in ps]
    if not rms:
        return ps, hs, None
    vs = [torch.rand(p.numel(), generator=g, dtype=torch.float64).to(device, cd) for p in ps]
    cs = [torch.full((1,) if c_per_tensor else (p.numel(),), 0.3, dtype=cd, device=device)
          for p in ps]
    return ps, hs, RunningRms(vs, cs)


def grads_for(ps, step, seed=0):
    g = torch.Generator().manual_seed(1000 * seed + step)
    return [torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.device, p.dtype) for p in ps]


def clone(ts):
    return None if ts is None else type(ts)(*([t.clone() for t in x] for x in ts)) \
        if isinstance(ts, RunningRms) else [t.clone() for t in ts]


def on_cpu(ts):
    return [t.cpu() for t in ts]


def max_err(a, b):
    return max([0.0] + [(x.double().cpu() - y.double().cpu()).abs().max().item()
                        for x, y in zip(a, b) if x.numel()])


# ------------------------------------------------------------------------------ the tables


@machinery
@pytest.mark.parametrize("block", [1, 7, 512])
def test_block_table_matches_a_loop_over_blocks(block):
    numels = [0, 1, 511, 512, 513, 5000, 0, 3]
    blocks, counts = tables.block_table(numels, block)
    expect = [t for t, n in enumerate(numels) for _ in range(0, n, block)]
    assert blocks.dtype == torch.int32 and blocks.tolist() == expect
    assert counts.tolist() == [-(-n // block) for n in numels]


@machinery
def test_layout_groups_segments_and_first_blocks():
    keys = ["a", "b", "a", "a", "b", "c"]
    numels = [700, 5, 0, 1025, 512, 1]
    layout = tables.build_layout(keys, numels, lambda key: 512 if key != "b" else 256,
                                 torch.device("cpu"))
    assert [g.key for g in layout.groups] == ["a", "b", "c"]
    assert [g.idx for g in layout.groups] == [(0, 3), (1, 4), (5,)]  # the empty tensor: none
    assert [g.block for g in layout.groups] == [512, 256, 512]
    assert [g.first for g in layout.groups] == [(0, 2), (0, 1), (0,)]
    assert [g.n_blocks for g in layout.groups] == [2 + 3, 1 + 2, 1]
    assert [g.part_base for g in layout.groups] == [0, 5, 8]
    assert layout.n_blocks == 9 and layout.n_total == sum(numels)
    first, count = layout.segments.view(2, -1).tolist()
    assert first == [0, 5, 0, 2, 6, 8] and count == [2, 1, 0, 3, 2, 1]
    rows = [[100 + i, 0, 0, 0, 0, n, i] for i, n in enumerate(numels)]
    tabs = tables.build_tensor_tables(layout, rows, torch.device("cpu"))
    assert tabs[0].tolist() == [[100, 0, 0, 0, 0, 700, 0, 0], [103, 0, 0, 0, 0, 1025, 3, 2]]
    assert tabs[1][:, 7].tolist() == [0, 1] and tables.SLOTS[7] == "first block"


@machinery
def test_block_tables_for_a_billion_parameters_build_in_milliseconds():
    # meta tensors: the sizes of 2^30 parameters and no memory (benchmarks/triton_sm90.py
    # prints the time; a Python loop per block took about a second)
    for count in (1, 1000):
        sizes = [2**30 // count + (i < 2**30 % count) for i in range(count)]
        params = [torch.empty(n, device="meta") for n in sizes]
        key = (torch.float32, torch.float32, torch.float32, 1, True)
        best = math.inf
        for _ in range(3):
            t0 = time.perf_counter()
            layout = tables.build_layout([key] * count, [p.numel() for p in params], tk._block,
                                         torch.device("meta"))
            best = min(best, time.perf_counter() - t0)
        block = tk._block(key)
        assert layout.n_total == 2**30 and layout.n_blocks == sum(-(-n // block) for n in sizes)
        assert best < 0.5, f"{best:.2f} s for {count} tensor(s)"  # (loaded CI machines: 5x slack)


@machinery
def test_the_default_handle_lives_exactly_as_long_as_its_anchor():
    anchor = torch.zeros(3)
    handle = tables.tables_for(anchor)
    assert tables.tables_for(anchor) is handle
    assert tables.tables_for(torch.zeros(3)) is not handle
    gone = weakref.ref(handle)
    del handle, anchor
    gc.collect()
    assert gone() is None


@machinery
def test_a_capture_keeps_its_tables_and_may_not_build_one(monkeypatch):
    # a CUDA device object needs no GPU; the capture state is what the handle asks torch
    capturing = [False]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    cuda = torch.device("cuda")
    handle = tables.TritonTables(max_entries=1)
    built = []

    def make(value):
        return lambda: built.append(value) or {"table": value}

    used = handle.get(("k", 0), make(0), cuda, "tensor tables")
    capturing[0] = True
    assert handle.get(("k", 0), make(0), cuda, "tensor tables") is used  # a hit: no build
    with pytest.raises(RuntimeError, match="capturing a CUDA graph.*outside the capture"):
        handle.get(("k", 1), make(1), cuda, "tensor tables")
    capturing[0] = False
    for k in range(2, 6):  # evicts ("k", 0) from the handle's entries
        handle.get(("k", k), make(k), cuda, "tensor tables")
    assert ("k", 0) not in handle._entries
    assert any(v is used for v in handle._captured.values()), "a captured table was dropped"
    assert built == [0, 2, 3, 4, 5]
    # the same rule on the CPU (the interpreter's device): nothing captures there
    capturing[0] = True
    assert handle.get(("cpu",), make(9), torch.device("cpu"), "tensor tables") == {"table": 9}


# -------------------------------------------------------------- the ops, on fake CUDA tensors


def _fake_cuda_step_args(mode):
    with mode:
        ps = [torch.randn(5, device="cuda"), torch.randn(3, 4, device="cuda", dtype=torch.bfloat16)]
        gs = [torch.randn_like(p) for p in ps]
        hs = [torch.zeros(H, p.numel(), device="cuda") for p in ps]
        vs = [torch.zeros(p.numel(), device="cuda") for p in ps]
        cs = [torch.zeros(p.numel(), device="cuda") for p in ps]
        skip = torch.zeros((), dtype=torch.bool, device="cuda")
    return ps, gs, hs, vs, cs, skip


def _recording_backend(targets):
    def backend(gm, example_inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    return backend


@machinery
def test_the_ops_have_fake_implementations_on_cuda_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    ps, gs, hs, vs, cs, skip = _fake_cuda_step_args(mode)
    ops = torch.ops.l2l_optim_triton
    with mode:
        w = torch.zeros(4 * H + H * H + 1, device="cuda")
        lrs = torch.full((2,), 0.1, dtype=torch.float64, device="cuda")
        assert ops.simple_update(ps, gs, hs, lrs, w, skip, vs, cs) is None
        sums = ops.simple_update_pass1(ps, gs, hs, lrs, w, skip, vs, cs)
        assert (sums.shape, sums.dtype, sums.device.type) == ((2,), torch.float64, "cuda")
        assert ops.simple_update_pass2(ps, gs, hs, lrs, w, None, [], [], sums.sum()) is None
        flags = ops.finite_flags(gs)
        assert (flags.shape, flags.dtype, flags.device.type) == ((2,), torch.bool, "cuda")
    for op in (ops.simple_update, ops.simple_update_pass1, ops.simple_update_pass2):
        mutated = {a.name for a in op.default._schema.arguments
                   if a.alias_info is not None and a.alias_info.is_write}
        assert mutated == {"params", "hiddens", "squares", "ones"}, op


@machinery
@pytest.mark.parametrize("aggregate", [False, True])
def test_the_update_traces_into_one_graph_on_fake_cuda_tensors(aggregate):
    from torch._subclasses.fake_tensor import FakeTensorMode

    torch._dynamo.reset()
    w = random_weights()
    targets = []

    def step(ps, gs, hs, vs, cs, skip, lr):
        agg = (lambda sums: sums.sum() / 17) if aggregate else None
        tk.simple_update_triton(ps, gs, hs, [lr, torch.tensor(0.5)], w, skip, agg,
                                RunningRms(vs, cs))
        return tk.finite_flags_triton(gs)

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    args = _fake_cuda_step_args(mode)
    with mode:
        flags = torch.compile(step, backend=_recording_backend(targets), fullgraph=True)(*args, 0.1)
    assert flags.device.type == "cuda" and flags.shape == (2,)
    ours = [t for t in targets if "l2l_optim" in t]
    expect = (["l2l_optim_triton.simple_update_pass1", "l2l_optim_triton.simple_update_pass2"]
              if aggregate else ["l2l_optim_triton.simple_update"])
    assert ours == expect + ["l2l_optim_triton.finite_flags"]
    torch._dynamo.reset()


@machinery
def test_a_compiled_optimizer_step_on_cuda_parameters_is_one_graph(monkeypatch):
    # torch.compile(opt.step, fullgraph=True) on CUDA parameters, traced on fake tensors: the
    # optimizer refuses tensor subclasses at construction, a check that the trace itself never
    # sees (dynamo reads a fake parameter's type as a Parameter's), so it is lifted here
    from torch._subclasses.fake_tensor import FakeTensorMode

    import l2l_optim.distributed as distributed

    if not hasattr(distributed, "check_param"):
        pytest.skip("the optimizer's parameter check moved; adapt this test")
    monkeypatch.setattr(distributed, "check_param", lambda *args, **kwargs: None)
    torch._dynamo.reset()
    net = SimpleOptimizerNet(input_norm="rms")
    targets = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the fingerprint reads the weights' bytes)
        with FakeTensorMode(allow_non_fake_inputs=True):
            params = [torch.nn.Parameter(torch.randn(8, 4, device="cuda")),
                      torch.nn.Parameter(torch.randn(3, device="cuda"))]
            opt = SimpleOptimizer(params, weights=net, lr=0.5)
            for p in params:
                p.grad = torch.randn_like(p)
            torch.compile(opt.step, backend=_recording_backend(targets), fullgraph=True)()
    assert "l2l_optim_triton.simple_update" in targets
    assert sorted(opt.state[params[0]]) == ["c", "h", "step", "v"]
    torch._dynamo.reset()


@kernels_here
def test_kernel_ops_pass_opcheck():
    w = packed_weights(random_weights(), DEVICE, torch.float32, flat=True)
    ps, hs, rms = state([(7,), (16,)], device=DEVICE)
    ps[1] = ps[1].bfloat16()
    gs = grads_for(ps, 0)
    lrs = torch.tensor([0.1, 0.2], dtype=torch.float64, device=DEVICE)
    shared = torch.tensor(0.5, dtype=torch.float64, device=DEVICE)
    ops = torch.ops.l2l_optim_triton
    base = (ps, gs, hs, lrs, w, None, rms.squares, rms.ones)
    for op, args in ((ops.simple_update, base), (ops.simple_update_pass1, base),
                     (ops.simple_update_pass2, base + (shared,)), (ops.finite_flags, (gs,))):
        torch.library.opcheck(op, args)


# ------------------------------------------------------------------------------ the kernels


@kernels_here
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_tanh_is_within_its_bound(dtype):
    # fp32: within 2.5e-7 of tanh everywhere (a few ulps of 1), and relatively within 2.5e-7
    # below 0.55 (the odd polynomial keeps small values accurate); fp64: a few ulps
    x = torch.cat([torch.linspace(-20, 20, 200001, dtype=torch.float64),
                   torch.logspace(-30, 1.5, 5001, dtype=torch.float64),
                   -torch.logspace(-30, 1.5, 5001, dtype=torch.float64),
                   torch.tensor([0.55, -0.55, 0.5499999, 0.5500001, 3e38, -3e38],
                                dtype=torch.float64)]).to(dtype)
    got = tk.kernel_tanh_triton(x.to(DEVICE)).cpu().double()
    want = torch.tanh(x.double())
    err = (got - want).abs()
    bound = 2.5e-7 if dtype == torch.float32 else 4e-16
    assert err.max().item() <= bound, (err.max().item(), x[err.argmax()].item())
    small = x.abs() < 0.55
    rel = err[small] / want[small].abs().clamp_min(1e-300)
    assert rel.max().item() <= bound, (rel.max().item(), x[small][rel.argmax()].item())
    special = torch.tensor([float("inf"), -float("inf"), float("nan"), -0.0, 0.0], dtype=dtype)
    out = tk.kernel_tanh_triton(special.to(DEVICE)).cpu()
    assert out[:2].tolist() == [1.0, -1.0] and out[2].isnan()
    assert torch.equal(out[3:].signbit(), torch.tensor([True, False]))  # -0 stays -0


@kernels_here
def test_kernel_aligned_and_unaligned_groups_agree():
    # the same values once at 16-byte-aligned addresses (128-bit accesses) and once one
    # element into their storage (element-wise accesses): the same results
    w = random_weights(1)
    shapes = [(64,), (8, 9), (4096,)]
    ps, hs, rms = state(shapes)
    runs = []
    for shift in (0, 1):
        def moved(ts):
            out = []
            for t in ts:
                base = torch.empty(t.numel() + 8, dtype=t.dtype, device=t.device)
                view = base[shift: shift + t.numel()].view(t.shape)
                view.copy_(t)
                out.append(view)
            return out

        p, g = moved(ps), moved(grads_for(ps, 0))
        h = [x.view(H, -1) for x in moved([x.reshape(-1) for x in hs])]
        r = RunningRms(moved(rms.squares), moved(rms.ones))
        assert all(tk._aligned([a, b, c], a.numel()) == (shift == 0 and a.numel() % 8 == 0)
                   for a, b, c in zip(p, g, h))
        for step in range(2):
            tk.simple_update_triton(p, g if step == 0 else moved(grads_for(ps, step)), h,
                                    [0.05] * 3, w, None, None, r)
        runs.append(on_cpu(p + h + r.squares + r.ones))
    tol = 0.0 if INTERPRET else 1e-6
    assert max_err(runs[0], runs[1]) <= tol


@kernels_here
@pytest.mark.parametrize("pdt", [torch.float32, torch.bfloat16])
def test_kernel_rms_input_with_one_c_per_tensor_follows_the_rule(monkeypatch, pdt):
    # c, the running mean of ones, may be one value per tensor: the kernels read it in every
    # program and advance it once, after the last read (the reference broadcasts it)
    import l2l_optim.kernels.reference as reference

    for module in (tk, reference):
        monkeypatch.setattr(module, "check_rms", lambda *args, **kwargs: None)
    w = random_weights(2)
    shapes = [(7,), (1030,), (), (16, 3)]
    ps, hs, rms = state(shapes, pdt=pdt, device="cpu", c_per_tensor=True)
    pk, hk = [p.to(DEVICE) for p in ps], [h.to(DEVICE) for h in hs]
    rk = RunningRms([v.to(DEVICE) for v in rms.squares], [c.to(DEVICE) for c in rms.ones])
    for step in range(3):
        g = grads_for(ps, step)
        skip = torch.tensor(step == 1)
        simple_update_reference(ps, g, hs, [0.1] * 4, w, skip, None, rms)
        tk.simple_update_triton(pk, [x.to(DEVICE) for x in g], hk, [0.1] * 4, w,
                                skip.to(DEVICE), None, rk)
    assert [c.shape for c in rk.ones] == [(1,)] * 4
    # 0.3 -> 0.3 beta + (1 - beta), twice (a GPU may fuse the multiply-add: an ulp)
    assert max_err(rms.ones, rk.ones) <= (0.0 if INTERPRET else 1e-7)
    assert max_err(rms.squares, rk.squares) <= 1e-6
    assert max_err(hs, hk) <= 1e-6
    tol = 1e-6 if pdt == torch.float32 else 2.0**-8
    assert max_err(ps, pk) <= tol * max(1.0, max(p.abs().max().item() for p in ps))


@kernels_here
def test_kernel_low_precision_parameters_allocate_no_full_size_buffer(monkeypatch):
    # bf16 / fp16 parameters recompute pass 1 in pass 2 instead of keeping u in fp32: the
    # step allocates nothing of the parameters' size (partials, the shared scalar and
    # per-tensor sums only)
    w = random_weights(3)
    n = 9000
    ps, hs, rms = state([(n,), (n,)], pdt=torch.bfloat16)
    ps[1] = ps[1].half()
    gs = grads_for(ps, 0)
    sizes = []
    for name in ("empty", "zeros", "empty_like", "zeros_like"):
        real = getattr(torch, name)

        def spy(*args, _real=real, **kwargs):
            out = _real(*args, **kwargs)
            sizes.append(out.numel())
            return out

        monkeypatch.setattr(torch, name, spy)
    tk.simple_update_triton(ps, gs, hs, [0.1, 0.1], w, None, lambda s: s.sum() / (2 * n), rms)
    tk.simple_update_triton(ps, gs, hs, [0.1, 0.1], w, None, None, rms)
    monkeypatch.undo()
    assert sizes and max(sizes) < n // 8, sizes


@kernels_here
@pytest.mark.parametrize("pdt", [torch.float32, torch.bfloat16])
def test_kernel_skip_with_an_aggregate_changes_nothing_and_sends_zeros(pdt):
    w = random_weights(4)
    ps, hs, rms = state([(33,), (2000,)], pdt=pdt)
    before = [t.clone() for t in ps + hs + rms.squares + rms.ones]
    sent = []
    tk.simple_update_triton(ps, grads_for(ps, 0), hs, [0.1, 0.1], w,
                            torch.tensor(True, device=DEVICE),
                            lambda s: sent.append(s.clone()) or s.sum(), rms)
    assert len(sent) == 1 and sent[0].tolist() == [0.0, 0.0]
    assert all(torch.equal(a, b) for a, b in zip(before, ps + hs + rms.squares + rms.ones))


@kernels_here
def test_kernel_learning_rates_floats_device_tensors_and_an_explicit_handle():
    # float lrs are a table cached by value (a new value, a new table), tensor lrs are read
    # on the device; both match the reference. An explicit handle owns the tables instead
    # of the one tied to the first hidden state
    w = random_weights(5)
    ps, hs, rms = state([(40,), (9,)], rms=False)
    pk, hk = [p.clone() for p in ps], [h.clone() for h in hs]
    own = tk.TritonTables()
    for step, lrs in enumerate(([0.1, 0.2], [0.3, 0.2], [torch.tensor(0.05, device=DEVICE), 0.4],
                                [0.1, 0.2])):
        g = grads_for(ps, step)
        ref_lrs = [float(lr) for lr in lrs]
        simple_update_reference(ps, g, hs, ref_lrs, w)
        tk.simple_update_triton(pk, g, hk, lrs, w, tables=own)
        assert max_err(ps, pk) <= 1e-6 and max_err(hs, hk) <= 1e-6, step
    assert len(own) >= 3  # layout, tensor tables, lr tables, rms constants
    assert hk[0] not in tables._HANDLES  # the default handle was never made


@kernels_here
def test_kernel_compiled_step_matches_eager_and_compiles_a_bounded_number_of_times():
    # torch.compile(opt.step, fullgraph=True) with the Triton ops inside, under a cosine
    # schedule (learning rates reach the ops as a device tensor, not as graph constants)
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(),
                                torch.nn.Linear(16, 3)).to(DEVICE)
    twin = [p.detach().clone().requires_grad_() for p in model.parameters()]
    # weights without averaging (test_averaging.py compiles the averaged step)
    opt = SimpleOptimizer(model.parameters(), weights="simple", impl="triton", lr=0.5)
    opt_twin = SimpleOptimizer(twin, weights="simple", impl="triton", lr=0.5)
    # compiled before a scheduler wraps opt.step (dynamo does not trace its wrapper)
    step = torch.compile(opt.step, fullgraph=True, backend="aot_eager")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "lr_scheduler.step() before optimizer.step()"
        scheds = [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=8) for o in (opt, opt_twin)]
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    for _ in range(6):
        for params, o, s, f in ((list(model.parameters()), opt, scheds[0], step),
                                (twin, opt_twin, scheds[1], opt_twin.step)):
            o.zero_grad()
            out = torch.tanh(x @ params[0].t() + params[1]) @ params[2].t() + params[3]
            out.pow(2).mean().backward()
            f()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                s.step()
    assert opt.param_groups[0]["lr"] < 0.5  # the schedule moved it
    tol = 0.0 if INTERPRET else 1e-6
    assert max_err(list(model.parameters()), twin) <= tol
    # the first step creates the state (one graph), every later one runs the second
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])
    torch._dynamo.reset()


# ------------------------------------------------------------------------------ a GPU only


@gpu_only
def test_gpu_launches_on_the_tensors_device_not_the_current_one():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    w = random_weights(6)
    ps, hs, rms = state([(100,), (7,)], device="cpu")
    pk, hk = [p.to("cuda:1") for p in ps], [h.to("cuda:1") for h in hs]
    rk = RunningRms([v.to("cuda:1") for v in rms.squares], [c.to("cuda:1") for c in rms.ones])
    g = grads_for(ps, 0)
    with torch.cuda.device(0):
        tk.simple_update_triton(pk, [x.to("cuda:1") for x in g], hk, [0.1, 0.1], w, None, None, rk)
        flags = tk.finite_flags_triton([x.to("cuda:1") for x in g])
    simple_update_reference(ps, g, hs, [0.1, 0.1], w, None, None, rms)
    assert flags.device == torch.device("cuda:1") and flags.all()
    assert max_err(ps, pk) <= 1e-6 and max_err(hs, hk) <= 1e-6


@gpu_only
def test_gpu_captured_step_outlives_the_eviction_of_its_tables():
    # a graph captured around a step keeps reading its tables after the handle's cache has
    # moved on (other learning rates, other tensors): replays match eager steps
    w = random_weights(7)
    ps, hs, rms = state([(1000, 7), (65537,), ()])
    g = grads_for(ps, 0)
    handle = tk.TritonTables(max_entries=2)

    def step(p, h, r, lrs=(0.01, 0.02, 0.03)):
        tk.simple_update_triton(p, g, h, list(lrs), w, None, None, r, tables=handle)

    p_e, h_e, r_e = clone(ps), clone(hs), clone(rms)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(side):
        step(ps, hs, rms)
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):
            step(ps, hs, rms)
    torch.cuda.current_stream().wait_stream(side)
    step(p_e, h_e, r_e)  # the warm-up's twin
    for k in range(8):  # new lr and tensor tables: the captured ones leave the cache
        other, oh, orms = state([(300,)], seed=k + 1)
        step(other, oh, orms, lrs=(0.001 * (k + 1),))
        tk.simple_update_triton(ps, g, hs, [0.5 + k, 0.1, 0.2], w, torch.tensor(True, device="cuda"),
                                None, rms, tables=handle)  # a skipped step: changes nothing
    gc.collect()
    torch.cuda.empty_cache()
    filler = [torch.full((1 << 20,), 7, dtype=torch.int64, device="cuda") for _ in range(8)]
    for _ in range(2):
        graph.replay()
        step(p_e, h_e, r_e)
    torch.cuda.synchronize()
    del filler
    assert all(torch.equal(a, b) for a, b in zip(ps + hs, p_e + h_e))


@gpu_only
def test_gpu_bf16_step_allocates_no_full_size_buffer():
    w = random_weights(8)
    n = 1 << 22
    ps, hs, rms = state([(n,)], pdt=torch.bfloat16)
    g = grads_for(ps, 0)
    tk.simple_update_triton(ps, g, hs, [0.1], w, None, None, rms)  # tables, compilation
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    tk.simple_update_triton(ps, g, hs, [0.1], w, None, None, rms)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < n  # bytes; an fp32 u would take 4n


# ----------------------------------------------------------------- examples/gpu_check.sh

GPU_CHECK = Path(__file__).resolve().parents[1] / "examples" / "gpu_check.sh"


@machinery
def test_gpu_check_script_parses():
    # the GPU check runs unattended on a lent machine: a syntax error there costs the lease
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    r = subprocess.run(["bash", "-n", str(GPU_CHECK)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    scripts = re.findall(r"<<'EOF'\n(.*?)\nEOF\n", GPU_CHECK.read_text(), re.S)
    assert len(scripts) >= 6  # the helpers, machine, large, scan, compile, timing
    for i, script in enumerate(scripts):
        compile(script, f"{GPU_CHECK.name}, here-document {i}", "exec")


@pytest.mark.slow
@pytest.mark.skipif(IN_SUBPROCESS or INTERPRET or GPU or not tk.is_available(),
                    reason="runs the CPU dry run in its own interpreter processes")
def test_gpu_check_stages_run_on_cpu_in_the_interpreter(tmp_path):
    # the stages' scripts at small sizes on CPU tensors (GPU_CHECK_DRY_RUN=1): their checks
    # pass on correct kernels (that they fail on broken ones was checked by hand with
    # mutated kernels: a dropped partial, a mask one too long, a block one short)
    env = dict(os.environ, GPU_CHECK_DRY_RUN="1", STAGES="large scan timing", OUT=str(tmp_path),
               PYTHON=sys.executable, OMP_NUM_THREADS="1")
    r = subprocess.run(["bash", str(GPU_CHECK)], env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    summary = (tmp_path / "summary.txt").read_text()
    assert "every stage passed" in summary and summary.count(" ok") == 3, summary
    assert "all checks passed" in (tmp_path / "large.txt").read_text()


# ------------------------------------------------------------------------ the interpreter


@pytest.mark.skipif(INTERPRET or GPU or not tk.is_available(),
                    reason="already in the interpreter, on a GPU, or no Triton")
def test_in_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1",
               L2L_TRITON_CUDA_SUBPROCESS="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                        "-k", "kernel"], env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    summary = r.stdout.strip().splitlines()[-1]
    # every kernel test ran in the interpreter: none skipped
    assert re.search(r"\d+ passed", summary) and "skipped" not in summary, r.stdout[-1500:]
