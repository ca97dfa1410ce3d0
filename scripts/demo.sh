#!/usr/bin/env bash
# The offline demo: tiny model + tokenizer + data built locally, then format → sft, then a
# before/after table on held-out prompts. No network. Usage: scripts/demo.sh
# (`posttrain run configs/demo.yaml` replaces the middle part once the chain runner exists.)
# Every path comes from configs/demo.yaml (runs/demo/...).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=runs/demo
BIN=.venv/bin
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
start=$(date +%s)

echo "== 1/4 tiny model, tokenizer and demo data (offline) -> $DIR/tiny, $DIR/data"
$BIN/posttrain init-tiny "$DIR/tiny" --data-dir "$DIR/data"

echo "== 2/4 format -> $DIR/format"
$BIN/posttrain format configs/demo.yaml --overwrite

echo "== 3/4 sft -> $DIR/sft"
$BIN/posttrain sft configs/demo.yaml --overwrite

echo "== 4/4 held-out exact match, before vs after SFT"
$BIN/python -m posttrain.demo "$DIR/data/sft_eval.jsonl" "$DIR/tiny" "$DIR/sft" -n 500

echo
echo "demo finished in $(( $(date +%s) - start )) s. Outputs:"
echo "  $DIR/format/posttrain.json   formatted data, dropped rows, template checks"
echo "  $DIR/sft/                    the fine-tuned model, tokenizer + template, metrics.jsonl, posttrain.json"
