"""Every "safeguard #N" that the code, tests and docs cite names a row of docs/safeguards.md."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAFEGUARDS = ROOT / "docs" / "safeguards.md"
SCANNED = ("src", "tests", "docs", "README.md")
SKIPPED_DIRS = {"__pycache__"}  # and *.egg-info: a generated copy of the README
THIS = Path(__file__).resolve()  # its examples cite made-up safeguards on purpose

# "safeguard #12", "Safeguards #3, #12, #28", "safeguards #10 and #19", "safeguards #1-#28",
# also across a line break.
CITATION = re.compile(r"\bsafeguards?\s+#\d+(?:\s*(?:,|-|–|and|or)\s*#\d+)*", re.IGNORECASE)
NUMBER = re.compile(r"(-|–)?\s*#(\d+)")
ROW = re.compile(r"^\|\s*(\d+)\s*\|", re.MULTILINE)


def cited(text: str) -> list[tuple[int, int]]:
    """(line, N) for every safeguard number a text cites; a range #a-#b cites a..b."""
    out = []
    for m in CITATION.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        previous = None
        for dash, n in NUMBER.findall(m.group(0)):
            n = int(n)
            numbers = range(previous + 1, n + 1) if dash and previous is not None else [n]
            out += [(line, k) for k in numbers]
            previous = n
    return out


def entries(text: str) -> list[int]:
    """The row numbers of the safeguards table."""
    return [int(n) for n in ROW.findall(text)]


def scanned_files() -> list[Path]:
    files = []
    for name in SCANNED:
        path = ROOT / name
        if path.is_file():
            files.append(path)
            continue
        for f in sorted(path.rglob("*")):
            rel = f.relative_to(ROOT).parts
            if f.is_file() and f != THIS and not any(p in SKIPPED_DIRS or p.endswith(".egg-info") for p in rel):
                files.append(f)
    return files


def unresolved(texts: dict[str, str], known: set[int]) -> list[str]:
    """'where:line: safeguard #N' for every citation that names no row of the table."""
    return [f"{where}:{line}: safeguard #{n}" for where, text in texts.items() for line, n in cited(text)
            if n not in known]


def read_all() -> dict[str, str]:
    texts = {}
    for f in scanned_files():
        try:
            texts[str(f.relative_to(ROOT))] = f.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # binary
    return texts


def test_safeguards_table_is_numbered_once_each_from_1():
    rows = entries(SAFEGUARDS.read_text(encoding="utf-8"))
    assert rows == list(range(1, len(rows) + 1)), rows
    assert len(rows) >= 28


def test_every_cited_safeguard_has_an_entry():
    known = set(entries(SAFEGUARDS.read_text(encoding="utf-8")))
    texts = read_all()
    missing = unresolved(texts, known)
    assert not missing, "citations of safeguards that docs/safeguards.md does not list:\n" + "\n".join(missing)
    # the scan found the citations it is meant to check (a broken pattern would pass vacuously)
    citing = {where.split("/")[0] for where, text in texts.items() if cited(text)}
    assert {"src", "tests", "README.md"} <= citing, citing
    assert sum(len(cited(t)) for t in texts.values()) >= 20


def test_citation_forms():
    assert [n for _, n in cited("the pad token (safeguard #3)")] == [3]
    assert [n for _, n in cited("Safeguards #3, #12, #28 on one row")] == [3, 12, 28]
    assert [n for _, n in cited("safeguards #10 and #19")] == [10, 19]
    assert [n for _, n in cited("issue trackers (safeguards #1-#4).")] == [1, 2, 3, 4]
    assert cited("line 1\n(safeguard\n#27)") == [(2, 27)]
    assert cited("issue #12 and trl#976 are not safeguards") == []


def test_negative_control_flags_a_made_up_citation():
    known = set(entries(SAFEGUARDS.read_text(encoding="utf-8")))
    assert 999 not in known
    texts = {"a.py": "ok (safeguard #3)\nbad (safeguard #999)", "b.md": "safeguards #12, #999",
             "c.md": "(safeguards #1-#999)"}
    assert unresolved(texts, known) == ["a.py:2: safeguard #999", "b.md:1: safeguard #999"] + [
        f"c.md:1: safeguard #{n}" for n in range(max(known) + 1, 1000)]
    assert unresolved({"a.py": "safeguard #999"}, known | {999}) == []


# ---------------------------------------------------------------------------------------------
# The user docs (README.md and docs/*.md) name only commands, options, config keys and link
# targets that exist, so they cannot drift from the code again.

import typing  # noqa: E402

import typer  # noqa: E402
from pydantic import BaseModel  # noqa: E402

from posttrain.cli import app  # noqa: E402
from posttrain.config import Config  # noqa: E402

DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(```|~~~)")
SPAN = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
# a posttrain command: at the start of a code span or code line (after `$ `), or after `-m `
COMMAND = re.compile(r"(?:^|(?<=^\$ )|(?<=\s-m ))posttrain\s+(\S+)(.*)$")
GLOBAL_OPTIONS = {"--debug", "--help"}
FILE_SUFFIXES = {"json", "jsonl", "yaml", "yml", "py", "md", "bin", "pt", "parquet", "jinja", "gguf", "html",
                 "txt", "csv", "safetensors", "sh", "toml"}
KEY = re.compile(r"^-?([a-z_]+(?:\.[A-Za-z0-9_*<>\[\]-]+)+)(?::\s.*)?$")


def doc_texts() -> dict[str, str]:
    return {str(f.relative_to(ROOT)): f.read_text(encoding="utf-8") for f in DOC_FILES}


def split_code(text: str) -> tuple[list[tuple[int, str]], list[tuple[int, str]], list[tuple[int, str]]]:
    """(code lines, inline code spans, prose lines) with their line numbers; a code line ending in a
    backslash is joined with the next."""
    code, spans, prose, fence, pending = [], [], [], False, None
    for n, line in enumerate(text.split("\n"), 1):
        if FENCE.match(line.strip()):
            fence = not fence
            continue
        if fence:
            if pending:
                line = pending[1] + " " + line.strip()
                n = pending[0]
            if line.rstrip().endswith("\\"):
                pending = (n, line.rstrip()[:-1])
                continue
            pending = None
            code.append((n, line))
        else:
            prose.append((n, line))
            spans += [(n, m.group(1)) for m in SPAN.finditer(line)]
    return code, spans, prose


def command_options() -> dict[str, set[str]]:
    commands = typer.main.get_command(app).commands
    return {name: {o for p in cmd.params for o in (*p.opts, *p.secondary_opts) if o.startswith("-")}
            for name, cmd in commands.items()}


def command_mentions(text: str) -> list[tuple[int, str, str]]:
    """(line, subcommand, the rest of that command) for every posttrain command in code."""
    code, spans, _ = split_code(text)
    out = []
    for n, s in [(n, line.strip()) for n, line in code] + spans:
        s = s.removeprefix("$ ")
        m = COMMAND.search(s)
        if m:
            rest = re.split(r"\s#|\s\||&&|;|\s->", m.group(2))[0]
            out.append((n, m.group(1), rest))
    return out


def bad_commands(texts: dict[str, str], options: dict[str, set[str]]) -> list[str]:
    bad = []
    for where, text in texts.items():
        for n, sub, rest in command_mentions(text):
            if sub.startswith("-"):
                if sub not in GLOBAL_OPTIONS:
                    bad.append(f"{where}:{n}: posttrain {sub}: no such global option")
                continue
            if not re.fullmatch(r"[a-z][a-z-]*", sub):
                continue  # `posttrain COMMAND ...`, `posttrain [--debug] ...`: placeholders
            if sub not in options:
                bad.append(f"{where}:{n}: posttrain {sub}: no such command")
                continue
            for token in rest.split():
                for opt in token.strip("[]()'\",").split("=")[0].split("/"):
                    opt = opt.strip("[]()'\",|")
                    if re.fullmatch(r"--?[a-z][a-z0-9-]*", opt) and opt not in options[sub] | GLOBAL_OPTIONS:
                        bad.append(f"{where}:{n}: posttrain {sub} {opt}: no such option")
    return bad


def _unwrap(annotation):
    """Optional[X] → X; list[X] → X (a key path walks into a list's items)."""
    while True:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        origin = typing.get_origin(annotation)
        if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and len(args) >= 1:
            models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
            annotation = models[0] if models else args[0]
        elif origin is list and args:
            annotation = args[0]
        else:
            return annotation


def resolve_key(key: str) -> str | None:
    """None when `key` (section.field[.field...]) names a Config field; else what is wrong. Keys under
    `training` are TRL's (checked by validate), `<...>` and `*` are placeholders, a dict field takes
    any key."""
    parts = [p.replace("[]", "") for p in key.split(".")]
    model: typing.Any = Config
    for i, part in enumerate(parts):
        if "<" in part or part == "*" or model is typing.Any:
            return None
        if typing.get_origin(model) is dict:
            model = typing.get_args(model)[1]
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return f"'{'.'.join(parts[:i])}' has no sub-keys"
        if part not in model.model_fields:
            return f"'{part}' is not a field of {'.'.join(parts[:i]) or 'the config'}"
        if part == "training":
            return None
        model = _unwrap(model.model_fields[part].annotation)
    return None


def config_keys(text: str) -> list[tuple[int, str]]:
    """(line, key) for every dotted config key written in a code span: its first part a top-level
    section, not a file name (`model.safetensors`, `eval.json`)."""
    _, spans, _ = split_code(text)
    out = []
    for n, s in spans:
        m = KEY.match(s.strip())
        if not m:
            continue
        key = m.group(1)
        parts = key.split(".")
        if parts[0] in Config.model_fields and parts[-1] not in FILE_SUFFIXES:
            out.append((n, key))
    return out


# Pages about the code, where `dpo.default_base` or `merge.check_parity` is a module's function, not a key.
CODE_PAGES = {"docs/architecture.md", "docs/benchmarks.md", "docs/ppo.md"}


def bad_keys(texts: dict[str, str]) -> list[str]:
    return [f"{where}:{n}: {key}: {why}" for where, text in texts.items() if where not in CODE_PAGES
            for n, key in config_keys(text) if (why := resolve_key(key))]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces → hyphens."""
    heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    code_free = "\n".join(line for _, line in split_code(text)[2])
    for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", code_free, re.MULTILINE):
        s = slug(m.group(1))
        k = seen.get(s, 0)
        seen[s] = k + 1
        out.add(s if k == 0 else f"{s}-{k}")
    return out


LINK = re.compile(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def bad_links(files: dict[Path, str]) -> list[str]:
    """Every relative markdown link (outside code) must name an existing file, and an #anchor into a
    markdown file one of its headings. `files` maps paths to texts (files not in it are read)."""
    bad = []
    for path, text in files.items():
        prose = "\n".join(SPAN.sub("", line) for _, line in split_code(text)[2])
        for m in LINK.finditer(prose):
            target = m.group(1)
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):
                continue  # https:, mailto:
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            where = f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}: {target}"
            if dest not in files and not dest.exists():
                bad.append(f"{where}: no such file")
            elif anchor and dest.suffix == ".md":
                dest_text = files[dest] if dest in files else dest.read_text(encoding="utf-8")
                if anchor not in anchors(dest_text):
                    bad.append(f"{where}: no such heading")
    return bad


def test_docs_name_only_real_commands_and_options():
    texts = doc_texts()
    options = command_options()
    assert {"sft", "dpo", "run", "init-tiny", "convert"} <= set(options)
    assert not (missing := bad_commands(texts, options)), "\n".join(missing)
    mentioned = {sub for t in texts.values() for _, sub, _ in command_mentions(t)}
    # the scan sees the commands (a broken pattern would pass vacuously): every command is documented
    assert set(options) <= mentioned, set(options) - mentioned


def test_command_check_flags_a_made_up_command_and_option():
    options = command_options()
    text = ("`posttrain sft CONFIG --resume`\n`posttrain frobnicate CONFIG`\n"
            "```bash\nposttrain dpo configs/x.yaml --base runs/x/sft --no-such-flag 3   # comment --ignored\n"
            "posttrain run configs/x.yaml \\\n    --from dpo --fromm dpo\n```\n`posttrain --debug sft`\n")
    assert sorted(bad_commands({"x.md": text}, options)) == [
        "x.md:2: posttrain frobnicate: no such command",
        "x.md:4: posttrain dpo --no-such-flag: no such option",
        "x.md:5: posttrain run --fromm: no such option",
    ]


def test_docs_name_only_real_config_keys():
    texts = doc_texts()
    assert not (missing := bad_keys(texts)), "\n".join(missing)
    keys = {k for where, t in texts.items() if where not in CODE_PAGES for _, k in config_keys(t)}
    assert {"ppo.min_reward_accuracy", "merge.tolerance", "model.dtype", "dpo.reference", "eval.lm_eval.tasks",
            "data.<name>"} <= keys, keys
    assert len(keys) >= 50, keys


def test_key_check_flags_a_made_up_key():
    assert resolve_key("ppo.kl_coef") is None
    assert resolve_key("sft.lora.target_modules") is None
    assert resolve_key("sft.training.anything_trl_has") is None
    assert resolve_key("data.<name>") is None and resolve_key("data.my_set.train[].path") is None
    assert resolve_key("eval.lm_eval.tasks") is None and resolve_key("eval.decoding.temperature") is None
    text = "`ppo.kl_coeff` and `merge.tolerance: 1e-3`, `model.safetensors`, `dpo.reference.copy`, `trl.DPOConfig`"
    assert bad_keys({"x.md": text}) == [
        "x.md:1: ppo.kl_coeff: 'kl_coeff' is not a field of ppo",
        "x.md:1: dpo.reference.copy: 'dpo.reference' has no sub-keys",
    ]
    assert bad_keys({"x.md": "`data.sft.train[].colums`"}) == [
        "x.md:1: data.sft.train[].colums: 'colums' is not a field of data.sft.train"]


def test_docs_links_resolve():
    files = {f.resolve(): f.read_text(encoding="utf-8") for f in DOC_FILES}
    assert not (broken := bad_links(files)), "\n".join(broken)
    # every docs page is reachable from the README
    readme = files[(ROOT / "README.md").resolve()]
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in LINK.findall(readme)}
    assert not (unlinked := [str(f.relative_to(ROOT)) for f in DOC_FILES[1:] if f.resolve() not in linked]), unlinked


def test_link_check_flags_a_made_up_link():
    docs = (ROOT / "docs").resolve()
    page = docs / "made-up.md"
    text = ("# Title\n\n## A `code` heading: with punctuation\n\n## Title\n\n"
            "[ok](#a-code-heading-with-punctuation) [ok](#title-1) [ok](ppo.md) [ok](../README.md)\n"
            "[bad](#no-such-heading) [bad](no-such-page.md) [bad](ppo.md#no-such-heading)\n"
            "`[not a link](nowhere.md)` [web](https://example.com/x.md)\n```\n[in code](nowhere.md)\n```\n")
    assert bad_links({page: text}) == ["docs/made-up.md: #no-such-heading: no such heading",
                                       "docs/made-up.md: no-such-page.md: no such file",
                                       "docs/made-up.md: ppo.md#no-such-heading: no such heading"]
    assert slug("`posttrain report DIR`") == "posttrain-report-dir"
    assert slug("Speed: the defaults, and what they cost") == "speed-the-defaults-and-what-they-cost"
