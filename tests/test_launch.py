"""Several processes through accelerate (posttrain.launch), on CPU: `--num-processes 2` starts two
gloo processes with torchrun. Each training stage in 2 processes gives the same losses as 1 process
with the same global batch (per-device batch halved); only the main process writes outputs, and
adapters are non-empty. A user error in the launched processes is one line and exit 2, as in one
process. Unit tests for the launch plan, the relaunched command line and the shipped accelerate
configs.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from posttrain import launch, manifest
from posttrain.config import validate_dict
from posttrain.errors import PosttrainError
from tests.conftest import read_losses

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}
LORA = {"r": 8, "alpha": 16, "dropout": 0.0}
pytestmark = pytest.mark.usefixtures("one_thread")


def _training(batch: int, steps: int = 6, **extra) -> dict:
    return {"max_steps": steps, "per_device_train_batch_size": batch, "learning_rate": 3e-3, "logging_steps": 1,
            "save_steps": 1000, "max_length": 64, "gradient_checkpointing": False, **extra}


def _raw(tiny_dir, demo_data, out_root, **sections) -> dict:
    return {
        "model": {"name_or_path": str(tiny_dir)},
        "data": {
            # held-out data: SFT and DPO evaluate before training, which once left the model out of DDP
            "sft": {"kind": "sft", "train": [{"path": str(demo_data / "sft_train.jsonl")}],
                    "eval": [{"path": str(demo_data / "sft_eval.jsonl")}]},
            "preference": {"kind": "preference", "train": [{"path": str(demo_data / "pref_train.jsonl")}]},
            "reward": {"kind": "preference", "train": [{"path": str(demo_data / "reward_train.jsonl")}],
                       "eval": [{"path": str(demo_data / "reward_eval.jsonl")}]},
        },
        "output_dir": str(out_root),
        "seed": 0,
        **sections,
    }


@pytest.fixture(scope="module")
def sft_dir(tiny_dir, demo_data, tmp_path_factory):
    from posttrain.stages import sft

    root = tmp_path_factory.mktemp("launch_sft")
    return sft.run(validate_dict(_raw(tiny_dir, demo_data, root,
                                      sft={"training": _training(16, steps=300, logging_steps=50)})))


@pytest.fixture(scope="module")
def rm_dir(tiny_dir, demo_data, sft_dir, tmp_path_factory):
    from posttrain.stages import reward

    root = tmp_path_factory.mktemp("launch_rm")
    cfg = validate_dict(_raw(tiny_dir, demo_data, root, reward={"data": "reward", "training": _training(16, 10)}))
    return reward.run(cfg, base=str(sft_dir))


def _section(stage: str, per_device: int, rm_dir) -> dict:
    """The stage's settings with a per-device batch of `per_device` (global: × processes)."""
    if stage == "sft":
        return {"sft": {"method": "lora", "lora": LORA, "training": _training(per_device)}}
    if stage == "reward":
        return {"reward": {"data": "reward", "training": _training(per_device)}}
    if stage == "dpo":
        return {"dpo": {"method": "lora", "lora": LORA, "training": _training(per_device, learning_rate=1e-2)}}
    if stage == "dpo-precomputed":  # reference log-probs computed once, before training (trl#6403)
        return {"dpo": {"reference": "precomputed", "training": _training(per_device, learning_rate=1e-2)}}
    # PPO: one iteration, one mini-batch and one epoch, so the update sees the whole global batch at
    # once whatever the split; near-greedy sampling, so both layouts generate the same answers. Each
    # process samples with its own seed, so at temperature 1 (or once the updated policy has
    # near-ties) the answers, and everything after them, agree only in distribution.
    return {"ppo": {"reward_model": str(rm_dir), "steps": 1, "batch_size": per_device, "mini_batch_size": per_device,
                    "ppo_epochs": 1, "temperature": 0.01, "max_new_tokens": 16, "learning_rate": 1e-4,
                    "kl_cap": None,  # log-probs at temperature 0.01 are 100x sharper: KL in the tens of nats
                    "sample_every": 1000, "save_steps": 1000}}


def _cli(*args, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "posttrain", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=ENV, timeout=timeout)


def _losses(out: Path, stage: str) -> dict[int, dict]:
    """Per logged step, the numbers the two layouts must agree on."""
    keys = ("loss",) if stage != "ppo" else ("score", "value_loss", "policy_loss", "grad_norm", "response_length")
    found = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if any(k in rec for k in keys) and rec.get("step"):
            found[rec["step"]] = {k: rec[k] for k in keys if k in rec}
    return found


@pytest.mark.parametrize("case", ["sft", "reward", "dpo", "dpo-precomputed", "ppo"])
def test_two_processes_give_the_losses_of_one_with_the_same_global_batch(case, tiny_dir, demo_data, sft_dir, rm_dir,
                                                                         tmp_path):
    stage = case.split("-")[0]
    runs = {}
    for processes, per_device in ((1, 8), (2, 4)):
        root = tmp_path / f"p{processes}"
        cfg = tmp_path / f"p{processes}.yaml"
        cfg.write_text(yaml.safe_dump(_raw(tiny_dir, demo_data, root / "chain", **_section(case, per_device, rm_dir))))
        base = () if stage == "sft" else ("--base", sft_dir)
        r = _cli(stage, cfg, *base, "-o", root / stage, "--num-processes", processes)
        assert r.returncode == 0, r.stderr[-4000:]
        runs[processes] = root
    one, two = (runs[n] / stage for n in (1, 2))
    m1, m2 = (manifest.read(d)["metrics"] for d in (one, two))
    if stage == "ppo":
        assert m2["processes"] == 2 and m2["distribution"] == "2 processes, DDP over gloo"
        assert m1["distribution"] == "1 process"
    else:
        assert m1["global_batch_size"] == m2["global_batch_size"]
        assert m2["speed"].endswith("2 processes, DDP over gloo") and m1["speed"].endswith("1 process")
    assert "launching 2 processes" in r.stdout + r.stderr
    a, b = _losses(one, stage), _losses(two, stage)
    assert a and a.keys() == b.keys(), (a, b)
    for step in a:
        for k in a[step]:
            assert math.isclose(a[step][k], b[step][k], rel_tol=2e-4, abs_tol=1e-6), (stage, step, k, a[step], b[step])
    if stage == "ppo":  # the update itself: the same weights after it
        from safetensors.torch import load_file

        w1, w2 = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
        assert w1.keys() == w2.keys() and all(torch.allclose(w1[k], w2[k], atol=1e-6) for k in w1)
        assert any(not torch.equal(w1[k], t) for k, t in load_file(str(sft_dir / "model.safetensors")).items())
    if stage == "sft":  # the compared losses move (equal constants would agree whatever the layout)
        assert read_losses(two)[1] != read_losses(two)[max(read_losses(two))]
    # one set of outputs, written by the main process
    assert [p.relative_to(runs[2]) for p in runs[2].rglob(manifest.MANIFEST)] == [Path(stage) / manifest.MANIFEST]
    if case in ("sft", "dpo"):  # LoRA: the saved adapter holds trained (non-zero) B matrices
        with safe_open(str(two / "adapter_model.safetensors"), "pt") as f:
            lora_b = [f.get_tensor(k) for k in f.keys() if "lora_B" in k]
        assert lora_b and all(t.abs().sum() > 0 for t in lora_b)


def test_a_user_error_in_launched_processes_is_one_line_and_exit_2(tiny_dir, demo_data, tmp_path):
    raw = _raw(tiny_dir, demo_data, tmp_path / "chain", sft={"training": _training(4)})
    raw["data"]["sft"]["train"] = [{"path": str(demo_data / "pref_train.jsonl")}]  # pairs where SFT wants messages
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    r = _cli("sft", cfg, "-o", tmp_path / "sft", "--num-processes", 2)
    assert r.returncode == 2, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    # once, not per process
    assert len(errors) == 1 and "cannot tell the shape of SFT data" in errors[0], r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "ChildFailedError" not in r.stderr
    assert not manifest.is_finished(tmp_path / "sft")


# ---------------------------------------------------------------------------------------------
# The plan and the command line (no processes started)


def _cfg(**launch_section):
    return validate_dict({"model": {"name_or_path": "m"}, "stages": [], "launch": launch_section})


def test_plan(monkeypatch):
    for k in ("LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    assert launch.plan(_cfg(), None, None) is None
    assert launch.plan(_cfg(num_processes=4, distributed="fsdp"), None, None)["num_processes"] == 4
    assert launch.plan(_cfg(num_processes=4), 2, "fsdp") == {"num_processes": 2, "strategy": "fsdp",
                                                              "config_file": None}
    assert launch.plan(_cfg(num_processes=4), 1, None) is None  # the command line wins
    with pytest.raises(PosttrainError, match="needs --num-processes 2"):
        launch.plan(_cfg(), None, "fsdp")
    with pytest.raises(PosttrainError, match="not a strategy"):
        launch.plan(_cfg(), 2, "zero4")
    with pytest.raises(PosttrainError, match="does not exist"):
        launch.plan(_cfg(config_file="/nope/acc.yaml"), 2, None)
    monkeypatch.setenv("LOCAL_RANK", "0")  # inside a launched process: never launch again
    assert launch.plan(_cfg(num_processes=4), None, None) is None


def test_deepspeed_strategies_need_deepspeed(monkeypatch):
    import importlib.util

    for k in ("LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    with pytest.raises(PosttrainError, match="deepspeed is not installed"):
        launch.plan(_cfg(), 2, "zero3")


def test_the_relaunched_command_drops_the_launch_options(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)  # the CPU command, on any machine
    argv = ["--debug", "sft", "c.yaml", "--num-processes", "2", "--distributed=ddp", "-o", "out", "--set", "a=1"]
    assert launch.strip_launch_options(argv) == ["--debug", "sft", "c.yaml", "-o", "out", "--set", "a=1"]
    assert launch.stage_argv("dpo", "c.yaml", ["a=1"], base="b", output="o", resume=True, overwrite=False,
                             debug=True) == ["--debug", "dpo", "c.yaml", "--set", "a=1", "--base", "b", "-o", "o",
                                             "--resume"]
    custom, _ = launch.command({"num_processes": 4, "strategy": "custom", "config_file": Path("mine.yaml")}, argv)
    assert "--mixed_precision" not in custom and "--num_machines" not in custom  # the user's file decides
    cmd, env = launch.command({"num_processes": 2, "strategy": "ddp", "config_file": Path("x.yaml")}, argv)
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"] and "--multi_gpu" in cmd
    assert cmd[cmd.index("--num_processes") + 1] == "2" and cmd[cmd.index("--mixed_precision") + 1] == "no"
    assert cmd[cmd.index("-m", 3):] == ["-m", "posttrain", "--debug", "sft", "c.yaml", "-o", "out", "--set", "a=1"]
    assert env["CUDA_VISIBLE_DEVICES"] == ""  # no GPU here: gloo processes on the CPU


@pytest.mark.parametrize("strategy", ["fsdp", "zero2", "zero3"])
def test_sharding_on_cpus_is_refused_before_launching(strategy, monkeypatch):
    """accelerate 1.15 shards only over GPUs: asked for FSDP on CPUs it runs plain DDP."""
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(PosttrainError, match="needs CUDA GPUs") as e:
        launch.command({"num_processes": 2, "strategy": strategy, "config_file": Path("x.yaml")}, ["sft", "c.yaml"])
    assert "--distributed ddp" in e.value.fix


def test_fsdp_launched_by_hand_on_cpus_stops_instead_of_running_ddp(tiny_dir, demo_data, tmp_path):
    """`accelerate launch --config_file configs/accelerate/fsdp.yaml -m posttrain sft` with no GPU:
    accelerate quietly sets up DDP over gloo instead (each process holding the whole model); both
    processes stop with one line before training, and nothing finished is left."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(_raw(tiny_dir, demo_data, tmp_path, sft={"training": _training(4)})))
    out = tmp_path / "sft"
    r = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                        str(ROOT / "configs" / "accelerate" / "fsdp.yaml"), "--num_processes", "2",
                        "--mixed_precision", "no", "--main_process_port", "0", "-m", "posttrain", "sft", str(cfg),
                        "-o", str(out)], capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=600)
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and all("asked for FSDP, but accelerate set up 2 processes, DDP over gloo" in e
                                    for e in errors), r.stderr[-3000:]
    assert not manifest.is_finished(out) and not (out / "model.safetensors").exists()


def test_posttrains_ppo_refuses_sharded_processes(monkeypatch):
    """PPO generates from and saves whole weights: under FSDP or ZeRO it stops with one line."""
    from types import SimpleNamespace

    import accelerate.state
    from accelerate.state import DistributedType

    for kind, plugin in ((DistributedType.FSDP, "fsdp_plugin"), (DistributedType.DEEPSPEED, "deepspeed_plugin")):
        fake = SimpleNamespace(distributed_type=kind, num_processes=4, fsdp_plugin=SimpleNamespace(fsdp_version=2),
                               deepspeed_plugin=SimpleNamespace(zero_stage=3))
        monkeypatch.setattr(accelerate.state, "AcceleratorState", type("S", (), {"_shared_state": {"x": 1},
                                                                              "__new__": lambda cls: fake}))
        assert launch.distribution() == f"4 processes, {'FSDP2' if plugin == 'fsdp_plugin' else 'DeepSpeed ZeRO-3'}"
        with pytest.raises(PosttrainError, match="PPO runs on several processes with DDP only"):
            launch.distribution(sharded=False)


@pytest.mark.parametrize("strategy", launch.STRATEGIES)
def test_shipped_accelerate_configs_are_what_posttrain_launches(strategy):
    from accelerate.commands.config.config_args import load_config_from_file

    path = ROOT / "configs" / "accelerate" / f"{strategy}.yaml"
    assert yaml.safe_load(path.read_text()) == launch.accelerate_config(strategy)
    loaded = load_config_from_file(str(path))  # accelerate itself reads it
    assert loaded.distributed_type.value == {"ddp": "MULTI_GPU", "fsdp": "FSDP"}.get(strategy, "DEEPSPEED")


def test_run_under_a_launcher_is_refused(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"name_or_path": "m"}, "stages": []}))
    r = subprocess.run([sys.executable, "-m", "posttrain", "run", str(cfg)], capture_output=True, text=True,
                       cwd=ROOT, env={**ENV, "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, timeout=120)
    assert r.returncode == 2 and "--num-processes" in r.stderr and "Traceback" not in r.stderr


def test_the_chain_launches_its_training_stages(tiny_dir, demo_data, tmp_path):
    """`posttrain run --num-processes 2`: format runs once in the chain's process; sft and dpo each
    run in 2 launched processes; the record says so; a second run skips everything."""
    raw = _raw(tiny_dir, demo_data, tmp_path / "chain", stages=["format", "sft", "dpo"],
               sft={"training": _training(4)}, dpo={"method": "lora", "lora": LORA, "training": _training(4)})
    cfg = tmp_path / "chain.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    r = _cli("run", cfg, "--num-processes", 2)
    assert r.returncode == 0, r.stderr[-4000:]
    assert (r.stdout + r.stderr).count("launching 2 processes") == 2  # sft and dpo, not format
    for stage in ("format", "sft", "dpo"):
        assert manifest.is_finished(tmp_path / "chain" / stage)
    sft_metrics = manifest.read(tmp_path / "chain" / "sft")["metrics"]
    assert sft_metrics["global_batch_size"] == 8  # 2 processes x 4
    again = _cli("run", cfg, "--num-processes", 2)
    assert again.returncode == 0 and "launching" not in again.stdout + again.stderr
    record = json.loads((tmp_path / "chain" / "posttrain-chain.json").read_text())
    assert [s["status"] for s in record["stages"]] == ["up to date"] * 3


def test_sigterm_stops_every_process_at_the_same_step_and_resume_finishes_the_run(tiny_dir, demo_data, tmp_path):
    """SIGTERM to `posttrain sft --num-processes 2`: the processes agree on the step to stop at,
    save one checkpoint, the command exits 143 with one line; --resume in 2 processes ends with
    the losses of an uninterrupted 2-process run."""
    import signal
    import time

    raw = _raw(tiny_dir, demo_data, tmp_path / "chain", sft={"training": _training(4, steps=40)})
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    whole = tmp_path / "whole"
    assert _cli("sft", cfg, "-o", whole, "--num-processes", 2).returncode == 0
    out = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, "-m", "posttrain", "sft", str(cfg), "-o", str(out), "--num-processes",
                             "2"], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and len(read_losses(out) if (out / "metrics.jsonl").exists() else {}) < 5:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "stopped by SIGTERM" in lines[0], stderr[-3000:]
    checkpoints = sorted((out / "checkpoints").glob("checkpoint-*"))
    assert len(checkpoints) == 1 and not manifest.is_finished(out)
    stopped_at = int(checkpoints[0].name.split("-")[1])
    assert 5 <= stopped_at < 40
    r = _cli("sft", cfg, "-o", out, "--num-processes", 2, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = read_losses(whole), read_losses(out)
    assert a.keys() == b.keys() and all(math.isclose(a[k], b[k], rel_tol=1e-6) for k in a), (a, b)
