"""`posttrain reward`: a reward model from preference pairs with TRL's RewardTrainer.

Reads top to bottom:
 1. the starting model: --base, else reward.init, else the chain's policy before this stage
    (the SFT output); an unfinished stage is refused;
 2. tokenizer, template and preference data, checked against the starting stage;
 3. a sequence classifier with one output (`score`) on that model: full, LoRA (the head is
    trained in full and saved with the adapter) or QLoRA;
 4. train; then on held-out pairs: pairwise accuracy, mean margin, and the correlation of the
    score with the response length (a reward model that only likes long answers is a known
    failure: warned above reward.length_correlation_warning);
 5. before saving, the scores must not depend on the padding side or on batch mates; after
    saving, a fresh process reloads the model and must give the same scores on probe pairs
    (a reward head lost on reload is safeguard #9); manifest last.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from posttrain import data, lineage, manifest, models, numerics
from posttrain.config import Config, check_stage, stage_output
from posttrain.console import console, peak_memory_mb, summary
from posttrain.errors import PosttrainError
from posttrain.rl import rewards
from posttrain.stages import common

PROBE_PAIRS = 256  # held-out sample for the metrics when there is no eval set
CHECK_SEQUENCES = 16  # sequences for the padding, batch and reload checks


def run(cfg: Config, *, base: str | None = None, output: str | None = None,
        resume: bool = False, overwrite: bool = False) -> Path:
    started, t0 = manifest.now(), time.time()
    rc = cfg.reward
    out = stage_output(cfg, "reward", output)
    check_stage(cfg, "reward")

    # 1. where the reward model starts
    source = common.resolve_base(base or rc.init or common.default_base(cfg, "reward"), allow_adapter=True)
    last_checkpoint = common.check_output(out, source, resume=resume, overwrite=overwrite)
    key = lineage.stage_key(cfg, "reward", source)

    # 2. tokenizer, template and data
    tok = models.load_tokenizer(cfg, source, need_masks=False)
    common.check_agrees_with_parent(source, tok, allow=rc.allow_template_mismatch,
                                    setting="reward.allow_template_mismatch")
    train_ds, eval_ds, data_record = data.stage_data(cfg, rc.data, tok)
    held = eval_ds if eval_ds is not None else train_ds.select(range(min(PROBE_PAIRS, len(train_ds))))
    held = held.map(_prompt_tokens, fn_kwargs={"tokenizer": tok.tokenizer})

    # 3. model and trainer
    from trl import RewardConfig, RewardTrainer

    from posttrain.callbacks import MetricsJsonl, StopOnSignal, TrainingGuard, tensorboard_into

    common.start_output(out, key, resume=resume)
    estimate = common.check_memory(cfg, "reward", source)
    common.seed(cfg)
    model = models.load_sequence_classifier(cfg, source, rc.method, rc.lora, tok)
    trainable, total = models.trainable_parameters(model)
    args = RewardConfig(**common.trainer_kwargs(cfg, "reward", out, has_eval=eval_ds is not None, estimate=estimate))
    trainer = RewardTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=held,
        processing_class=tok.tokenizer,
        callbacks=[TrainingGuard(model), MetricsJsonl(out / "metrics.jsonl"), stop := StopOnSignal()],
    )
    tensorboard_into(trainer, out)
    if rc.method == "qlora":
        # TRL casts every trainable tensor of a quantized model to bf16. The score head (trained in
        # full, not a LoRA layer) must be in the dtype of the hidden states it reads, and the adapter
        # in the compute dtype, or the reloaded model (adapter in that dtype) scores differently.
        dtype = models.torch_dtype(cfg.model.dtype)
        for param in trainer.model.parameters():
            if param.requires_grad:
                param.data = param.data.to(dtype)
    if len(trainer.eval_dataset) == 0:
        raise PosttrainError(f"every held-out pair of data.{rc.data} is longer than reward.training.max_length "
                             f"{args.max_length}", fix="raise reward.training.max_length")

    # 4. train, then held-out accuracy, margin and length correlation
    result = trainer.train(resume_from_checkpoint=str(last_checkpoint) if last_checkpoint else None)
    stop.raise_if_stopped(trainer)
    scorer = trainer.accelerator.unwrap_model(trainer.model).eval()
    pad = tok.tokenizer.pad_token_id
    ev = trainer.eval_dataset
    quality = pair_metrics(rewards.score_ids(scorer, ev["chosen_ids"], pad),
                           rewards.score_ids(scorer, ev["rejected_ids"], pad),
                           [len(c) - p for c, p in zip(ev["chosen_ids"], ev["prompt_tokens"], strict=True)],
                           [len(r) - p for r, p in zip(ev["rejected_ids"], ev["prompt_tokens"], strict=True)])
    if abs(quality["length_correlation"]) > rc.length_correlation_warning:
        console.print(f"[yellow]warning[/] the reward model's score correlates with response length "
                      f"(r = {quality['length_correlation']:+.2f} on held-out responses): it may be judging length, "
                      "which PPO will exploit")

    # 5. scores independent of padding and batch mates; save; reload in a fresh process
    probe = [*ev["chosen_ids"][: CHECK_SEQUENCES // 2], *ev["rejected_ids"][: CHECK_SEQUENCES // 2]]
    # the dtype the stage computes in: model.dtype (bf16 weights, or bf16 autocast over float32 master weights)
    scores, tolerance = check_padding_and_batch(scorer, probe, pad, rc.tolerance, models.torch_dtype(cfg.model.dtype))
    if not common.save(trainer, out, cfg, tok, rc.method):
        return out
    if rc.method != "full":
        rewards.check_head_saved(out)
    reload = check_reload(out, probe, pad, scores, tolerance, method=rc.method, model_dtype=cfg.model.dtype)

    runtime = result.metrics.get("train_runtime", time.time() - t0)
    metrics = {
        "steps": trainer.state.global_step,
        "train_loss_final": common.last(trainer.state.log_history, "loss"),
        "held_out": eval_ds is not None,
        **quality,
        "train_runtime_s": round(runtime, 2),
        "wall_time_s": round(time.time() - t0, 2),
        "peak_memory_mb": round(peak_memory_mb(), 1),
        "global_batch_size": common.global_batch_size(args),
        "train_sequences": 2 * trainer.state.global_step * common.global_batch_size(args),  # chosen + rejected
        "speed": common.speed_line(args, model),
        "memory_estimate_mb": common.estimate_mb(estimate),
    }
    common.write_manifest(
        out, "reward", cfg, tok, parent=source, key=key, started=started,
        method=rc.method,
        adapter_base=common.adapter_base_of(source, rc.method),
        data=data_record,
        trainable_parameters=trainable,
        total_parameters=total,
        metrics=metrics,
        checks={"padding_and_batch": f"scores equal within {tolerance:.3g}", "reload": reload},
        resumed_from=str(last_checkpoint) if last_checkpoint else None,
    )
    where = "held-out" if eval_ds is not None else "train sample"
    summary("reward", {
        "method": f"{rc.method} ({trainable:,} of {total:,} parameters trained)",
        "steps": metrics["steps"],
        "final train loss": metrics["train_loss_final"],
        f"pairwise accuracy ({where}, {quality['pairs']} pairs)": quality["accuracy"],
        "mean margin (chosen - rejected)": quality["margin"],
        "score vs response length (Pearson r)": quality["length_correlation"],
        "reload in a fresh process": f"same scores (max |Δ| {reload['max_abs_diff']:.2e})",
        "speed settings": metrics["speed"],
        "wall time": f"{metrics['wall_time_s']:.1f} s",
        "peak memory": common.memory_line(metrics),
        "output": str(out),
    })
    common.finished(out)
    return out


def _prompt_tokens(row: dict, tokenizer) -> dict:
    text = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
    return {"prompt_tokens": len(tokenizer(text, add_special_tokens=False)["input_ids"])}


def pair_metrics(chosen: list[float], rejected: list[float], chosen_len: list[int], rejected_len: list[int]) -> dict:
    """Pairwise accuracy (ties count as wrong), mean margin, score distribution, and the Pearson
    correlation of score with response length over every held-out response."""
    n = len(chosen)
    margins = [c - r for c, r in zip(chosen, rejected, strict=True)]
    scores, lengths = [*chosen, *rejected], [*chosen_len, *rejected_len]
    return {
        "pairs": n,
        "accuracy": round(sum(m > 0 for m in margins) / n, 4),
        "margin": round(sum(margins) / n, 4),
        "score_chosen_mean": round(sum(chosen) / n, 4),
        "score_rejected_mean": round(sum(rejected) / n, 4),
        "score_std": round(_std(scores), 4),
        "length_correlation": round(pearson(scores, lengths), 4),
    }


def _std(x: list[float]) -> float:
    m = sum(x) / len(x)
    return math.sqrt(sum((v - m) ** 2 for v in x) / len(x))


def pearson(x: list[float], y: list[float]) -> float:
    """Pearson r; 0.0 when either side is constant (no linear relation to report)."""
    sx, sy = _std(x), _std(y)
    if sx == 0 or sy == 0:
        return 0.0
    mx, my = sum(x) / len(x), sum(y) / len(y)
    return sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True)) / (len(x) * sx * sy)


def check_padding_and_batch(model, sequences: list[list[int]], pad: int, tolerance: float,
                            dtype) -> tuple[list[float], float]:
    """The score of a sequence is the same padded right or left, and alone or in a batch: within
    `tolerance` when the model computes in float32, within rounding steps of the scores' size when
    it computes in `dtype` bf16/fp16 (numerics.tolerance). Returns the right-padded scores and the
    tolerance applied."""
    right = rewards.score_ids(model, sequences, pad, padding_side="right")
    left = rewards.score_ids(model, sequences, pad, padding_side="left")
    alone = rewards.score_ids(model, sequences, pad, batch_size=1)
    tol = numerics.tolerance(tolerance, dtype, scale=max(abs(x) for x in right))
    for name, other in (("left padding", left), ("a batch of one", alone)):
        diff = max(abs(a - b) for a, b in zip(right, other, strict=True))
        if diff > tol:
            raise PosttrainError(
                f"the reward model's scores change with {name} (max |Δ| {diff:.2e} > {tol:.2e}, reward.tolerance "
                f"{tolerance} in {str(dtype).removeprefix('torch.')}): the score is not read at the last real token",
                fix="check that the pad token differs from every content token and model.pad_token",
            )
    return right, tol


def check_reload(out: Path, sequences: list[list[int]], pad: int, expected: list[float], tolerance: float,
                 method: str = "full", model_dtype: str = "auto") -> dict:
    """Load what was saved in a fresh Python process and compare its scores with the trained model's."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"sequences": sequences, "pad_id": pad, "method": method, "model_dtype": model_dtype}, f)
    try:
        r = subprocess.run([sys.executable, "-m", "posttrain.rl.rewards", str(out), f.name],
                           capture_output=True, text=True, check=False)
    finally:
        Path(f.name).unlink(missing_ok=True)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise PosttrainError(f"the reward model saved in '{out}' does not reload: {last}")
    got = json.loads(r.stdout.strip().splitlines()[-1])
    diff = max(abs(a - b) for a, b in zip(expected, got, strict=True))
    if diff > tolerance:
        raise PosttrainError(f"the reward model saved in '{out}' reloads with other scores (max |Δ| {diff:.2e} > "
                             f"{tolerance:.2e}): its head or weights were not saved as trained")
    return {"sequences": len(sequences), "max_abs_diff": diff, "tolerance": tolerance}


def key_metrics(m: dict) -> dict:
    """The chain summary's numbers for this stage (chain.key_metrics)."""
    metrics = m.get("metrics", {})
    return {"held-out acc": metrics.get("accuracy"), "margin": metrics.get("margin"),
            "length corr": metrics.get("length_correlation")}
