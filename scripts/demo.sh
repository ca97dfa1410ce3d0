#!/usr/bin/env bash
# The offline demo: tiny model + tokenizer + data built locally, then the whole chain from one
# config (format → sft → reward → ppo → dpo → merge), then a before/after table on held-out prompts and pairs.
# No network. Usage: scripts/demo.sh. Every path comes from configs/demo.yaml (runs/demo/...).
# Re-running skips the stages that are up to date; `make clean-demo` starts over.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=runs/demo
BIN=.venv/bin
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
start=$(date +%s)

echo "== 1/3 tiny model, tokenizer and demo data (offline) -> $DIR/tiny, $DIR/data"
$BIN/posttrain init-tiny "$DIR/tiny" --data-dir "$DIR/data"

echo "== 2/3 the chain: posttrain run configs/demo.yaml (format -> sft -> reward -> ppo -> dpo -> merge)"
$BIN/posttrain run configs/demo.yaml

echo "== 3/3 held-out evaluation: the random-init base, SFT, PPO, and the merged DPO model (after PPO)"
$BIN/python -m posttrain.demo "$DIR/data/sft_eval.jsonl" "$DIR/tiny" "$DIR/sft" "$DIR/ppo" "$DIR/merge" -n 500 \
  --pairs "$DIR/data/pref_eval.jsonl"

echo
echo "demo finished in $(( $(date +%s) - start )) s. Outputs:"
echo "  $DIR/posttrain-chain.json     the chain: stages, paths, status, key metrics, lineage"
echo "  $DIR/sft/, $DIR/reward/   the SFT model and the reward model (posttrain.json each)"
echo "  $DIR/ppo/, $DIR/dpo/      the PPO policy and the DPO LoRA adapter on it"
echo "  $DIR/merge/                 the merged model: loads with plain transformers"
