"""Shared fixtures: a tiny random-init Llama model + tokenizer and small demo data, built offline;
and what several test modules build from them (a saved LoRA adapter, a small reward stage, an
editable copy of the SFT data). Plain helper functions are in tests/helpers.py."""

from __future__ import annotations

import json
import logging
import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A 2-layer, 32-wide Llama model and its BPE tokenizer, saved like a Hub model."""
    from posttrain import demo, tiny

    d = tmp_path_factory.mktemp("tiny")
    tiny.init_tiny(d, demo.corpus(), hidden=32, layers=2, heads=4, seed=0)
    return d


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """Small slices of the demo task: sft train/eval (messages) and preference pairs."""
    from posttrain import demo

    d = tmp_path_factory.mktemp("data")
    rows = demo.make_rows(seed=0)
    sizes = {"sft_train": 256, "sft_eval": 32, "pref_train": 64, "pref_eval": 16,
             "reward_train": 128, "reward_eval": 32}
    for name, n in sizes.items():
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[name][:n]))
    return d


def _fetch_script():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / "fetch_models.py"
    spec = importlib.util.spec_from_file_location("fetch_models", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def real_models():
    """The real pretrained models (scripts/fetch_models.py, which `make test` runs first): a
    function from "smollm2" | "gemma3" to (GGUF file, converted Hugging Face directory).
    A missing model is fetched here (the same code), so a test never skips for lack of it."""
    fetch = _fetch_script()
    cache = {}

    def get(name: str):
        if name not in cache:
            from posttrain import gguf

            path = fetch.fetch(name, convert=False)
            cache[name] = (path, gguf.convert(path))
        return cache[name]

    return get


@pytest.fixture(scope="module")
def one_thread():
    """One thread for a module, there and in the subprocesses its stages start (the reward stage's
    reload check): tiny models gain nothing from a second thread, and on a shared 2-core machine
    OpenMP threads waiting for a busy core make every step many times slower.
    Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


@pytest.fixture
def make_config(tiny_dir, demo_data, tmp_path):
    """Build a validated Config for the tiny model; `overrides` are dotted keys."""
    from posttrain.config import validate_dict

    def build(**sections):
        raw = {
            "model": {"name_or_path": str(tiny_dir)},
            "data": {
                "sft": {"kind": "sft", "train": [{"path": str(demo_data / "sft_train.jsonl")}],
                        "eval": [{"path": str(demo_data / "sft_eval.jsonl")}]},
                "preference": {"kind": "preference", "train": [{"path": str(demo_data / "pref_train.jsonl")}]},
            },
            "output_dir": str(tmp_path / "out"),
            "seed": 0,
            "sft": {"training": {"max_steps": 30, "per_device_train_batch_size": 16, "learning_rate": 3e-3,
                                 "logging_steps": 5, "save_steps": 1000, "max_length": 64,
                                 "gradient_checkpointing": False}},
        }
        for key, value in sections.items():
            node = raw
            *parents, last = key.split("__")
            for p in parents:
                node = node.setdefault(p, {})
            node[last] = value
        return validate_dict(raw)

    return build


@pytest.fixture(scope="module")
def saved_adapter(tiny_dir, tmp_path_factory):
    """What a LoRA stage saves: an adapter with non-zero B and the tokenizer (with ChatML)."""
    import torch
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = tmp_path_factory.mktemp("saved") / "adapter"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_dir)),
                           PeftLoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    model.save_pretrained(str(d))
    AutoTokenizer.from_pretrained(str(tiny_dir)).save_pretrained(str(d))
    return d


@pytest.fixture(scope="module")
def small_rm(tiny_dir, demo_data, tmp_path_factory):
    """A reward stage of a few steps on the tiny base (weak: the gate is waived where it is used)."""
    from posttrain.config import validate_dict
    from posttrain.stages import reward
    from tests.helpers import ppo_chain_raw

    root = tmp_path_factory.mktemp("safeguards_rm")
    section = {"data": "reward", "training": {"max_steps": 3, "per_device_train_batch_size": 16,
                                              "learning_rate": 3e-3, "logging_steps": 1, "save_steps": 1000,
                                              "max_length": 64, "gradient_checkpointing": False}}
    return reward.run(validate_dict(ppo_chain_raw(tiny_dir, demo_data, root, reward=section)), base=str(tiny_dir),
                      output=str(root / "reward"))


@pytest.fixture
def own_data(demo_data, tmp_path):
    """A copy of the demo's SFT train and eval files, to edit (`helpers.own_sft_data` names them)."""
    import shutil

    d = tmp_path / "data"
    d.mkdir()
    for name in ("sft_train.jsonl", "sft_eval.jsonl"):
        shutil.copy(demo_data / name, d / name)
    return d


def weights_moved(start_dir, out_dir) -> tuple[float, float]:
    """Share of the matrix weights in out_dir/model.safetensors that moved from start_dir's (the start
    as the run stores it: rounded to the saved dtype), and their mean |Δw|."""
    from safetensors.torch import load_file

    start, trained = load_file(str(start_dir / "model.safetensors")), load_file(str(out_dir / "model.safetensors"))
    n = changed = 0
    moved = 0.0
    for k, w in start.items():
        if w.dim() == 2:
            t = trained[k]
            n, changed = n + w.numel(), changed + int((t != w.to(t.dtype)).sum())
            moved += float((t.float() - w.float()).abs().sum())
    return changed / n, moved / n


def read_losses(stage_dir) -> dict[int, float]:
    """Training losses by step from a stage's metrics.jsonl."""
    out = {}
    for line in (stage_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


def tensorboard_scalars(root) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TensorBoard event files under `root`: {tag: [(step, value)]}."""
    from pathlib import Path

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    dirs = sorted({p.parent for p in Path(root).rglob("events.out.tfevents.*")})
    assert dirs, f"no tensorboard event file under {root}"
    out: dict[str, list[tuple[int, float]]] = {}
    for d in dirs:
        acc = EventAccumulator(str(d))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


def finished_checkpoints(stage_dir) -> list:
    """Checkpoints whose trainer state has been written (trainers write it after the weights), oldest first."""
    from pathlib import Path

    def complete(p: Path) -> bool:
        try:
            return "global_step" in json.loads((p / "trainer_state.json").read_text())
        except (OSError, ValueError):
            return False

    found = [p for p in (Path(stage_dir) / "checkpoints").glob("checkpoint-*") if complete(p)]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


@pytest.hookimpl(trylast=True)  # after -m has deselected
def pytest_collection_modifyitems(config, items):
    """`make test-gpu` selects the tests marked cuda: with no GPU visible that is an error, not a
    run of skipped tests that looks green."""
    if not any(item.get_closest_marker("cuda") for item in items):
        return
    import torch

    if not torch.cuda.is_available():
        raise pytest.UsageError("tests marked cuda were selected, and no CUDA GPU is visible "
                                "(run `make test` for the CPU suite)")
