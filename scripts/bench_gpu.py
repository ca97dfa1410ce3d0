#!/usr/bin/env python
"""GPU training throughput: TRL's defaults vs posttrain's, then each speed feature on its own.

Every arm trains a randomly initialised model of a real architecture (no download: the GPU
machines have no network) for --warmup + --steps optimizer steps with the same synthetic data,
seed, learning rate and per-device batch (in sequences), and times the last --steps of them:

  trl-defaults        trl.SFTTrainer with SFTConfig defaults, except what is needed to run and to keep
                      the arms comparable: bf16, batch, steps, lr, seed, max_length = --seq (TRL's
                      1024 would cut the data), no checkpoint saves. TRL's default turns activation
                      checkpointing ON.
  posttrain-defaults  what `posttrain sft` hands SFTConfig on this device: posttrain.stages.sft.
                      trainer_settings (common.trainer_kwargs: posttrain's defaults < device and speed
                      defaults < the `sft.training` section, here: batch, steps, lr, max_length,
                      save_strategy no; plus what SFT adds), read when the arm runs, with posttrain's
                      memory estimate (common.check_memory on the model's config.json; it decides
                      activation checkpointing) and the check_packing safeguard; assistant_only_loss
                      off (the data is pre-tokenized with an assistant_masks column)
  plain               trl-defaults with activation checkpointing OFF: the reference of the feature
                      arms below, each of which is plain + one feature
  packing             packing=True, packing_strategy bfd (padding-free, position ids per document)
  padding-free        padding_free=True without packing (max_length None; the data is <= --seq)
  liger               use_liger_kernel=True (skipped when liger_kernel is not importable / no CUDA)
  checkpointing       activation_checkpointing=True (the same settings as trl-defaults)
  compile             torch_compile=True (--smoke: backend aot_eager, no C++ code generation)
  lora                peft LoRA r 16, alpha 32, dropout 0.05, all-linear (posttrain's lora defaults)
  qlora               4-bit nf4 base (double quant, bf16 compute and storage: posttrain's bnb_config)
                      + the same LoRA, prepared as posttrain does (prepare_model_for_kbit_training)
  posttrain-qlora     posttrain-defaults + the qlora model (what `sft.method: qlora` gets)
  dpo                 trl.DPOTrainer, DPOConfig defaults (+ the same common settings), a frozen copy of
                      the model as reference (posttrain's dpo.reference: copy)
  dpo-precomputed     the same with precompute_ref_log_probs=True (no reference model in memory;
                      the precompute pass is reported, not timed in the window)
  ppo-rollout         posttrain's PPO rollout generation: posttrain.rl.rollout.sample on a batch of
                      left-padded prompts with ppo's batch_size / temperature / top_p defaults
                      (read from PPOStageConfig) and --max-new-tokens (default 128)

Numbers per arm: non-pad tokens/s and supervised tokens/s over the timed window (counted in the
batches the trainer's collator produced), MFU against 989 TFLOP/s (bf16 dense peak of H100 SXM and
H200; 0 and a note for other GPUs) and against a large bf16 matmul measured in the same job, and
peak memory (torch.cuda.max_memory_allocated after reset_peak_memory_stats at train begin).

FLOPs per token: 6*N + 12*L*H*Q*T (N = matmul parameters including the LM head, L layers, H heads,
Q head dim); T = the token's own document length for padding-free / packed batches, the padded
row length for padded batches (the token-weighted mean is printed). LoRA / QLoRA: 4*N on the frozen
weights + 6*N_lora. DPO with a reference model adds its forward, 2*N + 4*L*H*Q*T. Activation
checkpointing's recomputation is not counted (model FLOPs, not hardware FLOPs). ppo-rollout: 2*N +
4*L*H*Q*T per generated token, T = the mean context, prefill not counted.

Table columns: tokens/s (non-pad), supervised tokens/s, × trl-defaults (SFT arms), MFU vs 989, MFU
vs the measured matmul, peak GiB, notes (padded or padding-free and T, activation checkpointing,
attention kernel, ...). Below it: the SFTConfig fields where posttrain-defaults differs from
trl-defaults, with --check-targets the issue's three targets (posttrain-defaults >= 1.5x trl-defaults
tokens/s on smollm2-360m; >= 40% MFU for full fine-tuning of llama-3.2-1b, measured as
posttrain-defaults; posttrain-qlora of llama-3.1-8b under 24 GB peak) as measured values and
met/missed, and the whole result as a markdown block for docs/benchmarks.md.

--smoke: the tiny model (hidden 64, 2 layers, 4/2 heads, vocab 512), seq 128, batch 4, 1 warm-up +
3 timed steps, 1 thread, on the CPU even where a GPU exists: every arm end to end, numbers
meaningless. There, liger is skipped (Triton needs CUDA), compile uses backend aot_eager, qlora runs
on bitsandbytes' CPU backend, and peak memory is not measured.

Each arm runs in a fresh Python process (Liger patches classes globally; compile caches and memory
peaks stay per arm). Everything is written under --workdir. Prints numbers; asserts nothing.
Run from the repository root, e.g.

  .venv/bin/python scripts/bench_gpu.py --smoke                       # every arm, tiny model, CPU
  .venv/bin/python scripts/bench_gpu.py --model smollm2-360m --steps 20 --warmup 5
  .venv/bin/python scripts/bench_gpu.py trl-defaults posttrain-defaults packing --model llama-3.2-1b
  .venv/bin/python scripts/bench_gpu.py --check-targets               # the issue's three targets
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib import metadata, util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
THIS = Path(__file__).resolve()
PEAK_BF16_DENSE = 989e12  # H100 SXM / H200, bf16 dense (no sparsity)
PAD_ID, EOS_ID, FIRST_ID = 0, 1, 2  # synthetic token ids: 0 pad, 1 eos/end-of-turn, the rest data

# name: hidden, layers, heads, kv heads, ffn, vocab, tied, rope_theta, max positions (public configs;
# Llama 3's rope scaling is left out: it does not change the cost)
MODELS = {
    "smollm2-135m": (576, 30, 9, 3, 1536, 49152, True, 100000.0, 8192),
    "smollm2-360m": (960, 32, 15, 5, 2560, 49152, True, 100000.0, 8192),
    "llama-3.2-1b": (2048, 16, 32, 8, 8192, 128256, True, 500000.0, 131072),
    "llama-3.1-8b": (4096, 32, 32, 8, 14336, 128256, False, 500000.0, 131072),
    "tiny": (64, 2, 4, 2, 128, 512, True, 10000.0, 2048),  # --smoke
}
SFT_ARMS = ("trl-defaults", "posttrain-defaults", "plain", "packing", "padding-free", "liger", "checkpointing",
            "compile", "lora", "qlora", "posttrain-qlora")
ARMS = (*SFT_ARMS, "dpo", "dpo-precomputed", "ppo-rollout")
QUANTIZED = ("qlora", "posttrain-qlora")


# --- header -------------------------------------------------------------------------------------

def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _relative(path: str) -> str:
    p = Path(path).absolute()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else path


def _commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return commit + (" (working tree modified)" if dirty else "")
    except OSError:
        return "unknown"


def machine(args) -> dict:
    """GPU name, count, the peak used for MFU (0 = unknown), CPU; torch is imported here."""
    import torch

    cpu = "unknown"
    if Path("/proc/cpuinfo").exists():
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), platform.processor() or "unknown")
    info = {"cpu": f"{cpu}; {os.cpu_count()} logical cores", "gpu": None, "gpus": 0, "peak": 0.0, "peak_note": ""}
    if not args.smoke and torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        info.update(gpu=name, gpus=torch.cuda.device_count(),
                    memory_gib=torch.cuda.get_device_properties(0).total_memory / 2**30)
        if "H200" in name or ("H100" in name and "HBM3" in name):  # the SXM parts; PCIe/NVL peaks are lower
            info["peak"] = PEAK_BF16_DENSE
        else:
            info["peak_note"] = (f"{name} is not an H100 SXM / H200: its bf16 dense peak is not known here, so MFU "
                                 "vs 989 is not reported (see the column against the measured matmul)")
    return info


def header(args, info: dict) -> list[str]:
    shown = ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "PYTORCH_CUDA_ALLOC_CONF", "TOKENIZERS_PARALLELISM")
    env = " ".join(f"{k}={os.environ[k]}" for k in shown if k in os.environ)
    command = [_relative(sys.executable), _relative(sys.argv[0]), *sys.argv[1:]]
    import torch

    versions = [f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})"]
    versions += [f"{p} {_version(p)}" for p in ("transformers", "trl", "peft", "accelerate", "datasets", "liger-kernel",
                                                "bitsandbytes", "flash-attn", "posttrain")]
    gpu = f"{info['gpu']} x {info['gpus']} ({info['memory_gib']:.0f} GiB each)" if info["gpu"] else \
        ("none used (--smoke runs on the CPU)" if args.smoke else "none (CUDA not available)")
    lines = [
        f"$ {env + ' ' if env else ''}{' '.join(shlex.quote(a) for a in command)}",
        f"date       {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"commit     {_commit()}",
        f"python     {platform.python_version()}; {', '.join(versions)}",
        f"gpu        {gpu}",
        f"cpu        {info['cpu']}; threads {args.threads}",
    ]
    if info["gpu"]:
        lines.append(f"peak       {info['peak'] / 1e12:.0f} TFLOP/s bf16 dense" if info["peak"]
                     else f"peak       unknown: {info['peak_note']}")
    return lines


# --- model and data (shared by all arms) ---------------------------------------------------------

def model_numbers(name: str) -> dict:
    h, layers, heads, kv, ffn, vocab, tied, _, _ = MODELS[name]
    q = h // heads
    per_layer = h * heads * q + 2 * h * kv * q + heads * q * h + 3 * h * ffn
    n_matmul = layers * per_layer + vocab * h  # the LM head is a matmul, tied or not
    total = layers * (per_layer + 2 * h) + h + vocab * h * (1 if tied else 2)
    return {"hidden": h, "layers": layers, "heads": heads, "kv_heads": kv, "head_dim": q, "ffn": ffn, "vocab": vocab,
            "tied": tied, "n_matmul": n_matmul, "n_total": total, "attn_coef": layers * heads * q}


def build_config(name: str, seq: int):
    from transformers import LlamaConfig

    h, layers, heads, kv, ffn, vocab, tied, theta, max_pos = MODELS[name]
    return LlamaConfig(vocab_size=vocab, hidden_size=h, intermediate_size=ffn, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv, head_dim=h // heads,
                       max_position_embeddings=max(max_pos, seq + 256), rope_theta=theta, rms_norm_eps=1e-5,
                       tie_word_embeddings=tied, pad_token_id=PAD_ID, eos_token_id=EOS_ID, bos_token_id=None,
                       hidden_act="silu", attention_bias=False, mlp_bias=False)


def build_model(spec: dict, device: str):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(spec["seed"])  # the same initial weights in every arm
    config = build_config(spec["model"], spec["seq"])
    with torch.device(device):  # initialised where it trains: an 8B model initialises in seconds on a GPU
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, spec["dtype"]),
                                                 attn_implementation=spec["attn"])
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = PAD_ID, EOS_ID
    return model


def build_tokenizer(vocab: int):
    """A word-level tokenizer over "t<id>" words: TRL needs a tokenizer object (pad/eos, DPO's text
    path), not a real vocabulary. Pre-tokenized SFT data never goes through it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": PAD_ID, "<eos>": EOS_ID, **{f"t{i}": i for i in range(FIRST_ID, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<pad>")


def lengths(rng, n: int, seq: int, low: int, median: float, sigma: float = 0.8):
    import numpy as np

    return np.clip(np.round(rng.lognormal(np.log(median), sigma, n)), low, seq).astype(int)


def sft_rows(seed: int, n: int, seq: int, vocab: int) -> dict:
    """n conversations as token ids: lengths log-normal (median seq/4) in [min(64, seq/4), seq], the
    first 10-50% of each a "prompt" outside the loss (assistant_masks 0)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ls = lengths(rng, n, seq, min(64, seq // 4), seq / 4)
    prompts = np.maximum(1, (ls * rng.uniform(0.1, 0.5, n)).astype(int))
    ids = [rng.integers(FIRST_ID, vocab, int(n_)).tolist() for n_ in ls]
    masks = [[0] * int(p) + [1] * int(n_ - p) for n_, p in zip(ls, prompts)]
    return {"input_ids": ids, "assistant_masks": masks}


def dpo_rows(seed: int, n: int, seq: int, vocab: int) -> dict:
    """n preference pairs as text of "t<id>" words (DPOTrainer always tokenizes): prompt and chosen
    from one length draw as in sft_rows, rejected from another; prompt + completion + eos <= seq."""
    import numpy as np

    rng = np.random.default_rng(seed + 1)
    low = min(64, seq // 4)
    ls, ls2 = lengths(rng, n, seq - 1, low, seq / 4), lengths(rng, n, seq - 1, low, seq / 4)
    prompts = np.maximum(1, (ls * rng.uniform(0.1, 0.5, n)).astype(int))

    def words(k: int) -> str:
        return " ".join(f"t{i}" for i in rng.integers(FIRST_ID, vocab, int(k)))

    rows = {"prompt": [], "chosen": [], "rejected": []}
    for L, L2, p in zip(ls, ls2, prompts):
        rows["prompt"].append(words(p))
        rows["chosen"].append(" " + words(max(1, L - p)))
        rows["rejected"].append(" " + words(max(1, min(L2, seq - 1) - p)))
    return rows


# --- measuring inside an arm -----------------------------------------------------------------------

class Counter:
    """Wraps the trainer's collator: per batch, non-pad tokens, supervised tokens, and the sum over
    tokens of the attention length T (own document for padding-free, padded row otherwise)."""

    def __init__(self, collator):
        self.collator, self.batches = collator, []

    def __call__(self, examples):
        out = self.collator(examples)
        ids = out["input_ids"]
        nonpad_rows = (ids != PAD_ID).sum(-1)
        rec = {"nonpad": int(nonpad_rows.sum()), "rows": int(ids.shape[0]), "width": int(ids.shape[-1])}
        if "completion_mask" in out:  # DPO: the completion tokens are the ones in the loss
            rec["supervised"] = int(out["completion_mask"].sum())
        else:  # causal LM: labels are shifted inside the model, so the first label never counts
            rec["supervised"] = int((out["labels"][..., 1:] != -100).sum())
        if "attention_mask" not in out and "position_ids" in out:  # padding-free: one row, documents by position
            pos = out["position_ids"][0]
            end = int((ids[0] != PAD_ID).sum())  # any padding (pad_to_multiple_of) comes after the documents
            starts = [i for i in (pos == 0).nonzero().flatten().tolist() if i < end] + [end]
            docs = [b - a for a, b in zip(starts, starts[1:]) if b > a]
            rec["attn"] = sum(d * d for d in docs)
            rec["docs"], rec["mode"] = len(docs), "padding-free"
        else:
            rec["attn"] = int(nonpad_rows.sum()) * int(ids.shape[-1])
            rec["docs"], rec["mode"] = int(ids.shape[0]), "padded"
        self.batches.append(rec)
        return out


def window_callback(warmup: int, steps: int, cuda: bool):
    import torch
    from transformers import TrainerCallback

    def graphs() -> int:
        try:
            from torch._dynamo.utils import counters

            return int(counters["stats"]["unique_graphs"])
        except Exception:  # noqa: BLE001 - only a note
            return 0

    class Window(TrainerCallback):
        t0 = t1 = None
        graphs0 = graphs1 = 0

        def on_train_begin(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in (warmup, warmup + steps):
                if cuda:
                    torch.cuda.synchronize()
                if state.global_step == warmup:
                    self.t0, self.graphs0 = time.perf_counter(), graphs()
                else:
                    self.t1, self.graphs1 = time.perf_counter(), graphs()

    return Window()


def instrument(trainer, spec: dict, cuda: bool, args, res: dict):
    """Count the trainer's batches and time its window; record the training arguments in `res`."""
    counter = Counter(trainer.data_collator)
    trainer.data_collator = counter
    window = window_callback(spec["warmup"], spec["steps"], cuda)
    trainer.add_callback(window)
    res["args"] = {k: (v if isinstance(v, (str, int, float, bool, type(None), list, dict)) else str(v))
                   for k, v in args.to_dict().items()}
    return counter, window


def summarize(res: dict, batches: list[dict], window, spec: dict, accum: int, flops_coef: float, attn_mult: float,
              cuda: bool) -> None:
    """Window totals -> tokens/s, supervised tokens/s, FLOP/s (per non-pad token: flops_coef +
    attn_mult * L*H*Q * T) and peak memory, into res."""
    import torch

    first, n = spec["warmup"] * accum, spec["steps"] * accum
    win = batches[first:first + n]
    if window.t0 is None or window.t1 is None or len(win) < n:
        res["error"] = f"timed window incomplete ({len(win)} of {n} batches counted)"
        return
    seconds = window.t1 - window.t0
    tokens, supervised = sum(b["nonpad"] for b in win), sum(b["supervised"] for b in win)
    attn = sum(b["attn"] for b in win)
    m = model_numbers(spec["model"])
    flops = flops_coef * tokens + attn_mult * m["attn_coef"] * attn
    res.update(seconds=seconds, tokens=tokens, supervised=supervised, tokens_s=tokens / seconds,
               supervised_s=supervised / seconds, flops_s=flops / seconds, t_eff=attn / tokens,
               mode=win[0]["mode"], rows_per_step=sum(b["rows"] for b in win) / len(win),
               docs_per_step=sum(b["docs"] for b in win) / len(win) * accum,
               width=sum(b["width"] for b in win) / len(win), pad_fraction=1 - tokens / sum(b["rows"] * b["width"]
                                                                                            for b in win))
    if cuda:
        res["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        res["reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    if window.graphs1 > window.graphs0:
        res["notes"].append(f"{window.graphs1 - window.graphs0} graph(s) compiled inside the window")


# --- the arms ---------------------------------------------------------------------------------------

def common_settings(spec: dict, cuda: bool) -> dict:
    """What every TRL arm sets: the compared hyperparameters and what is needed to run."""
    s = {"output_dir": str(Path(spec["workdir"]) / spec["arm"] / "checkpoints"),
         "per_device_train_batch_size": spec["batch"], "max_steps": spec["warmup"] + spec["steps"],
         "learning_rate": spec["lr"], "seed": spec["seed"], "max_length": spec["seq"], "report_to": "none",
         "save_strategy": "no", "disable_tqdm": True}
    s.update({"bf16": True} if cuda else {"bf16": False, "use_cpu": True})
    return s


def posttrain_config(spec: dict):
    """(posttrain Config, model source) for the posttrain arms: the model's config.json written to
    disk (what the memory estimate reads) and the bench's training values as `sft.training`."""
    try:
        import posttrain  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(ROOT / "src"))
    from posttrain.config import Config

    source = Path(spec["workdir"]) / "model-configs" / spec["model"]  # config.json only: what the estimate reads
    build_config(spec["model"], spec["seq"]).save_pretrained(source)
    user = {"per_device_train_batch_size": spec["batch"], "max_steps": spec["warmup"] + spec["steps"],
            "learning_rate": spec["lr"], "max_length": spec["seq"], "save_strategy": "no", "disable_tqdm": True}
    method = "qlora" if spec["arm"] in QUANTIZED else "full"
    # assistant_only_loss off: TRL takes it for conversational data only; here the pre-tokenized
    # rows' assistant_masks column gives the same labels. The data section is never read.
    cfg = Config.model_validate({"model": {"name_or_path": str(source)}, "seed": spec["seed"], "stages": ["sft"],
                                 "data": {"sft": {"kind": "sft", "train": [{"path": "unused.jsonl"}]}},
                                 "sft": {"method": method, "assistant_only_loss": False, "training": user}})
    return cfg, source


def posttrain_settings(spec: dict, notes: list) -> dict:
    """posttrain's SFT arguments on this device, from posttrain itself: the memory estimate (which
    decides activation checkpointing, common.check_memory) on the model's config.json, then
    stages/sft.py's trainer_settings, what `posttrain sft` hands SFTConfig. The attention kernel and
    dtype are the ones posttrain would load the model with (models.load_kwargs)."""
    cfg, source = posttrain_config(spec)
    from posttrain import models
    from posttrain.stages import common, sft

    est = common.check_memory(cfg, "sft", str(source))
    if est is not None:
        notes.append(f"posttrain's memory estimate {est.total / 2**30:.3g} GiB")
    kwargs = sft.trainer_settings(cfg, Path(spec["workdir"]) / spec["arm"], has_eval=False, estimate=est)
    load = models.load_kwargs(cfg, "full")
    if load.get("attn_implementation"):
        spec["attn"] = load["attn_implementation"]
    spec["dtype"] = str(load["dtype"]).replace("torch.", "")
    return kwargs


def sft_settings(arm: str, spec: dict, cuda: bool, notes: list) -> tuple[dict, bool, bool]:
    """(SFTConfig kwargs, lora?, quantized?) for an SFT arm."""
    if arm in ("posttrain-defaults", "posttrain-qlora"):
        kw = posttrain_settings(spec, notes)
    else:
        kw = common_settings(spec, cuda)
        if arm != "trl-defaults":
            kw["activation_checkpointing"] = arm == "checkpointing"
    if arm == "packing":
        kw.update(packing=True, packing_strategy="bfd")
    elif arm == "padding-free":
        kw.update(padding_free=True, max_length=None)
    elif arm == "liger":
        kw["use_liger_kernel"] = True
    elif arm == "compile":
        kw["torch_compile"] = True
        if not cuda:
            kw["torch_compile_backend"] = "aot_eager"
            notes.append("CPU: torch_compile_backend aot_eager")
    return kw, arm in ("lora", *QUANTIZED), arm in QUANTIZED


def quantize_4bit(model, spec: dict, device: str) -> int:
    """Replace every nn.Linear except the LM head with a bitsandbytes Linear4bit quantized from the
    random weights, with posttrain's bnb_config settings (from_pretrained would need the weights on
    disk). Returns how many layers were quantized."""
    import bitsandbytes as bnb
    import torch
    from torch import nn

    dtype = getattr(torch, spec["dtype"])
    quant = {"quant_type": "nf4", "compress_statistics": True, "quant_storage": dtype}
    try:
        from posttrain import models

        c = models.bnb_config(dtype)
        quant = {"quant_type": c.bnb_4bit_quant_type, "compress_statistics": c.bnb_4bit_use_double_quant,
                 "quant_storage": c.bnb_4bit_quant_storage}
    except Exception:  # noqa: BLE001 - posttrain's settings as of writing, above
        pass
    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear) or child is model.get_output_embeddings():
                continue
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=dtype, device="meta", **quant)
            q.weight = bnb.nn.Params4bit(child.weight.data.to(dtype), requires_grad=False, module=q,
                                         **quant).to(device)
            if child.bias is not None:
                q.bias = nn.Parameter(child.bias.data, requires_grad=False)
            setattr(parent, name, q)
            n += 1
    model.is_loaded_in_4bit = True
    model.quantization_method = "bitsandbytes"  # Trainer: do not .to() a bnb model
    if device == "cuda":  # what from_pretrained(device_map={"": current device}) records (posttrain's QLoRA load)
        import torch

        model.hf_device_map = {"": torch.cuda.current_device()}
    else:
        from posttrain import models

        models.disable_bnb_cpu_repack(model)
    return n


def skip_reason(arm: str, cuda: bool) -> str | None:
    if arm == "liger":
        if util.find_spec("liger_kernel") is None:
            return "liger_kernel is not importable (pip install liger-kernel)"
        if not cuda:
            return "Liger's Triton kernels need CUDA"
    if arm in QUANTIZED:
        if util.find_spec("bitsandbytes") is None:
            return "bitsandbytes is not importable"
        import bitsandbytes.functional as F
        import torch

        try:  # a 4-bit round trip on the device that will train
            x = torch.randn(64, 64, dtype=torch.bfloat16, device="cuda" if cuda else "cpu")
            F.dequantize_4bit(*F.quantize_4bit(x, quant_type="nf4"), quant_type="nf4")
        except Exception as e:  # noqa: BLE001
            return f"bitsandbytes 4-bit is not usable on {'CUDA' if cuda else 'the CPU'}: {type(e).__name__}: {e}"
    return None


def run_sft(spec: dict, res: dict, cuda: bool) -> None:
    import datasets
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    arm, notes = spec["arm"], res["notes"]
    kw, lora, quantized = sft_settings(arm, spec, cuda, notes)
    device = "cuda" if cuda else "cpu"
    model = build_model(spec, device)
    n_docs = spec["batch"] * (spec["warmup"] + spec["steps"]) * int(kw.get("gradient_accumulation_steps", 1))
    train = datasets.Dataset.from_dict(sft_rows(spec["seed"], n_docs, spec["seq"], model.config.vocab_size))
    peft_config = None
    if quantized:
        from peft import prepare_model_for_kbit_training

        res["quantized_layers"] = quantize_4bit(model, spec, device)
        if cuda:
            import torch

            torch.cuda.empty_cache()
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)  # as posttrain does
    if lora:
        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                 task_type="CAUSAL_LM")
    t = time.perf_counter()
    args = SFTConfig(**kw)
    if arm.startswith("posttrain") and (args.packing or args.padding_free):  # stages/sft.py's safeguard #27
        from posttrain import models

        models.check_packing(model)
    trainer = SFTTrainer(model=model, args=args, train_dataset=train, processing_class=build_tokenizer(64),
                         peft_config=peft_config)
    res["setup_s"] = time.perf_counter() - t
    counter, window = instrument(trainer, spec, cuda, args, res)
    res["attn"] = trainer.model.config._attn_implementation if hasattr(trainer.model, "config") else spec["attn"]
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    res["trainable"] = trainable
    trainer.train()
    m = model_numbers(spec["model"])
    if lora:
        coef = 4 * m["n_matmul"] + 6 * trainable
        notes.append("FLOPs 4N frozen + 6N_lora")
    else:
        coef = 6 * m["n_matmul"]
    summarize(res, counter.batches, window, spec, args.gradient_accumulation_steps, coef, 12, cuda)
    res["activation_checkpointing"] = bool(args.activation_checkpointing)


def run_dpo(spec: dict, res: dict, cuda: bool) -> None:
    import copy

    import datasets
    from trl import DPOConfig, DPOTrainer

    precompute = spec["arm"] == "dpo-precomputed"
    model = build_model(spec, "cuda" if cuda else "cpu")
    n = spec["batch"] * (spec["warmup"] + spec["steps"])
    train = datasets.Dataset.from_dict(dpo_rows(spec["seed"], n, spec["seq"], model.config.vocab_size))
    ref = None if precompute else copy.deepcopy(model).requires_grad_(False)
    kw = common_settings(spec, cuda)
    kw["precompute_ref_log_probs"] = precompute
    args = DPOConfig(**kw)
    t = time.perf_counter()
    trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=train,
                         processing_class=build_tokenizer(model.config.vocab_size))
    res["setup_s"] = time.perf_counter() - t
    if precompute:
        res["notes"].append(f"reference log-probs precomputed in {res['setup_s']:.1f} s (setup, not timed)")
    counter, window = instrument(trainer, spec, cuda, args, res)
    res["attn"] = spec["attn"]
    trainer.train()
    m = model_numbers(spec["model"])
    coef, attn_mult = 6 * m["n_matmul"], 12
    if not precompute:
        coef, attn_mult = coef + 2 * m["n_matmul"], attn_mult + 4
        res["notes"].append("FLOPs incl. the reference forward (2N)")
    summarize(res, counter.batches, window, spec, args.gradient_accumulation_steps, coef, attn_mult, cuda)
    res["activation_checkpointing"] = bool(args.activation_checkpointing)


def run_rollout(spec: dict, res: dict, cuda: bool) -> None:
    import numpy as np
    import torch

    try:
        import posttrain  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(ROOT / "src"))
    from posttrain.rl import rollout
    from posttrain.sections import PPOStageConfig

    pc = PPOStageConfig()
    device = "cuda" if cuda else "cpu"
    model = build_model(spec, device)
    model.eval()  # posttrain: dropout off everywhere
    rng = np.random.default_rng(spec["seed"] + 2)
    batches = []
    for _ in range(spec["rollout_warmup"] + spec["rollouts"]):
        ls = lengths(rng, pc.batch_size, pc.max_prompt_length, min(8, pc.max_prompt_length), 64)
        batches.append(rollout.left_pad([rng.integers(FIRST_ID, model.config.vocab_size, int(k)).tolist()
                                         for k in ls], PAD_ID))
    res["notes"].append(f"ppo batch_size {pc.batch_size}, temperature {pc.temperature}, top_p {pc.top_p}, "
                        f"max_new_tokens {spec['max_new_tokens']} (ppo default {pc.max_new_tokens})")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    generated, seconds, ctx = 0, 0.0, []
    for i, (q, qm) in enumerate(batches):
        t = time.perf_counter()
        batch = rollout.sample(model, q.to(device), qm.to(device), eot_id=EOS_ID, pad_id=PAD_ID,
                               temperature=pc.temperature, top_p=pc.top_p, max_new_tokens=spec["max_new_tokens"])
        if cuda:
            torch.cuda.synchronize()
        if i >= spec["rollout_warmup"]:
            seconds += time.perf_counter() - t
            tokens = int(batch.mask.sum())
            generated += tokens
            ctx.append((q.shape[1] + batch.responses.shape[1] / 2, tokens))
    m = model_numbers(spec["model"])
    t_ctx = sum(c * k for c, k in ctx) / max(1, generated)
    res.update(seconds=seconds, tokens=generated, supervised=0, tokens_s=generated / seconds, supervised_s=None,
               flops_s=(2 * m["n_matmul"] + 4 * m["attn_coef"] * t_ctx) * generated / seconds, t_eff=t_ctx,
               mode="generate", rows_per_step=pc.batch_size, attn=spec["attn"])
    res["notes"].append(f"generated tokens/s over {spec['rollouts']} rollouts after {spec['rollout_warmup']} warm-up")
    if cuda:
        res["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        res["reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30


def arm_main(argv: list[str]) -> None:
    """In a fresh process: `_arm SPEC.json RESULT.json`."""
    spec = json.loads(Path(argv[0]).read_text())
    import torch

    torch.set_num_threads(spec["threads"])
    cuda = spec["device"] == "cuda"
    res = {"arm": spec["arm"], "model": spec["model"], "notes": []}
    try:
        reason = skip_reason(spec["arm"], cuda)
        if reason:
            res["skipped"] = reason
        elif spec["arm"] in SFT_ARMS:
            run_sft(spec, res, cuda)
        elif spec["arm"] in ("dpo", "dpo-precomputed"):
            run_dpo(spec, res, cuda)
        else:
            run_rollout(spec, res, cuda)
    except torch.OutOfMemoryError as e:
        res["error"] = f"out of memory (batch {spec['batch']}, seq {spec['seq']}): {str(e).splitlines()[0][:160]}"
        if cuda:
            res["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    except Exception as e:  # noqa: BLE001 - reported in the table, traceback in the arm's log
        import traceback

        traceback.print_exc()
        res["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
    Path(argv[1]).write_text(json.dumps(res))


def matmul_main(argv: list[str]) -> None:
    """In a fresh process: `_matmul DEVICE N REPS RESULT.json`: TFLOP/s of an N^3 matmul (bf16 on
    CUDA, fp32 on the CPU)."""
    import torch

    device, n, reps = argv[0], int(argv[1]), int(argv[2])
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(10):
        c = a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        c = a @ b  # noqa: F841
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    Path(argv[3]).write_text(json.dumps({"n": n, "reps": reps, "dtype": str(dtype).replace("torch.", ""),
                                         "tflops": 2 * n**3 * reps / seconds / 1e12}))


# --- the parent: arms in subprocesses, the table -------------------------------------------------

def child_env(args) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_CACHE=str(Path(args.workdir) / "hf-datasets-cache"), TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS=str(args.threads), BENCH_THREADS=str(args.threads), PYTHONUNBUFFERED="1",
               TQDM_DISABLE="1")
    if args.smoke:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def run_child(args, mode: str, argv: list[str], log: Path) -> tuple[int, float]:
    t = time.perf_counter()
    with log.open("w") as f:
        try:
            rc = subprocess.run([sys.executable, str(THIS), mode, *argv], env=child_env(args), cwd=ROOT, stdout=f,
                                stderr=subprocess.STDOUT, timeout=args.arm_timeout).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    return rc, time.perf_counter() - t


def tail(log: Path, n: int = 12) -> str:
    return "\n".join("    " + line for line in log.read_text(errors="replace").splitlines()[-n:])


def measure_matmul(args, cuda: bool) -> dict | None:
    work = Path(args.workdir)
    out = work / "matmul.json"
    out.unlink(missing_ok=True)
    n, reps = (8192, 200) if cuda else (1024, 5)
    rc, _ = run_child(args, "_matmul", ["cuda" if cuda else "cpu", str(n), str(reps), str(out)], work / "matmul.log")
    if rc or not out.exists():
        print(f"matmul measurement failed (exit {rc}):\n{tail(work / 'matmul.log')}")
        return None
    return json.loads(out.read_text())


def run_arm(args, arm: str, model: str, cuda: bool) -> dict:
    work = Path(args.workdir)
    tag = f"{model}-{arm}"
    spec = {"arm": arm, "model": model, "seq": args.seq, "batch": args.batch, "steps": args.steps,
            "warmup": args.warmup, "lr": args.lr, "seed": args.seed, "attn": args.attn,
            "dtype": "bfloat16" if cuda else "float32", "device": "cuda" if cuda else "cpu", "threads": args.threads,
            "workdir": str(work / "runs"), "max_new_tokens": args.max_new_tokens, "rollouts": args.rollouts,
            "rollout_warmup": 1}
    spec_path, out = work / f"{tag}.spec.json", work / f"{tag}.result.json"
    spec_path.write_text(json.dumps(spec))
    out.unlink(missing_ok=True)
    print(f"{model} {arm} ...", end=" ", flush=True)
    rc, wall = run_child(args, "_arm", [str(spec_path), str(out)], work / f"{tag}.log")
    res = json.loads(out.read_text()) if out.exists() else {"arm": arm, "model": model, "notes": []}
    if rc and "error" not in res:
        res["error"] = "timed out" if rc == 124 else f"the arm's process exited {rc}"
    res["wall_s"], res["log"] = wall, str(work / f"{tag}.log")
    if "error" in res:
        print(f"error ({wall:.0f} s): {res['error']}\n{tail(work / f'{tag}.log')}", flush=True)
    elif "skipped" in res:
        print(f"skipped: {res['skipped']}", flush=True)
    else:
        print(f"{res['tokens_s']:,.0f} tokens/s ({wall:.0f} s)", flush=True)
    return res


def mfu(res: dict, peak: float) -> str:
    return f"{100 * res['flops_s'] / peak:.1f}%" if peak and res.get("flops_s") else "-"


def notes_of(res: dict, model: str) -> str:
    if "skipped" in res:
        return f"skipped: {res['skipped']}"
    if "error" in res:
        return f"ERROR: {res['error']}"
    parts = []
    if res["mode"] == "padding-free":
        parts.append(f"padding-free, T={res['t_eff']:.0f} (own document), {res['docs_per_step']:.0f} docs/step")
    elif res["mode"] == "padded":
        parts.append(f"padded, T={res['t_eff']:.0f} (padded width), {100 * res['pad_fraction']:.0f}% pad")
    else:
        parts.append(f"T={res['t_eff']:.0f} (mean context)")
    if res.get("activation_checkpointing"):
        parts.append("act. ckpt")
    a = res.get("args", {})
    parts += [label for key, label in (("use_liger_kernel", "liger"), ("torch_compile", "compiled")) if a.get(key)]
    if a.get("optim") not in (None, "adamw_torch_fused"):
        parts.append(f"optim {a['optim']}")
    if res.get("attn"):
        parts.append(str(res["attn"]))
    return "; ".join(parts + res.get("notes", []))


def table(results: list[dict], info: dict, matmul: dict | None, trl_ref: dict) -> list[str]:
    measured = matmul["tflops"] * 1e12 if matmul else 0.0
    rows = ["| model | arm | tokens/s (non-pad) | supervised tokens/s | × trl-defaults | MFU vs 989 | "
            "MFU vs measured matmul | peak GiB | notes |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        ok = "error" not in r and "skipped" not in r
        ref = trl_ref.get(r["model"])
        ratio = f"{r['tokens_s'] / ref:.2f}" if ok and ref and r["arm"] in SFT_ARMS else "-"
        tok = f"{r['tokens_s']:,.0f}" if ok else "-"
        sup = f"{r['supervised_s']:,.0f}" if ok and r.get("supervised_s") is not None else "-"
        peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else "-"
        rows.append(f"| {r['model']} | {r['arm']} | {tok} | {sup} | {ratio} | {mfu(r, info['peak']) if ok else '-'} | "
                    f"{mfu(r, measured) if ok else '-'} | {peak} | {notes_of(r, r['model'])} |")
    return rows


def check_targets(args, cuda: bool, info: dict, matmul: dict | None, done: dict) -> list[str]:
    """The issue's three targets, measured (reusing runs of this job) and marked met/missed."""
    def get(model: str, arm: str) -> dict:
        model = "tiny" if args.smoke else model
        if (model, arm) not in done:
            done[(model, arm)] = run_arm(args, arm, model, cuda)
        return done[(model, arm)]

    def ok(r: dict) -> bool:
        return "error" not in r and "skipped" not in r

    def verdict(met: bool) -> str:
        return "- (smoke: not the target's model or device)" if args.smoke else "met" if met else "missed"

    lines = ["| target | measured | result |", "|---|---|---|"]
    trl, post = get("smollm2-360m", "trl-defaults"), get("smollm2-360m", "posttrain-defaults")
    if ok(trl) and ok(post):
        ratio = post["tokens_s"] / trl["tokens_s"]
        lines.append(f"| posttrain-defaults ≥ 1.5× trl-defaults tokens/s, smollm2-360m | {ratio:.2f}× "
                     f"({post['tokens_s']:,.0f} vs {trl['tokens_s']:,.0f} tokens/s) | "
                     f"{verdict(ratio >= 1.5)} |")
    else:
        lines.append(f"| posttrain-defaults ≥ 1.5× trl-defaults tokens/s, smollm2-360m | not measured: "
                     f"{notes_of(trl if not ok(trl) else post, 'smollm2-360m')} | - |")
    full = get("llama-3.2-1b", "posttrain-defaults")
    if ok(full):
        measured = matmul["tflops"] * 1e12 if matmul else 0.0
        vs_peak = full["flops_s"] / info["peak"] if info["peak"] else None
        text = (f"{100 * vs_peak:.1f}% of 989 TFLOP/s" if vs_peak is not None else "peak unknown") + \
            (f", {100 * full['flops_s'] / measured:.1f}% of the measured matmul" if measured else "")
        result = verdict(vs_peak >= 0.40) if vs_peak is not None else "- (GPU peak unknown)"
        lines.append(f"| ≥ 40% MFU, full fine-tuning of llama-3.2-1b (posttrain-defaults) | {text} | {result} |")
    else:
        lines.append(f"| ≥ 40% MFU, full fine-tuning of llama-3.2-1b (posttrain-defaults) | not measured: "
                     f"{notes_of(full, 'llama-3.2-1b')} | - |")
    q = get("llama-3.1-8b", "posttrain-qlora")
    if ok(q) and q.get("peak_gib") is not None:
        lines.append(f"| QLoRA of llama-3.1-8b under 24 GB peak (posttrain-qlora, batch {args.batch}, "
                     f"seq {args.seq}) | "
                     f"{q['peak_gib']:.1f} GiB allocated ({q['reserved_gib']:.1f} GiB reserved) | "
                     f"{verdict(q['peak_gib'] < 24)} |")
    else:
        lines.append(f"| QLoRA of llama-3.1-8b under 24 GB peak (posttrain-qlora) | not measured: "
                     f"{notes_of(q, 'llama-3.1-8b') if not ok(q) else 'no CUDA memory counter'} | - |")
    return lines


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("_arm", "_matmul"):  # internal: one measurement, fresh process
        {"_arm": arm_main, "_matmul": matmul_main}[sys.argv[1]](sys.argv[2:])
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("arms", nargs="*", metavar="ARM", help=f"arms to run (default: all): {', '.join(ARMS)}")
    p.add_argument("--model", choices=[m for m in MODELS if m != "tiny"], default="smollm2-360m")
    p.add_argument("--seq", type=int, help="longest sequence, --max_length of every arm (default 2048; smoke 128)")
    p.add_argument("--steps", type=int, help="timed optimizer steps (default 20; smoke 3)")
    p.add_argument("--warmup", type=int, help="untimed steps first, compile included (default 5; smoke 1; >= 1)")
    p.add_argument("--batch", type=int, help="per-device batch in sequences, every arm (default 8; smoke 4)")
    p.add_argument("--lr", type=float, default=2e-5, help="learning rate, every arm (TRL's SFT default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flash_attention_2", "flash_attention_3",
                                                      "flex_attention"],
                   help="attention kernel of every arm (sdpa: transformers' default, what TRL and posttrain load)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="ppo-rollout generation budget")
    p.add_argument("--rollouts", type=int, default=3, help="timed ppo-rollout generate calls (after 1 warm-up)")
    p.add_argument("--smoke", action="store_true", help="every arm on the CPU, tiny model: exercises the script")
    p.add_argument("--check-targets", action="store_true",
                   help="also measure and print the issue's three targets (runs what they need)")
    p.add_argument("--threads", type=int, help="torch / OMP threads of the arms (default 1 with --smoke: 2 threads on "
                   "a busy 2-core machine made the tiny steps erratic; else 8)")
    p.add_argument("--arm-timeout", type=int, default=1800, help="seconds before an arm is stopped")
    p.add_argument("--workdir", default="/tmp/posttrain-bench-gpu")
    args = p.parse_args()
    bad = [a for a in args.arms if a not in ARMS]
    if bad:
        p.error(f"unknown arm(s) {bad}; choose from {', '.join(ARMS)}")
    defaults = {"seq": (128, 2048), "steps": (3, 20), "warmup": (1, 5), "batch": (4, 8),
                "threads": (1, min(8, os.cpu_count() or 8))}
    for k, (smoke, real) in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, smoke if args.smoke else real)
    args.warmup = max(1, args.warmup)
    needs = {"flash_attention_2": ("flash_attn",), "flash_attention_3": ("flash_attn_interface", "flash_attn_3")}
    if args.attn in needs and not any(util.find_spec(m) for m in needs[args.attn]):
        p.error(f"--attn {args.attn} needs {' or '.join(needs[args.attn])}, which is not importable")
    Path(args.workdir).mkdir(parents=True, exist_ok=True)

    info = machine(args)
    cuda = info["gpu"] is not None
    model = "tiny" if args.smoke else args.model
    lines = header(args, info)
    print("\n".join(lines))
    m = model_numbers(model)
    setup = (f"model      {model} (random init, LlamaConfig: hidden {m['hidden']}, layers {m['layers']}, heads "
             f"{m['heads']}/{m['kv_heads']}, ffn {m['ffn']}, vocab {m['vocab']}, {'tied' if m['tied'] else 'untied'}; "
             f"{m['n_total'] / 1e6:,.1f}M parameters, N = {m['n_matmul'] / 1e6:,.1f}M matmul incl. LM head), "
             f"{'bf16' if cuda else 'fp32 (CPU)'}, attention {args.attn}")
    run_line = (f"arms       seq {args.seq}, per-device batch {args.batch} sequences, lr {args.lr:g}, "
                f"seed {args.seed}, "
                f"{args.warmup} warm-up + {args.steps} timed steps; data: log-normal lengths (median seq/4) in "
                f"[{min(64, args.seq // 4)}, {args.seq}], 10-50% prompt outside the loss; every TRL arm: "
                "save_strategy no, report_to none, disable_tqdm")
    print(setup)
    print(run_line)
    if args.smoke:
        print("smoke      CPU, tiny model: checks that every arm runs end to end; the numbers mean nothing")
    elif not cuda and (args.arms or not args.check_targets):
        print("note       no GPU: the arms run on the CPU in fp32 (slow, and not what this benchmark is for); "
              "--smoke for a quick check of the script")
    if args.attn == "sdpa" and (not args.arms or {"packing", "padding-free"} & set(args.arms)):
        print("note       sdpa has no varlen kernel: packing / padding-free run one flattened row with a "
              "block-diagonal mask (dense attention over the whole row); --attn flash_attention_2 or flex_attention "
              "gives the intended kernels")
    matmul = measure_matmul(args, cuda)
    if matmul:
        print(f"matmul     {matmul['n']}^3 {matmul['dtype']} x {matmul['reps']}: {matmul['tflops']:.3g} TFLOP/s"
              + (f" ({100 * matmul['tflops'] * 1e12 / info['peak']:.0f}% of 989)" if info["peak"] else ""))
    print(flush=True)

    done: dict = {}
    results = []
    if args.arms or not args.check_targets:
        for arm in args.arms or ARMS:
            res = run_arm(args, arm, model, cuda)
            done[(model, arm)] = res
            results.append(res)
    target_lines = check_targets(args, cuda, info, matmul, done) if args.check_targets and (cuda or args.smoke) \
        else None
    results = list(done.values())
    trl_ref = {r["model"]: r["tokens_s"] for r in results
               if r["arm"] == "trl-defaults" and "error" not in r and "skipped" not in r}

    rows = table(results, info, matmul, trl_ref) if results else []
    print("\n" + "\n".join(rows or ["no arm ran"]))
    print("\ntokens/s: non-pad tokens the collator produced in the timed window / its wall time (step end to step end, "
          "synchronized); supervised: tokens in the loss (shifted labels != -100; DPO: completion tokens; "
          "ppo-rollout: generated tokens, no loss). × trl-defaults: tokens/s over trl-defaults' (SFT arms). "
          "MFU: model FLOPs of the non-pad tokens (see the docstring) per second over the peak; "
          "peak GiB: torch.cuda.max_memory_allocated since train begin (allocator reserve and CUDA context come on "
          "top).")
    post = next((r for r in results if r["arm"] == "posttrain-defaults" and "args" in r), None)
    trl = next((r for r in results if r["arm"] == "trl-defaults" and "args" in r), None)
    if post and trl:
        skip = {"output_dir", "logging_dir", "run_name"}
        diff = {k: v for k, v in post["args"].items() if k not in skip and trl["args"].get(k) != v}
        print("\nposttrain-defaults vs trl-defaults, SFTConfig fields that differ: " +
              (", ".join(f"{k}={v!r} (TRL: {trl['args'].get(k)!r})" for k, v in sorted(diff.items())) or "none"))
    if target_lines:
        print("\ntargets" + (" (smoke: tiny CPU model, not the targets' models: only the code path)" if args.smoke
                             else "") + ":\n" + "\n".join(target_lines))
    elif args.check_targets:
        print("\ntargets: not measured, they need a GPU (or --smoke to exercise the code path)")

    print("\nmarkdown for docs/benchmarks.md:\n")
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    where = f"{info['gpu']} x {info['gpus']}" if cuda else "CPU smoke run"
    md = [f"### GPU throughput ({where}), {when}, commit {_commit()}", "", "```", *lines, setup, run_line]
    if matmul:
        md.append(f"matmul     {matmul['n']}^3 {matmul['dtype']}: {matmul['tflops']:.3g} TFLOP/s")
    md += ["```", "", *rows]
    if target_lines:
        md += ["", "Targets:", "", *target_lines]
    print("\n".join(md))


if __name__ == "__main__":
    sys.exit(main())
