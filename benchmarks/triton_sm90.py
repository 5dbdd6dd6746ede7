"""The Triton kernels compiled for sm_90 (H100) without a GPU: registers, spills, SASS and
memory-access widths of every variant, and the block tables' build time.

Run from the repository's root::

    python -m benchmarks.triton_sm90               # every variant, then the table build time
    python -m benchmarks.triton_sm90 --sass DIR    # also write each variant's SASS to DIR
    python -m benchmarks.triton_sm90 --check       # exit 1 when a target below is missed

Each kernel of :mod:`l2l_optim.kernels.triton` is compiled ahead of time with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` and Triton's bundled
``ptxas``; the cubin is read with the bundled ``cuobjdump`` (registers, local memory) and
``nvdisasm`` (the SASS). Where Triton ships no ``nvdisasm`` / ``cuobjdump``, the columns they
fill are left out and the script says so. The pointer arguments are compiled as 16-byte
aligned, as Triton's launcher specialises torch's allocations.

Columns:

* ``regs``: registers per thread; ``spill``: local-memory bytes and ``STL``/``LDL``
  instructions (0 / 0 is no spill);
* ``SASS``: static instructions (``NOP`` padding left out); ``/coord``: per coordinate, i.e.
  divided by the coordinates one thread handles (``BLOCK / (32 * num_warps)``): the update's
  loops are unrolled, so every coordinate runs each instruction once (the non-finite check's
  slow path and the update's IEEE-division fallbacks excepted);
* ``loads`` / ``stores``: the per-coordinate global accesses (those under the block's mask,
  i.e. predicated) by width in bits (``128x6`` is six 128-bit instructions); ``scalar``: the
  unpredicated loads of tables, weights and flags, same format.

Targets (``--check``): no variant spills; pass 1 of the default state (fp32 parameters and
gradients, bf16 hidden state rounded stochastically, the rms input norm with its bias
correction c per tensor, the skip flag, aligned tensors) and of the fp32 state (either layout
of c) takes at most 450 SASS instructions per coordinate; aligned variants at the kernels' block sizes move their
per-coordinate data in 128-bit accesses only (the rows marked 512 compile 16-bit groups at
the fp32 block size, for comparison: narrower accesses, fewer registers).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

PASS1_TARGET = 450  # SASS instructions per coordinate, pass 1 of the default state


@dataclass
class Variant:
    name: str
    kernel: str  # attribute of l2l_optim.kernels.triton
    types: dict  # non-constexpr argument -> Triton type
    constexprs: dict
    coords_per_thread: int  # 0: not a per-coordinate kernel
    aligned: bool = False
    default: bool = False  # the pass-1 target applies
    wide: bool = True  # an aligned variant's accesses must be 128 bits wide


def _tools() -> tuple[Path | None, Path | None]:
    import triton

    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    found = [bin_dir / name if (bin_dir / name).exists() else None for name in ("cuobjdump", "nvdisasm")]
    return found[0], found[1]


def variants() -> list[Variant]:
    import triton.language as tl

    from l2l_optim.kernels import triton as tk

    warps = tk.NUM_WARPS
    scan_per_thread = tk.SCAN_BLOCK_GPU // (32 * warps)
    step_types = dict(tab="*i64", blk="*i32", lr_ptr="*fp64", w_ptr="*fp32", norm_ptr="*fp64",
                      part_ptr="*fp64", shared_ptr="*fp64", skip_ptr="*i1", key_ptr="*i64")
    f32, f64, bf16, f16 = tl.float32, tl.float64, tl.bfloat16, tl.float16
    out = []

    def step(name, mode, p, g, h, c_layout=1, aligned=True, default=False, block=None,
             stochastic=False):
        cdt = f64 if p == f64 else f32
        wide = block is None
        if block is None:
            block = tk.BLOCK_GPU_16BIT if {p, g, h} & {bf16, f16} else tk.BLOCK_GPU
        out.append(Variant(name, "_step_kernel", step_types, dict(
            H=10, BLOCK=block, P_DT=p, G_DT=g, H_DT=h, C_DT=cdt, MODE=mode, HAS_SKIP=True,
            C_LAYOUT=c_layout, ALIGNED=aligned, NATIVE_BF16=True, STOCHASTIC=stochastic),
            block // (32 * warps),
            aligned, default, wide))

    # the default state: bf16 hidden state rounded stochastically, c per tensor
    step("pass1 default (bf16 stochastic, rms)", 0, f32, f32, bf16, c_layout=2, default=True,
         stochastic=True)
    step("pass1 default, c per coordinate", 0, f32, f32, bf16, stochastic=True)
    step("pass1 fp32 state (rms)", 0, f32, f32, f32, default=True)
    step("pass1 fp32 state, c per tensor", 0, f32, f32, f32, c_layout=2, default=True)
    step("pass1 fp32 state, unaligned", 0, f32, f32, f32, aligned=False)
    step("pass1 fp32, no rms", 0, f32, f32, f32, c_layout=0)
    step("pass1 fp32, bf16 hidden", 0, f32, f32, bf16)
    step("pass1 fp32, bf16 hidden, no rms", 0, f32, f32, bf16, c_layout=0)
    step("pass1 bf16 params (sums)", 1, bf16, bf16, f32)
    step("pass2 bf16 params (recompute)", 2, bf16, bf16, f32)
    step("pass2 bf16 params, bf16 hidden", 2, bf16, bf16, bf16)
    step("pass2 bf16 params, bf16 hidden, stochastic", 2, bf16, bf16, bf16, stochastic=True)
    step("pass2 fp16 params", 2, f16, f16, f32)
    step("pass1 fp64", 0, f64, f64, f64)
    # 16-bit groups at the fp32 block size: 64-bit accesses to 16-bit data, at about half
    # the registers (twice the resident warps), the alternative a GPU's timing decides
    step("pass1 fp32, bf16 hidden, 512", 0, f32, f32, bf16, block=tk.BLOCK_GPU)
    step("pass2 bf16 params, 512", 2, bf16, bf16, f32, block=tk.BLOCK_GPU)
    shift_types = dict(tab="*i64", blk="*i32", lr_ptr="*fp64", shared_ptr="*fp64", skip_ptr="*i1")
    for name, p, aligned in (("pass2 fp32 (shift)", f32, True), ("pass2 fp32, unaligned", f32, False)):
        out.append(Variant(name, "_shift_kernel", shift_types, dict(
            BLOCK=tk.BLOCK_GPU, P_DT=p, C_DT=f32, HAS_SKIP=True, ALIGNED=aligned),
            tk.BLOCK_GPU // (32 * warps), aligned))
    scan_types = dict(tab="*i64", blk="*i32", out_ptr="*i32")
    for name, u_dt, exp, aligned in (("scan fp32", tl.uint32, 0x7F800000, True),
                                     ("scan bf16", tl.uint16, 0x7F80, True),
                                     ("scan fp32, unaligned", tl.uint32, 0x7F800000, False)):
        out.append(Variant(name, "_nonfinite_kernel", scan_types, dict(
            BLOCK=tk.SCAN_BLOCK_GPU, U_DT=u_dt, EXP=exp, ALIGNED=aligned), scan_per_thread, aligned))
    out.append(Variant("reduce", "_reduce_kernel", dict(part_ptr="*fp64", n_part="i64",
                                                        shared_ptr="*fp64", n_total="i64"),
                       dict(R=tk.REDUCE_BLOCK), 0))
    out.append(Variant("segment sums", "_segment_kernel", dict(part_ptr="*fp64", seg_ptr="*i64",
                                                               out_ptr="*fp64", T="i64"),
                       dict(R=tk.REDUCE_BLOCK), 0))
    out.append(Variant("c per tensor", "_ones_kernel", dict(tab="*i64", norm_ptr="*fp64",
                                                           skip_ptr="*i1"),
                       dict(C_DT=f32, HAS_SKIP=True), 0))
    return out


def compile_sm90(v: Variant, num_warps: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from l2l_optim.kernels import triton as tk

    fn = getattr(tk, v.kernel)
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in v.constexprs:
            signature[name] = "constexpr"
        else:
            signature[name] = v.types[name]
            if v.types[name].startswith("*"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, signature, constexprs=dict(v.constexprs), attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


# a global access, with its predicate: the per-coordinate data are read and written under
# the block's mask (predicated), the tables and weights with unpredicated scalar loads. The
# compiler may turn a kernel's last masked store into a conditional EXIT followed by an
# unpredicated store: a store after a conditional EXIT, as wide as the kernel's predicated
# accesses, counts as masked too (pass 1's partial sum, an fp64 store there, does not)
_ACCESS = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(@!?P\d\s+)?(LDG|STG)((?:\.[A-Z0-9_]+)*)")
_COND_EXIT = re.compile(r"/\*[0-9a-f]{4,}\*/\s+@!?P\d\s+EXIT")
_WIDTH = {"U8": 8, "S8": 8, "U16": 16, "S16": 16, "64": 64, "128": 128}


def _width(suffix: str) -> int:
    for part in suffix.split("."):
        if part in _WIDTH:
            return _WIDTH[part]
    return 32


def analyse(cubin: bytes, cuobjdump: Path | None, nvdisasm: Path | None, sass_out: Path | None,
            name: str) -> dict:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "k.cubin"
        path.write_bytes(cubin)
        row: dict = {}
        if cuobjdump is not None:
            res = subprocess.run([str(cuobjdump), "-res-usage", str(path)], capture_output=True,
                                 text=True, check=True).stdout
            m = re.search(r"REG:(\d+).*?STACK:(\d+).*?LOCAL:(\d+)", res)
            row["regs"], row["stack"], row["local"] = (int(x) for x in m.groups())
        if nvdisasm is not None:
            sass = subprocess.run([str(nvdisasm), "-c", str(path)], capture_output=True, text=True,
                                  check=True).stdout
            if sass_out is not None:
                sass_out.mkdir(parents=True, exist_ok=True)
                (sass_out / (re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_") + ".sass")).write_text(sass)
            ops = [m.group(1) for m in re.finditer(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass)]
            ops = [o for o in ops if o != "NOP"]
            row["sass"] = len(ops)
            row["spill_ops"] = sum(o.startswith(("STL", "LDL")) for o in ops)
            loads, stores, scalar = Counter(), Counter(), Counter()
            exit_at = min((m.start() for m in _COND_EXIT.finditer(sass)), default=len(sass))
            accesses = [(m.group(1) is not None, m.group(2), _width(m.group(3)), m.start())
                        for m in _ACCESS.finditer(sass)]
            masked_widths = {w for pred, _, w, _ in accesses if pred}
            for pred, op, w, at in accesses:
                sunk = op == "STG" and at > exit_at and w in masked_widths
                kind = scalar if not (pred or sunk) else loads if op == "LDG" else stores
                kind[w] += 1
            row["loads"], row["stores"], row["scalar"] = loads, stores, scalar
        return row


def _widths(c: Counter) -> str:
    return " ".join(f"{w}x{n}" for w, n in sorted(c.items(), reverse=True)) or "-"


def table_build_seconds(total: int = 2**30, tensors: int = 1, repeats: int = 3) -> float:
    """Seconds to build the update's block tables for ``total`` parameters in ``tensors``
    tensors (meta tensors: sizes only, no memory), the best of ``repeats``."""
    from l2l_optim.kernels import triton as tk
    from l2l_optim.kernels._triton_tables import build_layout

    sizes = [total // tensors + (1 if i < total % tensors else 0) for i in range(tensors)]
    params = [torch.empty(n, device="meta") for n in sizes]
    key = (torch.float32, torch.float32, torch.float32, 1, True)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        build_layout([key] * len(params), [p.numel() for p in params], tk._block,
                     torch.device("meta"))
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sass", type=Path, help="write each variant's SASS to this directory")
    ap.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = ap.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # compile, never interpret
    try:
        import triton  # noqa: F401

        from l2l_optim.kernels import triton as tk
    except ImportError as e:
        print(f"skipped: Triton cannot be imported ({e})")
        return 0
    if tk.interpret_mode() or not tk.is_available():
        print("skipped: Triton is unavailable or in interpret mode")
        return 0
    cuobjdump, nvdisasm = _tools()
    if cuobjdump is None:
        print("note: Triton ships no cuobjdump here: no register / local-memory columns")
    if nvdisasm is None:
        print("note: Triton ships no nvdisasm here: no SASS or access-width columns")
    print(f"sm_90, num_warps={tk.NUM_WARPS}, BLOCK={tk.BLOCK_GPU} (16-bit groups "
          f"{tk.BLOCK_GPU_16BIT}, scan {tk.SCAN_BLOCK_GPU}), triton {triton.__version__}\n")
    head = (f"{'variant':34s} {'regs':>4s} {'spill':>7s} {'SASS':>5s} {'/coord':>6s}  "
            f"{'loads (bits x n)':18s} {'stores':14s} scalar")
    print(head)
    print("-" * len(head))
    missed = []
    for v in variants():
        k = compile_sm90(v, tk.NUM_WARPS)
        r = analyse(k.asm["cubin"], cuobjdump, nvdisasm, args.sass, v.name)
        per = f"{r['sass'] / v.coords_per_thread:.0f}" if v.coords_per_thread and "sass" in r else "-"
        spill = f"{r.get('local', '?')}/{r.get('spill_ops', '?')}"
        print(f"{v.name:34s} {r.get('regs', '?'):>4} {spill:>7s} {r.get('sass', '?'):>5} {per:>6s}  "
              f"{_widths(r.get('loads', Counter())):18s} {_widths(r.get('stores', Counter())):14s} "
              f"{_widths(r.get('scalar', Counter()))}")
        if r.get("local", 0) or r.get("spill_ops", 0):
            missed.append(f"{v.name}: spills")
        if v.default and "sass" in r and r["sass"] / v.coords_per_thread > PASS1_TARGET:
            missed.append(f"{v.name}: {r['sass'] / v.coords_per_thread:.0f} SASS/coordinate > {PASS1_TARGET}")
        if v.aligned and v.wide and v.coords_per_thread and "loads" in r:
            narrow = sorted({w for w in (*r["loads"], *r["stores"]) if w < 128})
            if narrow:
                missed.append(f"{v.name}: per-coordinate accesses of {narrow} bits")
    print()
    for tensors in (1, 1000):
        s = table_build_seconds(2**30, tensors)
        print(f"block tables for 2^30 parameters in {tensors} tensor(s): {s * 1e3:.1f} ms")
        if s > 0.1:
            missed.append(f"table build {s:.2f} s > 0.1 s")
    if missed:
        print("\nmissed:\n  " + "\n  ".join(missed))
    return 1 if (missed and args.check) else 0


if __name__ == "__main__":
    sys.exit(main())
