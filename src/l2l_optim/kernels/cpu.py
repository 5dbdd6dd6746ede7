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

import hashlib
import os
import platform
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
_tried = False


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

    from torch.utils import cpp_extension

    # cpp_extension logs "No CUDA runtime is found" on CPU-only machines; not our business
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
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
    return torch.ops.l2l_optim_cpu


def load_extension():
    """Build (first call) or load (cached) the extension; return ``torch.ops.l2l_optim_cpu``.

    Raises RuntimeError when it cannot be built or loaded.

    The outcome is remembered for the process: a failed build is not retried.
    """
    global _ext, _error, _tried
    with _lock:
        if not _tried:
            _tried = True
            if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
                _error = f"disabled by {DISABLE_ENV}={os.environ[DISABLE_ENV]}"
            else:
                try:
                    _ext = _build()
                except Exception as e:  # noqa: BLE001 - any build/load failure means "unavailable"
                    msg = str(e).strip().splitlines()
                    _error = f"{type(e).__name__}: {msg[0] if msg else ''}".strip()
                    # the compiler's first error line is the useful one
                    for line in msg:
                        if "error" in line.lower() and line.strip() != (msg[0] if msg else ""):
                            _error += f" ({line.strip()[:200]})"
                            break
        if _ext is None:
            raise RuntimeError(
                "the fused CPU kernel of l2l_optim (impl='cpu') is unavailable: "
                f"{_error}. It needs a C++ compiler with OpenMP and ninja "
                "(torch.utils.cpp_extension); use impl='reference' or impl='auto'."
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
    """Why the extension is unavailable (None if it loaded or was not tried yet)."""
    return _error


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
