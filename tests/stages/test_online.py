"""GRPO and RLOO on a tiny random-init model with TRL's trainers.

Rewards from Python functions (an installed module and a file next to the config), from a reward
model, and a weighted mixture of both (the logged total is the weighted sum: the weights reached
TRL); full, LoRA and QLoRA policies train, save and reload. The KL at the first step is 0, so the
reference is the model the stage starts from: also when that is a LoRA adapter merged for full
training (TRL's own reload of the config path gets the pre-SFT base) or a LoRA adapter continued
under QLoRA (TRL casts only the trainable copy to bf16). Steps where every group scores alike are
not mistaken for broken gradients; sampling must stop at the end-of-turn token; resume continues.
Before any weights load: a weak reward model is refused unless allowed, one with another tokenizer
is refused, an unknown function is refused. A reward function that raises or returns the wrong
thing stops training with an error naming it. A completion cut at max_completion_length (no
end-of-turn token), which TRL renders with its turn closed and scores as finished, scores
missing_eot_penalty with every reward, as in PPO; one that ended scores as before.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file

from posttrain import manifest
from posttrain.config import load_config
from posttrain.errors import PosttrainError
from posttrain.stages import grpo, online, rloo

LORA = {"r": 8, "alpha": 16, "dropout": 0.0}
LENGTH_REWARD = '''
def length_reward(prompts, completions, **kwargs):
    """Longer answers score higher: random completions vary, so every group has a learning signal."""
    return [len(c[-1]["content"]) / 10 for c in completions]
'''


def _training(steps: int = 2, lr: float = 1e-2, **extra) -> dict:
    """Tiny and fast: 2 prompts x 4 completions of at most 8 tokens per step, a log every step."""
    return {"max_steps": steps, "per_device_train_batch_size": 8, "num_generations": 4, "max_completion_length": 8,
            "learning_rate": lr, "logging_steps": 1, "save_steps": 1000, "gradient_checkpointing": False, **extra}


def _logs(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _train_logs(out) -> list[dict]:
    return [r for r in _logs(out) if "reward" in r]


class ModelLoaded(AssertionError):
    """Raised by patched loaders: proves a run got as far as loading weights."""


def _no_weights_loading(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise ModelLoaded("weights were loaded")

    monkeypatch.setattr("posttrain.models.load_causal_lm", refuse)
    monkeypatch.setattr("posttrain.rl.rewards.load_reward_model", refuse)
    monkeypatch.setattr("transformers.AutoModelForSequenceClassification.from_pretrained", refuse)


def _tokenizer(tiny_dir):
    """The tokenizer as posttrain sets it up for the tiny model (chatml template, pad token)."""
    from posttrain import models
    from posttrain.config import validate_dict

    cfg = validate_dict({"model": {"name_or_path": str(tiny_dir)}, "stages": []})
    return models.load_tokenizer(cfg, need_masks=False)


def _reward_dir(root, tiny_dir, accuracy: float):
    """A reward model as the reward stage leaves it: a one-output sequence classifier made from the
    tiny causal LM (random score head), its tokenizer, and a manifest with held-out accuracy."""
    from transformers import AutoModelForSequenceClassification

    tok = _tokenizer(tiny_dir)
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(str(tiny_dir), num_labels=1)
    with torch.no_grad():
        rm.score.weight.normal_(0, 1.0)  # spread the scores so that completions differ
    rm.config.pad_token_id = tok.tokenizer.pad_token_id
    d = root / "reward"
    rm.save_pretrained(str(d))
    tok.tokenizer.save_pretrained(str(d))
    manifest.write(d, {"stage": "reward", "metrics": {"accuracy": accuracy, "held_out": True}})
    return d


@pytest.fixture(scope="module")
def reward_dir(tiny_dir, tmp_path_factory):
    return _reward_dir(tmp_path_factory.mktemp("rm"), tiny_dir, accuracy=0.9)


@pytest.fixture(scope="module")
def sft_adapter(tiny_dir, tmp_path_factory):
    """A LoRA adapter on the tiny model with non-zero weights, as a LoRA SFT stage leaves it (no manifest)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_dir)),
                           LoraConfig(r=8, lora_alpha=64, target_modules="all-linear", init_lora_weights=False))
    d = tmp_path_factory.mktemp("sft_adapter")
    model.save_pretrained(str(d))
    _tokenizer(tiny_dir).tokenizer.save_pretrained(str(d))
    return d


def _changed(start: dict, trained: dict) -> list[str]:
    assert trained.keys() == start.keys()
    return [k for k in start if not torch.equal(start[k], trained[k])]


def _assert_weighted_total(out, weights: dict[str, float]) -> None:
    """TRL's logged total reward is the weighted sum of each reward's mean: the weights reached it."""
    logs = _train_logs(out)
    assert logs
    for r in logs:
        means = {name: r[f"rewards/{name}/mean"] for name in weights}
        assert r["reward"] == pytest.approx(sum(weights[n] * means[n] for n in weights), rel=1e-4, abs=1e-5), r


# ---------------------------------------------------------------------------------------------
# Training


def test_grpo_with_reward_functions(tiny_dir, demo_data, tmp_path):
    """An installed function and one from a .py file next to the config file. missing_eot_penalty is off:
    the random policy's completions mostly run to the length limit, and the scores shown are the functions'."""
    from transformers import AutoModelForCausalLM

    (tmp_path / "my_rewards.py").write_text(LENGTH_REWARD)
    raw = {
        "model": {"name_or_path": str(tiny_dir)},
        "data": {"sft": {"kind": "sft", "train": [{"path": str(demo_data / "sft_train.jsonl"), "limit": 64}]}},
        "output_dir": str(tmp_path / "out"),
        "seed": 0,
        "stages": ["grpo"],
        "grpo": {"rewards": [{"function": "posttrain.demo:exact_reward"},
                             {"function": "my_rewards:length_reward", "weight": 0.5}],
                 "missing_eot_penalty": None, "training": _training(steps=3)},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_config(tmp_path / "config.yaml")
    out = grpo.run(cfg)

    assert out == tmp_path / "out" / "grpo"
    m = manifest.read(out)
    assert m["stage"] == "grpo" and m["method"] == "full" and m["beta"] == 0.0
    assert m["reference"].startswith("none")
    assert m["rewards"] == [
        {"name": "exact_reward", "function": "posttrain.demo:exact_reward", "weight": 1.0},
        {"name": "length_reward", "function": "my_rewards:length_reward", "weight": 0.5},
    ]
    assert m["parent"]["path"] == str(tiny_dir)
    metrics = m["metrics"]
    assert metrics["steps"] == 3 and metrics["kl_last"] is None
    assert set(metrics["reward_means"]) == {"exact_reward", "length_reward"}
    assert metrics["reward_means"]["length_reward"]["first"] > 0, "the function from the file scored"
    for k in ("score_first", "score_last", "train_runtime_s", "wall_time_s", "peak_memory_mb"):
        assert isinstance(metrics[k], float) and math.isfinite(metrics[k]), k
    logs = _train_logs(out)
    assert [r["step"] for r in logs] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in logs)
    assert metrics["score_first"] == logs[0]["reward"] and metrics["score_last"] == logs[-1]["reward"]
    _assert_weighted_total(out, {"exact_reward": 1.0, "length_reward": 0.5})

    changed = _changed(load_file(str(tiny_dir / "model.safetensors")), load_file(str(out / "model.safetensors")))
    assert len(changed) > 10, changed
    reloaded = AutoModelForCausalLM.from_pretrained(str(out))
    assert reloaded.config.vocab_size == m["special_tokens"]["vocab_size"]
    assert (out / "config.resolved.yaml").is_file()


@pytest.mark.parametrize("stage", ["grpo", "rloo"])
def test_reward_model_full_from_merged_adapter(stage, make_config, reward_dir, sft_adapter, tiny_dir, tmp_path):
    """A reward model scores; beta > 0; the start is a LoRA adapter merged for full training, so the
    reference must be that merged model (TRL would reload the pre-SFT base from the config path):
    the KL at the first step is 0."""
    training = _training(steps=2, beta=0.1)
    cfg = make_config(**{f"{stage}__rewards": [{"model": str(reward_dir)}], f"{stage}__training": training,
                         f"{stage}__missing_eot_penalty": None})  # the random policy's completions get cut
    out = {"grpo": grpo, "rloo": rloo}[stage].run(cfg, base=str(sft_adapter), output=str(tmp_path / stage))

    m = manifest.read(out)
    assert m["stage"] == stage and m["reference"] == "frozen copy of the starting model"
    assert m["rewards"] == [{"name": "reward", "model": str(reward_dir), "hash": manifest.directory_hash(reward_dir),
                             "accuracy": 0.9, "weight": 1.0}]
    assert m["adapter_base"] is None and m["parent"]["path"] == str(sft_adapter)
    logs = _train_logs(out)
    assert len(logs) == 2 and all(math.isfinite(r["loss"]) for r in logs)
    assert logs[0]["rewards/reward/std"] > 0, "the reward model gives different completions different scores"
    assert abs(logs[0]["kl"]) < 1e-5, f"at step 1 the policy is the reference: kl {logs[0]['kl']}"
    assert m["metrics"]["kl_last"] == logs[-1]["kl"]
    # trained from the merged adapter, not from the bare base
    base = load_file(str(tiny_dir / "model.safetensors"))
    trained = load_file(str(out / "model.safetensors"))
    assert len(_changed(base, trained)) > 10


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_grpo_lora_with_weighted_model_and_function(method, make_config, reward_dir, sft_adapter, tiny_dir, tmp_path):
    """A reward model and a function, weighted. LoRA: a new adapter on the base; QLoRA: the start is
    a LoRA adapter, trained further. Either way the reference is a frozen copy of the starting
    adapter (for QLoRA also after TRL casts the trainable copy to bf16): the KL at step 1 is 0."""
    rewards = [{"model": str(reward_dir), "weight": 2.0}, {"function": "posttrain.demo:concise_reward", "weight": 0.5}]
    cfg = make_config(grpo__method=method, grpo__lora=LORA, grpo__rewards=rewards,
                      grpo__training=_training(steps=2, lr=5e-2, beta=0.1))
    start = tiny_dir if method == "lora" else sft_adapter
    out = grpo.run(cfg, base=str(start), output=str(tmp_path / "grpo"))

    m = manifest.read(out)
    assert m["method"] == method
    assert m["reference"] == ("frozen copy of the new, zero-initialised adapter (= the starting model)"
                              if method == "lora" else "frozen copy of the starting adapter")
    assert m["adapter_base"] == str(tiny_dir)
    assert [(r["name"], r["weight"]) for r in m["rewards"]] == [("reward", 2.0), ("concise_reward", 0.5)]
    _assert_weighted_total(out, {"reward": 2.0, "concise_reward": 0.5})
    assert abs(_train_logs(out)[0]["kl"]) < 1e-7, "the reference adapter is the starting one"

    assert not (out / "model.safetensors").exists()
    assert not (out / "ref").exists(), "TRL's reference adapter copy is not an output"
    adapter = load_file(str(out / "adapter_model.safetensors"))
    lora_b = {k: v for k, v in adapter.items() if "lora_B" in k}
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b.values())
    if method == "qlora":  # the starting adapter moved (it was continued, not replaced)
        before = load_file(str(sft_adapter / "adapter_model.safetensors"))
        assert before.keys() == adapter.keys()
        assert any(not torch.equal(before[k].to(v.dtype), v) for k, v in lora_b.items())
    assert 0 < m["trainable_parameters"] < m["total_parameters"]


def test_groups_that_all_score_alike_are_not_a_stuck_run(make_config, tiny_dir, tmp_path):
    """A random policy never gets a sum right: every group scores 0, all advantages are 0 and nothing
    moves. That is no learning signal, not broken gradients: the run finishes (and says so)."""
    cfg = make_config(grpo__rewards=[{"function": "posttrain.demo:exact_reward"}], grpo__training=_training(),
                      grpo__missing_eot_penalty=None)  # else a group whose completions end differently differs
    out = grpo.run(cfg, base=str(tiny_dir), output=str(tmp_path / "grpo"))
    metrics = manifest.read(out)["metrics"]
    assert metrics["steps"] == 2 and metrics["score_last"] == 0.0 and metrics["frac_reward_zero_std_last"] == 1.0


def test_sampling_must_stop_at_end_of_turn(make_config, tiny_dir, tmp_path):
    tok = _tokenizer(tiny_dir).tokenizer
    training = _training(generation_kwargs={"eos_token_id": tok.eos_token_id})
    cfg = make_config(grpo__rewards=[{"function": "posttrain.demo:exact_reward"}], grpo__training=training)
    with pytest.raises(PosttrainError, match=r"sampling would not stop at the end-of-turn token.*generation_kwargs"):
        grpo.run(cfg, base=str(tiny_dir), output=str(tmp_path / "grpo"))
    assert not manifest.is_finished(tmp_path / "grpo")


def test_resume_continues(make_config, reward_dir, tiny_dir, tmp_path):
    cfg = make_config(rloo__rewards=[{"model": str(reward_dir)}],
                      rloo__training=_training(steps=4, save_steps=2, save_total_limit=5))
    out = rloo.run(cfg, base=str(tiny_dir), output=str(tmp_path / "rloo"))
    full = {r["step"]: r for r in _train_logs(out)}
    assert sorted(full) == [1, 2, 3, 4]

    # interrupted after step 2, as a killed run leaves it
    shutil.rmtree(out / "checkpoints" / "checkpoint-4")
    (out / manifest.MANIFEST).unlink()
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("".join(x + "\n" for x in lines if json.loads(x)["step"] <= 2))

    rloo.run(cfg, base=str(tiny_dir), output=str(out), resume=True)
    m = manifest.read(out)
    assert m["resumed_from"].endswith("checkpoint-2") and m["metrics"]["steps"] == 4
    resumed = {r["step"]: r for r in _train_logs(out)}
    assert sorted(resumed) == [1, 2, 3, 4], "the resumed run continues at step 3"
    for step in (3, 4):
        assert resumed[step]["reward"] == pytest.approx(full[step]["reward"], rel=1e-4), step


# ---------------------------------------------------------------------------------------------
# Refused before any weights load


@pytest.mark.parametrize("allow", [False, True])
def test_weak_reward_model_gate(allow, make_config, tiny_dir, tmp_path, monkeypatch):
    weak = _reward_dir(tmp_path, tiny_dir, accuracy=0.55)
    cfg = make_config(grpo__rewards=[{"model": str(weak)}], grpo__allow_weak_reward_model=allow,
                      grpo__training=_training())
    _no_weights_loading(monkeypatch)
    out = tmp_path / "grpo"
    if allow:
        with pytest.raises(ModelLoaded):
            grpo.run(cfg, base=str(tiny_dir), output=str(out))
    else:
        with pytest.raises(PosttrainError, match=r"accuracy 0\.550, under grpo\.min_reward_accuracy 0\.7") as e:
            grpo.run(cfg, base=str(tiny_dir), output=str(out))
        assert "allow_weak_reward_model" in str(e.value) and "\n" not in str(e.value)
        assert not out.exists()


def test_reward_model_with_another_tokenizer(make_config, reward_dir, tiny_dir, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    other = tmp_path / "other_rm"
    shutil.copytree(reward_dir, other)
    tok = AutoTokenizer.from_pretrained(str(other))
    tok.pad_token = "<|im_start|>"  # pads with another token
    tok.save_pretrained(str(other))
    cfg = make_config(rloo__rewards=[{"model": str(other)}], rloo__training=_training())
    _no_weights_loading(monkeypatch)
    with pytest.raises(PosttrainError, match=r"do not share a tokenizer: .*pad_token differs \(2 vs 1\)"):
        rloo.run(cfg, base=str(tiny_dir), output=str(tmp_path / "rloo"))
    assert not (tmp_path / "rloo").exists()


def test_unknown_reward_function(make_config, tiny_dir, tmp_path, monkeypatch):
    cfg = make_config(grpo__rewards=[{"function": "posttrain.demo:no_such_reward"}], grpo__training=_training())
    _no_weights_loading(monkeypatch)
    with pytest.raises(PosttrainError, match=r"has no function 'no_such_reward'"):
        grpo.run(cfg, base=str(tiny_dir), output=str(tmp_path / "grpo"))


# ---------------------------------------------------------------------------------------------
# Reward functions that misbehave


def test_reward_function_that_raises_stops_training(make_config, tiny_dir, tmp_path):
    (tmp_path / "bad_rewards.py").write_text("def broken(prompts, completions, **kw):\n    return 1 / 0\n")
    cfg = make_config(grpo__rewards=[{"function": "bad_rewards:broken"}], grpo__training=_training())
    cfg._source_dir = str(tmp_path)
    out = tmp_path / "grpo"
    with pytest.raises(PosttrainError, match=r"reward function 'bad_rewards:broken' raised ZeroDivisionError") as e:
        grpo.run(cfg, base=str(tiny_dir), output=str(out))
    assert "\n" not in str(e.value)
    assert not manifest.is_finished(out)


def _prompts(n: int) -> dict:
    return {"prompts": [[{"role": "user", "content": "What is 1 + 2?"}]] * n,
            "completions": [[{"role": "assistant", "content": "1 + 2 = 3"}]] * n,
            "completion_ids": [[1]] * n, "reference": ["1 + 2 = 3"] * n, "trainer_state": None}


@pytest.mark.parametrize(("returns", "message"), [
    ("[1.0]", r"returned 1 scores for 3 completions"),
    ("1.0", r"returned float, not a list of 3 numbers"),
    ("['good', 1.0, 1.0]", r"returned 'good' \(str\) for completion 0, not a finite number"),
    ("[1.0, float('nan'), 1.0]", r"returned nan \(float\) for completion 1"),
])
def test_reward_function_wrong_answer(returns, message):
    namespace: dict = {}
    exec(f"def f(prompts, completions, **kw):\n    return {returns}\n", namespace)  # noqa: S102
    wrapped = online.wrap_function(namespace["f"], "mine:f", "f", "grpo")
    with pytest.raises(PosttrainError, match=rf"grpo: reward function 'mine:f' {message}"):
        wrapped(**_prompts(3))


def test_reward_function_wrapper_passes_what_it_accepts():
    """Only the keywords a function names reach it (unless it takes **kwargs); None abstains;
    numpy-like answers and ints are accepted; TRL logs it under its own name."""
    seen = {}

    def narrow(prompts, completions, reference):
        seen["narrow"] = reference
        return torch.tensor([1, 0, 1])

    def wide(completions, **kwargs):
        seen["wide"] = sorted(kwargs)
        return [None, 2, 0.5]

    args = _prompts(3)
    assert online.wrap_function(narrow, "m:narrow", "narrow", "rloo")(**args) == [1.0, 0.0, 1.0]
    assert seen["narrow"] == args["reference"]
    wrapped = online.wrap_function(wide, "m:wide", "wide_2", "rloo")
    assert wrapped(**args) == [None, 2.0, 0.5]
    assert seen["wide"] == ["completion_ids", "prompts", "reference", "trainer_state"]
    assert wrapped.__name__ == "wide_2"


def test_reward_model_reads_what_it_was_trained_on(reward_dir):
    """What the RL trainers feed a reward model (the conversation rendered to text with its template,
    tokenized without special tokens: GRPOTrainer/RLOOTrainer._calculate_rewards) is token for token
    what TRL's RewardTrainer trained it on (apply_chat_template(tokenize=True): data_utils._tokenize)."""
    from transformers import AutoTokenizer
    from trl.data_utils import _tokenize, apply_chat_template

    tok = AutoTokenizer.from_pretrained(str(reward_dir))
    conversation = [{"role": "user", "content": "What is 12 + 34?"}, {"role": "assistant", "content": "12 + 34 = 46"}]
    text = apply_chat_template({"messages": conversation}, tok)["text"]
    scored = tok(text=[text], add_special_tokens=False, padding=True, padding_side="right")["input_ids"][0]
    trained = _tokenize(tok, conversation)["input_ids"]
    assert scored == trained
    assert tok.convert_ids_to_tokens(scored)[-2:] == ["<|im_end|>", "Ċ"]


# ---------------------------------------------------------------------------------------------
# Completions cut at max_completion_length

PROBE_REWARD = """
import json

def ended(prompts, completions, completion_ids, **kwargs):
    \"\"\"1.0 for every completion; records which completions emitted the end-of-turn token.\"\"\"
    with open({log!r}, "a") as f:
        f.write(json.dumps([{eot} in ids for ids in completion_ids]) + "\\n")
    return [1.0] * len(completions)
"""


def test_trl_renders_a_cut_completion_as_finished(reward_dir):
    """The bug's mechanism: TRL decodes a completion (special tokens dropped) and renders prompt +
    completion with the reward model's template, which closes the turn. A completion cut before its
    end-of-turn token and one that emitted it are the same text to the reward model."""
    from transformers import AutoTokenizer
    from trl.data_utils import apply_chat_template

    tok = AutoTokenizer.from_pretrained(str(reward_dir))
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    words = tok("12 + 34 = 46", add_special_tokens=False)["input_ids"]
    prompt = [{"role": "user", "content": "What is 12 + 34?"}]
    cut, ended = words[:-1], words[:-1] + [eot]

    def rendered(ids):  # GRPOTrainer._generate + _calculate_rewards, for a conversational prompt
        completion = [{"role": "assistant", "content": tok.decode(ids, skip_special_tokens=True)}]
        return apply_chat_template({"messages": prompt + completion}, tok)["text"]

    assert rendered(cut) == rendered(ended)
    assert rendered(cut).endswith("<|im_end|>\n"), "the cut completion's turn is closed by the template"
    assert not online.ended_flags([cut], eot)[0] and online.ended_flags([ended], eot)[0]


@pytest.mark.parametrize("stage", ["grpo", "rloo"])
def test_cut_completions_score_the_missing_eot_penalty(stage, make_config, reward_dir, tiny_dir, tmp_path, monkeypatch):
    """A reward model and a function that gives every completion 1.0; the end-of-turn token is made
    likely, so a step has completions that ended and completions cut at 8 tokens. Every reward gives
    the cut ones the penalty (before the fix: the reward model's score of the closed turn, and
    1.0), the ones that ended keep their scores exactly, and TRL logs the penalised scores."""
    eot = _tokenizer(tiny_dir).eot_id
    log = tmp_path / "ended.jsonl"
    (tmp_path / "probe.py").write_text(PROBE_REWARD.format(log=str(log), eot=eot))
    seen = []
    penalize = online.missing_eot_scores

    def recording(scores, ended, penalty):
        out = penalize(scores, ended, penalty)
        seen.append((scores.clone(), ended.clone(), out.clone()))
        return out

    monkeypatch.setattr(online, "missing_eot_scores", recording)
    training = _training(steps=2, generation_kwargs={"sequence_bias": [[[eot], 4.0]]})
    cfg = make_config(**{f"{stage}__rewards": [{"model": str(reward_dir)}, {"function": "probe:ended", "weight": 0.5}],
                         f"{stage}__missing_eot_penalty": -3.0, f"{stage}__training": training})
    cfg._source_dir = str(tmp_path)
    out = {"grpo": grpo, "rloo": rloo}[stage].run(cfg, base=str(tiny_dir), output=str(tmp_path / stage))

    flags = [json.loads(line) for line in log.read_text().splitlines()]  # one scoring per step
    ended = torch.tensor(sum(flags, []))
    assert ended.any() and not ended.all(), f"need both kinds of completion: {ended.tolist()}"
    logs = _train_logs(out)
    assert len(logs) == len(flags) == 2
    for step, f in zip(logs, flags, strict=True):  # before the fix: 1.0, a cut completion scored as finished
        assert step["rewards/ended/mean"] == pytest.approx(sum(1.0 if e else -3.0 for e in f) / len(f), abs=1e-6)

    assert len(seen) == 2, "each step's scores went through the penalty"
    before, after = torch.cat([s for s, _, _ in seen]), torch.cat([o for _, _, o in seen])
    assert torch.equal(torch.cat([e for _, e, _ in seen]), ended), "ended = end-of-turn among the completion ids"
    assert torch.equal(after[ended], before[ended]), "completions that ended are scored exactly as before"
    assert (after[~ended] == -3.0).all() and (before[~ended, 1] == 1.0).all()
    for step, (_, _, o) in zip(logs, seen, strict=True):  # what TRL logs (and computes advantages from)
        assert step["rewards/reward/mean"] == pytest.approx(o[:, 0].mean().item(), abs=1e-5)
        assert step["reward"] == pytest.approx((o[:, 0] + 0.5 * o[:, 1]).mean().item(), abs=1e-5)


def test_missing_eot_penalty_off_and_default():
    """null keeps TRL's trainer (and its scores); the default is PPO's; an abstention stays one."""
    from trl import RLOOTrainer

    from posttrain.config import validate_dict

    assert online.penalizing_missing_eot(RLOOTrainer, 5, None) is RLOOTrainer
    sub = online.penalizing_missing_eot(RLOOTrainer, 5, -1.0)
    assert issubclass(sub, RLOOTrainer) and sub.__name__ == "RLOOTrainer"
    cfg = validate_dict({"model": {"name_or_path": "x"}, "stages": []})
    assert cfg.grpo.missing_eot_penalty == cfg.rloo.missing_eot_penalty == cfg.ppo.missing_eot_penalty == -1.0
    scores = torch.tensor([[0.25, float("nan")], [0.5, 2.0], [float("nan"), float("nan")]])
    got = online.missing_eot_scores(scores, online.ended_flags([[3, 5], [3, 4], [4]], 5), -1.0)
    assert torch.equal(got[0, :1], scores[0, :1]) and got[0, 1].isnan()
    assert got[1].tolist() == [-1.0, -1.0] and got[2].isnan().all()
