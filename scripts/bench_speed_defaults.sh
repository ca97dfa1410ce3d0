#!/usr/bin/env bash
# What two of posttrain's speed defaults cost or save on this machine: the demo's SFT on the
# benchmark model for 100 steps, as posttrain runs it by default, with activation checkpointing
# on (TRL's default), and with packing (bfd, padding-free); REPEATS interleaved rounds. Prints each
# run's train time, tokens/s, conversations trained, final loss and the speed settings from its
# manifest. Uses the model and config `scripts/bench_trl.py stages` builds (run that first).
#   OMP_NUM_THREADS=2 bash scripts/bench_speed_defaults.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
W=${WORKDIR:-/tmp/posttrain-bench-trl}
CFG=$W/bench-tiny-h128-l4-a4.yaml
[ -f "$CFG" ] || { echo "no $CFG: run scripts/bench_trl.py stages first"; exit 1; }
for rep in $(seq 1 "${REPEATS:-2}"); do
  for arm in default checkpointing packing; do
    extra=()
    [ "$arm" = checkpointing ] && extra=(--set sft.training.activation_checkpointing=true)
    [ "$arm" = packing ] && extra=(--set sft.training.packing=true)
    out=$W/feat-$arm-$rep
    rm -rf "$out"
    .venv/bin/posttrain sft "$CFG" -o "$out" --set sft.training.max_steps=100 --set sft.training.save_steps=1000 \
        "${extra[@]}" > "$out.log" 2>&1
    .venv/bin/python -c "
import json, sys
m = json.load(open(sys.argv[1]))['metrics']
print(sys.argv[2], 'round', sys.argv[3], '| train_runtime_s', m['train_runtime_s'], '| tokens/s', m['tokens_per_second'],
      '| conversations', m['train_sequences'], '| final loss', round(m['train_loss_final'], 4), '|', m['speed'])
" "$out/posttrain.json" "$arm" "$rep"
  done
done
