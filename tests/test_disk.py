"""posttrain.disk: what a stage writes, checked against the free space, and a disk that fills.

- Not enough free space for the weights and checkpoints: refused before the first step.
- The disk fills while a checkpoint is written: one line, exit 2, the checkpoints before it intact,
  nothing finished-looking, and --resume continues from the last complete one.
- The estimate, the free-space check and the recognised out-of-space errors, unit by unit.

The CLI runs in a subprocess whose `shutil.disk_usage` or `torch.save` is replaced (a real full
disk can't be made without privileges); everything else is the real code path."""

from __future__ import annotations

import errno
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from posttrain import disk, manifest
from posttrain.errors import PosttrainError
from posttrain.stages import checkpoints
from tests.conftest import finished_checkpoints, read_losses
from tests.helpers import ENV, ROOT, TRAINING
from tests.helpers import signals_config as _config

RUN_CLI = """
import runpy, sys
{patch}
sys.argv = ["posttrain", *sys.argv[1:]]
runpy.run_module("posttrain.cli", run_name="__main__")
"""

SMALL_DISK = """
import shutil
_usage = shutil.disk_usage
shutil.disk_usage = lambda p: _usage(p)._replace(free=100_000)
"""

FULL_AT_SECOND_CHECKPOINT = """
import errno, torch
_save = torch.save
def save(obj, f, *args, **kwargs):
    if "checkpoint-20" in str(f) and str(f).endswith("optimizer.pt"):
        with open(f, "wb") as out:
            out.write(b"PK\\x03\\x04 cut short")
        raise OSError(errno.ENOSPC, "No space left on device", str(f))
    return _save(obj, f, *args, **kwargs)
torch.save = save
"""


def _run(patch: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", RUN_CLI.format(patch=patch), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=600)


def _one_error_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr
    lines = [x for x in r.stderr.splitlines() if x.startswith("error: ")]
    assert len(lines) == 1, r.stderr[-3000:]
    return lines[0]


def _du(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------------
# Free space before training


@pytest.mark.slow
def test_too_little_free_space_is_refused_before_the_first_step(tiny_dir, demo_data, tmp_path):
    cfg = _config(tmp_path, tiny_dir, demo_data)
    out = tmp_path / "sft"
    line = _one_error_line(_run(SMALL_DISK, "sft", cfg, "--base", tiny_dir, "-o", out))
    assert "0.1 MB free" in line and "this stage writes about" in line and "--output" in line
    assert not (out / "metrics.jsonl").exists()  # no step ran
    assert not finished_checkpoints(out) and not manifest.is_finished(out)


def test_the_estimate_counts_weights_adapters_and_checkpoints():
    model = torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.Linear(10, 10))  # 220 fp32 parameters
    weights, adam, files = 220 * 4, 220 * 8, disk.PER_DIRECTORY
    assert disk.stage_bytes(model, checkpoints=0) == int(1.1 * (weights + files))
    assert disk.stage_bytes(model, checkpoints=3) == int(1.1 * (weights + 3 * (weights + adam) + 4 * files))
    model[0].requires_grad_(False)
    model.peft_config = {}  # an adapter model saves only what trains: 110 parameters
    assert disk.stage_bytes(model, checkpoints=1) == int(1.1 * (110 * 4 + 110 * 4 + 110 * 8 + 2 * files))
    # rotation writes the next checkpoint before deleting the oldest; the best is kept aside
    assert disk.checkpoints_held(2, saves=10, keep_best=False) == 3
    assert disk.checkpoints_held(2, saves=10, keep_best=True) == 4
    assert disk.checkpoints_held(2, saves=2, keep_best=True) == 2
    assert disk.checkpoints_held(None, saves=5, keep_best=False) == 5
    assert disk.checkpoints_held(2, saves=0, keep_best=True) == 0


def test_free_space_check(tmp_path, monkeypatch):
    free = disk.shutil.disk_usage(tmp_path).free
    disk.check_free_space(tmp_path / "not" / "yet", free // 2, "x")  # looks at the nearest existing parent
    with pytest.raises(PosttrainError, match="this stage writes about"):
        disk.check_free_space(tmp_path, free * 2, "the weights and 3 checkpoints")


@pytest.mark.parametrize(("error", "full"), [
    (OSError(errno.ENOSPC, "No space left on device"), True),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), True),
    (RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space "
                  "left on device\" })"), True),  # safetensors
    (RuntimeError("[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing file "
                  "data/0: file write failed"), True),  # torch.save
    (OSError(errno.EACCES, "Permission denied"), False),
    (ValueError("shapes do not match"), False),
])
def test_out_of_space_is_recognised(error, full):
    assert disk.is_out_of_space(error) is full


# ---------------------------------------------------------------------------------------------
# The disk fills during a checkpoint


@pytest.mark.slow
def test_a_full_disk_while_saving_keeps_earlier_checkpoints_and_resumes(tiny_dir, demo_data, tmp_path):
    cfg = _config(tmp_path, tiny_dir, demo_data)
    out = tmp_path / "sft"
    args = ("sft", cfg, "--base", tiny_dir, "-o", out, "--set", "sft.training.save_steps=10",
            "--set", "sft.training.save_total_limit=3")
    line = _one_error_line(_run(FULL_AT_SECOND_CHECKPOINT, *args))
    assert "disk looks full" in line and "No space left on device" in line and "--resume" in line
    assert not manifest.is_finished(out)
    assert [p.name for p in finished_checkpoints(out)] == ["checkpoint-10"]  # intact
    assert not (out / "checkpoints" / "checkpoint-20" / "trainer_state.json").exists()
    assert checkpoints.last_checkpoint(out).name == "checkpoint-10"

    r = subprocess.run([sys.executable, "-m", "posttrain.cli", *map(str, args), "--resume"], capture_output=True,
                       text=True, cwd=ROOT, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    m = manifest.read(out)
    assert m["resumed_from"] == str(out / "checkpoints" / "checkpoint-10")
    assert sorted(read_losses(out)) == list(range(1, TRAINING["max_steps"] + 1))
    # the estimate made before training covers what the run left on disk (and not by orders of magnitude)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    estimate = disk.stage_bytes(model, checkpoints=len(m["checkpoints"]["kept"]))
    assert _du(out) <= estimate <= 100 * _du(out)
