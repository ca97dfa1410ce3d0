"""posttrain.rl.prompts: the prompts online RL and eval sample from. An SFT conversation gives the
messages before its last assistant turn (that turn's text is the `reference` answer reward
functions receive); a preference pair gives its prompt and the chosen answer; a dataset without a
user turn to prompt with is a one-line error before any model loads."""

from __future__ import annotations

import json

import pytest

from posttrain import models
from posttrain.errors import PosttrainError
from posttrain.rl.prompts import prompt_data, to_prompt


def U(text):
    return {"role": "user", "content": text}


def A(text):
    return {"role": "assistant", "content": text}


def test_an_sft_conversation_prompts_with_what_comes_before_its_last_answer():
    system = {"role": "system", "content": "Be brief."}
    row = {"messages": [system, U("What is 1 + 2?"), A("3"), U("And 2 + 2?"), A("2 + 2 = 4")]}
    assert to_prompt(row, "sft") == {"prompt": row["messages"][:4], "reference": "2 + 2 = 4"}
    # without an answer the whole conversation is the prompt, with no reference
    assert to_prompt({"messages": [U("only a question")]}, "sft") == {"prompt": [U("only a question")],
                                                                      "reference": ""}


def test_a_preference_pair_prompts_with_its_prompt_and_references_the_chosen_answer():
    row = {"prompt": [U("What is 1 + 2?")], "chosen": [A("1 + 2 = 3")], "rejected": [A("Well, 3.")]}
    assert to_prompt(row, "preference") == {"prompt": [U("What is 1 + 2?")], "reference": "1 + 2 = 3"}
    assert to_prompt({**row, "chosen": []}, "preference")["reference"] == ""


def test_prompt_data_keeps_the_rows_with_a_user_turn_to_answer(make_config, tmp_path):
    rows = [{"messages": [U(f"What is {i} + 1?"), A(f"{i} + 1 = {i + 1}")]} for i in range(6)]
    rows.append({"messages": [{"role": "system", "content": "s"}, A("no question")]})  # nothing to prompt with
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = make_config(data__prompts={"kind": "sft", "train": [{"path": str(path)}], "eval_fraction": 0})
    tok = models.load_tokenizer(cfg)
    train, ev, record = prompt_data(cfg, "prompts", tok)
    assert ev is None and record["prompts"] == len(train) == 6
    assert train[0] == {"prompt": [U("What is 0 + 1?")], "reference": "0 + 1 = 1"}

    path.write_text(json.dumps(rows[-1]) + "\n")
    with pytest.raises(PosttrainError, match=r"data\.prompts has no conversation with a user turn"):
        prompt_data(cfg, "prompts", tok)
