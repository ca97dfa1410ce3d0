"""Several processes through accelerate: `posttrain STAGE CONFIG --num-processes N [--distributed
ddp|fsdp|zero2|zero3]` (or `launch:` in the config) re-runs the same command under `accelerate
launch` with one of the shipped configs in configs/accelerate/. posttrain never starts training
processes of its own; accelerate (torchrun underneath) does, exactly as `accelerate launch -m
posttrain STAGE CONFIG` typed by hand would, which also works.

What this module adds over typing that command:
  - the accelerate config for the chosen strategy, with mixed precision matched to the device
    (bf16 on GPUs that have it, none on CPUs) and a free port, so two runs on one machine don't
    collide;
  - on a machine without a GPU, DDP over gloo: accelerate's MULTI_GPU launcher with no GPU
    visible starts N CPU processes (its --cpu launcher would start one);
  - one-line errors: each process reports a PosttrainError into a status directory instead of
    printing it; after the launcher returns, the parent prints each distinct line once and exits
    with its code (2, or 128 + signal for a stopped run), and torchrun's failure report, which
    adds nothing to a one-line error, is not shown (`--debug` shows everything).

Imports no torch until a launch actually happens.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from posttrain.errors import PosttrainError

STRATEGIES = ("ddp", "fsdp", "zero2", "zero3")
STATUS_ENV = "POSTTRAIN_LAUNCH_STATUS"  # where launched processes write their error, if any
LAUNCH_OPTIONS = ("--num-processes", "--distributed")  # what the relaunched command must not see again
# torchrun's own lines (glog style: "E1201 12:00:00.000 123 torch/distributed/...") and its failure report
_LAUNCHER_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d")


@dataclass(frozen=True)
class LaunchEnv:
    """What the launcher (accelerate, torchrun underneath, or posttrain's own launch) tells a
    process through its environment: each variable as set, None when unset."""
    rank: str | None  # RANK
    local_rank: str | None  # LOCAL_RANK
    world_size: str | None  # WORLD_SIZE
    use_fsdp: bool  # ACCELERATE_USE_FSDP=true
    use_deepspeed: bool  # ACCELERATE_USE_DEEPSPEED=true
    zero_stage: str | None  # ACCELERATE_DEEPSPEED_ZERO_STAGE
    status_dir: str | None  # POSTTRAIN_LAUNCH_STATUS (STATUS_ENV): where this process reports a user error


def environment() -> LaunchEnv:
    """The one place posttrain reads the launch environment, at the time of the call."""
    e = os.environ

    def flag(name: str) -> bool:
        return e.get(name, "false").lower() == "true"

    return LaunchEnv(rank=e.get("RANK"), local_rank=e.get("LOCAL_RANK"), world_size=e.get("WORLD_SIZE"),
                     use_fsdp=flag("ACCELERATE_USE_FSDP"), use_deepspeed=flag("ACCELERATE_USE_DEEPSPEED"),
                     zero_stage=e.get("ACCELERATE_DEEPSPEED_ZERO_STAGE"), status_dir=e.get(STATUS_ENV))


def inside_launch() -> bool:
    """True in a process that accelerate/torchrun started (it sets the ranks' environment)."""
    e = environment()
    return e.local_rank is not None or e.world_size is not None


def local_rank(default: int) -> int:
    """This process's GPU index under a launcher (LOCAL_RANK), else `default`."""
    rank = environment().local_rank
    return int(rank if rank is not None else default)


_COMMON = {"compute_environment": "LOCAL_MACHINE", "debug": False, "machine_rank": 0, "num_machines": 1,
           "num_processes": 8, "rdzv_backend": "static", "same_network": True, "use_cpu": False,
           "main_training_function": "main", "downcast_bf16": "no", "mixed_precision": "bf16"}
# One accelerate config per strategy. configs/accelerate/<strategy>.yaml holds the same (a test
# compares them), for `accelerate launch --config_file` by hand and for multi-node runs.
ACCELERATE_CONFIGS = {
    "ddp": {"distributed_type": "MULTI_GPU", "gpu_ids": "all"},
    "fsdp": {"distributed_type": "FSDP", "fsdp_config": {
        "fsdp_version": 2,
        "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "fsdp_reshard_after_forward": True,
        # every rank loads on the meta device and rank 0's weights are broadcast: 1x host memory, not Nx
        "fsdp_cpu_ram_efficient_loading": True,
        "fsdp_offload_params": False,
        # a full state dict on rank 0 at save time: the stage directory holds ordinary safetensors
        "fsdp_state_dict_type": "FULL_STATE_DICT",
        "fsdp_activation_checkpointing": False,
    }},
    "zero2": {"distributed_type": "DEEPSPEED", "deepspeed_config": {
        "zero_stage": 2, "offload_optimizer_device": "none", "offload_param_device": "none",
        "zero3_init_flag": False, "deepspeed_multinode_launcher": "standard"}},
    "zero3": {"distributed_type": "DEEPSPEED", "deepspeed_config": {
        "zero_stage": 3, "offload_optimizer_device": "none", "offload_param_device": "none",
        # gather the shards into one 16-bit state dict when saving: without it a ZeRO-3 LoRA run
        # saves an empty adapter (trl#4416, peft#2892; posttrain's adapter check would stop it)
        "zero3_init_flag": True, "zero3_save_16bit_model": True, "deepspeed_multinode_launcher": "standard"}},
}


def accelerate_config(strategy: str) -> dict:
    """The accelerate config posttrain launches a strategy with."""
    if strategy not in STRATEGIES:
        raise PosttrainError(f"--distributed '{strategy}' is not a strategy posttrain ships",
                             fix=f"one of {', '.join(STRATEGIES)} (or launch.config_file: your own accelerate config)")
    return {**_COMMON, **ACCELERATE_CONFIGS[strategy]}


def plan(cfg, num_processes: int | None, distributed: str | None) -> dict | None:
    """What to launch: None to run in this process (one process, or already launched)."""
    lc = cfg.launch
    n = num_processes if num_processes is not None else lc.num_processes
    if n < 1:
        raise PosttrainError(f"--num-processes {n}: needs at least 1")
    strategy = distributed or lc.distributed
    if n == 1 or inside_launch():
        if distributed and n == 1 and not inside_launch():
            raise PosttrainError(f"--distributed {distributed} needs --num-processes 2 or more")
        return None
    if strategy in ("zero2", "zero3"):
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise PosttrainError(f"--distributed {strategy} runs DeepSpeed ZeRO, and deepspeed is not installed",
                                 fix="pip install deepspeed (on a CUDA machine), or use ddp or fsdp")
    if lc.config_file and not Path(lc.config_file).is_file():
        raise PosttrainError(f"launch.config_file '{lc.config_file}' does not exist",
                             fix="point it at an accelerate config (configs/accelerate/ has one per strategy)")
    accelerate_config(strategy)  # a known strategy
    return {"num_processes": n, "strategy": "custom" if lc.config_file else strategy,
            "config_file": Path(lc.config_file) if lc.config_file else None}


def strip_launch_options(argv: list[str]) -> list[str]:
    """The command line without --num-processes/--distributed (the launched processes run one
    share of the work each and must not launch again)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in LAUNCH_OPTIONS:
            skip = True
            continue
        if any(a.startswith(o + "=") for o in LAUNCH_OPTIONS):
            continue
        out.append(a)
    return out


def command(p: dict, argv: list[str]) -> tuple[list[str], dict]:
    """The `accelerate launch` command line and environment for plan `p` and posttrain's argv."""
    import torch

    cuda = torch.cuda.is_available()
    mixed = "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(p["config_file"]),
           "--num_processes", str(p["num_processes"])]
    if p["strategy"] != "custom":  # a config of the user's own keeps its machines, precision and port
        cmd += ["--num_machines", "1", "--mixed_precision", mixed, "--dynamo_backend", "no",
                "--main_process_port", "0"]
    env = dict(os.environ)
    if not cuda:
        if p["strategy"] not in ("ddp", "custom"):
            # accelerate 1.15 shards (FSDP, DeepSpeed) only over GPUs; asked on CPUs, FSDP silently
            # becomes plain DDP (every process holding the whole model), so it is refused here
            raise PosttrainError(f"--distributed {p['strategy']} "
                                 f"({'FSDP' if p['strategy'] == 'fsdp' else 'DeepSpeed'}) "
                                 "needs CUDA GPUs; none is visible, and accelerate would run plain DDP instead",
                                 fix="use --distributed ddp (gloo on CPUs: the same losses) or run on a GPU machine")
        # MULTI_GPU with no GPU visible: torchrun starts N CPU processes that talk over gloo.
        env["CUDA_VISIBLE_DEVICES"] = ""
        cmd += ["--multi_gpu"] if p["strategy"] == "ddp" else []
    cmd += ["-m", "posttrain", *strip_launch_options(argv)]
    return cmd, env


def run(p: dict, argv: list[str], *, debug: bool) -> int:
    """Launch `posttrain ARGV` in p["num_processes"] processes; print each user error once; return
    the exit code to leave with."""
    code, errors = execute(p, argv, debug=debug)
    for line in errors:
        sys.stderr.write(f"error: {line}\n")
    return code


def run_stage(p: dict, cfg, stage: str, *, base: str | None, output: str, resume: bool, debug: bool = False) -> None:
    """One stage of `posttrain run` in several processes: the same config file and --set overrides,
    the chain's base and output. A failure stops the chain with the processes' own error."""
    path, overrides = cfg._source
    if path is None:
        raise PosttrainError("a launched stage needs the config file it was read from")
    argv = stage_argv(stage, path, overrides, base=base, output=output, resume=resume, overwrite=True, debug=debug)
    code, errors = execute(p, argv, debug=debug)
    if code != 0:
        e = PosttrainError(errors[0] if errors else f"the {stage} stage's processes failed (exit code {code}; the "
                           "output above says why)")
        e.exit_code = code
        raise e


def stage_argv(stage: str, config: str | None, overrides, *, base: str | None, output: str | None,
               resume: bool, overwrite: bool, debug: bool) -> list[str]:
    """posttrain's command line for one training stage, as the launched processes run it."""
    argv = (["--debug"] if debug else []) + [stage] + ([str(config)] if config else [])
    argv += [a for o in overrides or () for a in ("--set", o)]
    argv += ["--base", base] if base else []
    argv += ["-o", output] if output else []
    argv += ["--resume"] if resume else []
    argv += ["--overwrite"] if overwrite else []
    return argv


def execute(p: dict, argv: list[str], *, debug: bool) -> tuple[int, list[str]]:
    """Launch, pass the processes' output through; (exit code, distinct user-error lines)."""
    status = Path(tempfile.mkdtemp(prefix="posttrain-launch-"))
    if p["config_file"] is None:
        import yaml

        p = {**p, "config_file": status / f"{p['strategy']}.yaml"}
        p["config_file"].write_text(yaml.safe_dump(accelerate_config(p["strategy"]), sort_keys=False))
    cmd, env = command(p, argv)
    env[STATUS_ENV] = str(status)
    from posttrain.console import console

    console.print(f"launching {p['num_processes']} processes through accelerate ({p['strategy']})")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    forwarded = _forward_signals(proc)
    # torchrun's own lines, and everything from the first traceback on, are held back: shown only
    # when no process explained the failure in one line (a crash, not a user error). Bytes pass
    # through as they are (progress bars redraw with \r).
    held: list[bytes] = []
    traceback = False
    out = sys.stderr.buffer
    try:
        for line in proc.stdout:
            text = line.decode("utf-8", "replace")
            traceback = traceback or text.startswith("Traceback")
            if not debug and (traceback or _LAUNCHER_LINE.match(text)):
                held.append(line)
            else:
                out.write(line)
                out.flush()
        code = proc.wait()
    finally:
        for s, handler in forwarded.items():
            signal.signal(s, handler)
    errors = _read_status(status)
    shutil.rmtree(status, ignore_errors=True)
    if code == 0:
        return 0, []
    if errors:
        # what stopped the run: a user error (exit 2) over the signal stops of the processes torchrun
        # then shut down, rank 0 first; the same line from every rank once
        first = min(errors, key=lambda e: (e["code"] != 2, e["rank"]))
        return first["code"], list(dict.fromkeys(e["line"] for e in errors if e["code"] == first["code"]))
    out.write(b"".join(held))
    out.flush()
    return code, []


def report_error(code: int, line: str) -> bool:
    """In a launched process: record a user error for the parent to print once. False when this
    process was not launched by posttrain (then the caller prints it as usual)."""
    e = environment()
    d = e.status_dir
    if not d or not inside_launch():
        return False
    rank = int(e.rank if e.rank is not None else e.local_rank if e.local_rank is not None else "0")
    try:
        (Path(d) / f"rank{rank}.json").write_text(json.dumps({"code": code, "line": line, "rank": rank}))
    except OSError:  # e.g. the disk is full: say it here instead
        return False
    return True


def _read_status(d: Path) -> list[dict]:
    out = []
    for f in sorted(d.glob("rank*.json")):
        try:
            out.append(json.loads(f.read_text()))
        except (OSError, ValueError):
            pass
    return out


def _forward_signals(proc: subprocess.Popen) -> dict:
    """SIGINT/SIGTERM to the launcher's process group: every rank finishes its step, saves, stops."""
    def forward(signum, frame):
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass

    return {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}


# ---------------------------------------------------------------------------------------------
# Inside a launched process: how accelerate set the processes up


def distribution(*, sharded: bool = True) -> str:
    """How the stage's processes share the work, as accelerate set it up (for the summary and the
    manifest), after stopping a run whose setup is not what its launch asked for: a config that
    asks for FSDP or DeepSpeed on CPUs gets plain DDP from accelerate 1.15, each process holding
    the whole model, and nothing says so. `sharded=False` refuses FSDP and DeepSpeed (posttrain's
    own PPO generates from and saves whole weights)."""
    from accelerate.state import AcceleratorState, DistributedType

    # the state the stage's trainer/Accelerator set up (the processes' alone before one exists)
    state = AcceleratorState() if AcceleratorState._shared_state else process_state()
    kind, n = state.distributed_type, state.num_processes
    names = {DistributedType.MULTI_CPU: "DDP over gloo", DistributedType.MULTI_GPU: "DDP"}
    if kind == DistributedType.FSDP:
        names[kind] = f"FSDP{state.fsdp_plugin.fsdp_version if state.fsdp_plugin else ''}"
    elif kind == DistributedType.DEEPSPEED:
        names[kind] = f"DeepSpeed ZeRO-{state.deepspeed_plugin.zero_stage}"
    text = "1 process" if n == 1 else f"{n} processes, {names.get(kind, kind.value)}"
    launched = environment()  # what accelerate's launch asked for
    asked = "FSDP" if launched.use_fsdp else "DeepSpeed" if launched.use_deepspeed else None
    if asked and not names.get(kind, "").startswith(asked):
        raise PosttrainError(
            f"the launch asked for {asked}, but accelerate set up {text}: it shards only over GPUs, and every "
            "process would hold the whole model",
            fix="launch with --distributed ddp on CPUs, or run on a GPU machine")
    if not sharded and kind in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise PosttrainError(
            f"posttrain's PPO runs on several processes with DDP only, not {names[kind]}: it generates from and "
            "saves whole weights",
            fix="launch ppo with --distributed ddp (or none), or use rloo/grpo, which run TRL's trainers")
    return text


def process_state():
    """accelerate's process state, set up as the trainers will set it up. On a machine without a
    GPU it must be asked for CPU processes: a plain PartialState() there sees no GPU, falls back to
    one process, and every launched process would call itself the main one."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def is_main_process() -> bool:
    """True on the main process (or when not distributed): only it writes stage files."""
    return process_state().is_main_process


def least_across_processes(value: int) -> int:
    """The smallest value over all processes, so that they all decide the same."""
    import torch
    import torch.distributed as dist

    state = process_state()
    if state.num_processes < 2 or not dist.is_initialized():
        return value
    t = torch.tensor([float(value)], device=state.device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


# Reductions over the processes of an accelerate Accelerator (posttrain's PPO): each one is the
# identity in a single process.


def sum_across(acc):
    """A function that sums a tensor over the processes."""
    def reduce(x):
        return acc.reduce(x, reduction="sum") if acc.num_processes > 1 else x

    return reduce


def max_across(acc):
    """A function that takes a tensor's maximum over the processes."""
    def reduce_max(x):
        return acc.reduce(x, reduction="max") if acc.num_processes > 1 else x

    return reduce_max


def mean_across(x, reduce) -> float:
    """The mean of a tensor's elements over every process (`reduce`: sum_across)."""
    import torch

    total = reduce(torch.stack([x.float().sum(), torch.tensor(float(x.numel()), device=x.device)]))
    return (total[0] / total[1]).item()


def mean_over_processes(v: float, acc) -> float:
    """The mean of one number per process."""
    if acc.num_processes == 1:
        return v
    import torch

    return acc.reduce(torch.tensor(v, device=acc.device), reduction="mean").item()


def anywhere(acc, flag: bool) -> bool:
    """True when the flag is set on any process."""
    import torch

    if acc.num_processes == 1:
        return flag
    return bool(acc.reduce(torch.tensor(float(flag), device=acc.device), reduction="sum").item())
