"""What a stage came from: its parent directory and a key over everything that decides its output.

Every stage manifest holds `parent` (path, hash, stage) and `inputs_key`. The key covers the
config sections the stage reads, the contents of its local data files and the parent's identity
(the hash of the parent's manifest and configs, so a re-run parent changes every child's key).
The chain runner skips a stage whose finished manifest holds the key it computes now, and
resumes an interrupted one only when the key it started with is still the same.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from posttrain import manifest
from posttrain.config import Config, to_dict

STARTED = "posttrain.started.json"


def datasets_of(cfg: Config, stage: str) -> list[str]:
    """Names of the datasets under data: that a stage reads."""
    if stage == "format":
        return cfg.format.datasets or list(cfg.data)
    section = getattr(cfg, stage, None)
    name = getattr(section, "data", None)
    return [name] if name in cfg.data else []


def reward_models_of(cfg: Config, stage: str) -> list[str]:
    """The reward-model directories an RL stage reads (this config's reward stage or named ones):
    part of its key, so a retrained reward model reruns the stage."""
    from posttrain.config import RL_STAGES

    if stage not in RL_STAGES:
        return []
    chain_rm = str(Path(cfg.output_dir) / "reward")
    if stage == "ppo":
        return [cfg.ppo.reward_model or chain_rm] + ([cfg.ppo.value_model] if cfg.ppo.value_model else [])
    return [r.model or chain_rm for r in getattr(cfg, stage).rewards if r.function is None]


def reward_functions_of(cfg: Config, stage: str) -> list[str]:
    from posttrain.config import RL_STAGES

    if stage not in RL_STAGES or stage == "ppo":
        return []
    return [r.function for r in getattr(cfg, stage).rewards if r.function is not None]


def parent_record(source: str | None) -> dict | None:
    """The parent as recorded in a manifest: path, a hash of its identifying files, its stage."""
    if source is None:
        return None
    p = Path(source)
    if not p.is_dir():
        return {"path": source, "hash": None, "stage": None}
    m = manifest.read(p) or {}
    return {"path": str(p), "hash": manifest.directory_hash(p), "stage": m.get("stage")}


def stage_key(cfg: Config, stage: str, parent: str | None) -> str:
    """A hash of everything that decides a stage's output (not where it is written)."""
    from posttrain.data import file_hash

    d = to_dict(cfg)
    names = datasets_of(cfg, stage)
    relevant = {
        "stage": stage,
        "model": d["model"],
        "template": d["template"],
        "seed": d["seed"],
        "section": d.get(stage),
        "data": {n: d["data"][n] for n in names},
    }
    files = {}
    for n in names:
        for src in [*cfg.data[n].train, *cfg.data[n].eval]:
            p = Path(src.path)
            for f in sorted(p.rglob("*")) if p.is_dir() else [p] if p.is_file() else []:
                if f.is_file():
                    files[str(f)] = file_hash(f)
    for spec in reward_functions_of(cfg, stage):
        module = Path(cfg._source_dir or ".", *spec.split(":")[0].split(".")).with_suffix(".py")
        if module.is_file():  # a reward function next to the config: its code decides the output
            files[str(module)] = file_hash(module)
    parent_info = parent_record(parent)
    readers = [[r["path"], r["hash"]] for r in map(parent_record, reward_models_of(cfg, stage))]
    blob = json.dumps([relevant, files, parent_info and [parent_info["path"], parent_info["hash"]], *readers],
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def mark_started(out: Path, key: str) -> None:
    """Written when training starts: an interrupted stage may resume only with the same key."""
    (Path(out) / STARTED).write_text(json.dumps({"inputs_key": key, "started": manifest.now()}) + "\n")


def started_key(out: Path) -> str | None:
    p = Path(out) / STARTED
    try:
        return json.loads(p.read_text()).get("inputs_key") if p.is_file() else None
    except json.JSONDecodeError:
        return None
