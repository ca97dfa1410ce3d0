"""Sampling settings a checkpoint ships in generation_config.json (repetition_penalty,
no_repeat_ngram_size, min_p, ...) must not reach the generation posttrain does while training or
evaluating: transformers fills every setting a generate() call leaves out from the model's
generation config, even when the call passes a whole GenerationConfig. models.own_sampling
empties it for the duration of the block (and puts it back for saving)."""

from __future__ import annotations

import pytest
import torch

from posttrain import models

LEAKY = {"no_repeat_ngram_size": 1, "repetition_penalty": 3.0}


@pytest.fixture
def leaky_model(tiny_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    for k, v in LEAKY.items():
        setattr(model.generation_config, k, v)
    return model


def _argmax_decode(model, ids, n):
    """Greedy decoding by hand: the distribution the model computes, nothing else."""
    with torch.no_grad():
        for _ in range(n):
            nxt = model(ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
    return ids


def _generate(model, ids, n):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, temperature=None,
                              top_p=None, top_k=None, max_new_tokens=n, min_new_tokens=n, eos_token_id=None,
                              pad_token_id=0)


def _ids(model):
    return torch.tensor([[5, 9, 11, 7]])


def test_checkpoint_sampling_settings_leak_without_the_guard(leaky_model):
    """Negative control: the leak is real with this model (else the next test proves nothing)."""
    ids = _ids(leaky_model)
    assert not torch.equal(_generate(leaky_model, ids, 24), _argmax_decode(leaky_model, ids, 24))


def test_own_sampling_generates_the_distribution_the_model_computes(leaky_model):
    ids = _ids(leaky_model)
    with models.own_sampling(leaky_model) as gc:
        assert gc.no_repeat_ngram_size is None or gc.no_repeat_ngram_size == 0
        assert torch.equal(_generate(leaky_model, ids, 24), _argmax_decode(leaky_model, ids, 24))
    # put back: the stage's saved generation_config.json keeps the parent's defaults
    assert leaky_model.generation_config.no_repeat_ngram_size == 1
    assert leaky_model.generation_config.repetition_penalty == 3.0


def test_own_sampling_reaches_through_a_peft_wrapper(leaky_model):
    from peft import LoraConfig, get_peft_model

    wrapped = get_peft_model(leaky_model, LoraConfig(r=2, target_modules=["q_proj"]))
    ids = _ids(leaky_model)
    with models.own_sampling(wrapped):
        assert torch.equal(_generate(wrapped, ids, 24), _argmax_decode(wrapped, ids, 24))
    assert wrapped.get_base_model().generation_config.repetition_penalty == 3.0


def test_ppo_rollout_samples_without_the_checkpoint_settings(leaky_model):
    """PPO's rollout (rl/rollout.sample, greedy here) gives the tokens the model's own argmax
    picks, although the checkpoint asks for no_repeat_ngram_size 1 and repetition_penalty 3."""
    from posttrain.rl import rollout

    ids = _ids(leaky_model)
    batch = rollout.sample(leaky_model, ids, torch.ones_like(ids), eot_id=10**6, pad_id=0, temperature=0.0,
                           top_p=1.0, max_new_tokens=24)
    want = _argmax_decode(leaky_model, ids, 24)[:, ids.shape[1]:]
    assert torch.equal(batch.responses[:, : want.shape[1]], want)


# ---------------------------------------------------------------------------------------------
# Issue 16 item 3: the sampler's log-prob of each token is recorded, and must be PPO's


def _sampled_and_computed(model, temperature: float, top_p: float, dtype=torch.float32):
    from posttrain.rl import rollout

    model = model.to(dtype)
    ids = torch.tensor([[5, 9, 11, 7], [0, 6, 8, 12]])
    torch.manual_seed(0)
    batch = rollout.sample(model, ids, torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]]), eot_id=10**6, pad_id=0,
                           temperature=temperature, top_p=top_p, max_new_tokens=24)
    with torch.no_grad():
        logp, _ = rollout.response_logprobs(model, batch, temperature)
    gap = torch.where(batch.mask.bool(), batch.sampled_logp - logp, 0.0).abs()
    return batch, float(gap.sum() / batch.mask.sum())


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 1.0), (1.3, 0.8)])
def test_sampled_logprobs_are_the_ones_ppo_computes(tiny_dir, temperature, top_p):
    """With the checkpoint's settings kept out, the log-prob generate() drew each token with is the
    forward's at the sampling temperature (top-p's truncation is applied after the record: PPO's
    log-probs leave it out). Measured: mean gap <= 1e-6 in float32, 5e-4 in bf16 (CPU)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    model.generation_config.repetition_penalty = 3.0  # kept out by own_sampling
    batch, gap = _sampled_and_computed(model, temperature, top_p)
    assert batch.sampled_logp.shape == batch.responses.shape
    assert gap < 1e-4
    _, gap_bf16 = _sampled_and_computed(model, temperature, top_p, torch.bfloat16)
    assert gap_bf16 < 5e-3


def test_a_leaked_repetition_penalty_shows_in_the_sampled_logprobs(tiny_dir, monkeypatch):
    """Negative control: without own_sampling a leaked repetition_penalty makes the recorded log-probs
    differ from PPO's: in float32 by more than PPO's check allows (ppo_checks.SAMPLER_GAP), in bf16 by
    ten times the rounding gap measured above. No penalty (1.0) stays under the check. (This
    random-init model's logits are near 0, where a penalty moves them little: 1.05 gives 8.8e-4
    nats/token; on the demo SFT model 0.04-0.05, on SmolLM2 0.20. tests/stages/test_ppo.py stops a
    PPO run on it.)"""
    import contextlib

    from transformers import AutoModelForCausalLM

    from posttrain.stages import ppo_checks

    monkeypatch.setattr(models, "own_sampling", lambda model: contextlib.nullcontext())
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    model.generation_config.repetition_penalty = 1.5
    assert _sampled_and_computed(model, 1.0, 1.0)[1] > ppo_checks.SAMPLER_GAP
    assert _sampled_and_computed(model, 1.0, 1.0, torch.bfloat16)[1] > 10 * 3.7e-4
    model.generation_config.repetition_penalty = 1.0
    assert _sampled_and_computed(model.float(), 1.0, 1.0)[1] < ppo_checks.SAMPLER_GAP
