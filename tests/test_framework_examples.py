"""The framework examples run: examples/hf_trainer.py (Hugging Face Trainer) and
examples/lightning_train.py (Lightning), each a few steps in a subprocess, where their packages
are installed (neither is a dependency of l2l-optim)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _needs(*modules: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (not a dependency of l2l-optim)")


def _run(script: str, *args: str) -> tuple[float, float]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    found = re.search(r"([0-9.]+) before, ([0-9.]+) after", proc.stdout)
    assert found, proc.stdout
    return float(found.group(1)), float(found.group(2))


def test_the_hugging_face_trainer_example_trains(tmp_path):
    _needs("transformers", "accelerate")
    before, after = _run("hf_trainer.py", "--steps", "40", "--out-dir", str(tmp_path / "out"))
    assert after < 0.8 * before, (before, after)


def test_the_lightning_example_trains():
    _needs("lightning")
    before, after = _run("lightning_train.py", "--steps", "100")
    assert after < 0.8 * before, (before, after)


def test_the_examples_say_how_to_install_what_they_need():
    for script, install in (("hf_trainer.py", "pip install 'transformers[torch]'"),
                            ("lightning_train.py", "pip install lightning")):
        text = (ROOT / "examples" / script).read_text()
        assert text.count(install) >= 2, script  # in the docstring and in the message on ImportError
