"""GGUF files (llama.cpp, Ollama) as a model source.

`model.name_or_path` (or `--base`) may be a local `.gguf` file. transformers can read one
(`from_pretrained(dir, gguf_file=...)`), dequantising every tensor, but the model it returns is
flagged as gguf-quantized: it refuses `save_pretrained`, keeps a `quantization_config`, and every
load re-does the dequantisation. So posttrain converts a GGUF file once into a standard Hugging
Face directory (safetensors, tokenizer, chat template if the file has one, generation config)
and loads that. The conversion is keyed by the file's SHA-256 and reused while the file is
unchanged; `posttrain convert FILE` does it explicitly.

Identity: lineage keys a stage on the GGUF file's path and SHA-256 (`lineage.parent_record`), and
every manifest downstream carries `origin`: the file's hash and quantisation type, and the note
that the weights are a dequantised image of the quantised file, not the original checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from posttrain.errors import PosttrainError

MARKER = "posttrain-gguf.json"  # in a converted directory: where its weights came from
NOTE = ("weights dequantised from a {quantization} GGUF file: an image of the quantised model, "
        "not the original checkpoint")
_hashes: dict[tuple, str] = {}


def is_gguf(source: str | os.PathLike | None) -> bool:
    return source is not None and str(source).lower().endswith(".gguf")


def cache_dir() -> Path:
    """Where conversions are kept: $POSTTRAIN_CACHE, else ~/.cache/posttrain."""
    return Path(os.environ.get("POSTTRAIN_CACHE") or Path.home() / ".cache" / "posttrain")


def sha256(path: str | os.PathLike) -> str:
    """The file's SHA-256, remembered per (path, size, mtime) for this process."""
    import hashlib

    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _hashes:
        h = hashlib.sha256()
        with p.open("rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _hashes[key] = h.hexdigest()
    return _hashes[key]


def _check_file(path: str | os.PathLike) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise PosttrainError(f"GGUF file '{path}' does not exist", fix="check model.name_or_path or --base")
    with p.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise PosttrainError(f"'{path}' is not a GGUF file (it does not start with the GGUF magic)",
                                 fix="point to a .gguf file written by llama.cpp, or to a model directory")
    return p


def describe(path: str | os.PathLike, reader=None) -> dict:
    """What the file is: architecture, quantisation type (the file type llama.cpp recorded, and the
    count of tensors per storage type), name, without reading the tensors. `reader`: the file's
    `read(path)` when the caller has it (parsing a 262k-token vocabulary takes ~13 s)."""
    from collections import Counter

    import gguf

    p = _check_file(path)
    reader = reader or _reader(p)

    def field(name):
        return _field(reader, name)

    file_type = field("general.file_type")
    try:
        quantization = gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_") if file_type is not None else None
    except ValueError:
        quantization = f"file_type {file_type}"
    tensor_types = Counter(t.tensor_type.name for t in reader.tensors)
    return {
        "file": str(p),
        "sha256": sha256(p),
        "size_bytes": p.stat().st_size,
        "architecture": field("general.architecture"),
        "name": field("general.name"),
        "quantization": quantization or max(tensor_types, key=tensor_types.get),
        "tensor_types": dict(sorted(tensor_types.items())),
        "has_chat_template": "tokenizer.chat_template" in reader.fields,
    }


def read(path: str | os.PathLike):
    """The file's gguf.GGUFReader (metadata parsed, tensors memory-mapped), for describe and
    tokenizer_metadata to share."""
    return _reader(_check_file(path))


def tokenizer_metadata(path: str | os.PathLike, reader=None) -> dict:
    """What a runtime reads to chat with the file: the tokenizer kind, vocabulary size, the
    special token ids (bos, eos, end-of-turn, pad) with their text, and the chat template."""
    reader = reader or read(path)
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    n = len(tokens.data) if tokens is not None else 0

    def token(key):
        i = _field(reader, f"tokenizer.ggml.{key}_token_id")
        text = bytes(tokens.parts[tokens.data[i]]).decode("utf-8", "replace") if i is not None and i < n else None
        return {"id": i, "text": text} if i is not None else None

    return {"model": _field(reader, "tokenizer.ggml.model"), "pre": _field(reader, "tokenizer.ggml.pre"),
            "tokens": n, **{k: token(k) for k in ("bos", "eos", "eot", "padding")},
            "chat_template": _field(reader, "tokenizer.chat_template")}


def _reader(p: Path):
    import gguf

    try:
        return gguf.GGUFReader(str(p))
    except Exception as e:  # noqa: BLE001 - any parse failure is a damaged or unsupported file
        raise PosttrainError(f"could not read GGUF file '{p}': "
                             f"{str(e).splitlines()[0] if str(e) else type(e).__name__}",
                             fix="check the file is complete (compare its SHA-256 with the publisher's)") from None


def _field(reader, name: str):
    """One metadata value of a GGUFReader: a string, a number, or None when absent."""
    import gguf

    f = reader.fields.get(name)
    if f is None or not f.data:
        return None
    value = f.parts[f.data[0]]
    if f.types and f.types[0] == gguf.GGUFValueType.STRING:
        return bytes(value).decode("utf-8", "replace")
    return value.tolist()[0] if hasattr(value, "tolist") else value


def converted_dir(path: str | os.PathLike) -> Path:
    """Where the conversion of this file lives (it may not exist yet)."""
    p = Path(path)
    return cache_dir() / "gguf" / f"{p.name.removesuffix(p.suffix)}-{sha256(p)[:12]}"


def origin(directory: str | os.PathLike) -> dict | None:
    """The GGUF provenance of a converted directory, or None for any other directory."""
    marker = Path(directory) / MARKER
    if not marker.is_file():
        return None
    try:
        return json.loads(marker.read_text())
    except json.JSONDecodeError:
        return None


def resolve(source: str) -> str:
    """A `.gguf` file becomes its converted directory (converting on first use); anything else is
    returned as it is."""
    return str(convert(source)) if is_gguf(source) else source


def convert(path: str | os.PathLike, output: str | os.PathLike | None = None, *, force: bool = False) -> Path:
    """Convert a GGUF file to a Hugging Face model directory, or reuse the conversion when its
    recorded SHA-256 is the file's. Written to a temporary directory and renamed into place, so
    an interrupted conversion never looks finished."""
    p = _check_file(path)
    out = Path(output) if output is not None else converted_dir(p)
    digest = sha256(p)
    done = origin(out)
    if done and done.get("sha256") == digest and not force:
        return out
    if out.exists() and not done and any(out.iterdir()):
        raise PosttrainError(f"'{out}' exists and is not a GGUF conversion", fix="choose another output directory")
    info = describe(p)
    from posttrain.console import console

    console.print(f"converting {p.name} ({info['quantization']}, {info['size_bytes'] / 2**20:.0f} MiB) to a "
                  f"Hugging Face directory: {out}", soft_wrap=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_conversion(p, tmp, info)
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_conversion(p: Path, out: Path, info: dict) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    try:
        tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
        model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32)
    except (OSError, ValueError, KeyError, NotImplementedError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PosttrainError(f"transformers could not load GGUF file '{p}' ({info['architecture']}, "
                             f"{info['quantization']}): {first}",
                             fix="transformers reads GGUF for the architectures it lists in "
                                 "transformers.integrations.ggml; convert other files with llama.cpp's tools") from None
    # The loaded model is flagged as gguf-quantized and refuses save_pretrained; its tensors are
    # plain dequantised float32 by now, so it is saved as the plain model it is.
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = str(p)
    # Generation settings: the tokenizer's ids only; no sampling defaults posttrain didn't choose.
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    out.mkdir(parents=True)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    info = {**info, "note": NOTE.format(quantization=info["quantization"]),
            "parameters": sum(t.numel() for t in model.parameters()),
            "converted_with": _versions()}
    (out / MARKER).write_text(json.dumps(info, indent=2) + "\n")


def _versions() -> dict:
    from importlib import metadata

    return {name: metadata.version(name) for name in ("transformers", "gguf", "torch")}
