"""Parity of the fused SimpleOptimizer kernels with the reference update (kernels/).

Paths under test, where they can run:

* ``cpu``: the C++/OpenMP library (installed, or compiled into the developer cache), each of
  its instruction sets this CPU runs. Skipped, with the load error as the reason, where it
  is unavailable (no installed library and no compiler).
* ``triton`` on CUDA tensors, when a GPU is present (``examples/gpu_check.sh``).
* ``triton`` on CPU tensors in Triton's interpreter. The interpreter is chosen when Triton
  decorates the kernels, i.e. by ``TRITON_INTERPRET=1`` before ``l2l_optim.kernels.triton`` is
  imported, so :func:`test_triton_interpreter_suite` re-runs this file's ``triton`` tests in a
  subprocess with that variable set; the variable never touches this process.

Tolerances: max abs error on theta <= 1e-6 * scale, with scale the parameter
scale max(1, max |theta|), and on h <= 1e-6, after 20 steps; fp64 must agree to 1e-12.

The file is long (about 900 lines) because every fused path's parity tests live in it once:
the ``path`` fixture runs them on the CPU library and on Triton, and the interpreter
subprocess re-runs this same file. Loading and building the CPU library is tested in
``test_cpu_library.py``.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cpu_isa import cpu_isa
from l2l_optim import kernels
from l2l_optim.kernels import get_kernel, resolve_impl, simple_update_reference
from l2l_optim.nets import SimpleOptimizerNet, SimpleWeights

ROOT = Path(__file__).resolve().parents[1]
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
IN_SUBPROCESS = os.environ.get("L2L_TRITON_SUBPROCESS") == "1"
H = 10


# ------------------------------------------------------------------------------- helpers


def random_net(seed: int = 0, **config) -> SimpleOptimizerNet:
    """Every weight random (alpha, beta and the biases too), of a realistic size."""
    g = torch.Generator().manual_seed(seed)
    net = SimpleOptimizerNet(**config)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) / 10**0.5)
        net.alpha.fill_(0.8)
        if net.aggregate:
            net.beta.fill_(1.3)
    return net


def weights_for(variant: str = "plain", dtype=torch.float32, seed: int = 0) -> SimpleWeights:
    cfg = {"plain": {}, "bias": {"bias": True}, "noagg": {"aggregate": False}}[variant]
    return random_net(seed, **cfg).fused_weights(dtype=dtype)


def make_state(specs, device="cpu", seed=0):
    """specs: list of (shape, param dtype, hidden dtype). Random params, random hidden in (-1, 1)."""
    g = torch.Generator().manual_seed(seed)
    params, hiddens = [], []
    for shape, pdt, hdt in specs:
        params.append(torch.randn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=pdt))
        n = params[-1].numel()
        h = torch.tanh(torch.randn(H, n, generator=g, dtype=torch.float64))
        hiddens.append(h.to(device=device, dtype=hdt))
    return params, hiddens


def make_grads(params, step, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed * 1000 + step + 1)
    return [
        (scale * torch.randn(p.shape, generator=g, dtype=torch.float64)).to(device=p.device, dtype=p.dtype)
        for p in params
    ]


def clone(ts):
    return [t.clone() for t in ts]


def run_both(kernel, specs, *, steps=20, lrs=None, weights=None, device="cpu", seed=0,
             grad_scale=1.0):
    """Run the reference and `kernel` side by side; return (ref params, ref h, params, h)."""
    weights = weights if weights is not None else weights_for()
    p_ref, h_ref = make_state(specs, "cpu", seed)
    p_k, h_k = clone(p_ref), clone(h_ref)
    p_k = [p.to(device) for p in p_k]
    h_k = [h.to(device) for h in h_k]
    lrs = lrs if lrs is not None else [0.01 * (1 + i % 5) for i in range(len(specs))]
    for step in range(steps):
        grads = make_grads(p_ref, step, grad_scale, seed)
        simple_update_reference(p_ref, grads, h_ref, lrs, weights)
        kernel(p_k, [g.to(device) for g in grads], h_k, lrs, weights)
    return p_ref, h_ref, [p.cpu() for p in p_k], [h.cpu() for h in h_k]


def max_err(a, b):
    return max(((x.double() - y.double()).abs().max().item() for x, y in zip(a, b) if x.numel()),
               default=0.0)


def scale_of(params):
    return max([1.0] + [p.double().abs().max().item() for p in params if p.numel()])


def assert_parity(p_ref, h_ref, p_k, h_k, tol_theta, tol_h):
    for a, b in zip(p_ref, p_k):
        assert a.shape == b.shape and a.dtype == b.dtype
    for a, b in zip(h_ref, h_k):
        assert a.shape == b.shape and a.dtype == b.dtype
    scale = scale_of(p_ref)
    et, eh = max_err(p_ref, p_k), max_err(h_ref, h_k)
    assert et <= tol_theta * scale, f"theta: max abs err {et:.3g} > {tol_theta:.1g} * {scale:.3g}"
    assert eh <= tol_h, f"h: max abs err {eh:.3g} > {tol_h:.1g}"


TOL = {torch.float64: 1e-12, torch.float32: 1e-6}


# ---------------------------------------------------------------------------- the paths


def _cpu_kernel():
    from l2l_optim.kernels import cpu

    if not cpu.is_available():
        pytest.skip(f"fused CPU kernel unavailable: {cpu.build_error()}")
    return cpu.simple_update_cpu


def _triton_device() -> str:
    from l2l_optim.kernels import triton as tk

    if not tk.is_available():
        pytest.skip(f"Triton not importable: {tk.import_error()}")
    if INTERPRET:
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    pytest.skip("no GPU: the triton tests run in Triton's interpreter in a subprocess "
                "(test_triton_interpreter_suite)")


def _triton_runs_here() -> bool:
    try:
        from l2l_optim.kernels import triton as tk
    except Exception:  # noqa: BLE001
        return False
    return tk.is_available() and (INTERPRET or torch.cuda.is_available())


# The parent process tests "cpu" (and "triton" where a GPU is); the interpreter subprocess
# tests "triton" only. Paths that cannot run here are not generated rather than skipped.
PATHS = ([] if INTERPRET else ["cpu"]) + (["triton"] if _triton_runs_here() else [])


@pytest.fixture(params=PATHS)
def path(request):
    """(kernel, device) of the fused path under test."""
    if request.param == "cpu":
        return _cpu_kernel(), "cpu"
    device = _triton_device()
    from l2l_optim.kernels.triton import simple_update_triton

    return simple_update_triton, device


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The machines these tests run on are shared: with 2 intra-op threads on a loaded 2-core
    # box every torch op pays for OpenMP barriers. One thread keeps the file fast;
    # test_cpu_thread_count_independence sets its own counts.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _fast(device):
    """The interpreter runs each program in Python: keep its secondary cases short."""
    return INTERPRET and device == "cpu"


def _steps(device, steps=20):
    return min(steps, 6) if _fast(device) else steps


ODD = [(), (1,), (7,), (1023,), (65537,), (3, 5, 7)]


# --------------------------------------------------------------------------- parity tests


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_parity_odd_sizes(path, dtype):
    kernel, device = path
    shapes = ODD if not _fast(device) else [(), (1,), (7,), (1023,), (3, 5, 7)]
    specs = [(s, dtype, dtype) for s in shapes]
    assert_parity(*run_both(kernel, specs, device=device), TOL[dtype], TOL[dtype])


def test_parity_large_tensor_few_steps(path):
    # a 65537-element tensor (crosses block boundaries with a ragged tail) next to tiny ones
    kernel, device = path
    specs = [((65537,), torch.float32, torch.float32), ((1,), torch.float32, torch.float32)]
    assert_parity(*run_both(kernel, specs, device=device, steps=3), 1e-6, 1e-6)


@pytest.mark.parametrize("variant", ["bias", "noagg"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_parity_ablation_weights(path, variant, dtype):
    # b_h / b_out (bias ablation) and w_b = 0 (no aggregation) go through the same kernels
    kernel, device = path
    specs = [(s, dtype, dtype) for s in [(), (7,), (1023,), (40, 3)]]
    w = weights_for(variant, dtype)
    assert_parity(*run_both(kernel, specs, device=device, weights=w, steps=_steps(device)),
                  TOL[dtype], TOL[dtype])


def test_parity_lrs(path):
    kernel, device = path
    specs = [(s, torch.float32, torch.float32) for s in [(5,), (), (300,), (2, 9)]]
    lrs = [0.0, 1.0, -0.5, 1e-3]
    res = run_both(kernel, specs, device=device, lrs=lrs, steps=_steps(device, 10))
    assert_parity(*res, 1e-6, 1e-6)
    p_ref, _, p_k, _ = res
    p0, _ = make_state(specs)
    assert torch.equal(p_k[0], p0[0])  # lr = 0: theta untouched (h still moves)


def test_parity_non_contiguous(path):
    # a transpose and a strided slice (the coordinate order is the logical, row-major one),
    # updated in place with their strides kept; one gradient is non-contiguous too
    kernel, device = path
    g = torch.Generator().manual_seed(3)
    bases = [torch.randn(6, 8, generator=g), torch.randn(5, 10, generator=g), torch.randn(7, generator=g)]

    def views(bs):
        return [bs[0].t(), bs[1][:, ::2], bs[2]]

    p_ref = views(clone(bases))
    p_k = views([b.to(device) for b in bases])
    assert not p_k[0].is_contiguous() and not p_k[1].is_contiguous()
    strides = [p.stride() for p in p_k]
    h_ref = [torch.tanh(torch.randn(H, p.numel(), generator=g)) for p in p_ref]
    h_k = [h.to(device) for h in h_ref]
    h_ref = clone(h_ref)
    w = weights_for()
    for step in range(_steps(device)):
        grads = make_grads(p_ref, step)
        grads[0] = grads[0].t().contiguous().t()
        assert not grads[0].is_contiguous()
        simple_update_reference(p_ref, grads, h_ref, [0.01] * 3, w)
        kernel(p_k, [x.to(device) for x in grads], h_k, [0.01] * 3, w)
    assert [p.stride() for p in p_k] == strides
    assert_parity(p_ref, h_ref, [p.cpu() for p in p_k], [h.cpu() for h in h_k], 1e-6, 1e-6)


def test_parity_mixed_dtypes(path):
    # one call, one mean over all coordinates, four parameter dtypes and three hidden dtypes
    kernel, device = path
    specs = [
        ((33,), torch.float32, torch.float32),
        ((17,), torch.float64, torch.float64),
        ((1029,), torch.float32, torch.bfloat16),
        ((), torch.float64, torch.float32),
        ((50,), torch.bfloat16, torch.float32),
        ((9, 3), torch.float16, torch.float32),
        ((12,), torch.float32, torch.float64),
        ((5,), torch.bfloat16, torch.bfloat16),
    ]
    p_ref, h_ref, p_k, h_k = run_both(kernel, specs, device=device, steps=_steps(device, 10))
    scale = scale_of(p_ref)
    for (shape, pdt, hdt), a, b, ha, hb in zip(specs, p_ref, p_k, h_ref, h_k):
        assert b.dtype == pdt and hb.dtype == hdt
        if pdt in (torch.float32, torch.float64) and hdt != torch.bfloat16:
            # (fp64 tensors see the mean of the fp32 ones' h' too: fp32-level agreement)
            tol_t, tol_h = 1e-6, 1e-6
        else:
            # bf16/fp16 storage: a 1-ulp rounding flip of the fp32 result is allowed (and
            # propagates a little through later steps)
            tol_t = 3 * 2.0**-8 if torch.bfloat16 in (pdt, hdt) else 3 * 2.0**-11
            tol_h = 3 * 2.0**-8 if hdt == torch.bfloat16 else 1e-5
        et = (a.double() - b.double()).abs().max().item()
        eh = (ha.double() - hb.double()).abs().max().item()
        assert et <= tol_t * scale, (shape, pdt, hdt, et)
        assert eh <= tol_h, (shape, pdt, hdt, eh)


def test_parity_bf16_hidden(path):
    kernel, device = path
    specs = [(s, torch.float32, torch.bfloat16) for s in [(), (7,), (1023,), (2, 300)]]
    p_ref, h_ref, p_k, h_k = run_both(kernel, specs, device=device, steps=_steps(device))
    # h is rounded to bf16 (8 bits) every step; the fp32 tanh of the kernels may differ from
    # torch's by an ulp, which flips a bf16 rounding now and then: allow a few bf16 ulps on h
    # and the resulting drift on theta, and require almost all of h to agree exactly.
    eh = max_err(h_ref, h_k)
    assert eh <= 4 * 2.0**-8, eh
    same = sum((a == b).sum().item() for a, b in zip(h_ref, h_k))
    total = sum(a.numel() for a in h_ref)
    assert same / total > 0.98, same / total
    assert max_err(p_ref, p_k) <= 1e-3 * scale_of(p_ref)


def assert_stochastic_rounding_exact(kernel, device, pdt, weights, shapes=((), (7,), (1023,), (2, 300))):
    """The kernel's stochastically rounded bf16 state is rounding.round_bf16_stochastic of the
    very float32 values it computes, which a float32 hidden state of the same inputs shows
    (the two dtypes share the arithmetic and differ only in the store). Exact."""
    from l2l_optim.rounding import round_bf16_stochastic, rounding_key

    hs = weights.w_ih.numel()
    params, _ = make_state([(s, pdt, torch.float32) for s in shapes], device)
    g = torch.Generator().manual_seed(1)
    hiddens = [torch.tanh(torch.randn(hs, p.numel(), generator=g)).to(device) for p in params]
    h32 = [h.to(torch.bfloat16).float() for h in hiddens]  # both dtypes hold these exactly
    h16 = [h.to(torch.bfloat16) for h in hiddens]
    grads = make_grads(params, 0)
    keys = [(rounding_key(5, i) + 12345 * i) % 2**32 for i in range(len(shapes))]
    lrs = [0.01] * len(shapes)
    kernel(clone(params), grads, h32, lrs, weights)
    kernel(clone(params), grads, h16, lrs, weights, rounding=keys)
    for a, b, key in zip(h32, h16, keys):
        expect = round_bf16_stochastic(a.cpu().float(), key)
        assert torch.equal(b.cpu().view(torch.int16), expect.view(torch.int16))
    # the same keys as a tensor on the device give the same bits, also with bits above the
    # low 32 (which the keys ignore)
    for extra in (0, 2**32):
        h16t = [h.to(torch.bfloat16) for h in hiddens]
        kernel(clone(params), grads, h16t, lrs, weights,
               rounding=torch.tensor([k + extra for k in keys], device=device))
        assert all(torch.equal(a, b) for a, b in zip(h16, h16t))


@pytest.mark.parametrize("pdt", [torch.float32, torch.bfloat16])
def test_stochastic_bf16_hidden_rounds_the_kernels_own_values(path, pdt):
    kernel, device = path
    assert_stochastic_rounding_exact(kernel, device, pdt, weights_for())


def test_stochastic_bf16_hidden_parity(path):
    from l2l_optim.rounding import rounding_key

    kernel, device = path
    specs = [(s, torch.float32, torch.bfloat16) for s in [(7,), (1023,), (2, 300)]]
    w = weights_for()
    p_ref, h_ref = make_state(specs, "cpu")
    p_k, h_k = [p.to(device) for p in clone(p_ref)], [h.to(device) for h in clone(h_ref)]
    lrs = [0.01] * len(specs)
    for step in range(_steps(device)):
        grads = make_grads(p_ref, step)
        keys = [rounding_key(step, i) for i in range(len(specs))]
        simple_update_reference(p_ref, grads, h_ref, lrs, w, rounding=keys)
        kernel(p_k, [g.to(device) for g in grads], h_k, lrs, w, rounding=keys)
    h_k = [h.cpu() for h in h_k]
    # as with rounding to nearest: an ulp of the fp32 tanh flips a rounding now and then
    same = sum((a == b).sum().item() for a, b in zip(h_ref, h_k))
    total = sum(a.numel() for a in h_ref)
    assert same / total > 0.98, same / total
    assert max_err(h_ref, h_k) <= 4 * 2.0**-8
    # and the keys are used: rounding to nearest gives other states
    h_near = [h.to(device) for h in clone(make_state(specs, "cpu")[1])]
    p_near = [p.to(device) for p in clone(make_state(specs, "cpu")[0])]
    for step in range(_steps(device)):
        kernel(p_near, [g.to(device) for g in make_grads(p_ref, step)], h_near, lrs, w)
    differ = sum((a != b.cpu()).sum().item() for a, b in zip(h_k, h_near))
    assert differ / total > 0.3, differ / total


def test_skip_flag(path):
    kernel, device = path
    specs = [(s, torch.float32, torch.float32) for s in [(7,), (), (100,)]]
    w = weights_for()
    p, h = make_state(specs, device)
    p0, h0 = clone(p), clone(h)
    grads = [g.to(device) for g in make_grads(p, 0)]
    kernel(p, grads, h, [0.1] * 3, w, torch.tensor(True, device=device))
    assert all(torch.equal(a, b) for a, b in zip(p, p0))
    assert all(torch.equal(a, b) for a, b in zip(h, h0))
    # skip = False is a normal step, bitwise
    p2, h2 = clone(p0), clone(h0)
    kernel(p, grads, h, [0.1] * 3, w, torch.tensor(False, device=device))
    kernel(p2, grads, h2, [0.1] * 3, w)
    assert all(torch.equal(a, b) for a, b in zip(p, p2))
    assert all(torch.equal(a, b) for a, b in zip(h, h2))
    assert not torch.equal(p[0], p0[0])


def test_zero_in_zero_out(path):
    # no bias anywhere: g = 0 and h = 0 give exactly no update, whatever the weights
    kernel, device = path
    p = [torch.randn(s, device=device) for s in [(7,), (), (300,)]]
    p0 = clone(p)
    h = [torch.zeros(H, x.numel(), device=device) for x in p]
    kernel(p, [torch.zeros_like(x) for x in p], h, [1.0] * 3, weights_for(), None)
    assert all(torch.equal(a, b) for a, b in zip(p, p0))
    assert all(not x.any() for x in h)


def test_nan_gradient_propagates_like_reference(path):
    # without the skip flag a NaN gradient poisons h' at its coordinate and, through the mean,
    # every theta: the kernels must not silently clamp it away (the optimizer skips instead)
    kernel, device = path
    specs = [(s, torch.float32, torch.float32) for s in [(7,), (20,)]]
    w = weights_for()
    p_ref, h_ref = make_state(specs)
    p_k, h_k = [x.to(device) for x in clone(p_ref)], [x.to(device) for x in clone(h_ref)]
    grads = make_grads(p_ref, 0)
    grads[1][3] = float("nan")
    grads[0][2] = float("inf")
    simple_update_reference(p_ref, grads, h_ref, [0.1, 0.1], w)
    kernel(p_k, [g.to(device) for g in grads], h_k, [0.1, 0.1], w)
    for a, b in zip(p_ref + h_ref, p_k + h_k):
        b = b.cpu()
        assert torch.equal(torch.isnan(a), torch.isnan(b))
        fin = torch.isfinite(a)
        assert torch.allclose(a[fin], b[fin], atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype,huge", [(torch.float32, 2e19), (torch.float32, 3e38),
                                         (torch.float64, 1e200)])
def test_a_huge_finite_gradient_leaves_the_rms_input_trainable(path, dtype, huge):
    # (1 - beta) g^2 overflows the compute dtype's g^2 first (float32: above ~1.8e19) and its
    # range next (~5.8e20): the running mean of squares must stay finite, or every later input
    # is g / inf = 0 and the coordinate never moves again
    kernel, device = path
    from l2l_optim.kernels._common import RunningRms

    w = weights_for(dtype=dtype)
    runs = {}
    for name, fn, dev in (("ref", simple_update_reference, "cpu"), ("kernel", kernel, device)):
        p, h = [torch.zeros(3, dtype=dtype, device=dev)], [torch.zeros(H, 3, dtype=dtype, device=dev)]
        rms = RunningRms([torch.zeros(3, dtype=dtype, device=dev)],
                         [torch.zeros(3, dtype=dtype, device=dev)])
        fn(p, [torch.full((3,), huge, dtype=dtype, device=dev)], h, [1.0], w, None, None, rms)
        moves = []
        for _ in range(4):
            before = p[0].clone()
            fn(p, [torch.ones(3, dtype=dtype, device=dev)], h, [1.0], w, None, None, rms)
            assert torch.isfinite(rms.squares[0]).all(), name
            moves.append(not torch.equal(p[0], before))
        assert all(moves) and torch.isfinite(p[0]).all(), name
        runs[name] = [p[0].cpu(), h[0].cpu(), rms.squares[0].cpu()]
    for a, b in zip(runs["ref"], runs["kernel"]):
        torch.testing.assert_close(b, a, rtol=4 * TOL[dtype], atol=TOL[dtype])


def test_empty_and_zero_numel(path):
    kernel, device = path
    kernel([], [], [], [], weights_for(), None)
    specs = [((0,), torch.float32, torch.float32), ((5,), torch.float32, torch.float32),
             ((3, 0), torch.float32, torch.float32)]
    assert_parity(*run_both(kernel, specs, device=device, steps=3), 1e-6, 1e-6)


def test_single_coordinate(path):
    # N = 1 in total (one 0-dim parameter): the mean is that coordinate's h'
    kernel, device = path
    specs = [((), torch.float32, torch.float32)]
    assert_parity(*run_both(kernel, specs, device=device, steps=_steps(device, 10)), 1e-6, 1e-6)


def test_version_counter_bumped(path):
    # an in-place update must be visible to autograd, as p.add_() would be
    kernel, device = path
    p = torch.randn(5, device=device, requires_grad=True)
    loss = (p * p).sum()  # saves p for backward
    h = torch.zeros(H, 5, device=device)
    versions = (p._version, h._version)
    kernel([p], [torch.ones(5, device=device)], [h], [0.1], weights_for())
    assert p._version > versions[0] and h._version > versions[1]
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_bad_arguments(path):
    kernel, device = path
    p = [torch.zeros(3, device=device)]
    with pytest.raises(ValueError, match="same length"):
        kernel(p, [torch.zeros(3, device=device)], [], [0.1], weights_for())


def test_deterministic_run_to_run(path):
    kernel, device = path
    specs = [(s, torch.float32, torch.float32) for s in [(5000,), (7,), ()]]
    outs = []
    for _ in range(2):
        p, h = make_state(specs, device)
        for step in range(3):
            kernel(p, [g.to(device) for g in make_grads(p, step)], h, [0.02] * 3, weights_for())
        outs.append((p, h))
    for a, b in zip(outs[0][0] + outs[0][1], outs[1][0] + outs[1][1]):
        assert torch.equal(a, b)


# ---------------------------------------------------- two passes with an external aggregate


def run_split(kernel, specs, parts, *, steps, device="cpu", weights=None, lrs=None):
    """The reference on every tensor in one call, and ``kernel`` on ``parts`` (lists of tensor
    indices) as if each part were another process's shards: each part's ``aggregate`` adds the
    other parts' per-tensor sums of ``w_b . h'`` and divides by the total count, as an
    all-reduce would. The other parts' sums come from a run of each part on copies (pass 1 is
    deterministic, which the second run checks). Returns (ref params, ref h, params, h)."""
    weights = weights if weights is not None else weights_for()
    p_ref, h_ref = make_state(specs, "cpu")
    p_k = [p.to(device) for p in clone(p_ref)]
    h_k = [h.to(device) for h in clone(h_ref)]
    lrs = lrs if lrs is not None else [0.01 * (1 + i % 5) for i in range(len(specs))]
    count = sum(p.numel() for p in p_ref)
    for step in range(steps):
        grads = make_grads(p_ref, step)
        simple_update_reference(p_ref, grads, h_ref, lrs, weights)
        grads = [g.to(device) for g in grads]
        sums = []
        for part in parts:
            seen = []
            kernel([p_k[i].clone() for i in part], [grads[i] for i in part],
                   [h_k[i].clone() for i in part], [lrs[i] for i in part], weights, None,
                   lambda s: seen.append(s.clone()) or s.sum() / count)
            sums.append(seen[0])
        for k, part in enumerate(parts):
            others = sum(float(x.sum()) for j, x in enumerate(sums) if j != k)

            def aggregate(s, k=k, others=others):
                assert torch.equal(s, sums[k])
                return (s.sum() + others) / count

            kernel([p_k[i] for i in part], [grads[i] for i in part], [h_k[i] for i in part],
                   [lrs[i] for i in part], weights, None, aggregate)
    return p_ref, h_ref, [p.cpu() for p in p_k], [h.cpu() for h in h_k]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_two_phase_split_matches_one_call(path, dtype):
    # three "processes", one holding only an empty tensor: together they must step like one
    # call over every tensor (float16 parameters go through the scratch buffer between passes)
    kernel, device = path
    hdt = torch.float64 if dtype == torch.float64 else torch.float32
    shapes = [(1023,), (), (3, 5, 7), (0,), (5000,)]
    specs = [(s, dtype, hdt) for s in shapes]
    # float16: a 1-ulp rounding flip of theta is allowed, as in test_parity_mixed_dtypes
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 3 * 2.0**-11}[dtype]
    steps = 3 if _fast(device) else 10
    result = run_split(kernel, specs, [[0, 2], [3], [1, 4]], steps=steps, device=device)
    assert_parity(*result, tol, 1e-12 if dtype == torch.float64 else 1e-5)


def test_two_phase_whole_call_equals_fused(path):
    # one part holding everything: the two-pass path gives the fused step, up to the order in
    # which the partial sums are added
    kernel, device = path
    specs = [(s, torch.float32, torch.float32) for s in [(4097,), (7,), ()]]
    p, h = make_state(specs, device)
    p2, h2 = clone(p), clone(h)
    n = sum(x.numel() for x in p)
    for step in range(3):
        grads = [g.to(device) for g in make_grads(p, step)]
        kernel(p, grads, h, [0.02] * 3, weights_for())
        kernel(p2, grads, h2, [0.02] * 3, weights_for(), None, lambda s: s.sum() / n)
    assert max_err(p, p2) <= 1e-7 * scale_of(p)
    assert all(torch.equal(a, b) for a, b in zip(h, h2))


def test_two_phase_skip_calls_aggregate_once_and_changes_nothing(path):
    # the aggregate may be a collective: a skipped step must still enter it exactly once
    kernel, device = path
    specs = [(s, torch.bfloat16, torch.float32) for s in [(7,), (300,)]]
    p, h = make_state(specs, device)
    p0, h0 = clone(p), clone(h)
    calls = []
    kernel(p, [g.to(device) for g in make_grads(p, 0)], h, [0.1] * 2, weights_for(),
           torch.tensor(True, device=device), lambda s: calls.append(s.cpu()) or s.sum())
    assert len(calls) == 1 and torch.equal(calls[0], torch.zeros(2, dtype=torch.float64))
    assert all(torch.equal(a, b) for a, b in zip(p + h, p0 + h0))


def test_two_phase_all_empty_still_aggregates(path):
    # a process whose shards are all empty enters the all-reduce like every other
    kernel, device = path
    p = [torch.zeros(0, device=device), torch.zeros(0, 4, device=device)]
    h = [torch.zeros(H, 0, device=device) for _ in p]
    calls = []
    kernel(p, [x.clone() for x in p], h, [0.1] * 2, weights_for(), None,
           lambda s: calls.append(s.cpu()) or s.sum())
    assert len(calls) == 1 and torch.equal(calls[0], torch.zeros(2, dtype=torch.float64))


def test_two_phase_aggregate_must_return_a_scalar(path):
    kernel, device = path
    p = [torch.zeros(3, device=device), torch.zeros(2, device=device)]
    for bad in (lambda s: s, lambda s: float(s.sum())):
        with pytest.raises(TypeError, match="one-element"):
            kernel(p, [torch.ones_like(x) for x in p], [torch.zeros(H, x.numel(), device=device)
                   for x in p], [0.1] * 2, weights_for(), None, bad)


# ------------------------------------------------------------------------ CPU kernel only


def test_cpu_thread_count_independence():
    kernel = _cpu_kernel()
    if INTERPRET:
        pytest.skip("CPU-kernel test")
    specs = [(s, torch.float32, torch.float32) for s in [(65537,), (7,), (), (4099,)]]
    specs += [((3000,), torch.float64, torch.float64), ((2500,), torch.bfloat16, torch.bfloat16)]
    threads = torch.get_num_threads()
    outs = []
    try:
        for nt in (1, 2, 3):
            torch.set_num_threads(nt)
            p, h = make_state(specs)
            for step in range(3):
                kernel(p, make_grads(p, step), h, [0.05] * len(specs), weights_for())
            outs.append(p + h)
    finally:
        torch.set_num_threads(threads)
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("isa", ["avx512", "avx2", "baseline"])
def test_cpu_every_instruction_set_matches_the_reference(isa):
    # the library holds one copy of its loops per instruction set and runs the best; each
    # copy this CPU can run must track the reference, deterministically in the thread count
    if INTERPRET:
        pytest.skip("CPU-kernel test")
    kernel = _cpu_kernel()
    threads = torch.get_num_threads()
    with cpu_isa(isa) as cpu:
        assert cpu.kernel_info()["isa"] == isa
        for dtype in (torch.float64, torch.float32):
            specs = [(s, dtype, dtype) for s in ODD]
            assert_parity(*run_both(kernel, specs, steps=5), TOL[dtype], TOL[dtype])
        specs = [((33,), torch.float32, torch.bfloat16), ((17,), torch.float64, torch.float32),
                 ((50,), torch.bfloat16, torch.float32), ((9, 3), torch.float16, torch.float64)]
        p_ref, h_ref, p_k, h_k = run_both(kernel, specs, steps=5)
        assert max_err(p_ref, p_k) <= 3 * 2.0**-8 * scale_of(p_ref)
        assert max_err(h_ref, h_k) <= 4 * 2.0**-8
        six = SimpleOptimizerNet(hidden_size=6)
        with torch.no_grad():
            for q in six.parameters():
                q.uniform_(-0.4, 0.4)
        p_ref, h_ref = [torch.randn(3000)], [torch.zeros(6, 3000)]
        p_k, h_k = clone(p_ref), clone(h_ref)
        for step in range(5):
            grads = make_grads(p_ref, step)
            simple_update_reference(p_ref, grads, h_ref, [0.02], six.fused_weights())
            kernel(p_k, grads, h_k, [0.02], six.fused_weights())
        assert_parity(p_ref, h_ref, p_k, h_k, 1e-6, 1e-6)
        # stochastic rounding of a bf16 state: the vector loop (fp32 compute, H = 10), the
        # portable one (fp64 compute) and the loop for other hidden sizes
        for pdt in (torch.float32, torch.float64):
            assert_stochastic_rounding_exact(kernel, "cpu", pdt, weights_for(dtype=pdt))
        assert_stochastic_rounding_exact(kernel, "cpu", torch.float32, six.fused_weights())
        x = torch.linspace(-25, 25, 100001)
        y, ref = cpu.kernel_tanh(x).double(), torch.tanh(x.double())
        assert ((y - ref).abs() / ref.abs().clamp_min(1e-38)).max() <= 2e-7  # as the tanh test
        outs = []
        try:
            for nt in (1, 3):
                torch.set_num_threads(nt)
                p, h = make_state([((9000,), torch.float32, torch.float32),
                                   ((7,), torch.bfloat16, torch.float32),
                                   ((70001,), torch.float32, torch.bfloat16)])
                kernel(p, make_grads(p, 0), h, [0.05] * 3, weights_for(), rounding=[1, 2, 3])
                outs.append(p + h)
        finally:
            torch.set_num_threads(threads)
        assert all(torch.equal(a, b) for a, b in zip(*outs))


@pytest.mark.parametrize("isa", ["avx512", "avx2", "baseline"])
def test_cpu_one_bias_correction_per_tensor_gives_every_copys_per_coordinate_bits(isa):
    # the rms input norm's c, one value per tensor (advanced once per step, in scalar code) or
    # one per coordinate (in the vector loop): each instruction set's copy gives the same bits
    if INTERPRET:
        pytest.skip("CPU-kernel test")
    kernel = _cpu_kernel()
    from l2l_optim.kernels._common import RunningRms

    specs = [((5000,), torch.float32, torch.float32), ((7,), torch.float64, torch.float64),
             ((), torch.float32, torch.bfloat16), ((33,), torch.bfloat16, torch.float32)]
    with cpu_isa(isa):
        runs = []
        for per_tensor in (False, True):
            p, h = make_state(specs)
            sizes = [1 if per_tensor else x.numel() for x in p]
            cds = [torch.float64 if x.dtype == torch.float64 else torch.float32 for x in p]
            rms = RunningRms([torch.zeros(x.numel(), dtype=cd) for x, cd in zip(p, cds)],
                             [torch.zeros(k, dtype=cd) for k, cd in zip(sizes, cds)])
            for step in range(4):
                kernel(p, make_grads(p, step), h, [0.05] * len(p), weights_for(), None, None, rms)
            runs.append((p, h, rms))
    (p1, h1, coord), (p2, h2, tensor) = runs
    assert all(torch.equal(a, b) for a, b in zip(p1 + h1 + coord.squares, p2 + h2 + tensor.squares))
    assert all(torch.equal(c, one.expand_as(c)) for c, one in zip(coord.ones, tensor.ones))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_cpu_first_nonfinite_names_the_first_tensor_with_a_nan_or_inf(dtype):
    # the optimizers' fast check of a step's gradients: every position (the last of a tensor
    # whose size is no multiple of a scan block or a vector included), every kind of
    # non-finite value, and no false alarm at the largest and smallest finite values
    if INTERPRET:
        pytest.skip("CPU-kernel test")
    _cpu_kernel()
    from l2l_optim.kernels import cpu

    g = torch.Generator().manual_seed(0)
    sizes = [(), (0,), (7,), (65536 + 3,), (3, 5)]
    base = [torch.randn(s, generator=g).to(dtype) for s in sizes]
    fi = torch.finfo(dtype)
    base[2][:4] = torch.tensor([fi.max, -fi.max, fi.tiny, fi.smallest_normal / 4], dtype=dtype)
    threads = torch.get_num_threads()
    try:
        for nt in (1, 3):
            torch.set_num_threads(nt)
            assert cpu.first_nonfinite(base) == -1 and cpu.first_nonfinite([]) == -1
            for i, pos in [(0, ()), (2, 6), (3, 0), (3, 40000), (3, 65536 + 2), (4, (2, 4))]:
                for bad in (float("nan"), float("inf"), -float("inf")):
                    ts = clone(base)
                    ts[i][pos] = bad
                    assert cpu.first_nonfinite(ts) == i, (nt, i, pos, bad)
            ts = clone(base)
            ts[4][0, 0], ts[3][5] = float("nan"), float("inf")
            assert cpu.first_nonfinite(ts) == 3
            ts[3][5] = 0.0
            assert cpu.first_nonfinite([ts[0], ts[4].t()]) == 1  # a non-contiguous view
            # a strided view scans its own elements, not the storage's first numel()
            wide = torch.zeros(20, dtype=dtype)
            wide[1] = float("nan")  # outside wide[::2]
            assert cpu.first_nonfinite([ts[0], wide[::2]]) == -1
            wide[1], wide[18] = 0.0, float("inf")  # inside, beyond the storage's first 10
            assert cpu.first_nonfinite([ts[0], wide[::2]]) == 1
    finally:
        torch.set_num_threads(threads)
    signed_nan = clone(base)
    bits = signed_nan[2].view({2: torch.int16, 4: torch.int32, 8: torch.int64}[fi.bits // 8])
    bits[3] = -1  # all ones: a negative NaN with a payload
    assert cpu.first_nonfinite(signed_nan) == 2
    assert cpu.first_nonfinite([torch.zeros(3, dtype=torch.int32)]) is None  # not scanned here


# The fp32 tanh's tolerance against torch's float64 tanh, per copy: max ulp (of the float32
# result) and max relative error. Its quotient E / (E + 2) comes from a reciprocal estimate and
# one correction by the residual, exact with a fused multiply-add (AVX-512, AVX2: as close as a
# correctly rounded division, 2.33 ulp over every 97th input); the baseline's residual rounds
# once more (2.88 ulp).
TANH_TOL = {"avx512": (2.5, 2e-7), "avx2": (2.5, 2e-7), "baseline": (3.0, 2.2e-7)}


@pytest.mark.parametrize("isa", ["avx512", "avx2", "baseline"])
def test_cpu_tanh_accuracy(isa):
    if INTERPRET:
        pytest.skip("CPU-kernel test")
    _cpu_kernel()
    from l2l_optim.kernels.cpu import kernel_tanh as tanh_f32

    with cpu_isa(isa):
        # every 97th positive fp32 up to 20 (~11M values; tanh is odd and checked for
        # symmetry), plus the special values
        bits = torch.arange(0, 0x41A00000, 97, dtype=torch.int64).to(torch.int32)
        x = bits.view(torch.float32)
        y = tanh_f32(x).double()
        ref = torch.tanh(x.double())
        ulp = (torch.nextafter(ref.float(), torch.tensor(2.0)).double() - ref.float().double())
        err_ulp = ((y - ref).abs() / ulp).max().item()
        rel = ((y - ref).abs() / ref.abs().clamp_min(1e-38))[ref != 0].max().item()
        max_ulp, max_rel = TANH_TOL[isa]
        assert err_ulp <= max_ulp, err_ulp
        assert rel <= max_rel, rel
        assert torch.equal(tanh_f32(-x), -tanh_f32(x))
        special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 30.0, -30.0, 1e-30])
        out = tanh_f32(special)
        assert out.tolist() == special.tolist()[:2] + [1.0, -1.0, 1.0, -1.0] + [special[6].item()]
        assert torch.equal(torch.signbit(out), torch.signbit(special))  # -0 stays -0
        assert torch.isnan(tanh_f32(torch.tensor([float("nan")]))).all()


@pytest.mark.parametrize("isa", ["avx512", "avx2", "baseline"])
def test_cpu_tanh_tested_is_the_tanh_of_the_default_loop(isa):
    # kernel_tanh (the function the accuracy test measures) gives the bits the update's loop
    # stores as h' = tanh(w_ih g) (w_hh = 0, b_h = 0, w_ih = 1): fp32 compute and state, the
    # default hidden size, sizes with every remainder of a vector, inputs over tanh's range
    if INTERPRET:
        pytest.skip("CPU-kernel test")
    kernel = _cpu_kernel()
    z = torch.zeros(10)
    weights = SimpleWeights(w_ih=torch.ones(10), w_hh=torch.zeros(10, 10), b_h=z, w_a=z, w_b=z,
                            b_out=torch.zeros(()))
    g = torch.Generator().manual_seed(0)
    sizes = [1, 15, 17, 2048 + 31, 40000]
    grads = [torch.randn(n, generator=g) * torch.logspace(-8, 1.2, n) for n in sizes]
    with cpu_isa(isa) as cpu:
        params = [torch.zeros(n) for n in sizes]
        hiddens = [torch.zeros(10, n) for n in sizes]
        kernel(params, grads, hiddens, [1.0] * len(sizes), weights)
        for x, h in zip(grads, hiddens):
            expected = cpu.kernel_tanh(x)
            assert all(torch.equal(row, expected) for row in h)


def test_cpu_tanh_accuracy_fp64():
    if INTERPRET:
        pytest.skip("CPU-kernel test")
    _cpu_kernel()
    from l2l_optim.kernels.cpu import kernel_tanh

    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.rand(10**6, generator=g, dtype=torch.float64) * 25,
                   torch.rand(10**5, generator=g, dtype=torch.float64) * 0.6,
                   torch.logspace(-300, 1, 1000, dtype=torch.float64)])
    y, ref = kernel_tanh(x), torch.tanh(x)
    ulp = torch.nextafter(ref, torch.tensor(2.0, dtype=torch.float64)) - ref
    assert ((y - ref).abs() / ulp).max().item() <= 2.5  # 1.5 ulp against tanhl, + torch's error
    assert torch.equal(kernel_tanh(-x), -y)


def test_cpu_rejects_cuda_or_meta_tensors():
    kernel = _cpu_kernel()
    if INTERPRET:
        pytest.skip("CPU-kernel test")
    p = [torch.zeros(3, device="meta")]
    with pytest.raises(RuntimeError, match="CPU tensors only"):
        kernel(p, [torch.zeros(3, device="meta")], [torch.zeros(H, 3, device="meta")], [0.1],
               weights_for())


def test_cpu_hidden_size_other_than_10():
    # the generic (runtime-H) kernel
    kernel = _cpu_kernel()
    if INTERPRET:
        pytest.skip("CPU-kernel test")
    net = SimpleOptimizerNet(hidden_size=6)
    with torch.no_grad():
        for q in net.parameters():
            q.uniform_(-0.4, 0.4)
    w = net.fused_weights()
    g = torch.Generator().manual_seed(1)
    p_ref = [torch.randn(s, generator=g) for s in [(7,), (3000,), ()]]
    h_ref = [torch.tanh(torch.randn(6, x.numel(), generator=g)) for x in p_ref]
    p_k, h_k = clone(p_ref), clone(h_ref)
    for step in range(20):
        grads = make_grads(p_ref, step)
        simple_update_reference(p_ref, grads, h_ref, [0.02] * 3, w)
        kernel(p_k, grads, h_k, [0.02] * 3, w)
    assert_parity(p_ref, h_ref, p_k, h_k, 1e-6, 1e-6)


_shape = st.lists(st.integers(0, 40), min_size=0, max_size=3).map(tuple)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shapes=st.lists(_shape, min_size=1, max_size=5),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    hdtype=st.sampled_from(["same", torch.float32]),
    grad_scale=st.sampled_from([1e-4, 1e-2, 1.0, 1e2, 1e4]),
    lr=st.floats(-2.0, 2.0, allow_nan=False),
    variant=st.sampled_from(["plain", "bias", "noagg"]),
    seed=st.integers(0, 2**16),
)
def test_cpu_property_parity(shapes, dtype, hdtype, grad_scale, lr, variant, seed):
    # any shapes (0-dim and empty included), dtypes, gradient scales (tanh saturates at the
    # large ones), learning rates and weight variants: the CPU kernel tracks the reference
    if INTERPRET:
        pytest.skip("CPU-kernel test")
    kernel = _cpu_kernel()
    hdt = dtype if hdtype == "same" else hdtype
    specs = [(s, dtype, hdt) for s in shapes]
    w = weights_for(variant, dtype, seed)
    res = run_both(kernel, specs, steps=3, lrs=[lr] * len(specs), weights=w, seed=seed,
                   grad_scale=grad_scale)
    tol = TOL[dtype] if hdt == dtype else 1e-6
    assert_parity(*res, 4 * tol, 4 * tol)


# ------------------------------------------------------------------------- triton on CUDA


def _cuda_triton():
    if INTERPRET or not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    _triton_device()
    from l2l_optim.kernels.triton import simple_update_triton

    return simple_update_triton


def test_triton_no_host_sync_and_cuda_graph_capture():
    kernel = _cuda_triton()
    specs = [(s, torch.float32, torch.float32) for s in [(1000, 7), (7,), (), (65537,)]]
    w = weights_for()
    p, h = make_state(specs, "cuda")
    grads = [g.cuda() for g in make_grads(p, 0)]
    skip = torch.zeros((), dtype=torch.bool, device="cuda")
    lrs = [0.01] * 4
    kernel(p, grads, h, lrs, w, skip)  # warm-up: compiles, uploads the tables
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        kernel(p, grads, h, lrs, w, skip)  # any device->host sync raises here
    finally:
        torch.cuda.set_sync_debug_mode("default")
    # capture one step, replay it, compare with eager steps from the same start
    p_e, h_e = clone(p), clone(h)
    graph = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        kernel(p, grads, h, lrs, w, skip)
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):
            kernel(p, grads, h, lrs, w, skip)
    torch.cuda.current_stream().wait_stream(s)
    graph.replay()
    for _ in range(3):
        kernel(p_e, grads, h_e, lrs, w, skip)
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(p, p_e))
    assert all(torch.equal(a, b) for a, b in zip(h, h_e))


# -------------------------------------------------------------------- the triton subprocess


SUITE = "test_triton_interpreter_suite"


@pytest.fixture(autouse=True, scope="module")
def _interpreter_subprocess(request, tmp_path_factory):
    """Start the interpreter subprocess with the first test of this file, so that it runs on
    the second core while the CPU tests run here (only if the suite test was selected)."""
    selected = any(item.name == SUITE for item in request.session.items)
    if INTERPRET or IN_SUBPROCESS or not selected or not _triton_importable():
        yield None
        return
    env = dict(os.environ, TRITON_INTERPRET="1", L2L_TRITON_SUBPROCESS="1")
    log = tmp_path_factory.mktemp("triton_interp") / "out.txt"
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__,
           "-k", "triton", "-m", "not slow"]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
        yield proc, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _triton_importable() -> bool:
    try:
        from l2l_optim.kernels import triton as tk
    except Exception:  # noqa: BLE001
        return False
    return tk.is_available()


def test_triton_interpreter_suite(_interpreter_subprocess):
    """This file's triton tests on CPU tensors in Triton's interpreter (TRITON_INTERPRET=1),
    run in a subprocess so that the variable never reaches this process."""
    if INTERPRET or IN_SUBPROCESS:
        pytest.skip("already in the interpreter")
    if _interpreter_subprocess is None:
        from l2l_optim.kernels import triton as tk

        pytest.skip(f"Triton not importable: {tk.import_error()}")
    proc, log = _interpreter_subprocess
    try:
        proc.wait(timeout=900)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    out = log.read_text()
    assert proc.returncode == 0, out[-6000:]
    # (an expected failure reads "xfailed", not a failure)
    assert " passed" in out and not re.search(r"\b\d+ failed", out), out[-3000:]


# ------------------------------------------------------------------------ choosing the path


def test_resolve_impl_choices():
    assert resolve_impl("reference", "cpu") == "reference"
    assert resolve_impl("auto", "mps") == "reference"
    with pytest.raises(ValueError, match="Invalid impl"):
        resolve_impl("cuda", "cpu")
    with pytest.raises(RuntimeError, match="impl='cpu' runs on CPU tensors"):
        resolve_impl("cpu", "cuda")
    if not INTERPRET:
        with pytest.raises(RuntimeError, match="impl='triton'"):
            resolve_impl("triton", "cpu")
    from l2l_optim.kernels import cpu
    from l2l_optim.kernels import triton as tk

    assert resolve_impl("auto", "cpu") == ("cpu" if cpu.is_available() else "reference")
    assert get_kernel("cpu") is cpu.simple_update_cpu
    assert resolve_impl("auto", "cuda") == ("triton" if tk.is_available() else "reference")
    assert get_kernel("reference") is simple_update_reference
    with pytest.raises(ValueError):
        get_kernel("auto")
    assert "reference" in kernels.available_impls("cpu")


# ------------------------------------------------------------------ bf16 state, end to end


@pytest.mark.slow
def test_bf16_state_trains_like_fp32():
    """The default bf16 hidden state (rounded stochastically) trains the base MLP (shipped
    weights, MNIST, batches of 128, 2,000 steps) as the fp32 state does: the geometric mean over
    3 seeds of the loss ratio at most 1.05. The loss is measured at the end on a fixed
    10,000-example slice of the training set. One seed alone is not enough: at losses near
    0.03 the ratio of two trajectories varies 0.92-1.14 from seed to seed (rounding to
    nearest: 0.95-1.05), on an Intel Xeon of the Sapphire Rapids class."""
    import torch.nn.functional as F

    from l2l_optim.optimizer import SimpleOptimizer
    from l2l_optim.data import DatasetNotFoundError
    from l2l_optim.tasks import make_task

    try:
        task = make_task("mnist-mlp")
    except DatasetNotFoundError as e:
        pytest.skip(str(e))
    x_eval, y_eval = task.train[0][:10000], task.train[1][:10000]
    ratios = []
    for seed in range(3):
        final = {}
        for state_dtype in (torch.float32, torch.bfloat16):
            torch.manual_seed(seed)
            model = task.model_fn()
            opt = SimpleOptimizer(model.parameters(), weights="simple", state_dtype=state_dtype)
            gen = torch.Generator().manual_seed(seed)
            for _ in range(2000):
                x, y = task.sample_batch(gen)
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
            with torch.no_grad():
                final[state_dtype] = F.cross_entropy(model(x_eval), y_eval).item()
        assert all(math.isfinite(v) for v in final.values()), final
        ratios.append(final[torch.bfloat16] / final[torch.float32])
    gm = math.exp(sum(map(math.log, ratios)) / len(ratios))
    print(f"bf16 / fp32 training loss after 2000 steps, per seed: {ratios}; geometric mean {gm:.4f}")
    assert gm <= 1.05, ratios


@pytest.mark.parametrize("isa", ["avx512", "avx2", "baseline"])
def test_cpu_kernel_flushes_subnormal_values(isa):
    # a hidden state decaying toward zero (a coordinate whose gradient stays 0) reaches the
    # subnormal range, where x86 arithmetic is microcoded and a step several times slower: the
    # kernel flushes such values to zero (the reference keeps them; they differ by < 2^-126)
    if INTERPRET:
        pytest.skip("CPU-kernel test")
    kernel = _cpu_kernel()
    tiny = torch.finfo(torch.float32).tiny  # 2^-126, the smallest normal float32
    w = weights_for()
    p, g = torch.zeros(3000), torch.zeros(3000)
    h = torch.full((H, 3000), 2.0 * tiny)  # normal; w_hh @ h is not
    p_ref, h_ref = p.clone(), h.clone()
    simple_update_reference([p_ref], [g], [h_ref], [1.0], w)
    assert bool(((h_ref != 0) & (h_ref.abs() < tiny)).any())  # the case arises
    with cpu_isa(isa):
        kernel([p], [g], [h], [1.0], w)
    assert not bool(((h != 0) & (h.abs() < tiny)).any())
    # (intermediate products below 2^-126 flush too: the states differ by a few 2^-126)
    assert float((h - h_ref).abs().max()) < 8 * tiny and float((p - p_ref).abs().max()) < 1e-6
    # the caller's floating-point mode is restored: torch still produces subnormal values
    assert float(torch.tensor(tiny) / 4) > 0
