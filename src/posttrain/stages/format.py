"""`posttrain format`: load every dataset under `data:`, convert it to the canonical
conversational form, check it against the chat template, and write it with a manifest.

Output: <dir>/<name>/train.parquet (and eval.parquet), <dir>/posttrain.json with row counts,
dropped rows and why, per-role trained-token shares, and the template hash.
"""

from __future__ import annotations

from pathlib import Path

from posttrain import data, lineage, manifest, models, templates
from posttrain.config import Config, stage_output, to_dict
from posttrain.console import console, summary
from posttrain.errors import PosttrainError
from posttrain.stages import common

MAX_DROPPED_LISTED = 50


def run(cfg: Config, *, output: str | None = None, overwrite: bool = False) -> Path:
    out = stage_output(cfg, "format", output)
    names = cfg.format.datasets or list(cfg.data)
    if not names:
        raise PosttrainError("there is nothing to format: the config has no data: section")

    tok = models.load_tokenizer(cfg)
    formatted = {name: format_and_check(cfg, name, tok) for name in names}

    manifest.prepare_output(out, overwrite=overwrite)
    record = {}
    for name, (f, stats) in formatted.items():
        (out / name).mkdir(exist_ok=True)
        f.train.to_parquet(str(out / name / "train.parquet"))
        if f.eval is not None:
            f.eval.to_parquet(str(out / name / "eval.parquet"))
        record[name] = {
            "kind": cfg.data[name].kind,
            "rows_in": f.rows_in,
            "train_rows": len(f.train),
            "eval_rows": len(f.eval) if f.eval is not None else 0,
            "dropped": len(f.dropped),
            "dropped_rows": [{"source": s, "row": i, "reason": r} for s, i, r in f.dropped[:MAX_DROPPED_LISTED]],
            "files": f.files,
            "checks": stats,
        }
    manifest.write(out, {
        "stage": "format",
        "parent": None,
        "inputs_key": lineage.stage_key(cfg, "format", None),
        "tokenizer": cfg.model.tokenizer or cfg.model.name_or_path,
        "template_hash": tok.template_hash,
        "special_tokens": common.special_tokens(tok),
        "datasets": record,
        "config": to_dict(cfg),
        "versions": manifest.versions(),
        "git_commit": manifest.git_commit(),
        "finished": manifest.now(),
    })
    for name, r in record.items():
        roles = r["checks"]["roles"]
        summary(f"format: data.{name}", {
            "rows (train / eval)": f"{r['train_rows']} / {r['eval_rows']}",
            "dropped": r["dropped"],
            "tokens mean / max": f"{r['checks']['tokens_mean']} / {r['checks']['tokens_max']}",
            "trained share by role": ", ".join(f"{k} {v['trained_share']:.0%}" for k, v in roles.items()),
            "output": str(out / name),
        })
    console.print(f"finished: {out}", soft_wrap=True)
    return out


def format_and_check(cfg: Config, name: str, tok: models.TokenizerInfo):
    """Format `data.<name>` and run the template checks on it; shared with `sft` and `preview`."""
    dc = cfg.data[name]
    with console.status(f"formatting data.{name}"):
        f = data.format_dataset(name, dc, cfg.template.system_prompt)
    for s, i, reason in f.dropped[:5]:
        console.print(f"[yellow]dropped[/] {s} row {i}: {reason}")
    if len(f.dropped) > 5:
        console.print(f"[yellow]dropped[/] {len(f.dropped) - 5} more rows (listed in the manifest)")
    max_length = (cfg.sft if dc.kind == "sft" else cfg.dpo).training.get("max_length", 1024)
    stats = templates.check_rows(f.train, dc.kind, tok.tokenizer, tok.eot_id, name, max_length=max_length)
    if stats["over_max_length"]:
        console.print(
            f"[yellow]warning[/] {stats['over_max_length']} of the checked samples of data.{name} are longer "
            f"than max_length {max_length} and will be truncated"
        )
    return f, stats


def load_formatted(directory: str | Path, name: str):
    """Read a finished format stage's dataset back: (train, eval or None)."""
    import datasets

    d = Path(directory) / name
    train = datasets.load_dataset("parquet", data_files=str(d / "train.parquet"), split="train")
    ev = d / "eval.parquet"
    return train, datasets.load_dataset("parquet", data_files=str(ev), split="train") if ev.exists() else None


def stage_data(cfg: Config, name: str, tok: models.TokenizerInfo):
    """A training stage's dataset: from this config's finished format stage when it matches, else
    formatted (and checked) now. Returns (train, eval or None, record for the manifest)."""
    fmt_dir = Path(cfg.output_dir) / "format"
    m = manifest.read(fmt_dir) if manifest.is_finished(fmt_dir) else None
    if m and _format_matches(m, cfg, name, tok):
        train, ev = load_formatted(fmt_dir, name)
        console.print(f"data.{name}: using the formatted data in {fmt_dir}")
        return train, ev, {"name": name, "format_dir": str(fmt_dir), "format_hash": manifest.directory_hash(fmt_dir),
                           "files": m["datasets"][name]["files"], "rows": len(train)}
    f, stats = format_and_check(cfg, name, tok)
    return f.train, f.eval, {"name": name, "files": f.files, "rows": len(f.train), "dropped": len(f.dropped),
                             "checks": stats}


def _format_matches(m: dict, cfg: Config, name: str, tok: models.TokenizerInfo) -> bool:
    """The format stage's output is this config's data: same sources, template and file contents."""
    if name not in m.get("datasets", {}) or m.get("template_hash") != tok.template_hash:
        return False
    if m["config"]["data"].get(name) != cfg.data[name].model_dump(mode="json"):
        return False
    if m["config"].get("template") != cfg.template.model_dump(mode="json"):
        return False
    recorded = m["datasets"][name]["files"]
    return all(Path(p).is_file() and data.file_hash(p) == h for p, h in recorded.items())
