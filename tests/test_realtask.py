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


def test_retention_judges_each_stage_against_its_parent():
    """SFT is held to SFT_DRIFT from the base, a later stage to STAGE_DRIFT beyond its parent; the KL is
    the mean paired difference per sequence, with its standard error. Each verdict just inside and just
    outside its threshold."""
    base = [3.0, 2.0, 4.0, 3.5]
    rows = [{"label": "base", "per_sequence": base},
            {"label": "sft", "per_sequence": [x + 0.49 for x in base]},          # 0.49 <= 0.5
            {"label": "control", "per_sequence": [x + 0.51 for x in base]},      # from sft: +0.02
            {"label": "ppo", "per_sequence": [x + 0.70 for x in base]},          # from sft: +0.21 > 0.2
            {"label": "dpo", "per_sequence": [x + 0.89 for x in base]},          # from ppo: +0.19
            {"label": "lone", "per_sequence": [x + 0.52 for x in base]}]         # from the base: 0.52 > 0.5
    parents = {"base": None, "sft": "base", "control": "sft", "ppo": "sft", "dpo": "ppo", "lone": None}
    by = {r["label"]: r for r in realtask.kl_rows(rows, parents)}
    assert by["base"]["within_tolerance"] is None and by["base"]["kl_from_base"] == 0
    assert ([by[k]["within_tolerance"] for k in ("sft", "control", "ppo", "dpo", "lone")]
            == [True, True, False, True, False])
    assert by["dpo"]["parent"] == "ppo" and abs(by["dpo"]["added"] - 0.19) < 1e-9 and by["dpo"]["allowed"] == 0.2
    assert by["lone"]["parent"] == "base" and by["lone"]["allowed"] == 0.5
    assert abs(by["sft"]["kl_from_base"] - 0.49) < 1e-9 and by["sft"]["kl_se"] < 1e-9  # a constant shift: no spread
    noisy = realtask.kl_rows([{"label": "base", "per_sequence": [0.0, 0.0]},
                              {"label": "sft", "per_sequence": [0.2, 0.4]}], {"sft": "base"})[1]
    assert abs(noisy["kl_from_base"] - 0.3) < 1e-9 and abs(noisy["kl_se"] - 0.1) < 1e-9
    no_base = realtask.kl_rows([{"label": "sft", "per_sequence": [1.0]}], {"sft": None})[0]
    assert no_base["kl_from_base"] is None and no_base["within_tolerance"] is None
