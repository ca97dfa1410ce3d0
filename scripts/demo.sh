#!/usr/bin/env bash
# The offline demo: tiny model + tokenizer + data built locally, then the whole chain from one
# config (format → sft → reward → ppo → dpo → merge → control → eval → export), ending with a report.
# No network. Usage: scripts/demo.sh. Every path comes from configs/demo.yaml (runs/demo/...).
# Re-running skips the stages that are up to date; `make clean-demo` starts over.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=runs/demo
BIN=.venv/bin
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
start=$(date +%s)

echo "== 1/2 tiny model, tokenizer and demo data (offline) -> $DIR/tiny, $DIR/data"
$BIN/posttrain init-tiny "$DIR/tiny" --data-dir "$DIR/data"

echo "== 2/2 the chain: posttrain run configs/demo.yaml"
echo "   format -> sft -> reward -> ppo -> dpo -> merge -> control (more SFT, same compute) -> eval -> export -> report"
$BIN/posttrain run configs/demo.yaml

echo
echo "== the report's tables ($DIR/report.md; plots and samples in $DIR/report.html)"
# The held-out tables: from the first table heading to the plots.
awk '/^## Every model/{on=1} /^!\[/{if(on) exit} on' "$DIR/report.md"

echo
echo "demo finished in $(( $(date +%s) - start )) s. Outputs:"
echo "  $DIR/report.html             the report: tables, plots, samples, lineage (opens offline)"
echo "  $DIR/report.md               the same in Markdown, plots in $DIR/report/"
echo "  $DIR/posttrain-chain.json    the chain: stages, paths, status, key metrics, time, memory"
echo "  $DIR/sft/, $DIR/reward/, $DIR/ppo/, $DIR/dpo/ (LoRA on ppo), $DIR/merge/, $DIR/control/"
echo "  $DIR/eval/                   eval.json (every metric) and generations.jsonl (every response)"
echo "  $DIR/export/                 the merged model as a GGUF file (llama.cpp) and its Ollama Modelfile"
