"""Run storage under ``<out>/<experiment>/``: JSON and curve files, run claims, the file lock.

Every file is written to a temporary name and renamed into place, so a reader never sees a
half-written one. A run in progress holds ``<optimizer>_seed<k>.claim`` (created with
``O_EXCL``), so several processes can share one experiment: each takes the next run nobody
holds, and a claim whose process has died on this host is taken over.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import platform
from pathlib import Path
from typing import Any

import torch

__all__ = ["write_json", "read_json", "write_curve", "read_curve", "seed_curves", "claim_run", "file_lock",
           "machine", "now", "log"]


def _clean(obj: Any) -> Any:
    """JSON-safe: non-finite floats become None."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON (non-finite floats as null), atomically."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_clean(obj), indent=2, sort_keys=False) + "\n")
    tmp.replace(path)


def read_json(path: Path) -> Any | None:
    """The JSON in ``path``, or None if it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_curve(path: Path, losses: list[float]) -> None:
    """Write a ``step,train_loss`` CSV, atomically."""
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w") as f:
        f.write("step,train_loss\n")
        for i, v in enumerate(losses):
            f.write(f"{i},{v:.6g}\n")
    tmp.replace(path)


def read_curve(path: Path) -> list[float]:
    """The losses of a ``step,train_loss`` CSV."""
    with open(path) as f:
        next(f)
        return [float(line.split(",")[1]) for line in f if line.strip()]


def seed_curves(out: Path, key: str, seeds: int) -> dict[int, list[float]]:
    """Seed -> curve of the files ``<key>_seed<k>.csv`` (``k < seeds``) that exist."""
    return {seed: read_curve(p) for seed in range(seeds) if (p := out / f"{key}_seed{seed}.csv").exists()}


def log(msg: str, quiet: bool = False) -> None:
    """Progress on stdout (flushed: several processes may share a terminal or log file)."""
    if not quiet:
        print(msg, flush=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def now() -> str:
    """The local time, to the second, as written into the records."""
    return datetime.datetime.now().isoformat(timespec="seconds")


def claim_run(path: Path) -> bool:
    """Take ``path`` (a ``.claim`` file) for this process; False if another live process holds it.

    A claim left by a process that died on this machine is taken over, so an interrupted
    experiment resumes; a claim from another host is respected (whether its process lives
    cannot be told from here).
    """
    me = {"pid": os.getpid(), "host": platform.node()}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            owner = read_json(path) or {}
            if owner.get("host") == me["host"] and isinstance(owner.get("pid"), int) and not _pid_alive(owner["pid"]):
                path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            return owner.get("pid") == me["pid"] and owner.get("host") == me["host"]
        with os.fdopen(fd, "w") as f:
            json.dump(dict(me, started=now()), f)
        return True
    return False


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive advisory lock (POSIX ``flock``); a no-op where ``fcntl`` does not exist."""
    try:
        import fcntl
    except ImportError:  # Windows: one process per experiment
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def machine() -> dict:
    """What the timings depend on: cores, torch threads, load average, platform, torch version."""
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "loadavg": load,
            "platform": platform.platform(), "torch": torch.__version__}
