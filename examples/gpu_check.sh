#!/usr/bin/env bash
# One prepared check of the CUDA path, for a machine with an NVIDIA GPU. Run it from
# the repository root:
#
#     bash examples/gpu_check.sh            # ~3-5 minutes on an H100
#
# It needs python3 with torch (CUDA build), triton, pytest and hypothesis; the package itself is
# taken from ./src (no install needed). It prints everything and also writes the logs to
# $OUT (default /tmp/gpu_check): tests.txt, kernel.txt, bench.md.
#
#   1. the kernel parity tests on CUDA: every `triton` test of tests/test_kernels.py (against
#      the reference, fp64/fp32/mixed dtypes/bf16 state/non-contiguous/skip/...), plus the
#      no-host-sync and CUDA-graph capture test; the Triton non-finite scan against
#      torch.isfinite and the skip/raise policy on CUDA (tests/test_triton_finite.py); the
#      functional update on CUDA, the rms input norm inside the Triton kernel included
#      (tests/test_functional.py);
#   2. the fused Triton update alone at 100M parameters (25 x 2000x2000, fp32 and bf16 hidden
#      state), timed with CUDA events, against the memory-traffic bound (bytes moved / the
#      device-to-device copy bandwidth measured in the same run); the target is <= 1.25x;
#   3. `python -m benchmarks.bench --device cuda` on the base MLP and at 100M parameters.
#
# Copy the numbers into BENCHMARKS.md with the GPU's name.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
status=0

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv || true
$PY - <<'EOF' || exit 1
import torch, triton
assert torch.cuda.is_available(), "no CUDA device visible to torch"
print("torch", torch.__version__, "| triton", triton.__version__, "|", torch.cuda.get_device_name(),
      "|", torch.cuda.get_device_properties(0).multi_processor_count, "SMs")
EOF

echo "== 1. parity tests on CUDA"
$PY -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_triton_finite.py \
    tests/test_functional.py \
    -k "(triton and not interpreter) or flags or policy or last_coordinate" -x \
    -m "not slow" 2>&1 | tee "$OUT/tests.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "PARITY TESTS FAILED"; status=1; }

echo "== 2. fused kernel at 100M parameters vs the memory-traffic bound"
$PY - 2>&1 <<'EOF' | tee "$OUT/kernel.txt"
import torch, triton
from triton.testing import do_bench
from l2l_optim.nets import SimpleOptimizerNet
from l2l_optim.kernels.triton import simple_update_triton
from l2l_optim.kernels.reference import simple_update_reference

dev = torch.device("cuda")
torch.manual_seed(0)
w = SimpleOptimizerNet().fused_weights()
shapes = [(2000, 2000)] * 25
N = sum(a * b for a, b in shapes)

# bandwidth ceiling: a large device-to-device copy (bytes read + written)
src = torch.empty(2 * 1024**3 // 4, device=dev)
dst = torch.empty_like(src)
t_copy = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median") * 1e-3
bw = 2 * src.numel() * 4 / t_copy
del src, dst
print(f"copy bandwidth: {bw / 1e12:.2f} TB/s (read + write)")

for hdt, bytes_per in [(torch.float32, 4 + 80 + 8 + 8), (torch.bfloat16, 4 + 40 + 8 + 8)]:
    params = [torch.randn(s, device=dev) for s in shapes]
    grads = [torch.randn(s, device=dev) for s in shapes]
    hidden = [torch.zeros(10, a * b, device=dev, dtype=hdt) for a, b in shapes]
    lrs = [1e-3] * len(shapes)
    skip = torch.zeros((), dtype=torch.bool, device=dev)
    step = lambda: simple_update_triton(params, grads, hidden, lrs, w, skip)  # noqa: E731
    t = do_bench(step, warmup=10, rep=300, return_mode="median") * 1e-3
    bound = N * bytes_per / bw
    print(f"hidden {str(hdt):15s}: {t * 1e3:7.3f} ms/step, bound {bound * 1e3:6.3f} ms "
          f"({bytes_per} B/coord), ratio {t / bound:.2f} (target <= 1.25), "
          f"{N / t / 1e9:.1f} G coords/s")
    # the same step captured in a CUDA graph (no Python or launch overhead)
    step()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
        torch.cuda.synchronize()
        with torch.cuda.graph(g):
            step()
    torch.cuda.current_stream().wait_stream(s)
    tg = do_bench(g.replay, warmup=10, rep=300, return_mode="median") * 1e-3
    print(f"  as a CUDA graph: {tg * 1e3:7.3f} ms/step, ratio to bound {tg / bound:.2f}")
    if hdt is torch.float32:
        # the non-finite check: the Triton scan (what SimpleOptimizer uses on CUDA) against a
        # max-norm per tensor, each as a share of the update step
        from l2l_optim.kernels.triton import finite_flags_triton
        tf = do_bench(lambda: finite_flags_triton(grads), warmup=10, rep=300, return_mode="median") * 1e-3
        tn = do_bench(lambda: torch._foreach_norm(grads, float("inf")), warmup=10, rep=300,
                      return_mode="median") * 1e-3
        print(f"  non-finite scan: {tf * 1e3:.3f} ms ({100 * tf / t:.1f}% of the step, "
              f"{N * 4 / tf / 1e12:.2f} TB/s); _foreach_norm(inf): {tn * 1e3:.3f} ms ({100 * tn / t:.1f}%)")
    del params, grads, hidden, g
    torch.cuda.empty_cache()

# one large-size parity spot check against the reference (fp32, 3 steps)
p_ref = [torch.randn(s, device=dev) for s in shapes[:3]]
p_k = [p.clone() for p in p_ref]
h_ref = [torch.tanh(torch.randn(10, p.numel(), device=dev)) for p in p_ref]
h_k = [h.clone() for h in h_ref]
for i in range(3):
    gr = [torch.randn_like(p) for p in p_ref]
    simple_update_reference(p_ref, gr, h_ref, [1e-2] * 3, w)
    simple_update_triton(p_k, gr, h_k, [1e-2] * 3, w)
et = max((a - b).abs().max().item() for a, b in zip(p_ref, p_k))
eh = max((a - b).abs().max().item() for a, b in zip(h_ref, h_k))
scale = max(p.abs().max().item() for p in p_ref)
print(f"12M-coordinate parity after 3 steps: theta {et:.3g} (scale {scale:.3g}), h {eh:.3g}")
assert et <= 1e-6 * scale and eh <= 1e-6, "parity check failed"
EOF
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "KERNEL CHECK FAILED"; status=1; }

echo "== 3. optimizer-step benchmark on CUDA"
$PY -m benchmarks.bench --tables step --device cuda --sizes base,100m --steps 50 --rounds 5 --budget 60 \
    --optimizers sgd,adam-foreach,adam-fused,simple-ref,simple-fused,simple-fused-bf16,dm,rnnprop \
    --out "$OUT/bench.md" || { echo "BENCHMARK FAILED"; status=1; }

echo "== done (status $status); logs in $OUT"
exit $status
