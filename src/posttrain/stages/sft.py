"""`posttrain sft`: supervised fine-tuning with TRL's SFTTrainer (full, LoRA or 4-bit QLoRA).

Reads top to bottom:
 1. resolve paths and fail fast on what can be known before loading anything;
 2. tokenizer + chat template (checked), data (formatted and checked against the template);
 3. model (full / LoRA / QLoRA) and the TRL SFTConfig (device defaults under the user's values:
    trainer_settings);
 4. train, with guards that stop loudly when nothing trains or the loss is NaN;
 5. save model/adapter, tokenizer with template, generation config, resolved config, metrics;
    re-open what was saved and check it; write posttrain.json last (the directory is finished).
"""

from __future__ import annotations

import time
from pathlib import Path

from posttrain import data, launch, lineage, manifest, models
from posttrain.config import Config, check_stage, stage_output
from posttrain.console import peak_memory_mb, summary
from posttrain.errors import PosttrainError
from posttrain.stages import common


def run(cfg: Config, *, base: str | None = None, output: str | None = None,
        resume: bool = False, overwrite: bool = False, stage: str = "sft", max_steps: int | None = None,
        record: dict | None = None) -> Path:
    """`stage`, `max_steps` and `record` (extra manifest fields) are for the control stage: SFT
    continued from the SFT output, written as its own stage."""
    started, t0 = manifest.now(), time.time()
    sc = cfg.sft
    check_stage(cfg, stage)
    out = stage_output(cfg, stage, output)
    source = common.resolve_base(base or cfg.model.name_or_path, allow_adapter=stage == "control")
    last_checkpoint = common.check_output(out, source, resume=resume, overwrite=overwrite)
    key = lineage.stage_key(cfg, stage, source)

    # 2. tokenizer, template and data, all checked before the model is loaded
    tok = models.load_tokenizer(cfg, source, need_masks=sc.assistant_only_loss)
    train_ds, eval_ds, data_record = data.stage_data(cfg, sc.data, tok)

    # 3. model and trainer config
    from trl import SFTConfig, SFTTrainer

    from posttrain.callbacks import MetricsJsonl, PackingCheck, StopOnSignal, TrainingGuard, tensorboard_into

    common.start_output(out, key, resume=resume)
    estimate = common.check_memory(cfg, "sft", source)
    common.seed(cfg)
    model = models.load_causal_lm(cfg, source, sc.method, sc.lora, tok)
    trainable, total = models.trainable_parameters(model)
    args = SFTConfig(**trainer_settings(cfg, out, has_eval=eval_ds is not None, estimate=estimate,
                                        max_steps=max_steps))
    packed = args.packing or args.padding_free
    if packed:
        _warn_dense_packing(args, model)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tok.tokenizer,
        # safeguard #27 (PackingCheck): packed conversations must not see each other
        callbacks=[TrainingGuard(model), MetricsJsonl(out / "metrics.jsonl"), stop := StopOnSignal(),
                   *([PackingCheck()] if packed else [])],
    )
    tensorboard_into(trainer, out)
    _check_labels(trainer.train_dataset)
    per_row = len(train_ds) / max(1, len(trainer.train_dataset))  # conversations per trained row (packing)

    # 4. train (held-out loss before and after, so the summary shows what SFT did)
    eval_before = common.evaluate_before_training(trainer)["eval_loss"] if eval_ds is not None and not resume else None
    result = trainer.train(resume_from_checkpoint=str(last_checkpoint) if last_checkpoint else None)
    stop.raise_if_stopped(trainer)
    eval_after = (common.final_eval(trainer) or trainer.evaluate())["eval_loss"] if eval_ds is not None else None

    # 5. save, re-open, check, then the manifest (main process only)
    if not common.save(trainer, out, cfg, tok, sc.method):
        return out
    state = trainer.state
    runtime = result.metrics.get("train_runtime", time.time() - t0)
    tokens = state.num_input_tokens_seen or 0
    metrics = {
        "steps": state.global_step,
        "train_loss_final": common.last(state.log_history, "loss"),
        "train_loss_mean": result.metrics.get("train_loss"),
        "eval_loss_before": eval_before,
        "eval_loss_after": eval_after,
        "tokens_seen": tokens,
        "tokens_per_second": round(tokens / runtime, 1) if runtime else None,
        "train_runtime_s": round(runtime, 2),
        "wall_time_s": round(time.time() - t0, 2),
        "peak_memory_mb": round(peak_memory_mb(), 1),
        "global_batch_size": common.global_batch_size(args),
        "train_sequences": round(state.global_step * common.global_batch_size(args) * per_row),
        "speed": common.speed_line(args, model),
        "memory_estimate_mb": common.estimate_mb(estimate),
    }
    common.write_manifest(
        out, stage, cfg, tok, parent=source, key=key, started=started,
        **(record or {}),
        method=sc.method,
        adapter_base=common.adapter_base_of(source, sc.method),
        data=data_record,
        added_tokens=tok.added_tokens,
        trainable_parameters=trainable,
        total_parameters=total,
        metrics=metrics,
        resumed_from=str(last_checkpoint) if last_checkpoint else None,
    )
    loss_line = f"{eval_before:.4f} → {eval_after:.4f}" if eval_before is not None and eval_after is not None \
        else eval_after
    summary(stage, {
        "method": f"{sc.method} ({trainable:,} of {total:,} parameters trained)",
        "steps": metrics["steps"],
        "final train loss": metrics["train_loss_final"],
        "held-out loss (before → after)": loss_line if loss_line is not None else "no eval data",
        "tokens/s": metrics["tokens_per_second"],
        "wall time": f"{metrics['wall_time_s']:.1f} s",
        "speed settings": metrics["speed"],
        "peak memory": common.memory_line(metrics),
        "output": str(out),
    })
    common.finished(out)
    return out


def trainer_settings(cfg: Config, out: Path, *, has_eval: bool, estimate=None, max_steps: int | None = None) -> dict:
    """Everything SFT hands TRL's SFTConfig: common.trainer_kwargs (posttrain's defaults < device and
    speed defaults < sft.training; `estimate`, from common.check_memory, decides activation
    checkpointing) plus SFT's own: sft.assistant_only_loss, `max_steps` (the control stage's step
    count) and the non-padding token count."""
    kwargs = common.trainer_kwargs(cfg, "sft", out, has_eval=has_eval, estimate=estimate)
    kwargs["assistant_only_loss"] = cfg.sft.assistant_only_loss
    if max_steps is not None:
        kwargs["max_steps"] = max_steps
    kwargs.setdefault("include_num_input_tokens_seen", "non_padding")
    return kwargs


def key_metrics(m: dict) -> dict:
    """The chain summary's numbers for this stage (chain.key_metrics); the control's too."""
    metrics = m.get("metrics", {})
    return {"eval loss": metrics.get("eval_loss_after"), "steps": metrics.get("steps")}


def _warn_dense_packing(args, model) -> None:
    """Packed rows without a varlen kernel: transformers masks the whole flattened batch densely."""
    impl = getattr(model.config, "_attn_implementation", None)
    if impl not in models.VARLEN_ATTENTION and launch.is_main_process():
        tokens = args.per_device_train_batch_size * (args.max_length or 0)
        from posttrain.console import console

        console.print(f"[yellow]warning[/] packing with {impl} attention: each step builds one dense mask over the "
                      f"{tokens:,} tokens of the flattened batch ({tokens:,}² entries), more attention work than "
                      "padding wastes; use model.attn_implementation: flash_attention_2, or packing: false")


def _check_labels(train_dataset) -> None:
    """Safeguard #12 on what TRL actually tokenized: some labels must be trained."""
    sample = train_dataset.select(range(min(64, len(train_dataset))))
    trained = sum(sum(1 for x in row if x != -100) for row in sample["labels"]) if "labels" in sample.column_names \
        else sum(sum(m) for m in sample["assistant_masks"]) if "assistant_masks" in sample.column_names else None
    if trained == 0:
        raise PosttrainError("no token of the first training samples is in the loss",
                             fix="check the template's {% generation %} markers with `posttrain preview`")
