"""Stochastic rounding of bf16 hidden states (l2l_optim.rounding): the definition's properties
and the optimizer's use of it. The kernels' agreement with it: tests/test_kernels.py."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from l2l_optim import SimpleOptimizer
from l2l_optim.functional import RunningRms, simple_update
from l2l_optim.rounding import (
    _device_keys,
    round_bf16_stochastic,
    rounding_key,
    rounding_keys,
    shard_key,
    stochastic_bits,
)

finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False, min_value=-2.0**100, max_value=2.0**100)
keys = st.integers(0, 2**32 - 1)


def _neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 values at and just above (in magnitude) x truncated toward zero."""
    bits = x.view(torch.int32) & ~0xFFFF
    low = bits.view(torch.float32)
    return low, (bits + 0x10000).view(torch.float32)


@settings(max_examples=200, deadline=None)
@given(st.lists(finite32, min_size=1, max_size=40), keys)
def test_a_value_goes_to_one_of_its_two_bf16_neighbours(values, key):
    x = torch.tensor(values, dtype=torch.float32).reshape(1, -1)
    y = round_bf16_stochastic(x, key).float()
    low, high = _neighbours(x)
    assert bool(((y == low) | (y == high)).all())
    exact = x == low  # a bf16 value stays as it is
    assert torch.equal(y[exact], x[exact])


@settings(max_examples=15, deadline=None)
@given(st.floats(min_value=-4.0, max_value=4.0, width=32).filter(lambda v: abs(v) > 1e-3), keys)
def test_unbiased_over_the_steps(value, key):
    # one coordinate over 1024 steps (keys from the step count): the mean of the stored values
    # is the value, within 4 standard deviations of 1024 Bernoulli draws of one ulp (ulp / 16)
    x = torch.full((1, 1), value)
    ys = torch.cat([round_bf16_stochastic(x, rounding_key(t, key % 7)).float()
                    for t in range(1024)])
    low, high = _neighbours(x)
    ulp = abs(float(high - low))
    assert abs(float(ys.mean()) - value) <= ulp / 16


def test_every_unit_and_coordinate_draws_evenly():
    bits = stochastic_bits(rounding_key(3, 1), 10_000, 10)
    assert bits.shape == (10, 10_000) and int(bits.min()) >= 0 and int(bits.max()) < 2**16
    counts = torch.bincount(bits.flatten() >> 12, minlength=16).float()
    assert float((counts / counts.mean() - 1).abs().max()) < 0.02


def test_nan_stays_nan_with_torch_s_pattern():
    y = round_bf16_stochastic(torch.tensor([[float("nan"), 1.0]]), 7)
    assert y.view(torch.int16)[0, 0] == 0x7FC0 and y[0, 1] == 1.0


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 2**40), min_size=1, max_size=6),
       st.lists(st.integers(0, 10**6), min_size=6, max_size=6))
def test_the_keys_on_the_host_and_on_a_device_agree(steps, offsets):
    counts = [torch.tensor(s) for s in steps]
    offs = offsets[: len(steps)]
    assert rounding_keys(counts) == _device_keys(counts, None).tolist()
    shifted = rounding_keys(counts, offs, 10)
    assert shifted == _device_keys(counts, [(o * 10) % 2**32 for o in offs]).tolist()
    assert shifted == [shard_key(rounding_key(s, i), o, 10) for i, (s, o) in enumerate(zip(steps, offs))]


def test_a_shard_draws_the_whole_tensor_s_bits():
    key = rounding_key(11, 2)
    whole = stochastic_bits(key, 1000, 10)
    part = stochastic_bits(shard_key(key, 300, 10), 250, 10)
    assert torch.equal(part, whole[:, 300:550])


def test_the_optimizer_rounds_bf16_state_stochastically_with_step_keys():
    # SimpleOptimizer's bf16 state is the functional update's with rounding_keys(step counts)
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(300)), torch.nn.Parameter(torch.randn(4, 5))]
    opt = SimpleOptimizer(params, weights="simple", state_dtype=torch.bfloat16, impl="reference")
    ref = [p.detach().clone() for p in params]
    net = opt.net
    hs = [torch.zeros(10, p.numel(), dtype=torch.bfloat16) for p in ref]
    vs = [torch.zeros(p.numel()) for p in ref]
    cs = [torch.zeros(1) for _ in ref]
    for t in range(4):
        grads = [torch.randn(p.shape) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        simple_update(ref, grads, hs, [1.0, 1.0], net, impl="reference", rms=RunningRms(vs, cs),
                      rounding=rounding_keys([torch.tensor(t)] * 2))
    for p, q, h in zip(params, ref, hs):
        assert torch.equal(p.detach(), q)
        assert torch.equal(opt.state[p]["h"], h)


def test_rounding_to_nearest_loses_what_stochastic_rounding_keeps():
    # a value that moves by a quarter of a bf16 ulp per step: rounded to nearest it never
    # moves; rounded stochastically it is where it should be on average
    x = torch.full((1, 4096), 1.0)
    near = x.to(torch.bfloat16)
    sr = x.to(torch.bfloat16)
    for t in range(16):
        near = (near.float() + 2.0**-9).to(torch.bfloat16)
        sr = round_bf16_stochastic(sr.float() + 2.0**-9, rounding_key(t, 0))
    assert float(near.float().mean()) == 1.0
    assert abs(float(sr.float().mean()) - (1.0 + 16 * 2.0**-9)) < 2.0**-9
