"""Disk space: what a training stage will write, checked against the free space before the first
step, and the one-line error when a write fails for lack of space anyway.

The estimate counts what the stage keeps on disk at its fullest: the saved output (all weights, or
only the trainable ones for an adapter), plus the checkpoints held at once, each the saved weights
and two optimizer states per trainable parameter (Adam's moments, in the parameter's dtype: torch's
AdamW allocates them with zeros_like). Rotation writes a new checkpoint before deleting an old
one, so that is save_total_limit + 1, plus the best one kept aside. Each directory also gets
20 MB for the tokenizer, trainer and RNG states and logs, and the whole a 10% margin.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

from posttrain.errors import PosttrainError

MARGIN = 1.10
PER_DIRECTORY = 20_000_000  # tokenizer files (up to ~17 MB for large vocabularies), states, logs
NO_SPACE = ("no space left on device", "disk quota exceeded", "storagefull", "file write failed")


def stage_bytes(model, *, checkpoints: int) -> int:
    """Bytes a stage training `model` writes at its fullest, with `checkpoints` held at once."""
    params = list(model.parameters())
    trainable = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    saved = trainable if hasattr(model, "peft_config") else sum(p.numel() * p.element_size() for p in params)
    optimizer = 2 * trainable
    return int(MARGIN * (saved + checkpoints * (saved + optimizer) + (1 + checkpoints) * PER_DIRECTORY))


def checkpoints_held(save_total_limit: int | None, saves: int, keep_best: bool) -> int:
    """How many checkpoints exist at once: the newest being written, the kept ones, the best."""
    if saves <= 0:
        return 0
    held = saves if not save_total_limit else min(saves, save_total_limit + 1)
    return min(saves, held + int(keep_best))


def check_free_space(out: Path, need: int, what: str) -> None:
    """Fail before training when the disk holding `out` has less than `need` bytes free."""
    free = shutil.disk_usage(_existing(out)).free
    if free < need:
        raise PosttrainError(
            f"'{out}' has {_gb(free)} free, and this stage writes about {_gb(need)} ({what})",
            fix="free space there, write elsewhere with --output, lower save_total_limit, or train an adapter "
            "(method: lora)",
        )


def is_out_of_space(e: BaseException) -> bool:
    """A write that failed because the disk (or quota) is full: OSError ENOSPC/EDQUOT, or the
    messages safetensors and torch.save wrap it in."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e).lower()
    return any(s in text for s in NO_SPACE)


def out_of_space_error(e: BaseException) -> PosttrainError:
    text = " ".join(str(e).split())[:200] or type(e).__name__
    return PosttrainError(
        f"a write failed, the disk looks full: {text}",
        fix="free space (checkpoints saved before this one are intact and nothing was marked finished), "
        "then re-run the same command with --resume",
    )


def _existing(p: Path) -> Path:
    p = Path(p).resolve()
    while not p.exists():
        p = p.parent
    return p


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e7 else f"{n / 1e6:.1f} MB"
