"""The optimizer state's layout and size: the bias correction kept once per tensor, old state
dicts that keep it per coordinate, and the 8-bit hidden state's codec."""

from __future__ import annotations

import copy

import pytest
import torch

from cpu_isa import cpu_isa
from l2l_optim import SimpleOptimizer
from l2l_optim.distributed import per_tensor_value
from l2l_optim.nets import SimpleOptimizerNet
from l2l_optim.meta.init_rules import init_net
from l2l_optim.optimizer import DMOptimizer, LearnedOptimizer
from l2l_optim.state import (INT8_BLOCK, decode_hidden, encode_hidden, int8_blocks,
                             state_bytes_per_parameter)


def rms_net(lr: float = 3e-3) -> SimpleOptimizerNet:
    net = init_net(SimpleOptimizerNet(input_norm="rms"), "adam", lr=lr)
    with torch.no_grad():  # every unit matters, and the mean term too
        net.w_hh.add_(0.05 * torch.randn(10, 10, generator=torch.Generator().manual_seed(0)))
        net.w_out[10:].fill_(1e-4)
    return net


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 1))


def train(m: torch.nn.Module, opt, steps: int = 15) -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        opt.zero_grad()
        m(torch.randn(16, 5, generator=g)).pow(2).mean().backward()
        opt.step()


def flat(m: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in m.parameters()])


def cpu_kernel_or_skip() -> None:
    from l2l_optim import kernels

    if kernels.resolve_impl("auto", "cpu") != "cpu":
        pytest.skip("no CPU kernel in this build")


# ------------------------------------------------------------------ one c per tensor


@pytest.mark.parametrize("weights, dtype, expected", [
    (None, None, 28), (None, torch.float32, 48), (None, torch.int8, 16),
    ("simple", None, 24), ("simple", torch.float32, 44), ("simple", torch.bfloat16, 24),
    ("simple", torch.int8, 12)])
def test_bytes_of_state_per_parameter(weights, dtype, expected):
    # None: the default weights (simple-sf: the averaging's base sequence z, 4 more bytes) and
    # the default state, bfloat16
    w = torch.nn.Parameter(torch.zeros(1000, 1000))
    options = {} if dtype is None else {"state_dtype": dtype}
    opt = SimpleOptimizer([w], weights=weights, **options)
    w.grad = torch.randn_like(w)
    opt.step()
    state = opt.state[w]
    assert state["c"].shape == (1,)
    per_param = state_bytes_per_parameter(state, w.numel())
    # the per-tensor part (c, step, the 8-bit state's scales) is below 0.02 bytes here
    assert expected <= per_param < expected + 0.02


def test_the_net_keeps_one_bias_correction_per_tensor():
    net = rms_net()
    state = net.init_state(5)
    assert state["c"].shape == (1,) and net.per_tensor_state == ("c",)
    assert SimpleOptimizerNet().per_tensor_state == ()
    # the forward with one c equals the forward with a c per coordinate
    g = torch.randn(5)
    spread = dict(state, c=state["c"].expand(5).clone())
    u1, s1 = net(g, state)
    u2, s2 = net(g, spread)
    assert torch.equal(u1, u2) and torch.equal(s1["h"], s2["h"])
    assert torch.equal(s1["c"].expand(5), s2["c"])


def test_the_generic_path_runs_several_tensors_with_one_c_each():
    # LearnedOptimizer runs the net's forward over every tensor at once: each tensor's c is
    # spread over its coordinates and read back, as SimpleOptimizer keeps it
    a, b = model(), model()
    fused = SimpleOptimizer(a.parameters(), weights=rms_net(), impl="reference", state_dtype=torch.float32)
    generic = LearnedOptimizer(b.parameters(), weights=rms_net())
    train(a, fused)
    train(b, generic)
    torch.testing.assert_close(flat(a), flat(b), rtol=1e-5, atol=1e-6)
    for p, q in zip(a.parameters(), b.parameters()):
        assert generic.state[q]["c"].shape == (1,)
        torch.testing.assert_close(generic.state[q]["c"], fused.state[p]["c"], rtol=1e-6, atol=0)


@pytest.mark.parametrize("impl", ["reference", "cpu"])
@pytest.mark.parametrize("layout", ["flat", "parameter-shaped"])
def test_a_state_dict_with_c_per_coordinate_loads_and_carries_on_bitwise(impl, layout):
    if impl == "cpu":
        cpu_kernel_or_skip()
    m = model()
    opt = SimpleOptimizer(m.parameters(), weights=rms_net(), impl=impl)
    train(m, opt, steps=3)
    saved = copy.deepcopy(opt.state_dict())
    for (pid, state), p in zip(saved["state"].items(), m.parameters()):
        spread = state["c"].expand(p.numel()).clone()
        state["c"] = spread if layout == "flat" else spread.view(p.shape)
    twin = copy.deepcopy(m)
    other = SimpleOptimizer(twin.parameters(), weights=rms_net(), impl=impl)
    other.load_state_dict(saved)
    assert all(s["c"].shape == (1,) for s in other.state.values())
    train(m, opt, steps=2)
    train(twin, other, steps=2)
    assert torch.equal(flat(m), flat(twin))
    for p, q in zip(m.parameters(), twin.parameters()):
        assert all(torch.equal(opt.state[p][k], other.state[q][k]) for k in opt.state[p])


def test_a_c_per_coordinate_that_differs_is_refused():
    m = model()
    opt = SimpleOptimizer(m.parameters(), weights=rms_net())
    train(m, opt, steps=2)
    saved = copy.deepcopy(opt.state_dict())
    first = next(iter(saved["state"].values()))
    c = first["c"].expand(first["v"].numel()).clone()
    c[-1] += 1e-3
    first["c"] = c
    other = SimpleOptimizer(copy.deepcopy(m).parameters(), weights=rms_net())
    with pytest.raises(ValueError, match="state 'c' holds one value per coordinate and they differ"):
        other.load_state_dict(saved)
    first["c"] = torch.zeros(3)
    with pytest.raises(ValueError, match="state 'c' has 3 elements, expected 1"):
        other.load_state_dict(saved)
    assert not other.state  # nothing loaded


def test_per_tensor_value():
    p = torch.zeros(2, 3)
    assert per_tensor_value(torch.tensor([0.5]), p, "c").tolist() == [0.5]
    assert per_tensor_value(torch.tensor(0.5), p, "c").tolist() == [0.5]
    assert per_tensor_value(torch.full((2, 3), 0.25), p, "c").tolist() == [0.25]
    assert per_tensor_value(torch.zeros(0), torch.zeros(0, 4), "c").tolist() == [0.0]
    with pytest.raises(ValueError, match="expected a tensor"):
        per_tensor_value([0.5], p, "c")


# ------------------------------------------------------------------ the 8-bit hidden state


def encoded(h: torch.Tensor, key: int) -> tuple[torch.Tensor, torch.Tensor]:
    codes = torch.empty(h.shape, dtype=torch.int8)
    scales = torch.empty(h.shape[0], int8_blocks(h.shape[1]))
    encode_hidden(h, key, codes, scales)
    return codes, scales


def test_codes_stay_within_one_step_of_the_value_and_keep_block_maxima():
    gen = torch.Generator().manual_seed(0)
    n = INT8_BLOCK + 100  # a full block and a partial one
    h = torch.randn(3, n, generator=gen) * torch.tensor([[1e-1], [1e-4], [0.0]])
    h[0, 5] = 0.9
    codes, scales = encoded(h, 7)
    assert scales.shape == (3, 2)
    assert scales[0, 0] == 0.9 and codes[0, 5] == 127
    assert scales[1, 1] == h[1, INT8_BLOCK:].abs().max()
    assert scales[2].tolist() == [0.0, 0.0] and not codes[2].any()  # zeros stay zeros
    step = (scales / 127).repeat_interleave(INT8_BLOCK, dim=1)[:, :n]
    err = (decode_hidden(codes, scales) - h).abs()
    assert bool((err <= step * (1 + 1e-5)).all())


def test_rounding_is_unbiased_and_a_function_of_its_inputs():
    from l2l_optim.rounding import rounding_key

    h = torch.full((1, 512), 0.3)
    h[0, 0] = 1.0  # code step 1/127: 0.3 lies 0.1 of a step above a code
    mean = torch.zeros(1, 512)
    for step in range(200):
        mean += decode_hidden(*encoded(h, rounding_key(step, 0))) / 200
    assert abs(mean[0, 1:].mean().item() - 0.3) < 2e-4  # round to nearest is 8e-4 off
    a, b = encoded(h, 99), encoded(h, 99)
    assert torch.equal(a[0], b[0])
    assert not torch.equal(a[0], encoded(h, rounding_key(1, 0))[0])  # new key, new noise
    # a tensor key gives the int key's bits
    assert torch.equal(encoded(h, torch.tensor(99))[0], a[0])


def test_a_slowly_moving_unit_moves_under_stochastic_rounding():
    # a unit that gains less than half a code step per step would stick at its code under
    # round to nearest: 200 steps of +1e-3 (code step 1/127 ~ 7.9e-3) move it by 0.2
    from l2l_optim.rounding import rounding_key

    h = torch.zeros(1, 256)
    h[0, 0] = 1.0
    codes, scales = encoded(h, 0)
    for step in range(200):
        x = decode_hidden(codes, scales)
        x[0, 1:] += 1e-3
        codes, scales = encoded(x, rounding_key(step + 1, 0))
    assert abs(decode_hidden(codes, scales)[0, 1:].mean().item() - 0.2) < 0.01


@pytest.mark.parametrize("impl", ["reference", "cpu"])
def test_int8_state_trains_close_to_float32_state(impl):
    if impl == "cpu":
        cpu_kernel_or_skip()
    a, b = model(), model()
    full = SimpleOptimizer(a.parameters(), weights=rms_net(), impl=impl)
    small = SimpleOptimizer(b.parameters(), weights=rms_net(), impl=impl, state_dtype=torch.int8)
    train(a, full, steps=30)
    train(b, small, steps=30)
    state = small.state[b[0].weight]
    assert state["h"].dtype == torch.int8 and state["h_scale"].dtype == torch.float32
    # v in bfloat16, rounded stochastically; the per-tensor c stays float32
    assert state["v"].dtype == torch.bfloat16 and state["c"].dtype == torch.float32
    v_full = full.state[a[0].weight]["v"]
    assert bool(((state["v"].float() - v_full).abs() <= 0.05 * v_full + 1e-12).all())
    moved = (flat(a) - flat(model())).abs().max()
    assert (flat(a) - flat(b)).abs().max() < 0.05 * moved
    for p, q in zip(a.parameters(), b.parameters()):
        h = decode_hidden(small.state[q]["h"], small.state[q]["h_scale"])
        scale = full.state[p]["h"].abs().amax(dim=1, keepdim=True)
        assert bool(((h - full.state[p]["h"]).abs() <= 0.1 * scale + 1e-7).all())


def test_int8_state_on_the_kernel_and_the_reference_agree():
    cpu_kernel_or_skip()
    a, b = model(), model()
    ref = SimpleOptimizer(a.parameters(), weights=rms_net(), impl="reference", state_dtype=torch.int8)
    cpu = SimpleOptimizer(b.parameters(), weights=rms_net(), impl="cpu", state_dtype=torch.int8)
    train(a, ref, steps=10)
    train(b, cpu, steps=10)
    # the kernels' float32 results differ in the last bits, which may flip a rounding; the
    # runs then drift apart slowly
    moved = (flat(a) - flat(model())).abs().max()
    assert (flat(a) - flat(b)).abs().max() < 0.01 * moved
    for p, q in zip(a.parameters(), b.parameters()):
        h_ref = decode_hidden(ref.state[p]["h"], ref.state[p]["h_scale"])
        h_cpu = decode_hidden(cpu.state[q]["h"], cpu.state[q]["h_scale"])
        assert bool(((h_ref - h_cpu).abs() <= 0.1 * ref.state[p]["h_scale"]).all())


def test_int8_state_skips_and_resumes_bitwise():
    m = model()
    opt = SimpleOptimizer(m.parameters(), weights=rms_net(), state_dtype=torch.int8)
    train(m, opt, steps=3)
    before = {p: {k: t.clone() for k, t in opt.state[p].items()} for p in m.parameters()}
    opt.zero_grad()
    m(torch.randn(4, 5)).pow(2).mean().backward()
    m[0].weight.grad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="step skipped"):
        opt.step()
    for p in m.parameters():
        assert all(torch.equal(t, before[p][k]) for k, t in opt.state[p].items())
    saved = copy.deepcopy(opt.state_dict())
    assert saved["param_groups"][0]["state_dtype"] == "int8"
    twin = copy.deepcopy(m)
    other = SimpleOptimizer(twin.parameters(), weights=rms_net(), state_dtype=torch.int8)
    other.load_state_dict(saved)
    train(m, opt, steps=3)
    train(twin, other, steps=3)
    assert torch.equal(flat(m), flat(twin))
    for p, q in zip(m.parameters(), twin.parameters()):
        assert all(torch.equal(opt.state[p][k], other.state[q][k]) for k in opt.state[p])


def test_int8_state_is_simple_optimizers_only():
    w = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="Invalid state_dtype"):
        DMOptimizer([w], state_dtype=torch.int8)
    # float64 parameters keep float64 state whatever state_dtype says
    d = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = SimpleOptimizer([d], state_dtype=torch.int8)
    d.grad = torch.ones_like(d)
    opt.step()
    assert opt.state[d]["h"].dtype == torch.float64 and "h_scale" not in opt.state[d]


def test_a_device_skip_flag_keeps_the_codes():
    # the flag a compiled or accelerator step reads without the host: a re-encoding (new
    # rounding noise) must not reach the state
    from l2l_optim.state import decoded_hiddens

    gen = torch.Generator().manual_seed(0)
    codes, scales = encoded(torch.randn(10, 300, generator=gen) * 0.1, 3)
    h8, s8 = codes.clone(), scales.clone()
    for skip, same in ((torch.tensor(True), True), (torch.tensor(False), False)):
        with decoded_hiddens([h8], [s8], [4], skip) as (h,):
            h.add_(0.05)
        assert torch.equal(h8, codes) == same
        assert torch.equal(s8, scales) == same


def test_a_float_state_loads_into_int8_state_and_back():
    # the saved groups' state_dtype is what loads (as every option); a state dict edited to
    # another one converts the hidden state
    def switched(state_dict, name):
        for group in state_dict["param_groups"]:
            group["state_dtype"] = name
        return state_dict

    m = model()
    full = SimpleOptimizer(m.parameters(), weights=rms_net())
    train(m, full, steps=3)
    small = SimpleOptimizer(copy.deepcopy(m).parameters(), weights=rms_net(), state_dtype=torch.int8)
    small.load_state_dict(switched(full.state_dict(), "int8"))
    assert small.param_groups[0]["state_dtype"] == torch.int8
    for p, s in zip(m.parameters(), small.state.values()):
        assert s["h"].dtype == torch.int8 and s["h_scale"].shape == (10, 1)
        h = full.state[p]["h"]
        step = s["h_scale"] / 127
        assert bool(((decode_hidden(s["h"], s["h_scale"]) - h).abs() <= step * (1 + 1e-5)).all())
        # v to bfloat16 (to nearest), c as it was
        assert s["v"].dtype == torch.bfloat16 and torch.equal(s["v"], full.state[p]["v"].bfloat16())
        assert torch.equal(s["c"], full.state[p]["c"])
    back = SimpleOptimizer(copy.deepcopy(m).parameters(), weights=rms_net())
    back.load_state_dict(switched(small.state_dict(), "float32"))
    for s, t in zip(small.state.values(), back.state.values()):
        assert "h_scale" not in t and t["h"].dtype == torch.float32
        assert torch.equal(t["h"], decode_hidden(s["h"], s["h_scale"]))
        assert t["v"].dtype == torch.float32 and torch.equal(t["v"], s["v"].float())
    twin = copy.deepcopy(m)
    again = SimpleOptimizer(twin.parameters(), weights=rms_net(), state_dtype=torch.int8)
    again.load_state_dict(small.state_dict())  # int8 to int8: as saved
    assert all(torch.equal(a["h"], b["h"]) for a, b in zip(small.state.values(), again.state.values()))


@pytest.mark.slow
def test_int8_state_compiles_to_one_graph():
    # the codec is torch ops: a compiled step (fullgraph) runs it and stays near the eager one
    a, b = model(), model()
    eager = SimpleOptimizer(a.parameters(), weights=rms_net(), state_dtype=torch.int8)
    compiled = SimpleOptimizer(b.parameters(), weights=rms_net(), state_dtype=torch.int8)
    step = torch.compile(compiled.step, fullgraph=True)
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        x = torch.randn(16, 5, generator=g)
        for m, opt, run in ((a, eager, eager.step), (b, compiled, step)):
            opt.zero_grad()
            m(x).pow(2).mean().backward()
            run()
    moved = (flat(a) - flat(model())).abs().max()
    assert (flat(a) - flat(b)).abs().max() < 0.01 * moved
    assert compiled.state[b[0].weight]["h"].dtype == torch.int8


# ------------------------------------------------------- the 8-bit state inside the CPU kernel


def _int8_inputs(hidden_size: int, pdt: torch.dtype, seed: int = 0):
    """A call's inputs with 8-bit hidden states: tensors of one coordinate to three blocks (the
    last partial), the rms input norm, and a net whose every weight matters."""
    from l2l_optim.kernels._common import RunningRms
    from l2l_optim.rounding import rounding_key

    g = torch.Generator().manual_seed(seed)
    net = SimpleOptimizerNet(hidden_size=hidden_size, input_norm="rms")
    with torch.no_grad():
        for w in net.parameters():
            w.copy_(0.4 * torch.randn(w.shape, generator=g))
    # (the largest: enough roundings that a fused multiply-add in the encoding shows)
    shapes = [(), (7,), (2 * INT8_BLOCK + 100,), (3, 1500), (2**19 + 3,)]
    params = [torch.randn(s, generator=g).to(pdt) for s in shapes]
    grads = [torch.randn(s, generator=g).to(pdt) for s in shapes]
    codes, scales = zip(*(encoded(torch.tanh(torch.randn(hidden_size, p.numel(), generator=g))
                                  * torch.rand(hidden_size, 1, generator=g), 7) for p in params))
    rms = RunningRms([torch.rand(p.numel(), generator=g) for p in params],
                     [torch.full((1,), 0.3) for _ in params])
    keys = [rounding_key(3, i) for i in range(len(params))]
    return net, params, grads, list(codes), list(scales), rms, keys


def _copies(*lists):
    return [[t.clone() for t in ts] for ts in lists]


@pytest.mark.parametrize("isa", ["avx512", "avx2", "baseline"])
@pytest.mark.parametrize("hidden_size, pdt", [(10, torch.float32), (10, torch.bfloat16),
                                              (6, torch.float32)])
def test_the_kernels_8bit_state_is_the_codec_of_its_own_float_step(isa, hidden_size, pdt):
    # the fused codec (decode a block, step it in float32, encode it) gives the bits of the
    # codec's torch ops around the same kernel's float32 step: the float32 values are the
    # same (a coordinate's h' does not depend on the others), the rounding is one definition
    from l2l_optim.functional import simple_update
    from l2l_optim.kernels._common import RunningRms

    net, params, grads, codes, scales, rms, keys = _int8_inputs(hidden_size, pdt)
    lrs = [0.05] * len(params)
    threads = torch.get_num_threads()
    with cpu_isa(isa):
        runs = []
        try:
            for n_threads in (1, 2):
                torch.set_num_threads(n_threads)
                p, c, s, v, o = _copies(params, codes, scales, rms.squares, rms.ones)
                simple_update(p, grads, c, lrs, net, impl="cpu", rms=RunningRms(v, o),
                              rounding=keys, hidden_scales=s)
                runs.append((p, c, s, v, o))
        finally:
            torch.set_num_threads(threads)
        p, c, s, v, o = _copies(params, codes, scales, rms.squares, rms.ones)
        work = [decode_hidden(a, b) for a, b in zip(c, s)]
        simple_update(p, grads, work, lrs, net, impl="cpu", rms=RunningRms(v, o))
    (p1, c1, s1, v1, o1), (p2, c2, s2, v2, o2) = runs
    # independent of the thread count, bit for bit
    assert all(torch.equal(a, b) for a, b in zip(p1 + c1 + s1 + v1 + o1, p2 + c2 + s2 + v2 + o2))
    for i, (x, key) in enumerate(zip(work, keys)):
        expect_c, expect_s = encoded(x, key)
        assert torch.equal(s1[i], expect_s), i
        assert torch.equal(c1[i], expect_c), (i, (c1[i].int() - expect_c.int()).abs().max())
        assert torch.equal(v1[i], v[i]) and torch.equal(o1[i], o[i])
    # theta: the same but for the order in which the mean's partial sums are added
    for a, b in zip(p1, p):
        assert torch.allclose(a.float(), b.float(), rtol=1e-6, atol=1e-7 if pdt == torch.float32 else 1e-2)
    assert not all(torch.equal(a, b) for a, b in zip(c1, codes))  # the states moved


def test_the_kernels_8bit_state_skips_and_refuses_what_does_not_fit():
    from l2l_optim.functional import simple_update
    from l2l_optim.kernels._common import RunningRms

    cpu_kernel_or_skip()
    net, params, grads, codes, scales, rms, keys = _int8_inputs(10, torch.float32)
    lrs = [0.05] * len(params)
    p, c, s, v, o = _copies(params, codes, scales, rms.squares, rms.ones)
    simple_update(p, grads, c, lrs, net, impl="cpu", rms=RunningRms(v, o), rounding=keys,
                  hidden_scales=s, skip=torch.tensor(True))
    assert all(torch.equal(a, b) for a, b in zip(p + c + s + v, params + codes + scales + rms.squares))
    with pytest.raises(ValueError, match="need rounding keys"):
        simple_update(p, grads, c, lrs, net, impl="cpu", rms=RunningRms(v, o), hidden_scales=s)
    with pytest.raises(ValueError, match="need hidden_scales"):
        simple_update(p, grads, c, lrs, net, impl="cpu", rms=RunningRms(v, o), rounding=keys)
    bad = list(s)
    bad[2] = torch.zeros(10, 2)  # three blocks
    with pytest.raises(ValueError, match=r"hidden_scales 2 must be float32 of shape \(10, 3\)"):
        simple_update(p, grads, c, lrs, net, impl="cpu", rms=RunningRms(v, o), rounding=keys,
                      hidden_scales=bad)
    assert all(torch.equal(a, b) for a, b in zip(p + c + s, params + codes + scales))
    # the C call itself refuses an 8-bit state without scales
    from l2l_optim.kernels._cpu_calls import pass1_call
    from l2l_optim.kernels._common import packed_weights

    packed = packed_weights(net, torch.device("cpu"), torch.float64, flat=True)
    with pytest.raises(RuntimeError, match="needs float32 scales of shape"):
        pass1_call(p, grads, c, lrs, packed, None, False, v, o, keys)


def test_the_reference_runs_the_codec_around_its_step():
    # the paths without the fused codec (reference, Triton) decode, step and encode as torch
    # ops: the same definition, so they agree with the kernel within a code step
    from l2l_optim.functional import simple_update
    from l2l_optim.kernels._common import RunningRms

    net, params, grads, codes, scales, rms, keys = _int8_inputs(10, torch.float32)
    lrs = [0.05] * len(params)
    p, c, s, v, o = _copies(params, codes, scales, rms.squares, rms.ones)
    simple_update(p, grads, c, lrs, net, impl="reference", rms=RunningRms(v, o), rounding=keys,
                  hidden_scales=s)
    p2, c2, s2, v2, o2 = _copies(params, codes, scales, rms.squares, rms.ones)
    work = [decode_hidden(a, b) for a, b in zip(c2, s2)]
    simple_update(p2, grads, work, lrs, net, impl="reference", rms=RunningRms(v2, o2))
    for i, x in enumerate(work):
        expect_c, expect_s = encoded(x, keys[i])
        assert torch.equal(c[i], expect_c) and torch.equal(s[i], expect_s)
    assert all(torch.equal(a, b) for a, b in zip(p, p2))


# ------------------------------------------------------------------ bfloat16 running means


@pytest.mark.parametrize("isa", ["avx512", "avx2", "baseline"])
def test_the_kernels_bf16_squares_round_as_the_definition(isa):
    # the 8-bit state keeps v in bfloat16: the kernel's update of v is rule.rms_normalise's and
    # its rounding round_squares_bf16's, bit for bit. With zero gradients the new v is v * beta
    # on every path (no fused multiply-add can change it); a gradient whose square passes
    # float32's range saturates v at the largest finite bfloat16, an infinite one makes it inf
    from l2l_optim.functional import RunningRms, simple_update
    from l2l_optim.rounding import round_squares_bf16
    from l2l_optim.rule import rms_normalise

    cpu_kernel_or_skip()
    n = 3 * INT8_BLOCK + 77
    gen = torch.Generator().manual_seed(3)
    v = (torch.rand(n, generator=gen) * 10.0 ** torch.randint(-20, 20, (n,), generator=gen)).bfloat16()
    v[:4] = torch.tensor([3.0e38, 0.0, 1.0, 3.0e38])
    g = torch.zeros(n)
    g[0], g[3] = 1e21, float("inf")
    c = torch.full((1,), 0.3)
    key = 2_654_435_761
    _, v_new, _ = rms_normalise(g, v.float(), c)
    expected = round_squares_bf16(v_new, key)
    assert expected[0] == torch.finfo(torch.bfloat16).max and torch.isinf(expected[3])
    with cpu_isa(isa):
        v1, p = v.clone(), torch.zeros(n)
        simple_update([p], [g], [torch.zeros(10, n)], [1.0], rms_net(), impl="cpu",
                      rms=RunningRms([v1], [c.clone()]), rounding=[key])
    assert torch.equal(v1.view(torch.int16), expected.view(torch.int16))


def test_bf16_squares_round_without_bias_and_need_keys():
    # a value between two bfloat16 neighbours rounds up with the probability of its fraction
    from l2l_optim.functional import RunningRms, simple_update
    from l2l_optim.rounding import round_squares_bf16

    v = torch.full((1 << 16,), 1.0 + 3 * 2.0 ** -10)  # 3/8 of a bfloat16 ulp above 1
    r = round_squares_bf16(v, 7).float()
    assert abs(float((r - 1).mean()) * 2 ** 7 - 3 / 8) < 0.01
    assert not torch.equal(r, round_squares_bf16(v, 8).float())  # the key draws the bits
    with pytest.raises(ValueError, match="need rounding keys"):
        simple_update([torch.zeros(3)], [torch.ones(3)], [torch.zeros(10, 3)], [1.0], rms_net(),
                      rms=RunningRms([torch.zeros(3, dtype=torch.bfloat16)], [torch.zeros(1)]))


@pytest.mark.parametrize("impl", ["reference", "cpu"])
def test_bf16_squares_skip_and_resume_bitwise(impl):
    # a skipped step keeps v's bits; a state dict round trip carries on bit for bit
    if impl == "cpu":
        cpu_kernel_or_skip()
    m = model()
    opt = SimpleOptimizer(m.parameters(), weights=rms_net(), impl=impl, state_dtype=torch.int8)
    train(m, opt, steps=5)
    before = [s["v"].clone() for s in opt.state.values()]
    for p in m.parameters():
        p.grad = torch.full_like(p, float("nan"))
    with pytest.warns(RuntimeWarning):
        opt.step()
    assert all(torch.equal(a, s["v"]) for a, s in zip(before, opt.state.values()))
    twin = copy.deepcopy(m)
    other = SimpleOptimizer(twin.parameters(), weights=rms_net(), impl=impl, state_dtype=torch.int8)
    other.load_state_dict(opt.state_dict())
    train(m, opt, steps=3)
    train(twin, other, steps=3)
    assert torch.equal(flat(m), flat(twin))
    assert all(torch.equal(a["v"], b["v"]) for a, b in zip(opt.state.values(), other.state.values()))


def test_an_8bit_state_with_float32_squares_loads():
    # an 8-bit state saved with v in float32 loads, v rounded to bfloat16 (to nearest)
    m = model()
    opt = SimpleOptimizer(m.parameters(), weights=rms_net(), state_dtype=torch.int8)
    train(m, opt, steps=3)
    saved = opt.state_dict()
    for s in saved["state"].values():
        s["v"] = s["v"].float() * (1 + 2.0 ** -12)  # between two bfloat16 values
    other = SimpleOptimizer(copy.deepcopy(m).parameters(), weights=rms_net(), state_dtype=torch.int8)
    other.load_state_dict(saved)
    for s, t in zip(saved["state"].values(), other.state.values()):
        assert t["v"].dtype == torch.bfloat16 and torch.equal(t["v"], s["v"].bfloat16())
