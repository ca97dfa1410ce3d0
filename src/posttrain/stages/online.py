"""The body the `rloo` and `grpo` stages share: online RL through TRL's RLOOTrainer / GRPOTrainer.

Reads top to bottom:
 1. the starting policy: --base, else this config's last finished policy stage, else
    model.name_or_path; an unfinished stage is refused;
 2. tokenizer and chat template, checked against the starting stage (safeguard #6); the prompts
    (the conversation before the last assistant turn) and reference answers from data:;
 3. the rewards, all resolved before any weights load: functions are imported and wrapped so a
    failure names them; a reward model must be a finished reward stage whose recorded held-out
    accuracy passes the gate (a weak reward model gets exploited) and share the policy's tokenizer
    and template; it scores prompt + completion rendered with its own saved tokenizer's template;
 4. the policy and its reference: TRL keeps a frozen copy of the starting adapter (LoRA/QLoRA;
    a new adapter starts at zero, so that is the starting model), or of the starting model
    (full: the model in memory, not TRL's reload from the config's path); generation stops at the
    end-of-turn token; a completion cut at max_completion_length before it scores
    `<stage>.missing_eot_penalty` (TRL would render it with its turn closed and score it as finished);
 5. train with alarms on NaN and on nothing moving (a step where every group scored alike has no
    signal by design and is not an alarm); save, re-open, check; manifest last, with the mean
    reward at the first and last logged step, the KL and each reward's mean.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import numbers
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain import lineage, manifest, models, registry
from posttrain.config import Config, check_stage, stage_output
from posttrain.console import console, fmt, peak_memory_mb, summary
from posttrain.errors import PosttrainError
from posttrain.rl import rewards
from posttrain.rl.prompts import prompt_data
from posttrain.sections import OnlineStageConfig
from posttrain.stages import common


@dataclass
class Reward:
    """One entry of `<stage>.rewards`, resolved: a wrapped function, or a checked reward-model path."""

    name: str  # the name TRL logs it under (rewards/<name>/mean)
    weight: float
    function: str | None = None  # 'module:function'
    fn: Any = None
    model: str | None = None  # reward model directory
    accuracy: float | None = None  # its recorded held-out accuracy

    def record(self) -> dict:
        if self.function is not None:
            return {"name": self.name, "function": self.function, "weight": self.weight}
        parent = lineage.parent_record(self.model)
        return {"name": self.name, "model": self.model, "hash": parent["hash"], "accuracy": self.accuracy,
                "weight": self.weight}


def run(cfg: Config, stage: str, *, base: str | None, output: str | None, resume: bool, overwrite: bool) -> Path:
    started, t0 = manifest.now(), time.time()
    section: OnlineStageConfig = getattr(cfg, stage)
    out = stage_output(cfg, stage, output)
    check_stage(cfg, stage)

    # 1. where the policy starts
    source = common.resolve_base(base or common.default_base(cfg, stage), allow_adapter=True)
    last_checkpoint = common.check_output(out, source, resume=resume, overwrite=overwrite)
    key = lineage.stage_key(cfg, stage, source)

    # 2. tokenizer, template and prompts, checked before any model is loaded
    tok = models.load_tokenizer(cfg, source, need_masks=False)
    common.check_agrees_with_parent(source, tok, allow=section.allow_template_mismatch,
                                    setting=f"{stage}.allow_template_mismatch")
    train_ds, eval_ds, data_record = prompt_data(cfg, section.data, tok)

    # 3. rewards: gated and checked, still without loading weights; then the TRL config
    sources = resolve_rewards(cfg, section, stage, tok)
    import trl

    from posttrain.callbacks import MetricsJsonl, StopOnSignal, tensorboard_into

    config_name = registry.STAGES[stage].trl_config  # RLOOConfig -> RLOOTrainer, GRPOConfig -> GRPOTrainer
    config_cls, trainer_cls = getattr(trl, config_name), getattr(trl, config_name.replace("Config", "Trainer"))
    estimate = common.check_memory(cfg, stage, source)
    kwargs = common.trainer_kwargs(cfg, stage, out, has_eval=eval_ds is not None, estimate=estimate)
    kwargs["reward_weights"] = [r.weight for r in sources]
    if kwargs.get("use_vllm"):  # vLLM samples with its own stop list; the transformers path is checked below
        kwargs["generation_kwargs"] = {"stop_token_ids": [tok.eot_id], **(kwargs.get("generation_kwargs") or {})}
    try:
        args = config_cls(**kwargs)
    except ValueError as e:  # TRL's own checks (generation batch vs num_generations ...)
        raise PosttrainError(f"{stage}.training: {_first_line(e)}") from None

    # 4. policy (with its reference), reward models, trainer
    common.start_output(out, key, resume=resume)
    continues_adapter = models.adapter_base(source) is not None and section.method != "full"
    # A LoRA policy arrives wrapped (a new adapter, or the starting stage's adapter continued): TRL
    # then keeps a frozen copy of that adapter, "ref", as the reference. Handing TRL a bare model
    # plus peft_config would make "adapter disabled" the reference, which for a continued adapter
    # is the pre-SFT base (and TRL refuses a PeftModel together with a peft_config).
    common.seed(cfg)
    model = models.load_causal_lm(cfg, source, section.method, section.lora, tok, wrap=True)
    trainable, total = models.trainable_parameters(model)  # before TRL adds its reference adapter
    reward_funcs, reward_tokenizers = load_rewards(sources)
    guard = reward_aware_guard(model)
    scoring_cls = penalizing_missing_eot(trainer_cls, tok.eot_id, section.missing_eot_penalty)
    with _reference_is_starting_model(trainer_cls, model, enabled=section.method == "full" and args.beta != 0.0):
        trainer = scoring_cls(
            model=model,
            reward_funcs=reward_funcs,
            args=args,
            train_dataset=train_ds,
            eval_dataset=eval_ds,
            processing_class=tok.tokenizer,
            reward_processing_classes=reward_tokenizers,
            callbacks=[guard, MetricsJsonl(out / "metrics.jsonl"), stop := StopOnSignal()],
        )
    guard.trainer = trainer
    tensorboard_into(trainer, out)
    trainer.reward_func_names = [r.name for r in sources]  # TRL names models after their config's path
    _match_reference_adapter(trainer.model)
    check_stops_at_end_of_turn(trainer, args, tok, stage)
    reference = describe_reference(section.method, args.beta, continues_adapter, stage)

    # 5. train, save, re-open, check, manifest
    # TRL's GenerationConfig leaves min_p, no_repeat_ngram_size, ... unset, and generate() would
    # fill them from the starting checkpoint's generation_config.json (models.own_sampling)
    with models.own_sampling(trainer.model):
        result = trainer.train(resume_from_checkpoint=str(last_checkpoint) if last_checkpoint else None)
    stop.raise_if_stopped(trainer)
    if not common.save(trainer, out, cfg, tok, section.method):
        return out
    common.drop_reference_adapter(out)
    history = trainer.state.log_history
    runtime = result.metrics.get("train_runtime", time.time() - t0)
    metrics = {
        "steps": trainer.state.global_step,
        **scores(history, [r.name for r in sources]),
        "train_loss_final": common.last(history, "loss"),
        "train_runtime_s": round(runtime, 2),
        "wall_time_s": round(time.time() - t0, 2),
        "peak_memory_mb": round(peak_memory_mb(), 1),
        "global_batch_size": common.global_batch_size(args),
        "num_generations": args.num_generations,
        # each completion is generated once and trained on num_iterations times
        "train_sequences": round(trainer.state.global_step * common.global_batch_size(args)
                                 * (1 + 1 / args.num_iterations)),
        "speed": common.speed_line(args, model),
        "memory_estimate_mb": common.estimate_mb(estimate),
    }
    common.write_manifest(
        out, stage, cfg, tok, parent=source, key=key, started=started,
        method=section.method,
        reference=reference,
        beta=args.beta,
        adapter_base=common.adapter_base_of(source, section.method),
        rewards=[r.record() for r in sources],
        data=data_record,
        trainable_parameters=trainable,
        total_parameters=total,
        metrics=metrics,
        resumed_from=str(last_checkpoint) if last_checkpoint else None,
    )
    summary(stage, {
        "method": f"{section.method} ({trainable:,} of {total:,} parameters trained)",
        "reference": reference,
        "rewards": ", ".join(f"{r.name} × {r.weight:g}" for r in sources),
        "steps": metrics["steps"],
        "mean reward (first → last log)": f"{_fmt(metrics['score_first'])} → {_fmt(metrics['score_last'])}",
        **{f"  {name} (mean)": f"{_fmt(v['first'])} → {_fmt(v['last'])}"
           for name, v in metrics["reward_means"].items()},
        "KL to reference (last)": metrics["kl_last"] if metrics["kl_last"] is not None else "not computed (beta 0)",
        "groups with equal rewards (last)": metrics["frac_reward_zero_std_last"],
        "completions cut at max length (last)": metrics["clipped_ratio_last"],
        "  scored as": _missing_eot_line(section.missing_eot_penalty, stage),
        "final train loss": metrics["train_loss_final"],
        "speed settings": metrics["speed"],
        "wall time": f"{metrics['wall_time_s']:.1f} s",
        "peak memory": common.memory_line(metrics),
        "output": str(out),
    })
    if metrics["frac_reward_zero_std_last"] == 1.0:
        console.print("[yellow]warning[/] at the last logged step every group's completions scored alike: no "
                      "learning signal (rewards too sparse for this policy, or num_generations too small)")
    common.finished(out)
    return out


# ---------------------------------------------------------------------------------------------
# Rewards


def resolve_rewards(cfg: Config, section: OnlineStageConfig, stage: str, tok: models.TokenizerInfo) -> list[Reward]:
    """Every reward of the stage, checked; no model weights are loaded here."""
    out: list[Reward] = []
    taken: set[str] = set()
    for r in section.rewards:
        if r.function is not None:
            fn = rewards.load_function(r.function, cfg._source_dir)
            name = _unique(r.function.partition(":")[2], taken)
            out.append(Reward(name, r.weight, function=r.function, fn=wrap_function(fn, r.function, name, stage)))
            continue
        path = rewards.resolve_reward_model(r.model or lineage.chain_reward_dir(cfg), stage)
        accuracy = rewards.check_gate(path, section, stage)
        rewards.check_same_tokenizer(tok, path, stage)
        out.append(Reward(_unique(Path(path).name or "reward_model", taken), r.weight, model=path, accuracy=accuracy))
    return out


def load_rewards(sources: list[Reward]) -> tuple[list, list]:
    """TRL's reward_funcs and reward_processing_classes: a loaded model with its own saved tokenizer,
    or the wrapped function (no tokenizer)."""
    from transformers import AutoTokenizer

    funcs, tokenizers = [], []
    for r in sources:
        if r.function is not None:
            funcs.append(r.fn)
            tokenizers.append(None)
        else:
            funcs.append(rewards.load_reward_model(r.model))
            tokenizers.append(AutoTokenizer.from_pretrained(r.model))
    return funcs, tokenizers


def wrap_function(fn, spec: str, name: str, stage: str):
    """The user's reward function as TRL calls it, with loud failures: an exception inside it, or an
    answer that is not one number (or None, to abstain) per completion, stops training with a
    PosttrainError naming it. Keyword arguments it does not accept are not passed."""
    accepted = _accepted_keywords(fn)

    def call(kwargs: dict):
        n = len(kwargs["completions"])
        if accepted is not None:
            kwargs = {k: v for k, v in kwargs.items() if k in accepted}
        return n, kwargs

    if inspect.iscoroutinefunction(fn):
        async def reward(**kwargs):
            n, kwargs = call(kwargs)
            try:
                got = await fn(**kwargs)
            except PosttrainError:
                raise
            except Exception as e:
                raise _raised(spec, stage, e) from e
            return check_scores(got, n, spec, stage)
    else:
        def reward(**kwargs):
            n, kwargs = call(kwargs)
            try:
                got = fn(**kwargs)
            except PosttrainError:
                raise
            except Exception as e:
                raise _raised(spec, stage, e) from e
            return check_scores(got, n, spec, stage)

    reward.__name__ = reward.__qualname__ = name  # TRL logs rewards/<__name__>/mean
    reward.__doc__ = getattr(fn, "__doc__", None)
    return reward


def check_scores(got, n: int, spec: str, stage: str) -> list[float | None]:
    """One finite number, or None (abstain), per completion."""
    if hasattr(got, "tolist"):  # numpy array / torch tensor
        got = got.tolist()
    if not isinstance(got, (list, tuple)):
        raise PosttrainError(f"{stage}: reward function '{spec}' returned {type(got).__name__}, not a list of "
                             f"{n} numbers", fix="return one float (or None to abstain) per completion")
    if len(got) != n:
        raise PosttrainError(f"{stage}: reward function '{spec}' returned {len(got)} scores for {n} completions",
                             fix="return one float (or None to abstain) per completion, in order")
    out: list[float | None] = []
    for i, x in enumerate(got):
        if x is None:
            out.append(None)
            continue
        if not isinstance(x, numbers.Real) or not math.isfinite(float(x)):
            raise PosttrainError(f"{stage}: reward function '{spec}' returned {x!r} ({type(x).__name__}) for "
                                 f"completion {i}, not a finite number",
                                 fix="return one float (or None to abstain) per completion")
        out.append(float(x))
    return out


def _raised(spec: str, stage: str, e: Exception) -> PosttrainError:
    return PosttrainError(f"{stage}: reward function '{spec}' raised {type(e).__name__}: {_first_line(e)}",
                          fix="it is called as f(prompts=..., completions=..., reference=..., **more) and returns "
                          "one float per completion; completions are lists of messages")


def _accepted_keywords(fn) -> set[str] | None:
    """The keyword arguments `fn` takes, or None when it takes **kwargs (or can't be inspected)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name for p in params if p.kind in named}


def _unique(name: str, taken: set[str]) -> str:
    found, i = name, 2
    while found in taken:
        found, i = f"{name}_{i}", i + 1
    taken.add(found)
    return found


# ---------------------------------------------------------------------------------------------
# Policy, reference, generation


@contextlib.contextmanager
def _reference_is_starting_model(trainer_cls, model, *, enabled: bool):
    """Full training with beta > 0: TRL builds the reference by reloading the policy's
    `config._name_or_path` (grpo_trainer.py:1003, rloo_trainer.py:689). That is not the starting
    model when it was merged from a LoRA adapter (the path is the pre-SFT base) or grew new token
    rows, and it ignores model.revision. Hand TRL a frozen copy of the model in memory instead;
    TRL then prepares it (dropout off, fused head, device) as it would its own."""
    if not enabled:
        yield
        return
    import copy
    import importlib

    module = importlib.import_module(trainer_cls.__module__)
    original = module.create_model_from_path

    def starting_model(*args, **kwargs):
        ref = copy.deepcopy(model).eval()
        ref.requires_grad_(False)
        return ref

    module.create_model_from_path = starting_model
    try:
        yield
    finally:
        module.create_model_from_path = original


def _match_reference_adapter(model) -> None:
    """TRL copies the adapter into "ref" and then (QLoRA) casts the trainable copy to bf16
    (grpo_trainer.py:541, rloo_trainer.py:461): make the reference the very values the policy starts from."""
    params = dict(model.named_parameters())
    for name, p in params.items():
        twin = params.get(name.replace(".ref.", ".default.")) if ".ref." in name else None
        if twin is not None and twin.dtype != p.dtype:
            p.data = twin.data.detach().clone()


def describe_reference(method: str, beta: float, continues_adapter: bool, stage: str) -> str:
    if beta == 0.0:
        return f"none ({stage}.training.beta is 0: no KL penalty)"
    if method == "full":
        return "frozen copy of the starting model"
    if continues_adapter:
        return "frozen copy of the starting adapter"
    return "frozen copy of the new, zero-initialised adapter (= the starting model)"


def check_stops_at_end_of_turn(trainer, args, tok: models.TokenizerInfo, stage: str) -> None:
    """Safeguard #16: sampling ends a completion at the end-of-turn token, and TRL masks after it.
    TRL takes every eos id of the model's generation config (which load_causal_lm sets to
    end-of-turn + eos); a user's generation_kwargs may override the sampling side."""
    if args.use_vllm:
        return
    stops = trainer.generation_kwargs.get("eos_token_id")
    stops = [stops] if isinstance(stops, int) else list(stops or [])
    if tok.eot_id not in stops or tok.eot_id not in trainer.eos_token_ids:
        raise PosttrainError(
            f"{stage}: sampling would not stop at the end-of-turn token (id {tok.eot_id}); completions would run on "
            "to the length limit",
            fix=f"remove eos_token_id from {stage}.training.generation_kwargs",
        )


def penalizing_missing_eot(trainer_cls, eot_id: int, penalty: float | None):
    """`trainer_cls` whose rewards give `penalty` to every completion without the end-of-turn token,
    posttrain PPO's `missing_eot_penalty` for TRL's trainers (None: `trainer_cls` itself).

    Why: TRL decodes a completion cut at max_completion_length and, for a reward model, renders
    prompt + completion through the chat template, which closes the turn; reward functions get the
    decoded text, which looks the same. So an answer cut mid-way is scored as a finished one, and
    the policy is never told that running on to the limit is wrong.

    Why a penalty rather than TRL's `mask_truncated_completions` (still available under
    `<stage>.training`): in TRL 1.16 that only drops the cut completions from the loss; their
    finished-looking scores still enter their group's mean and std (GRPO) or leave-one-out baseline
    (RLOO), so every sibling's advantage is still measured against them, and nothing teaches the
    policy to end its turn. The penalty replaces the score before the advantages are computed, as
    PPO does. Every reward that scores the completion gives it (the weighted total is penalty × the
    sum of their weights), so per-reward logs show it too; a completion that did end is scored
    exactly as before.
    "Ended" is PPO's: the end-of-turn id among the completion's ids (TRL's clipped_ratio also counts
    a stop on the plain eos token, or on padding, as ended)."""
    if penalty is None:
        return trainer_cls

    class PenalizingTrainer(trainer_cls):
        def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
            scores = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
            ended = ended_flags(completion_ids_list, eot_id, scores.device)
            ended = self.accelerator.gather(ended.long()).bool()  # TRL's scores are gathered across processes
            return missing_eot_scores(scores, ended, penalty)

    PenalizingTrainer.__name__ = PenalizingTrainer.__qualname__ = trainer_cls.__name__
    return PenalizingTrainer


def ended_flags(completion_ids: list[list[int]], eot_id: int, device=None):
    """[B] bool: the completion emitted the end-of-turn token (TRL keeps ids up to the first stop)."""
    import torch

    return torch.tensor([eot_id in ids for ids in completion_ids], dtype=torch.bool, device=device)


def missing_eot_scores(scores, ended, penalty: float):
    """TRL's rewards_per_func [B, rewards] with every score of a completion that did not end set to
    `penalty`; ended rows are untouched. An abstention (NaN: a function that does not judge this
    prompt) stays one, so the penalty is on the scale of the rewards that score the completion's siblings."""
    import torch

    keep = ended[:, None] | scores.isnan()
    return torch.where(keep, scores, torch.full_like(scores, penalty))


def _missing_eot_line(penalty: float | None, stage: str) -> str:
    if penalty is None:
        return f"as if finished ({stage}.missing_eot_penalty is null)"
    return f"{penalty:g} by every reward ({stage}.missing_eot_penalty)"


def reward_aware_guard(model):
    """TrainingGuard for RL: a step in which every group of completions scored alike has all
    advantages 0 and no gradient by design (a sparse verifier on a weak policy), so "no parameter
    moved" is only an alarm for a step that had a learning signal. Set `.trainer` once built."""
    from posttrain.callbacks import TrainingGuard

    class RewardAwareGuard(TrainingGuard):
        trainer = None

        def check_changed(self, args, state) -> None:
            logged = self.trainer._metrics["train"].get("frac_reward_zero_std") if self.trainer is not None else None
            if self.before is not None and logged and logged[-1] >= 1.0:
                return
            super().check_changed(args, state)

    return RewardAwareGuard(model)


# ---------------------------------------------------------------------------------------------
# Metrics and output


def scores(history: list[dict], names: list[str]) -> dict:
    """The mean total (weighted) reward at the first and last logged training step ("reward" in
    TRL's logs; evaluation logs are "eval_reward"), the last KL, and each reward's mean."""
    logged = [h for h in history if "reward" in h]

    def first_last(key: str) -> dict:
        values = [h[key] for h in history if h.get(key) is not None]
        return {"first": values[0] if values else None, "last": values[-1] if values else None}

    return {
        "score_first": logged[0]["reward"] if logged else None,
        "score_last": logged[-1]["reward"] if logged else None,
        "kl_last": common.last(history, "kl"),
        "reward_means": {name: first_last(f"rewards/{name}/mean") for name in names},
        "frac_reward_zero_std_last": common.last(history, "frac_reward_zero_std"),
        "clipped_ratio_last": common.last(history, "completions/clipped_ratio"),
        "mean_length_last": common.last(history, "completions/mean_length"),
    }


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4g}"


def key_metrics(m: dict) -> dict:
    """The chain summary's numbers for rloo and grpo (chain.key_metrics)."""
    metrics = m.get("metrics", {})
    return {"score": f"{fmt(metrics.get('score_first'))} → {fmt(metrics.get('score_last'))}",
            "kl": metrics.get("kl_last"), "steps": metrics.get("steps")}
