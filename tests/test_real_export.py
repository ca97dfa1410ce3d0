"""Gemma-3-270M exported to GGUF after its chain: the GGUF file a user downloads → format → one
LoRA SFT step with the Gemma template → merge → export (f16), through `posttrain run`.

Gemma is the case llama.cpp's converter gets wrong by itself: transformers 5 saves its tokenizer as
tokenizer.json only, and without tokenizer.model the converter writes a GPT-2 vocabulary of
SentencePiece pieces that neither transformers nor llama.cpp reads back correctly. posttrain's
driver writes it as llama.cpp writes Gemma's (posttrain/converter.py). Here: the round trip
passes at f16's tight tolerance, the tokenizer read back from the file encodes a Gemma chat with
its turn tokens whole and the same ids (the stage's own check), and the file carries the Gemma
template, <end_of_turn> as its end-of-turn token and a Modelfile with Ollama's Gemma template. (SmolLM2's export runs in
tests/test_real_smoke.py.)
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from posttrain import manifest, ollama, templates
from posttrain.sections import EXPORT_TOLERANCE

pytestmark = [pytest.mark.real, pytest.mark.slow]

BIN = Path(sys.executable).with_name("posttrain")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
ROWS = [
    ("What is the capital of France?", "Paris."),
    ("What is the opposite of hot?", "Cold."),
    ("What is 7 + 5?", "12."),
    ("What is the plural of mouse?", "Mice."),
]


@pytest.fixture(scope="module")
def chain(real_models, tmp_path_factory):
    path, _ = real_models("gemma3")
    root = tmp_path_factory.mktemp("real_export_gemma")
    data = root / "sft.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                      {"role": "assistant", "content": a}]}) + "\n"
                            for q, a in ROWS))
    config = {
        "model": {"name_or_path": str(path)},
        "template": {"name": "gemma"},
        "data": {"sft": {"kind": "sft", "train": [{"path": str(data)}]}},
        "stages": ["format", "sft", "merge", "export"],
        "output_dir": str(root / "out"),
        "seed": 0,
        "sft": {"method": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
                "training": {"max_steps": 1, "per_device_train_batch_size": 4, "learning_rate": 1e-3,
                             "logging_steps": 1, "save_steps": 1000, "max_length": 48}},
        "merge": {"dtype": "float32", "probe_prompts": [ROWS[0][0]], "max_new_tokens": 4},
        "export": {"type": "f16", "probe_prompts": [ROWS[0][0]], "max_new_tokens": 8},
    }
    cfg_path = root / "gemma.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    r = subprocess.run([str(BIN), "run", str(cfg_path)], capture_output=True, text=True, env=ENV, timeout=1500)
    assert r.returncode == 0, r.stderr[-4000:]
    return root / "out"


def test_gemma_export_passes_the_f16_round_trip(chain):
    m = manifest.read(chain / "export")
    assert m["parent"]["path"] == str(chain / "merge") and m["file"]["architecture"] == "gemma3"
    trip = m["checks"]["round_trip"]
    print(f"\ngemma f16: {trip['relative_diff']:.2e} of scale {trip['logit_scale']:.1f}, argmax "
          f"{trip['argmax_agreement']:.3f}, answers {[s['file'] for s in trip['samples']]}")
    assert trip["relative_diff"] <= EXPORT_TOLERANCE["f16"] and trip["argmax_agreement"] >= 0.95, trip
    # the tokenizer transformers reads back from the file (the SentencePiece vocabulary the driver
    # wrote) gave the model's ids on the probe and on a chat with its turn tokens and non-ASCII text
    assert trip["tokenizer_same_ids"] == 2


def test_gemma_file_carries_its_template_turn_tokens_and_vocabulary(chain):
    """Read from the manifest: the export read them from the file (parsing a 262k-token vocabulary
    again takes 13 s)."""
    meta = manifest.read(chain / "export")["tokenizer"]
    assert meta["model"] == "llama" and meta["tokens"] == 262144  # SentencePiece, as llama.cpp writes Gemma
    assert meta["eot"]["text"] == "<end_of_turn>" and meta["bos"]["text"] == "<bos>"
    expected = templates.without_markers(templates.GEMMA).encode()
    assert meta["chat_template_sha256"] == hashlib.sha256(expected).hexdigest()[:16]
    text = (chain / "export" / ollama.FILE).read_text()
    assert 'TEMPLATE """' + ollama.TEMPLATES["gemma"] + '"""' in text
    assert 'PARAMETER stop "<end_of_turn>"' in text
