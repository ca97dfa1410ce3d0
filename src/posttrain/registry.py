"""The table of stages: one record per stage, and everything else derived from it.

The config's chain order, the commands, which stages launch through accelerate, which ones the
memory estimate covers, which outputs the next stage starts from, which the eval compares, what
their checkpoints keep, which TRL config checks their `training:`, which curves the report plots:
all of it reads this table. It imports nothing of posttrain (config.py imports it) and no torch.
Adding a stage: docs/architecture.md, "Adding a stage".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Role = Literal["data", "policy", "reward", "merge", "control", "eval", "export"]


@dataclass(frozen=True)
class Stage:
    name: str
    help: str  # the command's help line
    # data: format writes the formatted datasets; policy: trains the model the next stage starts from;
    # reward: trains a judge beside the policy; merge: folds an adapter into its base (its output is
    # the next stage's start); control: more SFT, the report's control row; eval: compares models;
    # export: writes the chain's model as a file for other runtimes (its output is not a model directory)
    role: Role
    section: str  # the config section holding its method, training: and data: (control: sft's)
    data: Literal["sft", "preference", "any"] | None = None  # the kind of dataset section.data must name
    trl_config: str | None = None  # the TRL config class its `training:` is checked against and built as
    launched: bool = False  # trains in one or several processes through accelerate (and has a memory estimate)
    rl: bool = False  # samples completions and scores them with reward models or functions
    # what keeps its best checkpoint through rotation besides the newest: the TRL stages' held-out
    # metric (metric_for_best_model), PPO's iteration reward (checkpoints.best_by_reward); None: newest only
    best: str | None = None
    liger: bool = False  # Liger's fused kernels on CUDA when installed (TRL trainers whose loss Liger fuses)
    preview: bool = False  # `posttrain preview --stage` shows its rendered data and loss mask
    curves: tuple[str, ...] = ()  # logged keys the report plots, where the stage logged them
    color: str | None = None  # its bars and curves in the report (a model stage)

    @property
    def module(self) -> str:
        return f"posttrain.stages.{self.name}"

    @property
    def policy(self) -> bool:
        """Its output is the policy the next stage starts from (and what config.starts_from finds)."""
        return self.role == "policy"

    @property
    def model(self) -> bool:
        """Its output is a model directory one loads (every stage but format's data, eval's results and
        export's file)."""
        return self.role not in ("data", "eval", "export")

    @property
    def compared(self) -> bool:
        """Its output is a model the eval stage compares (the reward model is a judge, not a row)."""
        return self.role in ("policy", "merge", "control")


_TABLE = (
    Stage("format", "Format the datasets under data: into trainer-ready conversations, with checks and a manifest.",
          "data", "format"),
    Stage("sft", "Supervised fine-tuning (full, LoRA or QLoRA) with TRL's SFTTrainer.", "policy", "sft",
          data="sft", trl_config="SFTConfig", launched=True, best="eval_loss", liger=True, preview=True,
          curves=("loss", "eval_loss"), color="#1f77b4"),
    Stage("reward", "Reward model (a one-output sequence classifier) on preference pairs with TRL's RewardTrainer.",
          "reward", "reward", data="preference", trl_config="RewardConfig", launched=True, best="eval_loss",
          liger=True, curves=("loss", "accuracy", "eval_accuracy"), color="#8c564b"),
    Stage("ppo", "PPO against the reward model with a KL penalty to the starting policy (posttrain's own PPO).",
          "policy", "ppo", data="any", launched=True, rl=True, best="reward",
          curves=("score", "kl", "ptx_loss", "response_length"), color="#d62728"),
    Stage("rloo", "RLOO with TRL's RLOOTrainer; rewards from reward models and/or Python functions.", "policy", "rloo",
          data="any", trl_config="RLOOConfig", launched=True, rl=True, curves=("reward", "kl", "loss"),
          color="#e377c2"),
    Stage("grpo", "GRPO with TRL's GRPOTrainer; rewards from reward models and/or Python functions.", "policy", "grpo",
          data="any", trl_config="GRPOConfig", launched=True, rl=True, curves=("reward", "kl", "loss"),
          color="#ff7f0e"),
    Stage("dpo", "Preference alignment (DPO and its variants) with TRL's DPOTrainer.", "policy", "dpo",
          data="preference", trl_config="DPOConfig", launched=True, best="eval_loss", liger=True, preview=True,
          curves=("loss", "rewards/accuracies", "rewards/margins", "eval_rewards/accuracies"), color="#2ca02c"),
    Stage("merge", "Merge a LoRA adapter into its base (full precision) and check the result against the adapter.",
          "merge", "merge", color="#17becf"),
    Stage("control", "The report's control row: the SFT model trained on with SFT for the compute of the later "
          "stages.", "control", "sft", data="sft", trl_config="SFTConfig", launched=True, best="eval_loss", liger=True,
          curves=("loss", "eval_loss"), color="#7f7f7f"),
    Stage("eval", "Evaluate models on the same held-out data with the same recorded settings (eval.json), then "
          "rewrite the report of the config's output directory.", "eval", "eval"),
    Stage("export", "Export a full or merged model to one GGUF file for llama.cpp and Ollama (with a Modelfile), "
          "and check the file against the model (logits, tokenizer, metadata).", "export", "export"),
)

STAGES: dict[str, Stage] = {s.name: s for s in _TABLE}  # in chain order: `stages:` is a subsequence of it
NAMES: tuple[str, ...] = tuple(STAGES)


def names(**where) -> tuple[str, ...]:
    """The stages, in chain order, whose fields or properties equal `where` (names(launched=True))."""
    return tuple(s.name for s in _TABLE if all(getattr(s, k) == v for k, v in where.items()))


def get(name: str) -> Stage:
    return STAGES[name]
