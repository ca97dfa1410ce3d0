"""Properties (hypothesis): arbitrary input never gets anything out of posttrain but a valid result
or one clean `PosttrainError` (one line, non-empty). Anything else is a bug: the CLI shows a
traceback for it.

Covered here, on top of the row-level property in test_data.py and the validate_dict / single
--set properties in test_config.py:
  * whole files through `format_dataset`: arbitrary JSON lines (valid rows of every shape, rows of
    mixed schemas, junk lines, blank lines, invalid UTF-8, empty files), arbitrary CSV, arbitrary
    bytes under every supported extension, valid files (formatted completely and exactly as the
    row-level converter says), and the DataConfig knobs (eval split, bad-row limit, row limit,
    column and role mappings, several sources);
  * `templates.render` / `check_rendered` with the built-in ChatML on the tiny tokenizer: the loss
    mask and span invariants for arbitrary conversations, control text included;
  * `load_config` from arbitrary YAML text or bytes with arbitrary lists of --set overrides, deep
    nesting and self-referencing anchors included.
"""

from __future__ import annotations

import codecs
import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, Phase, assume, event, example, given, settings
from hypothesis import strategies as st

from posttrain.config import load_config, validate_dict
from posttrain.data import ROLES, format_dataset, to_canonical
from posttrain.errors import PosttrainError
from posttrain.sections import DataConfig
from tests.helpers import CONFIG_BASE as BASE
from tests.helpers import config_like as _config_like
from tests.helpers import row_cases as _rows

SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
           HealthCheck.function_scoped_fixture]
# A format_dataset call costs ~0.1 s and a RecursionError is slow to raise: the tests that make
# them skip hypothesis's shrinking phase, which can take minutes at that price. A failure is
# reported as found; the explicit @examples are the minimal failing cases found so far.
NO_SHRINK = (Phase.explicit, Phase.reuse, Phase.generate)


def assert_clean(e: PosttrainError) -> None:
    """The one shape a user-facing error has: a non-empty single line, what the CLI prints."""
    line = str(e)
    assert line, "empty PosttrainError"
    assert line == e.line()
    assert "\n" not in line and "\r" not in line
    assert line == " ".join(line.split()), f"not one normalised line: {line!r}"


# ---------------------------------------------------------------------------------------------
# Files: offline, a private datasets cache, a fresh file name per example


@pytest.fixture(scope="module", autouse=True)
def _offline_private_cache(tmp_path_factory):
    """No Hub look-ups (fail at once, no retries), and the datasets cache in a temporary folder so
    hundreds of generated files do not pile up in ~/.cache."""
    import datasets
    import huggingface_hub.constants

    cache = tmp_path_factory.mktemp("hf_datasets_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_CACHE", str(cache))
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
        mp.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        yield


_names = itertools.count()


@pytest.fixture(scope="module")
def write(tmp_path_factory):
    """write(bytes, ext) -> a new file; every example gets its own path (format_dataset and the
    datasets cache may remember a path)."""
    d = tmp_path_factory.mktemp("prop_files")

    def _write(data: bytes, ext: str) -> Path:
        p = d / f"f{next(_names)}{ext}"
        p.write_bytes(data)
        return p

    return _write


def _format(dc: DataConfig, system_prompt: str | None = None):
    """format_dataset's result, or the PosttrainError it raised; any other exception propagates."""
    clear = getattr(format_dataset, "cache_clear", None)
    if clear is not None:
        clear()
    try:
        f = format_dataset("prop", dc, system_prompt)
    except PosttrainError as e:
        assert_clean(e)
        event("clean error")
        return None, e
    event("formatted")
    return f, None


# pyarrow's JSON reader (26.0.1) segfaults when the first value it reads is `null`: a .jsonl file
# whose first line is null, or a .json array whose first element is null followed by objects
# (datasets rewrites the array as JSON lines). A segfault takes the whole test session down, so the
# in-process properties leave those inputs out and test_json_starting_with_null_is_a_clean_error
# runs them in a subprocess.
_NULL_FIRST = re.compile(rb"\A\s*(\[\s*)?null")


def _segfaults_pyarrow(data: bytes, ext: str) -> bool:
    return ext.lower() in (".json", ".jsonl") and bool(_NULL_FIRST.match(data.removeprefix(codecs.BOM_UTF8)))


def _dc(kind: str, paths, eval_paths=(), **kw) -> DataConfig:
    train = [p if isinstance(p, dict) else {"path": str(p)} for p in paths]
    evals = [p if isinstance(p, dict) else {"path": str(p)} for p in eval_paths]
    return DataConfig.model_validate({"kind": kind, "train": train, "eval": evals, **kw})


def _check_messages(msgs) -> None:
    assert isinstance(msgs, list) and msgs
    for m in msgs:
        assert set(m) == {"role", "content"}, m
        assert m["role"] in ROLES, m
        assert isinstance(m["content"], str), m


def assert_canonical(row: dict, kind: str) -> None:
    """The same invariants as test_data's row-level property, on a row read back from the Dataset."""
    if kind == "sft":
        assert set(row) == {"messages"}, row
        _check_messages(row["messages"])
        assert any(m["role"] == "assistant" and m["content"].strip() for m in row["messages"])
    else:
        assert set(row) == {"prompt", "chosen", "rejected"}, row
        for side in ("prompt", "chosen", "rejected"):
            _check_messages(row[side])
        for side in ("chosen", "rejected"):
            assert row[side][-1]["role"] == "assistant" and row[side][-1]["content"].strip(), row
        assert row["chosen"] != row["rejected"]


def assert_formatted(f, dc: DataConfig) -> None:
    assert len(f.train) >= 1
    for row in f.train:
        assert_canonical(row, dc.kind)
    n_eval = 0
    if f.eval is not None:
        n_eval = len(f.eval)
        for row in f.eval:
            assert_canonical(row, dc.kind)
    # every row read is kept in train, kept in eval, or reported as dropped
    assert f.rows_in == len(f.train) + n_eval + len(f.dropped)
    assert len(f.dropped) <= dc.max_bad_fraction * f.rows_in + 1e-9
    sources = {s.path for s in (*dc.train, *dc.eval)}
    for src, i, reason in f.dropped:
        assert src in sources and isinstance(i, int) and i >= 0
        assert isinstance(reason, str) and reason.strip()
    assert set(f.files) <= sources and all(len(h) == 16 for h in f.files.values())


# ---------------------------------------------------------------------------------------------
# Strategies: valid rows of every input shape

_visible = st.characters(codec="utf-8", exclude_categories=("Cs", "Cc", "Zs", "Zl", "Zp"))
_any_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=10)
_nonblank = st.tuples(_any_text, _visible, _any_text).map("".join)  # strip() leaves something
_hh_text = st.text(alphabet="abcXYZ019 .?é日", min_size=1, max_size=8).map(str.strip).filter(bool)
_system = st.none() | _any_text


def _msg(roles, content):
    return st.fixed_dictionaries({"role": st.sampled_from(roles), "content": content})


_user = _msg(["user", "human"], _any_text)
_assistant = _msg(["assistant", "gpt", "bot", "model", "chatgpt"], _nonblank)


@st.composite
def _conversation(draw):
    msgs = [draw(_msg(["system"], _any_text))] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 3))):
        msgs += [draw(_user), draw(_assistant)]
    if draw(st.booleans()):
        msgs += [draw(_msg(["tool"], _any_text)), draw(_assistant)]
    return msgs


@st.composite
def _pair(draw, text=_nonblank):
    a = draw(text)
    b = draw(text.filter(lambda s: s != a))
    return a, b


def _with_system(row_strategy):
    return st.tuples(row_strategy, _system).map(lambda t: {**t[0], "system": t[1]} if t[1] is not None else t[0])


def _sharegpt(msgs):
    return {"conversations": [{"from": {"user": "human", "assistant": "gpt"}.get(m["role"], m["role"]),
                               "value": m["content"]} for m in msgs if m["role"] != "tool"]}


def _hh(turns):
    return "".join(f"\n\nHuman: {q}\n\nAssistant: {a}" for q, a in turns)


# variant -> (kind, shape, strategy of one valid row); rows of one variant always share a schema
VALID = {
    "messages": ("sft", "messages", _with_system(_conversation().map(lambda m: {"messages": m}))),
    "sharegpt": ("sft", "sharegpt", _conversation().map(_sharegpt)),
    "alpaca": ("sft", "alpaca", _with_system(st.fixed_dictionaries(
        {"instruction": _nonblank, "output": _nonblank}, optional={"input": st.none() | _any_text}))),
    "pc_text": ("sft", "prompt_completion", _with_system(st.fixed_dictionaries(
        {"prompt": _nonblank, "completion": _nonblank}))),
    "pc_lists": ("sft", "prompt_completion", st.builds(
        lambda c, a: {"prompt": [m for m in c if m["role"] != "tool"] + [{"role": "user", "content": "q"}],
                      "completion": [a]}, _conversation(), _assistant)),
    "pref_text": ("preference", "preference", _with_system(st.builds(
        lambda p, ab: {"prompt": p, "chosen": ab[0], "rejected": ab[1]}, _nonblank, _pair()))),
    "pref_lists": ("preference", "preference", st.builds(
        lambda p, ab: {"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": p}],
                       "chosen": [{"role": "assistant", "content": ab[0]}],
                       "rejected": [{"role": "assistant", "content": ab[1]}]}, _any_text, _pair())),
    "pref_implicit": ("preference", "preference", st.builds(
        lambda q, ab: {"chosen": [{"role": "user", "content": q}, {"role": "assistant", "content": ab[0]}],
                       "rejected": [{"role": "user", "content": q}, {"role": "assistant", "content": ab[1]}]},
        _any_text, _pair())),
    "pref_hh": ("preference", "preference", st.builds(
        lambda turns, ab: {"chosen": _hh([*turns[:-1], (turns[-1][0], ab[0])]),
                           "rejected": _hh([*turns[:-1], (turns[-1][0], ab[1])])},
        st.lists(st.tuples(_hh_text, _hh_text), min_size=1, max_size=3), _pair(_hh_text))),
}
_any_valid_row = st.one_of(*(strategy for _, _, strategy in VALID.values()))

# JSON values of every type, for lines that are JSON but not rows
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | _any_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["messages", "prompt", "chosen", "rejected", "completion", "role", "content", "x", ""]),
        inner, max_size=3),
    max_leaves=8,
)
_junk_line = st.one_of(
    _any_text,
    st.sampled_from(["", " ", "\t", "\r", "{", "}", "[]", "{}", "null", "NaN", "\ufeff", '{"messages": [',
                     '{"messages": []}}', "\x00", "'single': 'quotes'", "// comment"]),
)


@st.composite
def _json_line(draw):
    kind = draw(st.sampled_from(["valid", "valid", "any_row", "json", "junk", "cut"]))
    ensure_ascii = draw(st.booleans())
    if kind == "valid":
        return json.dumps(draw(_any_valid_row), ensure_ascii=ensure_ascii)
    if kind == "any_row":  # arbitrary rows of every shape, the row-level property's strategy
        return json.dumps(draw(_rows())[1], ensure_ascii=ensure_ascii)
    if kind == "json":
        return json.dumps(draw(_json), ensure_ascii=ensure_ascii)
    if kind == "cut":  # a valid row cut short
        line = json.dumps(draw(_any_valid_row), ensure_ascii=ensure_ascii)
        return line[: draw(st.integers(0, len(line) - 1))]
    return draw(_junk_line)


@st.composite
def _corrupt(draw, data: bytes) -> bytes:
    """Sometimes (one time in four) splice bytes, invalid UTF-8 among them, somewhere into `data`."""
    if not draw(st.sampled_from([False, False, False, True])):
        return data
    at = draw(st.integers(0, len(data)))
    junk = draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80\x80", b"\x00", b"\xef\xbb\xbf"])
                | st.binary(min_size=1, max_size=4))
    return data[:at] + junk + data[at:]


@st.composite
def _jsonl_file(draw) -> bytes:
    lines = draw(st.lists(_json_line(), max_size=6))
    sep = draw(st.sampled_from(["\n", "\r\n", "\n\n"]))
    text = sep.join(lines) + (sep if draw(st.booleans()) else "")
    return draw(_corrupt(text.encode("utf-8")))


@st.composite
def _json_array_file(draw) -> bytes:
    rows = draw(st.lists(st.one_of(_any_valid_row, _json), max_size=4))
    return draw(_corrupt(json.dumps(rows).encode("utf-8")))


# ---------------------------------------------------------------------------------------------
# format_dataset on arbitrary JSON lines / JSON files


@settings(max_examples=120, deadline=None, suppress_health_check=SLOW_OK, phases=NO_SHRINK)
@given(
    kind=st.sampled_from(["sft", "preference"]),
    file=st.one_of(
        st.tuples(_jsonl_file(), st.just(".jsonl")),
        st.tuples(_json_array_file(), st.just(".json")),
        st.tuples(st.sampled_from([b"", b"\n", b"  \n\t\n", b"\xef\xbb\xbf", b"\xff\xfe"]),
                  st.sampled_from([".jsonl", ".json"])),
    ),
    max_bad_fraction=st.sampled_from([0.0, 0.01, 0.5, 1.0]),
    system_prompt=st.none() | st.text(max_size=5),
)
def test_format_dataset_arbitrary_json_gives_canonical_rows_or_clean_error(write, kind, file, max_bad_fraction,
                                                                           system_prompt):
    data, ext = file
    assume(not _segfaults_pyarrow(data, ext))
    dc = _dc(kind, [write(data, ext)], max_bad_fraction=max_bad_fraction)
    f, _ = _format(dc, system_prompt)
    if f is not None:
        assert_formatted(f, dc)


# ---------------------------------------------------------------------------------------------
# format_dataset on arbitrary CSV

_csv_columns = ["prompt", "completion", "chosen", "rejected", "system", "instruction", "input", "output",
                "messages", "conversations", "", " ", "Unnamed: 0", "prompt.1"]
_CSV_HEADERS = [["prompt", "completion"], ["system", "prompt", "completion"], ["instruction", "input", "output"],
                ["prompt", "chosen", "rejected"], ["chosen", "rejected"], ["messages"]]
_csv_cell = st.one_of(
    _any_text,
    st.sampled_from(['"', '""', ",", "\n", "\r\n", "NA", "null", "nan", "True", "1", "-2.5", "1e400",
                     "2020-01-01", "\n\nHuman: q\n\nAssistant: a", '[{"role": "user", "content": "q"}]', "", " "]),
)


@st.composite
def _csv_file(draw) -> bytes:
    if draw(st.sampled_from([False] * 5 + [True])):  # not CSV at all
        return draw(_corrupt(draw(_any_text).encode("utf-8")))
    header = draw(st.sampled_from(_CSV_HEADERS) | st.lists(st.sampled_from(_csv_columns) | _any_text,
                                                          min_size=1, max_size=5))
    width = st.sampled_from([len(header)] * 3) | st.integers(0, len(header) + 1)  # mostly rectangular
    a_row = width.flatmap(lambda n: st.lists(_csv_cell, min_size=n, max_size=n))
    rows = draw(st.lists(a_row, min_size=1, max_size=5))
    quote_all, sloppy = draw(st.booleans()), draw(st.booleans())

    def cell(c: str) -> str:
        if sloppy or not (quote_all or any(ch in c for ch in ',"\r\n')):
            return c
        return '"' + c.replace('"', '""') + '"'

    sep = draw(st.sampled_from(["\n", "\r\n"]))
    text = sep.join(",".join(cell(c) for c in row) for row in [header, *rows]) + sep
    return draw(_corrupt(text.encode("utf-8")))


@settings(max_examples=60, deadline=None, suppress_health_check=SLOW_OK, phases=NO_SHRINK)
@given(kind=st.sampled_from(["sft", "preference"]), data=_csv_file(),
       max_bad_fraction=st.sampled_from([0.01, 1.0]))
def test_format_dataset_arbitrary_csv_gives_canonical_rows_or_clean_error(write, kind, data, max_bad_fraction):
    dc = _dc(kind, [write(data, ".csv")], max_bad_fraction=max_bad_fraction)
    f, _ = _format(dc)
    if f is not None:
        assert_formatted(f, dc)


# ---------------------------------------------------------------------------------------------
# format_dataset on arbitrary bytes, whatever the extension says


@settings(max_examples=30, deadline=None, suppress_health_check=SLOW_OK, phases=NO_SHRINK)
@given(kind=st.sampled_from(["sft", "preference"]), data=st.binary(max_size=64),
       ext=st.sampled_from([".jsonl", ".json", ".csv", ".parquet", ".JSONL", ".txt", ""]))
def test_format_dataset_arbitrary_bytes_gives_clean_error(write, kind, data, ext):
    assume(not _segfaults_pyarrow(data, ext))
    dc = _dc(kind, [write(data, ext)], max_bad_fraction=1.0)
    f, _ = _format(dc)
    if f is not None:
        assert_formatted(f, dc)


_NULL_SCRIPT = """
import sys
from posttrain.sections import DataConfig
from posttrain.data import format_dataset
from posttrain.errors import PosttrainError
try:
    format_dataset("prop", DataConfig.model_validate({"kind": "sft", "train": [{"path": sys.argv[1]}]}))
except PosttrainError as e:
    print("clean:", e)
else:
    print("formatted")
"""


@pytest.mark.parametrize(("data", "ext"), [
    (b"null\n", ".jsonl"),
    (b'null\n{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n', ".jsonl"),
    (b'[null, {"messages": []}]', ".json"),
], ids=["jsonl-null", "jsonl-null-then-a-row", "json-array-null-first"])
def test_json_starting_with_null_is_a_clean_error(write, tmp_path, data, ext):
    """In a subprocess: this input crashed the interpreter (SIGSEGV in pyarrow's JSON reader)."""
    assert _segfaults_pyarrow(data, ext)  # the in-process properties leave exactly these out
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", _NULL_SCRIPT, str(write(data, ext))], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"exit {proc.returncode}; stderr tail: {proc.stderr[-600:]}"
    out = proc.stdout.strip().splitlines()
    assert out and out[-1].startswith("clean: ") and "first row is null" in out[-1], proc.stdout


# ---------------------------------------------------------------------------------------------
# Valid files are formatted completely, exactly as the row-level converter says


@settings(max_examples=60, deadline=None, suppress_health_check=SLOW_OK, phases=NO_SHRINK)
@given(
    case=st.sampled_from(sorted(VALID)).flatmap(
        lambda v: st.tuples(st.just(v), st.lists(VALID[v][2], min_size=1, max_size=5))),
    as_array=st.booleans(),
    ensure_ascii=st.booleans(),
    system_prompt=st.none() | _any_text,
)
def test_valid_files_are_formatted_completely(write, case, as_array, ensure_ascii, system_prompt):
    variant, rows = case
    kind, shape, _ = VALID[variant]
    if as_array:
        data, ext = json.dumps(rows, ensure_ascii=ensure_ascii), ".json"
    else:
        data, ext = "".join(json.dumps(r, ensure_ascii=ensure_ascii) + "\n" for r in rows), ".jsonl"
    p = write(data.encode("utf-8"), ext)
    dc = _dc(kind, [p], max_bad_fraction=0.0)
    f, err = _format(dc, system_prompt)
    assert err is None, f"a valid {variant} file was refused: {err}"
    assert_formatted(f, dc)
    assert f.rows_in == len(rows) and f.dropped == [] and f.eval is None
    assert list(f.train) == [to_canonical(r, shape, {}, system_prompt) for r in rows]
    assert list(f.files) == [str(p)]


# ---------------------------------------------------------------------------------------------
# The DataConfig knobs: eval split, bad-row limit, row limit, columns:, roles:, several sources

_bad_row = st.sampled_from([
    {"messages": []}, {"messages": [{"role": "user", "content": "q"}]}, {"prompt": "q", "completion": " "},
    {"chosen": "same", "rejected": "same"}, {"prompt": "q", "chosen": "x", "rejected": "x"},
    {"messages": [{"role": "narrator", "content": "a"}]},
])
_GOOD = {"messages": [{"role": "user", "content": "What is 1 + 1?"}, {"role": "assistant", "content": "2"}]}


@st.composite
def _source(draw, kind):
    """One source: its rows (mostly valid, of one variant) and its columns:/roles:/limit settings."""
    variant = draw(st.sampled_from([v for v, (k, _, _) in VALID.items() if k == kind]))
    rows = draw(st.lists(VALID[variant][2], max_size=5)) + draw(st.lists(_bad_row, max_size=2))
    rows = draw(st.permutations(rows)) if rows else [draw(VALID[variant][2])]
    src = {"rows": rows}
    if draw(st.booleans()):
        src["columns"] = draw(st.dictionaries(
            st.sampled_from([*sorted({c for r in rows for c in r}), "absent"]),
            st.sampled_from(["prompt", "completion", "chosen", "rejected", "messages", "system", "x"]),
            max_size=2))
    if draw(st.booleans()):
        src["roles"] = draw(st.dictionaries(st.sampled_from(["bot", "human", "narrator", "gpt"]),
                                            st.sampled_from(["user", "assistant", "system", "nope"]), max_size=2))
    if draw(st.booleans()):
        src["limit"] = draw(st.integers(1, 6))
    return src


_sources = st.sampled_from(["sft", "preference"]).flatmap(
    lambda kind: st.tuples(st.just(kind), st.lists(_source(kind), min_size=1, max_size=2),
                           st.lists(_source(kind), max_size=1)))


@settings(max_examples=80, deadline=None, suppress_health_check=SLOW_OK, phases=NO_SHRINK)
@given(sources=_sources, eval_fraction=st.sampled_from([0.0, 0.1, 0.34, 0.5, 0.75, 0.9]),
       max_bad_fraction=st.sampled_from([0.0, 0.01, 0.25, 0.5, 1.0]), system_prompt=st.none() | st.text(max_size=4))
# one row, eval_fraction 0.1: the eval split asks for all of the rows
@example(sources=("sft", [{"rows": [_GOOD]}], []), eval_fraction=0.1, max_bad_fraction=0.01, system_prompt=None)
# columns: renames onto a column the file already has
@example(sources=("sft", [{"rows": [{"prompt": "q", "completion": "a", "question": "q2"}],
                           "columns": {"question": "prompt"}}], []),
         eval_fraction=0.0, max_bad_fraction=0.01, system_prompt=None)
# columns: and roles: that work (random maps are mostly errors), and a bad row within the limit
@example(sources=("sft", [{"rows": [{"question": "q", "answer": "a"}] * 3 + [{"question": "q", "answer": " "}],
                           "columns": {"question": "prompt", "answer": "completion"}},
                          {"rows": [{"messages": [{"role": "human", "content": "q"}, {"role": "bot", "content": "a"}]}],
                           "roles": {"human": "user", "bot": "assistant"}}], []),
         eval_fraction=0.34, max_bad_fraction=0.5, system_prompt=None)
# columns: renames two columns to one name
@example(sources=("sft", [{"rows": [{"instruction": "q", "output": "a"}],
                           "columns": {"instruction": "prompt", "output": "prompt"}}], []),
         eval_fraction=0.0, max_bad_fraction=0.01, system_prompt=None)
def test_format_dataset_config_knobs_give_canonical_rows_or_clean_error(write, sources, eval_fraction,
                                                                        max_bad_fraction, system_prompt):
    kind, train, evals = sources

    def source(spec: dict) -> dict:
        path = write("".join(json.dumps(r) + "\n" for r in spec["rows"]).encode("utf-8"), ".jsonl")
        return {"path": str(path), **{k: v for k, v in spec.items() if k != "rows"}}

    dc = _dc(kind, [source(s) for s in train], [source(s) for s in evals], eval_fraction=eval_fraction,
             max_bad_fraction=max_bad_fraction)
    f, _ = _format(dc, system_prompt)
    if f is None:
        return
    assert_formatted(f, dc)
    if evals:
        assert f.eval is not None
    elif eval_fraction > 0:  # split off train (or a clean error, above)
        assert f.eval is not None and len(f.eval) >= 1 and len(f.train) >= 1
    else:
        assert f.eval is None
    if all("limit" in s for s in train + evals):
        assert f.rows_in <= sum(s["limit"] for s in train + evals)


# ---------------------------------------------------------------------------------------------
# templates.render / check_rendered: built-in ChatML on the tiny tokenizer

_CONTROL = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|pad|>", "{% generation %}", "{% endgeneration %}",
            "{%- generation -%}", "{{ bos_token }}", "{{", "}}", "{#", "\n", "\n\n", " ", "  ", "\r\n", "\t",
            "assistant\n", "<|im_start|>assistant\n", "Human:", "12345", "é", "日本", "\u2028", "\x00", "🙂"]
_content = st.lists(st.one_of(_any_text, st.sampled_from(_CONTROL)), max_size=5).map("".join)


@st.composite
def _chat(draw):
    if draw(st.sampled_from([False, False, False, True])):  # any order of the canonical roles
        return draw(st.lists(st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": _content}),
                             min_size=1, max_size=6))
    msgs = [{"role": "system", "content": draw(_content)}] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 3))):
        msgs.append({"role": "user", "content": draw(_content)})
        if draw(st.booleans()):
            msgs.append({"role": "tool", "content": draw(_content)})
        msgs.append({"role": "assistant", "content": draw(_content)})
    if draw(st.booleans()):
        msgs.append({"role": "user", "content": draw(_content)})
    return msgs


@pytest.fixture(scope="module")
def chatml_tok():
    """The tiny offline tokenizer; its chat template is the built-in ChatML."""
    from posttrain import demo, tiny
    from posttrain.templates import CHATML

    tok = tiny.build_tokenizer(demo.corpus())
    assert tok.chat_template == CHATML
    return tok


@settings(max_examples=150, deadline=None, suppress_health_check=SLOW_OK)
@given(conv=_chat())
def test_chatml_render_mask_invariants(chatml_tok, conv):
    from posttrain.templates import check_rendered, render, role_shares

    tok = chatml_tok
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    r = render(tok, conv)
    n = len(r.input_ids)
    assert len(r.trained) == n and len(r.roles) == n
    assert r.text == tok.apply_chat_template(conv, tokenize=False)

    # spans: one per message, in order, contiguous, covering every token; roles agree
    assert [s[0] for s in r.spans] == [m["role"] for m in conv]
    assert r.spans[0][1] == 0 and r.spans[-1][2] == n
    for (_, _, end), (_, start, _) in zip(r.spans, r.spans[1:]):
        assert end == start
    for role, start, end in r.spans:
        assert start < end
        assert set(r.roles[start:end]) == {role}

    # the loss mask: only assistant tokens; per assistant turn one run ending with <|im_end|>,
    # and the newline after it untrained
    assert all(role == "assistant" for role, t in zip(r.roles, r.trained, strict=True) if t)
    for (role, start, end), msg in zip(r.spans, conv):
        if role != "assistant":
            continue
        idx = [k for k in range(start, end) if r.trained[k]]
        assert idx, f"nothing trained in assistant turn {msg!r}"
        assert idx == list(range(idx[0], idx[-1] + 1)), "trained tokens of one turn are not contiguous"
        assert idx[-1] == end - 2 and r.input_ids[idx[-1]] == eot
        assert not r.trained[end - 1] and tok.decode(r.input_ids[end - 1:end]) == "\n"
        assert tok.decode([r.input_ids[k] for k in idx]).endswith(msg["content"] + "<|im_end|>")

    stats = role_shares([r])
    assert sum(s["tokens"] for s in stats.values()) == n
    assert all(s["trained"] == 0 for role, s in stats.items() if role != "assistant")

    # check_rendered passes exactly when there is an assistant turn; otherwise one clean error
    has_assistant = any(m["role"] == "assistant" for m in conv)
    try:
        check_rendered(r, tok, eot, where="data.prop row 0")
    except PosttrainError as e:
        assert_clean(e)
        assert not has_assistant, f"check_rendered refused a ChatML rendering: {e}"
        assert e.line().startswith("data.prop row 0: ")
    else:
        assert has_assistant

    full = render(tok, conv, assistant_only=False)
    assert full.input_ids == r.input_ids and all(full.trained)


# ---------------------------------------------------------------------------------------------
# load_config: arbitrary YAML text and bytes, with arbitrary --set lists

_CONFIG_KEYS = ["model", "name_or_path", "data", "sft", "dpo", "kind", "train", "eval", "path", "columns", "roles",
                "stages", "training", "lora", "r", "method", "learning_rate", "output_dir", "seed", "template",
                "name", "max_steps", "<<", "?", "-", ""]
_YAML_VALUES = [
    "m", "1e-3", "~", "null", "true", "yes", "on", "0x1F", "0o17", ".inf", "-.inf", ".nan", "2020-01-01",
    "2020-01-01 10:00:00", "!!binary AA==", "!!python/object:os.system x", "!!python/object/apply:os.system [true]",
    "!!python/name:os.system", "!!python/tuple [1, 2]", "!!set {a, b}", "!!omap [a: 1]", "!!pairs [a: 1]",
    "!!str 5", "!!int x", "!!float abc", "!!bool maybe", "!!timestamp nope", "!!null x", "!custom x",
    "!<tag:yaml.org,2002:str> x", "&a 1", "*a", "*undefined", "&b {name_or_path: m}", "{<<: *b}", "'q", '"\\x"',
    '"\\ud800"', "|\n  block", ">-\n  folded", "[", "{", "}", "]", ":", "- ", "? ", "@", "`", "%YAML 1.1",
    "---", "...", "[1, [2, [3]]]", "{a: {b: {c: 1}}}", "[a, b", "{a: 1, a: 2}", "? [a, b]\n: 1", "? {a: 1}\n: 2",
    "\t", "\x00", "\x85", "\ufeff", "#", "2020-02-30", "2020-13-45 10:00:00", "1" * 5000, "0x" + "f" * 5000,
]
_yaml_value = st.sampled_from(_YAML_VALUES) | _any_text


@st.composite
def _yaml_lines(draw, base: str) -> str:
    """`base` with a few YAML-ish lines (duplicate keys, tags, anchors, junk) planted anywhere."""
    lines = base.splitlines()
    for _ in range(draw(st.integers(1, 4))):
        indent = " " * draw(st.sampled_from([0, 1, 2, 4, 6]))
        key = draw(st.sampled_from(_CONFIG_KEYS) | _any_text)
        line = draw(st.sampled_from([f"{indent}{key}: {{v}}", f"{indent}- {{v}}", f"{indent}{{v}}", f"{indent}{key}:"]))
        lines.insert(draw(st.integers(0, len(lines))), line.replace("{v}", draw(_yaml_value)))
    return "\n".join(lines) + "\n"


def _dumped(raw) -> str:
    return yaml.safe_dump(raw, sort_keys=False, allow_unicode=True)


_yaml_text = st.one_of(
    _any_text,
    st.lists(_yaml_value, max_size=4).map("\n".join),
    st.just(BASE).flatmap(_yaml_lines),
    _config_like().map(_dumped),
    _config_like().map(_dumped).flatmap(_yaml_lines),
    st.sampled_from(["- a\n- b\n", "'just text'\n", "1\n", "[1, 2]\n", "!!set {a}\n", "---\n...\n", "a: 1\n---\nb: 2\n",
                     "%YAML 1.2\n---\nmodel: {name_or_path: m}\n", "model: {name_or_path: m}\nmodel: x\n",
                     "? model\n: {name_or_path: m}\n", "<<: {model: {name_or_path: m}}\n"]),
)


@st.composite
def _yaml_file(draw) -> bytes:
    text = draw(_yaml_text)
    encoding = draw(st.sampled_from(["utf-8", "utf-8", "utf-8-sig", "utf-16", "latin-1"]))
    try:
        data = text.encode(encoding)
    except UnicodeEncodeError:
        data = text.encode("utf-8")
    return draw(_corrupt(data))


_SET_KEYS = ["sft.training.learning_rate", "sft.training", "sft.lora.r", "sft.method", "model", "model.name_or_path",
             "data", "data.sft", "data.sft.train", "data.sft.train.0", "data.sft.train.0.path", "data.sft.train.1",
             "data.sft.train.-1", "data.sft.train.x", "data.sft.train.0.columns.a", "stages", "stages.0",
             "stages.0.0", "seed", "seed.x", "template", "template.name", "a.b.c", "output_dir", "..", ".", " ",
             "sft.training.x.0.y", "1", "data.\u0661"]
_override = st.one_of(
    _any_text,
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(_SET_KEYS) | _any_text,
              st.sampled_from([v for v in _YAML_VALUES if "\n" not in v]) | _any_text),
)


@settings(max_examples=250, deadline=None, suppress_health_check=SLOW_OK)
@given(data=_yaml_file(), overrides=st.lists(_override, max_size=3))
# minimal failing cases found so far: scalars PyYAML resolves (or is told by a tag) to a type whose
# constructor then raises ValueError, IndexError, KeyError ... instead of a YAMLError
@example(data=b"model: {name_or_path: m}\nseed: 2020-02-30\n", overrides=[])  # an impossible date
@example(data=b"model: {name_or_path: m}\nseed: " + b"1" * 5000 + b"\n", overrides=[])  # > 4300 digits
@example(data=b"model: {name_or_path: m}\nseed: !!int x\n", overrides=[])
@example(data=b"model: {name_or_path: m}\n", overrides=["seed=!!float abc"])
@example(data=b"model: {name_or_path: m}\n", overrides=["seed=!!timestamp nope"])  # PyYAML: AttributeError
@example(data=b"model: {name_or_path: m}\nseed: !!timestamp nope\n", overrides=[])
@example(data=b"model: {name_or_path: m}\n", overrides=["template.system_prompt=2020-13-45"])
def test_load_config_arbitrary_yaml_gives_config_or_clean_error(write, data, overrides):
    _config_or_clean_error(write(data, ".yaml"), overrides)


# Deep nesting and anchors that refer to themselves: YAML that PyYAML reads (or nearly does), but
# whose depth or cycles can reach Python's recursion limit in posttrain's own walk of the tree.


def _nest(kind: str, depth: int) -> str:
    if kind == "flow_list":
        return "[" * depth + "]" * depth
    if kind == "flow_map":
        return "{a: " * depth + "1" + "}" * depth
    return "".join(f"\n{'  ' * (i + 1)}a:" for i in range(depth)) + " 1"  # block mappings


_deep_value = st.one_of(
    st.builds(_nest, st.sampled_from(["flow_list", "flow_map"]), st.integers(0, 3000)),
    st.sampled_from(["&x [*x]", "&x {a: *x}", "&x [1, [2, *x]]", "&x {name_or_path: m, extra: *x}"]),
)


@settings(max_examples=25, deadline=None, suppress_health_check=SLOW_OK, phases=NO_SHRINK)
@given(
    where=st.sampled_from(["file", "set"]),
    key=st.sampled_from(["model", "seed", "template", "sft.training.x", "data.sft.train.0.columns"]),
    value=st.one_of(_deep_value, st.builds(_nest, st.just("block"), st.integers(0, 700))),
)
@example(where="file", key="seed", value="&x [*x]")  # a list that contains itself
@example(where="file", key="seed", value=_nest("flow_list", 2000))  # 2000 nested lists
@example(where="set", key="seed", value=_nest("flow_list", 2000))  # the same in a --set value
def test_load_config_deep_or_cyclic_yaml_gives_config_or_clean_error(write, where, key, value):
    if where == "file":  # under a top-level key (a repeated key: the last one wins)
        p, overrides = write(f"{BASE}{key.split('.')[0]}: {value}\n".encode(), ".yaml"), []
    else:
        if "\n" in value:  # block nesting only fits in a file: the same depth as a flow list
            value = _nest("flow_list", value.count("\n"))
        p, overrides = write(BASE.encode(), ".yaml"), [f"{key}={value}"]
    _config_or_clean_error(p, overrides)


def _config_or_clean_error(path, overrides) -> None:
    """load_config gives a clean one-line error, or a config that validation takes back unchanged."""
    try:
        cfg = load_config(path, overrides)
    except PosttrainError as e:
        assert_clean(e)
        event("clean error")
    else:
        event("loaded")
        dumped = cfg.model_dump()
        assert validate_dict(dumped).model_dump() == dumped
