"""Tests for l2l_optim.cli: one program (`l2l-optim`, `python -m l2l_optim`), its commands and help."""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from random_nets import random_simple

import l2l_optim
from l2l_optim import cli, cli_args
from l2l_optim import weights as W
from l2l_optim.meta.fit import build_parser as meta_fit_parser
from l2l_optim.nets import DMOptimizerNet
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


def _all_parsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    own = {name: p for name, p in sub.choices.items() if name not in cli.DELEGATED}
    return {"l2l-optim": parser, **own, **{name: make() for name, make in cli_args.PARSERS.items()}}


def test_every_option_of_every_command_has_help_text():
    parsers = _all_parsers()
    assert set(parsers) == {"l2l-optim", *COMMANDS}
    for name, parser in parsers.items():
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                assert all(c.help for c in action._choices_actions), name
                continue
            assert action.help and action.help != argparse.SUPPRESS, (name, action.dest)
        if name != "l2l-optim":
            assert parser.prog == f"l2l-optim {name}"


# what a command runs parses with the parser its --help shows
def test_the_commands_own_mains_use_the_torch_free_parsers():
    from l2l_optim.meta import es

    assert meta_fit_parser().format_help() == cli_args.meta_fit_parser().format_help()
    assert "meta_es_parser()" in Path(es.__file__).read_text()


# (arguments, exit status): each answered by argparse, before anything imports torch
TORCH_FREE = [
    (["--help"], 0), (["--version"], 0), *[([c, "--help"], 0) for c in COMMANDS], ([], 2),
    (["weigths"], 2), (["info", "--bogus"], 2), (["finetune"], 2),
    (["finetune", "m:f", "mnist", "--out-dir", "o", "--subsample", "2"], 2),
    (["finetune", "m:f", "mnist", "--out-dir", "o", "--trajectories", "0"], 2),
    (["eval"], 2), (["eval", "simple", "--steps", "0"], 2), (["eval", "simple", "--state-dtype", "fp8"], 2),
    (["meta-fit"], 2), (["meta-fit", "--out-dir", "o", "--task", "imagenet"], 2),
    (["meta-es", "--out-dir", "o", "--objective", "best"], 2), (["meta-es", "--pairs", "0"], 2),
]

_PROBE = r"""
import json, sys, time
t0 = time.perf_counter()
from l2l_optim.cli import main
try:
    code = main(json.loads(sys.argv[1]))
except SystemExit as e:
    code = e.code
seconds = time.perf_counter() - t0
print(json.dumps({"code": code, "torch": sorted(m for m in sys.modules if m.split(".")[0] == "torch"),
                  "seconds": seconds}), file=sys.__stderr__)
"""


@pytest.mark.parametrize("argv, code", TORCH_FREE, ids=[" ".join(a) or "nothing" for a, _ in TORCH_FREE])
def test_help_version_and_argument_errors_answer_without_torch(argv, code):
    proc = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(argv)], capture_output=True, text=True,
                          timeout=120, cwd=Path(l2l_optim.__file__).parents[1])
    probe = json.loads(proc.stderr.strip().splitlines()[-1])
    assert probe["code"] == code, proc.stdout + proc.stderr
    assert probe["torch"] == [], f"{argv} imported torch"
    assert probe["seconds"] < 1.0, probe
    assert (proc.stdout if code == 0 else proc.stderr).startswith("usage: l2l-optim") or argv == ["--version"]


def test_the_console_script_answers_help_in_under_a_second():
    script = Path(sys.executable).parent / "l2l-optim"
    if not script.is_file():
        pytest.skip("no l2l-optim console script beside this interpreter")
    proc = subprocess.run([sys.executable, "-X", "importtime", str(script), "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: l2l-optim")
    rows = [line.split("|") for line in proc.stderr.splitlines() if line.startswith("import time:")]
    rows = [(int(cumulative), name) for _, cumulative, name in rows if cumulative.strip().isdigit()]
    imported = {name.strip() for _, name in rows}
    assert "l2l_optim.cli" in imported and "torch" not in imported
    # the top-level imports (one space before the name) add up to the whole import time
    cumulative_us = sum(us for us, name in rows if not name.startswith("  "))
    assert cumulative_us < 1_000_000  # top-level imports, in microseconds


# the names the torch-free parsers offer, and their defaults, are those of the modules that run them
def test_the_torch_free_parsers_match_their_sources():
    from l2l_optim.meta.es_config import ESConfig
    from l2l_optim.meta.families import FAMILIES
    from l2l_optim.meta.fit import MetaFitConfig
    from l2l_optim.meta.losses import META_LOSSES
    from l2l_optim.meta.population import OBJECTIVES
    from l2l_optim.meta.init_rules import INITS
    from l2l_optim.registry import ARCHITECTURES
    from l2l_optim.tasks import TASKS

    assert cli_args.ARCHITECTURES == tuple(sorted(ARCHITECTURES))
    assert cli_args.META_FIT_TASKS == tuple(sorted(TASKS))
    assert cli_args.INITS == INITS and cli_args.META_LOSSES == META_LOSSES
    assert cli_args.OBJECTIVES == tuple(sorted(OBJECTIVES)) and cli_args.FAMILIES == FAMILIES
    fit = vars(cli_args.meta_fit_parser().parse_args(["--out-dir", "o"]))
    config = dataclasses.asdict(MetaFitConfig())
    shared = set(fit) & set(config)
    assert {"arch", "task", "meta_loss", "trajectories", "steps", "unroll", "meta_lr", "grad_clip", "init",
            "init_lr", "batch_size", "seed", "eval_every", "eval_steps"} <= shared
    assert {k: fit[k] for k in shared} == {k: config[k] for k in shared}
    es = vars(cli_args.meta_es_parser().parse_args(["--out-dir", "o"]))
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(ESConfig()).items()}
    assert set(config) <= set(es)
    assert {k: es[k] for k in config} == config


def test_eval_quick_is_a_first_look_and_the_full_run_is_unchanged():
    quick = cli_args.parse_eval(["simple", "--quick"])
    assert (quick.tasks, quick.steps, quick.horizons) == (list(cli_args.QUICK_TASKS), 300, [300])
    given = cli_args.parse_eval(["simple", "--quick", "--steps", "1000", "--tasks", "mnist-cnn"])
    assert (given.tasks, given.steps, given.horizons) == (["mnist-cnn"], 1000, [300])
    full = cli_args.parse_eval(["simple"])
    assert (full.tasks, full.steps, full.horizons, full.quick) == (None, 5000, [1000, 5000], False)
    other_suite = cli_args.parse_eval(["simple", "--quick", "--suite", "mine"])
    assert other_suite.tasks is None  # the quick task names belong to the default suite
    from l2l_optim.evaluation.suite import default_suite

    costly = {t.name for t in default_suite() if t.max_steps is not None}
    assert set(cli_args.QUICK_TASKS) <= {t.name for t in default_suite()} - costly


def test_eval_quick_runs_the_cheap_tasks_and_refuses_unknown_names_before_running(monkeypatch, tmp_path, capsys):
    from l2l_optim.evaluation import report

    calls = []

    def fake_evaluate(weights, **kwargs):
        calls.append(kwargs)
        raise OSError("stop here")

    monkeypatch.setattr(report, "evaluate", fake_evaluate)
    assert cli.main(["eval", "simple", "--quick", "--out-dir", str(tmp_path)]) == 1  # a failure while running
    (kwargs,) = calls
    assert kwargs["tasks"] == list(cli_args.QUICK_TASKS) and kwargs["steps"] == 300
    assert kwargs["horizons"] == [300] and kwargs["quick"] is True
    assert capsys.readouterr().err == "l2l-optim eval: error: stop here\n"
    for argv, message in ((["simple", "--tasks", "no-such-task"], "unknown tasks ['no-such-task']"),
                          (["no-such-weights"], "unknown weights 'no-such-weights'"),
                          (["simple", "--suite", "nope"], "unknown suite 'nope'")):
        with pytest.raises(SystemExit) as e:
            cli.main(["eval", *argv, "--out-dir", str(tmp_path)])
        assert e.value.code == 2 and message in capsys.readouterr().err
    assert len(calls) == 1


_VALID = {"meta-fit": ["--out-dir", "x"], "eval": ["simple", "--quick"], "meta-es": ["--out-dir", "x"]}


@pytest.mark.parametrize("command", sorted(cli.DELEGATED))
def test_delegated_commands_hand_their_arguments_to_module_main(monkeypatch, command):
    calls = []
    fake = types.ModuleType("fake")
    fake.main = lambda argv: calls.append(argv) or 7
    monkeypatch.setitem(sys.modules, cli.DELEGATED[command][0], fake)
    assert cli.main([command, *_VALID[command]]) == 7
    assert calls == [_VALID[command]]
    with pytest.raises(SystemExit) as e:  # the help, from the torch-free parser
        cli.main([command, "--help"])
    assert e.value.code == 0 and calls == [_VALID[command]]


def test_a_delegated_command_whose_module_is_missing_says_so(monkeypatch, capsys):
    monkeypatch.setitem(cli.DELEGATED, "eval", ("l2l_optim.no_such_module", "evaluate"))
    assert cli.main(["eval", "simple"]) == 2
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


def test_info_lists_files_with_deeply_nested_or_unreadable_metadata(registry, capsys):
    pkg, _ = registry
    deep = "[" * 200_000 + "]" * 200_000
    save_weights(random_simple(), pkg / "nested.safetensors", metadata={"recipe": deep})
    save_weights(random_simple(), pkg / "finetuned.safetensors", metadata={"finetune": deep})
    torch.save(random_simple().state_dict(), pkg / "pickled.safetensors")
    assert cli.main(["info"]) == 0
    row = rows(capsys.readouterr().out.split("\n\n")[1].split("\n", 1)[1])
    assert row["nested"][1:3] == ["simple", "132"] and row["finetuned"][-1] == "?"
    assert "not a safetensors file (a zip archive, e.g. a torch.save pickle)" in " ".join(row["pickled"])


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


@pytest.mark.parametrize("model, data, extra, message", [
    ("no_colon", "mnist", [], "MODEL must be module:factory or path/to/file.py:factory, got 'no_colon'"),
    ("no_such_module_xyz:make", "mnist", [], "MODEL 'no_such_module_xyz:make': cannot import 'no_such_module_xyz'"),
    ("{tmp}/tiny_models.py:absent", "mnist", [], "tiny_models.py has no callable 'absent'"),
    ("{tmp}/tiny_models.py:make", "{tmp}/nowhere", [],
     "DATA must be one of mnist, fashion-mnist or an ImageFolder directory"),
    ("{tmp}/tiny_models.py:make", "{tmp}/images", ["--weights", "no-such-weights"],
     "--weights: unknown weights 'no-such-weights'"),
])
def test_finetune_usage_errors_are_one_line_and_exit_2(image_folder, tmp_path, capsys, model, data, extra, message):
    code = cli.main(["finetune", model.format(tmp=tmp_path), data.format(tmp=tmp_path),
                     "--out-dir", str(tmp_path / "out"), "--quiet", *extra])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("l2l-optim finetune: error: ") and message in err
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()


def test_a_finetune_that_fails_while_running_exits_1(image_folder, tmp_path, capsys):
    (tmp_path / "meta_models.py").write_text(
        "import torch, torch.nn as nn\n\n"
        "def make():\n"
        "    with torch.device('meta'):\n"
        "        return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))\n"
    )
    code = cli.main(["finetune", f"{tmp_path / 'meta_models.py'}:make", str(image_folder),
                     "--out-dir", str(tmp_path / "out"), "--quiet", "--subsample", "0.5", "--batch-size", "8"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("l2l-optim finetune: error: ") and "'1.weight'" in err, err
    assert err.count("\n") == 1
