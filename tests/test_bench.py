"""The benchmark harness (``benchmarks/``, at the repository's root) on tiny sizes: rows
present, positive GB/s, finite ratios, the targets' logic, the command's JSON, the timer.
Timing values are not checked (the machine is shared)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks import bench
from benchmarks.bandwidth import (BandwidthConfig, BandwidthRow, _check_nonfinite, bandwidth_targets,
                                  format_bandwidth, resolve_size, run_bandwidth)
from benchmarks.common import count_subnormal, seeded, time_steps, untrained_net
from benchmarks.train import TrainConfig, TrainRow, format_train, run_train, train_targets

QUIET = dict(steps=2, warmup=1, rounds=2, budget=5.0)


@pytest.fixture
def keep_threads():
    """The command sets torch's thread count; put it back for the tests that follow."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_bandwidth_rows():
    rows = run_bandwidth(BandwidthConfig(sizes=["4096", "3e4"], **QUIET), log=lambda m: None)
    assert [(r.size, r.state_dtype, r.c_layout) for r in rows] == [
        (size, dtype, layout) for size in ("4096", "3e4") for dtype in ("float32", "bfloat16")
        for layout in ("tensor", "coordinate")]
    for r in rows:
        assert not r.skipped
        assert len(r.step_s) == len(r.update_s) == len(r.copy_s) == len(r.check_s) == 2
        # g 4, theta 2 x (4 + 4), h read and written, the rms norm's v 4 + 4 (and c 4 + 4 where
        # it is one per coordinate); the state: h, v and c
        h = {"float32": 40, "bfloat16": 20}[r.state_dtype]
        per_coord_c = r.c_layout == "coordinate"
        assert r.bytes_per_coord == 4 + 16 + 2 * h + 8 + (8 if per_coord_c else 0)
        assert r.state_bytes_per_param == pytest.approx(h + 4 + (4 if per_coord_c else 0), rel=1e-3)
        # the copy moves as many bytes as the step (no cap at these sizes)
        assert r.copy_bytes == r.step_bytes
        for v in (r.step_gbs, r.update_gbs, r.copy_gbs):
            assert v > 0 and math.isfinite(v)
        assert math.isfinite(r.step_fraction) and math.isfinite(r.overhead_share)
        assert 0 < r.check_share < 1  # the check alone, timed: a part of the step
        assert r.subnormals == 0 and r.skipped_steps == 0
        assert r.impl in ("cpu", "reference")
        assert json.dumps(r.to_json())
    # one of each dtype's two layouts is the optimizer's own
    assert [r.c_default for r in rows[:4]].count(True) == 2
    assert rows[0].c_default != rows[1].c_default and rows[2].c_default != rows[3].c_default
    assert rows[4].n_coords == 30_000
    table = format_bandwidth(rows)
    assert table.count("\n") == 1 + len(rows) and "skipped" not in table
    assert len({line.count("|") for line in table.splitlines()}) == 1  # every row has every column
    assert table.count("(not the default)") == 4
    # no 10M row: the targets are listed as not measured
    assert [t["met"] for t in bandwidth_targets(rows)] == [None, None, None]


def test_bandwidth_row_of_the_8_bit_state():
    # the functional update takes the codes with their scales and keys, as the step does; the
    # bytes are the stored state's (codes, block scales, v)
    rows = run_bandwidth(BandwidthConfig(sizes=["4096"], state_dtypes=["int8"],
                                         c_layouts=["tensor"], **QUIET), log=lambda m: None)
    (r,) = rows
    assert r.step_s and r.copy_s and r.check_s and r.update_s and r.skipped_steps == 0
    assert r.state_bytes_per_param == pytest.approx(12, abs=0.2)
    assert r.bytes_per_coord == pytest.approx(44, abs=0.5)
    line = format_bandwidth(rows).splitlines()[-1]
    assert "skipped" not in line


def test_step_bytes_and_state_bytes_come_from_the_state():
    from l2l_optim import SimpleOptimizer

    from benchmarks.common import c_layout, set_c_layout, state_bytes_per_param, step_bytes_per_coord

    ps = [torch.zeros(100, requires_grad=True), torch.zeros(3, 50, requires_grad=True)]
    opt = SimpleOptimizer(ps, weights="simple", state_dtype=torch.float32)
    assert math.isnan(step_bytes_per_coord(opt)) and math.isnan(state_bytes_per_param(opt))
    for p in ps:
        p.grad = torch.full_like(p, 1e-3)
    opt.step()
    for layout, moved, kept in (("coordinate", 116, 48), ("tensor", 108, 44)):
        set_c_layout(opt, layout)
        opt.step()  # the optimizer takes either layout
        assert c_layout(opt) == layout
        assert step_bytes_per_coord(opt) == moved
        assert state_bytes_per_param(opt) == pytest.approx(kept, abs=0.1)
    torch_adam = torch.optim.Adam(ps, fused=True)
    torch_adam.step()
    assert state_bytes_per_param(torch_adam) == pytest.approx(8, abs=0.1) and c_layout(torch_adam) == ""
    # Schedule-Free averaging: z kept (4 B) and moved by both passes with the parameter (16 B)
    sf = SimpleOptimizer(ps, weights="simple-sf")
    sf.step()
    assert step_bytes_per_coord(sf) == 84 and state_bytes_per_param(sf) == pytest.approx(28, abs=0.1)


def test_bandwidth_copy_cap_and_sizes():
    rows = run_bandwidth(BandwidthConfig(sizes=["5000"], state_dtypes=["float32"],
                                         copy_max_bytes=80_000, **QUIET), log=lambda m: None)
    assert rows[0].copy_bytes == 80_000 < rows[0].step_bytes
    assert resolve_size("base")[1] == [(500, 784), (500,), (10, 500), (10,)]
    assert resolve_size("10m")[1] == [(10_000_000,)]
    with pytest.raises(ValueError, match="unknown size"):
        resolve_size("huge")


def test_bandwidth_targets_logic():
    def row(dtype, step, update, copy, check):
        r = BandwidthRow("10m", "", 10_000_000, 1, dtype,
                         bytes_per_coord={"float32": 100, "bfloat16": 60}[dtype], copy_bytes=10**9, step_s=[step], update_s=[update], copy_s=[copy],
                         check_s=[check])
        return r

    # fp32: 1 GB in 0.1 s against a copy of 1 GB in 0.09 s = 90%; the check alone 4% of the
    # step, the step 8% more than the update (the check's share is read on the check's time)
    fast = row("float32", 0.1, 0.092, 0.09, 0.004)
    slow = row("bfloat16", 0.1, 0.05, 0.05, 0.01)  # 0.6 GB in 0.1 s against 20 GB/s: 30%
    t = bandwidth_targets([fast, slow])
    assert t[0]["measured"] == pytest.approx(0.9) and t[0]["met"] is True
    assert t[1]["measured"] == pytest.approx(0.3) and t[1]["met"] is False
    assert t[2]["measured"] == pytest.approx(0.04) and t[2]["met"] is True
    assert fast.overhead_share == pytest.approx(0.08)
    assert "90%" in bench.format_targets(t) and "NOT met" in bench.format_targets(t)


def test_the_check_timing_refuses_non_finite_gradients():
    # the check variant times the non-finite handling of a step that goes on; a skipped step
    # would time the other branch (and count a skip), so it stops the benchmark instead
    from l2l_optim import SimpleOptimizer

    p = torch.zeros(3, requires_grad=True)
    p.grad = torch.tensor([0.0, float("nan"), 1.0])
    opt = SimpleOptimizer([p])
    params, grads, _, _, where = opt._gather()
    with pytest.warns(RuntimeWarning), pytest.raises(RuntimeError, match="finite"):
        _check_nonfinite(opt, params, grads, where)


def test_count_subnormal():
    tiny = torch.finfo(torch.float32).tiny
    assert count_subnormal([torch.tensor([0.0, 1.0, tiny, tiny / 4, -tiny / 8])]) == 2
    assert count_subnormal([torch.tensor([1e-39]).to(torch.bfloat16), torch.zeros(3)]) == 1


def test_train_rows():
    rows = run_train(TrainConfig(models=["base", "transformer"], **QUIET), log=lambda m: None)
    assert [(r.model, r.optimizer) for r in rows] == [
        (m, o) for m in ("base", "transformer")
        for o in ("adam-fused", "adam-foreach", "simple", "simple-fp32", "simple-int8", "simple-sf")]
    assert rows[0].n_params == 397_510 and rows[0].batch_size == 128
    for r in rows:
        assert len(r.whole_s) == len(r.step_s) == 2
        assert all(w >= s > 0 for w, s in zip(r.whole_s, r.step_s))
        assert math.isfinite(r.x_adam) and r.x_adam > 0
        assert math.isfinite(r.last_loss) and r.last_loss > 0.1  # far from a loss driven to zero
        assert r.subnormal_grads == 0 and r.skipped_steps == 0
        assert json.dumps(r.to_json())
    assert rows[0].x_adam == 1.0
    # only SimpleOptimizer has one
    assert [bool(r.impl) for r in rows[:6]] == [False, False, True, True, True, True]
    # base: the bf16 and fp32 state rows of the weights simple, and the default weights
    assert format_train(rows).count("<= 1.5") == 3
    # the state's bytes per parameter: Adam's two moments, SimpleOptimizer's h, v and c (one
    # value per tensor, or per coordinate: 4 B more kept, 8 more moved); what SimpleOptimizer's
    # step moves per coordinate (none for Adam)
    assert rows[0].state_bytes_per_param == pytest.approx(8, abs=0.1)
    assert math.isnan(rows[0].bytes_per_coord)
    assert ((round(rows[2].state_bytes_per_param), rows[2].bytes_per_coord,
             round(rows[3].state_bytes_per_param), rows[3].bytes_per_coord)
            in ((24, 68, 44, 108), (28, 76, 48, 116)))
    # the 8-bit state: 10 codes and the block scales, v in bfloat16 and c; the stored state
    # moved once
    assert rows[4].state_bytes_per_param == pytest.approx(12, abs=0.2)
    assert rows[4].bytes_per_coord == pytest.approx(44, abs=0.5)
    # the default weights: the averaging's base sequence z kept (4 B) and moved twice (16 B)
    assert (round(rows[5].state_bytes_per_param), rows[5].bytes_per_coord) == (28, 84)
    # with the run's copy bandwidth, each SimpleOptimizer row gets its memory bound
    bounded = format_train(rows, copy_gbs=10.0)
    assert len({line.count("|") for line in bounded.splitlines()}) == 1
    targets = train_targets(rows)
    assert len(targets) == 6 and "(float32 state)" in targets[2]["target"]
    assert "default weights (simple-sf)" in targets[4]["target"]
    assert targets[0]["measured"] == rows[2].x_adam and targets[0]["met"] in (True, False)
    assert targets[2]["measured"] == rows[3].x_adam and targets[2]["met"] in (True, False)
    assert targets[4]["measured"] == rows[5].x_adam and targets[4]["met"] in (True, False)
    assert targets[1]["met"] is None and targets[3]["met"] is None  # mlp4m not run
    # the default's bound: its own bytes (the averaging's z) at the bfloat16 row's copy speed
    targets = train_targets(rows, copy_gbs={"simple": 10.0, "simple-sf": 10.0})
    assert targets[4]["bound"] is not None and targets[4]["bound"] > targets[0]["bound"]


def test_the_50m_model_has_50m_parameters():
    from benchmarks.train import TRAIN_MODELS

    spec = TRAIN_MODELS["mlp50m"]()
    with torch.device("meta"):
        model = spec.build()
    assert sum(p.numel() for p in model.parameters()) == 50_204_890


def test_train_table_memory_bound_column():
    # fused Adam: 4 ms whole, 1 ms of it the step; SimpleOptimizer moves 100 B per parameter of
    # 1e6 at 10 GB/s: (3 + 10) / 4 = 3.25x, in the row's bound column
    adam = TrainRow("base", "", 10**6, 128, "adam-fused", whole_s=[0.004], step_s=[0.001],
                    x_adam=1.0)
    simple = TrainRow("base", "", 10**6, 128, "simple", whole_s=[0.02], step_s=[0.016],
                      x_adam=5.0, bytes_per_coord=100.0)
    from benchmarks.train import memory_bound

    assert memory_bound(simple, [adam, simple], 10.0) == pytest.approx(3.25)
    assert math.isnan(memory_bound(simple, [adam, simple], None))
    assert math.isnan(memory_bound(adam, [adam, simple], 10.0))  # Adam has no byte count
    assert "| 5.00 | 3.25 |" in format_train([adam, simple], copy_gbs=10.0)
    assert "| 5.00 |  |" in format_train([adam, simple])
    # the targets read the row's own bytes first
    assert train_targets([adam, simple], copy_gbs=10.0)[0]["bound"] == pytest.approx(3.25)


def test_train_targets_logic():
    rows = [TrainRow("mlp4m", "", 1, 128, "simple", x_adam=1.25),
            TrainRow("base", "", 1, 128, "simple", x_adam=1.6)]
    met = {t["target"].split(":")[0]: t["met"] for t in train_targets(rows)}
    assert met == {"base": False, "mlp4m": True}
    assert [t["bound"] for t in train_targets(rows)] == [None, None]  # no bandwidth given
    # a float32-state row adds its own two targets, read on its own row
    rows.append(TrainRow("base", "", 1, 128, "simple-fp32", x_adam=1.4))
    targets = train_targets(rows)
    assert [(t["target"].split(" whole")[0], t["met"]) for t in targets] == [
        ("base: SimpleOptimizer, weights simple", False), ("mlp4m: SimpleOptimizer, weights simple", True),
        ("base: SimpleOptimizer, weights simple (float32 state)", True),
        ("mlp4m: SimpleOptimizer, weights simple (float32 state)", None)]


def test_train_targets_memory_bound():
    # fused Adam: 4 ms whole, 1 ms of it the step; SimpleOptimizer moves 100 B per parameter
    # of 1e6 at 10 GB/s: at least 10 ms, so the best whole step is (3 + 10) / 4 = 3.25x
    adam = TrainRow("base", "", 10**6, 128, "adam-fused", whole_s=[0.004], step_s=[0.001], x_adam=1.0)
    simple = TrainRow("base", "", 10**6, 128, "simple", whole_s=[0.02], step_s=[0.016], x_adam=5.0)
    base = train_targets([adam, simple], copy_gbs=10.0, bytes_per_param=100)[0]
    assert base["bound"] == pytest.approx(3.25) and base["met"] is False
    table = bench.format_targets([base])
    assert "| 5.00x | NOT met | 3.25x |" in table
    # per optimizer: the other state moves 60 B at 12 GB/s: (3 + 5) / 4 = 2x
    bf16 = TrainRow("base", "", 10**6, 128, "simple-fp32", whole_s=[0.01], step_s=[0.006],
                    x_adam=2.5)
    targets = train_targets([adam, simple, bf16], copy_gbs={"simple": 10.0, "simple-fp32": 12.0},
                            bytes_per_param={"simple": 100, "simple-fp32": 60})
    assert [t["bound"] for t in targets] == [pytest.approx(3.25), None, pytest.approx(2.0), None]
    # a bandwidth measured for one state dtype only gives no bound to the other
    targets = train_targets([adam, simple, bf16], copy_gbs={"simple": 10.0},
                            bytes_per_param={"simple": 100})
    assert targets[2]["bound"] is None and targets[0]["bound"] == pytest.approx(3.25)


def test_command_json(tmp_path, capsys, keep_threads):
    path = tmp_path / "bench.json"
    assert bench.main([
        "--bw-sizes", "2048", "--state-dtypes", "float32", "--c-layouts", "tensor",
        "--models", "transformer",
        "--train-optimizers", "adam-fused,simple", "--sizes", "base",
        "--optimizers", "adam-fused,simple-fused", "--steps", "1", "--rounds", "1",
        "--warmup", "0", "--threads", "1", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    for heading in ("## Bandwidth", "## Training step", "## Step time", "## Targets"):
        assert heading in out
    data = json.loads(path.read_text())
    assert data["tables"] == ["bandwidth", "train", "step"]
    assert len(data["bandwidth"]) == 1 and data["bandwidth"][0]["step_gbs"] > 0
    assert [r["optimizer"] for r in data["train"]] == ["adam-fused", "simple"]
    assert [r["optimizer"] for r in data["step"]] == ["adam-fused", "simple-fused"]
    assert len(data["targets"]) == 5 and data["threads"] == 1


def test_command_reads_each_state_dtypes_bound_from_its_own_bandwidth_row(
        tmp_path, monkeypatch, keep_threads):
    # the 10M rows are too slow for a test: canned rows, to check the wiring from the bandwidth
    # table to the training-step targets (fp32 state: 100 B at 10 GB/s; bf16: 60 B at 12 GB/s)
    def bandwidth(cfg, log):
        return [BandwidthRow("10m", "", 10**7, 1, dtype, bytes_per_coord=size, copy_bytes=10**9,
                             step_s=[0.1],
                             update_s=[0.1], copy_s=[1e9 / (gbs * 1e9)])
                for dtype, size, gbs in (("float32", 100, 10.0), ("bfloat16", 60, 12.0))]

    def train(cfg, log):
        adam = TrainRow("base", "", 10**6, 128, "adam-fused", whole_s=[0.004], step_s=[0.001],
                        x_adam=1.0)
        default = TrainRow("base", "", 10**6, 128, "simple-sf", whole_s=[0.01], step_s=[0.006],
                           x_adam=2.5, bytes_per_coord=84.0)
        return [adam] + [TrainRow("base", "", 10**6, 128, o, whole_s=[0.01], step_s=[0.006],
                                  x_adam=2.5) for o in ("simple", "simple-fp32")] + [default]

    monkeypatch.setattr(bench, "run_bandwidth", bandwidth)
    monkeypatch.setattr(bench, "run_train", train)
    path = tmp_path / "bench.json"
    assert bench.main(["--tables", "bandwidth,train", "--json", str(path)]) == 0
    bounds = {t["target"].split(" whole")[0]: t["bound"]
              for t in json.loads(path.read_text())["targets"] if "whole step" in t["target"]}
    # (3 ms of fused Adam's forward and backward + bytes / bandwidth) / its 4 ms whole step
    # bfloat16 state reads the bf16 row, float32 state the float32 row; the default weights
    # their own bytes (84) at the bf16 row's speed
    simple, fp32 = "SimpleOptimizer, weights simple", "SimpleOptimizer, weights simple (float32 state)"
    default = "SimpleOptimizer, default weights (simple-sf)"
    assert bounds == {f"base: {simple}": pytest.approx(2.0), f"base: {fp32}": pytest.approx(3.25),
                      f"base: {default}": pytest.approx(2.5),
                      f"mlp4m: {simple}": None, f"mlp4m: {fp32}": None, f"mlp4m: {default}": None}


def test_command_rejects_unknown_names(capsys, keep_threads):
    for argv in (["--models", "vgg"], ["--tables", "nope"], ["--bw-sizes", "big"],
                 ["--state-dtypes", "float16"], ["--c-layouts", "row"]):
        with pytest.raises(SystemExit):
            bench.main(argv)
    assert "unknown" in capsys.readouterr().err


class _CountingOptimizer:
    def __init__(self):
        self.steps = 0

    def step(self):
        self.steps += 1


def test_time_steps_times_after_warmup_and_stops_at_the_budget():
    opt, prepared = _CountingOptimizer(), []
    step_s, whole_s = time_steps(opt, 5, warmup=2, prepare=lambda: prepared.append(1))
    assert (len(step_s), len(whole_s), opt.steps, len(prepared)) == (5, 5, 7, 7)
    assert all(0 <= s <= w for s, w in zip(step_s, whole_s))
    opt = _CountingOptimizer()
    step_s, _ = time_steps(opt, 1000, warmup=1, budget=0.0)
    assert len(step_s) == 1 and opt.steps == 2


def test_seeded_construction_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    a, x = untrained_net("dm"), seeded(lambda: torch.randn(3), seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    # the same values whatever the global RNG's state
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        b, y = untrained_net("dm"), seeded(lambda: torch.randn(3), seed=1)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters())) and torch.equal(x, y)


def test_the_nearest_bf16_option_rounds_to_nearest():
    # the state quality bench's comparison: bfloat16 state without stochastic rounding
    from benchmarks.state_quality import nearest_bf16_optimizer

    from l2l_optim import SimpleOptimizer

    torch.manual_seed(0)
    w, v = torch.nn.Parameter(torch.randn(4096)), torch.nn.Parameter(torch.randn(4096))
    v.data.copy_(w.data)
    near = nearest_bf16_optimizer([w])
    sr = SimpleOptimizer([v], state_dtype=torch.bfloat16)
    fp32 = SimpleOptimizer([torch.nn.Parameter(w.detach().clone())], state_dtype=torch.float32)
    g = torch.randn(4096)
    for opt, p in ((near, w), (sr, v), (fp32, fp32.param_groups[0]["params"][0])):
        p.grad = g.clone()
        opt.step()
    h32 = fp32.state[fp32.param_groups[0]["params"][0]]["h"]
    assert torch.equal(near.state[w]["h"], h32.bfloat16())
    assert not torch.equal(sr.state[v]["h"], h32.bfloat16())
