"""The meta-weight file format: a safetensors file with metadata, validated from its header,
and the fingerprint that ties the metadata to the tensors.

A weight file is a ``.safetensors`` file holding one coordinate-wise net's ``state_dict`` in
float32 plus string metadata:

* ``format``: ``"l2l-optim-weights/1"``
* ``arch``: the net's registry name (``"simple"``, ``"dm"``, ``"rnnprop"``)
* ``config``: the net's constructor arguments, as JSON
* ``package_version``: the l2l-optim version that wrote the file
* ``fingerprint``: :func:`fingerprint` of the net, checked on every read
* anything the writer adds (recipe, command, seed, final_meta_loss, ...), JSON-encoded
  unless it already is a string

Reading trusts nothing: a file may be truncated, tampered with or not ours at all, so the
header is checked before any byte of the body is read, and every malformed file is a
:class:`WeightsError` that names the file and the problem. Where a file comes from (a shipped
name, a run directory, the Hub) is :mod:`l2l_optim.weights`'s business.

Example:
    >>> import tempfile
    >>> from l2l_optim.nets import SimpleOptimizerNet
    >>> tmp = tempfile.TemporaryDirectory()
    >>> path = save_weights(SimpleOptimizerNet(), f"{tmp.name}/mine.safetensors", metadata={"seed": 0})
    >>> loaded = read_file(path, arch="simple")
    >>> loaded.metadata["seed"], loaded.fingerprint == fingerprint(loaded.net)
    ('0', True)
"""

from __future__ import annotations

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
from typing import Any, NamedTuple

import torch

from .nets import CoordinatewiseNet
from .registry import ARCHITECTURES, build_net, get_architecture

__all__ = [
    "FORMAT",
    "SUFFIX",
    "DIR_FILENAME",
    "MAX_HIDDEN_SIZE",
    "WeightsError",
    "LoadedWeights",
    "fingerprint",
    "save_weights",
    "read_header",
    "read_file",
    "attach_metadata",
    "source_metadata",
]

FORMAT = "l2l-optim-weights/1"
SUFFIX = ".safetensors"
#: the file a run directory holds (what meta_fit writes), read when a source is a directory
DIR_FILENAME = "weights.safetensors"
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
    """What :func:`read_file` and :func:`~l2l_optim.weights.load_weights` return.

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
        ...     print(path.name, read_file(path).metadata["seed"])
        w.safetensors 1

        A directory means ``<directory>/weights.safetensors``, what
        :func:`~l2l_optim.weights.load_weights` reads from a directory:

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


def read_header(path: Path) -> tuple[dict[str, str], dict[str, dict]]:
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


def read_file(path: Path, arch: str | None = None) -> LoadedWeights:
    """Read and verify one weight file: its header first (nothing of the body is read for a
    file that is not ours, or whose config or shapes are wrong), then the tensors, which must
    give the fingerprint the header names.

    Args:
        path: the ``.safetensors`` file.
        arch: if given, the architecture the file must hold.

    Raises:
        WeightsError: as :func:`~l2l_optim.weights.load_weights`.
    """
    from safetensors.torch import load as st_load

    if not path.is_file():
        raise WeightsError(f"{path}: no such weight file")
    # the header alone first: a file that is not ours, or whose config or shapes are wrong,
    # is refused without reading its body
    meta, entries = read_header(path)
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

