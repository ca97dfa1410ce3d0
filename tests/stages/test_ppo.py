"""PPO (posttrain's own) on a tiny random-init model: an SFT run, a reward model trained on the
demo's style pairs, then PPO against it.

Full PPO raises the reward model's score while the KL to the reference stays bounded (0 at the
first rollout, when policy and reference are the same model), the first update's ratio is 1, and
the sampled answers move toward the preferred style; the output reloads with plain transformers
and the manifest records the reward model, the reference and the metrics. LoRA PPO saves a
non-empty adapter whose reference is the adapter disabled, and `merge` folds it in. A run killed
after a checkpoint resumes to exactly the metrics and weights of an uninterrupted run. Two
processes under accelerate give one manifest. The gates (weak reward model, tokenizer mismatch)
refuse before any weights load; the KL cap, a first-ratio mismatch and collapsed generation stop
the run. (The rollout helpers' unit tests: tests/rl/test_rollout.py.)
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from posttrain import demo, manifest
from posttrain.config import validate_dict
from posttrain.errors import PosttrainError
from posttrain.rl import core as ppo_core
from posttrain.rl import rollout
from posttrain.sections import PPOStageConfig
from posttrain.stages import merge, ppo, ppo_checks, ppo_models, reward, sft
from tests.conftest import finished_checkpoints, tensorboard_scalars, weights_moved
from tests.helpers import ppo_chain_raw as _raw
from tests.helpers import ppo_section as _ppo

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "TOKENIZERS_PARALLELISM": "false"}
LORA = {"r": 8, "alpha": 16, "dropout": 0.0}
STYLE = re.compile(r"^\s*\d+ \+ \d+ = \d+\s*$")  # the concise style, whatever the digits


pytestmark = pytest.mark.usefixtures("one_thread")


def _logs(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def sft_dir(tiny_dir, demo_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("ppo_sft")
    return sft.run(validate_dict(_raw(tiny_dir, demo_data, root)), output=str(root / "sft"))


@pytest.fixture(scope="module")
def rm_dir(tiny_dir, demo_data, sft_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("ppo_rm")
    out = reward.run(validate_dict(_raw(tiny_dir, demo_data, root)), base=str(sft_dir), output=str(root / "reward"))
    assert manifest.read(out)["metrics"]["accuracy"] >= 0.8
    return out


@pytest.fixture
def ppo_config(tiny_dir, demo_data, rm_dir, tmp_path):
    def build(**ppo_section):
        return validate_dict(_raw(tiny_dir, demo_data, tmp_path / "out", ppo=_ppo(rm_dir, **ppo_section)))

    return build


@pytest.fixture(scope="module")
def ppo_full(tiny_dir, demo_data, sft_dir, rm_dir, tmp_path_factory):
    """20 iterations of full PPO; the first-update ratio check is observed as it runs."""
    root = tmp_path_factory.mktemp("ppo_full")
    cfg = validate_dict(_raw(tiny_dir, demo_data, root,
                             ppo=_ppo(rm_dir, steps=20, batch_size=16, mini_batch_size=8, sample_every=10)))
    checked: list[float] = []
    original = ppo.Loop.check_first_ratio

    def observed(self, *args):
        original(self, *args)
        checked.append(self.first_ratio)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ppo.Loop, "check_first_ratio", observed)
        out = ppo.run(cfg, base=str(sft_dir), output=str(root / "ppo"))
    return {"out": out, "first_ratio": checked}


def _style_of_samples(model_dir, demo_data, n_prompts: int = 32, repeats: int = 2) -> dict[str, float]:
    """Sample (temperature 1, as PPO does) answers to held-out prompts: the share in the concise style
    (demo.score, which also wants the prompt's numbers copied, and the style alone), the verbose share."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    rows = [json.loads(line) for line in (demo_data / "sft_eval.jsonl").read_text().splitlines()[:n_prompts]]
    prompts = [r["messages"][0]["content"] for r in rows] * repeats
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in prompts]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(0)
    with torch.no_grad():
        gen = model.generate(**enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=12,
                             eos_token_id=eot, pad_token_id=tok.pad_token_id)
    totals = {"concise": 0.0, "style": 0.0, "verbose": 0.0}
    for p, ids in zip(prompts, gen[:, enc["input_ids"].shape[1]:].tolist(), strict=True):
        text = tok.decode(ids[: ids.index(eot)] if eot in ids else ids, skip_special_tokens=True)
        totals["concise"] += demo.score(p, text)["concise"]
        totals["style"] += bool(STYLE.match(text))
        totals["verbose"] += text.strip().startswith("Well")
    return {k: v / len(prompts) for k, v in totals.items()}


# ---------------------------------------------------------------------------------------------
# Full PPO


def test_ppo_raises_the_score_with_bounded_kl(ppo_full, sft_dir, rm_dir, demo_data):
    from transformers import AutoModelForCausalLM

    out = ppo_full["out"]
    m = manifest.read(out)
    assert m["stage"] == "ppo" and m["method"] == "full"
    assert m["reference"] == "frozen copy of the starting policy"
    assert m["parent"]["path"] == str(sft_dir) and m["parent"]["stage"] == "sft"
    rm_manifest = manifest.read(rm_dir)
    assert m["reward_model"] == {"path": str(rm_dir), "accuracy": rm_manifest["metrics"]["accuracy"],
                                 "hash": manifest.directory_hash(rm_dir), "stage": "reward"}
    assert m["value_model_init"] == str(rm_dir)
    assert m["trainable_parameters"] == m["total_parameters"] > 0

    logs = _logs(out)
    assert [r["step"] for r in logs] == list(range(1, 21))
    for r in logs:
        bad = [k for k, v in r.items() if k != "explained_variance" and not math.isfinite(v)]
        assert not bad, (r["step"], bad)
    metrics = m["metrics"]
    assert metrics["steps"] == 20 and metrics["processes"] == 1 and metrics["prompts"] == 256
    assert metrics["score_first"] == logs[0]["score"] and metrics["score_last"] == logs[-1]["score"]
    assert metrics["kl_last"] == logs[-1]["kl"] and metrics["ended_last"] == logs[-1]["ended"]

    # the reward model's score rises: the last iterations against the first (means, for noise)
    first = sum(r["score"] for r in logs[:4]) / 4
    last = sum(r["score"] for r in logs[-4:]) / 4
    assert last > first + 0.3, [round(r["score"], 3) for r in logs]
    assert metrics["score_last"] > metrics["score_first"]

    # KL: 0 at the first rollout (the reference is the policy PPO starts from), then bounded
    assert logs[0]["kl"] == 0.0
    kls = [r["kl"] for r in logs]
    assert max(kls) < PPOStageConfig().kl_cap and max(kls) > 0, kls

    # the first update's probability ratio was checked (once) and was 1
    (first,) = ppo_full["first_ratio"]
    assert first["max_ratio_dev"] <= ppo_checks.FIRST_RATIO_TOLERANCE
    assert metrics["first_update"] == ppo_full["first_ratio"][0]

    # samples were kept at iterations 1, 10 and 20
    kept = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert sorted({s["step"] for s in kept}) == [1, 10, 20]

    # sampled answers move toward the style the reward model prefers, away from the verbose one
    before, after = _style_of_samples(sft_dir, demo_data), _style_of_samples(out, demo_data)
    assert after["concise"] >= before["concise"], (before, after)
    assert after["style"] > before["style"] + 0.1, (before, after)
    assert after["verbose"] < before["verbose"], (before, after)

    # a plain transformers model that stops at the end-of-turn token, with weights moved from SFT's
    model = AutoModelForCausalLM.from_pretrained(str(out))
    eos = model.generation_config.eos_token_id
    assert m["special_tokens"]["eot"] in (eos if isinstance(eos, list) else [eos])
    start, trained = load_file(str(sft_dir / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert trained.keys() == start.keys()
    assert sum(not torch.equal(start[k], trained[k]) for k in start) > len(start) // 2


@pytest.mark.parametrize(("dtype", "factor"), [("float32", 1.5), ("bfloat16", 1.1)])
def test_first_ratio_mismatch_is_caught(dtype, factor, tiny_dir, demo_data, sft_dir, rm_dir, tmp_path, monkeypatch):
    """Negative control: the update computes log-probs at another temperature than the rollout
    did (with gradients on: the update pass), so over the first mini-batch the ratio is not 1.
    float32 checks the maximum |ratio - 1|; bf16 the mean |log-ratio| per token (x1.1: 7e-2)."""
    original = rollout.PolicyAndValue.forward

    def mismatched(self, batch, temperature, *args, **kwargs):
        return original(self, batch, temperature * factor if torch.is_grad_enabled() else temperature, *args, **kwargs)

    monkeypatch.setattr(rollout.PolicyAndValue, "forward", mismatched)
    raw = _raw(tiny_dir, demo_data, tmp_path / "out", ppo=_ppo(rm_dir, steps=1))
    raw["model"]["dtype"] = dtype
    out = tmp_path / "ppo"
    what = "the probability ratio is off 1 by" if dtype == "float32" else r"the mean \|log-ratio\| per token is"
    with pytest.raises(PosttrainError, match=rf"at the first PPO update {what} .* the rollout and the update"):
        ppo.run(validate_dict(raw), base=str(sft_dir), output=str(out))
    assert not manifest.is_finished(out)


def test_first_ratio_statistics_span_the_whole_first_mini_batch(ppo_config, sft_dir, tmp_path, monkeypatch):
    """With gradient accumulation the first mini-batch is several micro-batches: the check sees
    their largest |ratio - 1| (not the sum of each one's largest) and the mean over all their
    tokens. An update temperature off by x1.02 makes the ratios differ from 1; the tolerance is
    lifted so the run goes on and records what it saw."""
    original, seen = rollout.PolicyAndValue.forward, []

    def mismatched(self, batch, temperature, *args, **kwargs):
        return original(self, batch, temperature * 1.02 if torch.is_grad_enabled() else temperature, *args, **kwargs)

    policy_loss = ppo_core.policy_loss

    def observed(*args, **kwargs):
        loss, stats = policy_loss(*args, **kwargs)
        seen.append(float(stats["ratio_max_dev"]))
        return loss, stats

    monkeypatch.setattr(rollout.PolicyAndValue, "forward", mismatched)
    monkeypatch.setattr(ppo_core, "policy_loss", observed)
    monkeypatch.setattr(ppo_checks, "FIRST_RATIO_TOLERANCE", 10.0)
    out = ppo.run(ppo_config(steps=1, mini_batch_size=4, gradient_accumulation_steps=2), base=str(sft_dir),
                  output=str(tmp_path / "ppo"))
    first = manifest.read(out)["metrics"]["first_update"]
    assert len(seen) >= 4 and min(seen[:2]) > 0  # 2 micro-batches a mini-batch: the first two are checked
    assert first["max_ratio_dev"] == pytest.approx(max(seen[:2]), rel=1e-6)
    assert first["mean_abs_log_ratio"] > 0


# ---------------------------------------------------------------------------------------------
# LoRA PPO, then merge


def test_lora_ppo_and_merge(ppo_config, sft_dir, tmp_path):
    cfg = ppo_config(method="lora", lora=LORA, learning_rate=1e-2)
    out = ppo.run(cfg, base=str(sft_dir), output=str(tmp_path / "ppo"))
    m = manifest.read(out)
    assert m["method"] == "lora" and m["reference"] == "the policy with its new LoRA adapter disabled"
    assert m["adapter_base"] == str(sft_dir)
    assert 0 < m["trainable_parameters"] < m["total_parameters"]
    logs = _logs(out)
    assert len(logs) == 4 and all(math.isfinite(r["score"]) and math.isfinite(r["kl"]) for r in logs)
    # a new adapter starts at B = 0: with it disabled the reference is the policy at the first rollout
    assert abs(logs[0]["kl"]) < 1e-6 and any(r["kl"] != 0 for r in logs[1:])

    assert not (out / "model.safetensors").exists()
    adapter = load_file(str(out / "adapter_model.safetensors"))
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b), "the adapter did not train"

    cfg = validate_dict({**cfg.model_dump(mode="json"),
                         "merge": {"dtype": "float32", "probe_prompts": ["What is 12 + 34?"], "max_new_tokens": 8}})
    merged = merge.run(cfg, base=str(out), output=str(tmp_path / "merged"))
    mm = manifest.read(merged)
    assert mm["stage"] == "merge" and mm["parent"]["path"] == str(out) and mm["merged_into"] == str(sft_dir)
    assert mm["checks"]["parity"]["max_abs_diff"] <= mm["checks"]["parity"]["tolerance"]
    assert (merged / "model.safetensors").is_file() and not (merged / "adapter_config.json").exists()


def test_full_ppo_in_bf16_keeps_every_update(tiny_dir, demo_data, sft_dir, rm_dir, tmp_path, monkeypatch):
    """Issue 16 item 2: full PPO in bf16 trained bf16 weights with plain AdamW, which drops every
    update below a weight's rounding step: at lr 1e-5 most weights never move. It now trains float32
    master weights with every policy and value forward under bf16 autocast (recorded), and moves
    every weight as float32 does. Negative control: bf16 weights without autocast lose most updates."""
    from posttrain import models

    def run(dtype, tag):
        raw = _raw(tiny_dir, demo_data, tmp_path / tag, ppo=_ppo(rm_dir, steps=3, learning_rate=1e-5))
        raw["model"]["dtype"] = dtype
        out = ppo.run(validate_dict(raw), base=str(sft_dir), output=str(tmp_path / tag / "ppo"))
        return out, manifest.read(out)["metrics"]

    out32, m32 = run("float32", "fp32")
    out16, m16 = run("bfloat16", "bf16")
    assert m32["precision"] == {"weights": "float32", "autocast": "no"}
    assert m16["precision"] == {"weights": "float32", "autocast": "bfloat16"}
    share32, dw32 = weights_moved(sft_dir, out32)
    share16, dw16 = weights_moved(sft_dir, out16)
    assert share32 > 0.99 and share16 > 0.99, (share32, share16)
    assert 0.5 < dw16 / dw32 < 2.0, (dw16, dw32)
    assert _logs(out16)[0]["kl"] == 0.0  # the reference (a copy of the master weights) computes as the policy

    monkeypatch.setattr(models, "weights_dtype", lambda cfg, method, master_weights=False: torch.bfloat16)
    monkeypatch.setattr(ppo_models, "autocast_dtype", lambda cfg, pc: None)
    out_lost, m_lost = run("bfloat16", "bf16-weights")
    assert m_lost["precision"] == {"weights": "bfloat16", "autocast": "no"}
    share, _ = weights_moved(sft_dir, out_lost)  # (the few weights that move jump a whole rounding step)
    assert share < 0.5, share


@pytest.fixture(scope="module")
def sft_lora_dir(tiny_dir, demo_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("ppo_sft_lora")
    raw = _raw(tiny_dir, demo_data, root)
    raw["sft"] = {**raw["sft"], "method": "lora", "lora": LORA,
                  "training": {**raw["sft"]["training"], "max_steps": 60}}
    return sft.run(validate_dict(raw), output=str(root / "sft"))


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_ppo_continuing_an_sft_adapter_in_bf16(method, tiny_dir, demo_data, sft_lora_dir, rm_dir, tmp_path,
                                               monkeypatch):
    """Issue 16 item 1: the reference of a LoRA/QLoRA policy that continues an SFT adapter is a
    frozen copy of that adapter on the policy's own base, so in bf16 the first rollout's KL is 0
    exactly (with the adapter merged into the base it was 1.6e-2 nats a response on this model and
    the run stopped). The copy is neither trained nor saved nor counted. Negative control: the
    merged reference still stops the run at the first rollout."""
    from posttrain import models

    def config(tag):
        raw = _raw(tiny_dir, demo_data, tmp_path / tag, ppo=_ppo(rm_dir, steps=2, method=method, lora=LORA))
        raw["model"]["dtype"] = "bfloat16"
        return validate_dict(raw)

    cfg = config("ok")
    out = ppo.run(cfg, base=str(sft_lora_dir), output=str(tmp_path / "ok" / "ppo"))
    m, sft_m = manifest.read(out), manifest.read(sft_lora_dir)
    assert m["reference"] == "frozen copy of the starting (SFT) adapter on the policy's base"
    logs = _logs(out)
    assert logs[0]["kl"] == 0.0 and logs[1]["kl"] != 0.0
    assert m["trainable_parameters"] == sft_m["trainable_parameters"]
    if method == "lora":  # (a 4-bit base counts its packed storage, not the SFT model's weights)
        assert m["total_parameters"] == sft_m["total_parameters"]  # the reference copy is not counted
    assert not (out / ppo_models.REFERENCE_ADAPTER).exists()
    trained, started = load_file(str(out / "adapter_model.safetensors")), load_file(
        str(sft_lora_dir / "adapter_model.safetensors"))
    assert trained.keys() == started.keys()
    assert any(not torch.equal(trained[k], started[k]) for k in trained), "the adapter did not train"

    def merged_reference(source, policy, pc):  # the reference before the fix
        ref = models.load_causal_lm(cfg, source, "full", pc.lora, models.load_tokenizer(cfg))
        return ref.requires_grad_(False), None, "the starting (SFT) adapter merged into its base"

    monkeypatch.setattr(ppo_models, "reference", merged_reference)
    with pytest.raises(PosttrainError, match=r"at the first rollout the policy's KL to the reference"):
        ppo.run(config("merged"), base=str(sft_lora_dir), output=str(tmp_path / "merged" / "ppo"))


# ---------------------------------------------------------------------------------------------
# Resume after a SIGKILL: the same metrics, bit for bit


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "posttrain.cli", *map(str, args)]


def _uninterrupted(cfg: Path, sft_dir, out: Path) -> dict[int, dict]:
    """The metrics, by iteration, of `posttrain ppo` run through without interruption."""
    r = subprocess.run(_cli("ppo", cfg, "--base", sft_dir, "-o", out), capture_output=True, text=True, cwd=ROOT,
                       env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return {rec["step"]: rec for rec in _logs(out)}


STEPS = 40


def test_killed_run_resumes_to_the_same_metrics(tiny_dir, demo_data, sft_dir, rm_dir, tmp_path):
    # an iteration takes well under a second: 40 of them leave time to see checkpoint-4 and kill
    raw = _raw(tiny_dir, demo_data, tmp_path / "out", ppo=_ppo(rm_dir, steps=STEPS, save_steps=4))
    cfg = tmp_path / "ppo.yaml"
    cfg.write_text(yaml.safe_dump(raw, sort_keys=False))
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    expected = _uninterrupted(cfg, sft_dir, whole)
    assert sorted(expected) == list(range(1, STEPS + 1))

    log = tmp_path / "killed.log"
    with log.open("w") as f:
        proc = subprocess.Popen(_cli("ppo", cfg, "--base", sft_dir, "-o", killed), stdout=f, stderr=subprocess.STDOUT,
                                cwd=ROOT, env=ENV, start_new_session=True)
        try:
            deadline = time.time() + 300
            while not finished_checkpoints(killed):
                assert proc.poll() is None, \
                    f"exited ({proc.returncode}) before a checkpoint:\n{log.read_text()[-3000:]}"
                assert time.time() < deadline, "no checkpoint within 300 s"
                time.sleep(0.05)
            os.killpg(proc.pid, signal.SIGKILL)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not manifest.is_finished(killed) and not (killed / "model.safetensors").exists()
    checkpoint = finished_checkpoints(killed)[-1]
    at = int(checkpoint.name.split("-")[1])
    assert at < STEPS
    before_kill = _logs(killed)

    r = subprocess.run(_cli("ppo", cfg, "--base", sft_dir, "-o", killed, "--resume"), capture_output=True,
                       text=True, cwd=ROOT, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    m = manifest.read(killed)
    assert m["resumed_from"] == str(checkpoint) and m["metrics"]["steps"] == STEPS

    # the resumed run logs the iterations after the checkpoint, each as the uninterrupted run did
    after = _logs(killed)[len(before_kill):]
    assert [rec["step"] for rec in after] == list(range(at + 1, STEPS + 1))
    for rec in [*before_kill, *after]:
        assert rec == expected[rec["step"]], rec["step"]
    assert m["metrics"]["score_first"] == expected[1]["score"]
    assert m["metrics"]["score_last"] == expected[STEPS]["score"]
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(killed / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------
# Two processes


def test_two_processes(tiny_dir, demo_data, sft_dir, rm_dir, tmp_path):
    """`accelerate launch ... -m posttrain` typed by hand (posttrain runs inside the processes it
    started): with --multi_gpu and no GPU visible it starts 2 CPU processes (torchrun, gloo);
    `--cpu --num_processes 2` would start one (accelerate 1.15's simple launcher), which the
    manifest's `processes` would show."""
    raw = _raw(tiny_dir, demo_data, tmp_path / "out", ppo=_ppo(rm_dir, steps=3, batch_size=4, mini_batch_size=2,
                                                            save_steps=2))
    cfg = tmp_path / "ppo.yaml"
    cfg.write_text(yaml.safe_dump(raw, sort_keys=False))
    out = tmp_path / "ppo"
    launcher = Path(sys.executable).with_name("accelerate")
    r = subprocess.run([str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                        "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "posttrain", "ppo", str(cfg),
                        "--base", str(sft_dir), "-o", str(out)],
                       capture_output=True, text=True, cwd=ROOT, env={**ENV, "CUDA_VISIBLE_DEVICES": ""}, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    assert [p.relative_to(tmp_path) for p in tmp_path.rglob(manifest.MANIFEST)] == [Path("ppo") / manifest.MANIFEST]
    m = manifest.read(out)
    assert m["metrics"]["processes"] == 2 and m["metrics"]["steps"] == 3
    assert all(math.isfinite(m["metrics"][k]) for k in ("score_first", "score_last", "kl_last", "entropy_last"))
    logs = _logs(out)
    assert [rec["step"] for rec in logs] == [1, 2, 3], "one metrics line per iteration (the main process)"
    assert logs[0]["kl"] == 0.0
    ckpt = out / "checkpoints" / "checkpoint-2"
    assert {p.name for p in ckpt.glob("rng_*.pth")} == {"rng_0.pth", "rng_1.pth"}


# ---------------------------------------------------------------------------------------------
# Gates and stops


class ModelLoaded(AssertionError):
    """Raised by patched loaders: proves a run got as far as loading weights."""


def _no_weights_loading(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise ModelLoaded("weights were loaded")

    monkeypatch.setattr("posttrain.models.load_causal_lm", refuse)
    monkeypatch.setattr("posttrain.rl.rewards.load_reward_model", refuse)
    monkeypatch.setattr("transformers.AutoModelForSequenceClassification.from_pretrained", refuse)
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", refuse)


@pytest.mark.parametrize("allow", [False, True])
def test_weak_reward_model_gate(allow, ppo_config, sft_dir, rm_dir, tmp_path, monkeypatch):
    weak = tmp_path / "weak_rm"
    shutil.copytree(rm_dir, weak)
    m = manifest.read(weak)
    m["metrics"]["accuracy"] = 0.55
    manifest.write(weak, m)
    cfg = ppo_config(reward_model=str(weak), allow_weak_reward_model=allow)
    _no_weights_loading(monkeypatch)
    out = tmp_path / "ppo"
    if allow:
        with pytest.raises(ModelLoaded):
            ppo.run(cfg, base=str(sft_dir), output=str(out))
    else:
        with pytest.raises(PosttrainError, match=r"held-out pairwise accuracy 0\.550, under ppo\.min_reward_accuracy "
                                                 r"0\.7.*allow_weak_reward_model") as e:
            ppo.run(cfg, base=str(sft_dir), output=str(out))
        assert "\n" not in str(e.value)
        assert not out.exists()


OTHER_TEMPLATE = (  # ChatML tokens, but "role:" headers
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + ':\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant:\\n' -}}{%- endif -%}"
)


@pytest.mark.parametrize(("change", "message"), [
    ("added token", r"vocabularies differ \(\d+ vs \d+ tokens\)"),
    ("chat template", r"the chat templates render differently"),
])
def test_reward_model_with_another_tokenizer_is_refused(change, message, ppo_config, sft_dir, rm_dir, tmp_path,
                                                        monkeypatch):
    from transformers import AutoTokenizer

    other = tmp_path / "other_rm"
    shutil.copytree(rm_dir, other)
    tok = AutoTokenizer.from_pretrained(str(other))
    if change == "added token":
        assert tok.add_tokens(["<|tool|>"]) == 1
    else:
        tok.chat_template = OTHER_TEMPLATE
    tok.save_pretrained(str(other))
    _no_weights_loading(monkeypatch)
    out = tmp_path / "ppo"
    with pytest.raises(PosttrainError, match=rf"do not share a tokenizer: .*{message}"):
        ppo.run(ppo_config(reward_model=str(other)), base=str(sft_dir), output=str(out))
    assert not out.exists()


def test_reward_model_that_is_not_a_reward_stage(ppo_config, sft_dir, tmp_path, monkeypatch):
    _no_weights_loading(monkeypatch)
    with pytest.raises(PosttrainError, match=r"is a sft stage, not a reward model"):
        ppo.run(ppo_config(reward_model=str(sft_dir)), base=str(sft_dir), output=str(tmp_path / "ppo"))
    with pytest.raises(PosttrainError, match=r"does not exist"):
        ppo.run(ppo_config(reward_model=str(tmp_path / "nowhere")), base=str(sft_dir), output=str(tmp_path / "ppo"))


def test_kl_cap_stops_the_run(ppo_config, sft_dir, tmp_path):
    out = tmp_path / "ppo"
    with pytest.raises(PosttrainError, match=r"KL to the reference reached .* at iteration 2, over ppo\.kl_cap 1e-06"):
        ppo.run(ppo_config(steps=3, kl_cap=1e-6, learning_rate=1e-2), base=str(sft_dir), output=str(out))
    assert not manifest.is_finished(out)
    assert [r["step"] for r in _logs(out)] == [1, 2]  # iteration 1 has KL 0, iteration 2 is over the cap


def test_collapsed_generation_stops_the_run(ppo_config, sft_dir, tmp_path, monkeypatch):
    """Every prompt answered with the same tokens (the first row's answer copied to all rows)."""
    original = rollout.sample

    def same_answer(*args, **kwargs):
        b = original(*args, **kwargs)
        n = b.responses.shape[0]
        return rollout.Batch(b.queries, b.query_mask, b.responses[:1].expand(n, -1).clone(),
                             b.mask[:1].expand(n, -1).clone(), b.ended[:1].expand(n).clone())

    monkeypatch.setattr(rollout, "sample", same_answer)
    out = tmp_path / "ppo"
    with pytest.raises(PosttrainError, match=r"generation collapsed at iteration 1: every response is"):
        ppo.run(ppo_config(steps=2), base=str(sft_dir), output=str(out))
    assert not manifest.is_finished(out)


@pytest.mark.parametrize(("dtype", "penalty"), [("float32", 1.05), ("bfloat16", 1.5)])
def test_a_leaked_repetition_penalty_stops_ppo(dtype, penalty, tiny_dir, demo_data, sft_dir, rm_dir, tmp_path,
                                               monkeypatch):
    """Issue 16 item 3, end to end: with own_sampling disabled, the SFT checkpoint's
    generation_config.json asking for a repetition_penalty changes what generate() samples; PPO
    stops at the first rollout. float32: 1.05, the issue's case (mean |d| 0.04-0.05 nats/token on
    this model, over 1e-3). bf16 checks the signed mean, an estimate of the KL: 1.5 gives 0.43 on
    this model (1.05 only 4e-3-5e-3 here, under 3e-2; 0.06-0.09 on SmolLM2, over it). The same run
    without the leak records a gap of rounding size."""
    import contextlib

    leaky = tmp_path / "sft"
    shutil.copytree(sft_dir, leaky)
    gc = json.loads((leaky / "generation_config.json").read_text())
    (leaky / "generation_config.json").write_text(json.dumps({**gc, "repetition_penalty": penalty}))
    raw = _raw(tiny_dir, demo_data, tmp_path / "out", ppo=_ppo(rm_dir, steps=1))
    raw["model"]["dtype"] = dtype
    cfg = validate_dict(raw)
    monkeypatch.setattr(ppo.models, "own_sampling", lambda model: contextlib.nullcontext())
    out = tmp_path / "ppo"
    with pytest.raises(PosttrainError, match=r"at iteration 1 the tokens were sampled from another distribution"):
        ppo.run(cfg, base=str(leaky), output=str(out))
    assert not manifest.is_finished(out)
    monkeypatch.undo()
    out = ppo.run(cfg, base=str(leaky), output=str(tmp_path / "ppo-ok"))
    (log,) = _logs(out)
    rounding = 1e-4 if dtype == "float32" else 1e-2
    assert 0 <= log["sampler_gap"] < rounding and abs(log["sampler_kl"]) < rounding


def test_reward_model_padded_with_another_pad_id_is_refused(ppo_config, sft_dir, rm_dir, tmp_path):
    """Issue 16 item 7: a reward model whose config's pad_token_id is not the pad id its inputs are
    padded with would read every right-padded score at a pad position: PPO refuses it before
    training. The reward stage's own output (ids agree) passes the same check."""
    from transformers import AutoTokenizer

    from posttrain.rl import rewards

    pad = AutoTokenizer.from_pretrained(str(rm_dir)).pad_token_id
    model = rewards.load_reward_model(str(rm_dir))
    rewards.check_pad(model, pad, str(rm_dir), "ppo")
    with pytest.raises(PosttrainError, match=rf"reads its score at the last token that is not pad_token_id {pad} "
                                             rf".* padded with {pad + 1}"):
        rewards.check_pad(model, pad + 1, str(rm_dir), "ppo")

    broken = tmp_path / "rm"
    shutil.copytree(rm_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    config["pad_token_id"] = pad + 1
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(PosttrainError, match=rf"ppo: reward model '{broken}' reads its score .* padded with {pad}"):
        ppo.run(ppo_config(reward_model=str(broken)), base=str(sft_dir), output=str(tmp_path / "ppo"))
    assert not (tmp_path / "ppo" / "metrics.jsonl").exists()


def test_prompts_are_split_between_processes_and_reproducible():
    """Each process takes its own slice of the seed's permutation; a pass over the prompts uses
    every prompt once; the same iteration gives the same prompts again (resume)."""
    class Acc:
        def __init__(self, index):
            self.num_processes, self.process_index = 2, index

    def loop(index):
        lp = object.__new__(ppo.Loop)
        lp.pc, lp.acc = PPOStageConfig(batch_size=3, mini_batch_size=1), Acc(index)
        lp.queries = [[i] for i in range(12)]
        lp.cfg = validate_dict({"model": {"name_or_path": "x"}, "stages": [], "seed": 7})
        return lp

    rank0, rank1 = loop(0), loop(1)
    first_pass = [q for it in (0, 1) for q in rank0.prompts_for(it) + rank1.prompts_for(it)]
    assert sorted(q[0] for q in first_pass) == list(range(12))
    assert not set(map(tuple, rank0.prompts_for(0))) & set(map(tuple, rank1.prompts_for(0)))
    assert rank0.prompts_for(1) == loop(0).prompts_for(1)


def test_ppo_data_missing_is_a_clean_error(make_config):
    """A standalone `posttrain ppo` whose config has no such dataset fails with one line, before loading."""
    cfg = make_config(ppo__data="prompts")
    with pytest.raises(PosttrainError, match="ppo.data names dataset 'prompts'"):
        ppo.run(cfg)


def test_report_to_tensorboard_gets_the_same_metrics(ppo_config, sft_dir, tmp_path):
    cfg = ppo_config(steps=2, report_to=["tensorboard"])
    out = ppo.run(cfg, base=str(sft_dir), output=str(tmp_path / "ppo"))
    logged = tensorboard_scalars(out / "runs")
    jsonl = _logs(out)
    assert [v for _, v in logged["score"]] == pytest.approx([r["score"] for r in jsonl])
    assert [s for s, _ in logged["kl"]] == [1, 2]


def test_sigint_saves_a_checkpoint_and_resume_continues_it(tiny_dir, demo_data, sft_dir, rm_dir, tmp_path):
    """Ctrl-C: the iteration under way finishes, a checkpoint is saved, one line says so (exit 130);
    --resume then logs exactly the iterations an uninterrupted run of the same config logs."""
    steps = 12
    raw = _raw(tiny_dir, demo_data, tmp_path / "out", ppo=_ppo(rm_dir, steps=steps, save_steps=1000))
    cfg = tmp_path / "ppo.yaml"
    cfg.write_text(yaml.safe_dump(raw, sort_keys=False))
    expected, stopped = _uninterrupted(cfg, sft_dir, tmp_path / "whole"), tmp_path / "stopped"

    log = tmp_path / "stopped.log"
    with log.open("w") as f:
        proc = subprocess.Popen(_cli("ppo", cfg, "--base", sft_dir, "-o", stopped), stdout=subprocess.DEVNULL,
                                stderr=f, cwd=ROOT, env=ENV)
        try:
            deadline = time.time() + 300
            while not ((stopped / "metrics.jsonl").is_file() and _logs(stopped)):
                assert proc.poll() is None, f"exited ({proc.returncode}) early:\n{log.read_text()[-3000:]}"
                assert time.time() < deadline, "no iteration within 300 s"
                time.sleep(0.02)
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
    err = log.read_text()
    assert proc.returncode == 130, err[-3000:]
    line = next(x for x in err.splitlines() if x.startswith("error: "))
    assert "stopped by SIGINT at step" in line and "Traceback" not in err
    at = int(line.split(" at step ")[1].split(";")[0])
    assert at < steps and not manifest.is_finished(stopped)
    assert (stopped / "checkpoints" / f"checkpoint-{at}" / "trainer_state.json").is_file()

    r = subprocess.run(_cli("ppo", cfg, "--base", sft_dir, "-o", stopped, "--resume"), capture_output=True,
                       text=True, cwd=ROOT, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    got = _logs(stopped)
    assert [rec["step"] for rec in got] == list(range(1, steps + 1))
    assert all(rec == expected[rec["step"]] for rec in got)
