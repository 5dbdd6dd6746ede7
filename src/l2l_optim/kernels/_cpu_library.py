"""Finding, building and loading the fused CPU kernel's shared library (see :mod:`.cpu`).

The installed library (``libl2l_simple_cpu.so.1`` beside this file, built by
``hatch_build.py``) is used when it was built from the sources and flags beside it. Otherwise
(a checkout on ``PYTHONPATH``, or an editable install whose sources changed since) the library
is compiled once into the developer cache, :func:`cache_dir`, in a subdirectory named by the
hash of the sources, the flags, the compiler and this package's directory, so two checkouts
never rebuild each other's library. A cache that already holds the library is only read. The
outcome is remembered for the process; :func:`build_error` and :func:`build_advice` say why a
load failed, in a line.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import re
import threading
from pathlib import Path

import torch

from ..state import INT8_BLOCK
from . import _build

__all__ = ["load_library", "is_available", "build_error", "build_advice", "kernel_info",
           "select_isa", "cache_dir", "DISABLE_ENV", "ISA_ENV", "CACHE_ENV"]

HERE = Path(__file__).resolve().parent
DISABLE_ENV = "L2L_OPTIM_NO_CPU_KERNEL"
ISA_ENV = "L2L_OPTIM_CPU_ISA"
CACHE_ENV = "L2L_OPTIM_KERNEL_CACHE"
ABI_VERSION = 6


_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_lib_path: Path | None = None
_lib_origin: str | None = None  # "installed" or "jit cache"
_error: str | None = None
_advice: str | None = None
_tried = False

_COMPILER_ADVICE = "it needs a C++ compiler (c++, or the one $CXX names)"
# the lines of a failed build that say why; everything else is the echoed command line
_CAUSE = re.compile(
    r"not found|No such file|Permission denied|Read-only file system|error:|cannot|undefined reference",
    re.IGNORECASE,
)


# ---------------------------------------------------------------------------------- loading


def cache_dir() -> Path:
    """Where the developer path compiles the library (``$L2L_OPTIM_KERNEL_CACHE``)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "l2l_optim" / "kernels"


def _cache_path(src_hash: str) -> Path:
    h = hashlib.sha256()
    for part in (src_hash, " ".join(_build.FLAGS), " ".join(_build.compiler()), str(HERE)):
        h.update(part.encode() + b"\0")
    return cache_dir() / f"simple_cpu-{h.hexdigest()[:16]}" / _build.LIB_NAME


_P = ctypes.c_void_p
_PP = ctypes.POINTER(ctypes.c_void_p)
_I32P = ctypes.POINTER(ctypes.c_int32)
_I64P = ctypes.POINTER(ctypes.c_int64)
_U32P = ctypes.POINTER(ctypes.c_uint32)
_F64P = ctypes.POINTER(ctypes.c_double)
_SIGNATURES = {
    "l2l_abi_version": (ctypes.c_int, []),
    "l2l_source_hash": (ctypes.c_char_p, []),
    "l2l_block_size": (ctypes.c_int64, []),
    "l2l_int8_block_size": (ctypes.c_int64, []),
    "l2l_isa": (ctypes.c_char_p, []),
    "l2l_supported_isas": (ctypes.c_char_p, []),
    "l2l_select_isa": (ctypes.c_int, [ctypes.c_char_p]),
    "l2l_simple_pass1": (ctypes.c_int, [ctypes.c_int64, _PP, _I32P, _PP, _I32P, _PP, _I32P,
                                        _PP, _U32P, _PP, _I32P, _PP, _I64P, _F64P, _I64P, _F64P, _PP,
                                        _PP, _F64P, _P, ctypes.c_int64, _P, _P, ctypes.c_int]),
    "l2l_simple_pass2": (ctypes.c_int, [ctypes.c_int64, _PP, _I32P, _I64P, _F64P, _PP, _PP,
                                        _F64P, _P, ctypes.c_int64, ctypes.c_double, _P,
                                        ctypes.c_int]),
    "l2l_first_nonfinite": (ctypes.c_int64, [ctypes.c_int64, _PP, _I32P, _I64P, ctypes.c_int]),
    "l2l_tanh": (ctypes.c_int, [ctypes.c_int32, _P, _P, ctypes.c_int64, ctypes.c_int]),
}


def _open(path: Path) -> ctypes.CDLL:
    # torch is imported, so its OpenMP runtime (libgomp.so.1) is loaded into the global scope
    # and the library's weak references to it resolve when it loads: one thread pool
    lib = ctypes.CDLL(str(path))
    for name, (restype, argtypes) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    if lib.l2l_abi_version() != ABI_VERSION:
        raise RuntimeError(f"{path} has ABI version {lib.l2l_abi_version()}, expected {ABI_VERSION}")
    if lib.l2l_int8_block_size() != INT8_BLOCK:
        raise RuntimeError(f"{path} encodes 8-bit hidden states in blocks of "
                           f"{lib.l2l_int8_block_size()} coordinates, expected {INT8_BLOCK}")
    return lib


def _find_or_build() -> tuple[ctypes.CDLL, Path, str]:
    """The installed library when it matches the sources, else the developer cache's (built
    there if missing)."""
    try:
        src_hash = _build.source_hash(HERE)
    except OSError:
        src_hash = None  # an install without the sources: trust its library
    installed = HERE / _build.LIB_NAME
    if installed.exists() and (src_hash is None or _build.library_hash(installed) == src_hash):
        return _open(installed), installed, "installed"
    if src_hash is None:
        raise FileNotFoundError(errno.ENOENT, "no kernel library and no sources", str(installed))
    path = _cache_path(src_hash)
    if not path.exists():  # a cache that holds it is only read
        _build.compile_library(path, HERE)
    return _open(path), path, "jit cache"


def _explain(e: BaseException) -> tuple[str, str]:
    """``(cause, advice)`` for a failed load or build: one short line each, the cause verbatim.

    A directory that cannot be written (read-only cache, no permission) is an OSError; a
    missing compiler or a compile error is a BuildError whose text echoes the command line
    before the line that says why.
    """
    chain, cur = [], e
    while cur is not None and len(chain) < 5:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    for err in chain:
        if isinstance(err, OSError) and err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            where = f" {err.filename}" if err.filename else ""
            return (f"cannot write the kernel cache ({err.strerror}:{where})",
                    f"set {CACHE_ENV} to a writable directory")
    text = str(e).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for line in lines[1:] if isinstance(e, _build.BuildError) and len(lines) > 1 else lines:
        if _CAUSE.search(line):
            line = re.sub(r"^/bin/\w*sh: (\d+: )?", "", line)  # the shell's prefix
            return line[:160], _COMPILER_ADVICE
    first = lines[0] if lines else type(e).__name__
    return f"{type(e).__name__}: {first[:160]}", _COMPILER_ADVICE


def load_library() -> ctypes.CDLL:
    """Load the kernel library (the first call may compile it, see the module docstring).

    The outcome is remembered for the process: a failed load is not retried.

    Raises:
        RuntimeError: the library cannot be loaded or built; the message gives the cause
            (:func:`build_error`) and what to do (:func:`build_advice`).
    """
    global _lib, _lib_path, _lib_origin, _error, _advice, _tried
    if _lib is not None:  # the common case takes no lock (and torch.compile traces through)
        return _lib
    with _lock:
        if not _tried:
            _tried = True
            if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
                _error = f"disabled by {DISABLE_ENV}={os.environ[DISABLE_ENV]}"
                _advice = f"unset {DISABLE_ENV} to use it"
            else:
                try:
                    lib, path, origin = _find_or_build()
                    want = os.environ.get(ISA_ENV, "")
                    if want and lib.l2l_select_isa(want.encode()) != 0:
                        _error = (f"{ISA_ENV}={want} is not an instruction set this CPU runs "
                                  f"({lib.l2l_supported_isas().decode()})")
                        _advice = f"unset {ISA_ENV} or name one of those"
                    else:
                        _lib, _lib_path, _lib_origin = lib, path, origin
                except Exception as e:  # noqa: BLE001 - any failure means "unavailable"
                    _error, _advice = _explain(e)
        if _lib is None:
            raise RuntimeError(
                f"the fused CPU kernel of l2l_optim (impl='cpu') is unavailable: {_error}; "
                f"{_advice}. Use impl='reference' or impl='auto'."
            )
        return _lib


def is_available() -> bool:
    """Whether the library loads here (tries once per process, never raises)."""
    try:
        load_library()
        return True
    except RuntimeError:
        return False


def build_error() -> str | None:
    """Why the library is unavailable, in one short line (None if it loaded or was not tried)."""
    return _error


def build_advice() -> str | None:
    """What would make the library available (None if it loaded or was not tried yet)."""
    return _advice


def kernel_info() -> dict:
    """Which library the CPU path uses: ``{"available", "path", "origin", "isa", "supported",
    "threads"}`` (``origin``: ``"installed"`` or ``"jit cache"``), or ``{"available": False,
    "error", "advice"}``. Loads (or builds) the library if that was not tried yet."""
    if not is_available():
        return {"available": False, "error": _error, "advice": _advice}
    lib = load_library()
    return {"available": True, "path": str(_lib_path), "origin": _lib_origin,
            "isa": lib.l2l_isa().decode(),
            "supported": lib.l2l_supported_isas().decode().split(","),
            "threads": torch.get_num_threads()}


def select_isa(name: str | None = None) -> str:
    """Use the instruction set ``name`` (``"avx512"``, ``"avx2"``, ``"baseline"``; None: the
    best this CPU runs) from now on, in this process; returns the one in use.

    Raises:
        ValueError: this CPU does not run ``name`` (or it is unknown).
        RuntimeError: the library is unavailable.
    """
    lib = load_library()
    if lib.l2l_select_isa((name or "").encode()) != 0:
        raise ValueError(f"instruction set {name!r} is not one this CPU runs: "
                         f"{lib.l2l_supported_isas().decode()}")
    return lib.l2l_isa().decode()
