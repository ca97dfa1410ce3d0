"""The table of stages (posttrain.registry) is the only list of stages: the config, the commands,
the launcher, the memory estimate, lineage, the preview and the report derive theirs from it, and
each stage module answers for its own run() and key metrics."""

from __future__ import annotations

import ast
import importlib
import inspect
import json
from importlib import resources
from pathlib import Path

import pytest
import typer

from posttrain import chain, config, lineage, memory, registry
from posttrain.cli import app
from posttrain.errors import PosttrainError
from posttrain.stages import common

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "posttrain"


def test_table_records_are_consistent():
    assert list(registry.STAGES) == list(registry.NAMES)
    fields = set(config.Config.model_fields)
    for s in registry.STAGES.values():
        assert s.section in fields, s.name
        assert s.help.endswith("."), s.name
        if s.data is not None:  # its section names the dataset it reads
            assert "data" in config.Config.model_fields[s.section].annotation.model_fields, s.name
        if s.launched:  # a training stage plots what it logged
            assert s.curves, s.name
        assert (s.color is not None) == s.model, s.name  # every model stage has its colour in the report
        if s.trl_config is not None:
            assert s.launched, s.name
    snapshot = json.loads(resources.files("posttrain").joinpath("trl_fields.json").read_text())
    assert {s.trl_config for s in registry.STAGES.values() if s.trl_config} <= set(snapshot["configs"])


def test_every_stage_module_runs_and_reports_its_key_metrics():
    for s in registry.STAGES.values():
        module = importlib.import_module(s.module)
        assert callable(module.run), s.name
        assert set(inspect.signature(module.key_metrics).parameters) == {"m"}, s.name
        if s.launched:  # the one command shape of the training stages
            assert {"base", "output", "resume", "overwrite"} <= set(inspect.signature(module.run).parameters)


def test_stage_modules_import_no_torch():
    """The chain summary imports each stage module for its key_metrics, also for stages that are up
    to date: that must not cost a torch import (heavy imports live inside functions)."""
    import subprocess
    import sys

    code = ("import sys, importlib; from posttrain import registry\n"
            "for s in registry.STAGES.values(): importlib.import_module(s.module)\n"
            "print(sorted(m for m in ('torch', 'transformers', 'trl', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_config_chain_order_is_the_table_order():
    field = config.Config.model_fields["stages"]
    assert ", ".join(registry.NAMES) in field.description
    assert _cfg(list(registry.NAMES[:2])).stages == ["format", "sft"]
    with pytest.raises(PosttrainError, match="subsequence"):
        _cfg(["sft", "format"])
    with pytest.raises(PosttrainError, match="finetune"):
        _cfg(["format", "finetune"])


def test_every_stage_is_a_command_with_the_tables_help():
    commands = typer.main.get_command(app).commands
    for s in registry.STAGES.values():
        assert s.name in commands, s.name
        assert commands[s.name].help.split("\n")[0] == s.help, s.name
    training = {n for n, c in commands.items() if any(p.name == "num_processes" for p in c.params)} - {"run"}
    assert training == set(registry.names(launched=True))


def test_training_sections_are_checked_against_their_trl_config():
    assert config.TRAINING_SECTIONS == {"sft": "SFTConfig", "reward": "RewardConfig", "rloo": "RLOOConfig",
                                        "grpo": "GRPOConfig", "dpo": "DPOConfig"}
    for section in config.TRAINING_SECTIONS:
        with pytest.raises(PosttrainError, match=f"{section}.training"):
            config.validate_dict({**_raw(["format", "sft"]), section: {"training": {"no_such_field": 1}}})


def test_derived_sets():
    assert registry.names(role="policy") == ("sft", "ppo", "rloo", "grpo", "dpo")
    assert registry.names(rl=True) == ("ppo", "rloo", "grpo")
    assert registry.names(launched=True) == ("sft", "reward", "ppo", "rloo", "grpo", "dpo", "control")
    assert registry.names(best="eval_loss") == ("sft", "reward", "dpo", "control")
    assert registry.names(liger=True) == ("sft", "reward", "dpo", "control")
    assert registry.names(preview=True) == ("sft", "dpo")
    assert registry.names(compared=True) == ("sft", "ppo", "rloo", "grpo", "dpo", "merge", "control")


def _raw(stages: list[str]) -> dict:
    return {"model": {"name_or_path": "base"}, "output_dir": "out", "stages": stages,
            "data": {"sft": {"kind": "sft", "train": [{"path": "s.jsonl"}]},
                     "preference": {"kind": "preference", "train": [{"path": "p.jsonl"}]}},
            "ppo": {"data": "sft", "reward_model": "rm"}, "dpo": {"method": "lora"}}


def _cfg(stages: list[str]) -> config.Config:
    return config.validate_dict(_raw(stages))


def test_chain_plan_follows_policy_and_merge_outputs():
    cfg = _cfg(["format", "sft", "reward", "ppo", "dpo", "merge", "control", "eval", "export"])
    parents = {s.stage: s.parent for s in chain.plan(cfg)}
    assert parents == {"format": None, "sft": "base", "reward": "out/sft", "ppo": "out/sft", "dpo": "out/ppo",
                       "merge": "out/dpo", "control": "out/sft", "eval": None, "export": "out/merge"}
    assert cfg.model_stage_before("export") == "merge" and cfg.model_stage_before("merge") == "dpo"
    assert cfg.starts_from("merge") == "dpo" and cfg.starts_from("reward") == "sft" and cfg.starts_from("sft") is None


def test_eval_rows_put_the_control_under_sft():
    cfg = _cfg(["format", "sft", "reward", "ppo", "dpo", "merge", "control", "eval"])
    assert [label for label, _ in lineage.eval_models(cfg)] == ["base", "sft", "control", "ppo", "dpo", "merge"]
    assert lineage.control_matches(cfg) == ["reward", "ppo", "dpo"]
    assert lineage.datasets_of(cfg, "control") == ["sft"] and lineage.datasets_of(cfg, "merge") == []


def test_memory_estimates_exactly_the_launched_stages(tmp_path):
    cfg = _cfg(["format", "sft"])
    for stage in ("format", "merge", "eval"):
        with pytest.raises(PosttrainError, match="no memory estimate"):
            memory.stage_settings(cfg, stage, "base", cuda=False)


# The chain summary's numbers, per stage, from a manifest: what each stage module's key_metrics gives.
MANIFESTS = {
    "format": ({"datasets": {"sft": {"train_rows": 10}}}, {"sft rows": 10}),
    "sft": ({"metrics": {"eval_loss_after": 1.5, "steps": 4}}, {"eval loss": 1.5, "steps": 4}),
    "control": ({"metrics": {"eval_loss_after": 1.25, "steps": 2}}, {"eval loss": 1.25, "steps": 2}),
    "reward": ({"metrics": {"accuracy": 0.75, "margin": 0.5, "length_correlation": 0.1}},
               {"held-out acc": 0.75, "margin": 0.5, "length corr": 0.1}),
    "dpo": ({"metrics": {"reward_accuracy": 0.6, "reward_margin": 0.2, "steps": 3}},
            {"reward acc": 0.6, "margin": 0.2, "steps": 3}),
    "ppo": ({"metrics": {"score_first": -1.0, "score_last": 2.5, "kl_last": 0.01, "steps": 5}},
            {"score": "-1 → 2.5", "kl": 0.01, "steps": 5}),
    "rloo": ({"metrics": {"score_first": 0.123456, "score_last": None, "kl_last": 0.0, "steps": 1}},
             {"score": "0.1235 → None", "kl": 0.0, "steps": 1}),
    "grpo": ({"metrics": {"score_first": 1.0, "score_last": 1.5, "kl_last": 0.2, "steps": 2}},
             {"score": "1 → 1.5", "kl": 0.2, "steps": 2}),
    "merge": ({"checks": {"parity": {"max_abs_diff": 1e-4}, "reload": {"stopped": "2/3"}}},
              {"parity Δ": 1e-4, "stops": "2/3"}),
    "eval": ({"models": [1, 2, 3], "settings": {"prompts": 8}}, {"models": 3, "prompts": 8}),
    "export": ({"type": "q8_0", "checks": {"round_trip": {"relative_diff": 0.02, "same_answers": 3}}},
               {"type": "q8_0", "round-trip Δ": 0.02, "same answers": 3}),
}


@pytest.mark.parametrize("stage", registry.NAMES)
def test_key_metrics_per_stage(stage):
    m, want = MANIFESTS[stage]
    assert common.key_metrics({"stage": stage, **m}) == want
    assert common.key_metrics({"stage": "not-a-stage", **m}) == {}


# ---------------------------------------------------------------------------------------------
# No other list: a literal of three or more stage names anywhere in src/ outside the table is a
# second list to keep in step by hand.


def stage_lists(source: str) -> list[int]:
    """Lines of tuple/list/set literals and dict keys holding three or more stage names."""
    names = set(registry.NAMES)
    found = []
    for node in ast.walk(ast.parse(source)):
        items = node.keys if isinstance(node, ast.Dict) else node.elts if isinstance(
            node, (ast.Tuple, ast.List, ast.Set)) else []
        strings = [n.value for n in items if isinstance(n, ast.Constant) and isinstance(n.value, str)]
        if sum(s in names for s in strings) >= 3:
            found.append(node.lineno)
    return found




def test_no_stage_list_outside_the_table():
    found = {}
    for path in SRC.rglob("*.py"):
        if path.name == "registry.py":
            continue
        lines = stage_lists(path.read_text(encoding="utf-8"))
        if lines:
            found[str(path.relative_to(SRC))] = lines
    assert not found, f"stage lists outside posttrain/registry.py: {found}"


def test_stage_list_scan_negative_control():
    assert stage_lists('X = ("sft", "ppo", "dpo")\nY = {"sft": 1, "reward": 2, "rloo": 3}\n') == [1, 2]
    assert stage_lists('X = ("sft", "ppo")\nY = ["sft", "other", "thing"]\n') == []
