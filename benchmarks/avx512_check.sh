#!/usr/bin/env bash
# One prepared check of the CPU kernel's vector copies against a git revision, for a machine
# that runs AVX-512 (AVX2 otherwise). Run it from the repository root, on a quiet machine:
#
#     bash benchmarks/avx512_check.sh [BASE]      # BASE: a git revision, default HEAD
#
# It needs python3 with torch, pytest and hypothesis, g++, git and objdump; the package itself
# is taken from ./src. It prints everything and also writes the logs to $OUT (default
# /tmp/avx512_check).
#
#   1. correctness of the working tree's library: every instruction set's copy against the
#      reference, the tanh's accuracy and its identity with the loop's, and the machine code
#      (the default loops vectorised, division-free; the vector copies run the intrinsics loop);
#   2. time: pass 1 of the library built from BASE's kernel sources and of the working tree's,
#      in alternation in one process (benchmarks/kernel_ab.cpp), fp32 and bf16 state, 10M
#      coordinates at 2 threads (memory-bound) and 65,536 in cache at 1 thread (compute-bound).
#      A ratio below 1: the working tree is faster. "bits: DIFFERENT" is expected where the
#      change alters results (the tool hashes the state after three steps).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/avx512_check}
BASE=${1:-HEAD}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
status=0

echo "== machine"
grep -m1 "model name" /proc/cpuinfo || true
ISA=avx2
grep -q avx512f /proc/cpuinfo && ISA=avx512
echo "isa: $ISA; load: $(cut -d' ' -f1-3 /proc/loadavg)"

echo "== 1. correctness of the working tree's library"
$PY -m pytest -q -p no:cacheprovider tests/test_kernels.py \
    -k "instruction_set or tanh or thread_count" 2>&1 | tee "$OUT/tests.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
$PY -m pytest -q -p no:cacheprovider -m slow tests/test_cpu_library.py \
    -k "vectorised or intrinsics" 2>&1 | tee -a "$OUT/tests.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== 2. time: $BASE's kernel against the working tree's, pass 1 in alternation"
rm -rf "$OUT/base" && mkdir -p "$OUT/base"
git archive "$BASE" src/l2l_optim/kernels | tar -x -C "$OUT/base" || exit 1
$PY - "$OUT" <<'EOF' || exit 1
import sys
from pathlib import Path
from l2l_optim.kernels._build import compile_library
out = Path(sys.argv[1])
compile_library(out / "base.so", out / "base/src/l2l_optim/kernels")
compile_library(out / "work.so")
EOF
g++ -O2 -fopenmp benchmarks/kernel_ab.cpp -o "$OUT/kernel_ab" -ldl || exit 1
threads=$(( $(nproc) < 2 ? $(nproc) : 2 ))
for state in float32 bfloat16; do
    "$OUT/kernel_ab" 10000000 10 "$threads" "$state" "$ISA" "$OUT/base.so" "$OUT/work.so"
    "$OUT/kernel_ab" 65536 300 1 "$state" "$ISA" "$OUT/base.so" "$OUT/work.so"
done 2>&1 | tee "$OUT/kernel_ab.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== done (status $status; load at the end: $(cut -d' ' -f1-3 /proc/loadavg)); logs in $OUT"
exit $status
