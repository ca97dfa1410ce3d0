"""Prompts for online RL: the conversation before the last assistant turn of an SFT dataset, or a
preference pair's prompt. The answer the data gives becomes `reference` (reward functions that
check answers receive it as a keyword argument)."""

from __future__ import annotations

from posttrain import data, models
from posttrain.config import Config
from posttrain.errors import PosttrainError


def prompt_data(cfg: Config, name: str, tok: models.TokenizerInfo):
    """(train, eval or None, record) with columns `prompt` (messages) and `reference` (text)."""
    train, ev, record = data.stage_data(cfg, name, tok)
    kind = cfg.data[name].kind

    def convert(ds):
        if ds is None:
            return None
        ds = ds.map(to_prompt, fn_kwargs={"kind": kind}, remove_columns=ds.column_names)
        return ds.filter(lambda r: len(r["prompt"]) > 0 and r["prompt"][-1]["role"] == "user")

    train, ev = convert(train), convert(ev)
    if len(train) == 0:
        raise PosttrainError(f"data.{name} has no conversation with a user turn to use as a prompt",
                             fix="prompts are the messages before the last assistant turn; check the data")
    return train, ev, {**record, "prompts": len(train)}


def to_prompt(row: dict, kind: str) -> dict:
    if kind == "preference":
        return {"prompt": row["prompt"], "reference": row["chosen"][-1]["content"] if row["chosen"] else ""}
    msgs = row["messages"]
    last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=len(msgs))
    return {"prompt": msgs[:last], "reference": msgs[last]["content"] if last < len(msgs) else ""}
