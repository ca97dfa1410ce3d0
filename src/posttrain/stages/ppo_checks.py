"""What stops a PPO run before it trains on something wrong, as a base class of ppo.Loop: the
sampled tokens must come from the distribution PPO computes (`sampler_gap`, `check_sampler`), the
reference must be the starting policy (`check_reference`), the first update's probability ratio
must be 1 (`check_first_ratio`), and the health stops after every iteration (`check_health`: KL
cap, negative KL, entropy collapse, NaN, identical responses). The thresholds are here, with
the measurements behind them (docs/benchmarks.md)."""

from __future__ import annotations

import math

from posttrain import models
from posttrain.errors import PosttrainError

FIRST_RATIO_TOLERANCE = 1e-3  # float32: max |ratio - 1| allowed over the first mini-batch (before any update)
# Half precision: mean |log-ratio| per token allowed there (Loop.check_first_ratio). Measured on the
# demo SFT model (docs/benchmarks.md): 0 exactly on the CPU in bf16 without a fault; an update
# temperature off by x1.02 gives 1.4e-2 (not caught in half precision; float32's maximum catches
# it), x1.1 6.4e-2 (LoRA) / 7e-2 (full), x1.5 0.43. GPU kernels' batch-size noise is unmeasured
# (no GPU was lent); on SmolLM2 in bf16 even a cached generation and a full forward differ by only
# 0.043-0.050 per token, so the limit sits at that, not below it.
FIRST_RATIO_HALF = 5e-2
# How far the distribution generate() drew each response token from may be from the one PPO's
# forward computes (rollout.SampledLogprobs), per response token, from d = log π_sampled - log π_PPO:
# in float32 the mean |d| (rounding: <= 3e-6); in half precision the mean d, which estimates
# KL(sampler || PPO) >= 0, because |d| from rounding alone grows with depth (SmolLM2 in bf16: mean
# |d| 0.05 without any fault) while its signed mean stays near 0 (SmolLM2: |mean d| <= 3e-3).
# A repetition_penalty of 1.05 leaking from generation_config.json: mean |d| 0.04-0.05 (demo SFT
# model), 0.20-0.22 (SmolLM2); mean d 0.06-0.09 on SmolLM2. Measured on the CPU (docs/benchmarks.md).
SAMPLER_GAP = 1e-3  # float32: max mean |d|
SAMPLER_KL_HALF = 3e-2  # bfloat16/float16: max mean d


class Checks:
    """The checks of ppo.Loop. They read the loop's settings (`pc`, `cfg`) and record the first
    update's statistics (`first_ratio`, `first_ratio_checked`)."""

    pc: object
    cfg: object
    first_ratio: dict | None
    first_ratio_checked: bool

    def sampler_gap(self, batch, logp, mask, reduce) -> dict:
        """d = the log-prob generate() sampled each response token with - PPO's log-prob of it, as its
        mean |d| and mean d per token: 0 up to rounding when PPO computes the distribution it samples
        from (check_sampler). Nothing for a batch without recorded log-probs."""
        import torch

        from posttrain.rl import core

        if batch.sampled_logp is None:
            return {}
        d = torch.where(mask.bool(), batch.sampled_logp - logp, torch.zeros_like(logp))
        return {"sampler_gap": core.masked_mean(d.abs(), mask, reduce).item(),
                "sampler_kl": core.masked_mean(d, mask, reduce).item()}

    def check_sampler(self, it: int, stats: dict) -> None:
        from posttrain import numerics

        if "sampler_gap" not in stats:
            return
        if numerics.is_half(models.torch_dtype(self.cfg.model.dtype)):
            name, value, allowed = "on average (an estimated KL)", stats["sampler_kl"], SAMPLER_KL_HALF
        else:
            name, value, allowed = "on average (absolute)", stats["sampler_gap"], SAMPLER_GAP
        if value > allowed:
            raise PosttrainError(
                f"at iteration {it} the tokens were sampled from another distribution than the one PPO computes: their "
                f"log-probs differ by {value:.2e} nats per token {name}, over {allowed:g}; a generation setting "
                "(repetition_penalty, no_repeat_ngram_size, ...) or another model is changing what generate() samples",
                fix="report this as a bug, with the policy's generation_config.json")

    def check_reference(self, kl, reduce_max=None) -> None:
        """Before any update the policy is the starting model, so its KL to the reference is 0 on
        every sampled response (else the reference is some other model). The worst response over
        all processes (`reduce_max`), so every process stops, or none."""
        worst = kl.sum(1).abs().max()
        worst = float(reduce_max(worst) if reduce_max is not None else worst)
        if worst > FIRST_RATIO_TOLERANCE:
            raise PosttrainError(
                f"at the first rollout the policy's KL to the reference is {worst:.2e} nats on a response, not 0: "
                "the reference is not the model PPO starts from", fix="report this as a bug")

    def check_first_ratio(self, ratio, tokens, reduce, reduce_max) -> None:
        """Before any update the policy is the rollout policy: over the first mini-batch the
        probability ratio is 1 (else dropout, the temperature or the inputs differ between the
        rollout's forward and the update's). `ratio` holds this process's Σ|log-ratio|, Σ log-ratio
        and max |ratio - 1| over its micro-batches; `tokens` the mini-batch's real tokens on all;
        `reduce` sums over the processes and `reduce_max` takes their maximum, so every process
        reaches the same verdict (one stopping alone would leave the others waiting in a collective).

        The two forwards differ in batch size and in gradients, and GPU kernels in half precision
        are not batch-invariant, so there the per-token maximum is no test: half precision checks
        the mean |log-ratio| per token (FIRST_RATIO_HALF); float32 keeps the maximum."""
        from posttrain import numerics

        sums = reduce(ratio[:2].clone())
        mean_abs, mean = (sums / tokens.clamp(min=1)).tolist()
        worst = float(reduce_max(ratio[2].clone()))
        self.first_ratio = {"mean_abs_log_ratio": mean_abs, "mean_log_ratio": mean, "max_ratio_dev": worst}
        if numerics.is_half(models.torch_dtype(self.cfg.model.dtype)):
            value, allowed, what = mean_abs, FIRST_RATIO_HALF, "the mean |log-ratio| per token is"
        else:
            value, allowed, what = worst, FIRST_RATIO_TOLERANCE, "the probability ratio is off 1 by"
        if value > allowed:
            raise PosttrainError(
                f"at the first PPO update {what} {value:.2e} (allowed {allowed:g}): the rollout and the update "
                "compute different log-probs", fix="report this as a bug (dropout or temperature mismatch)")
        self.first_ratio_checked = True

    def check_health(self, it: int, stats: dict, samples: list) -> None:
        if self.pc.kl_cap is not None and stats["kl"] > self.pc.kl_cap:
            raise PosttrainError(
                f"KL to the reference reached {stats['kl']:.2f} nats per response at iteration {it}, over "
                f"ppo.kl_cap {self.pc.kl_cap}: the policy is running away from the starting model",
                fix="raise ppo.kl_coef (or set ppo.kl_target), lower ppo.learning_rate, or raise ppo.kl_cap")
        if self.pc.negative_kl_stop is not None and stats["kl"] < -self.pc.negative_kl_stop:
            raise PosttrainError(
                f"KL to the reference is {stats['kl']:.2f} nats per response at iteration {it}, below "
                f"-ppo.negative_kl_stop -{self.pc.negative_kl_stop}: estimated on the policy's own samples it cannot "
                "be negative beyond noise, so the responses were not sampled from the distribution PPO computes",
                fix="report this as a bug (sampling settings leaking into generation, or a reference on other inputs)")
        if self.pc.min_entropy is not None and stats["entropy"] < self.pc.min_entropy:
            raise PosttrainError(
                f"the policy's entropy fell to {stats['entropy']:.2g} nats per token at iteration {it}, below "
                f"ppo.min_entropy {self.pc.min_entropy}: sampling has become deterministic (entropy collapse)",
                fix="raise ppo.kl_coef or lower ppo.learning_rate; check the reward model for a trivial optimum")
        if not all(math.isfinite(v) for k, v in stats.items() if k != "explained_variance"):
            bad = [k for k, v in stats.items() if not math.isfinite(v) and k != "explained_variance"]
            raise PosttrainError(f"PPO statistics became NaN/inf at iteration {it}: {', '.join(bad)}",
                                 fix="lower ppo.learning_rate")
        texts = [s[1] for s in samples]
        if len(texts) > 1 and len(set(texts)) == 1 and len({s[0] for s in samples}) > 1:
            raise PosttrainError(
                f"generation collapsed at iteration {it}: every response is {texts[0]!r}",
                fix="raise ppo.kl_coef or lower ppo.learning_rate; check the reward model for a trivial optimum")
