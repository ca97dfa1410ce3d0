"""posttrain.demo, the offline demo task: its splits are deterministic, held-out prompts are unseen,
the preference data prefers what the task says, and the scorers (also the GRPO/RLOO reward
functions `posttrain.demo:exact_reward` / `concise_reward`) score what they claim."""

from __future__ import annotations

import random

from posttrain import demo


def _pair(row: dict) -> tuple[int, int]:
    prompt = row["messages"][0]["content"] if "messages" in row else row["prompt"]
    a, b = (int(x) for x in demo.NUMBER.findall(prompt)[:2])
    return a, b


def test_the_splits_are_deterministic_and_held_out_prompts_are_unseen():
    rows = demo.make_rows(seed=0)
    assert {k: len(v) for k, v in rows.items()} == demo.SPLITS
    assert rows == demo.make_rows(seed=0) and rows != demo.make_rows(seed=1)
    train = {_pair(r) for name in ("sft_train", "pref_train", "reward_train") for r in rows[name]}
    held_out = {_pair(r) for name in ("sft_eval", "pref_eval", "reward_eval") for r in rows[name]}
    assert held_out and not train & held_out


def test_the_pairs_prefer_the_right_answer_and_the_concise_style():
    rows = demo.make_rows(seed=0)
    for r in rows["pref_train"][:50] + rows["reward_train"][:50]:
        a, b = _pair(r)
        chosen, rejected = demo.score(r["prompt"], r["chosen"]), demo.score(r["prompt"], r["rejected"])
        assert (chosen["exact"], chosen["concise"]) > (rejected["exact"], rejected["concise"]), r
    for r in rows["reward_train"][:50]:  # the reward model's pairs: style only, both sides correct
        assert demo.score(r["prompt"], r["rejected"]) == {"exact": 1.0, "concise": 0.0}


def test_the_scores_and_reward_functions():
    q = demo.question(39, 45)
    assert q == "What is 39 + 45?"
    assert demo.score(q, demo.concise(39, 45)) == {"exact": 1.0, "concise": 1.0}
    assert demo.score(q, demo.verbose(39, 45)) == {"exact": 1.0, "concise": 0.0}
    assert demo.score(q, demo.concise(39, 45, 85)) == {"exact": 0.0, "concise": 1.0}
    assert demo.score(q, "45 + 39 = 84") == {"exact": 1.0, "concise": 0.0}  # the numbers of another question
    assert demo.score(q, "no idea") == {"exact": 0.0, "concise": 0.0}
    # TRL's conversational and text forms give the same scores
    prompts = [[{"role": "user", "content": q}], q]
    completions = [[{"role": "assistant", "content": "39 + 45 = 84"}], "Well, I think the answer is 84."]
    assert demo.exact_reward(prompts, completions) == [1.0, 1.0]
    assert demo.concise_reward(prompts, completions) == [1.0, 0.0]
    assert all(demo.off_by_one_digit(84, random.Random(i)) in {74, 94, 83, 85} for i in range(20))
