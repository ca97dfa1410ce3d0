"""The reward stage on a tiny random-init model, starting from a short SFT run.

A full reward model learns the demo's style preference (concise over verbose): held-out pairwise
accuracy far above chance, recorded in the manifest with margin and length correlation, and the
recorded numbers are what an independent re-scoring of the held-out pairs gives. A LoRA reward
model saves its trained score head with the adapter and reloads (in a fresh process) to the same
scores; with the head removed from the adapter file the reload and head checks fail. The padding
check fails for a model that reads its score at a pad position. pair_metrics and pearson against
hand-computed numbers. Bad input (a dataset of kind sft, an unknown dataset, an unfinished base)
is refused before any weights load.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from posttrain import manifest
from posttrain.config import validate_dict
from posttrain.errors import PosttrainError
from posttrain.rl import rewards
from posttrain.stages import reward, sft
from tests.helpers import sft_and_style_data

LORA = {"r": 8, "alpha": 16, "dropout": 0.0}


pytestmark = pytest.mark.usefixtures("one_thread")


def _raw(tiny_dir, demo_data, out_root, **sections) -> dict:
    """SFT data (the chain's) and the demo's style pairs as `data.reward`, with held-out pairs."""
    return {
        "model": {"name_or_path": str(tiny_dir)},
        "data": sft_and_style_data(demo_data),
        "output_dir": str(out_root),
        "seed": 0,
        "sft": {"training": {"max_steps": 30, "per_device_train_batch_size": 16, "learning_rate": 3e-3,
                             "logging_steps": 10, "save_steps": 1000, "max_length": 64,
                             "gradient_checkpointing": False}},
        **sections,
    }


def _reward_section(lr: float, steps: int = 20, **extra) -> dict:
    return {"data": "reward", **extra,
            "training": {"max_steps": steps, "per_device_train_batch_size": 16, "learning_rate": lr,
                         "logging_steps": 5, "save_steps": 1000, "max_length": 64,
                         "gradient_checkpointing": False}}


def _run_reward(tiny_dir, demo_data, root, sft_dir, section: dict):
    """reward.run with the console captured (the length-correlation warning is printed there)."""
    from posttrain.console import console

    cfg = validate_dict(_raw(tiny_dir, demo_data, root, reward=section))
    with console.capture() as captured:
        out = reward.run(cfg, base=str(sft_dir), output=str(root / "reward"))
    return out, captured.get()


@pytest.fixture(scope="module")
def sft_dir(tiny_dir, demo_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("reward_sft")
    return sft.run(validate_dict(_raw(tiny_dir, demo_data, root)), output=str(root / "sft"))


@pytest.fixture(scope="module")
def rm_full(tiny_dir, demo_data, sft_dir, tmp_path_factory):
    return _run_reward(tiny_dir, demo_data, tmp_path_factory.mktemp("rm_full"), sft_dir, _reward_section(3e-3))


@pytest.fixture(scope="module")
def rm_lora(tiny_dir, demo_data, sft_dir, tmp_path_factory):
    section = _reward_section(2e-2, method="lora", lora=LORA)
    return _run_reward(tiny_dir, demo_data, tmp_path_factory.mktemp("rm_lora"), sft_dir, section)[0]


def _tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def _held_out(demo_data, tok) -> dict:
    """The held-out pairs tokenized the way the reward model reads a conversation (the chat template
    rendered to text, no added special tokens), with the response lengths in tokens."""
    rows = [json.loads(line) for line in (demo_data / "reward_eval.jsonl").read_text().splitlines()]
    out = {"chosen": [], "rejected": [], "chosen_len": [], "rejected_len": []}
    for r in rows:
        user = [{"role": "user", "content": r["prompt"]}]
        prompt = tok(tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True),
                     add_special_tokens=False)["input_ids"]
        for side in ("chosen", "rejected"):
            text = tok.apply_chat_template(user + [{"role": "assistant", "content": r[side]}], tokenize=False)
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert ids[: len(prompt)] == prompt
            out[side].append(ids)
            out[f"{side}_len"].append(len(ids) - len(prompt))
    return out


def _probe(demo_data, tok, n: int = 8) -> list[list[int]]:
    pairs = _held_out(demo_data, tok)
    return [*pairs["chosen"][:n], *pairs["rejected"][:n]]


# ---------------------------------------------------------------------------------------------
# A full reward model learns the style


def test_reward_model_learns_the_style(rm_full, sft_dir, demo_data):
    out, printed = rm_full
    m = manifest.read(out)
    assert m["stage"] == "reward" and m["method"] == "full"
    assert m["parent"]["path"] == str(sft_dir) and m["parent"]["stage"] == "sft"
    assert m["adapter_base"] is None and m["trainable_parameters"] == m["total_parameters"]
    metrics = m["metrics"]
    assert metrics["steps"] == 20 and metrics["held_out"] is True and metrics["pairs"] == 32
    assert metrics["accuracy"] >= 0.8, metrics
    assert metrics["margin"] > 0 and metrics["score_chosen_mean"] > metrics["score_rejected_mean"]
    assert math.isfinite(metrics["length_correlation"]) and -1 <= metrics["length_correlation"] <= 1
    assert math.isfinite(metrics["train_loss_final"]) and metrics["train_loss_final"] < math.log(2)
    assert m["checks"]["padding_and_batch"] == "scores equal within 0.0001"  # float32: reward.tolerance as set
    assert m["checks"]["reload"]["tolerance"] == 1e-4
    assert m["checks"]["reload"]["sequences"] == reward.CHECK_SEQUENCES
    assert m["checks"]["reload"]["max_abs_diff"] <= 1e-5
    assert (out / "model.safetensors").is_file() and not (out / "adapter_model.safetensors").exists()

    # the recorded numbers are what scoring the held-out pairs from the saved model gives
    tok = _tokenizer(out)
    model = rewards.load_reward_model(str(out))
    assert model.config.pad_token_id == tok.pad_token_id
    pairs = _held_out(demo_data, tok)
    chosen = rewards.score_ids(model, pairs["chosen"], tok.pad_token_id)
    rejected = rewards.score_ids(model, pairs["rejected"], tok.pad_token_id)
    again = reward.pair_metrics(chosen, rejected, pairs["chosen_len"], pairs["rejected_len"])
    assert again["accuracy"] == metrics["accuracy"]
    for k in ("margin", "score_chosen_mean", "score_rejected_mean", "score_std", "length_correlation"):
        assert again[k] == pytest.approx(metrics[k], abs=2e-4), k

    # concise answers are shorter: the score anti-correlates with length, past the warning threshold
    # (0.5), so the stage warned about it
    assert metrics["length_correlation"] < -0.5
    assert "correlates with response length" in printed
    assert f"r = {metrics['length_correlation']:+.2f}" in printed


def test_untrained_head_does_not_know_the_style(rm_full, sft_dir, demo_data):
    """Control for the accuracy above: the same backbone with the random head it started from
    (seeded as the stage seeds it) does not separate the pairs the way the trained one does."""
    from transformers import AutoModelForSequenceClassification, set_seed

    out, _ = rm_full
    tok = _tokenizer(out)
    set_seed(0)
    untrained = AutoModelForSequenceClassification.from_pretrained(str(sft_dir), num_labels=1).eval()
    untrained.config.pad_token_id = tok.pad_token_id
    pairs = _held_out(demo_data, tok)
    before = reward.pair_metrics(rewards.score_ids(untrained, pairs["chosen"], tok.pad_token_id),
                                 rewards.score_ids(untrained, pairs["rejected"], tok.pad_token_id),
                                 pairs["chosen_len"], pairs["rejected_len"])
    after = manifest.read(out)["metrics"]
    assert after["margin"] > before["margin"] + 1.0, (before, after)


# ---------------------------------------------------------------------------------------------
# LoRA: the head is saved with the adapter


def test_lora_reward_model_saves_head_and_reloads(rm_lora, sft_dir, demo_data):
    from safetensors import safe_open

    m = manifest.read(rm_lora)
    assert m["method"] == "lora" and m["adapter_base"] == str(sft_dir)
    assert 0 < m["trainable_parameters"] < m["total_parameters"]
    assert m["metrics"]["accuracy"] >= 0.8 and m["metrics"]["held_out"] is True
    assert m["checks"]["reload"]["max_abs_diff"] <= 1e-4
    assert not (rm_lora / "model.safetensors").exists()
    with safe_open(str(rm_lora / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert [k for k in keys if "score" in k], keys
    assert any("lora_B" in k for k in keys)
    rewards.check_head_saved(rm_lora)

    # the saved adapter, merged in memory on its base, scores the probe pairs as the trained model
    # judged them (chosen over rejected on every pair) ...
    tok = _tokenizer(rm_lora)
    probe = _probe(demo_data, tok)
    here = rewards.score_ids(rewards.load_reward_model(str(rm_lora)), probe, tok.pad_token_id)
    n = len(probe) // 2
    assert all(c > r for c, r in zip(here[:n], here[n:], strict=True)), here
    # ... and `python -m posttrain.rl.rewards` in a fresh process gives the same scores
    assert reward.check_reload(rm_lora, probe, tok.pad_token_id, here, 1e-5)["max_abs_diff"] <= 1e-5


@pytest.mark.parametrize("damage", ["removed", "zeroed"])
def test_adapter_with_a_lost_head_is_caught(rm_lora, demo_data, tmp_path, damage):
    """Negative control (safeguard #9): the same adapter with its score tensor removed from the
    adapter file, or replaced by an untrained (zero) head. The head check fails on the removed one;
    the fresh-process reload check fails on both (PEFT refuses an adapter whose modules_to_save
    weights are missing; a wrong head gives other scores)."""
    from safetensors.torch import load_file, save_file

    broken = tmp_path / f"head_{damage}"
    shutil.copytree(rm_lora, broken)
    tensors = load_file(str(broken / "adapter_model.safetensors"))
    head = [k for k in tensors if "score" in k]
    assert head
    if damage == "removed":
        tensors = {k: v for k, v in tensors.items() if k not in head}
    else:
        tensors = {k: torch.zeros_like(v) if k in head else v for k, v in tensors.items()}
    save_file(tensors, str(broken / "adapter_model.safetensors"), metadata={"format": "pt"})

    tok = _tokenizer(rm_lora)
    probe = _probe(demo_data, tok)
    trained = rewards.score_ids(rewards.load_reward_model(str(rm_lora)), probe, tok.pad_token_id)
    if damage == "removed":
        with pytest.raises(PosttrainError, match=r"has no score head"):
            rewards.check_head_saved(broken)
        with pytest.raises(PosttrainError, match=r"does not reload: .*score"):
            reward.check_reload(broken, probe, tok.pad_token_id, trained, 1e-4)
        # loading it for an RL stage must not hand back a model with a random head either
        with pytest.raises(PosttrainError):
            rewards.load_reward_model(str(broken))
    else:
        rewards.check_head_saved(broken)  # the key is there; only the scores tell
        zeroed = rewards.score_ids(rewards.load_reward_model(str(broken)), probe, tok.pad_token_id)
        assert max(abs(a - b) for a, b in zip(zeroed, trained, strict=True)) > 0.1
        with pytest.raises(PosttrainError, match=r"reloads with other scores"):
            reward.check_reload(broken, probe, tok.pad_token_id, trained, 1e-4)


# ---------------------------------------------------------------------------------------------
# Scores must not depend on padding or batch mates


def test_padding_and_batch_check(rm_full, demo_data):
    out, _ = rm_full
    tok = _tokenizer(out)
    pad = tok.pad_token_id
    probe = _probe(demo_data, tok)
    assert len({len(s) for s in probe}) > 1, "the probe needs sequences of different lengths"
    model = rewards.load_reward_model(str(out))
    scores, tol = reward.check_padding_and_batch(model, probe, pad, 1e-4, torch.float32)
    assert scores == rewards.score_ids(model, probe, pad) and tol == 1e-4

    # negative control: the model believes another token is padding, so on right-padded rows it
    # reads the score at the last (pad) position instead of the last real token
    used = {t for s in probe for t in s}
    wrong = next(t for t in range(model.config.vocab_size) if t not in used and t != pad)
    model.config.pad_token_id = wrong
    with pytest.raises(PosttrainError, match=r"scores change with left padding"):
        reward.check_padding_and_batch(model, probe, pad, 1e-4, torch.float32)


def _wrong_pad(model, probe) -> None:
    """The fault the padding check exists for: the model believes another token is padding."""
    used = {t for s in probe for t in s}
    model.config.pad_token_id = next(t for t in range(model.config.vocab_size) if t not in used
                                     and t != model.config.pad_token_id)


def test_padding_and_batch_check_in_bf16(rm_full, demo_data):
    """In bf16 the scores differ between padding sides by rounding (more than reward.tolerance 1e-4,
    which would stop every bf16 run): the check passes within eight rounding steps of the scores'
    size, and still catches a score read at a pad token."""
    out, _ = rm_full
    tok = _tokenizer(out)
    pad = tok.pad_token_id
    probe = _probe(demo_data, tok)
    model = rewards.load_reward_model(str(out), dtype=torch.bfloat16)
    right = rewards.score_ids(model, probe, pad)
    left = rewards.score_ids(model, probe, pad, padding_side="left")
    alone = rewards.score_ids(model, probe, pad, batch_size=1)
    noise = max(abs(a - b) for a, b in [*zip(right, left), *zip(right, alone)])
    assert noise > 1e-4, "bf16 rounding no longer shows here: the test lost its point"
    scores, tol = reward.check_padding_and_batch(model, probe, pad, 1e-4, torch.bfloat16)
    assert scores == right
    assert tol == pytest.approx(8 * 2 ** -7 * max(1.0, max(map(abs, right)))) and noise < tol

    _wrong_pad(model, probe)
    with pytest.raises(PosttrainError, match=r"scores change with left padding .* in bfloat16"):
        reward.check_padding_and_batch(model, probe, pad, 1e-4, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padding_check_threshold(rm_full, demo_data, monkeypatch, dtype):
    """Negative control at the threshold: a left-padded score off by just over the tolerance fails,
    just under it passes (in float32 the configured tolerance, in bf16 the rounding-sized one)."""
    out, _ = rm_full
    tok = _tokenizer(out)
    pad = tok.pad_token_id
    probe = _probe(demo_data, tok)
    model = rewards.load_reward_model(str(out), dtype=dtype)
    exact = rewards.score_ids(model, probe, pad)
    tol = 1e-2 if dtype == torch.float32 else 8 * 2 ** -7 * max(1.0, max(map(abs, exact)))

    def shifted(by):
        def score(m, seqs, p, *, batch_size=32, padding_side="right"):
            return [x + (by if padding_side == "left" and i == 3 else 0.0) for i, x in enumerate(exact)]
        return score

    monkeypatch.setattr(rewards, "score_ids", shifted(0.9 * tol))
    assert reward.check_padding_and_batch(model, probe, pad, 1e-2, dtype)[1] == pytest.approx(tol)
    monkeypatch.setattr(rewards, "score_ids", shifted(1.1 * tol))
    with pytest.raises(PosttrainError, match="scores change with left padding"):
        reward.check_padding_and_batch(model, probe, pad, 1e-2, dtype)


def test_bf16_reward_stage_passes_its_checks(tiny_dir, demo_data, sft_dir, tmp_path):
    """Issue 16 item 0: with model.dtype bfloat16 the reward stage stopped at its padding check
    (max |Δ| 1.6e-2 > 1e-4). It now trains, passes the padding and reload checks with a tolerance
    sized for bf16 (recorded), and its scores still rank the held-out pairs."""
    section = _reward_section(3e-3)
    raw = _raw(tiny_dir, demo_data, tmp_path, reward=section)
    raw["model"]["dtype"] = "bfloat16"
    out = reward.run(validate_dict(raw), base=str(sft_dir), output=str(tmp_path / "reward"))
    assert manifest.is_finished(out)
    m = manifest.read(out)
    assert m["config"]["model"]["dtype"] == "bfloat16"
    tol = m["checks"]["reload"]["tolerance"]
    assert 1e-4 < tol < 0.5 and m["checks"]["padding_and_batch"] == f"scores equal within {tol:.3g}"
    assert m["checks"]["reload"]["max_abs_diff"] <= tol
    assert m["metrics"]["accuracy"] >= 0.8, m["metrics"]


# ---------------------------------------------------------------------------------------------
# pair_metrics and pearson against numbers computed by hand


def test_pair_metrics_by_hand():
    chosen, rejected = [1.0, 0.5, 2.0, 0.0], [0.0, 0.5, 3.0, -1.0]
    got = reward.pair_metrics(chosen, rejected, [2, 2, 2, 2], [5, 5, 5, 5])
    # margins 1, 0 (a tie: wrong), -1, 1 → 2 of 4 right; mean margin 1/4
    assert got["pairs"] == 4 and got["accuracy"] == 0.5 and got["margin"] == 0.25
    assert got["score_chosen_mean"] == 0.875 and got["score_rejected_mean"] == 0.625
    # all 8 scores: mean 0.75, squared deviations sum to 11, population variance 11/8
    assert got["score_std"] == round(math.sqrt(11 / 8), 4)
    # lengths 2 (chosen) / 5 (rejected): deviations ∓1.5, Σ dx·dy = -1.5·0.5 + 1.5·(-0.5) = -1.5,
    # std of lengths 1.5 → r = -1.5 / (8 · √(11/8) · 1.5) = -1 / (8 √1.375)
    assert got["length_correlation"] == round(-1 / (8 * math.sqrt(1.375)), 4) == -0.1066

    # every pair tied: accuracy 0 (ties count as wrong); constant lengths: correlation 0.0
    tied = reward.pair_metrics([1.0, 2.0], [1.0, 2.0], [3, 3], [3, 3])
    assert tied["accuracy"] == 0.0 and tied["margin"] == 0.0 and tied["length_correlation"] == 0.0


def test_pearson_by_hand():
    assert reward.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert reward.pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # dx = dy-permuted (-1.5, -.5, .5, 1.5) / (-1.5, .5, -.5, 1.5): Σ = 4, n·sx·sy = 4 · 1.25 → 0.8
    assert reward.pearson([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    # a constant side has no linear relation to report
    assert reward.pearson([1.0, 1.0, 1.0], [1, 2, 3]) == 0.0
    assert reward.pearson([1, 2, 3], [5, 5, 5]) == 0.0


# ---------------------------------------------------------------------------------------------
# Bad input, refused before any weights load


class ModelLoaded(AssertionError):
    """Raised by patched loaders: proves a run got as far as loading weights."""


def _no_weights_loading(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise ModelLoaded("weights were loaded")

    monkeypatch.setattr("posttrain.models.load_sequence_classifier", refuse)
    monkeypatch.setattr("posttrain.models.load_causal_lm", refuse)


def test_reward_data_of_kind_sft_is_refused(tiny_dir, demo_data, tmp_path):
    with pytest.raises(PosttrainError, match=r"reward\.data 'sft' has kind 'sft', but reward needs kind 'preference'"):
        validate_dict(_raw(tiny_dir, demo_data, tmp_path, reward={"data": "sft"}))


def test_reward_data_naming_no_dataset_is_refused(tiny_dir, demo_data, sft_dir, tmp_path, monkeypatch):
    cfg = validate_dict(_raw(tiny_dir, demo_data, tmp_path, stages=[], reward={"data": "pairs"}))
    _no_weights_loading(monkeypatch)
    with pytest.raises(PosttrainError, match=r"reward\.data names dataset 'pairs'.*\(of kind preference\)"):
        reward.run(cfg, base=str(sft_dir), output=str(tmp_path / "reward"))
    assert not (tmp_path / "reward").exists()


def test_unfinished_base_is_refused(tiny_dir, demo_data, sft_dir, tmp_path, monkeypatch):
    """An SFT stage without posttrain.json (killed while training or saving) is no starting point."""
    base = tmp_path / "sft_unfinished"
    shutil.copytree(sft_dir, base)
    (base / manifest.MANIFEST).unlink()
    cfg = validate_dict(_raw(tiny_dir, demo_data, tmp_path, reward=_reward_section(3e-3)))
    _no_weights_loading(monkeypatch)
    with pytest.raises(PosttrainError, match=r"unfinished stage"):
        reward.run(cfg, base=str(base), output=str(tmp_path / "reward"))
    assert not (tmp_path / "reward").exists()


def test_finished_sft_base_passes_the_same_checks(tiny_dir, demo_data, sft_dir, tmp_path, monkeypatch):
    """Control for the refusals above: the same config from the finished SFT stage gets as far as
    loading the model."""
    cfg = validate_dict(_raw(tiny_dir, demo_data, tmp_path, reward=_reward_section(3e-3)))
    _no_weights_loading(monkeypatch)
    with pytest.raises(ModelLoaded):
        reward.run(cfg, base=str(sft_dir), output=str(tmp_path / "reward"))


def test_scores_need_a_pad_token_id(rm_full, tmp_path):
    """A saved reward model whose config has no pad_token_id would score padded batches at the
    wrong position: load_reward_model refuses it."""
    out, _ = rm_full
    broken = tmp_path / "no_pad"
    shutil.copytree(out, broken)
    config = json.loads((broken / "config.json").read_text())
    config["pad_token_id"] = None
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(PosttrainError, match=r"no pad_token_id"):
        rewards.load_reward_model(str(broken))
    assert isinstance(rewards.load_reward_model(str(out)).score.weight, torch.Tensor)


def test_qlora_reward_model_trains_saves_head_reloads_and_scores_qlora_ppo(tiny_dir, demo_data, tmp_path):
    """4-bit QLoRA reward model from the tiny base (on an SFT adapter: tests/stages/test_combinations.py): the head is
    in the adapter, the fresh-process reload gave the same scores, and it ranks better than chance."""
    section = _reward_section(2e-2, steps=20, method="qlora", lora=LORA)
    out, _ = _run_reward(tiny_dir, demo_data, tmp_path, tiny_dir, section)
    m = manifest.read(out)
    assert m["method"] == "qlora" and m["checks"]["reload"]["max_abs_diff"] <= 1e-4
    rewards.check_head_saved(out)
    assert m["metrics"]["accuracy"] > 0.5 and math.isfinite(m["metrics"]["margin"])
    # PPO with a QLoRA policy against it: the reward model is read in 4 bits, the value model
    # starts from it in full precision; two iterations run and the adapter is saved.
    from posttrain.stages import ppo

    cfg = validate_dict(_raw(tiny_dir, demo_data, tmp_path, reward=section, ppo={
        "method": "qlora", "lora": LORA, "reward_model": str(out), "allow_weak_reward_model": True, "steps": 2,
        "batch_size": 4, "mini_batch_size": 2, "max_new_tokens": 6, "learning_rate": 1e-3, "save_steps": 100}))
    policy = ppo.run(cfg, base=str(tiny_dir), output=str(tmp_path / "ppo"))
    m = manifest.read(policy)
    assert m["method"] == "qlora" and m["metrics"]["steps"] == 2
    assert m["reference"] == "the policy with its new LoRA adapter disabled"
    assert math.isfinite(m["metrics"]["score_last"]) and (policy / "adapter_model.safetensors").is_file()
