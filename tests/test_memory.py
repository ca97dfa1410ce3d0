"""The memory estimate: parameter and LoRA counts against real models, the parts that must be exact
(weights, grads, AdamW state after a real step), the activation formula against the tensors autograd
saves, and the check's cheapest fix."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import warnings

import pytest

from posttrain import memory
from posttrain.config import validate_dict

warnings.filterwarnings("ignore", message=".*kernels.*")


def llama(tmp_path, name="model", **kw):
    """A tiny Llama config saved as a model directory (no weights: the estimate needs none)."""
    from transformers import LlamaConfig

    args = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=128, tie_word_embeddings=False, max_position_embeddings=256)
    config = LlamaConfig(**{**args, **kw})
    d = tmp_path / name
    config.save_pretrained(d)
    return config, d


def config(d, stage, dtype="float32", **section):
    return validate_dict({"model": {"name_or_path": str(d), "dtype": dtype}, "stages": ["format"], stage: section})


def real_model(config, seed=0):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("tied", [True, False])
def test_parameter_count_is_the_real_models(tmp_path, tied, monkeypatch):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    cfg, d = llama(tmp_path, tie_word_embeddings=tied)
    params = list(real_model(cfg).parameters())
    meta = memory.architecture(AutoConfig.from_pretrained(d))
    formula = memory.llama_architecture(AutoConfig.from_pretrained(d))
    for arch in (meta, formula):
        assert (arch.params, arch.tensors, arch.tied) == (sum(p.numel() for p in params), len(params), tied)
    cfg.num_labels = 1
    head = list(AutoModelForSequenceClassification.from_config(cfg).parameters())
    for arch in (meta, formula):
        assert (arch.classifier().params, arch.classifier().tensors) == (sum(p.numel() for p in head), len(head))

    def cannot_build(*a, **k):  # e.g. remote code that may not run here
        raise ValueError("no")

    monkeypatch.setattr(AutoModelForCausalLM, "from_config", cannot_build)
    assert memory.architecture(AutoConfig.from_pretrained(d)) == formula


@pytest.mark.parametrize("target", ["all-linear", ("q_proj", "v_proj")])
def test_lora_count_is_pefts(tmp_path, target):
    from peft import LoraConfig, get_peft_model

    cfg, _ = llama(tmp_path)
    model = get_peft_model(real_model(cfg), LoraConfig(r=8, target_modules=target if isinstance(target, str)
                                                       else list(target)))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert memory.lora_parameters(memory.architecture(cfg), memory.Lora(8, target)) == trainable


@pytest.mark.parametrize("method", ["full", "lora"])
def test_weights_grads_and_optimizer_are_exact_after_a_real_adamw_step(tmp_path, method):
    """Train one step of a small fp32 model on the CPU and count the bytes of parameters, grads and
    AdamW's state: the estimate of those parts must be exact."""
    import torch
    from peft import LoraConfig, get_peft_model

    hf, d = llama(tmp_path, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=8000)
    est = memory.estimate_stage(config(d, "sft", method=method, lora={"r": 8, "dropout": 0.05},
                                       training={"per_device_train_batch_size": 8, "max_length": 128}),
                                "sft", str(d), cuda=False)
    model = real_model(hf)
    if method == "lora":
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear"))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    ids = torch.randint(0, 8000, (8, 128))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()

    def nbytes(tensors):
        return sum(t.numel() * t.element_size() for t in tensors)

    policy = est.parts["policy"]
    assert policy["weights"] == nbytes(model.parameters())
    assert policy["grads"] == nbytes(p.grad for p in trainable)
    assert policy["optimizer"] == nbytes(t for state in opt.state.values() for t in state.values())


def saved_bytes(model, ids) -> int:
    """What autograd keeps for backward in one forward (each storage once, parameters not)."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, use_cache=False)
    return sum(seen.values())


@pytest.mark.parametrize("dtype,method", [("float32", "full"), ("bfloat16", "full"), ("bfloat16", "lora")])
def test_activations_match_what_autograd_saves(tmp_path, dtype, method):
    """The fitted formula against a measurement on the CPU (sdpa, no gradient checkpointing; the
    logits part is separate and the vocabulary tiny). Full training fits exactly by construction;
    LoRA's frozen base is the formula's approximation."""
    import torch
    from peft import LoraConfig, get_peft_model

    hf, d = llama(tmp_path, hidden_size=128, intermediate_size=352, num_hidden_layers=4, vocab_size=16)
    training = {"per_device_train_batch_size": 2, "max_length": 64, "gradient_checkpointing": False}
    est = memory.estimate_stage(config(d, "sft", dtype=dtype, method=method, training=training), "sft", str(d),
                                cuda=False)
    model = real_model(hf).to(getattr(torch, dtype))
    if method == "lora":
        model = get_peft_model(model, LoraConfig(r=16, lora_dropout=0.05, target_modules="all-linear"))
    model.train()
    ids = torch.randint(0, 16, (2, 64))
    measured = saved_bytes(model, ids)
    assert est.parts["policy"]["activations"] == pytest.approx(measured, rel=0.02 if method == "full" else 0.1)
    if method == "full":  # checkpointing keeps the layer inputs, and backward recomputes one layer at a time
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        gc = memory.estimate(dataclasses.replace(est.settings, checkpointing=True)).parts["policy"]["activations"]
        assert gc == pytest.approx(saved_bytes(model, ids) + measured / hf.num_hidden_layers, rel=0.05)


def test_gradient_checkpointing_lowers_activations(tmp_path):
    _, d = llama(tmp_path)
    on, off = (memory.estimate_stage(config(d, "sft", training={"gradient_checkpointing": gc}), "sft", str(d),
                                     cuda=False) for gc in (True, False))
    assert on.parts["policy"]["activations"] < off.parts["policy"]["activations"] / 1.5
    assert on.total < off.total
    default = memory.estimate_stage(config(d, "sft"), "sft", str(d), cuda=False)  # TRL 1.16 defaults it on
    assert default.total == on.total


def test_dpo_reference_modes(tmp_path):
    """'precomputed' drops exactly one model's weights; with LoRA, 'copy' keeps only an adapter
    copy and 'adapter_disabled' nothing."""
    _, d = llama(tmp_path)
    est = {(m, r): memory.estimate_stage(config(d, "dpo", method=m, reference=r), "dpo", str(d), cuda=False)
           for m, r in (("full", "copy"), ("full", "precomputed"), ("lora", "copy"), ("lora", "adapter_disabled"))}
    arch = est["full", "copy"].settings.arch
    assert est["full", "copy"].total - est["full", "precomputed"].total == arch.params * 4
    adapter = memory.lora_parameters(arch, est["lora", "copy"].settings.adapter)
    assert est["lora", "copy"].parts["reference adapter"] == {"weights": adapter * 4}
    assert "reference adapter" not in est["lora", "adapter_disabled"].parts
    assert est["lora", "copy"].total - est["lora", "adapter_disabled"].total == adapter * 4


def test_full_training_in_bf16_counts_the_float32_master_weights(tmp_path):
    """Full training keeps float32 master weights in bf16 (models.weights_dtype), in the TRL stages
    and in PPO: 16 bytes a parameter, and the frozen reference copy in float32; a LoRA base stays
    bf16. The estimate counts what the loader will load."""
    import torch

    from posttrain import models

    _, d = llama(tmp_path)
    sft_cfg = config(d, "sft", dtype="bfloat16", method="full")
    full = memory.estimate_stage(sft_cfg, "sft", str(d), cuda=True)
    n = full.settings.arch.params
    assert models.weights_dtype(sft_cfg, "full", master_weights=True) == torch.float32
    assert full.parts["policy"]["weights"] == n * 4 and full.parts["policy"]["grads"] == n * 4
    dpo = memory.estimate_stage(config(d, "dpo", dtype="bfloat16", method="full"), "dpo", str(d), cuda=True)
    assert dpo.parts["reference"] == {"weights": n * 4}
    lora_cfg = config(d, "sft", dtype="bfloat16", method="lora")
    lora = memory.estimate_stage(lora_cfg, "sft", str(d), cuda=True)
    assert models.weights_dtype(lora_cfg, "lora", master_weights=True) == torch.bfloat16
    assert (lora.parts["policy"]["weights"] - n * 2
            == memory.lora_parameters(lora.settings.arch, lora.settings.adapter) * 4)
    ppo = memory.estimate_stage(config(d, "ppo", dtype="bfloat16", method="full"), "ppo", str(d), cuda=True)
    assert ppo.parts["policy"]["weights"] == n * 4 and ppo.parts["reference"] == {"weights": n * 4}


def test_an_adapter_start_reads_its_base_and_continues_the_adapter(tmp_path):
    from peft import LoraConfig, get_peft_model

    hf, base = llama(tmp_path)
    model = get_peft_model(real_model(hf), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.peft_config["default"].base_model_name_or_path = str(base)
    model.save_pretrained(tmp_path / "adapter")
    assert not (tmp_path / "adapter" / "config.json").exists()
    est = memory.estimate_stage(config(base, "dpo", method="lora", lora={"r": 64}), "dpo",
                                str(tmp_path / "adapter"), cuda=False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert est.settings.continues_adapter and est.parts["policy"]["grads"] == trainable * 4


def test_rl_stages_hold_the_models_their_code_builds(tmp_path):
    _, d = llama(tmp_path)
    ppo = {m: memory.estimate_stage(config(d, "ppo", method=m), "ppo", str(d), cuda=True) for m in ("full", "lora")}
    assert set(ppo["full"].parts) == {"policy", "reference", "reward model", "value model"}
    assert set(ppo["lora"].parts) == {"policy", "reward model", "value model"}  # the adapter disabled
    arch = ppo["full"].settings.arch
    assert ppo["full"].parts["reward model"]["weights"] == arch.classifier().params * 4  # fp32, whatever the policy
    assert ppo["full"].parts["value model"]["optimizer"] == 8 * arch.classifier().params + 4 * arch.classifier().tensors
    rloo = memory.estimate_stage(config(d, "rloo", method="lora"), "rloo", str(d), cuda=True)
    grpo = memory.estimate_stage(config(d, "grpo", method="lora"), "grpo", str(d), cuda=True)
    assert "reference adapter" in rloo.parts and "reference adapter" not in grpo.parts  # beta 0.05 vs 0
    funcs = memory.estimate_stage(config(d, "grpo", rewards=[{"function": "m:f"}]), "grpo", str(d), cuda=True)
    assert "reward model" not in funcs.parts


def fits_with(est, **change) -> int:
    return memory.estimate(dataclasses.replace(est.settings, **change)).total


def test_check_is_quiet_when_it_fits(tmp_path):
    _, d = llama(tmp_path)
    est = memory.estimate_stage(config(d, "sft"), "sft", str(d), cuda=False)
    assert memory.check(est, est.total) is None
    assert any("total" in line for line in est.lines())


def test_check_names_gradient_checkpointing_when_it_is_enough(tmp_path):
    _, d = llama(tmp_path)
    est = memory.estimate_stage(config(d, "sft", training={"gradient_checkpointing": False}), "sft", str(d),
                                cuda=False)
    warning = memory.check(est, fits_with(est, checkpointing=True))
    assert warning.startswith("the sft stage needs about ") and "is available" in warning
    assert warning.endswith("set sft.training.gradient_checkpointing: true (about "
                            f"{memory._size(fits_with(est, checkpointing=True))})")


def test_check_names_a_smaller_batch_with_accumulation(tmp_path):
    _, d = llama(tmp_path)
    training = {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 2}
    est = memory.estimate_stage(config(d, "sft", training=training), "sft", str(d), cuda=False)
    warning = memory.check(est, fits_with(est, batch=4, accumulation=4))
    assert "set sft.training.per_device_train_batch_size: 4 with gradient_accumulation_steps: 4 (" in warning


def test_check_names_precomputed_reference_for_dpo(tmp_path):
    _, d = llama(tmp_path, vocab_size=4096)  # big weights, small activations at batch 1
    est = memory.estimate_stage(config(d, "dpo", training={"per_device_train_batch_size": 1, "max_length": 16}),
                                "dpo", str(d), cuda=False)
    warning = memory.check(est, fits_with(est, reference="precomputed"))
    assert "reference" in warning and warning.split(": set ")[1].startswith("dpo.reference: precomputed (about ")


def test_check_names_qlora_when_only_qlora_fits(tmp_path):
    _, d = llama(tmp_path, hidden_size=512, intermediate_size=2048, num_hidden_layers=4, vocab_size=64)
    est = memory.estimate_stage(config(d, "sft", training={"per_device_train_batch_size": 1, "max_length": 16}),
                                "sft", str(d), cuda=False)
    qlora, lora = fits_with(est, method="qlora"), fits_with(est, method="lora")
    assert qlora < lora < est.total
    warning = memory.check(est, (qlora + lora) // 2)
    assert warning.split(": set ")[1] == f"sft.method: qlora (about {memory._size(qlora)})"


def test_check_says_when_nothing_fits(tmp_path):
    _, d = llama(tmp_path)
    est = memory.estimate_stage(config(d, "dpo"), "dpo", str(d), cuda=False)
    warning = memory.check(est, 1000)
    assert "does not fit even with" in warning and "dpo.method: qlora" in warning and ": set " not in warning


def test_bad_stage_and_missing_model_are_user_errors(tmp_path):
    from posttrain.errors import PosttrainError

    _, d = llama(tmp_path)
    with pytest.raises(PosttrainError, match="no memory estimate"):
        memory.estimate_stage(config(d, "sft"), "merge", str(d), cuda=False)
    with pytest.raises(PosttrainError, match="can't read the model config"):
        memory.estimate_stage(config(d, "sft"), "sft", str(tmp_path / "nowhere"), cuda=False)


def test_available_bytes_and_no_torch_at_import():
    assert memory.available_bytes() > 0
    code = "import sys, posttrain.memory; print(json.dumps('torch' in sys.modules))"
    out = subprocess.run([sys.executable, "-c", "import json; " + code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) is False


def test_weights_mb_counts_each_tensor_once():
    """A tied head, a model passed twice and None add nothing; a bf16 copy counts 2 bytes an element."""
    import torch

    from posttrain import models

    emb = torch.nn.Embedding(1000, 64)
    head = torch.nn.Linear(64, 1000, bias=False)
    head.weight = emb.weight  # tied
    model = torch.nn.Sequential(emb, head)
    model.register_buffer("scale", torch.ones(256))
    one = (1000 * 64 * 4 + 256 * 4) / 2**20
    assert models.weights_mb(model) == pytest.approx(one)
    assert models.weights_mb(model, model, None) == pytest.approx(one)
    other = torch.nn.Linear(64, 1000, bias=False).to(torch.bfloat16)
    assert models.weights_mb(model, other) == pytest.approx(one + 1000 * 64 * 2 / 2**20)
