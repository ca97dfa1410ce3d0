"""The bad-input catalogue: configs, data, models and command lines that users get wrong.

Every case runs the real `posttrain` command and must end the same way: exit code 2, exactly one
line on stderr that says what is wrong (the needles), no traceback, and no finished-looking
output (no posttrain.json, no weights). `--debug` shows the traceback instead (last test).
Config cases run `validate` (no torch, about a second); data cases `format`; model and command
cases the stage that meets them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

BIN = Path(sys.executable).with_name("posttrain")
ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "TOKENIZERS_PARALLELISM": "false"}

pytestmark = pytest.mark.slow


@dataclass
class Case:
    command: str  # validate | format | sft | dpo | merge | eval | run
    changes: dict = field(default_factory=dict)  # dotted__keys -> value (None deletes the key)
    needles: tuple[str, ...] = ()
    args: tuple = ()  # extra command-line arguments; "{tmp}" is replaced by the test's directory
    files: dict = field(default_factory=dict)  # name -> text (or bytes) written under tmp first
    raw_config: str | bytes | None = None  # the config file's text instead of the YAML of `changes`


def _src(name: str) -> list[dict]:
    return [{"path": "{tmp}/" + name}]


MESSAGES = json.dumps({"messages": [{"role": "user", "content": "What is 1 + 2?"},
                                    {"role": "assistant", "content": "1 + 2 = 3"}]})
PAIR = json.dumps({"prompt": "What is 1 + 2?", "chosen": "1 + 2 = 3", "rejected": "1 + 2 = 4"})
SAME = json.dumps({"prompt": "What is 1 + 2?", "chosen": "1 + 2 = 3", "rejected": "1 + 2 = 3"})
LLAMA3 = ("{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
          "{% generation %}{{ m['content'] }}<|eot_id|>{% endgeneration %}{% endfor %}")

CASES: dict[str, Case] = {
    # --- config: keys, types, ranges, contradictions
    "typo in a section name": Case("validate", {"sfft": {}}, ("unknown key 'sfft'", "did you mean 'sft'")),
    "typo in a stage key": Case("validate", {"sft__methd": "lora"}, ("sft.methd", "did you mean 'method'")),
    "typo in a TRL field": Case("validate", {"sft__training__learnig_rate": 0.1}, ("did you mean 'learning_rate'",)),
    "typo in a LoRA key": Case("validate", {"sft__lora__alpah": 8}, ("sft.lora.alpah", "did you mean 'alpha'")),
    "string for an int": Case("validate", {"sft__lora__r": "eight"}, ("sft.lora.r",)),
    "quoted number": Case("validate", {"sft__lora__r": "16"}, ("sft.lora.r", "'16'")),
    "dropout out of range": Case("validate", {"sft__lora__dropout": 1.5}, ("sft.lora.dropout",)),
    "negative learning rate": Case("validate", {"sft__training__learning_rate": -1.0},
                                   ("learning_rate", "must be >= 0")),
    "bad scheduler choice": Case("validate", {"sft__training__lr_scheduler_type": "cosinee"},
                                 ("lr_scheduler_type", "did you mean 'cosine'")),
    "wrong type for a TRL field": Case("validate", {"sft__training__max_steps": "ten"}, ("max_steps", "expected int")),
    "unknown method": Case("validate", {"sft__method": "qlora4"}, ("sft.method",)),
    "stages out of order": Case("validate", {"stages": ["dpo", "sft"]}, ("stages must be a subsequence",)),
    "unknown stage": Case("validate", {"stages": ["format", "rlhf"]}, ("stages",)),
    "dataset name not under data": Case("validate", {"sft__data": "sfft"}, ("sft.data", "did you mean 'sft'")),
    "dataset of the wrong kind": Case("validate", {"dpo__data": "sft", "stages": ["sft", "dpo"]},
                                      ("dpo.data 'sft' has kind 'sft'",)),
    "packing that lets samples attend": Case("validate", {"sft__training__packing": True,
                                                          "sft__training__packing_strategy": "wrapped"},
                                             ("wrapped", "bfd")),
    "bf16 and fp16": Case("validate", {"sft__training__bf16": True, "sft__training__fp16": True},
                          ("both bf16 and fp16",)),
    "adapter_disabled on a full DPO": Case("validate", {"dpo__reference": "adapter_disabled"},
                                           ("needs dpo.method lora",)),
    "merge after a full stage": Case("validate", {"stages": ["sft", "merge"]}, ("no adapter",)),
    "PPO batch not a multiple": Case("validate", {"ppo__batch_size": 10, "ppo__mini_batch_size": 4},
                                     ("not a multiple of ppo.mini_batch_size",)),
    "PPO without a reward model": Case("validate", {"stages": ["sft", "ppo"]}, ("no reward before it",)),
    "field posttrain owns": Case("validate", {"sft__training__output_dir": "x"}, ("is set by posttrain", "--output")),
    "a secret in the config": Case("validate", {"sft__training__hub_token": "hf_x"},
                                   ("is set by posttrain", "HF_TOKEN")),
    "unknown DPO loss": Case("validate", {"dpo__training__loss_type": ["sigmoidd"]}, ("loss_type", "did you mean")),
    "control without sft": Case("validate", {"stages": ["format", "control"]}, ("control", "no sft")),
    "regex scorer without a pattern": Case("validate", {"eval__scorers": [{"name": "x", "kind": "regex"}]},
                                           ("needs a pattern",)),
    "reward function that is not module:function": Case(
        "validate", {"grpo__rewards": [{"function": "not a spec"}]}, ("not 'module:function'",)),
    # --- config files and command lines
    "empty config file": Case("validate", raw_config="", needles=("config file is empty",)),
    "config that is a list": Case("validate", raw_config="- a\n- b\n", needles=("must be a mapping",)),
    "invalid YAML": Case("validate", raw_config="model: [unclosed\n", needles=("not valid YAML",)),
    "config not UTF-8": Case("validate", raw_config=b"model:\n  name_or_path: \xff\xfe\n", needles=("not UTF-8",)),
    "missing config file": Case("validate", args=("{tmp}/nope.yaml",), needles=("does not exist",)),
    "malformed --set": Case("validate", args=("--set", "sft.training.max_steps"), needles=("is not key.path=value",)),
    "--set index out of range": Case("validate", args=("--set", "data.sft.train.5.path=x"),
                                     needles=("not an index",)),
    # --- data
    "data file missing": Case("format", {"data__sft__train": _src("nope.jsonl")}, ("does not exist",)),
    "empty data file": Case("format", {"data__sft__train": _src("empty.jsonl")}, ("empty",), files={"empty.jsonl": ""}),
    "malformed JSON line": Case("format", {"data__sft__train": _src("broken.jsonl")}, ("broken.jsonl",),
                                files={"broken.jsonl": MESSAGES + "\n{not json\n"}),
    "columns of no known shape": Case("format", {"data__sft__train": _src("q.jsonl")}, ("cannot tell the shape",),
                                      files={"q.jsonl": '{"question": "q", "answer": "a"}\n'}),
    "column mapping names a missing column": Case(
        "format", {"data__sft__train": [{"path": "{tmp}/q.jsonl", "columns": {"prompt_text": "prompt"}}]},
        ("columns",), files={"q.jsonl": '{"question": "q", "answer": "a"}\n'}),
    "preference rows in an sft dataset": Case("format", {"data__sft__train": _src("pairs.jsonl")},
                                              ("shape of SFT data", "prompt"), files={"pairs.jsonl": PAIR + "\n"}),
    "mixed schemas in one file": Case("format", {"data__sft__train": _src("mixed.jsonl")}, ("mixed.jsonl",),
                                      files={"mixed.jsonl": (MESSAGES + "\n") * 3 + (PAIR + "\n") * 3}),
    "chosen equals rejected": Case("format", {"data__preference__train": _src("same.jsonl")},
                                   ("chosen", "rejected"), files={"same.jsonl": (SAME + "\n") * 4}),
    "data not UTF-8": Case("format", {"data__sft__train": _src("latin1.jsonl")}, ("not UTF-8",),
                           files={"latin1.jsonl": MESSAGES.replace("What", "Wh\xe4t").encode("latin-1") + b"\n"}),
    "unsupported file type": Case("format", {"data__sft__train": _src("data.xlsx")}, ("xlsx",),
                                  files={"data.xlsx": "x"}),
    "unknown role": Case("format", {"data__sft__train": _src("roles.jsonl")}, ("role",),
                         files={"roles.jsonl": json.dumps({"messages": [
                             {"role": "narrator", "content": "hi"}, {"role": "robot", "content": "yo"}]}) + "\n"}),
    # --- models and tokenizers
    "base model path missing": Case("sft", {"model__name_or_path": "{tmp}/no-model"}, ("does not exist",)),
    "base directory that holds no model": Case("sft", {"model__name_or_path": "{tmp}/notamodel"}, ("no config.json",),
                                               files={"notamodel/readme.txt": "hi"}),
    "pad token equal to eos": Case("sft", {"model__pad_token": "<|endoftext|>"}, ("pad_token", "eos")),
    "pad token equal to end of turn": Case("sft", {"model__pad_token": "<|im_end|>"}, ("pad_token",)),
    "template tokens missing from the tokenizer": Case("sft", {"template__name": "{tmp}/llama3.jinja"},
                                                       ("<|start_header_id|>", "add_special_tokens"),
                                                       files={"llama3.jinja": LLAMA3}),
    "template file missing": Case("sft", {"template__name": "{tmp}/nope.jinja"}, ("nope.jinja",)),
    "--resume without a checkpoint": Case("sft", args=("--resume",), needles=("--resume", "no checkpoint")),
    "--base that is an unfinished stage": Case("dpo", args=("--base", "{tmp}/half"), needles=("unfinished stage",),
                                               files={"half/posttrain.started.json": "{}",
                                                      "half/config.json": "{}"}),
    "merge of a stage without an adapter": Case("merge", args=("--base", "{tiny}"),
                                                needles=("not a LoRA adapter",)),
    "output that is a non-stage directory": Case("sft", args=("-o", "{tmp}/mine"), needles=("not empty",),
                                                 files={"mine/notes.txt": "mine"}),
    "output inside a regular file": Case("sft", args=("-o", "{tmp}/taken/sft"), needles=("cannot create", "taken"),
                                         files={"taken": "a file, not a directory"}),
    "eval before the chain ran": Case("eval", {"stages": ["sft", "eval"]}, ("no finished sft stage",)),
    "--from a stage not in the chain": Case("run", {"stages": ["format"]}, ("--from",), args=("--from", "dpo")),
}


def _config(tmp: Path, tiny_dir: Path, demo_data: Path, case: Case) -> Path:
    raw = {
        "model": {"name_or_path": str(tiny_dir)},
        "data": {"sft": {"kind": "sft", "train": [{"path": str(demo_data / "sft_train.jsonl")}],
                         "eval": [{"path": str(demo_data / "sft_eval.jsonl")}]},
                 "preference": {"kind": "preference", "train": [{"path": str(demo_data / "pref_train.jsonl")}]}},
        "stages": ["format", "sft"],
        "output_dir": str(tmp / "out"),
        "sft": {"training": {"max_steps": 2, "per_device_train_batch_size": 4, "max_length": 64,
                             "gradient_checkpointing": False}},
    }
    for key, value in case.changes.items():
        node = raw
        *parents, last = key.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    text = yaml.safe_dump(raw, sort_keys=False).replace("{tmp}", str(tmp)).replace("{tiny}", str(tiny_dir))
    path = tmp / "config.yaml"
    if case.raw_config is None:
        path.write_text(text)
    elif isinstance(case.raw_config, bytes):
        path.write_bytes(case.raw_config)
    else:
        path.write_text(case.raw_config)
    return path


def _finished_looking(root: Path) -> list[Path]:
    return [p for pattern in ("posttrain.json", "*.safetensors", "posttrain-chain.json", "report.md")
            for p in root.rglob(pattern)]


def test_the_catalogue_is_large_enough():
    assert len(CASES) >= 40


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_exit_2_and_nothing_finished(name, tmp_path, tiny_dir, demo_data):
    case = CASES[name]
    for rel, content in case.files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content) if isinstance(content, bytes) else p.write_text(content)
    cfg = _config(tmp_path, tiny_dir, demo_data, case)
    args = [a.replace("{tmp}", str(tmp_path)).replace("{tiny}", str(tiny_dir)) for a in case.args]
    if name == "missing config file":
        argv = [case.command, *args]
    else:
        argv = [case.command, str(cfg), *args]
    r = subprocess.run([str(BIN), *argv], capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=600)
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    for needle in case.needles:
        assert needle in errors[0], errors[0]
    assert not _finished_looking(tmp_path), _finished_looking(tmp_path)


def test_debug_shows_the_traceback(tmp_path):
    r = subprocess.run([str(BIN), "--debug", "validate", str(tmp_path / "nope.yaml")], capture_output=True,
                       text=True, cwd=ROOT, env=ENV, timeout=120)
    assert r.returncode != 0 and "Traceback" in r.stderr and "PosttrainError" in r.stderr
