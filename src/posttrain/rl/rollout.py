"""Rollouts for PPO: prompts → left-padded queries, sampled responses cut at the end-of-turn token,
and the forward pass that gives per-token log-probs and values of prompt+response.

Shapes: queries [B, Lq] left-padded; responses [B, Lr] right-padded; `mask` [B, Lr] is 1 on
real response tokens up to and including the end-of-turn token.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from posttrain import models
from posttrain.rl import logprobs


@dataclass
class Batch:
    queries: torch.Tensor
    query_mask: torch.Tensor
    responses: torch.Tensor
    mask: torch.Tensor
    ended: torch.Tensor  # [B] bool: the response emitted the end-of-turn token
    # [B, Lr] log-prob of each sampled token under the distribution generate() sampled it from
    # (SampledLogprobs), or None (greedy, or a batch built without sampling)
    sampled_logp: torch.Tensor | None = None

    def select(self, idx: torch.Tensor) -> Batch:
        picked = None if self.sampled_logp is None else self.sampled_logp[idx]
        return Batch(self.queries[idx], self.query_mask[idx], self.responses[idx], self.mask[idx], self.ended[idx],
                     picked)


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(sequences):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids, mask


def cut_at_end_of_turn(generated: torch.Tensor, eot_id: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                                     torch.Tensor]:
    """Everything after the first end-of-turn token becomes padding. Returns (tokens, mask, ended)."""
    is_eot = generated == eot_id
    ended = is_eot.any(1)
    first = torch.where(ended, is_eot.float().argmax(1), torch.full_like(ended, generated.shape[1], dtype=torch.long))
    positions = torch.arange(generated.shape[1], device=generated.device)[None, :]
    mask = (positions <= first[:, None]).long()
    return torch.where(mask.bool(), generated, torch.full_like(generated, pad_id)), mask, ended


class SampledLogprobs:
    """A logits processor for generate() that records the log-prob of each sampled token under the
    distribution it was sampled from: the log-softmax of the scores after every processor before
    it, read at the next step (when the token is in input_ids) and, for the last token, by `finish`.

    PPO computes log π(token) from a forward pass at the sampling temperature; generate() samples
    from whatever its processors make of the logits. They must be the same distribution, or every
    ratio and KL is of another policy: a repetition_penalty of 1.05 left in a checkpoint's
    generation_config.json moves the sampled tokens' log-probs by up to 0.19 nats (SmolLM2), and
    no_repeat_ngram_size, bad words or suppressed tokens renormalise the rest. `sample` places this
    processor after the temperature and before top-p, whose truncation PPO deliberately leaves out
    of its log-probs (as the reference implementations do), so without a leak the two agree to
    rounding. One step of [B, vocabulary] log-probs is held at a time."""

    def __init__(self, prompt_width: int):
        self.prompt_width, self.last, self.picked = prompt_width, None, []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self._take(input_ids)
        self.last = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def _take(self, ids: torch.Tensor) -> None:
        if self.last is not None and ids.shape[1] > self.prompt_width:
            self.picked.append(self.last.gather(1, ids[:, -1:]).squeeze(1))

    def finish(self, sequences: torch.Tensor) -> torch.Tensor:
        """[B, generated] log-probs, given generate()'s output (whose last token has no next step)."""
        self._take(sequences)
        self.last = None
        return torch.stack(self.picked, 1)


@torch.no_grad()
def sample(policy, queries: torch.Tensor, query_mask: torch.Tensor, *, eot_id: int, pad_id: int,
           temperature: float, top_p: float, max_new_tokens: int) -> Batch:
    """Responses to left-padded queries, cut at the end-of-turn token; greedy when temperature is 0.
    Sampling records each token's log-prob under the distribution it was drawn from (SampledLogprobs):
    temperature and top-p are applied as processors around that record, so generate() itself adds none."""
    recorder = None
    if temperature > 0:
        from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

        recorder = SampledLogprobs(queries.shape[1])
        warpers = [TemperatureLogitsWarper(temperature), recorder] + ([TopPLogitsWarper(top_p)] if top_p < 1 else [])
        decoding = {"do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0,
                    "logits_processor": LogitsProcessorList(warpers)}
    else:
        decoding = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    with models.own_sampling(policy):  # none of the checkpoint's generation_config.json sampling settings
        out = policy.generate(
            input_ids=queries, attention_mask=query_mask, **decoding,
            max_new_tokens=max_new_tokens, eos_token_id=eot_id, pad_token_id=pad_id, use_cache=True,
        )
    generated = out[:, queries.shape[1]:]
    sampled_logp = recorder.finish(out) if recorder is not None and generated.shape[1] > 0 else None
    if generated.shape[1] == 0:
        generated = torch.full((queries.shape[0], 1), pad_id, dtype=torch.long, device=queries.device)
    responses, mask, ended = cut_at_end_of_turn(generated, eot_id, pad_id)
    if sampled_logp is not None:  # padding after end-of-turn: 0, not a processor's -inf (or NaN)
        sampled_logp = torch.where(mask.bool(), sampled_logp, torch.zeros_like(sampled_logp))
    return Batch(queries, query_mask, responses, mask, ended, sampled_logp)


def _inputs(batch: Batch) -> dict:
    ids = torch.cat([batch.queries, batch.responses], 1)
    attn = torch.cat([batch.query_mask, batch.mask], 1)
    positions = (attn.cumsum(1) - 1).clamp(min=0)  # left padding: real tokens count from 0
    return {"input_ids": ids, "attention_mask": attn, "position_ids": positions, "use_cache": False}


def response_hidden(model, batch: Batch) -> torch.Tensor:
    """The causal LM's last hidden states at the positions that predict each response token (the
    position before it), [B, Lr, hidden]: the logits come from these a chunk at a time (rl/logprobs.py)."""
    hidden = logprobs.hidden_states(model, **_inputs(batch))
    return hidden[:, batch.queries.shape[1] - 1: -1]


def response_logprobs(model, batch: Batch, temperature: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of each response token, [B, Lr], never holding more than a chunk of full-vocabulary
    logits, and without gradients (the rollout) their entropy, [B, Lr]. With gradients (the update)
    the entropy is None: no loss uses it, and computing it would keep a second vocabulary-wide
    graph alive through backward."""
    return logprobs.token_logprobs(model, response_hidden(model, batch), batch.responses, temperature,
                                   entropy=not torch.is_grad_enabled())


class ValueModel(nn.Module):
    """A value per token from a sequence classifier (initialised from the reward model): its
    backbone's hidden states through its one-output `score` head, at every position."""

    def __init__(self, classifier):
        super().__init__()
        self.classifier = classifier

    def _parts(self):
        inner = self.classifier
        if hasattr(inner, "get_base_model"):  # PEFT: LoRA layers live inside the base model's modules
            inner = inner.get_base_model()
        return getattr(inner, inner.base_model_prefix), inner.score

    def forward(self, batch: Batch) -> torch.Tensor:
        body, head = self._parts()
        inputs = _inputs(batch)
        hidden = body(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                      position_ids=inputs["position_ids"], use_cache=False).last_hidden_state
        values = head(hidden).squeeze(-1).float()
        return values[:, batch.queries.shape[1] - 1: -1]


class PolicyAndValue(nn.Module):
    """The two trained models as one module: one optimizer, one DDP wrapper, one checkpoint."""

    def __init__(self, policy, value: ValueModel):
        super().__init__()
        self.policy = policy
        self.value = value

    def forward(self, batch: Batch, temperature: float, ptx: tuple | None = None):
        """Response log-probs, entropy (None with gradients) and values; with `ptx` = (input_ids,
        attention_mask, labels) also the SFT loss on those conversations (inside forward, so DDP syncs
        its gradients)."""
        logp, entropy = response_logprobs(self.policy, batch, temperature)
        ptx_loss = None
        if ptx is not None:
            ids, attn, labels = ptx
            hidden = logprobs.hidden_states(self.policy, input_ids=ids, attention_mask=attn, use_cache=False)
            targets = labels[:, 1:]
            taught = targets != -100  # the cross-entropy over assistant tokens only: the LM head sees just those
            ptx_loss = -logprobs.token_logprobs(self.policy, hidden[:, :-1][taught], targets[taught])[0].mean()
        return logp, entropy, self.value(batch), ptx_loss


def sft_examples(tokenizer, conversations: list[list[dict]], max_length: int) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per conversation: labels are -100 outside assistant tokens (PPO-ptx)."""
    out = []
    for msgs in conversations:
        r = tokenizer.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids = list(r["input_ids"])[:max_length]
        out.append((ids, [t if k else -100 for t, k in zip(ids, r["assistant_masks"][:max_length], strict=True)]))
    return out


def right_pad_sft(examples: list[tuple[list[int], list[int]]], pad_id: int):
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    attn = torch.zeros_like(ids)
    for i, (x, y) in enumerate(examples):
        ids[i, :len(x)], labels[i, :len(y)], attn[i, :len(x)] = torch.tensor(x), torch.tensor(y), 1
    return ids, attn, labels


def reward_sequences(batch: Batch, suffix: list[int]) -> list[list[int]]:
    """What the reward model reads: the prompt, the response through end-of-turn, and what the chat
    template writes after an assistant turn (so it sees text rendered as in its training pairs)."""
    out = []
    for q, qm, r, m, ended in zip(batch.queries.tolist(), batch.query_mask.tolist(), batch.responses.tolist(),
                                  batch.mask.tolist(), batch.ended.tolist(), strict=True):
        seq = [t for t, k in zip(q, qm, strict=True) if k] + [t for t, k in zip(r, m, strict=True) if k]
        out.append(seq + (suffix if ended else []))
    return out


def template_suffix(tokenizer, eot_id: int) -> list[int]:
    """Tokens the chat template writes after the end-of-turn token of an assistant message."""
    msgs = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    text = tokenizer.apply_chat_template(msgs, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    last = len(ids) - 1 - ids[::-1].index(eot_id)
    return ids[last + 1:]


@contextmanager
def as_reference(policy, adapter: str | None) -> Iterator[None]:
    """A LoRA policy computing as its reference: with `adapter` (a frozen copy of the adapter it
    started from) active in place of its own, or, without one, with its new adapter disabled."""
    if adapter is None:
        with policy.disable_adapter():
            yield
        return
    trained = policy.active_adapter
    policy.set_adapter(adapter, inference_mode=True)
    try:
        yield
    finally:
        policy.set_adapter(trained)  # active and trainable again (the reference copy stays frozen)
