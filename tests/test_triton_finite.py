"""The Triton non-finite scan (kernels.triton.finite_flags_triton) against torch.isfinite.

Triton picks its interpreter when it decorates the kernels, so on a machine without a GPU the
properties run in a subprocess with ``TRITON_INTERPRET=1`` (:func:`test_in_interpreter`);
with a GPU they run on CUDA tensors in this process.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

tk = pytest.importorskip("l2l_optim.kernels.triton")

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
RUNS_HERE = tk.is_available() and (INTERPRET or torch.cuda.is_available())
here = pytest.mark.skipif(not RUNS_HERE, reason="needs a GPU or TRITON_INTERPRET=1 (see test_in_interpreter)")

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
BAD = [float("nan"), float("inf"), float("-inf")]


@st.composite
def gradients(draw):
    n = draw(st.integers(1, 5))
    grads, expect = [], []
    for _ in range(n):
        dtype = draw(st.sampled_from(DTYPES))
        size = draw(st.sampled_from([0, 1, 7, 4096, 4097, 9000]))
        g = torch.randn(size, generator=torch.Generator().manual_seed(draw(st.integers(0, 99)))).to(dtype)
        if size and draw(st.booleans()):
            # extreme finite values must not count: the largest finite and the subnormals
            g[draw(st.integers(0, size - 1))] = torch.finfo(dtype).max
            g[draw(st.integers(0, size - 1))] = torch.finfo(dtype).smallest_normal / 4
        if size and draw(st.booleans()):
            g[draw(st.integers(0, size - 1))] = draw(st.sampled_from(BAD))
        grads.append(g.to(DEVICE))
        expect.append(bool(torch.isfinite(g).all()))
    return grads, expect


@here
@settings(max_examples=25, deadline=None)
@given(gradients())
def test_flags_match_isfinite(case):
    grads, expect = case
    flags = tk.finite_flags_triton(grads)
    assert flags.dtype == torch.bool and flags.device.type == DEVICE
    assert flags.tolist() == expect


@here
def test_last_coordinate_and_non_contiguous():
    g = torch.randn(4097, device=DEVICE)
    g[-1] = float("nan")
    t = torch.randn(64, 33, device=DEVICE).t()  # non-contiguous
    t[32, 63] = float("inf")
    assert tk.finite_flags_triton([torch.randn(5, device=DEVICE), g, t]).tolist() == [True, False, False]
    # the cached table for the same tensors answers the new values
    g[-1] = 0.0
    assert tk.finite_flags_triton([torch.randn(5, device=DEVICE), g]).tolist() == [True, True]


@here
def test_refuses_a_tensor_on_another_device():
    if DEVICE == "cpu":
        with pytest.raises(RuntimeError, match="one device"):
            tk.finite_flags_triton([torch.randn(3), torch.randn(3, device="meta")])


@pytest.mark.skipif(INTERPRET or not tk.is_available(), reason="already in the interpreter, or no Triton")
def test_in_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "5 passed" in r.stdout, r.stdout[-1000:]  # every test ran in the interpreter, none skipped


@here
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_optimizer_policy_on_the_triton_path(dtype):
    """A NaN or Inf at the last coordinate of the last gradient: ``skip`` changes nothing
    (parameters, hidden state, step counts), ``raise`` names the parameter."""
    from l2l_optim import SimpleOptimizer

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n, device=DEVICE, dtype=dtype)) for n in (300, 5000)]
    opt = SimpleOptimizer(params, impl="triton")
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # the state exists
    before = [p.detach().clone() for p in params], [opt.state[p]["h"].clone() for p in params]
    steps = [int(opt.state[p]["step"]) for p in params]
    for bad in (float("nan"), float("inf")):
        params[1].grad[-1] = bad
        opt.step()
        assert all(torch.equal(p, b) for p, b in zip(params, before[0]))
        assert all(torch.equal(opt.state[p]["h"], h) for p, h in zip(params, before[1]))
        assert [int(opt.state[p]["step"]) for p in params] == steps
    assert opt.skipped_steps == 2
    strict = SimpleOptimizer(params, impl="triton", nonfinite="raise")
    with pytest.raises(FloatingPointError, match="parameter 1 "):
        strict.step()
