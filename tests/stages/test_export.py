"""Exporting the tiny model to GGUF: the file, its round trip, its metadata, the Modelfile.

`posttrain run` format → sft (LoRA) → merge → export writes a GGUF file of the merged model that
transformers reads back with the model's logits (within the type's tolerance) and greedy answers,
whose tokenizer encodes like the model's, whose metadata holds the chat template (without the
training markers) and the end-of-turn token, with a Modelfile beside it and a manifest last. Each
type (f16, bf16, q8_0) on its own. The refusals (an adapter, an architecture llama.cpp does not
know, a chain that would export an adapter) are one line with nothing finished left behind; the
round trip's tolerance has a negative control on each side of the measured difference, and a file
of other weights fails it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from posttrain import gguf, manifest, models, ollama, templates
from posttrain.config import validate_dict
from posttrain.errors import PosttrainError
from posttrain.sections import EXPORT_TOLERANCE
from posttrain.stages import export
from tests.helpers import assert_clean_error, assert_ok, chain_config, cli, write_yaml

pytestmark = pytest.mark.slow
LORA = {"r": 8, "alpha": 16, "dropout": 0.0}


def _config(tiny_dir, out: Path, **export_section):
    return validate_dict({"model": {"name_or_path": str(tiny_dir)}, "template": {"name": "chatml"},
                          "stages": ["export"], "output_dir": str(out),
                          "export": {"probe_prompts": ["What is 12 + 34?", "Hello!"], "max_new_tokens": 8,
                                     **export_section}})


@pytest.fixture(scope="module")
def chain(tiny_dir, demo_data, tmp_path_factory):
    """format → sft (LoRA, 10 steps) → merge → export (q8_0), through `posttrain run`."""
    root = tmp_path_factory.mktemp("export_chain")
    raw = chain_config(tiny_dir, demo_data, root / "out", stages=["format", "sft", "merge", "export"],
                       sft__method="lora", sft__lora=LORA, sft__training__max_steps=10,
                       sft__training__learning_rate=2e-2,
                       export={"type": "q8_0", "probe_prompts": ["What is 12 + 34?", "Hello!"],
                               "max_new_tokens": 8})
    r = cli("run", write_yaml(root / "chain.yaml", raw))
    assert_ok(r)
    return {"root": root / "out", "stderr": r.stderr}


@pytest.fixture(scope="module")
def exported(tiny_dir, tmp_path_factory):
    """The tiny model exported once per type: f16 and q8_0 in this process, bf16 through the command
    line's --type and --format (over a config that says q8_0)."""
    root = tmp_path_factory.mktemp("export_types")
    found = {t: export.run(_config(tiny_dir, root / t, type=t)) for t in ("f16", "q8_0")}
    cfg = write_yaml(root / "c.yaml", {"model": {"name_or_path": str(tiny_dir)}, "stages": ["export"],
                                       "template": {"name": "chatml"}, "output_dir": str(root / "bf16"),
                                       "export": {"type": "q8_0", "probe_prompts": ["What is 12 + 34?", "Hello!"],
                                                  "max_new_tokens": 8}})
    assert_ok(cli("export", tiny_dir, "-c", cfg, "--type", "bf16", "--format", "gguf"))
    found["bf16"] = root / "bf16" / "export"
    return found


def _gguf_file(out: Path) -> Path:
    (file,) = out.glob("*.gguf")
    return file


def test_chain_exports_the_merged_model(chain):
    out = chain["root"] / "export"
    m = manifest.read(out)
    assert m["stage"] == "export" and m["type"] == "q8_0"
    assert m["parent"]["path"] == str(chain["root"] / "merge") and m["parent"]["stage"] == "merge"
    file = out / m["file"]["file"]
    assert file.is_file() and m["file"]["sha256"] == gguf.sha256(file)
    assert gguf.describe(file)["quantization"] == "Q8_0"
    trip = m["checks"]["round_trip"]
    assert trip["relative_diff"] <= trip["tolerance"] == EXPORT_TOLERANCE["q8_0"]
    # the merged model's answers, read from the file: greedy, compared token for token
    assert trip["same_answers"] == trip["probes"] == 2, trip["samples"]
    assert not (out / ".staging").exists() and not list(out.glob("*.partial")) and not list(out.glob("*.failed"))
    summary = json.loads((chain["root"] / "posttrain-chain.json").read_text())
    assert [s["stage"] for s in summary["stages"]] == ["format", "sft", "merge", "export"]
    assert summary["stages"][-1]["metrics"]["type"] == "q8_0"


def test_chain_rerun_keeps_the_export_up_to_date(chain):
    before = manifest.read(chain["root"] / "export")["finished"]
    r = cli("run", chain["root"].parent / "chain.yaml")
    assert_ok(r)
    assert manifest.read(chain["root"] / "export")["finished"] == before
    assert "export: up to date" in r.stderr


def test_merged_model_answers_the_same_from_the_file(chain):
    """The file's greedy answer to a prompt is the merged model's (both in transformers)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged, out = chain["root"] / "merge", chain["root"] / "export"
    tok = AutoTokenizer.from_pretrained(str(merged))
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 3 + 4?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    answers = []
    for model in (AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32),
                  AutoModelForCausalLM.from_pretrained(str(out), gguf_file=_gguf_file(out).name,
                                                       dtype=torch.float32)):
        with torch.no_grad():
            answers.append(model.eval().generate(ids, max_new_tokens=8, do_sample=False,
                                                 pad_token_id=tok.pad_token_id)[0].tolist())
    assert answers[0] == answers[1]


@pytest.mark.parametrize("type_", ["f16", "bf16", "q8_0"])
def test_each_type_passes_its_round_trip(exported, type_):
    m = manifest.read(exported[type_])
    trip = m["checks"]["round_trip"]
    assert trip["relative_diff"] <= EXPORT_TOLERANCE[type_] and trip["argmax_agreement"] == 1.0
    assert trip["same_answers"] == 2
    assert gguf.describe(_gguf_file(exported[type_]))["quantization"] == type_.upper()


def test_sixteen_bit_file_holds_the_weights(exported, tiny_dir):
    """The file's weights are the model's rounded to 16 bits (f16: ~11 significant bits, bf16: 8),
    and q8_0's are further away: the types are what they say."""
    from transformers import AutoModelForCausalLM

    source = AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32).state_dict()
    errors = {}
    for t, out in exported.items():
        read = AutoModelForCausalLM.from_pretrained(str(out), gguf_file=_gguf_file(out).name,
                                                    dtype=torch.float32).state_dict()
        name = "model.layers.0.mlp.down_proj.weight"
        errors[t] = float((read[name] - source[name]).abs().max() / source[name].abs().max())
    assert errors["f16"] < 1e-3 < errors["bf16"] < 1e-2, errors
    assert errors["q8_0"] > errors["f16"], errors


def test_file_carries_template_and_end_of_turn(exported, tiny_dir):
    meta = gguf.tokenizer_metadata(_gguf_file(exported["f16"]))
    assert meta["chat_template"] == templates.without_markers(templates.CHATML)
    assert "generation" not in meta["chat_template"].replace("add_generation_prompt", "")
    assert meta["eot"] == {"id": 3, "text": "<|im_end|>"}  # the tiny tokenizer's eos is <|endoftext|>
    assert meta["eos"]["text"] == "<|endoftext|>"
    assert meta["pre"] == "smollm" and meta["model"] == "gpt2"


def test_tokenizer_read_from_the_file_encodes_like_the_model(exported, tiny_dir):
    from transformers import AutoTokenizer

    out = exported["bf16"]
    mine = AutoTokenizer.from_pretrained(str(tiny_dir))
    theirs = AutoTokenizer.from_pretrained(str(out), gguf_file=_gguf_file(out).name)
    conversation = [{"role": "user", "content": "What is 12 + 34? Answer: 46."},
                    {"role": "assistant", "content": "It is 46, so 12+34=46 ."}]
    text = mine.apply_chat_template(conversation, chat_template=templates.CHATML, tokenize=False)
    for s in (text, "  spaces   and\ttabs\n\n", "digits 1234567890", "ünïcödé ✓"):
        assert theirs(s, add_special_tokens=False).input_ids == mine(s, add_special_tokens=False).input_ids, s


def test_modelfile_beside_the_file(exported):
    out = exported["q8_0"]
    text = (out / ollama.FILE).read_text()
    assert f"FROM ./{_gguf_file(out).name}\n" in text
    assert 'TEMPLATE """' + ollama.TEMPLATES["chatml"] + '"""' in text
    assert [line for line in text.splitlines() if line.startswith("PARAMETER stop")] == [
        'PARAMETER stop "<|im_end|>"', 'PARAMETER stop "<|im_start|>"', 'PARAMETER stop "<|endoftext|>"']
    assert "SYSTEM" not in text  # the built-in ChatML inserts no system prompt
    m = manifest.read(out)
    assert m["modelfile"]["template"] == "chatml"


def test_card_says_how_to_run_the_file(exported):
    from posttrain import card

    text = (exported["q8_0"] / card.CARD).read_text()
    front = card.read_front_matter(text)
    assert front["library_name"] == "gguf" and {"gguf", "q8_0", "export"} <= set(front["tags"])
    assert "ollama create" in text and "llama-cli -m tiny" in text


def test_manifest_is_written_last(exported):
    out = exported["f16"]
    newest = max((p for p in out.iterdir() if p.is_file() and p.name != "posttrain.started.json"),
                 key=lambda p: p.stat().st_mtime_ns)
    assert newest.name == "posttrain.json"


# --------------------------------------------------------------------------------------------
# The round trip's threshold, and what it catches


def test_tolerance_negative_controls_on_each_side(exported, tiny_dir, tmp_path):
    """The measured difference of an f16 export passes a tolerance 1% above it and fails one 1%
    below it (same model, same probes); the stage that fails leaves one line and nothing finished."""
    measured = manifest.read(exported["f16"])["checks"]["round_trip"]["relative_diff"]
    assert measured > 0
    cfg = _config(tiny_dir, tmp_path / "below", type="f16", tolerance=measured * 0.99)
    tok = models.load_tokenizer(cfg, str(tiny_dir), need_masks=False)
    probes = [tok.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                add_generation_prompt=True) for p in cfg.export.probe_prompts]
    above = export.round_trip(tiny_dir, _gguf_file(exported["f16"]), tok, probes, 8, measured * 1.01, "f16")
    assert above["relative_diff"] == measured
    with pytest.raises(PosttrainError, match="differ from the model's") as e:
        export.run(cfg)
    assert "\n" not in str(e.value)
    below = tmp_path / "below" / "export"
    assert not manifest.is_finished(below) and not list(below.glob("*.gguf"))
    assert list(below.glob("*.gguf.failed"))


def test_file_of_other_weights_fails_the_round_trip(exported, chain, tiny_dir, tmp_path):
    """A file that is not the model fails: the base model's file checked against the chain's
    merged model (the wrong stage exported: 1.5x the logit scale off) at q8_0's loose default, and
    against the base with its final norm scaled by 1.02 (2e-2 of the scale) at f16's."""
    from transformers import AutoModelForCausalLM

    merged = chain["root"] / "merge"
    tok = models.load_tokenizer(_config(merged, tmp_path), str(merged), need_masks=False)
    probe = tok.tokenizer.apply_chat_template([{"role": "user", "content": "Hello!"}], tokenize=False,
                                              add_generation_prompt=True)
    file = _gguf_file(exported["f16"])
    same = export.round_trip(tiny_dir, file, tok, [probe], 4, EXPORT_TOLERANCE["f16"], "f16")
    assert same["relative_diff"] <= EXPORT_TOLERANCE["f16"]
    with pytest.raises(PosttrainError, match="does not give the model's answers"):
        export.round_trip(merged, file, tok, [probe], 4, EXPORT_TOLERANCE["q8_0"], "q8_0")
    other = tmp_path / "other"
    shutil.copytree(tiny_dir, other)
    model = AutoModelForCausalLM.from_pretrained(str(other), dtype=torch.float32)
    with torch.no_grad():
        model.model.norm.weight.mul_(1.02)
    model.save_pretrained(str(other))
    with pytest.raises(PosttrainError, match="does not give the model's answers"):
        export.round_trip(other, file, tok, [probe], 4, EXPORT_TOLERANCE["f16"], "f16")


def test_compare_threshold_is_inclusive_and_relative():
    expected = [torch.tensor([[[10.0, -4.0, 2.0]]])]
    got = [torch.tensor([[[10.0, -4.0, 2.3]]])]  # 0.3 off on a scale of 10: 3e-2
    assert export.compare(expected, got, 0.0301, "q8_0")["relative_diff"] == pytest.approx(0.03)
    with pytest.raises(PosttrainError):
        export.compare(expected, got, 0.0299, "q8_0")
    scaled = export.compare([expected[0] * 100], [got[0] * 100], 0.0301, "q8_0")  # same relative error
    assert scaled["max_abs_diff"] == pytest.approx(30.0) and scaled["argmax_agreement"] == 1.0


def test_metadata_check_refuses_a_file_without_the_trained_template(exported, tiny_dir, tmp_path):
    tok = models.load_tokenizer(_config(tiny_dir, tmp_path), str(tiny_dir), need_masks=False)
    assert export.check_metadata(_gguf_file(exported["f16"]), tok)["eot_text"] == "<|im_end|>"
    tok.template = tok.template.replace("<|im_start|>assistant\\n", "<|im_start|>bot\\n")
    with pytest.raises(PosttrainError, match="chat template is not the one"):
        export.check_metadata(_gguf_file(exported["f16"]), tok)


# --------------------------------------------------------------------------------------------
# Refusals


def test_adapter_is_refused_with_the_fix(saved_adapter, tiny_dir, tmp_path):
    cfg = write_yaml(tmp_path / "c.yaml", {"model": {"name_or_path": str(tiny_dir)}, "stages": ["export"],
                                           "template": {"name": "chatml"}, "output_dir": str(tmp_path / "o")})
    line = assert_clean_error(cli("export", saved_adapter, "-c", cfg), "is a LoRA adapter", "posttrain merge")
    assert "merge" in line and not (tmp_path / "o" / "export").exists()


def test_chain_exporting_an_adapter_is_refused_at_load(tiny_dir, demo_data, tmp_path):
    raw = chain_config(tiny_dir, demo_data, tmp_path / "o", stages=["format", "sft", "export"],
                       sft__method="lora", sft__lora=LORA)
    line = assert_clean_error(cli("validate", write_yaml(tmp_path / "c.yaml", raw)), "put merge before export")
    assert "sft.method lora" in line
    raw["stages"] = ["format", "sft", "merge", "export"]  # the control: with merge it is a valid chain
    assert_ok(cli("validate", write_yaml(tmp_path / "c2.yaml", raw)))


def test_unknown_architecture_is_one_line(tiny_dir, tmp_path):
    """OPT is a transformers causal LM that llama.cpp's converter does not know."""
    from transformers import OPTConfig, OPTForCausalLM

    d = tmp_path / "opt"
    OPTForCausalLM(OPTConfig(vocab_size=296, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                             word_embed_proj_dim=16, max_position_embeddings=64)).save_pretrained(str(d))
    for f in tiny_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, d / f.name)
    cfg = write_yaml(tmp_path / "c.yaml", {"model": {"name_or_path": str(d)}, "stages": ["export"],
                                           "template": {"name": "chatml"}, "output_dir": str(tmp_path / "o")})
    assert_clean_error(cli("export", d, "-c", cfg), "does not know the architecture OPTForCausalLM")
    assert not manifest.is_finished(tmp_path / "o" / "export")
    assert not list((tmp_path / "o" / "export").glob("*.gguf"))


def test_missing_converter_names_make_install(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_GGUF_CONVERTER", str(tmp_path / "nowhere"))
    with pytest.raises(PosttrainError, match="converter is not installed") as e:
        export.run(_config(tiny_dir, tmp_path / "o"))
    assert "make install" in e.value.fix


def test_type_from_the_command_line_reaches_the_file(exported, tiny_dir, tmp_path):
    out = exported["bf16"]  # the config said q8_0
    assert gguf.describe(_gguf_file(out))["quantization"] == "BF16" and manifest.read(out)["type"] == "bf16"
    assert _gguf_file(out).name == f"{tiny_dir.name}-bf16.gguf"
    cfg = write_yaml(tmp_path / "c.yaml", {"model": {"name_or_path": str(tiny_dir)}, "stages": ["export"],
                                           "template": {"name": "chatml"}, "output_dir": str(tmp_path / "o")})
    assert_clean_error(cli("export", tiny_dir, "-c", cfg, "--type", "q4_k"), "export.type")


def test_command_without_directory_or_config_is_one_line(tiny_dir):
    assert_clean_error(cli("export"), "no DIRECTORY and no config", "-c CONFIG")
    assert_clean_error(cli("export", tiny_dir), "not a posttrain stage with a recorded config")


def test_template_needing_new_tokens_is_refused_before_converting(tiny_dir, tmp_path):
    """The tiny tokenizer has no Gemma turn tokens: adding them would export untrained rows."""
    cfg = validate_dict({"model": {"name_or_path": str(tiny_dir)}, "stages": ["export"], "output_dir": str(tmp_path),
                         "template": {"name": "gemma", "add_special_tokens": True}})
    with pytest.raises(PosttrainError, match="needs tokens .* does not have"):
        export.run(cfg)
    assert not (tmp_path / "export").exists()


def test_tokenizer_check_fires_on_a_tokenizer_that_splits_differently(exported, tiny_dir, tmp_path):
    """Negative control of the round trip's tokenizer check: the file's own tokenizer passes; the
    same vocabulary with a SentencePiece-style pre-tokenizer instead of byte level fails."""
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    tok = models.load_tokenizer(_config(tiny_dir, tmp_path), str(tiny_dir), need_masks=False)
    file = _gguf_file(exported["f16"])
    theirs = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
    assert export.check_tokenizer(theirs, tok, ["What is 12 + 34?"], file.name) == 2
    theirs.backend_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    with pytest.raises(PosttrainError, match="encodes .* differently"):
        export.check_tokenizer(theirs, tok, ["What is 12 + 34?"], file.name)
