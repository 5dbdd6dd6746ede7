"""Where meta-weights come from: shipped names, files, run directories, the Hub, nets.

:func:`load_weights` turns a source into a verified net (the file format, its checks and the
fingerprint are :mod:`l2l_optim.weight_file`'s, whose names this module also exports);
:func:`resolve_net` is the one place that turns what a user passes as ``weights=`` into a net.

Shipped weights are the ``<name>.safetensors`` files in the package's ``_weights/`` directory
(the wheel puts the repository's ``weights/`` there) or, for an editable install, in the
repository's ``weights/`` directory. The registry is whatever files are there. ``hf://``
addresses are downloaded by :mod:`l2l_optim.hub`, which passes its ``fetch`` down: this module
does not import the Hub's.

Example:
    >>> "simple" in list_weights()
    True
    >>> loaded = load_weights("simple")
    >>> loaded.path.name, loaded.fingerprint == fingerprint(loaded.net)
    ('simple.safetensors', True)
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .nets import CoordinatewiseNet
from .registry import get_architecture
from .weight_file import (
    DIR_FILENAME,
    FORMAT,
    MAX_HIDDEN_SIZE,
    SUFFIX,
    LoadedWeights,
    WeightsError,
    attach_metadata,
    fingerprint,
    read_file,
    read_header,
    save_weights,
    source_metadata,
)

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
    "shipped_files",
    "attach_metadata",
    "source_metadata",
    "MAX_HIDDEN_SIZE",
    "DIR_FILENAME",
]

_HF_PREFIX = "hf://"


def weights_dirs() -> list[Path]:
    """The directories searched for shipped weights, highest priority first (existing only)."""
    pkg = Path(__file__).resolve().parent
    candidates = [pkg / "_weights", pkg.parent.parent / "weights"]
    return [d for d in candidates if d.is_dir()]


def shipped_files() -> dict[str, Path]:
    """The shipped weight files, name -> path (an installed copy shadows the repository's)."""
    found: dict[str, Path] = {}
    for d in weights_dirs():
        for f in sorted(d.glob(f"*{SUFFIX}")):
            found.setdefault(f.name[: -len(SUFFIX)], f)
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
    return {name: read_header(path)[0] for name, path in sorted(shipped_files().items())}


def _looks_like_name(source: str) -> bool:
    return os.sep not in source and "/" not in source and not source.endswith(SUFFIX)


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
        l2l_optim.weight_file.WeightsError: ...
        >>> load_weights("no-such-weights")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
            ...
        l2l_optim.weight_file.WeightsError: unknown weights 'no-such-weights'; shipped weights: ...
    """
    if isinstance(source, str) and source.startswith(_HF_PREFIX):
        if fetch is None:
            raise WeightsError(f"{source}: Hub addresses are loaded by l2l_optim.load_weights "
                               "(l2l_optim.hub), which downloads them")
        return read_file(fetch(source), arch)
    if isinstance(source, str) and _looks_like_name(source):
        shipped = shipped_files()
        if source in shipped:
            return read_file(shipped[source], arch)
        if not Path(source).exists():
            available = ", ".join(sorted(shipped)) or "none are installed"
            raise WeightsError(f"unknown weights {source!r}; shipped weights: {available}")
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"weights source must be a str or path, got {type(source).__name__}")
    path = Path(source)
    if path.is_dir():
        path = path / DIR_FILENAME
    return read_file(path, arch)


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

