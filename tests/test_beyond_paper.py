"""Smoke test of examples/beyond_paper.py: a few steps on the two tasks that need no dataset."""

from __future__ import annotations

import importlib.util
import json
import sys
import math
from pathlib import Path

import pytest
import torch

from l2l_optim.nets import SimpleOptimizerNet
from l2l_optim.weights import save_weights

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "beyond_paper.py"


@pytest.fixture(scope="module")
def beyond():
    spec = importlib.util.spec_from_file_location("beyond_paper", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["beyond_paper"] = mod  # dataclasses resolve annotations through sys.modules
    threads = torch.get_num_threads()  # main() sets 1 thread; give the other tests theirs back
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop("beyond_paper", None)
        torch.set_num_threads(threads)


def test_models_and_batches(beyond):
    gen = torch.Generator().manual_seed(0)
    x, y = beyond.addition_batch(gen, 4)
    # a + b = s: the sum digits (reversed) are the only scored targets
    a = int("".join(map(str, x[0, :4].tolist())))
    b = int("".join(map(str, x[0, 5:9].tolist())))
    s = y[0, 9:].tolist()
    assert sum(d * 10**i for i, d in enumerate(s)) == a + b
    assert (y[:, :9] == -100).all()
    assert beyond.TinyTransformer()(x).shape == (4, 14, 12)
    assert beyond.resnet_bn()(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert beyond.autoencoder()(torch.randn(2, 1, 28, 28)).shape == (2, 784)


def test_runs_writes_and_resumes(beyond, tmp_path, capsys):
    torch.manual_seed(0)
    w = save_weights(SimpleOptimizerNet(), tmp_path / "rand.safetensors")
    out = tmp_path / "out"
    argv = ["--steps", "4", "--tasks", "regression", "transformer", "--lrs", "0.1", "0.01",
            "--weights", f"rand={w}", "--out-dir", str(out), "--no-plot"]
    summary = beyond.main(argv)
    for task in ("regression", "transformer"):
        for opt in ("simpleopt-rand", "adam-lr0.1", "adam-lr0.01", "sgd-lr0.1", "sgd-lr0.01"):
            lines = (out / f"{task}_{opt}.csv").read_text().splitlines()
            assert lines[0] == "step,loss" and len(lines) == 5
        e = summary["tasks"][task]
        assert e["adam"]["best_lr"] in (0.1, 0.01)
        assert math.isfinite(e["simple"]["rand"]["final"])
    assert json.loads((out / "summary.json").read_text())["config"]["steps"] == 4
    assert "| transformer |" in (out / "table.md").read_text()
    capsys.readouterr()
    beyond.main(argv)  # everything is loaded, nothing rerun
    assert capsys.readouterr().out.count("(saved)") == 10
