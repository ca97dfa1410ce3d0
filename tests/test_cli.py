"""The real `posttrain` entry point: help is instant and stages run. Bad input (exit 2, one line,
no traceback, nothing finished-looking) is catalogued in test_bad_input.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from posttrain import manifest

BIN = Path(sys.executable).with_name("posttrain")
ROOT = Path(__file__).resolve().parents[1]


def cli(*args, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    return subprocess.run([str(BIN), *map(str, args)], capture_output=True, text=True, cwd=cwd or ROOT,
                          env=env, timeout=600)


def write_config(tmp_path, tiny_dir, demo_data, **changes) -> Path:
    raw = {
        "model": {"name_or_path": str(tiny_dir)},
        "data": {"sft": {"kind": "sft", "train": [{"path": str(demo_data / "sft_train.jsonl")}],
                         "eval": [{"path": str(demo_data / "sft_eval.jsonl")}]}},
        "output_dir": str(tmp_path / "out"),
        "sft": {"training": {"max_steps": 4, "per_device_train_batch_size": 8, "max_length": 64,
                             "gradient_checkpointing": False, "logging_steps": 1}},
    }
    for key, value in changes.items():
        node = raw
        *parents, last = key.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def assert_clean_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in errors[0], errors[0]


def test_help_is_instant_and_lists_every_command():
    r = cli("--help")
    assert r.returncode == 0
    for cmd in ("validate", "format", "sft", "reward", "ppo", "rloo", "grpo", "dpo", "control", "merge", "eval",
                "report", "run", "preview", "init-tiny"):
        assert f"  {cmd} " in r.stdout
    code = "import sys, posttrain.cli; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_validate_ok_and_bad(tmp_path, tiny_dir, demo_data):
    good = write_config(tmp_path, tiny_dir, demo_data)
    r = cli("validate", good)
    assert r.returncode == 0 and r.stdout.startswith("ok:")
    r = cli("validate", good, "--set", "sft.training.learnig_rate=0.1")
    assert_clean_error(r, "learnig_rate", "did you mean 'learning_rate'")


def test_format_sft_and_preview_through_the_cli(tmp_path, tiny_dir, demo_data):
    cfg = write_config(tmp_path, tiny_dir, demo_data)
    r = cli("format", cfg)
    assert r.returncode == 0, r.stderr[-2000:]
    fmt = manifest.read(tmp_path / "out" / "format")
    assert fmt["datasets"]["sft"]["train_rows"] == 256 and fmt["datasets"]["sft"]["eval_rows"] == 32
    assert fmt["datasets"]["sft"]["checks"]["roles"]["user"]["trained"] == 0

    r = cli("sft", cfg)
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / "out" / "sft"
    m = manifest.read(out)
    assert m["data"]["format_dir"] == str(tmp_path / "out" / "format")  # reused the format stage
    assert "held-out loss" in r.stderr and f"finished: {out}" in r.stderr

    r = cli("sft", cfg)  # finished: refuse
    assert_clean_error(r, "already holds a finished stage", "--overwrite")
    assert manifest.is_finished(out)

    r = cli("preview", cfg, "-n", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "assistant" in r.stderr and "trained share" in r.stderr


def test_init_tiny(tmp_path):
    r = cli("init-tiny", tmp_path / "m", "--data-dir", tmp_path / "d", "--hidden", "32", "--layers", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "m" / "config.json").read_text())["hidden_size"] == 32
    assert (tmp_path / "d" / "sft_train.jsonl").exists()


def test_run_help_shows_output():
    r = cli("run", "--help")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "-o, --output" in r.stdout and "output_dir=DIR" in r.stdout


def test_run_output_overrides_output_dir(tmp_path, tiny_dir, demo_data, monkeypatch):
    """-o/--output (in process, chain.run replaced): the config's output_dir, applied after every
    --set, and kept among the overrides that the processes of a launched stage read again."""
    from typer.testing import CliRunner

    from posttrain import chain
    from posttrain import cli as cli_mod

    seen = []
    monkeypatch.setattr(chain, "run", lambda cfg, **kw: seen.append(cfg))
    monkeypatch.setattr(cli_mod, "_quiet_libraries", lambda: None)
    cfg = write_config(tmp_path, tiny_dir, demo_data, stages=["format"])
    runner = CliRunner()
    for args, expected in [((), str(tmp_path / "out")),
                           (("-o", "o1"), "o1"),
                           (("--output", "o2"), "o2"),
                           (("--set", "output_dir=s", "-o", "123"), "123"),  # -o wins; a path, not a number
                           (("-o", "o3", "--set", "output_dir=s"), "o3")]:
        r = runner.invoke(cli_mod.app, ["run", str(cfg), *args])
        assert r.exit_code == 0, (args, r.output, r.exception)
        assert seen[-1].output_dir == expected, args
    path, overrides = seen[-1]._source
    assert path == str(cfg) and overrides == ("output_dir=s", 'output_dir="o3"')
    r = runner.invoke(cli_mod.app, ["run", str(cfg), "-o", ""])
    assert r.exit_code == 2 and "error: -o/--output is empty" in r.output, r.output


def test_run_writes_its_stages_under_output(tmp_path, tiny_dir, demo_data):
    cfg = write_config(tmp_path, tiny_dir, demo_data, stages=["format"])
    out = tmp_path / "elsewhere"
    r = cli("run", cfg, "--set", f"output_dir={tmp_path / 'from-set'}", "-o", out)
    assert r.returncode == 0, r.stderr[-2000:]
    assert manifest.is_finished(out / "format")
    chain = json.loads((out / "posttrain-chain.json").read_text())
    assert [s["path"] for s in chain["stages"]] == [str(out / "format")]
    assert chain["config"]["output_dir"] == str(out)
    assert (out / "report.md").exists()
    assert not (tmp_path / "out").exists() and not (tmp_path / "from-set").exists()
