"""Imports flow one way (docs/architecture.md, "Layers"): library modules <- rl/ <- stages/ <- the
commands and tasks. Every `import` in src/posttrain, at the top of a module or inside a function,
is read with `ast` and checked against its importer's layer; a module may import its own layer
and the ones below it, never one above."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "posttrain"

LAYERS = ("library", "rl", "stages", "app")  # lowest first
# The top-level modules above stages/: the commands, the chain runner and what only they use, and
# the demo tasks. Every other top-level module is library; a new one that needs a stage must be
# placed here on purpose.
APP = {"posttrain.__main__", "posttrain.cli", "posttrain.chain", "posttrain.report", "posttrain.preview",
       "posttrain.demo", "posttrain.realtask"}


def layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in ("rl", "stages"):
        return LAYERS.index(parts[1])
    return LAYERS.index("app" if module in APP else "library")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources() -> dict[str, tuple[str, bool]]:
    """module name -> (source text, is a package's __init__) for every module under src/posttrain."""
    return {module_name(p): (p.read_text(encoding="utf-8"), p.name == "__init__.py") for p in sorted(SRC.rglob("*.py"))}


def imported(source: str, module: str, known: set[str], *, package: bool = False) -> list[tuple[str, int]]:
    """(posttrain module, line) for every import in `source`, wherever it stands: top level, inside
    a function or class, under `if TYPE_CHECKING`, and importlib.import_module("posttrain...")
    (an f-string counts by its literal prefix). `from pkg import name` is the submodule pkg.name
    when `known` has it, else pkg."""
    here = module if package else module.rpartition(".")[0]
    found = []

    def add(name: str, line: int) -> None:
        if name == "posttrain" or name.startswith("posttrain."):
            found.append((name, line))

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                add(sub if sub in known else base, node.lineno)
        elif (isinstance(node, ast.Call) and node.args
              and (getattr(node.func, "attr", None) or getattr(node.func, "id", None)) == "import_module"):
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                add(arg.value, node.lineno)
            elif isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
                prefix = str(arg.values[0].value)  # f"posttrain.stages.{stage}": posttrain.stages
                add(prefix[:-1] if prefix.endswith(".") else prefix.rpartition(".")[0], node.lineno)
    return found


def upward(texts: dict[str, tuple[str, bool]], known: set[str]) -> list[str]:
    """'module -> imported module (line N)' for every import of a higher layer."""
    out = []
    for module, (source, package) in sorted(texts.items()):
        for name, line in sorted(imported(source, module, known, package=package), key=lambda x: x[1]):
            if layer(name) > layer(module):
                out.append(f"{module} ({LAYERS[layer(module)]}) -> {name} ({LAYERS[layer(name)]}), line {line}")
    return out


def test_no_module_imports_a_higher_layer():
    texts = sources()
    found = upward(texts, set(texts))
    assert not found, "imports that go upward (docs/architecture.md, Layers):\n" + "\n".join(found)


def test_the_layers_name_modules_that_exist():
    texts = sources()
    assert APP <= set(texts), sorted(APP - set(texts))
    assert {layer(m) for m in texts} == set(range(len(LAYERS)))  # every layer holds a module


def test_checker_reads_every_import_form():
    """Positive control for the reader: each form resolves to the module it names."""
    texts = sources()
    src = ("import posttrain.rl.rewards\n"
           "from posttrain import data, config as config_mod\n"
           "from posttrain.config import Config\n"
           "from . import manifest\n"
           "from .stages import common\n"
           "def f():\n"
           "    from posttrain.stages import format as format_stage\n"
           "    import importlib\n"
           "    importlib.import_module(f'posttrain.stages.{f}')\n")
    got = [name for name, _ in imported(src, "posttrain.memory", set(texts))]
    assert got == ["posttrain.rl.rewards", "posttrain.data", "posttrain.config", "posttrain.config",
                   "posttrain.manifest", "posttrain.stages.common", "posttrain.stages.format", "posttrain.stages"]


def test_checker_flags_a_synthetic_upward_import():
    """Negative control: upward imports given as source text are flagged, a function-local one
    included; downward and same-layer imports are not."""
    known = set(sources())
    texts = {
        "posttrain.memory": ("from posttrain import config\n"
                             "def f():\n    from posttrain.rl.logprobs import CHUNK_TOKENS\n", False),
        "posttrain.rl.online": ("from posttrain import models\nfrom posttrain.rl import rewards\n"
                                "from posttrain.stages import common\n", False),
        "posttrain.stages.eval": ("from posttrain.rl import rollout\nfrom posttrain.stages import common\n", False),
        "posttrain.preview": ("from posttrain.stages import format\n", False),
        "posttrain.callbacks": ("def g():\n    import posttrain.cli\n", False),
    }
    assert upward(texts, known) == [
        "posttrain.callbacks (library) -> posttrain.cli (app), line 2",
        "posttrain.memory (library) -> posttrain.rl.logprobs (rl), line 3",
        "posttrain.rl.online (rl) -> posttrain.stages.common (stages), line 3",
    ]
