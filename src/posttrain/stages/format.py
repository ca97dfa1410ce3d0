"""`posttrain format`: load every dataset under `data:`, convert it to the canonical
conversational form, check it against the chat template, and write it with a manifest.

Output: <dir>/<name>/train.parquet (and eval.parquet), <dir>/posttrain.json with row counts,
dropped rows and why, per-role trained-token shares, and the template hash.
"""

from __future__ import annotations

from pathlib import Path

from posttrain import card, lineage, manifest, models
from posttrain.config import Config, stage_output, to_dict
from posttrain.console import console, summary
from posttrain.data import format_and_check
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
    m = {
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
    }
    card.write(out, m, key_metrics(m))  # before the manifest: the card alone does not finish the stage
    manifest.write(out, m)
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


def key_metrics(m: dict) -> dict:
    """The chain summary's numbers for this stage (chain.key_metrics)."""
    return {f"{n} rows": d["train_rows"] for n, d in m.get("datasets", {}).items()}
