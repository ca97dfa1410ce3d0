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
        from posttrain.launch import distribution

        distribution()  # the processes are set up as the launch asked (FSDP on CPUs is not)
        if state.is_world_process_zero:
            _check_disk(self.model, args, state)
        if state.global_step > 0:  # resumed: the run that wrote the checkpoint did this check
            return
        # The first elements of every trainable tensor: a sample of tensors could hold only LoRA A
        # matrices, which cannot move in the first step while B is still zero.
        self.before = {n: p.detach().flatten()[:64].clone() for n, p in params}

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:
            check_processes_agree(self.model, "after the first optimizer step")
        self.check_changed(args, state)

    def check_changed(self, args, state) -> None:
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

    def on_train_end(self, args, state, control, **kwargs):
        check_processes_agree(self.model, f"at the end of training (step {state.global_step})")

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            raise PosttrainError(
                f"training loss became {loss} at step {state.global_step}",
                fix="lower the learning rate, or use bf16 instead of fp16",
            )


def any_process(flag: bool, device) -> bool:
    """`flag` on any process (an all-reduced max; the flag itself with one process). torchrun
    passes a signal on to the processes one after another, so each may see it at another step;
    they must stop at the same one, or one saves while the others wait in the next step's
    gradient all-reduce."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def check_processes_agree(model, when: str) -> None:
    """With several processes, every one must hold the same trainable weights (data parallelism
    averages the gradients, so the updates are identical). If they differ, each process is
    training a model of its own and the saved one saw only its share of the data: stop. Compares
    two sums over the trainable parameters (fp64) across processes: two small all-reduces."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    if not params or any(type(p).__name__ == "DTensor" or p.numel() == 0 for p in params):
        return  # sharded (FSDP2/ZeRO-3): each process holds a different shard by design
    device = params[0].device
    local = torch.stack([sum(p.detach().double().sum() for p in params),
                         sum(p.detach().double().square().sum() for p in params)]).to(device)
    high, low = local.clone(), local.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    # DDP replicas are bit-identical (the same averaged gradients, the same optimizer arithmetic),
    # so any difference is real; 1e-12 of each sum's own size leaves room only for fp64 rounding
    if ((high - low).abs() > 1e-12 * low.abs().clamp(min=1e-30)).any():
        raise PosttrainError(
            f"the {dist.get_world_size()} processes hold different weights {when}: their gradients were not "
            "averaged, so each trained a model of its own on part of the data",
            fix="report this as a bug with the accelerate config used; meanwhile train with --num-processes 1",
        )


def _check_disk(model, args, state) -> None:
    """Free space for the output and the checkpoints this run will hold at once (posttrain.disk)."""
    from posttrain import disk

    steps_left = max(0, state.max_steps - state.global_step)
    if args.save_strategy == "no":
        saves = 0
    elif args.save_strategy == "steps":
        every = args.save_steps if args.save_steps >= 1 else math.ceil(args.save_steps * state.max_steps)
        saves = steps_left // max(1, int(every))
    else:  # per epoch or on a new best: as many as rotation allows
        saves = steps_left
    held = disk.checkpoints_held(args.save_total_limit, saves, keep_best=args.metric_for_best_model is not None)
    disk.check_free_space(Path(args.output_dir).parent, disk.stage_bytes(model, checkpoints=held),
                          f"the weights and {held} checkpoint{'s' if held != 1 else ''}")


class PackingCheck(TrainerCallback):
    """models.check_packing when training begins: the model is on its device by then (flash
    attention runs on GPUs only), and resumed runs are checked too."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from posttrain import models

        models.check_packing(model)


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
        if any_process(self.stop.requested, args.device):
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


EARLY_STEPS = 10  # "within the first steps" for DPO's collapse alarm (or 5% of the run, if longer)


class DPOGuard(TrainerCallback):
    """Safeguard #8: stop on a zero gradient norm or a loss that collapses to ~0 within the first steps."""

    def __init__(self, args, collapse_loss: float):
        self.collapse_loss = collapse_loss
        self.early = max(EARLY_STEPS, int(0.05 * max(args.max_steps, 0)))

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if logs.get("grad_norm") == 0.0:
            raise PosttrainError(
                f"the gradient norm is 0 at step {state.global_step}: nothing is learning",
                fix="check that chosen and rejected differ after the prompt, and the learning rate",
            )
        loss = logs.get("loss")
        if loss is not None and loss < self.collapse_loss and state.global_step <= self.early:
            raise PosttrainError(
                f"the DPO loss fell to {loss:.4g} by step {state.global_step}: it collapsed instead of learning",
                fix="check that the reference is the starting model (dpo.reference) and that the pairs are not "
                "trivially separable; lower the learning rate or raise beta",
            )
