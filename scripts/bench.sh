#!/usr/bin/env bash
# `make bench`: every benchmark, run one after another on this machine, then one dated entry in
# docs/benchmarks.md (newest first) with their output. Run it on an otherwise idle machine: the
# CPU ratios are medians of interleaved repeats, but a busy machine still widens their spread.
#   CPU, always:      scripts/bench_trl.py startup | format | stages (posttrain vs plain TRL),
#                     scripts/bench_speed_defaults.sh (activation checkpointing, packing)
#   GPU, when found:  scripts/bench_gpu.py --check-targets (throughput, MFU, memory per arm)
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
PY=.venv/bin/python
out=runs/bench/$(date -u +%Y%m%d-%H%M%S)
mkdir -p "$out"
$PY scripts/bench_trl.py startup | tee "$out/startup.txt"
$PY scripts/bench_trl.py format | tee "$out/format.txt"
$PY scripts/bench_trl.py stages --repeats "${REPEATS:-5}" | tee "$out/stages.txt"
bash scripts/bench_speed_defaults.sh | tee "$out/speed_defaults.txt"
if $PY -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    $PY scripts/bench_gpu.py --check-targets | tee "$out/gpu.txt"
else
    echo "no CUDA GPU visible: the GPU benchmark (scripts/bench_gpu.py) was not run" | tee "$out/gpu.txt"
fi
$PY scripts/log_bench.py "$out"
