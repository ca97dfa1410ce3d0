"""posttrain.card: the model card (README.md, Hugging Face format) of a finished stage, written
from its manifest before the manifest itself. The cards of a real chain, with the eval rows, are
checked in tests/stages/test_eval.py."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from posttrain import card, manifest
from posttrain.config import validate_dict
from posttrain.stages import common


def _manifest(**changes) -> dict:
    m = {
        "stage": "dpo", "method": "lora", "reference": "a frozen copy", "beta": 0.1, "adapter_base": "runs/x/sft",
        "data": {"name": "preference", "rows": 2000,
                 "files": {"data/pref_train.jsonl": "b9eea6486c9cc566", "data/pref_eval.jsonl": "e8cf380c4420fea5"}},
        "metrics": {"steps": 200, "reward_accuracy": 0.8875},
        "parent": {"path": "runs/x/sft", "hash": "1c06", "stage": "sft"},
        "special_tokens": {"eot": 3},
        "config": {"model": {"name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"}, "template": {"name": "chatml"},
                   "dpo": {"method": "lora", "lora": {"r": 8, "alpha": 16, "target_modules": "all-linear"},
                           "training": {"learning_rate": 5e-6, "max_steps": 200}}},
        "versions": {"posttrain": "0.1.0", "trl": "1.16.0"}, "finished": "2026-12-07T16:12:48+0000",
    }
    return {**m, **changes}


def test_front_matter_for_an_adapter_and_a_full_model(tmp_path):
    adapter = tmp_path / "dpo"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    text = card.render(adapter, _manifest(), {"reward acc": 0.8875, "steps": 200})
    front = card.read_front_matter(text)
    assert front == {"base_model": "runs/x/sft", "datasets": ["pref_train.jsonl@b9eea6486c9cc566",
                                                              "pref_eval.jsonl@e8cf380c4420fea5"],
                     "library_name": "peft", "pipeline_tag": "text-generation",
                     "tags": ["posttrain", "trl", "dpo", "lora"]}
    assert "AutoPeftModelForCausalLM" in text and "| reward acc | 0.8875 |" in text
    assert "Optimised against a reward or preferences" in text and "Trained on 2,000 rows" in text
    assert "| training.learning_rate | 5e-06 |" in text and "| lora | r 8, alpha 16, target all-linear |" in text
    assert "Started from the sft stage at `runs/x/sft`; the chain starts at `HuggingFaceTB/SmolLM2-135M-Instruct`." \
        in text
    full = tmp_path / "merge"
    full.mkdir()
    text = card.render(full, _manifest(stage="merge", method=None, adapter_base=None,
                                       parent={"path": "runs/x/dpo", "stage": "dpo"}), {})
    front = card.read_front_matter(text)
    assert front["library_name"] == "transformers" and front["base_model"] == "runs/x/dpo"
    assert "trl" not in front["tags"] and "AutoModelForCausalLM.from_pretrained" in text
    assert "Optimised against" not in text
    assert str(tmp_path) not in text  # no machine path beyond what the manifest (the user) gave


def test_license_comes_from_the_parents_card_and_origin_is_stated(tmp_path):
    parent = tmp_path / "base"
    parent.mkdir()
    (parent / "README.md").write_text("---\nlicense: apache-2.0\nlibrary_name: transformers\n---\n# base\n")
    m = _manifest(stage="sft", parent={"path": str(parent), "stage": None},
                  origin={"file": "smollm2.gguf", "sha256": "ab" * 32, "quantization": "Q8_0"})
    text = card.render(tmp_path, m, {})
    assert card.read_front_matter(text)["license"] == "apache-2.0"
    assert "GGUF file `smollm2.gguf`" in text and "dequantised GGUF image" in text
    (parent / "README.md").write_text("# no front matter\n")
    assert "license" not in card.read_front_matter(card.render(tmp_path, m, {}))


def test_eval_rows_show_differences_from_the_first():
    rows = [{"label": "base", "metrics": {"held-out NLL": 5.7, "pair accuracy": 0.717, "greedy exact": None}},
            {"label": "sft", "metrics": {"held-out NLL": 0.078, "pair accuracy": 0.95, "greedy exact": 0.8}}]
    lines = card._evaluation(rows)
    assert lines[4] == "| model | held-out NLL | pair accuracy | greedy exact |"
    assert lines[6] == "| base | 5.7 | 0.717 | None |"
    assert lines[7] == "| sft | 0.078 (-5.62) | 0.95 (+0.233) | 0.8 |"  # no difference from a missing number


def test_the_card_is_written_before_the_manifest(tmp_path, monkeypatch):
    """A card that cannot be written leaves no posttrain.json: the directory never looks finished."""
    class Tokenizer:  # what special_tokens() reads
        bos_token_id, eos_token_id, pad_token_id = 0, 0, 1

        def __len__(self):
            return 296

    tok = SimpleNamespace(tokenizer=Tokenizer(), eot_id=3, template_hash="f1e2")
    cfg = validate_dict({"model": {"name_or_path": "m"}, "stages": ["format"]})

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(card, "render", broken)
    with pytest.raises(OSError, match="disk full"):
        common.write_manifest(tmp_path, "sft", cfg, tok, parent=None, key="k", started="s", metrics={"steps": 1})
    assert not manifest.is_finished(tmp_path) and not (tmp_path / "README.md").exists()
    monkeypatch.undo()
    common.write_manifest(tmp_path, "sft", cfg, tok, parent=None, key="k", started="s", metrics={"steps": 1})
    assert manifest.is_finished(tmp_path)
    text = Path(tmp_path / "README.md").read_text()
    assert "| steps | 1 |" in text and card.read_front_matter(text)["tags"] == ["posttrain", "trl", "sft"]
