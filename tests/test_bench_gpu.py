"""scripts/bench_gpu.py's posttrain arms measure what `posttrain sft` would run: their SFTConfig
arguments come from posttrain's public seams (common.check_memory, stages/sft.trainer_settings,
models.load_kwargs), not from a copy of them. CPU, the bench's tiny model config."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from posttrain import models
from posttrain.config import validate_dict
from posttrain.stages import common, sft

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    path = ROOT / "scripts" / "bench_gpu.py"
    spec = importlib.util.spec_from_file_location("bench_gpu", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def _spec(tmp_path: Path, arm: str) -> dict:
    """What bench_gpu.run_arm hands an arm for --smoke on the CPU."""
    return {"arm": arm, "model": "tiny", "seq": 128, "batch": 4, "steps": 3, "warmup": 1, "lr": 1e-4, "seed": 0,
            "attn": "sdpa", "dtype": "float32", "device": "cpu", "threads": 1, "workdir": str(tmp_path / "runs"),
            "max_new_tokens": 16, "rollouts": 1, "rollout_warmup": 1}


@pytest.mark.parametrize("arm", ["posttrain-defaults", "posttrain-qlora"])
def test_posttrain_settings_are_sfts_own(bench, tmp_path, arm):
    spec, notes = _spec(tmp_path, arm), []
    got = bench.posttrain_settings(spec, notes)

    cfg, source = bench.posttrain_config(_spec(tmp_path, arm))
    assert cfg.sft.method == ("qlora" if arm == "posttrain-qlora" else "full")
    estimate = common.check_memory(cfg, "sft", str(source))
    expected = sft.trainer_settings(cfg, Path(spec["workdir"]) / arm, has_eval=False, estimate=estimate)
    assert got == expected
    # what SFT adds on top of common.trainer_kwargs, and the bench's own training values
    assert got["assistant_only_loss"] is False and got["include_num_input_tokens_seen"] == "non_padding"
    assert (got["per_device_train_batch_size"], got["max_steps"], got["max_length"]) == (4, 4, 128)
    assert got["activation_checkpointing"] is estimate.settings.checkpointing
    assert any(n.startswith("posttrain's memory estimate") for n in notes)
    # the model loads as posttrain would load it
    load = models.load_kwargs(cfg, "full")
    assert spec["dtype"] == str(load["dtype"]).removeprefix("torch.")
    assert spec["attn"] == load.get("attn_implementation", "sdpa")


def _cfg(tmp_path: Path, **sft_section):
    return validate_dict({"model": {"name_or_path": str(tmp_path / "model")}, "stages": ["sft"],
                          "data": {"sft": {"kind": "sft", "train": [{"path": "unused.jsonl"}]}},
                          "sft": {"training": {"save_steps": 5}, **sft_section}})


@pytest.mark.parametrize("value", [True, False])
def test_sft_settings_carry_the_configs_assistant_only_loss(tmp_path, value):
    cfg = _cfg(tmp_path, assistant_only_loss=value)
    settings = sft.trainer_settings(cfg, tmp_path / "sft", has_eval=False)
    assert settings["assistant_only_loss"] is value
    assert settings == {**common.trainer_kwargs(cfg, "sft", tmp_path / "sft", has_eval=False),
                        "assistant_only_loss": value, "include_num_input_tokens_seen": "non_padding"}


def test_sft_settings_take_the_control_stages_steps(tmp_path):
    cfg = _cfg(tmp_path)
    assert "max_steps" not in sft.trainer_settings(cfg, tmp_path / "sft", has_eval=False)
    assert sft.trainer_settings(cfg, tmp_path / "control", has_eval=False, max_steps=7)["max_steps"] == 7
    cfg = _cfg(tmp_path, training={"include_num_input_tokens_seen": "all"})
    assert sft.trainer_settings(cfg, tmp_path / "sft", has_eval=False)["include_num_input_tokens_seen"] == "all"
