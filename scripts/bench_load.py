#!/usr/bin/env python
"""Load benchmarks: does a long run's memory creep, and does `format` stream a large dataset?

  sft     the demo's SFT stage for 10x its steps (configs/demo.yaml: 600 -> 6000), RSS sampled
          from outside every 0.5 s and mapped to training steps through the stage's metrics.jsonl
  format  N short rows of the demo's SFT shape (default 1,000,000) through `posttrain format`,
          with the peak RSS next to the RSS format has before it reads any data (imports + tokenizer)

Everything is written under --workdir (default /tmp/posttrain-bench-load): a tiny model and demo
data of its own (runs/demo is not touched), derived configs, and the stage outputs. Prints
numbers; asserts nothing. Run from the repository root, e.g.

  OMP_NUM_THREADS=2 TOKENIZERS_PARALLELISM=false .venv/bin/python scripts/bench_load.py sft
  OMP_NUM_THREADS=2 TOKENIZERS_PARALLELISM=false .venv/bin/python scripts/bench_load.py format --rows 1000000

SFT settings: max_steps = factor x the config's, save_steps larger than max_steps (no
intermediate checkpoints; the final save still happens), logging_steps 50 (the demo's), so
metrics.jsonl gives a step every 50 and checkpoint writes do not dominate time or memory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
POSTTRAIN = ROOT / ".venv" / "bin" / "posttrain"
PYTHON = ROOT / ".venv" / "bin" / "python"
INTERVAL_S = 0.5


# --- memory of a process tree, read from /proc -------------------------------------------------

def _status_kb(pid: int, field: str) -> int:
    """A `kB` field of /proc/PID/status (VmRSS, VmHWM); 0 once the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _tree(pid: int) -> list[int]:
    """The process and all its descendants (through /proc/PID/task/*/children)."""
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return pids


def rss_mb(pid: int) -> tuple[float, float]:
    """(VmRSS summed over the tree, VmHWM of the main process), in MB."""
    rss = sum(_status_kb(p, "VmRSS") for p in _tree(pid))
    return rss / 1024, _status_kb(pid, "VmHWM") / 1024


def run_sampled(cmd: list[str], env: dict, metrics: Path | None = None) -> dict:
    """Run `cmd`, sampling RSS every INTERVAL_S. With `metrics` (a metrics.jsonl that the command
    appends to), also note when each logged training step first appears. ru_maxrss from wait4 is
    the kernel's peak RSS of the child (and its waited-for descendants)."""
    log = open(Path(env["BENCH_LOG"]), "w")
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    samples, steps, hwm, offset, status, usage = [], [], 0.0, 0, None, None
    while status is None:
        rss, h = rss_mb(proc.pid)
        t = time.time() - t0
        if rss:
            samples.append((t, rss))
            hwm = max(hwm, h)
        if metrics is not None and metrics.exists():
            with metrics.open() as f:  # only the lines added since the last look
                f.seek(offset)
                chunk = f.read()
            complete = chunk[: chunk.rfind("\n") + 1]
            offset += len(complete.encode())
            for line in complete.splitlines():
                rec = json.loads(line)
                if "loss" in rec and rec.get("step", 0) > 0:  # training logs, not eval/summary
                    steps.append((t, rec["step"], rss))
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid == 0:
            status = None
            time.sleep(INTERVAL_S)
    log.close()
    return {"rc": os.waitstatus_to_exitcode(status), "wall_s": time.time() - t0, "samples": samples,
            "steps": steps, "hwm_mb": hwm, "ru_maxrss_mb": usage.ru_maxrss / 1024}


# --- scratch model, data and configs ----------------------------------------------------------

def ensure_tiny(work: Path, env: dict) -> None:
    """The demo's tiny model and data (scripts/demo.sh's init-tiny), built once under work/."""
    if not (work / "tiny" / "config.json").exists():
        print(f"building the tiny model and demo data under {work}", flush=True)
        subprocess.run([str(POSTTRAIN), "init-tiny", str(work / "tiny"), "--data-dir", str(work / "data")],
                       env=env, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def derived_config(src: Path, work: Path, name: str, data: dict | None = None) -> tuple[Path, dict]:
    """The demo config with its model and data under work/ (or, with `data`, a format-only config)."""
    import yaml

    cfg = yaml.safe_load(src.read_text())
    cfg["model"]["name_or_path"] = str(work / "tiny")
    if data is None:
        for section in cfg["data"].values():
            for split in ("train", "eval"):
                for source in section.get(split) or []:
                    source["path"] = str(work / "data" / Path(source["path"]).name)
    else:  # only what format reads: the stage sections name datasets that are no longer there
        cfg = {"model": cfg["model"], "template": cfg["template"], "data": data, "stages": ["format"]}
    cfg["output_dir"] = str(work / "chain")
    path = work / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path, cfg


def base_env(work: Path, cache: str) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               HF_DATASETS_CACHE=str(work / cache))
    env.setdefault("OMP_NUM_THREADS", "2")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


# --- sft ----------------------------------------------------------------------------------------

def slope_per_1000(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y on x, times 1000."""
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return 1000 * sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else float("nan")


def step_at(steps: list[tuple[float, int, float]], t: float) -> float:
    """The training step at time t, interpolated between the times the logged steps appeared."""
    for (t1, s1, _), (t2, s2, _) in zip(steps, steps[1:]):
        if t1 <= t <= t2:
            return s1 + (s2 - s1) * (t - t1) / (t2 - t1) if t2 > t1 else s2
    return float("nan")


def bench_sft(args) -> None:
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    env = base_env(work, "hf-datasets-cache-sft")
    ensure_tiny(work, env)
    cfg_path, cfg = derived_config(Path(args.config), work, "sft.yaml")
    base_steps = cfg["sft"]["training"]["max_steps"]
    steps = args.steps or base_steps * args.factor
    out = work / "sft"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [str(POSTTRAIN), "sft", str(cfg_path), "-o", str(out),
           "--set", f"sft.training.max_steps={steps}",
           "--set", f"sft.training.save_steps={steps + 1}",
           "--set", f"sft.training.logging_steps={args.logging_steps}"]
    print("$ " + " ".join(cmd), flush=True)
    env["BENCH_LOG"] = str(work / "sft.log")
    r = run_sampled(cmd, env, metrics=out / "metrics.jsonl")
    print(f"exit code {r['rc']} (log: {work / 'sft.log'})")
    if r["rc"] != 0 or len(r["steps"]) < 2:
        print("the run failed or logged fewer than 2 steps; last lines of the log:")
        print("\n".join((work / "sft.log").read_text().splitlines()[-15:]))
        return

    logged = r["steps"]  # (time first seen, step, RSS sampled at that moment)
    (t_first, s_first, rss_start), (t_last, s_last, rss_end) = logged[0], logged[-1]
    manifest = json.loads((out / "posttrain.json").read_text()) if (out / "posttrain.json").exists() else {}
    stage_peak = manifest.get("metrics", {}).get("peak_memory_mb")
    print(f"\nSFT {s_last} steps ({steps / base_steps:g}x the config's {base_steps}) of {cfg_path.name}: "
          f"batch {cfg['sft']['training']['per_device_train_batch_size']}, "
          f"max_length {cfg['sft']['training']['max_length']}, save_steps {steps + 1}, "
          f"logging_steps {args.logging_steps}; RSS sampled every {INTERVAL_S} s "
          f"({len(r['samples'])} samples)")
    print(f"wall time            {r['wall_s']:.1f} s (process start to exit)")
    print(f"training time        {t_last - t_first:.1f} s from step {s_first} to step {s_last}: "
          f"{(s_last - s_first) / (t_last - t_first):.2f} steps/s")
    print(f"RSS start            {rss_start:.1f} MB (when step {s_first} was logged)")
    print(f"RSS end              {rss_end:.1f} MB (when step {s_last} was logged)")
    print(f"end / start          {rss_end / rss_start:.3f}")
    print(f"peak RSS             {r['ru_maxrss_mb']:.1f} MB (kernel ru_maxrss via wait4); "
          f"VmHWM last read {r['hwm_mb']:.1f} MB; max sampled {max(s for _, s in r['samples']):.1f} MB; "
          f"stage's own peak_memory_mb {stage_peak}")

    # the creep: RSS against (interpolated) step over the second half of training
    half = [(step_at(logged, t), rss) for t, rss in r["samples"] if t_first <= t <= t_last]
    half = [(s, rss) for s, rss in half if s == s and s >= s_last / 2]
    print(f"creep                {slope_per_1000(half):+.2f} MB per 1000 steps (least squares, "
          f"{len(half)} samples, steps {s_last // 2}-{s_last})")

    print("\n  step    RSS MB")
    picks = sorted({min(range(len(logged)), key=lambda i: abs(logged[i][1] - s_first - k * (s_last - s_first) / 9))
                    for k in range(10)})
    for i in picks:
        print(f"  {logged[i][1]:>5}  {logged[i][2]:8.1f}")


# --- format -------------------------------------------------------------------------------------

def write_rows(path: Path, rows: int, seed: int) -> None:
    """Short rows of the demo's SFT shape: "What is a + b?" with a few answer styles."""
    import random

    rng = random.Random(seed)
    styles = ("{s}", "{a} + {b} = {s}", "Well, I think the answer is {s}.", "The sum is {s}.")
    questions = ("What is {a} + {b}?", "What's {a} plus {b}?", "Add {a} and {b}.")
    with path.open("w") as f:
        for _ in range(rows):
            a, b = rng.randint(0, 999), rng.randint(0, 999)
            msgs = [{"role": "user", "content": rng.choice(questions).format(a=a, b=b)},
                    {"role": "assistant", "content": rng.choice(styles).format(a=a, b=b, s=a + b)}]
            f.write(json.dumps({"messages": msgs}) + "\n")


def bench_format(args) -> None:
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    env = base_env(work, "hf-datasets-cache-format")
    ensure_tiny(work, env)
    data = work / f"sft_{args.rows}.jsonl"
    if not data.exists():
        t = time.time()
        write_rows(data, args.rows, args.seed)
        print(f"wrote {args.rows:,} rows to {data} in {time.time() - t:.1f} s", flush=True)
    cfg_path, _ = derived_config(Path(args.config), work, f"format_{args.rows}.yaml",
                                 data={"sft": {"kind": "sft", "train": [{"path": str(data)}]}})
    out = work / f"format_{args.rows}"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(env["HF_DATASETS_CACHE"], ignore_errors=True)

    # the reference: a Python process at the point format reaches before reading any data (its
    # imports, then the tokenizer, which brings in torch), measured separately
    probe = ("import sys, posttrain.cli, posttrain.stages.format, posttrain.data, datasets, transformers\n"
             "from posttrain import config, models\n"
             "rss = lambda: open('/proc/self/status').read().split('VmRSS:')[1].split()[0]\n"
             "print(rss())\n"
             "models.load_tokenizer(config.load_config(sys.argv[1]))\n"
             "print(rss())")
    imports_kb, baseline_kb = subprocess.run([str(PYTHON), "-c", probe, str(cfg_path)], env=env, cwd=ROOT,
                                             check=True, capture_output=True, text=True).stdout.split()[-2:]
    imports_mb, baseline_mb = int(imports_kb) / 1024, int(baseline_kb) / 1024

    cmd = [str(POSTTRAIN), "format", str(cfg_path), "-o", str(out)]
    print("$ " + " ".join(cmd), flush=True)
    env["BENCH_LOG"] = str(work / f"format_{args.rows}.log")
    r = run_sampled(cmd, env)
    print(f"exit code {r['rc']} (log: {env['BENCH_LOG']})")
    if r["rc"] != 0:
        print("\n".join(Path(env["BENCH_LOG"]).read_text().splitlines()[-15:]))
        return
    print(f"\nformat of {args.rows:,} rows ({data.stat().st_size / 2**20:.1f} MB of JSONL)")
    print(f"wall time            {r['wall_s']:.1f} s: {args.rows / r['wall_s']:,.0f} rows/s")
    print(f"peak RSS             {r['ru_maxrss_mb']:.1f} MB (kernel ru_maxrss via wait4); "
          f"max sampled {max(s for _, s in r['samples']):.1f} MB ({len(r['samples'])} samples)")
    print(f"RSS before data      {baseline_mb:.1f} MB (format's imports + tokenizer, measured separately; "
          f"imports alone {imports_mb:.1f} MB)")
    print(f"peak - before data   {r['ru_maxrss_mb'] - baseline_mb:.1f} MB")
    print(f"output directory     {dir_mb(out):.1f} MB ({out})")
    print(f"HF datasets cache    {dir_mb(Path(env['HF_DATASETS_CACHE'])):.1f} MB")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="/tmp/posttrain-bench-load", help="scratch directory")
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sft", help="the demo's SFT for factor x its steps, RSS start/end/creep")
    s.add_argument("--factor", type=int, default=10, help="times the config's sft max_steps")
    s.add_argument("--steps", type=int, help="max_steps outright (overrides --factor)")
    s.add_argument("--logging-steps", type=int, default=50)
    s.set_defaults(func=bench_sft)
    f = sub.add_parser("format", help="posttrain format on N generated short rows, peak RSS")
    f.add_argument("--rows", type=int, default=1_000_000)
    f.add_argument("--seed", type=int, default=0)
    f.set_defaults(func=bench_format)
    args = p.parse_args()
    args.func(args)


if __name__ == "__main__":
    sys.exit(main())
