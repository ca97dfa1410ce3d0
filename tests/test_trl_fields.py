"""The torch-free snapshot of TRL's config fields must match the installed TRL exactly."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from posttrain.config import trl_fields

ROOT = Path(__file__).resolve().parents[1]


def test_snapshot_matches_installed_trl():
    spec = importlib.util.spec_from_file_location("dump_trl_fields", ROOT / "scripts" / "dump_trl_fields.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    live = mod.snapshot()
    assert live == trl_fields(), "run: python scripts/dump_trl_fields.py"
    sft = live["configs"]["SFTConfig"]
    assert {"learning_rate", "max_length", "packing", "assistant_only_loss"} <= set(sft)
    assert sft["learning_rate"]["kinds"] == ["float"]


def test_dpo_loss_types_match_trl():
    """config.DPO_LOSS_TYPES (checked without importing TRL) is exactly the set DPOTrainer handles."""
    import re

    import trl.trainer.dpo_trainer as dpo_trainer

    from posttrain.config import DPO_LOSS_TYPES

    source = Path(dpo_trainer.__file__).read_text()
    handled = set(re.findall(r'loss_type == "(\w+)"', source))
    assert handled == set(DPO_LOSS_TYPES)
