"""Every pair of adjacent stages, with every method on each side, on the tiny demo model.

`posttrain validate` promises that a config it accepts runs. Here each stage runs from the output
of the stage before it, with the config that names both stages and their methods (so the
combination passes validation first): sft {full, lora, qlora} → reward {full, lora, qlora},
sft → ppo (scored by those reward models, every reward method against every ppo method), sft →
dpo, ppo → dpo, dpo → merge, and sft → rloo / grpo (scored by a full, a LoRA and a QLoRA reward
model). A few steps each, with the outputs shared through one module-scoped cache. Each run must
finish (posttrain.json), log a finite loss, change what it trains, and reload.

A LoRA or QLoRA reward model on a LoRA/QLoRA SFT continues the SFT adapter (with the score head
added), so what it saves sits on the base model the manifest names and reloads to the same scores
(it used to be a new adapter on the SFT adapter merged in memory, saved as sitting on the bare
base). The reload check still refuses a saved reward model that reloads onto another model
(negative control).

The combinations that cannot work are refused by validation, before any weights load, with one
line that says what and how to fix it (exit code 2 from `posttrain validate`).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from posttrain import manifest
from posttrain.config import validate_dict
from posttrain.errors import PosttrainError
from tests.conftest import read_losses
from tests.helpers import online_training, sft_and_style_data, trl_training

pytestmark = pytest.mark.usefixtures("one_thread")

METHODS = ("full", "lora", "qlora")
LORA = {"r": 8, "alpha": 16, "dropout": 0.0}
STEPS = 2


def _trl_training(lr: float, **extra) -> dict:
    return trl_training(STEPS, lr, **extra)


def _online_training(**extra) -> dict:
    return online_training(STEPS, **extra)


def _raw(tiny_dir, demo_data, root, stages: list[str], methods: dict[str, str], **sections) -> dict:
    """A config naming `stages` in order, each training stage with its method; small data."""
    raw = {
        "model": {"name_or_path": str(tiny_dir)},
        "data": sft_and_style_data(demo_data, 48, 16, pairs="preference"),
        "stages": stages,
        "output_dir": str(root),
        "seed": 0,
        "sft": {"training": _trl_training(3e-3)},
        "reward": {"training": _trl_training(1e-2)},
        "dpo": {"training": _trl_training(1e-2, beta=0.1)},
        "ppo": {"steps": STEPS, "batch_size": 4, "mini_batch_size": 2, "max_new_tokens": 6, "learning_rate": 1e-3,
                "save_steps": 100, "allow_weak_reward_model": True},
        # completions of 6 tokens rarely end: scored as they are (the missing-end-of-turn penalty would
        # give every one the same score, and nothing would train)
        "rloo": {"training": _online_training(), "allow_weak_reward_model": True, "missing_eot_penalty": None},
        "grpo": {"training": _online_training(), "allow_weak_reward_model": True, "missing_eot_penalty": None},
        "merge": {},
    }
    for stage, method in methods.items():
        raw[stage].update(method=method, lora=LORA)
    for stage, extra in sections.items():
        raw[stage].update(extra)
    return raw


class Outputs:
    """Stage outputs by what made them, run on first use: ("sft", m), ("reward", sft_m, m),
    ("ppo", sft_m, m, reward_m), ("dpo", parent key, m), ("merge", dpo key), (rloo|grpo, sft_m, m,
    reward_m). Each run first validates the config that names its chain and methods."""

    def __init__(self, tiny_dir, demo_data, root: Path):
        self.tiny_dir, self.demo_data, self.root, self.done = tiny_dir, demo_data, root, {}

    def config(self, stages: list[str], methods: dict[str, str], **sections):
        return validate_dict(_raw(self.tiny_dir, self.demo_data, self.root, stages, methods, **sections))

    def get(self, *key) -> Path:
        if key not in self.done:
            self.done[key] = self._run(key)
        return self.done[key]

    def _out(self, key) -> str:
        flat = lambda k: "_".join(map(flat, k)) if isinstance(k, tuple) else str(k)  # noqa: E731
        return str(self.root / "-".join(map(flat, key)))

    def _run(self, key) -> Path:
        from posttrain.stages import dpo, grpo, merge, ppo, reward, rloo, sft

        stage = key[0]
        if stage == "sft":
            cfg = self.config(["sft"], {"sft": key[1]})
            return sft.run(cfg, output=self._out(key))
        if stage == "reward":
            _, sft_m, m = key
            cfg = self.config(["sft", "reward"], {"sft": sft_m, "reward": m})
            return reward.run(cfg, base=str(self.get("sft", sft_m)), output=self._out(key))
        if stage == "ppo":
            _, sft_m, m, rm_m = key
            cfg = self.config(["sft", "reward", "ppo"], {"sft": sft_m, "reward": rm_m, "ppo": m},
                              ppo={"reward_model": str(self.get("reward", sft_m, rm_m))})
            return ppo.run(cfg, base=str(self.get("sft", sft_m)), output=self._out(key))
        if stage == "dpo":
            _, parent, m = key
            if parent[0] == "ppo":
                _, sft_m, ppo_m, rm_m = parent
                methods = {"sft": sft_m, "reward": rm_m, "ppo": ppo_m, "dpo": m}
                cfg = self.config(["sft", "reward", "ppo", "dpo"], methods,
                                  ppo={"reward_model": str(self.get("reward", sft_m, rm_m))})
            else:
                cfg = self.config(["sft", "dpo"], {"sft": parent[1], "dpo": m})
            return dpo.run(cfg, base=str(self.get(*parent)), output=self._out(key))
        if stage == "merge":
            _, parent = key  # ("dpo", ("sft", sft_m), dpo_m)
            cfg = self.config(["sft", "dpo", "merge"], {"sft": parent[1][1], "dpo": parent[2]},
                              merge={"probe_prompts": ["What is 12 + 34?"], "max_new_tokens": 4})
            return merge.run(cfg, base=str(self.get(*parent)), output=self._out(key))
        if stage in ("rloo", "grpo"):
            _, sft_m, m, rm_m = key
            rm = str(self.get("reward", sft_m, rm_m))
            cfg = self.config(["sft", "reward", stage], {"sft": sft_m, "reward": rm_m, stage: m},
                              **{stage: {"rewards": [{"model": rm}]}})
            run = rloo.run if stage == "rloo" else grpo.run
            return run(cfg, base=str(self.get("sft", sft_m)), output=self._out(key))
        raise AssertionError(key)


@pytest.fixture(scope="module")
def outputs(tiny_dir, demo_data, tmp_path_factory):
    return Outputs(tiny_dir, demo_data, tmp_path_factory.mktemp("combinations"))


# ---------------------------------------------------------------------------------------------
# What every finished stage must show


def _finished(out: Path, stage: str, method: str) -> dict:
    m = manifest.read(out)
    assert m is not None and m["stage"] == stage and m["method"] == method, (out, m and m.get("method"))
    return m


def _finite_losses(out: Path, key: str = "loss") -> list[float]:
    if key == "loss":
        losses = list(read_losses(out).values())
    else:
        losses = [r[key] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if key in r]
    assert losses and all(math.isfinite(v) for v in losses), (out, key, losses)
    return losses


def _weights(d: Path) -> dict[str, torch.Tensor]:
    name = "adapter_model.safetensors" if (d / "adapter_model.safetensors").is_file() else "model.safetensors"
    return load_file(str(d / name))


def _adapter_trained(out: Path, parent: Path) -> None:
    """A LoRA/QLoRA output: an adapter (no full weights) whose LoRA weights moved from where they
    started: the parent's adapter when it continued one, else zero-initialised lora_B."""
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
    mine = {k: v.float() for k, v in _weights(out).items() if "lora_" in k}
    assert mine, "no LoRA weights saved"
    if (parent / "adapter_model.safetensors").is_file():
        before = {k: v.float() for k, v in _weights(parent).items() if "lora_" in k}
        assert set(before) <= set(mine), "the parent's adapter was not continued"
        assert any(not torch.equal(before[k], mine[k]) for k in before), "the continued adapter did not move"
    else:
        assert any(v.abs().sum() > 0 for k, v in mine.items() if "lora_B" in k), "lora_B is still zero"


def _full_trained(out: Path, parent: Path, tiny_dir: Path) -> None:
    """A full output: standalone weights that differ from the full weights it started from."""
    assert (out / "model.safetensors").is_file() and not (out / "adapter_model.safetensors").exists()
    start = parent if (parent / "model.safetensors").is_file() else tiny_dir
    before, after = _weights(start), _weights(out)
    shared = [k for k in after if k in before and before[k].shape == after[k].shape]
    assert len(shared) > 5
    assert any(not torch.equal(before[k], after[k]) for k in shared)


def _trained(out: Path, parent: Path, method: str, tiny_dir: Path) -> None:
    if method == "full":
        _full_trained(out, parent, tiny_dir)
    else:
        _adapter_trained(out, parent)


def _probe_ids(tiny_dir) -> torch.Tensor:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_dir))
    return torch.tensor([tok("What is 12 + 34? 12 + 34 = 46")["input_ids"]])


def _reloaded_logits(cfg, d: Path, tiny_dir) -> torch.Tensor:
    """The saved policy reloaded as a later stage loads it (an adapter merged into its base)."""
    from posttrain import models

    tok = models.load_tokenizer(cfg, str(d), need_masks=False)
    model = models.load_causal_lm(cfg, str(d), "full", cfg.sft.lora, tok).eval()
    with torch.no_grad():
        logits = model(_probe_ids(tiny_dir)).logits
    assert torch.isfinite(logits).all()
    return logits


def _reloads_changed(outputs: Outputs, out: Path, parent: Path) -> None:
    cfg = outputs.config(["sft"], {})
    diff = (_reloaded_logits(cfg, out, outputs.tiny_dir) - _reloaded_logits(cfg, parent, outputs.tiny_dir)).abs()
    assert diff.max() > 1e-6, "the reloaded output gives the parent's logits"


# ---------------------------------------------------------------------------------------------
# sft → reward


@pytest.mark.parametrize("rm_m", METHODS)
@pytest.mark.parametrize("sft_m", METHODS)
def test_reward_after_sft(outputs, sft_m, rm_m):
    from posttrain.rl import rewards

    parent = outputs.get("sft", sft_m)
    _finished(parent, "sft", sft_m)
    _finite_losses(parent)
    out = outputs.get("reward", sft_m, rm_m)
    m = _finished(out, "reward", rm_m)
    _finite_losses(out)
    assert m["checks"]["reload"]["max_abs_diff"] <= 1e-4
    assert m["parent"]["path"] == str(parent)
    if rm_m == "full":
        _full_trained(out, parent, outputs.tiny_dir)
        assert m["adapter_base"] is None
    else:
        _adapter_trained(out, parent)
        rewards.check_head_saved(out)
        # the adapter sits on a full model: the SFT output itself, or the base under the SFT adapter
        assert m["adapter_base"] == (str(outputs.tiny_dir) if sft_m != "full" else str(parent))
    scores = rewards.score_ids(rewards.load_reward_model(str(out)), _probe_ids(outputs.tiny_dir).tolist(), 0)
    assert all(math.isfinite(s) for s in scores)


@pytest.mark.parametrize("damage", ["other_base", "lora_zeroed"])
def test_reward_reload_check_catches_a_mismatch(outputs, tmp_path, damage):
    """Negative control for the reload check of a LoRA reward model on a LoRA SFT. The bug it had:
    the reward adapter was trained on base + SFT merged in memory and saved as sitting on the bare
    base. Two copies of the saved reward model that reload onto something other than what was
    trained: its manifest naming another model as the adapter's base (the full SFT output), or its
    LoRA weights zeroed (the score head kept: the head on the bare base). Each loads, and the
    fresh-process reload check refuses its scores; the intact reward model passed the same check."""
    from posttrain.rl import rewards
    from posttrain.stages import reward

    out = outputs.get("reward", "lora", "lora")
    probe = _probe_ids(outputs.tiny_dir).tolist()
    pad = manifest.read(out)["special_tokens"]["pad"]
    trained = rewards.score_ids(rewards.load_reward_model(str(out)), probe, pad)
    assert manifest.read(out)["checks"]["reload"]["max_abs_diff"] <= 1e-4  # the same check passed on it

    broken = tmp_path / damage
    shutil.copytree(out, broken)
    if damage == "other_base":
        m = manifest.read(broken)
        m["adapter_base"] = str(outputs.get("sft", "full"))
        (broken / manifest.MANIFEST).write_text(json.dumps(m))
    else:
        tensors = load_file(str(broken / "adapter_model.safetensors"))
        tensors = {k: torch.zeros_like(v) if "lora_B" in k else v for k, v in tensors.items()}
        save_file(tensors, str(broken / "adapter_model.safetensors"), metadata={"format": "pt"})
    rewards.check_head_saved(broken)  # the head is there: only the scores tell
    with pytest.raises(PosttrainError, match=r"reloads with other scores"):
        reward.check_reload(broken, probe, pad, trained, 1e-4)


def test_lora_reward_model_reloads_with_the_pad_it_trained_with(outputs, tmp_path, monkeypatch):
    """A LoRA reward adapter reloads onto its base's config.json, and real models' configs often
    name eos as the pad (SmolLM2: pad_token_id 2, <|im_end|>), which posttrain refuses to pad with
    (it trains with another pad). The same saved reward model on a copy of the tiny base whose
    config names <|im_end|> as the pad scores right-padded batches as trained: the pad id comes
    from the tokenizer saved with the adapter. Control: with the base's pad, the scores differ."""
    from transformers import AutoTokenizer

    from posttrain.rl import rewards

    out = outputs.get("reward", "lora", "lora")
    tok = AutoTokenizer.from_pretrained(str(out))
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.pad_token_id not in (None, eot)
    base = tmp_path / "base"
    shutil.copytree(outputs.tiny_dir, base)
    config = json.loads((base / "config.json").read_text())
    config["pad_token_id"] = eot
    (base / "config.json").write_text(json.dumps(config))
    moved = tmp_path / "reward"
    shutil.copytree(out, moved)
    m = manifest.read(moved)
    m["adapter_base"] = str(base)
    (moved / manifest.MANIFEST).write_text(json.dumps(m))

    probe = [tok(tok.apply_chat_template([{"role": "user", "content": f"What is {q}?"},
                                          {"role": "assistant", "content": a}], tokenize=False),
                 add_special_tokens=False)["input_ids"]
             for q, a in (("1 + 2", "3"), ("12 + 34", "Well, I think the answer is 46."))]
    assert len(probe[0]) < len(probe[1]) and all(eot in p for p in probe)
    trained = rewards.score_ids(rewards.load_reward_model(str(out)), probe, tok.pad_token_id)
    moved_scores = rewards.score_ids(rewards.load_reward_model(str(moved)), probe, tok.pad_token_id)
    assert max(abs(a - b) for a, b in zip(trained, moved_scores, strict=True)) <= 1e-5

    monkeypatch.setattr(rewards, "_as_trained", lambda model, path: None)
    with_base_pad = rewards.score_ids(rewards.load_reward_model(str(moved)), probe, tok.pad_token_id)
    assert max(abs(a - b) for a, b in zip(trained, with_base_pad, strict=True)) > 1e-3


# ---------------------------------------------------------------------------------------------
# sft → ppo (scored by a reward model of every method), ppo → dpo, sft → dpo, dpo → merge


def _latin(a: str, b: str) -> str:
    """A third method such that over all (a, b) each (a, third) and (b, third) pair occurs once."""
    return METHODS[(METHODS.index(a) + METHODS.index(b)) % 3]


@pytest.mark.parametrize("ppo_m", METHODS)
@pytest.mark.parametrize("sft_m", METHODS)
def test_ppo_after_sft(outputs, sft_m, ppo_m):
    rm_m = _latin(sft_m, ppo_m)
    parent = outputs.get("sft", sft_m)
    out = outputs.get("ppo", sft_m, ppo_m, rm_m)
    m = _finished(out, "ppo", ppo_m)
    assert m["reward_model"]["path"] == str(outputs.get("reward", sft_m, rm_m))
    if sft_m != "full" and ppo_m != "full":  # the reference is the starting adapter on the policy's own base
        assert m["reference"] == "frozen copy of the starting (SFT) adapter on the policy's base"
    assert m["metrics"]["steps"] == STEPS and math.isfinite(m["metrics"]["score_last"])
    _finite_losses(out, "policy_loss")
    _finite_losses(out, "value_loss")
    _trained(out, parent, ppo_m, outputs.tiny_dir)
    _reloads_changed(outputs, out, parent)


def _check_dpo(outputs, out: Path, parent: Path, method: str) -> None:
    m = _finished(out, "dpo", method)
    assert m["metrics"]["steps"] == STEPS and m["metrics"]["step0"] is not None  # the step-0 check ran
    _finite_losses(out)
    _trained(out, parent, method, outputs.tiny_dir)
    _reloads_changed(outputs, out, parent)


@pytest.mark.parametrize("dpo_m", METHODS)
@pytest.mark.parametrize("sft_m", METHODS)
def test_dpo_after_sft(outputs, sft_m, dpo_m):
    _check_dpo(outputs, outputs.get("dpo", ("sft", sft_m), dpo_m), outputs.get("sft", sft_m), dpo_m)


@pytest.mark.parametrize("dpo_m", METHODS)
@pytest.mark.parametrize("ppo_m", METHODS)
def test_dpo_after_ppo(outputs, ppo_m, dpo_m):
    sft_m = _latin(ppo_m, dpo_m)  # each ppo output of the test above is the start of one dpo run
    parent = ("ppo", sft_m, ppo_m, _latin(sft_m, ppo_m))
    _check_dpo(outputs, outputs.get("dpo", parent, dpo_m), outputs.get(*parent), dpo_m)


@pytest.mark.parametrize("dpo_m", ["lora", "qlora"])
def test_merge_after_dpo(outputs, dpo_m):
    """merge folds the DPO adapter into the model under it (full precision): parity and reload
    checked by the stage; the merged model gives the logits of the adapter merged in memory."""
    parent = ("dpo", ("sft", "full" if dpo_m == "lora" else "qlora"), dpo_m)
    adapter = outputs.get(*parent)
    out = outputs.get("merge", parent)
    m = _finished(out, "merge", "merged")
    assert m["adapter_method"] == dpo_m and m["adapter"] == str(adapter)
    assert m["checks"]["weights_changed"]["changed"] > 0
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    cfg = outputs.config(["sft"], {})
    merged, in_memory = _reloaded_logits(cfg, out, outputs.tiny_dir), _reloaded_logits(cfg, adapter, outputs.tiny_dir)
    assert torch.allclose(merged, in_memory, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# sft → rloo / grpo, scored by reward models of every method

ONLINE = [(stage, sft_m, METHODS[(i + 1) % 3] if stage == "rloo" else METHODS[(i + 2) % 3], METHODS[i])
          for stage in ("rloo", "grpo") for i, sft_m in enumerate(METHODS)]


@pytest.mark.parametrize(("stage", "sft_m", "method", "rm_m"), ONLINE)
def test_online_after_sft(outputs, stage, sft_m, method, rm_m):
    parent = outputs.get("sft", sft_m)
    out = outputs.get(stage, sft_m, method, rm_m)
    m = _finished(out, stage, method)
    assert m["metrics"]["steps"] == STEPS and math.isfinite(m["metrics"]["score_last"])
    assert [r["model"] for r in m["rewards"]] == [str(outputs.get("reward", sft_m, rm_m))]
    _finite_losses(out)
    _trained(out, parent, method, outputs.tiny_dir)
    _reloads_changed(outputs, out, parent)


# ---------------------------------------------------------------------------------------------
# What validation refuses (before any weights load), and what it accepts

REFUSED = {
    "dpo adapter_disabled after lora sft": (
        ["sft", "dpo"], {"sft": "lora", "dpo": "lora"}, {"dpo": {"reference": "adapter_disabled"}},
        "dpo.reference 'adapter_disabled' with dpo after sft (method lora)", "set dpo.reference: copy"),
    "dpo adapter_disabled after qlora ppo": (
        ["sft", "reward", "ppo", "dpo"], {"ppo": "qlora", "dpo": "qlora"}, {"dpo": {"reference": "adapter_disabled"}},
        "dpo continues the ppo adapter", "or ppo.method: full"),
    "merge after full dpo": (
        ["sft", "dpo", "merge"], {"sft": "lora", "dpo": "full"}, {},
        "stages has merge after dpo, whose method is full", "set dpo.method: lora"),
    "merge with no training stage": (
        ["merge"], {}, {}, "no training stage before it writes an adapter", "drop merge"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_validation_refuses(tiny_dir, demo_data, tmp_path, case):
    stages, methods, sections, what, fix = REFUSED[case]
    with pytest.raises(PosttrainError) as e:
        validate_dict(_raw(tiny_dir, demo_data, tmp_path, stages, methods, **sections))
    line = e.value.line()
    assert what in line and fix in line and "\n" not in line, line


def test_validation_accepts_what_the_refusals_would_fix(tiny_dir, demo_data, tmp_path):
    """Controls: each refused chain with the fix applied validates; so do a QLoRA reward model on a
    LoRA SFT (it was refused only after SFT had trained), adapter_disabled on a full SFT and a
    merge after a LoRA stage."""
    ok = [(["sft", "dpo"], {"sft": "lora", "dpo": "lora"}, {"dpo": {"reference": "copy"}}),
          (["sft", "dpo"], {"sft": "full", "dpo": "lora"}, {"dpo": {"reference": "adapter_disabled"}}),
          (["sft", "reward", "ppo", "dpo"], {"ppo": "full", "dpo": "qlora"},
           {"dpo": {"reference": "adapter_disabled"}}),
          (["sft", "dpo", "merge"], {"sft": "lora", "dpo": "lora"}, {}),
          (["sft", "merge"], {"sft": "qlora"}, {}),
          (["sft", "reward"], {"sft": "lora", "reward": "qlora"}, {})]
    for stages, methods, sections in ok:
        assert validate_dict(_raw(tiny_dir, demo_data, tmp_path, stages, methods, **sections)).stages == stages


def test_posttrain_validate_exits_2_with_one_line(tiny_dir, demo_data, tmp_path):
    import subprocess
    import sys

    import yaml

    stages, methods, sections, what, fix = REFUSED["dpo adapter_disabled after lora sft"]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(_raw(tiny_dir, demo_data, tmp_path, stages, methods, **sections)))
    r = subprocess.run([str(Path(sys.executable).with_name("posttrain")), "validate", str(path)],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and what in lines[0] and fix in lines[0], r.stderr
    assert not list(tmp_path.glob("*/posttrain.json"))
