#!/usr/bin/env python
"""posttrain against plain TRL on CPU: per-step overhead, start-up, data preparation.

  stages   SFT (trl.SFTTrainer), reward (trl.RewardTrainer) and DPO (trl.DPOTrainer), each run
           through the real CLI (`posttrain sft|reward|dpo CONFIG -o DIR --set ...`) and through a
           plain ~25-line TRL script (plain_sft, plain_reward, plain_dpo below) with the same model
           directory, the same formatted rows, seed and hyperparameters. First the equivalence
           proof, then the timing (docs: ../shared/docs/benchmarking.md):
             proof   the tensors of the first --batches batches the trainer fed to training_step
                     (input_ids, labels / attention masks / completion masks) are identical, the
                     trainable parameters at train begin have the same sums (same init: reward head,
                     LoRA A), and the losses of the first --proof-steps steps are allclose (max |Δ|
                     printed). The TrainingArguments that differ between the arms are listed. A
                     stage that fails the proof gets no ratio (and no further repeats).
             timing  --repeats interleaved pairs (plain, posttrain, plain, posttrain, ...); per run
                     the median step time over steps --window..--steps; the ratio posttrain/plain
                     is the median of the per-repeat ratios, with their min-max spread.
  startup  wall time of `posttrain --help` and `posttrain validate configs/demo.yaml` (median of
           --runs) and whether either imports torch / transformers / trl / datasets
           (`python -X importtime -m posttrain.cli ...`).
  format   `posttrain format` on --rows generated rows of the demo's SFT shape: rows/s and
           tokens/s, cold (fresh HF_DATASETS_CACHE) and warm (same cache, new output directory),
           then TRL's own tokenization of the formatted rows (SFTTrainer dataset preparation,
           template -> tokenize), cold and warm.

How step times are taken. posttrain's metrics.jsonl (callbacks.MetricsJsonl) holds every log record
(step, loss, grad_norm, learning_rate, epoch, ...) but no wall time, so it cannot give step times.
Both arms therefore get the same instrument (`instrument` below), attached after the trainer is
constructed: a TrainerCallback appended last that takes time.perf_counter() at every on_step_end
(a step's time is the gap between two consecutive step ends: data fetch, forward, backward,
optimizer, every callback including posttrain's, and the logging of the step before), and a
wrapper around the trainer's bound training_step that records the loss it returns (full
precision, unlike a rounded log) and a copy of the first input batches. The plain script calls
instrument(trainer) itself. In the posttrain arm the real CLI runs in-process
(posttrain.cli.main(), the console script's entry point) and the only change is that the TRL
trainer class's __init__ (trl.SFTTrainer / RewardTrainer / DPOTrainer) is wrapped to call the same
instrument(self) when the constructor returns; nothing of posttrain is patched. Each run is a
fresh Python process.

What the plain arm reproduces of posttrain (stages/common.trainer_kwargs and the stage files):
the stage's `training:` section of the benchmark config (the demo's, with max_steps, logging_steps 1
and save_steps > max_steps set by --set), plus seed and data_seed = config seed, the CPU settings a
plain TRL user needs on a machine without CUDA (bf16 False: TRL's configs default bf16 to True
when fp16 is unset; use_cpu True; dataloader_pin_memory False), report_to none,
dataloader_num_workers 0; SFT: assistant_only_loss True; reward: set_seed(seed) before the score
head is created, pad_token_id on the model config; DPO: the config's LoRA (r, alpha, dropout,
all-linear) handed to TRL as peft_config (posttrain's reference: adapter_disabled does the same).
Settings posttrain adds that do not change the arithmetic are left at TRL's defaults in the plain
arm and listed in the TrainingArguments diff, so their cost is part of the measured overhead
(e.g. include_num_input_tokens_seen "non_padding" for SFT, save_total_limit 2).

Everything is written under --workdir (default /tmp/posttrain-bench-trl): the tiny model (built
once per --hidden/--layers/--heads with `posttrain init-tiny`), the demo data, the derived config,
its format output, the SFT model reward and DPO start from (built once with `posttrain sft`), and
the runs. Prints numbers; asserts nothing. Run from the repository root, e.g.

  OMP_NUM_THREADS=2 TOKENIZERS_PARALLELISM=false .venv/bin/python scripts/bench_trl.py stages
  .venv/bin/python scripts/bench_trl.py stages --stage sft --steps 15 --repeats 1   # a smoke run
  .venv/bin/python scripts/bench_trl.py startup
  .venv/bin/python scripts/bench_trl.py format --rows 50000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
POSTTRAIN = ROOT / ".venv" / "bin" / "posttrain"
PYTHON = ROOT / ".venv" / "bin" / "python"
THIS = Path(__file__).resolve()
STAGES = ("sft", "reward", "dpo")
TRAINERS = {"sft": "SFTTrainer", "reward": "RewardTrainer", "dpo": "DPOTrainer"}
DATASET = {"sft": "sft", "reward": "style", "dpo": "preference"}  # the demo's data: section per stage


# --- header -------------------------------------------------------------------------------------

def header(args) -> None:
    """What the numbers were taken with: command, date, commit, versions, CPU, threads, load."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown") \
        if Path("/proc/cpuinfo").exists() else platform.processor() or "unknown"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        commit += " (working tree modified)" if dirty else ""
    except OSError:
        commit = "unknown"
    versions = ", ".join(f"{p} {_version(p)}" for p in ("posttrain", "torch", "transformers", "trl", "peft",
                                                        "accelerate", "datasets"))
    env = " ".join(f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "TOKENIZERS_PARALLELISM") if k in os.environ)
    command = [_relative(sys.executable), _relative(sys.argv[0]), *sys.argv[1:]]
    print(f"$ {env + ' ' if env else ''}{' '.join(shlex.quote(a) for a in command)}")
    print(f"date       {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}")
    print(f"commit     {commit}")
    print(f"python     {platform.python_version()}; {versions}")
    print(f"cpu        {cpu}; {os.cpu_count()} logical cores; threads {args.threads} "
          f"(OMP_NUM_THREADS, torch.set_num_threads); load average {_load()}")
    print(flush=True)


def _relative(path: str) -> str:
    p = Path(path).absolute()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else path


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


# --- scratch model, data, config ---------------------------------------------------------------

def base_env(work: Path, threads: int, cache: str = "hf-datasets-cache") -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(work / cache),
               OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               BENCH_THREADS=str(threads), PYTHONUNBUFFERED="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def model_dir(work: Path, args) -> Path:
    return work / f"tiny-h{args.hidden}-l{args.layers}-a{args.heads}"


def ensure_tiny(work: Path, args, env: dict) -> Path:
    """A tiny Llama (--hidden/--layers/--heads) and the demo data, built once with init-tiny."""
    tiny = model_dir(work, args)
    if not (tiny / "config.json").exists() or not (work / "data" / "sft_train.jsonl").exists():
        cmd = [str(POSTTRAIN), "init-tiny", str(tiny), "--data-dir", str(work / "data"), "--hidden", str(args.hidden),
               "--layers", str(args.layers), "--heads", str(args.heads)]
        print(f"building: {' '.join(cmd)}", flush=True)
        subprocess.run(cmd, env=env, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return tiny


def bench_config(work: Path, tiny: Path, src: Path) -> tuple[Path, dict]:
    """The demo config with its model and data under work/, no eval data anywhere (no eval_fraction
    either), and only the stages benchmarked, so no evaluation happens during or around training."""
    import yaml

    cfg = yaml.safe_load(src.read_text())
    cfg["model"]["name_or_path"] = str(tiny)
    for section in cfg["data"].values():
        section["train"] = [{**s, "path": str(work / "data" / Path(s["path"]).name)} for s in section["train"]]
        section.pop("eval", None)
        section.pop("eval_fraction", None)
    cfg["stages"] = ["format", "sft", "reward", "dpo"]
    cfg["output_dir"] = str(work / f"chain-{tiny.name}")
    path = work / f"bench-{tiny.name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path, cfg


def overrides(stage: str, args) -> dict:
    """The training settings the benchmark fixes (on top of the config's `<stage>.training`)."""
    o = {"max_steps": args.steps, "logging_steps": 1, "save_steps": args.steps + 1, "gradient_checkpointing": False}
    if args.batch:
        o["per_device_train_batch_size"] = args.batch
    if args.max_length:
        o["max_length"] = args.max_length
    return o


def set_args(stage: str, values: dict) -> list[str]:
    return [a for k, v in values.items() for a in ("--set", f"{stage}.training.{k}={json.dumps(v)}")]


def run_logged(cmd: list[str], env: dict, log: Path) -> tuple[int, float]:
    with log.open("w") as f:
        t = time.perf_counter()
        rc = subprocess.run(cmd, env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
    return rc, time.perf_counter() - t


def tail(log: Path, n: int = 15) -> str:
    return "\n".join("    " + line for line in log.read_text(errors="replace").splitlines()[-n:])


def prepare(args, need_base: bool = True) -> dict | None:
    """Model, data, config, format output and the SFT model the reward and DPO stages start from."""
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    env = base_env(work, args.threads)
    tiny = ensure_tiny(work, args, env)
    cfg_path, cfg = bench_config(work, tiny, Path(args.config))
    fmt = Path(cfg["output_dir"]) / "format"
    if not (fmt / "posttrain.json").exists():
        cmd = [str(POSTTRAIN), "format", str(cfg_path), "-o", str(fmt), "--overwrite"]
        print(f"building: {' '.join(cmd)}", flush=True)
        rc, _ = run_logged(cmd, env, work / "format.log")
        if rc:
            print(f"format failed (exit {rc}):\n{tail(work / 'format.log')}")
            return None
    base = work / f"base-sft-{tiny.name}-{args.steps}"
    if need_base and not (base / "posttrain.json").exists():
        cmd = [str(POSTTRAIN), "sft", str(cfg_path), "-o", str(base), "--overwrite",
               *set_args("sft", overrides("sft", args))]
        print(f"building the SFT model reward and DPO start from: {' '.join(cmd)}", flush=True)
        rc, _ = run_logged(cmd, env, work / "base-sft.log")
        if rc:
            print(f"sft failed (exit {rc}):\n{tail(work / 'base-sft.log')}")
            return None
    return {"work": work, "env": env, "tiny": tiny, "cfg_path": cfg_path, "cfg": cfg, "format": fmt, "base": base}


# --- the instrument, the same in both arms -----------------------------------------------------

def instrument(trainer, record: str, n_batches: int) -> None:
    """Step-end times, the loss of every training_step, the first n_batches input batches, the
    trainable parameters' sums at train begin and the final TrainingArguments, written to
    `record` (.json) and `record`.pt when training ends."""
    import time

    import torch
    from transformers import TrainerCallback

    rec = {"trainer": type(trainer).__name__, "step_end": [], "losses": [], "logs": []}
    batches = []
    inner = trainer.training_step

    def training_step(model, inputs, *a, **k):
        if len(batches) < n_batches:
            batches.append({key: v.detach().cpu().clone() for key, v in inputs.items() if isinstance(v, torch.Tensor)})
        loss = inner(model, inputs, *a, **k)
        rec["losses"].append(loss.detach().float().item())
        return loss

    trainer.training_step = training_step

    class StepTimer(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            rec["trainable"] = {"count": sum(p.numel() for _, p in named), "tensors": len(named),
                                "sum": sum(p.detach().double().sum().item() for _, p in named),
                                "abs_sum": sum(p.detach().double().abs().sum().item() for _, p in named)}
            rec["t_begin"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            rec["step_end"].append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            rec["logs"].append({"step": state.global_step, **(logs or {})})

        def on_train_end(self, args, state, control, **kwargs):
            rec["args"] = {k: v if isinstance(v, (str, int, float, bool, type(None), list)) else str(v)
                           for k, v in trainer.args.to_dict().items()}
            rec["threads"] = torch.get_num_threads()
            Path(record).write_text(json.dumps(rec))
            torch.save(batches, record + ".pt")

    trainer.add_callback(StepTimer())


# --- the plain TRL scripts ----------------------------------------------------------------------

# What a CPU user of plain TRL sets (posttrain's device defaults for a machine without CUDA): TRL's
# own bf16 default fails or crawls there, and pinning memory needs an accelerator.
CPU = {"bf16": False, "use_cpu": True, "dataloader_pin_memory": False}


def plain_sft(spec: dict) -> None:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    train = datasets.load_dataset("parquet", data_files=spec["data"], split="train")
    args = SFTConfig(output_dir=spec["output"], seed=spec["seed"], data_seed=spec["seed"], **CPU,
                     report_to="none", dataloader_num_workers=0, assistant_only_loss=True, **spec["training"])
    trainer = SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
    instrument(trainer, spec["record"], spec["batches"])
    trainer.train()


def plain_reward(spec: dict) -> None:
    import datasets
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, set_seed
    from trl import RewardConfig, RewardTrainer

    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    set_seed(spec["seed"])  # the new score head is random
    model = AutoModelForSequenceClassification.from_pretrained(spec["model"], num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    train = datasets.load_dataset("parquet", data_files=spec["data"], split="train")
    args = RewardConfig(output_dir=spec["output"], seed=spec["seed"], data_seed=spec["seed"], **CPU,
                        report_to="none", dataloader_num_workers=0, **spec["training"])
    trainer = RewardTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
    instrument(trainer, spec["record"], spec["batches"])
    trainer.train()


def plain_dpo(spec: dict) -> None:
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    lora = spec["lora"]
    peft_config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                             target_modules=lora["target_modules"], task_type="CAUSAL_LM")
    train = datasets.load_dataset("parquet", data_files=spec["data"], split="train")
    args = DPOConfig(output_dir=spec["output"], seed=spec["seed"], data_seed=spec["seed"], **CPU,
                     report_to="none", dataloader_num_workers=0, **spec["training"])
    trainer = DPOTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer,
                         peft_config=peft_config)  # no ref_model: the adapter disabled is the reference
    instrument(trainer, spec["record"], spec["batches"])
    trainer.train()


PLAIN = {"sft": plain_sft, "reward": plain_reward, "dpo": plain_dpo}


def arm_main(argv: list[str]) -> None:
    """In a fresh process: `_arm plain STAGE SPEC.json` or `_arm posttrain STAGE RECORD BATCHES -- CLI ARGS`."""
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    kind, stage = argv[0], argv[1]
    if kind == "plain":
        PLAIN[stage](json.loads(Path(argv[2]).read_text()))
        return
    record, n_batches, cli = argv[2], int(argv[3]), argv[argv.index("--") + 1:]
    import trl

    cls = getattr(trl, TRAINERS[stage])
    constructor = cls.__init__

    def init(self, *a, **k):
        constructor(self, *a, **k)
        if type(self) is cls:
            instrument(self, record, n_batches)

    cls.__init__ = init
    from posttrain import cli as posttrain_cli

    sys.argv = ["posttrain", *cli]
    posttrain_cli.main()


# --- stages: proof and timing -------------------------------------------------------------------

def lora_settings(cfg: dict, stage: str) -> dict:
    """The stage's lora: section with posttrain's defaults filled in (posttrain.config imports no torch)."""
    from posttrain.config import LoraConfig

    return LoraConfig(**cfg[stage].get("lora", {})).model_dump()


def run_arm(kind: str, stage: str, rep: int, ctx: dict, args) -> tuple[dict | None, Path]:
    work, cfg = ctx["work"], ctx["cfg"]
    run_dir = work / "runs" / f"{stage}-{kind}-{rep}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    record, log = run_dir / "record.json", run_dir / "log.txt"
    model = str(ctx["tiny"] if stage == "sft" else ctx["base"])
    if kind == "plain":
        training = {**cfg[stage]["training"], **overrides(stage, args)}
        spec = {"model": model, "data": str(ctx["format"] / DATASET[stage] / "train.parquet"), "seed": cfg["seed"],
                "training": training, "output": str(run_dir / "checkpoints"), "record": str(record),
                "batches": args.batches, "lora": lora_settings(cfg, stage)}
        (run_dir / "spec.json").write_text(json.dumps(spec, indent=1))
        cmd = [str(PYTHON), str(THIS), "_arm", "plain", stage, str(run_dir / "spec.json")]
    else:
        cli = [stage, str(ctx["cfg_path"]), "-o", str(run_dir / "out"), *set_args(stage, overrides(stage, args))]
        if stage != "sft":
            cli += ["--base", str(ctx["base"])]
        cmd = [str(PYTHON), str(THIS), "_arm", "posttrain", stage, str(record), str(args.batches), "--", *cli]
    (run_dir / "command.txt").write_text(" ".join(shlex.quote(c) for c in cmd) + "\n")
    rc, wall = run_logged(cmd, ctx["env"], log)
    if rc or not record.exists():
        print(f"  {stage} {kind} run {rep + 1} failed (exit {rc}; {log}):\n{tail(log)}", flush=True)
        return None, run_dir
    rec = json.loads(record.read_text())
    rec["wall_s"], rec["log"] = wall, str(log)
    rec["reused_format"] = "using the formatted data in" in log.read_text(errors="replace") if kind == "posttrain" \
        else None
    return rec, run_dir


def step_times(rec: dict) -> list[float]:
    """Seconds per step: step k's time is step_end[k] - step_end[k-1] (step 1 from train begin)."""
    ends = [rec["t_begin"], *rec["step_end"]]
    return [b - a for a, b in zip(ends, ends[1:])]


def window_median(rec: dict, lo: int, hi: int) -> float:
    times = step_times(rec)  # times[k-1] is step k
    return statistics.median(times[lo - 1:hi])


def prove(stage: str, plain: dict, post: dict, plain_dir: Path, post_dir: Path, args) -> tuple[bool, float, list[str]]:
    """Same input tensors, same initial trainable parameters, allclose losses. Returns (ok, max |Δloss|, lines)."""
    import torch

    lines, ok = [], True
    a, b = torch.load(plain_dir / "record.json.pt"), torch.load(post_dir / "record.json.pt")
    if len(a) != len(b) or len(a) < args.batches:
        ok = False
        lines.append(f"batches recorded: plain {len(a)}, posttrain {len(b)} (wanted {args.batches})")
    for i, (x, y) in enumerate(zip(a, b)):
        if set(x) != set(y):
            ok = False
            lines.append(f"batch {i + 1}: keys differ: plain {sorted(x)}, posttrain {sorted(y)}")
        for key in sorted(set(x) & set(y)):
            if x[key].shape != y[key].shape:
                ok = False
                lines.append(f"batch {i + 1} {key}: shapes differ: plain {tuple(x[key].shape)}, "
                             f"posttrain {tuple(y[key].shape)}")
            elif not torch.equal(x[key], y[key]):
                ok = False
                differ = (x[key] != y[key]).sum().item()
                lines.append(f"batch {i + 1} {key}: {differ} of {x[key].numel()} elements differ")
    if ok:
        keys = ", ".join(f"{k} {tuple(v.shape)}" for k, v in a[0].items())
        lines.append(f"inputs: first {len(a)} batches identical ({keys})")
    ta, tb = plain["trainable"], post["trainable"]
    tol = 1e-9 * max(1.0, ta["abs_sum"])
    same_init = ta["count"] == tb["count"] and ta["tensors"] == tb["tensors"] and \
        abs(ta["sum"] - tb["sum"]) <= tol and abs(ta["abs_sum"] - tb["abs_sum"]) <= tol
    lines.append(f"trainable parameters at train begin: plain {ta['count']:,} in {ta['tensors']} tensors "
                 f"(sum {ta['sum']:.9g}, |sum| {ta['abs_sum']:.9g}); posttrain {tb['count']:,} in {tb['tensors']} "
                 f"(sum {tb['sum']:.9g}, |sum| {tb['abs_sum']:.9g}): {'same' if same_init else 'DIFFERENT'}")
    ok &= same_init
    n = min(args.proof_steps, len(plain["losses"]), len(post["losses"]))
    la = torch.tensor(plain["losses"][:n], dtype=torch.float64)
    lb = torch.tensor(post["losses"][:n], dtype=torch.float64)
    if n == 0:
        return False, float("nan"), [*lines, "no losses recorded"]
    diff = (la - lb).abs().max().item()
    close = n >= min(args.proof_steps, args.steps) and torch.allclose(la, lb, rtol=args.rtol, atol=args.atol)
    lines.append(f"losses of steps 1-{n}: max |Δ| {diff:.3e} (allclose rtol {args.rtol:g}, atol {args.atol:g}): "
                 f"{'ok' if close else 'NOT CLOSE'}; step 1 {la[0]:.6f} vs {lb[0]:.6f}, "
                 f"step {n} {la[-1]:.6f} vs {lb[-1]:.6f}")
    if not close:
        ok = False
        first = next((i for i in range(n) if not torch.allclose(la[i], lb[i], rtol=args.rtol, atol=args.atol)), None)
        if first is not None:
            lines.append(f"  first differing step {first + 1}: plain {la[first]:.8f}, posttrain {lb[first]:.8f}")
    return ok, diff, lines


IGNORED_ARGS = ("output_dir", "logging_dir", "run_name", "hub_model_id")


def args_diff(plain: dict, post: dict) -> list[str]:
    pa, pb = plain.get("args", {}), post.get("args", {})
    return [f"{k}: plain {pa.get(k)!r}, posttrain {pb.get(k)!r}" for k in sorted(set(pa) | set(pb))
            if k not in IGNORED_ARGS and pa.get(k) != pb.get(k)]


def bench_stages(args) -> None:
    header(args)
    if args.steps < args.window:
        sys.exit(f"--steps {args.steps} is below --window {args.window}: no step to time")
    stages = STAGES if args.stage == "all" else (args.stage,)
    ctx = prepare(args, need_base=any(s != "sft" for s in stages))
    if ctx is None:
        return
    cfg = ctx["cfg"]
    print(f"model   {ctx['tiny']} (hidden {args.hidden}, layers {args.layers}, heads {args.heads}); "
          f"reward and DPO start from {ctx['base']}")
    print(f"config  {ctx['cfg_path']} (configs/demo.yaml, model/data under the workdir, no eval data); "
          f"formatted rows from {ctx['format']}")
    print(f"steps   {args.steps} per run, logging_steps 1, save_steps {args.steps + 1}; timed: median of steps "
          f"{args.window}-{args.steps}; proof: first {args.batches} batches, "
          f"losses of steps 1-{min(args.proof_steps, args.steps)}")
    print(flush=True)
    rows = []
    for stage in stages:
        training = {**cfg[stage]["training"], **overrides(stage, args)}
        print(f"== {stage} ({TRAINERS[stage]}): {', '.join(f'{k} {v}' for k, v in training.items())}", flush=True)
        med, ratios, equivalent, maxdiff, repro = {"plain": [], "posttrain": []}, [], None, float("nan"), 0.0
        first = {}
        for rep in range(args.repeats):
            recs = {}
            for kind in ("plain", "posttrain"):
                rec, run_dir = run_arm(kind, stage, rep, ctx, args)
                if rec is None:
                    break
                if len(rec["step_end"]) < args.steps:
                    print(f"  {stage} {kind} run {rep + 1}: only {len(rec['step_end'])} steps recorded")
                    rec = None
                    break
                recs[kind] = (rec, run_dir)
                m = window_median(rec, args.window, args.steps)
                med[kind].append(m)
                reused = f"; format output reused: {'yes' if rec['reused_format'] else 'NO'}" \
                    if kind == "posttrain" else ""
                print(f"  run {rep + 1} {kind:9}  {1000 * m:7.2f} ms/step (median of steps {args.window}-{args.steps}); "
                      f"process wall {rec['wall_s']:.1f} s{reused}", flush=True)
            if len(recs) < 2:
                equivalent = False
                break
            if rep == 0:
                (pa, da), (pb, db) = recs["plain"], recs["posttrain"]
                equivalent, maxdiff, lines = prove(stage, pa, pb, da, db, args)
                print(f"  proof ({'passed' if equivalent else 'FAILED'}):")
                for line in lines:
                    print(f"    {line}")
                diff = args_diff(pa, pb)
                print("    TrainingArguments that differ (output paths left out): " + ("none" if not diff else ""))
                for line in diff:
                    print(f"      {line}")
                first = {k: v[0]["losses"] for k, v in recs.items()}
                if not equivalent:
                    print("  not equivalent: no ratio for this stage, no further repeats", flush=True)
                    break
            else:  # every later run must reproduce its arm's first-run losses
                for k, v in recs.items():
                    repro = max(repro, *(abs(x - y) for x, y in zip(first[k], v[0]["losses"])))
            ratios.append(med["posttrain"][-1] / med["plain"][-1])
        if args.repeats > 1 and equivalent:
            print(f"  later runs reproduce the first run's losses: max |Δ| {repro:.3e}")
        rows.append((stage, med, ratios if equivalent else [], equivalent, maxdiff))
        print(flush=True)

    print(f"load average at the end: {_load()}")
    print(f"\n| stage | plain ms/step | posttrain ms/step | ratio posttrain/plain | spread of per-repeat ratios | repeats | "
          f"equivalent (max abs loss diff, steps 1-{min(args.proof_steps, args.steps)}) |")
    print("|---|---|---|---|---|---|---|")
    for stage, med, ratios, equivalent, maxdiff in rows:
        p = f"{1000 * statistics.median(med['plain']):.2f}" if med["plain"] else "-"
        q = f"{1000 * statistics.median(med['posttrain']):.2f}" if med["posttrain"] else "-"
        r = f"{statistics.median(ratios):.3f}" if ratios else "- (not reported)"
        s = f"{min(ratios):.3f}-{max(ratios):.3f}" if ratios else "-"
        print(f"| {stage} | {p} | {q} | {r} | {s} | {len(ratios)} | {'yes' if equivalent else 'NO'} ({maxdiff:.1e}) |")


# --- startup ------------------------------------------------------------------------------------

HEAVY = ("torch", "transformers", "trl", "datasets", "peft", "accelerate")


def bench_startup(args) -> None:
    header(args)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(args.threads))
    config = str(Path(args.config).resolve().relative_to(ROOT)) if Path(args.config).resolve().is_relative_to(ROOT) \
        else args.config
    commands = {"posttrain --help": ["--help"], f"posttrain validate {config}": ["validate", config]}
    print(f"| command | median wall s | min | max | runs | imports {', '.join(HEAVY)} | posttrain.cli import s | "
          "all imports s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, cli in commands.items():
        walls = []
        for _ in range(args.runs):
            t = time.perf_counter()
            r = subprocess.run([str(POSTTRAIN), *cli], env=env, cwd=ROOT, capture_output=True)
            walls.append(time.perf_counter() - t)
            if r.returncode:
                print(f"{name} failed (exit {r.returncode}): {r.stderr.decode(errors='replace')[-500:]}")
                return
        # in-process like the console script (posttrain.cli.main), so posttrain.cli shows in the import tree
        code = f"import sys; sys.argv = {['posttrain', *cli]!r}; from posttrain.cli import main; main()"
        r = subprocess.run([str(PYTHON), "-X", "importtime", "-c", code], env=env, cwd=ROOT, capture_output=True,
                           text=True)
        imported, cli_us, total_us = set(), None, 0
        for line in r.stderr.splitlines():
            if not line.startswith("import time:") or "|" not in line or "cumulative" in line:
                continue
            _, cumulative, module = line.split(":", 1)[1].split("|")
            if not module.startswith("  "):  # a top-level import: its cumulative time counts once
                total_us += int(cumulative)
            module = module.strip()
            imported.add(module.split(".")[0])
            if module == "posttrain.cli":
                cli_us = int(cumulative)
        heavy = ", ".join(f"{m} {'yes' if m in imported else 'no'}" for m in HEAVY)
        cli_s = f"{cli_us / 1e6:.3f}" if cli_us is not None else "-"
        print(f"| `{name}` | {statistics.median(walls):.3f} | {min(walls):.3f} | {max(walls):.3f} | {args.runs} | "
              f"{heavy} | {cli_s} | {total_us / 1e6:.3f} |", flush=True)
    print("\nwall: the console script .venv/bin/posttrain, process start to exit. imports: one more run under "
          "`python -X importtime` calling posttrain.cli.main() the same way (a package counts as imported if any of its "
          "modules is; 'all imports' sums the top-level cumulative times, interpreter start-up modules included).")


# --- format -------------------------------------------------------------------------------------

def format_main(argv: list[str]) -> None:
    """In a fresh process: `_format RECORD -- format CONFIG -o DIR`: posttrain's CLI with timers around
    the format stage, its loading/conversion and its template checks."""
    import time as _time

    timings = {"load_tokenizer_s": 0.0, "load_source_s": 0.0, "convert_s": 0.0, "check_rows_s": 0.0}
    record, cli = argv[0], argv[argv.index("--") + 1:]
    from posttrain import data, models, templates
    from posttrain.stages import format as format_stage

    def timed(module, name, key):
        inner = getattr(module, name)

        def wrapper(*a, **k):
            t = _time.perf_counter()
            try:
                return inner(*a, **k)
            finally:
                timings[key] = timings.get(key, 0.0) + _time.perf_counter() - t
        setattr(module, name, wrapper)

    timed(models, "load_tokenizer", "load_tokenizer_s")
    timed(data, "load_source", "load_source_s")
    timed(data, "_convert", "convert_s")
    timed(templates, "check_rows", "check_rows_s")
    timed(format_stage, "run", "stage_s")
    from posttrain import cli as posttrain_cli

    sys.argv = ["posttrain", *cli]
    try:
        posttrain_cli.main()
    finally:
        Path(record).write_text(json.dumps(timings))


def tokenize_main(argv: list[str]) -> None:
    """In a fresh process: `_tokenize MODEL PARQUET MAX_LENGTH RECORD`: TRL's SFTTrainer dataset
    preparation (chat template, tokenize, assistant masks, truncation) of the formatted rows."""
    import time as _time

    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    model_path, parquet, max_length, record = argv[0], argv[1], int(argv[2]), argv[3]
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    t = _time.perf_counter()
    train = datasets.load_dataset("parquet", data_files=parquet, split="train")
    load_s = _time.perf_counter() - t
    args = SFTConfig(output_dir=str(Path(record).parent / "checkpoints"), max_length=max_length, assistant_only_loss=True,
                     bf16=False, report_to="none", max_steps=1, dataloader_num_workers=0)
    t = _time.perf_counter()
    trainer = SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
    prepare_s = _time.perf_counter() - t
    lengths = [len(x) for x in trainer.train_dataset["input_ids"]]
    Path(record).write_text(json.dumps({"load_s": load_s, "prepare_s": prepare_s, "rows": len(lengths),
                                        "tokens": sum(lengths), "max_tokens": max(lengths)}))


def cache_files(cache: Path) -> int:
    return sum(1 for f in cache.rglob("*") if f.is_file()) if cache.exists() else 0


def bench_format(args) -> None:
    header(args)
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_load import write_rows  # the same generated rows as bench_load.py format

    import yaml

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    env = base_env(work, args.threads, cache="hf-datasets-cache-format")
    cache = Path(env["HF_DATASETS_CACHE"])
    tiny = ensure_tiny(work, args, env)
    rows_file = work / f"sft_{args.rows}.jsonl"
    if not rows_file.exists():
        write_rows(rows_file, args.rows, args.seed)
    demo = yaml.safe_load(Path(args.config).read_text())
    max_length = demo["sft"]["training"].get("max_length", 1024)
    cfg = {"model": {"name_or_path": str(tiny)}, "template": demo["template"],
           "data": {"sft": {"kind": "sft", "train": [{"path": str(rows_file)}]}}, "stages": ["format"],
           "output_dir": str(work / "format-chain"), "sft": {"training": {"max_length": max_length}}}
    cfg_path = work / f"format_{args.rows}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    print(f"data    {rows_file}: {args.rows:,} rows of the demo's SFT shape ({rows_file.stat().st_size / 2**20:.1f} MB); "
          f"tokenizer {tiny}; HF_DATASETS_CACHE {cache}")
    shutil.rmtree(cache, ignore_errors=True)
    results = {}
    for run in ("cold", "warm"):
        out = work / f"format_{args.rows}_{run}"
        shutil.rmtree(out, ignore_errors=True)
        record = work / f"format_{args.rows}_{run}.json"
        before = cache_files(cache)
        cmd = [str(PYTHON), str(THIS), "_format", str(record), "--", "format", str(cfg_path), "-o", str(out)]
        rc, wall = run_logged(cmd, env, work / f"format_{run}.log")
        if rc:
            print(f"format ({run}) failed (exit {rc}):\n{tail(work / f'format_{run}.log')}")
            return
        results[run] = {**json.loads(record.read_text()), "wall_s": wall, "new_cache_files": cache_files(cache) - before}
    # TRL's tokenization of the formatted rows (what sft does at trainer construction), cold and warm
    tcache = work / "hf-datasets-cache-tokenize"
    shutil.rmtree(tcache, ignore_errors=True)
    tenv = {**env, "HF_DATASETS_CACHE": str(tcache)}
    parquet = work / f"format_{args.rows}_cold" / "sft" / "train.parquet"
    for run in ("cold", "warm"):
        record = work / f"tokenize_{args.rows}_{run}.json"
        before = cache_files(tcache)
        cmd = [str(PYTHON), str(THIS), "_tokenize", str(tiny), str(parquet), str(max_length), str(record)]
        rc, wall = run_logged(cmd, tenv, work / f"tokenize_{run}.log")
        if rc:
            print(f"tokenize ({run}) failed (exit {rc}):\n{tail(work / f'tokenize_{run}.log')}")
            return
        results[f"tokenize_{run}"] = {**json.loads(record.read_text()), "wall_s": wall,
                                      "new_cache_files": cache_files(tcache) - before}
    tokens = results["tokenize_cold"]["tokens"]
    print(f"tokens  {tokens:,} in the formatted rows (TRL's tokenization: chat template, max_length {max_length}; "
          f"longest row {results['tokenize_cold']['max_tokens']} tokens)\n")
    print("| run | process wall s | stage s | tokenizer s | data s | load (json -> Arrow) s | convert s | "
          "template checks s | rows/s (data s) | tokens/s (data s) | new files in HF cache |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for run in ("cold", "warm"):
        r = results[run]
        data_s = r["stage_s"] - r["load_tokenizer_s"]
        print(f"| posttrain format, {run} | {r['wall_s']:.2f} | {r['stage_s']:.2f} | {r['load_tokenizer_s']:.2f} | "
              f"{data_s:.2f} | {r['load_source_s']:.2f} | {r['convert_s']:.2f} | {r['check_rows_s']:.2f} | "
              f"{args.rows / data_s:,.0f} | {tokens / data_s:,.0f} | {r['new_cache_files']} |")
    for run in ("cold", "warm"):
        r = results[f"tokenize_{run}"]
        print(f"| TRL SFTTrainer dataset preparation, {run} | {r['wall_s']:.2f} | {r['prepare_s']:.2f} | - | "
              f"{r['prepare_s']:.2f} | {r['load_s']:.2f} (parquet) | - | - | {r['rows'] / r['prepare_s']:,.0f} | "
              f"{r['tokens'] / r['prepare_s']:,.0f} | {r['new_cache_files']} |")
    print("""
What the rows mean:
- stage s: posttrain.stages.format.run in-process; process wall adds interpreter start and the CLI's imports. tokenizer s:
  models.load_tokenizer inside the stage, which is where transformers (and torch) are first imported; it does not grow
  with the data. data s = stage s - tokenizer s: loading, conversion, checks, parquet and manifest writes; rows/s and
  tokens/s are per data second. posttrain format converts every row (datasets.map, load_from_cache_file=False)
  and renders/tokenizes only the first 1000 rows for its template checks (templates.check_rows limit); the tokens/s column
  counts all tokens of the data against the stage time, it is not a tokenizer speed.
- cold: empty HF_DATASETS_CACHE. warm: the cold run's cache kept, a new output directory. posttrain's conversion is never
  read from the cache (load_from_cache_file=False), so warm can only reuse load_dataset's JSON -> Arrow build; "new files
  in HF cache" shows whether the warm run wrote (rebuilt) anything.
- TRL SFTTrainer dataset preparation: the SFTTrainer constructor on the formatted parquet (what `posttrain sft` does after
  format: chat template, tokenize, assistant masks, truncation), tiny model already loaded; "load" is load_dataset of the
  parquet. warm: the same HF_DATASETS_CACHE, where datasets may return the cached map results by fingerprint.""")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("_arm", "_format", "_tokenize"):  # internal: one run, fresh process
        {"_arm": arm_main, "_format": format_main, "_tokenize": tokenize_main}[sys.argv[1]](sys.argv[2:])
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="/tmp/posttrain-bench-trl", help="scratch directory")
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS and torch.set_num_threads")
    p.add_argument("--hidden", type=int, default=128, help="tiny model hidden size (the demo's: 64)")
    p.add_argument("--layers", type=int, default=4, help="tiny model layers (the demo's: 2)")
    p.add_argument("--heads", type=int, default=4)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("stages", help="posttrain vs plain TRL: equivalence proof, then step time")
    s.add_argument("--stage", choices=[*STAGES, "all"], default="all")
    s.add_argument("--repeats", type=int, default=3, help="interleaved plain/posttrain pairs")
    s.add_argument("--steps", type=int, default=60, help="max_steps of every run (and of the SFT base)")
    s.add_argument("--window", type=int, default=10, help="first timed step (timed: window..steps)")
    s.add_argument("--proof-steps", type=int, default=20, help="losses compared for the proof")
    s.add_argument("--batches", type=int, default=2, help="input batches compared for the proof")
    s.add_argument("--batch", type=int, help="per_device_train_batch_size for every stage (default: the config's)")
    s.add_argument("--max-length", type=int, help="max_length for every stage (default: the config's)")
    s.add_argument("--rtol", type=float, default=1e-5)
    s.add_argument("--atol", type=float, default=1e-6)
    s.set_defaults(func=bench_stages)
    u = sub.add_parser("startup", help="posttrain --help / validate: wall time and heavy imports")
    u.add_argument("--runs", type=int, default=10)
    u.set_defaults(func=bench_startup)
    f = sub.add_parser("format", help="posttrain format throughput (cold/warm) and TRL tokenization")
    f.add_argument("--rows", type=int, default=50_000)
    f.add_argument("--seed", type=int, default=0)
    f.set_defaults(func=bench_format)
    args = p.parse_args()
    args.func(args)


if __name__ == "__main__":
    sys.exit(main())
