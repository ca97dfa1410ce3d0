"""Helpers more than one test module uses (no test module imports another, tests/test_layout.py
checks it): the `posttrain` command in a subprocess and the chain config it runs, configs on the
tiny model for the PPO and signal tests, chat templates other than the built-ins, hypothesis
strategies for configs and data rows, and small pieces of the safeguard tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import yaml
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).with_name("posttrain")
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


# ---------------------------------------------------------------------------------------------
# Pieces of the safeguard tests (tests/test_safeguards.py, tests/test_callbacks.py, tests/test_lineage.py)


def trainer_state(step: int):
    """The fields of a TrainerState that the training guards read."""
    return SimpleNamespace(global_step=step, max_steps=10, is_world_process_zero=True)


def same_size_edit(path: Path) -> None:
    """Change one digit of the first row in place: same byte length, new content, later mtime."""
    text = path.read_text()
    i = next(i for i, c in enumerate(text) if c.isdigit())
    new = text[:i] + str((int(text[i]) + 1) % 10) + text[i + 1:]
    assert len(new.encode()) == len(text.encode()) and new != text
    stat = path.stat()
    path.write_text(new)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))


def own_sft_data(d: Path) -> dict:
    """The `data:` entry of the SFT files in `d` (the `own_data` fixture)."""
    return {"kind": "sft", "train": [{"path": str(d / "sft_train.jsonl")}],
            "eval": [{"path": str(d / "sft_eval.jsonl")}]}

# ---------------------------------------------------------------------------------------------
# `posttrain` through the real entry point, and the format → sft → dpo → merge chain config
# (tests/test_chain.py, tests/stages/test_eval.py, tests/test_lineage.py)

CHAIN_STAGES = ["format", "sft", "dpo", "merge"]


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN), *map(str, args)], capture_output=True, text=True, cwd=ROOT, env=ENV,
                          timeout=600)


def assert_clean_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in errors[0], errors[0]
    return errors[0]


def assert_ok(r: subprocess.CompletedProcess) -> None:
    assert r.returncode == 0, (r.returncode, r.stderr[-4000:])


def chain_config(tiny_dir, demo_data, out: Path, **changes) -> dict:
    raw = {
        "model": {"name_or_path": str(tiny_dir)},
        "template": {"name": "chatml"},
        "data": {
            "sft": {"kind": "sft", "train": [{"path": str(demo_data / "sft_train.jsonl")}],
                    "eval": [{"path": str(demo_data / "sft_eval.jsonl")}]},
            "preference": {"kind": "preference", "train": [{"path": str(demo_data / "pref_train.jsonl")}],
                           "eval": [{"path": str(demo_data / "pref_eval.jsonl")}]},
        },
        "stages": list(CHAIN_STAGES),
        "output_dir": str(out),
        "seed": 0,
        "sft": {"method": "full",
                "training": {"max_steps": 30, "per_device_train_batch_size": 16, "learning_rate": 3e-3,
                             "max_length": 64, "gradient_checkpointing": False, "logging_steps": 10,
                             "save_steps": 1000}},
        "dpo": {"method": "lora", "reference": "adapter_disabled",
                "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
                "training": {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 1.0], "beta": 0.1,
                             "learning_rate": 1e-3, "max_steps": 24, "per_device_train_batch_size": 8,
                             "max_length": 64, "gradient_checkpointing": False, "logging_steps": 5,
                             "save_steps": 1000}},
        "merge": {"dtype": "float32", "probe_prompts": ["What is 12 + 34?"], "max_new_tokens": 8},
    }
    for key, value in changes.items():
        node = raw
        *parents, last = key.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return raw


def write_yaml(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


# ---------------------------------------------------------------------------------------------
# Configs (tests/test_config.py, tests/test_properties.py). Line numbers in test_config.py's
# errors are hand-counted against CONFIG_BASE (line 1 is "model:").

CONFIG_BASE = """\
model:
  name_or_path: some/model
data:
  sft:
    kind: sft
    train:
      - path: data/sft.jsonl
  pref:
    kind: preference
    train:
      - path: data/pref.jsonl
sft:
  method: full
  training:
    learning_rate: 0.1
"""

config_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**6), max_value=10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["sft", "preference", "full", "lora", "chatml", "format", "cosine", "wrapped", "bfd"]),
)
config_keys = st.one_of(
    st.sampled_from(
        [
            "model", "name_or_path", "template", "name", "data", "sft", "dpo", "kind", "train", "eval", "path",
            "columns", "roles", "stages", "training", "lora", "r", "method", "learning_rate", "packing",
            "packing_strategy", "output_dir", "beta", "seed", "format", "datasets", "limit", "eval_fraction",
            "pad_token", "lr_scheduler_type", "bf16", "fp16", "max_steps", "reference", "preference",
        ]
    ),
    st.text(max_size=8),
    st.integers(min_value=-3, max_value=3),  # YAML allows non-string keys
    st.none(),
    st.booleans(),
)
config_values = st.recursive(
    config_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(config_keys, inner, max_size=4)),
    max_leaves=20,
)


def config_like():
    """Mostly-plausible configs, with arbitrary values planted at arbitrary depths."""
    values, scalars = config_values, config_scalars
    source = st.fixed_dictionaries({"path": st.text(max_size=6)}, optional={"columns": values, "limit": values})
    dataset = st.fixed_dictionaries(
        {"kind": st.sampled_from(["sft", "preference"]) | scalars, "train": st.lists(source, max_size=2) | values},
        optional={"eval_fraction": values, "max_bad_fraction": values},
    )
    stage = st.fixed_dictionaries(
        {}, optional={"training": st.dictionaries(config_keys, values, max_size=4) | values, "data": values,
                      "method": values, "lora": values}
    )
    return st.fixed_dictionaries(
        {"model": st.fixed_dictionaries({"name_or_path": st.text(max_size=6)}) | values},
        optional={
            "data": st.dictionaries(st.sampled_from(["sft", "preference", "x"]), dataset, max_size=2) | values,
            "sft": stage,
            "dpo": stage,
            "stages": st.lists(st.sampled_from(["format", "sft", "dpo", "eval", "bogus"]), max_size=4) | values,
            "template": values,
            "seed": values,
        },
    )


# ---------------------------------------------------------------------------------------------
# Data rows of every shape, valid or not (tests/test_data.py, tests/test_properties.py)

_row_json = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20),
              st.sampled_from(["user", "assistant", "system", "human", "gpt", "\n\nHuman: q\n\nAssistant: a",
                               "Human: q", "\n\nAssistant: x", ""])),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.sampled_from(["role", "content", "from", "value", "x"]), inner, max_size=3),
    ),
    max_leaves=12,
)
_row_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", "tool", "bot", "weird"]) | _row_json,
     "content": st.text(max_size=10) | _row_json}
)
_row_sharegpt_message = st.fixed_dictionaries(
    {"from": st.sampled_from(["human", "gpt", "system", "weird"]) | _row_json,
     "value": st.text(max_size=10) | _row_json}
)
_row_hh = st.lists(
    st.tuples(st.sampled_from(["\n\nHuman: ", "\n\nAssistant: ", "Human: ", "junk"]), st.text(max_size=8)), max_size=4
).map(lambda parts: "".join(a + b for a, b in parts))
_row_field = st.one_of(_row_json, st.lists(_row_message, max_size=4), _row_hh, st.text(max_size=10))
ROW_SHAPE_COLUMNS = {
    "messages": {"messages": st.lists(_row_message, max_size=5) | _row_json},
    "sharegpt": {"conversations": st.lists(_row_sharegpt_message, max_size=5) | _row_json},
    "alpaca": {"instruction": _row_field, "output": _row_field},
    "prompt_completion": {"prompt": _row_field, "completion": _row_field},
    "preference": {"chosen": _row_field, "rejected": _row_field},
}
ROW_SHAPE_OPTIONAL = {"system": st.none() | st.text(max_size=5) | _row_json, "input": _row_field,
                      "prompt": _row_field}


@st.composite
def row_cases(draw):
    """(shape, row, roles mapping, system prompt): a row of the shape's columns with arbitrary values."""
    shape = draw(st.sampled_from(sorted(ROW_SHAPE_COLUMNS)))
    optional = {k: v for k, v in ROW_SHAPE_OPTIONAL.items() if k not in ROW_SHAPE_COLUMNS[shape]}
    row = draw(st.fixed_dictionaries(ROW_SHAPE_COLUMNS[shape], optional=optional))
    roles = draw(st.dictionaries(st.sampled_from(["bot", "weird", "human"]),
                                 st.sampled_from(["user", "assistant", "system", "nope"]), max_size=2))
    system_prompt = draw(st.none() | st.text(max_size=5))
    return shape, row, roles, system_prompt

