"""Packing without cross-contamination (safeguard #27). TRL's padding-free collator concatenates
the conversations of a batch into one row and passes their position ids but no attention mask;
transformers then builds a block-diagonal causal mask from the position ids. These tests check, on
a tiny random-init model, that a packed row gives each conversation exactly the loss, logits and
gradients it gets alone (padded), with a negative control where the segmentation is taken away;
and that posttrain's start-up probe (`models.check_packing`) passes a model that segments and stops
one whose attention lets packed conversations see each other.
"""

from __future__ import annotations

import pytest
import torch

from posttrain import models
from posttrain.errors import PosttrainError


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval()


def _sequences():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 96, (n,), generator=g) for n in (9, 5, 13)]


def _padded(model, seqs):
    """The reference: a right-padded batch with an attention mask; labels -100 on padding."""
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    labels = ids.masked_fill(mask == 0, -100)
    return model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False), mask


def _packed(model, seqs, *, segmented: bool = True):
    """One row, as TRL's padding-free collator builds it: the first label of each conversation is
    -100 (it must not be predicted from the previous conversation)."""
    ids = torch.cat(seqs).unsqueeze(0)
    labels = torch.cat([torch.cat([torch.tensor([-100]), s[1:]]) for s in seqs]).unsqueeze(0)
    pos = torch.cat([torch.arange(len(s)) for s in seqs]).unsqueeze(0) if segmented \
        else torch.arange(ids.shape[1]).unsqueeze(0)
    return model(input_ids=ids, position_ids=pos, labels=labels, use_cache=False)


def _grads(model, loss):
    model.zero_grad()
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_a_packed_row_gives_each_conversation_its_own_logits_loss_and_gradients(model):
    seqs = _sequences()
    padded, mask = _padded(model, seqs)
    packed = _packed(model, seqs)
    offsets = torch.tensor([0, *torch.cumsum(torch.tensor([len(s) for s in seqs]), 0)[:-1].tolist()])
    for i, s in enumerate(seqs):
        alone = padded.logits[i, : len(s)]
        inside = packed.logits[0, offsets[i]: offsets[i] + len(s)]
        assert torch.allclose(alone, inside, atol=1e-5), (i, (alone - inside).abs().max())
    # both losses are the mean over the same predicted tokens
    assert torch.allclose(padded.loss, packed.loss, atol=1e-6)
    g_padded = _grads(model, _padded(model, seqs)[0].loss)
    g_packed = _grads(model, _packed(model, seqs).loss)
    assert torch.allclose(g_padded, g_packed, atol=1e-6)


def test_negative_control_without_segmentation_the_conversations_mix(model):
    seqs = _sequences()
    padded, _ = _padded(model, seqs)
    mixed = _packed(model, seqs, segmented=False)  # positions run on: one long causal sequence
    second = mixed.logits[0, len(seqs[0]): len(seqs[0]) + len(seqs[1])]
    assert (padded.logits[1, : len(seqs[1])] - second).abs().max() > 1e-2
    assert not torch.allclose(padded.loss, mixed.loss, atol=1e-4)


def test_the_probe_passes_a_model_that_segments(model):
    models.check_packing(model)  # no error


def test_with_a_kv_cache_transformers_does_not_segment(model):
    """Why the trainers (and the probe) run without a cache: transformers 5.23 detects packed
    sequences only when there is no past_key_values, and use_cache=True creates one."""
    seqs = _sequences()
    ids = torch.cat(seqs[:2]).unsqueeze(0)
    pos = torch.cat([torch.arange(len(s)) for s in seqs[:2]]).unsqueeze(0)
    with torch.no_grad():
        alone = model(input_ids=seqs[1].unsqueeze(0), use_cache=False).logits
        cached = model(input_ids=ids, position_ids=pos, use_cache=True).logits[:, len(seqs[0]):]
    assert (alone - cached).abs().max() > 1e-2


def test_the_probe_stops_attention_that_lets_packed_conversations_mix(model, monkeypatch):
    """Without transformers' packed-sequence detection the mask is plain causal over the whole
    row: what a kernel that ignores position ids does."""
    import transformers.masking_utils as mu

    monkeypatch.setattr(mu, "find_packed_sequence_indices", lambda position_ids: None)
    with pytest.raises(PosttrainError, match="packing") as e:
        models.check_packing(model)
    assert "sft.training.packing: false" in str(e.value) and "\n" not in str(e.value)


def test_packed_sft_trains_and_checks_segmentation_first(make_config, monkeypatch):
    """In the stage: sft.training.packing on a CPU trains (the probe passes); with the
    segmentation taken away the run stops when training begins, before any step, unfinished."""
    import transformers.masking_utils as mu

    from posttrain import manifest
    from posttrain.stages import sft
    from tests.conftest import read_losses

    training = {"max_steps": 3, "per_device_train_batch_size": 4, "learning_rate": 3e-3, "logging_steps": 1,
                "save_steps": 1000, "max_length": 64, "packing": True}
    out = sft.run(make_config(sft__training=training))
    m = manifest.read(out)["metrics"]
    assert "packing (bfd, padding-free)" in m["speed"]
    assert m["train_sequences"] > m["steps"] * m["global_batch_size"]  # several conversations per packed row
    monkeypatch.setattr(mu, "find_packed_sequence_indices", lambda position_ids: None)
    cfg = make_config(sft__training=training, output_dir=str(out.parent / "broken"))
    with pytest.raises(PosttrainError, match="packing"):
        sft.run(cfg)
    broken = out.parent / "broken" / "sft"
    assert not manifest.is_finished(broken)
    assert not (broken / "metrics.jsonl").exists() or not read_losses(broken), "no training step may run"
