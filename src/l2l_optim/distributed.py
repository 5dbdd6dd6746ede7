"""Sharded parameters (FSDP2, DTensor): how the optimizers step them across processes.

Under :func:`torch.distributed.fsdp.fully_shard` (FSDP2) every parameter is a
:class:`~torch.distributed.tensor.DTensor` of which each process holds one shard (``Shard(0)``:
a block of rows, uneven or empty when the rows do not divide). The optimizers step the local
shards (``p.to_local()``, ``p.grad.to_local()``) with the same kernels as plain tensors. Two
things couple the processes, one all-reduce each over the parameters' device mesh:

* SimpleOptimizer's one global quantity, ``w_b . mean(h')`` over every coordinate stepped:
  pass 1 of the fused kernel gives, per tensor, the sum of ``w_b . h'`` over the local
  coordinates; those are added over the processes and divided by the global coordinate count
  (the sum of the parameters' global ``numel``) before pass 2 (the ``aggregate`` of
  :func:`l2l_optim.functional.simple_update`). The step equals the unsharded step up to the
  order of float additions.
* the non-finite gradient policy: per-tensor finiteness flags are added over the processes, so
  that every process skips (or raises for) the same steps.

DMOptimizer and RNNProp (coordinate-independent nets) need nothing more. DDP needs nothing at
all: its parameters are plain tensors and its gradients are already averaged.

**Supported**: DTensor parameters whose placements are ``Shard(d)`` or ``Replicate()`` on every
mesh dimension (FSDP2, HSDP, tensor parallelism), all on one device mesh, with DTensor
gradients on that mesh (redistributed to the parameter's placements where they differ, e.g.
``Partial``). A replicated dimension holds the same coordinates on every process along it, so
their sums are divided by its size before they are added. Refused with a TypeError or
NotImplementedError that names the parameter: other placements (``Partial``, strided shards),
other tensor subclasses, a step that mixes DTensor and plain parameters, and an optimizer whose
net couples coordinates in its own ``forward`` (``LearnedOptimizer`` with a
SimpleOptimizerNet; SimpleOptimizer is the fused path for that net).

**State layout.** A state tensor of shape ``(*lead, numel)`` for a plain parameter (``h``:
``(10, numel)``; RNNProp's ``m``: ``(numel,)``) is, for a DTensor parameter, a DTensor of
global shape ``(*lead, *p.shape)`` on the parameter's mesh, with the parameter's placements and
every ``Shard(d)`` moved to ``Shard(d + len(lead))``. Each process then holds
``(*lead, *local_shape)``, the state of exactly its coordinates, whose flat view
``(*lead, local_numel)`` the kernels update in place. A flat ``(*lead, numel)`` DTensor
sharded on its last dimension would not do: DTensor cuts a dimension into chunks of
``ceil(size / processes)``, so with uneven shards its chunks of the flattened coordinates are not
the parameter's chunks of rows. ``torch.distributed.checkpoint`` saves, gathers and reshards
these states as it does Adam's ``exp_avg``; ``step`` stays a plain 0-dim tensor, and so does
a value kept once per tensor (``net.per_tensor_state``: SimpleOptimizer's bias correction
``c``, shape ``(1,)``), which is the same on every process since every process takes the same
steps.
:meth:`~l2l_optim.optimizer.LearnedOptimizer.load_state_dict` also takes full (plain) state
tensors of either shape, for a plain or a DTensor parameter (each process keeps its slice),
and a per-tensor value saved with one entry per coordinate (:func:`per_tensor_value`).

**Stochastic rounding.** A bfloat16 hidden state's rounding bits are a function of the
coordinate's index in its tensor (:mod:`l2l_optim.rounding`); a shard that is one contiguous
range of its tensor (``Shard(0)`` or ``Replicate()``, FSDP2's layout) passes its offset
(:func:`flat_offset`), so the sharded step rounds exactly as one process would. Other shards
(``Shard(d)`` with ``d > 0``) draw bits from their local indices: the same distribution,
other values.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .nonfinite import finite_flags

try:  # torch builds without distributed support have no DTensor: then nothing is sharded
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
except ImportError:  # pragma: no cover - every supported platform ships torch.distributed
    DTensor = None

__all__ = ["SUPPORTED", "is_dtensor", "check_param", "prepare_step", "ShardedStep",
           "init_state", "check_state", "place_state", "per_tensor_value"]

SUPPORTED = (
    "plain tensors, and DTensors whose placements are Shard(dim) or Replicate() on one device "
    "mesh (torch.distributed.fsdp.fully_shard, HSDP, tensor parallelism)"
)
_PLAIN_TYPES = (Tensor, torch.nn.Parameter)


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a :class:`~torch.distributed.tensor.DTensor`."""
    return DTensor is not None and isinstance(t, DTensor)


def _describe(t: Tensor) -> str:
    kind = f"{type(t).__module__}.{type(t).__qualname__}"
    if is_dtensor(t):
        return f"a DTensor of shape {tuple(t.shape)} with placements {tuple(t.placements)}"
    return f"a {kind} of shape {tuple(t.shape)}"


def check_param(name: str, index: int, p: Tensor) -> None:
    """Raise unless the optimizers can step ``p`` (called for every parameter when it is added).

    Args:
        name: the optimizer's class name, for the message.
        index: the parameter's index across all groups.
        p: the parameter.

    Raises:
        TypeError: ``p`` is a tensor subclass other than DTensor (and nn.Parameter).
        NotImplementedError: ``p`` is a DTensor with a placement other than Shard / Replicate.
    """
    if type(p) in _PLAIN_TYPES:
        return
    if not is_dtensor(p):
        raise TypeError(
            f"{name}: parameter {index} is {_describe(p)}; supported: {SUPPORTED}"
        )
    bad = [pl for pl in p.placements if type(pl) not in (Shard, Replicate)]
    if bad:
        raise NotImplementedError(
            f"{name}: parameter {index} is {_describe(p)}; placement {bad[0]} is not supported "
            f"(supported: {SUPPORTED})"
        )
    local = p.to_local()
    if type(local) not in _PLAIN_TYPES:
        raise TypeError(
            f"{name}: parameter {index} is a DTensor whose local shard is {_describe(local)}; "
            f"supported: {SUPPORTED}"
        )


def _shifted(placements, lead: int) -> tuple:
    """The parameter's placements for a state of shape ``(*lead, *p.shape)``."""
    return tuple(Shard(pl.dim + lead) if isinstance(pl, Shard) else pl for pl in placements)


def _contiguous_stride(shape) -> tuple[int, ...]:
    stride, acc = [], 1
    for n in reversed(shape):
        stride.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(stride))


def _all_reduce(t: Tensor, mesh) -> None:
    """Sum ``t`` in place over every process of ``mesh`` (one all-reduce per mesh dimension)."""
    for d in range(mesh.ndim):
        if mesh.size(d) > 1:
            dist.all_reduce(t, group=mesh.get_group(d))


class ShardedStep:
    """One optimizer step over DTensor parameters, seen from this process.

    Attributes:
        params, grads: the local shards (plain tensors) of the parameters and gradients.
        mesh: the parameters' device mesh.
        count: the global number of coordinates stepped.
        offsets: per parameter, the index of its local shard's first coordinate in the whole
            tensor (flattened), where the shard is one contiguous range of it (sharded on
            dimension 0 only, or replicated); else None.
    """

    def __init__(self, params: list[Tensor], grads: list[Tensor], mesh, count: int,
                 scales: Tensor | None, offsets: list[int | None] | None = None) -> None:
        self.params = params
        self.offsets = offsets if offsets is not None else [None] * len(params)
        self.grads = grads
        self.mesh = mesh
        self.count = count
        self._scales = scales

    def finite(self) -> Tensor:
        """Per tensor: whether its gradient is finite on every process (one all-reduce).

        Returns:
            A bool tensor with one entry per parameter, the same on every process.
        """
        bad = (~finite_flags(self.grads)).to(torch.float32)
        _all_reduce(bad, self.mesh)
        return bad == 0

    def aggregate(self, sums: Tensor) -> Tensor:
        """``w_b . mean(h')`` over every process's coordinates, from this process's sums.

        Args:
            sums: per local tensor, the sum of ``w_b . h'`` over its coordinates (float64).

        Returns:
            The 0-dim float64 tensor to add to every coordinate (one all-reduce).
        """
        if self._scales is not None:
            sums = sums * self._scales
        total = sums.sum().reshape(1)
        _all_reduce(total, self.mesh)
        return (total / self.count).reshape(())

    def local_states(self, states: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
        """The ``(*lead, local_numel)`` views of the parameters' DTensor states (plain
        entries such as ``step`` as they are), for the update to read and write in place.

        Args:
            states: the parameters' state dicts (DTensor state, plus ``step``).
        """
        return [{k: _local_view(v, p) if is_dtensor(v) else v for k, v in state.items()}
                for p, state in zip(self.params, states)]

    @staticmethod
    def write_back(views: list[dict[str, Tensor]], given: list[dict[str, Tensor]]) -> None:
        """Copy into ``views`` what an update handed back as fresh tensors in ``given`` (a
        dict per parameter that started as a copy of its views): an update may replace a state
        tensor instead of writing it in place."""
        for view, out in zip(views, given):
            for k, t in out.items():
                if t is not view[k]:
                    view[k].copy_(t)


def _local_view(state: Tensor, p_local: Tensor) -> Tensor:
    """The ``(*lead, local_numel)`` view of a DTensor state's local ``(*lead, *local_shape)``."""
    local = state.to_local()
    lead = local.shape[: local.dim() - p_local.dim()]
    return local.view(*lead, p_local.numel())


def flat_offset(p: Tensor) -> int | None:
    """Where DTensor ``p``'s local shard starts in the flattened whole tensor, when the shard
    is one contiguous range of it (placements Shard(0) or Replicate, torch's even chunks
    along dimension 0 on each sharded mesh dimension, in order); else None."""
    if any(isinstance(pl, Shard) and pl.dim != 0 for pl in p.placements):
        return None
    if any(not isinstance(pl, (Shard, Replicate)) for pl in p.placements):
        return None
    rows = p.shape[0] if p.dim() else 1
    start, size = 0, rows
    coord = p.device_mesh.get_coordinate()
    if coord is None:  # this process holds no shard
        return None
    for d, pl in enumerate(p.placements):
        if isinstance(pl, Shard):
            chunk = -(-size // p.device_mesh.size(d))  # torch.chunk's: ceil
            first = min(coord[d] * chunk, size)
            start += first
            size = min(chunk, size - first)
    return start * (p.numel() // rows if rows else 0)


def prepare_step(name: str, params: list[Tensor], grads: list[Tensor], where, *,
                 couples_coordinates: bool = False) -> ShardedStep | None:
    """Check a step's parameters and take their local shards.

    Args:
        name: the optimizer's class name, for the messages.
        params, grads: the parameters with a gradient, and those gradients.
        where: per parameter, ``(index across groups, group index)``, for the messages.
        couples_coordinates: the update averages over the coordinates it is given in a way
            that :meth:`ShardedStep.aggregate` cannot reach (a net's own ``forward``); such a
            step is refused for sharded parameters.

    Returns:
        None when no parameter is a DTensor (the plain path, nothing to do), else the
        :class:`ShardedStep`.

    Raises:
        NotImplementedError: DTensor and plain parameters in one step, parameters on several
            meshes, an unsupported placement, or ``couples_coordinates``.
        TypeError: a DTensor parameter with a gradient that is not a DTensor on its mesh.
    """
    if not any(is_dtensor(p) for p in params):
        return None
    if couples_coordinates:
        raise NotImplementedError(
            f"{name} runs its net through its forward, which averages over the coordinates it "
            "is given and cannot see other processes' shards; for sharded parameters use "
            "SimpleOptimizer (an all-reduce between its kernel's passes)"
        )
    mesh = next(p.device_mesh for p in params if is_dtensor(p))
    local_params, local_grads, scales, offsets = [], [], [], []
    count = 0
    for (i, _), p, g in zip(where, params, grads):
        if not is_dtensor(p):
            raise NotImplementedError(
                f"{name}: parameter {i} is {_describe(p)} while others in the step are "
                "DTensors; the mean over coordinates spans every parameter, so shard them all "
                "(fully_shard the root module too) or give the plain ones their own optimizer"
            )
        check_param(name, i, p)
        if p.device_mesh != mesh:
            raise NotImplementedError(
                f"{name}: parameter {i} lives on {p.device_mesh}, another parameter on {mesh}; "
                "one optimizer steps parameters of one device mesh"
            )
        if not is_dtensor(g) or g.device_mesh != mesh:
            raise TypeError(
                f"{name}: parameter {i} is a DTensor but its gradient is {_describe(g)}"
                + ("" if not is_dtensor(g) else f" on {g.device_mesh}")
                + f"; expected a DTensor gradient on {mesh}"
            )
        if tuple(g.placements) != tuple(p.placements):
            g = g.redistribute(mesh, p.placements)
        local_params.append(p.to_local())
        local_grads.append(g.to_local())
        replicas = math.prod(mesh.size(d) for d, pl in enumerate(p.placements)
                             if isinstance(pl, Replicate))
        scales.append(1.0 / replicas)
        offsets.append(flat_offset(p))
        count += p.numel()
    device = local_params[0].device
    scale_t = None
    if any(s != 1.0 for s in scales):
        scale_t = torch.tensor(scales, dtype=torch.float64, device=device)
    return ShardedStep(local_params, local_grads, mesh, count, scale_t, offsets)


def init_state(net, p: Tensor, dtype: torch.dtype) -> dict[str, Tensor]:
    """The net's initial state for the local shard of DTensor ``p``, as DTensors.

    Args:
        net: the optimizer's net (``init_state(n)`` gives ``(*lead, n)`` tensors).
        p: a DTensor parameter.
        dtype: the state dtype.

    Returns:
        One DTensor per state key, of global shape ``(*lead, *p.shape)`` (see the module
        docstring for the placements); the net's per-tensor keys stay plain ``(1,)`` tensors.
    """
    local = p.to_local()
    state = net.init_state(local.numel(), device=local.device, dtype=dtype)
    per_tensor = set(net.per_tensor_state)
    return {k: t if k in per_tensor else _as_dtensor(t.reshape(*t.shape[:-1], *local.shape), p)
            for k, t in state.items()}


def _as_dtensor(local: Tensor, p: Tensor) -> Tensor:
    lead = local.dim() - p.to_local().dim()
    shape = (*local.shape[:lead], *p.shape)
    return DTensor.from_local(local, p.device_mesh, _shifted(p.placements, lead),
                              run_check=False, shape=torch.Size(shape),
                              stride=_contiguous_stride(shape))


def check_state(value: Any, p: Tensor, flat_shape: torch.Size, what: str) -> None:
    """Raise unless ``value`` can become the state tensor ``what`` of parameter ``p``.

    Accepted: a tensor of the flat shape ``(*lead, numel)`` or of shape ``(*lead, *p.shape)``;
    for a DTensor parameter also a DTensor of the latter shape on the parameter's mesh.

    Args:
        value: the saved state tensor.
        p: the parameter.
        flat_shape: ``(*lead, p.numel())``, the shape ``net.init_state`` gives.
        what: the start of the message, naming the parameter and the key.

    Raises:
        ValueError: another shape, not a tensor, or a DTensor state for a plain parameter.
    """
    shape = getattr(value, "shape", None)
    lead = tuple(flat_shape[:-1])
    full = lead + tuple(p.shape)
    if not isinstance(value, Tensor) or tuple(shape) not in (tuple(flat_shape), full):
        raise ValueError(f"{what} has shape {shape}, expected {tuple(flat_shape)}")
    if is_dtensor(value) and not is_dtensor(p):
        raise ValueError(
            f"{what} is a DTensor but the parameter is a plain tensor; load a full state dict "
            "(torch.distributed.checkpoint.state_dict.get_optimizer_state_dict with "
            "StateDictOptions(full_state_dict=True))"
        )
    if is_dtensor(value) and (tuple(shape) != full or value.device_mesh != p.device_mesh):
        raise ValueError(
            f"{what} is {_describe(value)} on {value.device_mesh}; expected shape {full} on "
            f"{p.device_mesh}"
        )


def place_state(value: Tensor, p: Tensor, flat_shape: torch.Size) -> Tensor:
    """``value`` (checked by :func:`check_state`) in the layout kept for parameter ``p``.

    Args:
        value: a state tensor already in the right dtype and on the right device.
        p: the parameter.
        flat_shape: ``(*lead, p.numel())``, the shape ``net.init_state`` gives.

    Returns:
        For a plain ``p``: the flat ``(*lead, numel)`` tensor. For a DTensor ``p``: a DTensor
        of shape ``(*lead, *p.shape)`` with the placements of :func:`init_state` (a full plain
        tensor is sliced to this process's shard; a DTensor is redistributed).
    """
    lead = len(flat_shape) - 1
    if not is_dtensor(p):
        return value if value.shape == flat_shape else value.reshape(flat_shape)
    full_shape = (*flat_shape[:lead], *p.shape)
    placements = _shifted(p.placements, lead)
    if is_dtensor(value):
        if tuple(value.placements) != placements:
            value = value.redistribute(p.device_mesh, placements)
        return value
    # src_data_rank=None: every process slices the full tensor it holds, no communication
    shard = distribute_tensor(value.reshape(full_shape), p.device_mesh, placements,
                              src_data_rank=None)
    return _as_dtensor(shard.to_local().contiguous(), p)


def per_tensor_value(value: Any, p: Tensor, what: str) -> Tensor:
    """A saved per-tensor state value as the plain one-element tensor kept for parameter ``p``.

    Accepted: one element (plain), or one entry per coordinate of ``p`` (plain, flat or of
    ``p``'s shape, or a DTensor, gathered here: a collective every process enters) whose
    entries are all equal, as every coordinate of a tensor takes the same steps. A parameter
    without coordinates keeps no meaningful value: zero.

    Args:
        value: the saved tensor.
        p: the parameter (plain or DTensor).
        what: the start of the message, naming the parameter and the key.

    Returns:
        A plain tensor of shape ``(1,)`` in ``value``'s dtype.

    Raises:
        ValueError: another element count, not a tensor, or entries that differ.
    """
    if not isinstance(value, Tensor):
        raise ValueError(f"{what} is a {type(value).__name__}, expected a tensor")
    if is_dtensor(value):
        if value.device_mesh != getattr(p, "device_mesh", None):
            raise ValueError(f"{what} is {_describe(value)} on another mesh than the parameter's")
        value = value.full_tensor()
    if value.numel() == 1:
        return value.reshape(1)
    if value.numel() != p.numel():
        raise ValueError(f"{what} has {value.numel()} elements, expected 1 (or one per "
                         f"coordinate, {p.numel()})")
    flat = value.reshape(-1)
    if flat.numel() == 0:
        return flat.new_zeros(1)
    if not bool((flat == flat[0]).all()):
        raise ValueError(f"{what} holds one value per coordinate and they differ; it is kept "
                         "once per tensor (every coordinate of a tensor takes the same steps)")
    return flat[:1].clone()
