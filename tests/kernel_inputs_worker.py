"""Feed one kernel entry point every kind of tensor, each in a forked child process.

``python tests/kernel_inputs_worker.py ENTRY...`` with each ENTRY one of

* ``cpu``: :func:`l2l_optim.kernels.cpu.simple_update_cpu`, with and without ``aggregate``;
* ``cpu-ops``: the registered ops themselves (``torch.ops.l2l_optim_cpu.simple_update`` and
  the two-pass pair), below every check of ``simple_update_cpu``;
* ``triton``: :func:`l2l_optim.kernels.triton.simple_update_triton` (the process must run
  with ``TRITON_INTERPRET=1``, which the CPU entries ignore).

prints one JSON object: per entry and kind, ``"ok"``, ``"<ExceptionType>: <message>"``, or
``"signal <n>"`` when the child died by a signal (a crash: what tests/test_kernel_inputs.py
must never see). A child per call means a crash names its kind and spares the others; one
process for every entry imports torch once.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import tempfile

import torch

H = 10


def _weights():
    from l2l_optim.nets import SimpleOptimizerNet

    torch.manual_seed(0)
    return SimpleOptimizerNet().fused_weights(dtype=torch.float32)


def _plain(shape=(6,), dtype=torch.float32, hdtype=torch.float32):
    p = torch.randn(shape).to(dtype)
    return [p], [torch.randn(shape).to(dtype)], [torch.zeros(H, p.numel(), dtype=hdtype)]


def _dtensors(which: str):
    """A Shard(0) DTensor on a 1-process gloo mesh for the tensors named in ``which``."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    store = tempfile.mktemp(prefix="l2l_store_")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    mesh = init_device_mesh("cpu", (1,))
    p, g, h = _plain((6,))
    wrap = lambda t: distribute_tensor(t, mesh, [Shard(0)])  # noqa: E731
    return ([wrap(p[0])] if "p" in which else p, [wrap(g[0])] if "g" in which else g,
            [distribute_tensor(h[0], mesh, [Shard(1)])] if "h" in which else h)


def _two_tensor():
    from torch.testing._internal.two_tensor import TwoTensor

    p, g, h = _plain()
    return [TwoTensor(p[0], p[0].clone())], g, h


def _fake():
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    with mode:
        p = torch.randn(6)
        g = torch.randn(6)
        h = torch.zeros(H, 6)
    return [p], [g], [h]


def _channels_last():
    p = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    return [p], [torch.randn(2, 3, 4, 5)], [torch.zeros(H, p.numel())]


def _nested():
    p = torch.nested.nested_tensor([torch.randn(2), torch.randn(3)])
    return [p], [torch.randn(5)], [torch.zeros(H, 5)]


def _inference():
    with torch.inference_mode():
        return _plain()


def _mkldnn():
    p, g, h = _plain()
    return [p[0].to_mkldnn()], g, h


def _quantized():
    p, g, h = _plain()
    return [torch.quantize_per_tensor(p[0], 0.1, 0, torch.qint8)], g, h


KINDS = {
    "contiguous float32": lambda: _plain(),
    "0-dim": lambda: _plain(()),
    "empty": lambda: _plain((0,)),
    "empty 2-d": lambda: _plain((0, 4)),
    "bfloat16 param, bfloat16 hidden": lambda: _plain((5,), torch.bfloat16, torch.bfloat16),
    "float16 param": lambda: _plain((5,), torch.float16),
    "float64 param and hidden": lambda: _plain((5,), torch.float64, torch.float64),
    "nn.Parameter": lambda: ([torch.nn.Parameter(torch.randn(4))], [torch.randn(4)],
                             [torch.zeros(H, 4)]),
    "transposed param": lambda: ([torch.randn(4, 3).t()], [torch.randn(3, 4)],
                                 [torch.zeros(H, 12)]),
    "channels_last param": _channels_last,
    "stride-0 grad": lambda: ([torch.randn(5)], [torch.ones(1).expand(5)], [torch.zeros(H, 5)]),
    "param with storage offset": lambda: ([torch.randn(9)[3:]], [torch.randn(6)],
                                          [torch.zeros(H, 6)]),
    "hidden transposed": lambda: ([torch.randn(5)], [torch.randn(5)], [torch.zeros(5, H).t()]),
    "inference-mode tensors": _inference,
    "int32 param": lambda: ([torch.zeros(4, dtype=torch.int32)], [torch.zeros(4)],
                            [torch.zeros(H, 4)]),
    "float16 hidden": lambda: _plain((4,), torch.float32, torch.float16),
    "int8 hidden without scales": lambda: ([torch.randn(4)], [torch.randn(4)],
                                           [torch.zeros(H, 4, dtype=torch.int8)]),
    "hidden of the wrong shape": lambda: ([torch.randn(4)], [torch.randn(4)], [torch.zeros(H, 5)]),
    "grad of the wrong size": lambda: ([torch.randn(4)], [torch.randn(3)], [torch.zeros(H, 4)]),
    "sparse grad": lambda: ([torch.randn(4)], [torch.randn(4).to_sparse()], [torch.zeros(H, 4)]),
    "sparse param": lambda: ([torch.randn(4).to_sparse()], [torch.randn(4)], [torch.zeros(H, 4)]),
    "nested param": _nested,
    "mkldnn param": _mkldnn,
    "quantized param": _quantized,
    "meta tensors": lambda: ([torch.zeros(4, device="meta")], [torch.zeros(4, device="meta")],
                             [torch.zeros(H, 4, device="meta")]),
    "fake tensors": _fake,
    "TwoTensor param": _two_tensor,
    "DTensor param, grad and hidden": lambda: _dtensors("pgh"),
    "DTensor param": lambda: _dtensors("p"),
    "DTensor hidden": lambda: _dtensors("h"),
}


def _call(entry: str, params, grads, hiddens) -> None:
    lrs = [0.1] * len(params)
    w = _weights()
    if entry == "cpu":
        from l2l_optim.kernels.cpu import simple_update_cpu

        simple_update_cpu(params, grads, hiddens, lrs, w)
        simple_update_cpu(params, grads, hiddens, lrs, w, None, lambda s: s.sum() / 7)
    elif entry == "cpu-ops":
        from l2l_optim.kernels._common import packed_weights
        from l2l_optim.kernels.cpu import load_library

        load_library()  # registers the ops
        ops = torch.ops.l2l_optim_cpu
        packed = packed_weights(w, "cpu", torch.float64, flat=True)
        lr_t = torch.tensor(lrs, dtype=torch.float64)  # the ops take one learning rate per tensor
        ops.simple_update(params, grads, hiddens, lr_t, packed, None, [], [], [])
        sums, scratch = ops.simple_update_pass1(params, grads, hiddens, lr_t, packed, None, [], [],
                                                [])
        ops.simple_update_pass2(params, scratch, lr_t, packed, sums.sum(), None)
    elif entry == "triton":
        from l2l_optim.kernels.triton import simple_update_triton

        simple_update_triton(params, grads, hiddens, lrs, w)
        simple_update_triton(params, grads, hiddens, lrs, w, None, lambda s: s.sum() / 7)
    else:
        raise SystemExit(f"unknown entry {entry!r}")


def _child(entry: str, kind: str, fd: int) -> None:
    try:
        _call(entry, *KINDS[kind]())
        msg = "ok"
    except Exception as e:  # noqa: BLE001 - any exception is a clean refusal
        text = str(e).strip().splitlines()
        msg = f"{type(e).__name__}: {text[0] if text else ''}"
    os.write(fd, msg.encode()[:4000])
    os.close(fd)
    os._exit(0)


def main() -> None:
    entries = sys.argv[1:]
    torch.set_num_threads(1)
    # build / load / import what the children need once, before forking
    for module in ("torch._subclasses.fake_tensor", "torch.distributed.tensor",
                   "torch.testing._internal.two_tensor"):
        importlib.import_module(module)
    _weights()
    for entry in entries:
        if entry.startswith("cpu"):
            importlib.import_module("l2l_optim.kernels.cpu").load_library()
        # one run here, so that the children inherit warm caches (Triton's above all)
        _call(entry, *KINDS["contiguous float32"]())
    print(json.dumps({entry: _run_all(entry) for entry in entries}))


def _run_all(entry: str) -> dict[str, str]:
    results = {}
    for kind in KINDS:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            _child(entry, kind, w)
        os.close(w)
        chunks = []
        while chunk := os.read(r, 4096):
            chunks.append(chunk)
        os.close(r)
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status):
            results[kind] = f"signal {os.WTERMSIG(status)}"
        else:
            results[kind] = b"".join(chunks).decode() or f"exit {os.WEXITSTATUS(status)}"
    return results


if __name__ == "__main__":
    main()
