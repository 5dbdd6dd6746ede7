"""One rank of the multi-process runs of tests/test_distributed.py (gloo, CPU).

``python tests/dist_worker.py RANK WORLD STORE OUT [CHECKPOINT]`` joins a gloo process group of
``WORLD`` ranks through the file ``STORE``, runs every scenario below and writes what the tests
check to ``OUT/rank{RANK}.json``; rank 0 also writes the sharded checkpoint ``OUT/ckpt`` and the
parameters it resumes to (``OUT/resumed.pt``). With ``CHECKPOINT`` (the ``OUT`` of a run with
another world size, which may be running) it loads that checkpoint, once written, to check
resharding. The environment variable ``L2L_DIST_SCENARIOS`` (comma-separated names) runs a
subset, and may name ``fsdp_simple_triton``, the Triton path (under ``TRITON_INTERPRET=1``).

Every scenario compares a sharded (or DDP) run with a single-process run of the same model on
the concatenated batch, computed in the same process, and records max abs differences; a
scenario that raises records the exception's type and message instead (the tests say which
ones must raise).
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.nn.parallel import DistributedDataParallel

from l2l_optim import DMOptimizer, LearnedOptimizer, RNNProp, SimpleOptimizer
from l2l_optim.nets import DMOptimizerNet, RNNPropNet, SimpleOptimizerNet
from l2l_optim.meta.init_rules import init_net

BATCH = 12  # global batch: divides among 2 and 3 ranks
LR = 0.05


def coupled_net(seed: int = 1) -> SimpleOptimizerNet:
    """A random SimpleOptimizerNet whose mean term weighs as much as the per-coordinate one,
    so that a step without the all-reduce is visibly wrong."""
    torch.manual_seed(seed)
    net = SimpleOptimizerNet()
    with torch.no_grad():
        net.beta.fill_(2.0)
    return net


def make_model() -> torch.nn.Module:
    # 7 rows: 4 + 3 rows on 2 ranks, 3 + 3 + 1 on 3; the last layer's single row leaves the
    # other ranks an empty shard
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 7), torch.nn.Tanh(), torch.nn.LayerNorm(7), torch.nn.Linear(7, 1)
    )


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(BATCH, 6, generator=g), torch.randn(BATCH, 1, generator=g)


def local_slice(t: torch.Tensor) -> torch.Tensor:
    n = BATCH // dist.get_world_size()
    r = dist.get_rank()
    return t[r * n : (r + 1) * n]


def train(model, opt, steps: range, *, sharded_batch: bool) -> None:
    for step in steps:
        x, y = batch(step)
        if sharded_batch:
            x, y = local_slice(x), local_slice(y)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()


def full(p: torch.Tensor) -> torch.Tensor:
    return (p.full_tensor() if isinstance(p, DTensor) else p).detach()


def max_diff(a_params, b_params) -> float:
    return max(float((full(a) - full(b)).abs().max()) for a, b in zip(a_params, b_params))


def fsdp_vs_single(make_opt, steps: int = 20, record=(10, 20)) -> dict:
    """FSDP2 on this group against one process on the whole batch, after each of ``record``."""
    model = make_model()
    ref = copy.deepcopy(model)
    start = copy.deepcopy(model)
    fully_shard(model)
    opt, ref_opt = make_opt(model.parameters()), make_opt(ref.parameters())
    out = {}
    done = 0
    for stop in record:
        train(model, opt, range(done, stop), sharded_batch=True)
        train(ref, ref_opt, range(done, stop), sharded_batch=False)
        out[f"diff_{stop}"] = max_diff(model.parameters(), ref.parameters())
        done = stop
    out["moved"] = max_diff(ref.parameters(), start.parameters())
    out["state_types"] = sorted({type(v).__name__ for s in opt.state.values() for v in s.values()})
    return out


def averaging_vs_single() -> dict:
    """Schedule-Free averaging around the rule (a state ``z`` per parameter) under FSDP2
    against one process, and the average ``x`` that ``opt.eval()`` puts in the parameters."""
    net = init_net(SimpleOptimizerNet(input_norm="rms", averaging=0.9), "schedule-free", lr=2e-2)
    with torch.no_grad():
        net.w_out[10:].fill_(1e-3)  # the mean over coordinates matters too
    make = lambda ps: SimpleOptimizer(ps, weights=copy.deepcopy(net))  # noqa: E731
    model = make_model()
    ref = copy.deepcopy(model)
    start = copy.deepcopy(model)
    fully_shard(model)
    opt, ref_opt = make(model.parameters()), make(ref.parameters())
    train(model, opt, range(0, 10), sharded_batch=True)
    train(ref, ref_opt, range(0, 10), sharded_batch=False)
    out = {"diff_10": max_diff(model.parameters(), ref.parameters()),
           "moved": max_diff(ref.parameters(), start.parameters())}
    opt.eval()
    ref_opt.eval()
    out["diff_eval"] = max_diff(model.parameters(), ref.parameters())
    out["eval_moved"] = max_diff(model.parameters(), start.parameters())
    out["state_types"] = sorted({type(v).__name__ for s in opt.state.values() for v in s.values()})
    return out


def placements_vs_single(steps: int = 5) -> dict:
    """Hand-made DTensors (Shard(0), Shard(1), Replicate, and a Partial gradient) against
    plain tensors stepped on the same gradients."""
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(3)
    shapes = [(5, 4), (3, 5), (4,), (2, 3)]
    kinds = [[Shard(0)], [Shard(1)], [Replicate()], [Replicate()]]
    plain = [torch.randn(s) for s in shapes]
    start = [p.clone() for p in plain]
    sharded = [distribute_tensor(p.clone(), mesh, k) for p, k in zip(plain, kinds)]
    # float32 state: a Shard(1) shard is no contiguous range of the whole tensor, so its
    # bfloat16 state's stochastic rounding draws other bits than one process would
    opt = SimpleOptimizer(sharded, lr=LR, weights=coupled_net(), state_dtype=torch.float32)
    ref_opt = SimpleOptimizer(plain, lr=LR, weights=coupled_net(), state_dtype=torch.float32)
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        grads = [torch.randn(s, generator=g) for s in shapes]
        for p, q, gr, k in zip(sharded, plain, grads, kinds):
            q.grad = gr
            if len(p.shape) == 2 and k == [Replicate()]:
                # each rank holds a share of the gradient: redistributed (summed) by the step
                p.grad = DTensor.from_local(gr / dist.get_world_size(), mesh, [Partial()])
            else:
                p.grad = distribute_tensor(gr.clone(), mesh, k)
        opt.step()
        ref_opt.step()
    return {"diff": max_diff(sharded, plain), "moved": max_diff(plain, start)}


def baselines() -> dict:
    out = {}
    for cls, net_cls in ((DMOptimizer, DMOptimizerNet), (RNNProp, RNNPropNet)):
        torch.manual_seed(5)
        net = net_cls()  # the same random net on every rank: made after seeding
        out[cls.__name__] = fsdp_vs_single(
            lambda ps, cls=cls, net=net: cls(ps, lr=LR, weights=net), record=(5,)
        )
    return out


def nonfinite() -> dict:
    """A NaN in the gradient shard of one rank only: every rank skips, or every rank raises."""
    out = {}
    for policy in ("skip", "raise"):
        model = make_model()
        fully_shard(model)
        opt = SimpleOptimizer(model.parameters(), lr=LR, weights=coupled_net(), nonfinite=policy)
        train(model, opt, range(2), sharded_batch=True)
        before = [full(p).clone() for p in model.parameters()]
        x, y = batch(2)
        torch.nn.functional.mse_loss(model(local_slice(x)), local_slice(y)).backward()
        if dist.get_rank() == dist.get_world_size() - 1:
            model[0].weight.grad.to_local().view(-1)[0] = float("nan")
        try:
            opt.step()
            out[policy] = {"raised": None, "skipped_steps": opt.skipped_steps}
        except FloatingPointError as e:
            out[policy] = {"raised": str(e)}
        out[policy]["changed"] = max_diff(model.parameters(), before)
        out[policy]["steps"] = sorted({int(s["step"]) for s in opt.state.values()})
    return out


def refusals() -> dict:
    """What must raise (on every rank alike) instead of stepping wrongly or crashing."""
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    cases = {}

    def partial_param():
        p = torch.nn.Parameter(DTensor.from_local(torch.ones(3), mesh, [Partial()]))
        SimpleOptimizer([p], weights=coupled_net())

    def mixed_step():
        p = torch.nn.Parameter(distribute_tensor(torch.ones(4, 2), mesh, [Shard(0)]))
        q = torch.nn.Parameter(torch.ones(3))
        p.grad, q.grad = torch.ones_like(p), torch.ones_like(q)
        SimpleOptimizer([p, q], weights=coupled_net()).step()

    def generic_coupled_net():
        p = torch.nn.Parameter(distribute_tensor(torch.ones(4, 2), mesh, [Shard(0)]))
        p.grad = torch.ones_like(p)
        LearnedOptimizer([p], weights=coupled_net()).step()

    for name, fn in (("partial_param", partial_param), ("mixed_step", mixed_step),
                     ("generic_coupled_net", generic_coupled_net)):
        try:
            fn()
            cases[name] = None
        except Exception as e:  # noqa: BLE001 - the type is what the test checks
            cases[name] = [type(e).__name__, str(e)]
    return cases


def checkpoints(out_dir: Path, load_from: Path | None) -> dict:
    """Sharded and full optimizer state dicts through torch.distributed.checkpoint."""
    res = {}
    rank = dist.get_rank()
    make_opt = lambda ps: SimpleOptimizer(ps, lr=LR, weights=coupled_net())  # noqa: E731

    def fresh():
        m = make_model()
        fully_shard(m)
        return m, make_opt(m.parameters())

    def load_sharded(ckpt: Path):
        m, o = fresh()
        sd = {"model": get_model_state_dict(m), "optim": get_optimizer_state_dict(m, o)}
        dcp.load(sd, checkpoint_id=str(ckpt))
        set_model_state_dict(m, sd["model"])
        set_optimizer_state_dict(m, o, sd["optim"])
        return m, o

    if load_from is not None:
        # resume another world size's checkpoint here, and compare with where it resumed to;
        # that run may still be writing it
        deadline = time.monotonic() + 240
        while not (load_from / "ckpt.done").exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"no checkpoint in {load_from} after 240 s")
            time.sleep(0.2)
        m, o = load_sharded(load_from / "ckpt")
        res["loaded_fingerprint"] = o.state_dict()["param_groups"][0]["meta_fingerprint"]
        res["fingerprint"] = o.meta_fingerprint
        train(m, o, range(5, 10), sharded_batch=True)
        expected = torch.load(load_from / "resumed.pt")
        res["resharded_diff"] = max_diff(m.parameters(), expected)
        return res

    model, opt = fresh()
    ref = make_model()
    ref_opt = make_opt(ref.parameters())
    train(model, opt, range(5), sharded_batch=True)
    train(ref, ref_opt, range(5), sharded_batch=False)
    single_model, single_osd = copy.deepcopy(ref.state_dict()), copy.deepcopy(ref_opt.state_dict())
    ckpt = out_dir / "ckpt"
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
             checkpoint_id=str(ckpt))
    # a snapshot: the full dict shares the plain (non-DTensor) entries such as ``step`` with
    # the live state, which the training below advances in place
    full_osd = copy.deepcopy(get_optimizer_state_dict(model, opt,
                                                      options=StateDictOptions(full_state_dict=True)))
    full_msd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    res["full_state_types"] = sorted({type(v).__name__ for s in full_osd["state"].values()
                                      for v in s.values()})
    res["full_h_shape"] = list(full_osd["state"]["0.weight"]["h"].shape)
    train(model, opt, range(5, 10), sharded_batch=True)
    resumed = [full(p).clone() for p in model.parameters()]
    if rank == 0:
        torch.save(resumed, out_dir / "resumed.pt")
        (out_dir / "ckpt.done").touch()  # dcp.save returned on every rank before this

    # sharded state dict, same world size: bit-identical resumption
    m, o = load_sharded(ckpt)
    res["loaded_fingerprint"] = o.state_dict()["param_groups"][0]["meta_fingerprint"]
    res["fingerprint"] = o.meta_fingerprint
    train(m, o, range(5, 10), sharded_batch=True)
    res["sharded_resume_bitwise"] = all(
        torch.equal(full(a), b) for a, b in zip(m.parameters(), resumed)
    )
    res["sharded_resume_diff"] = max_diff(m.parameters(), resumed)

    # full state dict into a fresh sharded optimizer: bit-identical too
    m, o = fresh()
    # (copies: loading distributes the full tensors into the dict it is given)
    set_model_state_dict(m, copy.deepcopy(full_msd),
                         options=StateDictOptions(full_state_dict=True))
    set_optimizer_state_dict(m, o, copy.deepcopy(full_osd),
                             options=StateDictOptions(full_state_dict=True))
    train(m, o, range(5, 10), sharded_batch=True)
    res["full_resume_bitwise"] = all(
        torch.equal(full(a), b) for a, b in zip(m.parameters(), resumed)
    )

    # full state dict into a plain single-process model: resumes like the sharded run
    plain = make_model()
    plain.load_state_dict(full_msd)
    plain_opt = make_opt(plain.parameters())
    set_optimizer_state_dict(plain, plain_opt, copy.deepcopy(full_osd),
                             options=StateDictOptions(full_state_dict=True))
    res["plain_h_shape"] = list(plain_opt.state[plain[0].weight]["h"].shape)
    train(plain, plain_opt, range(5, 10), sharded_batch=False)
    res["plain_resume_diff"] = max_diff(plain.parameters(), resumed)
    train(ref, ref_opt, range(5, 10), sharded_batch=False)
    res["single_process_diff"] = max_diff(ref.parameters(), resumed)

    # a single-process state_dict (flat plain h) into a sharded optimizer: each rank keeps
    # its slice
    m, o = fresh()
    set_model_state_dict(m, single_model, options=StateDictOptions(full_state_dict=True))
    o.load_state_dict(single_osd)
    res["from_single_h_type"] = type(o.state[m[0].weight]["h"]).__name__
    train(m, o, range(5, 10), sharded_batch=True)
    res["from_single_diff"] = max_diff(m.parameters(), resumed)

    # a state saved with other meta-weights is refused
    m, o = fresh()
    other = SimpleOptimizer(m.parameters(), lr=LR, weights=coupled_net(seed=7))
    try:
        set_optimizer_state_dict(m, other, full_osd, options=StateDictOptions(full_state_dict=True))
        res["other_weights"] = None
    except ValueError as e:
        res["other_weights"] = str(e)
    return res


def rms_checkpoints(out_dir: Path) -> dict:
    """A net with the rms input norm: its bias correction c, one value per tensor, through
    sharded and full state dicts, and a full state dict that keeps c once per coordinate."""
    res = {}
    make_opt = lambda ps: SimpleOptimizer(ps, lr=LR, weights=init_net(  # noqa: E731
        SimpleOptimizerNet(input_norm="rms"), "adam", lr=1e-2))

    def fresh():
        m = make_model()
        fully_shard(m)
        return m, make_opt(m.parameters())

    def load_full(osd):
        m, o = fresh()
        set_model_state_dict(m, copy.deepcopy(full_msd), options=StateDictOptions(full_state_dict=True))
        set_optimizer_state_dict(m, o, osd, options=StateDictOptions(full_state_dict=True))
        return m, o

    def resumes(m, o) -> bool:
        train(m, o, range(5, 10), sharded_batch=True)
        return all(torch.equal(full(a), b) for a, b in zip(m.parameters(), resumed))

    model, opt = fresh()
    train(model, opt, range(5), sharded_batch=True)
    c = opt.state[model[0].weight]["c"]
    res["c"] = [type(c).__name__, list(c.shape)]
    ckpt = out_dir / "ckpt-rms"
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
             checkpoint_id=str(ckpt))
    # (a copy: a full state dict holds the plain state tensors, c and step, themselves)
    full_osd = copy.deepcopy(get_optimizer_state_dict(
        model, opt, options=StateDictOptions(full_state_dict=True)))
    full_msd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    train(model, opt, range(5, 10), sharded_batch=True)
    resumed = [full(p).clone() for p in model.parameters()]

    m, o = fresh()
    sd = {"model": get_model_state_dict(m), "optim": get_optimizer_state_dict(m, o)}
    dcp.load(sd, checkpoint_id=str(ckpt))
    set_model_state_dict(m, sd["model"])
    set_optimizer_state_dict(m, o, sd["optim"])
    res["sharded_resume_bitwise"] = resumes(m, o)
    res["full_resume_bitwise"] = resumes(*load_full(copy.deepcopy(full_osd)))

    # c saved once per coordinate, in the parameter's shape (the layout of older versions)
    old = copy.deepcopy(full_osd)
    for name, state in old["state"].items():
        shape = dict(model.named_parameters())[name].shape
        state["c"] = state["c"].reshape(1).expand(shape.numel()).reshape(shape).clone()
    m, o = load_full(old)
    c = o.state[m[0].weight]["c"]
    res["c_loaded"] = [type(c).__name__, list(c.shape)]
    res["old_layout_resume_bitwise"] = resumes(m, o)
    return res


def ddp_vs_single(steps: int = 10) -> dict:
    model = make_model()
    ref = copy.deepcopy(model)
    ddp = DistributedDataParallel(model)
    opt = SimpleOptimizer(ddp.parameters(), lr=LR, weights=coupled_net())
    ref_opt = SimpleOptimizer(ref.parameters(), lr=LR, weights=coupled_net())
    train(ddp, opt, range(steps), sharded_batch=True)
    train(ref, ref_opt, range(steps), sharded_batch=False)
    return {"diff": max_diff(model.parameters(), ref.parameters())}


def main() -> None:
    rank, world = int(sys.argv[1]), int(sys.argv[2])
    store, out_dir = sys.argv[3], Path(sys.argv[4])
    load_from = Path(sys.argv[5]) if len(sys.argv) > 5 else None
    torch.set_num_threads(1)
    # a rank that waits on a collective its peers never enter fails after this, not never
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))

    def simple(**kw):
        return lambda ps: SimpleOptimizer(ps, lr=LR, weights=coupled_net(), **kw)

    scenarios = {
        "fsdp_simple": lambda: fsdp_vs_single(simple()),
        "fsdp_simple_bf16": lambda: fsdp_vs_single(simple(state_dtype=torch.bfloat16)),
        "fsdp_simple_reference": lambda: fsdp_vs_single(simple(impl="reference"), record=(5,)),
        "fsdp_shipped_weights": lambda: fsdp_vs_single(
            lambda ps: SimpleOptimizer(ps), steps=10, record=(10,)),
        "fsdp_averaging": averaging_vs_single,
        "placements": placements_vs_single,
        "baselines": baselines,
        "nonfinite": nonfinite,
        "refusals": refusals,
        "checkpoints": lambda: checkpoints(out_dir, load_from),
    }
    if load_from is not None:
        scenarios = {"fsdp_simple": scenarios["fsdp_simple"],
                     "fsdp_simple_bf16": scenarios["fsdp_simple_bf16"],
                     "checkpoints": scenarios["checkpoints"]}
    if world == 2:
        scenarios["ddp"] = ddp_vs_single
        scenarios["checkpoints_rms"] = lambda: rms_checkpoints(out_dir)
    only = os.environ.get("L2L_DIST_SCENARIOS")
    if only:  # a subset, or the Triton path (in Triton's interpreter: TRITON_INTERPRET=1)
        scenarios["fsdp_simple_triton"] = lambda: fsdp_vs_single(simple(impl="triton"),
                                                                 record=(3,))
        scenarios = {k: scenarios[k] for k in only.split(",")}
    results = {}
    for name, fn in scenarios.items():
        t0 = time.perf_counter()
        try:
            results[name] = fn()
        except Exception:  # noqa: BLE001 - reported to the test, which fails on it
            results[name] = {"error": traceback.format_exc()}
        dist.barrier()
        print(f"{name}: {time.perf_counter() - t0:.1f} s", flush=True)
    (out_dir / f"rank{rank}.json").write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
