#!/usr/bin/env bash
# Re-creates every shipped weight file with the package's own meta_fit.
# Run from the repository root: bash weights/train.sh [name ...]   (default: all)
# Each run writes runs/<name>/{config.json,log.jsonl,checkpoint.pt,weights.safetensors};
# re-running resumes from the checkpoint. The shipped file and its log are then copied here.
set -euo pipefail
PY=${PY:-.venv/bin/python}
declare -A CMD=(
  [simple-v0]="--trajectories 20 --eval-every 10 --eval-steps 1000 --threads 1 --seed 0"
  [simple-bias]="--bias --trajectories 10 --eval-every 10 --eval-steps 1000 --threads 1 --seed 0"
  [simple-noagg]="--no-aggregate --trajectories 10 --eval-every 10 --eval-steps 1000 --threads 1 --seed 0"
  [simple-uniform]="--meta-loss uniform --trajectories 10 --eval-every 10 --eval-steps 1000 --threads 1 --seed 0"
  [dm]="--arch dm --trajectories 3 --threads 1 --seed 0"
  [rnnprop]="--arch rnnprop --trajectories 2 --threads 1 --seed 0"
)
SIMPLE_ARGS="--out-dir runs/simple-rms --init adam --init-lr 1e-3 --input-norm rms --families mlp mlp-wide mlp conv autoencoder lm regression quadratic --instances 1 --pairs 8 --horizons 1000 2000 4000 --slow-horizon 1000 --meta-lr 0.02 --generations 1000 --seed 31 --until 20"
# Schedule-Free averaging around the learned step, from the Schedule-Free AdamW init rule
SF_ARGS="--out-dir runs/simple-sf --init schedule-free --init-lr 2.5e-3 --input-norm rms --averaging 0.9 --families mlp mlp-wide mlp conv autoencoder lm regression quadratic --instances 1 --pairs 8 --horizons 500 1000 2000 4000 8000 --slow-horizon 1000 --meta-lr 0.02 --scaled-fraction 0.5 --scale-range 0.1 10 --generations 2000 --seed 41 --snapshot-every 10 --threads 1"
# the same with a 4x smaller meta step and the validation suite's measure (the final loss) as
# the objective: the simple-sf run improves its validation score only through the regression
# tasks and drifts away from Schedule-Free AdamW on the classifiers (docs/meta-training.md)
SF2_ARGS="${SF_ARGS/runs\/simple-sf/runs/simple-sf2} --objective final"
SF2_ARGS="${SF2_ARGS/--meta-lr 0.02/--meta-lr 0.005}"
# simple-sf: the simple-sf2 run's rule at generation 260 (selected on the validation suite,
# weights/validation/suite/simple-sf2-gen260.json), with its provenance in the file's metadata
SF_SELECT_GEN=260
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(simple-v0 simple simple-raw simple-bias simple-noagg simple-uniform dm rnnprop)
for name in "${names[@]}"; do
  if [ "$name" = simple-sf-run ] || [ "$name" = simple-sf2 ]; then
    # the runs: simple-sf-run resumes runs/simple-sf (the first recipe), simple-sf2 the run the
    # shipped file comes from; from runs/<dir>, or the committed checkpoint in weights/logs/<dir>
    dir=${name%-run}
    if [ ! -f "runs/$dir/checkpoint.pt" ] && [ -f "weights/logs/$dir/checkpoint.pt" ]; then
      mkdir -p "runs/$dir" && cp "weights/logs/$dir/"{checkpoint.pt,config.json,log.jsonl} "runs/$dir/"
    fi
    if [ "$name" = simple-sf-run ]; then args=$SF_ARGS; else args=$SF2_ARGS; fi
    $PY -m l2l_optim meta-es $args
    continue
  fi
  if [ "$name" = simple-sf ]; then
    # the run's own snapshot of the selected generation where it is here (runs/simple-sf2),
    # else the recipe run to that generation in its own directory (resumable)
    src=runs/simple-sf2/snapshots/gen$(printf %05d $SF_SELECT_GEN).safetensors
    log=runs/simple-sf2/log.jsonl
    if [ ! -f "$src" ]; then
      $PY -m l2l_optim meta-es ${SF2_ARGS/runs\/simple-sf2/runs/simple-sf-select} --until $SF_SELECT_GEN
      src=runs/simple-sf-select/weights.safetensors
      log=runs/simple-sf-select/log.jsonl
    fi
    $PY - "$SF_SELECT_GEN" "python -m l2l_optim meta-es $SF2_ARGS --until $SF_SELECT_GEN" "$src" "$log" <<'PYEOF'
import json, sys
from l2l_optim.weights import load_weights, save_weights
gen, command, src, log_path = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
loaded = load_weights(src)
recipe = json.loads(loaded.metadata["es_config"])
log = [json.loads(line) for line in open(log_path)]
last = [e for e in log if e["generation"] == gen - 1][-1]
validation = json.load(open(f"weights/validation/suite/simple-sf2-gen{gen}.json"))["results"][0]["geomeans"]
save_weights(loaded.net, "weights/simple-sf.safetensors", metadata={
    "recipe": recipe, "command": command, "seed": recipe["seed"],
    "final_meta_loss": last["fitness_centre"], "selected_generation": gen,
    "selection": "validation suite (python -m l2l_optim eval, 12 tasks, seed 0): the snapshot "
                 "whose full evaluation ran, among those whose 6-task trend was within the "
                 "trend's noise of the best (weights/logs/simple-sf2/validation.jsonl)",
    "validation": validation})
PYEOF
    continue
  fi
  if [ "$name" = simple ]; then
    # ES on the task population with the normalised input (input_norm="rms"), from the
    # Adam-like init rule; the generation given by --until was selected on the validation
    # suite (see README.md)
    $PY -m l2l_optim meta-es $SIMPLE_ARGS
    cp runs/simple-rms/weights.safetensors weights/simple.safetensors
    continue
  fi
  if [ "$name" = simple-raw ]; then
    # ES on the task population in two stages (see README.md): stage 1 from simple-v0, its
    # generation 53 (simple-es1); stage 2 from there with more and larger image tasks and
    # longer horizons, its generation 59 selected on the validation suite
    $PY -m l2l_optim meta-es --out-dir runs/simple-es --init simple-v0 --instances 2 --pairs 8 \
      --horizons 200 500 1000 2000 --seed 1 --until 53
    $PY -m l2l_optim meta-es --out-dir runs/simple-es2 --init runs/simple-es/weights.safetensors \
      --families mlp mlp mlp conv autoencoder autoencoder lm regression quadratic --instances 2 \
      --pairs 8 --horizons 1000 2000 4000 --seed 2 --until 59
    cp runs/simple-es2/weights.safetensors weights/simple-raw.safetensors
    continue
  fi
  $PY -m l2l_optim meta-fit ${CMD[$name]} --out-dir "runs/$name"
  cp "runs/$name/weights.safetensors" "weights/$name.safetensors"
  mkdir -p weights/logs
  cp "runs/$name/log.jsonl" "weights/logs/$name.log.jsonl"
done
