"""`posttrain run CONFIG`: the whole chain from one YAML, each stage starting from the last.

The runner decides order, skipping and resuming; the stages do the work. For each stage in
`stages:` it computes the stage's inputs key (lineage.stage_key: its config sections, data file
contents and its parent's identity) and then:
  - a finished stage directory with the same key is "up to date" and skipped;
  - an interrupted one (checkpoints, no manifest) that started with the same key is resumed;
  - anything else runs from scratch (and `--from STAGE` forces that stage and all after it).
Every stage checks its parent's template and special tokens before loading a model. At the end
`<output_dir>/posttrain-chain.json` records each stage's path, status, key metrics, time and peak
memory, and `report.md` / `report.html` (posttrain.report) set it all out.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from posttrain import config as config_mod
from posttrain import lineage, manifest, registry, report
from posttrain.config import Config
from posttrain.console import PeakMemory, console, fmt, summary
from posttrain.errors import PosttrainError

SUMMARY = report.CHAIN


@dataclass
class Step:
    stage: str
    output: Path
    parent: str | None  # the directory or model the stage starts from (None for format)


def plan(cfg: Config) -> list[Step]:
    """The stages in order, each with the directory it writes and the model it starts from."""
    steps, current = [], cfg.model.name_or_path
    for stage in cfg.stages:
        out = Path(cfg.output_dir) / stage
        role = registry.STAGES[stage].role
        parent = (None if role in ("data", "eval") else cfg.reward.init or current if role == "reward"
                  else str(Path(cfg.output_dir) / "sft") if role == "control" else current)
        steps.append(Step(stage, out, parent))
        if role in ("policy", "merge"):  # the next stage starts from its output
            current = str(out)
    return steps


def run(cfg: Config, *, from_stage: str | None = None, dry_run: bool = False, launch_plan: dict | None = None,
        debug: bool = False) -> dict:
    """`launch_plan` (posttrain.launch.plan): run the training stages in several processes."""
    from posttrain.stages import common

    steps = plan(cfg)
    if from_stage is not None and from_stage not in cfg.stages:
        raise PosttrainError(f"--from '{from_stage}' is not one of this config's stages ({', '.join(cfg.stages)})")
    if dry_run:
        return dry(cfg, steps, from_stage)
    t0 = time.time()
    forced = False
    record = []
    path = Path(cfg.output_dir) / SUMMARY
    earlier = _earlier_records(path)
    for step in steps:
        forced = forced or step.stage == from_stage
        key = lineage.stage_key(cfg, step.stage, step.parent)
        status = decide(step, key, forced)
        console.rule(f"{step.stage}: {status}")
        s0 = time.time()
        with PeakMemory() as peak:
            if status != "up to date":
                _run_stage(cfg, step, resume=status == "resuming", launch_plan=launch_plan, debug=debug)
        m = manifest.read(step.output) or {}
        entry = {"stage": step.stage, "path": str(step.output), "parent": step.parent,
                 "status": "up to date" if status == "up to date" else "resumed" if status == "resuming" else "ran",
                 "inputs_key": m.get("inputs_key"), "seconds": round(time.time() - s0, 1),
                 "peak_rss_mb": peak.rss_mb, "peak_cuda_mb": peak.cuda_mb, "metrics": common.key_metrics(m)}
        if launch_plan is not None and registry.STAGES[step.stage].launched and status != "up to date":
            # it ran in other processes: the peak its main process recorded (CUDA on a GPU, else RSS)
            import torch

            key = "peak_cuda_mb" if torch.cuda.is_available() else "peak_rss_mb"
            entry.update({"peak_rss_mb": None, "peak_cuda_mb": None, key: m.get("metrics", {}).get("peak_memory_mb")})
        before = earlier.get(step.stage, {})
        if status == "up to date" and before.get("inputs_key") == entry["inputs_key"]:
            # what it cost when it ran, not the 0 s of skipping it
            entry.update({k: before.get(k) for k in ("seconds", "peak_rss_mb", "peak_cuda_mb")})
        elif status == "up to date":  # run on its own (no chain record of it): its manifest's time
            entry["seconds"] = m.get("metrics", {}).get("wall_time_s", entry["seconds"])
        record.append(entry)
    result = {"config": config_mod.to_dict(cfg), "stages": record, "wall_time_s": round(time.time() - t0, 1),
              # what the chain's outputs cost: each stage's time when it ran (an up-to-date stage's
              # earlier run's), not this run's wall time (0.1 s when everything was up to date)
              "chain_time_s": round(sum(r["seconds"] or 0.0 for r in record), 1),
              "finished": manifest.now(), "versions": manifest.versions(), "git_commit": manifest.git_commit()}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    tmp.replace(path)
    md, html = report.write(cfg.output_dir)
    if cfg.push.repo_id is not None:  # the last step: the chain's model to the Hub
        from posttrain import hub

        hub.push(Path(cfg.output_dir) / cfg.push_stage(), cfg.push.repo_id, private=cfg.push.private,
                 revision=cfg.push.revision)
    summary(f"chain: {' → '.join(cfg.stages)}", {
        r["stage"]: f"{r['status']} ({r['seconds']:.0f} s)  {r['path']}  "
        + "  ".join(f"{k} {fmt(v)}" for k, v in r["metrics"].items())
        for r in record
    } | {"total": f"chain {result['chain_time_s']:.0f} s (each stage as it ran); this run "
         f"{result['wall_time_s']:.0f} s; lineage in {path}", "report": f"{md}, {html}"})
    return result


def _earlier_records(path: Path) -> dict:
    try:
        return {r["stage"]: r for r in json.loads(path.read_text()).get("stages", [])}
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return {}


def decide(step: Step, key: str, forced: bool) -> str:
    """'up to date', 'resuming' or 'running' for one stage."""
    from posttrain.stages import checkpoints

    m = manifest.read(step.output)
    if m is not None and not forced and m.get("inputs_key") == key:
        return "up to date"
    if m is None and not forced and lineage.started_key(step.output) == key \
            and checkpoints.last_checkpoint(step.output) is not None:
        return "resuming"
    return "running"


def _run_stage(cfg: Config, step: Step, *, resume: bool, launch_plan: dict | None = None, debug: bool = False) -> None:
    import importlib

    if launch_plan is not None and registry.STAGES[step.stage].launched:
        from posttrain import launch

        launch.run_stage(launch_plan, cfg, step.stage, base=step.parent, output=str(step.output), resume=resume,
                         debug=debug)
        return
    if step.stage == "format":
        from posttrain.stages import format as format_stage

        format_stage.run(cfg, output=str(step.output), overwrite=True)
        return
    module = importlib.import_module(registry.STAGES[step.stage].module)
    module.run(cfg, base=step.parent, output=str(step.output), resume=resume, overwrite=True)


def dry(cfg: Config, steps: list[Step], from_stage: str | None = None) -> dict:
    """Validate the chain without loading a model: per stage, its resolved settings, where it
    starts from and what a real run would do, and one rendered sample with its loss mask."""
    from posttrain import preview

    rows, rerun = [], False
    for step in steps:
        rerun = rerun or step.stage == from_stage
        key = lineage.stage_key(cfg, step.stage, step.parent)
        status = decide(step, key, forced=rerun)
        if status == "up to date" and rerun:
            status = "running"
        # a stage after one that reruns gets a new parent, so it reruns too
        rerun = rerun or (status != "up to date" and step.stage != "format")
        section = config_mod.to_dict(cfg).get(step.stage) or {}
        summary(f"{step.stage} (would be: {'skipped, up to date' if status == 'up to date' else status})", {
            "starts from": step.parent or "data",
            "writes": str(step.output),
            **{k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in section.items()},
        })
        if registry.STAGES[step.stage].preview:
            preview.show(cfg, step.stage, 1)
        rows.append({"stage": step.stage, "status": status, "parent": step.parent})
    console.print(f"dry run: {len(steps)} stages checked; nothing was trained or written")
    return {"stages": rows}
