"""posttrain.tiny, the offline model every other test trains (the `tiny_dir` fixture): a tokenizer
that splits every digit, has the ChatML tokens and pads with a token that is not eos, and a Llama
model of the requested size that reloads with plain transformers and stops at the end of a turn.
(`posttrain init-tiny` through the CLI: test_cli.py.)"""

from __future__ import annotations

import pytest

from posttrain import demo, tiny

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_tokenizer_splits_digits_and_has_chat_and_pad_tokens():
    tok = tiny.build_tokenizer(demo.corpus())
    assert len(tok) <= 320
    digits = tok.tokenize("12 + 345 = 357")
    assert [t for t in digits if any(c.isdigit() for c in t)] == list("12345357")  # one token per digit
    ids = tok.convert_tokens_to_ids(tiny.CHAT_TOKENS)
    assert tok.unk_token_id not in ids and len(set(ids)) == 2
    assert tok.pad_token == "<|pad|>" and tok.pad_token_id != tok.eos_token_id
    text = tok.apply_chat_template([{"role": "user", "content": "What is 1 + 2?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == "<|im_start|>user\nWhat is 1 + 2?<|im_end|>\n<|im_start|>assistant\n"
    assert tok.convert_ids_to_tokens(tok(text, add_special_tokens=False)["input_ids"])[0] == "<|im_start|>"


def test_init_tiny_saves_a_model_of_the_requested_size_that_reloads(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    d = tiny.init_tiny(tmp_path / "m", demo.corpus(), hidden=16, layers=1, heads=2, seed=3)
    model = AutoModelForCausalLM.from_pretrained(str(d))
    tok = AutoTokenizer.from_pretrained(str(d))
    c = model.config
    assert (c.model_type, c.hidden_size, c.num_hidden_layers, c.num_attention_heads) == ("llama", 16, 1, 2)
    assert c.vocab_size == len(tok) and c.pad_token_id == tok.pad_token_id
    eos = GenerationConfig.from_pretrained(str(d)).eos_token_id
    assert eos[0] == tok.convert_tokens_to_ids("<|im_end|>")  # generation stops at the end of a turn
    # the seed decides the weights
    again = tiny.build_model(tok, hidden=16, layers=1, heads=2, seed=3)
    other = tiny.build_model(tok, hidden=16, layers=1, heads=2, seed=4)
    w = model.state_dict()["model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(w, again.state_dict()["model.layers.0.self_attn.q_proj.weight"])
    assert not torch.equal(w, other.state_dict()["model.layers.0.self_attn.q_proj.weight"])
