"""Smoke test of examples/transfer_remedies.py on tiny fake MNIST."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from fake_idx import make_fake_datasets

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "transfer_remedies.py"


def test_variants_run_resume_and_schedule_the_lr(tmp_path):
    # 2,600 examples: the 5% fine-tuning subsample holds one batch of 128
    root = make_fake_datasets(tmp_path / "data", n_train=2600)
    out = tmp_path / "out"
    cmd = [sys.executable, str(SCRIPT), "--steps", "6", "--out-dir", str(out), "--data-root", str(root),
           "--variants", "simple", "simple-finetuned-cosine", "sgd-cosine"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "Seems like `optimizer.step()` has been overridden" not in first.stderr
    for v in ("simple", "simple-finetuned-cosine", "sgd-cosine"):
        rec = json.loads((out / f"{v}_seed0.json").read_text())
        assert rec["settings"]["steps"] == 6 and not rec["diverged"]
        assert len((out / f"{v}_seed0.csv").read_text().splitlines()) == 7  # header + 6 steps
    assert (out / "finetuned.safetensors").exists()
    table = (out / "summary.md").read_text()
    assert "| simple-finetuned-cosine |" in table
    # a second run with the same settings loads every run instead of training again
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "s0:" not in again.stderr
