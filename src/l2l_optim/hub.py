"""The Hugging Face Hub: ``save_pretrained``, ``from_pretrained`` and ``push_to_hub``.

(About 580 lines: the model card is written from the same metadata the loading side
validates, so the two stay in one module.)

A Hub repo (or a local directory) of l2l-optim weights holds two files:

* ``weights.safetensors``: one net's weights and metadata, the format of
  :mod:`l2l_optim.weights` (safetensors only: nothing in the repo is unpickled);
* ``README.md``: a model card with YAML front matter (library name, license, tags) and the
  meta-training or fine-tuning recipe, the measured results and the commands that produced
  them, read from the weights' metadata.

The optimizers get these methods from :class:`HubMixin`; a
:class:`~l2l_optim.finetuning.FinetuneResult` has ``save_pretrained`` and ``push_to_hub`` too.
Nothing here touches the network unless it is given a Hub repo id: a local directory is
read as is, and a repo already in the local cache loads with ``HF_HUB_OFFLINE=1``.

Example:
    >>> import tempfile, torch
    >>> from l2l_optim import SimpleOptimizer
    >>> model = torch.nn.Linear(4, 2)
    >>> opt = SimpleOptimizer(model.parameters())
    >>> tmp = tempfile.TemporaryDirectory()
    >>> folder = opt.save_pretrained(tmp.name)
    >>> again = SimpleOptimizer.from_pretrained(folder, model.parameters())
    >>> again.meta_fingerprint == opt.meta_fingerprint
    True
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from .model_card import model_card
from .nets import CoordinatewiseNet
from .registry import get_architecture
from .weight_file import (
    DIR_FILENAME,
    SUFFIX,
    LoadedWeights,
    WeightsError,
    fingerprint,
    save_weights,
    source_metadata,
)
from .weights import load_weights as _load_weights
from .weights import resolve_net as _resolve_net

__all__ = [
    "CARD_FILENAME",
    "HubMixin",
    "save_pretrained",
    "load_pretrained",
    "push_to_hub",
    "model_card",
    "hub_download",
    "fetch",
    "load_weights",
    "resolve_net",
    "check_hub_filename",
]

CARD_FILENAME = "README.md"
# measured values a weight file may carry, with what they mean, in card order
_HINT = "use a shipped name (see `l2l-optim info`) or a local path instead"


def _offline() -> bool:
    # the variable is read at call time too (the hub library reads it once, at import), so
    # that offline mode set later is still honoured and never waits on the network
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


# seconds to wait for a TCP connection to the Hub before taking it as unreachable
_PROBE_TIMEOUT = 3.0


def _hub_reachable() -> bool:
    """Whether a TCP connection to the Hub's endpoint opens within a few seconds.

    The hub library retries a failed connection five times with back-off (about 25 s); one
    short probe first turns "no network" into the local-cache-only path at once. With a
    proxy configured the probe would test the wrong route, so the library decides.
    """
    import socket
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlsplit(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=_PROBE_TIMEOUT).close()
    except OSError:
        return False
    return True


def _hub_error(e: Exception, repo_id: str, filename: str, revision: str | None, offline: bool) -> str:
    """Why a Hub download failed, in words, from the exception the hub library raised."""
    from huggingface_hub import utils as hf

    at = f" at revision {revision!r}" if revision else ""
    if isinstance(e, hf.HFValidationError):
        return f"invalid repo id {repo_id!r} ({e})"
    if isinstance(e, hf.LocalEntryNotFoundError):  # before EntryNotFoundError, its base
        if offline:
            return f"{filename!r} of {repo_id!r}{at} is not in the local cache and HF_HUB_OFFLINE is set"
        return (f"the Hub cannot be reached and {filename!r} of {repo_id!r}{at} is not in the "
                "local cache")
    if isinstance(e, hf.GatedRepoError):
        return f"{repo_id!r} is gated: accept its conditions on the Hub and log in (`hf auth login`)"
    if isinstance(e, hf.RepositoryNotFoundError):
        return f"no repo {repo_id!r} on the Hub (or it is private: log in with `hf auth login`)"
    if isinstance(e, hf.RevisionNotFoundError):
        return f"no revision {revision!r} in the Hub repo {repo_id!r}"
    if isinstance(e, hf.EntryNotFoundError):
        return f"no file {filename!r} in the Hub repo {repo_id!r}{at}"
    return f"{type(e).__name__}: {e}"


def check_hub_filename(filename: str) -> None:
    """Raise ValueError unless ``filename`` names a ``.safetensors`` file inside a Hub repo.

    Args:
        filename: a path inside a Hub repo.

    Raises:
        ValueError: not a ``.safetensors`` name, a backslash, or an empty, ``.`` or ``..``
            path part.

    Example:
        >>> check_hub_filename("weights.safetensors")
        >>> check_hub_filename("../weights.safetensors")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
            ...
        ValueError: invalid filename '../weights.safetensors': ...
    """
    parts = filename.split("/")
    if (not filename.endswith(SUFFIX) or "\\" in filename
            or any(part in ("", ".", "..") for part in parts)):
        raise ValueError(
            f"invalid filename {filename!r}: weights on the Hub are .safetensors files "
            "inside the repo (no '..', no empty path parts)"
        )


def hub_download(repo_id: str, filename: str = DIR_FILENAME, *, revision: str | None = None) -> Path:
    """One file of a Hugging Face Hub repo, from the local cache or downloaded into it.

    ``HF_HUB_OFFLINE=1`` uses the cache only; ``HF_HUB_CACHE``, when set, names the cache
    directory. Both are read at call time. When the Hub cannot be reached within a few
    seconds, the cache is used as if offline, so that no network fails fast too.

    Args:
        repo_id: ``"<owner>/<repo>"``.
        filename: a ``.safetensors`` path inside the repo.
        revision: a branch, tag or commit (default: the main branch).

    Returns:
        The local path of the file.

    Raises:
        WeightsError: an invalid repo id or filename, no such repo, revision or file, no
            network and nothing cached, or ``huggingface_hub`` is not installed; the message
            says which.

    Example:
        >>> hub_download("someone/their-optimizer")  # doctest: +SKIP
        PosixPath('.../snapshots/.../weights.safetensors')

        Names are checked before anything is looked up:

        >>> hub_download("someone/their-optimizer", "weights.pt")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
            ...
        l2l_optim.weight_file.WeightsError: hf://someone/their-optimizer/weights.pt: invalid filename ...
    """
    where = f"hf://{repo_id}" + (f"@{revision}" if revision else "") + f"/{filename}"
    try:
        check_hub_filename(filename)
    except ValueError as e:
        raise WeightsError(f"{where}: {e}") from None
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise WeightsError(f"{where}: huggingface_hub is not installed; {_HINT}") from None
    offline = _offline()
    local_only = offline or not _hub_reachable()
    try:
        local = hf_hub_download(
            repo_id, filename, revision=revision, local_files_only=local_only,
            cache_dir=os.environ.get("HF_HUB_CACHE") or None, etag_timeout=10,
        )
    except Exception as e:  # the hub raises many types (HTTP, offline, not found, ...)
        raise WeightsError(
            f"{where}: cannot get it from the Hugging Face Hub: "
            f"{_hub_error(e, repo_id, filename, revision, offline)}; {_HINT}"
        ) from None
    return Path(local)


# ------------------------------------------------------------------------ model cards


def save_pretrained(
    net: CoordinatewiseNet,
    save_directory: str | os.PathLike,
    *,
    metadata: dict[str, Any] | None = None,
    repo_id: str | None = None,
) -> Path:
    """Write ``weights.safetensors`` and a ``README.md`` model card into ``save_directory``.

    Args:
        net: the net to save.
        save_directory: the directory (created if missing; existing files of these two
            names are replaced, each atomically).
        metadata: the weights' metadata (default: what :func:`~l2l_optim.weights.source_metadata`
            knows about ``net``).
        repo_id: the Hub repo the card's usage example names.

    Returns:
        The directory.

    Raises:
        TypeError: ``net`` is not a CoordinatewiseNet.
        ValueError: ``save_directory`` is an existing file.

    Example:
        >>> import tempfile
        >>> from l2l_optim.nets import SimpleOptimizerNet
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     print(sorted(p.name for p in save_pretrained(SimpleOptimizerNet(), folder).iterdir()))
        ['README.md', 'weights.safetensors']
    """
    if not isinstance(net, CoordinatewiseNet):
        raise TypeError(f"save_pretrained needs a CoordinatewiseNet, got {type(net).__name__}")
    directory = Path(save_directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"save_pretrained: {directory} is a file, not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    meta = dict(source_metadata(net) if metadata is None else metadata)
    path = save_weights(net, directory / DIR_FILENAME, metadata=meta)
    stored = load_weights(path).metadata  # the card describes what the file holds
    card = model_card(net, stored, repo_id=repo_id)
    fd, tmp = tempfile.mkstemp(prefix=f".{CARD_FILENAME}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(card)
        os.replace(tmp, directory / CARD_FILENAME)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return directory


def load_pretrained(
    repo_id_or_dir: str | os.PathLike, *, arch: str | None = None, revision: str | None = None
) -> LoadedWeights:
    """The weights of a local directory or a Hub repo written by :func:`save_pretrained`.

    A local directory wins over a repo id spelled the same. A repo id is looked up in the
    local Hugging Face cache first and downloaded only when missing; ``HF_HUB_OFFLINE=1``
    never touches the network.

    Args:
        repo_id_or_dir: a directory holding ``weights.safetensors``, or ``"<owner>/<name>"``.
        arch: if given, the architecture the weights must have.
        revision: a branch, tag or commit of the Hub repo (default: main); not allowed
            with a local directory.

    Returns:
        The verified :class:`~l2l_optim.weights.LoadedWeights`.

    Raises:
        WeightsError: no such directory or repo, offline with nothing cached, or weights
            that fail validation or are of another architecture; the message says which.

    Example:
        >>> import tempfile
        >>> from l2l_optim.nets import DMOptimizerNet
        >>> tmp = tempfile.TemporaryDirectory()
        >>> folder = save_pretrained(DMOptimizerNet(), tmp.name)
        >>> load_pretrained(folder).net.arch
        'dm'
        >>> load_pretrained(folder, arch="simple")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
            ...
        l2l_optim.weight_file.WeightsError: ...
        >>> load_pretrained("someone/their-optimizer", arch="simple")  # doctest: +SKIP
    """
    if not isinstance(repo_id_or_dir, (str, os.PathLike)):
        raise TypeError(
            f"from_pretrained needs a directory or a Hub repo id, got {type(repo_id_or_dir).__name__}"
        )
    local = Path(repo_id_or_dir).expanduser()
    if local.is_dir():
        if revision is not None:
            raise WeightsError(f"{local}: a local directory has no revision (got revision={revision!r})")
        return load_weights(local / DIR_FILENAME, arch=arch)
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    name = os.fspath(repo_id_or_dir)
    try:
        if isinstance(repo_id_or_dir, os.PathLike) or name.startswith((".", "/", "~")):
            raise HFValidationError("a path")
        validate_repo_id(name)
        if name.count("/") != 1:
            raise HFValidationError("not <owner>/<name>")
    except HFValidationError:
        raise WeightsError(
            f"{name}: no such directory, and not a Hugging Face Hub repo id (<owner>/<name>)"
        ) from None
    return load_weights(hub_download(name, DIR_FILENAME, revision=revision), arch=arch)


def push_to_hub(
    net: CoordinatewiseNet,
    repo_id: str,
    *,
    metadata: dict[str, Any] | None = None,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
) -> Any:
    """Save ``net`` as :func:`save_pretrained` does and upload both files to a Hub repo.

    The repo is created if it does not exist. Only ``weights.safetensors`` and ``README.md``
    are uploaded.

    Args:
        net: the net to upload.
        repo_id: ``"<owner>/<name>"``.
        metadata: as in :func:`save_pretrained`.
        private: create the repo private (an existing repo keeps its visibility).
        token: a Hub token (default: the one ``hf auth login`` stored).
        revision: the branch to commit to (default: main).
        commit_message: the commit message (default: names the architecture and fingerprint).

    Returns:
        The ``huggingface_hub`` commit info of the upload.

    Raises:
        WeightsError: the repo cannot be created or written (no token, no network, no rights).

    Example:
        Needs a Hub token with write access and the network, so it is not run here:

        >>> push_to_hub(opt.net, "me/my-optimizer")  # doctest: +SKIP
    """
    from huggingface_hub import HfApi

    message = commit_message or f"l2l-optim {net.arch} weights {fingerprint(net)}"
    with tempfile.TemporaryDirectory(prefix="l2l-optim-push-") as folder:
        save_pretrained(net, folder, metadata=metadata, repo_id=repo_id)
        api = HfApi(token=token)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            return api.upload_folder(
                repo_id=repo_id, folder_path=folder, revision=revision, commit_message=message,
                allow_patterns=[DIR_FILENAME, CARD_FILENAME],
            )
        except Exception as e:  # the hub raises many types (HTTP, auth, offline, validation)
            raise WeightsError(f"push_to_hub: cannot upload to {repo_id!r} ({type(e).__name__}: {e})") from None


def _optimizer_for(base: type, arch: str) -> type:
    """The optimizer class for weights of ``arch``: among ``base`` and its subclasses (nearest
    first), the registry's class for ``arch``; ``base`` itself where none of them is (a subclass
    of ``LearnedOptimizer`` with its own rules)."""
    name = get_architecture(arch).optimizer_name
    queue = [base]
    while queue:
        candidate = queue.pop(0)
        if candidate.__name__ == name and getattr(candidate, "_required_arch", None) == arch:
            return candidate
        queue.extend(candidate.__subclasses__())
    return base


class HubMixin:
    """``from_pretrained``, ``save_pretrained`` and ``push_to_hub`` for the learned optimizers.

    Mixed into :class:`~l2l_optim.optimizer.LearnedOptimizer`; the weights are the
    optimizer's meta-weights (``self.net``), not its state or options.
    """

    @classmethod
    def from_pretrained(
        cls, repo_id_or_dir: str | os.PathLike, params, *, revision: str | None = None, **optimizer_kwargs
    ):
        """An optimizer over ``params`` with the meta-weights of a directory or Hub repo.

        Args:
            repo_id_or_dir: a directory written by :meth:`save_pretrained`, or a Hub repo id
                (see :func:`load_pretrained`).
            params: the parameters or parameter groups, as for the constructor.
            revision: a branch, tag or commit of the Hub repo.
            **optimizer_kwargs: any other constructor option (``lr``, ``weight_decay``, ...).

        Returns:
            The optimizer. Called on ``LearnedOptimizer`` itself, it is the class the
            weights' architecture uses (``SimpleOptimizer`` for ``simple`` weights, ...).

        Raises:
            WeightsError: as :func:`load_pretrained` (missing, offline miss, invalid, or
                weights of another architecture).
            TypeError: ``weights=`` was passed too.

        Example:
            >>> import tempfile, torch
            >>> from l2l_optim import LearnedOptimizer, RNNProp
            >>> model = torch.nn.Linear(3, 1)
            >>> tmp = tempfile.TemporaryDirectory()
            >>> folder = RNNProp(model.parameters()).save_pretrained(tmp.name)
            >>> opt = LearnedOptimizer.from_pretrained(folder, model.parameters(), lr=0.5)
            >>> type(opt).__name__, opt.param_groups[0]["lr"]
            ('RNNProp', 0.5)

            A Hub repo id works the same way (downloaded once, then read from the cache):

            >>> opt = SimpleOptimizer.from_pretrained("me/my-optimizer", model.parameters())  # doctest: +SKIP
        """
        if "weights" in optimizer_kwargs:
            raise TypeError("from_pretrained takes the weights from repo_id_or_dir; do not pass weights=")
        required = getattr(cls, "_required_arch", None)
        loaded = load_pretrained(repo_id_or_dir, arch=required, revision=revision)
        target = cls if required is not None else _optimizer_for(cls, loaded.net.arch)
        return target(params, weights=loaded, **optimizer_kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, *, repo_id: str | None = None) -> Path:
        """Write the meta-weights and a model card into ``save_directory``.

        Args:
            save_directory: the directory (created if missing).
            repo_id: the Hub repo the card's usage example names.

        Returns:
            The directory.

        Raises:
            ValueError: ``save_directory`` is an existing file.

        Example:
            >>> import tempfile, torch
            >>> from l2l_optim import SimpleOptimizer
            >>> opt = SimpleOptimizer(torch.nn.Linear(3, 1).parameters())
            >>> with tempfile.TemporaryDirectory() as folder:
            ...     print(sorted(p.name for p in opt.save_pretrained(folder).iterdir()))
            ['README.md', 'weights.safetensors']
        """
        return save_pretrained(self.net, save_directory, repo_id=repo_id)

    def push_to_hub(self, repo_id: str, **kwargs) -> Any:
        """Upload the meta-weights and a model card to a Hub repo (see :func:`push_to_hub`).

        Args:
            repo_id: ``"<owner>/<name>"``.
            **kwargs: ``private``, ``token``, ``revision``, ``commit_message``.

        Returns:
            The commit info of the upload.

        Raises:
            WeightsError: the upload failed.

        Example:
            Needs a Hub token with write access and the network, so it is not run here:

            >>> opt.push_to_hub("me/my-optimizer")  # doctest: +SKIP
        """
        return push_to_hub(self.net, repo_id, **kwargs)


def fetch(source: str) -> Path:
    """The local file of an ``hf://<owner>/<repo>[@revision]/<filename>`` address
    (:func:`hub_download`; the filename defaults to ``weights.safetensors``).

    Raises:
        WeightsError: a malformed address, or a download that failed.

    Example:
        >>> fetch("hf://someone")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
            ...
        l2l_optim.weight_file.WeightsError: hf://someone: expected hf://<owner>/<repo>[@revision]/<filename>
    """
    parts = source.removeprefix("hf://").split("/")
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise WeightsError(f"{source}: expected hf://<owner>/<repo>[@revision]/<filename>")
    repo, revision = parts[1], None
    if "@" in repo:
        repo, revision = repo.split("@", 1)
    return hub_download(f"{parts[0]}/{repo}", "/".join(parts[2:]) or DIR_FILENAME, revision=revision)


def load_weights(source: str | os.PathLike, *, arch: str | None = None) -> LoadedWeights:
    """:func:`l2l_optim.weights.load_weights` that also downloads ``hf://`` addresses.

    Args:
        source: a shipped name, a ``.safetensors`` path, a run directory or an ``hf://``
            address.
        arch: if given, the architecture the file must hold.

    Returns:
        A :class:`~l2l_optim.weights.LoadedWeights`.

    Raises:
        WeightsError: as :func:`l2l_optim.weights.load_weights`, or a failed download.

    Example:
        >>> load_weights("simple").net.num_parameters()
        132
    """
    return _load_weights(source, arch=arch, fetch=fetch)


def resolve_net(weights: Any, *, arch: str | None = None) -> tuple[CoordinatewiseNet, str]:
    """:func:`l2l_optim.weights.resolve_net` that also downloads ``hf://`` addresses: what the
    optimizers, ``finetune``, ``evaluate`` and meta-training call on a user's ``weights=``."""
    return _resolve_net(weights, arch=arch, fetch=fetch)

