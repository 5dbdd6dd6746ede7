"""The rule's single definition (l2l_optim.rule): batching, and the layout the fused kernels read."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import l2l_optim
from l2l_optim.kernels._common import packed_weights
from l2l_optim.nets import SimpleOptimizerNet
from l2l_optim.rule import (
    PACKED_FIELDS,
    hidden_size_of_packed,
    output,
    packed_offsets,
    packed_size,
    recur,
    shared_term,
)

KERNELS = Path(l2l_optim.__file__).parent / "kernels"


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 4), st.integers(1, 6), st.integers(1, 12), st.integers(0, 10_000))
def test_batched_rule_is_the_rule_per_member(members, hidden, n, seed):
    g = torch.Generator().manual_seed(seed)
    w_ih, w_hh = torch.randn(members, hidden, generator=g), torch.randn(members, hidden, hidden, generator=g)
    w_a, w_b = torch.randn(members, hidden, generator=g), torch.randn(members, hidden, generator=g)
    x, h = torch.randn(members, n, generator=g), torch.randn(members, hidden, n, generator=g)
    h_new = recur(w_ih, w_hh, None, x, h)
    u = output(w_a, h_new, shared_term(w_b, h_new.mean(-1)))
    for m in range(members):
        hm = recur(w_ih[m], w_hh[m], None, x[m], h[m])
        um = output(w_a[m], hm, shared_term(w_b[m], hm.mean(-1)))
        torch.testing.assert_close(h_new[m], hm, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(u[m], um, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("hidden", [1, 3, 10, 64])
def test_packed_size_and_its_inverse(hidden):
    assert packed_size(hidden) == 4 * hidden + hidden * hidden + 1
    assert hidden_size_of_packed(packed_size(hidden)) == hidden
    with pytest.raises(ValueError, match="fit no hidden size"):
        hidden_size_of_packed(packed_size(hidden) + 1)


def test_packed_weights_follow_the_layout():
    torch.manual_seed(0)
    net = SimpleOptimizerNet(bias=True)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_()
    flat = packed_weights(net, "cpu", torch.float64, flat=True)
    folded = net.fused_weights(dtype=torch.float64)
    for name, (start, length) in packed_offsets(net.hidden_size).items():
        assert torch.equal(flat[start:start + length], getattr(folded, name).reshape(-1)), name
    assert flat.numel() == packed_size(net.hidden_size)


def _offset_exprs() -> dict[str, str]:
    """Each field's start as the fused kernels spell it (in H), from the C++ unpack."""
    src = (KERNELS / "simple_cpu.cpp").read_text()
    body = src[src.index("void unpack("):]
    body = body[: body.index("\n}\n")]
    found = {}
    for field, expr in re.findall(r"out->(\w+)(?:\[j\])? = static_cast<C>\(w\[([^\]]*)\]\)", body):
        found[field] = expr.replace("j", "0").replace("+ 0", "").strip() or "0"
    return found


def test_cpp_unpack_reads_the_layout():
    names = {"ih": "w_ih", "hh": "w_hh", "bh": "b_h", "a": "w_a", "b": "w_b", "b_out": "b_out"}
    exprs = _offset_exprs()
    assert set(exprs) == set(names)
    for H in (1, 7, 10):
        offsets = packed_offsets(H)
        for cpp, field in names.items():
            assert eval(exprs[cpp].replace("H", str(H))) == offsets[field][0], (cpp, exprs[cpp])


def test_triton_reads_the_layout():
    src = (KERNELS / "_triton_device.py").read_text()
    H = 10
    offsets = {k: v[0] for k, v in packed_offsets(H).items()}
    # the loads in pass 1: w_ih at j, w_hh rows at H + j*H, b_h at H + H*H + j, w_a and w_b
    for expr, field in (("w_ptr + j)", "w_ih"), ("w_ptr + H + H * H + j)", "b_h"),
                        ("w_ptr + 2 * H + H * H + j)", "w_a"), ("w_ptr + 3 * H + H * H + j)", "w_b"),
                        ("w_ptr + 4 * H + H * H)", "b_out")):
        assert expr in src, expr
        start = eval(expr[len("w_ptr + "):-1].replace("j", "0").replace("H", str(H)))
        assert start == offsets[field], field
    assert "w_ptr + H + j * H + rows" in src and offsets["w_hh"] == H
    assert PACKED_FIELDS == ("w_ih", "w_hh", "b_h", "w_a", "w_b", "b_out")
