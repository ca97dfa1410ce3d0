"""SFT on a tiny random-init model: full, LoRA and QLoRA train (loss finite and falling,
parameters change), outputs reload and generate, and a resumed run reproduces the losses."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from posttrain import manifest
from posttrain.errors import PosttrainError
from posttrain.stages import sft
from tests.conftest import read_losses, tensorboard_scalars, weights_moved


def _generate(model, tok) -> list[int]:
    text = tok.apply_chat_template([{"role": "user", "content": "What is 12 + 34?"}], tokenize=False,
                                   add_generation_prompt=True)
    enc = tok(text, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    return out[0, enc["input_ids"].shape[1]:].tolist()


def _assert_trained(out, min_drop: float = 1.0):
    """Loss finite and falling by at least `min_drop` nats (the start is ~ln(vocab) = 5.6)."""
    losses = read_losses(out)
    values = list(losses.values())
    assert len(values) >= 3
    assert all(math.isfinite(v) for v in values)
    assert values[0] - values[-1] > min_drop, f"loss did not fall: {values}"
    m = manifest.read(out)
    assert m["stage"] == "sft" and m["metrics"]["steps"] == 30
    assert m["metrics"]["eval_loss_after"] < m["metrics"]["eval_loss_before"]
    assert m["template_hash"] and m["data"]["files"] and m["versions"]["trl"]
    return m


def test_full_sft_trains_saves_and_reloads(make_config, tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = make_config()
    out = sft.run(cfg)
    m = _assert_trained(out)
    assert m["trainable_parameters"] == m["total_parameters"] > 0

    before = load_file(str(tiny_dir / "model.safetensors"))
    after = load_file(str(out / "model.safetensors"))
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) == len(before), "every parameter tensor should change in full fine-tuning"

    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and tok.pad_token_id != tok.eos_token_id
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    eos = model.generation_config.eos_token_id
    assert im_end == eos or im_end in eos  # generation stops at the end-of-turn token (#16)
    assert len(_generate(model, tok)) >= 1


def test_lora_sft_trains_adapter_only(make_config, tiny_dir):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    cfg = make_config(sft__method="lora", sft__lora={"r": 8, "alpha": 16, "dropout": 0.0})
    cfg.sft.training["learning_rate"] = 2e-2  # adapters on a random-init base learn slowly
    out = sft.run(cfg)
    m = _assert_trained(out, min_drop=0.15)
    assert 0 < m["trainable_parameters"] < m["total_parameters"]
    adapter = load_file(str(out / "adapter_model.safetensors"))
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b), "LoRA B starts at zero and must have moved"
    assert not (out / "model.safetensors").exists()

    model = AutoPeftModelForCausalLM.from_pretrained(out)
    assert len(_generate(model, AutoTokenizer.from_pretrained(out))) >= 1


def test_qlora_sft_on_cpu(make_config):
    cfg = make_config(sft__method="qlora", sft__lora={"r": 8, "alpha": 16, "dropout": 0.0})
    cfg.sft.training["learning_rate"] = 2e-2
    out = sft.run(cfg)
    _assert_trained(out, min_drop=0.15)
    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())


def test_resume_reproduces_losses(make_config):
    cfg = make_config(sft__training={"max_steps": 20, "per_device_train_batch_size": 16, "learning_rate": 3e-3,
                                     "logging_steps": 1, "save_steps": 10, "max_length": 64,
                                     "gradient_checkpointing": False, "save_total_limit": 5})
    out = sft.run(cfg)
    full = read_losses(out)
    assert sorted(full) == list(range(1, 21))

    # Interrupt after step 10: drop what came later, as a killed run would have left it.
    shutil.rmtree(out / "checkpoints" / "checkpoint-20")
    (out / manifest.MANIFEST).unlink()
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("".join(line + "\n" for line in lines if json.loads(line)["step"] <= 10))

    sft.run(cfg, resume=True)
    resumed = read_losses(out)
    assert manifest.read(out)["resumed_from"].endswith("checkpoint-10")
    for step in range(11, 21):
        assert resumed[step] == pytest.approx(full[step], rel=1e-5, abs=1e-6), step


def test_finished_output_is_not_overwritten(make_config):
    cfg = make_config(sft__training={"max_steps": 2, "per_device_train_batch_size": 8, "max_length": 64,
                                     "gradient_checkpointing": False})
    out = sft.run(cfg)
    with pytest.raises(PosttrainError, match="already holds a finished stage"):
        sft.run(cfg)
    with pytest.raises(PosttrainError, match="no checkpoint"):
        sft.run(cfg.model_copy(update={"output_dir": str(out.parent / "elsewhere")}), resume=True)


def test_nothing_trains_is_loud(make_config):
    """Negative control for the training guard: lr 0 and no warmup means no parameter moves."""
    cfg = make_config(sft__training={"max_steps": 3, "per_device_train_batch_size": 8, "learning_rate": 0.0,
                                     "max_length": 64, "gradient_checkpointing": False})
    with pytest.raises(PosttrainError, match="no trainable parameter changed"):
        sft.run(cfg)
    assert not manifest.is_finished(cfg.output_dir + "/sft")


def test_guard_sees_a_lora_step_on_a_deep_model():
    """The guard compares every trainable tensor. After one real step on LoRA (no weight decay, the
    Trainer default), only the B matrices
    have moved (A's gradient is zero while B is zero); a guard that sampled a subset of tensors
    could pick only A matrices and stop a healthy run. 16 layers give 112 LoRA tensors."""
    from types import SimpleNamespace

    from peft import LoraConfig, get_peft_model

    from posttrain import demo, tiny
    from posttrain.callbacks import TrainingGuard

    torch.manual_seed(0)
    model = get_peft_model(tiny.build_model(tiny.build_tokenizer(demo.corpus()), hidden=32, layers=16),
                           LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0))
    guard = TrainingGuard(model)
    args = SimpleNamespace(get_warmup_steps=lambda n: 0)
    guard.on_train_begin(args, SimpleNamespace(global_step=0, is_world_process_zero=False), None)
    assert len(guard.before) == sum(p.requires_grad for p in model.parameters())
    ids = torch.randint(0, 300, (2, 12))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not p.flatten()[:64].equal(guard.before[n])]
    assert moved and all("lora_B" in n for n in moved)  # the situation a sample of A matrices would miss
    guard.on_step_end(args, SimpleNamespace(global_step=1, max_steps=10), None)  # no error
    assert guard.before is None  # it saw the change


def test_report_to_tensorboard_passes_through_to_the_trainer(make_config, tmp_path, monkeypatch):
    """The losses reach TensorBoard under <stage>/runs, all of them: transformers alone would send
    those logged before its on_train_begin (and, through that writer, the whole run) to ./runs."""
    monkeypatch.chdir(tmp_path)
    cfg = make_config(sft__training={"max_steps": 6, "per_device_train_batch_size": 8, "logging_steps": 2,
                                     "save_steps": 1000, "max_length": 64, "gradient_checkpointing": False,
                                     "report_to": ["tensorboard"]})
    out = sft.run(cfg, output=str(tmp_path / "sft"))
    logged = tensorboard_scalars(out / "runs")
    assert [v for _, v in logged["train/loss"]] == pytest.approx(list(read_losses(out).values()))
    assert len(logged["eval/loss"]) == 2  # before and after training
    assert not (tmp_path / "runs").exists()


def test_a_new_lora_adapter_starts_the_same_in_every_run(make_config):
    """common.seed before loading: the adapter's random A matrices are the same in two runs of
    one config (and so in 1 or N processes, which broadcast rank 0's). The negative control, two
    loads without the seed, differ: the Trainer seeds only once the model exists."""
    from posttrain import models
    from posttrain.stages import common

    cfg = make_config(sft__method="lora", sft__lora={"r": 4, "alpha": 8, "dropout": 0.0})
    tok = models.load_tokenizer(cfg, cfg.model.name_or_path)

    def lora_a(seeded: bool) -> dict:
        if seeded:
            common.seed(cfg)
        model = models.load_causal_lm(cfg, cfg.model.name_or_path, "lora", cfg.sft.lora, tok)
        return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}

    first, second = lora_a(True), lora_a(True)
    assert first and all(torch.equal(first[n], second[n]) for n in first)
    third, fourth = lora_a(False), lora_a(False)
    assert not all(torch.equal(third[n], fourth[n]) for n in third)


# ---------------------------------------------------------------------------------------------
# Full fine-tuning in bf16 keeps its updates (issue 16, item 0)


def _full_sft_at_low_lr(make_config, tiny_dir, tmp_path, dtype: str, tag: str) -> dict:
    """Full SFT, lr 1e-5 x 30 steps: which share of the matrix weights moved from the start (as the
    run stores it), by how much, the logged losses and the precision the trainer ran in."""
    cfg = make_config(model__dtype=dtype, sft__training__learning_rate=1e-5)
    out = sft.run(cfg, output=str(tmp_path / tag))
    share, mean_dw = weights_moved(tiny_dir, out)
    saved = next(iter(load_file(str(out / "model.safetensors")).values())).dtype
    return {"share": share, "mean_dw": mean_dw, "losses": list(read_losses(out).values()),
            "speed": manifest.read(out)["metrics"]["speed"], "saved": saved}


def test_full_sft_in_bf16_keeps_every_update(make_config, tiny_dir, tmp_path, monkeypatch):
    """AdamW on bf16 weights loses every update smaller than a weight's rounding step (at lr 1e-5 on
    weights of size ~0.02: most of them). posttrain trains float32 master weights under bf16
    autocast: every matrix weight moves, by what float32 moves it, and the loss curve is float32's.
    Negative control: with the weights loaded in bf16 (no master copy) most updates are lost."""
    from posttrain import models

    fp32 = _full_sft_at_low_lr(make_config, tiny_dir, tmp_path, "float32", "fp32")
    bf16 = _full_sft_at_low_lr(make_config, tiny_dir, tmp_path, "bfloat16", "bf16")
    assert fp32["speed"].startswith("fp32") and bf16["speed"].startswith("bf16"), (fp32["speed"], bf16["speed"])
    assert fp32["share"] > 0.99 and bf16["share"] > 0.99, (fp32["share"], bf16["share"])
    assert bf16["mean_dw"] == pytest.approx(fp32["mean_dw"], rel=0.05)
    assert bf16["losses"] == pytest.approx(fp32["losses"], abs=5e-3)
    assert bf16["losses"][-1] < bf16["losses"][0] - 0.005, bf16["losses"]
    assert bf16["saved"] == torch.float32  # the master weights, as trained

    monkeypatch.setattr(models, "weights_dtype", lambda cfg, method, master_weights=False: torch.bfloat16)
    lost = _full_sft_at_low_lr(make_config, tiny_dir, tmp_path, "bfloat16", "bf16-weights")
    assert lost["saved"] == torch.bfloat16
    assert lost["share"] < 0.5 and lost["mean_dw"] < 0.5 * fp32["mean_dw"], lost


class _Captured(Exception):
    """Raised by the spy once the SFT stage has built its trainer: the test stops before training."""


_CONVERSATIONS = [
    [{"role": "system", "content": "You answer sums."},
     {"role": "user", "content": "What is 12 + 34?"},
     {"role": "assistant", "content": "12 + 34 = 46."},
     {"role": "user", "content": "And 20 + 21?"},
     {"role": "assistant", "content": "41."}],
    [{"role": "user", "content": "Hello!"},
     {"role": "assistant", "content": "Hello. Ask me a sum."}],
    [{"role": "system", "content": "Be brief."},
     {"role": "user", "content": "What is 50 + 7?"},
     {"role": "assistant", "content": "57"}],
]


def _template_assistant_spans(tok, messages) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans the chatml template marks as the
    assistant's ({% generation %}: the content and its <|im_end|>), found from the text alone."""
    text = tok.apply_chat_template(messages, tokenize=False)
    spans, pos = [], 0
    for msg in messages:
        head = f"<|im_start|>{msg['role']}\n"
        start = text.index(head, pos) + len(head)
        end = text.index("<|im_end|>", start) + len("<|im_end|>")
        assert text[start:end - len("<|im_end|>")] == msg["content"]
        if msg["role"] == "assistant":
            spans.append((start, end))
        pos = end
    return text, spans


def test_sft_trains_exactly_the_assistant_tokens_the_template_marks(make_config, tmp_path, monkeypatch):
    """Issue 17 (a): the labels TRL's trainer carries after posttrain built it are the tokens
    between the template's assistant markers (content + <|im_end|>), and no system/user/markup
    token is trained. Fails when assistant-only loss is off (labels = every token)."""
    from posttrain import models

    path = tmp_path / "convs.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in _CONVERSATIONS * 4))
    cfg = make_config(data__sft={"kind": "sft", "train": [{"path": str(path)}]},
                      sft__training={"max_steps": 1, "per_device_train_batch_size": 4, "max_length": 512,
                                     "save_steps": 1000, "gradient_checkpointing": False})
    seen = {}

    def spy(train_dataset):
        seen["ds"] = train_dataset
        raise _Captured

    monkeypatch.setattr(sft, "_check_labels", spy)
    with pytest.raises(_Captured):
        sft.run(cfg, output=str(tmp_path / "sft"))
    ds = seen["ds"]
    assert "labels" in ds.column_names
    tok = models.load_tokenizer(cfg, cfg.model.name_or_path).tokenizer
    assert len(ds) == len(_CONVERSATIONS) * 4
    checked_roles = set()
    for row in ds:
        messages = row["messages"]
        text, spans = _template_assistant_spans(tok, messages)
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        assert row["input_ids"] == enc["input_ids"], "TRL tokenized another text than the template renders"
        expected = []
        for a, b in enc["offset_mapping"]:
            inside = any(s <= a and b <= e for s, e in spans)
            assert inside or not any(s < b and a < e for s, e in spans), "a token straddles an assistant marker"
            expected.append(inside)
        trained = [label != -100 for label in row["labels"]]
        assert trained == expected
        assert [lab for lab, t in zip(row["labels"], trained, strict=True) if t] == \
            [i for i, e in zip(row["input_ids"], expected, strict=True) if e]
        # no token of a system or user message (nor any role header) is in the loss
        for (a, b), t in zip(enc["offset_mapping"], trained, strict=True):
            if t:
                assert not any(h in text[a:b] for h in ("<|im_start|>", "system", "user")), text[a:b]
        checked_roles |= {m["role"] for m in messages}
        assert 0 < sum(trained) < len(trained)
    assert checked_roles == {"system", "user", "assistant"}
