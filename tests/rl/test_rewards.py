"""posttrain.rl.rewards: the weak-reward-model gate, here without a recorded accuracy (`small_rm`,
a reward stage of a few steps: conftest.py).

Loading, scoring and the saved-head and pad checks run on trained reward models, next to the
stages that train them: stages/test_reward.py, stages/test_ppo.py, stages/test_combinations.py.
"""

from __future__ import annotations

import shutil

import pytest

from posttrain import manifest
from posttrain.errors import PosttrainError

pytestmark = pytest.mark.usefixtures("one_thread")


def test_reward_gate_without_a_recorded_accuracy(tmp_path, small_rm):
    from posttrain.rl import rewards
    from posttrain.sections import PPOStageConfig

    gate = PPOStageConfig()
    recorded = manifest.read(small_rm)["metrics"]["accuracy"]
    assert rewards.check_gate(str(small_rm), PPOStageConfig(min_reward_accuracy=0.0), "ppo") == recorded
    rm = tmp_path / "rm"
    shutil.copytree(small_rm, rm)
    m = manifest.read(rm)
    del m["metrics"]["accuracy"]
    manifest.write(rm, m)
    with pytest.raises(PosttrainError, match=r"has no recorded accuracy.*allow_weak_reward_model"):
        rewards.check_gate(str(rm), gate, "ppo")
    assert rewards.check_gate(str(rm), PPOStageConfig(allow_weak_reward_model=True), "ppo") is None
