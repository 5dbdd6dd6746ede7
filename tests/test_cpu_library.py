"""Loading the fused CPU kernel's library: which one loads, the developer build, the messages.

The library is installed beside ``kernels/cpu.py`` (``pip install``, ``hatch_build.py``) or
compiled into the developer cache from a checkout (``kernels/_cpu_library.py``). These tests
take the loader through each case: a matching installed library, a stale one, none (a copy
of the package, compiled once into a fresh cache), no compiler, an unwritable cache, the
kernel disabled. ``tests/test_wheel.py`` checks the installed wheel end to end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from l2l_optim import kernels
from l2l_optim.kernels import resolve_impl
from l2l_optim.kernels._build import LIB_NAME as LIB
from l2l_optim.nets import SimpleOptimizerNet

def weights_for():
    return SimpleOptimizerNet().fused_weights()


def test_unavailable_cpu_kernel_falls_back_with_one_warning():
    # a fresh process in which the extension "fails to build"
    code = (
        "import warnings, torch\n"
        "from l2l_optim.kernels import resolve_impl\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    assert resolve_impl('auto', 'cpu') == 'reference'\n"
        "    assert resolve_impl('auto', 'cpu') == 'reference'\n"
        "msgs = [str(x.message) for x in w]\n"
        "assert len(msgs) == 1 and 'fused CPU kernel unavailable' in msgs[0], msgs\n"
        "assert '\\n' not in msgs[0]\n"
        "try:\n"
        "    resolve_impl('cpu', 'cpu')\n"
        "except RuntimeError as e:\n"
        "    assert 'L2L_OPTIM_NO_CPU_KERNEL' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('forced impl=cpu did not raise')\n"
        "print('ok')\n"
    )
    env = dict(os.environ, L2L_OPTIM_NO_CPU_KERNEL="1")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout + proc.stderr


def _fresh_loader(monkeypatch):
    """The library loader as if nothing were loaded yet (monkeypatch restores the real state)."""
    from l2l_optim.kernels import _cpu_library as loader

    for name, value in (("_tried", False), ("_lib", None), ("_lib_path", None),
                        ("_lib_origin", None), ("_error", None), ("_advice", None)):
        monkeypatch.setattr(loader, name, value)
    monkeypatch.setattr(kernels, "_CPU_OK", None)
    monkeypatch.delenv(loader.DISABLE_ENV, raising=False)
    monkeypatch.delenv(loader.ISA_ENV, raising=False)
    return loader


def test_build_failure_is_reported_not_raised(monkeypatch):
    # a broken compiler: is_available() is False, build_error() says why, the forced path raises
    loader = _fresh_loader(monkeypatch)
    from l2l_optim.kernels import cpu
    from l2l_optim.kernels._build import BuildError

    def broken():
        raise BuildError("c++ -O3 ... simple_cpu.cpp\nc++: fatal error: command not found")

    monkeypatch.setattr(loader, "_find_or_build", broken)
    assert cpu.is_available() is False
    assert cpu.build_error() == "c++: fatal error: command not found"
    assert cpu.kernel_info() == {"available": False, "error": cpu.build_error(),
                                 "advice": cpu.build_advice()}
    with pytest.raises(RuntimeError, match="unavailable"):
        cpu.simple_update_cpu([], [], [], [], weights_for())


def _checkout_without_library(tmp_path) -> Path:
    """A copy of the package with its sources and no built library, as a fresh clone has."""
    import shutil

    import l2l_optim

    dst = tmp_path / "checkout" / "l2l_optim"
    shutil.copytree(Path(l2l_optim.__file__).parent, dst,
                    ignore=shutil.ignore_patterns("__pycache__", LIB, "*.tmp"))
    return dst.parent


def test_a_missing_compiler_gives_one_short_warning_that_names_it(tmp_path):
    """A checkout without a built library, an empty kernel cache and a PATH without a C++
    compiler, as on a bare machine: one short line that names the compiler, and no CUDA talk."""
    code = (
        "import warnings, torch\n"
        "from l2l_optim import SimpleOptimizer\n"
        "from l2l_optim.nets import SimpleOptimizerNet\n"
        "net = SimpleOptimizerNet()\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    SimpleOptimizer([torch.zeros(3, requires_grad=True)], weights=net)\n"
        "print('WARNINGS', [str(w.message) for w in caught])\n"
        "try:\n"
        "    SimpleOptimizer([torch.zeros(3, requires_grad=True)], weights=net, impl='cpu')\n"
        "except RuntimeError as e:\n"
        "    print('FORCED', e)\n"
    )
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path), "L2L_OPTIM_KERNEL_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": str(_checkout_without_library(tmp_path)), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    assert out[0] == ("WARNINGS ['l2l_optim: fused CPU kernel unavailable (c++: not found); using the "
                      "slower reference update']")
    assert out[1] == ("FORCED impl='cpu' is unavailable: c++: not found; it needs a C++ compiler "
                      "(c++, or the one $CXX names). Use impl='auto' (falls back to the "
                      "reference) or impl='reference'.")
    assert "CUDA" not in proc.stderr


def test_an_unwritable_kernel_cache_is_named_not_the_compiler(monkeypatch):
    loader = _fresh_loader(monkeypatch)

    def read_only():
        # what compile_library raises when it cannot create the cache directory
        raise OSError(30, "Read-only file system", "/ro/l2l_optim/kernels/simple_cpu-0123")

    monkeypatch.setattr(loader, "_find_or_build", read_only)
    with pytest.raises(RuntimeError) as e:
        resolve_impl("cpu", "cpu")
    assert str(e.value) == (
        "impl='cpu' is unavailable: cannot write the kernel cache (Read-only file system: "
        "/ro/l2l_optim/kernels/simple_cpu-0123); set L2L_OPTIM_KERNEL_CACHE to a writable "
        "directory. Use impl='auto' (falls back to the reference) or impl='reference'."
    )
    assert "compiler" not in str(e.value)


def test_the_installed_library_is_used_when_it_matches_its_sources(tmp_path, monkeypatch):
    # an editable install whose sources changed since its library was built compiles a fresh
    # one into the cache instead of running stale code; an unchanged one loads as installed
    loader = _fresh_loader(monkeypatch)
    if not (loader.HERE / LIB).exists():
        pytest.skip("no installed library here (the package was not installed with pip)")
    import shutil

    from l2l_optim.kernels import _build

    pkg = _checkout_without_library(tmp_path) / "l2l_optim" / "kernels"
    shutil.copy(loader.HERE / LIB, pkg / LIB)
    monkeypatch.setattr(loader, "HERE", pkg)
    monkeypatch.setenv("L2L_OPTIM_KERNEL_CACHE", str(tmp_path / "cache"))
    built = []

    def compile_library(out, directory=None):  # the real library, without a compiler run
        built.append(Path(out))
        Path(out).parent.mkdir(parents=True)
        shutil.copy(pkg / LIB, out)

    monkeypatch.setattr(_build, "compile_library", compile_library)
    assert _build.library_hash(pkg / LIB) == _build.source_hash(pkg)
    assert _build.library_hash(pkg / "simple_cpu.cpp") is None  # no hash in it
    assert _build.library_hash(pkg / "missing.so") is None
    _, path, origin = loader._find_or_build()
    assert (path, origin, built) == (pkg / LIB, "installed", [])
    with open(pkg / "simple_cpu_isa.h", "a") as f:
        f.write("// edited\n")
    _, path, origin = loader._find_or_build()
    assert origin == "jit cache" and built == [path]
    assert path.parent.parent == tmp_path / "cache"


def test_the_developer_path_compiles_once_per_checkout_into_the_cache(tmp_path):
    """A checkout without a library compiles one into the cache on first use, in a directory
    of its own (named by sources, flags, compiler and the package's path); a later process
    loads it from there and writes nothing, so a read-only cache that holds it works."""
    checkout = _checkout_without_library(tmp_path)
    cache = tmp_path / "cache"
    code = "import json\nfrom l2l_optim.kernels import cpu\nprint(json.dumps(cpu.kernel_info()))\n"
    env = dict(os.environ, L2L_OPTIM_KERNEL_CACHE=str(cache), PYTHONPATH=str(checkout),
               OMP_NUM_THREADS="1")
    env.pop("L2L_OPTIM_CPU_ISA", None)
    runs = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
        info = json.loads(proc.stdout.splitlines()[-1])
        files = {p: p.stat().st_mtime_ns for p in cache.rglob("*")}
        runs.append((info, files))
    (first, files1), (second, files2) = runs
    assert first["available"] and first["origin"] == "jit cache", first
    assert Path(first["path"]).parent.parent == cache and Path(first["path"]).exists()
    assert second == first and files2 == files1  # loaded, nothing written
    assert [p.name for p in files1 if p.is_file()] == [LIB]
    # this checkout's directory is not the one the package under test would use
    from l2l_optim.kernels import _build
    from l2l_optim.kernels import _cpu_library as loader

    mine = loader._cache_path(_build.source_hash(loader.HERE))
    assert Path(first["path"]).parent.name != mine.parent.name


def test_kernel_info_names_the_library_and_its_instruction_set():
    from l2l_optim.kernels import cpu

    if not cpu.is_available():
        pytest.skip(f"fused CPU kernel unavailable: {cpu.build_error()}")

    info = cpu.kernel_info()
    assert info["available"] and Path(info["path"]).is_file()
    assert info["origin"] in ("installed", "jit cache")
    if not os.environ.get(cpu.ISA_ENV):
        assert info["isa"] == info["supported"][0]  # the best one
    assert set(info["supported"]) <= {"avx512", "avx2", "baseline"}
    assert info["supported"][-1] == "baseline"
    with pytest.raises(ValueError, match="not one this CPU runs"):
        cpu.select_isa("sse1")


def _disassembly(path: str, function: str) -> list[str] | None:
    """The instructions of ``function`` (a demangled name prefix) in the library, or None
    where objdump is missing or the symbol is not there (another compiler or architecture)."""
    import shutil

    objdump = shutil.which("objdump")
    if objdump is None:
        return None
    out = subprocess.run([objdump, "-d", "--no-show-raw-insn", "-C", path], capture_output=True,
                         text=True, check=False).stdout
    lines, inside = [], False
    for line in out.splitlines():
        if line.endswith(">:"):  # a symbol's first line
            inside = function in line
            continue
        if inside:
            lines.append(line)
    return lines or None


# Machine-code checks (opt-in with the slow tests): the results are the same either way, so
# only the instructions tell whether the loops are vectorised and division-free. Read from the
# file, so a copy is checked on machines that cannot run it, too.

# each copy's loop for fp32 compute and the default hidden size: the intrinsics loop in the
# vector copies, GCC's vectorisation of the portable loop in the baseline
_DEFAULT_LOOP = {"avx512": "l2l::avx512::pass1_simd<{state}>",
                 "avx2": "l2l::avx2::pass1_simd<{state}>",
                 "baseline": "l2l::baseline::pass1_fixed<10, float, {state}>"}
_PACKED = {"avx512": r"\sv(fmadd|fnmadd|mul)\w*ps\s.*zmm", "avx2": r"\sv(fmadd|fnmadd|mul)\w*ps\s.*ymm",
           "baseline": r"\smulps\s"}


@pytest.mark.slow
@pytest.mark.parametrize("state", ["float", "unsigned short"])  # fp32, bf16 hidden state
@pytest.mark.parametrize("isa", ["avx512", "avx2", "baseline"])
def test_the_default_loops_are_vectorised_and_division_free(isa, state):
    # With trapping math GCC keeps the tanh's clamp as a branch and the SSE2 copy of the fp32
    # loop scalar (2.2x slower): the build flags must let it vectorise. The tanh's quotient
    # comes from a reciprocal estimate: no division instruction, packed or scalar, in the loop.
    import re

    from l2l_optim.kernels import cpu

    if resolve_impl("auto", "cpu") != "cpu":
        pytest.skip("no CPU kernel in this build")
    code = _disassembly(cpu.kernel_info()["path"], _DEFAULT_LOOP[isa].format(state=state))
    if code is None:
        pytest.skip("objdump missing, or no x86-64 copy of that name (another compiler)")
    assert sum(bool(re.search(_PACKED[isa], line)) for line in code) >= 50
    assert not any(re.search(r"\sv?div[ps][sd]\s", line) for line in code)


@pytest.mark.slow
@pytest.mark.parametrize("state", ["float", "unsigned short"])
@pytest.mark.parametrize("isa,runs_it", [("avx2", True), ("avx512", True), ("baseline", False)])
def test_which_copies_run_the_intrinsics_loop(isa, runs_it, state):
    # the vector copies' pass 1 for the default hidden size hands every block to pass1_simd
    # (simple_cpu_simd.h); the baseline runs GCC's vectorisation of the portable loop
    from l2l_optim.kernels import cpu

    if resolve_impl("auto", "cpu") != "cpu":
        pytest.skip("no CPU kernel in this build")
    code = _disassembly(cpu.kernel_info()["path"], f"l2l::{isa}::pass1_fixed<10, float, {state}>")
    if code is None:
        pytest.skip("objdump missing, or no x86-64 copy of that name (another compiler)")
    assert any(f"l2l::{isa}::pass1_simd<{state}>" in line for line in code) == runs_it


@pytest.mark.slow
def test_the_kernel_ab_tool_times_the_library(tmp_path):
    # benchmarks/kernel_ab.cpp declares pass 1's C signature itself: it must build, accept this
    # library's ABI version and run both hidden-state dtypes on it; two copies of the library
    # (two files: the loader gives one path one handle) leave the same bits
    import shutil

    from l2l_optim.kernels import _build, cpu

    if resolve_impl("auto", "cpu") != "cpu":
        pytest.skip("no CPU kernel in this build")
    if shutil.which(_build.compiler()[0]) is None:
        pytest.skip("no C++ compiler")
    source = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_ab.cpp"
    exe = tmp_path / "kernel_ab"
    subprocess.run([*_build.compiler(), "-O1", str(source), "-o", str(exe), "-ldl"], check=True)
    info = cpu.kernel_info()
    copy = shutil.copy(info["path"], tmp_path / "copy.so")
    for state in ("float32", "bfloat16"):
        out = subprocess.run([str(exe), "5000", "2", "1", state, info["isa"], info["path"], copy],
                             capture_output=True, text=True, check=True).stdout
        assert f"state={state} isa={info['isa']}" in out
        first, second = out.splitlines()[1:3]
        assert "median over rounds: 1.000" in first  # the first build against itself
        assert first.endswith("bits: the first's") and second.endswith("bits: the first's")
    bad = subprocess.run([str(exe), "5000", "2", "1", "float16", info["isa"], info["path"]],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "bad arguments" in bad.stderr
