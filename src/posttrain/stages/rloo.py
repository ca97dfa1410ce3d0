"""`posttrain rloo`: REINFORCE Leave-One-Out with TRL's RLOOTrainer (full, LoRA or QLoRA).

For each prompt RLOO samples `num_generations` completions, scores them with the rewards (reward
models and/or Python functions, summed with their weights) and uses the mean score of the other
completions of the same prompt as each one's baseline. `rloo.training.beta` (TRL's default 0.05)
is the KL penalty to the starting model, folded into the reward.

The stage body, shared with grpo, is `posttrain.stages.online.run`: the starting policy and its
checks, rewards resolved and gated before any weights load, the reference, training, saving and
the manifest.
"""

from __future__ import annotations

from pathlib import Path

from posttrain.config import Config
from posttrain.stages import online


def run(cfg: Config, *, base: str | None = None, output: str | None = None,
        resume: bool = False, overwrite: bool = False) -> Path:
    return online.run(cfg, "rloo", base=base, output=output, resume=resume, overwrite=overwrite)


key_metrics = online.key_metrics  # the chain summary's numbers: score first → last, KL, steps
