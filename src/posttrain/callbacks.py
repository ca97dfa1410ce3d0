"""Trainer callbacks shared by the training stages: metrics to JSONL, and the loud failures
(nothing trains, NaN loss) from safeguards #8, #10, #19, #25."""

from __future__ import annotations

import json
import math
import signal
import threading
from pathlib import Path

from transformers import TrainerCallback

from posttrain.errors import Interrupted, PosttrainError


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


class StopSignal:
    """SIGINT / SIGTERM during training: finish the optimizer step under way, save a checkpoint,
    stop, and say so (`raise_if_stopped`, after training returns). A second signal stops at once.
    Handlers are installed only in the main thread and put back when training ends."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for s in self.SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # the second one: no more waiting
            self.restore()
            raise KeyboardInterrupt
        self.signum = signum
        from posttrain.console import console

        console.print(f"[yellow]{signal.Signals(signum).name}[/]: finishing this step and saving a checkpoint "
                      "(send it again to stop at once)")

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def raise_if_stopped(self, step: int, checkpoint) -> None:
        if self.signum is None:
            return
        raise Interrupted(f"stopped by {signal.Signals(self.signum).name} at step {step}; checkpoint saved in "
                          f"'{checkpoint}'", signum=self.signum,
                          fix="run the same command with --resume (or `posttrain run` again) to continue from it")


class StopOnSignal(TrainerCallback):
    """StopSignal for the HF trainers: after the step a signal arrived in, save and stop."""

    def __init__(self):
        self.stop = StopSignal()

    def on_train_begin(self, args, state, control, **kwargs):
        self.stop.install()

    def on_step_end(self, args, state, control, **kwargs):
        if self.stop.requested:
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        self.stop.restore()

    def raise_if_stopped(self, trainer) -> None:
        from pathlib import Path

        step = trainer.state.global_step
        self.stop.raise_if_stopped(step, Path(trainer.args.output_dir) / f"checkpoint-{step}")


def tensorboard_into(trainer, directory: Path) -> None:
    """TensorBoard logs of a stage go to <stage>/runs. transformers picks the directory at
    on_train_begin, so anything logged before it (posttrain's held-out loss before training) opened
    a writer on ./runs in the working directory and the whole run went there. Setting the directory
    up front fixes both; TENSORBOARD_LOGGING_DIR, when set, still wins."""
    for cb in trainer.callback_handler.callbacks:
        if type(cb).__name__ == "TensorBoardCallback" and getattr(cb, "logging_dir", "") is None:
            cb.logging_dir = str(Path(directory) / "runs")
