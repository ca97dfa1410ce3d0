"""Standard benchmarks through EleutherAI's lm-evaluation-harness (the optional `lm-eval` extra).

`run_tasks` evaluates one full model directory on named lm-eval tasks with lm-eval's Hugging Face
backend (HFLM), and returns plain numbers plus every setting that decides them, so two models'
results compare only when their settings do. Choices made here, and why:
  - the model's own saved chat template is applied (lm-eval's `apply_chat_template`): a chat model
    prompted as raw text scores as a different model, and every model is prompted the same way;
  - every seed lm-eval takes is set from one `seed` (python, numpy, torch, few-shot sampling), so a
    rerun gives the same numbers;
  - only numeric metrics are kept, named without lm-eval's default filter suffix ("acc,none" ->
    "acc"; a non-default filter stays: "exact_match,strict-match"). Standard errors are kept as
    "<metric>_stderr" where lm-eval can compute one (two or more documents): a difference between
    two models smaller than about two standard errors is noise;
  - task names are checked before the model loads: lm-eval's own error comes only after it has
    loaded the model, and a YAML that fails to parse is skipped silently, looking like a typo.

lm-eval, torch and transformers are imported inside the functions: importing this module is instant.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import numbers
import os
from collections.abc import Iterator
from pathlib import Path

from posttrain.errors import PosttrainError, did_you_mean

INSTALL = "pip install 'posttrain[lm-eval]'"
# Bootstrap draws for the standard error of metrics without a closed form (bleu, perplexity...).
# lm-eval's default, 100000, takes minutes on a long task; the draws are seeded, so any count is
# deterministic. Means (acc, exact_match) have a closed-form standard error and ignore this.
BOOTSTRAP_ITERS = 1000
LM_EVAL_LOGGERS = ("lm_eval", "lm-eval")


def run_tasks(model_dir: str, tasks: list[str], *, include_path: str | None = None, limit: int | None = None,
              num_fewshot: int | None = None, batch_size: int = 8, apply_chat_template: bool = True,
              seed: int = 0, device: str | None = None) -> dict:
    """Run named lm-eval tasks on one full (merged) model directory through lm-eval's Hugging Face
    backend (HFLM), with the model's own saved chat template applied (apply_chat_template) so every
    model is prompted the same way. Returns {"results": {task: {metric: float}}, "settings": {...everything
    that decides the numbers: tasks, include_path, limit, num_fewshot, apply_chat_template, seed, batch_size,
    lm_eval version}}.

    `include_path` is a directory of task YAMLs (lm-eval's `--include_path`) for tasks that are not
    built in; `limit` takes the first N documents of each task (for smoke tests: the numbers are
    then not comparable with published ones); `num_fewshot` overrides the tasks' own (None keeps
    it). Group tasks (e.g. "mmlu") report the group's aggregate next to each subtask's entry.
    """
    where = "lm_eval"
    model_dir = str(model_dir)
    tasks = list(tasks)
    if not tasks:
        raise PosttrainError("no lm-eval tasks given", where=where, fix="name at least one task, e.g. hellaswag")
    _check_model_dir(model_dir, where)
    if include_path is not None and not Path(include_path).is_dir():
        raise PosttrainError(f"include_path '{include_path}' is not a directory", where=where,
                             fix="point include_path at a directory of lm-eval task YAMLs")
    version = _require_lm_eval(where)
    chat_template = _chat_template(model_dir, where) if apply_chat_template else None

    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    with _quiet_lm_eval():
        from lm_eval import simple_evaluate

        # lm-eval's CLI passes the model arguments as task metadata (some tasks read the tokenizer
        # from it); do the same so a task behaves here as it does from `lm_eval --model hf`.
        model_args = {"pretrained": model_dir}
        manager = _task_manager(tasks, include_path, metadata=dict(model_args), where=where)
        out = simple_evaluate(
            model="hf", model_args=model_args, tasks=tasks, task_manager=manager, device=device,
            batch_size=batch_size, limit=limit, num_fewshot=num_fewshot,
            apply_chat_template=apply_chat_template, log_samples=False, bootstrap_iters=BOOTSTRAP_ITERS,
            random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
        )
    results = {task: _metrics(raw) for task, raw in out["results"].items()}
    settings = {
        "tasks": tasks, "include_path": include_path, "limit": limit, "num_fewshot": num_fewshot,
        "n_shot": dict(out.get("n-shot", {})),  # what each task used: its own default when num_fewshot is None
        "n_samples": {t: n["effective"] for t, n in out.get("n-samples", {}).items()},
        "apply_chat_template": apply_chat_template,
        "fewshot_as_multiturn": True,  # simple_evaluate's default: few-shot examples as earlier chat turns
        "chat_template_sha256": hashlib.sha256(chat_template.encode()).hexdigest()[:16] if chat_template else None,
        "seed": seed, "batch_size": batch_size, "device": device, "bootstrap_iters": BOOTSTRAP_ITERS,
        "task_versions": dict(out.get("versions", {})), "lm_eval_version": version,
    }
    return {"results": results, "settings": settings}


def check_tasks(tasks: list[str], include_path: str | None = None, where: str = "eval.lm_eval") -> None:
    """Fail before any model loads: lm-eval installed, include_path a directory, every task known."""
    if include_path is not None and not Path(include_path).is_dir():
        raise PosttrainError(f"include_path '{include_path}' is not a directory", where=where,
                             fix="point include_path at a directory of lm-eval task YAMLs")
    _require_lm_eval(where)
    with _quiet_lm_eval():
        _task_manager(list(tasks), include_path, {}, where)


def skip_reason(model_dir: str, apply_chat_template: bool) -> str | None:
    """Why lm-eval can't run on this model (None when it can): lm-eval reads a full local model,
    and, with apply_chat_template, its saved chat template."""
    p = Path(model_dir)
    if (p / "adapter_config.json").exists() and not (p / "config.json").exists():
        return "a LoRA adapter: lm-eval runs on the merged model (posttrain merge)"
    if not (p / "config.json").exists():
        return "not a local model directory"
    if apply_chat_template:
        from transformers import AutoTokenizer

        if not AutoTokenizer.from_pretrained(model_dir).chat_template:
            return "its tokenizer has no chat template"
    return None


def _check_model_dir(model_dir: str, where: str) -> None:
    """A full model directory: lm-eval would read an adapter directory as a Hub name or fail deep inside."""
    p = Path(model_dir)
    if not p.is_dir():
        raise PosttrainError(f"model directory '{model_dir}' does not exist", where=where,
                             fix="point at a model directory (a finished stage, or posttrain merge's output)")
    if (p / "adapter_config.json").exists() and not (p / "config.json").exists():
        raise PosttrainError(f"'{model_dir}' is a LoRA adapter, not a full model", where=where,
                             fix="evaluate the merged model: run `posttrain merge` and point at its output")
    if not (p / "config.json").exists():
        raise PosttrainError(f"'{model_dir}' holds no model (no config.json)", where=where,
                             fix="point at a model directory (a finished stage, or posttrain merge's output)")


def _require_lm_eval(where: str) -> str:
    """lm-eval's version; a one-line error when the optional extra is not installed."""
    try:
        import lm_eval
    except ImportError:
        raise PosttrainError("lm-evaluation-harness (lm_eval) is not installed", where=where,
                             fix=f"install the extra: {INSTALL}") from None
    return str(getattr(lm_eval, "__version__", "unknown"))


def _chat_template(model_dir: str, where: str) -> str:
    """The model's saved chat template; without one lm-eval cannot prompt the model as a chat."""
    from transformers import AutoTokenizer

    template = AutoTokenizer.from_pretrained(model_dir).chat_template
    if isinstance(template, dict):  # named templates: lm-eval uses "default"
        template = template.get("default")
    if not template:
        raise PosttrainError(f"the tokenizer in '{model_dir}' has no chat template", where=where,
                             fix="save the model with its chat template, or set apply_chat_template: false")
    return template


def _task_manager(tasks: list[str], include_path: str | None, metadata: dict, where: str):
    """An lm-eval TaskManager that knows every task in `tasks`, or a PosttrainError naming the unknown ones.

    Indexing lm-eval's built-in tasks parses ~15000 YAMLs (seconds); when every task is a plain task in
    `include_path`, an index of that directory alone resolves them to the same YAMLs (include_path
    takes precedence over built-ins in lm-eval). A group there may name built-in tasks, so groups
    take the full index.
    """
    from lm_eval.tasks import TaskManager

    if include_path:
        local = TaskManager(include_path=include_path, include_defaults=False, metadata=metadata)
        if all(t in local.all_tasks and t not in local.all_groups for t in tasks):
            return local
    manager = TaskManager(include_path=include_path, metadata=metadata)
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known and not Path(t).is_file()]  # lm-eval also takes a YAML path
    if unknown:
        hints = [f"'{t}' -> did you mean '{m}'?" for t in unknown if (m := did_you_mean(t, known))]
        where_looked = f"built in or in include_path '{include_path}'" if include_path else "built in"
        raise PosttrainError(
            f"unknown lm-eval task(s) {', '.join(repr(t) for t in unknown)} (not {where_looked})"
            + (f"; {'; '.join(hints)}" if hints else ""),
            where=where,
            fix="check the name (`lm_eval ls tasks` lists the built-in ones), or set include_path to a directory "
                "of task YAMLs defining it (a YAML that fails to parse is skipped silently by lm-eval)",
        )
    return manager


def _metrics(raw: dict) -> dict[str, float]:
    """{"acc,none": 0.5, "acc_stderr,none": 0.1, "alias": ..., "sample_len": 4} -> {"acc": 0.5, "acc_stderr": 0.1}.

    A metric key is "name,filter"; keys without a filter ("alias", "sample_len") are not metrics, and
    a standard error lm-eval could not compute is the string "N/A" (dropped).
    """
    out = {}
    for key, value in raw.items():
        name, _, filt = key.partition(",")
        if not filt or isinstance(value, bool) or not isinstance(value, numbers.Real):
            continue
        out[name if filt == "none" else key] = float(value)
    return out


@contextlib.contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """lm-eval logs at WARNING what a CLI user cannot act on (default aggregations, delimiter
    whitespace, seed settings); keep its errors only, unless LMEVAL_LOG_LEVEL (lm-eval's own setting)
    asks for more. Bootstrapped standard errors run in-process (DISABLE_MULTIPROC): lm-eval would
    otherwise fork a pool of every CPU core from a process holding the model."""
    loggers = [logging.getLogger(name) for name in LM_EVAL_LOGGERS]
    levels = [lg.level for lg in loggers]
    level = logging.getLevelName(os.environ.get("LMEVAL_LOG_LEVEL", "ERROR").upper())
    multiproc = os.environ.get("DISABLE_MULTIPROC")
    os.environ["DISABLE_MULTIPROC"] = "1"
    for lg in loggers:
        lg.setLevel(level if isinstance(level, int) else logging.ERROR)
    try:
        yield
    finally:
        for lg, old in zip(loggers, levels, strict=True):
            lg.setLevel(old)
        if multiproc is None:
            os.environ.pop("DISABLE_MULTIPROC", None)
        else:
            os.environ["DISABLE_MULTIPROC"] = multiproc
