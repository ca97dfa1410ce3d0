"""Interrupted training resumes to the losses of an uninterrupted run, through the real CLI.

SIGTERM / SIGINT: the stage finishes the step under way, saves a checkpoint, says so in one line
and exits with 128 + the signal, leaving no finished-looking output. SIGKILL: nothing can be
saved, the last periodic checkpoint is what is left. Either way the same command with --resume
continues from the checkpoint and logs the losses an uninterrupted run logs. SFT, reward and
DPO here; PPO's are in test_ppo.py, the chain's (DPO under `posttrain run`) in test_chain.py."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from posttrain import manifest
from tests.conftest import finished_checkpoints
from tests.helpers import ENV, ROOT, STEPS
from tests.helpers import signals_config as _config

pytestmark = pytest.mark.slow


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "posttrain.cli", *map(str, args)]


def _losses(out: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


@pytest.mark.parametrize(("stage", "sig"), [
    pytest.param(stage, sig, id=f"{stage}-{sig.name}")
    for stage, sig in [("sft", signal.SIGTERM), ("reward", signal.SIGINT), ("dpo", signal.SIGTERM),
                       ("sft", signal.SIGKILL), ("reward", signal.SIGKILL)]])
def test_an_interrupted_run_resumes_to_the_same_losses(stage, sig, tiny_dir, demo_data, tmp_path):
    cfg = _config(tmp_path, tiny_dir, demo_data)
    killed = sig == signal.SIGKILL
    base = ["--base", tiny_dir, *(["--set", f"{stage}.training.save_steps=10"] if killed else [])]
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
            # SIGKILL once a periodic checkpoint exists; the others a few logged steps in
            while not (finished_checkpoints(stopped) if killed
                       else (stopped / "metrics.jsonl").is_file() and len(_losses(stopped)) >= 3):
                assert proc.poll() is None, f"exited ({proc.returncode}) early:\n{log.read_text()[-3000:]}"
                assert time.time() < deadline, "training did not start within 300 s"
                time.sleep(0.02)
            proc.send_signal(sig)
            proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
    err = log.read_text()
    if killed:
        assert proc.returncode == -signal.SIGKILL
        checkpoint = finished_checkpoints(stopped)[-1]
        at = int(checkpoint.name.split("-")[1])
    else:
        assert proc.returncode == 128 + sig, (proc.returncode, err[-3000:])
        lines = [x for x in err.splitlines() if x.startswith("error: ")]
        assert len(lines) == 1 and f"stopped by {sig.name} at step" in lines[0] and "--resume" in lines[0], \
            err[-3000:]
        assert "Traceback" not in err
        at = int(lines[0].split(" at step ")[1].split(";")[0])
        checkpoint = stopped / "checkpoints" / f"checkpoint-{at}"
    assert at < STEPS
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


@pytest.mark.parametrize("damage", ["model.safetensors", "optimizer.pt"])
def test_a_truncated_last_checkpoint_falls_back_to_the_one_before(damage, tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    from posttrain.stages import checkpoints

    for step in (10, 20):
        d = tmp_path / "checkpoints" / f"checkpoint-{step}"
        d.mkdir(parents=True)
        save_file({"w": torch.randn(64, 64)}, str(d / "model.safetensors"))
        torch.save({"state": torch.randn(64, 64)}, d / "optimizer.pt")
        (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    assert checkpoints.last_checkpoint(tmp_path).name == "checkpoint-20"  # all readable: the newest

    target = tmp_path / "checkpoints" / "checkpoint-20" / damage
    with target.open("r+b") as f:  # a copy cut short / a full disk
        f.truncate(target.stat().st_size // 2)
    assert checkpoints.last_checkpoint(tmp_path).name == "checkpoint-10"
    assert f"checkpoint-20 is damaged ({damage}" in " ".join(capsys.readouterr().err.split())

    older = tmp_path / "checkpoints" / "checkpoint-10" / damage
    with older.open("r+b") as f:
        f.truncate(10)
    assert checkpoints.last_checkpoint(tmp_path) is None
