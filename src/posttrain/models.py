"""Loading tokenizers and models: the chat template and special tokens, the pad token, full /
LoRA / QLoRA models, and the checks that belong to loading (safeguards #3, #10, #15, #19).

Heavy imports stay inside the functions so that `posttrain --help` and `validate` stay instant.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from posttrain import launch, templates
from posttrain.config import Config
from posttrain.console import console
from posttrain.errors import PosttrainError
from posttrain.sections import LoraConfig

log = logging.getLogger("posttrain")


@dataclass
class TokenizerInfo:
    tokenizer: object
    template: str
    eot_id: int
    added_tokens: list[str]  # special tokens posttrain added (the vocabulary grew)
    template_hash: str


def local(source: str) -> str:
    """What from_pretrained loads for `source`: a `.gguf` file's converted directory (converted on
    first use, posttrain.gguf), anything else as it is."""
    from posttrain import gguf

    return gguf.resolve(source)


def _check_source(source: str, what: str) -> str:
    """Fail early on a local path that does not exist (instead of a Hub 404 deep in transformers).
    Returns what to load (`local(source)`)."""
    from posttrain import gguf

    if gguf.is_gguf(source):
        return local(source)
    p = Path(source)
    looks_local = source.startswith((".", "/", "~")) or p.exists() or source.count("/") > 1
    if looks_local and not p.expanduser().exists():
        raise PosttrainError(f"{what} path '{source}' does not exist", fix="check model.name_or_path or --base")
    if p.is_dir() and not (p / "config.json").exists() and not (p / "tokenizer_config.json").exists() \
            and not (p / "adapter_config.json").exists():
        raise PosttrainError(
            f"{what} directory '{source}' holds no model (no config.json)",
            fix="point to a model directory, a finished stage directory or a .gguf file",
        )
    return source


PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
_warned_remote_code: set[str] = set()


def check_weights(cfg: Config, source: str) -> None:
    """Safetensors only, unless model.allow_pickle_weights: a local model whose weights are all
    pickle files is refused before anything is unpickled (Hub models: from_pretrained is told
    use_safetensors, see load_kwargs)."""
    p = Path(source)
    if cfg.model.allow_pickle_weights or not p.is_dir() or any(p.glob("*.safetensors")):
        return
    pickled = sorted(f.name for pattern in PICKLE_WEIGHTS for f in p.glob(pattern) if f.name != "training_args.bin")
    if pickled:
        raise PosttrainError(
            f"'{source}' holds its weights only as pickle ({', '.join(pickled[:3])}); unpickling can run code",
            fix="convert them to safetensors (save_pretrained(..., safe_serialization=True)), or set "
                "model.allow_pickle_weights: true if you trust where they came from")


def warn_remote_code(cfg: Config, source: str) -> None:
    if cfg.model.trust_remote_code and source not in _warned_remote_code:
        _warned_remote_code.add(source)
        console.print(f"[yellow]warning[/] model.trust_remote_code is on: Python code from '{source}' runs on this "
                      "machine with your permissions; turn it off unless you trust that repository", soft_wrap=True)


def _hub_error(source: str, e: Exception) -> PosttrainError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return PosttrainError(
        f"could not load '{source}': {first}",
        fix="if it is a Hub id and this machine is offline, download it where there is network and "
        "set model.name_or_path to the local directory",
    )


def load_tokenizer(cfg: Config, source: str | None = None, *, need_masks: bool = True) -> TokenizerInfo:
    """Load the tokenizer, install the chat template, check its tokens, and fix the pad token."""
    from transformers import AutoTokenizer

    source = source or cfg.model.tokenizer or cfg.model.name_or_path
    source = _check_source(source, "tokenizer")
    warn_remote_code(cfg, source)
    try:
        tok = AutoTokenizer.from_pretrained(
            source, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise _hub_error(source, e) from None

    template = templates.resolve(cfg.template.name, tok.chat_template, tok.get_vocab)
    added = _ensure_tokens(tok, templates.required_tokens(template), cfg.template.add_special_tokens)
    if need_masks and not templates.has_generation_markers(template):
        template = _training_template(tok, template)
    tok.chat_template = template
    eot_id = templates.end_of_turn_id(tok, template)
    _set_pad(tok, cfg.model.pad_token, eot_id)
    return TokenizerInfo(tok, template, eot_id, added, templates.template_hash(tok, template))


def _ensure_tokens(tok, required: list[str], may_add: bool) -> list[str]:
    vocab = tok.get_vocab()
    missing = [t for t in required if t not in vocab]
    if missing and not may_add:
        fits = templates.suggest(vocab)
        own = (f"template.name: {fits}, the built-in made of this tokenizer's tokens" if fits
               else "template.name: tokenizer" if tok.chat_template else None)
        raise PosttrainError(
            f"the tokenizer has no token for {', '.join(missing)}, which the chat template needs",
            fix="set template.add_special_tokens: true (grows the vocabulary; embeddings get trained)"
            + (f" or use {own}" if own else ""),
        )
    if missing:
        tok.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
        log.warning("added %d special tokens to the tokenizer: %s", len(missing), ", ".join(missing))
    return missing


def _training_template(tok, template: str) -> str:
    """A template without {% generation %} markers can't give assistant-only masks. When it renders
    exactly like a built-in (SmolLM2's ChatML, which adds a default system prompt), use that built-in
    (with the default system prompt); otherwise try TRL's patch for the templates it knows."""
    from trl.chat_template_utils import get_training_chat_template

    same = templates.builtin_equivalent(tok, template)
    if same is not None:
        log.info("chat template: the tokenizer's renders like the built-in %s; using it with generation markers",
                 same[0])
        return same[1]
    tok.chat_template = template
    try:
        patched = get_training_chat_template(tok)
    except ValueError:
        patched = None
    if not patched:
        fits = templates.suggest(tok.get_vocab())
        raise PosttrainError(
            "the chat template has no {% generation %} markers, so assistant-only loss cannot be masked",
            fix=f"use template.name: {fits or 'chatml'}, add the markers to your .jinja file, or set "
            "sft.assistant_only_loss: false",
        )
    return patched


def _set_pad(tok, configured: str | None, eot_id: int) -> None:
    """Safeguard #3: the pad token must not be eos or the end-of-turn token (it masks them out)."""
    forbidden = {tok.eos_token_id, eot_id}
    if configured is not None:
        if configured not in tok.get_vocab():
            raise PosttrainError(f"model.pad_token '{configured}' is not in the tokenizer's vocabulary")
        if tok.convert_tokens_to_ids(configured) in forbidden:
            raise PosttrainError(
                f"model.pad_token '{configured}' is the eos or end-of-turn token; padding would mask it "
                "out of the labels and the model would never learn to stop",
                fix="choose a distinct pad token (or leave model.pad_token unset to let posttrain pick one)",
            )
        tok.pad_token = configured
        return
    if tok.pad_token_id is not None and tok.pad_token_id not in forbidden:
        return
    used = {tok.bos_token_id, tok.unk_token_id, *forbidden}
    in_template = set(tok.convert_tokens_to_ids(templates.required_tokens(tok.chat_template or "")))
    for tid, added in sorted(tok.added_tokens_decoder.items()):
        if added.special and tid not in used and tid not in in_template:
            log.info("pad token: using %r (id %d); the tokenizer's pad was %r", added.content, tid, tok.pad_token)
            tok.pad_token = added.content
            return
    raise PosttrainError(
        f"the tokenizer's pad token is {tok.pad_token!r}, the same as eos/end-of-turn, and it has no spare "
        "special token to pad with",
        fix="set model.pad_token to a token distinct from eos",
    )


# ---------------------------------------------------------------------------------------------
# Models


def torch_dtype(name: str):
    import torch

    if name == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, name)


def adapter_base(source: str) -> str | None:
    """For a LoRA adapter directory, the model it was trained on top of (a `.gguf` base as its
    converted directory); None for anything else.

    A posttrain stage records it in its manifest (`adapter_base`); other adapters name it in
    adapter_config.json.
    """
    import json

    from posttrain import manifest

    p = Path(source)
    if not (p / "adapter_config.json").is_file() or (p / "config.json").is_file():
        return None
    recorded = (manifest.read(p) or {}).get("adapter_base")
    if recorded:
        return local(recorded)
    base = json.loads((p / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise PosttrainError(f"adapter '{source}' does not name its base model",
                             fix="set base_model_name_or_path in its adapter_config.json")
    return local(base)


def _adapter_and_base(cfg: Config, source: str) -> tuple[str | None, str]:
    """(the adapter, the model under it) for a LoRA adapter directory, else (None, the model); the
    model checked to exist and to hold safe weights."""
    source = _check_source(source, "model")
    under = adapter_base(source)
    adapter, source = (source, under) if under else (None, source)
    if adapter:
        source = _check_source(source, f"base model of adapter '{adapter}'")
    check_weights(cfg, source)
    return adapter, source


def load_causal_lm(cfg: Config, source: str, method: str, lora: LoraConfig, tok: TokenizerInfo,
                   *, wrap: bool = True):
    """Load the model for training: full weights, LoRA, or 4-bit QLoRA. Returns the (PEFT) model.

    `source` may be a LoRA adapter directory (an SFT stage trained with LoRA). Then the starting
    model is its base with the adapter applied: merged in memory for full training, or loaded
    trainable (training continues that adapter) for lora/qlora. Either way training starts from
    the adapter's weights, never from the bare base. With `wrap=False` a new LoRA adapter is not
    applied (the caller hands `lora_config(...)` to the trainer instead); QLoRA's k-bit preparation
    is done either way. Full training in bf16/fp16 loads float32 master weights (`weights_dtype`).
    """
    from transformers import AutoModelForCausalLM

    adapter, source = _adapter_and_base(cfg, source)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **load_kwargs(cfg, method, master_weights=True))
    except (OSError, ValueError) as e:
        raise _hub_error(source, e) from None

    grew = len(tok.tokenizer) > model.get_input_embeddings().weight.shape[0]
    if grew:  # safeguard #15: new tokens need new (trained, saved) embedding rows
        model.resize_token_embeddings(len(tok.tokenizer))
    sync_special_ids(model, tok)
    if method == "qlora":
        disable_bnb_cpu_repack(model)
    if adapter:
        return _with_adapter(model, adapter, method)
    if method == "full":
        return model
    if not wrap:
        return prepare_kbit(model) if method == "qlora" else model
    return apply_lora(model, lora, quantized=method == "qlora", train_embeddings=grew)


def weights_dtype(cfg: Config, method: str, *, master_weights: bool = False):
    """The dtype a model's weights load in. model.dtype, except for full training with
    `master_weights` in bf16/fp16: then float32, and the trainer computes in the half dtype under
    autocast (trainer_precision). AdamW on bf16 weights loses the updates that are smaller than a
    weight's rounding step (2^-8 of its size): full SFT of the demo model at lr 1e-5 changed 15.5% of
    its matrix weights in 30 steps, against all of them in float32 (docs/benchmarks.md). Inference
    loads (eval) keep model.dtype: `master_weights` is for the training loaders. LoRA and
    QLoRA train float32 adapters on a frozen base, which keeps model.dtype."""
    import torch

    dtype = torch_dtype(cfg.model.dtype)
    return torch.float32 if master_weights and method == "full" else dtype


def trainer_precision(cfg: Config) -> dict:
    """The trainer's mixed-precision flags for model.dtype: bf16 autocast when the model computes in
    bf16 (on CPU too: accelerate autocasts there), fp16 autocast (with loss scaling) for float16 on
    CUDA. Empty when model.dtype is float32 (the device defaults decide). On CPU, float16 has no
    autocast in accelerate: a full fine-tune there computes in float32 on its float32 master weights."""
    import torch

    dtype = torch_dtype(cfg.model.dtype)
    if dtype == torch.bfloat16:
        return {"bf16": True, "fp16": False}
    if dtype == torch.float16 and torch.cuda.is_available():
        return {"bf16": False, "fp16": True}
    return {}


def load_kwargs(cfg: Config, method: str, *, master_weights: bool = False) -> dict:
    """from_pretrained arguments shared by every model posttrain trains: dtype (weights_dtype),
    revision, remote code, attention kernel, and 4-bit quantization (on the current GPU) for QLoRA."""
    import torch

    dtype = torch_dtype(cfg.model.dtype)
    kwargs = {"dtype": weights_dtype(cfg, method, master_weights=master_weights), "revision": cfg.model.revision,
              "trust_remote_code": cfg.model.trust_remote_code}
    if not cfg.model.allow_pickle_weights:
        kwargs["use_safetensors"] = True
    if impl := attention(cfg):
        kwargs["attn_implementation"] = impl
    if method == "qlora":
        kwargs["quantization_config"] = bnb_config(dtype)
        if torch.cuda.is_available() and not _sharded():
            # this process's GPU: under DDP each process loads its own copy there (the current device
            # is still GPU 0 in every process when the model loads, before the trainer sets it)
            kwargs["device_map"] = {"": launch.local_rank(torch.cuda.current_device())}
    return kwargs


def _sharded() -> bool:
    """FSDP or DeepSpeed ZeRO-3 (accelerate's launch environment): they place and shard the weights
    themselves, so a QLoRA base gets no device_map."""
    launched = launch.environment()
    return launched.use_fsdp or launched.zero_stage == "3"


VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3")  # kernels that take packed rows as they are


def attention(cfg: Config) -> str | None:
    """The attention implementation models load with: model.attn_implementation, else flash
    attention 2 on a GPU with 16-bit weights when flash-attn is installed, else None
    (transformers' choice, sdpa)."""
    if cfg.model.attn_implementation:
        return cfg.model.attn_implementation
    import importlib.util

    import torch

    if torch.cuda.is_available() and torch_dtype(cfg.model.dtype) != torch.float32 \
            and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return None


def load_sequence_classifier(cfg: Config, source: str, method: str, lora: LoraConfig, tok: TokenizerInfo):
    """A reward (or value) model for training: the causal LM at `source` with a one-output `score`
    head instead of the LM head. Full, LoRA (the head stays trainable and is saved with the
    adapter, safeguard #9) or QLoRA.

    `source` may be a LoRA adapter directory (an SFT stage trained with LoRA/QLoRA). Then the model
    is its base with that adapter applied, as `load_causal_lm` does for a policy: merged in memory
    for full training; loaded trainable and continued (plus the new head) for lora/qlora, so that
    the adapter saved sits on the same base as the SFT adapter, the one the manifest's adapter_base
    and adapter_config.json name, and reloads to the scores it trained to. (A new adapter on top of
    the SFT adapter merged in memory would be saved without the SFT part: reloaded on that base it
    scores differently.) The reward stage's `lora:` settings apply only to a new adapter."""
    from transformers import AutoModelForSequenceClassification

    adapter, source = _adapter_and_base(cfg, source)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            source, num_labels=1, **load_kwargs(cfg, method, master_weights=True))
    except (OSError, ValueError) as e:
        raise _hub_error(source, e) from None
    grew = len(tok.tokenizer) > model.get_input_embeddings().weight.shape[0]
    if grew:
        model.resize_token_embeddings(len(tok.tokenizer))
    model.config.pad_token_id = tok.tokenizer.pad_token_id  # the score is read at the last non-pad token
    if method == "qlora":
        disable_bnb_cpu_repack(model)
        model = prepare_kbit(model)
    if adapter:
        return _classifier_with_adapter(model, adapter, method)
    if method == "full":
        return model
    from peft import get_peft_model

    return get_peft_model(model, lora_config(model, lora, train_embeddings=grew, task_type="SEQ_CLS"))


def _classifier_with_adapter(model, adapter: str, method: str):
    """A causal-LM LoRA adapter (SFT) applied to the sequence classifier made from its base: merged
    (full training) or trainable, with the new `score` head added to the modules it trains and
    saves. Every LoRA weight of the adapter must land in the model (the classifier's body has the
    causal LM's module names); otherwise the reward model would start from the bare base, in silence."""
    from peft import PeftConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    file = Path(adapter) / "adapter_model.safetensors"
    if not file.is_file():
        raise PosttrainError(f"'{adapter}' has no adapter_model.safetensors",
                             fix="point to a finished LoRA stage, or merge the adapter (posttrain merge) first")
    config = PeftConfig.from_pretrained(adapter)
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    config.task_type = "SEQ_CLS"  # PEFT adds the head (score) to modules_to_save
    config.modules_to_save = [m for m in config.modules_to_save or [] if m in names] or None  # no lm_head here
    config.inference_mode = False
    peft_model = get_peft_model(model, config)
    current = get_peft_model_state_dict(peft_model)  # the new head and a fresh adapter, in the saved key format
    saved = load_file(str(file))
    unplaced = sorted(k for k in saved if k not in current and "lora_" in k)
    if unplaced or not any("lora_" in k for k in saved):
        what = f"{len(unplaced)} of its LoRA weights match no module, e.g. '{unplaced[0]}'" if unplaced \
            else "it holds no LoRA weights"
        raise PosttrainError(f"the LoRA adapter '{adapter}' does not fit a sequence classifier made from its base "
                             f"({what})",
                             fix="merge the adapter first (posttrain merge) and start the reward model from that")
    set_peft_model_state_dict(peft_model, {**current, **{k: v for k, v in saved.items() if k in current}})
    if method == "full":  # merge_and_unload leaves every parameter frozen: full training needs them trainable
        return peft_model.merge_and_unload().requires_grad_(True)
    return peft_model


def prepare_kbit(model):
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def _with_adapter(model, adapter: str, method: str):
    """Apply a trained adapter: merged into the weights (full training) or kept trainable."""
    from peft import PeftModel

    if method == "full":  # merge_and_unload leaves every parameter frozen: full training needs them trainable
        return PeftModel.from_pretrained(model, adapter).merge_and_unload().requires_grad_(True)
    if method == "qlora":
        model = prepare_kbit(model)
    return PeftModel.from_pretrained(model, adapter, is_trainable=True)


def sync_special_ids(model, tok: TokenizerInfo) -> None:
    """Model and generation config agree with the tokenizer; generation stops at end-of-turn (#16)."""
    t = tok.tokenizer
    model.config.pad_token_id = t.pad_token_id
    gc = model.generation_config
    gc.pad_token_id = t.pad_token_id
    eos = [tok.eot_id] + [i for i in [t.eos_token_id] if i is not None and i != tok.eot_id]
    gc.eos_token_id = eos if len(eos) > 1 else eos[0]


GENERATION_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


def bare_generation_config(generation_config):
    """A GenerationConfig with only the token ids of `generation_config`: no sampling setting."""
    from transformers import GenerationConfig

    return GenerationConfig(**{k: getattr(generation_config, k, None) for k in GENERATION_IDS})


def weights_mb(*modules) -> float:
    """MB of the parameters and buffers of these models, each tensor counted once (a shared base or
    a tied head is one tensor): what they hold resident, whatever their computation adds on top."""
    seen, total = set(), 0
    for m in modules:
        if m is None:
            continue
        for t in [*m.parameters(), *m.buffers()]:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total / 2**20


@contextmanager
def own_sampling(model):
    """Within this block, generate() samples only with the settings posttrain passes it.

    transformers fills every generation setting a call does not give from
    `model.generation_config`, even when the call passes a whole GenerationConfig (5.23:
    GenerationMixin._prepare_generation_config). A checkpoint's generation_config.json (copied into
    every stage output) may set repetition_penalty, min_p, top_k, no_repeat_ngram_size, ...: they
    would change the distribution PPO samples from without changing the one it computes, and
    make eval's decodings depend on the checkpoint. Here the model's generation config holds only
    its token ids; it is put back afterwards (the saved output keeps the parent's defaults)."""
    inner = model
    while hasattr(inner, "get_base_model"):  # PEFT wrappers generate with the model inside
        inner = inner.get_base_model()
    inner = getattr(inner, "module", inner)  # DDP
    saved = inner.generation_config
    inner.generation_config = bare_generation_config(saved)
    try:
        yield inner.generation_config
    finally:
        inner.generation_config = saved


def bnb_config(dtype):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=dtype,  # safeguard #22: sharding needs storage == compute dtype
    )


def disable_bnb_cpu_repack(model) -> int:
    """Guard against the bitsandbytes 0.50 CPU repack bug.

    On CPUs with AVX512-BF16, the first eval-mode, no-grad forward through a `Linear4bit` repacks
    its weights into a CPU-only layout (`support_avx512bf16_for_cpu`); backward passes through the
    repacked layer afterwards give wrong gradients, silently. Evaluation during QLoRA training
    (eval_on_start, periodic eval) triggers it. Turning the flag off keeps the training layout.
    Returns how many layers were guarded.
    """
    import bitsandbytes as bnb

    n = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


def apply_lora(model, lora: LoraConfig, *, quantized: bool, train_embeddings: bool):
    """Wrap `model` with a LoRA adapter; every target pattern must match a module (#19)."""
    from peft import get_peft_model

    if quantized:
        model = prepare_kbit(model)
    return get_peft_model(model, lora_config(model, lora, train_embeddings=train_embeddings))


def _linear_names(model) -> list[str]:
    """The last name part of every linear layer (what LoRA can target), e.g. q_proj, lm_head."""
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                   if n and type(m).__name__ in ("Linear", "Linear4bit", "Linear8bitLt", "Conv1D")})


def lora_config(model, lora: LoraConfig, *, train_embeddings: bool, task_type: str = "CAUSAL_LM"):
    """PEFT's LoraConfig for `model`; every target pattern must match a module (#19)."""
    from peft import LoraConfig as PeftLoraConfig

    names = [n for n, _ in model.named_modules()]
    if lora.target_modules != "all-linear":
        unmatched = [p for p in lora.target_modules if not any(n == p or n.endswith("." + p) for n in names)]
        if unmatched:
            raise PosttrainError(
                f"lora.target_modules {unmatched} match no module of the model",
                fix=f"the linear layers here are named {_linear_names(model)}",
            )
    to_save = list(lora.modules_to_save)
    if train_embeddings:
        to_save += [m for m in ("embed_tokens", "lm_head") if m not in to_save and m in {n.rsplit(".", 1)[-1]
                                                                                           for n in names}]
    if task_type == "SEQ_CLS" and "score" not in to_save:
        to_save.append("score")  # the new head is trained in full and saved with the adapter
    return PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        modules_to_save=to_save or None,
        task_type=task_type,
    )


def trainable_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def check_packing(model) -> None:
    """Safeguard #27, on the model as loaded: packed conversations must not see each other.

    TRL's packing (bfd) and padding-free batches put several conversations in one row and mark
    where each starts only through the position ids (no attention mask); transformers turns those
    into a block-diagonal causal mask, for eager, sdpa and flash attention alike. A model whose
    attention ignores position ids (custom remote code, some kernels) would let each conversation
    attend to the ones packed before it, silently. Two random sequences, the second alone and
    packed after the first: its logits must agree.
    """
    import torch

    weight = model.get_input_embeddings().weight
    if weight.is_meta or weight.numel() == 0 or type(weight).__name__ == "DTensor":
        return  # sharded (FSDP2, ZeRO-3): a forward needs every process; the packed run itself shows it
    g = torch.Generator().manual_seed(0)
    vocab = weight.shape[0]
    first, second = torch.randint(0, vocab, (1, 7), generator=g), torch.randint(0, vocab, (1, 5), generator=g)
    device = weight.device
    positions = torch.cat([torch.arange(7), torch.arange(5)]).unsqueeze(0)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            # without a KV cache, as the trainers call it: with one, transformers skips the
            # packed-sequence detection (and the conversations do mix)
            alone = model(input_ids=second.to(device), use_cache=False).logits.float()
            packed = model(input_ids=torch.cat([first, second], 1).to(device), position_ids=positions.to(device),
                           use_cache=False).logits[:, 7:].float()
    finally:
        model.train(was_training)
    diff = (alone - packed).abs().max().item()
    scale = alone.abs().max().item()
    dtype = weight.dtype
    tolerance = (1e-4 if dtype == torch.float32 else 3e-2) * max(1.0, scale)
    if not diff <= tolerance:
        impl = getattr(model.config, "_attn_implementation", None) or "this model's"
        raise PosttrainError(
            f"packing: with {impl} attention a conversation packed after another sees it (its logits change by "
            f"{diff:.3g}), so packed training would mix conversations",
            fix="set sft.training.packing: false (and padding_free: false), or model.attn_implementation: sdpa or "
            "flash_attention_2",
        )
