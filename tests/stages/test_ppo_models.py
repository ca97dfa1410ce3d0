"""posttrain.stages.ppo_models: PPO's reference and its compute precision. The reference is always
the starting policy (safeguard #17); full bf16 PPO computes under bf16 autocast on float32 master
weights, every other combination without autocast. The runs that use them are in test_ppo.py."""

from __future__ import annotations

import pytest
import torch

from posttrain.sections import PPOStageConfig
from posttrain.stages import ppo_models


@pytest.mark.parametrize(("method", "dtype", "autocast"), [
    ("full", "bfloat16", torch.bfloat16),
    ("full", "float32", None),
    ("full", "float16", None),  # fp16 autocast would need loss scaling, which the loop does not do
    ("lora", "bfloat16", None),  # the base stays in bf16, the adapter in float32
    ("qlora", "bfloat16", None),
])
def test_autocast_only_for_full_bf16(method, dtype, autocast, make_config):
    cfg = make_config(model__dtype=dtype)
    assert ppo_models.autocast_dtype(cfg, PPOStageConfig(method=method)) == autocast


def test_full_reference_is_a_frozen_copy_of_the_starting_policy(tmp_path):
    policy = torch.nn.Linear(3, 2)
    ref, adapter, described = ppo_models.reference(str(tmp_path), policy, PPOStageConfig(method="full"))
    assert ref is not policy and adapter is None and described == "frozen copy of the starting policy"
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), policy.parameters(), strict=True))
    assert not any(p.requires_grad for p in ref.parameters()) and all(p.requires_grad for p in policy.parameters())
    with torch.no_grad():
        policy.weight.add_(1.0)  # training the policy leaves the reference where it started
    assert not torch.equal(ref.weight, policy.weight)


def test_a_new_adapter_is_its_own_reference_when_disabled(tmp_path):
    """A LoRA policy on a full model (no adapter to continue): no second model, the adapter disabled."""
    (tmp_path / "config.json").write_text("{}")  # a full model directory: no adapter_config.json
    ref, adapter, described = ppo_models.reference(str(tmp_path), torch.nn.Linear(3, 2), PPOStageConfig(method="lora"))
    assert (ref, adapter) == (None, None) and "disabled" in described
