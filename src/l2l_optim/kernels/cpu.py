"""The fused SimpleOptimizer update on CPU: a C++/OpenMP kernel (``simple_cpu.cpp``).

The extension is compiled on first use with ``torch.utils.cpp_extension.load`` (flags
``-O3 -march=native -fopenmp``) and cached in torch's extension directory
(``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``). The cache name
includes a hash of the source, the flags, the torch version and this CPU's feature flags, so a
home directory shared between machines never loads a ``-march=native`` binary built for another
CPU.

``impl="auto"`` uses this kernel on CPU when it builds and falls back to the reference update
with a one-line warning when it does not (no compiler, no ninja, ...); ``impl="cpu"`` raises
the build error instead. ``L2L_OPTIM_NO_CPU_KERNEL=1`` disables the kernel (as if the build had
failed), e.g. to compare against the reference.

What the kernel does and why it is deterministic is described at the top of ``simple_cpu.cpp``:
one pass computes ``h'``, writes it, applies ``lr * (w_a . h' + b_out)`` and stores per-block
partial sums of ``w_b . h'``; the partials are reduced in a fixed order and a second, cheap
pass adds ``lr * w_b . mean(h')``. Results are bitwise independent of the thread count.

Supported: parameters in float32 / float64 / bfloat16 / float16 (any shape, 0-dim included;
non-contiguous ones are copied to contiguous and back), gradients of any of these dtypes,
hidden state in float32 / bfloat16 / float64, one learning rate per tensor, the ``skip`` flag.
Compute precision is that of the reference: float64 for float64 parameters, float32 otherwise.
"""

from __future__ import annotations

import errno
import hashlib
import os
import platform
import re
import threading
from pathlib import Path

import torch
from torch import Tensor

from ..nets import SimpleWeights
from ._common import (
    Aggregate,
    call_aggregate,
    check_inputs,
    contiguous_inplace,
    packed_weights,
    split_skip,
)

__all__ = [
    "simple_update_cpu",
    "is_available",
    "build_error",
    "build_advice",
    "load_extension",
    "CFLAGS",
]

SOURCE = Path(__file__).with_name("simple_cpu.cpp")
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=fast"]
LDFLAGS = ["-fopenmp"]
DISABLE_ENV = "L2L_OPTIM_NO_CPU_KERNEL"
_CPU = torch.device("cpu")

_lock = threading.Lock()
_ext = None
_error: str | None = None
_advice: str | None = None
_tried = False

_COMPILER_ADVICE = "it needs a C++ compiler with OpenMP and ninja (torch.utils.cpp_extension)"
# the lines of a failed build that say why; everything else is the echoed command line
_CAUSE = re.compile(
    r"not found|No such file|Permission denied|Read-only file system|error:|cannot|undefined reference",
    re.IGNORECASE,
)


def _cpu_fingerprint() -> str:
    """The CPU's model and feature flags (what -march=native compiles for)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("flags", "Features", "model name"))]
        # one core's worth is enough; the set of distinct lines keeps it short
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.machine() + platform.processor()


def _extension_name() -> str:
    h = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(CFLAGS + LDFLAGS).encode(), torch.__version__.encode(),
                 _cpu_fingerprint().encode()):
        h.update(part)
        h.update(b"\0")
    return f"l2l_simple_cpu_{h.hexdigest()[:12]}"


def _build():
    import logging

    # cpp_extension logs "No CUDA runtime is found" when it is imported on a CPU-only
    # machine: the CPU kernel does not need CUDA, so the level is raised before the import
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension

        cpp_extension.load(
            name=_extension_name(),
            sources=[str(SOURCE)],
            extra_cflags=CFLAGS,
            extra_ldflags=LDFLAGS,
            is_python_module=False,  # a TORCH_LIBRARY: the ops are torch.ops.l2l_optim_cpu.*
            verbose=os.environ.get("L2L_OPTIM_VERBOSE_BUILD", "") not in ("", "0"),
        )
    finally:
        log.setLevel(level)
    _register_fake()
    return torch.ops.l2l_optim_cpu


def _register_fake() -> None:
    """Shape-only versions of the ops, which torch.compile traces instead of running them.

    The update mutates its inputs in place (the schema says so) and returns nothing, so its
    fake version does nothing; with it a compiled ``opt.step()`` holds the kernel call as
    one opaque op instead of breaking the graph around it.
    """
    lib = "l2l_optim_cpu"
    try:
        torch.library.register_fake(f"{lib}::simple_update")(
            lambda params, grads, hiddens, lrs, weights, skip: None
        )
        torch.library.register_fake(f"{lib}::tanh")(lambda x: torch.empty_like(x))
    except RuntimeError as e:
        if "already has" not in str(e):  # a second load in the same process
            raise


def _explain(e: BaseException) -> tuple[str, str]:
    """``(cause, advice)`` for a failed build: one short line each, the cause kept verbatim.

    A directory that cannot be written (read-only cache, no permission) is an OSError from
    the build-directory setup or its lock file; a missing compiler or a compile error is a
    RuntimeError whose text echoes the whole command line before the line that says why.
    """
    chain, cur = [], e
    while cur is not None and len(chain) < 5:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    for err in chain:
        if isinstance(err, OSError) and err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            where = f" {err.filename}" if err.filename else ""
            return (f"cannot write the extension cache ({err.strerror}:{where})",
                    "set TORCH_EXTENSIONS_DIR to a writable directory")
    text = str(e).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if "Ninja is required" in text:
        return "ninja is not installed", "pip install ninja, and a C++ compiler with OpenMP"
    for line in lines:
        if _CAUSE.search(line) and " -c " not in line and not line.startswith(("[", "FAILED:")):
            line = re.sub(r"^/bin/\w*sh: (\d+: )?", "", line)  # the shell's prefix
            return line[:160], _COMPILER_ADVICE
    first = lines[0] if lines else type(e).__name__
    return f"{type(e).__name__}: {first[:160]}", _COMPILER_ADVICE


def load_extension():
    """Build (first call) or load (cached) the extension; return ``torch.ops.l2l_optim_cpu``.

    The outcome is remembered for the process: a failed build is not retried.

    Returns:
        The ``torch.ops.l2l_optim_cpu`` namespace.

    Raises:
        RuntimeError: the extension cannot be built or loaded; the message gives the cause
            (:func:`build_error`) and what to do (:func:`build_advice`).
    """
    global _ext, _error, _advice, _tried
    if _ext is not None:  # the common case takes no lock (and torch.compile traces through)
        return _ext
    with _lock:
        if not _tried:
            _tried = True
            if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
                _error = f"disabled by {DISABLE_ENV}={os.environ[DISABLE_ENV]}"
                _advice = f"unset {DISABLE_ENV} to use it"
            else:
                try:
                    _ext = _build()
                except Exception as e:  # noqa: BLE001 - any build/load failure means "unavailable"
                    _error, _advice = _explain(e)
        if _ext is None:
            raise RuntimeError(
                f"the fused CPU kernel of l2l_optim (impl='cpu') is unavailable: {_error}; "
                f"{_advice}. Use impl='reference' or impl='auto'."
            )
        return _ext


def is_available() -> bool:
    """Whether the extension builds/loads here (tries once per process, never raises)."""
    try:
        load_extension()
        return True
    except RuntimeError:
        return False


def build_error() -> str | None:
    """Why the extension is unavailable, in one short line (None if it loaded or was not tried)."""
    return _error


def build_advice() -> str | None:
    """What would make the extension available (None if it loaded or was not tried yet)."""
    return _advice


def simple_update_cpu(
    params: list[Tensor],
    grads: list[Tensor],
    hiddens: list[Tensor],
    lrs: list[float | Tensor],
    weights: SimpleWeights,
    skip: Tensor | bool | None = None,
    aggregate: Aggregate | None = None,
) -> None:
    """The fused CPU update; same contract as :func:`~.reference.simple_update_reference`.

    Without ``aggregate`` one op runs both passes; with it, pass 1 and pass 2 are two ops and
    ``aggregate`` turns pass 1's per-tensor sums into the shared scalar in between.

    Raises:
        RuntimeError: the extension is unavailable, or a tensor is not on the CPU.
        ValueError: as the reference.
        TypeError: as the reference (a tensor subclass such as DTensor).
    """
    ext = load_extension()
    check_inputs("cpu", params, grads, hiddens, lrs, weights.w_ih.numel(), device=_CPU,
                 device_rule="runs on CPU tensors only")
    done, skip = split_skip(skip)
    if skip is not None and skip.device.type != "cpu":
        raise RuntimeError("impl='cpu': the skip flag must be a CPU tensor")
    if done or not params:
        return
    # the kernel reads every weight in fp64 and rounds to the compute dtype itself
    packed = packed_weights(weights, _CPU, torch.float64, flat=True)
    lr_list = [float(lr) for lr in lrs]
    with torch.no_grad(), contiguous_inplace(params, grads, hiddens) as (ps, gs, hs):
        if aggregate is None:
            ext.simple_update(ps, gs, hs, lr_list, packed, skip)
            return
        sums, scratch = ext.simple_update_pass1(ps, gs, hs, lr_list, packed, skip)
        shared = call_aggregate(aggregate, sums)
        ext.simple_update_pass2(ps, scratch, lr_list, packed, shared, skip)


def kernel_tanh(x: Tensor) -> Tensor:
    """The kernel's tanh applied to a float32 or float64 CPU tensor (for accuracy tests)."""
    return load_extension().tanh(x)
