"""The device tables the Triton kernels read, and the handle that owns them.

A Triton launch covers every tensor of one group (one combination of dtypes, rms layout and
alignment) and finds its tensors through small device tables instead of kernel arguments:

* a **block table** per group: one int32 per program, the group's tensor whose block it
  takes (which block: the program's id less the tensor's first one, from the tensor table).
  One tensor operation builds it, so a billion parameters take milliseconds, not a Python
  loop per block;
* a **tensor table** per group: one row of :data:`ROW` int64 per tensor (addresses, element
  count, position in the call, first block), see :data:`SLOTS`;
* the **segments**: per tensor of the call, its first block among all groups' blocks and its
  number of blocks (the per-tensor sums behind an ``aggregate``);
* the learning rates of a call given as Python floats, the rms input norm's constants and
  the packed weights.

The block tables and segments depend only on the sizes and dtypes (a :class:`Layout`); the
tensor tables on the addresses too, so gradients that land at new addresses cost one small
upload, not a new layout.

**Lifetime.** A CUDA graph captured around a step holds the tables' addresses, so they must
outlive every replay. :class:`TritonTables` owns them: an optimizer keeps one (by default the
one :func:`tables_for` ties to its first hidden-state tensor, which lives as long as the
optimizer's state), and every table a step used while its stream was capturing stays alive
for as long as the handle does. Outside a capture the handle keeps the most recent tables
(least recently used go first); the non-finite scan, whose handle is a gradient's, also
finds its tables in the kernels' shared cache by their addresses, since fresh gradients every
step bring fresh handles. A table that is missing while a stream captures is an error: its
upload would be captured too, and the host buffer it reads would not outlive the capture.

Nothing here needs Triton or a GPU: :func:`build_layout` runs on meta tensors' sizes, which is
how ``benchmarks/triton_sm90.py`` times it for a billion parameters.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Callable, NamedTuple, Sequence

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from ._common import CACHE

__all__ = [
    "ROW",
    "SLOTS",
    "Group",
    "Layout",
    "block_table",
    "build_layout",
    "build_tensor_tables",
    "upload",
    "TritonTables",
    "tables_for",
    "check_not_capturing",
]

#: int64 slots per tensor in a tensor table (a power of two: the kernels index ``t * ROW``)
ROW = 8
#: what each slot of a tensor table's row holds (the kernels read them by these positions)
SLOTS = ("param", "grad", "hidden", "squares", "ones", "numel", "index", "first block")


class Group(NamedTuple):
    """One launch: its key, the call positions of its tensors and where its blocks sit."""

    key: tuple  # (param dtype, grad dtype, hidden dtype, rms layout, aligned), or a scan's key
    idx: tuple[int, ...]  # the tensors' positions in the call, in call order
    block: int  # coordinates per program
    n_blocks: int
    part_base: int  # the group's first block among all groups' blocks
    first: tuple[int, ...]  # per tensor, its first block in the group
    blocks: Tensor  # device int32, one per program: its tensor's position in the group


class Layout(NamedTuple):
    """The block tables and segments of one set of sizes and group keys."""

    groups: tuple[Group, ...]
    n_blocks: int  # all groups together
    n_total: int  # coordinates of the call
    segments: Tensor  # device int64: first block of each tensor, then each one's block count


def block_table(numels: Sequence[int], block: int) -> tuple[Tensor, Tensor]:
    """``(blocks, counts)``: per block the position of its tensor (int32), and per tensor its
    number of blocks (int64); CPU tensors, from one repeat over the blocks."""
    counts = (torch.tensor(list(numels), dtype=torch.int64) + (block - 1)) // block
    return torch.repeat_interleave(torch.arange(len(counts), dtype=torch.int32), counts), counts


def upload(host: Tensor, device: torch.device) -> Tensor:
    """``host`` on ``device``: from pinned memory without waiting on a GPU (the host buffer
    lives until the copy is done, by the caching host allocator's record of the stream)."""
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def build_layout(keys: Sequence[tuple], numels: Sequence[int], block: Callable[[tuple], int],
                 device: torch.device) -> Layout:
    """The :class:`Layout` of tensors with these group keys and sizes (empty ones take part in
    no group), with ``block(key)`` coordinates per program; one upload per group's block
    table (no copy of them into one buffer), one for the segments."""
    by_key: dict[tuple, list[int]] = {}
    for i, (key, n) in enumerate(zip(keys, numels)):
        if n:
            by_key.setdefault(key, []).append(i)
    T = len(numels)
    seg_first = torch.zeros(T, dtype=torch.int64)
    seg_count = torch.zeros(T, dtype=torch.int64)
    groups, base = [], 0
    for key, idx in by_key.items():
        size = block(key)
        blocks, counts = block_table([numels[i] for i in idx], size)
        first = torch.cumsum(counts, 0) - counts
        where = torch.tensor(idx, dtype=torch.int64)
        seg_first[where] = first + base
        seg_count[where] = counts
        groups.append(Group(key, tuple(idx), size, blocks.numel(), base, tuple(first.tolist()),
                            upload(blocks, device)))
        base += blocks.numel()
    segments = upload(torch.cat([seg_first, seg_count]), device)
    return Layout(tuple(groups), base, int(sum(numels)), segments)


def build_tensor_tables(layout: Layout, rows: Sequence[Sequence[int]],
                        device: torch.device) -> tuple[Tensor, ...]:
    """Per group of ``layout``, its tensor table: ``rows[i]`` (the first seven
    :data:`SLOTS`) for each of its tensors, then the tensor's first block; one upload for all
    groups."""
    flat: list[int] = []
    for grp in layout.groups:
        for i, first in zip(grp.idx, grp.first):
            flat.extend(rows[i])
            flat.extend([0] * (ROW - 1 - len(rows[i])))
            flat.append(first)
    on_device = upload(torch.tensor(flat, dtype=torch.int64).view(-1, ROW), device)
    out, r = [], 0
    for grp in layout.groups:
        out.append(on_device[r : r + len(grp.idx)])
        r += len(grp.idx)
    return tuple(out)


def check_not_capturing(device: torch.device, what: str) -> None:
    """RuntimeError when a table must be built while ``device``'s current stream captures a
    CUDA graph (its upload would become part of the graph, reading a host buffer that does
    not outlive the capture)."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"l2l_optim triton: the {what} of this step are not built yet, and the stream is "
            "capturing a CUDA graph. Run the step once outside the capture with the same "
            "tensors (at the same addresses) and learning rates, e.g. as the warm-up on the "
            "capturing stream; to change learning rates inside a captured graph, pass them "
            "as device tensors"
        )


class TritonTables:
    """The owner of a step's device tables (see the module's docstring for the lifetime).

    Keep one per optimizer (or per set of tensors stepped together) and pass it to
    :func:`~l2l_optim.kernels.triton.simple_update_triton` as ``tables``; without one, the
    step uses :func:`tables_for` of its first hidden state. Thread-safe.

    Args:
        max_entries: tables kept outside a capture (least recently used go first; those used
            during a capture are kept regardless).
    """

    def __init__(self, max_entries: int = 16) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple, Any] = OrderedDict()
        self._captured: dict[int, Any] = {}  # id -> table used while a stream captured

    def get(self, key: tuple, make: Callable[[], Any], device: torch.device, what: str,
            shared: bool = False) -> Any:
        """The table for ``key``: this handle's, else (with ``shared``) the kernels' shared
        cache's, else ``make()``, which RuntimeError forbids while ``device``'s stream
        captures (``what`` names the table in the message)."""
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
        if value is None:

            def build() -> Any:
                check_not_capturing(device, what)
                return make()

            value = CACHE.get(key, build) if shared else build()
            with self._lock:
                self._entries[key] = value
                while len(self._entries) > self.max_entries:
                    self._entries.popitem(last=False)
        self.hold_if_capturing(value, device)
        return value

    def hold_if_capturing(self, value: Any, device: torch.device) -> None:
        """Keep ``value`` for the handle's lifetime when ``device``'s stream is capturing."""
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            with self._lock:
                self._captured[id(value)] = value

    def __len__(self) -> int:
        return len(self._entries) + len(self._captured)


_HANDLES: WeakIdKeyDictionary = WeakIdKeyDictionary()
_HANDLES_LOCK = threading.Lock()


def tables_for(anchor: Tensor) -> TritonTables:
    """The :class:`TritonTables` tied to ``anchor``: alive exactly as long as that tensor
    (an optimizer's hidden state, a gradient), created on first use."""
    with _HANDLES_LOCK:
        handle = _HANDLES.get(anchor)
        if handle is None:
            handle = _HANDLES[anchor] = TritonTables()
        return handle
