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
