"""posttrain.hub / `posttrain push`: everything up to the upload call (what goes up, what is
refused, what reaches huggingface_hub), and the one-line failure when the Hub is out of reach
(our machines cannot reach it: the upload itself is not tested)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from posttrain import chain, hub, report
from posttrain.config import validate_dict
from posttrain.errors import PosttrainError
from tests.helpers import ENV, ROOT

SHIPPED = ["README.md", "chat_template.jinja", "config.json", "generation_config.json", "model.safetensors",
           "posttrain.json", "tokenizer.json", "tokenizer_config.json"]


def _stage(d: Path, stage: str = "sft", *, adapter_base: str | None = None) -> Path:
    d.mkdir(parents=True)
    for name in SHIPPED:
        (d / name).write_text("{}")
    (d / "posttrain.json").write_text(json.dumps({"stage": stage, "adapter_base": adapter_base}))
    for name in ("training_args.bin", "metrics.jsonl", "samples.jsonl", "config.resolved.yaml",
                 "posttrain.started.json", "optimizer.pt"):
        (d / name).write_text("x")
    (d / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (d / "checkpoints" / "checkpoint-2" / "model.safetensors").write_text("x")
    return d


def test_only_what_a_user_of_the_model_needs_goes_up(tmp_path):
    assert hub.files_to_push(_stage(tmp_path / "sft")) == SHIPPED


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: (d / "posttrain.json").unlink(), "is not a finished stage"),
    (lambda d: (d / "posttrain.json").write_text('{"stage": "format"}'), "the format stage, which is not a model"),
    (lambda d: (d / "posttrain.json").write_text('{"stage": "eval"}'), "holds the eval stage, which is not a model"),
    (lambda d: (d / "model.safetensors").unlink(), "has no safetensors weights"),
    (lambda d: (d / "README.md").unlink(), "has no model card"),
])
def test_refusals(change, message, tmp_path):
    d = _stage(tmp_path / "sft")
    change(d)
    with pytest.raises(PosttrainError, match=message):
        hub.files_to_push(d)


def test_an_adapter_on_a_local_base_is_warned_about(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    d = _stage(tmp_path / "dpo", "dpo", adapter_base=str(base))
    (d / "config.json").unlink()
    (d / "adapter_config.json").write_text("{}")
    assert "local path" in hub.local_base_warning(d)
    (d / "posttrain.json").write_text(json.dumps({"stage": "dpo", "adapter_base": "HuggingFaceTB/SmolLM2-135M"}))
    assert hub.local_base_warning(d) is None  # a Hub id: whoever downloads the adapter can load its base
    assert hub.local_base_warning(_stage(tmp_path / "sft")) is None  # a full model has no base to load


class _Recorder:
    calls: list = []

    def __init__(self, *args, **kwargs):
        pass

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs.pop("repo_id"), kwargs))
        return type("Info", (), {"commit_url": "https://hub/commit/1"})()


def test_push_hands_huggingface_hub_the_file_list_and_settings(tmp_path, monkeypatch):
    import huggingface_hub

    _Recorder.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", _Recorder)
    d = _stage(tmp_path / "sft")
    assert hub.push(d, "you/model", private=True, revision="v1") == "https://hub/commit/1"
    (_, repo, create), (_, _, branch), (_, _, upload) = _Recorder.calls
    assert repo == "you/model" and create == {"private": True, "exist_ok": True}
    assert branch == {"branch": "v1", "exist_ok": True}
    assert upload["allow_patterns"] == SHIPPED and upload["folder_path"] == str(d) and upload["revision"] == "v1"
    assert "token" not in create and "token" not in upload  # huggingface_hub finds the token itself


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}])
def test_push_out_of_reach_is_one_line(env, tmp_path):
    d = _stage(tmp_path / "sft")
    r = subprocess.run([sys.executable, "-m", "posttrain", "push", str(d), "you/model"], capture_output=True,
                       text=True, cwd=ROOT, env={**ENV, "HF_TOKEN": "hf_PLANTEDsecret0123456789", **env}, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: push to 'you/model' failed:"), r.stderr
    assert "Traceback" not in r.stderr and "hf_PLANTED" not in r.stdout + r.stderr


def _chain_raw(out: Path, **push) -> dict:
    return {"model": {"name_or_path": "m"}, "output_dir": str(out), "stages": ["format", "sft", "reward"],
            "data": {"sft": {"kind": "sft", "train": [{"path": "s.jsonl"}]},
                     "preference": {"kind": "preference", "train": [{"path": "p.jsonl"}]}},
            "reward": {"data": "preference"}, "push": push}


def test_the_chain_ends_with_the_configured_push(tmp_path, monkeypatch):
    """`posttrain run` with push.repo_id uploads the chain's last policy stage after the report."""
    cfg = validate_dict(_chain_raw(tmp_path / "out", repo_id="you/model", private=True))
    assert cfg.push_stage() == "sft"  # reward is a judge, not the policy
    pushed = []
    monkeypatch.setattr(chain, "decide", lambda step, key, forced: "up to date")
    monkeypatch.setattr(report, "write", lambda d: (Path(d) / "report.md", Path(d) / "report.html"))
    monkeypatch.setattr(hub, "push", lambda d, repo, **kw: pushed.append((Path(d), repo, kw)))
    for stage in cfg.stages:  # finished and up to date, as decide says
        (tmp_path / "out" / stage).mkdir(parents=True)
        (tmp_path / "out" / stage / "posttrain.json").write_text(json.dumps(
            {"stage": stage, "inputs_key": "k", "metrics": {"wall_time_s": 1.0}}))
    chain.run(cfg)
    assert pushed == [(tmp_path / "out" / "sft", "you/model", {"private": True, "revision": None})]
    pushed.clear()
    chain.run(validate_dict(_chain_raw(tmp_path / "out")))  # no repo_id: no upload
    assert pushed == []


@pytest.mark.parametrize("stage", ["dpo", "format"])
def test_push_stage_must_be_a_model_stage_of_the_chain(stage, tmp_path):
    with pytest.raises(PosttrainError, match=f"push.stage '{stage}' is not a model stage of stages"):
        validate_dict(_chain_raw(tmp_path, repo_id="you/model", stage=stage))
    # the reward model is a model: pushed when asked for
    assert validate_dict(_chain_raw(tmp_path, repo_id="you/model", stage="reward")).push_stage() == "reward"
