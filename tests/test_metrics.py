"""The eval metrics against hand-computed values, and the eval stage's scorers on responses that
must score 1 and responses that must score 0."""

from __future__ import annotations

import math

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


def test_token_logprobs_and_masked_sums():
    logits = torch.zeros(1, 3, 4)  # uniform over 4 tokens: every log-prob is -log 4
    ids = torch.tensor([[0, 1, 2]])
    logps = metrics.token_logprobs(logits, ids)
    assert logps.shape == (1, 2)
    assert torch.allclose(logps, torch.full((1, 2), -math.log(4)))
    assert metrics.masked_sums(logps, torch.tensor([[0.0, 1.0]])) == pytest.approx([-math.log(4)])
    sure = torch.full((1, 3, 4), -30.0)
    sure[0, 0, 1], sure[0, 1, 2] = 30.0, 30.0  # a model certain of the next tokens: NLL 0
    assert metrics.masked_sums(metrics.token_logprobs(sure, ids), torch.ones(1, 2)) == pytest.approx([0.0], abs=1e-6)


def test_kl_per_sequence_by_hand():
    p = torch.log(torch.tensor([[[0.5, 0.5], [0.9, 0.1]]]))
    q = torch.log(torch.tensor([[[0.25, 0.75], [0.9, 0.1]]]))
    by_hand = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)  # the second position: KL 0
    assert metrics.kl_per_sequence(p, q, torch.ones(1, 2)) == pytest.approx([by_hand], rel=1e-5)
    assert metrics.kl_per_sequence(p, q, torch.tensor([[0.0, 1.0]])) == pytest.approx([0.0], abs=1e-7)
    assert metrics.kl_per_sequence(p, p, torch.ones(1, 2)) == pytest.approx([0.0], abs=1e-7)


# ---------------------------------------------------------------------------------------------
# The eval stage's scorers, through the config (builtin kinds and a module:function)


@pytest.fixture
def scored(make_config):
    from posttrain.stages import eval as eval_stage

    cfg = make_config(eval__scorers=[
        {"name": "exact", "kind": "exact"},
        {"name": "norm", "kind": "normalized"},
        {"name": "last_number", "kind": "regex", "pattern": r"(-?\d+)\D*$"},
        {"name": "verifier", "kind": "function", "function": "posttrain.demo:exact_reward"},
    ])
    prompts = [[{"role": "user", "content": "What is 39 + 45?"}], [{"role": "user", "content": "What is 10 + 20?"}]]
    refs = ["39 + 45 = 84", "10 + 20 = 30"]
    held = eval_stage.HeldOut(prompts, refs, [])

    def run(texts: list[str]) -> dict:
        gens = [{"text": t, "ids": [5, 6, 9], "ended": True} for t in texts]
        return eval_stage.generation_metrics(cfg, gens, held)

    return run


def test_right_answers_score_1_and_wrong_ones_0(scored):
    right = scored(["39 + 45 = 84", "10 + 20 = 30"])
    assert right["scores"] == {"exact": 1.0, "norm": 1.0, "last_number": 1.0, "verifier": 1.0}
    wrong = scored(["39 + 45 = 85", "I don't know"])
    assert wrong["scores"] == {"exact": 0.0, "norm": 0.0, "last_number": 0.0, "verifier": 0.0}
    verbose = scored(["Well, I think the answer is 84.", "Well, I think the answer is 30."])
    assert verbose["scores"] == {"exact": 0.0, "norm": 0.0, "last_number": 1.0, "verifier": 1.0}
    assert right["ended"] == 1.0 and right["length"] == 2  # the end-of-turn token is not counted


def test_a_broken_scorer_function_is_a_clean_error(make_config, tmp_path):
    from posttrain.errors import PosttrainError
    from posttrain.stages import eval as eval_stage

    cfg = make_config(eval__scorers=[{"name": "bad", "kind": "function", "function": "posttrain.demo:corpus"}])
    held = eval_stage.HeldOut([[{"role": "user", "content": "What is 1 + 2?"}]], ["1 + 2 = 3"], [])
    with pytest.raises(PosttrainError, match="scorer 'bad'"):
        eval_stage.generation_metrics(cfg, [{"text": "3", "ids": [1], "ended": True}], held)
