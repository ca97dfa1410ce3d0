"""Per-token log-probs, entropies and KLs without the whole [batch, tokens, vocabulary] logits.

Why: Gemma-3 has a 262,144-token vocabulary, so the fp32 logits of 8 sequences × 256 tokens take
2 GB per copy, and log_softmax, exp and their gradients make several copies: by far the largest
tensors of PPO and eval. Here the model's body runs once to give hidden states (B × T × hidden,
small), and the LM head runs on `CHUNK_TOKENS` positions at a time; each chunk's logits are
reduced to a number per position (log-prob, entropy, KL) and freed before the next chunk.
With gradients each chunk runs under activation checkpointing, so backward recomputes one
chunk's logits at a time instead of keeping them all. Same numbers, same gradients: only the
order in which positions are computed changes (tests/rl/test_logprobs.py checks both).

Callers also pick the positions first (the response, the assistant tokens), so prompt positions
never reach the LM head at all.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

# memory.CHUNK_TOKENS: positions whose full-vocabulary logits exist at once. One number, in the
# memory module whose estimate counts it, read at each call (a test, or a future config field,
# changes it there for both).
from posttrain import memory


def causal_lm(model):
    """The transformers model itself: under a PEFT wrapper, its base model (the LoRA layers live
    inside that model's modules, so they and `disable_adapter()` still apply)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def hidden_states(model, **inputs) -> torch.Tensor:
    """The last hidden states of a causal LM's body, [B, T, hidden]: what its forward feeds the LM head.
    The first call for a model checks that `logits_function` reproduces its forward (check_head)."""
    lm = causal_lm(model)
    body = getattr(lm, lm.base_model_prefix)
    hidden = body(**inputs).last_hidden_state
    if lm not in _checked:
        check_head(lm, inputs)
    return hidden


_checked: weakref.WeakSet = weakref.WeakSet()


def check_head(lm, inputs: dict) -> None:
    """logits_function(hidden) must be the model's own logits. It knows the final-logit transforms
    of the architectures transformers ships (soft-capping, logit_scale, logits_scaling); a model
    that changes its logits some other way (remote code, a new architecture) would otherwise get
    wrong log-probs in silence. Two short forwards of the first row's first positions (at most a
    chunk) in eval mode (no dropout), once per model."""
    from posttrain.errors import PosttrainError

    chunk = memory.CHUNK_TOKENS
    n = min(8, chunk) if chunk > 0 else 8  # no more vocabulary-wide logits than a chunk
    row = {k: v[:1, :n] if torch.is_tensor(v) and v.dim() == 2 else v for k, v in inputs.items()}
    body = getattr(lm, lm.base_model_prefix)
    was_training = lm.training
    lm.eval()
    try:
        with torch.no_grad():
            own = logits_function(lm)(body(**row).last_hidden_state).float()
            forward = lm(**row).logits.float()
    finally:
        lm.train(was_training)
    diff = (own - forward).abs().max().item()
    tolerance = (1e-4 if own.dtype == torch.float32 and forward.dtype == torch.float32 else 5e-2) \
        * max(1.0, forward.abs().max().item())
    if not diff <= tolerance:
        raise PosttrainError(
            f"{type(lm).__name__}: the logits posttrain computes from its hidden states differ from its forward's "
            f"(max |Δ| {diff:.3g}); this architecture transforms its logits in a way posttrain does not know",
            fix="report this as a bug with the model's architecture (posttrain.rl.logprobs.logits_function)")
    _checked.add(lm)


def logits_function(model) -> Callable[[torch.Tensor], torch.Tensor]:
    """hidden states → logits, as the model's forward computes them from its body's output: the LM
    head, then the final-logit transforms transformers' causal LMs apply (Gemma's soft-capping,
    Cohere's logit_scale, Granite's logits_scaling). tests/rl/test_logprobs.py checks it against
    model(...).logits for Llama and Gemma-3."""
    lm = causal_lm(model)
    head = lm.get_output_embeddings()
    config = lm.config.get_text_config()
    cap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(lm, "logit_scale", None)
    divide = getattr(config, "logits_scaling", None)

    def logits(hidden: torch.Tensor) -> torch.Tensor:
        out = head(hidden)
        if scale is not None:
            out = out * scale
        if divide is not None:
            out = out / divide
        if cap is not None:
            out = torch.tanh(out / cap) * cap
        return out

    return logits


def map_chunks(fn: Callable[..., tuple[torch.Tensor, ...]], rows: torch.Size, *tensors: torch.Tensor,
               chunk: int | None = None) -> tuple[torch.Tensor, ...]:
    """fn applied to `chunk` positions at a time. Each tensor's leading dimensions are `rows` (the
    positions, e.g. [B, T]); fn takes the tensors flattened to [n, ...] and returns per-position
    tensors [n]; the results come back shaped `rows`. chunk None: posttrain's CHUNK_TOKENS; 0: all
    at once. With gradients on, each chunk is checkpointed: backward reruns fn on that chunk."""
    chunk = memory.CHUNK_TOKENS if chunk is None else chunk
    n = rows.numel()
    flat = [t.reshape(n, *t.shape[len(rows):]) for t in tensors]
    step = chunk if chunk > 0 else max(n, 1)
    pieces = []
    for i in range(0, max(n, 1), step):  # an empty input still gives fn one (empty) call
        part = [t[i:i + step] for t in flat]
        if torch.is_grad_enabled():
            pieces.append(checkpoint(fn, *part, use_reentrant=False, preserve_rng_state=False))  # fn draws nothing
        else:
            pieces.append(fn(*part))
    return tuple(torch.cat(outs).reshape(rows) for outs in zip(*pieces, strict=True))


def token_logprobs(model, hidden: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, *,
                   entropy: bool = False, chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log π(target) at each position from the hidden states that predict it ([..., hidden] and
    [...]), with the logits divided by the sampling temperature, and the entropy of π there when
    asked (else None). The arithmetic of core.logprobs_from_logits and core.entropy_from_logits,
    one chunk of positions at a time."""
    logits = logits_function(model)

    def stats(h: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logp = torch.log_softmax(logits(h).float() / temperature, dim=-1)
        picked = logp.gather(-1, t.unsqueeze(-1)).squeeze(-1)
        return (picked, -(logp.exp() * logp).sum(-1)) if entropy else (picked,)

    out = map_chunks(stats, targets.shape, hidden, targets, chunk=chunk)
    return out[0], (out[1] if entropy else None)
