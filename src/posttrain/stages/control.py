"""`posttrain control`: the control row of the report, SFT continued for the same compute.

A stage after SFT may look good only because it trained longer: PPO-ptx and DPO with an SFT term
keep training on the SFT data. The control takes the SFT output and continues SFT, with the sft
section's settings and data, for as many training sequences as the stages between sft and control
processed (`train_sequences` in their manifests: each side of a preference pair, each rollout and
each PPO training pass count one). The report sets every later stage beside it, so a stage is
credited only with what more SFT would not have done. `control.steps` sets the count by hand.
"""

from __future__ import annotations

from pathlib import Path

from posttrain import lineage, manifest
from posttrain.config import Config
from posttrain.errors import PosttrainError
from posttrain.stages import sft


def run(cfg: Config, *, base: str | None = None, output: str | None = None,
        resume: bool = False, overwrite: bool = False) -> Path:
    source = base or lineage.stage_dir(cfg, "sft")
    if not manifest.is_finished(source):
        raise PosttrainError(f"control continues the SFT model, and '{source}' holds no finished sft stage",
                             fix="run the sft stage first, or pass --base")
    steps, matched = matched_steps(cfg, source)
    return sft.run(cfg, base=source, output=output, resume=resume, overwrite=overwrite, stage="control",
                   max_steps=steps, record={"control": {"steps": steps, "matched": matched}})


def matched_steps(cfg: Config, sft_dir: str) -> tuple[int, dict]:
    """(SFT steps, {stage: training sequences}) for the compute of the stages after sft."""
    steps, matched = lineage.control_steps(cfg, sft_dir)
    if steps is not None:
        return steps, matched
    missing = [s for s, n in matched.items() if n is None]
    if missing:
        raise PosttrainError(f"control matches the compute of the {missing[0]} stage, which has no finished output "
                             "recording train_sequences", fix=f"run {missing[0]} first, or set control.steps")
    raise PosttrainError("control: no stage after sft to match (or the sft stage recorded no batch size)",
                         fix="put the stages to compare between sft and control in stages:, or set control.steps")


key_metrics = sft.key_metrics  # the chain summary's numbers: SFT's (held-out loss, steps)
