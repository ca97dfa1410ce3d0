"""Configs: YAML + `--set` overrides → one typed, validated `Config`, without importing torch.

One YAML describes either one stage or the whole chain. Top-level sections:

    model:     the base model (Hub name or local path) and how to load it
    template:  the chat template (built in: chatml, gemma, llama3, mistral, phi3; the tokenizer's
               own; or a .jinja file)
    data:      named datasets (`sft`, `preference`, ...) with their sources and column mappings
    stages:    the chain, in order (used by `posttrain run`)
    output_dir: the output root; each stage writes <output_dir>/<stage> unless --output is given
    sft / dpo / ...: one section per stage; `training:` holds the TRL config fields verbatim

Unknown keys anywhere are errors that name the key, its line in the file and the nearest valid
key. Trainer hyperparameters under `training:` are checked against a snapshot of TRL's config
dataclasses (trl_fields.json), because importing TRL would import torch.
"""

from __future__ import annotations

import json
import re
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from posttrain import registry
from posttrain.errors import PosttrainError, did_you_mean

# The config section of each stage whose `training:` holds a TRL config's fields, and that class.
TRAINING_SECTIONS = {s.section: s.trl_config for s in registry.STAGES.values() if s.trl_config}
# Trainer fields that posttrain sets itself; setting them under `training:` would be ignored.
OWNED_TRAINING_FIELDS = {
    "output_dir": "use --output or the top-level output_dir",
    "assistant_only_loss": "set it as sft.assistant_only_loss",
    "chat_template_path": "set template.name",
    "model_init_kwargs": "set model.dtype / model.attn_implementation",
    "pad_token": "set model.pad_token",
    "resume_from_checkpoint": "pass --resume on the command line",
    "precompute_ref_log_probs": "set dpo.reference: precomputed",
    "reward_weights": "set weight on each entry of rewards:",
    "reward_model_path": "set rewards: [{model: DIR}]",
    # a secret would be written into config.resolved.yaml and every manifest
    "hub_token": "it is a secret: set HF_TOKEN in the environment (posttrain writes no token to any file)",
}


class Strict(BaseModel):
    """Base for every config section: unknown keys are errors, values are not coerced."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True)


class ModelConfig(Strict):
    name_or_path: str = Field(description="Hub model id or local directory of the base model.")
    tokenizer: str | None = Field(None, description="Tokenizer source if not the model's own.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Weights dtype; auto = bf16 on GPUs that have it, else fp32."
    )
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2", "flash_attention_3"] | None = Field(
        None, description="Attention kernel the models load with. None: flash_attention_2 on a GPU with 16-bit "
        "weights when flash-attn is installed, else transformers' choice (sdpa).")
    trust_remote_code: bool = Field(
        False, description="Run Python code that ships with the model (its own modeling files). Off unless set; "
        "when on, every load warns and names the repository.")
    allow_pickle_weights: bool = Field(
        False, description="Load weights stored as pickle (pytorch_model.bin, .pt): unpickling can run code. Off: "
        "only safetensors are read, and a model without them is refused.")
    pad_token: str | None = Field(
        None,
        description="Padding token. Must differ from eos and the end-of-turn token; when unset and the "
        "tokenizer has none (or pads with eos), posttrain picks an unused special token.",
    )


class TemplateConfig(Strict):
    name: str = Field(
        "chatml",
        description="A built-in family template, each with generation markers around the assistant's content "
        "and its end-of-turn token and the same text as the family's published template: 'chatml', 'gemma' "
        "(Gemma 3), 'llama3' (Llama 3), 'mistral' (mistral-common v3 / Mistral-7B-Instruct-v0.3), 'phi3' "
        "(Phi-3); or 'tokenizer' (the tokenizer's own template; one without generation markers that "
        "renders like a built-in is replaced by that built-in) or a path to a .jinja file. A built-in needs "
        "only its family's tokens, so it also works on a base model that has no template.",
    )
    add_special_tokens: bool = Field(
        False,
        description="Add the template's special tokens to the tokenizer when missing (grows the "
        "vocabulary: embeddings are resized and trained). Off: a missing token is an error.",
    )
    system_prompt: str | None = Field(None, description="System message for conversations that have none.")


class SourceConfig(Strict):
    path: str = Field(description="Local .jsonl/.json/.parquet/.csv file or directory, or a Hub dataset id.")
    subset: str | None = Field(None, description="Hub dataset configuration name.")
    split: str = Field("train", description="Split to read from a Hub dataset or a data directory; a single file "
                       "or a save_to_disk directory is read whole.")
    columns: dict[str, str] = Field(
        default_factory=dict, description="Rename source columns: {source_column: canonical_name}."
    )
    roles: dict[str, str] = Field(
        default_factory=dict, description="Rename message roles: {source_role: user|assistant|system|tool}."
    )
    limit: int | None = Field(None, ge=1, description="Use only the first N rows.")


class DataConfig(Strict):
    kind: Literal["sft", "preference"] = Field(description="What the stage consumes.")
    train: list[SourceConfig] = Field(min_length=1, description="Training sources (one or more), concatenated.")
    eval: list[SourceConfig] = Field(
        default_factory=list, description="Held-out sources, concatenated; none: eval_fraction of train is held out."
    )
    eval_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="Held-out share split off train when no eval given.")
    max_bad_fraction: float = Field(
        0.01, ge=0.0, le=1.0, description="Stop when more than this share of rows cannot be formatted."
    )
    seed: int = Field(0, description="Seed of the shuffled eval_fraction split.")


class LoraConfig(Strict):
    r: int = Field(16, ge=1, description="LoRA rank: inner dimension of each low-rank update.")
    alpha: int = Field(32, ge=1, description="LoRA alpha: the update is scaled by alpha / r.")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the input of the LoRA branch (training only).")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Modules that get LoRA: 'all-linear' (PEFT: every linear layer but the output "
        "layer) or a list of module names, e.g. [q_proj, v_proj]; each must match a module of the model.")
    modules_to_save: list[str] = Field(
        default_factory=list, description="Extra modules (by name) trained in full and saved with the adapter."
    )


class StageConfig(Strict):
    """Fields shared by the training stages."""

    method: Literal["full", "lora", "qlora"] = Field(
        "full", description="full: train every weight; lora: a LoRA adapter on the frozen base; qlora: LoRA on a "
        "4-bit NF4 base. Started from an adapter: full merges it, lora/qlora continue it.")
    lora: LoraConfig = Field(
        default_factory=LoraConfig, description="LoRA settings for method lora/qlora; used only for a new adapter."
    )
    training: dict[str, Any] = Field(default_factory=dict, description="TRL trainer config fields, verbatim.")


class FormatStageConfig(Strict):
    datasets: list[str] | None = Field(None, description="Names under data: to format; default all.")


class SFTStageConfig(StageConfig):
    data: str = Field("sft", description="Name of the dataset under data:.")
    assistant_only_loss: bool = Field(True, description="Train on assistant tokens only (conversations).")


class DPOStageConfig(StageConfig):
    data: str = Field("preference", description="Name of the dataset under data:.")
    reference: Literal["copy", "adapter_disabled", "precomputed"] = Field(
        "copy", description="Reference model: a frozen copy of the starting model; the starting model with "
        "the new LoRA adapter disabled (method lora/qlora on a full base); or reference log-probs computed "
        "once before training, so no reference model stays in memory."
    )
    allow_template_mismatch: bool = Field(
        False, description="Train although the starting model's recorded chat template or special tokens "
        "differ from this config's (normally an error)."
    )
    step0_tolerance: float = Field(
        0.02, gt=0.0, description="Largest mean |log-ratio| policy vs reference (nats per sequence) "
        "accepted at step 0; above it the reference is not the starting model."
    )
    collapse_loss: float = Field(
        0.01, ge=0.0, description="Stop when the DPO loss falls below this within the first steps "
        "(the reference is not what the policy started from, or the data is trivial)."
    )


class RewardStageConfig(StageConfig):
    data: str = Field("preference", description="Name of the preference dataset under data:.")
    init: str | None = Field(
        None, description="Start the reward model from this causal LM (directory or Hub id) instead of the "
        "policy the chain has at this point (the SFT stage)."
    )
    allow_template_mismatch: bool = Field(
        False, description="Train although the starting model's recorded chat template or special tokens differ."
    )
    length_correlation_warning: float = Field(
        0.5, ge=0.0, le=1.0, description="Warn when |correlation of score with response length| on held-out "
        "responses is above this (a reward model that only likes long answers)."
    )
    tolerance: float = Field(
        1e-4, gt=0.0, description="Largest |Δscore| accepted between reload, padding sides and batch mates, in "
        "float32; in bf16/fp16 at least 8 rounding steps of the scores' size (posttrain.numerics)."
    )


class RewardSource(Strict):
    """One reward of an RL stage: a reward model, or a Python function (`module:function`)."""

    model: str | None = Field(
        None, description="Reward model directory (a finished reward stage) or Hub id. Unset with no function: "
        "this config's reward stage (<output_dir>/reward)."
    )
    function: str | None = Field(
        None, description="'module:function' called as f(prompts, completions, **columns) -> list[float]; "
        "module is a file next to the config or an installed module."
    )
    weight: float = Field(1.0, description="Multiplier of this reward in the weighted sum (TRL's reward_weights).")

    @model_validator(mode="after")
    def _one_kind(self) -> RewardSource:
        if self.model is not None and self.function is not None:
            raise ValueError("a reward is either a model or a function, not both")
        if self.function is not None and not re.fullmatch(r"[\w.]+:\w+", self.function):
            raise ValueError(f"reward function '{self.function}' is not 'module:function'")
        return self


class RewardGate(Strict):
    """What an RL stage demands of a reward model before it optimises against one."""

    min_reward_accuracy: float = Field(
        0.7, ge=0.0, le=1.0, description="Refuse a reward model whose recorded held-out pairwise accuracy is lower "
        "(a weak reward model gets exploited: its score rises while quality falls)."
    )
    allow_weak_reward_model: bool = Field(False, description="Go ahead below min_reward_accuracy (warns).")


class PPOStageConfig(RewardGate):
    """posttrain's own PPO (TRL has none since 1.13). Field names follow TRL's old PPOConfig where
    one existed. Batch sizes are per process."""

    method: Literal["full", "lora", "qlora"] = Field(
        "full", description="Policy training: full (every weight), lora (a LoRA adapter on the frozen base) or "
        "qlora (LoRA on a 4-bit NF4 base). Started from an adapter: full merges it, lora/qlora continue it.")
    lora: LoraConfig = Field(
        default_factory=LoraConfig, description="LoRA settings for method lora/qlora; used only for a new adapter."
    )
    data: str = Field("sft", description="Dataset under data: whose prompts are sampled (the conversation before "
                      "the last assistant turn, or a preference pair's prompt).")
    reward_model: str | None = Field(None, description="Reward model; default this config's reward stage.")
    value_model: str | None = Field(None, description="Initial value model; default the reward model.")
    steps: int = Field(100, ge=1, description="PPO iterations (one rollout batch and its updates each).")
    batch_size: int = Field(16, ge=1, description="Prompts per rollout, per process.")
    mini_batch_size: int = Field(8, ge=1, description="Rollouts per optimizer step, per process.")
    gradient_accumulation_steps: int = Field(
        1, ge=1, description="Micro-batches per mini-batch (optimizer step), per process; must divide mini_batch_size."
    )
    ppo_epochs: int = Field(2, ge=1, description="Passes over each rollout batch.")
    learning_rate: float = Field(1e-5, gt=0.0, description="AdamW learning rate of the policy and value model.")
    max_grad_norm: float = Field(1.0, gt=0.0, description="Gradient clipping: largest total gradient norm per step.")
    temperature: float = Field(
        1.0, gt=0.0, description="Sampling temperature of the rollouts; PPO's log-probs are computed at it too."
    )
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Top-p (nucleus) sampling of the rollouts; 1 = off. "
                         "PPO's log-probs leave its truncation out.")
    max_new_tokens: int = Field(
        32, ge=1, description="Longest response, in tokens; generation stops earlier at the end-of-turn token."
    )
    max_prompt_length: int = Field(256, ge=1, description="Longer prompts are dropped (listed in the summary).")
    kl_coef: float = Field(0.05, ge=0.0, description="β of the per-token KL penalty (initial value when adaptive).")
    kl_target: float | None = Field(None, gt=0.0, description="Adaptive KL (Ziegler et al.): target KL per sequence.")
    kl_horizon: int = Field(10000, ge=1, description="Adaptive KL horizon, in samples.")
    kl_cap: float | None = Field(20.0, gt=0.0, description="Stop when the mean KL per sequence passes this.")
    negative_kl_stop: float | None = Field(
        1.0, gt=0.0, description="Stop when the mean KL per sequence falls below minus this (nats): on the policy's "
        "own samples the estimate is >= 0 in expectation, so the responses were not sampled from the distribution "
        "PPO computes (None: never)."
    )
    min_entropy: float | None = Field(
        1e-3, ge=0.0, description="Stop when the policy's mean entropy per response token falls below this (nats): "
        "entropy collapse, sampling has become deterministic and PPO no longer explores (None: never)."
    )
    missing_eot_penalty: float | None = Field(
        -1.0, description="Score given to responses that never emit the end-of-turn token (None: keep the score).")
    normalize_reward: bool = Field(False, description="Shift and scale scores to mean 0, std 1 on the first rollout "
                                   "(the SFT policy's samples), with those constants kept for the run.")
    ptx_coef: float = Field(
        0.0, ge=0.0, description="InstructGPT's PPO-ptx: add ptx_coef × the SFT loss on ptx_data (assistant tokens) "
        "to every update, so PPO does not unlearn what SFT taught. 0 = plain PPO.")
    ptx_data: str = Field("sft", description="Dataset (kind sft) for the ptx term.")
    gamma: float = Field(1.0, ge=0.0, le=1.0, description="GAE discount γ per response token (1 = no discounting).")
    lam: float = Field(
        0.95, ge=0.0, le=1.0, description="GAE λ: 1 = Monte Carlo returns (more variance), 0 = one-step TD "
        "(more bias)."
    )
    cliprange: float = Field(
        0.2, gt=0.0, description="ε of the clipped policy loss: the probability ratio is clipped to [1-ε, 1+ε]."
    )
    cliprange_value: float = Field(
        0.2, gt=0.0, description="Clipped value loss: new values are clipped to ± this around the rollout's values."
    )
    vf_coef: float = Field(
        0.1, ge=0.0, description="Weight of the value loss: loss = policy loss + vf_coef × value loss."
    )
    logging_steps: int = Field(
        1, ge=1, description="Print the main metrics every N iterations (metrics.jsonl gets every iteration)."
    )
    report_to: list[Literal["tensorboard", "wandb", "trackio", "mlflow", "comet_ml", "aim", "clearml", "dvclive",
                            "swanlab"]] = Field(
        default_factory=list, description="Trackers that also get the metrics (through accelerate; the tracker's "
        "package must be installed). metrics.jsonl is always written.")
    sample_every: int = Field(10, ge=1, description="Print and keep sample responses every N iterations.")
    save_steps: int = Field(50, ge=1, description="Save a checkpoint (under checkpoints/) every N iterations.")
    save_total_limit: int = Field(
        2, ge=1, description="Checkpoints kept; older ones are deleted, but never the newest or the best by reward."
    )

    @model_validator(mode="after")
    def _sizes(self) -> PPOStageConfig:
        if self.batch_size % self.mini_batch_size:
            raise ValueError(f"ppo.batch_size {self.batch_size} is not a multiple of ppo.mini_batch_size "
                             f"{self.mini_batch_size}")
        if self.mini_batch_size % self.gradient_accumulation_steps:
            raise ValueError(f"ppo.mini_batch_size {self.mini_batch_size} is not a multiple of "
                             f"ppo.gradient_accumulation_steps {self.gradient_accumulation_steps}")
        return self


class OnlineStageConfig(StageConfig, RewardGate):
    """RLOO / GRPO through TRL's trainers: prompts from data:, rewards from models and/or functions."""

    data: str = Field("sft", description="Dataset under data: whose prompts are sampled.")
    rewards: list[RewardSource] = Field(
        default_factory=lambda: [RewardSource()], min_length=1,
        description="Rewards, summed with their weights. Default: this config's reward stage.",
    )
    missing_eot_penalty: float | None = Field(
        -1.0, description="Score each reward gives a completion that never emits the end-of-turn token (cut at "
        "max_completion_length), as ppo.missing_eot_penalty; the weighted total is this × the sum of the weights "
        "(of the rewards that score it: an abstention stays one). "
        "None: keep the rewards' scores (TRL renders such a completion with its turn closed, so a reward model "
        "scores it as a finished answer).")
    allow_template_mismatch: bool = Field(
        False, description="Train although the starting model's recorded chat template or special tokens differ "
        "(warns; normally an error).")


class MergeStageConfig(Strict):
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Dtype of the merged weights; auto = the dtype of the base's config (fp32 if unknown)."
    )
    nf4_round_trip: bool = Field(
        False, description="For QLoRA adapters: pass the base through nf4 quantize→dequantize before merging, "
        "so the merge matches the weights the adapter was trained against (the merged model then carries the "
        "quantization error of every layer)."
    )
    tolerance: float = Field(
        1e-3, gt=0.0, description="Largest max |Δlogit| accepted between merged model and base+adapter on the "
        "probe prompts (scaled by the logits' magnitude for half precision)."
    )
    probe_prompts: list[str] = Field(
        default_factory=lambda: ["What is 12 + 34?", "Write one sentence about the sea.", "Hello!"],
        min_length=1, description="User messages rendered with the chat template for the parity and stop checks.",
    )
    max_new_tokens: int = Field(64, ge=1, description="Generation budget of the stop check.")


class ControlStageConfig(Strict):
    """The control row of the report: the SFT model trained on with SFT for as much compute as the
    stages after SFT used, so that no stage is credited with what more SFT would have done."""

    steps: int | None = Field(
        None, ge=1, description="SFT steps to continue for. Unset: matched to the training sequences the chain's "
        "stages between sft and control processed (recorded in their manifests as train_sequences), divided by "
        "SFT's global batch size.")


class ScorerConfig(Strict):
    """A task score for verifiable answers: the generated response against the reference (the
    eval conversation's last assistant turn)."""

    name: str = Field(description="Column name in the report, e.g. exact.")
    kind: Literal["exact", "normalized", "regex", "function"] = Field(
        description="exact: response == reference (stripped); normalized: equal after lower-casing and removing "
        "punctuation, articles and extra spaces; regex: the pattern's first group in the response equals it in "
        "the reference (no group: the pattern matches the response); function: 'module:function'.")
    pattern: str | None = Field(None, description="For kind regex (searched, so anchor it if needed).")
    function: str | None = Field(
        None, description="For kind function: called as f(prompts, completions, reference=[...]) -> list[float], "
        "the same shape as an RL reward function; module is a file next to the config or an installed module.")

    @model_validator(mode="after")
    def _fields_for_kind(self) -> ScorerConfig:
        if (self.kind == "regex") != (self.pattern is not None):
            raise ValueError(f"scorer '{self.name}': pattern is for kind regex, and kind regex needs a pattern")
        if (self.kind == "function") != (self.function is not None):
            raise ValueError(f"scorer '{self.name}': function is for kind function, and kind function needs one")
        if self.pattern is not None:
            try:
                re.compile(self.pattern)
            except re.error as e:
                raise ValueError(f"scorer '{self.name}': pattern {self.pattern!r} is not a regex ({e})") from None
        if self.function is not None and not re.fullmatch(r"[\w.]+:\w+", self.function):
            raise ValueError(f"scorer '{self.name}': function '{self.function}' is not 'module:function'")
        return self


class DecodingConfig(Strict):
    """One way of generating the eval responses; every model is generated from with each."""

    name: str = Field("greedy", description="Label of this decoding in eval.json and the report (unique).")
    temperature: float = Field(0.0, ge=0.0, description="0 = greedy decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Top-p (nucleus) sampling; 1 = off; unused when greedy.")


class LmEvalConfig(Strict):
    """lm-evaluation-harness tasks run on every full (merged or full-trained) model; needs the
    lm-eval extra (`pip install 'posttrain[lm-eval]'`)."""

    tasks: list[str] = Field(min_length=1, description="lm-eval task names (built in or in include_path).")
    include_path: str | None = Field(None, description="Directory of custom task YAMLs (offline tasks).")
    limit: int | None = Field(None, ge=1, description="Examples per task (None: all).")
    num_fewshot: int | None = Field(
        None, ge=0, description="Few-shot examples per prompt, overriding each task's own (None: the task's default)."
    )
    batch_size: int = Field(8, ge=1, description="Batch size of lm-eval's Hugging Face backend (HFLM).")
    apply_chat_template: bool = Field(True, description="Prompt through each model's chat template.")


class EvalStageConfig(Strict):
    """`posttrain eval`: every model on the same held-out data with the same recorded settings."""

    models: list[str] | None = Field(
        None, description="Model or adapter directories (or Hub ids) to compare. Unset: the base model and each "
        "model stage of this chain (sft, control, ppo/rloo/grpo, dpo, merge) that is in stages.")
    data: str = Field("sft", description="Dataset (kind sft) whose held-out conversations give the prompts (all "
                      "turns before the last assistant turn), the references (that turn) and the NLL.")
    pairs: str | None = Field(None, description="Preference dataset for held-out preference accuracy. Unset: "
                              "dpo.data (or reward.data) when it is under data:.")
    max_samples: int = Field(200, ge=1, description="Held-out prompts (and pairs, conversations) evaluated.")
    batch_size: int = Field(
        32, ge=1, description="Sequences per batch: generation, NLL, preference pairs, KL and reward-model scoring."
    )
    max_new_tokens: int = Field(64, ge=1, description="Longest generated response, in tokens.")
    decoding: list[DecodingConfig] = Field(
        default_factory=lambda: [DecodingConfig()], min_length=1,
        description="Decodings every model generates with (names unique). Default: one greedy decoding.",
    )
    seed: int | None = Field(None, description="Sampling seed; unset: the top-level seed.")
    scorers: list[ScorerConfig] = Field(default_factory=list, description="Task scores (verifiable answers).")
    reward_model: str | None = Field(None, description="Judges generations (score, win rates). Unset: this "
                                     "config's reward stage when it is in stages; none otherwise.")
    kl_reference: str | None = Field(None, description="KL(model || this) on eval prompts. Unset: this "
                                     "config's sft stage when it is in stages.")
    show_samples: int = Field(8, ge=0, description="Prompts whose responses the report shows side by side.")
    lm_eval: LmEvalConfig | None = Field(
        None, description="lm-evaluation-harness tasks run on every full model (None: no lm-eval tasks).")

    @model_validator(mode="after")
    def _unique_names(self) -> EvalStageConfig:
        for what, names in (("scorers", [s.name for s in self.scorers]), ("decoding", [d.name for d in self.decoding])):
            if len(set(names)) != len(names):
                raise ValueError(f"eval.{what} has repeated names {names}")
        return self


class LaunchConfig(Strict):
    """How many processes a training stage runs in. posttrain starts them through `accelerate
    launch` (torchrun), never itself; `--num-processes` / `--distributed` on the command line win."""

    num_processes: int = Field(1, ge=1, description="Processes for each training stage, one per GPU "
                               "(CPU processes over gloo where there is no GPU). 1 = no launch.")
    distributed: Literal["ddp", "fsdp", "zero2", "zero3"] = Field(
        "ddp", description="ddp (a full copy per GPU), fsdp (FSDP2: weights, gradients and optimizer "
        "sharded), zero2 / zero3 (DeepSpeed ZeRO, needs deepspeed).")
    config_file: str | None = Field(None, description="An accelerate config of your own instead of the one "
                                    "posttrain ships for `distributed` (configs/accelerate/).")


class Config(Strict):
    model: ModelConfig = Field(description="The base model and how it is loaded.")
    template: TemplateConfig = Field(default_factory=TemplateConfig, description="The chat template.")
    data: dict[str, DataConfig] = Field(
        default_factory=dict, description="Named datasets {name: dataset}; stage sections refer to them by name."
    )
    stages: list[Literal[registry.NAMES]] = Field(
        default_factory=lambda: ["format", "sft"],
        description=f"The chain `posttrain run` runs: a subsequence of {', '.join(registry.NAMES)}, in that order, "
        "without repeats.",
    )
    output_dir: str = Field(
        "runs/posttrain", description="Output root: stage <name> writes <output_dir>/<name> unless --output is given."
    )
    seed: int = Field(
        42, description="Seed of every stage (trainers' seed and data_seed, PPO's sampling; eval.seed's default)."
    )
    launch: LaunchConfig = Field(
        default_factory=LaunchConfig, description="How many processes each training stage runs in."
    )
    format: FormatStageConfig = Field(
        default_factory=FormatStageConfig, description="`posttrain format`: datasets converted and checked."
    )
    sft: SFTStageConfig = Field(default_factory=SFTStageConfig, description="`posttrain sft`: supervised fine-tuning.")
    reward: RewardStageConfig = Field(
        default_factory=RewardStageConfig, description="`posttrain reward`: a reward model trained on preference pairs."
    )
    ppo: PPOStageConfig = Field(
        default_factory=PPOStageConfig, description="`posttrain ppo`: posttrain's own PPO against a reward model."
    )
    rloo: OnlineStageConfig = Field(
        default_factory=OnlineStageConfig, description="`posttrain rloo`: RLOO through TRL's RLOOTrainer."
    )
    grpo: OnlineStageConfig = Field(
        default_factory=OnlineStageConfig, description="`posttrain grpo`: GRPO through TRL's GRPOTrainer."
    )
    dpo: DPOStageConfig = Field(
        default_factory=DPOStageConfig, description="`posttrain dpo`: preference optimisation with TRL's DPOTrainer."
    )
    merge: MergeStageConfig = Field(
        default_factory=MergeStageConfig, description="`posttrain merge`: a LoRA/QLoRA adapter merged into its base."
    )
    control: ControlStageConfig = Field(
        default_factory=ControlStageConfig, description="`posttrain control`: SFT continued for the compute the "
        "stages after SFT used (the report's control row).")
    eval: EvalStageConfig = Field(
        default_factory=EvalStageConfig, description="`posttrain eval`: every model on the same held-out data."
    )
    # The directory of the YAML file: reward functions (`module:function`) are imported from there
    # or from installed packages, nowhere else.
    _source_dir: str | None = PrivateAttr(None)
    # The file and --set overrides it was read from: what a launched process reads again.
    _source: tuple[str | None, tuple[str, ...]] = PrivateAttr((None, ()))
    # Where each key was set (config._where): stage checks after loading report file:line too.
    _where: str = PrivateAttr("config")
    _lines: dict = PrivateAttr(default_factory=dict)

    @field_validator("stages")
    @classmethod
    def _stages_in_order(cls, v: list[str]) -> list[str]:
        order = [registry.NAMES.index(s) for s in v]
        if order != sorted(set(order)):
            raise ValueError(f"stages must be a subsequence of {list(registry.NAMES)} without repeats")
        return v

    def uses_reward_stage(self, stage: str) -> bool:
        """Whether an RL stage scores with this config's reward stage (<output_dir>/reward)."""
        if stage == "ppo":
            return self.ppo.reward_model is None
        return any(r.model is None and r.function is None for r in getattr(self, stage).rewards)

    def starts_from(self, stage: str) -> str | None:
        """The policy stage whose output `stage` starts from in this chain: the last policy stage
        (registry) before it in stages (None: model.name_or_path). As `common.default_base` and `chain.plan`."""
        before = [s for s in self.stages[: self.stages.index(stage)] if registry.STAGES[s].policy] \
            if stage in self.stages else []
        return before[-1] if before else None

    def _check_methods_across_stages(self) -> None:
        """Method combinations of adjacent stages that cannot work, refused before anything trains.

        A stage started from a LoRA/QLoRA output (an adapter) merges that adapter (method full) or
        continues it (lora/qlora; qlora on the 4-bit base): control, reward, ppo, rloo, grpo and dpo
        all do, so every method works after every method, except:
          - dpo.reference adapter_disabled on an adapter: DPO continues the adapter, and disabling it
            would make the model under it (the pre-SFT base) the reference;
          - merge needs an adapter: the stage it merges must be lora/qlora.
        """
        start = self.starts_from("dpo")
        if self.dpo.reference == "adapter_disabled" and start and getattr(self, start).method != "full":
            raise ValueError(
                f"dpo.reference 'adapter_disabled' with dpo after {start} (method {getattr(self, start).method}): "
                f"dpo continues the {start} adapter, and disabling it would make the model under it the reference "
                f"(set dpo.reference: copy, or {start}.method: full)")
        if "merge" in self.stages:
            start = self.starts_from("merge")
            if start is None:
                raise ValueError("stages has merge, but no training stage before it writes an adapter to merge "
                                 "(add sft/ppo/rloo/grpo/dpo with method lora or qlora before merge, or drop merge)")
            if getattr(self, start).method == "full":
                raise ValueError(f"stages has merge after {start}, whose method is full: there is no adapter "
                                 f"to merge (drop merge from stages, or set {start}.method: lora)")

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        unknown = [n for n in self.format.datasets or [] if n not in self.data]
        if unknown:
            raise ValueError(f"format.datasets names {unknown}, which are not under data:")
        if self.dpo.reference == "adapter_disabled" and self.dpo.method == "full":
            raise ValueError("dpo.reference 'adapter_disabled' needs dpo.method lora or qlora (a full model has "
                             "no adapter to disable); use reference 'copy'")
        for stage in registry.names(rl=True):
            if stage in self.stages and self.uses_reward_stage(stage) and "reward" not in self.stages:
                raise ValueError(f"{stage} scores with this config's reward stage, but stages has no reward before it "
                                 f"(add reward to stages, or name a reward model or function in {stage})")
        if "control" in self.stages and "sft" not in self.stages:
            raise ValueError("stages has control (SFT continued from the sft stage's output), but no sft stage")
        self._check_methods_across_stages()
        return self


# ---------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | Path | None, overrides: list[str] | None = None, base: dict | None = None) -> Config:
    """Read YAML (or start from `base`), apply `key.path=value` overrides, validate."""
    where = str(path) if path else "config"
    raw: dict = dict(base or {})
    lines: dict[tuple, int] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise PosttrainError(f"config file '{p}' does not exist", fix="check the path")
        text = _read_text(p)
        try:
            node = yaml.compose(text, Loader=_Loader)
            loaded = yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f"{p}:{mark.line + 1}" if mark else str(p)
            raise PosttrainError(f"not valid YAML ({getattr(e, 'problem', e)})", where=at) from None
        except UNCONSTRUCTABLE as e:
            raise PosttrainError(f"a value PyYAML cannot read ({type(e).__name__}: {_short(e)})", where=str(p),
                                 fix="quote the value to make it a string, or fix it") from None
        if loaded is None:
            raise PosttrainError("config file is empty", where=str(p), fix="see configs/ for examples")
        if not isinstance(loaded, dict):
            raise PosttrainError("config must be a mapping of sections (model:, data:, sft: ...)", where=str(p))
        raw = loaded
        _line_map(node, (), lines)
    for item in overrides or []:
        _apply_override(raw, item, lines)
    cfg = validate_dict(raw, where=where, lines=lines)
    if path is not None:
        cfg._source_dir = str(Path(path).resolve().parent)
    cfg._source = (str(path) if path is not None else None, tuple(overrides or ()))
    return cfg


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads 1e-3 as a float (YAML 1.1 wants 1.0e-3 and gives the string '1e-3')."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


# What PyYAML's constructors raise for a scalar it resolved (or was told by a tag) to a type that
# cannot hold it: 2020-02-30 as a date, `!!int x`, an int of more than 4300 digits, `!!timestamp x`
# (AttributeError: its regex does not match and PyYAML reads the match anyway); and Python's
# recursion limit for input nested thousands deep.
UNCONSTRUCTABLE = (ValueError, TypeError, IndexError, KeyError, OverflowError, AttributeError, RecursionError)


def _short(e: Exception) -> str:
    return " ".join(str(e).split())[:120]


def _parse_value(text: str):
    return yaml.load(text, Loader=_Loader) if text.strip() else None  # noqa: S506


def validate_dict(raw: dict, where: str = "config", lines: dict[tuple, int] | None = None) -> Config:
    lines = lines or {}
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as e:
        raise _to_error(e, where, lines) from None
    except RecursionError:
        raise PosttrainError("the config is nested too deeply (or refers to itself through a YAML anchor)",
                             where=where, fix="flatten it; no posttrain setting nests more than a few levels") from None
    cfg._where, cfg._lines = where, lines
    _check_datasets(cfg)
    for stage, cls_name in TRAINING_SECTIONS.items():
        _check_training(getattr(cfg, stage).training, cls_name, (stage, "training"), where, lines)
    _check_cross_training(cfg, where)
    return cfg


# ---------------------------------------------------------------------------------------------
# The datasets each stage reads: checked for the chain's stages when the config loads, and by
# each stage when it starts (check_stage: a stage command may run one that is not in stages:).


def check_stage(cfg: Config, stage: str) -> None:
    """Everything `stage` needs from the config that loading did not check: its datasets, under
    data: and of the kind it reads. Called first thing by the stages."""
    record = registry.STAGES[stage]
    if record.data is not None:
        _check_dataset(cfg, f"{record.section}.data", record.data, stage)
    if stage == "ppo" and cfg.ppo.ptx_coef > 0:
        _check_dataset(cfg, "ppo.ptx_data", "sft", "ppo (ptx_coef > 0)")
    if stage == "eval":
        _check_dataset(cfg, "eval.data", "sft", "eval")
        if cfg.eval.pairs is not None:
            _check_dataset(cfg, "eval.pairs", "preference", "eval")


def _check_datasets(cfg: Config) -> None:
    """The stages in `stages:`, and any section naming an existing dataset of the wrong kind."""
    for record in registry.STAGES.values():
        if record.data is None or record.section != record.name:  # control reads sft's data: checked as sft's
            continue
        if record.name in cfg.stages or getattr(cfg, record.name).data in cfg.data:
            _check_dataset(cfg, f"{record.name}.data", record.data, record.name)
    if cfg.ppo.ptx_coef > 0:
        _check_dataset(cfg, "ppo.ptx_data", "sft", "ppo (ptx_coef > 0)")
    if "eval" in cfg.stages:
        _check_dataset(cfg, "eval.data", "sft", "eval")
    if cfg.eval.pairs is not None:
        _check_dataset(cfg, "eval.pairs", "preference", "eval")


def _check_dataset(cfg: Config, key: str, kind: str, needs: str) -> None:
    section, field = key.split(".")
    name = getattr(getattr(cfg, section), field)
    at = _where(cfg._where, cfg._lines, (section, field))
    if name not in cfg.data:
        near = did_you_mean(name, cfg.data)
        raise PosttrainError(f"{key} names dataset '{name}', which is not under data:", where=at,
                             fix=f"did you mean '{near}'?" if near else f"add a data.{name} section"
                             + ("" if kind == "any" else f" of kind {kind}"))
    if kind != "any" and cfg.data[name].kind != kind:
        raise PosttrainError(f"{key} '{name}' has kind '{cfg.data[name].kind}', but {needs} needs kind '{kind}'",
                             where=at)


def _read_text(p: Path) -> str:
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise PosttrainError(f"not UTF-8 text (byte {e.start})", where=str(p), fix="save the file as UTF-8") from None


def _apply_override(raw: dict, item: str, lines: dict) -> None:
    if "=" not in item:
        raise PosttrainError(f"--set '{item}' is not key.path=value", fix="e.g. --set sft.training.max_steps=10")
    key, value = item.split("=", 1)
    parts = [k for k in key.strip().split(".") if k]
    if not parts:
        raise PosttrainError(f"--set '{item}' has an empty key")
    try:
        parsed = _parse_value(value)
    except (yaml.YAMLError, *UNCONSTRUCTABLE):
        parsed = value  # as the string it is; validation says what the key wants
    for known in [k for k in lines if k[: len(parts)] == tuple(parts)]:
        del lines[known]
    lines[tuple(parts)] = f"--set {item}"
    node = raw
    for k in parts[:-1]:
        if isinstance(node, list):
            node = _list_item(node, k, item)
        else:
            if not isinstance(node.get(k), (dict, list)):
                node[k] = {}
            node = node[k]
    if isinstance(node, list):
        node[_index(node, parts[-1], item)] = parsed
    else:
        node[parts[-1]] = parsed


def _index(items: list, k: str, item: str) -> int:
    if not k.isdigit() or int(k) >= len(items):
        raise PosttrainError(f"--set '{item}': '{k}' is not an index of a list of {len(items)}")
    return int(k)


def _list_item(items: list, k: str, item: str):
    found = items[_index(items, k, item)]
    if not isinstance(found, dict):
        raise PosttrainError(f"--set '{item}': item {k} is not a mapping")
    return found


def _line_map(node, path: tuple, out: dict) -> None:
    """Remember the line of every mapping key and list item so errors can point into the file.
    A loop, not recursion (any depth), and each node once (an anchor may refer to itself)."""
    todo, seen = [(node, path)], set()
    while todo:
        node, path = todo.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = (*path, k.value)
                out[key] = k.start_mark.line + 1
                todo.append((v, key))
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                out[(*path, i)] = v.start_mark.line + 1
                todo.append((v, (*path, i)))


def _where(where: str, lines: dict, loc: tuple) -> str:
    for n in range(len(loc), 0, -1):
        found = lines.get(loc[:n])
        if isinstance(found, str):
            return found
        if found is not None:
            return f"{where}:{found}"
    return where


def _dotted(loc: tuple) -> str:
    return ".".join(str(p) for p in loc)


def _fields_at(loc: tuple) -> list[str]:
    """Valid keys of the config section at `loc` (for did-you-mean).

    List indices and the keys of free-form mappings (dataset names under data:) are not fields.
    """
    import typing

    model: Any = Config
    skip_next = False
    for part in loc:
        if isinstance(part, int) or skip_next:
            skip_next = False
            continue
        field = model.model_fields.get(part)
        if field is None:
            return []
        skip_next = typing.get_origin(field.annotation) is dict
        model = _model_of(field.annotation)
        if model is None:
            return []
    return list(model.model_fields)


def _model_of(annotation) -> type[BaseModel] | None:
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def _to_error(e: ValidationError, where: str, lines: dict) -> PosttrainError:
    errors = e.errors()
    err = errors[0]
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    at = _where(where, lines, loc)
    if err["type"] == "extra_forbidden":
        key = str(loc[-1])
        valid = _fields_at(loc[:-1])
        near = did_you_mean(key, valid)
        fix = f"did you mean '{near}'?" if near else f"valid keys here: {', '.join(valid)}"
        return PosttrainError(f"unknown key '{_dotted(loc)}'{more}", where=at, fix=fix)
    if err["type"] == "value_error":
        return PosttrainError(f"{err['ctx']['error']}{more}", where=at)
    if err["type"] == "missing":
        return PosttrainError(f"missing required key '{_dotted(loc)}'{more}", where=at)
    got = err.get("input")
    shown = repr(got) if not isinstance(got, dict) else "a mapping"
    msg = err["msg"][0].lower() + err["msg"][1:]
    return PosttrainError(f"'{_dotted(loc)}' is {shown}: {msg}{more}", where=at)


# ---------------------------------------------------------------------------------------------
# Trainer fields (validated against the TRL snapshot)


@cache
def trl_fields() -> dict:
    text = resources.files("posttrain").joinpath("trl_fields.json").read_text()
    return json.loads(text)


_KIND_OF = {bool: "bool", int: "int", float: "float", str: "str", list: "list", dict: "dict", type(None): "null"}


def _check_training(training: dict, cls_name: str, loc: tuple, where: str, lines: dict) -> None:
    fields = trl_fields()["configs"][cls_name]
    for key, value in training.items():
        kloc = (*loc, key)
        at = _where(where, lines, kloc)
        if key in OWNED_TRAINING_FIELDS:
            raise PosttrainError(
                f"'{_dotted(kloc)}' is set by posttrain", where=at, fix=OWNED_TRAINING_FIELDS[key]
            )
        if key not in fields:
            near = did_you_mean(key, fields)
            fix = f"did you mean '{near}'?" if near else f"see the fields of trl.{cls_name}"
            raise PosttrainError(f"unknown key '{_dotted(kloc)}' (not a field of trl.{cls_name})", where=at, fix=fix)
        spec = fields[key]
        kind = _KIND_OF.get(type(value), "any")
        ok = "any" in spec["kinds"] or kind in spec["kinds"] or (kind == "int" and "float" in spec["kinds"])
        if not ok:
            want = " or ".join(k for k in spec["kinds"] if k != "null") or "null"
            raise PosttrainError(f"'{_dotted(kloc)}' is {value!r} ({kind}), expected {want}", where=at)
        if "choices" in spec and isinstance(value, str) and value not in spec["choices"]:
            near = did_you_mean(value, spec["choices"])
            fix = f"did you mean '{near}'?" if near else f"one of: {', '.join(spec['choices'])}"
            raise PosttrainError(f"'{_dotted(kloc)}' is '{value}', not a valid choice", where=at, fix=fix)
        if kind in ("int", "float") and value < 0 and key in _NON_NEGATIVE:
            raise PosttrainError(f"'{_dotted(kloc)}' is {value}, must be >= 0", where=at)


DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")

_NON_NEGATIVE = {
    "learning_rate", "num_train_epochs", "per_device_train_batch_size", "per_device_eval_batch_size",
    "gradient_accumulation_steps", "warmup_steps", "weight_decay", "max_length", "logging_steps",
    "save_steps", "eval_steps", "max_grad_norm", "beta",
}


def _check_cross_training(cfg: Config, where: str) -> None:
    t = cfg.sft.training
    if t.get("packing") and t.get("packing_strategy") == "wrapped":
        raise PosttrainError(
            "sft.training.packing_strategy 'wrapped' cuts samples mid-sequence and lets them attend to each other",
            where=where,
            fix="use packing_strategy 'bfd' (position-id segmentation)",
        )
    loss_type = cfg.dpo.training.get("loss_type", ["sigmoid"])
    loss_type = [loss_type] if isinstance(loss_type, str) else loss_type
    bad = [t for t in loss_type if t not in DPO_LOSS_TYPES]
    if bad:
        near = did_you_mean(str(bad[0]), DPO_LOSS_TYPES)
        raise PosttrainError(f"dpo.training.loss_type has unknown type {bad[0]!r}", where=where,
                             fix=f"did you mean '{near}'?" if near else f"one of: {', '.join(DPO_LOSS_TYPES)}")
    weights = cfg.dpo.training.get("loss_weights")
    if weights is not None and len(weights) != len(loss_type):
        raise PosttrainError(f"dpo.training.loss_weights has {len(weights)} weights for {len(loss_type)} loss types",
                             where=where, fix="give one weight per entry of loss_type")
    for stage in TRAINING_SECTIONS:
        tr = getattr(cfg, stage).training
        if tr.get("bf16") and tr.get("fp16"):
            raise PosttrainError(f"{stage}.training sets both bf16 and fp16", where=where, fix="choose one")


# ---------------------------------------------------------------------------------------------
# Resolved form


def to_dict(cfg: Config) -> dict:
    return cfg.model_dump(mode="json")


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def stage_output(cfg: Config, stage: str, output: str | None) -> Path:
    return Path(output) if output else Path(cfg.output_dir) / stage


def device_training_defaults(has_cuda: bool, bf16_supported: bool) -> dict:
    """Trainer settings that depend on the device, so users never meet TRL's CPU quirks.

    TRL's configs default to bf16=True, which fails or crawls on CPUs; on CPU we turn it off and
    set use_cpu. On CUDA, bf16 where the GPU has it.
    """
    if not has_cuda:
        return {"use_cpu": True, "bf16": False, "fp16": False, "dataloader_pin_memory": False}
    return {"bf16": bf16_supported, "fp16": False}
