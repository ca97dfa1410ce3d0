"""Negative controls for safeguards that had none: each test builds the bad situation and asserts
that the check fires (so it fails if the check is removed), next to a positive control where
that is cheap. Models are the tiny random-init ones from conftest; training is a few steps.

Covered: no trainable parameters (#19); the DPO grad-norm / collapse guards (#8, #25); PPO's
reference check at the first rollout (#17); generation_config's eos synced to the end-of-turn token
(#16); the format-reuse check and the resume decision (#14, #26); merging into a pre-quantized base
(#2); vocabulary growth with LoRA (#15); and smaller branches (reward batch mates, device/bnb
defaults, merge's reload check and end-of-turn warning). Two positive tests of paths no other test
runs: LoRA with gradient checkpointing, and a LoRA SFT resume.

The negative controls of single modules sit with that module's tests: unmatched LoRA targets
(#19) in test_models.py, the save-time re-open checks (#20, #23) and a vocab-size change against
the parent in stages/test_common.py, the NaN-loss guard (#8) in test_callbacks.py, data content in
the stage key (#26) in test_lineage.py, the accuracy gate without a recorded accuracy in
rl/test_rewards.py.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from posttrain import chain, lineage, manifest, models
from posttrain.config import validate_dict
from posttrain.errors import PosttrainError
from posttrain.stages import merge, sft
from tests.conftest import read_losses
from tests.helpers import LLAMA3_LIKE, ppo_chain_raw, ppo_section
from tests.helpers import own_sft_data as _sft_data
from tests.helpers import same_size_edit as _same_size_edit

pytestmark = pytest.mark.usefixtures("one_thread")

LORA = {"r": 8, "alpha": 16, "dropout": 0.0}


def _short(steps: int = 2, **extra) -> dict:
    """SFT training settings for a run of a few steps."""
    return {"max_steps": steps, "per_device_train_batch_size": 8, "learning_rate": 3e-3, "logging_steps": 1,
            "save_steps": 1000, "max_length": 64, "gradient_checkpointing": False, **extra}


# ---------------------------------------------------------------------------------------------
# #19: nothing can train


def test_frozen_model_is_refused_before_training(make_config, monkeypatch):
    """TrainingGuard.on_train_begin: a model with every parameter frozen stops at once."""
    original = models.load_causal_lm
    monkeypatch.setattr("posttrain.models.load_causal_lm",
                        lambda *a, **k: original(*a, **k).requires_grad_(False))
    cfg = make_config(sft__training=_short())
    with pytest.raises(PosttrainError, match=r"the model has no trainable parameters") as e:
        sft.run(cfg)
    assert "\n" not in str(e.value)
    out = Path(cfg.output_dir) / "sft"
    assert not manifest.is_finished(out)
    assert not (out / "metrics.jsonl").exists() or not read_losses(out), "no training step may run"


# ---------------------------------------------------------------------------------------------
# #8, #25: NaN loss, zero gradient norm, collapsing DPO loss


# ---------------------------------------------------------------------------------------------
# #17: PPO's reference is the starting policy at the first rollout


def _ppo_cfg(tiny_dir, demo_data, root, rm):
    return validate_dict(ppo_chain_raw(tiny_dir, demo_data, root,
                                       ppo=ppo_section(rm, steps=1, allow_weak_reward_model=True)))


def test_ppo_wrong_reference_is_caught_at_the_first_rollout(tiny_dir, demo_data, small_rm, tmp_path, monkeypatch):
    from posttrain.stages import ppo, ppo_models

    def other_model(source, policy, pc):
        ref = copy.deepcopy(policy).requires_grad_(False)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in ref.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        return ref, None, "not the starting policy"

    monkeypatch.setattr(ppo_models, "reference", other_model)
    updates = []
    monkeypatch.setattr(ppo.Loop, "update", lambda self, *a, **k: updates.append(1))
    out = tmp_path / "ppo"
    with pytest.raises(PosttrainError, match=r"at the first rollout the policy's KL to the reference is .* not 0"):
        ppo.run(_ppo_cfg(tiny_dir, demo_data, tmp_path / "out", small_rm), base=str(tiny_dir), output=str(out))
    assert not updates, "the check must fire before any update"
    assert not manifest.is_finished(out)


def test_ppo_check_reference_unit():
    from posttrain.stages import ppo

    loop = object.__new__(ppo.Loop)  # check_reference reads only its argument
    loop.check_reference(torch.zeros(4, 6))
    loop.check_reference(torch.full((4, 6), 1e-5))  # within FIRST_RATIO_TOLERANCE per response
    kl = torch.zeros(4, 6)
    kl[2, 3] = -0.01  # one token of one response, negative: still not the starting model
    with pytest.raises(PosttrainError, match=r"KL to the reference is 1\.00e-02 nats"):
        loop.check_reference(kl)


# ---------------------------------------------------------------------------------------------
# #16: generation stops at the end-of-turn token even when the base's generation_config says otherwise


def _eos_ids(generation_config) -> list[int]:
    eos = generation_config.eos_token_id
    return eos if isinstance(eos, list) else [eos]


def test_sft_writes_end_of_turn_into_generation_config(make_config, tiny_dir, tmp_path):
    from transformers import AutoTokenizer, GenerationConfig

    base = tmp_path / "base"
    shutil.copytree(tiny_dir, base)
    tok = AutoTokenizer.from_pretrained(str(base))
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    gc = json.loads((base / "generation_config.json").read_text())
    gc["eos_token_id"] = tok.eos_token_id  # a Hub base that stops only at its pretraining eos
    (base / "generation_config.json").write_text(json.dumps(gc))
    assert im_end not in _eos_ids(GenerationConfig.from_pretrained(str(base)))

    out = sft.run(make_config(model__name_or_path=str(base), sft__training=_short()))
    eos = _eos_ids(GenerationConfig.from_pretrained(str(out)))
    assert eos[0] == im_end and tok.eos_token_id in eos
    assert tok.pad_token_id not in eos


# ---------------------------------------------------------------------------------------------
# #26, #14: data content in the stage key, format reuse, the resume decision


def test_formatted_data_is_not_reused_after_an_in_place_edit(make_config, own_data):
    from posttrain import data
    from posttrain.stages import format as format_stage

    cfg = make_config(data__sft=_sft_data(own_data), format__datasets=["sft"])
    fmt_dir = format_stage.run(cfg)
    tok = models.load_tokenizer(cfg)
    assert data._format_matches(manifest.read(fmt_dir), cfg, "sft", tok)
    _, _, record = data.stage_data(cfg, "sft", tok)
    assert record.get("format_dir") == str(fmt_dir)  # positive control: reused while unchanged

    _same_size_edit(own_data / "sft_train.jsonl")
    assert not data._format_matches(manifest.read(fmt_dir), cfg, "sft", tok)
    _, _, record = data.stage_data(cfg, "sft", tok)
    assert "format_dir" not in record and record["files"][str(own_data / "sft_train.jsonl")] != \
        manifest.read(fmt_dir)["datasets"]["sft"]["files"][str(own_data / "sft_train.jsonl")]


def test_chain_resumes_only_with_the_key_it_started_with(tmp_path):
    out = tmp_path / "sft"
    ckpt = out / "checkpoints" / "checkpoint-1"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 1}))
    lineage.mark_started(out, "key-A")
    step = chain.Step("sft", out, None)
    assert chain.decide(step, "key-A", False) == "resuming"
    assert chain.decide(step, "key-B", False) == "running"  # inputs changed since the kill
    assert chain.decide(step, "key-A", True) == "running"  # --from
    (ckpt / "trainer_state.json").unlink()  # killed before its first complete checkpoint
    assert chain.decide(step, "key-A", False) == "running"
    manifest.write(out, {"stage": "sft", "inputs_key": "key-A"})
    assert chain.decide(step, "key-A", False) == "up to date"
    assert chain.decide(step, "key-B", False) == "running"


# ---------------------------------------------------------------------------------------------
# #2: never merge into quantized weights


def test_merge_refuses_a_pre_quantized_base(make_config, tiny_dir, saved_adapter, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    q4 = tmp_path / "base-4bit"
    AutoModelForCausalLM.from_pretrained(str(tiny_dir), quantization_config=models.bnb_config(torch.float32),
                                         dtype=torch.float32).save_pretrained(str(q4))
    AutoTokenizer.from_pretrained(str(tiny_dir)).save_pretrained(str(q4))
    assert "quantization_config" in json.loads((q4 / "config.json").read_text())
    adapter = tmp_path / "adapter"
    shutil.copytree(saved_adapter, adapter)
    ac = json.loads((adapter / "adapter_config.json").read_text())
    ac["base_model_name_or_path"] = str(q4)  # e.g. trained with QLoRA on a checkpoint saved in 4 bits
    (adapter / "adapter_config.json").write_text(json.dumps(ac))

    out = tmp_path / "merged"
    with pytest.raises(PosttrainError, match=r"is saved quantized \(bitsandbytes\).*unquantized") as e:
        merge.run(make_config(), base=str(adapter), output=str(out))
    assert "\n" not in str(e.value) and str(q4) in str(e.value)
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# #15: tokens added to the vocabulary with LoRA: resized, trained, saved, reloaded


def test_lora_sft_with_added_tokens_saves_and_reloads_the_embeddings(make_config, tiny_dir, tmp_path):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    template = tmp_path / "llama3.jinja"
    template.write_text(LLAMA3_LIKE)
    cfg = make_config(template={"name": str(template), "add_special_tokens": True}, sft__method="lora",
                      sft__lora=LORA, sft__training=_short(5, learning_rate=2e-2))
    out = sft.run(cfg)

    tok = AutoTokenizer.from_pretrained(str(out))
    n = len(tok)
    m = manifest.read(out)
    assert m["added_tokens"] == ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    assert m["special_tokens"]["vocab_size"] == n
    assert m["special_tokens"]["eot"] == tok.convert_tokens_to_ids("<|eot_id|>")
    # embed_tokens and lm_head are trained in full (modules_to_save) and saved with the new rows
    saved = load_file(str(out / "adapter_model.safetensors"))
    trained = {mod: next((v for k, v in saved.items() if f"{mod}.modules_to_save" in k), None)
               for mod in ("embed_tokens", "lm_head")}
    assert all(v is not None and v.shape[0] == n for v in trained.values()), sorted(saved)
    hidden = trained["embed_tokens"].shape[1]
    assert m["trainable_parameters"] > 2 * n * hidden
    base = load_file(str(tiny_dir / "model.safetensors"))["model.embed_tokens.weight"]
    assert base.shape[0] < n and not torch.equal(trained["embed_tokens"][: base.shape[0]], base)
    assert any("lora_B" in k and v.any() for k, v in saved.items())

    # PEFT reloads it on the base, resized to the saved tokenizer, with the trained rows
    model = AutoPeftModelForCausalLM.from_pretrained(str(out)).eval()
    torch.testing.assert_close(model.get_input_embeddings().weight, trained["embed_tokens"])
    torch.testing.assert_close(model.get_output_embeddings().weight, trained["lm_head"])
    new_ids = tok.convert_tokens_to_ids(m["added_tokens"])
    text = tok.apply_chat_template([{"role": "user", "content": "What is 12 + 34?"}], tokenize=False,
                                   add_generation_prompt=True)
    enc = tok(text, return_tensors="pt", add_special_tokens=False)
    assert set(new_ids) <= set(enc["input_ids"][0].tolist())  # the prompt uses the new tokens
    gen = model.generate(**enc, max_new_tokens=4, do_sample=False)
    assert gen.shape[1] > enc["input_ids"].shape[1]


# ---------------------------------------------------------------------------------------------
# Smaller branches


def test_reward_scores_must_not_depend_on_batch_mates(monkeypatch):
    from posttrain.rl import rewards
    from posttrain.stages import reward

    def score_ids(model, sequences, pad_id, *, batch_size=32, padding_side="right"):
        return [float(len(s)) + (0.1 if batch_size == 1 else 0.0) for s in sequences]

    monkeypatch.setattr(rewards, "score_ids", score_ids)
    seqs = [[5, 6, 7], [5, 6]]
    with pytest.raises(PosttrainError, match=r"scores change with a batch of one"):
        reward.check_padding_and_batch(None, seqs, 0, 1e-4, torch.float32)
    assert reward.check_padding_and_batch(None, seqs, 0, 0.2, torch.float32) == ([3.0, 2.0], 0.2)


def test_device_defaults_and_quant_storage():
    from posttrain.config import device_training_defaults

    assert device_training_defaults(True, True)["bf16"] is True
    assert device_training_defaults(True, False)["bf16"] is False
    cpu = device_training_defaults(False, False)
    assert cpu["bf16"] is False and cpu["use_cpu"] is True
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        q = models.bnb_config(dtype)
        assert q.bnb_4bit_quant_storage == dtype == q.bnb_4bit_compute_dtype  # #22: sharding needs them equal


def test_lora_sft_with_gradient_checkpointing_trains(make_config):
    """trl#3089: with gradient checkpointing and PEFT the inputs must require grad, else nothing
    trains (TrainingGuard would raise). Positive test of the real case every other test turns off."""
    cfg = make_config(sft__method="lora", sft__lora=LORA,
                      sft__training=_short(3, learning_rate=2e-2, gradient_checkpointing=True))
    out = sft.run(cfg)
    assert "activation checkpointing on" in manifest.read(out)["metrics"]["speed"]  # what the trainer ran with
    adapter = load_file(str(out / "adapter_model.safetensors"))
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.any() for v in lora_b)
    losses = read_losses(out)
    assert losses and all(math.isfinite(v) for v in losses.values())


def test_merge_reload_check_and_end_of_turn_warning(make_config, tiny_dir, capsys):
    """merge.check_reload: a saved model whose reloaded logits differ is refused; a random-init
    model that never emits the end-of-turn token passes with a warning (the recorded count says so)."""
    from transformers import AutoModelForCausalLM

    tok = models.load_tokenizer(make_config(), str(tiny_dir), need_masks=False)
    text = tok.tokenizer.apply_chat_template([{"role": "user", "content": "What is 1 + 2?"}], tokenize=False,
                                             add_generation_prompt=True)
    ids = [tok.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]]
    with torch.no_grad():
        logits = [AutoModelForCausalLM.from_pretrained(str(tiny_dir)).eval()(ids[0]).logits.float()]
    with pytest.raises(PosttrainError, match=r"reloaded from .* gives different logits"):
        merge.check_reload(Path(tiny_dir), ids, [logits[0] + 0.01], tok, 4, 1e-3)
    got = merge.check_reload(Path(tiny_dir), ids, logits, tok, 4, 1e-3)
    assert got["max_abs_diff"] <= 1e-5 and got["samples"][0]["new_tokens"] == 4
    assert got["stopped"] == 0  # 4 greedy tokens of a random-init model: no <|im_end|>
    assert "did not stop at the end-of-turn token on 1 of 1 probes" in " ".join(capsys.readouterr().err.split())


def test_lora_sft_resume_reproduces_losses(make_config):
    """The PEFT resume path (adapter checkpoint + optimizer): the same losses as without a stop."""
    cfg = make_config(sft__method="lora", sft__lora=LORA,
                      sft__training=_short(6, learning_rate=2e-2, save_steps=3, save_total_limit=5))
    out = sft.run(cfg)
    full = read_losses(out)
    assert sorted(full) == list(range(1, 7))
    assert (out / "checkpoints" / "checkpoint-3" / "adapter_model.safetensors").is_file()

    # stopped after step 3, as a killed run leaves it
    shutil.rmtree(out / "checkpoints" / "checkpoint-6")
    (out / manifest.MANIFEST).unlink()
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("".join(line + "\n" for line in lines if json.loads(line)["step"] <= 3))
    sft.run(cfg, resume=True)
    assert manifest.read(out)["resumed_from"].endswith("checkpoint-3")
    resumed = read_losses(out)
    for step in range(4, 7):
        assert resumed[step] == pytest.approx(full[step], rel=1e-5, abs=1e-6), step
