"""Tests for l2l_optim.reproduce: every experiment end to end on tiny fake data, resuming, the report.

Shipped weights are used where they exist; where they do not, ``--allow-random-weights``
substitutes untrained nets, so the real code path runs either way. The fast tests use a few
steps (and fig5b runs its protocol on LeNet); the ``slow`` ones run the brief's
``--steps 20 --seeds 1`` on every experiment, fig5b on the real ResNet.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from fake_idx import make_fake_datasets
from l2l_optim import reproduce as R
from l2l_optim.reproduce import EXPERIMENTS, final_window, main, read_curve

TINY = ["--seeds", "1", "--batch-size", "32", "--subsample", "0.5", "--episodes", "1", "--max-unrolls", "2",
        "--steps-per-unroll", "3", "--search-steps", "3", "--allow-random-weights", "--quiet"]


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
        if record["diverged"]:
            assert e["diverged"] == 1
            continue
        assert len(curve) == steps
        w = final_window(steps)
        assert e["final_loss"]["mean"] == pytest.approx(sum(curve[-w:]) / w, rel=1e-5)
        assert 0.0 <= e["test_acc"]["mean"] <= 1.0
        if o.kind in ("sgd", "adam"):
            assert e["lr"] in (1.0, 0.1, 0.01, 0.001)
            assert e["lr"] == summary["lr_search"][o.kind]["best_lr"]
    assert len(summary["comparisons"]) == len(exp.claims)
    for c in summary["comparisons"]:
        assert isinstance(c["holds"], bool)
        assert R.comparison_text(c).endswith(("agrees", "disagrees", "context, not a claim of the paper"))
    if exp.finetune:
        assert (exp_dir / "finetuned.safetensors").exists()
        assert summary["finetune"]["log"][0]["unrolls"] >= 1
        assert "subsample" in summary["lr_search"]["sgd"]["data"]
    return summary


FAST = [
    ("fig3", []),
    ("fig4a", []),
    ("fig4b", []),
    ("fig5a", []),
    ("fig5b", ["--task", "fmnist-lenet"]),  # fig5b's protocol on a small model
]


@pytest.mark.parametrize("name,extra", FAST, ids=[n for n, _ in FAST])
def test_experiment_runs_end_to_end(tmp_path, data_root, name, extra):
    out = run(tmp_path, data_root, name, "--steps", "3", *extra)
    check_experiment(out, name, 3)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in R.ALL if n != "table1"])
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
                   "## Agreement with the paper", "python -m l2l_optim.reproduce fig3", "![fig3](results/fig3/fig3.png)", "Not run yet: table1, fig2",
                   "| optimizer | steps | seeds |", "Learning-rate search", "Fine-tuning: 1 episodes"):
        assert needle in text, needle
    assert "checked claims agree" in text
    summary = json.loads((out / "fig3" / "summary.json").read_text())
    if summary["random_weights"]:
        assert "smoke-test numbers" in text
    # the report's comparison lines are the ones the summaries hold
    for c in summary["comparisons"]:
        assert R.comparison_text(c) in text


def test_all_and_unknown_experiments(tmp_path, data_root, monkeypatch):
    ran = []
    monkeypatch.setattr(R, "run_experiment", lambda name, s: ran.append(name))
    main(["all", "--out", str(tmp_path / "results"), "--report", str(tmp_path / "R.md"), "--quiet"])
    assert ran == list(R.ALL) and (tmp_path / "R.md").exists()
    with pytest.raises(SystemExit):
        main(["fig9", "--quiet"])


def test_missing_weights_need_the_explicit_flag():
    with pytest.raises(SystemExit, match="allow-random-weights"):
        R.resolve_weights("no-such-weights", allow_random=False)
    with pytest.raises(ValueError, match="unknown weights"):
        R.resolve_weights("no-such-weights", allow_random=True)
    _, info = R.resolve_weights("simple-noagg", allow_random=True)
    assert info["arch"] == "simple"


def test_final_window_and_loss_at():
    assert final_window(10_000) == 500
    assert final_window(2000) == 200
    assert final_window(20) == 2
    assert final_window(3) == 1
    curves = [[4.0, 3.0, 2.0, 1.0] * 5]
    assert R.loss_at(curves, [{}], 20) == pytest.approx(1.5)  # the last 2 of 20
    assert R.loss_at([[1.0] * 5], [{"diverged": True}], 20) == float("inf")


def test_comparison_treats_divergence_as_worst():
    c = {"better_label": "A", "worse_label": "B", "better_loss": 0.1, "worse_loss": None, "holds": True,
         "claimed": True, "horizon": 10}
    assert R.comparison_text(c) == "the final loss of A (0.1) is below that of B (inf): agrees"


def test_git_commit_commits_only_the_given_paths(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    for k, v in (("user.email", "t@example.com"), ("user.name", "t")):
        subprocess.run(["git", "config", k, v], cwd=repo, check=True)
    (repo / "results").mkdir()
    (repo / "results" / "a.csv").write_text("step,train_loss\n")
    (repo / "other.txt").write_text("x")
    monkeypatch.chdir(repo)
    assert R.git_commit([repo / "results"], "results: test")
    tracked = subprocess.run(["git", "ls-files"], cwd=repo, capture_output=True, text=True).stdout.split()
    assert tracked == ["results/a.csv"]
    assert not R.git_commit([repo / "results"], "nothing new")


def test_run_claims_let_two_processes_share_an_experiment(tmp_path):
    """A live process's claim is respected, our own is re-entrant, a dead process's is taken over."""
    import os
    import platform
    import sys

    path = tmp_path / "simple_seed0.claim"
    assert R.claim_run(path)
    assert R.claim_run(path)  # our own claim
    path.unlink()

    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        path.write_text(json.dumps({"pid": live.pid, "host": platform.node()}))
        assert not R.claim_run(path)
    finally:
        live.kill()
        live.wait()
    assert R.claim_run(path)  # its owner is gone now
    assert json.loads(path.read_text())["pid"] == os.getpid()

    path.write_text(json.dumps({"pid": live.pid, "host": "another-machine"}))
    assert not R.claim_run(path)  # we cannot tell whether a process elsewhere is alive


def test_report_quotes_the_remedies_when_present(tmp_path):
    out = tmp_path / "results"
    (out / "remedies" / "mnist-lenet").mkdir(parents=True)
    assert "Beyond the paper's protocol" not in R.write_report(out, tmp_path / "RESULTS.md").read_text()
    (out / "remedies" / "README.md").write_text("# Remedies\n\nHow these were made.\n")
    (out / "remedies" / "mnist-lenet" / "summary.md").write_text("| variant | loss |\n|---|---|\n| simple | 0.5 |\n")
    text = R.write_report(out, tmp_path / "RESULTS.md").read_text()
    assert "## Beyond the paper's protocol" in text
    assert "How these were made." in text and "# Remedies" not in text
    assert "`results/remedies/mnist-lenet/summary.md`:" in text and "| simple | 0.5 |" in text
