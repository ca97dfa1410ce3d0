"""Peak memory of PPO's forwards, before and after issue 16 item 5 (rollout a micro-batch at a
time; no entropy graph in the update).

    .venv/bin/python scripts/bench_ppo_memory.py [--model DIR] [--batch 32] [--micro 4] [--tokens 320]
        [--response 64] [--ways rollout-whole,rollout-micro,update-entropy,update]

Each way runs in a fresh subprocess (as scripts/bench_logprobs.py does): load the policy (and, for
the rollout, a value model: the same checkpoint as a one-output sequence classifier), read every
weight, reset the peak RSS (/proc/self/clear_refs), run, report VmHWM - RSS after loading. CPU, fp32.

  rollout-whole   the rollout's no-grad forwards over all --batch sequences at once (before)
  rollout-micro   the same, --micro sequences at a time (now; the numbers are the same)
  update-entropy  one update micro-batch (--micro sequences): log-probs and entropy with
                  gradients, backward of a loss on the log-probs (before)
  update          the same without the entropy (now)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from bench_logprobs import _status_mb  # scripts/ is on the path when a script runs

SMOLLM2 = Path.home() / ".cache/posttrain/gguf/SmolLM2-135M-Instruct.Q4_1-b179c9523d0e"


def one(way: str, model_dir: str, batch: int, micro: int, tokens: int, response: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from posttrain.rl import logprobs, rollout

    torch.set_num_threads(2)
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    value = rollout.ValueModel(AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=1, dtype=torch.float32).eval())
    model = rollout.PolicyAndValue(policy, value)
    n = batch if way.startswith("rollout") else micro
    vocab = policy.get_output_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    prompt = tokens - response
    b = rollout.Batch(torch.randint(0, vocab, (n, prompt), generator=g), torch.ones(n, prompt, dtype=torch.long),
                      torch.randint(0, vocab, (n, response), generator=g), torch.ones(n, response, dtype=torch.long),
                      torch.ones(n, dtype=torch.bool))
    with torch.no_grad():  # page the weights in, so the peak below is the computation's
        sum(float(t.sum()) for t in model.state_dict().values())
    loaded = _status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS from here
    t0 = time.time()
    if way.startswith("rollout"):
        rows = batch if way == "rollout-whole" else micro
        with torch.no_grad():
            parts = [model(b.select(idx), 1.0)[:3] for idx in torch.arange(n).split(rows)]
        logp = torch.cat([p[0] for p in parts])
    else:
        hidden = rollout.response_hidden(policy, b)
        logp, _ = logprobs.token_logprobs(policy, hidden, b.responses, entropy=way == "update-entropy")
        (logp.sum() + value(b).sum()).backward()
    return {"way": way, "rows": n, "rss_loaded_mb": round(loaded), "peak_over_loaded_mb":
            round(_status_mb("VmHWM") - loaded), "seconds": round(time.time() - t0, 1),
            "mean_logp": float(logp.mean())}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(SMOLLM2))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--micro", type=int, default=4)
    p.add_argument("--tokens", type=int, default=320)
    p.add_argument("--response", type=int, default=64)
    p.add_argument("--ways", default="rollout-whole,rollout-micro,update-entropy,update")
    p.add_argument("--one", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(one(a.one, a.model, a.batch, a.micro, a.tokens, a.response)))
        return 0
    print(f"{a.model}: rollout of {a.batch} sequences, micro-batch {a.micro}, {a.tokens} tokens "
          f"({a.response} response), fp32")
    for way in a.ways.split(","):
        cmd = [sys.executable, __file__, "--one", way, "--model", a.model, "--batch", str(a.batch),
               "--micro", str(a.micro), "--tokens", str(a.tokens), "--response", str(a.response)]
        r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        print(f"  {way:15s} rows {r['rows']:3d}  RSS after load {r['rss_loaded_mb']:5d} MB  "
              f"peak +{r['peak_over_loaded_mb']} MB  {r['seconds']:.1f} s  mean logp {r['mean_logp']:.6f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
