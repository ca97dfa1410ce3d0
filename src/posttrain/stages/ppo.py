"""`posttrain ppo`: RLHF with PPO against the reward model, written in this project (TRL removed its
PPOTrainer in 1.13). The algorithm and its details are in docs/ppo.md; the arithmetic is in
rl/core.py, sampling and the forward passes in rl/rollout.py; the reference and value model in
stages/ppo_models.py, the checks that stop a run in stages/ppo_checks.py, the checkpoint format in
stages/checkpoints.py.

Reads top to bottom:
 1. the policy: --base, else the chain's policy before this stage (the SFT output);
    the reward model: ppo.reward_model, else this config's reward stage;
 2. before any weights load: the reward model passes the accuracy gate, and policy and reward
    model share tokenizer, chat template and special tokens; prompts from the formatted data;
 3. four models, all with dropout off: policy (trained), reference (a frozen copy of the
    starting policy; for LoRA/QLoRA a frozen copy of the adapter it continues, on the same base,
    or its new adapter disabled), reward model (frozen),
    value model (trained, initialised from the reward model); under accelerate, the policy and
    value model are one prepared module;
 4. the loop: rollout → log-probs, reference log-probs, values → scores at the last real token
    (penalty for responses that never end) → per-token rewards with the KL penalty → GAE →
    whitened advantages → ppo_epochs of clipped updates over minibatches → KL coefficient;
    the first update's ratio must be 1; stops on NaN, a KL cap, or identical responses;
 5. checkpoints every save_steps (resume continues with the same data order and random state);
    the policy (full or adapter) is saved with tokenizer, template and manifest.
"""

from __future__ import annotations

import json
import math
import signal
import time
from pathlib import Path

from posttrain import data, disk, launch, lineage, manifest, models
from posttrain.config import Config, check_stage, stage_output
from posttrain.console import console, fmt, peak_memory_mb, summary
from posttrain.errors import PosttrainError
from posttrain.rl import rewards
from posttrain.rl.prompts import prompt_data
from posttrain.sections import PPOStageConfig
from posttrain.stages import checkpoints, common, ppo_checks, ppo_models

SAMPLES_SHOWN = 2


def run(cfg: Config, *, base: str | None = None, output: str | None = None,
        resume: bool = False, overwrite: bool = False) -> Path:
    started, t0 = manifest.now(), time.time()
    pc = cfg.ppo
    out = stage_output(cfg, "ppo", output)
    check_stage(cfg, "ppo")

    # 1. where PPO starts, and what it optimises
    source = common.resolve_base(base or common.default_base(cfg, "ppo"), allow_adapter=True)
    last_checkpoint = common.check_output(out, source, resume=resume, overwrite=overwrite)
    rm_path = rewards.resolve_reward_model(pc.reward_model or lineage.chain_reward_dir(cfg), "ppo")
    value_path = pc.value_model or rm_path
    key = lineage.stage_key(cfg, "ppo", source)

    # 2. checks before any weights load
    rm_accuracy = rewards.check_gate(rm_path, pc, "ppo")
    tok = models.load_tokenizer(cfg, source, need_masks=pc.ptx_coef > 0)
    common.check_agrees_with_parent(source, tok)
    for path in {rm_path, value_path}:
        rewards.check_same_tokenizer(tok, path, "ppo")
    train_ds, _, data_record = prompt_data(cfg, pc.data, tok)
    queries, dropped = _tokenize_prompts(train_ds, tok.tokenizer, pc.max_prompt_length)
    ptx = _ptx_examples(cfg, pc, tok)

    # 3. the four models
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from posttrain.rl import rollout

    accelerator = Accelerator(cpu=not torch.cuda.is_available(), log_with=pc.report_to or None,
                              project_dir=str(out / "runs"))
    # PPO sets its own precision (Loop.precision around every policy and value forward). The
    # accelerate state is one per process: after a bf16 trainer in the same process (`posttrain
    # run`), or under a launcher's ACCELERATE_MIXED_PRECISION, prepare() would wrap the trained
    # module's forward in autocast while sampling and the reference ran without it (a LoRA policy's
    # first-rollout KL was 1.4e-3, not 0). So prepare() wraps nothing.
    accelerator.native_amp = False
    set_seed(cfg.seed + accelerator.process_index)
    processes = launch.distribution(sharded=False)
    common.start_output(out, key, resume=resume)
    if pc.report_to:  # the trackers the HF trainers would use, fed the same numbers as metrics.jsonl
        accelerator.init_trackers("ppo", config={k: v for k, v in pc.model_dump().items()
                                                 if isinstance(v, (int, float, str, bool))})
    estimate = common.check_memory(cfg, "ppo", source)
    policy = models.load_causal_lm(cfg, source, pc.method, pc.lora, tok)
    trainable, total = models.trainable_parameters(policy)  # before a reference adapter joins the policy
    reference, ref_adapter, ref_kind = ppo_models.reference(source, policy, pc)
    reward_model = rewards.load_reward_model(rm_path)
    rewards.check_pad(reward_model, tok.tokenizer.pad_token_id, rm_path, "ppo")
    if not getattr(reward_model, "is_loaded_in_4bit", False):  # a QLoRA reward model is placed at load
        reward_model.to(accelerator.device)
    value = rollout.ValueModel(ppo_models.value_classifier(cfg, value_path, pc))
    for m in (policy, value, reward_model, reference):
        if m is not None:
            m.eval()  # dropout off everywhere: rollout and update log-probs must agree (N+ detail)
    model = rollout.PolicyAndValue(policy, value)
    if accelerator.is_main_process:
        held = disk.checkpoints_held(pc.save_total_limit, pc.steps // pc.save_steps, keep_best=True)
        disk.check_free_space(out, disk.stage_bytes(model, checkpoints=held), f"the weights and {held} checkpoints")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=pc.learning_rate, eps=1e-5)
    model, optimizer = accelerator.prepare(model, optimizer)
    if reference is not None and not getattr(reference, "is_loaded_in_4bit", False):  # 4-bit: placed at load
        reference.to(accelerator.device)
    resident_mb = models.weights_mb(policy, reference, reward_model, value)  # the peak's rest: the loop's own
    loop = Loop(cfg, pc, accelerator, model, optimizer, reference, reward_model, tok, queries, out, ptx,
                ref_adapter=ref_adapter, autocast=ppo_models.autocast_dtype(cfg, pc))
    if last_checkpoint:
        loop.load(last_checkpoint)

    # 4. train
    loop.train()
    if pc.report_to:
        accelerator.end_training()

    # 5. save the policy, re-open, manifest
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return out
    policy = accelerator.unwrap_model(model).policy
    if ref_adapter is not None:  # the reference's copy is not part of what PPO trained
        policy.delete_adapter(ref_adapter)
    policy.save_pretrained(str(out), safe_serialization=True)
    common.save_extras(policy, out, cfg, tok, pc.method)
    metrics = loop.summary_metrics()
    metrics.update({
        "prompts": len(queries),
        "prompts_dropped_too_long": dropped,
        "wall_time_s": round(time.time() - t0, 2),
        "peak_memory_mb": round(peak_memory_mb(), 1),
        "weights_mb": round(resident_mb, 1),
        "processes": accelerator.num_processes,
        "distribution": processes,
        # the trained weights' dtype (float32 master weights in a full bf16 run) and the forwards' autocast
        "precision": {"weights": str(next(p for p in policy.parameters() if p.requires_grad).dtype).removeprefix(
            "torch."), "autocast": str(loop.autocast).removeprefix("torch.") if loop.autocast else "no"},
        "memory_estimate_mb": common.estimate_mb(estimate),
        "first_update": loop.first_ratio,  # None when resumed past it
        # one per rollout (generation and the scoring forwards) + each training pass (and its ptx batch)
        "train_sequences": pc.steps * pc.batch_size * accelerator.num_processes
        * (1 + pc.ppo_epochs * (2 if pc.ptx_coef > 0 else 1)),
    })
    common.write_manifest(
        out, "ppo", cfg, tok, parent=source, key=key, started=started,
        method=pc.method,
        reference=ref_kind,
        reward_model={"path": rm_path, "accuracy": rm_accuracy, **(lineage.parent_record(rm_path) or {})},
        value_model_init=value_path,
        adapter_base=common.adapter_base_of(source, pc.method),
        data=data_record,
        trainable_parameters=trainable,
        total_parameters=total,
        metrics=metrics,
        resumed_from=str(last_checkpoint) if last_checkpoint else None,
    )
    summary("ppo", {
        "method": f"{pc.method} ({trainable:,} of {total:,} policy parameters trained)",
        "reference": ref_kind,
        "reward model": f"{rm_path} (accuracy {fmt(rm_accuracy)})",
        "iterations": metrics["steps"],
        "score (first → last)": f"{fmt(metrics['score_first'])} → {fmt(metrics['score_last'])}",
        "KL per response (last)": metrics["kl_last"],
        "responses that ended (first → last)": f"{fmt(metrics['ended_first'])} → {fmt(metrics['ended_last'])}",
        "first update": "ratio 1 (policy and rollout agree)" if loop.first_ratio_checked else "resumed",
        "rollout (generation) / update time": f"{metrics['rollout_s']:.1f} s ({metrics['generate_s']:.1f} s) / "
        f"{metrics['update_s']:.1f} s",
        "generated tokens/s": metrics["rollout_tokens_per_s"],
        "processes": metrics["distribution"],
        "precision": f"{metrics['precision']['weights']} weights, autocast {metrics['precision']['autocast']}",
        "wall time": f"{metrics['wall_time_s']:.1f} s",
        "peak memory": common.memory_line(metrics),
        "output": str(out),
    })
    common.finished(out)
    return out


def _tokenize_prompts(ds, tokenizer, max_len: int) -> tuple[list[list[int]], int]:
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in ds["prompt"]]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    kept = [x for x in ids if len(x) <= max_len]
    if not kept:
        raise PosttrainError(f"every prompt is longer than ppo.max_prompt_length {max_len} tokens",
                             fix="raise ppo.max_prompt_length")
    return kept, len(ids) - len(kept)


def _ptx_examples(cfg: Config, pc: PPOStageConfig, tok) -> list | None:
    """SFT conversations for PPO-ptx, tokenized with their assistant-token labels."""
    if pc.ptx_coef == 0:
        return None
    from posttrain.rl import rollout

    train, _, _ = data.stage_data(cfg, pc.ptx_data, tok)
    return rollout.sft_examples(tok.tokenizer, train["messages"], cfg.sft.training.get("max_length", 1024))


class Loop(ppo_checks.Checks):
    """The PPO iterations, their checkpoints and their logs."""

    def __init__(self, cfg, pc: PPOStageConfig, accelerator, model, optimizer, reference, reward_model, tok,
                 queries: list[list[int]], out: Path, ptx: list | None = None, ref_adapter: str | None = None,
                 autocast=None):
        from posttrain.rl import core, rollout

        self.cfg, self.pc, self.acc = cfg, pc, accelerator
        self.model, self.optimizer, self.reference, self.reward_model = model, optimizer, reference, reward_model
        self.tok, self.queries, self.out, self.ptx = tok, queries, out, ptx
        self.ref_adapter = ref_adapter  # the policy's frozen copy of its starting adapter (ppo_models.reference)
        self.autocast = autocast  # every policy/value forward's dtype, or None (ppo_models.autocast_dtype)
        self.kl = core.KLController(pc.kl_coef, pc.kl_target, pc.kl_horizon)
        self.suffix = rollout.template_suffix(tok.tokenizer, tok.eot_id)
        self.start, self.history, self.norm = 0, [], None
        self.best = (None, None)  # (checkpoint, its iteration's mean reward): kept by rotation
        self.first_ratio_checked = False
        self.first_ratio: dict | None = None  # the first mini-batch's log-ratio statistics (check_first_ratio)
        self.rollout_s = self.update_s = self.generate_s = self.tokens = 0.0

    def precision(self):
        """The autocast context of every policy and value forward (a no-op without one)."""
        import contextlib

        import torch

        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.acc.device.type, dtype=self.autocast)

    # -- data order: a permutation per pass over the prompts, from the seed alone (resumable)
    def prompts_for(self, it: int) -> list[list[int]]:
        import torch

        per_iter = self.pc.batch_size * self.acc.num_processes
        first = it * per_iter + self.acc.process_index * self.pc.batch_size
        out = []
        for k in range(first, first + self.pc.batch_size):
            epoch, pos = divmod(k, len(self.queries))
            perm = torch.randperm(len(self.queries), generator=torch.Generator().manual_seed(self.cfg.seed + epoch))
            out.append(self.queries[perm[pos]])
        return out

    def train(self) -> None:
        from posttrain.callbacks import StopSignal

        stop = StopSignal()
        stop.install()
        try:
            self._train(stop)
        finally:
            stop.restore()

    def _train(self, stop) -> None:
        for it in range(self.start, self.pc.steps):
            stats, samples = self.step(it)
            self.history.append({"step": it + 1, **stats})
            if self.acc.is_main_process:
                with (self.out / "metrics.jsonl").open("a") as f:
                    f.write(json.dumps(self.history[-1]) + "\n")
                if self.pc.report_to:
                    self.acc.log(stats, step=it + 1)
                if (it + 1) % self.pc.logging_steps == 0 or it == 0:
                    console.print(f"ppo {it + 1}/{self.pc.steps}  " + "  ".join(
                        f"{k} {fmt(round(v, 4))}" for k, v in stats.items() if k in LOGGED))
                if it == 0 or (it + 1) % self.pc.sample_every == 0:
                    self.show_samples(it + 1, samples)
            self.check_health(it + 1, stats, samples)
            stopping = launch.anywhere(self.acc, stop.requested)  # every process stops at the same iteration
            if (it + 1) % self.pc.save_steps == 0 and it + 1 < self.pc.steps or stopping:
                self.save(it + 1)
            if stopping:
                stop.signum = stop.signum or signal.SIGTERM  # a process that got no signal itself
                stop.raise_if_stopped(it + 1, self.out / checkpoints.CHECKPOINTS / f"checkpoint-{it + 1}")

    def step(self, it: int) -> tuple[dict, list]:
        import torch

        from posttrain.rl import core, rollout

        pc, acc, tok = self.pc, self.acc, self.tok
        unwrapped = acc.unwrap_model(self.model)
        pad, eot = tok.tokenizer.pad_token_id, tok.eot_id
        reduce = launch.sum_across(acc)

        # rollout: sample, then log-probs, reference log-probs, values and scores without gradients
        t0 = time.time()
        q, qm = rollout.left_pad(self.prompts_for(it), pad)
        with self.precision():  # every policy forward in the same precision (ppo_models.autocast_dtype)
            batch = rollout.sample(unwrapped.policy, q.to(acc.device), qm.to(acc.device), eot_id=eot, pad_id=pad,
                                   temperature=pc.temperature, top_p=pc.top_p, max_new_tokens=pc.max_new_tokens)
        mask = batch.mask.float()
        self.generate_s += time.time() - t0
        self.tokens += launch.mean_across(mask.sum(1), reduce) * pc.batch_size * acc.num_processes
        micro = pc.mini_batch_size // pc.gradient_accumulation_steps
        with torch.no_grad():
            old_logp, entropy, old_values, ref_logp = self.rollout_forwards(unwrapped, batch, micro)
            raw = torch.tensor(rewards.score_ids(self.reward_model, rollout.reward_sequences(batch, self.suffix), pad,
                                                 batch_size=micro), device=acc.device)
            scores = self.normalize(raw, reduce)
            if pc.missing_eot_penalty is not None:
                scores = torch.where(batch.ended, scores, torch.full_like(scores, pc.missing_eot_penalty))
            gap = self.sampler_gap(batch, old_logp, mask, reduce)
            self.check_sampler(it + 1, gap)  # before any update on these samples
            token_rewards, kl = core.per_token_rewards(scores, old_logp, ref_logp, mask, self.kl.value)
            if it == self.start == 0:
                self.check_reference(kl, launch.max_across(acc))
            advantages, returns = core.gae(token_rewards, old_values, mask, pc.gamma, pc.lam)
            advantages = core.masked_whiten(advantages, mask, reduce)
        self.rollout_s += time.time() - t0

        # updates: ppo_epochs passes over shuffled minibatches, gradient accumulation inside each
        t0 = time.time()
        update = self.update(it, batch, old_logp, old_values, advantages, returns)
        if it == self.start:
            from posttrain.callbacks import check_processes_agree

            check_processes_agree(self.model, f"after PPO iteration {it + 1}'s update")
        self.update_s += time.time() - t0

        n = float(pc.batch_size)
        seq_kl = kl.sum(1)
        stats = {
            "score": launch.mean_across(raw, reduce),
            "reward": launch.mean_across(token_rewards.sum(1), reduce),
            "kl": launch.mean_across(seq_kl, reduce),
            "kl_coef": self.kl.value,
            "entropy": core.masked_mean(entropy, mask, reduce).item(),
            "response_length": launch.mean_across(mask.sum(1), reduce),
            "ended": launch.mean_across(batch.ended.float(), reduce),
            "explained_variance": core.explained_variance(old_values, returns, mask, reduce).item(),
            **gap,
            **update,
        }
        self.kl.update(stats["kl"], int(n * acc.num_processes))
        texts = tok.tokenizer.batch_decode([r[m.bool()] for r, m in zip(batch.responses, batch.mask, strict=True)],
                                           skip_special_tokens=True)
        prompts = tok.tokenizer.batch_decode([x[k.bool()] for x, k in zip(batch.queries, batch.query_mask,
                                                                           strict=True)], skip_special_tokens=True)
        return stats, list(zip(prompts, texts, raw.tolist(), strict=True))

    def rollout_forwards(self, unwrapped, batch, rows: int):
        """The rollout's forwards, without gradients: the policy's log-probs and entropy, the
        values and the reference's log-probs, `rows` sequences at a time (the update's micro-batch:
        the rollout's activations are no larger than the update's; the widths stay the batch's, so
        the numbers are those of one forward over the whole batch)."""
        import torch

        from posttrain.rl import rollout

        pc, parts = self.pc, []
        for idx in torch.arange(batch.responses.shape[0], device=batch.responses.device).split(rows):
            sub = batch.select(idx)
            with self.precision():
                logp, entropy, values, _ = unwrapped(sub, pc.temperature)
                if self.reference is not None:
                    ref_logp, _ = rollout.response_logprobs(self.reference, sub, pc.temperature)
                else:
                    with rollout.as_reference(unwrapped.policy, self.ref_adapter):
                        ref_logp, _ = rollout.response_logprobs(unwrapped.policy, sub, pc.temperature)
            parts.append((logp, entropy, values, ref_logp))
        return tuple(torch.cat(x) for x in zip(*parts, strict=True))

    def update(self, it, batch, old_logp, old_values, advantages, returns) -> dict:
        import torch

        from posttrain.rl import core

        pc, acc = self.pc, self.acc
        mask = batch.mask.float()
        micro = pc.mini_batch_size // pc.gradient_accumulation_steps
        totals: dict[str, list[float]] = {}
        gen = torch.Generator().manual_seed(self.cfg.seed * 100003 + it)
        reduce = launch.sum_across(acc)
        for epoch in range(pc.ppo_epochs):
            order = torch.randperm(pc.batch_size, generator=gen).to(acc.device)
            for start in range(0, pc.batch_size, pc.mini_batch_size):
                # The policy and value losses are means over the real tokens of the whole mini-batch
                # on all processes: each micro-batch adds its share (its token sum over that count),
                # so gradient accumulation and an uneven split of tokens between processes give
                # the update one process would make on the whole mini-batch.
                count = reduce(mask[order[start:start + pc.mini_batch_size]].sum()) / acc.num_processes
                parts: dict[str, float] = {}
                first = it == self.start == 0 and epoch == 0 and start == 0  # before any update
                ratio = torch.zeros(3, device=acc.device)  # Σ|log-ratio|, Σ log-ratio, max |ratio - 1|
                for m in range(start, start + pc.mini_batch_size, micro):
                    idx = order[m:m + micro]
                    sub, sm = batch.select(idx), mask[idx]
                    with self.precision():
                        logp, _, values, ptx_loss = self.model(sub, pc.temperature, self.ptx_batch(gen, len(idx)))
                    pg_loss, pg = core.policy_loss(logp, old_logp[idx], advantages[idx], sm, pc.cliprange, count)
                    vf_loss, vf = core.value_loss(values, old_values[idx], returns[idx], sm, pc.cliprange_value, count)
                    loss = pg_loss + pc.vf_coef * vf_loss
                    if ptx_loss is not None:  # a mean over its own micro-batch of SFT conversations
                        loss = loss + pc.ptx_coef * ptx_loss / pc.gradient_accumulation_steps
                        totals.setdefault("ptx_loss", []).append(float(ptx_loss.detach()))
                    if not torch.isfinite(loss):
                        raise PosttrainError(f"the PPO loss is {loss.item()} at iteration {it + 1}",
                                             fix="lower ppo.learning_rate; check the reward model's scores")
                    if first:
                        log_ratio = (logp.detach() - old_logp[idx]) * sm
                        ratio[:2] += torch.stack([log_ratio.abs().sum(), log_ratio.sum()])
                        ratio[2] = torch.maximum(ratio[2], pg["ratio_max_dev"])
                    acc.backward(loss)
                    for k, v in {"policy_loss": pg_loss, "value_loss": vf_loss}.items():
                        parts[k] = parts.get(k, 0.0) + float(v.detach())
                    for k, v in {**pg, **vf}.items():
                        totals.setdefault(k, []).append(float(v.detach()))
                for k, v in parts.items():  # the mini-batch's loss: the sum of its micro-batches' shares
                    totals.setdefault(k, []).append(v)
                if first:
                    self.check_first_ratio(ratio, count * acc.num_processes, reduce, launch.max_across(acc))
                grad_norm = acc.clip_grad_norm_(self.model.parameters(), pc.max_grad_norm)
                totals.setdefault("grad_norm", []).append(float(grad_norm))
                self.optimizer.step()
                self.optimizer.zero_grad()
        out = {k: sum(v) / len(v) for k, v in totals.items() if k != "ratio_max_dev"}
        return {k: launch.mean_over_processes(v, acc) for k, v in out.items()}

    def ptx_batch(self, gen, n: int):
        """n SFT conversations for the ptx term, drawn with the update's generator (resumable)."""
        if self.ptx is None:
            return None
        import torch

        from posttrain.rl import rollout

        # drawn for the micro-batch of every process, this process taking its share: the processes
        # train on different conversations, together the ones one process would draw
        world, rank = self.acc.num_processes, self.acc.process_index
        picks = torch.randint(len(self.ptx), (n * world,), generator=gen)[rank * n:(rank + 1) * n].tolist()
        ids, attn, labels = rollout.right_pad_sft([self.ptx[i] for i in picks], self.tok.tokenizer.pad_token_id)
        return ids.to(self.acc.device), attn.to(self.acc.device), labels.to(self.acc.device)

    def normalize(self, raw, reduce):
        """OpenAI's reward normalisation (optional): constants from the first rollout, kept."""
        if not self.pc.normalize_reward:
            return raw
        if self.norm is None:
            import torch

            ones = torch.ones_like(raw)
            total = reduce(torch.stack([raw.sum(), (raw * raw).sum(), ones.sum()]))
            mean = (total[0] / total[2]).item()
            std = math.sqrt(max((total[1] / total[2]).item() - mean * mean, 1e-8))
            self.norm = (mean, std)
        return (raw - self.norm[0]) / self.norm[1]

    def show_samples(self, it: int, samples: list) -> None:
        with (self.out / "samples.jsonl").open("a") as f:
            for p, r, s in samples[:SAMPLES_SHOWN]:
                console.print(f"  sample @{it}: {p.strip()[-60:]!r} → {r!r} (score {s:+.3f})", soft_wrap=True)
                f.write(json.dumps({"step": it, "prompt": p, "response": r, "score": s}) + "\n")

    def summary_metrics(self) -> dict:
        first, last = (self.history[0], self.history[-1]) if self.history else ({}, {})
        return {
            "steps": self.pc.steps,
            "score_first": first.get("score"), "score_last": last.get("score"),
            "kl_last": last.get("kl"), "kl_coef_last": last.get("kl_coef"),
            "ended_first": first.get("ended"), "ended_last": last.get("ended"),
            "entropy_last": last.get("entropy"),
            "explained_variance_last": last.get("explained_variance"),
            "rollout_s": round(self.rollout_s, 2), "generate_s": round(self.generate_s, 2),
            "update_s": round(self.update_s, 2), "response_tokens": int(self.tokens),
            "rollout_tokens_per_s": round(self.tokens / self.generate_s, 1) if self.generate_s else None,
            "reward_normalization": self.norm,
        }

    # -- checkpoints (stages/checkpoints.py holds the format)
    def save(self, it: int) -> None:
        state = {"global_step": it, "kl_coef": self.kl.value, "reward_normalization": self.norm,
                 "rollout_s": self.rollout_s, "update_s": self.update_s, "generate_s": self.generate_s,
                 "tokens": self.tokens, "log_history": self.history}
        self.best = checkpoints.save_ppo(self.acc, self.model, self.optimizer, self.out, it, state,
                                         reward=self.history[-1]["reward"], best=self.best,
                                         limit=self.pc.save_total_limit)

    def load(self, d: Path) -> None:
        state = checkpoints.load_ppo(self.acc, self.model, self.optimizer, d)
        self.start, self.kl.value = state["global_step"], state["kl_coef"]
        self.norm = tuple(state["reward_normalization"]) if state["reward_normalization"] else None
        self.best = (state.get("best_model_checkpoint"), state.get("best_metric"))
        self.rollout_s, self.update_s = state["rollout_s"], state["update_s"]
        self.generate_s, self.tokens = state.get("generate_s", 0.0), state.get("tokens", 0.0)
        self.history = state["log_history"]
        if self.acc.is_main_process:  # lines written after this checkpoint by the interrupted run
            for name in ("metrics.jsonl", "samples.jsonl"):
                checkpoints.truncate_after(self.out / name, self.start)
        console.print(f"ppo: resuming from {d} (iteration {self.start})")


def key_metrics(m: dict) -> dict:
    """The chain summary's numbers for this stage (chain.key_metrics)."""
    metrics = m.get("metrics", {})
    return {"score": f"{fmt(metrics.get('score_first'))} → {fmt(metrics.get('score_last'))}",
            "kl": metrics.get("kl_last"), "steps": metrics.get("steps")}


LOGGED = ("score", "kl", "entropy", "clipfrac", "approx_kl", "value_loss", "explained_variance", "response_length",
          "ended", "ptx_loss", "sampler_kl")
