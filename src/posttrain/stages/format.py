"""`posttrain format`: load every dataset under `data:`, convert it to the canonical
conversational form, check it against the chat template, and write it with a manifest.

Output: <dir>/<name>/train.parquet (and eval.parquet), <dir>/posttrain.json with row counts,
dropped rows and why, per-role trained-token shares, and the template hash.
"""

from __future__ import annotations

from pathlib import Path

from posttrain import data, manifest, models, templates
from posttrain.config import Config, stage_output, to_dict
from posttrain.console import console, summary
from posttrain.errors import PosttrainError

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
        "tokenizer": cfg.model.tokenizer or cfg.model.name_or_path,
        "template_hash": tok.template_hash,
        "special_tokens": special_tokens(tok),
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
    max_length = cfg.sft.training.get("max_length", 1024) if dc.kind == "sft" else None
    stats = templates.check_rows(f.train, dc.kind, tok.tokenizer, tok.eot_id, name, max_length=max_length)
    if stats["over_max_length"]:
        console.print(
            f"[yellow]warning[/] {stats['over_max_length']} of the checked samples of data.{name} are longer "
            f"than max_length {max_length} and will be truncated"
        )
    return f, stats


def special_tokens(tok: models.TokenizerInfo) -> dict:
    t = tok.tokenizer
    return {"bos": t.bos_token_id, "eos": t.eos_token_id, "pad": t.pad_token_id, "eot": tok.eot_id,
            "vocab_size": len(t)}


def load_formatted(directory: str | Path, name: str):
    """Read a finished format stage's dataset back: (train, eval or None)."""
    import datasets

    d = Path(directory) / name
    train = datasets.load_dataset("parquet", data_files=str(d / "train.parquet"), split="train")
    ev = d / "eval.parquet"
    return train, datasets.load_dataset("parquet", data_files=str(ev), split="train") if ev.exists() else None
