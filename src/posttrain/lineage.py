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

from posttrain import gguf, manifest, registry
from posttrain.config import Config, to_dict

STARTED = "posttrain.started.json"


def datasets_of(cfg: Config, stage: str) -> list[str]:
    """Names of the datasets under data: that a stage reads."""
    if stage == "format":
        return cfg.format.datasets or list(cfg.data)
    if stage == "eval":
        return [n for n in (cfg.eval.data, eval_pairs(cfg)) if n in cfg.data]
    record = registry.STAGES[stage]
    name = getattr(cfg, record.section).data if record.data else None
    return [name] if name in cfg.data else []


def stage_dir(cfg: Config, stage: str) -> str:
    return str(Path(cfg.output_dir) / stage)


def eval_models(cfg: Config) -> list[tuple[str, str]]:
    """(label, path) of each model the eval stage compares, in table order: eval.models (labelled by
    their stage, or directory name), else the base model and the chain's model stages, with the
    control (more SFT) right after the SFT it continues."""
    if cfg.eval.models:
        out, seen = [], set()
        for path in cfg.eval.models:
            label = ((manifest.read(path) if Path(path).is_dir() else None) or {}).get("stage") or Path(path).name
            while label in seen:
                label += "'"
            seen.add(label)
            out.append((label, path))
        return out
    order = [s for s in cfg.stages if registry.STAGES[s].compared]
    if "control" in order and "sft" in order:  # the control row right under the SFT it continues
        order.remove("control")
        order.insert(order.index("sft") + 1, "control")
    return [("base", cfg.model.name_or_path)] + [(s, stage_dir(cfg, s)) for s in order]


def eval_judges(cfg: Config) -> tuple[str | None, str | None]:
    """The reward model that scores eval generations and the KL reference: eval.reward_model /
    eval.kl_reference, else this chain's reward / sft stage when it is in stages and finished."""
    def chain(stage: str) -> str | None:
        d = stage_dir(cfg, stage)
        return d if stage in cfg.stages and manifest.is_finished(d) else None

    return cfg.eval.reward_model or chain("reward"), cfg.eval.kl_reference or chain("sft")


def eval_pairs(cfg: Config) -> str | None:
    """The preference dataset for held-out preference accuracy: eval.pairs, else dpo's, else reward's."""
    if cfg.eval.pairs is not None:
        return cfg.eval.pairs
    for name in (cfg.dpo.data, cfg.reward.data):
        if name in cfg.data and cfg.data[name].kind == "preference":
            return name
    return None


def control_matches(cfg: Config) -> list[str]:
    """The stages whose training the control stage matches with more SFT: those after sft (in the
    chain) that train something, up to control."""
    stages = cfg.stages[cfg.stages.index("sft") + 1:] if "sft" in cfg.stages else []
    return [s for s in stages if registry.STAGES[s].role in ("policy", "reward")]


def control_steps(cfg: Config, sft_dir: str | None = None) -> tuple[int | None, dict]:
    """(SFT steps, {stage: training sequences}) of the control: control.steps, else the
    train_sequences the matched stages recorded over SFT's global batch size (ceil). None when
    a matched stage or the sft stage has not finished yet."""
    import math

    if cfg.control.steps is not None:
        return cfg.control.steps, {}
    matched = {s: ((manifest.read(stage_dir(cfg, s)) or {}).get("metrics") or {}).get("train_sequences")
               for s in control_matches(cfg)}
    batch = ((manifest.read(sft_dir or stage_dir(cfg, "sft")) or {}).get("metrics") or {}).get("global_batch_size")
    if not matched or not batch or None in matched.values():
        return None, matched
    return max(1, math.ceil(sum(matched.values()) / batch)), matched


def chain_reward_dir(cfg: Config) -> str:
    """The reward stage's output in this config's chain: the RL stages' reward model unless they name one."""
    return str(Path(cfg.output_dir) / "reward")


def reads_of(cfg: Config, stage: str) -> list[str]:
    """Directories a stage reads besides its parent: part of its key, so that a change in any of
    them reruns it. RL stages: their reward models; eval: every model it compares and its judges;
    (the control is keyed on the step count it derives from the stages it matches, not on them)."""
    if stage == "eval":
        return [p for _, p in eval_models(cfg)] + [p for p in eval_judges(cfg) if p]
    if not registry.STAGES[stage].rl:
        return []
    chain_rm = chain_reward_dir(cfg)
    if stage == "ppo":
        return [cfg.ppo.reward_model or chain_rm] + ([cfg.ppo.value_model] if cfg.ppo.value_model else [])
    return [r.model or chain_rm for r in getattr(cfg, stage).rewards if r.function is None]


def reward_functions_of(cfg: Config, stage: str) -> list[str]:
    """The `module:function` specs a stage calls: RLOO/GRPO rewards, eval's function scorers."""
    if stage == "eval":
        return [s.function for s in cfg.eval.scorers if s.function is not None]
    if not registry.STAGES[stage].rl or stage == "ppo":
        return []
    return [r.function for r in getattr(cfg, stage).rewards if r.function is not None]


def parent_record(source: str | None) -> dict | None:
    """The parent as recorded in a manifest: path, a hash of its identifying files, its stage."""
    if source is None:
        return None
    p = Path(source)
    if gguf.is_gguf(source) and p.is_file():  # keyed on the file's content, not its name
        return {"path": source, "hash": gguf.sha256(p)[:16], "stage": None}
    if not p.is_dir():
        return {"path": source, "hash": None, "stage": None}
    m = manifest.read(p) or {}
    return {"path": str(p), "hash": manifest.directory_hash(p), "stage": m.get("stage")}


def origin(source: str | None) -> dict | None:
    """Where the weights a stage starts from came from, when that is a GGUF file: its SHA-256,
    quantisation and the note that the weights are a dequantised image. Passed down the chain
    from the file itself, its converted directory, or the parent stage's manifest."""
    if source is None:
        return None
    p = Path(source)
    if gguf.is_gguf(source) and p.is_file():
        found = gguf.origin(gguf.converted_dir(p)) or gguf.describe(p)
    elif p.is_dir():
        found = gguf.origin(p) or (manifest.read(p) or {}).get("origin")
    else:
        return None
    if not found:
        return None
    keep = ("file", "sha256", "architecture", "name", "quantization", "parameters")
    return {**{k: found[k] for k in keep if k in found},
            "note": found.get("note") or gguf.NOTE.format(quantization=found.get("quantization"))}


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
    from posttrain.templates import BUILTINS

    name = cfg.template.name
    if name not in BUILTINS and name != "tokenizer" and Path(name).is_file():  # a .jinja file: its text renders
        files[name] = file_hash(Path(name))
    for spec in reward_functions_of(cfg, stage):
        module = Path(cfg._source_dir or ".", *spec.split(":")[0].split(".")).with_suffix(".py")
        if module.is_file():  # a reward function next to the config: its code decides the output
            files[str(module)] = file_hash(module)
    tasks = cfg.eval.lm_eval.include_path if stage == "eval" and cfg.eval.lm_eval else None
    if tasks and Path(tasks).is_dir():  # local lm-eval task definitions
        for f in sorted(Path(tasks).rglob("*")):
            if f.is_file():
                files[str(f)] = file_hash(f)
    parent_info = parent_record(parent)
    if stage == "control":  # SFT's settings for as many steps as the later stages' compute
        relevant["sft"], relevant["steps"] = d["sft"], control_steps(cfg)[0]
    readers = [[r["path"], r["hash"]] for r in map(parent_record, reads_of(cfg, stage))]
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
