"""PPO's arithmetic, written from the papers (see docs/ppo.md for the specification): per-token
rewards with a KL penalty, GAE, masked whitening, the clipped policy and value losses, explained
variance and the adaptive KL coefficient. Pure torch on [batch, response_tokens] tensors with a
0/1 mask of real response tokens (right padding); nothing here knows about models.

Every function is tested against numbers computed by hand (tests/rl/test_core.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Reduce = Callable[[torch.Tensor], torch.Tensor]  # sums a tensor over processes (identity on one)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def masked_mean(x: torch.Tensor, mask: torch.Tensor, reduce: Reduce = _identity) -> torch.Tensor:
    """Mean of x over mask == 1 (over all processes when `reduce` sums across them)."""
    total = reduce(torch.stack([(x * mask).sum(), mask.sum()]))
    return total[0] / total[1].clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, reduce: Reduce = _identity, shift_mean: bool = True,
                  eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the real tokens (all processes); padding stays 0."""
    total = reduce(torch.stack([(x * mask).sum(), (x * x * mask).sum(), mask.sum()]))
    n = total[2].clamp(min=1)
    mean = total[0] / n
    var = (total[1] / n - mean * mean).clamp(min=0)
    if total[2] > 1:  # unbiased, like the reference implementations
        var = var * total[2] / (total[2] - 1)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log π(token) for each position, with the logits divided by the sampling temperature (the
    same division in the rollout and every later pass, or the first ratio is not 1).
    The definition on whole logits; the pipeline computes it a chunk at a time (rl/logprobs.py)."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """-Σ π log π at each position (the same temperature); chunked in the pipeline (rl/logprobs.py)."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def per_token_rewards(scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                      kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """r_t = -β·(logp_t - ref_logp_t) on every response token, plus the score on the last real
    token. Returns (rewards, per-token KL), both zero on padding."""
    kl = (logp - ref_logp) * mask
    rewards = -kl_coef * kl
    last = (mask.sum(1).long() - 1).clamp(min=0)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last] += scores * (mask.sum(1) > 0)
    return rewards, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation, backwards over the response, with V = 0 after the last
    real token: δ_t = r_t + γV_{t+1} - V_t, A_t = δ_t + γλA_{t+1}. Returns (advantages, returns)."""
    values = values * mask
    rewards = rewards * mask
    steps = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    next_adv = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(steps)):
        next_value = values[:, t + 1] if t + 1 < steps else torch.zeros_like(values[:, 0])
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = (delta + gamma * lam * next_adv) * mask[:, t]
        advantages[:, t] = next_adv
    return advantages, (advantages + values) * mask


def token_sum_over(x: torch.Tensor, mask: torch.Tensor, count: torch.Tensor | float | None) -> torch.Tensor:
    """sum(x·mask) / count: the masked mean when count is None (mask.sum()). With several processes
    each passes count = the mini-batch's real tokens on all processes / the number of processes:
    averaging those per-process losses (and DDP averaging their gradients) then gives the mean over
    every token of the global mini-batch, as one process would compute it, however unevenly the
    tokens are split between processes."""
    if count is None:
        return masked_mean(x, mask)
    return (x * mask).sum() / torch.as_tensor(count, dtype=x.dtype, device=x.device).clamp(min=1e-8)


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                cliprange: float, count: torch.Tensor | float | None = None) -> tuple[torch.Tensor, dict]:
    """PPO's clipped surrogate: mean_t max(-A·ratio, -A·clip(ratio, 1-ε, 1+ε)) over real tokens
    (`count`: see token_sum_over)."""
    log_ratio = (logp - old_logp) * mask
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - cliprange, 1.0 + cliprange)
    loss = token_sum_over(torch.maximum(unclipped, clipped), mask, count)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": 0.5 * masked_mean(log_ratio ** 2, mask),
            "ratio_max_dev": ((ratio - 1).abs() * mask).max(),
        }
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               cliprange_value: float, count: torch.Tensor | float | None = None) -> tuple[torch.Tensor, dict]:
    """½·mean_t max((V - R)², (clip(V, V_old ± ε_v) - R)²) over real tokens (`count`: see token_sum_over)."""
    clipped = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    losses = torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    loss = 0.5 * token_sum_over(losses, mask, count)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean(((clipped - returns) ** 2 > (values - returns) ** 2).float(), mask)}
    return loss, stats


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                       reduce: Reduce = _identity) -> torch.Tensor:
    """1 - Var(R - V) / Var(R) over real tokens: 1 = the value model predicts the returns, ≤ 0 = no better than a
    constant."""
    def var(x):
        m = masked_mean(x, mask, reduce)
        return masked_mean((x - m) ** 2, mask, reduce)

    vr = var(returns)
    return 1 - var(returns - values) / vr if vr > 0 else torch.tensor(float("nan"))


class KLController:
    """β of the KL penalty: fixed, or adaptive (Ziegler et al. 2019) when a target is given:
    e = clip(KL / target - 1, -0.2, 0.2);  β ← β·(1 + e·n / horizon)."""

    def __init__(self, init: float, target: float | None = None, horizon: int = 10000):
        self.value, self.target, self.horizon = init, target, horizon

    def update(self, kl: float, n_samples: int) -> float:
        if self.target is not None:
            error = min(max(kl / self.target - 1, -0.2), 0.2)
            self.value *= 1 + error * n_samples / self.horizon
        return self.value
