"""Pieces every training stage shares: where it starts from, the TRL config kwargs (with the
memory estimate and the speed defaults), saving with checks, and the manifest. Each stage file
stays readable top to bottom and calls these in the same order. Checkpoints are in
stages/checkpoints.py; which process is the main one, and the launch environment, in launch.py."""

from __future__ import annotations

import sys
from pathlib import Path

from posttrain import card, launch, lineage, manifest, models, registry, templates
from posttrain import config as config_mod
from posttrain.config import Config
from posttrain.console import console
from posttrain.errors import PosttrainError
from posttrain.stages import checkpoints


def resolve_base(base: str, *, allow_adapter: bool = False) -> str:
    """A finished stage directory, a model directory or a Hub id."""
    p = Path(base)
    started = any(p.glob(f"{checkpoints.CHECKPOINTS}/checkpoint-*")) or (p / "posttrain.started.json").exists()
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
    before = [s for s in stages if registry.STAGES[s].policy and s != stage]
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
    last = checkpoints.last_checkpoint(out) if resume else None
    if resume and last is None:
        raise PosttrainError(f"--resume: no checkpoint in '{out / checkpoints.CHECKPOINTS}'",
                             fix="run without --resume")
    if Path(source).resolve() == out.resolve():
        raise PosttrainError(f"the output '{out}' is the base model's own directory",
                             fix="pass --output to write the new stage elsewhere")
    if manifest.is_finished(out) and not overwrite:
        raise PosttrainError(f"'{out}' already holds a finished stage",
                             fix="pass --overwrite to replace it, or choose another --output")
    return last


def seed(cfg: Config) -> None:
    """Seed every RNG before the model loads. A new LoRA adapter's A matrices and a reward model's
    score head are random; the Trainer seeds only when it is built, after the model exists, so
    without this two runs of the same config would train different models (and two processes
    would start from another init than one)."""
    from transformers import set_seed

    set_seed(cfg.seed)


def check_memory(cfg: Config, stage: str, source: str):
    """The stage's memory estimate (posttrain.memory) before its weights load, with a warning on
    the main process when it won't fit that names the cheapest change that would. Unless the
    config sets activation checkpointing, this decides it: off when the stage fits without, and
    the estimate returned is for what will run. None when the model's config can't be read here
    (loading it reports why)."""
    from dataclasses import replace

    from posttrain import memory

    try:
        est = memory.estimate_stage(cfg, stage, source)
    except Exception as e:  # noqa: BLE001 - advisory: an architecture it can't read must not stop training
        if launch.is_main_process() and not isinstance(e, PosttrainError):
            console.print(f"[dim]memory estimate unavailable for this model ({type(e).__name__}: {e})[/]")
        return None
    available = launch.least_across_processes(memory.available_bytes())
    section = "sft" if stage == "control" else stage
    if stage != "ppo" and not any(k in getattr(cfg, section).training for k in CHECKPOINTING_KEYS):
        # posttrain's default: activation checkpointing only when the stage won't fit without it
        without = memory.estimate(replace(est.settings, checkpointing=False))
        est = without if without.total <= available else memory.estimate(replace(est.settings, checkpointing=True))
    warning = memory.check(est, available)
    if warning and launch.is_main_process():
        console.print(f"[yellow]warning[/] memory: {warning}")
    return est


CHECKPOINTING_KEYS = ("activation_checkpointing", "gradient_checkpointing")  # transformers 5.23 takes both


def speed_defaults(cfg: Config, stage: str, has_cuda: bool, estimate=None) -> dict:
    """The fast settings, as defaults under the user's `<stage>.training` (docs/benchmarks.md has
    the measurements behind them):
      - activation checkpointing only when the memory estimate says the stage won't fit without it
        (TRL turns it on always, at about 20-30% of the step time);
      - on CUDA with a varlen attention kernel (flash attention, models.attention): SFT packs
        conversations into full rows (best-fit decreasing, padding-free through position ids;
        the model's attention is checked to segment them, models.check_packing). Not with sdpa
        or eager: transformers then builds a dense block-diagonal mask over the whole flattened
        batch, (batch · max_length)² entries, more attention work than padding wastes;
      - on CUDA, Liger's fused kernels when liger-kernel is installed (the posttrain[gpu] extra).
    bf16 on GPUs that have it is a device default (config.device_training_defaults); the fused
    AdamW is already transformers' default (adamw_torch_fused on torch >= 2.8)."""
    # check_memory decided it (off when the stage fits without); without an estimate, off
    out = {"activation_checkpointing": bool(estimate is not None and estimate.settings.checkpointing)}
    if has_cuda and stage == "sft" and models.attention(cfg) in models.VARLEN_ATTENTION:
        out.update(packing=True, packing_strategy="bfd")
    if has_cuda and registry.STAGES[stage].liger and _liger_installed():
        out["use_liger_kernel"] = True
    return out


def _liger_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("liger_kernel") is not None


def trainer_kwargs(cfg: Config, stage: str, out: Path, has_eval: bool, estimate=None) -> dict:
    """TRL config arguments: posttrain's defaults < device and speed defaults < the user's
    `<stage>.training`. `estimate`: the stage's memory estimate (check_memory), which decides
    activation checkpointing."""
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
        # a progress bar redraws itself with \r: in a file or CI log it is one line per redraw.
        # Without a terminal the trainer prints one line per logging step instead.
        "disable_tqdm": not sys.stderr.isatty(),
    }
    defaults.update(config_mod.device_training_defaults(has_cuda, has_cuda and torch.cuda.is_bf16_supported()))
    defaults.update(models.trainer_precision(cfg))  # autocast in model.dtype over float32 master weights
    user = getattr(cfg, stage).training
    # Evaluation batches no larger than training's: an eval forward holds the whole batch's logits
    # (TRL's fused head chunks them only in training), and with Gemma-3's 262k vocabulary eval at
    # batch 32 raised DPO's peak RSS 1.3x over training's (docs/benchmarks.md).
    defaults["per_device_eval_batch_size"] = user.get("per_device_train_batch_size", 8)
    speed = speed_defaults(cfg, stage, has_cuda, estimate)
    if any(k in user for k in CHECKPOINTING_KEYS):  # either name set by the user decides
        speed.pop("activation_checkpointing")
    defaults.update(speed)
    best = registry.STAGES[stage].best
    if has_eval and best is not None:
        # Held-out loss at every save, so rotation keeps the best checkpoint besides the newest ones.
        defaults.update(eval_strategy="steps", metric_for_best_model=best)
    kwargs = {**defaults, **user}
    if kwargs.get("eval_strategy") == "steps" and "eval_steps" not in user:
        kwargs["eval_steps"] = kwargs["save_steps"]
    kwargs["output_dir"] = str(out / checkpoints.CHECKPOINTS)
    if not has_eval:
        kwargs["eval_strategy"] = "no"
    return kwargs


def estimate_mb(estimate) -> dict | None:
    """The memory estimate for the manifest: the total and each model's share, in MB."""
    if estimate is None:
        return None
    return {"total": round(estimate.total / 2**20, 1),
            **{k: round(v / 2**20, 1) for k, v in estimate.groups().items()}}


def memory_line(metrics: dict) -> str:
    """Peak memory (CUDA allocator on a GPU; on a CPU the process's RSS, interpreter and libraries
    included) next to the estimate made before loading (weights, gradients, optimizer, activations)."""
    import torch

    peak, est = metrics.get("peak_memory_mb"), metrics.get("memory_estimate_mb")
    text = f"{peak:.0f} MB {'CUDA' if torch.cuda.is_available() else 'RSS'}" if peak is not None else "-"
    return text + (f"; estimated before loading: {est['total']:.0f} MB of weights, optimizer and activations"
                   if est else "")


def speed_line(args, model) -> str:
    """The speed settings a TRL stage trained with, for its summary and manifest."""
    parts = ["bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"]
    config = getattr(model, "config", None)
    parts.append(f"{getattr(config, '_attn_implementation', None) or 'default'} attention")
    if getattr(args, "packing", False):
        parts.append(f"packing ({args.packing_strategy}, padding-free)")
    elif getattr(args, "padding_free", False):
        parts.append("padding-free")
    if args.use_liger_kernel:
        parts.append("Liger kernels")
    parts.append(f"activation checkpointing {'on' if args.activation_checkpointing else 'off'}")
    parts.append(str(getattr(args.optim, "value", args.optim)))
    parts.append(launch.distribution())
    return ", ".join(parts)


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

    m = {
        "stage": stage,
        **fields,
        **({"checkpoints": checkpoints.checkpoints_record(out)} if (out / checkpoints.CHECKPOINTS).is_dir() else {}),
        "parent": lineage.parent_record(parent),
        **({"origin": found} if (found := lineage.origin(parent)) else {}),
        "inputs_key": key,
        "template_hash": tok.template_hash,
        "special_tokens": special_tokens(tok),
        "config": config_mod.to_dict(cfg),
        "versions": manifest.versions(),
        "git_commit": manifest.git_commit(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "started": started,
        "finished": manifest.now(),
    }
    card.write(out, m, key_metrics(m))  # before the manifest: the card alone does not finish the stage
    manifest.write(out, m)


def key_metrics(m: dict) -> dict:
    """The few numbers of a stage's manifest worth a line (the chain summary, the model card): its
    stage module's key_metrics."""
    import importlib

    stage = registry.STAGES.get(m.get("stage"))
    return importlib.import_module(stage.module).key_metrics(m) if stage else {}


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


def evaluate_before_training(trainer) -> dict:
    """trainer.evaluate() before trainer.train(), without its multi-process trap.

    evaluate() prepares the model in evaluation mode, and accelerate marks it prepared; train() then
    takes it as already wrapped and never puts it in DistributedDataParallel, so with several
    processes each one trains its own copy and nothing says so (transformers 5.23, accelerate
    1.15; found by the 2-process tests). Dropping that mark lets train() wrap the model.
    TrainingGuard's cross-process weight check stops any run where the processes drift apart.
    """
    metrics = trainer.evaluate()
    model, acc = trainer.model, trainer.accelerator
    if acc.num_processes > 1 and trainer.model_wrapped is model and getattr(model, "_is_accelerate_prepared", False):
        model._is_accelerate_prepared = False
        if model in acc._models:
            acc._models.remove(model)
    return metrics


def final_eval(trainer) -> dict | None:
    """The held-out record the trainer logged at its last step, if any: with eval_strategy "steps"
    transformers evaluates when training ends, so evaluating again would repeat the same pass."""
    state = trainer.state
    record = next((h for h in reversed(state.log_history) if "eval_loss" in h), None)
    return record if record is not None and record.get("step") == state.global_step else None


def last(history: list[dict], key: str):
    return next((h[key] for h in reversed(history) if key in h), None)


def global_batch_size(args) -> int:
    return args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size


def start_output(out: Path, key: str, *, resume: bool) -> None:
    """The main process clears/creates the stage directory and marks it started; the others wait
    for it, so none writes into (or builds a trainer over) a directory that is being cleared."""
    state = launch.process_state()
    if state.is_main_process:
        manifest.prepare_output(out, overwrite=True, resume=resume)
        lineage.mark_started(out, key)
    state.wait_for_everyone()


def finished(out: Path) -> None:
    console.print(f"finished: {out}", soft_wrap=True)
