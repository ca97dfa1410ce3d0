"""The real-model smoke test inside `make test`: SmolLM2-135M-Instruct, as the GGUF file a user
downloads, through the real CLI: format with its real tokenizer → a few LoRA SFT steps → merge
with parity → export to a q8_0 GGUF file with its round trip, then greedy generation from the
merged model that stops at the end-of-turn token. Then the same model in bf16 (`model.dtype:
bfloat16`, what a GPU user runs): format → LoRA SFT → LoRA DPO → merge in bf16 → export bf16: the
adapters moved, DPO's step 0 agreed, the merge kept its parity, the merged bf16 model stops at the
end-of-turn token, and its bf16 file holds the same numbers.

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

from posttrain import gguf, manifest, numerics

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
    """format → sft (LoRA, 4 steps) → merge → export (q8_0) on the SmolLM2 GGUF file, through
    `posttrain run`."""
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
        "stages": ["format", "sft", "merge", "export"],
        "output_dir": str(root / "out"),
        "seed": 0,
        "sft": {"method": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
                "training": {"max_steps": 4, "per_device_train_batch_size": 4, "learning_rate": 2e-3,
                             "logging_steps": 1, "save_steps": 1000, "max_length": 64}},
        "export": {"type": "q8_0", "probe_prompts": [ROWS[0][0], ROWS[2][0]], "max_new_tokens": 16},
    }
    cfg_path = root / "smoke.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    r = subprocess.run([str(BIN), "run", str(cfg_path)], capture_output=True, text=True, env=ENV, timeout=1200)
    assert r.returncode == 0, r.stderr[-4000:]
    return {"root": root / "out", "gguf": path, "converted": converted}


def test_export_of_the_merged_model_passes_its_round_trip(chain):
    """The q8_0 file of the merged SmolLM2 gives its logits within q8_0's tolerance (relative to the
    logit scale) and carries SmolLM2's special tokens, the chain's chat template and a Modelfile;
    transformers reads its tokenizer back with the same ids."""
    from posttrain import ollama, templates
    from posttrain.sections import EXPORT_TOLERANCE

    out = chain["root"] / "export"
    m = manifest.read(out)
    assert m["parent"]["path"] == str(chain["root"] / "merge")
    trip = m["checks"]["round_trip"]
    print(f"\nexport q8_0: {trip['relative_diff']:.2e} of scale {trip['logit_scale']:.1f}, argmax "
          f"{trip['argmax_agreement']:.3f}, answers {[s['file'] for s in trip['samples']]}")
    assert trip["relative_diff"] <= EXPORT_TOLERANCE["q8_0"] and trip["argmax_agreement"] >= 0.9, trip
    assert "Paris" in trip["samples"][0]["file"], trip["samples"]
    meta = m["tokenizer"]
    assert (meta["bos"]["text"], meta["eos"]["text"], meta["eot"]["text"]) == ("<|im_start|>", "<|im_end|>",
                                                                             "<|im_end|>")
    file = out / m["file"]["file"]
    assert gguf.tokenizer_metadata(file)["chat_template"] == templates.without_markers(templates.CHATML)
    assert 'TEMPLATE """' + ollama.TEMPLATES["chatml"] in (out / "Modelfile").read_text()
    assert trip["tokenizer_same_ids"] == 3  # the file's tokenizer, read back: the probes and a chat


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


# ---------------------------------------------------------------------------------------------
# The same model in bf16 (issue 16): what a GPU user runs, on the CPU. format → LoRA SFT → LoRA DPO
# (continuing the SFT adapter, its frozen copy the reference: posttrain's default chain) → merge in
# bf16, as one `posttrain run`.

# a wrong answer for each of ROWS: DPO's rejected side
WRONG = [
    "The capital of France is Berlin.",
    "Green is a primary colour.",
    "2 + 2 = 5.",
    "Jupiter is the closest planet to the Sun.",
    "A spider has six legs.",
    "Bees make milk.",
    "Water boils at 50 degrees Celsius at sea level.",
    "The sky is green on a clear day.",
]
BF16_LORA = {"r": 8, "alpha": 16, "dropout": 0.0}
BF16_STEPS = 4
SFT_LR, DPO_LR, DPO_BETA = 2e-3, 5e-4, 0.1


@pytest.fixture(scope="module")
def bf16_chain(real_models, tmp_path_factory):
    """format → sft (LoRA) → dpo (LoRA) → merge (bf16) → export (bf16) with model.dtype bfloat16, through `posttrain
    run`. The run's result is kept, not asserted here: each test checks the stages it is about."""
    path, converted = real_models("smollm2")
    root = tmp_path_factory.mktemp("real_bf16")
    sft_data, pref_data = root / "sft.jsonl", root / "pref.jsonl"
    sft_data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                          {"role": "assistant", "content": a}]}) + "\n"
                                for q, a in ROWS))
    pref_data.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": q}],
                                             "chosen": [{"role": "assistant", "content": a}],
                                             "rejected": [{"role": "assistant", "content": w}]}) + "\n"
                                 for (q, a), w in zip(ROWS, WRONG, strict=True)))
    training = {"max_steps": BF16_STEPS, "per_device_train_batch_size": 4, "logging_steps": 1,
                "save_steps": 1000, "max_length": 64}
    config = {
        "model": {"name_or_path": str(path), "dtype": "bfloat16"},
        "template": {"name": "chatml"},
        "data": {"sft": {"kind": "sft", "train": [{"path": str(sft_data)}],
                         "eval": [{"path": str(sft_data), "limit": 4}]},
                 # the held-out set is the training pairs: step 0 and "after" are measured on them
                 "preference": {"kind": "preference", "train": [{"path": str(pref_data)}],
                                "eval": [{"path": str(pref_data)}]}},
        "stages": ["format", "sft", "dpo", "merge", "export"],
        "output_dir": str(root / "out"),
        "seed": 0,
        "sft": {"method": "lora", "lora": BF16_LORA, "training": {**training, "learning_rate": SFT_LR}},
        "export": {"type": "bf16", "probe_prompts": [ROWS[0][0]], "max_new_tokens": 16},
        "dpo": {"method": "lora", "lora": BF16_LORA,
                "training": {**training, "learning_rate": DPO_LR, "beta": DPO_BETA}},
        "merge": {"dtype": "bfloat16", "probe_prompts": [ROWS[0][0], ROWS[1][0]], "max_new_tokens": 24},
    }
    cfg_path = root / "bf16.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    r = subprocess.run([str(BIN), "run", str(cfg_path)], capture_output=True, text=True, env=ENV, timeout=1200)
    return {"root": root / "out", "gguf": path, "converted": converted, "config": config, "run": r}


def _finished(chain, stage: str) -> dict:
    """The stage's manifest; fails (with the run's error) when the stage did not finish."""
    d = chain["root"] / stage
    assert manifest.is_finished(d), f"{stage} did not finish: {chain['run'].stderr[-3000:]}"
    return manifest.read(d)


def _train_losses(d: Path) -> list[float]:
    rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses and all(math.isfinite(x) for x in losses), losses
    return losses


def _adapter(d: Path) -> dict:
    from safetensors.torch import load_file

    return {k: v for k, v in load_file(str(d / "adapter_model.safetensors")).items() if "lora_" in k}


def _share(before: dict, after: dict, keys) -> float:
    n = changed = 0
    for k in keys:
        n, changed = n + after[k].numel(), changed + int((after[k] != before[k].to(after[k].dtype)).sum())
    assert n > 0
    return changed / n


def test_bf16_sft_and_dpo_trained_in_bf16(bf16_chain):
    """Both training stages finished with finite losses and trained under bf16 autocast (the
    trainer's flag, recorded in the manifest's speed line) on float32 LoRA adapters."""
    import torch

    for stage in ("sft", "dpo"):
        m = _finished(bf16_chain, stage)
        assert m["config"]["model"]["dtype"] == "bfloat16" and m["method"] == "lora"
        assert m["metrics"]["steps"] == BF16_STEPS
        assert m["metrics"]["speed"].startswith("bf16,"), m["metrics"]["speed"]
        losses = _train_losses(bf16_chain["root"] / stage)
        assert len(losses) == BF16_STEPS, losses
        dtypes = {t.dtype for t in _adapter(bf16_chain["root"] / stage).values()}
        print(f"\n{stage}: losses {[round(x, 4) for x in losses]}, adapter {dtypes}")
        assert dtypes == {torch.float32}
    m = manifest.read(bf16_chain["root"] / "sft")
    assert m["metrics"]["eval_loss_after"] < m["metrics"]["eval_loss_before"], m["metrics"]
    dpo = manifest.read(bf16_chain["root"] / "dpo")
    # DPO continued the SFT adapter, and its reference is a frozen copy of it
    assert dpo["parent"]["path"] == str(bf16_chain["root"] / "sft"), dpo["parent"]
    assert dpo["reference"] == "frozen copy of the starting (SFT) adapter", dpo["reference"]
    # the same base under both adapters (SFT names the GGUF file, DPO its converted directory)
    assert m["adapter_base"] == str(bf16_chain["gguf"])
    assert dpo["adapter_base"] in (str(bf16_chain["gguf"]), str(bf16_chain["converted"])), dpo["adapter_base"]


def test_bf16_lora_adapters_moved(bf16_chain):
    """SFT's new adapter: every lora_B weight started at 0, and the whole adapter is compared with
    the one the stage started from (rebuilt: the stage seeds before loading); DPO's adapter against
    SFT's, which it continued. The share of elements that changed is high for each."""
    from posttrain import models
    from posttrain.config import validate_dict
    from posttrain.stages import common

    _finished(bf16_chain, "dpo")
    sft_dir, dpo_dir = bf16_chain["root"] / "sft", bf16_chain["root"] / "dpo"
    sft, dpo = _adapter(sft_dir), _adapter(dpo_dir)
    lora_b = [k for k in sft if "lora_B" in k]
    assert lora_b and set(dpo) == set(sft), "DPO's adapter is not SFT's, continued"

    # the adapter SFT started from, as the stage built it
    from peft import get_peft_model_state_dict

    cfg = validate_dict(bf16_chain["config"])
    source = str(bf16_chain["gguf"])
    tok = models.load_tokenizer(cfg, source)
    common.seed(cfg)
    model = models.load_causal_lm(cfg, source, "lora", cfg.sft.lora, tok)
    start = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items() if "lora_" in k}
    del model
    assert set(start) == set(sft)
    assert all(not start[k].any() for k in lora_b)
    # the rebuilt start is the run's: AdamW moves a weight by at most ~lr a step, far less than lora_A's
    # random init (a wrong start would differ by about its size)
    drift = max(float((sft[k] - start[k]).abs().max()) for k in start if "lora_A" in k)
    assert drift <= 1.5 * BF16_STEPS * SFT_LR, drift

    b_share = _share(start, sft, lora_b)
    sft_share = _share(start, sft, sft)
    dpo_share = _share(sft, dpo, dpo)
    dpo_b_share = _share(sft, dpo, [k for k in dpo if "lora_B" in k])
    print(f"\nsft: lora_B nonzero {b_share:.4f}, all adapter weights moved {sft_share:.4f} (lora_A drift {drift:.4g}); "
          f"dpo vs sft: all {dpo_share:.4f}, lora_B {dpo_b_share:.4f}")
    assert b_share > 0.9 and sft_share > 0.9, (b_share, sft_share)
    assert dpo_share > 0.9 and dpo_b_share > 0.9, (dpo_share, dpo_b_share)


def test_bf16_dpo_step0_agreement_and_direction(bf16_chain):
    """Step 0: the policy (SFT adapter, about to be trained) and its reference (a frozen copy of it)
    agree exactly in bf16: rewards 0, loss ln 2 (dpo.py stops beyond dpo.step0_tolerance). After
    4 steps on the 8 pairs the preferences moved the right way on them."""
    m = _finished(bf16_chain, "dpo")
    step0, after = m["metrics"]["step0"], m["metrics"]["after"]
    print(f"\ndpo step0 {step0}\ndpo after {after}")
    tolerance = m["config"]["dpo"]["step0_tolerance"]
    assert m["beta"] == DPO_BETA and m["loss_type"] == ["sigmoid"]
    # what dpo.check_step0 allows: |reward| / beta <= step0_tolerance, |loss - ln 2| <= 10 tol beta + 1e-3
    for k in ("rewards/chosen", "rewards/rejected"):
        assert abs(step0[k]) / DPO_BETA <= tolerance, step0
    assert abs(step0["loss"] - math.log(2)) <= 10 * tolerance * DPO_BETA + 1e-3, step0
    # and what it measured: the same adapter computes the same log-probs (exactly 0 and ln 2)
    assert step0["rewards/chosen"] == step0["rewards/rejected"] == step0["rewards/margins"] == 0.0, step0
    assert step0["loss"] == pytest.approx(math.log(2), abs=1e-6), step0
    # direction (measured: margin 0 → 0.46, accuracy 0 → 1.0, loss 0.693 → 0.494,
    # log-prob rejected -8.6 → -12.8, chosen -0.94 → -0.54)
    assert after["rewards/margins"] > 0.1, after
    assert after["rewards/accuracies"] >= 0.75, after
    assert after["loss"] < step0["loss"] - 0.05, (step0, after)
    assert after["logps/rejected"] < step0["logps/rejected"], (step0, after)


def test_bf16_merge_parity_and_generation(bf16_chain):
    """merge in bf16: its parity check (merged vs base+adapter, relative tolerance in half
    precision) passed and is recorded; the merged bf16 model reloads with plain transformers and a
    greedy answer stops at <|im_end|>.
    Measured (issue 16): parity max |Δlogit| 0.906 against a tolerance of 0.72 (2% of the logit scale
    36.0): the merge stage stops. The merge itself is right: merged in float32 the difference is
    6.4e-5, and the bf16 merged model is closer to the float32 base+adapter (max |Δ| 0.999) than the
    unmerged bf16 base+adapter is (1.43; the bf16 base alone against float32: 1.20). With the
    tolerance raised to 1.0 (--set merge.tolerance=1.0): reload max |Δ| 0.0, both probes stop, and
    the answer here is "The capital of France is Paris.<|im_end|>"."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    r = bf16_chain["run"]
    assert r.returncode == 0, r.stderr[-3000:]
    m = _finished(bf16_chain, "merge")
    merged = bf16_chain["root"] / "merge"
    assert m["dtype"] == "bfloat16" and m["adapter_method"] == "lora"
    assert m["adapter"] == str(bf16_chain["root"] / "dpo")
    parity, reload = m["checks"]["parity"], m["checks"]["reload"]
    print(f"\nmerge: parity {parity}, reload {reload}")
    assert parity["tolerance"] == pytest.approx(numerics.tolerance(1e-3, "bfloat16", parity["logit_scale"]))
    assert parity["max_abs_diff"] <= parity["tolerance"], parity
    assert reload["max_abs_diff"] <= parity["tolerance"], reload
    assert reload["stopped"] == parity["probes"] == 2, reload
    assert m["checks"]["weights_changed"]["changed"] > 0
    assert {t.dtype for t in load_file(str(merged / "model.safetensors")).values()} == {torch.bfloat16}

    tok = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.bfloat16).eval()
    assert next(model.parameters()).dtype == torch.bfloat16
    ids = tok.apply_chat_template([{"role": "user", "content": ROWS[0][0]}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    end = tok.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=40, do_sample=False)[0, ids.shape[1]:].tolist()
    print(f"merged bf16 answer: {tok.decode(out)!r}")
    assert out and out[-1] == end, tok.decode(out)  # generation stopped at <|im_end|>, by itself
    assert "Paris" in tok.decode(out[:-1])


def test_bf16_export_keeps_the_bf16_weights_exactly(bf16_chain):
    """A bf16 merged model exported as bf16: the file holds the same bf16 numbers, so the file and the
    model give the same float32 logits (up to summation order) and the same greedy answer."""
    r = bf16_chain["run"]
    assert r.returncode == 0, r.stderr[-3000:]
    m = _finished(bf16_chain, "export")
    trip = m["checks"]["round_trip"]
    print(f"\nexport bf16 of bf16: max |Δ| {trip['max_abs_diff']:.2e}, answers {trip['samples']}")
    assert m["type"] == "bf16" and m["file"]["quantization"] == "BF16"
    assert trip["max_abs_diff"] <= 1e-4 * trip["logit_scale"], trip
    assert trip["same_answers"] == trip["probes"] == 1 and trip["argmax_agreement"] == 1.0
