"""The converter driver's two gap-fillers, on real tokenizers.

The pre-tokenizer fallback names llama.cpp's pre-tokenizer from tokenizer.json's own
pre_tokenizer (the demo's digits + byte level is `smollm`, plain byte level `gpt-2`) and
declines anything else (Gemma's SentencePiece-style split, byte level without its regex, digits
not split one by one). The Gemma vocabulary written from tokenizer.json is, token for token and
type for type, the one in llama.cpp's own Gemma-3 GGUF file (written from tokenizer.model).
"""

from __future__ import annotations

import json

import pytest

from posttrain import converter

BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}


def _sequence(*parts):
    return {"pre_tokenizer": {"type": "Sequence", "pretokenizers": list(parts)}}


def test_pre_tokenizer_of_the_demo_tokenizer_is_smollm(tiny_dir):
    tj = json.loads((tiny_dir / "tokenizer.json").read_text())
    assert converter.pre_tokenizer_name(tj) == "smollm"


@pytest.mark.parametrize(("pre", "name"), [
    (_sequence({"type": "Digits", "individual_digits": True}, BYTE_LEVEL), "smollm"),
    ({"pre_tokenizer": BYTE_LEVEL}, "gpt-2"),
    # negative controls, one change away from a match
    (_sequence({"type": "Digits", "individual_digits": False}, BYTE_LEVEL), None),
    ({"pre_tokenizer": {**BYTE_LEVEL, "use_regex": False}}, None),
    (_sequence(BYTE_LEVEL, {"type": "Digits", "individual_digits": True}), None),
    ({"pre_tokenizer": {"type": "Metaspace", "replacement": "▁"}}, None),
    ({"pre_tokenizer": None}, None),
])
def test_pre_tokenizer_names(pre, name):
    assert converter.pre_tokenizer_name(pre) == name


@pytest.mark.real
def test_gemma_pre_tokenizer_is_not_taken_for_byte_level(real_models):
    _, converted = real_models("gemma3")
    assert converter.pre_tokenizer_name(json.loads((converted / "tokenizer.json").read_text())) is None


def test_spm_vocab_types_and_scores():
    import gguf

    tj = {"model": {"vocab": {"<pad>": 0, "<eos>": 1, "<0x0A>": 2, "▁▁": 3, "▁the": 4, "<start_of_turn>": 5,
                              "<mask>": 6}},
          "added_tokens": [{"id": 0, "content": "<pad>", "special": True}, {"id": 5, "content": "<start_of_turn>",
                                                                              "special": True},
                           {"id": 6, "content": "<mask>", "special": False}]}
    tokens, scores, types = converter.spm_vocab(tj, 8, gguf.TokenType)
    assert tokens == ["<pad>", "<eos>", "<0x0A>", "  ", "▁the", "<start_of_turn>", "<mask>", "[PAD7]"]
    T = gguf.TokenType
    assert types == [T.CONTROL, T.NORMAL, T.BYTE, T.USER_DEFINED, T.NORMAL, T.CONTROL, T.USER_DEFINED, T.UNUSED]
    assert scores[4] == -4.0 and scores[2] == 0.0 and scores[5] == -1000.0 and scores[7] == -1000.0


@pytest.mark.real
def test_gemma_vocab_matches_llama_cpps_own_file(real_models):
    """Every token and token type equals llama.cpp's Gemma-3 GGUF file (written from tokenizer.model);
    the scores keep its merge order (higher score: merged first)."""
    import gguf

    path, converted = real_models("gemma3")
    reader = gguf.GGUFReader(str(path))
    field = reader.fields["tokenizer.ggml.tokens"]
    theirs = [bytes(field.parts[i]).decode("utf-8") for i in field.data]
    their_types = reader.fields["tokenizer.ggml.token_type"]
    their_types = [int(their_types.parts[i][0]) for i in their_types.data]
    tokens, scores, types = converter.spm_vocab(json.loads((converted / "tokenizer.json").read_text()), len(theirs),
                                                gguf.TokenType)
    assert len(theirs) == 262144
    assert tokens == theirs
    assert [int(t) for t in types] == their_types
    normal = [i for i, t in enumerate(types) if t == gguf.TokenType.NORMAL]
    assert all(scores[a] > scores[b] for a, b in zip(normal, normal[1:]))


def test_released_gguf_package_is_intact():
    """The converter's own copy of `gguf` lives apart (make install: --target .venv/gguf-converter):
    every file of the released `gguf` that posttrain reads GGUF files with is the one its wheel
    recorded, byte for byte."""
    import base64
    import hashlib
    from importlib import metadata

    files = [f for f in metadata.files("gguf") if f.hash is not None and f.suffix == ".py"]
    assert len(files) > 5
    for f in files:
        digest = base64.urlsafe_b64encode(hashlib.new(f.hash.mode, f.locate().read_bytes()).digest()).rstrip(b"=")
        assert digest.decode() == f.hash.value, f


def test_makefile_installs_the_converter_the_stage_names():
    import re
    from pathlib import Path

    from posttrain.stages import export

    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    assert re.search(r"^GGUF_CONVERTER := (\S+)$", makefile, re.M).group(1) == export.CONVERTER
    installed = export.converter_version(export.converter_dir())
    assert f"{installed['package']}=={installed['version']}" == export.CONVERTER
