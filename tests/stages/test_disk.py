"""Checkpoint rotation keeps the newest checkpoints and the best one (held-out loss for the TRL
stages, reward for PPO), and the manifest records which is which. (Disk faults, posttrain.disk:
tests/test_disk.py; the trainer arguments that pick the best checkpoint: stages/test_common.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from posttrain import manifest
from posttrain.stages import checkpoints, sft
from tests.conftest import read_losses

pytestmark = pytest.mark.slow

# ---------------------------------------------------------------------------------------------
# Rotation keeps the newest and the best


def test_rotation_keeps_the_best_checkpoint(make_config, demo_data, tmp_path):
    """With eval data, the held-out loss at every save picks the best checkpoint, which rotation
    keeps besides the newest. `greater_is_better` makes the best the first checkpoint (the loss
    falls from the start), so it is not also the newest: without the best-keeping defaults,
    save_total_limit 2 would leave checkpoints 15 and 20."""
    cfg = make_config(sft__training={"max_steps": 20, "per_device_train_batch_size": 8, "learning_rate": 3e-3,
                                     "logging_steps": 5, "save_steps": 5, "save_total_limit": 2,
                                     "greater_is_better": True, "max_length": 64,
                                     "gradient_checkpointing": False},
                      data__sft__eval=[{"path": str(demo_data / "sft_eval.jsonl"), "limit": 32}])
    out = sft.run(cfg, output=str(tmp_path / "sft"))
    evals = {json.loads(x)["step"]: json.loads(x)["eval_loss"] for x in (out / "metrics.jsonl").read_text().splitlines()
             if "eval_loss" in json.loads(x)}
    assert {5, 10, 15, 20} <= set(evals)
    assert evals[5] > evals[10] > evals[20]  # so the "best" under greater_is_better is checkpoint-5
    record = manifest.read(out)["checkpoints"]
    assert record["best"] == "checkpoint-5" and record["best_metric"] == pytest.approx(evals[5])
    assert record["kept"] == ["checkpoint-5", "checkpoint-20"]
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == ["checkpoint-20", "checkpoint-5"]
    assert read_losses(out)  # trained


def test_ppo_rotation_keeps_the_newest_and_the_best_reward():
    names = [Path(f"c/checkpoint-{i}") for i in (10, 20, 30, 40)]
    assert checkpoints.rotated(names, 2, "c/checkpoint-10") == [names[1], names[2]]  # keep 10 (best), 40 (newest)
    assert checkpoints.rotated(names, 2, "c/checkpoint-40") == [names[0], names[1]]  # best is newest: keep 30, 40
    assert checkpoints.rotated(names, 1, "c/checkpoint-20") == [names[0], names[2]]  # limit 1 still keeps both
    assert checkpoints.rotated(names, 2, None) == [names[0], names[1]]
    assert checkpoints.rotated([], 2, None) == []
    best = (None, None)
    for name, reward in [("a", 0.5), ("b", 0.9), ("c", 0.7)]:
        best = checkpoints.best_by_reward(best, name, reward)
    assert best == ("b", 0.9)
