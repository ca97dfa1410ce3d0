"""CUDA tests, for GPU runners (`make test-gpu`; `make test` deselects them, and selecting them
without a GPU is an error, see conftest): what only a GPU can show. A tiny random-init model
built in the test, a few steps each.

- QLoRA: the base really is 4-bit on the GPU, the adapter trains and is saved non-empty, merge
  folds it into full-precision weights.
- The fast defaults: bf16, SFT packing (padding-free) with the segmentation probe passing, Liger
  kernels (posttrain[gpu] installs liger-kernel), activation checkpointing off when it fits.
- Several GPUs (when present): 2 processes give the losses of 1 with the same global batch.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from posttrain import manifest
from posttrain.config import validate_dict

pytestmark = pytest.mark.cuda
ROOT = Path(__file__).resolve().parents[1]


def _raw(tiny_dir, demo_data, root, **sft) -> dict:
    return {
        "model": {"name_or_path": str(tiny_dir)},
        "data": {"sft": {"kind": "sft", "train": [{"path": str(demo_data / "sft_train.jsonl")}],
                         "eval": [{"path": str(demo_data / "sft_eval.jsonl")}]}},
        "output_dir": str(root), "seed": 0,
        "sft": {"training": {"max_steps": 20, "per_device_train_batch_size": 8, "learning_rate": 3e-3,
                             "logging_steps": 1, "save_steps": 1000, "max_length": 64}, **sft},
    }


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line and "eval_loss" not in line]


def test_fast_defaults_on_cuda(tiny_dir, demo_data, tmp_path):
    from posttrain.stages import sft

    out = sft.run(validate_dict(_raw(tiny_dir, demo_data, tmp_path)))
    m = manifest.read(out)["metrics"]
    speed = m["speed"]
    assert speed.startswith("bf16" if torch.cuda.is_bf16_supported() else "fp32")
    assert "activation checkpointing off" in speed
    assert "Liger kernels" in speed, "posttrain[gpu] installs liger-kernel: `make test-gpu` installs it"
    losses = _losses(out)
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    import importlib.util

    if importlib.util.find_spec("flash_attn") is not None:  # a varlen kernel: packing by default
        assert "flash_attention_2 attention" in speed and "packing (bfd, padding-free)" in speed
        assert m["train_sequences"] > m["steps"] * m["global_batch_size"]  # packed rows hold several conversations
    else:  # sdpa: no packing (a dense mask over the whole flattened batch)
        assert "packing" not in speed and m["train_sequences"] == m["steps"] * m["global_batch_size"]


def test_packing_on_cuda_segments_conversations(tiny_dir, demo_data, tmp_path):
    """Packing asked for explicitly, with sdpa: the probe passes (the mask is block-diagonal) and
    the run trains."""
    from posttrain.stages import sft

    raw = _raw(tiny_dir, demo_data, tmp_path)
    raw["sft"]["training"].update(packing=True)
    out = sft.run(validate_dict(raw))
    assert "packing (bfd, padding-free)" in manifest.read(out)["metrics"]["speed"]


def test_qlora_on_cuda_trains_a_4bit_base_and_merges(tiny_dir, demo_data, tmp_path):
    import bitsandbytes as bnb
    from safetensors import safe_open

    from posttrain import models
    from posttrain.stages import merge, sft

    raw = _raw(tiny_dir, demo_data, tmp_path, method="qlora", lora={"r": 8, "alpha": 16, "dropout": 0.0})
    raw["stages"] = ["sft", "merge"]
    cfg = validate_dict(raw)
    tok = models.load_tokenizer(cfg, str(tiny_dir))
    probe = models.load_causal_lm(cfg, str(tiny_dir), "qlora", cfg.sft.lora, tok)
    layers = [m for m in probe.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.weight.device.type == "cuda" and m.weight.quant_state is not None for m in layers)
    del probe
    out = sft.run(cfg)
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        assert any(f.get_tensor(k).abs().sum() > 0 for k in f.keys() if "lora_B" in k)
    merged = merge.run(cfg)
    parity = manifest.read(merged)["checks"]["parity"]
    assert parity["max_abs_diff"] <= parity["tolerance"]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (this machine has fewer)")
def test_two_gpus_give_the_losses_of_one(tiny_dir, demo_data, tmp_path):
    runs = {}
    for n, per_device in ((1, 8), (2, 4)):
        raw = _raw(tiny_dir, demo_data, tmp_path / f"chain{n}")
        raw["sft"]["training"].update(per_device_train_batch_size=per_device, max_steps=6)
        raw["sft"]["training"]["packing"] = False  # the same rows per step in both layouts
        cfg = tmp_path / f"p{n}.yaml"
        cfg.write_text(yaml.safe_dump(raw))
        r = subprocess.run([sys.executable, "-m", "posttrain", "sft", str(cfg), "-o", str(tmp_path / f"sft{n}"),
                            "--num-processes", str(n)], capture_output=True, text=True, cwd=ROOT,
                           env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[n] = _losses(tmp_path / f"sft{n}")
    assert len(runs[1]) == len(runs[2])
    assert all(math.isclose(a, b, rel_tol=2e-2) for a, b in zip(runs[1], runs[2])), runs  # bf16 reductions differ
