"""SIGTERM / SIGINT during training: the stage finishes the step under way, saves a checkpoint,
says so in one line and exits with 128 + the signal, leaving no finished-looking output; the
same command with --resume continues from that checkpoint and logs the losses an uninterrupted
run logs. SFT, reward and DPO through the real CLI (PPO's is in test_ppo.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from posttrain import manifest

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "TOKENIZERS_PARALLELISM": "false"}
STEPS = 60
TRAINING = {"max_steps": STEPS, "per_device_train_batch_size": 8, "learning_rate": 1e-3, "logging_steps": 1,
            "save_steps": 1000, "max_length": 64, "gradient_checkpointing": False}

pytestmark = pytest.mark.slow


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "posttrain.cli", *map(str, args)]


def _losses(out: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def _config(tmp_path: Path, tiny_dir, demo_data) -> Path:
    raw = {
        "model": {"name_or_path": str(tiny_dir)},
        "data": {
            "sft": {"kind": "sft", "train": [{"path": str(demo_data / "sft_train.jsonl")}]},
            "style": {"kind": "preference", "train": [{"path": str(demo_data / "reward_train.jsonl")}]},
        },
        "output_dir": str(tmp_path / "out"), "seed": 0,
        "sft": {"training": dict(TRAINING)},
        "reward": {"data": "style", "training": dict(TRAINING)},
        "dpo": {"data": "style", "method": "lora", "reference": "adapter_disabled",
                "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "training": dict(TRAINING)},
    }
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(raw, sort_keys=False))
    return p


@pytest.mark.parametrize(("stage", "sig"), [("sft", signal.SIGTERM), ("reward", signal.SIGINT),
                                             ("dpo", signal.SIGTERM)])
def test_a_signal_saves_a_checkpoint_and_the_resumed_run_matches(stage, sig, tiny_dir, demo_data, tmp_path):
    cfg = _config(tmp_path, tiny_dir, demo_data)
    base = ["--base", tiny_dir]
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    r = subprocess.run(_cli(stage, cfg, *base, "-o", whole), capture_output=True, text=True, cwd=ROOT, env=ENV,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    expected = dict(_losses(whole))
    assert sorted(expected) == list(range(1, STEPS + 1))

    log = tmp_path / "stopped.log"
    with log.open("w") as f:
        proc = subprocess.Popen(_cli(stage, cfg, *base, "-o", stopped), stdout=subprocess.DEVNULL, stderr=f,
                                cwd=ROOT, env=ENV)
        try:
            deadline = time.time() + 300
            while not ((stopped / "metrics.jsonl").is_file() and len(_losses(stopped)) >= 3):
                assert proc.poll() is None, f"exited ({proc.returncode}) early:\n{log.read_text()[-3000:]}"
                assert time.time() < deadline, "training did not start within 300 s"
                time.sleep(0.02)
            proc.send_signal(sig)
            proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
    err = log.read_text()
    assert proc.returncode == 128 + sig, (proc.returncode, err[-3000:])
    lines = [x for x in err.splitlines() if x.startswith("error: ")]
    assert len(lines) == 1 and f"stopped by {sig.name} at step" in lines[0] and "--resume" in lines[0], err[-3000:]
    assert "Traceback" not in err
    at = int(lines[0].split(" at step ")[1].split(";")[0])
    assert at < STEPS
    checkpoint = stopped / "checkpoints" / f"checkpoint-{at}"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == at
    assert not manifest.is_finished(stopped)  # nothing looks finished

    r = subprocess.run(_cli(stage, cfg, *base, "-o", stopped, "--resume"), capture_output=True, text=True,
                       cwd=ROOT, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert manifest.read(stopped)["resumed_from"] == str(checkpoint)
    got = _losses(stopped)
    assert {s for s, _ in got} == set(range(1, STEPS + 1))
    for step, value in got:  # before the stop and after the resume: the uninterrupted run's losses
        assert value == pytest.approx(expected[step], rel=1e-4, abs=1e-6), (step, value, expected[step])
