"""`posttrain preview`: what the trainer will see — rendered samples with the trained tokens
highlighted, and the share of trained tokens per role (safeguard #12)."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text

from posttrain import data, models, registry, templates
from posttrain.config import Config, check_stage
from posttrain.console import console
from posttrain.errors import PosttrainError


def show(cfg: Config, stage: str, n: int) -> None:
    shown = registry.names(preview=True)
    if stage not in shown:
        raise PosttrainError(f"--stage '{stage}' has no training data to preview", fix=f"use {' or '.join(shown)}")
    if n < 1:
        raise PosttrainError("-n must be at least 1")
    check_stage(cfg, stage)
    name = getattr(cfg, registry.STAGES[stage].section).data
    tok = models.load_tokenizer(cfg)
    f, stats = data.format_and_check(cfg, name, tok)
    kind = cfg.data[name].kind
    for i in range(min(n, len(f.train))):
        for j, conv in enumerate(templates.conversations(f.train[i], kind)):
            r = templates.render(tok.tokenizer, conv)
            label = f"sample {i}" + (f" ({'chosen' if j == 0 else 'rejected'})" if kind == "preference" else "")
            console.rule(f"{label}: {len(r.input_ids)} tokens, {sum(r.trained)} trained")
            console.print(highlighted(tok.tokenizer, r))
    table = Table(title=f"trained tokens by role (first {stats['checked_rows']} rows of data.{name})",
                  title_justify="left")
    for col in ("role", "tokens", "trained", "trained share"):
        table.add_column(col, justify="right" if col != "role" else "left")
    for role, s in stats["roles"].items():
        table.add_row(role, str(s["tokens"]), str(s["trained"]), f"{s['trained_share']:.1%}")
    console.print(table)
    console.print("[green on grey15]highlighted[/] = in the loss; dim = context only")


def highlighted(tokenizer, r: templates.Rendered) -> Text:
    text = Text()
    for tid, trained in zip(r.input_ids, r.trained, strict=True):
        piece = tokenizer.decode([tid])
        text.append(piece, style="bold green on grey15" if trained else "dim")
    return text
