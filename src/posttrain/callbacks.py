"""Trainer callbacks shared by the training stages: metrics to JSONL, and the loud failures
(nothing trains, NaN loss) from safeguards #8, #10, #19, #25."""

from __future__ import annotations

import json
import math
from pathlib import Path

from transformers import TrainerCallback

from posttrain.errors import PosttrainError


class MetricsJsonl(TrainerCallback):
    """Append every log record to <output>/metrics.jsonl (read by trackers and the report)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": state.global_step, **logs}) + "\n")


class TrainingGuard(TrainerCallback):
    """Stop loudly when training is not happening: no parameter moved by the first optimizer step
    after warmup, or the loss is NaN/inf. Raised errors reach the CLI as one line, exit 2."""

    def __init__(self, model):
        self.model = model
        self.before = None

    def on_train_begin(self, args, state, control, **kwargs):
        params = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if not params:
            raise PosttrainError(
                "the model has no trainable parameters",
                fix="check the method (full/lora/qlora) and lora.target_modules",
            )
        if state.global_step > 0:  # resumed: the run that wrote the checkpoint did this check
            return
        # A small sample is enough to see whether the optimizer moves anything.
        self.before = {n: p.detach().flatten()[:64].clone() for n, p in params[:: max(1, len(params) // 16)]}

    def on_step_end(self, args, state, control, **kwargs):
        if self.before is None:
            return
        params = dict(self.model.named_parameters())
        changed = [n for n, v in self.before.items() if not params[n].detach().flatten()[:64].to(v.device).equal(v)]
        if changed:
            self.before = None
            return
        # Warmup may start at lr 0: allow the warmup steps before calling it stuck.
        if state.global_step > args.get_warmup_steps(state.max_steps):
            raise PosttrainError(
                "no trainable parameter changed after the first optimizer step (gradients are not flowing)",
                fix="check gradient checkpointing with adapters, the learning rate, and lora.target_modules",
            )

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            raise PosttrainError(
                f"training loss became {loss} at step {state.global_step}",
                fix="lower the learning rate, or use bf16 instead of fp16",
            )


def tensorboard_into(trainer, directory: Path) -> None:
    """TensorBoard logs of a stage go to <stage>/runs. transformers picks the directory at
    on_train_begin, so anything logged before it (posttrain's held-out loss before training) opened
    a writer on ./runs in the working directory and the whole run went there. Setting the directory
    up front fixes both; TENSORBOARD_LOGGING_DIR, when set, still wins."""
    for cb in trainer.callback_handler.callbacks:
        if type(cb).__name__ == "TensorBoardCallback" and getattr(cb, "logging_dir", "") is None:
            cb.logging_dir = str(Path(directory) / "runs")
