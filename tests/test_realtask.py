"""The real-model demo task (posttrain.realtask): deterministic data, held-out items that no
training row contains, the preferences each pair encodes, and the checkers on hand-written
responses (each must be able to say 0 as well as 1)."""

from __future__ import annotations

from posttrain import realtask


def test_data_is_deterministic_and_holds_out_its_items():
    rows = realtask.make_rows(seed=0)
    assert rows == realtask.make_rows(seed=0)
    assert rows != realtask.make_rows(seed=1)
    train, held = realtask.split_items(0)
    held_q = {realtask.question(it, t) for it in held for t in range(3)}
    train_q = {r["messages"][0]["content"] for r in rows["sft_train"]}
    assert held_q and not held_q & train_q  # no held-out question was trained on
    assert {r["messages"][0]["content"] for r in rows["sft_eval"]} <= held_q


def test_pairs_encode_one_preference_each():
    rows = realtask.make_rows(seed=0)
    for pair in rows["reward_train"]:  # brief over explained, both correct, same boldness
        c, r = (realtask.check(pair["prompt"], pair[k]) for k in ("chosen", "rejected"))
        assert c["brief"] == 1 and r["brief"] == 0 and c["bold"] == r["bold"] and c["correct"] == r["correct"] == 1
    for pair in rows["dpo_train"]:  # bold over plain, both brief and correct
        c, r = (realtask.check(pair["prompt"], pair[k]) for k in ("chosen", "rejected"))
        assert c["bold"] == 1 and r["bold"] == 0 and c["brief"] == r["brief"] == 1 and c["correct"] == 1


def test_checkers_on_hand_written_responses():
    row = realtask.make_rows(seed=0)["sft_eval"][0]["messages"]
    q, ref = row[0]["content"], row[1]["content"]  # the reference is brief and bold
    assert realtask.check(q, ref) == {"format": 1.0, "brief": 1.0, "bold": 1.0, "correct": 1.0}
    plain = ref.replace("**", "")
    assert realtask.check(q, plain)["bold"] == 0.0 and realtask.check(q, plain)["format"] == 1.0
    assert realtask.check(q, plain + " It is a long story, told in several words.")["brief"] == 0.0
    assert realtask.check(q, "I am not sure.") == {"format": 0.0, "brief": 0.0, "bold": 0.0, "correct": 0.0}
    assert realtask.check("What is the weather like?", ref) is None  # not a task question: abstains
    assert realtask.format([[{"role": "user", "content": q}]], [[{"role": "assistant", "content": ref}]]) == [1.0]
