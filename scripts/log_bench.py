#!/usr/bin/env python
"""Put one `make bench` run into docs/benchmarks.md: a dated entry, newest first (above the
previous entries, below the log's introduction), holding each benchmark's printed output.

  .venv/bin/python scripts/log_bench.py runs/bench/20261201-120000
"""

from __future__ import annotations

import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOG = ROOT / "docs" / "benchmarks.md"
ORDER = ("startup", "format", "stages", "speed_defaults", "gpu")


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20).stdout.strip().replace("\n", ", ")
    except (OSError, subprocess.SubprocessError):
        gpu = ""
    return f"{cpu}, {len(__import__('os').sched_getaffinity(0))} cores" + (f", GPU: {gpu}" if gpu else ", no GPU")


def entry(run: Path) -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip() or "unknown"
    parts = [f"## {datetime.now(timezone.utc):%Y-%m-%d} — `make bench` ({machine()})", "",
             f"Commit {commit}; outputs in `{run}`. Each block is the script's own output, unedited.", ""]
    for name in ORDER:
        f = run / f"{name}.txt"
        if f.exists():
            parts += [f"### {name}", "", "```", f.read_text().rstrip(), "```", ""]
    return "\n".join(parts) + "\n"


def main() -> None:
    run = Path(sys.argv[1])
    text = LOG.read_text()
    at = text.find("\n## ")  # the first (newest) entry
    at = len(text) if at < 0 else at + 1
    LOG.write_text(text[:at] + entry(run) + text[at:])
    print(f"benchmark log: added an entry for {run} to {LOG}")


if __name__ == "__main__":
    main()
