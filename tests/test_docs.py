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
