"""The eval stage's metrics as plain functions of texts, token ids, scores and logits.

Kept apart from model loading and generation so each one is checked against hand-computed values
(tests/test_metrics.py). Texts and numbers in, numbers out; torch only where logits are involved.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in string.punctuation)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact(responses: Sequence[str], references: Sequence[str]) -> list[float]:
    return [float(r.strip() == ref.strip()) for r, ref in zip(responses, references, strict=True)]


def normalized(responses: Sequence[str], references: Sequence[str]) -> list[float]:
    return [float(normalize_answer(r) == normalize_answer(ref)) for r, ref in zip(responses, references, strict=True)]


def regex(pattern: str, responses: Sequence[str], references: Sequence[str]) -> list[float]:
    """With a group: the group's text in the response equals it in the reference (a response with no
    match scores 0). Without one: 1 when the pattern is found in the response."""
    rx = re.compile(pattern)
    if rx.groups == 0:
        return [float(rx.search(r) is not None) for r in responses]
    out = []
    for r, ref in zip(responses, references, strict=True):
        got, want = rx.search(r), rx.search(ref)
        out.append(float(got is not None and want is not None and got.group(1) == want.group(1)))
    return out


def distinct_n(sequences: Sequence[Sequence], n: int) -> float:
    """Distinct n-grams over all n-grams across the responses (Li et al. 2016): 1.0 when nothing
    repeats, near 0 for a model that says the same thing every time. NaN when there are none."""
    grams = [tuple(s[i:i + n]) for s in sequences for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else float("nan")


def win_rate(scores: Sequence[float], against: Sequence[float], tie: float = 1e-6) -> float:
    """Share of prompts where `scores` beats `against` (same prompts, in order); ties count half."""
    if len(scores) != len(against) or not scores:
        raise ValueError("win_rate needs two equally long, non-empty score lists")
    wins = [1.0 if a - b > tie else 0.5 if abs(a - b) <= tie else 0.0 for a, b in zip(scores, against, strict=True)]
    return sum(wins) / len(wins)


def preference_accuracy(chosen_logps: Sequence[float], rejected_logps: Sequence[float]) -> dict[str, float]:
    """Share of pairs with log p(chosen) > log p(rejected), and the mean margin (nats)."""
    margins = [c - r for c, r in zip(chosen_logps, rejected_logps, strict=True)]
    if not margins:
        raise ValueError("preference_accuracy needs at least one pair")
    return {"accuracy": sum(m > 0 for m in margins) / len(margins), "margin": sum(margins) / len(margins)}


def distribution(values: Sequence[float]) -> dict[str, float]:
    """Mean, standard deviation and quartiles of a list of numbers."""
    xs = sorted(values)
    if not xs:
        return {}
    n = len(xs)
    mean = sum(xs) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / n)

    def q(p: float) -> float:  # linear interpolation between closest ranks
        k = (n - 1) * p
        lo, hi = math.floor(k), math.ceil(k)
        return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)

    return {"mean": mean, "std": std, "min": xs[0], "q25": q(0.25), "median": q(0.5), "q75": q(0.75), "max": xs[-1]}


def masked_sums(values, mask) -> list[float]:
    """Per-row sum of `values` where `mask` is set ([B, T] each)."""
    return (values * mask).sum(-1).tolist()


def kl_per_position(logits_p, logits_q):
    """KL(p(·|context) || q(·|context)) over the whole vocabulary at each position: logits [..., V]
    (temperature 1) → [...]. The eval stage applies it a chunk of positions at a time (rl/logprobs.py)."""
    import torch

    logp = logits_p.float().log_softmax(-1)
    logq = logits_q.float().log_softmax(-1)
    p = logp.exp()
    # 0 · log 0 = 0: a token p rules out (-inf logit) adds nothing, instead of NaN
    return torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(-1)


def kl_per_sequence(logits_p, logits_q, mask) -> list[float]:
    """Σ over masked positions of KL(p(·|context) || q(·|context)), the full-distribution KL at each
    position, per sequence. logits [B, T, V] (temperature 1), mask [B, T]. Exact along the given
    token path, so it is defined for greedy responses too (a sampled k1 estimate would not be)."""
    return masked_sums(kl_per_position(logits_p, logits_q), mask)
