"""Lineage manifests (`posttrain.json`): what a stage directory is and what it came from.

The manifest is written last and atomically (write to a temp file, fsync, rename): a directory
without it is not a finished stage, whatever else it holds.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path

from posttrain.errors import PosttrainError

MANIFEST = "posttrain.json"
PACKAGES = ("posttrain", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes", "tokenizers")


def versions() -> dict[str, str | None]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    out["python"] = platform.python_version()
    return out


def git_commit() -> str | None:
    """The commit of the posttrain checkout (None when installed from a wheel or not in git)."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def write(directory: str | Path, data: dict) -> Path:
    """Write the manifest atomically; this marks the directory as a finished stage."""
    directory = Path(directory)
    path = directory / MANIFEST
    tmp = directory / f".{MANIFEST}.tmp"
    with tmp.open("w") as f:
        json.dump(data, f, indent=2, sort_keys=False, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def read(directory: str | Path) -> dict | None:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise PosttrainError(f"'{path}' is not valid JSON", fix="re-run the stage that made it") from None


def is_finished(directory: str | Path) -> bool:
    return (Path(directory) / MANIFEST).is_file()


def directory_hash(directory: str | Path) -> str:
    """Hash of a model directory's small identifying files (configs, not weights)."""
    h = hashlib.sha256()
    d = Path(directory)
    for name in ("config.json", "adapter_config.json", "tokenizer_config.json", MANIFEST, "posttrain-gguf.json"):
        p = d / name
        if p.is_file():
            h.update(name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


STAGE_MARKERS = (MANIFEST, "posttrain.started.json", "checkpoints", "metrics.jsonl", "config.resolved.yaml")


def prepare_output(directory: str | Path, *, overwrite: bool, resume: bool = False) -> Path:
    """Make the stage directory ready; never lets an unfinished one look finished.

    A finished directory is kept unless --overwrite. With --resume only the manifest goes (the
    checkpoints stay); otherwise an earlier stage directory is cleared, so no stale file of an
    older run survives. A non-empty directory that is not a posttrain stage is never touched.
    """
    d = Path(directory)
    if is_finished(d) and not overwrite and not resume:
        raise PosttrainError(
            f"'{d}' already holds a finished stage",
            fix="pass --overwrite to replace it, or choose another --output",
        )
    if d.exists() and not d.is_dir():
        raise PosttrainError(f"output '{d}' exists and is not a directory")
    if d.is_dir() and not resume and any(d.iterdir()):
        if not any((d / m).exists() for m in STAGE_MARKERS):
            raise PosttrainError(
                f"output directory '{d}' is not empty and holds no posttrain stage",
                fix="choose an empty or new directory with --output",
            )
        import shutil

        shutil.rmtree(d)
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PosttrainError(f"cannot create output directory '{d}': {e.strerror}") from None
    probe = d / ".posttrain-write-test"
    try:  # a real write: permissions, read-only mounts and full disks all show here
        probe.write_bytes(b"posttrain")
        probe.unlink()
    except OSError as e:
        raise PosttrainError(f"output directory '{d}' is not writable: {e.strerror}",
                             fix="choose another --output, or free space / fix its permissions") from None
    (d / MANIFEST).unlink(missing_ok=True)
    return d
