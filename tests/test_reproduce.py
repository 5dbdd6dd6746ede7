"""Tests for experiments.repro, the paper reproduction at the repository's root: the claim
rules on hand-made curves, every experiment end to end on tiny fake data, resuming, run claims,
the report.

The end-to-end tests use the shipped weights (``--allow-random-weights`` is passed but has
nothing to substitute); one test removes them to exercise the untrained stand-ins. The fast
tests use a few steps (fig5b runs its protocol on LeNet, fig5b-long on its own narrow ResNet);
the ``slow`` ones run ``--steps 20 --seeds 1`` on every experiment, fig5b on the real ResNet.
"""

from __future__ import annotations

import json
import math
import subprocess

import pytest
import torch

from experiments.repro import cli, learned
from experiments.repro.claims import beats, compare, final_window, loss_at, mean_loss_at, seed_ranges_overlap
from experiments.repro.cli import main
from experiments.repro.experiments import ALL, EXPERIMENTS
from experiments.repro.report import comparison_text, write_report
from experiments.repro.store import claim_run, read_curve, read_json, write_json
from fake_idx import make_fake_datasets
from l2l_optim.weights import WeightsError

TINY = ["--seeds", "1", "--batch-size", "32", "--subsample", "0.5", "--trajectories", "1", "--max-unrolls", "2",
        "--unroll", "3", "--search-steps", "3", "--allow-random-weights", "--quiet"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_fake_datasets(tmp_path_factory.mktemp("data"))


def run(tmp_path, data_root, *args):
    out = tmp_path / "results"
    code = main([*args, "--out", str(out), "--data-root", str(data_root), *TINY])
    assert code == 0
    return out


def check_experiment(out, name, steps):
    exp_dir = out / name
    summary = json.loads((exp_dir / "summary.json").read_text())
    assert summary["experiment"] == name
    assert (exp_dir / f"{name}.png").stat().st_size > 1000
    exp = EXPERIMENTS[name]
    assert list(summary["optimizers"]) == [o.key for o in exp.opts]
    for o in exp.opts:
        e = summary["optimizers"][o.key]
        assert e["steps"] == steps and e["seeds"] == 1
        curve = read_curve(exp_dir / f"{o.key}_seed0.csv")
        record = json.loads((exp_dir / f"{o.key}_seed0.json").read_text())
        assert not record["diverged"] and e["diverged"] == 0  # every optimizer trains the fake data
        assert len(curve) == steps
        w = final_window(steps)
        assert e["final_loss"]["mean"] == pytest.approx(sum(curve[-w:]) / w, rel=1e-5)
        assert 0.0 <= e["test_acc"]["mean"] <= 1.0
        tuned = o.kind in ("sgd", "adam")
        assert e.get("lr") == (summary["lr_search"][o.kind]["best_lr"] if tuned else e.get("lr"))
        assert (e.get("lr") in (1.0, 0.1, 0.01, 0.001)) or not tuned
    assert len(summary["comparisons"]) == len(exp.claims)
    for c in summary["comparisons"]:
        assert isinstance(c["holds"], bool)
        assert comparison_text(c).endswith(("agrees", "disagrees", "context, not a claim of the paper"))
    assert (exp_dir / "finetuned.safetensors").exists() == bool(exp.finetune)
    assert ("subsample" in summary["lr_search"].get("sgd", {}).get("data", "")) == bool(exp.finetune)
    assert not exp.finetune or summary["finetune"]["log"][0]["unrolls"] >= 1
    return summary


FAST = [
    ("fig3", []),
    ("fig4a", []),
    ("fig4b", []),
    ("fig5a", []),
    ("fig5b", ["--task", "fmnist-lenet"]),  # fig5b's protocol on a small model
    ("fig5b-long", []),  # its own ResNet is small enough for the fast tests
]


@pytest.mark.parametrize("name,extra", FAST, ids=[n for n, _ in FAST])
def test_experiment_runs_end_to_end(tmp_path, data_root, name, extra):
    out = run(tmp_path, data_root, name, "--steps", "3", *extra)
    check_experiment(out, name, 3)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in ALL if n != "table1"])
def test_experiment_runs_end_to_end_20_steps(tmp_path, data_root, name):
    out = run(tmp_path, data_root, name, "--steps", "20", "--search-steps", "20")
    check_experiment(out, name, 20)


@pytest.mark.slow
def test_table1(tmp_path, data_root):
    out = run(tmp_path, data_root, "table1", "--steps", "2")
    summary = json.loads((out / "table1" / "summary.json").read_text())
    rows = {r["optimizer"]: r for r in summary["rows"]}
    assert {k: rows[k]["params"] for k in ("simple", "dm", "rnnprop")} == {"simple": 132, "dm": 5301,
                                                                          "rnnprop": 6801}
    assert all(r["step_ms_median"] > 0 for r in rows.values())
    assert (out / "table1" / "table1.csv").read_text().startswith("optimizer,params,")
    assert (out / "table1" / "table1.png").exists()


def test_finished_runs_are_skipped_and_changed_settings_rerun(tmp_path, data_root, capsys):
    out = run(tmp_path, data_root, "fig4b", "--steps", "3")
    exp_dir = out / "fig4b"
    files = sorted(exp_dir.glob("*_seed0.csv")) + [exp_dir / "finetuned.safetensors", exp_dir / "lr_search.json"]
    mtimes = {p: p.stat().st_mtime_ns for p in files}
    capsys.readouterr()
    main(["fig4b", "--steps", "3", "--out", str(out), "--data-root", str(data_root), *TINY[:-1]])
    printed = capsys.readouterr().out
    assert printed.count("done, skipped") == 4
    assert "reusing" in printed
    assert all(p.stat().st_mtime_ns == mtimes[p] for p in files)
    # an unfinished run (its JSON is missing) is redone; the others stay
    (exp_dir / "sgd_seed0.json").unlink()
    main(["fig4b", "--steps", "3", "--out", str(out), "--data-root", str(data_root), *TINY])
    assert (exp_dir / "sgd_seed0.json").exists()
    assert (exp_dir / "adam_seed0.csv").stat().st_mtime_ns == mtimes[exp_dir / "adam_seed0.csv"]
    # another step count reruns the training runs (not the fine-tuning)
    capsys.readouterr()
    main(["fig4b", "--steps", "4", "--out", str(out), "--data-root", str(data_root), *TINY[:-1]])
    printed = capsys.readouterr().out
    assert printed.count("rerun (settings changed: steps)") == 4
    assert len(read_curve(exp_dir / "simple_seed0.csv")) == 4
    assert (exp_dir / "finetuned.safetensors").stat().st_mtime_ns == mtimes[exp_dir / "finetuned.safetensors"]


def test_report_builds_results_md(tmp_path, data_root):
    out = run(tmp_path, data_root, "fig3", "fig4b", "--steps", "3")
    report = tmp_path / "RESULTS.md"
    main(["report", "--out", str(out), "--report", str(report), "--quiet"])
    text = report.read_text()
    for needle in ("# Reproducing the paper's experiments", "## Figure 3", "## Figure 4b",
                   "## Agreement with the paper", "python -m experiments.repro fig3", "![fig3](results/fig3/fig3.png)",
                   "Not run yet: table1, fig2",
                   "| optimizer | steps | seeds |", "Learning-rate search", "Fine-tuning: 1 trajectories"):
        assert needle in text, needle
    assert "checked claims agree" in text
    summary = json.loads((out / "fig3" / "summary.json").read_text())
    assert summary["random_weights"] == [] and "smoke-test numbers" not in text  # the shipped weights ran
    # the report's comparison lines are the ones the summaries hold
    for c in summary["comparisons"]:
        assert comparison_text(c) in text


def test_all_and_unknown_experiments(tmp_path, data_root, monkeypatch):
    ran = []
    monkeypatch.setattr(cli, "run_experiment", lambda name, s: ran.append(name))
    monkeypatch.setattr(cli, "run_table1", lambda s: ran.append("table1"))
    main(["all", "--out", str(tmp_path / "results"), "--report", str(tmp_path / "R.md"), "--quiet"])
    assert ran == list(ALL) and (tmp_path / "R.md").exists()
    with pytest.raises(SystemExit):
        main(["fig9", "--quiet"])


def _no_shipped_weights(monkeypatch):
    def missing(name, **kw):
        raise WeightsError(f"no shipped weights {name!r}")

    monkeypatch.setattr(learned, "resolve_net", missing)


def test_missing_weights_need_the_explicit_flag(monkeypatch):
    with pytest.raises(SystemExit, match="allow-random-weights"):
        learned.resolve_weights("no-such-weights", allow_random=False)
    with pytest.raises(ValueError, match="unknown weights"):
        learned.resolve_weights("no-such-weights", allow_random=True)
    net, info = learned.resolve_weights("simple-noagg", allow_random=True)
    assert (info["arch"], info["random"], net.aggregate) == ("simple", False, False)  # the shipped file


def test_untrained_standins_have_the_weights_architecture_and_start(monkeypatch):
    _no_shipped_weights(monkeypatch)
    with pytest.raises(SystemExit, match="allow-random-weights"):
        learned.resolve_weights("simple", allow_random=False)
    noagg, info = learned.resolve_weights("simple-noagg", allow_random=True)
    assert (info["arch"], info["random"], noagg.aggregate, noagg.bias) == ("simple", True, False, False)
    bias, _ = learned.resolve_weights("simple-bias", allow_random=True)
    assert bias.bias and bias.aggregate
    dm, info = learned.resolve_weights("dm", allow_random=True)
    assert info == {"name": "dm", "arch": "dm", "fingerprint": info["fingerprint"], "random": True}
    assert torch.count_nonzero(dm.out.bias) == 0  # init_net's "small-output", the LSTM nets' start
    # seeded: the same stand-in every time, so cached runs stay valid
    assert learned.resolve_weights("dm", allow_random=True)[1]["fingerprint"] == info["fingerprint"]


def test_untrained_weights_are_flagged_in_the_summary_and_the_report(tmp_path, data_root, monkeypatch):
    _no_shipped_weights(monkeypatch)
    out = run(tmp_path, data_root, "fig3", "--steps", "3")
    summary = json.loads((out / "fig3" / "summary.json").read_text())
    assert summary["random_weights"] == ["simple", "simple-bias", "simple-noagg", "simple-uniform"]
    text = write_report(out, tmp_path / "RESULTS.md").read_text()
    assert "smoke-test numbers" in text and "(untrained weights)" in text


def test_seeded_construction_leaves_the_global_rng_alone():
    from experiments.repro.seeding import seeded

    state = torch.random.get_rng_state()
    x = seeded(lambda: torch.randn(3), seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        assert torch.equal(seeded(lambda: torch.randn(3), seed=1), x)  # whatever the global state


def test_every_finetune_setting_has_a_finetune_keyword():
    import inspect

    from experiments.repro.experiments import FINETUNE_DEFAULTS
    from experiments.repro.runner import FINETUNE_KWARGS
    from l2l_optim.finetuning import finetune

    accepted = set(inspect.signature(finetune).parameters)
    for settings in [FINETUNE_DEFAULTS, *(e.finetune for e in EXPERIMENTS.values() if e.finetune)]:
        assert {FINETUNE_KWARGS[k] for k in [*settings, "out"]} <= accepted


def test_final_window():
    assert final_window(10_000) == 500
    assert final_window(2000) == 200
    assert final_window(20) == 2
    assert final_window(3) == 1


# ----------------------------------------------------------------------------------------
# the claim rules, on hand-made curves

LOW = [4.0, 3.0, 2.0, 1.0] * 5  # 20 steps; final window 2: mean 1.5
HIGH = [5.0] * 20


def test_loss_at_is_the_final_window_mean_cut_at_the_horizon():
    assert loss_at(LOW, False, 20) == pytest.approx(1.5)
    assert loss_at(LOW + [100.0] * 20, False, 20) == pytest.approx(1.5)  # later steps do not count
    # a run that diverged before the horizon is inf; one that diverged after it counts its loss there
    assert loss_at([1.0] * 5, True, 20) == math.inf
    assert loss_at(LOW + [1e9], True, 20) == pytest.approx(1.5)


def test_one_diverged_seed_makes_the_mean_inf():
    assert mean_loss_at([(LOW, False), (LOW, False)], 20) == pytest.approx(1.5)
    assert mean_loss_at([(LOW, False), ([1.0] * 3, True), (LOW, False)], 20) == math.inf
    assert math.isnan(mean_loss_at([], 20))


def test_divergence_ranks_worst():
    diverged = [([0.1] * 4, True)]  # a low loss until it blew up at step 4
    c = compare([(HIGH, False)], diverged, 20)
    assert c["worse_loss"] == math.inf and c["holds"]  # even a high finite loss beats a diverged run
    assert not compare(diverged, [(HIGH, False)], 20)["holds"]
    assert not compare(diverged, diverged, 20)["holds"]


def test_the_lower_mean_final_loss_wins():
    assert compare([(LOW, False)], [(HIGH, False)], 20)["holds"]
    assert not compare([(HIGH, False)], [(LOW, False)], 20)["holds"]
    assert not compare([(LOW, False)], [(LOW, False)], 20)["holds"]  # a tie is not "lower"
    # a missing side (no runs: nan) decides nothing
    assert not compare([], [(HIGH, False)], 20)["holds"]
    assert not compare([(LOW, False)], [], 20)["holds"]
    assert beats(1.0, math.inf) and not beats(math.inf, math.inf) and not beats(1.0, math.nan)


def test_seed_ranges_overlap_flags_noise_but_the_means_decide():
    a = [([1.0] * 20, False), ([3.0] * 20, False)]  # seeds 1 and 3: mean 2
    b = [([2.5] * 20, False), ([2.7] * 20, False)]  # seeds 2.5 and 2.7: mean 2.6
    c = compare(a, b, 20)
    assert c["holds"] and c["seed_ranges_overlap"]
    c = compare([([2.55] * 20, False)], b, 20)
    assert c["holds"] and not c["seed_ranges_overlap"]  # one seed, inside b's range: no range of its own
    assert not compare([([1.0] * 20, False), ([1.2] * 20, False)], b, 20)["seed_ranges_overlap"]  # disjoint
    assert seed_ranges_overlap([1.0, 3.0], [2.0, 2.5])
    assert not seed_ranges_overlap([1.0, 3.0], [2.0, math.inf])  # a diverged seed has no range


def test_comparison_text_reads_the_stored_verdict(tmp_path):
    base = {"better": "a", "worse": "b", "better_label": "A", "worse_label": "B", "horizon": 20,
            "at_shorter_horizon": False}
    path = tmp_path / "summary.json"
    # through JSON, as the report reads it: the diverged (inf) loss is stored as null
    write_json(path, [dict(base, claimed=True, **compare([(LOW, False)], [([9.0], True)], 20)),
                      dict(base, claimed=True, **compare([(HIGH, False)], [(LOW, False)], 20)),
                      dict(base, claimed=False, **compare([(LOW, False)], [(HIGH, False)], 20))])
    won, lost, context = read_json(path)
    assert won["worse_loss"] is None
    assert comparison_text(won) == "the final loss of A (1.5) is below that of B (inf): agrees"
    assert comparison_text(lost) == "the final loss of A (5) is not below that of B (1.5, +233.3%): disagrees"
    assert comparison_text(context).endswith("below that of B (5, -70.0%): context, not a claim of the paper")


def test_run_claims_let_two_processes_share_an_experiment(tmp_path):
    """A live process's claim is respected, our own is re-entrant, a dead process's is taken over."""
    import os
    import platform
    import sys

    path = tmp_path / "simple_seed0.claim"
    assert claim_run(path)
    assert claim_run(path)  # our own claim
    path.unlink()

    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        path.write_text(json.dumps({"pid": live.pid, "host": platform.node()}))
        assert not claim_run(path)
    finally:
        live.kill()
        live.wait()
    assert claim_run(path)  # its owner is gone now
    assert json.loads(path.read_text())["pid"] == os.getpid()

    path.write_text(json.dumps({"pid": live.pid, "host": "another-machine"}))
    assert not claim_run(path)  # we cannot tell whether a process elsewhere is alive


def test_report_quotes_the_remedies_when_present(tmp_path):
    out = tmp_path / "results"
    (out / "remedies" / "mnist-lenet").mkdir(parents=True)
    assert "Beyond the paper's protocol" not in write_report(out, tmp_path / "RESULTS.md").read_text()
    (out / "remedies" / "README.md").write_text("# Remedies\n\nHow these were made.\n")
    (out / "remedies" / "mnist-lenet" / "summary.md").write_text("| variant | loss |\n|---|---|\n| simple | 0.5 |\n")
    text = write_report(out, tmp_path / "RESULTS.md").read_text()
    assert "## Beyond the paper's protocol" in text
    assert "How these were made." in text and "# Remedies" not in text
    assert "`results/remedies/mnist-lenet/summary.md`:" in text and "| simple | 0.5 |" in text
