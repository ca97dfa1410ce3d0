"""Config validation: every way a YAML (or a --set) can be wrong gives one PosttrainError that
names the key, where it is, and what to do."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from posttrain.config import Config, load_config, validate_dict
from posttrain.errors import PosttrainError
from tests.helpers import CONFIG_BASE as BASE  # line numbers below are hand-counted against it
from tests.helpers import config_keys as _keys
from tests.helpers import config_like as _config_like
from tests.helpers import config_values as _values

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def error_of(tmp_path: Path, text: str, overrides: list[str] | None = None) -> PosttrainError:
    p = write(tmp_path, text)
    with pytest.raises(PosttrainError) as info:
        load_config(p, overrides)
    return info.value


# ---------------------------------------------------------------------------------------------
# Valid configs


def test_valid_minimal_config_loads(tmp_path):
    text = "model:\n  name_or_path: m\ndata:\n  sft:\n    kind: sft\n    train:\n      - path: a.jsonl\n"
    cfg = load_config(write(tmp_path, text))
    assert isinstance(cfg, Config)
    assert cfg.model.name_or_path == "m"
    assert cfg.data["sft"].kind == "sft"
    assert cfg.data["sft"].train[0].path == "a.jsonl"
    # defaults
    assert cfg.stages == ["format", "sft"]
    assert cfg.template.name == "chatml"
    assert cfg.sft.data == "sft"
    assert cfg.sft.method == "full"
    assert cfg.sft.training == {}
    assert cfg.data["sft"].max_bad_fraction == 0.01


def test_base_config_loads(tmp_path):
    cfg = load_config(write(tmp_path, BASE))
    assert cfg.sft.training == {"learning_rate": 0.1}
    assert cfg.data["pref"].kind == "preference"


def test_model_only_config_with_format_stage_loads(tmp_path):
    cfg = load_config(write(tmp_path, "model:\n  name_or_path: m\nstages: [format]\n"))
    assert cfg.stages == ["format"]
    assert cfg.data == {}


def test_scientific_notation_in_yaml_is_float(tmp_path):
    cfg = load_config(write(tmp_path, BASE.replace("learning_rate: 0.1", "learning_rate: 1e-3")))
    lr = cfg.sft.training["learning_rate"]
    assert type(lr) is float
    assert lr == 0.001


def test_scientific_notation_other_forms(tmp_path):
    cfg = load_config(write(tmp_path, BASE.replace("learning_rate: 0.1", "learning_rate: 2E-5")))
    assert cfg.sft.training["learning_rate"] == 2e-5
    cfg = load_config(write(tmp_path, BASE.replace("learning_rate: 0.1", "learning_rate: 3.0e-3")))
    assert cfg.sft.training["learning_rate"] == 0.003


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.model.name_or_path


def test_configs_dir_is_not_empty():
    # Guards the parametrized test above against silently testing nothing.
    assert (REPO / "configs" / "demo.yaml").is_file()
    assert len(list((REPO / "configs").glob("*.yaml"))) >= 1


def test_demo_config_values():
    cfg = load_config(REPO / "configs" / "demo.yaml")
    assert cfg.stages == ["format", "sft", "reward", "ppo", "dpo", "merge", "control", "eval", "export"]
    assert cfg.export.type == "q8_0" and cfg.model_stage_before("export") == "merge"
    assert [s.name for s in cfg.eval.scorers] == ["exact", "concise"] and cfg.control.steps is None
    assert cfg.dpo.method == "lora" and cfg.dpo.reference == "adapter_disabled"
    assert cfg.reward.data == "style" and cfg.ppo.ptx_coef > 0 and cfg.uses_reward_stage("ppo")
    assert cfg.grpo.rewards[0].function == "posttrain.demo:exact_reward"
    assert cfg.uses_reward_stage("rloo")  # the reward model plus the verifier
    assert cfg.sft.training["learning_rate"] == 0.003
    assert cfg.sft.training["lr_scheduler_type"] == "constant_with_warmup"
    assert cfg.dpo.training["beta"] == 0.1
    assert cfg.data["preference"].kind == "preference"


def test_validating_does_not_import_torch():
    code = (
        "import sys; from posttrain.config import load_config; "
        "load_config('configs/demo.yaml'); assert 'torch' not in sys.modules, 'torch imported'"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr


# ---------------------------------------------------------------------------------------------
# Unknown keys: dotted key, file:line, did-you-mean


def test_unknown_top_level_key(tmp_path):
    e = error_of(tmp_path, BASE + "outptu_dir: x\n")
    line = e.line()
    assert "unknown key 'outptu_dir'" in line
    assert f"{tmp_path / 'c.yaml'}:16" in line
    assert "did you mean 'output_dir'?" in line


def test_unknown_top_level_key_without_near_match_lists_valid_keys(tmp_path):
    e = error_of(tmp_path, BASE + "zzzzzz: 1\n")
    assert "unknown key 'zzzzzz'" in e.line()
    assert f"{tmp_path / 'c.yaml'}:16" in e.line()
    assert "model" in e.fix and "stages" in e.fix and "output_dir" in e.fix


def test_unknown_key_in_stage_section(tmp_path):
    e = error_of(tmp_path, BASE.replace("  method: full", "  metod: full"))
    line = e.line()
    assert "unknown key 'sft.metod'" in line
    assert f"{tmp_path / 'c.yaml'}:13" in line
    assert "did you mean 'method'?" in line


def test_unknown_key_in_data_source(tmp_path):
    text = BASE.replace("      - path: data/sft.jsonl\n", "      - path: data/sft.jsonl\n        colums: {a: b}\n")
    e = error_of(tmp_path, text)
    line = e.line()
    assert "unknown key 'data.sft.train.0.colums'" in line
    assert f"{tmp_path / 'c.yaml'}:8" in line
    assert "did you mean 'columns'?" in line


def test_unknown_key_in_data_section(tmp_path):
    text = BASE.replace("    kind: preference\n", "    kind: preference\n    eval_fractoin: 0.1\n")
    e = error_of(tmp_path, text)
    assert "unknown key 'data.pref.eval_fractoin'" in e.line()
    assert f"{tmp_path / 'c.yaml'}:10" in e.line()
    assert "did you mean 'eval_fraction'?" in e.line()


def test_unknown_training_field(tmp_path):
    e = error_of(tmp_path, BASE.replace("learning_rate: 0.1", "learnig_rate: 0.1"))
    line = e.line()
    assert "unknown key 'sft.training.learnig_rate'" in line
    assert "SFTConfig" in line
    assert f"{tmp_path / 'c.yaml'}:15" in line
    assert "did you mean 'learning_rate'?" in line


def test_unknown_dpo_training_field(tmp_path):
    e = error_of(tmp_path, BASE + "dpo:\n  training:\n    betta: 0.1\n")
    assert "unknown key 'dpo.training.betta'" in e.line()
    assert "DPOConfig" in e.line()
    assert f"{tmp_path / 'c.yaml'}:18" in e.line()
    assert "did you mean 'beta'?" in e.line()


def test_error_line_is_single_line(tmp_path):
    e = error_of(tmp_path, BASE.replace("  method: full", "  metod: full"))
    assert "\n" not in e.line()
    assert str(e) == e.line()


# ---------------------------------------------------------------------------------------------
# Wrong types and values


def test_wrong_type_lora_r(tmp_path):
    e = error_of(tmp_path, BASE + "  lora:\n    r: zero\n")
    line = e.line()
    assert "'sft.lora.r'" in line
    assert "'zero'" in line
    assert "integer" in line
    assert f"{tmp_path / 'c.yaml'}:17" in line


def test_lora_r_below_minimum(tmp_path):
    e = error_of(tmp_path, BASE + "  lora:\n    r: 0\n")
    assert "'sft.lora.r'" in e.line()
    assert f"{tmp_path / 'c.yaml'}:17" in e.line()


def test_wrong_type_learning_rate(tmp_path):
    e = error_of(tmp_path, BASE.replace("learning_rate: 0.1", "learning_rate: abc"))
    line = e.line()
    assert "'sft.training.learning_rate' is 'abc'" in line
    assert "expected float" in line
    assert f"{tmp_path / 'c.yaml'}:15" in line


def test_int_accepted_where_float_expected(tmp_path):
    cfg = load_config(write(tmp_path, BASE.replace("learning_rate: 0.1", "learning_rate: 1")))
    assert cfg.sft.training["learning_rate"] == 1


def test_negative_learning_rate_rejected(tmp_path):
    e = error_of(tmp_path, BASE.replace("learning_rate: 0.1", "learning_rate: -0.1"))
    assert "'sft.training.learning_rate' is -0.1, must be >= 0" in e.line()


def test_strict_types_no_coercion(tmp_path):
    # "42" as a string must not be coerced to the int seed
    e = error_of(tmp_path, BASE + "seed: '42'\n")
    assert "'seed'" in e.line()
    assert f"{tmp_path / 'c.yaml'}:16" in e.line()


def test_invalid_choice_suggests_nearest(tmp_path):
    e = error_of(tmp_path, BASE.replace("learning_rate: 0.1", "lr_scheduler_type: cosin"))
    line = e.line()
    assert "'sft.training.lr_scheduler_type' is 'cosin', not a valid choice" in line
    assert "did you mean 'cosine'?" in line
    assert f"{tmp_path / 'c.yaml'}:15" in line


def test_invalid_literal_in_section(tmp_path):
    e = error_of(tmp_path, BASE.replace("method: full", "method: lroa"))
    assert "'sft.method'" in e.line()
    assert "'lroa'" in e.line()
    assert f"{tmp_path / 'c.yaml'}:13" in e.line()


def test_missing_required_key(tmp_path):
    e = error_of(tmp_path, BASE.replace("  name_or_path: some/model\n", "  dtype: auto\n"))
    assert "missing required key 'model.name_or_path'" in e.line()


def test_owned_trainer_field_rejected(tmp_path):
    e = error_of(tmp_path, BASE.replace("learning_rate: 0.1", "output_dir: somewhere"))
    line = e.line()
    assert "'sft.training.output_dir' is set by posttrain" in line
    assert "--output" in line
    assert f"{tmp_path / 'c.yaml'}:15" in line


@pytest.mark.parametrize(
    "key", ["assistant_only_loss", "chat_template_path", "pad_token", "resume_from_checkpoint"]
)
def test_other_owned_trainer_fields_rejected(tmp_path, key):
    e = error_of(tmp_path, BASE.replace("learning_rate: 0.1", f"{key}: x"))
    assert f"'sft.training.{key}' is set by posttrain" in e.line()


def test_packing_strategy_wrapped_rejected(tmp_path):
    text = BASE.replace("learning_rate: 0.1", "packing: true\n    packing_strategy: wrapped")
    e = error_of(tmp_path, text)
    assert "wrapped" in e.line()
    assert "bfd" in e.line()


def test_packing_strategy_bfd_accepted(tmp_path):
    text = BASE.replace("learning_rate: 0.1", "packing: true\n    packing_strategy: bfd")
    cfg = load_config(write(tmp_path, text))
    assert cfg.sft.training["packing_strategy"] == "bfd"


def test_bf16_and_fp16_together_rejected(tmp_path):
    e = error_of(tmp_path, BASE.replace("learning_rate: 0.1", "bf16: true\n    fp16: true"))
    assert "sft.training sets both bf16 and fp16" in e.line()


# ---------------------------------------------------------------------------------------------
# Stages and cross-section checks


def test_stages_out_of_order_rejected(tmp_path):
    e = error_of(tmp_path, BASE + "stages: [sft, format]\n")
    assert "stages must be a subsequence" in e.line()
    assert f"{tmp_path / 'c.yaml'}:16" in e.line()


def test_stages_repeated_rejected(tmp_path):
    e = error_of(tmp_path, BASE + "stages: [format, sft, sft]\n")
    assert "without repeats" in e.line()


def test_unknown_stage_rejected(tmp_path):
    e = error_of(tmp_path, BASE + "stages: [format, sfft]\n")
    assert "'stages.1'" in e.line()
    assert "'sfft'" in e.line()


def test_sft_data_names_missing_dataset(tmp_path):
    e = error_of(tmp_path, BASE.replace("  method: full", "  method: full\n  data: sf"))
    line = e.line()
    assert "sft.data names dataset 'sf'" in line
    assert "did you mean 'sft'?" in line
    assert str(tmp_path / "c.yaml") in line


def test_sft_data_missing_without_near_match_says_add_section(tmp_path):
    e = error_of(tmp_path, BASE.replace("  method: full", "  method: full\n  data: zzzz"))
    assert "add a data.zzzz section" in e.line()


def test_sft_data_kind_mismatch(tmp_path):
    e = error_of(tmp_path, BASE.replace("  method: full", "  method: full\n  data: pref"))
    line = e.line()
    assert "sft.data 'pref' has kind 'preference'" in line
    assert "needs kind 'sft'" in line


# ---------------------------------------------------------------------------------------------
# Broken files


def test_empty_file(tmp_path):
    e = error_of(tmp_path, "")
    assert "empty" in e.line()
    assert str(tmp_path / "c.yaml") in e.line()


def test_comment_only_file_is_empty(tmp_path):
    e = error_of(tmp_path, "# nothing here\n")
    assert "empty" in e.line()


def test_non_mapping_yaml(tmp_path):
    e = error_of(tmp_path, "- a\n- b\n")
    assert "must be a mapping" in e.line()


def test_scalar_yaml(tmp_path):
    e = error_of(tmp_path, "just a string\n")
    assert "must be a mapping" in e.line()


def test_invalid_yaml(tmp_path):
    e = error_of(tmp_path, "model:\n  name_or_path: [unclosed\n")
    assert "not valid YAML" in e.line()
    assert str(tmp_path / "c.yaml") in e.line()


def test_missing_file(tmp_path):
    with pytest.raises(PosttrainError) as info:
        load_config(tmp_path / "nope.yaml")
    assert "does not exist" in info.value.line()
    assert "nope.yaml" in info.value.line()


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(PosttrainError):
        load_config(tmp_path)


def test_non_utf8_file(tmp_path):
    p = tmp_path / "latin1.yaml"
    p.write_bytes("model:\n  name_or_path: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(PosttrainError) as info:
        load_config(p)
    assert "UTF-8" in info.value.line()
    assert str(p) in info.value.line()


# ---------------------------------------------------------------------------------------------
# --set overrides


def test_set_changes_values(tmp_path):
    p = write(tmp_path, BASE)
    cfg = load_config(p, ["sft.method=lora", "output_dir=out/x", "sft.lora.r=8"])
    assert cfg.sft.method == "lora"
    assert cfg.output_dir == "out/x"
    assert cfg.sft.lora.r == 8


def test_set_parses_yaml_scalars(tmp_path):
    p = write(tmp_path, BASE)
    cfg = load_config(p, ["sft.training.learning_rate=1e-3", "sft.training.packing=true", "sft.training.max_steps=10"])
    lr = cfg.sft.training["learning_rate"]
    assert type(lr) is float and lr == 0.001
    assert cfg.sft.training["packing"] is True
    assert cfg.sft.training["max_steps"] == 10 and type(cfg.sft.training["max_steps"]) is int


def test_set_list_value(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["stages=[format]"])
    assert cfg.stages == ["format"]


def test_set_creates_new_sections(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["template.system_prompt=Be brief."])
    assert cfg.template.system_prompt == "Be brief."


def test_set_value_with_equals_sign(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["template.system_prompt=a=b"])
    assert cfg.template.system_prompt == "a=b"


def test_set_without_file_uses_base(tmp_path):
    base = {"model": {"name_or_path": "m"}, "stages": ["format"]}
    cfg = load_config(None, ["seed=7"], base=base)
    assert cfg.seed == 7
    assert cfg.model.name_or_path == "m"


def test_set_unknown_key_error_names_set(tmp_path):
    e = error_of(tmp_path, BASE, ["sft.training.learnig_rate=1e-3"])
    line = e.line()
    assert line.startswith("--set sft.training.learnig_rate=1e-3: ")
    assert "did you mean 'learning_rate'?" in line


def test_set_wrong_type_error_names_set(tmp_path):
    e = error_of(tmp_path, BASE, ["sft.lora.r=zero"])
    assert e.line().startswith("--set sft.lora.r=zero: ")
    assert "'sft.lora.r' is 'zero'" in e.line()


def test_set_overriding_a_file_key_points_at_set(tmp_path):
    # the file has a valid learning_rate on line 15; the override breaks it
    e = error_of(tmp_path, BASE, ["sft.training.learning_rate=abc"])
    assert e.line().startswith("--set sft.training.learning_rate=abc: ")
    assert ":15" not in e.line()


def test_set_unknown_section_key(tmp_path):
    e = error_of(tmp_path, BASE, ["sft.metod=lora"])
    assert e.line().startswith("--set sft.metod=lora: ")
    assert "unknown key 'sft.metod'" in e.line()
    assert "did you mean 'method'?" in e.line()


def test_set_without_equals(tmp_path):
    e = error_of(tmp_path, BASE, ["sft.training.max_steps"])
    assert "is not key.path=value" in e.line()


def test_set_with_empty_key(tmp_path):
    e = error_of(tmp_path, BASE, ["=3"])
    assert "empty key" in e.line()


def test_set_empty_value_is_null(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["template.system_prompt="])
    assert cfg.template.system_prompt is None


# ---------------------------------------------------------------------------------------------
# Properties: nothing but PosttrainError ever escapes


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=st.one_of(st.dictionaries(_keys, _values, max_size=6), _config_like()))
def test_validate_dict_only_raises_posttrain_error(raw):
    try:
        cfg = validate_dict(raw)
    except PosttrainError as e:
        assert e.line()
        assert "\n" not in e.line()
    else:
        assert isinstance(cfg, Config)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    item=st.one_of(
        st.text(max_size=30),
        st.builds(
            lambda k, v: f"{k}={v}",
            st.sampled_from(
                [
                    "sft.training.learning_rate", "sft.training.max_steps", "sft.training.packing",
                    "sft.training", "sft.lora.r", "sft.method", "model", "model.name_or_path", "data",
                    "data.sft", "data.sft.train", "data.sft.train.0", "stages", "seed", "sft", "template",
                    "sft.training.lr_scheduler_type", "dpo.training.beta", "a.b.c", "output_dir", "..", ".",
                ]
            ),
            st.one_of(
                st.text(max_size=15),
                st.sampled_from(
                    ["1e-3", "true", "null", "[1, 2]", "{a: 1}", "-5", ".nan", "2020-01-01", "!!binary AA==",
                     "!!python/object:os.system x", "[unclosed", "{a", "'q", "*alias", "&anchor x", "---", "~"]
                ),
            ),
        ),
    )
)
def test_set_override_applies_or_raises_posttrain_error(tmp_path_factory, item):
    p = tmp_path_factory.getbasetemp() / "prop_base.yaml"
    if not p.exists():
        p.write_text(BASE, encoding="utf-8")
    try:
        cfg = load_config(p, [item])
    except PosttrainError as e:
        assert e.line()
    else:
        assert isinstance(cfg, Config)


# ---------------------------------------------------------------------------------------------
# The chain: DPO and merge rules

CHAIN = BASE + "dpo:\n  data: pref\n"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["dpo.reference=adapter_disabled"], "needs dpo.method lora or qlora"),
        (["stages=[format, sft, merge]"], "whose method is full: there is no adapter"),
        (["stages=[format, merge]"], "no training stage before it"),
        (["stages=[format, control, eval]"],
         "stages has control (SFT continued from the sft stage's output), but no sft"),
        (["stages=[format, sft, eval]", "eval.data=pref"],
         "--set eval.data=pref: eval.data 'pref' has kind 'preference', but eval needs kind 'sft'"),
        (["eval.pairs=sft"], "eval.pairs 'sft' has kind 'sft', but eval needs kind 'preference'"),
        (["eval.scorers=[{name: x, kind: regex}]"], "kind regex needs a pattern"),
        (["eval.scorers=[{name: x, kind: regex, pattern: '(unclosed'}]"], "is not a regex"),
        (["eval.scorers=[{name: x, kind: function, function: not-a-spec}]"], "is not 'module:function'"),
        (["eval.scorers=[{name: x, kind: exact}, {name: x, kind: normalized}]"], "eval.scorers has repeated names"),
        (["eval.decoding=[{name: g, temperature: -1}]"], "eval.decoding.0.temperature"),
        (["sft.training.hub_token=hf_abc"], "is set by posttrain"),
        (["stages=[format, sft, ppo]"], "ppo scores with this config's reward stage, but stages has no reward"),
        (["stages=[format, sft, grpo]"], "grpo scores with this config's reward stage"),
        (["ppo.batch_size=10", "ppo.mini_batch_size=4"], "not a multiple of ppo.mini_batch_size"),
        (["ppo.kl_cap=0"], "ppo.kl_cap"),
        (["ppo.kl_coeff=0.1"], "did you mean 'kl_coef'"),
        (["grpo.rewards=[{function: 'not a function'}]"], "is not 'module:function'"),
        (["rloo.rewards=[{model: rm, function: 'm:f'}]"], "either a model or a function, not both"),
        (["grpo.rewards=[]"], "grpo.rewards"),
        (["ppo.ptx_coef=0.5", "ppo.ptx_data=pref"],
         "ppo.ptx_data 'pref' has kind 'preference', but ppo (ptx_coef > 0) needs kind 'sft'"),
        (["ppo.mini_batch_size=8", "ppo.gradient_accumulation_steps=3"], "not a multiple of ppo.gradient_accumulation"),
        (["reward.training.center_reward_coefficient=0.01"], "did you mean 'center_rewards_coefficient'"),
        (["grpo.training.num_generation=4"], "did you mean 'num_generations'"),
        (["stages=[sft, format]"], "subsequence"),
        (["dpo.training.loss_type=[sigmoid, sfft]"], "did you mean 'sft'"),
        (["dpo.training.loss_type=[sigmoid, sft]", "dpo.training.loss_weights=[1.0]"], "1 weights for 2 loss types"),
        (["dpo.training.precompute_ref_log_probs=true"], "set dpo.reference: precomputed"),
        (["dpo.step0_tolerance=0"], "dpo.step0_tolerance"),
        (["merge.tolerance=-1"], "merge.tolerance"),
        (["merge.probe_prompts=[]"], "merge.probe_prompts"),
        (["merge.nf4_roundtrip=true"], "did you mean 'nf4_round_trip'"),
    ],
)
def test_chain_rules_are_config_errors(tmp_path, overrides, expected):
    err = error_of(tmp_path, CHAIN, overrides)
    assert expected in err.line(), err.line()
    assert "\n" not in err.line()


def test_stage_checks_name_the_line_and_run_for_a_stage_outside_the_chain(tmp_path):
    """A stage command may run a stage that is not in stages: (the load checks only the chain's);
    config.check_stage checks it when it starts, with the file and line of the key."""
    from posttrain.config import check_stage
    from posttrain.stages import dpo, reward

    p = write(tmp_path, BASE + "dpo:\n  data: prefs\nreward:\n  data: zzzz\n")
    cfg = load_config(p)  # dpo and reward are not in stages: the load does not check their data
    line = BASE.count("\n") + 2
    with pytest.raises(PosttrainError) as info:
        check_stage(cfg, "dpo")
    assert info.value.line().startswith(f"{p}:{line}: dpo.data names dataset 'prefs', which is not under data:")
    assert "did you mean 'pref'?" in info.value.line()
    with pytest.raises(PosttrainError, match="dpo.data names dataset 'prefs'"):  # the stage runs the check first
        dpo.run(cfg, output=str(tmp_path / "dpo"))
    with pytest.raises(PosttrainError, match=rf"c.yaml:{line + 2}: reward.data names dataset 'zzzz'.*"
                       r"add a data.zzzz section \(of kind preference\)"):
        reward.run(cfg, output=str(tmp_path / "reward"))
    check_stage(cfg, "sft")  # sft's dataset is there and of its kind: no error
    assert not (tmp_path / "dpo").exists() and not (tmp_path / "reward").exists()


def test_valid_chains(tmp_path):
    p = write(tmp_path, CHAIN)
    cfg = load_config(p, ["stages=[format, sft, dpo, merge]", "dpo.method=lora", "dpo.reference=adapter_disabled"])
    assert cfg.stages == ["format", "sft", "dpo", "merge"]
    cfg = load_config(p, ["stages=[sft, merge]", "sft.method=qlora", "merge.nf4_round_trip=true"])
    assert cfg.merge.nf4_round_trip is True
    cfg = load_config(p, ["stages=[dpo]", "dpo.training.loss_type=[sigmoid, sft]", "dpo.training.loss_weights=[1, 1]"])
    assert cfg.dpo.training["loss_weights"] == [1, 1]
    cfg = load_config(p, ["stages=[format, sft, reward, ppo, dpo]", "reward.data=pref"])
    assert cfg.uses_reward_stage("ppo") and cfg.stages[2:4] == ["reward", "ppo"]
    cfg = load_config(p, ["stages=[sft, grpo]", "grpo.rewards=[{function: 'checks:exact', weight: 2.0}]"])
    assert not cfg.uses_reward_stage("grpo") and cfg.grpo.rewards[0].weight == 2.0


# ---------------------------------------------------------------------------------------------
# Every field documented (issue 17)


def undescribed_fields(root: type) -> list[str]:
    """`Model.field` for every field without a non-empty description in `root` and every model
    reachable from its field types, through Optional / list / dict / Union / Literal alike."""
    import typing

    from pydantic import BaseModel

    missing, seen, todo = [], set(), [root]
    while todo:
        model = todo.pop(0)
        if model in seen:
            continue
        seen.add(model)
        for name, field in model.model_fields.items():
            if not (field.description or "").strip():
                missing.append(f"{model.__name__}.{name}")
            annotations = [field.annotation]
            while annotations:
                a = annotations.pop()
                if isinstance(a, type) and issubclass(a, BaseModel):
                    todo.append(a)
                annotations.extend(typing.get_args(a))
    return missing


def test_every_config_field_has_a_description():
    missing = undescribed_fields(Config)
    assert not missing, f"{len(missing)} config field(s) without a description: {', '.join(missing)}"


def test_undescribed_fields_finds_fields_without_description_at_any_depth():
    from pydantic import BaseModel, Field

    class Leaf(BaseModel):
        documented: int = Field(1, description="Has one.")
        bare: int = 2
        blank: str = Field("", description="  ")

    class Other(BaseModel):
        plain: float = 0.0

    class Root(BaseModel):
        ok: str = Field("x", description="Has one.")
        leaves: list[Leaf] = Field(default_factory=list, description="Nested in a list.")
        by_name: dict[str, Other] | None = Field(None, description="Nested in an Optional dict.")
        either: Leaf | Other | None = None

    assert sorted(undescribed_fields(Root)) == ["Leaf.bare", "Leaf.blank", "Other.plain", "Root.either"]
    assert undescribed_fields(Leaf) == ["Leaf.bare", "Leaf.blank"]
