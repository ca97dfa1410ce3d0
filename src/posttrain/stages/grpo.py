"""`posttrain grpo`: Group Relative Policy Optimization with TRL's GRPOTrainer (full, LoRA or QLoRA).

For each prompt GRPO samples `num_generations` completions, scores them with the rewards (reward
models and/or Python functions, summed with their weights) and pushes the policy towards the
completions that beat their group's mean. With `grpo.training.beta` > 0 (TRL's default is 0) a
KL penalty keeps it near the starting model.

The stage body, shared with rloo, is `posttrain.stages.online.run`: the starting policy and its
checks, rewards resolved and gated before any weights load, the reference, training, saving and
the manifest.
"""

from __future__ import annotations

from pathlib import Path

from posttrain.config import Config
from posttrain.stages import online


def run(cfg: Config, *, base: str | None = None, output: str | None = None,
        resume: bool = False, overwrite: bool = False) -> Path:
    return online.run(cfg, "grpo", base=base, output=output, resume=resume, overwrite=overwrite)


key_metrics = online.key_metrics  # the chain summary's numbers: score first → last, KL, steps
