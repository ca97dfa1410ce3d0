"""The bitsandbytes 0.50 CPU repack bug: on CPUs with AVX512-BF16 an eval-mode no-grad forward
through a 4-bit layer repacks its weights, and later backward passes are silently wrong.
posttrain's guard keeps gradients identical; without it (negative control) they differ."""

from __future__ import annotations

import pytest
import torch
from bitsandbytes.functional import has_avx512bf16

from posttrain import models
from posttrain.sections import LoraConfig


@pytest.fixture(scope="module")
def tiny64(tmp_path_factory):
    """64 wide: the repacked CPU kernel needs blocks of 64 (at 32 it crashes instead of erring)."""
    from posttrain import demo, tiny

    d = tmp_path_factory.mktemp("tiny64")
    tiny.init_tiny(d, demo.corpus(), hidden=64, layers=2, heads=4, seed=0)
    return d


def _lora_grads(tiny_dir, *, guard: bool, eval_first: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    batch = tok(["What is 12 + 34? 12 + 34 = 46"] * 4, return_tensors="pt")
    model = AutoModelForCausalLM.from_pretrained(
        tiny_dir, quantization_config=models.bnb_config(torch.float32), dtype=torch.float32
    )
    if guard:
        assert models.disable_bnb_cpu_repack(model) > 0
    model = models.apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0), quantized=True, train_embeddings=False)
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # non-zero B so that gradients reach every LoRA matrix
            torch.nn.init.normal_(p, std=0.02)
    if eval_first:  # what eval_on_start / periodic evaluation does
        model.eval()
        with torch.no_grad():
            model(**batch)
    model.train()
    model(**batch, labels=batch["input_ids"]).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _max_diff(a, b) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_guard_keeps_gradients_after_eval(tiny64):
    reference = _lora_grads(tiny64, guard=True, eval_first=False)
    guarded = _lora_grads(tiny64, guard=True, eval_first=True)
    assert _max_diff(reference, guarded) == 0.0


def test_without_guard_gradients_go_wrong_on_avx512bf16(tiny64):
    """Negative control: shows the bug the guard exists for, where the CPU has the feature."""
    reference = _lora_grads(tiny64, guard=False, eval_first=False)
    unguarded = _lora_grads(tiny64, guard=False, eval_first=True)
    if has_avx512bf16():
        assert _max_diff(reference, unguarded) > 1e-3
    else:  # no repack on this CPU: nothing goes wrong, and the guard changes nothing
        assert _max_diff(reference, unguarded) == 0.0


def test_qlora_loading_applies_the_guard(make_config):
    import bitsandbytes as bnb

    cfg = make_config(sft__method="qlora")
    tok = models.load_tokenizer(cfg)
    model = models.load_causal_lm(cfg, cfg.model.name_or_path, "qlora", cfg.sft.lora, tok)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)
