"""Hatch build hook: compile the fused CPU kernel's shared library when a wheel is built, and
put the shipped weights into the wheel.

``pip install .``, ``pip install -e .`` (what ``make venv`` runs) and ``python -m build`` all
build a wheel through hatchling, which runs this hook first. It compiles
``src/l2l_optim/kernels/simple_cpu.cpp`` with the system C++ compiler (``$CXX``, else ``c++``;
the command is ``kernels/_build.py``'s, without ``-march``: the library picks its instruction
set when it loads) and

* for an editable install, writes it beside the sources
  (``src/l2l_optim/kernels/libl2l_simple_cpu.so.1``, ignored by git), where the package loads it;
* for a wheel, adds it to the wheel as ``l2l_optim/kernels/libl2l_simple_cpu.so.1``.

Either wheel is then tagged ``py3-none-<platform>``: the library depends on the platform but
not on Python's ABI (it is loaded with ctypes). The platform is this machine's
(``linux_x86_64``); ``make dist`` gives the release wheel its manylinux tags with ``auditwheel
repair``, which checks the library's symbols first.
``$L2L_OPTIM_PLATFORM_TAG`` overrides the platform part.

A wheel (not an editable install, which reads the repository's ``weights/``) also gets the
files of ``weights/`` the package reads, as ``l2l_optim/_weights/``: :func:`shipped_weights`.

Without a working compiler the package still installs, as pure Python, with a warning: at run
time the CPU path then compiles the library on first use, or falls back to the reference
update. ``L2L_OPTIM_REQUIRE_KERNEL=1`` (``make dist`` sets it) turns that into an error, so a
release wheel never ships without its kernel.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sysconfig
import tempfile
from pathlib import Path

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

ROOT = Path(__file__).resolve().parent
KERNELS = ROOT / "src" / "l2l_optim" / "kernels"
WEIGHTS = ROOT / "weights"
REQUIRE_ENV = "L2L_OPTIM_REQUIRE_KERNEL"
TAG_ENV = "L2L_OPTIM_PLATFORM_TAG"


def _kernel_build():
    """``kernels/_build.py``, loaded by path (importing the package would import torch)."""
    spec = importlib.util.spec_from_file_location("_l2l_optim_kernel_build", KERNELS / "_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def shipped_weights(weights: Path = WEIGHTS) -> dict[str, str]:
    """The files of ``weights`` a wheel ships, source path -> path in the wheel.

    Every ``*.safetensors`` (the registry is whatever files are there), the model card
    ``README.md``, and ``validation/baselines.json`` where it exists (the evaluation reads it,
    ``evaluation.protocol.shipped_baselines``). The training logs, checkpoints and the other
    validation records stay in the repository.
    """
    files = [*sorted(weights.glob("*.safetensors")), weights / "README.md",
             weights / "validation" / "baselines.json"]
    return {str(p): f"l2l_optim/_weights/{p.relative_to(weights).as_posix()}"
            for p in files if p.is_file()}


def platform_tag() -> str:
    """This platform's wheel tag (``linux_x86_64``), or ``$L2L_OPTIM_PLATFORM_TAG``."""
    return os.environ.get(TAG_ENV) or sysconfig.get_platform().replace("-", "_").replace(".", "_")


class KernelBuildHook(BuildHookInterface):
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict) -> None:
        if self.target_name != "wheel":
            return
        if version != "editable":
            build_data["force_include"].update(shipped_weights())
        build = _kernel_build()
        if version == "editable":
            out = KERNELS / build.LIB_NAME
            # pip builds an editable wheel twice (once for its metadata): compile once
            built = build.library_hash(out) == build.source_hash(KERNELS) or self._compile(build, out)
        else:
            self._tmp = tempfile.mkdtemp(prefix="l2l_optim_kernel_")
            out = Path(self._tmp) / build.LIB_NAME
            built = self._compile(build, out)
            if built:
                build_data["force_include"][str(out)] = f"l2l_optim/kernels/{build.LIB_NAME}"
        if built:
            build_data["pure_python"] = False
            build_data["tag"] = f"py3-none-{platform_tag()}"

    def _compile(self, build, out: Path) -> bool:
        """Compile the library to ``out``; whether that worked. Without a working compiler,
        warn (or raise when ``$L2L_OPTIM_REQUIRE_KERNEL`` is set)."""
        self.app.display_info(f"l2l-optim: compiling the fused CPU kernel ({' '.join(build.compiler())})")
        try:
            build.compile_library(out, KERNELS)
            return True
        except (build.BuildError, OSError) as e:
            if os.environ.get(REQUIRE_ENV, "") not in ("", "0"):
                raise
            cause = str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__
            self.app.display_warning(
                f"l2l-optim: the fused CPU kernel was not built ({cause}); the package installs "
                "without it and compiles it on first use, or uses the slower reference update"
            )
            return False

    def finalize(self, version: str, build_data: dict, artifact_path: str) -> None:
        tmp = getattr(self, "_tmp", None)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
