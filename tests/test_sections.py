"""The section models on their own: each refuses what its own fields and validators rule out,
without a YAML file or the root Config (how those errors reach the user: test_config.py)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from posttrain.sections import EvalStageConfig, LoraConfig, PPOStageConfig, RewardSource, ScorerConfig


def test_strict_sections_refuse_unknown_keys_and_coercion():
    assert LoraConfig(r=8).r == 8
    with pytest.raises(ValidationError, match="extra_forbidden|Extra inputs"):
        LoraConfig(rank=8)
    with pytest.raises(ValidationError, match="valid integer"):
        LoraConfig(r="8")  # strict: a string is not coerced to int
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        LoraConfig(r=0)


def test_ppo_batch_sizes_must_divide():
    assert PPOStageConfig(batch_size=8, mini_batch_size=4, gradient_accumulation_steps=2).batch_size == 8
    with pytest.raises(ValidationError, match="ppo.batch_size 10 is not a multiple of ppo.mini_batch_size 4"):
        PPOStageConfig(batch_size=10, mini_batch_size=4)
    with pytest.raises(ValidationError, match="not a multiple of ppo.gradient_accumulation_steps 3"):
        PPOStageConfig(batch_size=8, mini_batch_size=8, gradient_accumulation_steps=3)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"kind": "regex"}, "kind regex needs a pattern"),
        ({"kind": "exact", "pattern": "x"}, "pattern is for kind regex"),
        ({"kind": "regex", "pattern": "(unclosed"}, "is not a regex"),
        ({"kind": "function"}, "kind function needs one"),
        ({"kind": "function", "function": "not-a-spec"}, "is not 'module:function'"),
    ],
)
def test_scorer_fields_must_fit_its_kind(fields, message):
    with pytest.raises(ValidationError, match=message):
        ScorerConfig(name="s", **fields)


def test_scorer_and_reward_accept_well_formed_specs():
    assert ScorerConfig(name="s", kind="regex", pattern=r"(\d+)").pattern == r"(\d+)"
    assert ScorerConfig(name="s", kind="function", function="pkg.mod:score").function == "pkg.mod:score"
    assert RewardSource(function="checks:exact", weight=2.0).weight == 2.0


def test_reward_source_is_a_model_or_a_function():
    with pytest.raises(ValidationError, match="either a model or a function, not both"):
        RewardSource(model="rm", function="m:f")
    with pytest.raises(ValidationError, match="reward function 'no colon' is not 'module:function'"):
        RewardSource(function="no colon")


def test_eval_names_must_be_unique():
    with pytest.raises(ValidationError, match=r"eval.scorers has repeated names \['x', 'x'\]"):
        EvalStageConfig(scorers=[ScorerConfig(name="x", kind="exact"), ScorerConfig(name="x", kind="normalized")])
    with pytest.raises(ValidationError, match="eval.decoding has repeated names"):
        EvalStageConfig(decoding=[{"name": "g"}, {"name": "g", "temperature": 0.5}])
