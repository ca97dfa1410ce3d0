"""The eval metrics against hand-computed values, and the eval stage's scorers on responses that
must score 1 and responses that must score 0."""

from __future__ import annotations

import math
import re

import pytest
import torch

from posttrain import metrics


def test_normalize_answer():
    assert metrics.normalize_answer("  The Answer is: 84! ") == "answer is 84"
    assert metrics.normalize_answer("An apple, a pear.") == "apple pear"


def test_exact_and_normalized():
    refs = ["39 + 45 = 84", "Paris"]
    assert metrics.exact([" 39 + 45 = 84\n", "paris"], refs) == [1.0, 0.0]
    assert metrics.normalized(["39 + 45 = 84", "The paris."], refs) == [1.0, 1.0]
    assert metrics.normalized(["39 + 45 = 85", "London"], refs) == [0.0, 0.0]


def test_regex_with_and_without_group():
    last_number = r"(-?\d+)\D*$"
    refs = ["39 + 45 = 84", "10 + 10 = 20"]
    assert metrics.regex(last_number, ["Well, I think the answer is 84.", "It is 21."], refs) == [1.0, 0.0]
    assert metrics.regex(last_number, ["no digits", "20"], refs) == [0.0, 1.0]  # no match scores 0
    assert metrics.regex(r"^\d+ \+ \d+ = \d+$", ["1 + 2 = 3", "Well, 3."], refs) == [1.0, 0.0]


def test_distinct_n():
    assert metrics.distinct_n([[1, 2, 1, 2]], 1) == 0.5  # {1, 2} of 4 unigrams
    assert metrics.distinct_n([[1, 2, 1, 2]], 2) == pytest.approx(2 / 3)  # (1,2) (2,1) (1,2)
    assert metrics.distinct_n([[7, 7, 7], [7, 7, 7]], 2) == 0.25  # one bigram, seen 4 times
    assert metrics.distinct_n([[1, 2], [3, 4]], 1) == 1.0
    assert math.isnan(metrics.distinct_n([[1]], 2))  # no bigram at all


def test_win_rate_counts_ties_half():
    assert metrics.win_rate([1.0, 2.0, 3.0], [0.0, 2.0, 4.0]) == pytest.approx(0.5)
    assert metrics.win_rate([1.0, 1.0], [0.0, 0.0]) == 1.0  # should score 1
    assert metrics.win_rate([0.0, 0.0], [1.0, 1.0]) == 0.0  # should score 0
    with pytest.raises(ValueError):
        metrics.win_rate([1.0], [1.0, 2.0])


def test_preference_accuracy_and_margin():
    assert metrics.preference_accuracy([0.0, -1.0], [-1.0, -1.0]) == {"accuracy": 0.5, "margin": 0.5}
    assert metrics.preference_accuracy([-1.0, -2.0], [-3.0, -5.0])["accuracy"] == 1.0
    assert metrics.preference_accuracy([-3.0], [-1.0])["accuracy"] == 0.0


def test_distribution():
    d = metrics.distribution([4.0, 1.0, 3.0, 2.0])
    assert d["mean"] == 2.5 and d["min"] == 1.0 and d["max"] == 4.0
    assert d["std"] == pytest.approx(math.sqrt(1.25))
    assert d["median"] == 2.5 and d["q25"] == 1.75 and d["q75"] == 3.25
    assert metrics.distribution([]) == {}


def test_masked_sums():
    values = torch.tensor([[-1.0, -2.0, -4.0], [-0.5, -0.5, -0.5]])
    mask = torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert metrics.masked_sums(values, mask) == pytest.approx([-6.0, -0.5])


def test_kl_per_sequence_by_hand():
    p = torch.log(torch.tensor([[[0.5, 0.5], [0.9, 0.1]]]))
    q = torch.log(torch.tensor([[[0.25, 0.75], [0.9, 0.1]]]))
    by_hand = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)  # the second position: KL 0
    assert metrics.kl_per_sequence(p, q, torch.ones(1, 2)) == pytest.approx([by_hand], rel=1e-5)
    assert metrics.kl_per_sequence(p, q, torch.tensor([[0.0, 1.0]])) == pytest.approx([0.0], abs=1e-7)
    assert metrics.kl_per_sequence(p, p, torch.ones(1, 2)) == pytest.approx([0.0], abs=1e-7)
    # a token the model rules out (logit -inf) adds 0 · log 0 = 0, not NaN
    sure = torch.tensor([[[0.0, float("-inf")]]])
    assert metrics.kl_per_sequence(sure, torch.log(torch.tensor([[[0.5, 0.5]]])), torch.ones(1, 1)) == \
        pytest.approx([math.log(2)])


# ---------------------------------------------------------------------------------------------
# The eval stage's scorers, through the config (builtin kinds and module:function)

PROMPTS = [[{"role": "user", "content": "What is 39 + 45?"}], [{"role": "user", "content": "What is 10 + 20?"}]]
REFS = ["39 + 45 = 84", "10 + 20 = 30"]
SCORERS_PY = """
def no_reference(prompts, completions):          # takes no `reference`: it is not passed
    return [1.0 for _ in completions]
def abstains(prompts, completions, reference):   # None = no opinion: left out of the mean
    return [None, 1.0]
def too_few(prompts, completions, **kw):
    return [1.0]
def nan(prompts, completions, **kw):
    return [float("nan"), 1.0]
def inf(prompts, completions, **kw):
    return [float("inf"), 1.0]
def text(prompts, completions, **kw):
    return ["yes", "no"]
def scalar(prompts, completions, **kw):
    return 1.0
def raises(prompts, completions, **kw):
    raise KeyError("answer")
"""


def _scored(make_config, tmp_path, scorers: list[dict], texts: list[str]) -> dict:
    from posttrain.stages import eval as eval_stage

    (tmp_path / "my_scorers.py").write_text(SCORERS_PY)
    cfg = make_config(eval__scorers=scorers)
    cfg._source_dir = str(tmp_path)  # as load_config sets it: the config's directory
    gens = [{"text": t, "ids": [5, 6, 9], "ended": True} for t in texts]
    return eval_stage.generation_metrics(eval_stage.load_scorers(cfg), gens, eval_stage.HeldOut(PROMPTS, REFS, []))


BUILTIN = [{"name": "exact", "kind": "exact"}, {"name": "norm", "kind": "normalized"},
           {"name": "last_number", "kind": "regex", "pattern": r"(-?\d+)\D*$"},
           {"name": "verifier", "kind": "function", "function": "posttrain.demo:exact_reward"}]


def test_right_answers_score_1_and_wrong_ones_0(make_config, tmp_path):
    right = _scored(make_config, tmp_path, BUILTIN, ["39 + 45 = 84", "10 + 20 = 30"])
    assert right["scores"] == {"exact": 1.0, "norm": 1.0, "last_number": 1.0, "verifier": 1.0}
    wrong = _scored(make_config, tmp_path, BUILTIN, ["39 + 45 = 85", "I don't know"])
    assert wrong["scores"] == {"exact": 0.0, "norm": 0.0, "last_number": 0.0, "verifier": 0.0}
    verbose = _scored(make_config, tmp_path, BUILTIN, ["Well, I think the answer is 84.", "Well, it is 30."])
    assert verbose["scores"] == {"exact": 0.0, "norm": 0.0, "last_number": 1.0, "verifier": 1.0}
    assert right["ended"] == 1.0 and right["length"] == 2  # the end-of-turn token is not counted


def test_function_scorers_are_called_like_reward_functions(make_config, tmp_path):
    got = _scored(make_config, tmp_path, [{"name": "a", "kind": "function", "function": "my_scorers:no_reference"},
                                          {"name": "b", "kind": "function", "function": "my_scorers:abstains"}],
                  ["x", "y"])
    assert got["scores"] == {"a": 1.0, "b": 1.0} and got["per_response"]["b"] == [None, 1.0]


@pytest.mark.parametrize(("fn", "message"), [
    ("too_few", "returned 1 scores for 2 completions"),
    ("nan", "not a finite number"),
    ("inf", "not a finite number"),
    ("text", "'yes' (str)"),
    ("scalar", "returned float, not a list"),
    ("raises", "raised KeyError"),
])
def test_a_broken_scorer_function_is_a_clean_error(fn, message, make_config, tmp_path):
    from posttrain.errors import PosttrainError

    with pytest.raises(PosttrainError, match=re.escape(message)) as e:
        _scored(make_config, tmp_path, [{"name": "bad", "kind": "function", "function": f"my_scorers:{fn}"}],
                ["x", "y"])
    assert "eval scorer 'bad'" in e.value.line()


def test_win_rates_compare_with_the_base_and_the_parent_on_the_same_decoding():
    from posttrain.stages import eval as eval_stage

    def row(label, parent, greedy, sampled):
        return {"label": label, "parent": parent, "decodings": {
            "greedy": {"reward": {"mean": 0.0, "per_response": greedy}},
            "sampled": {"reward": {"mean": 0.0, "per_response": sampled}}}}

    rows = [row("base", None, [0.0, 0.0], [5.0, 5.0]), row("sft", "base", [1.0, 0.0], [0.0, 0.0]),
            row("dpo", "sft", [2.0, -1.0], [1.0, 1.0])]
    eval_stage.add_win_rates(rows)
    base, sft, dpo = (r["decodings"] for r in rows)
    assert "win_rate_vs_base" not in base["greedy"] and "win_rate_vs_parent" not in base["greedy"]
    assert sft["greedy"]["win_rate_vs_base"] == 0.75 and sft["sampled"]["win_rate_vs_base"] == 0.0
    assert dpo["greedy"]["win_rate_vs_parent"] == 0.5 and dpo["sampled"]["win_rate_vs_parent"] == 1.0
    assert dpo["greedy"]["win_rate_vs_base"] == 0.5 and dpo["greedy"]["reward_scores"] == [2.0, -1.0]

    no_base = [row("sft", None, [1.0], [1.0]), row("dpo", "sft", [2.0], [0.0])]
    eval_stage.add_win_rates(no_base)  # --models sft dpo: no base row, so no "vs base" column
    assert "win_rate_vs_base" not in no_base[1]["decodings"]["greedy"]
    assert no_base[1]["decodings"]["greedy"]["win_rate_vs_parent"] == 1.0
