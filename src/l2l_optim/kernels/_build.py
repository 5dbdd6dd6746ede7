"""How the fused CPU kernel's shared library is compiled, in one place.

Two callers use it: ``hatch_build.py`` at install time (it loads this file by path, since the
package itself imports torch) and :mod:`l2l_optim.kernels.cpu` when no library was installed
(a checkout used through ``PYTHONPATH``). So it needs nothing but the standard library.

The library is plain C++ with a C ABI (``simple_cpu.cpp`` and the per-instruction-set
``simple_cpu_isa.h``), compiled by the system compiler (``$CXX``, else ``c++``) with OpenMP's
``simd`` pragmas alone (``-fopenmp-simd``: no OpenMP runtime is linked; the library runs its
threads on the one torch has loaded) and without ``-march``: it chooses its instruction set
when it loads. The hash of the sources is compiled into it (:func:`library_hash` reads it), so
a loader can tell a library built from other sources or with other flags without loading it.

Run as a script it builds the library beside the sources, as an editable install does::

    python src/l2l_optim/kernels/_build.py
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

__all__ = ["SOURCES", "LIB_NAME", "FLAGS", "BuildError", "source_dir", "source_hash",
           "library_hash", "compiler", "command", "compile_library"]

SOURCES = ("simple_cpu.cpp", "simple_cpu_isa.h", "simple_cpu_simd.h")  # the first is compiled
# a name no import system takes for a Python module (no .so suffix at its end), so that
# pkgutil.walk_packages and import machinery pass over it
LIB_NAME = "libl2l_simple_cpu.so.1"
# -fno-trapping-math and -fno-math-errno change no value (no FP traps are enabled, and nothing
# reads errno); they let GCC if-convert the tanh's clamp and inline sqrt, without which the
# AVX2 and SSE2 copies of the coordinate loops stay scalar (3.5x and 2.2x slower per
# coordinate; the AVX-512 copy vectorises either way, with masks)
FLAGS = ["-O3", "-std=c++17", "-fPIC", "-shared", "-fopenmp-simd", "-ffp-contract=fast",
         "-fno-trapping-math", "-fno-math-errno", "-fno-tree-loop-distribute-patterns",
         "-fvisibility=hidden", "-fno-exceptions",
         "-fno-rtti", "-Wl,--as-needed"]
_HASH_MARK = re.compile(rb"l2l-source-hash:([0-9a-f]{16})\0")  # kSourceHash in simple_cpu.cpp


class BuildError(RuntimeError):
    """The compiler is missing or failed; the message holds its output."""


def source_dir() -> Path:
    """The directory of the kernel sources (this file's)."""
    return Path(__file__).resolve().parent


def source_hash(directory: Path | None = None) -> str:
    """A short hash of the sources' names and contents and of the flags (raises OSError if a
    source is missing): a library with another hash was built from something else."""
    directory = directory or source_dir()
    h = hashlib.sha256(" ".join(FLAGS).encode() + b"\0")
    for name in SOURCES:
        h.update(name.encode() + b"\0" + (directory / name).read_bytes() + b"\0")
    return h.hexdigest()[:16]


def library_hash(path: Path) -> str | None:
    """The :func:`source_hash` compiled into the library at ``path`` (read from the file, not
    loaded), or None when the file has none or cannot be read."""
    try:
        found = _HASH_MARK.search(Path(path).read_bytes())
    except OSError:
        return None
    return found.group(1).decode() if found else None


def compiler() -> list[str]:
    """The C++ compiler's command: ``$CXX`` (may carry options), else ``c++``."""
    return shlex.split(os.environ.get("CXX") or "c++")


def command(out: Path, directory: Path | None = None) -> list[str]:
    """The compile command that writes the library to ``out``."""
    directory = directory or source_dir()
    return [*compiler(), *FLAGS, f'-DL2L_SOURCE_HASH="{source_hash(directory)}"',
            str(directory / SOURCES[0]), "-o", str(out)]


def compile_library(out: Path, directory: Path | None = None) -> Path:
    """Compile the library to ``out`` (its directory is created).

    The compiler writes a temporary file beside ``out`` that is renamed over it when complete,
    so a process that loads ``out`` meanwhile never sees half a library, and two processes
    building at once both end with a whole one (no lock file).

    Raises:
        BuildError: no compiler, or it failed (the message is its output).
        OSError: ``out``'s directory cannot be created or written.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    cmd = command(tmp, directory)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError:
        raise BuildError(f"{cmd[0]}: not found") from None
    try:
        if proc.returncode != 0:
            raise BuildError(f"{shlex.join(cmd)}\n{proc.stdout}{proc.stderr}".strip())
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


def main() -> int:
    out = source_dir() / LIB_NAME
    try:
        compile_library(out)
    except (BuildError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
