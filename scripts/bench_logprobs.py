"""Peak memory of one per-token log-prob + entropy computation: whole logits vs rl/logprobs.py's chunks.

    .venv/bin/python scripts/bench_logprobs.py [--model DIR] [--batch 4] [--tokens 256] [--grad]
        [--lora R] [--ways full,chunked,hf]

Each way runs in a fresh subprocess (so one's peak cannot hide in the other's): load the model,
read every weight (they are memory-mapped), reset the peak RSS
(/proc/self/clear_refs), compute log-probs and entropies of tokens 1..T of
random sequences as the PPO rollout does (with --grad: as its update does, then backward), and
report VmHWM from /proc/self/status. CPU, fp32.

--ways hf is the yardstick for a stage's whole-process peak: one plain Hugging Face forward+backward
of the policy (model(input_ids, labels=input_ids).loss.backward(): whole logits, as a user's own
training step), with --lora R the policy as the chains train it (LoRA r R on all linear layers, only
the adapter trainable). Its peak (VmHWM of the whole process: runtime, weights and the step) is what
docs/benchmarks.md compares PPO's and eval's process peaks with.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

GEMMA = Path.home() / ".cache/posttrain/gguf/gemma-3-270m-q4_k_m-a5fd3b62230a"


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def one(way: str, model_dir: str, batch: int, tokens: int, grad: bool, lora: int = 0) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from posttrain.rl import core, logprobs

    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.requires_grad_(grad)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=lora, lora_alpha=2 * lora, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
    vocab = model.get_output_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (batch, tokens), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # page the (memory-mapped) weights in, so the peak below is the computation's
        sum(float(t.sum()) for t in model.state_dict().values())
    loaded = _status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS from here
    t0 = time.time()
    with torch.set_grad_enabled(grad):
        if way == "hf":  # a plain training step: the model's own loss over the whole logits
            out = model(input_ids=ids, labels=ids, use_cache=False)
            logp = entropy = -out.loss.detach()[None]
            if grad:
                out.loss.backward()
        elif way == "full":
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
            logp, entropy = core.logprobs_from_logits(logits, ids[:, 1:]), core.entropy_from_logits(logits)
        else:
            hidden = logprobs.hidden_states(model, input_ids=ids, use_cache=False)[:, :-1]
            logp, entropy = logprobs.token_logprobs(model, hidden, ids[:, 1:], entropy=True)
        if grad and way != "hf":
            (logp.sum() + entropy.sum()).backward()
    return {"way": way, "vocab": vocab, "grad": grad, "lora": lora, "chunk_tokens": logprobs.CHUNK_TOKENS,
            "rss_loaded_mb": round(loaded), "peak_mb": round(_status_mb("VmHWM")),
            "peak_over_loaded_mb": round(_status_mb("VmHWM") - loaded), "seconds": round(time.time() - t0, 1),
            "mean_logp": float(logp.mean()), "mean_entropy": float(entropy.mean())}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(GEMMA))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--grad", action="store_true")
    p.add_argument("--lora", type=int, default=0, help="LoRA rank on all linear layers (0: none)")
    p.add_argument("--ways", default="full,chunked", help="comma-separated: full, chunked, hf")
    p.add_argument("--one", choices=["full", "chunked", "hf"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(one(a.one, a.model, a.batch, a.tokens, a.grad, a.lora)))
        return 0
    logits_mb = a.batch * (a.tokens - 1) * 4 / 2**20
    print(f"{a.model}: batch {a.batch} × {a.tokens} tokens, grad={a.grad}, lora r={a.lora}")
    for way in a.ways.split(","):
        cmd = [sys.executable, __file__, "--one", way, "--model", a.model, "--batch", str(a.batch),
               "--tokens", str(a.tokens), "--lora", str(a.lora)] + (["--grad"] if a.grad else [])
        r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        print(f"  {way:8s} RSS after load {r['rss_loaded_mb']:6d} MB  peak {r['peak_mb']:6d} MB  "
              f"(+{r['peak_over_loaded_mb']} MB; one fp32 logits copy {logits_mb * r['vocab']:.0f} MB)  "
              f"{r['seconds']:.1f} s  mean logp {r['mean_logp']:.6f}  mean entropy {r['mean_entropy']:.6f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
