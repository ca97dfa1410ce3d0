"""posttrain.stages.control: how many SFT steps the control trains for, from the manifests the
stages between sft and control leave (their train_sequences over SFT's global batch), or
control.steps; and the one-line errors when that cannot be known yet. No training here: the
manifests are written by hand. (A real control stage in a chain, its steps matched to the reward
and DPO stages before it: stages/test_eval.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from posttrain import manifest
from posttrain.errors import PosttrainError
from posttrain.stages import control


def _finished(d: Path, stage: str, **metrics) -> None:
    d.mkdir(parents=True, exist_ok=True)
    manifest.write(d, {"stage": stage, "metrics": metrics})


def test_the_control_matches_the_training_sequences_of_the_stages_after_sft(make_config):
    cfg = make_config(stages=["format", "sft", "dpo", "control"])
    out = Path(cfg.output_dir)
    _finished(out / "sft", "sft", global_batch_size=16)
    _finished(out / "dpo", "dpo", train_sequences=2 * 24 * 8 + 1)
    assert control.matched_steps(cfg, str(out / "sft")) == (25, {"dpo": 385})  # ceil(385 / 16)

    # control.steps wins over the manifests
    assert control.matched_steps(make_config(stages=["format", "sft", "dpo", "control"], control={"steps": 7}),
                                 str(out / "sft")) == (7, {})


def test_what_cannot_be_matched_is_a_one_line_error(make_config):
    cfg = make_config(stages=["format", "sft", "dpo", "control"])
    out = Path(cfg.output_dir)
    _finished(out / "sft", "sft", global_batch_size=16)
    with pytest.raises(PosttrainError, match=r"control matches the compute of the dpo stage, which has no "
                                             r"finished output recording train_sequences — run dpo first, "
                                             r"or set control\.steps"):
        control.matched_steps(cfg, str(out / "sft"))
    alone = make_config(stages=["format", "sft", "control"])
    with pytest.raises(PosttrainError, match=r"control: no stage after sft to match"):
        control.matched_steps(alone, str(out / "sft"))


def test_the_control_refuses_a_base_that_is_no_finished_sft_stage(make_config, tmp_path):
    cfg = make_config(stages=["format", "sft", "control"], control={"steps": 3})
    with pytest.raises(PosttrainError, match=r"control continues the SFT model, and '.*' holds no finished sft stage "
                                             r"— run the sft stage first, or pass --base"):
        control.run(cfg, base=str(tmp_path / "nothing"))
    assert not (Path(cfg.output_dir) / "control").exists()
