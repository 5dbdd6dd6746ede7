#!/usr/bin/env bash
# The CUDA (Triton) path checked on one NVIDIA GPU, unattended, in at most 9 minutes (an
# estimated 7-9 on an H100; see GPU_CHECK_BUDGET). Run it from the repository root:
#
#     bash examples/gpu_check.sh                        # every stage
#     STAGES="large scan" bash examples/gpu_check.sh    # some stages (names below)
#     GPU_CHECK_DRY_RUN=1 bash examples/gpu_check.sh    # no GPU: the stages' scripts on CPU
#                                                       # tensors in Triton's interpreter, at
#                                                       # small sizes (checks the script itself)
#
# It needs python3 with torch (a CUDA build), triton, pytest and hypothesis ($PYTHON picks
# another interpreter); the package is taken from ./src (the CPU kernel's library is compiled
# on first use where it is absent). Everything is printed and written to $OUT (default
# /tmp/gpu_check), at most 8 files: summary.txt, sm90.txt, tests.txt, large.txt, scan.txt,
# compile.txt, timing.txt, bench.md. The exit status is 0 only when every stage passed and
# met its targets; summary.txt has one line per stage.
#
# The stages run in the order below, each under a time limit, and all of them within
# GPU_CHECK_BUDGET seconds (default 540, to end inside a 10-minute lease): a stage that would
# start past it is skipped, which fails the run. Stages:
#   machine  the GPU, its driver and memory, torch and triton.
#   tests    the Triton tests on CUDA tensors: tests/test_kernels.py (parity with the
#            reference in every dtype combination, skip flag, aggregates, rms input, CUDA-graph
#            capture, no host sync), tests/test_triton_cuda.py (custom ops and opcheck,
#            aligned and unaligned groups, launches on a non-current device, a captured graph
#            after its tables left the cache, a bf16 step's memory), tests/test_triton_finite.py
#            and tests/test_functional.py's triton cases.
#   large    one step on 2^28+3 coordinates (the hidden state's offsets pass 2^31) against a
#            reference computed chunk by chunk: fp32 without the rms input (through an
#            aggregate: the per-tensor sums), fp32 with it (c per coordinate; one aligned
#            tensor of 2^28 and one of 3), bf16 parameters with one c per tensor, and a bf16
#            hidden state. Every coordinate of theta, h, v and c is compared (the head and the
#            tail slices printed apart), every block's partial sum, the reduced sum, and the
#            guard elements past each tensor's end stay untouched.
#   scan     the non-finite scan on one gradient of 2^31+7 elements (fp32 and bf16): NaN/Inf
#            at the first, middle, 2^31-1, 2^31 and last elements, beside small tensors and
#            through an unaligned view; its time against the copy bandwidth.
#   compile  torch.compile(opt.step, fullgraph=True) with inductor on CUDA parameters, a float
#            lr under a cosine schedule and a tensor lr: the Triton op in the graph, at most
#            2 graphs (state creation, then the step), parameters equal to eager steps; on
#            two 2048 x 2048 layers, the compiled step's time and memory against eager's (it
#            must not allocate a copy of the state).
#   timing   the fused update at 100M parameters (25 x 2000 x 2000) in every state option
#            (hidden state fp32/bf16; no rms input, c per coordinate, c per tensor; bf16
#            parameters; unaligned tensors; fp64) with CUDA events, against the bytes it moves
#            over the device-to-device copy bandwidth measured in the same run; target <= 1.25x
#            for every option but fp64 (reported only). Each option's time per kernel (torch
#            profiler), its CUDA-graph replay, and the non-finite scan's share of the step; two
#            rows (reported only) run the 16-bit groups at 512-coordinate blocks instead of
#            1024 (half the registers, 64-bit accesses), the choice a GPU's timing decides.
#   sm90     benchmarks/triton_sm90.py --check with this machine's Triton: registers, spills,
#            SASS instructions per coordinate and access widths of every kernel variant.
#            Targets: no spills, pass 1 of the default state <= 450 SASS per coordinate,
#            128-bit accesses on aligned tensors, block tables for 2^30 parameters < 0.1 s.
#   bench    python -m benchmarks.bench --tables step --device cuda: optimizer.step() against
#            SGD and Adam on the base MLP and at 100M parameters (reported only: neither its
#            failure nor its skipping for time fails the run).
#
# Copy summary.txt, timing.txt's table and sm90.txt into BENCHMARKS.md with the GPU's name.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu_check}
STAGES=${STAGES:-machine tests large scan compile timing sm90 bench}
BUDGET=${GPU_CHECK_BUDGET:-540}  # seconds for the whole run: stages past it are skipped
DRY=${GPU_CHECK_DRY_RUN:-0}
mkdir -p "$OUT"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export PYTHONPATH="$WORK:$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export GPU_CHECK_DRY_RUN=$DRY
if [ "$DRY" = 1 ]; then export TRITON_INTERPRET=1; else unset TRITON_INTERPRET; fi
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
status=0
START=$SECONDS

note() { echo "$*" | tee -a "$SUMMARY"; }
want() { case " $STAGES " in *" $1 "*) return 0 ;; esac; return 1; }

# run_stage NAME LIMIT_S LOG COMMAND...: COMMAND under a time limit (its stdin is the
# caller's: a here-document), its output on the console and appended to LOG; one summary line
run_stage() {
    local name=$1 limit=$2 log=$3 rc t0=$SECONDS msg=ok left
    shift 3
    want "$name" || return 0
    left=$((BUDGET - (SECONDS - START)))
    if [ "$left" -lt 30 ]; then
        [ "$name" = bench ] || status=1  # (the bench is reported only)
        note "$(printf '%-8s    0 s  SKIPPED: the run'"'"'s %d s are spent (GPU_CHECK_BUDGET)' "$name" "$BUDGET")"
        return 0
    fi
    [ "$limit" -le "$left" ] || limit=$left
    echo "== $name (limit ${limit} s)" | tee -a "$log"
    timeout --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$log"
    rc=${PIPESTATUS[0]}
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        msg="TIMED OUT after ${limit} s"
    elif [ "$rc" -ne 0 ]; then
        msg="FAILED (exit $rc): see $(basename "$log")"
    fi
    [ "$rc" -eq 0 ] || [ "$name" = bench ] || status=1
    note "$(printf '%-8s %4d s  %s' "$name" $((SECONDS - t0)) "$msg")"
}

# ------------------------------------------------------------ helpers the stages import
cat > "$WORK/gpu_check_lib.py" <<'EOF'
"""Helpers of examples/gpu_check.sh's stages."""
import os
import time

import torch

DRY = os.environ.get("GPU_CHECK_DRY_RUN") == "1"
DEV = torch.device("cpu" if DRY else "cuda")
H = 10
MISSED = []  # targets missed or checks failed, printed by finish()


def sync():
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def check(ok, what):
    """Record a check: printed with its verdict, remembered when it fails."""
    print(("  ok      " if ok else "  FAILED  ") + what)
    if not ok:
        MISSED.append(what)
    return ok


def finish():
    if MISSED:
        print("\nmissed:\n  " + "\n  ".join(MISSED))
        raise SystemExit(1)
    print("\nall checks passed")


def weights(seed=0, dtype=torch.float32):
    """Random folded weights with every bias (the default net has none): each weight
    uniform in +-1/sqrt(H), as the tests draw them."""
    from l2l_optim.nets import SimpleOptimizerNet

    g = torch.Generator().manual_seed(seed)
    net = SimpleOptimizerNet(bias=True)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) / H**0.5)
    return net.fused_weights(dtype=dtype)


def seconds(fn, rep_ms=300):
    """The median time of fn() in seconds: CUDA events (triton's do_bench) on a GPU."""
    if DEV.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=rep_ms, return_mode="median") * 1e-3
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[1]


def copy_bandwidth(nbytes=2 * 1024**3):
    """Bytes per second of a device-to-device copy, bytes read and written counted."""
    if DRY:
        nbytes = 1 << 24
    src = torch.empty(nbytes // 4, device=DEV)
    dst = torch.empty_like(src)
    t = seconds(lambda: dst.copy_(src))
    return 2 * nbytes / t


LABELS = {"_step_kernel": ["pass 1", "pass 2 (recompute)"], "_shift_kernel": ["pass 2 (shift)"],
          "_reduce_kernel": ["reduce"], "_segment_kernel": ["per-tensor sums"],
          "_ones_kernel": ["c per tensor"], "_nonfinite_kernel": ["non-finite scan"]}


def kernel_times(fn, calls=20):
    """[(label, mean device microseconds per call)] of the kernels fn launches, in launch
    order, from torch's profiler; None where there is no GPU."""
    if DEV.type != "cuda":
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        sync()
    events = sorted((e for e in prof.events() if e.device_type == DeviceType.CUDA),
                    key=lambda e: e.time_range.start)
    if not events or len(events) % calls:
        return [("(no per-call kernel sequence in the profile)", float("nan"))]
    per = len(events) // calls
    out = []
    for k in range(per):
        name = events[k].name
        seen = sum(e.name == name for e in events[:k])
        names = LABELS.get(name, [])
        label = names[seen] if seen < len(names) else name
        total = sum(events[c * per + k].time_range.elapsed_us() for c in range(calls))
        out.append((label, total / calls))
    return out
EOF

# ------------------------------------------------------------------------------- machine
if want machine; then
    {
        echo "== machine"
        [ "$DRY" = 1 ] && echo "(dry run: CPU tensors in Triton's interpreter, small sizes)"
        [ "$DRY" = 1 ] || nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,clocks.max.sm,clocks.max.mem --format=csv
        $PY - <<'EOF'
import os, platform, torch, triton
from gpu_check_lib import DRY
print("python", platform.python_version(), "| torch", torch.__version__, "| triton", triton.__version__)
if not DRY:
    assert torch.cuda.is_available(), "no CUDA device visible to torch"
    p = torch.cuda.get_device_properties(0)
    free, total = torch.cuda.mem_get_info()
    print(torch.cuda.get_device_name(), "|", p.multi_processor_count, "SMs | capability",
          f"{p.major}.{p.minor} | {free / 2**30:.1f} of {total / 2**30:.1f} GiB free")
EOF
    } 2>&1 | tee -a "$SUMMARY"
    [ "${PIPESTATUS[0]}" -eq 0 ] || { note "machine  no usable GPU: stopping"; exit 1; }
fi

# --------------------------------------------------------------------------------- tests
TESTS=(tests/test_kernels.py tests/test_triton_cuda.py tests/test_triton_finite.py tests/test_functional.py)
SELECT="(triton and not interpreter) or flags or policy or last_coordinate"
if [ "$DRY" = 1 ]; then  # the selection only: in the interpreter they take far longer
    run_stage tests 240 "$OUT/tests.txt" "$PY" -m pytest -q -p no:cacheprovider "${TESTS[@]}" \
        -k "$SELECT" -m "not slow" --collect-only
else
    run_stage tests 240 "$OUT/tests.txt" "$PY" -m pytest -q -p no:cacheprovider -rs "${TESTS[@]}" \
        -k "$SELECT" -m "not slow" --durations=10
fi

# --------------------------------------------------------------------------------- large
run_stage large 240 "$OUT/large.txt" "$PY" - <<'EOF'
"""One step at 2^28+3 coordinates against a reference computed chunk by chunk (compute
dtype, as kernels.reference, with the sums in fp64): every coordinate, every block's partial
sum, the reduced sum, and guard elements past each tensor's end."""
import math
import time

import torch

from gpu_check_lib import DEV, DRY, H, check, finish, sync, weights
from l2l_optim.kernels import triton as tk
from l2l_optim.kernels._common import RunningRms, compute_dtype, packed_weights
from l2l_optim.rule import output, recur, rms_normalise

BIG = 2**14 if DRY else 2**28
CHUNK = 2**13 if DRY else 2**22  # coordinates per reference chunk: a multiple of every block
GUARD = 64  # elements past each tensor's end that the step must leave alone
EDGE = 2**12 if DRY else 2**16  # the head and tail slices reported apart
LR = 0.01
f32, bf16 = torch.float32, torch.bfloat16
CONFIGS = [  # name, sizes, param dtype, hidden dtype, rms input (None, "coord", "tensor"), aggregate
    ("fp32, no rms input, through an aggregate", [BIG + 3], f32, f32, None, True),
    ("fp32, rms input with c per coordinate", [BIG, 3], f32, f32, "coord", False),
    ("bf16 parameters, rms input with c per tensor", [BIG + 3], bf16, f32, "tensor", False),
    ("fp32, bf16 hidden state, rms input", [BIG, 3], f32, bf16, "coord", False),
]
w = weights(3)


def guarded(n, dtype, fill):
    """A contiguous n-element view whose buffer runs GUARD elements past it (filled with 7)."""
    buf = torch.full((n + GUARD,), 7.0, dtype=dtype, device=DEV)
    view = buf[:n]
    if fill == "randn":
        view.normal_()
    elif fill == "tanh":
        view.normal_().tanh_()
    elif fill == "rand":
        view.uniform_(0.001, 1.0)
    return view, buf[n:]


class Spy:
    """Wraps the kernels' _pass to keep pass 1's block partials and the shared term."""

    def __init__(self):
        self.orig, self.seen = tk._pass, {}

    def __call__(self, step, mode, partials, shared):
        self.orig(step, mode, partials, shared)
        if mode == "pass1":
            self.seen["partials"], self.seen["layout"] = partials.clone(), step.layout
        else:
            self.seen["shared"] = shared.clone()


def ulps16(a, b, dtype, atol):
    """The largest |a - b| in units of the 16-bit dtype's spacing at |b| (at most twice its
    ulp there), or of atol where that is larger: near zero, fp32 differences far below the
    compute's precision change many of the ulps of a tiny value."""
    spacing = (b.abs().float() * torch.finfo(dtype).eps).clamp_min(atol)
    return ((a.float() - b.float()).abs() / spacing).max().item()


def run(name, sizes, pdt, hdt, layout, aggregate):
    print(f"\n-- {name}: sizes {sizes}, {sum(sizes):,} coordinates")
    torch.manual_seed(0)
    cd = compute_dtype(pdt)
    ps, gs, hs, vs, cs, guards = [], [], [], [], [], []
    for n in sizes:
        p, gp = guarded(n, pdt, "randn")
        h, gh = guarded(H * n, hdt, "tanh")
        ps.append(p)
        gs.append(torch.randn(n, dtype=pdt, device=DEV))
        hs.append(h.view(H, n))
        guards += [gp, gh]
        if layout is not None:
            v, gv = guarded(n, cd, "rand")
            c, gc = guarded(n if layout == "coord" else 1, cd, "rand")
            vs.append(v)
            cs.append(c)
            guards += [gv, gc]
    before = [[t.clone() for t in ts] for ts in (ps, hs, vs, cs)]
    rms = RunningRms(vs, cs) if layout is not None else None
    total = sum(sizes)
    sums_seen = []
    agg = (lambda s: sums_seen.append(s.clone()) or s.sum() / total) if aggregate else None
    skip = torch.zeros((), dtype=torch.bool, device=DEV)  # as the optimizer passes it
    spy = Spy()
    tk._pass = spy
    try:
        t0 = time.perf_counter()
        tk.simple_update_triton(ps, gs, hs, [LR] * len(sizes), w, skip, agg, rms)
        sync()
        print(f"step (with compilation) {time.perf_counter() - t0:.1f} s")
    finally:
        tk._pass = spy.orig
    check(all(bool((x == 7).all()) for x in guards), "guard elements past every tensor untouched")

    wc = packed_weights(w, DEV, cd)
    wb64 = wc.w_b.double()

    def chunks(i):
        """(start, stop, x, h') of tensor i's chunks, from the state before the step."""
        p0, h0, v0, c0 = (b[i] if b else None for b in before)
        for a in range(0, sizes[i], CHUNK):
            z = min(a + CHUNK, sizes[i])
            x = gs[i][a:z].to(cd)
            v_new = c_new = None
            if layout is not None:
                x, v_new, c_new = rms_normalise(x, v0[a:z], c0[a:z] if layout == "coord" else c0)
            yield a, z, x, v_new, c_new, recur(wc.w_ih, wc.w_hh, wc.b_h, x, h0[:, a:z].to(cd))

    # the reference's sums: per tensor and per block of the kernels' layout
    grp_of = {}
    for grp in spy.seen["layout"].groups:
        for j, i in enumerate(grp.idx):
            grp_of[i] = (grp, grp.part_base + grp.first[j])
    h_total = torch.zeros(H, dtype=torch.float64, device=DEV)
    s_tensor, s_abs_total = [], 0.0
    partials = spy.seen["partials"]
    worst_block = 0.0
    for i in range(len(sizes)):
        grp, first = grp_of[i]
        s_i = 0.0
        for a, z, x, v_new, c_new, hn in chunks(i):
            h_total += hn.double().sum(1)
            s = wb64 @ hn.double()
            bound = wb64.abs() @ hn.double().abs()
            pad = -(z - a) % grp.block
            blocks = torch.nn.functional.pad(s, (0, pad)).view(-1, grp.block).sum(1)
            bounds = torch.nn.functional.pad(bound, (0, pad)).view(-1, grp.block).sum(1)
            b0 = first + a // grp.block
            got = partials[b0 : b0 + blocks.numel()]
            worst_block = max(worst_block, ((got - blocks).abs() / (1e-5 * bounds + 1e-6)).max().item())
            s_i += s.sum().item()
            s_abs_total += bound.sum().item()
        s_tensor.append(s_i)
    check(worst_block <= 1, f"every block's partial sum within 1e-5 of its sum of |w_b h'| "
                            f"(worst at {worst_block:.3g} of the bound)")
    kernel_sum = math.fsum(partials.tolist())
    ref_shared = float(wb64 @ h_total) / total
    got_shared = spy.seen["shared"].item()
    if aggregate:
        seg = sums_seen[0].tolist()
        own = [math.fsum(partials[grp_of[i][1] : grp_of[i][1] + -(-sizes[i] // grp_of[i][0].block)].tolist())
               for i in range(len(sizes))]
        check(all(abs(a - b) <= 1e-12 * (abs(b) + 1) for a, b in zip(seg, own)),
              f"per-tensor sums {seg[0]:.6g}... equal the sums of their blocks' partials")
        check(all(abs(a - b) <= 1e-5 * s_abs_total for a, b in zip(seg, s_tensor)),
              f"per-tensor sums against the reference's {s_tensor[0]:.6g}...")
    else:
        check(abs(got_shared - kernel_sum / total) <= 1e-12 * (abs(kernel_sum) + 1) / total,
              f"reduced sum: S/N {got_shared:.9g} equals the fsum of the partials / N")
    check(abs(got_shared - ref_shared) <= 1e-5 * s_abs_total / total,
          f"shared term {got_shared:.9g} against the reference's {ref_shared:.9g}")

    # every coordinate against the reference's step
    shared = torch.tensor(ref_shared, dtype=torch.float64, device=DEV).to(cd)
    err, equal = {}, {}  # largest errors; smallest shares of exactly equal values

    def record(key, value):
        err[key] = max(err.get(key, 0.0), value)

    for i in range(len(sizes)):
        for a, z, x, v_new, c_new, hn in chunks(i):
            u = output(wc.w_a, hn, shared, wc.b_out)
            p_ref = (before[0][i][a:z].to(cd) + LR * u).to(pdt)
            h_ref = hn.to(hdt)
            pairs = [("theta", ps[i][a:z], p_ref), ("h", hs[i][:, a:z], h_ref)]
            if layout is not None:
                pairs.append(("v", vs[i][a:z], v_new))
                if layout == "coord":
                    pairs.append(("c", cs[i][a:z], c_new))
            for key, got, ref in pairs:
                if got.dtype in (torch.bfloat16, torch.float16):
                    e = ulps16(got, ref, got.dtype, 1e-5 * LR if key == "theta" else 1e-6)
                    share = (got == ref).float().mean().item()
                    equal[key] = min(equal.get(key, 1.0), share)
                else:
                    e = (got.double() - ref.double()).abs().max().item() / max(1.0, ref.abs().max().item())
                record(key, e)
                for part, lo, hi in (("head", 0, EDGE), ("tail", sizes[i] - EDGE, sizes[i])):
                    lo, hi = max(lo, a), min(hi, z)
                    if lo < hi:
                        sl = slice(lo - a, hi - a)
                        g_, r_ = (got[:, sl], ref[:, sl]) if key == "h" else (got[sl], ref[sl])
                        d = (g_.double() - r_.double()).abs().max().item()
                        record(f"{key} {part} of tensor {i}", d)
        if layout == "tensor":
            c_ref = before[3][i] * tk.RMS_CONSTANTS[0] + tk.RMS_CONSTANTS[1]
            record("c", (cs[i] - c_ref).abs().max().item())
    for key in sorted(err):
        if " of tensor " in key:
            print(f"  {key:28s} max |error| {err[key]:.3g}")
    low_p = pdt in (torch.bfloat16, torch.float16)
    low_h = hdt in (torch.bfloat16, torch.float16)
    check(err["theta"] <= (1.0 if low_p else 1e-6),
          f"theta: {err['theta']:.3g} " + ("ulps of its dtype" if low_p else "(relative to max(1, |theta|))"))
    if low_p:
        check(equal["theta"] >= 0.999, f"theta: {equal['theta']:.5f} of the chunks' values equal (>= 0.999)")
    check(err["h"] <= (2.0 if low_h else 2e-6), f"h: {err['h']:.3g}" + (" ulps" if low_h else ""))
    if low_h:
        check(equal["h"] >= 0.98, f"h: {equal['h']:.5f} of the chunks' values equal (>= 0.98)")
    if layout is not None:
        check(err["v"] <= 1e-6 and err["c"] <= 1e-6, f"v: {err['v']:.3g}, c: {err['c']:.3g} (relative)")


for config in CONFIGS:
    run(*config)
    if DEV.type == "cuda":
        torch.cuda.empty_cache()
finish()
EOF

# ---------------------------------------------------------------------------------- scan
run_stage scan 150 "$OUT/scan.txt" "$PY" - <<'EOF'
"""The non-finite scan past 2^31 elements, and its time."""
import torch

from gpu_check_lib import DEV, DRY, check, copy_bandwidth, finish, seconds
from l2l_optim.kernels.triton import finite_flags_triton

n = 2**17 + 7 if DRY else 2**31 + 7
bw = copy_bandwidth()
print(f"copy bandwidth {bw / 1e12:.2f} TB/s (read + write); one gradient of {n:,} elements")
for dtype in (torch.float32, torch.bfloat16):
    torch.manual_seed(0)
    g = torch.randn(n, dtype=dtype, device=DEV)
    small = [torch.randn(1000, dtype=dtype, device=DEV), torch.randn(7, dtype=dtype, device=DEV)]
    check(finite_flags_triton([small[0], g, small[1]]).tolist() == [True] * 3,
          f"{dtype}: finite gradients pass")
    for pos, bad in ((0, float("nan")), (n // 2, float("inf")), (2**31 - 1 if not DRY else n - 9, float("-inf")),
                     (2**31 if not DRY else n - 8, float("nan")), (n - 1, float("inf"))):
        old = g[pos].clone()
        g[pos] = bad
        flags = finite_flags_triton([small[0], g, small[1]]).tolist()
        flags_view = finite_flags_triton([g[1:]]).tolist()  # 2 or 4 bytes in: unaligned
        g[pos] = old
        check(flags == [True, False, True] and flags_view == [pos == 0],
              f"{dtype}: {bad} at element {pos:,} found (also through an unaligned view)")
    t = seconds(lambda: finite_flags_triton([g]))
    rate = g.numel() * g.element_size() / t
    print(f"  {dtype}: scan {t * 1e3:.2f} ms, {rate / 1e12:.2f} TB/s read "
          f"({100 * rate / bw:.0f}% of the copy's read + write rate)")
    del g
finish()
EOF

# ------------------------------------------------------------------------------- compile
run_stage compile 240 "$OUT/compile.txt" "$PY" - <<'EOF'
"""torch.compile(opt.step, fullgraph=True) with the Triton op inside, against eager steps."""
import time
import warnings

import torch
from torch._dynamo.utils import counters

from gpu_check_lib import DEV, DRY, check, finish, sync
from l2l_optim import SimpleOptimizer

torch.manual_seed(0)
x = torch.randn(64, 32, device=DEV)


def make():
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4)).to(DEV)


for kind in ("float lr, cosine schedule", "tensor lr"):
    torch._dynamo.reset()
    counters.clear()
    targets = []

    def backend(gm, example_inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        if DRY:
            return gm.forward
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs)

    models = [make(), make()]
    lr = 0.5 if kind.startswith("float") else torch.tensor(0.5, device=DEV)
    opts = [SimpleOptimizer(m.parameters(), impl="triton", lr=lr if isinstance(lr, float) else lr.clone())
            for m in models]
    step = torch.compile(opts[0].step, fullgraph=True, backend=backend)
    scheds = []
    if kind.startswith("float"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            scheds = [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=10) for o in opts]
    for _ in range(8):
        for m, o, f in ((models[0], opts[0], step), (models[1], opts[1], opts[1].step)):
            o.zero_grad()
            m(x).pow(2).mean().backward()
            f()
        for s in scheds:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                s.step()
    graphs = counters["stats"]["unique_graphs"]
    err = max((a - b).abs().max().item() for a, b in zip(models[0].parameters(), models[1].parameters()))
    print(f"-- {kind}: {graphs} graph(s), lr now {opts[0].param_groups[0]['lr']}")
    check("l2l_optim_triton.simple_update.default" in targets or
          "l2l_optim_triton.simple_update" in targets, f"{kind}: the Triton update is one op of the graph")
    check(graphs <= 2, f"{kind}: {graphs} graphs for 8 steps (at most 2: state creation, then the step)")
    check(err <= 1e-6, f"{kind}: compiled and eager parameters within {err:.3g} (<= 1e-6)")

# a larger model: the compiled step's time and memory against the eager step's. The ops mutate
# the state in place; a compiled step that copied it instead (a mutation inductor could not
# keep in place) would allocate about a hidden state's size every step
torch._dynamo.reset()
width = 64 if DRY else 2048
results = {}
for mode in ("eager", "compiled"):
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Linear(width, width)).to(DEV)
    opt = SimpleOptimizer(model.parameters(), impl="triton", lr=0.1)
    for q in model.parameters():
        q.grad = torch.randn_like(q)
    step = opt.step if mode == "eager" else torch.compile(opt.step, fullgraph=True, backend=backend)
    for _ in range(3):
        step()
    sync()
    hidden = sum(st["h"].numel() * st["h"].element_size() for st in opt.state.values())
    extra = float("nan")
    if DEV.type == "cuda":
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        sync()
        extra = torch.cuda.max_memory_allocated() - base
    t0 = time.perf_counter()
    for _ in range(20):
        step()
    sync()
    results[mode] = ((time.perf_counter() - t0) / 20, extra)
    print(f"-- {mode} step on {sum(q.numel() for q in model.parameters()):,} parameters: "
          f"{results[mode][0] * 1e3:.3f} ms, {extra / 2**20:.1f} MiB allocated beyond the state "
          f"(the hidden state: {hidden / 2**20:.1f} MiB)")
    if DEV.type == "cuda" and mode == "compiled":
        check(extra < hidden / 2, "the compiled step updates the state in place (allocates less "
                                  "than half a hidden state's size)")
finish()
EOF

# -------------------------------------------------------------------------------- timing
run_stage timing 300 "$OUT/timing.txt" "$PY" - <<'EOF'
"""The fused update at 100M parameters in every state option against the copy bandwidth."""
import torch

from gpu_check_lib import DEV, DRY, H, check, copy_bandwidth, finish, kernel_times, seconds, sync, weights
from l2l_optim.kernels import triton as tk
from l2l_optim.kernels._common import RunningRms
from l2l_optim.kernels.triton import finite_flags_triton, simple_update_triton

TARGET = 1.25
SHAPES = [(40, 50)] * 3 if DRY else [(2000, 2000)] * 25
ODD = [(39, 51)] * 3 if DRY else [(1999, 2001)] * 25  # odd sizes: element-wise accesses
f32, bf16, f64 = torch.float32, torch.bfloat16, torch.float64
BLOCK16 = tk.BLOCK_GPU_16BIT
# name, shapes, param dtype, hidden dtype, rms input, whether the 1.25x target applies, and
# the coordinates per program of groups with 16-bit data (the rows at 512 compare the fp32
# block size: 64-bit accesses at about half the registers, twice the resident warps)
OPTIONS = [
    ("fp32 h, no rms", SHAPES, f32, f32, None, True),
    ("fp32 h, rms c/coord", SHAPES, f32, f32, "coord", True),
    ("fp32 h, rms c/tensor", SHAPES, f32, f32, "tensor", True),
    ("bf16 h, no rms", SHAPES, f32, bf16, None, True),
    ("bf16 h, rms c/coord", SHAPES, f32, bf16, "coord", True),
    ("bf16 h, rms c/tensor", SHAPES, f32, bf16, "tensor", True),
    ("bf16 params, fp32 h, rms", SHAPES, bf16, f32, "coord", True),
    ("bf16 params, bf16 h, rms", SHAPES, bf16, bf16, "coord", True),
    ("fp32 h, rms c/coord, unaligned tensors", ODD, f32, f32, "coord", True),
    ("fp64 params and state, rms", SHAPES, f64, f64, "coord", False),
    ("bf16 h, rms c/coord, 512 blocks", SHAPES, f32, bf16, "coord", False, 512),
    ("bf16 params, fp32 h, rms, 512 blocks", SHAPES, bf16, f32, "coord", False, 512),
]


def traffic(pdt, hdt, rms):
    """Bytes per coordinate: what the kernels move, and what one read and one write of each
    input and output would (pass 2 re-reads theta; bf16 parameters recompute pass 1)."""
    P, G, Hb = pdt.itemsize, pdt.itemsize, H * hdt.itemsize
    S = (8 if pdt == f64 else 4) * {None: 0, "coord": 2, "tensor": 1}[rms]  # v (and c)
    once = G + Hb + S + P + Hb + S + P
    if pdt in (bf16, torch.float16):
        return once + (G + Hb + S), once  # pass 1 reads g, h, v, c; pass 2 all of it again
    return once + 2 * P, once  # pass 2: theta read and written again


w = weights(5)
bw = copy_bandwidth()
print(f"copy bandwidth {bw / 1e12:.2f} TB/s (read + write)\n")
rows = []
for name, shapes, pdt, hdt, rms_kind, gated, *block16 in OPTIONS:
    tk.BLOCK_GPU_16BIT = block16[0] if block16 else BLOCK16  # (read when the tables are built)
    torch.manual_seed(0)
    cd = f64 if pdt == f64 else f32
    params = [torch.randn(s, device=DEV, dtype=pdt) for s in shapes]
    grads = [torch.randn(s, device=DEV, dtype=pdt) for s in shapes]
    hidden = [torch.zeros(H, a * b, device=DEV, dtype=hdt) for a, b in shapes]
    rms = None
    if rms_kind is not None:
        rms = RunningRms([torch.zeros(p.numel(), device=DEV, dtype=cd) for p in params],
                         [torch.zeros(p.numel() if rms_kind == "coord" else 1, device=DEV, dtype=cd)
                          for p in params])
    lrs = [1e-3] * len(shapes)
    skip = torch.zeros((), dtype=torch.bool, device=DEV)
    n = sum(p.numel() for p in params)

    def step():
        simple_update_triton(params, grads, hidden, lrs, w, skip, None, rms)

    t = seconds(step)
    moved, once = traffic(pdt, hdt, rms_kind)
    bound = n * moved / bw
    graph_t = float("nan")
    if DEV.type == "cuda":  # the same step as a CUDA graph: no launch overhead
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.stream(side):
                step()
                sync()
                with torch.cuda.graph(graph):
                    step()
            torch.cuda.current_stream().wait_stream(side)
            graph_t = seconds(graph.replay)
            del graph
        except Exception as e:  # noqa: BLE001 - recorded, and the other options still timed
            check(False, f"{name}: the step captured as a CUDA graph: {type(e).__name__}: {e}")
    scan_t = seconds(lambda: finite_flags_triton(grads))
    rows.append((name, t, graph_t, t / bound, n * once / bw, moved, once, n / t, scan_t))
    print(f"-- {name}: {t * 1e3:.3f} ms eager, {graph_t * 1e3:.3f} ms as a CUDA graph; "
          f"{moved} B/coordinate moved ({once} read and written once): bound {bound * 1e3:.3f} ms, "
          f"ratio {t / bound:.2f}; {n / t / 1e9:.1f} G coordinates/s; non-finite scan "
          f"{scan_t * 1e3:.3f} ms ({100 * scan_t / t:.1f}% of the step)")
    try:  # (reported only: a profiler that fails here fails no target)
        for label, us in kernel_times(step) or []:
            print(f"     {label:22s} {us:9.1f} us per step")
    except Exception as e:  # noqa: BLE001
        print(f"     no per-kernel times: {type(e).__name__}: {e}")
    if gated and not DRY:  # (a dry run's interpreter times nothing worth a target)
        check(t / bound <= TARGET, f"{name}: {t / bound:.2f}x the memory-traffic bound (target <= {TARGET})")
    del params, grads, hidden, rms
    if DEV.type == "cuda":
        torch.cuda.empty_cache()

print("\n| state option | ms/step | as a CUDA graph | ratio to the bound | B/coord (kernel / once) "
      "| ratio to one read and write | G coords/s | scan, % of step |")
print("|---|---|---|---|---|---|---|---|")
for name, t, gt, ratio, once_t, moved, once, rate, scan_t in rows:
    print(f"| {name} | {t * 1e3:.3f} | {gt * 1e3:.3f} | {ratio:.2f} | {moved} / {once} | "
          f"{t / once_t:.2f} | {rate / 1e9:.1f} | {100 * scan_t / t:.1f} |")
finish()
EOF

# ---------------------------------------------------------------------------------- sm90
run_stage sm90 180 "$OUT/sm90.txt" "$PY" benchmarks/triton_sm90.py --check

# --------------------------------------------------------------------------------- bench
if [ "$DRY" = 1 ]; then
    want bench && note "bench    skipped in a dry run"
else
    run_stage bench 150 "$OUT/bench.md" "$PY" -m benchmarks.bench --tables step --device cuda \
        --sizes base,100m --steps 20 --rounds 3 --budget 15 \
        --optimizers sgd,adam-foreach,adam-fused,simple-fused,simple-fused-bf16
fi

note "$(printf 'total    %4d s  %s' $((SECONDS - START)) "$([ $status -eq 0 ] && echo 'every stage passed' || echo 'SOME STAGE FAILED')")"
exit $status
