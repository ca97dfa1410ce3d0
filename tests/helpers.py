"""Helpers more than one test module uses (no test module imports another): configs on the tiny
model for the PPO and signal tests, and chat templates other than the built-ins."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "TOKENIZERS_PARALLELISM": "false"}
STEPS = 60
TRAINING = {"max_steps": STEPS, "per_device_train_batch_size": 8, "learning_rate": 1e-3, "logging_steps": 1,
            "save_steps": 1000, "max_length": 64, "gradient_checkpointing": False}


def signals_config(tmp_path: Path, tiny_dir, demo_data) -> Path:
    raw = {
        "model": {"name_or_path": str(tiny_dir)},
        "data": {
            "sft": {"kind": "sft", "train": [{"path": str(demo_data / "sft_train.jsonl")}]},
            "style": {"kind": "preference", "train": [{"path": str(demo_data / "reward_train.jsonl")}]},
        },
        "output_dir": str(tmp_path / "out"), "seed": 0,
        "sft": {"training": dict(TRAINING)},
        "reward": {"data": "style", "training": dict(TRAINING)},
        "dpo": {"data": "style", "method": "lora", "reference": "adapter_disabled",
                "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "training": dict(TRAINING)},
    }
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(raw, sort_keys=False))
    return p


def sft_and_style_data(demo_data, limit: int | None = None, eval_limit: int | None = None,
                       pairs: str = "reward") -> dict:
    """The `data:` section of the demo's SFT rows and style pairs (named `pairs`), each with its
    held-out split, optionally cut to `limit` training / `eval_limit` held-out rows."""
    def source(name: str, n: int | None) -> list[dict]:
        return [{"path": str(demo_data / name), **({"limit": n} if n is not None else {})}]

    return {"sft": {"kind": "sft", "train": source("sft_train.jsonl", limit),
                    "eval": source("sft_eval.jsonl", eval_limit)},
            pairs: {"kind": "preference", "train": source("reward_train.jsonl", limit),
                    "eval": source("reward_eval.jsonl", eval_limit)}}


def ppo_chain_raw(tiny_dir, demo_data, out_root, **sections) -> dict:
    return {
        "model": {"name_or_path": str(tiny_dir)},
        "data": sft_and_style_data(demo_data),
        "output_dir": str(out_root),
        "seed": 0,
        # long enough for the tiny model to write both styles (so there is a preference to act on)
        "sft": {"training": {"max_steps": 300, "per_device_train_batch_size": 16, "learning_rate": 3e-3,
                             "logging_steps": 50, "save_steps": 1000, "max_length": 64,
                             "gradient_checkpointing": False}},
        "reward": {"data": "reward",
                   "training": {"max_steps": 20, "per_device_train_batch_size": 16, "learning_rate": 3e-3,
                                "logging_steps": 5, "save_steps": 1000, "max_length": 64,
                                "gradient_checkpointing": False}},
        **sections,
    }


def ppo_section(rm_dir, **extra) -> dict:
    """A short PPO section: 8 prompts per rollout, answers of at most 12 tokens."""
    return {"reward_model": str(rm_dir), "steps": 4, "batch_size": 8, "mini_batch_size": 4,
            "max_new_tokens": 12, "learning_rate": 1e-3, "sample_every": 1000, "save_steps": 1000, **extra}


OTHER_TEMPLATE = (  # ChatML tokens and generation markers, but "role:" headers for non-assistant turns
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- generation -%}{{- message['content'] + '<|im_end|>' -}}{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + ':\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


LLAMA3_LIKE = (
    "{%- for message in messages -%}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- message['content'] + '<|eot_id|>' -}}{%- endgeneration -%}"
    "{%- else -%}"
    "{{- message['content'] + '<|eot_id|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
)


def trl_training(steps: int, lr: float, **extra) -> dict:
    """A few steps of a TRL stage on the tiny model (`<stage>.training`)."""
    return {"max_steps": steps, "per_device_train_batch_size": 8, "per_device_eval_batch_size": 16,
            "learning_rate": lr, "logging_steps": 1, "save_steps": 1000, "max_length": 64,
            "gradient_checkpointing": False, **extra}


def online_training(steps: int, **extra) -> dict:
    """A few RLOO/GRPO steps on the tiny model: 2 completions of at most 6 tokens per prompt."""
    return {"max_steps": steps, "per_device_train_batch_size": 4, "num_generations": 2,
            "max_completion_length": 6, "learning_rate": 1e-2, "logging_steps": 1, "save_steps": 1000,
            "gradient_checkpointing": False, **extra}
