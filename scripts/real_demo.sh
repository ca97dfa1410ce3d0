#!/usr/bin/env bash
# The real-model demo: two chains on real pretrained models, on 2 CPU cores, offline once the models
# are fetched (`make real-demo` runs scripts/fetch_models.py first), each ending in its report:
#   smollm2: SmolLM2-135M-Instruct  format -> sft -> reward -> ppo -> dpo -> merge -> control -> eval -> export
#   gemma3:  Gemma-3-270M (base)    format -> sft -> dpo -> merge -> control -> eval -> export
# Both learn the task of src/posttrain/realtask.py (short factual answers as "Answer: <x>"; brief
# preferred by the reward model and PPO, bold by DPO). After each chain, the retention check: KL from
# the base model, per token, on general text the base model sampled itself (realtask.retention).
# Usage: scripts/real_demo.sh [smollm2] [gemma3]    (both when none is named)
# Re-running skips the stages that are up to date; rm -rf runs/smollm2-cpu runs/gemma3-cpu starts over.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

chains=("$@")
[ ${#chains[@]} -eq 0 ] && chains=(smollm2 gemma3)
for name in "${chains[@]}"; do
    case $name in smollm2|gemma3) ;; *) echo "unknown chain '$name' (choose smollm2 and/or gemma3)" >&2; exit 2;; esac
    test -f "configs/$name-cpu.yaml"
done

declare -A seconds
for name in "${chains[@]}"; do
    cfg=configs/$name-cpu.yaml
    dir=runs/$name-cpu
    start=$(date +%s)
    echo "== $name 1/3: the task's data (deterministic, seed 0) -> $dir/data"
    $BIN/python -m posttrain.realtask data "$dir/data"
    echo "== $name 2/3: the chain: posttrain run $cfg"
    $BIN/posttrain run "$cfg"
    echo "== $name 3/3: retention (KL from the base model on general text it sampled)"
    if [ -f "$dir/retention.json" ] && [ "$dir/retention.json" -nt "$dir/eval/eval.json" ]; then
        echo "up to date: $dir/retention.json"
    else
        $BIN/python -m posttrain.realtask retention "$cfg"
    fi
    seconds[$name]=$(( $(date +%s) - start ))
done

for name in "${chains[@]}"; do
    dir=runs/$name-cpu
    echo
    echo "=================== $name: the report's tables ($dir/report.md; plots and samples in $dir/report.html)"
    awk '/^## Every model/{on=1} /^!\[/{if(on) exit} on' "$dir/report.md"
    echo
    cat "$dir/retention.md"
    echo
    echo "Time and peak memory per stage ($dir/posttrain-chain.json):"
    $BIN/python - "$dir/posttrain-chain.json" <<'EOF'
import json, sys
chain = json.load(open(sys.argv[1]))
for s in chain["stages"]:
    rss = s.get("peak_rss_mb")
    print(f"  {s['stage']:<8} {s['seconds'] or 0:>7.0f} s  peak RSS {rss if rss is not None else float('nan'):>6.0f} MB  ({s['status']})")
print(f"  {'chain':<8} {sum(s['seconds'] or 0 for s in chain['stages']):>7.0f} s")
EOF
    echo "  this run: ${seconds[$name]} s (data + chain + retention; stages that were up to date cost nothing)"
done
