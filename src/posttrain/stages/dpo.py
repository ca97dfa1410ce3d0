"""`posttrain dpo`: preference alignment with TRL's DPOTrainer (full, LoRA or 4-bit QLoRA).

Reads top to bottom:
 1. the starting model: --base, else this config's finished SFT stage, else model.name_or_path;
    an unfinished stage is refused;
 2. cross-stage checks before any model is loaded (safeguard #6): the tokenizer's chat template,
    special-token ids and vocabulary match what the starting stage recorded; the preference data
    renders with that template;
 3. the policy and the reference (safeguards #7, #24): the reference is always the starting
    model — a frozen copy, the policy with its new adapter disabled, or log-probs precomputed
    from it. When the start is an SFT adapter, the policy starts from SFT weights and so does
    the reference; the pre-SFT base is never used by accident;
 4. step 0: policy and reference agree (rewards ≈ 0, sigmoid loss ≈ ln 2), or stop;
 5. train with alarms on NaN, grad-norm 0 and a loss collapsing to ~0 early (safeguard #8);
 6. held-out reward accuracy and margins, log-probs of chosen/rejected before → after; save,
    re-open, check, manifest last.
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path

from posttrain import data, lineage, manifest, models
from posttrain.config import Config, check_stage, stage_output
from posttrain.console import peak_memory_mb, summary
from posttrain.errors import PosttrainError
from posttrain.stages import common

PROBE_PAIRS = 256  # pairs for the step-0 check and the before/after numbers when there is no eval set


def run(cfg: Config, *, base: str | None = None, output: str | None = None,
        resume: bool = False, overwrite: bool = False) -> Path:
    started, t0 = manifest.now(), time.time()
    dc = cfg.dpo
    out = stage_output(cfg, "dpo", output)
    check_stage(cfg, "dpo")

    # 1. where DPO starts
    source = common.resolve_base(base or common.default_base(cfg, "dpo"), allow_adapter=True)
    last_checkpoint = common.check_output(out, source, resume=resume, overwrite=overwrite)
    continues_adapter = models.adapter_base(source) is not None and dc.method != "full"
    if continues_adapter and dc.reference == "adapter_disabled":
        raise PosttrainError(
            f"dpo.reference 'adapter_disabled' with base '{source}', a LoRA adapter: disabling it would make the "
            "pre-SFT base the reference",
            fix="use dpo.reference: copy (a frozen copy of the SFT adapter is the reference)",
        )
    key = lineage.stage_key(cfg, "dpo", source)

    # 2. tokenizer, template and data, checked against the starting stage before loading a model
    tok = models.load_tokenizer(cfg, source, need_masks=False)
    common.check_agrees_with_parent(source, tok, allow=dc.allow_template_mismatch,
                                    setting="dpo.allow_template_mismatch")
    train_ds, eval_ds, data_record = data.stage_data(cfg, dc.data, tok)
    held = eval_ds if eval_ds is not None else train_ds.select(range(min(PROBE_PAIRS, len(train_ds))))

    # 3. policy, reference, trainer
    from trl import DPOConfig, DPOTrainer

    from posttrain.callbacks import DPOGuard, MetricsJsonl, StopOnSignal, TrainingGuard, tensorboard_into

    common.start_output(out, key, resume=resume)
    # adapter_disabled: TRL applies the new adapter itself and disables it for the reference.
    # Otherwise a LoRA policy arrives wrapped and TRL keeps a frozen copy of its adapter ("ref").
    disabled = dc.reference == "adapter_disabled"
    estimate = common.check_memory(cfg, "dpo", source)
    common.seed(cfg)
    model = models.load_causal_lm(cfg, source, dc.method, dc.lora, tok, wrap=not disabled)
    peft_config = models.lora_config(model, dc.lora, train_embeddings=bool(tok.added_tokens)) if disabled else None
    ref_model, reference = reference_model(model, dc.method, dc.reference, continues_adapter)
    kwargs = common.trainer_kwargs(cfg, "dpo", out, has_eval=eval_ds is not None, estimate=estimate)
    kwargs["precompute_ref_log_probs"] = dc.reference == "precomputed"
    args = DPOConfig(**kwargs)
    trainer = DPOTrainer(
        model=model,
        ref_model=ref_model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=held,
        processing_class=tok.tokenizer,
        peft_config=peft_config,
        callbacks=[TrainingGuard(model), DPOGuard(args, dc.collapse_loss), MetricsJsonl(out / "metrics.jsonl"),
                   stop := StopOnSignal()],
    )
    tensorboard_into(trainer, out)
    trainable, total = models.trainable_parameters(trainer.model)

    # 4. step 0: the reference really is the starting model
    step0 = None
    if not last_checkpoint:
        step0 = _evaluate(trainer)
        check_step0(step0, args, dc.step0_tolerance)

    # 5. train
    result = trainer.train(resume_from_checkpoint=str(last_checkpoint) if last_checkpoint else None)
    stop.raise_if_stopped(trainer)
    after = _evaluate(trainer, after_training=True)

    # 6. save, re-open, check, manifest
    if not common.save(trainer, out, cfg, tok, dc.method):
        return out
    common.drop_reference_adapter(out)
    state = trainer.state
    runtime = result.metrics.get("train_runtime", time.time() - t0)
    metrics = {
        "steps": state.global_step,
        "train_loss_final": common.last(state.log_history, "loss"),
        "train_loss_mean": result.metrics.get("train_loss"),
        "held_out": eval_ds is not None,
        "step0": step0,
        "after": after,
        "reward_accuracy": after.get("rewards/accuracies"),
        "reward_margin": after.get("rewards/margins"),
        "train_runtime_s": round(runtime, 2),
        "wall_time_s": round(time.time() - t0, 2),
        "peak_memory_mb": round(peak_memory_mb(), 1),
        "speed": common.speed_line(args, model),
        "memory_estimate_mb": common.estimate_mb(estimate),
        "global_batch_size": common.global_batch_size(args),
        "train_sequences": 2 * state.global_step * common.global_batch_size(args),  # chosen + rejected
    }
    common.write_manifest(
        out, "dpo", cfg, tok, parent=source, key=key, started=started,
        method=dc.method,
        reference=reference,
        loss_type=list(args.loss_type),
        beta=args.beta,
        adapter_base=common.adapter_base_of(source, dc.method),
        data=data_record,
        trainable_parameters=trainable,
        total_parameters=total,
        metrics=metrics,
        resumed_from=str(last_checkpoint) if last_checkpoint else None,
    )
    where = "held-out" if eval_ds is not None else "train sample"
    summary("dpo", {
        "method": f"{dc.method} ({trainable:,} of {total:,} parameters trained)",
        "reference": reference,
        "loss": f"{'+'.join(args.loss_type)}, beta {args.beta}",
        "step 0 (policy = reference)": "not run (resumed)" if step0 is None else
        f"ok: loss {step0['loss']:.4f}, rewards {step0['rewards/chosen']:+.4f} / {step0['rewards/rejected']:+.4f}",
        "steps": metrics["steps"],
        "final train loss": metrics["train_loss_final"],
        f"reward accuracy ({where})": after.get("rewards/accuracies"),
        f"reward margin ({where})": after.get("rewards/margins"),
        "log-prob chosen (before → after)": _before_after(step0, after, "logps/chosen"),
        "log-prob rejected (before → after)": _before_after(step0, after, "logps/rejected"),
        "speed settings": metrics["speed"],
        "wall time": f"{metrics['wall_time_s']:.1f} s",
        "peak memory": common.memory_line(metrics),
        "output": str(out),
    })
    common.finished(out)
    return out


def reference_model(model, method: str, mode: str, continues_adapter: bool):
    """The reference DPO compares against, and how it is described in the manifest."""
    if mode == "precomputed":
        return None, "precomputed log-probs of the starting model"
    if method == "full":
        ref = copy.deepcopy(model).eval()
        ref.requires_grad_(False)
        return ref, "frozen copy of the starting model"
    if continues_adapter:
        return None, "frozen copy of the starting (SFT) adapter"
    if mode == "copy":
        return None, "frozen copy of the new, zero-initialised adapter (= the starting model)"
    return None, "the starting model with the new LoRA adapter disabled"


def check_step0(m: dict, args, tolerance: float) -> None:
    """Before any update, policy and reference are the same model: log-ratios ≈ 0."""
    gaps = [abs(m.get(k, 0.0)) / args.beta for k in ("rewards/chosen", "rewards/rejected")]
    if max(gaps) > tolerance:
        raise PosttrainError(
            f"at step 0 the policy and the reference disagree (mean log-ratio {max(gaps):.4f} nats > "
            f"{tolerance}): the reference is not the model DPO starts from",
            fix="check dpo.reference and --base; raise dpo.step0_tolerance only for known numeric noise (fp16)",
        )
    if list(args.loss_type) == ["sigmoid"] and abs(m["loss"] - math.log(2)) > 10 * tolerance * args.beta + 1e-3:
        raise PosttrainError(f"at step 0 the DPO loss is {m['loss']:.4f}, not ln 2 = 0.6931",
                             fix="check dpo.reference and --base")


def _evaluate(trainer, *, after_training: bool = False) -> dict:
    """Loss, rewards and log-probs on the held-out pairs. TRL returns only the loss from
    evaluate() and logs the rest, so read them from the log record evaluate() just wrote (or, after
    training, from the one the trainer wrote at its last step)."""
    logged = common.final_eval(trainer) if after_training else None
    if logged is None:
        trainer.evaluate() if after_training else common.evaluate_before_training(trainer)
        logged = trainer.state.log_history[-1]
    loss = logged["eval_loss"]
    keep = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
            "logps/chosen", "logps/rejected")
    return {"loss": round(loss, 6), **{k: round(logged[f"eval_{k}"], 6) for k in keep if f"eval_{k}" in logged}}


def _before_after(before: dict | None, after: dict, key: str) -> str:
    if before is None or key not in before or key not in after:
        return f"{after.get(key, float('nan')):.3f}"
    return f"{before[key]:.3f} → {after[key]:.3f}"


def key_metrics(m: dict) -> dict:
    """The chain summary's numbers for this stage (chain.key_metrics)."""
    metrics = m.get("metrics", {})
    return {"reward acc": metrics.get("reward_accuracy"), "margin": metrics.get("reward_margin"),
            "steps": metrics.get("steps")}
