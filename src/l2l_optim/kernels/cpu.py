"""The fused SimpleOptimizer update on CPU: a C++/OpenMP kernel (``simple_cpu.cpp``).

The extension is compiled on first use with ``torch.utils.cpp_extension.load`` (flags
``-O3 -march=native -fopenmp``; about a minute on 2 cores) and cached in torch's extension
directory (``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``). The cache name
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

__all__ = [
    "simple_update_cpu",
    "is_available",
    "build_error",
    "load_extension",
    "pack_weights",
    "CFLAGS",
]

SOURCE = Path(__file__).with_name("simple_cpu.cpp")
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=fast"]
LDFLAGS = ["-fopenmp"]
DISABLE_ENV = "L2L_OPTIM_NO_CPU_KERNEL"

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


def bump_versions(*lists) -> None:
    """Increment the autograd version counter of every tensor in ``lists``."""
    from torch.autograd.graph import increment_version

    for ts in lists:
        for t in ts:
            increment_version(t)


_pack_cache: tuple[tuple, Tensor] | None = None


def pack_weights(weights: SimpleWeights) -> Tensor:
    """The weights as one contiguous fp64 CPU vector [w_ih, w_hh, b_h, w_a, w_b, b_out].

    Cached on the identity and version counters of the weight tensors, so the usual call with
    the same ``SimpleWeights`` object every step costs nothing.
    """
    global _pack_cache
    key = tuple((id(t), t.data_ptr(), t._version) for t in weights)
    cache = _pack_cache
    if cache is not None and cache[0] == key:
        return cache[1]
    H = weights.w_ih.numel()
    parts = [weights.w_ih.reshape(H), weights.w_hh.reshape(H * H), weights.b_h.reshape(H),
             weights.w_a.reshape(H), weights.w_b.reshape(H), weights.b_out.reshape(1)]
    packed = torch.cat([t.detach().to(device="cpu", dtype=torch.float64) for t in parts])
    _pack_cache = (key, packed)
    return packed


def simple_update_cpu(
    params: list[Tensor],
    grads: list[Tensor],
    hiddens: list[Tensor],
    lrs: list[float | Tensor],
    weights: SimpleWeights,
    skip: Tensor | None = None,
) -> None:
    """The fused CPU update; same contract as :func:`~.reference.simple_update_reference`.

    Raises:
        RuntimeError: the extension is unavailable, or a tensor is not on the CPU.
        ValueError: the lists differ in length, or a gradient is sparse.
    """
    ext = load_extension()
    n = len(params)
    if not (len(grads) == len(hiddens) == len(lrs) == n):
        raise ValueError(
            f"params, grads, hiddens and lrs must have the same length, got "
            f"{n}, {len(grads)}, {len(hiddens)}, {len(lrs)}"
        )
    if skip is not None:
        if isinstance(skip, Tensor):
            if skip.device.type != "cpu":
                raise RuntimeError("impl='cpu': the skip flag must be a CPU tensor")
        elif skip:
            return
        else:
            skip = None
    if n == 0:
        return
    with torch.no_grad():
        ps, gs, hs, copy_back = [], [], [], []
        for p, g, h in zip(params, grads, hiddens):
            if p.device.type != "cpu" or g.device.type != "cpu" or h.device.type != "cpu":
                raise RuntimeError(
                    "impl='cpu' runs on CPU tensors only; got a tensor on "
                    f"{next(t.device for t in (p, g, h) if t.device.type != 'cpu')}"
                )
            if g.is_sparse:
                raise ValueError("SimpleOptimizer kernels do not support sparse gradients")
            pc = p if p.is_contiguous() else p.contiguous()
            hc = h if h.is_contiguous() else h.contiguous()
            if pc is not p:
                copy_back.append((p, pc))
            if hc is not h:
                copy_back.append((h, hc))
            ps.append(pc)
            gs.append(g if g.is_contiguous() else g.contiguous())
            hs.append(hc)
        ext.simple_update(ps, gs, hs, [float(lr) for lr in lrs], pack_weights(weights), skip)
        for dst, src in copy_back:
            dst.copy_(src)
        # the kernel writes through raw pointers: tell autograd that these tensors changed, so
        # that a backward through a graph that saved them fails loudly, as after p.add_()
        bump_versions(params, hiddens)


def kernel_tanh(x: Tensor) -> Tensor:
    """The kernel's tanh applied to a float32 or float64 CPU tensor (for accuracy tests)."""
    return load_extension().tanh(x)
