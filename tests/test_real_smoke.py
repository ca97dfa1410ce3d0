"""The real-model smoke test inside `make test`: SmolLM2-135M-Instruct, as the GGUF file a user
downloads, through the real CLI: format with its real tokenizer → a few LoRA SFT steps → merge
with parity, then greedy generation from the merged model that stops at the end-of-turn token.

The full real-model chains (reward, PPO, DPO, eval on both models) run in `make real-demo`, not
here: this stays a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from posttrain import gguf, manifest

pytestmark = [pytest.mark.real, pytest.mark.slow]

BIN = Path(sys.executable).with_name("posttrain")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
ROWS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Name a primary colour.", "Red is a primary colour."),
    ("What is 2 + 2?", "2 + 2 = 4."),
    ("Which planet is closest to the Sun?", "Mercury is the closest planet to the Sun."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What do bees make?", "Bees make honey."),
    ("What is the boiling point of water at sea level?", "Water boils at 100 degrees Celsius at sea level."),
    ("What colour is the sky on a clear day?", "The sky is blue on a clear day."),
]


@pytest.fixture(scope="module")
def chain(real_models, tmp_path_factory):
    """format → sft (LoRA, 4 steps) → merge on the SmolLM2 GGUF file, through `posttrain run`."""
    path, converted = real_models("smollm2")
    root = tmp_path_factory.mktemp("real_smoke")
    data = root / "sft.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                      {"role": "assistant", "content": a}]}) + "\n"
                            for q, a in ROWS))
    config = {
        "model": {"name_or_path": str(path)},
        "template": {"name": "chatml"},
        "data": {"sft": {"kind": "sft", "train": [{"path": str(data)}], "eval": [{"path": str(data), "limit": 4}]}},
        "stages": ["format", "sft", "merge"],
        "output_dir": str(root / "out"),
        "seed": 0,
        "sft": {"method": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
                "training": {"max_steps": 4, "per_device_train_batch_size": 4, "learning_rate": 2e-3,
                             "logging_steps": 1, "save_steps": 1000, "max_length": 64}},
    }
    cfg_path = root / "smoke.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    r = subprocess.run([str(BIN), "run", str(cfg_path)], capture_output=True, text=True, env=ENV, timeout=1200)
    assert r.returncode == 0, r.stderr[-4000:]
    return {"root": root / "out", "gguf": path, "converted": converted}


def test_sft_trained_on_the_real_tokenizer(chain):
    sft = chain["root"] / "sft"
    m = manifest.read(sft)
    # the lineage names the GGUF file by content and says what the weights are
    assert m["parent"]["path"] == str(chain["gguf"]) and m["parent"]["hash"] == gguf.sha256(chain["gguf"])[:16]
    assert m["origin"]["quantization"] == "Q4_1" and "dequantised" in m["origin"]["note"]
    assert m["adapter_base"] == str(chain["gguf"])
    losses = [json.loads(line)["loss"] for line in (sft / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line and "eval_loss" not in line]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    held = m["metrics"]
    assert held["eval_loss_after"] < held["eval_loss_before"], held  # it learned the answers


def test_merge_keeps_parity_and_generation_stops_at_end_of_turn(chain):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = chain["root"] / "merge"
    m = manifest.read(merged)
    assert m["origin"]["sha256"] == gguf.sha256(chain["gguf"])
    assert m["checks"], m  # merge's own parity checks ran and were recorded
    tok = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": ROWS[0][0]}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    end = tok.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=40, do_sample=False)[0, ids.shape[1]:].tolist()
    assert end in out, tok.decode(out)  # it stops at <|im_end|> by itself, within 40 tokens
    assert "Paris" in tok.decode(out[: out.index(end)])
