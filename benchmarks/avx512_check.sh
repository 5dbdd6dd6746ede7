#!/usr/bin/env bash
# One prepared check of the CPU kernel's AVX-512 copy, for a machine that runs AVX-512 (the
# machines this project's sessions get may not). Run it from the repository root, on a quiet
# machine:
#
#     bash benchmarks/avx512_check.sh          # a few minutes: three library builds
#
# It needs python3 with torch, pytest and hypothesis, g++ and objdump; the package itself is
# taken from ./src. It prints everything and also writes the logs to $OUT (default
# /tmp/avx512_check).
#
#   1. the bits: the AVX-512 intrinsics loop (simple_cpu_simd.h, built with
#      -DL2L_AVX512_INTRINSICS=1) against the shipped AVX-512 copy's loop
#      (tests/test_cpu_library.py::test_the_shipped_loop_gives_the_bits_of, whose AVX-512 case is
#      skipped on other machines);
#   2. the time: pass 1 of three builds of the library in alternation in one process
#      (benchmarks/kernel_ab.cpp), fp32 and bf16 state, 10M coordinates at 2 threads (the
#      bandwidth target's case) and 65,536 in cache at 1 thread:
#        three.so  the default: GCC's loop in three sweeps over an L1 buffer;
#        one.so    GCC's loop in one sweep (-DL2L_AVX512_ONE_SWEEP=1);
#        simd.so   the intrinsics loop in one sweep (-DL2L_AVX512_INTRINSICS=1).
#      A ratio below 1 is faster than three.so; each build's bits after three steps are
#      compared with three.so's as well.
#
# If simd.so is faster in both cases and step 1 passes, make it the default
# (L2L_AVX512_INTRINSICS in simple_cpu.cpp) and copy the numbers into BENCHMARKS.md.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/avx512_check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
status=0

echo "== machine"
grep -m1 "model name" /proc/cpuinfo || true
if ! grep -q avx512f /proc/cpuinfo; then
    echo "this CPU does not run AVX-512: nothing to check here" >&2
    exit 1
fi

echo "== 1. bits: the AVX-512 intrinsics loop against the shipped loop"
$PY -m pytest -q -p no:cacheprovider -m slow "tests/test_cpu_library.py::test_the_shipped_loop_gives_the_bits_of" \
    -k avx512 2>&1 | tee "$OUT/tests.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== 2. time: three builds of pass 1 in alternation"
FLAGS=$($PY -c 'from l2l_optim.kernels._build import FLAGS; print(" ".join(FLAGS))') || exit 1
SRC=src/l2l_optim/kernels/simple_cpu.cpp
g++ $FLAGS "$SRC" -o "$OUT/three.so" &&
    g++ $FLAGS -DL2L_AVX512_ONE_SWEEP=1 "$SRC" -o "$OUT/one.so" &&
    g++ $FLAGS -DL2L_AVX512_INTRINSICS=1 "$SRC" -o "$OUT/simd.so" &&
    g++ -O2 benchmarks/kernel_ab.cpp -o "$OUT/kernel_ab" -ldl || exit 1
threads=$(( $(nproc) < 2 ? $(nproc) : 2 ))
for state in float32 bfloat16; do
    "$OUT/kernel_ab" 10000000 10 "$threads" "$state" avx512 "$OUT/three.so" "$OUT/one.so" "$OUT/simd.so"
    "$OUT/kernel_ab" 65536 300 1 "$state" avx512 "$OUT/three.so" "$OUT/one.so" "$OUT/simd.so"
done 2>&1 | tee "$OUT/kernel_ab.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
grep -q DIFFERENT "$OUT/kernel_ab.txt" && status=1

echo "== done (status $status); logs in $OUT"
exit $status
