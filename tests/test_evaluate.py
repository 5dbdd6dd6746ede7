"""The validation protocol (l2l_optim.evaluation) on a tiny fake suite: no dataset files."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import l2l_optim.evaluation.protocol as ev
from l2l_optim.__main__ import main as cli_main
from l2l_optim.evaluation.peers import ADAM_GRID, SGD_GRID, fine_grid, make_peer, search_grid, warmup_cosine
from l2l_optim.evaluation.suite import SUITES, SuiteTask, default_suite, get_suite
from l2l_optim.nets import SimpleOptimizerNet
from l2l_optim.meta.init_rules import init_net
from l2l_optim.weights import save_weights

W_TRUE = torch.tensor([[1.0], [-2.0], [0.5], [3.0]])


def _batch(gen, scale=1.0):
    x = scale * torch.randn(16, 4, generator=gen)
    return x, x @ W_TRUE + 0.1 * torch.randn(16, 1, generator=gen)


def tiny_task(name="tiny", scale=1.0, log=None):
    """Linear regression on 4 features; ``log`` collects a checksum of every batch drawn."""

    def batch(gen):
        b = _batch(gen, scale)
        if log is not None:
            log.append(float(b[0].sum()))
        return b

    return SuiteTask(name=name, config={"scale": scale}, model_fn=lambda: nn.Linear(4, 1),
                     batch_fn=batch, loss_fn=F.mse_loss, description="tiny regression")


def sgd_like(lr=0.05):
    with torch.random.fork_rng(devices=[]):
        return init_net(SimpleOptimizerNet(), "sgd", lr=lr)


@pytest.fixture
def no_shipped(monkeypatch):
    monkeypatch.setattr(ev, "shipped_baselines", lambda: [])


@pytest.fixture
def count_runs(monkeypatch):
    calls = []
    real = ev._train

    def counting(task, make_opt, steps, seed, schedule=None):
        calls.append((task.name, steps, seed))
        return real(task, make_opt, steps, seed, schedule)

    monkeypatch.setattr(ev, "_train", counting)
    return calls


def _evaluate(weights, tmp_path, **kw):
    kw.setdefault("suite", [tiny_task()])
    kw.setdefault("steps", 40)
    kw.setdefault("horizons", (20,))
    return ev.evaluate(weights, cache_dir=tmp_path / "cache", progress=False, **kw)


def test_same_init_and_batches_for_every_optimizer():
    log_a, log_b = [], []
    a = ev._train(tiny_task(log=log_a), lambda p: torch.optim.Adam(p, lr=0.1), 5, seed=3)
    b = ev._train(tiny_task(log=log_b), lambda p: ev.optimizer_class("simple")(
        p, weights=sgd_like()), 5, seed=3)
    assert log_a == log_b  # the same minibatches
    assert a["losses"][0] == b["losses"][0]  # the same init (the first loss precedes any update)
    assert a["losses"][1] != b["losses"][1]
    c = ev._train(tiny_task(), lambda p: torch.optim.Adam(p, lr=0.1), 5, seed=4)
    assert c["losses"][0] != a["losses"][0]


def test_prefix_rule_horizon_equals_shorter_run(tmp_path, no_shipped):
    task = tiny_task()
    long = ev._record(ev._train(task, lambda p: torch.optim.SGD(p, lr=0.01), 50, 0), 50, [20])
    short = ev._train(task, lambda p: torch.optim.SGD(p, lr=0.01), 20, 0)
    # the mean of the last 10% of the first 20 steps of the long run IS the 20-step run's score
    assert long["tails"]["20"] == sum(short["losses"][-2:]) / 2
    # the same through evaluate, for the fixed-lr baselines and the learned optimizer
    r_long = _evaluate(sgd_like(), tmp_path / "a", steps=50, horizons=(20,), quick=True)
    r_short = _evaluate(sgd_like(), tmp_path / "b", steps=20, horizons=(), quick=True)
    at20 = [r for r in r_long.rows if r.horizon == 20][0]
    only = r_short.rows[0]
    assert (at20.learned_loss, at20.adam_loss, at20.sgd_loss) == (only.learned_loss, only.adam_loss, only.sgd_loss)
    assert r_long.horizons == [20, 50] and r_short.horizons == [20]


def _rec(tails, diverged_at=None, steps=100):
    return {"steps": steps, "tails": tails, "curve": [1.0], "diverged_at": diverged_at, "skipped": 0}


def _entry(adam, sgd, initial=2.0, cosine=None, sf=0.5, prodigy=0.6):
    runs = {"adam": adam, "sgd": sgd, "schedule-free": {"default": _rec({"10": sf, "100": sf})},
            "prodigy": {"default": _rec({"10": prodigy, "100": prodigy})}}
    runs.update(cosine or {})
    return {"initial_loss": initial, "runs": runs}


def _learned(loss10, loss100, **more):
    return {"1": [_rec({"10": loss10, "100": loss100})], **{k: [v] for k, v in more.items()}}


def test_best_lr_chosen_per_horizon_and_optimizer():
    adam = {"0.1": _rec({"10": 0.5, "100": 0.30}), "0.01": _rec({"10": 0.8, "100": 0.10}),
            "0.001": _rec({"10": 1.0, "100": 0.8})}
    sgd = {"1": _rec({"10": 0.4, "100": 0.35}), "0.1": _rec({"10": 0.9, "100": 0.20})}
    cosine = {"adamw-cosine@10": {"0.1": _rec({"10": 0.3}, steps=10), "0.01": _rec({"10": 0.6}, steps=10)},
              "adamw-cosine@100": {"0.1": _rec({"100": 0.2}), "0.01": _rec({"100": 0.08})}}
    learned = _learned(0.2, 0.05, **{"0.3": _rec({"10": 0.4, "100": 0.04}), "3": _rec({"10": 0.1, "100": 0.5}),
                                     "cosine@10": _rec({"10": 0.15}, steps=10), "cosine@100": _rec({"100": 0.04})})
    r10, r100 = ev.task_rows("t", [_entry(adam, sgd, cosine=cosine)], learned, [10, 100])
    assert (r10.adam_lr, r10.adam_loss, r10.sgd_lr, r10.sgd_loss) == (0.1, 0.5, 1.0, 0.4)
    assert (r100.adam_lr, r100.adam_loss, r100.sgd_lr, r100.sgd_loss) == (0.01, 0.10, 0.1, 0.20)
    assert r10.ratio == pytest.approx(0.2 / 0.4) and r100.ratio == pytest.approx(0.05 / 0.10)
    assert (r10.cosine_lr, r100.cosine_lr) == (0.1, 0.01)
    assert r10.vs_cosine == pytest.approx(0.15 / 0.3) and r100.vs_cosine == pytest.approx(0.04 / 0.08)
    assert r100.vs_adam_default == pytest.approx(0.05 / 0.8)
    assert r100.vs_schedule_free == pytest.approx(0.05 / 0.5) and r100.vs_prodigy == pytest.approx(0.05 / 0.6)
    # the best multiplier, and whether lr=1 is within 5% of it
    assert (r10.best_multiplier, r100.best_multiplier) == (3.0, 0.3)
    assert not r10.self_tuned and not r100.self_tuned
    (r,) = ev.task_rows("t", [_entry(adam, sgd)], _learned(0.2, 0.05, **{"3": _rec({"10": 0.195})}), [10])
    assert r.self_tuned and math.isnan(r.vs_cosine)


def test_divergence_ranks_last_and_flags_the_learned_run():
    # lr 1 is "best" at 10 steps but diverged at step 50: at 100 it must rank last
    adam = {"1": _rec({"10": 0.1, "100": None}, diverged_at=50), "0.1": _rec({"10": 0.5, "100": 0.4})}
    sgd = {"1": _rec({"10": None, "100": None}, diverged_at=3), "0.1": _rec({"10": 0.6, "100": 0.5})}
    learned = {"1": [_rec({"10": 0.3, "100": None}, diverged_at=40)]}
    r10, r100 = ev.task_rows("t", [_entry(adam, sgd)], learned, [10, 100])
    assert (r10.adam_lr, r10.sgd_lr) == (1.0, 0.1)  # before the divergence, the prefix counts
    assert (r100.adam_lr, r100.adam_loss) == (0.1, 0.4)
    assert not r10.diverged and r100.diverged and "NaN/Inf" in r100.flags
    assert math.isinf(r100.ratio)
    # every baseline diverged: no reference, the ratio is undefined
    dead = {"1": _rec({"10": None}, diverged_at=1)}
    (row,) = ev.task_rows("t", [_entry(dead, dead)], {"1": [_rec({"10": 0.3})]}, [10])
    assert math.isinf(row.adam_loss) and math.isnan(row.ratio)


def test_real_divergence_recorded(tmp_path, no_shipped):
    task = tiny_task(scale=30.0)  # SGD at large lrs blows up on inputs this large
    entry = ev.baseline_entry(task, steps=30, seed=0, horizons=[10], cache_dir=tmp_path)
    dead = [k for k, r in entry["runs"]["sgd"].items() if r["diverged_at"] is not None]
    assert dead and all(entry["runs"]["sgd"][k]["tails"]["30"] is None for k in dead)
    (row,) = ev.task_rows(task.name, [entry], {"1": [entry["runs"]["adam"]["0.001"]]}, [30])
    assert f"{row.sgd_lr:g}" not in dead and math.isfinite(row.sgd_loss)


def test_geometric_mean():
    assert ev.geometric_mean([1.0, 4.0]) == pytest.approx(2.0)
    assert ev.geometric_mean([0.5, 2.0, 1.0]) == pytest.approx(1.0)
    assert ev.geometric_mean([2.0, math.nan]) == pytest.approx(2.0)  # undefined ratios are left out
    assert math.isinf(ev.geometric_mean([0.5, math.inf]))
    assert math.isnan(ev.geometric_mean([]))


def test_stalled_flag(tmp_path, no_shipped):
    frozen = SimpleOptimizerNet()
    with torch.no_grad():
        for p in frozen.parameters():
            p.zero_()  # zero output weights: every update is 0
    # full-batch: the same batch every step, so a frozen model's loss is its initial loss
    fixed = _batch(torch.Generator().manual_seed(0))
    full = SuiteTask(name="full", config={}, model_fn=lambda: nn.Linear(4, 1), batch_fn=lambda gen: fixed,
                     loss_fn=F.mse_loss)
    still = _evaluate(frozen, tmp_path, suite=[full])
    assert all(r.stalled and "stalled" in r.flags for r in still.rows)
    assert all(r.learned_loss == pytest.approx(r.initial_loss) for r in still.rows)
    moving = _evaluate(sgd_like(), tmp_path, suite=[full])
    assert not any(r.stalled for r in moving.rows)
    assert all(r.learned_loss < 0.5 * r.initial_loss for r in moving.rows)


def _baseline_runs(entry):
    return sum(len(v) for v in entry["runs"].values())


def test_cache_hit_skips_baselines(tmp_path, no_shipped, count_runs):
    first = _evaluate(sgd_like(), tmp_path, quick=True)
    (entry,) = ev._read_entries(tmp_path / "cache" / "baselines.json").values()
    assert len(count_runs) == _baseline_runs(entry) + 1  # every baseline run, then the learned one
    count_runs.clear()
    second = _evaluate(sgd_like(0.01), tmp_path, quick=True)  # other weights: only the learned run
    assert len(count_runs) == 1
    assert [r.adam_loss for r in second.rows] == [r.adam_loss for r in first.rows]
    count_runs.clear()
    _evaluate(sgd_like(), tmp_path, steps=30, horizons=(10,), quick=True)
    # shorter: the fixed-lr runs serve as prefixes (no new run is 40 steps long), while the
    # scheduled AdamW is a new run for each new horizon
    assert {c[1] for c in count_runs} <= {10, 30} and len(count_runs) > 1
    count_runs.clear()
    # the full protocol: the multipliers 0.3, 1, 3 and one scheduled run per horizon
    full = _evaluate(sgd_like(), tmp_path, horizons=(20,))
    assert len(count_runs) == 3 + 2
    assert sorted(full.rows[0].learned_by_multiplier) == ["0.3", "1", "3"]


def test_shipped_file_is_read_first(tmp_path, monkeypatch, count_runs):
    monkeypatch.setattr(ev, "shipped_baselines", lambda: [])
    _evaluate(sgd_like(), tmp_path / "made", quick=True)  # computes the baselines into made/cache
    shipped = tmp_path / "made" / "cache" / "baselines.json"
    monkeypatch.setattr(ev, "shipped_baselines", lambda: [shipped])
    count_runs.clear()
    _evaluate(sgd_like(), tmp_path / "fresh", quick=True)  # an empty cache_dir: the shipped file serves
    assert len(count_runs) == 1
    assert not (tmp_path / "fresh" / "cache" / "baselines.json").exists()


def test_cache_invalidated_by_config_steps_and_torch(tmp_path, no_shipped, count_runs, monkeypatch):
    _evaluate(sgd_like(), tmp_path, quick=True)
    n_first = len(count_runs)
    count_runs.clear()
    _evaluate(sgd_like(), tmp_path, suite=[tiny_task(scale=2.0)], quick=True)  # the config changed
    assert len(count_runs) > 10
    count_runs.clear()
    _evaluate(sgd_like(), tmp_path, steps=60, quick=True)  # longer than the cached fixed-lr runs
    assert len(count_runs) > 10 and 60 in {c[1] for c in count_runs}
    count_runs.clear()
    monkeypatch.setattr(torch, "__version__", "99.1.0")
    _evaluate(sgd_like(), tmp_path, quick=True)
    assert len(count_runs) == n_first
    keys = {ev.cache_key(tiny_task(), 0), ev.cache_key(tiny_task(scale=2.0), 0), ev.cache_key(tiny_task(), 1)}
    assert len(keys) == 3


def test_interrupted_baselines_resume(tmp_path, no_shipped, count_runs, monkeypatch):
    ev.baseline_entry(tiny_task(), steps=20, seed=9, horizons=[10], cache_dir=tmp_path / "full")
    total = len(count_runs)
    counting = ev._train

    def dies_at_third(*args):
        if len(count_runs) == total + 2:
            raise KeyboardInterrupt
        return counting(*args)

    monkeypatch.setattr(ev, "_train", dies_at_third)
    with pytest.raises(KeyboardInterrupt):
        ev.baseline_entry(tiny_task(), steps=20, seed=9, horizons=[10], cache_dir=tmp_path)
    monkeypatch.setattr(ev, "_train", counting)
    count_runs.clear()
    ev.baseline_entry(tiny_task(), steps=20, seed=9, horizons=[10], cache_dir=tmp_path)
    assert len(count_runs) == total - 2  # the two finished runs were kept


def test_seeds_average_and_no_global_rng_effect(tmp_path, no_shipped):
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    r01 = _evaluate(sgd_like(), tmp_path, seeds=(0, 1), quick=True)
    assert torch.equal(state, torch.random.get_rng_state())
    r0 = _evaluate(sgd_like(), tmp_path, seeds=(0,), quick=True)
    r1 = _evaluate(sgd_like(), tmp_path, seeds=(1,), quick=True)
    assert r01.rows[0].learned_loss == pytest.approx((r0.rows[0].learned_loss + r1.rows[0].learned_loss) / 2)


def test_cli_writes_table_json_and_png(tmp_path, no_shipped, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    monkeypatch.setitem(SUITES, "tiny", lambda root=None: [tiny_task(), tiny_task("tiny2", scale=0.5)])
    path = save_weights(sgd_like(), tmp_path / "w.safetensors")
    out = tmp_path / "out"
    rc = cli_main(["eval", str(path), "--suite", "tiny", "--steps", "30", "--horizons", "10", "--quick",
                   "--out-dir", str(out), "--cache-dir", str(tmp_path / "c"), "--quiet"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| tiny2 | 30 |" in text and "geometric mean" in text and "SF-AdamW" in text
    data = json.loads((out / "eval.json").read_text())
    (res,) = data["results"]
    assert res["horizons"] == [10, 30] and len(res["rows"]) == 4
    assert set(res["curves"]["tiny"]) == {"learned", "adam", "sgd", "schedule-free"}
    assert set(res["geomeans"]) == {"vs_adam_default", "ratio", "vs_cosine", "vs_schedule_free", "vs_prodigy"}
    assert (out / "eval.png").stat().st_size > 1000
    with pytest.raises(SystemExit):
        cli_main(["eval", "--suite", "tiny"])  # no weights


def test_default_suite_is_well_formed():
    tasks = default_suite()
    assert len(tasks) >= 12 and len({t.name for t in tasks}) == len(tasks)
    assert max(t.num_params() for t in tasks) >= 2_000_000
    images = torch.randn(2, 1, 28, 28)
    gen = torch.Generator().manual_seed(0)
    for t in tasks:
        assert "batch_size" in t.config and t.description
        if "dataset" in t.config:  # the datasets are not needed to build the models
            out = t.model_fn()(images)
            assert out.shape[0] == 2
        else:
            x, y = t.batch_fn(gen)
            assert torch.isfinite(t.loss_fn(t.model_fn()(x), y))
    with pytest.raises(ValueError):
        get_suite("nope")
    with pytest.raises(ValueError):
        get_suite([tiny_task(), tiny_task()])


def test_addition_batches_are_correct():
    from l2l_optim.evaluation.suite import _addition_batch

    x, y = _addition_batch(torch.Generator().manual_seed(0), digits=4, batch_size=8)
    for i in range(8):
        a = int("".join(map(str, x[i, :4].tolist())))
        b = int("".join(map(str, x[i, 5:9].tolist())))
        assert sum(d * 10**k for k, d in enumerate(y[i, 9:].tolist())) == a + b
    assert (y[:, :9] == -100).all()


def test_shipped_baselines_are_complete(monkeypatch):
    """Every default task the shipped file holds needs no baseline run at 1,000 and 5,000 steps
    (checked where the datasets and the torch version the file was made with are here)."""
    from l2l_optim.data import DatasetNotFoundError

    paths = ev.shipped_baselines()
    if not paths:
        pytest.skip("no shipped baselines")
    entries = json.loads(paths[0].read_text())["entries"]
    made_with = {".".join(e["torch"].split(".")[:2]) for e in entries.values()}
    if ".".join(torch.__version__.split(".")[:2]) not in made_with:
        pytest.skip(f"the shipped baselines were computed with torch {sorted(made_with)}")

    def no_runs(*args):
        raise AssertionError("a baseline run was started")

    monkeypatch.setattr(ev, "_train", no_runs)
    shipped = {e["task"] for e in entries.values()}
    for task in default_suite():
        if task.name not in shipped:
            continue
        steps = min(5000, task.max_steps or 5000)
        try:
            entry = ev.baseline_entry(task, steps=steps, seed=0, horizons=[1000, steps])
        except DatasetNotFoundError:
            pytest.skip(f"{task.config['dataset']} is not available here")
        assert entry["task"] == task.name and entry["config"] == task.config


def test_optimizer_kwargs_reach_the_learned_optimizer(tmp_path, no_shipped, monkeypatch):
    """``optimizer_kwargs`` (the CLI's --state-dtype) changes the learned runs only."""
    seen = []
    real_step = ev.optimizer_class("simple").step

    def spy(self, *a, **kw):
        seen.append(next(iter(self.state.values()))["h"].dtype if self.state else None)
        return real_step(self, *a, **kw)

    monkeypatch.setattr(ev.optimizer_class("simple"), "step", spy)
    r32 = _evaluate(sgd_like(), tmp_path, quick=True)
    seen.clear()
    r16 = _evaluate(sgd_like(), tmp_path, optimizer_kwargs={"state_dtype": torch.bfloat16}, quick=True)
    assert seen[-1] == torch.bfloat16
    assert "state_dtype=torch.bfloat16" in r16.weights
    assert r16.rows[0].adam_loss == r32.rows[0].adam_loss  # the baselines are the same runs
    with pytest.raises(ValueError, match="lr or weights"):
        _evaluate(sgd_like(), tmp_path, optimizer_kwargs={"lr": 0.5})
    with pytest.raises(ValueError):
        _evaluate(sgd_like(), tmp_path, optimizer_kwargs={"state_dtype": torch.int16})


def test_fine_grids():
    assert fine_grid(1e-3, 1e-1) == (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)
    assert ADAM_GRID[0] == 1e-5 and ADAM_GRID[-1] == 1.0 and len(ADAM_GRID) == 16
    assert SGD_GRID[0] == 1e-4 and SGD_GRID[-1] == 5.0


@settings(max_examples=60, deadline=None)
@given(st.floats(min_value=-7.5, max_value=2.5), st.sampled_from([1e-4, 1e-3, 1e-2]))
def test_search_finds_the_fine_grid_optimum_of_a_unimodal_loss(log_opt, start):
    calls = []

    def score(lr):
        calls.append(lr)
        return (math.log10(lr) - log_opt) ** 2

    best = search_grid(ADAM_GRID, score, start)
    # the whole (widened) 1-2-5 grid, swept: the search must find the same point
    sweep = fine_grid(1e-9, 1e3)
    expected = min(sweep, key=lambda lr: ((math.log10(lr) - log_opt) ** 2, -lr))
    assert best == expected
    assert len(set(calls)) == len(calls)  # no run twice
    if -5 <= log_opt <= 0:
        assert len(calls) <= 12 < len(ADAM_GRID)  # cheaper than sweeping the grid


def test_search_uses_known_points_first():
    calls = []
    search_grid(ADAM_GRID, lambda lr: calls.append(lr) or abs(math.log10(lr / 0.05)), 1e-3,
                known=lambda lr: lr in (0.05, 0.02, 0.1))
    assert calls[:3] == [0.02, 0.05, 0.1]


def test_warmup_cosine():
    m = [warmup_cosine(t, 1000) for t in range(1000)]
    assert m[0] == pytest.approx(1 / 50) and m[49] == 1.0 and m[-1] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(m[49:], m[50:]))  # decays monotonically after the warm-up


def test_scheduled_runs_follow_the_multiplier():
    seen = []

    class Spy(torch.optim.SGD):
        def step(self, closure=None):
            seen.append(self.param_groups[0]["lr"])
            return super().step(closure)

    ev._train(tiny_task(), lambda ps: Spy(ps, lr=0.1), 40, 0, lambda t: warmup_cosine(t, 40))
    assert seen == pytest.approx([0.1 * warmup_cosine(t, 40) for t in range(40)])


def test_untuned_peers_at_their_defaults():
    pytest.importorskip("schedulefree")
    pytest.importorskip("prodigyopt")
    w = nn.Parameter(torch.zeros(3))
    sf = make_peer("schedule-free", [w])
    assert sf.param_groups[0]["lr"] == 0.0025 and sf.param_groups[0]["train_mode"]
    assert make_peer("prodigy", [w]).param_groups[0]["lr"] == 1.0
    with pytest.raises(ValueError, match="is tuned"):
        make_peer("adam", [w])
    with pytest.raises(ValueError, match="unknown peer"):
        make_peer("lion", [w], 1e-3)


def test_per_task_results_merge_into_the_whole_suites(tmp_path, no_shipped):
    """Evaluating the tasks one by one, saving and reading back each result and merging gives
    the rows and geometric means of one evaluation of the whole suite."""
    from l2l_optim.evaluation import merge_results
    from l2l_optim.evaluation.results import EvalResult

    suite = [tiny_task(), tiny_task("tiny2", scale=0.5)]
    whole = _evaluate(sgd_like(), tmp_path, suite=suite, quick=True)
    parts = [_evaluate(sgd_like(), tmp_path, suite=[t], quick=True) for t in suite]
    parts = [EvalResult.from_dict(json.loads(json.dumps(p.to_dict()))) for p in parts]
    merged = merge_results(parts)
    assert [(r.task, r.horizon) for r in merged.rows] == [(r.task, r.horizon) for r in whole.rows]
    assert [r.learned_loss for r in merged.rows] == [r.learned_loss for r in whole.rows]
    for col, by_h in whole.geomeans.items():
        for h, v in by_h.items():
            assert merged.geomeans[col][h] == pytest.approx(v, nan_ok=True)
    with pytest.raises(ValueError, match="more than one result"):
        merge_results([parts[0], parts[0]])
    other = _evaluate(sgd_like(0.01), tmp_path, suite=[suite[1]], quick=True)
    with pytest.raises(ValueError, match="cannot merge"):
        merge_results([parts[0], other])
