"""How a learned optimizer is saved: its ``state_dict`` (torch's, with three hooks), pickles
and copies.

:class:`~l2l_optim.optimizer.LearnedOptimizer` keeps torch's ``state_dict`` and
``load_state_dict``; :class:`Checkpointing` registers these hooks at construction (and again
after unpickling or copying, which keep no hooks):

* ``_stamp`` (a state-dict post-hook) writes the fingerprint of the meta-weights into every
  parameter group as ``"meta_fingerprint"``, and each group's ``state_dtype`` as its name:
  ``torch.distributed.checkpoint`` keeps group options of plain values, so a dict rebuilt from
  ``state`` and ``param_groups`` still carries both.
* ``_check_loaded`` (a load pre-hook) refuses a state saved with other meta-weights or one that
  does not fit the net and the parameters, before anything changes; it completes the saved
  groups (missing options from ``defaults``; ``impl``, how to run rather than what was
  learned, stays this optimizer's) and hands each parameter's state to torch wrapped, so that
  torch's load does not cast it to the parameter's dtype.
* ``_place_loaded`` (a load post-hook) casts each state tensor to what this optimizer keeps (the
  net's dtype per key at the group's ``state_dtype``, float64 for float64 parameters; an int64
  ``step``) and lays it out for its parameter (a DTensor for a DTensor parameter, see
  :mod:`l2l_optim.distributed`). A float32 hidden state of a bfloat16 parameter stays float32.
  A value the net keeps once per tensor (``net.per_tensor_state``: SimpleOptimizer's bias
  correction ``c``) also loads from a state dict that holds it once per coordinate, and a
  hidden state saved in float loads into an 8-bit one (``state_dtype=torch.int8``, encoded
  with :func:`~l2l_optim.state.encode_hidden`) and the other way round (decoded).

A hook of the user's that rewrites the incoming dict (to map parameter ids, say) is registered
with ``prepend=True``, so that it runs before ``_check_loaded``.

Pickles and copies carry the net beside torch's ``defaults``, ``state`` and ``param_groups``:
it is not an option but the update rule itself.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import distributed
from .state import decode_hidden, dtype_from_name, dtype_name, encode_hidden, int8_blocks
from .weights import WeightsError, list_weights

__all__ = ["Checkpointing"]


class _Held:
    """One parameter's saved state, passed through torch's load untouched (torch casts the
    tensors it can see to the parameter's dtype), with the dtypes and shapes it loads into."""

    __slots__ = ("tensors", "dtypes", "shapes")

    def __init__(self, tensors: dict[str, Any], dtypes: dict[str, torch.dtype],
                 shapes: dict[str, torch.Size]) -> None:
        self.tensors, self.dtypes, self.shapes = tensors, dtypes, shapes

    def __repr__(self) -> str:
        return f"<saved state {sorted(self.tensors)}, loading>"


def _recode_hidden(value: dict[str, Any], coded: bool) -> dict[str, Any]:
    """A parameter's saved state with its hidden state ``h`` in the form loaded into: 8-bit
    codes and scales (``coded``) or float; plain tensors only, anything else is left for the
    checks to refuse."""
    value = dict(value)
    h = value.get("h")
    if not isinstance(h, Tensor) or distributed.is_dtensor(h) or h.dim() < 2:
        return value
    if coded and "h_scale" not in value and h.is_floating_point():
        flat = h.reshape(h.shape[0], -1)
        codes = torch.empty(flat.shape, dtype=torch.int8, device=h.device)
        scales = torch.empty(flat.shape[0], int8_blocks(flat.shape[1]), device=h.device)
        encode_hidden(flat, 0, codes, scales)  # key 0: a deterministic conversion
        value["h"], value["h_scale"] = codes, scales
    elif not coded and isinstance(value.get("h_scale"), Tensor) and h.dtype == torch.int8:
        flat = h.reshape(h.shape[0], -1)
        if value["h_scale"].shape == (flat.shape[0], int8_blocks(flat.shape[1])):
            value["h"] = decode_hidden(flat, value.pop("h_scale"))
    return value


class Checkpointing:
    """The hooks and pickling, for a ``torch.optim.Optimizer`` subclass with a ``net``, a
    ``meta_fingerprint``, ``skipped_steps``, ``_check_options(group)``, ``_step_options`` (the
    options that apply to a whole step and stay the optimizer's) and ``_init_runtime(skipped)``
    (what it derives and does not pickle)."""

    def _register_state_dict_hooks(self) -> None:
        self.register_state_dict_post_hook(Checkpointing._stamp)
        self.register_load_state_dict_pre_hook(Checkpointing._check_loaded)
        self.register_load_state_dict_post_hook(Checkpointing._place_loaded)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["net"] = self.net
        state["skipped_steps"] = self.skipped_steps
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # torch's load_state_dict also calls this, with state and param_groups only
        unpickling = "net" in state
        net = state.pop("net", None)
        skipped = state.pop("skipped_steps", 0)
        super().__setstate__(state)
        if unpickling:
            self.net = net
            self._init_runtime(skipped)
            self._register_state_dict_hooks()

    def _stamp(self, state_dict: dict[str, Any]) -> None:
        # torch's state_dict packs fresh group dicts: the live groups stay as they are
        fp = self.meta_fingerprint
        for group in state_dict["param_groups"]:
            group["meta_fingerprint"] = fp
            group["state_dtype"] = dtype_name(group["state_dtype"])

    def _check_loaded(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Validate ``state_dict`` and return what torch's load goes on with.

        Raises:
            ValueError: no fingerprint or another one, a group option this optimizer
                refuses, state of an unknown parameter id, or state keys or shapes that do
                not fit the net and the parameters.
        """
        what = f"{type(self).__name__}.load_state_dict"
        groups = [dict(g) for g in state_dict.get("param_groups", [])]
        # the fingerprint in the groups, or at the top level of the dict
        found = {g.pop("meta_fingerprint") for g in groups if "meta_fingerprint" in g}
        if "meta_fingerprint" in state_dict:
            found.add(state_dict["meta_fingerprint"])
        mine = self.meta_fingerprint
        if not found:
            raise ValueError(
                f"{what}: the state_dict has no 'meta_fingerprint'; it was not saved by a "
                "LearnedOptimizer"
            )
        if found != {mine}:
            theirs = sorted(found - {mine})[0]
            raise ValueError(
                f"{what}: the state was saved with meta-weights {theirs}, but this optimizer "
                f"has {mine}; create the optimizer with the same weights{_shipped_hint(theirs)}"
            )
        out = {k: v for k, v in state_dict.items() if k != "meta_fingerprint"}
        out["param_groups"] = groups
        if [len(g["params"]) for g in groups] != [len(g["params"]) for g in self.param_groups]:
            return out  # torch's load raises its usual message
        for g in groups:
            for key, value in self.defaults.items():
                g[key] = value if key in self._step_options else g.get(key, value)
            g["state_dtype"] = dtype_from_name(g["state_dtype"])
            self._check_options(g)
        # the parameter and the saved group's state_dtype of each saved id, in torch's order
        owner = {pid: (p, saved["state_dtype"])
                 for saved, live in zip(groups, self.param_groups)
                 for pid, p in zip(saved["params"], live["params"])}
        held = {}
        for pid, value in state_dict.get("state", {}).items():
            if pid not in owner:
                raise ValueError(f"{what}: state for unknown parameter id {pid}")
            p, state_dtype = owner[pid]
            dtype = torch.float64 if p.dtype == torch.float64 else state_dtype
            expected = self.net.init_state(p.numel(), device="meta", dtype=dtype)
            if isinstance(value, dict):
                value = _recode_hidden(value, "h_scale" in expected)
            want = set(expected) | {"step"}
            if not isinstance(value, dict) or set(value) != want:
                got = sorted(value) if isinstance(value, dict) else type(value).__name__
                raise ValueError(
                    f"{what}: parameter {pid} has state keys {got}, expected {sorted(want)}")
            per_tensor = set(self.net.per_tensor_state)
            for k, t in expected.items():
                where = f"{what}: parameter {pid} state {k!r}"
                if k in per_tensor:
                    value[k] = distributed.per_tensor_value(value[k], p, where)
                else:
                    # (a full state dict of sharded parameters has (*lead, *p.shape) tensors)
                    distributed.check_state(value[k], p, t.shape, where)
            held[pid] = _Held(value, {k: t.dtype for k, t in expected.items()},
                              {k: t.shape for k, t in expected.items()})
        out["state"] = held
        return out

    def _place_loaded(self) -> None:
        for p, state in list(self.state.items()):
            if not isinstance(state, _Held):
                continue
            placed = {}
            for k, t in state.tensors.items():
                if not isinstance(t, Tensor):  # a plain-number step count
                    t = torch.tensor(t)
                # the net's own choice per key (a running mean of squares stays float32)
                dtype = torch.int64 if k == "step" else state.dtypes[k]
                t = t.to(device=p.device, dtype=dtype, memory_format=torch.contiguous_format,
                         copy=True)
                # the layout kept for p: flat, or a DTensor for a DTensor p; per-tensor
                # values (shape (1,)) stay plain, as step does
                plain = k == "step" or k in self.net.per_tensor_state
                placed[k] = t if plain else distributed.place_state(t, p, state.shapes[k])
            self.state[p] = placed


def _shipped_hint(fp: str) -> str:
    """``" (weights='simple')"`` when shipped weights have the fingerprint ``fp``: a state
    saved with another default, or with shipped weights passed by name, says which."""
    try:
        names = [name for name, meta in list_weights().items() if meta.get("fingerprint") == fp]
    except WeightsError:  # an unreadable shipped file: the message goes on without the hint
        return ""
    return f" (weights={names[0]!r})" if names else ""
