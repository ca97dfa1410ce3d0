"""The one user-facing error type.

Everything a user can fix (bad config, bad data, wrong path, missing tokens) is raised as
`PosttrainError`. The CLI prints it as a single line and exits with code 2; anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class PosttrainError(Exception):
    """A problem in the user's input: what is wrong, where, and how to fix it."""

    def __init__(self, what: str, *, where: str | None = None, fix: str | None = None):
        self.what = what
        self.where = where
        self.fix = fix
        super().__init__(self.line())

    def line(self) -> str:
        text = f"{self.where}: {self.what}" if self.where else self.what
        if self.fix:
            text += f" — {self.fix}"
        return " ".join(text.split())  # always one line


class Interrupted(PosttrainError):
    """SIGINT/SIGTERM stopped training after saving a checkpoint; exit code 128 + the signal, as a
    shell reports a process that a signal stopped."""

    def __init__(self, what: str, *, signum: int, fix: str | None = None):
        super().__init__(what, fix=fix)
        self.exit_code = 128 + signum


def did_you_mean(word: str, candidates: Iterable[str]) -> str | None:
    """The closest candidate to `word`, or None when nothing is close."""
    candidates = list(candidates)
    found = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    if not found:
        lowered = {c.lower(): c for c in candidates}
        found = [lowered[word.lower()]] if word.lower() in lowered else []
    return found[0] if found else None
