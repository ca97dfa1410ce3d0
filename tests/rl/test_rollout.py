"""posttrain.rl.rollout, the helpers around PPO's sampling: responses cut at the end-of-turn token,
the sequences the reward model scores (the template's suffix after an ended response), and that
suffix for ChatML.

Sampling itself (the sampler's log-probs are PPO's, a checkpoint's generation settings kept out)
is tested in test_generation_defaults.py; the chunked forward passes in rl/test_logprobs.py.
"""

from __future__ import annotations

import pytest
import torch

from posttrain.config import validate_dict
from posttrain.rl import rollout

pytestmark = pytest.mark.usefixtures("one_thread")


def test_cut_at_end_of_turn():
    eot, pad = 2, 0
    generated = torch.tensor([[5, 7, eot, 9, eot],
                              [5, 6, 7, 8, 9],
                              [eot, 4, 4, 4, 4]])
    tokens, mask, ended = rollout.cut_at_end_of_turn(generated, eot, pad)
    assert tokens.tolist() == [[5, 7, eot, pad, pad], [5, 6, 7, 8, 9], [eot, pad, pad, pad, pad]]
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]  # the eot is a real token
    assert ended.tolist() == [True, False, True]


def test_reward_sequences_append_the_suffix_to_ended_responses_only():
    batch = rollout.Batch(
        queries=torch.tensor([[0, 11, 12], [13, 14, 15]]),
        query_mask=torch.tensor([[0, 1, 1], [1, 1, 1]]),
        responses=torch.tensor([[5, 2, 0], [6, 7, 8]]),
        mask=torch.tensor([[1, 1, 0], [1, 1, 1]]),
        ended=torch.tensor([True, False]),
    )
    assert rollout.reward_sequences(batch, [99]) == [[11, 12, 5, 2, 99], [13, 14, 15, 6, 7, 8]]


def test_template_suffix_is_what_the_reward_model_was_trained_on(tiny_dir):
    """For ChatML the template writes "\\n" after <|im_end|>; an ended rollout with that suffix is,
    token for token, the rendered conversation the reward stage trains on."""
    from posttrain import models

    tok = models.load_tokenizer(validate_dict({"model": {"name_or_path": str(tiny_dir)}, "stages": []}),
                                need_masks=False)
    t = tok.tokenizer
    assert tok.eot_id == t.convert_tokens_to_ids("<|im_end|>")
    suffix = rollout.template_suffix(t, tok.eot_id)
    assert t.decode(suffix) == "\n" and len(suffix) == 1

    user = [{"role": "user", "content": "What is 39 + 45?"}]
    prompt = t(t.apply_chat_template(user, tokenize=False, add_generation_prompt=True), add_special_tokens=False)
    answer = t("39 + 45 = 84", add_special_tokens=False)["input_ids"] + [tok.eot_id]
    q, qm = rollout.left_pad([prompt["input_ids"], prompt["input_ids"][1:]], t.pad_token_id)
    responses, mask, ended = rollout.cut_at_end_of_turn(torch.tensor([answer + [5, 5], answer + [5, 5]]),
                                                        tok.eot_id, t.pad_token_id)
    seqs = rollout.reward_sequences(rollout.Batch(q, qm, responses, mask, ended), suffix)
    full = t(t.apply_chat_template(user + [{"role": "assistant", "content": "39 + 45 = 84"}], tokenize=False),
             add_special_tokens=False)["input_ids"]
    assert seqs[0] == full
    assert seqs[1] == full[1:]
