"""Config sections: the pydantic models of each section of a posttrain YAML, without importing torch.

`Strict` is their base (unknown keys are errors, values are not coerced). One model per section:
`model:` (ModelConfig), `template:` (TemplateConfig), `data:` (DataConfig with its SourceConfig
entries), `launch:` (LaunchConfig) and one per stage (FormatStageConfig, SFTStageConfig,
RewardStageConfig, PPOStageConfig, OnlineStageConfig for rloo and grpo, DPOStageConfig,
MergeStageConfig, ControlStageConfig, EvalStageConfig), with the parts they share (StageConfig,
LoraConfig, RewardGate, RewardSource, ScorerConfig, DecodingConfig, LmEvalConfig). Each model checks
only its own fields; the root `Config`, its cross-section rules, loading and error messages are in
config.py.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


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


# max |Δlogit| between the GGUF file and its source, over the source's largest |logit|, accepted by
# export's round trip. Measured (docs/benchmarks.md, fp32, transformers' GGUF loader): f16 ≤ 1.0e-3
# (SmolLM2 8.4e-4, Gemma-3 9.7e-4), bf16 ≤ 7.5e-3, q8_0 ≤ 3.0e-2; the defaults leave 2-3x room.
EXPORT_TOLERANCE = {"f16": 3e-3, "bf16": 2e-2, "q8_0": 6e-2}


class ExportStageConfig(Strict):
    format: Literal["gguf"] = Field("gguf", description="The file format: gguf (llama.cpp, Ollama).")
    type: Literal["f16", "bf16", "q8_0"] = Field(
        "q8_0", description="The GGUF tensor type: f16 and bf16 keep 16-bit weights, q8_0 8-bit blocks (half the "
        "size). Matrices whose rows do not split into blocks of 32 stay f16 in a q8_0 file (llama.cpp's rule).")
    tolerance: float | None = Field(
        None, gt=0.0, description="Largest max |Δlogit| between the file (read back by transformers) and the source "
        "model on the probe prompts, relative to the source's largest |logit|. Unset: "
        + ", ".join(f"{k} {v:g}" for k, v in EXPORT_TOLERANCE.items()) + ".")
    name: str | None = Field(None, description="The model's name in the file (general.name) and the file's stem; "
                             "unset: <chain>-<stage> for a stage directory (runs/demo/merge: demo-merge), else the "
                             "directory's or GGUF file's name.")
    probe_prompts: list[str] = Field(
        default_factory=lambda: ["What is 12 + 34?", "Write one sentence about the sea.", "Hello!"],
        min_length=1, description="User messages rendered with the chat template for the round trip.",
    )
    max_new_tokens: int = Field(24, ge=1, description="Tokens of each greedy answer compared between file and source.")

    def tolerance_for_type(self) -> float:
        return self.tolerance if self.tolerance is not None else EXPORT_TOLERANCE[self.type]


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


class PushConfig(Strict):
    """The chain's last step: upload a finished stage to the Hugging Face Hub (`posttrain push`)."""

    repo_id: str | None = Field(None, description="The Hub repo `posttrain run` uploads to after the report; "
                                "unset: no upload.")
    stage: str | None = Field(None, description="Which stage's output to upload; default: the chain's last policy "
                              "or merge stage.")
    private: bool = Field(False, description="Create the repo private.")
    revision: str | None = Field(None, description="The branch to upload to (created if missing); default main.")
