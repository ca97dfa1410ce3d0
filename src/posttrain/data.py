"""Datasets: load local files or Hub names, and turn every supported shape into one of two
canonical, conversational forms that TRL's trainers read directly:

    sft:        {"messages": [{"role": ..., "content": ...}, ...]}
    preference: {"prompt": [messages], "chosen": [assistant message(s)], "rejected": [...]}

Input shapes (after the optional `columns:` renaming):
    messages                      OpenAI-style list of {role, content}
    conversations                 ShareGPT list of {from, value} (human, gpt, system)
    instruction / input / output  Alpaca
    prompt / completion           text or message lists
    prompt? / chosen / rejected   preference pairs, text or message lists; without a prompt
                                  column the prompt is the shared prefix of chosen and rejected
An optional `system` column becomes the system message. Rows that cannot be formatted are
reported by index and reason (safeguard #1).
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from posttrain.errors import PosttrainError
from posttrain.sections import DataConfig, SourceConfig

if TYPE_CHECKING:
    from posttrain import models
    from posttrain.config import Config

ROLES = ("system", "user", "assistant", "tool")
DEFAULT_ROLE_MAP = {
    "human": "user", "gpt": "assistant", "user": "user", "assistant": "assistant", "system": "system",
    "bot": "assistant", "model": "assistant", "chatgpt": "assistant", "tool": "tool",
}
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
HH_TURN = ("\n\nHuman:", "\n\nAssistant:")


class RowError(ValueError):
    """A row that cannot be formatted; the message says why."""


@dataclass
class Formatted:
    """The result of formatting one named dataset."""

    train: object  # datasets.Dataset
    eval: object | None
    rows_in: int
    dropped: list[tuple[str, int, str]] = field(default_factory=list)  # (source, row, reason)
    files: dict[str, str] = field(default_factory=dict)  # local data file -> content hash


# ---------------------------------------------------------------------------------------------
# Loading


def load_source(src: SourceConfig):
    """Load one source as a `datasets.Dataset` (local file/dir or Hub id), renamed per `columns`."""
    import datasets

    datasets.disable_progress_bars()
    path = Path(src.path).expanduser()
    if path.is_file() and not _head(path).strip():
        raise PosttrainError(f"dataset '{src.path}' is empty", fix="point data.*.path at a file with rows")
    try:
        if path.is_file():
            fmt = LOCAL_FORMATS.get(path.suffix.lower())
            if fmt is None:
                raise PosttrainError(
                    f"data file '{path}' has an unsupported extension",
                    fix=f"use one of {', '.join(LOCAL_FORMATS)}",
                )
            _check_utf8(path) if fmt != "parquet" else None
            if fmt == "json":
                _check_first_row(path)
            ds = datasets.load_dataset(fmt, data_files=str(path), split="train")
        elif path.is_dir() and (path / "dataset_info.json").exists():
            ds = datasets.load_from_disk(str(path))
        elif path.is_dir():
            ds = datasets.load_dataset(str(path), src.subset, split=src.split)
        elif _looks_local(src.path):
            raise PosttrainError(f"data file '{src.path}' does not exist", fix="check data.*.path")
        else:
            ds = datasets.load_dataset(src.path, src.subset, split=src.split)
    except PosttrainError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets raises many types; all mean "cannot read"
        raise _load_error(src.path, e) from None
    if len(ds) == 0:
        raise PosttrainError(f"dataset '{src.path}' is empty", fix="point data.*.path at a file with rows")
    missing = [c for c in src.columns if c not in ds.column_names]
    if missing:
        raise PosttrainError(
            f"data.columns maps {missing}, but '{src.path}' has columns {ds.column_names}",
            fix="fix the columns: mapping",
        )
    renames = {k: v for k, v in src.columns.items() if k != v}
    targets = list(renames.values())
    twice = sorted({t for t in targets if targets.count(t) > 1})
    if twice:
        raise PosttrainError(f"data.columns maps several columns of '{src.path}' to {twice}",
                             fix="map each canonical name from one column only")
    taken = sorted(t for t in targets if t in ds.column_names and t not in renames)
    if taken:
        raise PosttrainError(f"data.columns renames a column to {taken}, which '{src.path}' already has",
                             fix=f"drop that entry, or map the existing {taken[0]!r} column elsewhere too")
    ds = ds.rename_columns(renames)
    if src.limit:
        ds = ds.select(range(min(src.limit, len(ds))))
    return ds


def _head(path: Path, n: int = 65536) -> bytes:
    with path.open("rb") as f:
        return f.read(n)


def _looks_local(p: str) -> bool:
    return p.startswith((".", "/", "~")) or Path(p).suffix.lower() in LOCAL_FORMATS or p.count("/") != 1


_NULL_FIRST = re.compile(rb"\A\s*(\[\s*)?null\b")


def _check_first_row(path: Path) -> None:
    """A JSON(L) file whose first row is `null` crashes the interpreter inside pyarrow's JSON
    reader (a segfault, not an exception; pyarrow 26), so it is refused before pyarrow sees it."""
    if _NULL_FIRST.match(_head(path, 4096).removeprefix(b"\xef\xbb\xbf")):
        raise PosttrainError("the first row is null, not a JSON object", where=str(path),
                             fix="remove the null row(s): every row must be an object such as {\"messages\": [...]}")


def _check_utf8(path: Path) -> None:
    with path.open("rb") as f:
        for lineno, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise PosttrainError(
                    f"not UTF-8 text (byte {e.start} of line {lineno})",
                    where=str(path),
                    fix="re-encode the file as UTF-8",
                ) from None


def _load_error(name: str, e: Exception) -> PosttrainError:
    text = " ".join(str(e).split()) or type(e).__name__
    if "connect" in text.lower() or "offline" in text.lower() or "couldn't find" in text.lower() \
            or type(e).__name__ in {"DatasetNotFoundError", "ConnectionError", "OfflineModeIsEnabled"}:
        return PosttrainError(
            f"could not load dataset '{name}': not a local file and not reachable on the Hub",
            fix="check the name, or download it where there is network and point data.*.path at the local file",
        )
    return PosttrainError(f"could not read dataset '{name}': {text[:300]}",
                          fix="check that every row has the same columns and types")


def file_hash(path: str | Path) -> str:
    """Content hash of a file. The chain, the stages and the format-reuse check all ask for the
    same data files; the file is read once per (path, size, mtime) in a process."""
    st = Path(path).stat()
    return _content_hash(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=1024)
def _content_hash(path: str, size: int, mtime_ns: int) -> str:
    del size, mtime_ns  # part of the cache key: a changed file is hashed again
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Shape adapters: one row in, one canonical row out (or RowError)


def detect_shape(columns: list[str], kind: str) -> str:
    cols = set(columns)
    if kind == "preference":
        if {"chosen", "rejected"} <= cols:
            return "preference"
        raise PosttrainError(
            f"preference data needs 'chosen' and 'rejected' columns (and optionally 'prompt'); found {sorted(cols)}",
            fix="map your columns with data.<name>.train[].columns, e.g. {chatgpt: chosen, llama2-13b-chat: rejected}",
        )
    for shape, needed in (
        ("messages", {"messages"}),
        ("sharegpt", {"conversations"}),
        ("alpaca", {"instruction", "output"}),
        ("prompt_completion", {"prompt", "completion"}),
    ):
        if needed <= cols:
            return shape
    raise PosttrainError(
        f"cannot tell the shape of SFT data with columns {sorted(cols)}",
        fix="expected messages, conversations, instruction/output or prompt/completion; "
        "rename yours with columns: {your_column: prompt, ...}",
    )


def to_canonical(row: dict, shape: str, roles: dict[str, str], system_prompt: str | None = None) -> dict:
    """Convert one row; raises RowError with the reason when it can't."""
    system = row.get("system")
    if system is not None and not isinstance(system, str):
        raise RowError("'system' is not text")
    system = system or system_prompt
    if shape == "preference":
        return _preference(row, roles, system)
    if shape == "messages":
        msgs = _messages(row["messages"], roles, "messages", "role", "content")
    elif shape == "sharegpt":
        msgs = _messages(row["conversations"], roles, "conversations", "from", "value")
    elif shape == "alpaca":
        instruction, inp, out = (_text(row, k, allow_empty=k == "input") for k in ("instruction", "input", "output"))
        user = f"{instruction}\n\n{inp}" if inp else instruction
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": out}]
    else:  # prompt_completion
        prompt = _turns(row["prompt"], roles, "prompt", "user")
        completion = _turns(row["completion"], roles, "completion", "assistant")
        msgs = prompt + completion
    msgs = _with_system(msgs, system)
    if not any(m["role"] == "assistant" and m["content"].strip() for m in msgs):
        raise RowError("no assistant message with content")
    return {"messages": msgs}


def _text(row: dict, key: str, allow_empty: bool = False) -> str:
    v = row.get(key)
    if v is None and allow_empty:
        return ""
    if not isinstance(v, str):
        raise RowError(f"'{key}' is {type(v).__name__}, expected text")
    if not v.strip() and not allow_empty:
        raise RowError(f"'{key}' is empty")
    return v


def _messages(value, roles: dict, column: str, role_key: str, content_key: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise RowError(f"'{column}' is not a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or role_key not in m or content_key not in m:
            raise RowError(f"'{column}[{i}]' lacks '{role_key}' or '{content_key}'")
        role = _role(m[role_key], roles, f"{column}[{i}]")
        content = m[content_key]
        if not isinstance(content, str):
            raise RowError(f"'{column}[{i}].{content_key}' is {type(content).__name__}, expected text")
        out.append({"role": role, "content": content})
    return out


def _role(raw, roles: dict, where: str) -> str:
    if not isinstance(raw, str):
        raise RowError(f"'{where}' has a role of type {type(raw).__name__}, expected text")
    role = roles.get(raw, DEFAULT_ROLE_MAP.get(raw))
    if role not in ROLES:
        raise RowError(f"'{where}' has role {raw!r}; map it with roles: {{{raw}: user|assistant|system}}")
    return role


def _turns(value, roles: dict, column: str, default_role: str) -> list[dict]:
    """A text field becomes one message of `default_role`; a message list is kept."""
    if isinstance(value, str):
        if not value.strip():
            raise RowError(f"'{column}' is empty")
        return [{"role": default_role, "content": value}]
    return _messages(value, roles, column, "role", "content")


def _with_system(msgs: list[dict], system: str | None) -> list[dict]:
    if system and msgs[0]["role"] != "system":
        return [{"role": "system", "content": system}, *msgs]
    return msgs


def _preference(row: dict, roles: dict, system: str | None) -> dict:
    chosen, rejected, prompt = row["chosen"], row["rejected"], row.get("prompt")
    if prompt is None:
        prompt, chosen, rejected = _split_implicit(chosen, rejected, roles)
    else:
        prompt = _turns(prompt, roles, "prompt", "user")
        chosen = _strip_prompt(_turns(chosen, roles, "chosen", "assistant"), prompt)
        rejected = _strip_prompt(_turns(rejected, roles, "rejected", "assistant"), prompt)
    for name, side in (("chosen", chosen), ("rejected", rejected)):
        if not side or side[-1]["role"] != "assistant" or not side[-1]["content"].strip():
            raise RowError(f"'{name}' does not end with an assistant answer")
    if chosen == rejected:
        raise RowError("chosen == rejected: the pair teaches nothing")
    if not prompt:
        raise RowError("empty prompt")
    return {"prompt": _with_system(prompt, system), "chosen": chosen, "rejected": rejected}


def _strip_prompt(side: list[dict], prompt: list[dict]) -> list[dict]:
    """Some datasets (ultrafeedback_binarized) repeat the prompt inside chosen/rejected; drop it."""
    if len(side) > len(prompt) and side[: len(prompt)] == prompt:
        return side[len(prompt):]
    if len(side) > 1 and side[0]["role"] == "user" and side[0]["content"] == prompt[-1]["content"]:
        return side[1:]
    return side


def _split_implicit(chosen, rejected, roles: dict) -> tuple[list, list, list]:
    """No prompt column: the prompt is what chosen and rejected share."""
    if isinstance(chosen, str) and isinstance(rejected, str):
        chosen, rejected = _parse_text_dialogue(chosen), _parse_text_dialogue(rejected)
    else:
        chosen = _turns(chosen, roles, "chosen", "assistant")
        rejected = _turns(rejected, roles, "rejected", "assistant")
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise RowError("no 'prompt' column and chosen/rejected share no leading messages")
    return chosen[:n], chosen[n:], rejected[n:]


def _parse_text_dialogue(text: str) -> list[dict]:
    """Anthropic-HH style text ('\\n\\nHuman: ... \\n\\nAssistant: ...') into messages."""
    if HH_TURN[0] not in text and not text.startswith("Human:"):
        raise RowError("no 'prompt' column, and chosen/rejected are plain text without Human:/Assistant: turns")
    text = "\n\n" + text if text.startswith("Human:") else text
    msgs = []
    rest = text
    while rest:
        if rest.startswith(HH_TURN[0]):
            role, rest = "user", rest[len(HH_TURN[0]):]
        elif rest.startswith(HH_TURN[1]):
            role, rest = "assistant", rest[len(HH_TURN[1]):]
        else:
            raise RowError("text between turns that is neither Human: nor Assistant:")
        cut = min((i for i in (rest.find(HH_TURN[0]), rest.find(HH_TURN[1])) if i >= 0), default=len(rest))
        msgs.append({"role": role, "content": rest[:cut].strip()})
        rest = rest[cut:]
    return msgs


# ---------------------------------------------------------------------------------------------
# Whole datasets


def format_dataset(name: str, dc: DataConfig, system_prompt: str | None = None) -> Formatted:
    """Load and convert every source of `data.<name>`, split off eval, and apply the bad-row limit."""
    import datasets

    parts, dropped, files, rows_in = {"train": [], "eval": []}, [], {}, 0
    for split, sources in (("train", dc.train), ("eval", dc.eval)):
        for src in sources:
            ds = load_source(src)
            if Path(src.path).is_file():
                files[src.path] = file_hash(src.path)
            converted, bad = _convert(ds, detect_shape(ds.column_names, dc.kind), src, system_prompt)
            rows_in += len(ds)
            dropped += bad
            share = len(bad) / len(ds)
            if share > dc.max_bad_fraction:
                s, i, reason = bad[0]
                raise PosttrainError(
                    f"{len(bad)} of {len(ds)} rows ({share:.0%}) of data.{name} cannot be formatted; "
                    f"first: row {i}: {reason}",
                    where=s,
                    fix=f"fix the data or the columns:/roles: mapping (data.{name}.max_bad_fraction is "
                    f"{dc.max_bad_fraction})",
                )
            parts[split].append(converted)
    train = datasets.concatenate_datasets(parts["train"])
    evald = datasets.concatenate_datasets(parts["eval"]) if parts["eval"] else None
    if evald is None and dc.eval_fraction > 0:
        if len(train) < 2:
            raise PosttrainError(f"data.{name} has {len(train)} training row(s) after formatting: too few to split "
                                 f"off eval_fraction {dc.eval_fraction}",
                                 fix=f"add rows, give data.{name}.eval sources, or set eval_fraction: 0")
        n_eval = min(max(1, round(len(train) * dc.eval_fraction)), len(train) - 1)
        split = train.train_test_split(test_size=n_eval, seed=dc.seed, shuffle=True)
        train, evald = split["train"], split["test"]
    if len(train) == 0:
        raise PosttrainError(f"data.{name} has no training rows left after formatting")
    return Formatted(train, evald, rows_in, dropped, files)


_ERROR = "__posttrain_row_error__"


def _convert(ds, shape: str, src: SourceConfig, system_prompt: str | None):
    """Every row of `ds` through `to_canonical`, in batches written to Arrow (datasets.map), so a
    dataset larger than memory is never held as Python objects. Returns (converted, bad rows)."""
    import datasets

    message = datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")})
    columns = ("prompt", "chosen", "rejected") if shape == "preference" else ("messages",)
    features = datasets.Features({**{c: message for c in columns}, _ERROR: datasets.Value("string")})

    def convert(batch: dict) -> dict:
        out = {c: [] for c in (*columns, _ERROR)}
        for values in zip(*batch.values()):
            try:
                row, error = to_canonical(dict(zip(batch, values)), shape, src.roles, system_prompt), None
            except RowError as e:
                row, error = dict.fromkeys(columns, []), str(e)
            for c in columns:
                out[c].append(row[c])
            out[_ERROR].append(error)
        return out

    converted = ds.map(convert, batched=True, remove_columns=ds.column_names, features=features,
                       load_from_cache_file=False)
    errors = converted[_ERROR]
    bad = [(src.path, i, e) for i, e in enumerate(errors) if e is not None]
    if bad:
        converted = converted.select([i for i, e in enumerate(errors) if e is None])
    return converted.remove_columns(_ERROR), bad


# ---------------------------------------------------------------------------------------------
# A stage's formatted data: formatted and checked now, or read back from the format stage's output


def format_and_check(cfg: Config, name: str, tok: models.TokenizerInfo):
    """Format `data.<name>` and run the template checks on it; shared with `sft` and `preview`."""
    from posttrain import templates
    from posttrain.console import console

    dc = cfg.data[name]
    with console.status(f"formatting data.{name}"):
        f = format_dataset(name, dc, cfg.template.system_prompt)
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
    from posttrain import manifest
    from posttrain.console import console

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
    return all(Path(p).is_file() and file_hash(p) == h for p, h in recorded.items())
