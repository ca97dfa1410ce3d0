"""The `posttrain` command. Each command parses its arguments, calls one function, and turns a
`PosttrainError` into one line on stderr and exit code 2 (`--debug` shows the traceback).

Imports of torch, transformers and trl happen inside the commands, so `--help` and `validate`
stay instant.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from posttrain import registry
from posttrain.errors import PosttrainError

app = typer.Typer(
    name="posttrain",
    help="LLM post-training from one YAML: format → SFT → reward → PPO → DPO → merge → eval.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
_state = {"debug": False}

ConfigArg = Annotated[Path | None, typer.Argument(help="YAML config (one stage or the whole chain).")]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="Override a config key: --set sft.training.max_steps=10.")
]
OutputOpt = Annotated[str | None, typer.Option("--output", "-o", help="Stage output directory.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace a finished output directory.")]


@app.callback()
def _main(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False) -> None:
    _state["debug"] = debug


def user_errors(fn):
    """Run a command; a PosttrainError becomes one line and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PosttrainError as e:
            if _state["debug"]:
                raise
            _report(e.line(), getattr(e, "exit_code", 2))
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None
        except Exception as e:
            from posttrain import disk

            if _state["debug"] or not disk.is_out_of_space(e):
                raise
            _report(disk.out_of_space_error(e).line(), 2)

    return wrapper


def _report(line: str, code: int):
    """One line on stderr and the exit code; in a process posttrain launched, the line goes to the
    launching process instead, which prints it once for all ranks."""
    from posttrain import launch

    if not launch.report_error(code, line):
        typer.echo(f"error: {line}", err=True)
    raise typer.Exit(code) from None


def _load(config: Path | None, overrides: list[str] | None, base: str | None = None):
    from posttrain.config import load_config

    if config is None and base is None:
        raise PosttrainError("give a config file (or --base for a stage that can start from one)")
    if config is None:
        from posttrain import manifest

        recorded = manifest.read(base)
        if not recorded or "config" not in recorded:
            raise PosttrainError(f"--base '{base}' has no recorded config", fix="give a config file")
        return load_config(None, overrides, base=recorded["config"])
    return load_config(config, overrides)


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    import logging

    # Before the imports: bitsandbytes warns at import time about an optional CPU kernel package.
    for noisy in ("bitsandbytes", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import datasets
    import transformers

    transformers.logging.set_verbosity_warning()
    datasets.disable_progress_bars()


@app.command()
@user_errors
def validate(config: Annotated[Path, typer.Argument(help="YAML config to check.")], set_: SetOpt = None) -> None:
    """Check a config without loading models (exit 0 when valid, 2 when not)."""
    cfg = _load(config, set_)
    stages = " → ".join(cfg.stages)
    typer.echo(f"ok: {config} (model {cfg.model.name_or_path}; stages {stages}; datasets {', '.join(cfg.data) or '-'})")


@app.command("format", help=registry.STAGES["format"].help)
@user_errors
def format_cmd(config: ConfigArg = None, output: OutputOpt = None, set_: SetOpt = None,
               overwrite: OverwriteOpt = False) -> None:
    cfg = _load(config, set_)
    _quiet_libraries()
    from posttrain.stages import format as stage

    stage.run(cfg, output=output, overwrite=overwrite)


BaseOpt = Annotated[str | None, typer.Option(
    "--base", help="Start from this model or finished stage (a full output or a LoRA adapter).")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint.")]
ProcessesOpt = Annotated[int | None, typer.Option(
    "--num-processes", help="Run in N processes (one per GPU; gloo on CPUs) through accelerate launch "
    "[default: launch.num_processes, 1].")]
DistributedOpt = Annotated[str | None, typer.Option(
    "--distributed", help="With --num-processes: ddp, fsdp (FSDP2), zero2 or zero3 (DeepSpeed) "
    "[default: launch.distributed, ddp].")]


def _launched(cfg, num_processes: int | None, distributed: str | None, argv: list[str]) -> bool:
    """Re-run this command (`argv`) under accelerate launch when it asks for several processes;
    True when that happened (the launched processes did the work)."""
    from posttrain import launch

    plan = launch.plan(cfg, num_processes, distributed)
    if plan is None:
        return False
    code = launch.run(plan, argv, debug=_state["debug"])
    if code:
        raise typer.Exit(code)
    return True

# The training stages (registry: launched) share one command shape: config, --base, --output, --set,
# --resume, --overwrite, --num-processes, --distributed.
def _training_command(stage: str, doc: str) -> None:
    def command(config: ConfigArg = None, base: BaseOpt = None, output: OutputOpt = None, set_: SetOpt = None,
                resume: ResumeOpt = False, overwrite: OverwriteOpt = False, num_processes: ProcessesOpt = None,
                distributed: DistributedOpt = None) -> None:
        import importlib

        from posttrain import launch

        cfg = _load(config, set_, base)
        argv = launch.stage_argv(stage, config, set_, base=base, output=output, resume=resume, overwrite=overwrite,
                                 debug=_state["debug"])
        if _launched(cfg, num_processes, distributed, argv):
            return
        _quiet_libraries()
        importlib.import_module(registry.STAGES[stage].module).run(cfg, base=base, output=output, resume=resume,
                                                                   overwrite=overwrite)

    command.__name__, command.__doc__ = stage, doc
    app.command(stage)(user_errors(command))


for _stage in registry.names(launched=True):
    _training_command(_stage, registry.STAGES[_stage].help)


@app.command(help=registry.STAGES["merge"].help)
@user_errors
def merge(config: ConfigArg = None,
          base: Annotated[str | None, typer.Option(
              "--base", help="The finished stage holding the LoRA adapter to merge.")] = None,
          output: OutputOpt = None, set_: SetOpt = None, overwrite: OverwriteOpt = False) -> None:
    cfg = _load(config, set_, base)
    _quiet_libraries()
    from posttrain.stages import merge as stage

    stage.run(cfg, base=base, output=output, overwrite=overwrite)


@app.command(help=registry.STAGES["export"].help)
@user_errors
def export(directory: Annotated[str | None, typer.Argument(
               help="The finished stage (or model directory) to export; default: the model the config's chain "
               "makes before export.")] = None,
           config: Annotated[Path | None, typer.Option(
               "--config", "-c", help="YAML config (default: the one recorded in DIRECTORY's posttrain.json).")] = None,
           format_: Annotated[str | None, typer.Option(
               "--format", help="The file format (export.format): gguf.")] = None,
           type_: Annotated[str | None, typer.Option(
               "--type", help="The tensor type (export.type): f16, bf16 or q8_0 [default: q8_0].")] = None,
           output: OutputOpt = None, set_: SetOpt = None, overwrite: OverwriteOpt = False) -> None:
    given = [f"export.format={format_}"] * (format_ is not None) + [f"export.type={type_}"] * (type_ is not None)
    if config is None:
        from posttrain import manifest

        if directory is None or "config" not in (manifest.read(directory) or {}):
            raise PosttrainError(("no DIRECTORY and no config" if directory is None else
                                  f"'{directory}' is not a posttrain stage with a recorded config"),
                                 fix="pass a finished stage directory, or -c CONFIG (with a model directory: "
                                 "posttrain export DIR -c CONFIG)")
    cfg = _load(config, [*given, *(set_ or [])], directory)
    _quiet_libraries()
    from posttrain.stages import export as stage

    stage.run(cfg, base=directory, output=output, overwrite=overwrite)


@app.command("eval", help=registry.STAGES["eval"].help)
@user_errors
def eval_cmd(config: ConfigArg = None,
             models: Annotated[list[str] | None, typer.Option(
                 "--models", help="Model or adapter directories to compare (repeat the option); default: the base "
                 "model and every model stage of the config's chain.")] = None,
             output: OutputOpt = None, set_: SetOpt = None, overwrite: OverwriteOpt = False) -> None:
    cfg = _load(config, set_)
    _quiet_libraries()
    from posttrain import report
    from posttrain.stages import eval as stage

    out = stage.run(cfg, output=output, overwrite=overwrite, models_=models)
    if out.parent.resolve() == Path(cfg.output_dir).resolve() and out.name == "eval":
        md, html = report.write(cfg.output_dir)
        typer.echo(f"report: {md}, {html}")


@app.command("report")
@user_errors
def report_cmd(directory: Annotated[Path, typer.Argument(help="A chain's output directory (output_dir).")]) -> None:
    """Write report.md and report.html for a chain's output directory from what it holds."""
    from posttrain import report

    if not directory.is_dir():
        raise PosttrainError(f"'{directory}' is not a directory", fix="give a chain's output_dir")
    md, html = report.write(directory)
    typer.echo(f"report: {md}, {html}")


@app.command()
@user_errors
def run(config: Annotated[Path, typer.Argument(help="YAML config holding the chain (stages:).")],
        output: Annotated[str | None, typer.Option(
            "--output", "-o", help="The chain's output directory (output_dir): each stage writes DIR/<stage>. "
            "The same as --set output_dir=DIR, and it wins over one.")] = None,
        set_: SetOpt = None,
        from_: Annotated[str | None, typer.Option("--from", help="Rerun from this stage on.")] = None,
        dry_run: Annotated[bool, typer.Option(
            "--dry-run", help="Validate the chain and show each stage's settings and a rendered sample.")] = False,
        num_processes: ProcessesOpt = None, distributed: DistributedOpt = None,
        ) -> None:
    """Run the chain in stages: (format → sft → reward → ppo → dpo → merge → control → eval), skipping
    stages that are up to date; ends with report.md / report.html in output_dir. With several
    processes, each training stage is launched through accelerate; the others run here."""
    from posttrain import launch

    if launch.inside_launch():
        raise PosttrainError("`posttrain run` is running under a launcher (accelerate launch / torchrun): every "
                             "process would run the whole chain", fix="run `posttrain run CONFIG --num-processes N`: "
                             "it launches each training stage in N processes and runs the rest once")
    cfg = _load(config, _with_output_dir(set_, output))
    plan = launch.plan(cfg, num_processes, distributed)
    _quiet_libraries()
    from posttrain import chain

    chain.run(cfg, from_stage=from_, dry_run=dry_run, launch_plan=plan, debug=_state["debug"])


def _with_output_dir(overrides: list[str] | None, output: str | None) -> list[str] | None:
    """`run -o DIR` as the last --set override: it wins over `--set output_dir=...`, and the processes
    a launched stage starts read it again with the other overrides (config._source). The value is
    quoted (a JSON string is a YAML string), so a DIR like `123`, `yes`, `~` or `a #1` stays a path."""
    if output is None:
        return overrides
    if not output.strip():
        raise PosttrainError("-o/--output is empty", fix="give the chain's output directory")
    return [*(overrides or ()), f"output_dir={json.dumps(output, ensure_ascii=False)}"]


@app.command()
@user_errors
def preview(config: Annotated[Path, typer.Argument(help="YAML config.")],
            stage: Annotated[str, typer.Option(
                "--stage", help=f"Whose data to show ({' or '.join(registry.names(preview=True))}).")] = "sft",
            n: Annotated[int, typer.Option("-n", help="How many samples.")] = 3,
            set_: SetOpt = None) -> None:
    """Print rendered training samples with the trained (loss) tokens highlighted."""
    cfg = _load(config, set_)
    _quiet_libraries()
    from posttrain.preview import show

    show(cfg, stage, n)


@app.command()
@user_errors
def push(directory: Annotated[Path, typer.Argument(help="A finished model stage (its output directory).")],
         repo_id: Annotated[str, typer.Argument(help="The Hub repo to upload to, e.g. you/smollm2-dpo.")],
         private: Annotated[bool, typer.Option("--private", help="Create the repo private.")] = False,
         revision: Annotated[str | None, typer.Option(
             "--revision", help="The branch to upload to (created if missing) [default: main].")] = None) -> None:
    """Upload a finished stage to the Hugging Face Hub: weights, tokenizer, chat template, generation
    config, model card and manifest (never checkpoints or optimizer states). The token comes from
    HF_TOKEN or `hf auth login`; posttrain writes it nowhere."""
    from posttrain import hub

    typer.echo(hub.push(directory, repo_id, private=private, revision=revision))


@app.command()
@user_errors
def convert(file: Annotated[Path, typer.Argument(help="A .gguf file (llama.cpp, Ollama).")],
            output: Annotated[Path | None, typer.Option("--output", "-o", help="Where to write the model directory "
                                                        "(default: the conversion cache, "
                                                        "reused by every stage).")] = None,
            force: Annotated[bool, typer.Option("--force", help="Convert again even if up to date.")] = False) -> None:
    """Convert a GGUF file to a Hugging Face model directory (dequantised safetensors, tokenizer,
    chat template, generation config). Stages do this by themselves when model.name_or_path is a
    .gguf file; the conversion is reused while the file's SHA-256 is unchanged."""
    if not str(file).lower().endswith(".gguf"):
        raise PosttrainError(f"'{file}' is not a .gguf file", fix="pass the path of a GGUF file")
    _quiet_libraries()
    from posttrain import gguf

    out = gguf.convert(file, output, force=force)
    info = gguf.origin(out) or {}
    typer.echo(f"{out} ({info.get('architecture')}, {info.get('parameters', 0) / 1e6:.1f} M parameters, "
               f"{info.get('note')}; sha256 {info.get('sha256', '')[:16]})")


@app.command("init-tiny")
@user_errors
def init_tiny(directory: Annotated[Path, typer.Argument(help="Where to write the tiny model and tokenizer.")],
              data_dir: Annotated[Path | None, typer.Option("--data-dir",
                                                            help="Also write the demo data here.")] = None,
              hidden: int = 64, layers: int = 2, heads: int = 4, seed: int = 0) -> None:
    """Build a tiny random-init Llama model and BPE tokenizer offline (for the demo and tests)."""
    if hidden % heads:
        raise PosttrainError(f"--hidden {hidden} is not divisible by --heads {heads}")
    _quiet_libraries()
    from posttrain import demo, tiny

    if data_dir is not None:
        paths = demo.write_data(data_dir, seed=seed)
        typer.echo(f"demo data: {', '.join(str(p) for p in paths.values())}")
    out = tiny.init_tiny(directory, demo.corpus(seed), hidden=hidden, layers=layers, heads=heads, seed=seed)
    typer.echo(f"tiny model and tokenizer: {out}")


def main() -> None:
    try:
        app()
    except BrokenPipeError:  # e.g. `posttrain preview ... | head`
        sys.exit(0)


if __name__ == "__main__":
    main()
