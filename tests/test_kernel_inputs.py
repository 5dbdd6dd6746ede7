"""No tensor crashes a kernel entry point: every kind either runs or raises a Python exception.

``kernel_inputs_worker.py`` feeds each entry point (the C++ path through ``simple_update_cpu``,
the C++ ops directly, and the Triton path in Triton's interpreter) plain tensors of every
layout the optimizer can hand over and every tensor kind a user can construct (DTensor, fake,
meta, sparse, nested, mkldnn, quantized, a Python tensor subclass), each call in a forked child,
and reports how each child ended. A raw-pointer kernel given a wrapper subclass reads a null
data pointer; that must be a clean error, never a signal.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import l2l_optim
from l2l_optim.kernels import cpu as cpu_kernel
from l2l_optim.kernels import triton as triton_kernel

WORKER = Path(__file__).with_name("kernel_inputs_worker.py")
ENTRIES = ["cpu", "cpu-ops", "triton"]

# kinds every Python entry point runs (non-contiguous ones through contiguous copies)
RUNS = ["contiguous float32", "0-dim", "empty", "empty 2-d", "bfloat16 param, bfloat16 hidden",
        "float16 param", "float64 param and hidden", "nn.Parameter", "transposed param",
        "channels_last param", "stride-0 grad", "param with storage offset", "hidden transposed"]
SUBCLASSES = ["fake tensors", "TwoTensor param", "DTensor param, grad and hidden",
              "DTensor param", "DTensor hidden"]


def _available(entry: str) -> str | None:
    """Why ``entry`` cannot run here, or None."""
    if entry.startswith("cpu") and not cpu_kernel.is_available():
        return f"fused CPU kernel unavailable: {cpu_kernel.build_error()}"
    if entry == "triton" and not triton_kernel.is_available():
        return f"Triton not importable: {triton_kernel.import_error()}"
    return None


@pytest.fixture(scope="module")
def reports():
    """Every available entry's report, from one worker process."""
    src = str(Path(l2l_optim.__file__).resolve().parents[1])
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    entries = [e for e in ENTRIES if _available(e) is None]
    proc = subprocess.run([sys.executable, str(WORKER), *entries], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"the worker exited with {proc.returncode}:\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("entry", ENTRIES)
def test_no_kind_crashes(reports, entry):
    reason = _available(entry)
    if reason is not None:
        pytest.skip(reason)
    report = reports[entry]
    crashed = {k: v for k, v in report.items() if v.startswith(("signal", "exit"))}
    assert not crashed, crashed


@pytest.mark.parametrize("entry", ["cpu", "triton"])
def test_python_entries_run_plain_layouts_and_name_subclasses(reports, entry):
    reason = _available(entry)
    if reason is not None:
        pytest.skip(reason)
    report = reports[entry]
    assert {k: report[k] for k in RUNS} == {k: "ok" for k in RUNS}
    for kind in SUBCLASSES:
        assert report[kind].startswith("TypeError: SimpleOptimizer kernels take plain"), kind
    assert "DTensor; for a DTensor pass its .to_local()" in report["DTensor param"]
    for kind in ("sparse param", "nested param", "mkldnn param"):
        assert report[kind].startswith("ValueError: SimpleOptimizer kernels take dense"), kind


def test_cpu_ops_refuse_what_they_cannot_address(reports):
    reason = _available("cpu-ops")
    if reason is not None:
        pytest.skip(reason)
    report = reports["cpu-ops"]
    # The raw ops have a CPU implementation (and a fake one, for torch.compile), so torch's
    # dispatcher answers most foreign inputs before the kernel runs: fake tensors reach the fake
    # implementation, which refuses the real weights beside them; a wrapper subclass with
    # __torch_dispatch__ (TwoTensor) unwraps itself and runs the op on its plain parts; DTensor
    # has no sharding rule for the op; sparse, nested and mkldnn tensors have no kernel for
    # their backend. What reaches the kernel is checked there. None of them crashes.
    refused_by = {
        "fake tensors": "AssertionError: Please convert all Tensors to FakeTensors",
        "DTensor param, grad and hidden": "RuntimeError: l2l_optim_cpu.simple_update.default got mixed",
        "sparse grad": "NotImplementedError: Could not run 'l2l_optim_cpu::simple_update'",
        "sparse param": "NotImplementedError: Could not run 'l2l_optim_cpu::simple_update'",
    }
    for kind, start in refused_by.items():
        assert report[kind].startswith(start), (kind, report[kind])
    assert report["TwoTensor param"] == "ok"
    for kind in ("DTensor param", "DTensor hidden", "nested param", "mkldnn param"):
        assert report[kind] != "ok" and not report[kind].startswith("signal"), (kind, report[kind])
    assert report["contiguous float32"] == "ok" and report["empty"] == "ok"
    assert "must be contiguous" in report["transposed param"]
