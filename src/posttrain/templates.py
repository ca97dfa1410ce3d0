"""Chat templates: the built-in family templates (ChatML, Gemma, Llama 3, Mistral, Phi-3), the
tokenizer's own, or a Jinja file; rendering, loss masks, the end-of-turn token and the template
hash that later stages compare against.

TRL 1.16 builds assistant-only loss masks from `{% generation %}` markers in the template
(`return_assistant_tokens_mask=True`), so a training template must have them. Every built-in puts
the assistant's content *and* its end-of-turn token inside the markers, so the model is trained to
stop; what follows the end-of-turn token (a newline) is not trained (generation stops there).
Each built-in renders exactly the text of its family's published template, and needs only tokens
that the family's base tokenizers already have (so it works on a base model without a template):

    chatml   <|im_start|>role\\n ... <|im_end|>\\n (no BOS)
    gemma    google/gemma-3-*-it: {{ bos_token }}, <start_of_turn>user|model\\n ... <end_of_turn>\\n;
             the system message is folded into the first user turn, contents are trimmed
    llama3   meta-llama/Meta-Llama-3-8B-Instruct: {{ bos_token }} (<|begin_of_text|>),
             <|start_header_id|>role<|end_header_id|>\\n\\n ... <|eot_id|>; contents trimmed.
             (3.1+ templates add a dated "Cutting Knowledge" system block; this one does not.)
    mistral  mistral-common v3 (Mistral-7B-Instruct-v0.3): {{ bos_token }}[INST] ...[/INST] ...{{ eos_token }};
             the system message goes before the last user message, as mistral-common does. (The
             v0.3 Hugging Face template does the same only when the conversation ends with a user
             turn and otherwise drops it; for such prompts both render the same text.)
    phi3     microsoft/Phi-3-mini-4k-instruct: <|system|>/<|user|>/<|assistant|>\\n ... <|end|>\\n,
             then {{ eos_token }} unless a generation prompt is added
"""

from __future__ import annotations

import hashlib
import json
import re
import weakref
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

GEMMA = (
    "{{- bos_token -}}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') -}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<start_of_turn>model\\n' -}}"
    "{%- generation -%}{{- (message['content'] | trim) + '<end_of_turn>' -}}{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- '<start_of_turn>' + message['role'] + '\\n' + (first_user_prefix if loop.first else '') -}}"
    "{{- (message['content'] | trim) + '<end_of_turn>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}"
)

LLAMA3 = (
    "{%- for message in messages -%}"
    "{%- if loop.first -%}{{- bos_token -}}{%- endif -%}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- (message['content'] | trim) + '<|eot_id|>' -}}{%- endgeneration -%}"
    "{%- else -%}"
    "{{- (message['content'] | trim) + '<|eot_id|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
)

MISTRAL = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set system_message = messages[0]['content'] -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{- raise_exception('After the optional system message, conversation roles must alternate "
    "user/assistant/user/assistant/...') -}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{{- bos_token -}}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- if loop.index0 == ns.last_user and system_message is defined -%}"
    "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' -}}"
    "{%- else -%}"
    "{{- '[INST] ' + message['content'] + '[/INST]' -}}"
    "{%- endif -%}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- ' ' -}}"
    "{%- generation -%}{{- (message['content'] | trim) + eos_token -}}{%- endgeneration -%}"
    "{%- else -%}"
    "{{- raise_exception('Only user and assistant roles are supported, with the exception of an initial "
    "optional system message!') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

PHI3 = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{{- '<|system|>\\n' + message['content'] + '<|end|>\\n' -}}"
    "{%- elif message['role'] == 'user' -%}"
    "{{- '<|user|>\\n' + message['content'] + '<|end|>\\n' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- '<|assistant|>\\n' -}}"
    "{%- generation -%}{{- message['content'] + '<|end|>' -}}{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- else -%}{{- eos_token -}}{%- endif -%}"
)


@dataclass(frozen=True)
class Builtin:
    template: str
    tokens: tuple[str, ...]  # the special tokens the template writes (besides bos_token / eos_token)
    marks: tuple[str, ...]  # tokens that, all present in a vocabulary, say the tokenizer is of this family


BUILTINS = {
    "chatml": Builtin(CHATML, CHATML_TOKENS, CHATML_TOKENS),
    "gemma": Builtin(GEMMA, ("<start_of_turn>", "<end_of_turn>"), ("<start_of_turn>", "<end_of_turn>")),
    "llama3": Builtin(LLAMA3, ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
                      ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
    "mistral": Builtin(MISTRAL, ("[INST]", "[/INST]"), ("[INST]", "[/INST]")),
    "phi3": Builtin(PHI3, ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"), ("<|assistant|>", "<|end|>")),
}
GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")
_MARKER_TAGS = re.compile(r"\{%(-?)\s*(end)?generation\s*(-?)%\}")
# Literal strings in a template that look like special tokens: <|...|>, <s>, </s>, [INST] ...
SPECIAL_LOOKING = re.compile(r"<\|[A-Za-z0-9_\-]+\|>|</?s>|\[/?INST\]|<start_of_turn>|<end_of_turn>")
PROBE = [
    {"role": "system", "content": "You are a probe."},
    {"role": "user", "content": "Say posttrain."},
    {"role": "assistant", "content": "posttrain"},
    {"role": "user", "content": "Again."},
    {"role": "assistant", "content": "posttrain"},
]


def suggest(vocab) -> str | None:
    """The built-in template whose special tokens the vocabulary has (None when none fits)."""
    for name, b in BUILTINS.items():
        if all(t in vocab for t in b.marks):
            return name
    return None


def _suggestion(vocab) -> str:
    fits = suggest(vocab) if vocab is not None else None
    names = ", ".join(BUILTINS)
    if fits:
        return f"set template.name: {fits} (the built-in whose special tokens this tokenizer has)"
    return (f"set template.name to a built-in ({names}) with template.add_special_tokens: true, "
            "or to the path of a .jinja file")


def resolve(name: str, tokenizer_template: str | None, vocab=None) -> str:
    """The template text for `template.name`; `vocab` (the tokenizer's, or a function returning it)
    makes errors name the built-in that fits it."""
    if name in BUILTINS:
        return BUILTINS[name].template
    if name == "tokenizer":
        if not tokenizer_template:
            raise PosttrainError(
                "template.name is 'tokenizer' but the tokenizer has no chat template (a base model?)",
                fix=_suggestion(vocab() if callable(vocab) else vocab),
            )
        return tokenizer_template
    path = Path(name)
    if not path.is_file():
        raise PosttrainError(
            f"template.name '{name}' is not a built-in ({', '.join(BUILTINS)}), 'tokenizer' or an existing "
            ".jinja file",
            fix="use a built-in, tokenizer, or the path to a Jinja template",
        )
    return path.read_text(encoding="utf-8")


def required_tokens(template: str) -> list[str]:
    """Special-looking literals the template emits; each must be one token of the tokenizer."""
    for b in BUILTINS.values():
        if template == b.template:
            return list(b.tokens)
    return list(dict.fromkeys(SPECIAL_LOOKING.findall(template)))


def without_markers(template: str) -> str:
    """The template without `{% generation %}` / `{% endgeneration %}`: what a runtime that does not
    train (llama.cpp, Ollama, an exported file) is given. Each tag becomes `{% if true %}` /
    `{% endif %}` with the same whitespace control, so it renders the same text."""
    return _MARKER_TAGS.sub(lambda m: f"{{%{m[1]} {'endif' if m[2] else 'if true'} {m[3]}%}}", template)


def has_generation_markers(template: str) -> bool:
    return GENERATION_MARKER.search(template) is not None


# ---------------------------------------------------------------------------------------------
# A tokenizer template without generation markers that renders exactly like a built-in


EQUIVALENCE_PROBES = [
    [{"role": "user", "content": "  Hi there!  "}],
    [{"role": "user", "content": "  Hi there!  "}, {"role": "assistant", "content": " Hello.\n"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}],
    [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "3 + 3?"}, {"role": "assistant", "content": "6"}],
    [{"role": "system", "content": "Add."}, {"role": "user", "content": "2 + 2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "3 + 3?"},
     {"role": "assistant", "content": "6"}],
]
_SENTINEL = "\x00posttrain-system\x00"


def with_default_system(template: str, system: str) -> str:
    """`template`, rendering conversations without a system message as if they began with `system`."""
    literal = json.dumps(system, ensure_ascii=False)  # a valid Jinja string literal
    return ("{%- if messages and messages[0]['role'] != 'system' -%}"
            f"{{%- set messages = [{{'role': 'system', 'content': {literal}}}] + messages -%}}"
            "{%- endif -%}" + template)


def _text(tokenizer, template: str, messages: list[dict], add_generation_prompt: bool):
    from jinja2.exceptions import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except TemplateError:
        return TemplateError


def _renders_like(tokenizer, template: str, other: str) -> bool:
    return all(_text(tokenizer, template, m, g) == _text(tokenizer, other, m, g)
               for m in EQUIVALENCE_PROBES for g in (False, True))


def inserted_system(tokenizer, template: str | None = None) -> str | None:
    """The system prompt the template inserts into a conversation that has none (SmolLM2's "You are a
    helpful AI assistant named SmolLM, ..."), or None. Found by rendering a conversation with a
    sentinel system message and reading the default off the rendering without one."""
    template = template if template is not None else tokenizer.chat_template
    if not template:
        return None
    key = (template, json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str))
    if key not in _INSERTED:
        _INSERTED[key] = _find_inserted_system(tokenizer, template)
    return _INSERTED[key]


_INSERTED: dict[tuple[str, str], str | None] = {}


def _find_inserted_system(tokenizer, template: str) -> str | None:
    user = [{"role": "user", "content": "2 + 2?"}]
    alone = _text(tokenizer, template, user, False)
    marked = _text(tokenizer, template, [{"role": "system", "content": _SENTINEL}, *user], False)
    if not isinstance(alone, str) or not isinstance(marked, str) or marked.count(_SENTINEL) != 1:
        return None
    pre, post = marked.split(_SENTINEL)
    if len(alone) <= len(pre) + len(post) or not (alone.startswith(pre) and alone.endswith(post)):
        return None
    system = alone[len(pre):len(alone) - len(post)]
    same = _text(tokenizer, template, [{"role": "system", "content": system}, *user], False) == alone
    return system if same else None


def builtin_equivalent(tokenizer, template: str) -> tuple[str, str] | None:
    """(name, training template) of the built-in that renders exactly the text `template` renders
    (e.g. SmolLM2's ChatML that inserts a default system prompt), on probe conversations with and
    without a system message, multi-turn, with and without a generation prompt; None if none does."""
    for name, b in BUILTINS.items():
        if _renders_like(tokenizer, template, b.template):
            return name, b.template
        system = inserted_system(tokenizer, template)
        if system is not None:
            candidate = with_default_system(b.template, system)
            if _renders_like(tokenizer, template, candidate):
                return f"{name} with its default system prompt", candidate
    return None


# ---------------------------------------------------------------------------------------------
# Rendering


@dataclass
class Rendered:
    """One conversation tokenized the way the SFT trainer tokenizes it."""

    input_ids: list[int]
    trained: list[bool]  # True where the token is in the loss
    roles: list[str]  # role of the message each token belongs to
    text: str = ""
    # (role, start, end) per message, after one for a system prompt the template inserts by itself
    spans: list[tuple[str, int, int]] = field(default_factory=list)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def render(tokenizer, messages: list[dict], assistant_only: bool = True) -> Rendered:
    """Tokenize `messages` with the tokenizer's chat template, with the loss mask and token roles.

    Roles come from rendering growing prefixes of the conversation. A message ends where the
    rendering of the conversation up to it stops agreeing with the whole rendering: exact for
    prefix-preserving templates, and never past the point where the two differ for the others
    (Phi-3 closes a conversation with eos_token, Mistral moves the system message to the last user
    turn), so a span never claims tokens that its prefix does not render. A system prompt that the
    template inserts by itself (SmolLM2's) gets a span of its own, with the role system.
    """
    from jinja2.exceptions import TemplateError

    out = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=assistant_only
    )
    ids = list(out["input_ids"])
    trained = [bool(m) for m in out["assistant_masks"]] if assistant_only else [True] * len(ids)
    if messages and messages[0]["role"] != "system":
        system = inserted_system(tokenizer)
        if system is not None:  # the template's own system prompt is the system's, not the user's
            messages = [{"role": "system", "content": system}, *messages]
    roles = ["?"] * len(ids)
    spans = []
    start, start_exact = 0, True
    for i, msg in enumerate(messages):
        end, end_exact = len(ids), True
        if i < len(messages) - 1:
            try:
                prefix = tokenizer.apply_chat_template(messages[: i + 1], tokenize=True, return_dict=True)["input_ids"]
                prefix = list(prefix)
                common = _common_prefix(prefix, ids)
                end, end_exact = max(start, common), common == len(prefix)
            except TemplateError:  # a template that can't render this prefix on its own
                end, end_exact = start, False
        # where the template is not prefix-preserving the span is approximate: a trained token in it
        # is an assistant's (the generation markers are exact)
        exact = start_exact and end_exact
        for k in range(start, end):
            roles[k] = "assistant" if trained[k] and assistant_only and not exact else msg["role"]
        spans.append((msg["role"], start, end))
        start, start_exact = end, end_exact
    text = tokenizer.decode(ids)
    return Rendered(ids, trained, roles, text, spans)


def _special_ids(tokenizer) -> frozenset[int]:
    """Ids of the special tokens: the named ones (bos, eos, ...) and the added tokens marked special
    (Gemma's <end_of_turn> is only the latter). Cached on the tokenizer: added_tokens_decoder copies
    Gemma's 6,000 added tokens on every call."""
    cached = _SPECIAL_IDS.get(tokenizer)
    if cached is not None and cached[0] == len(tokenizer):
        return cached[1]
    ids = frozenset(tokenizer.all_special_ids) | frozenset(
        tid for tid, added in tokenizer.added_tokens_decoder.items() if added.special)
    _SPECIAL_IDS[tokenizer] = (len(tokenizer), ids)
    return ids


_SPECIAL_IDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _is_special(tokenizer, tid: int) -> bool:
    return tid in _special_ids(tokenizer)


def _blank(tokenizer, tid: int) -> bool:
    return not _is_special(tokenizer, tid) and tokenizer.decode([tid]).strip() == ""


def _last_trained(tokenizer, r: Rendered, start: int, end: int) -> int | None:
    """The last trained token of [start, end), passing over trailing whitespace (a template may train
    the newline after its end-of-turn token, as TRL's Gemma training templates do; that's harmless)."""
    last = None
    for k in range(end - 1, start - 1, -1):
        if r.trained[k]:
            if not _blank(tokenizer, r.input_ids[k]):
                return k
            last = k if last is None else last
    return last


def _probe(tokenizer, fn, *conversations):
    """fn(conversation) for the first probe conversation the template renders (Gemma 1/2 templates
    refuse a system message); None when it renders none."""
    from jinja2.exceptions import TemplateError

    for conv in conversations:
        try:
            return fn(conv)
        except TemplateError:
            continue
    return None


def end_of_turn_id(tokenizer, template: str) -> int:
    """The token that ends an assistant turn: the last trained token of a probe assistant turn."""
    if template == CHATML:
        return tokenizer.convert_tokens_to_ids("<|im_end|>")
    r = _probe(tokenizer, lambda conv: render(tokenizer, conv), PROBE[:3], PROBE[1:3])
    if r is None:
        return tokenizer.eos_token_id
    last = _last_trained(tokenizer, r, 0, len(r.input_ids))
    if last is not None and _is_special(tokenizer, r.input_ids[last]):
        return r.input_ids[last]
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


def bos_in_turns(tokenizer) -> bool:
    """Whether the chat template itself writes the BOS token after the start of a conversation: as
    a turn token (SmolLM2's bos_token is <|im_start|>, which ChatML opens every turn with) or before
    every turn (Llama 2). There a BOS inside the conversation is the template's, not a duplicate."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = _probe(tokenizer, lambda conv: list(tokenizer.apply_chat_template(conv, tokenize=True, return_dict=True)[
        "input_ids"]), PROBE, PROBE[1:])
    if ids is None:
        return False
    lead = next((k for k, t in enumerate(ids) if t != bos), len(ids))
    return bos in ids[lead:]


def check_rendered(r: Rendered, tokenizer, eot_id: int, where: str, *, bos_turns: bool | None = None) -> None:
    """Safeguards #3, #12, #28 on one rendered conversation; raises PosttrainError.

    `bos_turns`: bos_in_turns(tokenizer), computed here when not given (check_rows passes it once)."""
    if not any(r.trained):
        raise PosttrainError(
            "no token of this conversation is in the loss",
            where=where,
            fix="the template's {% generation %} markers must wrap the assistant content",
        )
    for role, start, end in r.spans:
        if role != "assistant" or start >= end:
            continue
        last = _last_trained(tokenizer, r, start, end)
        if last is None or r.input_ids[last] != eot_id:
            tok = tokenizer.convert_ids_to_tokens(eot_id)
            raise PosttrainError(
                f"an assistant turn does not end with a trained end-of-turn token {tok!r}; "
                "the model would never learn to stop",
                where=where,
                fix="put the end-of-turn token inside {% generation %} ... {% endgeneration %}",
            )
    bos = tokenizer.bos_token_id
    if bos is None or not r.input_ids:
        return
    if r.input_ids[:2] == [bos, bos]:
        raise PosttrainError(
            "the BOS token appears more than once: the conversation starts with it twice (the template writes "
            "it twice, or the template and the tokenizer both add it)",
            where=where,
            fix="remove {{ bos_token }} from the template or the tokenizer's add_bos_token",
        )
    if bos == tokenizer.eos_token_id or bos not in r.input_ids[1:]:
        return
    if bos_turns is None:
        bos_turns = bos_in_turns(tokenizer)
    if not bos_turns:
        k = r.input_ids.index(bos, 1)
        raise PosttrainError(
            f"the BOS token {tokenizer.convert_ids_to_tokens(bos)!r} appears more than once: again at token {k} "
            f"(in the {r.roles[k]} message), where the template does not write it",
            where=where,
            fix="remove the BOS text from the data (text that spells a special token becomes that token), "
            "or from the template",
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

    Raises PosttrainError naming the first row that fails (safeguards #3, #12, #28), including a row
    the template refuses to render (Gemma's and Mistral's require alternating user/assistant turns)
    and a preference pair whose two sides render the same (a trimming template).
    """
    from jinja2.exceptions import TemplateError

    bos_turns = bos_in_turns(tokenizer)
    rendered, lengths = [], []
    for i in range(min(limit, len(rows))):
        where = f"data.{name} row {i}"
        pair = []
        for conv in conversations(rows[i], kind):
            try:
                r = render(tokenizer, conv)
            except TemplateError as e:
                raise PosttrainError(f"the chat template cannot render this conversation: {e}", where=where,
                                     fix="fix the row's roles, or use a template that accepts them") from None
            check_rendered(r, tokenizer, eot_id, where=where, bos_turns=bos_turns)
            rendered.append(r)
            lengths.append(len(r.input_ids))
            pair.append(r.input_ids)
        if kind == "preference" and pair[0] == pair[1]:
            raise PosttrainError(
                "chosen and rejected render to the same tokens (they differ only in what the chat template "
                "drops, such as the surrounding whitespace Gemma's and Llama 3's templates trim): the pair "
                "teaches nothing", where=where, fix="remove the row, or make the answers differ in their text")
    over = sum(n > max_length for n in lengths) if max_length else 0
    return {
        "checked_rows": min(limit, len(rows)),
        "tokens_mean": round(sum(lengths) / len(lengths), 1),
        "tokens_max": max(lengths),
        "over_max_length": over,
        "roles": role_shares(rendered),
    }
