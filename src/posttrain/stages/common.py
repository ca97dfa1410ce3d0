"""Pieces every training stage shares: where it starts from, the TRL config kwargs, reusing the
format stage's data, saving with checks, and lineage. Each stage file stays readable top to
bottom and calls these in the same order."""

from __future__ import annotations

import json
from pathlib import Path

from posttrain import config as config_mod
from posttrain import lineage, manifest, models, templates
from posttrain.config import Config
from posttrain.console import console
from posttrain.errors import PosttrainError

CHECKPOINTS = "checkpoints"


def resolve_base(base: str, *, allow_adapter: bool = False) -> str:
    """A finished stage directory, a model directory or a Hub id."""
    p = Path(base)
    started = any(p.glob(f"{CHECKPOINTS}/checkpoint-*")) or (p / "posttrain.started.json").exists()
    if p.is_dir() and started and not manifest.is_finished(p):
        raise PosttrainError(f"base '{base}' is an unfinished stage (no posttrain.json)",
                             fix="finish it with --resume, or point --base at a finished stage")
    if p.is_dir() and not allow_adapter and models.adapter_base(base) is not None:
        raise PosttrainError(
            f"base '{base}' is a LoRA adapter, not a full model",
            fix="merge it into its base first (posttrain merge), or start from the full model",
        )
    return base


def default_base(cfg: Config, stage: str) -> str:
    """Without --base: the output of the last policy stage before `stage` in this config's chain
    (it must be finished), else model.name_or_path."""
    stages = cfg.stages[: cfg.stages.index(stage)] if stage in cfg.stages else cfg.stages
    before = [s for s in stages if s in config_mod.MODEL_STAGES and s != stage]
    if not before:
        return cfg.model.name_or_path
    d = Path(cfg.output_dir) / before[-1]
    if not manifest.is_finished(d):
        raise PosttrainError(
            f"{stage} starts from the {before[-1]} stage, and '{d}' holds no finished {before[-1]} stage",
            fix=f"run `posttrain {before[-1]}` first, pass --base, or remove {before[-1]} from stages",
        )
    return str(d)


def check_output(out: Path, source: str, *, resume: bool, overwrite: bool) -> Path | None:
    """Refuse to write over the base or a finished stage; the checkpoint to resume from, if asked."""
    last = last_checkpoint(out) if resume else None
    if resume and last is None:
        raise PosttrainError(f"--resume: no checkpoint in '{out / CHECKPOINTS}'", fix="run without --resume")
    if Path(source).resolve() == out.resolve():
        raise PosttrainError(f"the output '{out}' is the base model's own directory",
                             fix="pass --output to write the new stage elsewhere")
    if manifest.is_finished(out) and not overwrite:
        raise PosttrainError(f"'{out}' already holds a finished stage",
                             fix="pass --overwrite to replace it, or choose another --output")
    return last


def trainer_kwargs(cfg: Config, stage: str, out: Path, has_eval: bool) -> dict:
    """TRL config arguments: posttrain's defaults < device defaults < the user's `<stage>.training`."""
    import torch

    has_cuda = torch.cuda.is_available()
    defaults = {
        "report_to": "none",
        "logging_steps": 10,
        "save_strategy": "steps",
        "save_steps": 500,
        "save_total_limit": 2,
        "seed": cfg.seed,
        "data_seed": cfg.seed,
        "dataloader_num_workers": 0,
        "per_device_eval_batch_size": 32,
    }
    defaults.update(config_mod.device_training_defaults(has_cuda, has_cuda and torch.cuda.is_bf16_supported()))
    kwargs = {**defaults, **getattr(cfg, stage).training}
    kwargs["output_dir"] = str(out / CHECKPOINTS)
    if not has_eval:
        kwargs["eval_strategy"] = "no"
    return kwargs


def check_saved(out: Path, tok: models.TokenizerInfo, method: str) -> None:
    """Re-open what was saved (safeguards #6, #20, #23): tokenizer renders the same, adapter non-empty."""
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(str(out))
    if templates.template_hash(reloaded, reloaded.chat_template or "") != tok.template_hash:
        raise PosttrainError(f"the tokenizer saved in '{out}' renders differently from the one trained with")
    if method in ("lora", "qlora"):
        from safetensors import safe_open

        path = out / "adapter_model.safetensors"
        if not path.exists():
            raise PosttrainError(f"no adapter was saved in '{out}'")
        with safe_open(str(path), "pt") as f:
            keys = list(f.keys())
            lora_b = [f.get_tensor(k) for k in keys if "lora_B" in k]
        if not keys or not lora_b or all(t.numel() == 0 or not t.any() for t in lora_b):
            raise PosttrainError(f"the adapter saved in '{out}' is empty or all zeros (nothing was trained)")


def save(trainer, out: Path, cfg: Config, tok: models.TokenizerInfo, method: str) -> bool:
    """Save weights/adapter, tokenizer + template, generation config and resolved config, then
    re-open and check them. Returns False on non-main processes (which write nothing)."""
    trainer.save_model(str(out))  # syncs the ranks
    if not trainer.is_world_process_zero():
        return False
    save_extras(trainer.model, out, cfg, tok, method)
    return True


def save_extras(model, out: Path, cfg: Config, tok: models.TokenizerInfo, method: str) -> None:
    """Everything saved next to the weights, then the re-open checks."""
    tok.tokenizer.save_pretrained(str(out))
    generation_config = getattr(model, "generation_config", None)  # none on a reward model
    if generation_config is not None:
        generation_config.save_pretrained(str(out))
    (out / "config.resolved.yaml").write_text(config_mod.dump_yaml(cfg))
    check_saved(out, tok, method)


def drop_reference_adapter(out: Path) -> None:
    """PEFT saves every adapter of the model; TRL's frozen reference copy ("ref") is not an output."""
    import shutil

    ref = out / "ref"
    if (ref / "adapter_config.json").is_file():
        shutil.rmtree(ref)


def write_manifest(out: Path, stage: str, cfg: Config, tok: models.TokenizerInfo, *, parent: str, key: str,
                   started: str, **fields) -> None:
    """posttrain.json for a model stage: its own fields, then lineage, template and provenance.
    Written last: from here on the directory is a finished stage."""
    import torch

    manifest.write(out, {
        "stage": stage,
        **fields,
        "parent": lineage.parent_record(parent),
        "inputs_key": key,
        "template_hash": tok.template_hash,
        "special_tokens": special_tokens(tok),
        "config": config_mod.to_dict(cfg),
        "versions": manifest.versions(),
        "git_commit": manifest.git_commit(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "started": started,
        "finished": manifest.now(),
    })


def adapter_base_of(source: str, method: str) -> str | None:
    """What a saved adapter of this stage sits on: the source itself, or the source's own base."""
    if method == "full":
        return None
    return models.adapter_base(source) or source


def check_agrees_with_parent(source: str, tok: models.TokenizerInfo, *, allow: bool = False,
                             setting: str | None = None) -> None:
    """Safeguard #6: the template, special tokens and vocabulary this stage uses are the ones the
    starting stage trained with (recorded in its manifest). `setting` names the config key that
    allows a mismatch, for stages that have one."""
    parent = manifest.read(source) if Path(source).is_dir() else None
    if not parent or "template_hash" not in parent:
        return
    problems = []
    if parent["template_hash"] != tok.template_hash:
        problems.append("the chat template renders differently")
    recorded = parent.get("special_tokens", {})
    now = special_tokens(tok)
    changed = [k for k in ("bos", "eos", "pad", "eot", "vocab_size") if k in recorded and recorded[k] != now[k]]
    if changed:
        problems.append("special tokens differ (" + ", ".join(f"{k} {recorded[k]} → {now[k]}" for k in changed) + ")")
    if not problems:
        return
    what = f"'{source}' ({parent.get('stage')} stage) was trained with another template: {'; '.join(problems)}"
    if allow:
        console.print(f"[yellow]warning[/] {what} (allowed by {setting})")
        return
    fix = "use the template the starting stage used (see its config.resolved.yaml)"
    raise PosttrainError(what, fix=fix + (f", or set {setting}: true" if setting else ""))


def special_tokens(tok: models.TokenizerInfo) -> dict:
    t = tok.tokenizer
    return {"bos": t.bos_token_id, "eos": t.eos_token_id, "pad": t.pad_token_id, "eot": tok.eot_id,
            "vocab_size": len(t)}


def last_checkpoint(out: Path) -> Path | None:
    """The newest complete, readable checkpoint. The trainer writes trainer_state.json last, so a
    process killed while saving leaves a checkpoint without it (or with a torn one): skip such. A
    checkpoint whose weights or optimizer/RNG files are truncated (a full disk, a copy cut short)
    is skipped too, with a warning naming the file, so a resume falls back to the one before."""
    d = out / CHECKPOINTS
    found = sorted(d.glob("checkpoint-*"), key=lambda p: int(p.name.rsplit("-", 1)[-1])
                   if p.name.rsplit("-", 1)[-1].isdigit() else -1) if d.is_dir() else []
    for ckpt in reversed(found):
        try:
            json.loads((ckpt / "trainer_state.json").read_text())
        except (OSError, json.JSONDecodeError):
            continue
        damaged = damaged_file(ckpt)
        if damaged is None:
            return ckpt
        console.print(f"[yellow]warning[/] {ckpt} is damaged ({damaged}); trying the checkpoint before it",
                      soft_wrap=True)
    return None


def damaged_file(ckpt: Path) -> str | None:
    """The first unreadable file of a checkpoint: safetensors whose header or length is wrong, or
    torch files (.pt/.pth/.bin, zip archives) without their end record. None when all read."""
    import zipfile

    from safetensors import safe_open

    for f in sorted(ckpt.rglob("*")):
        if f.suffix == ".safetensors":
            try:
                with safe_open(str(f), "pt"):
                    pass
            except Exception as e:  # noqa: BLE001 (safetensors raises its own error types)
                return f"{f.name}: {str(e).splitlines()[0]}"
        elif f.suffix in (".pt", ".pth", ".bin") and not zipfile.is_zipfile(f):
            return f"{f.name}: not a complete torch archive"
    return None


def last(history: list[dict], key: str):
    return next((h[key] for h in reversed(history) if key in h), None)


def global_batch_size(args) -> int:
    return args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size


def trainer_is_main() -> bool:
    """True on the main process (or when not distributed): only it writes stage files."""
    from accelerate import PartialState

    return PartialState().is_main_process


def finished(out: Path) -> None:
    console.print(f"finished: {out}", soft_wrap=True)
