"""A stage's checkpoints under `<stage>/checkpoints/`: finding them (`sorted_checkpoints`), the one
a resume continues from (`last_checkpoint`, skipping incomplete and damaged ones: `damaged_file`),
what the manifest records of them (`checkpoints_record`), and posttrain's PPO checkpoint format
(`save_ppo`, `load_ppo`: weights, optimizer and random state, trainer_state.json last; rotation
keeping the newest and the best, `rotated`, `best_by_reward`). The TRL stages' checkpoints are
written by transformers' Trainer in the same layout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from posttrain.console import console

CHECKPOINTS = "checkpoints"


def sorted_checkpoints(out: Path) -> list[Path]:
    d = out / CHECKPOINTS
    found = [p for p in d.glob("checkpoint-*") if p.name.rsplit("-", 1)[-1].isdigit()] if d.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.rsplit("-", 1)[-1]))


def checkpoints_record(out: Path) -> dict:
    """The checkpoints rotation kept, and the best by held-out loss (TRL stages) or reward (PPO),
    as the newest checkpoint's trainer state recorded it."""
    kept = sorted_checkpoints(out)
    state = {}
    if kept:
        try:
            state = json.loads((kept[-1] / "trainer_state.json").read_text())
        except (OSError, json.JSONDecodeError):
            pass
    best = state.get("best_model_checkpoint")
    return {"kept": [p.name for p in kept], "best": Path(best).name if best else None,
            "best_metric": state.get("best_metric")}


def last_checkpoint(out: Path) -> Path | None:
    """The newest complete, readable checkpoint. The trainer writes trainer_state.json last, so a
    process killed while saving leaves a checkpoint without it (or with a torn one): skip such. A
    checkpoint whose weights or optimizer/RNG files are truncated (a full disk, a copy cut short)
    is skipped too, with a warning naming the file, so a resume falls back to the one before."""
    for ckpt in reversed(sorted_checkpoints(out)):
        try:
            json.loads((ckpt / "trainer_state.json").read_text())
        except (OSError, json.JSONDecodeError):
            continue
        damaged = damaged_file(ckpt)
        if damaged is None:
            return ckpt
        console.print(f"[yellow]warning[/] {ckpt} is damaged ({damaged}); trying the checkpoint before it",
                      soft_wrap=True)
    return None


def damaged_file(ckpt: Path) -> str | None:
    """The first unreadable file of a checkpoint: safetensors whose header or length is wrong, or
    torch files (.pt/.pth/.bin, zip archives) without their end record. None when all read."""
    import zipfile

    from safetensors import safe_open

    for f in sorted(ckpt.rglob("*")):
        if f.suffix == ".safetensors":
            try:
                with safe_open(str(f), "pt"):
                    pass
            except Exception as e:  # noqa: BLE001 (safetensors raises its own error types)
                return f"{f.name}: {str(e).splitlines()[0]}"
        elif f.suffix in (".pt", ".pth", ".bin") and not zipfile.is_zipfile(f):
            return f"{f.name}: not a complete torch archive"
    return None


# ---------------------------------------------------------------------------------------------
# posttrain's PPO: weights (safetensors), optimizer, random state; trainer_state.json last


def save_ppo(acc, model, optimizer, out: Path, it: int, state: dict, *, reward: float, best: tuple,
             limit: int) -> tuple:
    """checkpoint-<it>: every process's random state, the main process's weights and optimizer,
    then `state` with the best checkpoint so far (by `reward`, this iteration's mean reward) as
    trainer_state.json, then rotation down to `limit`, keeping the newest and the best. Returns the
    best (checkpoint, reward) on the main process; the others get `best` back."""
    import torch
    from safetensors.torch import save_model

    d = out / CHECKPOINTS / f"checkpoint-{it}"
    if acc.is_main_process:
        d.mkdir(parents=True, exist_ok=True)
    acc.wait_for_everyone()
    torch.save(rng_state(), d / f"rng_{acc.process_index}.pth")
    if acc.is_main_process:
        save_model(acc.unwrap_model(model), str(d / "model.safetensors"))
        torch.save(optimizer.state_dict(), d / "optimizer.pt")
    acc.wait_for_everyone()
    if acc.is_main_process:
        best = best_by_reward(best, str(d), reward)
        state = {**state, "best_model_checkpoint": best[0], "best_metric": best[1]}
        (d / "trainer_state.json").write_text(json.dumps(state, indent=1))
        for old in rotated(sorted_checkpoints(out), limit, best[0]):
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return best


def load_ppo(acc, model, optimizer, d: Path) -> dict:
    """Restore a save_ppo checkpoint's weights, optimizer and this process's random state; return
    its trainer state."""
    import torch
    from safetensors.torch import load_model

    state = json.loads((d / "trainer_state.json").read_text())
    load_model(acc.unwrap_model(model), str(d / "model.safetensors"), device=str(acc.device))
    optimizer.load_state_dict(torch.load(d / "optimizer.pt", weights_only=True))
    rng = d / f"rng_{acc.process_index}.pth"
    if rng.is_file():
        set_rng_state(torch.load(rng, weights_only=False))
    return state


def best_by_reward(best: tuple, checkpoint: str, reward: float) -> tuple:
    """The checkpoint whose iteration had the highest mean reward (score minus the KL penalty)."""
    return (checkpoint, reward) if best[1] is None or reward > best[1] else best


def rotated(checkpoints: list[Path], limit: int, best: str | None) -> list[Path]:
    """Which checkpoints rotation deletes: the oldest, keeping `limit`, the newest and the best
    (as transformers' Trainer does)."""
    protected = {checkpoints[-1].name, Path(best).name if best else None} - {None} if checkpoints else set()
    extra = len(checkpoints) - max(limit, len(protected))
    return [p for p in checkpoints if p.name not in protected][: max(0, extra)]


def truncate_after(path: Path, step: int) -> None:
    """Drop the lines of a JSON-lines log whose step is past `step` (written after the checkpoint a
    resume continues from)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in keep))


def rng_state() -> dict:
    import random

    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import random

    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
