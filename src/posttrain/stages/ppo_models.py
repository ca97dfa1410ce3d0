"""PPO's models besides the policy, as ppo.run sets them up: the frozen reference the KL penalty
is measured against (`reference`), the value model (`value_classifier`, initialised from the
reward model), and the precision every policy and value forward computes in (`autocast_dtype`)."""

from __future__ import annotations

import copy

from posttrain import models
from posttrain.config import Config
from posttrain.rl import rewards
from posttrain.sections import PPOStageConfig

REFERENCE_ADAPTER = "reference"


def reference(source: str, policy, pc: PPOStageConfig):
    """The frozen model the KL penalty is measured against: always the starting policy, computed as
    the policy computes. Returns (a separate reference model or None, the name of the policy's own
    reference adapter or None, its description for the manifest).

    A LoRA/QLoRA policy that continues an SFT adapter gets a second, frozen copy of that adapter on
    its own base: the same network in the same dtype (on the same 4-bit weights for QLoRA). The SFT
    adapter merged into the base would be another network outside float32 (a per-response KL of
    1.6e-2 nats at the first rollout in bf16 on the demo model, 7.4e-2 on SmolLM2) and, for QLoRA,
    another copy of the base in memory."""
    if pc.method == "full":
        ref = copy.deepcopy(policy)
        ref.requires_grad_(False)
        return ref, None, "frozen copy of the starting policy"
    if models.adapter_base(source) is not None:  # the policy continues an SFT adapter
        policy.load_adapter(source, adapter_name=REFERENCE_ADAPTER, is_trainable=False)
        return None, REFERENCE_ADAPTER, "frozen copy of the starting (SFT) adapter on the policy's base"
    return None, None, "the policy with its new LoRA adapter disabled"


def autocast_dtype(cfg: Config, pc: PPOStageConfig):
    """Full PPO in bf16 trains float32 master weights (models.weights_dtype) and computes every
    policy and value forward, rollout and update alike, under bf16 autocast: AdamW on bf16 weights
    loses most updates (5% of the demo model's weights moved in 12 steps at lr 1e-5). None (no autocast) otherwise:
    LoRA/QLoRA keep model.dtype's base and float32 adapters; full float16 computes in float32 on its
    master weights (fp16 autocast would need loss scaling, which this loop does not do).
    Explicit torch.autocast, not Accelerator(mixed_precision=...): accelerate's state is one per
    process, and the chain's earlier stages set it."""
    import torch

    dtype = models.torch_dtype(cfg.model.dtype)
    return torch.bfloat16 if pc.method == "full" and dtype == torch.bfloat16 else None


def value_classifier(cfg: Config, path: str, pc: PPOStageConfig):
    """The value model starts as the reward model: trained in full, or through its own LoRA adapter
    (the score head trained in full) when the policy is LoRA/QLoRA."""
    model = rewards.load_reward_model(path, full_precision=True)
    if pc.method == "full":
        return model.requires_grad_(True)
    from peft import get_peft_model

    return get_peft_model(model, models.lora_config(model, pc.lora, train_embeddings=False, task_type="SEQ_CLS"))
