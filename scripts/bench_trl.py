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

A real pretrained model (`stages --model PATH`): a Hugging Face directory or a `.gguf` file instead
of the tiny model, for every stage (reward and DPO start from the model itself, not from an SFT
run; the derived config lists stages [format, reward, dpo] so posttrain's chain check, which refuses
dpo.reference adapter_disabled after a LoRA SFT, does not apply to stages that are not a chain).
posttrain gets PATH as given (a .gguf file is converted on first use, posttrain.gguf.resolve, and
every run hashes the file again: start-up cost, not step time); the plain arm loads the converted
directory, which a helper process gets from posttrain.gguf.resolve. --template sets template.name
(chatml for SmolLM2, gemma for Gemma 3); --method lora sets every stage's method with LoRA
--lora-r/--lora-alpha/--lora-dropout on all-linear (default 16/32/0.0; with dropout > 0 the proof
also needs both arms to draw the same dropout masks). What the plain arm reproduces on top of the
above, with --model:
  tokenizer  the chat template and pad token posttrain's models.load_tokenizer installs for the stage
             (SFT: the template with {% generation %} markers), read by a helper process and set on
             the plain tokenizer (a plain TRL user's two lines); a grown vocabulary is refused.
  SFT, DPO   LoRA as peft_config with posttrain's lora_config (r, alpha, dropout, all-linear,
             task CAUSAL_LM, no modules_to_save). posttrain applies SFT's adapter itself (seed,
             load, get_peft_model); TRL's SFTTrainer seeds and then applies peft_config: the same
             RNG state, so the same LoRA A. DPO: posttrain also hands TRL the peft_config
             (reference adapter_disabled); --method full: TRL's own reference copy in the plain arm,
             posttrain's deepcopy.
  reward     posttrain: seed, AutoModelForSequenceClassification (random score head), get_peft_model
             with task SEQ_CLS and modules_to_save [score] (the head trained in full and saved with
             the adapter; models.lora_config). Plain: the same LoRA and modules_to_save [score] as
             peft_config, the model passed by path (model_init_kwargs dtype float32), so that TRL's
             RewardTrainer seeds, creates the head, then the adapter: posttrain's order and RNG
             draws. (An instantiated model would get the head from one seed and the adapter from
             TRL's second set_seed: a different LoRA A.) RewardTrainer sets config.pad_token_id.

Peak memory per run (both arms, Linux): VmHWM from /proc/self/status, read at train begin, at train
end and when the process ends, with VmHWM reset (`5 > /proc/self/clear_refs`) after each of the
first two reads, so the phases are: setup (process start to train begin: imports, model, data,
trainer, and posttrain's checks before training, e.g. DPO's step-0 evaluation on 256 pairs at
per_device_eval_batch_size 32), train (the training steps), after (train end to exit: posttrain's
evaluation, saving and checks; the reward stage's reload check runs in a child process, not
counted). Each phase's peak includes what was resident when it began. process = max of the three =
the run's peak RSS. The reset also lowers getrusage's ru_maxrss, so posttrain's own manifest
peak_memory_mb is not meaningful in these runs.

Everything is written under --workdir (default /tmp/posttrain-bench-trl): the tiny model (built
once per --hidden/--layers/--heads with `posttrain init-tiny`), the demo data, the derived config,
its format output, the SFT model reward and DPO start from (built once with `posttrain sft`), and
the runs. Prints numbers; asserts nothing. Run from the repository root, e.g.

  OMP_NUM_THREADS=2 TOKENIZERS_PARALLELISM=false .venv/bin/python scripts/bench_trl.py stages
  .venv/bin/python scripts/bench_trl.py stages --stage sft --steps 15 --repeats 1   # a smoke run
  .venv/bin/python scripts/bench_trl.py startup
  .venv/bin/python scripts/bench_trl.py format --rows 50000

Real models, on an idle machine (each command: the equivalence proof, then 3 interleaved pairs;
the per-run lines and the last table give peak RSS per arm):

  # SmolLM2-135M-Instruct, LoRA r 16 on all linear layers: SFT, reward and DPO
  OMP_NUM_THREADS=2 TOKENIZERS_PARALLELISM=false .venv/bin/python scripts/bench_trl.py \
      --workdir /tmp/posttrain-bench-real stages --model runs/models/SmolLM2-135M-Instruct.Q4_1.gguf \
      --template chatml --method lora --stage all --batch 8 --max-length 64 --steps 30 --window 10 \
      --proof-steps 20 --repeats 3
  # Gemma-3-270M (262k vocabulary), DPO with LoRA: posttrain's peak RSS against plain TRL's
  OMP_NUM_THREADS=2 TOKENIZERS_PARALLELISM=false .venv/bin/python scripts/bench_trl.py \
      --workdir /tmp/posttrain-bench-real stages --model runs/models/gemma-3-270m-q4_k_m.gguf \
      --template gemma --method lora --stage dpo --batch 4 --max-length 64 --steps 20 --window 5 \
      --proof-steps 10 --repeats 3
  # a smoke run of one stage: the same with --stage sft|reward|dpo --steps 3 --repeats 1 --proof-steps 2 --batch 2
  # (posttrain's DPO arm also evaluates 256 training pairs before and after training: most of its wall time)
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


def bench_config(work: Path, tiny: Path, src: Path, args=None) -> tuple[Path, dict]:
    """The demo config with its model and data under work/, no eval data anywhere (no eval_fraction
    either), and only the stages benchmarked, so no evaluation happens during training (posttrain's
    reward and DPO stages still measure a sample of the training pairs around it, outside the steps).
    With --model: that model (as given: a .gguf file stays a .gguf file for posttrain), --template,
    --method with --lora-r/--lora-alpha/--lora-dropout (all-linear) for every stage, --data-dir."""
    import yaml

    cfg = yaml.safe_load(src.read_text())
    real = args is not None and getattr(args, "model", None)
    cfg["model"]["name_or_path"] = str(Path(args.model).resolve()) if real else str(tiny)
    data_dir = Path(args.data_dir).resolve() if real and args.data_dir else work / "data"
    for section in cfg["data"].values():
        section["train"] = [{**s, "path": str(_data_file(data_dir, Path(s["path"]).name))} for s in section["train"]]
        section.pop("eval", None)
        section.pop("eval_fraction", None)
    cfg["stages"] = ["format", "sft", "reward", "dpo"]
    name = tiny.name
    if real:
        if args.template:
            cfg.setdefault("template", {})["name"] = args.template
        for stage in STAGES:
            if args.method:
                cfg[stage]["method"] = args.method
            if cfg[stage].get("method", "full") != "full":
                cfg[stage]["lora"] = {"r": args.lora_r, "alpha": args.lora_alpha, "dropout": args.lora_dropout,
                                      "target_modules": "all-linear"}
        name = real_name(args)
        # every stage starts from the model (--base), not a chain: no sft in stages:, so that posttrain's
        # chain check (a DPO after a LoRA SFT continues that adapter: adapter_disabled refused) does not apply
        cfg["stages"] = ["format", "reward", "dpo"]
    cfg["output_dir"] = str(work / f"chain-{name}")
    path = work / f"bench-{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path, cfg


DATA_ALIASES = {"pref_train.jsonl": ("dpo_train.jsonl",)}  # the demo's name -> realtask's (runs/smollm2-cpu/data)


def _data_file(data_dir: Path, name: str) -> Path:
    for candidate in (name, *DATA_ALIASES.get(name, ())):
        if (data_dir / candidate).exists():
            return data_dir / candidate
    return data_dir / name


def real_name(args) -> str:
    """The scratch name of a --model run: model file/directory name, template, method, LoRA, data."""
    stem = Path(args.model).name.removesuffix(".gguf")
    lora = f"-r{args.lora_r}a{args.lora_alpha}d{args.lora_dropout:g}" if args.method == "lora" else ""
    data_dir = Path(args.data_dir).resolve() if args.data_dir else None
    data = f"-data-{data_dir.parent.name}-{data_dir.name}" if data_dir else ""
    return f"{stem}-{args.template or 'cfgtemplate'}-{args.method or 'cfgmethod'}{lora}{data}"


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
    """Model, data, config, format output and the SFT model the reward and DPO stages start from.
    With --model, reward and DPO start from that model itself (no SFT base is built)."""
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    env = base_env(work, args.threads)
    tiny = ensure_tiny(work, args, env)  # with --model: only for the demo data (the tiny model is not used)
    real = bool(getattr(args, "model", None))
    if real and not Path(args.model).exists():
        print(f"--model {args.model} does not exist")
        return None
    cfg_path, cfg = bench_config(work, tiny, Path(args.config), args)
    fmt = Path(cfg["output_dir"]) / "format"
    if not (fmt / "posttrain.json").exists():
        cmd = [str(POSTTRAIN), "format", str(cfg_path), "-o", str(fmt), "--overwrite"]
        print(f"building: {' '.join(cmd)}", flush=True)
        rc, _ = run_logged(cmd, env, work / "format.log")
        if rc:
            print(f"format failed (exit {rc}):\n{tail(work / 'format.log')}")
            return None
    ctx = {"work": work, "env": env, "tiny": tiny, "cfg_path": cfg_path, "cfg": cfg, "format": fmt,
           "real": real, "tokenizer": {}}
    if real:
        # posttrain gets the model as given (a .gguf file: converted on first use, posttrain.gguf.resolve);
        # the plain arm gets the converted directory, and the chat template and pad token posttrain
        # resolved for it (a plain TRL user sets both by hand: the built-in template's text, a pad token)
        record = work / f"tokenizer-{real_name(args)}.json"
        cmd = [str(PYTHON), str(THIS), "_tokenizer", str(cfg_path), str(record)]
        rc, _ = run_logged(cmd, env, work / "tokenizer.log")
        if rc:
            print(f"resolving the model and tokenizer failed (exit {rc}):\n{tail(work / 'tokenizer.log')}")
            return None
        info = json.loads(record.read_text())
        ctx.update(model=cfg["model"]["name_or_path"], plain_model=info["resolved"], base=cfg["model"]["name_or_path"],
                   tokenizer=info["tokenizer"])
        return ctx
    base = work / f"base-sft-{tiny.name}-{args.steps}"
    if need_base and not (base / "posttrain.json").exists():
        cmd = [str(POSTTRAIN), "sft", str(cfg_path), "-o", str(base), "--overwrite",
               *set_args("sft", overrides("sft", args))]
        print(f"building the SFT model reward and DPO start from: {' '.join(cmd)}", flush=True)
        rc, _ = run_logged(cmd, env, work / "base-sft.log")
        if rc:
            print(f"sft failed (exit {rc}):\n{tail(work / 'base-sft.log')}")
            return None
    ctx.update(model=str(tiny), plain_model=str(tiny), base=str(base))
    return ctx


def tokenizer_main(argv: list[str]) -> None:
    """In a fresh process: `_tokenizer CONFIG RECORD`: the directory posttrain loads model.name_or_path
    from (posttrain.gguf.resolve: a .gguf file's conversion) and, per stage, the chat template and pad
    token posttrain's models.load_tokenizer installs (SFT with assistant-only masks, reward and DPO
    without). The plain arm sets these on its tokenizer; a grown vocabulary is not supported."""
    from posttrain import gguf, models
    from posttrain.config import load_config

    cfg_path, record = argv[0], argv[1]
    cfg = load_config(cfg_path)
    source = cfg.model.name_or_path
    out = {"resolved": gguf.resolve(source), "tokenizer": {}}
    for stage in STAGES:
        need_masks = stage == "sft" and cfg.sft.assistant_only_loss
        tok = models.load_tokenizer(cfg, source, need_masks=need_masks)
        if tok.added_tokens:
            sys.exit(f"posttrain adds tokens to this tokenizer ({tok.added_tokens}): not supported by the benchmark")
        out["tokenizer"][stage] = {"chat_template": tok.tokenizer.chat_template, "pad_token": tok.tokenizer.pad_token,
                                   "pad_token_id": tok.tokenizer.pad_token_id, "template_hash": tok.template_hash}
    Path(record).write_text(json.dumps(out))


# --- the instrument, the same in both arms -----------------------------------------------------

def peak_rss_kb() -> int | None:
    """VmHWM of this process (Linux): the peak resident set size since start or the last reset."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Start a new VmHWM phase (`echo 5 > /proc/self/clear_refs`, Linux 4.0+). It also lowers what
    getrusage's ru_maxrss reports from then on (posttrain's manifest peak_memory_mb on a CPU)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def instrument(trainer, record: str, n_batches: int) -> None:
    """Step-end times, the loss of every training_step, the first n_batches input batches, the
    trainable parameters' sums at train begin and the final TrainingArguments, written to
    `record` (.json) and `record`.pt when training ends. Peak RSS by phase: VmHWM at train begin
    (process start to train begin: imports, model, data, trainer; posttrain's pre-training checks),
    then reset, and at train end (the training steps), then reset again (the rest is read by
    arm_main when the process ends)."""
    import time

    import torch
    from transformers import TrainerCallback

    rec = {"trainer": type(trainer).__name__, "step_end": [], "losses": [], "logs": [], "memory": {}}
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
            rec["memory"]["setup_kb"] = peak_rss_kb()
            rec["memory"]["reset"] = reset_peak_rss()
            rec["t_begin"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            rec["step_end"].append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            rec["logs"].append({"step": state.global_step, **(logs or {})})

        def on_train_end(self, args, state, control, **kwargs):
            rec["memory"]["train_kb"] = peak_rss_kb()
            if rec["memory"]["reset"]:
                reset_peak_rss()
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


def tokenizer_as_posttrain(tokenizer, spec: dict):
    """With --model: the chat template and pad token posttrain installs for this stage (the plain
    user's two lines); the tiny model's tokenizer already has both."""
    if spec.get("tokenizer"):
        tokenizer.chat_template = spec["tokenizer"]["chat_template"]
        tokenizer.pad_token = spec["tokenizer"]["pad_token"]
    return tokenizer


def lora_peft_config(spec: dict, task_type: str = "CAUSAL_LM", modules_to_save=None):
    from peft import LoraConfig

    lora = spec["lora"]
    return LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                      target_modules=lora["target_modules"], modules_to_save=modules_to_save, task_type=task_type)


def plain_sft(spec: dict) -> None:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = tokenizer_as_posttrain(AutoTokenizer.from_pretrained(spec["model"]), spec)
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    peft_config = lora_peft_config(spec) if spec["method"] == "lora" else None
    train = datasets.load_dataset("parquet", data_files=spec["data"], split="train")
    args = SFTConfig(output_dir=spec["output"], seed=spec["seed"], data_seed=spec["seed"], **CPU,
                     report_to="none", dataloader_num_workers=0, assistant_only_loss=True, **spec["training"])
    trainer = SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer,
                         peft_config=peft_config)
    instrument(trainer, spec["record"], spec["batches"])
    trainer.train()


def plain_reward(spec: dict) -> None:
    import datasets
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, set_seed
    from trl import RewardConfig, RewardTrainer

    tokenizer = tokenizer_as_posttrain(AutoTokenizer.from_pretrained(spec["model"]), spec)
    train = datasets.load_dataset("parquet", data_files=spec["data"], split="train")
    args = RewardConfig(output_dir=spec["output"], seed=spec["seed"], data_seed=spec["seed"], **CPU,
                        report_to="none", dataloader_num_workers=0, **spec["training"])
    if spec["method"] == "lora":
        # TRL's own path for a reward LoRA: the model by name (seed, then the score head, then the
        # adapter: posttrain's order), the head trained in full and saved (modules_to_save, as
        # posttrain's models.lora_config does for SEQ_CLS); RewardTrainer sets config.pad_token_id
        args.model_init_kwargs = {"dtype": "float32"}
        trainer = RewardTrainer(model=spec["model"], args=args, train_dataset=train, processing_class=tokenizer,
                                peft_config=lora_peft_config(spec, "SEQ_CLS", ["score"]))
    else:
        set_seed(spec["seed"])  # the new score head is random
        model = AutoModelForSequenceClassification.from_pretrained(spec["model"], num_labels=1, dtype=torch.float32)
        model.config.pad_token_id = tokenizer.pad_token_id
        trainer = RewardTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
    instrument(trainer, spec["record"], spec["batches"])
    trainer.train()


def plain_dpo(spec: dict) -> None:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = tokenizer_as_posttrain(AutoTokenizer.from_pretrained(spec["model"]), spec)
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    peft_config = lora_peft_config(spec) if spec["method"] == "lora" else None
    train = datasets.load_dataset("parquet", data_files=spec["data"], split="train")
    args = DPOConfig(output_dir=spec["output"], seed=spec["seed"], data_seed=spec["seed"], **CPU,
                     report_to="none", dataloader_num_workers=0, **spec["training"])
    trainer = DPOTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer,
                         peft_config=peft_config)  # no ref_model: LoRA: the adapter disabled; full: TRL's copy
    instrument(trainer, spec["record"], spec["batches"])
    trainer.train()


PLAIN = {"sft": plain_sft, "reward": plain_reward, "dpo": plain_dpo}


def arm_main(argv: list[str]) -> None:
    """In a fresh process: `_arm plain STAGE SPEC.json` or `_arm posttrain STAGE RECORD BATCHES -- CLI ARGS`."""
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    kind, stage = argv[0], argv[1]
    record = json.loads(Path(argv[2]).read_text())["record"] if kind == "plain" else argv[2]
    try:
        _arm(kind, stage, argv)
    finally:  # the last phase's peak RSS (train end to exit; the whole process if training never began)
        Path(record).with_name("memory.json").write_text(json.dumps({"end_kb": peak_rss_kb()}))


def _arm(kind: str, stage: str, argv: list[str]) -> None:
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
    from posttrain.sections import LoraConfig

    return LoraConfig(**cfg[stage].get("lora", {})).model_dump()


def run_arm(kind: str, stage: str, rep: int, ctx: dict, args) -> tuple[dict | None, Path]:
    work, cfg = ctx["work"], ctx["cfg"]
    run_dir = work / "runs" / f"{stage}-{kind}-{rep}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    record, log = run_dir / "record.json", run_dir / "log.txt"
    if kind == "plain":
        # the tiny model: the same directories as posttrain; --model: its converted directory for every stage
        model = ctx["plain_model"] if ctx["real"] else ctx["model"] if stage == "sft" else ctx["base"]
        training = {**cfg[stage]["training"], **overrides(stage, args)}
        spec = {"model": model, "data": str(ctx["format"] / DATASET[stage] / "train.parquet"), "seed": cfg["seed"],
                "training": training, "output": str(run_dir / "checkpoints"), "record": str(record),
                "batches": args.batches, "method": cfg[stage].get("method", "full"),
                "lora": lora_settings(cfg, stage), "tokenizer": ctx["tokenizer"].get(stage)}
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
    memory = run_dir / "memory.json"
    rec["memory"]["end_kb"] = json.loads(memory.read_text())["end_kb"] if memory.exists() else None
    phases = [rec["memory"].get(k) for k in ("setup_kb", "train_kb", "end_kb")]
    rec["memory"]["process_kb"] = max((v for v in phases if v is not None), default=None)
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
    if args.window is None:
        args.window = 10 if args.steps >= 10 else args.steps // 2 + 1
    if args.steps < args.window:
        sys.exit(f"--steps {args.steps} is below --window {args.window}: no step to time")
    stages = STAGES if args.stage == "all" else (args.stage,)
    ctx = prepare(args, need_base=any(s != "sft" for s in stages))
    if ctx is None:
        return
    cfg = ctx["cfg"]
    if ctx["real"]:
        methods = ", ".join(f"{st} {cfg[st].get('method', 'full')}" for st in stages)
        lora = f"; LoRA r {args.lora_r}, alpha {args.lora_alpha}, dropout {args.lora_dropout:g}, all-linear" \
            if any(cfg[st].get("method", "full") == "lora" for st in stages) else ""
        print(f"model   {ctx['model']} (posttrain; plain TRL: {ctx['plain_model']}); every stage starts from it; "
              f"template {cfg['template']['name']}; {methods}{lora}")
    else:
        print(f"model   {ctx['model']} (hidden {args.hidden}, layers {args.layers}, heads {args.heads}); "
              f"reward and DPO start from {ctx['base']}")
    print(f"config  {ctx['cfg_path']} ({_relative(args.config)}, model/data under the workdir, no eval data); "
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
        mem = {"plain": [], "posttrain": []}
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
                mem[kind].append(rec["memory"])
                reused = f"; format output reused: {'yes' if rec['reused_format'] else 'NO'}" \
                    if kind == "posttrain" else ""
                print(f"  run {rep + 1} {kind:9}  {1000 * m:7.2f} ms/step "
                      f"(median of steps {args.window}-{args.steps}); "
                      f"process wall {rec['wall_s']:.1f} s; {memory_line(rec['memory'])}{reused}", flush=True)
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
        rows.append((stage, med, ratios if equivalent else [], equivalent, maxdiff, mem))
        print(flush=True)

    print(f"load average at the end: {_load()}")
    print(f"\n| stage | plain ms/step | posttrain ms/step | ratio posttrain/plain | spread of per-repeat ratios | "
          "repeats | "
          f"equivalent (max abs loss diff, steps 1-{min(args.proof_steps, args.steps)}) |")
    print("|---|---|---|---|---|---|---|")
    for stage, med, ratios, equivalent, maxdiff, _ in rows:
        p = f"{1000 * statistics.median(med['plain']):.2f}" if med["plain"] else "-"
        q = f"{1000 * statistics.median(med['posttrain']):.2f}" if med["posttrain"] else "-"
        r = f"{statistics.median(ratios):.3f}" if ratios else "- (not reported)"
        s = f"{min(ratios):.3f}-{max(ratios):.3f}" if ratios else "-"
        print(f"| {stage} | {p} | {q} | {r} | {s} | {len(ratios)} | {'yes' if equivalent else 'NO'} ({maxdiff:.1e}) |")
    print("\nPeak RSS (VmHWM, MiB; median over the runs): process = the whole run; setup = process start to train "
          "begin (imports, model, data, trainer, posttrain's checks before training: DPO's step-0 evaluation); "
          "train = the training steps; after = train end to exit (posttrain: evaluation, save, checks).")
    print("\n| stage | plain process | posttrain process | posttrain/plain | plain train | posttrain train | "
          "plain setup | posttrain setup | plain after | posttrain after | runs | equivalent |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for stage, _, _, equivalent, _, mem in rows:
        def mib(kind, key):
            values = [m[key] for m in mem[kind] if m.get(key) is not None]
            return statistics.median(values) / 1024 if values else None

        cells = []
        for key in ("process_kb", "train_kb", "setup_kb", "end_kb"):
            a, b = mib("plain", key), mib("posttrain", key)
            cells += [f"{a:.0f}" if a is not None else "-", f"{b:.0f}" if b is not None else "-"]
            if key == "process_kb":
                cells.append(f"{b / a:.3f}" if a and b else "-")
        n = min(len(mem["plain"]), len(mem["posttrain"]))
        print(f"| {stage} | {' | '.join(cells)} | {n} | {'yes' if equivalent else 'NO'} |")


def memory_line(m: dict) -> str:
    def mib(key):
        return f"{m[key] / 1024:.0f}" if m.get(key) is not None else "-"
    reset = "" if m.get("reset", True) else " (VmHWM could not be reset: phases are cumulative)"
    return (f"peak RSS {mib('process_kb')} MiB (setup {mib('setup_kb')}, train {mib('train_kb')}, "
            f"after {mib('end_kb')}){reset}")


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
          "`python -X importtime` calling posttrain.cli.main() the same way "
          "(a package counts as imported if any of its "
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
    args = SFTConfig(output_dir=str(Path(record).parent / "checkpoints"), max_length=max_length,
                     assistant_only_loss=True,
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
    import yaml

    from bench_load import write_rows  # the same generated rows as bench_load.py format

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
    print(f"data    {rows_file}: {args.rows:,} rows of the demo's SFT shape "
          f"({rows_file.stat().st_size / 2**20:.1f} MB); "
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
        results[run] = {**json.loads(record.read_text()), "wall_s": wall,
                        "new_cache_files": cache_files(cache) - before}
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
- stage s: posttrain.stages.format.run in-process; process wall adds interpreter start and the CLI's imports. \
tokenizer s:
  models.load_tokenizer inside the stage, which is where transformers (and torch) are first imported; it does not grow
  with the data. data s = stage s - tokenizer s: loading, conversion, checks, parquet and manifest writes; rows/s and
  tokens/s are per data second. posttrain format converts every row (datasets.map, load_from_cache_file=False)
  and renders/tokenizes only the first 1000 rows for its template checks (templates.check_rows limit); the \
tokens/s column
  counts all tokens of the data against the stage time, it is not a tokenizer speed.
- cold: empty HF_DATASETS_CACHE. warm: the cold run's cache kept, a new output directory. posttrain's \
conversion is never
  read from the cache (load_from_cache_file=False), so warm can only reuse load_dataset's JSON -> Arrow build; \
"new files
  in HF cache" shows whether the warm run wrote (rebuilt) anything.
- TRL SFTTrainer dataset preparation: the SFTTrainer constructor on the formatted parquet (what `posttrain sft` \
does after
  format: chat template, tokenize, assistant masks, truncation), tiny model already loaded; "load" is \
load_dataset of the
  parquet. warm: the same HF_DATASETS_CACHE, where datasets may return the cached map results by fingerprint.""")


def main() -> None:
    internal = {"_arm": arm_main, "_format": format_main, "_tokenize": tokenize_main, "_tokenizer": tokenizer_main}
    if len(sys.argv) > 1 and sys.argv[1] in internal:  # internal: one run, fresh process
        internal[sys.argv[1]](sys.argv[2:])
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
    s.add_argument("--window", type=int, help="first timed step (timed: window..steps); default 10, or "
                   "steps // 2 + 1 for runs shorter than 10 steps")
    s.add_argument("--proof-steps", type=int, default=20, help="losses compared for the proof")
    s.add_argument("--batches", type=int, default=2, help="input batches compared for the proof")
    s.add_argument("--batch", type=int, help="per_device_train_batch_size for every stage (default: the config's)")
    s.add_argument("--max-length", type=int, help="max_length for every stage (default: the config's)")
    s.add_argument("--model", help="a Hugging Face model directory or a .gguf file instead of the tiny model "
                   "(reward and DPO start from it too; posttrain gets it as given, plain TRL its converted directory)")
    s.add_argument("--template", help="with --model: template.name (chatml for SmolLM2, gemma for Gemma 3); "
                   "default: the config's")
    s.add_argument("--method", choices=["full", "lora"], help="with --model: every stage's method (default: the "
                   "config's: the demo's SFT and reward full, DPO LoRA)")
    s.add_argument("--lora-r", type=int, default=16, help="with --model: LoRA rank of every LoRA stage")
    s.add_argument("--lora-alpha", type=int, default=32)
    s.add_argument("--lora-dropout", type=float, default=0.0)
    s.add_argument("--data-dir", help="with --model: a directory with sft_train.jsonl, reward_train.jsonl and "
                   "pref_train.jsonl or dpo_train.jsonl (e.g. runs/smollm2-cpu/data); default: the demo data")
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
    if args.cmd == "stages" and not args.model and (args.template or args.method or args.data_dir):
        p.error("--template, --method and --data-dir go with --model")
    args.func(args)


if __name__ == "__main__":
    sys.exit(main())
