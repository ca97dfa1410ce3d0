"""`posttrain sft`: supervised fine-tuning with TRL's SFTTrainer (full, LoRA or 4-bit QLoRA).

Reads top to bottom:
 1. resolve paths and fail fast on what can be known before loading anything;
 2. tokenizer + chat template (checked), data (formatted and checked against the template);
 3. model (full / LoRA / QLoRA) and the TRL SFTConfig (device defaults under the user's values);
 4. train, with guards that stop loudly when nothing trains or the loss is NaN;
 5. save model/adapter, tokenizer with template, generation config, resolved config, metrics;
    re-open what was saved and check it; write posttrain.json last (the directory is finished).
"""

from __future__ import annotations

import time
from pathlib import Path

from posttrain import config as config_mod
from posttrain import manifest, models, templates
from posttrain.config import Config, stage_output
from posttrain.console import console, peak_memory_mb, summary
from posttrain.errors import PosttrainError
from posttrain.stages import format as format_stage

CHECKPOINTS = "checkpoints"


def run(cfg: Config, *, base: str | None = None, output: str | None = None,
        resume: bool = False, overwrite: bool = False) -> Path:
    started, t0 = manifest.now(), time.time()
    sc = cfg.sft
    out = stage_output(cfg, "sft", output)
    source = resolve_base(base or cfg.model.name_or_path)
    last_checkpoint = _last_checkpoint(out) if resume else None
    if resume and last_checkpoint is None:
        raise PosttrainError(f"--resume: no checkpoint in '{out / CHECKPOINTS}'", fix="run without --resume")
    if Path(source).resolve() == out.resolve():
        raise PosttrainError(f"the output '{out}' is the base model's own directory",
                             fix="pass --output to write the new stage elsewhere")
    if manifest.is_finished(out) and not overwrite:
        raise PosttrainError(f"'{out}' already holds a finished stage",
                             fix="pass --overwrite to replace it, or choose another --output")

    # 2. tokenizer, template and data, all checked before the model is loaded
    tok = models.load_tokenizer(cfg, source, need_masks=sc.assistant_only_loss)
    train_ds, eval_ds, data_record = _data(cfg, tok)

    # 3. model and trainer config
    import torch
    from trl import SFTConfig, SFTTrainer

    from posttrain.callbacks import MetricsJsonl, TrainingGuard

    if trainer_is_main():
        manifest.prepare_output(out, overwrite=True, resume=resume)
    model = models.load_causal_lm(cfg, source, sc.method, sc.lora, tok)
    trainable, total = models.trainable_parameters(model)
    args = SFTConfig(**trainer_kwargs(cfg, out, has_eval=eval_ds is not None))
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tok.tokenizer,
        callbacks=[TrainingGuard(model), MetricsJsonl(out / "metrics.jsonl")],
    )
    _check_labels(trainer.train_dataset)

    # 4. train (held-out loss before and after, so the summary shows what SFT did)
    eval_before = trainer.evaluate()["eval_loss"] if eval_ds is not None and not resume else None
    result = trainer.train(resume_from_checkpoint=str(last_checkpoint) if last_checkpoint else None)
    eval_after = trainer.evaluate()["eval_loss"] if eval_ds is not None else None

    # 5. save, re-open, check, then the manifest (main process only; save_model syncs the ranks)
    trainer.save_model(str(out))
    if not trainer.is_world_process_zero():
        return out
    tok.tokenizer.save_pretrained(str(out))
    trainer.model.generation_config.save_pretrained(str(out))
    (out / "config.resolved.yaml").write_text(config_mod.dump_yaml(cfg))
    check_saved(out, cfg, tok, sc.method)

    state = trainer.state
    runtime = result.metrics.get("train_runtime", time.time() - t0)
    tokens = state.num_input_tokens_seen or 0
    metrics = {
        "steps": state.global_step,
        "train_loss_final": _last(state.log_history, "loss"),
        "train_loss_mean": result.metrics.get("train_loss"),
        "eval_loss_before": eval_before,
        "eval_loss_after": eval_after,
        "tokens_seen": tokens,
        "tokens_per_second": round(tokens / runtime, 1) if runtime else None,
        "train_runtime_s": round(runtime, 2),
        "wall_time_s": round(time.time() - t0, 2),
        "peak_memory_mb": round(peak_memory_mb(), 1),
        "global_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps
        * args.world_size,
    }
    manifest.write(out, {
        "stage": "sft",
        "method": sc.method,
        "base": _base_record(source),
        "data": data_record,
        "template_hash": tok.template_hash,
        "special_tokens": format_stage.special_tokens(tok),
        "added_tokens": tok.added_tokens,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "metrics": metrics,
        "resumed_from": str(last_checkpoint) if last_checkpoint else None,
        "config": config_mod.to_dict(cfg),
        "versions": manifest.versions(),
        "git_commit": manifest.git_commit(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "started": started,
        "finished": manifest.now(),
    })
    loss_line = f"{eval_before:.4f} → {eval_after:.4f}" if eval_before is not None and eval_after is not None \
        else eval_after
    summary("sft", {
        "method": f"{sc.method} ({trainable:,} of {total:,} parameters trained)",
        "steps": metrics["steps"],
        "final train loss": metrics["train_loss_final"],
        "held-out loss (before → after)": loss_line if loss_line is not None else "no eval data",
        "tokens/s": metrics["tokens_per_second"],
        "wall time": f"{metrics['wall_time_s']:.1f} s",
        "peak memory": f"{metrics['peak_memory_mb']:.0f} MB",
        "output": str(out),
    })
    console.print(f"finished: {out}", soft_wrap=True)
    return out


def resolve_base(base: str) -> str:
    """A finished stage directory, a model directory or a Hub id; adapters must be merged first."""
    p = Path(base)
    if p.is_dir() and (p / "adapter_config.json").exists() and not (p / "config.json").exists():
        raise PosttrainError(
            f"base '{base}' is a LoRA adapter, not a full model",
            fix="merge it into its base first, or start from the full model",
        )
    if p.is_dir() and any(p.glob(f"{CHECKPOINTS}/checkpoint-*")) and not manifest.is_finished(p):
        raise PosttrainError(f"base '{base}' is an unfinished stage (no posttrain.json)",
                             fix="finish it with --resume, or point --base at a finished stage")
    return base


def trainer_kwargs(cfg: Config, out: Path, has_eval: bool) -> dict:
    """SFTConfig arguments: posttrain's defaults < device defaults < the user's `sft.training`."""
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
        "include_num_input_tokens_seen": "non_padding",
        "dataloader_num_workers": 0,
        "per_device_eval_batch_size": 32,
    }
    defaults.update(config_mod.device_training_defaults(has_cuda, has_cuda and torch.cuda.is_bf16_supported()))
    kwargs = {**defaults, **cfg.sft.training}
    kwargs["output_dir"] = str(out / CHECKPOINTS)
    kwargs["assistant_only_loss"] = cfg.sft.assistant_only_loss
    if not has_eval:
        kwargs["eval_strategy"] = "no"
    return kwargs


def _data(cfg: Config, tok: models.TokenizerInfo):
    """The SFT dataset: from a finished format stage of this config if it matches, else formatted now."""
    name = cfg.sft.data
    fmt_dir = Path(cfg.output_dir) / "format"
    m = manifest.read(fmt_dir) if manifest.is_finished(fmt_dir) else None
    if m and _format_matches(m, cfg, name, tok):
        train, ev = format_stage.load_formatted(fmt_dir, name)
        console.print(f"data.{name}: using the formatted data in {fmt_dir}")
        return train, ev, {"name": name, "format_dir": str(fmt_dir), "format_hash": manifest.directory_hash(fmt_dir),
                           "files": m["datasets"][name]["files"]}
    f, stats = format_stage.format_and_check(cfg, name, tok)
    return f.train, f.eval, {"name": name, "files": f.files, "rows": len(f.train), "dropped": len(f.dropped),
                             "checks": stats}


def _format_matches(m: dict, cfg: Config, name: str, tok: models.TokenizerInfo) -> bool:
    """The format stage's output is this config's data: same sources, template and file contents."""
    from posttrain.data import file_hash

    if name not in m.get("datasets", {}) or m.get("template_hash") != tok.template_hash:
        return False
    if m["config"]["data"].get(name) != cfg.data[name].model_dump(mode="json"):
        return False
    if m["config"].get("template") != cfg.template.model_dump(mode="json"):
        return False
    recorded = m["datasets"][name]["files"]
    return all(Path(p).is_file() and file_hash(p) == h for p, h in recorded.items())


def _check_labels(train_dataset) -> None:
    """Safeguard #12 on what TRL actually tokenized: some labels must be trained."""
    sample = train_dataset.select(range(min(64, len(train_dataset))))
    trained = sum(sum(1 for x in row if x != -100) for row in sample["labels"]) if "labels" in sample.column_names \
        else sum(sum(m) for m in sample["assistant_masks"]) if "assistant_masks" in sample.column_names else None
    if trained == 0:
        raise PosttrainError("no token of the first training samples is in the loss",
                             fix="check the template's {% generation %} markers with `posttrain preview`")


def check_saved(out: Path, cfg: Config, tok: models.TokenizerInfo, method: str) -> None:
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


def _last_checkpoint(out: Path) -> Path | None:
    from transformers.trainer_utils import get_last_checkpoint

    d = out / CHECKPOINTS
    found = get_last_checkpoint(str(d)) if d.is_dir() else None
    return Path(found) if found else None


def _base_record(source: str) -> dict:
    p = Path(source)
    rec = {"name_or_path": source}
    if p.is_dir():
        rec["config_hash"] = manifest.directory_hash(p)
        parent = manifest.read(p)
        if parent:
            rec["stage"] = parent.get("stage")
    return rec


def _last(history: list[dict], key: str):
    return next((h[key] for h in reversed(history) if key in h), None)


def trainer_is_main() -> bool:
    """True on the main process (or when not distributed): only it writes stage files."""
    from accelerate import PartialState

    return PartialState().is_main_process
