#!/usr/bin/env bash
# Re-creates every shipped weight file with the package's own meta_fit.
# Run from the repository root: bash weights/train.sh [name ...]   (default: all)
# Each run writes runs/<name>/{config.json,log.jsonl,checkpoint.pt,weights.safetensors};
# re-running resumes from the checkpoint. The shipped file and its log are then copied here.
set -euo pipefail
PY=${PY:-.venv/bin/python}
declare -A CMD=(
  [simple]="--trajectories 20 --eval-every 10 --eval-steps 1000 --threads 1 --seed 0"
  [simple-bias]="--bias --trajectories 10 --eval-every 10 --eval-steps 1000 --threads 1 --seed 0"
  [simple-noagg]="--no-aggregate --trajectories 10 --eval-every 10 --eval-steps 1000 --threads 1 --seed 0"
  [simple-uniform]="--meta-loss uniform --trajectories 10 --eval-every 10 --eval-steps 1000 --threads 1 --seed 0"
  [dm]="--arch dm --trajectories 3 --threads 1 --seed 0"
  [rnnprop]="--arch rnnprop --trajectories 2 --threads 1 --seed 0"
)
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(simple simple-bias simple-noagg simple-uniform dm rnnprop)
for name in "${names[@]}"; do
  $PY -m l2l_optim meta-fit ${CMD[$name]} --out-dir "runs/$name"
  cp "runs/$name/weights.safetensors" "weights/$name.safetensors"
  mkdir -p weights/logs
  cp "runs/$name/log.jsonl" "weights/logs/$name.log.jsonl"
done
