"""The layout of tests/: it mirrors src/posttrain, and no test module imports another.

- Every module under src/posttrain with logic has its test module: src/posttrain/X.py ->
  tests/test_X.py, src/posttrain/stages/X.py -> tests/stages/test_X.py, src/posttrain/rl/X.py ->
  tests/rl/test_X.py. A module without logic is listed in NO_LOGIC with the reason, and must stay
  without logic (no branch, loop or comprehension) to stay listed. Tests of a topic that spans
  modules (test_safeguards.py, test_bad_input.py, stages/test_combinations.py, ...) sit beside them.
- What more than one test module needs lives in tests/helpers.py or tests/conftest.py: importing a
  test module runs its module-level code a second time under another name, and ties the two files.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "posttrain"
TESTS = ROOT / "tests"

# src/posttrain-relative path -> why it has no test module of its own
NO_LOGIC = {
    "__init__.py": "the package docstring and __version__",
    "__main__.py": "calls cli.main (the CLI is tested in test_cli.py)",
    "rl/__init__.py": "the package docstring",
    "stages/__init__.py": "the package docstring",
    "stages/grpo.py": "one call of stages.online.run (tested for grpo and rloo in stages/test_online.py)",
    "stages/rloo.py": "one call of stages.online.run (tested for grpo and rloo in stages/test_online.py)",
}
LOGIC = (ast.If, ast.IfExp, ast.For, ast.AsyncFor, ast.While, ast.Try, ast.With, ast.AsyncWith, ast.Match,
         ast.BoolOp, ast.comprehension, ast.Lambda)


def mirror(module: Path) -> Path:
    """The test module of src/posttrain/<dirs>/<name>.py: tests/<dirs>/test_<name>.py."""
    rel = module.relative_to(SRC)
    return TESTS.joinpath(*rel.parts[:-1], f"test_{rel.name}")


def missing_mirrors(modules: list[Path], exempt: dict[str, str]) -> list[str]:
    return [f"{m.relative_to(ROOT)} -> {mirror(m).relative_to(ROOT)}" for m in modules
            if m.relative_to(SRC).as_posix() not in exempt and not mirror(m).is_file()]


def has_logic(source: str) -> bool:
    return any(isinstance(node, LOGIC) for node in ast.walk(ast.parse(source)))


def is_test_module(name: str) -> bool:
    """tests.test_x, tests.stages.test_x, tests.rl.test_x (also as seen from tests/ on sys.path:
    test_x, stages.test_x, and relative imports)."""
    return any(part.startswith("test_") for part in name.split("."))


def imports_of_test_modules(source: str, package: str) -> list[tuple[int, str]]:
    """(line, module) for every import of a test module in `source`, a module of `package`
    ("tests", "tests.stages", ...): import, from-import (of a module or of a name in a package),
    relative forms, and importlib.import_module / __import__ of a literal name."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if is_test_module(a.name)]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, *([base] if base else [])])
            if is_test_module(base):
                found.append((node.lineno, base))
            elif base.split(".")[0] == "tests" or node.level:  # from tests[.stages] import test_x
                found += [(node.lineno, f"{base}.{a.name}") for a in node.names if a.name.startswith("test_")]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            called = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
            if called in ("import_module", "__import__") and is_test_module(str(node.args[0].value)):
                found.append((node.lineno, str(node.args[0].value)))
    return found


def test_no_test_module_imports_another():
    files = sorted(p for p in TESTS.rglob("*.py") if "__pycache__" not in p.parts)
    assert len(files) > 40 and TESTS / "helpers.py" in files
    bad = []
    for f in files:
        package = ".".join(f.relative_to(ROOT).parent.parts)
        bad += [f"{f.relative_to(ROOT)}:{line}: imports {name}"
                for line, name in imports_of_test_modules(f.read_text(encoding="utf-8"), package)]
    assert not bad, "a test module imports another (move what they share to tests/helpers.py or conftest.py):\n" \
        + "\n".join(bad)

    # negative control: each form is caught, what the tests may import is not
    sample = ("import tests.test_chain\nfrom tests.stages.test_eval import chain\nfrom tests.rl import test_core\n"
              "from .test_config import BASE\nfrom . import test_data\nimport importlib\n"
              "importlib.import_module('tests.test_cli')\n"
              "from tests.helpers import ENV\nfrom tests.conftest import read_losses\nfrom posttrain import cli\n"
              "from hypothesis import strategies\nfrom mylib import test_helper\n")
    assert imports_of_test_modules(sample, "tests.stages") == [
        (1, "tests.test_chain"), (2, "tests.stages.test_eval"), (3, "tests.rl.test_core"),
        (4, "tests.stages.test_config"), (5, "tests.stages.test_data"), (7, "tests.test_cli")]


def test_every_source_module_has_its_test_module():
    modules = sorted(p for p in SRC.rglob("*.py") if "__pycache__" not in p.parts)
    assert {"cli.py", "stages/sft.py", "rl/core.py"} <= {m.relative_to(SRC).as_posix() for m in modules}
    missing = missing_mirrors(modules, NO_LOGIC)
    assert not missing, "source modules without their test module (tests mirror src/; a module without logic " \
        "goes into NO_LOGIC with the reason):\n" + "\n".join(missing)
    # the exemptions name modules that exist and have no logic
    for rel in NO_LOGIC:
        assert (SRC / rel).is_file(), f"NO_LOGIC names {rel}, which is not under src/posttrain"
        assert not has_logic((SRC / rel).read_text(encoding="utf-8")), f"{rel} has logic: it needs its test module"

    # negative controls: a module without its test module is listed, an exempt one is not; logic is seen
    fake = [SRC / "stages" / "nothere.py", SRC / "cli.py", SRC / "rl" / "__init__.py"]
    assert missing_mirrors(fake, NO_LOGIC) == ["src/posttrain/stages/nothere.py -> tests/stages/test_nothere.py"]
    assert mirror(SRC / "rl" / "core.py") == TESTS / "rl" / "test_core.py"
    assert has_logic("def f(x):\n    return [y for y in x]\n") and has_logic("def f(x):\n    return x or 1\n")
    assert not has_logic('"""doc"""\nfrom a import b\n\ndef run(cfg):\n    return b.run(cfg, "grpo")\n\nk = b.k\n')
