"""Tests for l2l_optim.cli: one program (`l2l-optim`, `python -m l2l_optim`), its commands and help."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from random_nets import random_simple

import l2l_optim
from l2l_optim import cli
from l2l_optim import weights as W
from l2l_optim.meta.fit import build_parser as meta_fit_parser
from l2l_optim.nets import DMOptimizerNet, SimpleOptimizerNet
from l2l_optim.optimizer import SimpleOptimizer
from l2l_optim.weights import fingerprint, save_weights

COMMANDS = ["info", "finetune", "meta-fit", "eval", "meta-es"]


@pytest.fixture
def registry(tmp_path, monkeypatch):
    """Two shipped-weights directories (the package one shadows the repository one) and an
    empty Hugging Face cache."""
    pkg, repo = tmp_path / "_weights", tmp_path / "weights"
    pkg.mkdir()
    repo.mkdir()
    monkeypatch.setattr(W, "weights_dirs", lambda: [pkg, repo])
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    return pkg, repo


def rows(block: str) -> dict[str, list[str]]:
    return {line.split()[0]: line.split() for line in block.strip().splitlines()[1:]}


# -------------------------------------------------------------------------- the program


def test_no_arguments_print_the_commands_and_fail(capsys):
    assert cli.main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: l2l-optim [-h] [--version] <command> ...")
    assert err.rstrip().endswith("l2l-optim: error: a command is required")
    listed = [line.split()[0] for line in err.splitlines() if line.startswith("    ") and line[4] != " "]
    assert listed == COMMANDS
    assert "``" not in err


def test_version_and_one_program_under_both_names(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    version = capsys.readouterr().out.strip()
    assert version.startswith(f"l2l-optim {l2l_optim.__version__} (torch {torch.__version__}, Python ")
    proc = subprocess.run([sys.executable, "-m", "l2l_optim", "--version"], capture_output=True, text=True,
                          timeout=120, env={"PYTHONPATH": str(Path(l2l_optim.__file__).parents[1]),
                                            "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0 and proc.stdout.strip() == version, proc.stderr


def test_an_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["weigths"])
    assert e.value.code == 2
    assert "invalid choice: 'weigths'" in capsys.readouterr().err


def _own_parsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    own = {name: p for name, p in sub.choices.items() if name not in cli.DELEGATED}
    return {"l2l-optim": parser, **own, "meta-fit": meta_fit_parser()}


def test_every_option_has_help_text():
    parsers = _own_parsers()
    assert set(parsers) == {"l2l-optim", "info", "finetune", "meta-fit"}
    for name, parser in parsers.items():
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                assert all(c.help for c in action._choices_actions), name
                continue
            assert action.help and action.help != argparse.SUPPRESS, (name, action.dest)
    assert meta_fit_parser().prog == "l2l-optim meta-fit"


@pytest.mark.parametrize("command", sorted(cli.DELEGATED))
def test_delegated_commands_hand_their_arguments_to_module_main(monkeypatch, command):
    calls = []
    fake = types.ModuleType("fake")
    fake.main = lambda argv: calls.append(argv) or 7
    monkeypatch.setitem(sys.modules, cli.DELEGATED[command][0], fake)
    assert cli.main([command, "--flag", "x", "--help"]) == 7
    assert calls == [["--flag", "x", "--help"]]


def test_a_delegated_command_whose_module_is_missing_says_so(monkeypatch, capsys):
    monkeypatch.setitem(cli.DELEGATED, "eval", ("l2l_optim.no_such_module", "evaluate"))
    assert cli.main(["eval"]) == 2
    assert capsys.readouterr().err == (
        "l2l-optim eval: not available in this installation (no module l2l_optim.no_such_module)\n"
    )


# ---------------------------------------------------------------------------------- info


def test_info_lists_shipped_and_cached_weights(registry, capsys, tmp_path):
    pkg, repo = registry
    save_weights(random_simple(16), pkg / "simple.safetensors", metadata={"recipe": "x" * 100})
    save_weights(DMOptimizerNet(hidden_size=3), repo / "dm.safetensors", metadata={"recipe": "dm recipe"})
    recipe = {"arch": "simple", "net_config": {"bias": True}, "task": "mnist-mlp",
              "loss": "uniform", "trajectories": 20, "batch_size": 128}
    save_weights(random_simple(bias=True), repo / "simple-bias.safetensors", metadata={"recipe": recipe})
    (repo / "broken.safetensors").write_bytes(b"\x01")
    snapshot = tmp_path / "hf-cache" / "models--me--opt" / "snapshots" / ("0" * 40)
    save_weights(random_simple(17), snapshot / "weights.safetensors", metadata={"recipe": "cached one"})
    save_weights(random_simple(18), snapshot / "not-ours.bin")  # not a .safetensors name: ignored
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)

    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    version, shipped, cached = out.split("\n\n")
    assert version.startswith(f"l2l-optim {l2l_optim.__version__}")
    kernel = version.splitlines()[1]
    from l2l_optim.kernels.cpu import kernel_info

    info = kernel_info()
    if info["available"]:  # e.g. "fused CPU kernel: avx512 (this CPU runs avx512, avx2, baseline), ..."
        assert kernel.startswith(f"fused CPU kernel: {info['isa']} (this CPU runs ")
        assert kernel.endswith(f"library {info['path']}")
    else:
        assert kernel.startswith("fused CPU kernel: unavailable (")
    assert shipped.splitlines()[0] == f"shipped weights ({pkg}, {repo}):"
    assert shipped.splitlines()[1].split()[:4] == ["name", "arch", "params", "fingerprint"]
    row = rows(shipped.split("\n", 1)[1])
    assert row["simple"][1:4] == ["simple", "132", fingerprint(random_simple(16))]
    assert row["dm"][1:3] == ["dm", str(DMOptimizerNet(hidden_size=3).num_parameters())]
    assert "dm recipe" in shipped
    assert row["simple"][-1].endswith("...")  # long recipes are shortened
    assert "error" in " ".join(row["broken"])
    assert row["simple-bias"][4:] == ['{"bias":true}', "task=mnist-mlp", "loss=uniform", "trajectories=20"]
    assert cached.splitlines()[0] == f"l2l-optim weights in the local Hugging Face cache ({tmp_path / 'hf-cache'}):"
    crow = rows(cached.split("\n", 1)[1])
    assert list(crow) == ["hf://me/opt/weights.safetensors"]
    assert crow["hf://me/opt/weights.safetensors"][3] == fingerprint(random_simple(17))


def test_info_json_and_nothing_to_list(registry, capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "shipped weights" in out and out.count("  none") == 2
    pkg, _ = registry
    save_weights(random_simple(), pkg / "simple.safetensors")
    assert cli.main(["info", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["shipped"]["simple"]["arch"] == "simple" and listed["cached"] == {}
    from l2l_optim.kernels.cpu import kernel_info

    assert listed["cpu_kernel"] == kernel_info()


# ------------------------------------------------------------------------------ finetune


@pytest.fixture
def image_folder(tmp_path):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    root = tmp_path / "images"
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(40):
            pixels = (torch.rand(8, 8, 3, generator=g) * 255).to(torch.uint8)
            if label == "b":
                pixels[:4] = 255  # class b is brighter on top
            Image.fromarray(pixels.numpy()).save(root / label / f"{i}.png")
    (tmp_path / "tiny_models.py").write_text(
        "import torch.nn as nn\n\n"
        "def make():\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))\n"
    )
    return root


def test_finetune_on_an_image_folder_writes_weights_card_and_plot(image_folder, tmp_path, capsys):
    pytest.importorskip("torchvision")
    out = tmp_path / "out"
    code = cli.main(["finetune", f"{tmp_path / 'tiny_models.py'}:make", str(image_folder), "--out-dir", str(out),
                     "--subsample", "0.5", "--batch-size", "8", "--trajectories", "2", "--unroll", "2",
                     "--max-unrolls", "1", "--quiet"])
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "finetune.png", "weights.safetensors"]
    assert (out / "finetune.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = capsys.readouterr().out
    assert f'use: SimpleOptimizer.from_pretrained("{out}", model.parameters())' in text
    opt = SimpleOptimizer.from_pretrained(out, [torch.zeros(2, requires_grad=True)])
    assert '"model": "Sequential"' in (out / "README.md").read_text()
    assert opt.meta_fingerprint == json.loads(json.dumps(W.load_weights(out).fingerprint))


@pytest.mark.parametrize("model, data, message", [
    ("no_colon", "mnist", "MODEL must be module:factory or path/to/file.py:factory, got 'no_colon'"),
    ("no_such_module_xyz:make", "mnist", "MODEL 'no_such_module_xyz:make': cannot import 'no_such_module_xyz'"),
    ("{tmp}/tiny_models.py:absent", "mnist", "tiny_models.py has no callable 'absent'"),
    ("{tmp}/tiny_models.py:make", "{tmp}/nowhere",
     "DATA must be one of mnist, fashion-mnist or an ImageFolder directory"),
])
def test_finetune_input_errors_are_one_line(image_folder, tmp_path, capsys, model, data, message):
    code = cli.main(["finetune", model.format(tmp=tmp_path), data.format(tmp=tmp_path),
                     "--out-dir", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("l2l-optim finetune: error: ") and message in err
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()
