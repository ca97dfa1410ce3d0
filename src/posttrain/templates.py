"""Chat templates: ChatML (built in), the tokenizer's own, or a Jinja file; rendering, loss masks,
the end-of-turn token and the template hash that later stages compare against.

TRL 1.16 builds assistant-only loss masks from `{% generation %}` markers in the template
(`return_assistant_tokens_mask=True`), so a training template must have them. Our ChatML puts the
assistant's content *and* its `<|im_end|>` inside the markers, so the model is trained to stop;
the newline after `<|im_end|>` is not trained (generation stops at `<|im_end|>`).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from posttrain.errors import PosttrainError

CHATML = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- generation -%}{{- message['content'] + '<|im_end|>' -}}{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")
# Literal strings in a template that look like special tokens: <|...|>, <s>, </s>, [INST] ...
SPECIAL_LOOKING = re.compile(r"<\|[A-Za-z0-9_\-]+\|>|</?s>|\[/?INST\]|<start_of_turn>|<end_of_turn>")
PROBE = [
    {"role": "system", "content": "You are a probe."},
    {"role": "user", "content": "Say posttrain."},
    {"role": "assistant", "content": "posttrain"},
    {"role": "user", "content": "Again."},
    {"role": "assistant", "content": "posttrain"},
]


def resolve(name: str, tokenizer_template: str | None) -> str:
    """The template text for `template.name`."""
    if name == "chatml":
        return CHATML
    if name == "tokenizer":
        if not tokenizer_template:
            raise PosttrainError(
                "template.name is 'tokenizer' but the tokenizer has no chat template",
                fix="set template.name: chatml or a path to a .jinja file",
            )
        return tokenizer_template
    path = Path(name)
    if not path.is_file():
        raise PosttrainError(
            f"template.name '{name}' is not 'chatml', 'tokenizer' or an existing .jinja file",
            fix="use chatml, tokenizer, or the path to a Jinja template",
        )
    return path.read_text(encoding="utf-8")


def required_tokens(template: str) -> list[str]:
    """Special-looking literals the template emits; each must be one token of the tokenizer."""
    found = CHATML_TOKENS if template == CHATML else tuple(SPECIAL_LOOKING.findall(template))
    return list(dict.fromkeys(found))


def has_generation_markers(template: str) -> bool:
    return GENERATION_MARKER.search(template) is not None


@dataclass
class Rendered:
    """One conversation tokenized the way the SFT trainer tokenizes it."""

    input_ids: list[int]
    trained: list[bool]  # True where the token is in the loss
    roles: list[str]  # role of the message each token belongs to
    text: str = ""
    spans: list[tuple[str, int, int]] = field(default_factory=list)  # (role, start, end) per message


def render(tokenizer, messages: list[dict], assistant_only: bool = True) -> Rendered:
    """Tokenize `messages` with the tokenizer's chat template, with the loss mask and token roles.

    Roles come from rendering growing prefixes of the conversation; that works because training
    templates are prefix-preserving (TRL requires it for masks as well).
    """
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=assistant_only
    )
    ids = list(out["input_ids"])
    trained = [bool(m) for m in out["assistant_masks"]] if assistant_only else [True] * len(ids)
    roles = ["?"] * len(ids)
    spans = []
    start = 0
    for i, msg in enumerate(messages):
        end = len(tokenizer.apply_chat_template(messages[: i + 1], tokenize=True, return_dict=True)["input_ids"])
        end = min(end, len(ids))
        for k in range(start, end):
            roles[k] = msg["role"]
        spans.append((msg["role"], start, end))
        start = end
    text = tokenizer.decode(ids)
    return Rendered(ids, trained, roles, text, spans)


def end_of_turn_id(tokenizer, template: str) -> int:
    """The token that ends an assistant turn: the last trained token of a probe assistant turn."""
    if template == CHATML:
        return tokenizer.convert_tokens_to_ids("<|im_end|>")
    r = render(tokenizer, PROBE[:3])
    trained = [t for t, m in zip(r.input_ids, r.trained, strict=True) if m]
    if trained and trained[-1] in set(tokenizer.all_special_ids):
        return trained[-1]
    return tokenizer.eos_token_id


def template_hash(tokenizer, template: str) -> str:
    """Hash of the template text and the ids of the tokens it depends on (recorded in manifests)."""
    payload = {
        "template": template,
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "pad": tokenizer.pad_token_id,
        "eot": end_of_turn_id(tokenizer, template),
        "required": {t: tokenizer.convert_tokens_to_ids(t) for t in required_tokens(template)},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def check_rendered(r: Rendered, tokenizer, eot_id: int, where: str) -> None:
    """Safeguards #3, #12, #28 on one rendered conversation; raises PosttrainError."""
    if not any(r.trained):
        raise PosttrainError(
            "no token of this conversation is in the loss",
            where=where,
            fix="the template's {% generation %} markers must wrap the assistant content",
        )
    for role, start, end in r.spans:
        if role != "assistant" or start >= end:
            continue
        last = max((k for k in range(start, end) if r.trained[k]), default=None)
        if last is None or r.input_ids[last] != eot_id:
            tok = tokenizer.convert_ids_to_tokens(eot_id)
            raise PosttrainError(
                f"an assistant turn does not end with a trained end-of-turn token {tok!r}; "
                "the model would never learn to stop",
                where=where,
                fix="put the end-of-turn token inside {% generation %} ... {% endgeneration %}",
            )
    bos = tokenizer.bos_token_id
    if bos is not None and r.input_ids:
        dup_start = r.input_ids[:2] == [bos, bos]
        stray = bos != tokenizer.eos_token_id and bos in r.input_ids[1:]
        if dup_start or stray:
            raise PosttrainError(
                "the BOS token appears more than once (the template and the tokenizer both add it)",
                where=where,
                fix="remove {{ bos_token }} from the template or the tokenizer's add_bos_token",
            )


def role_shares(rendered: list[Rendered]) -> dict[str, dict]:
    """Per role: tokens, trained tokens, and the trained share (shown by preview and manifests)."""
    stats: dict[str, dict] = {}
    for r in rendered:
        for role, t in zip(r.roles, r.trained, strict=True):
            s = stats.setdefault(role, {"tokens": 0, "trained": 0})
            s["tokens"] += 1
            s["trained"] += int(t)
    for s in stats.values():
        s["trained_share"] = round(s["trained"] / s["tokens"], 4) if s["tokens"] else 0.0
    return stats


def conversations(row: dict, kind: str) -> list[list[dict]]:
    """The conversations a row trains on: one for SFT, prompt+chosen and prompt+rejected for pairs."""
    if kind == "sft":
        return [row["messages"]]
    return [row["prompt"] + row["chosen"], row["prompt"] + row["rejected"]]


def check_rows(rows, kind: str, tokenizer, eot_id: int, name: str, limit: int = 1000,
               max_length: int | None = None) -> dict:
    """Render up to `limit` rows as the trainer will, check each, and return statistics.

    Raises PosttrainError naming the first row that fails (safeguards #3, #12, #28).
    """
    rendered, lengths = [], []
    for i in range(min(limit, len(rows))):
        for conv in conversations(rows[i], kind):
            r = render(tokenizer, conv)
            check_rendered(r, tokenizer, eot_id, where=f"data.{name} row {i}")
            rendered.append(r)
            lengths.append(len(r.input_ids))
    over = sum(n > max_length for n in lengths) if max_length else 0
    return {
        "checked_rows": min(limit, len(rows)),
        "tokens_mean": round(sum(lengths) / len(lengths), 1),
        "tokens_max": max(lengths),
        "over_max_length": over,
        "roles": role_shares(rendered),
    }
