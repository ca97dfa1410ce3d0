"""`posttrain run`: the whole chain (format → sft → dpo → merge) through the real entry point.

One chain is trained once per module (`chain` fixture) and the tests below run in file order
against that same output directory: a plain re-run skips everything, a changed DPO setting reruns
DPO and merge only, `--from sft` reruns from SFT on, and a run killed during DPO resumes. The
template-mismatch, dry-run and bad-input tests use their own directories.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from posttrain import manifest
from tests.conftest import finished_checkpoints
from tests.helpers import BIN, ENV, OTHER_TEMPLATE, ROOT, assert_clean_error, assert_ok, chain_config, cli, write_yaml
from tests.helpers import CHAIN_STAGES as STAGES

# The resume test: a DPO run long enough to be killed after its first checkpoint.
LONG_DPO = ["--set", "dpo.training.max_steps=120", "--set", "dpo.training.save_steps=10"]

pytestmark = pytest.mark.slow


# ---------------------------------------------------------------------------------------------
# helpers (cli, assert_ok, assert_clean_error, chain_config, write_yaml: tests/helpers.py)


def chain_summary(out: Path) -> dict:
    return json.loads((out / "posttrain-chain.json").read_text())


def statuses(out: Path) -> dict[str, str]:
    return {r["stage"]: r["status"] for r in chain_summary(out)["stages"]}


def manifest_state(d: Path) -> tuple:
    """What tells a finished stage was not touched: its manifest bytes and mtime."""
    p = d / manifest.MANIFEST
    return p.read_bytes(), p.stat().st_mtime_ns


def all_losses(stage_dir: Path) -> list[tuple[int, float]]:
    """Every logged training loss of metrics.jsonl in order (a resumed run appends)."""
    rows = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def found(directory: Path, pattern: str) -> list[Path]:
    return list(directory.rglob(pattern)) if directory.exists() else []


def step_of(checkpoint: str | Path) -> int:
    return int(Path(checkpoint).name.split("-")[1])


def uninterrupted_losses(chain) -> dict[int, float]:
    """The long DPO run's losses without interruption (`posttrain dpo` from the chain's SFT stage)."""
    ref = chain["root"] / "dpo-uninterrupted"
    if not manifest.is_finished(ref):
        assert_ok(cli("dpo", chain["cfg"], "--base", chain["out"] / "sft", "--output", ref, "--overwrite", *LONG_DPO))
    return dict(all_losses(ref))


# ---------------------------------------------------------------------------------------------
# the shared chain


@pytest.fixture(scope="module")
def chain(tmp_path_factory, tiny_dir, demo_data):
    """One chain run through `posttrain run`, shared (and mutated in order) by the tests below."""
    root = tmp_path_factory.mktemp("chain")
    out = root / "out"
    cfg = write_yaml(root / "chain.yaml", chain_config(tiny_dir, demo_data, out))
    t0 = time.time()
    r = cli("run", cfg)
    return {"root": root, "cfg": cfg, "out": out, "first": r, "seconds": time.time() - t0}


def test_full_chain_runs_end_to_end_with_lineage(chain, tiny_dir):
    r, out = chain["first"], chain["out"]
    assert_ok(r)
    for stage in STAGES:
        assert manifest.is_finished(out / stage), stage
        assert manifest.read(out / stage)["stage"] == stage

    sft = manifest.read(out / "sft")
    assert sft["method"] == "full" and sft["metrics"]["steps"] == 30

    dpo = manifest.read(out / "dpo")
    assert dpo["parent"]["path"] == str(out / "sft")
    assert dpo["parent"]["stage"] == "sft"
    assert dpo["parent"]["hash"] == manifest.directory_hash(out / "sft")
    assert dpo["method"] == "lora" and dpo["loss_type"] == ["sigmoid", "sft"] and dpo["beta"] == 0.1
    assert dpo["adapter_base"] == str(out / "sft")  # the new adapter sits on the SFT model, not the tiny base
    assert dpo["metrics"]["steps"] == 24 and dpo["resumed_from"] is None
    assert dpo["template_hash"] == sft["template_hash"]
    assert (out / "dpo" / "adapter_model.safetensors").is_file()

    merge = manifest.read(out / "merge")
    assert merge["parent"]["path"] == str(out / "dpo")
    assert merge["parent"]["stage"] == "dpo"
    assert merge["parent"]["hash"] == manifest.directory_hash(out / "dpo")
    assert merge["merged_into"] == str(out / "sft")
    assert merge["checks"]["parity"]["max_abs_diff"] <= merge["checks"]["parity"]["tolerance"]

    summary = chain_summary(out)
    assert [s["stage"] for s in summary["stages"]] == STAGES
    assert all(s["status"] == "ran" for s in summary["stages"]), summary["stages"]
    for s in summary["stages"]:
        assert s["path"] == str(out / s["stage"])
        assert s["inputs_key"] == manifest.read(out / s["stage"])["inputs_key"]
    assert [s["parent"] for s in summary["stages"]] == [None, str(tiny_dir), str(out / "sft"), str(out / "dpo")]
    assert sft["parent"]["path"] == str(tiny_dir)

    # the merged model is a plain transformers model that chats with the template it was trained with
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out / "merge"))
    model = AutoModelForCausalLM.from_pretrained(str(out / "merge")).eval()
    assert not (out / "merge" / "adapter_config.json").exists()
    messages = [{"role": "user", "content": "What is 12 + 34?"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nWhat is 12 + 34?<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape[1] > ids.shape[1]
    assert gen[0, : ids.shape[1]].tolist() == ids[0].tolist()
    eos = model.generation_config.eos_token_id
    assert tok.convert_tokens_to_ids("<|im_end|>") in (eos if isinstance(eos, list) else [eos])


def test_rerun_skips_every_stage(chain):
    out = chain["out"]
    assert_ok(chain["first"])
    before = {s: manifest_state(out / s) for s in STAGES}
    metrics_before = {s: (out / s / "metrics.jsonl").read_bytes() for s in ("sft", "dpo")}
    keys_before = {r["stage"]: r["inputs_key"] for r in chain_summary(out)["stages"]}
    chain_time = chain_summary(out)["chain_time_s"]

    r = cli("run", chain["cfg"])
    assert_ok(r)
    assert statuses(out) == dict.fromkeys(STAGES, "up to date")
    # the chain's own time is what its stages cost when they ran, not the skipping run's wall time
    rerun = chain_summary(out)
    assert rerun["chain_time_s"] == chain_time > 5 * rerun["wall_time_s"]
    assert f"chain time {chain_time:.0f} s (the last run" in (out / "report.md").read_text()
    # without the chain's record (stages run on their own, or the record deleted): each manifest's time
    (out / "posttrain-chain.json").unlink()
    assert_ok(cli("run", chain["cfg"]))
    again = chain_summary(out)
    timed = {s: manifest.read(out / s).get("metrics", {}).get("wall_time_s") for s in STAGES}
    assert timed["sft"] and timed["dpo"]
    for rec in again["stages"]:
        if timed[rec["stage"]] is not None:
            assert rec["seconds"] == timed[rec["stage"]], rec["stage"]
    assert again["chain_time_s"] > 5 * again["wall_time_s"]
    assert {r["stage"]: r["inputs_key"] for r in chain_summary(out)["stages"]} == keys_before
    for s in STAGES:
        assert manifest_state(out / s) == before[s], f"{s} was rewritten"
    for s in ("sft", "dpo"):
        assert (out / s / "metrics.jsonl").read_bytes() == metrics_before[s], f"{s} trained again"
    for stage in STAGES:
        assert f"{stage}: up to date" in r.stderr


def test_dry_run_after_the_chain_reports_up_to_date_and_honours_from(chain):
    out = chain["out"]
    before = {s: manifest_state(out / s) for s in STAGES}
    r = cli("run", "--dry-run", chain["cfg"])
    assert_ok(r)
    for stage in STAGES:
        assert f"{stage} (would be: skipped, up to date)" in r.stderr, r.stderr[-3000:]
    # --from sft forces sft and every stage after it: the dry run must say they would run
    r = cli("run", "--dry-run", "--from", "sft", chain["cfg"])
    assert_ok(r)
    assert "format (would be: skipped, up to date)" in r.stderr
    for stage in ("sft", "dpo", "merge"):
        assert f"{stage} (would be: skipped" not in r.stderr, f"dry run says {stage} is skipped under --from sft"
        assert f"{stage} (would be: running)" in r.stderr
    assert {s: manifest_state(out / s) for s in STAGES} == before


def test_template_change_reruns_sft_in_the_dry_run(chain):
    """Issue 17 (b): the template is part of SFT's inputs key, so after a template change the
    chain does not skip SFT as "up to date" (a dry run: nothing trains, nothing is written)."""
    out = chain["out"]
    before = {s: manifest_state(out / s) for s in STAGES}
    r = cli("run", "--dry-run", chain["cfg"], "--set", "template.system_prompt=Answer briefly.")
    assert_ok(r)
    for stage in ("sft", "dpo", "merge"):
        assert f"{stage} (would be: skipped" not in r.stderr, f"{stage} is skipped after a template change"
    assert "sft (would be: running)" in r.stderr, r.stderr[-3000:]
    assert {s: manifest_state(out / s) for s in STAGES} == before


def test_changed_dpo_setting_reruns_dpo_and_merge_only(chain):
    out = chain["out"]
    fmt_before, sft_before = manifest_state(out / "format"), manifest_state(out / "sft")
    dpo_key = manifest.read(out / "dpo")["inputs_key"]
    merge_key = manifest.read(out / "merge")["inputs_key"]

    r = cli("run", chain["cfg"], "--set", "dpo.training.beta=0.2")
    assert_ok(r)
    assert statuses(out) == {"format": "up to date", "sft": "up to date", "dpo": "ran", "merge": "ran"}
    assert manifest_state(out / "format") == fmt_before
    assert manifest_state(out / "sft") == sft_before
    dpo = manifest.read(out / "dpo")
    assert dpo["beta"] == 0.2 and dpo["inputs_key"] != dpo_key
    assert dpo["parent"]["hash"] == manifest.directory_hash(out / "sft")
    merge = manifest.read(out / "merge")
    # merge's own settings did not change: it reran because its parent did
    assert merge["inputs_key"] != merge_key
    assert merge["parent"]["hash"] == manifest.directory_hash(out / "dpo")

    # the same override again: now everything is up to date
    r = cli("run", chain["cfg"], "--set", "dpo.training.beta=0.2")
    assert_ok(r)
    assert statuses(out) == dict.fromkeys(STAGES, "up to date")


def test_from_sft_reruns_sft_dpo_merge_but_not_format(chain):
    out = chain["out"]
    fmt_before, sft_before = manifest_state(out / "format"), manifest_state(out / "sft")
    sft_key = manifest.read(out / "sft")["inputs_key"]

    r = cli("run", chain["cfg"], "--from", "sft")
    assert_ok(r)
    assert statuses(out) == {"format": "up to date", "sft": "ran", "dpo": "ran", "merge": "ran"}
    assert manifest_state(out / "format") == fmt_before
    assert manifest_state(out / "sft") != sft_before
    sft = manifest.read(out / "sft")
    assert sft["inputs_key"] == sft_key  # same inputs, forced anyway
    dpo = manifest.read(out / "dpo")
    assert dpo["beta"] == 0.1  # back to the config's own value
    assert dpo["parent"]["hash"] == manifest.directory_hash(out / "sft")
    assert manifest.read(out / "merge")["parent"]["hash"] == manifest.directory_hash(out / "dpo")


def test_killed_during_dpo_resumes_and_finishes(chain):
    out, cfg, root = chain["out"], chain["cfg"], chain["root"]
    dpo_dir = out / "dpo"
    log = root / "killed.log"
    with log.open("w") as f:
        proc = subprocess.Popen([str(BIN), "run", str(cfg), *LONG_DPO], stdout=f, stderr=subprocess.STDOUT,
                                cwd=ROOT, env=ENV, start_new_session=True)
        try:
            deadline = time.time() + 300
            # the finished DPO of the earlier tests goes first (its directory is cleared for the new
            # run), so a checkpoint seen without a manifest is one of this run
            while manifest.is_finished(dpo_dir) or not finished_checkpoints(dpo_dir):
                assert proc.poll() is None, f"exited ({proc.returncode}) before a DPO checkpoint:\n" \
                    + log.read_text()[-3000:]
                assert time.time() < deadline, "no DPO checkpoint within 300 s:\n" + log.read_text()[-3000:]
                time.sleep(0.05)
            os.killpg(proc.pid, signal.SIGKILL)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not manifest.is_finished(dpo_dir)
    assert not (dpo_dir / "adapter_model.safetensors").exists()
    killed_at = finished_checkpoints(dpo_dir)[-1]
    killed_step = step_of(killed_at)
    assert killed_step < 120, "the run was not killed during DPO"
    losses_before_kill = all_losses(dpo_dir)

    r = cli("run", cfg, *LONG_DPO)
    assert_ok(r)
    assert statuses(out) == {"format": "up to date", "sft": "up to date", "dpo": "resumed", "merge": "ran"}
    dpo = manifest.read(dpo_dir)
    assert dpo["resumed_from"] is not None
    assert Path(dpo["resumed_from"]).name.startswith("checkpoint-")
    resumed_step = step_of(dpo["resumed_from"])
    assert resumed_step == killed_step  # the last complete checkpoint
    assert dpo["metrics"]["steps"] == 120
    assert dpo["metrics"]["step0"] is None  # the step-0 check belongs to a fresh start
    assert manifest.read(out / "merge")["parent"]["hash"] == manifest.directory_hash(dpo_dir)

    # the resumed run logs the steps after the checkpoint, up to the last one
    losses = all_losses(dpo_dir)
    after = losses[len(losses_before_kill):]
    assert after and after[0][0] > resumed_step and after[-1][0] == 120
    assert all(math.isfinite(v) for _, v in after)

    # ... and they are the losses an uninterrupted run logs at those steps
    expected = uninterrupted_losses(chain)
    assert expected.keys() >= {s for s, _ in after}
    for step, value in [*losses_before_kill, *after]:
        assert value == pytest.approx(expected[step], rel=1e-4, abs=1e-5), (step, value, expected[step])


def test_resume_skips_a_checkpoint_killed_while_being_saved(chain):
    """A kill while the trainer writes checkpoint-120 leaves its weights without trainer_state.json.
    The runner must resume from the last complete checkpoint (110), not crash on the partial one."""
    out, cfg = chain["out"], chain["cfg"]
    dpo_dir = out / "dpo"
    assert_ok(cli("run", cfg, *LONG_DPO))  # (up to date after the previous test)
    assert manifest.read(dpo_dir)["metrics"]["steps"] == 120
    assert {p.name for p in finished_checkpoints(dpo_dir)} >= {"checkpoint-110", "checkpoint-120"}
    expected = uninterrupted_losses(chain)

    # the state a SIGKILL during the save of checkpoint-120 leaves: no final output, no manifest
    (dpo_dir / "checkpoints" / "checkpoint-120" / "trainer_state.json").unlink()
    for name in (manifest.MANIFEST, "adapter_model.safetensors", "adapter_config.json"):
        (dpo_dir / name).unlink()
    logged = len(all_losses(dpo_dir))

    r = cli("run", cfg, *LONG_DPO)
    assert_ok(r)
    assert statuses(out) == {"format": "up to date", "sft": "up to date", "dpo": "resumed", "merge": "ran"}
    dpo = manifest.read(dpo_dir)
    assert step_of(dpo["resumed_from"]) == 110
    assert dpo["metrics"]["steps"] == 120
    after = all_losses(dpo_dir)[logged:]
    assert [s for s, _ in after] == [115, 120]
    for step, value in after:
        assert value == pytest.approx(expected[step], rel=1e-4, abs=1e-5), (step, value, expected[step])


# ---------------------------------------------------------------------------------------------
# template mismatch, dry run, bad input


def test_dpo_with_another_template_than_sft_fails_before_loading(chain, tiny_dir, demo_data, tmp_path):
    out = chain["out"]
    assert manifest.is_finished(out / "sft")
    sft_before = manifest_state(out / "sft")
    jinja = tmp_path / "other.jinja"
    jinja.write_text(OTHER_TEMPLATE)
    other_out = tmp_path / "other"
    other = write_yaml(tmp_path / "other.yaml",
                       chain_config(tiny_dir, demo_data, other_out, template__name=str(jinja)))
    assert_ok(cli("validate", other))  # the template itself is fine: its tokens are the tokenizer's

    t0 = time.time()
    r = cli("dpo", other, "--base", out / "sft")
    seconds = time.time() - t0
    line = assert_clean_error(r, "template")
    assert str(out / "sft") in line
    assert not manifest.is_finished(other_out / "dpo")
    assert not (other_out / "dpo").exists()  # refused before the output directory was prepared
    assert not (other_out / "dpo" / "checkpoints").exists()
    assert "Loading weights" not in r.stderr  # no model was loaded
    assert seconds < 120
    assert manifest_state(out / "sft") == sft_before


def test_dry_run_checks_the_chain_without_training(tiny_dir, demo_data, tmp_path):
    out = tmp_path / "out"
    cfg = write_yaml(tmp_path / "chain.yaml", chain_config(tiny_dir, demo_data, out))
    r = cli("run", "--dry-run", cfg)
    assert_ok(r)
    for stage in STAGES:
        assert f"{stage} (would be: running)" in r.stderr, r.stderr[-3000:]
    assert "sample 0" in r.stderr and "<|im_start|>" in r.stderr  # a rendered sample
    assert "sample 0 (chosen)" in r.stderr  # and one preference pair for dpo
    assert "dry run: 4 stages checked" in r.stderr
    assert "Loading weights" not in r.stderr
    for written in (manifest.MANIFEST, "*.safetensors", "checkpoints", "metrics.jsonl", "posttrain-chain.json"):
        assert not found(out, written), found(out, written)


@pytest.mark.parametrize("case", ["control without sft", "unknown stage", "--from not in stages",
                                  "merge after full dpo"])
def test_bad_chain_input_exits_2_with_one_line(case, tiny_dir, demo_data, tmp_path):
    out = tmp_path / "out"
    args: list = []
    if case == "control without sft":
        raw, needles = (chain_config(tiny_dir, demo_data, out, stages=["format", "control", "eval"]),
                        ["control", "no sft"])
    elif case == "unknown stage":
        raw, needles = chain_config(tiny_dir, demo_data, out, stages=["format", "sft", "rlhf"]), ["stages"]
    elif case == "--from not in stages":
        raw, needles = chain_config(tiny_dir, demo_data, out, stages=["format", "sft"]), ["--from", "dpo"]
        args = ["--from", "dpo"]
    else:
        raw = chain_config(tiny_dir, demo_data, out, dpo__method="full", dpo__reference="copy")
        needles = ["merge", "full", "no adapter to merge"]
    cfg = write_yaml(tmp_path / "chain.yaml", raw)
    r = cli("run", cfg, *args)
    assert_clean_error(r, *needles)
    assert not found(out, "posttrain-chain.json") and not found(out, manifest.MANIFEST)


# ---------------------------------------------------------------------------------------------
# The RLHF chain: format → sft → reward → ppo → dpo → merge


RLHF_STAGES = ["format", "sft", "reward", "ppo", "dpo", "merge"]


def rlhf_config(tiny_dir, demo_data, out: Path) -> dict:
    raw = chain_config(tiny_dir, demo_data, out, stages=list(RLHF_STAGES))
    raw["data"]["style"] = {"kind": "preference", "train": [{"path": str(demo_data / "reward_train.jsonl")}],
                            "eval": [{"path": str(demo_data / "reward_eval.jsonl")}]}
    raw["reward"] = {"data": "style", "training": {
        "max_steps": 20, "per_device_train_batch_size": 16, "learning_rate": 1e-3, "max_length": 64,
        "gradient_checkpointing": False, "logging_steps": 5, "save_steps": 1000}}
    raw["ppo"] = {"steps": 3, "batch_size": 8, "mini_batch_size": 4, "max_new_tokens": 8, "learning_rate": 1e-4,
                  "allow_weak_reward_model": True, "save_steps": 1000}
    return raw


def test_rlhf_chain_runs_and_reruns_ppo_when_the_reward_model_changes(tmp_path, tiny_dir, demo_data):
    out = tmp_path / "rlhf"
    cfg = write_yaml(tmp_path / "rlhf.yaml", rlhf_config(tiny_dir, demo_data, out))
    assert_ok(cli("run", cfg))
    summary = chain_summary(out)
    assert [s["stage"] for s in summary["stages"]] == RLHF_STAGES
    parents = {s["stage"]: s["parent"] for s in summary["stages"]}
    # the reward model branches off SFT; PPO starts from SFT and DPO from PPO
    assert parents["reward"] == parents["ppo"] == str(out / "sft")
    assert parents["dpo"] == str(out / "ppo")
    ppo = manifest.read(out / "ppo")
    assert ppo["reward_model"]["path"] == str(out / "reward")
    assert ppo["reward_model"]["hash"] == manifest.directory_hash(out / "reward")
    assert math.isfinite(ppo["metrics"]["score_last"]) and ppo["metrics"]["steps"] == 3
    # a retrained reward model reruns PPO (its key covers the reward stage) and what follows it
    assert_ok(cli("run", cfg, "--set", "reward.training.learning_rate=2e-3"))
    assert statuses(out) == {"format": "up to date", "sft": "up to date", "reward": "ran", "ppo": "ran",
                             "dpo": "ran", "merge": "ran"}
