"""Meta-weight files: safetensors I/O with metadata and validation, fingerprints, the registry.

(Longer than most modules: reading files that may be truncated, tampered with or not ours is
most of it, checked from the header before any byte of the body is read, and the shipped-name
lookup, ``hf://`` addresses (downloaded by :mod:`l2l_optim.hub`) and the listing share that
reader.)

A weight file is a ``.safetensors`` file holding one coordinate-wise net's ``state_dict`` in
float32 plus string metadata:

* ``format``: ``"l2l-optim-weights/1"``
* ``arch``: the net's registry name (``"simple"``, ``"dm"``, ``"rnnprop"``)
* ``config``: the net's constructor arguments, as JSON
* ``package_version``: the l2l-optim version that wrote the file
* ``fingerprint``: :func:`fingerprint` of the net, checked on every load
* anything the writer adds (recipe, command, seed, final_meta_loss, ...), JSON-encoded
  unless it already is a string

Shipped weights are the ``<name>.safetensors`` files in the package's ``_weights/`` directory
(the wheel puts the repository's ``weights/`` there) or, for an editable install, in the
repository's ``weights/`` directory. The registry is whatever files are there.

Example:
    >>> import tempfile
    >>> from l2l_optim.nets import SimpleOptimizerNet
    >>> tmp = tempfile.TemporaryDirectory()
    >>> path = save_weights(SimpleOptimizerNet(), f"{tmp.name}/mine.safetensors", metadata={"seed": 0})
    >>> loaded = load_weights(path, arch="simple")
    >>> loaded.metadata["seed"], loaded.fingerprint == fingerprint(loaded.net)
    ('0', True)
"""

from __future__ import annotations

import copy
import ctypes
import hashlib
import inspect
import json
import math
import os
import struct
import sys
import tempfile
from pathlib import Path
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from .nets import CoordinatewiseNet
from .registry import ARCHITECTURES, build_net, get_architecture

__all__ = [
    "FORMAT",
    "WeightsError",
    "LoadedWeights",
    "fingerprint",
    "save_weights",
    "load_weights",
    "resolve_net",
    "list_weights",
    "weights_dirs",
    "attach_metadata",
    "source_metadata",
    "MAX_HIDDEN_SIZE",
]

FORMAT = "l2l-optim-weights/1"
#: file a run directory holds (what meta_fit writes), used when ``source`` is a directory
DIR_FILENAME = "weights.safetensors"
_SUFFIX = ".safetensors"
_HF_PREFIX = "hf://"
_RESERVED = ("format", "arch", "config", "package_version", "fingerprint")
# safetensors itself refuses headers above 100 MB; a larger length means a corrupt file
_MAX_HEADER = 100_000_000
#: the largest ``hidden_size`` a weight file may ask for: 50x the shipped nets, and a 2-layer
#: LSTM net of this size still fits in 40 MB
MAX_HIDDEN_SIZE = 1024


class WeightsError(ValueError):
    """A weight file is missing, unreadable, corrupted, or does not match what was asked for.

    A ``ValueError``, so that code catching bad arguments catches it too; the message names
    the file and the problem.

    Args:
        message: what is wrong, and with which file.

    Example:
        >>> from l2l_optim import WeightsError, load_weights
        >>> try:
        ...     load_weights("no-such-weights")
        ... except WeightsError as e:
        ...     print(str(e).split(";")[0])
        unknown weights 'no-such-weights'
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)


class LoadedWeights(NamedTuple):
    """What :func:`load_weights` returns.

    Attributes:
        net: the rebuilt net (float32, CPU, eval mode).
        metadata: the file's metadata, as stored (``str -> str``).
        fingerprint: the verified :func:`fingerprint` of ``net``.
        path: the local file the weights were read from.
    """

    net: CoordinatewiseNet
    metadata: dict[str, str]
    fingerprint: str
    path: Path


def _config_json(config: dict) -> str:
    # one canonical spelling, so the same config always hashes the same
    return json.dumps(config, sort_keys=True, separators=(",", ":"))


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().to(device="cpu", dtype=torch.float32).contiguous()
    if sys.byteorder != "little":
        t = t.view(torch.uint8).reshape(-1, 4).flip(1).contiguous()
    # read the buffer directly: no numpy dependency, no per-element Python loop
    return ctypes.string_at(t.data_ptr(), t.numel() * 4) if t.numel() else b""


def fingerprint(net: CoordinatewiseNet) -> str:
    """A short, stable hash of a net's architecture, config and weights.

    sha256 over the arch name, the canonical config JSON and, for every ``state_dict`` entry
    in sorted key order, its key, its shape and its values as float32 little-endian bytes.
    Two nets with the same fingerprint compute the same updates.

    Args:
        net: any :class:`~l2l_optim.nets.CoordinatewiseNet`.

    Returns:
        The first 16 hex characters of the digest.

    Example:
        >>> from l2l_optim.nets import SimpleOptimizerNet
        >>> len(fingerprint(SimpleOptimizerNet()))
        16
    """
    h = hashlib.sha256()
    h.update(net.arch.encode())
    h.update(b"\0")
    h.update(_config_json(net.config).encode())
    sd = net.state_dict()
    for key in sorted(sd):
        t = sd[key]
        h.update(b"\0" + key.encode() + b"\0" + json.dumps(list(t.shape)).encode() + b"\0")
        h.update(_tensor_bytes(t))
    return h.hexdigest()[:16]


def _package_version() -> str:
    from . import __version__

    return __version__


def save_weights(
    net: CoordinatewiseNet, path: str | os.PathLike, *, metadata: dict[str, Any] | None = None
) -> Path:
    """Write a net's weights and metadata to a safetensors file, atomically.

    The file is written next to its destination and then renamed over it, so a reader never
    sees half a file, even if the writer is killed.

    Args:
        net: the net to save; its ``state_dict`` is stored as float32.
        path: destination file. An existing directory means ``<path>/weights.safetensors``.
            Missing parent directories are created.
        metadata: extra metadata (recipe, command, seed, final_meta_loss, ...). Keys must be
            strings; values that are not strings are stored as JSON.

    Returns:
        The path written.

    Raises:
        TypeError: ``net`` is not a CoordinatewiseNet, or a metadata value is not JSON-able.
        ValueError: a metadata key is not a string or is one of the reserved keys
            (format, arch, config, package_version, fingerprint).

    Example:
        >>> import tempfile
        >>> from l2l_optim.nets import SimpleOptimizerNet
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = save_weights(SimpleOptimizerNet(), f"{folder}/w.safetensors", metadata={"seed": 1})
        ...     print(path.name, load_weights(path).metadata["seed"])
        w.safetensors 1

        A directory means ``<directory>/weights.safetensors``, what :func:`load_weights` reads
        from a directory:

        >>> with tempfile.TemporaryDirectory() as folder:
        ...     print(save_weights(SimpleOptimizerNet(), folder).name)
        weights.safetensors
    """
    from safetensors.torch import save as st_save

    if not isinstance(net, CoordinatewiseNet):
        raise TypeError(f"save_weights needs a CoordinatewiseNet, got {type(net).__name__}")
    if net.arch not in ARCHITECTURES:
        raise ValueError(f"net architecture {net.arch!r} is not one of {sorted(ARCHITECTURES)}")
    meta = {
        "format": FORMAT,
        "arch": net.arch,
        "config": _config_json(net.config),
        "package_version": _package_version(),
        "fingerprint": fingerprint(net),
    }
    for key, value in (metadata or {}).items():
        if not isinstance(key, str):
            raise ValueError(f"metadata keys must be strings, got {key!r}")
        if key in _RESERVED:
            raise ValueError(f"metadata key {key!r} is reserved (written by save_weights)")
        meta[key] = value if isinstance(value, str) else json.dumps(value)
    tensors = {
        k: v.detach().to(device="cpu", dtype=torch.float32).contiguous().clone()
        for k, v in net.state_dict().items()
    }
    data = st_save(tensors, metadata=meta)

    path = Path(path)
    if path.is_dir():
        path = path / DIR_FILENAME
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


# the first bytes of files that are often passed where a weight file belongs: torch.save
# writes a zip archive (or, with _use_new_zipfile_serialization=False, a bare pickle)
_FOREIGN = ((b"PK\x03\x04", "a zip archive, e.g. a torch.save pickle"),
            (b"\x80", "a pickle, e.g. torch.save"))


def _foreign_kind(head: bytes) -> str | None:
    """What a file that starts with ``head`` is, when it is a known format other than ours."""
    for magic, kind in _FOREIGN:
        if head.startswith(magic) and (magic != b"\x80" or head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
            return kind
    return None


def _json_loads(text: str | bytes, path: Path, problem: str) -> Any:
    """``json.loads`` of UTF-8 text, with every failure a :class:`WeightsError` that begins
    with ``problem`` (``"corrupted header"``, ``"bad config"``).

    A file may come from anywhere: nesting deep enough to exhaust Python's recursion limit
    is refused like any other malformed JSON.
    """
    try:
        return json.loads(text.decode("utf-8") if isinstance(text, bytes) else text)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"{path}: {problem} (not valid JSON: {e})") from None
    except RecursionError:
        raise WeightsError(f"{path}: {problem} (JSON nested too deeply to read)") from None


def _is_int_list(value: Any, length: int | None = None) -> bool:
    return (isinstance(value, list) and (length is None or len(value) == length)
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value))


def _read_header(path: Path) -> tuple[dict[str, str], dict[str, dict]]:
    """Parse a safetensors header: (metadata, tensor entries). Reads only the header bytes.

    Raises:
        WeightsError: for any file that is not a well-formed safetensors header, named for
            what it is where that is recognisable (a torch.save pickle or zip archive).
    """
    try:
        with open(path, "rb") as f:
            # a safetensors file: the header's length (8 bytes, little-endian), then the
            # header, a JSON object
            head = f.read(9)
            n = struct.unpack("<Q", head[:8])[0] if len(head) >= 8 else None
            if n is None or n > _MAX_HEADER or head[8:9] not in (b"{", b""):
                kind = _foreign_kind(head)
                if kind:
                    raise WeightsError(f"{path}: not a safetensors file ({kind})")
                if n is None:
                    raise WeightsError(f"{path}: not a safetensors file (only {len(head)} bytes)")
                if n > _MAX_HEADER:
                    raise WeightsError(f"{path}: not a safetensors file (its first 8 bytes give a header "
                                       f"of {n} bytes, more than safetensors allows)")
                raise WeightsError(f"{path}: not a safetensors file (no JSON header after its first 8 bytes)")
            raw = head[8:] + f.read(n - len(head[8:])) if n else b""
    except OSError as e:
        raise WeightsError(f"{path}: cannot read weight file ({e})") from e
    if len(raw) < n:
        raise WeightsError(f"{path}: truncated header ({len(raw)} of {n} bytes)")
    header = _json_loads(raw, path, "corrupted header")
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: corrupted header (not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ):
        raise WeightsError(f"{path}: corrupted header (metadata must map strings to strings)")
    for key, entry in header.items():
        if (not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys()
                or not isinstance(entry["dtype"], str) or not _is_int_list(entry["shape"])
                or not _is_int_list(entry["data_offsets"], 2)):
            raise WeightsError(f"{path}: corrupted header (bad entry for tensor {key!r})")
    return meta, header


def _check_metadata(path: Path, meta: dict[str, str]) -> None:
    missing = [k for k in ("format", "arch", "config", "fingerprint") if k not in meta]
    if missing:
        raise WeightsError(
            f"{path}: not an l2l-optim weight file (metadata lacks {', '.join(missing)})"
        )
    if meta["format"] != FORMAT:
        raise WeightsError(
            f"{path}: unsupported weight format {meta['format']!r} (this version reads {FORMAT!r})"
        )


def _check_config(path: Path, arch: str, config: Any) -> dict:
    """Refuse a config the net's constructor would not get from us, before building anything.

    Known keys only, each of its default's type, finite numbers and a bounded
    ``hidden_size``: a config decides how much memory the net takes, and a file may come
    from anywhere.
    """
    if not isinstance(config, dict):
        raise WeightsError(f"{path}: bad config: {config!r} is not a JSON object")
    cls = get_architecture(arch).net_class
    known = {
        name: p.default
        for name, p in inspect.signature(cls.__init__).parameters.items()
        if name != "self" and p.default is not inspect.Parameter.empty
    }
    unknown = sorted(set(config) - set(known))
    if unknown:
        raise WeightsError(
            f"{path}: bad config: unknown keys {unknown} for a {arch!r} net (known: {sorted(known)})"
        )
    for key, value in config.items():
        default = known[key]
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(default, float):
            ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
                  and math.isfinite(value))
        elif default is None:  # an optional string option (SimpleOptimizerNet's input_norm)
            ok = value is None or isinstance(value, str)
        else:
            ok = value is None or isinstance(value, type(default))
        if not ok:
            kind = ("bool" if isinstance(default, bool) else "string or null" if default is None
                    else f"finite {type(default).__name__}")
            raise WeightsError(f"{path}: bad config: {key}={value!r} is not a {kind}")
    hidden = config.get("hidden_size", known.get("hidden_size"))
    if isinstance(hidden, int) and not 1 <= hidden <= MAX_HIDDEN_SIZE:
        raise WeightsError(
            f"{path}: bad config: hidden_size={hidden} is outside [1, {MAX_HIDDEN_SIZE}]"
        )
    return config


def _load_file(path: Path, arch: str | None) -> LoadedWeights:
    from safetensors.torch import load as st_load

    if not path.is_file():
        raise WeightsError(f"{path}: no such weight file")
    # the header alone first: a file that is not ours, or whose config or shapes are wrong,
    # is refused without reading its body
    meta, entries = _read_header(path)
    _check_metadata(path, meta)
    file_arch = meta["arch"]
    if file_arch not in ARCHITECTURES:
        raise WeightsError(f"{path}: unknown architecture {file_arch!r} (known: {sorted(ARCHITECTURES)})")
    if arch is not None and file_arch != arch:
        raise WeightsError(f"{path}: holds {file_arch!r} weights, but {arch!r} was requested")
    config = _json_loads(meta["config"], path, "bad config")
    _check_config(path, file_arch, config)
    try:
        # on the meta device: shapes without memory, and no draw from the global RNG
        with torch.device("meta"):
            net = build_net(file_arch, config)
    except ValueError as e:
        raise WeightsError(f"{path}: bad config {meta['config']!r} ({e})") from None

    expected = net.state_dict()
    missing = sorted(set(expected) - set(entries))
    extra = sorted(set(entries) - set(expected))
    if missing or extra:
        raise WeightsError(
            f"{path}: tensors do not match a {file_arch!r} net with config {config}"
            + (f"; missing {missing}" if missing else "")
            + (f"; unexpected {extra}" if extra else "")
        )
    body = 0
    for key, entry in entries.items():
        if entry["dtype"] != "F32":
            raise WeightsError(f"{path}: tensor {key!r} has dtype {entry['dtype']}, expected F32")
        if list(entry["shape"]) != list(expected[key].shape):
            raise WeightsError(
                f"{path}: tensor {key!r} has shape {list(entry['shape'])}, "
                f"expected {list(expected[key].shape)}"
            )
        body += 4 * expected[key].numel()
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
        size = path.stat().st_size
        if size != 8 + n + body:
            raise WeightsError(
                f"{path}: corrupted weight file ({size} bytes, the header describes {8 + n + body})"
            )
        data = path.read_bytes()
    except OSError as e:
        raise WeightsError(f"{path}: cannot read weight file ({e})") from e
    try:
        tensors = st_load(data)
    except Exception as e:  # safetensors raises its own untyped error on corrupt bodies
        raise WeightsError(f"{path}: corrupted weight file ({e})") from None
    for key, t in tensors.items():
        if not torch.isfinite(t).all():
            raise WeightsError(f"{path}: tensor {key!r} holds NaN or Inf")
    net = net.to_empty(device="cpu")
    try:
        net.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise WeightsError(f"{path}: tensors do not fit the net ({e})") from None
    net.eval()
    fp = fingerprint(net)
    if fp != meta["fingerprint"]:
        raise WeightsError(
            f"{path}: fingerprint mismatch (metadata says {meta['fingerprint']}, tensors give "
            f"{fp}); the file was modified or corrupted after it was written"
        )
    attach_metadata(net, meta)
    return LoadedWeights(net=net, metadata=dict(meta), fingerprint=fp, path=path)


# where a net keeps the metadata of the file (or fine-tuning run) its weights came from; an
# instance attribute, so that copies and pickles of the net carry it
_METADATA_ATTR = "_l2l_weights_metadata"


def attach_metadata(net: CoordinatewiseNet, metadata: dict[str, Any]) -> None:
    """Remember ``metadata`` (recipe, command, results, ...) as the provenance of ``net``'s weights.

    :func:`source_metadata` gives it back while the weights are unchanged; values that are
    not strings are stored as JSON, as in a weight file.

    Args:
        net: the net whose current weights the metadata describes.
        metadata: string keys; reserved keys (format, arch, ...) are ignored.

    Example:
        >>> from l2l_optim.nets import SimpleOptimizerNet
        >>> net = SimpleOptimizerNet()
        >>> attach_metadata(net, {"seed": 3})
        >>> source_metadata(net)
        {'seed': '3'}
    """
    kept = {k: v if isinstance(v, str) else json.dumps(v)
            for k, v in metadata.items() if k not in _RESERVED}
    setattr(net, _METADATA_ATTR, (fingerprint(net), kept))


def source_metadata(net: CoordinatewiseNet) -> dict[str, str]:
    """The metadata :func:`attach_metadata` stored with ``net``, if its weights are unchanged.

    Returns:
        The stored ``str -> str`` metadata; ``{"derived_from": <old fingerprint>}`` when the
        weights changed since (the recipe and results no longer describe them); ``{}`` when
        nothing was stored.

    Example:
        >>> from l2l_optim.nets import SimpleOptimizerNet
        >>> source_metadata(SimpleOptimizerNet())
        {}
    """
    stored = getattr(net, _METADATA_ATTR, None)
    if stored is None:
        return {}
    fp, meta = stored
    return dict(meta) if fp == fingerprint(net) else {"derived_from": fp}


def weights_dirs() -> list[Path]:
    """The directories searched for shipped weights, highest priority first (existing only)."""
    pkg = Path(__file__).resolve().parent
    candidates = [pkg / "_weights", pkg.parent.parent / "weights"]
    return [d for d in candidates if d.is_dir()]


def _shipped() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for d in weights_dirs():
        for f in sorted(d.glob(f"*{_SUFFIX}")):
            # an installed copy shadows the repository one of the same name
            found.setdefault(f.name[: -len(_SUFFIX)], f)
    return found


def list_weights() -> dict[str, dict[str, str]]:
    """The shipped weights: name -> metadata, reading only each file's header.

    Returns:
        A dict sorted by name; empty when no weights are shipped.

    Raises:
        WeightsError: a shipped file's header is unreadable.

    Example:
        >>> shipped = list_weights()
        >>> {"simple", "dm", "rnnprop"} <= set(shipped)
        True
        >>> shipped["simple"]["arch"], shipped["dm"]["arch"]
        ('simple', 'dm')
    """
    return {name: _read_header(path)[0] for name, path in sorted(_shipped().items())}


def _looks_like_name(source: str) -> bool:
    return os.sep not in source and "/" not in source and not source.endswith(_SUFFIX)


def load_weights(source: str | os.PathLike, *, arch: str | None = None,
                 fetch: Callable[[str], Path] | None = None) -> LoadedWeights:
    """Load and verify a net from shipped weights, a file, a run directory or the Hub.

    Args:
        source: one of
            * a shipped name such as ``"simple"`` (see :func:`list_weights`); a shipped
              name wins over a local path spelled the same (write ``"./simple"`` for that);
            * a path to a ``.safetensors`` file;
            * a directory, meaning ``<dir>/weights.safetensors`` (what ``meta_fit`` writes);
            * ``"hf://<owner>/<repo>[@revision]/<filename>"``, which ``fetch`` turns into a
              local file (:func:`l2l_optim.load_weights` and :mod:`l2l_optim.hub` pass
              the Hub's; ``HF_HUB_OFFLINE=1`` uses the local cache only).
        arch: if given, the architecture the file must hold.
        fetch: ``hf://`` address -> local path; None refuses such addresses.

    Returns:
        A :class:`LoadedWeights` ``(net, metadata, fingerprint, path)``.

    Raises:
        WeightsError: unknown name, missing or unreadable file, truncated or corrupted
            content, unexpected tensors, shapes or dtypes, unknown or unexpected
            architecture, a fingerprint that does not match the tensors, or a Hub download
            that failed. The message names the file and the problem.

    Example:
        >>> loaded = load_weights("simple")
        >>> loaded.net.num_parameters(), loaded.metadata["arch"], loaded.path.name
        (132, 'simple', 'simple.safetensors')
        >>> load_weights("simple", arch="dm")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
            ...
        l2l_optim.weights.WeightsError: ...
        >>> load_weights("no-such-weights")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
            ...
        l2l_optim.weights.WeightsError: unknown weights 'no-such-weights'; shipped weights: ...
    """
    if isinstance(source, str) and source.startswith(_HF_PREFIX):
        if fetch is None:
            raise WeightsError(f"{source}: Hub addresses are loaded by l2l_optim.load_weights "
                               "(l2l_optim.hub), which downloads them")
        return _load_file(fetch(source), arch)
    if isinstance(source, str) and _looks_like_name(source):
        shipped = _shipped()
        if source in shipped:
            return _load_file(shipped[source], arch)
        if not Path(source).exists():
            available = ", ".join(sorted(shipped)) or "none are installed"
            raise WeightsError(f"unknown weights {source!r}; shipped weights: {available}")
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"weights source must be a str or path, got {type(source).__name__}")
    path = Path(source)
    if path.is_dir():
        path = path / DIR_FILENAME
    return _load_file(path, arch)


def resolve_net(weights: Any, *, arch: str | None = None,
                fetch: Callable[[str], Path] | None = None) -> tuple[CoordinatewiseNet, str]:
    """A private copy of the net that ``weights`` names, and a short description of it.

    The one place that turns whatever a user passes as ``weights=`` (to the optimizers,
    :func:`~l2l_optim.finetuning.finetune`, :func:`~l2l_optim.evaluation.evaluate`) into a net.

    Args:
        weights: a shipped name, a ``.safetensors`` path, a run directory, an ``hf://``
            address (all via :func:`load_weights`), a :class:`LoadedWeights`, a
            :class:`~l2l_optim.nets.CoordinatewiseNet`, or the result of
            :func:`~l2l_optim.finetuning.finetune` or :func:`~l2l_optim.meta.meta_fit` (any
            object whose ``net`` attribute is a net; nets are deep-copied, so later changes
            to them do not reach the copy).
        arch: if given, the architecture the net must have.
        fetch: how ``hf://`` addresses become local files (:func:`load_weights`).

    Returns:
        ``(net, description)``; the description names the source and the fingerprint, e.g.
        ``"simple (3f2a...)"``, for logs and metadata.

    Raises:
        TypeError: ``weights`` has an unsupported type.
        ValueError: the net is not of architecture ``arch`` (:class:`WeightsError` for files).

    Example:
        >>> net, description = resolve_net("simple", arch="simple")
        >>> net.num_parameters(), description.startswith("simple (")
        (132, True)
        >>> copy, _ = resolve_net(net)
        >>> copy is net, fingerprint(copy) == fingerprint(net)
        (False, True)
    """
    if isinstance(weights, CoordinatewiseNet):
        net, source = copy.deepcopy(weights), "net"
    elif isinstance(weights, LoadedWeights):
        net, source = copy.deepcopy(weights.net), str(weights.path)
    elif isinstance(weights, (str, os.PathLike)):
        net, source = load_weights(weights, arch=arch, fetch=fetch).net, os.fspath(weights)
    elif isinstance(result_net := getattr(weights, "net", None), CoordinatewiseNet):
        net, source = copy.deepcopy(result_net), type(weights).__name__
    else:
        raise TypeError(
            "weights must be a shipped name, a path, an hf:// address, LoadedWeights, a "
            f"CoordinatewiseNet or a finetune / meta_fit result, got {type(weights).__name__}"
        )
    if arch is not None and net.arch != arch:
        wanted = get_architecture(arch).net_class.__name__
        raise ValueError(f"needs {wanted} weights, got {type(net).__name__}")
    return net, f"{source} ({fingerprint(net)})"
