"""The validation trend of a meta-training run (l2l_optim.meta.track), on dataset-free tasks."""

from __future__ import annotations

import json

import pytest

import l2l_optim.evaluation.protocol as ev
from l2l_optim.meta.track import main, track
from l2l_optim.nets import SimpleOptimizerNet
from l2l_optim.meta.init_rules import init_net
from l2l_optim.weights import save_weights


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(ev, "shipped_baselines", lambda: [])
    snaps = tmp_path / "run" / "snapshots"
    snaps.mkdir(parents=True)
    for gen, lr in ((10, 1e-3), (20, 3e-3)):
        net = init_net(SimpleOptimizerNet(input_norm="rms", averaging=0.9), "schedule-free", lr=lr)
        save_weights(net, snaps / f"gen{gen:05d}.safetensors")
    return tmp_path / "run"


def test_track_scores_each_snapshot_once(run_dir, tmp_path):
    kw = dict(tasks=["sine-regression"], steps=30, cache_dir=tmp_path / "cache")
    entries = track(run_dir, **kw)
    assert [e["generation"] for e in entries] == [10, 20]
    assert all(e["vs_schedule_free"] > 0 and "sine-regression" in e["per_task"] for e in entries)
    # the lr-2.5e-3 init rule is Schedule-Free AdamW: the 3e-3 snapshot is closer to it
    assert abs(entries[1]["vs_schedule_free"] - 1) < abs(entries[0]["vs_schedule_free"] - 1)
    lines = (run_dir / "validation.jsonl").read_text().splitlines()
    assert len(lines) == 2
    again = track(run_dir, **kw)  # nothing new: nothing run, nothing appended
    assert again == entries and len((run_dir / "validation.jsonl").read_text().splitlines()) == 2


def test_track_cli_writes_the_plot(run_dir, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    rc = main([str(run_dir), "--tasks", "sine-regression", "--steps", "30", "--cache-dir", str(tmp_path / "c")])
    assert rc == 0 and (run_dir / "validation.png").stat().st_size > 1000
    assert "gen    20" in capsys.readouterr().out
    assert main([str(tmp_path)]) == 2  # no snapshots
    assert json.loads((run_dir / "validation.jsonl").read_text().splitlines()[0])["generation"] == 10


def test_reference_scored_once_and_kept_apart_from_the_trend(run_dir, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    ref = save_weights(init_net(SimpleOptimizerNet(input_norm="rms"), "adam", lr=1e-3), tmp_path / "ref.safetensors")
    args = [str(run_dir), "--tasks", "sine-regression", "--steps", "30", "--cache-dir", str(tmp_path / "c"),
            "--reference", str(ref)]
    assert main(args) == 0
    lines = [json.loads(x) for x in (run_dir / "validation.jsonl").read_text().splitlines()]
    assert [x.get("reference") for x in lines] == [None, None, str(ref)]
    assert main(args) == 0  # the reference is not scored again, nor taken for a snapshot
    assert len((run_dir / "validation.jsonl").read_text().splitlines()) == 3
    assert [e["generation"] for e in track(run_dir, tasks=["sine-regression"], steps=30,
                                           cache_dir=tmp_path / "c")] == [10, 20]
