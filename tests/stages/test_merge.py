"""Merging LoRA / QLoRA adapters of a tiny random-init model into standalone models.

A LoRA adapter merges into a model that plain transformers loads and that gives base+adapter's
logits and stops at <|im_end|>; a wrong merge, a full model and an all-zero adapter are refused
without a manifest; a QLoRA adapter merges with and without the nf4 round trip, and the round
trip adds exactly the base's nf4 quantization error (the weights the adapter was trained on).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from posttrain import manifest
from posttrain.config import validate_dict
from posttrain.errors import PosttrainError
from posttrain.stages import merge, sft

LORA = {"r": 8, "alpha": 16, "dropout": 0.0}
PROMPT = [{"role": "user", "content": "What is 12 + 34?"}]


def _sft_adapter(tiny_dir, demo_data, root, method: str):
    """A short LoRA/QLoRA SFT run on the tiny model (module-scoped; make_config is per test)."""
    cfg = validate_dict({
        "model": {"name_or_path": str(tiny_dir)},
        "data": {"sft": {"kind": "sft", "train": [{"path": str(demo_data / "sft_train.jsonl")}],
                         "eval": [{"path": str(demo_data / "sft_eval.jsonl")}]}},
        "output_dir": str(root),
        "seed": 0,
        "sft": {"method": method, "lora": LORA,
                "training": {"max_steps": 10, "per_device_train_batch_size": 16, "learning_rate": 2e-2,
                             "logging_steps": 5, "save_steps": 1000, "max_length": 64,
                             "gradient_checkpointing": False}},
    })
    return sft.run(cfg, output=str(root / "sft"))


@pytest.fixture(scope="module")
def sft_lora(tiny_dir, demo_data, tmp_path_factory):
    return _sft_adapter(tiny_dir, demo_data, tmp_path_factory.mktemp("merge_lora"), "lora")


@pytest.fixture(scope="module")
def sft_qlora(tiny_dir, demo_data, tmp_path_factory):
    return _sft_adapter(tiny_dir, demo_data, tmp_path_factory.mktemp("merge_qlora"), "qlora")


def _prompt_ids(tok):
    text = tok.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    return tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]


def _logits(model, ids):
    with torch.no_grad():
        return model.eval()(ids).logits.float()


def _linear_count(model) -> int:
    head = model.get_output_embeddings()
    return sum(isinstance(m, torch.nn.Linear) and m is not head for m in model.modules())


def test_lora_merge_matches_base_plus_adapter(make_config, sft_lora, tiny_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = merge.run(make_config(), base=str(sft_lora), output=str(tmp_path / "merged"))
    m = manifest.read(out)
    assert m["stage"] == "merge" and m["adapter_method"] == "lora" and m["nf4_round_trip"] is False
    assert m["merged_into"] == str(tiny_dir) and m["parent"]["stage"] == "sft"
    checks = m["checks"]
    assert checks["parity"]["max_abs_diff"] <= checks["parity"]["tolerance"] == pytest.approx(1e-3)
    assert checks["parity"]["probes"] == 3
    assert 0 < checks["weights_changed"]["changed"] <= checks["weights_changed"]["checked"]
    assert checks["reload"]["max_abs_diff"] < 1e-5
    assert checks["nf4_round_trip_layers"] == 0
    assert not (out / "adapter_config.json").exists() and (out / "model.safetensors").is_file()

    # a standalone model: plain transformers loads it, with tokenizer, template and stop token
    merged = AutoModelForCausalLM.from_pretrained(str(out))
    tok = AutoTokenizer.from_pretrained(str(out))
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    eos = merged.generation_config.eos_token_id
    assert im_end in (eos if isinstance(eos, list) else [eos])
    assert tok.pad_token_id not in (eos if isinstance(eos, list) else [eos])

    # same logits as base + adapter on a chat-formatted prompt (and not the bare base's)
    ids = _prompt_ids(tok)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_dir))
    bare = _logits(base, ids)
    expected = _logits(PeftModel.from_pretrained(base, str(sft_lora)), ids)
    got = _logits(merged, ids)
    assert float((got - expected).abs().max()) < 1e-4
    assert float((bare - expected).abs().max()) > 1e-2, "the adapter should change the logits"


def _scale_lora_b(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(2.0)
    return model.merge_and_unload()


def _merge_then_noise(model):
    merged = model.merge_and_unload()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in merged.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.add_(0.01 * torch.randn(module.weight.shape, generator=g))
    return merged


def _drop_adapter(model):
    return model.unload()  # removes the LoRA layers without merging them


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("wrong_merge", [_scale_lora_b, _merge_then_noise, _drop_adapter],
                         ids=["lora_B_doubled", "noise_added", "adapter_dropped"])
def test_wrong_merge_is_caught(make_config, sft_lora, tmp_path, monkeypatch, wrong_merge, dtype):
    """Negative control for the parity check: a merge that is not base+adapter, in float32 and
    with bf16 merged weights (whose tolerance is 8 rounding steps of the logits' magnitude)."""
    monkeypatch.setattr("posttrain.stages.merge.merge", wrong_merge)
    out = tmp_path / "merged"
    with pytest.raises(PosttrainError, match=r"differ from base\+adapter.*the merge is wrong") as e:
        merge.run(make_config(merge={"dtype": dtype}), base=str(sft_lora), output=str(out))
    assert "\n" not in str(e.value)
    assert not manifest.is_finished(out)
    assert not (out / "model.safetensors").exists()


def test_full_model_is_refused(make_config, tiny_dir, tmp_path):
    out = tmp_path / "merged"
    with pytest.raises(PosttrainError, match=r"is not a LoRA adapter"):
        merge.run(make_config(), base=str(tiny_dir), output=str(out))
    assert not out.exists()


@pytest.mark.parametrize("lora_b", ["zeros", "random"])
def test_hand_built_adapter(make_config, tiny_dir, tmp_path, lora_b):
    """A fresh PEFT adapter (B = 0) changes nothing: refused by the weights-changed check. The same
    adapter with random B (positive control) merges."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = tmp_path / "adapter"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_dir)),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert b and all(not p.any() for p in b)
    if lora_b == "random":
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in b:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    model.save_pretrained(str(adapter))
    AutoTokenizer.from_pretrained(str(tiny_dir)).save_pretrained(str(adapter))  # the stage reads it from here
    assert not (adapter / "config.json").exists()

    out = tmp_path / "merged"
    if lora_b == "zeros":
        with pytest.raises(PosttrainError, match=r"identical to the base: the adapter changed nothing"):
            merge.run(make_config(), base=str(adapter), output=str(out))
        assert not manifest.is_finished(out)
    else:
        m = manifest.read(merge.run(make_config(), base=str(adapter), output=str(out)))
        assert m["merged_into"] == str(tiny_dir)
        n = _linear_count(AutoModelForCausalLM.from_pretrained(str(tiny_dir)))
        assert m["checks"]["weights_changed"]["changed"] == n  # every adapted linear, not the output head


def test_qlora_merge_with_and_without_nf4_round_trip(make_config, sft_qlora, tiny_dir, tmp_path):
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    outs = {rt: merge.run(make_config(merge__nf4_round_trip=rt), base=str(sft_qlora),
                          output=str(tmp_path / f"round_trip_{rt}")) for rt in (False, True)}
    plain, rounded = manifest.read(outs[False]), manifest.read(outs[True])
    assert plain["adapter_method"] == rounded["adapter_method"] == "qlora"
    assert plain["nf4_round_trip"] is False and plain["checks"]["nf4_round_trip_layers"] == 0
    n_linear = _linear_count(AutoModelForCausalLM.from_pretrained(str(tiny_dir)))
    assert rounded["nf4_round_trip"] is True and rounded["checks"]["nf4_round_trip_layers"] == n_linear > 0
    for m in (plain, rounded):
        assert m["checks"]["parity"]["max_abs_diff"] <= m["checks"]["parity"]["tolerance"]

    w_plain = load_file(str(outs[False] / "model.safetensors"))
    w_rounded = load_file(str(outs[True] / "model.safetensors"))
    assert w_plain.keys() == w_rounded.keys()
    differ = {k for k in w_plain if not torch.equal(w_plain[k], w_rounded[k])}
    assert differ, "the nf4 round trip changed no weight"

    # The difference is exactly the nf4 error of the base weights, as bitsandbytes quantizes them
    # when QLoRA loads the base: rounded - plain == dequant(quant(W)) - W, and nothing else moves.
    q4 = AutoModelForCausalLM.from_pretrained(str(tiny_dir), quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.float32), dtype=torch.float32)
    base = load_file(str(tiny_dir / "model.safetensors"))
    quantized = {}
    for name, module in q4.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            w = base[f"{name}.weight"]
            deq = bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state)
            quantized[f"{name}.weight"] = deq.reshape(w.shape)
    assert len(quantized) == n_linear
    assert differ == set(quantized)
    for key, deq in quantized.items():
        torch.testing.assert_close(w_rounded[key] - w_plain[key], deq.float() - base[key], atol=1e-5, rtol=0)

    # So the round-tripped merge reproduces the QLoRA model as trained (4-bit base + adapter)
    for module in q4.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    ids = _prompt_ids(AutoTokenizer.from_pretrained(str(outs[True])))
    trained = _logits(PeftModel.from_pretrained(q4, str(sft_qlora)), ids)
    gap = {rt: float((_logits(AutoModelForCausalLM.from_pretrained(str(o)), ids) - trained).abs().max())
           for rt, o in outs.items()}
    assert gap[True] < 1e-4, gap
    assert gap[True] < gap[False], gap


def _merge_then_shift_one_logit(delta: float):
    """A correct merge whose model then adds `delta` to one logit of every forward (the first
    vocabulary entry at the last position): a merge off by exactly that much."""
    def wrong_merge(model):
        merged = model.merge_and_unload()

        def shift(_module, _inputs, output):
            output = output.clone()
            output[..., -1, 0] += delta
            return output

        merged.get_output_embeddings().register_forward_hook(shift)
        return merged

    return wrong_merge


@pytest.mark.parametrize("factor", [0.9, 1.5])
def test_parity_holds_the_merge_to_the_configured_tolerance(make_config, sft_lora, tmp_path, monkeypatch, factor):
    """Issue 17 (e): in float32 a merge whose logits differ from base+adapter by 1.5× merge.tolerance
    is refused and one within 0.9× of it passes (a looser or a default tolerance fails one of the two)."""
    tolerance = 1e-2  # not the default (1e-3)
    monkeypatch.setattr("posttrain.stages.merge.merge", _merge_then_shift_one_logit(factor * tolerance))
    cfg = make_config(merge={"dtype": "float32", "tolerance": tolerance, "probe_prompts": ["Hello!"],
                             "max_new_tokens": 4})
    out = tmp_path / "merged"
    if factor > 1:
        with pytest.raises(PosttrainError, match=r"differ from base\+adapter by up to 0\.015 \(tolerance 0\.01\)"):
            merge.run(cfg, base=str(sft_lora), output=str(out))
        assert not manifest.is_finished(out)
    else:
        merge.run(cfg, base=str(sft_lora), output=str(out))
        parity = manifest.read(out)["checks"]["parity"]
        assert parity["tolerance"] == tolerance
        assert parity["max_abs_diff"] == pytest.approx(factor * tolerance, rel=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_check_parity_at_just_inside_and_just_outside_the_tolerance(dtype):
    """merge.check_parity directly: 0.9× the tolerance passes, 1.1× is refused; float32 uses
    merge.tolerance itself, bf16 numerics.tolerance (8 rounding steps of the logits' scale)."""
    from posttrain import numerics

    configured = 1e-3
    g = torch.Generator().manual_seed(0)
    expected = [(torch.rand(1, 5, 40, generator=g) * 2 - 1) * 4, (torch.rand(1, 3, 40, generator=g) * 2 - 1) * 4]
    expected[0][0, 0, 0] = 12.0  # the logits' scale
    scale = max(float(e.abs().max()) for e in expected)
    tol = numerics.tolerance(configured, dtype, scale)
    if dtype == torch.float32:
        assert tol == configured
    else:
        assert tol == pytest.approx(8 * 2 ** -7 * 12.0) and tol > 100 * configured

    def shifted(factor):
        got = [e.clone() for e in expected]
        got[1][0, 2, 7] += factor * tol
        return got

    ok = merge.check_parity(expected, shifted(0.9), configured, dtype)
    assert ok["tolerance"] == pytest.approx(tol) and ok["max_abs_diff"] == pytest.approx(0.9 * tol, rel=1e-3)
    assert ok["logit_scale"] == 12.0 and ok["probes"] == 2
    with pytest.raises(PosttrainError, match="the merge is wrong"):
        merge.check_parity(expected, shifted(1.1), configured, dtype)
