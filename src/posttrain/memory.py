"""Memory: what a training stage holds on its device at its fullest, estimated from the model's
config.json and the stage's settings before any weights load, and the one-line warning that names
the cheapest change that makes it fit.

What is counted, per model in memory (bytes):
- weights: parameters × bytes of model.dtype (auto: bf16 on CUDA, else fp32). QLoRA: every linear
  layer but the head in nf4 with double quantization (0.5 byte + 1/64 for the 8-bit absmax per block
  of 64 + 4/16384 for the second-level absmax), and the rest in fp32, because
  peft.prepare_model_for_kbit_training casts every non-4-bit parameter to fp32.
- grads and optimizer, for trainable parameters only: torch's AdamW keeps both moments in the
  parameter's dtype (zeros_like) plus a 4-byte step counter per tensor. A full fine-tune in the TRL
  stages and in posttrain's PPO keeps float32 master weights in bf16/fp16 too (models.weights_dtype:
  the forwards autocast), so it costs 16 bytes per parameter in any dtype, and the frozen copy DPO
  and PPO keep as reference is float32 as well. LoRA adapters are fp32
  (PEFT upcasts adapters of 16-bit bases), except under QLoRA in the TRL stages, which cast them to bf16.
- activations, what autograd keeps for backward (fitted to the tensors transformers 5.23's
  LlamaDecoderLayer with sdpa saves, measured with saved_tensors_hooks): per token and layer
  (6a + 8)·hidden + 2a·kv_dim + 4a·intermediate + 4·heads + 8 bytes, a = activation bytes (the 8s
  are RMSNorm's fp32 upcasts, 4·heads the fp32 logsumexp). Eager attention adds 8·heads·seq (the
  scores). A frozen base keeps no inputs for its linears and norms, −(5·hidden + intermediate)·a,
  while each adapter keeps its input cast to the adapter dtype (or dropped out, with the dropout
  mask: 1 byte on CUDA, a float on CPU) and its rank-r output (within 3% measured; with fp32
  weights and no dropout, adapters share their layer's inputs, which this counts once per adapter:
  up to 20% high). Gradient checkpointing keeps only
  each layer's input (hidden·a) plus one layer recomputed in backward. QLoRA's hidden states are
  fp32 (fp32 embeddings and norms; bnb's Linear4bit returns its input's dtype), so a = 4 there.
  This is architecture-aware where Korthikanti et al. (2022)'s 34·hidden assumes a GPT MLP.
- logits: TRL 1.16's fused LM head (trl.kernels.chunked_logprob) never holds [tokens, vocab]: one
  4096 × 32768 tile, the saved final hidden states, their fp32 gradient, and the fp32 gradient of
  the head when it is trained. posttrain's PPO never holds them either (rl/logprobs.py): one chunk
  of CHUNK_TOKENS positions × vocab at a time, in the activation dtype and fp32 copies, twice under
  gradients, plus the hidden states it is computed from. Reward and value models have a 1-output
  head: no logits.
Not counted: frozen models' no-grad forwards (freed layer by layer), generation's KV cache (smaller
than the training activations of the same sequences), allocator fragmentation and CUDA workspaces;
sequences are taken at their longest (max_length).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

from posttrain import registry
from posttrain.config import Config
from posttrain.errors import PosttrainError

NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
# Positions whose full-vocabulary logits exist at once in rl/logprobs (Gemma-3: 128 × 262,144 × 4 bytes
# = 128 MB per fp32 copy); defined here, below rl/, so that the estimate can count it.
CHUNK_TOKENS = 128
FUSED_TILE = 4096 * 32768  # trl.kernels.chunked_logprob.TOKEN_CHUNK_SIZE × trl's _CHUNKED_LOGPROB_CHUNK_SIZE
ONLINE_PROMPT_TOKENS = 256  # TRL 1.16's GRPO/RLOO configs have no prompt limit: assume this many prompt tokens
TRL_BETA = {"rloo": 0.05, "grpo": 0.0}  # the configs' defaults: with beta 0 TRL loads no reference
FIXES = ("checkpointing", "batch", "reference", "lora", "qlora")  # least quality cost first


@dataclass(frozen=True)
class Module:
    name: str
    kind: str  # linear | head | score | other
    in_f: int  # weight dims (0 for 1-D weights); LoRA adds r·(in_f + out_f)
    out_f: int
    params: int
    tensors: int = 1


@dataclass(frozen=True)
class Arch:
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_dim: int
    vocab: int
    params: int  # unique parameters (tied embeddings once)
    tensors: int  # unique parameter tensors (AdamW keeps a step counter per tensor)
    modules: tuple[Module, ...]
    tied: bool = False  # the LM head shares the input embeddings' weight
    positions: int = 0  # max_position_embeddings

    def classifier(self) -> Arch:
        """The same body with a bias-free 1-output `score` head instead of the LM head
        (AutoModelForSequenceClassification, num_labels=1): a reward or value model."""
        head = [m for m in self.modules if m.kind == "head" and not self.tied]
        return replace(self, params=self.params - sum(m.params for m in head) + self.hidden,
                       tensors=self.tensors - sum(m.tensors for m in head) + 1,
                       modules=tuple(m for m in self.modules if m.kind != "head")
                       + (Module("score", "score", self.hidden, 1, self.hidden),))


@dataclass(frozen=True)
class Lora:
    r: int
    targets: tuple[str, ...] | str  # "all-linear" or module names
    dropout: float = 0.0
    modules_to_save: tuple[str, ...] = ()


@dataclass(frozen=True)
class Settings:
    """Everything the estimate depends on; the fixes are changes to these."""

    stage: str
    section: str  # the config section (control trains with sft's)
    arch: Arch
    method: str  # full | lora | qlora
    lora: Lora  # <section>.lora: a new adapter (and PPO's value adapter)
    adapter: Lora  # the adapter trained with lora/qlora: the continued one, else `lora`
    dtype: int  # bytes per weight (QLoRA: the compute dtype)
    act: int  # bytes per activation (2 with 16-bit weights or autocast)
    batch: int  # sequences per forward (PPO: per micro-batch), before DPO/reward's chosen + rejected
    accumulation: int
    seq: int  # tokens per sequence
    checkpointing: bool
    reference: str  # copy | adapter_disabled | precomputed | none
    continues_adapter: bool = False
    eager: bool = False
    mask: int = 1  # bytes per dropout-mask element
    completion: int = 0  # PPO: response tokens
    rollout: int = 0  # PPO: sequences per rollout
    ptx: int = 0  # PPO-ptx: tokens per SFT sequence
    rewards: tuple[tuple[Arch, bool], ...] = ()  # RL reward models: architecture, 4-bit
    value: Arch | None = None
    checkpointing_key: str = "gradient_checkpointing"


@dataclass
class Estimate:
    """What a stage holds at its fullest, per model in memory and part, in bytes."""

    stage: str
    parts: dict[str, dict[str, int]]  # model → weights | grads | optimizer | activations | logits → bytes
    settings: Settings

    @property
    def total(self) -> int:
        return sum(sum(p.values()) for p in self.parts.values())

    def groups(self) -> dict[str, int]:
        """Each model's weights, grads and optimizer, then everything the forward keeps."""
        out = {m: sum(v for k, v in p.items() if k not in ("activations", "logits")) for m, p in self.parts.items()}
        out["activations"] = sum(p.get("activations", 0) + p.get("logits", 0) for p in self.parts.values())
        return {k: v for k, v in out.items() if v}

    def lines(self) -> list[str]:
        cols = ("weights", "grads", "optimizer", "activations", "logits")
        rows = [f"{'':18}" + "".join(f"{c:>13}" for c in (*cols, "total"))]
        for model, p in self.parts.items():
            rows.append(f"{model:18}" + "".join(f"{_size(p[c]) if p.get(c) else '-':>13}" for c in cols)
                        + f"{_size(sum(p.values())):>13}")
        rows.append(f"{'total':18}" + " " * 13 * len(cols) + f"{_size(self.total):>13}")
        return rows


# ---------------------------------------------------------------------------------------------
# Architecture


def architecture(config, trust_remote_code: bool = False) -> Arch:
    """Parameters of the causal LM `config` describes, counted on the meta device (no memory, about
    30 ms for an 8B model once transformers has imported, exact for every architecture transformers
    can build); Llama-style formula when it can't be built here (remote code not allowed)."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (ValueError, ImportError, OSError, KeyError):
        return llama_architecture(config)
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    mods = []
    for name, m in model.named_modules():
        own = list(m.parameters(recurse=False))
        if not own:
            continue
        w = getattr(m, "weight", None)
        dims = (w.shape[1], w.shape[0]) if w is not None and w.dim() == 2 else (0, 0)
        if type(m).__name__ == "Conv1D":  # GPT-2 stores (in, out)
            dims = dims[::-1]
        kind = "head" if m is head else "linear" if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D" \
            else "other"
        mods.append(Module(name, kind, *dims, sum(p.numel() for p in own), len(own)))
    params = list(model.parameters())  # unique: a tied head is counted once
    tied = head is not None and head.weight is embed.weight
    return _arch(config, sum(p.numel() for p in params), len(params), mods, tied)


def llama_architecture(config) -> Arch:
    """The formula: Llama-style decoder (q/k/v/o, gated MLP, two RMSNorms per layer)."""
    t = config.get_text_config()
    h, inter, heads = t.hidden_size, _intermediate(t), t.num_attention_heads
    hd = getattr(t, "head_dim", None) or h // heads
    kv = (getattr(t, "num_key_value_heads", None) or heads) * hd
    ab, mb = int(bool(getattr(t, "attention_bias", False))), int(bool(getattr(t, "mlp_bias", False)))
    mods = [Module("model.embed_tokens", "other", h, t.vocab_size, t.vocab_size * h)]
    for i in range(t.num_hidden_layers):
        p = f"model.layers.{i}."
        for name, fin, fout, bias in (("self_attn.q_proj", h, heads * hd, ab), ("self_attn.k_proj", h, kv, ab),
                                      ("self_attn.v_proj", h, kv, ab), ("self_attn.o_proj", heads * hd, h, ab),
                                      ("mlp.gate_proj", h, inter, mb), ("mlp.up_proj", h, inter, mb),
                                      ("mlp.down_proj", inter, h, mb)):
            mods.append(Module(p + name, "linear", fin, fout, fin * fout + bias * fout, 1 + bias))
        mods += [Module(p + norm, "other", 0, 0, h) for norm in ("input_layernorm", "post_attention_layernorm")]
    mods.append(Module("model.norm", "other", 0, 0, h))
    tied = getattr(t, "tie_word_embeddings", getattr(config, "tie_word_embeddings", False))
    mods.append(Module("lm_head", "head", h, t.vocab_size, t.vocab_size * h))
    params = sum(m.params for m in mods) - (t.vocab_size * h if tied else 0)
    return _arch(config, params, sum(m.tensors for m in mods) - int(tied), mods, bool(tied))


def _arch(config, params: int, tensors: int, mods: list[Module], tied: bool) -> Arch:
    t = config.get_text_config()
    heads = t.num_attention_heads
    kv = (getattr(t, "num_key_value_heads", None) or heads) * (getattr(t, "head_dim", None) or t.hidden_size // heads)
    return Arch(t.hidden_size, t.num_hidden_layers, _intermediate(t), heads, kv, t.vocab_size, params, tensors,
                tuple(mods), tied, getattr(t, "max_position_embeddings", 0) or 0)


def _intermediate(t) -> int:
    return getattr(t, "intermediate_size", None) or getattr(t, "n_inner", None) or 4 * t.hidden_size


def targets(arch: Arch, lora: Lora) -> list[Module]:
    """The modules PEFT puts an adapter on: 'all-linear' is every linear layer but the LM head and
    the score head; a name matches a module named so or ending in '.name'."""
    if lora.targets == "all-linear":
        return [m for m in arch.modules if m.kind == "linear"]
    return [m for m in arch.modules if m.in_f and any(m.name == t or m.name.endswith("." + t) for t in lora.targets)]


def lora_parameters(arch: Arch, lora: Lora) -> int:
    """Adapter parameters: A (r × in) and B (out × r) on every targeted module."""
    return sum(lora.r * (m.in_f + m.out_f) for m in targets(arch, lora))


def _saved_copies(arch: Arch, lora: Lora) -> tuple[int, int]:
    """Parameters and tensors of modules_to_save: PEFT trains a full copy of each, by name suffix."""
    mods = [m for m in arch.modules if any(m.name.endswith(s) for s in lora.modules_to_save)]
    return sum(m.params for m in mods), sum(m.tensors for m in mods)


# ---------------------------------------------------------------------------------------------
# The estimate


def estimate(s: Settings) -> Estimate:
    """Bytes per model and part for these settings (see the module docstring for what and why)."""
    arch = s.arch.classifier() if s.stage == "reward" else s.arch
    adapter = None if s.method == "full" else _with_score(s.adapter) if s.stage == "reward" else s.adapter
    la = 2 if s.method == "qlora" and s.stage != "ppo" else 4  # TRL casts QLoRA adapters to bf16
    a = 4 if s.method == "qlora" else s.act
    n = s.batch * (2 if registry.STAGES[s.stage].data == "preference" else 1)  # chosen and rejected in one forward
    # full training: float32 master weights (models.weights_dtype), PPO's included
    trained = 4 if s.method == "full" else s.dtype
    policy = _trained(arch, s.method, adapter, trained, la)
    policy["activations"] = _activations(arch, n, s.seq, a, adapter, la, s.mask, s.checkpointing, s.eager)
    if s.ptx:
        policy["activations"] += _activations(arch, s.batch, s.ptx, a, adapter, la, s.mask, False, s.eager)
    policy["logits"] = _logits(s, arch, n, a)
    parts = {"policy": policy}
    if s.stage == "ppo":  # a frozen copy; a frozen copy of the SFT adapter; a new adapter is disabled instead
        ref = "model" if s.method == "full" else "adapter" if s.continues_adapter else None
    else:  # precomputed and adapter_disabled keep no reference; rloo/grpo: "copy" when beta > 0
        ref = None if s.reference != "copy" else "model" if s.method == "full" else "adapter"
    if ref == "model":  # a deep copy of the (master-weight) policy
        parts["reference"] = {"weights": arch.params * trained}
    elif ref == "adapter":  # a frozen copy of the adapter (TRL's "ref", PPO's "reference"); the base is shared
        parts["reference adapter"] = {"weights": lora_parameters(arch, s.adapter) * la}
    for i, (r, four_bit) in enumerate(s.rewards):
        c = r.classifier()
        q = sum(m.in_f * m.out_f for m in c.modules if m.kind == "linear")
        weights = math.ceil(q * NF4_BYTES) + (c.params - q) * s.dtype if four_bit else c.params * 4
        parts["reward model" + (f" {i + 1}" if len(s.rewards) > 1 else "")] = {"weights": weights}
    if s.value is not None:  # fp32 (full_precision=True), no autocast in posttrain's PPO
        c = s.value.classifier()
        vlora = None if s.method == "full" else _with_score(s.lora)
        value = _trained(c, "full" if vlora is None else "lora", vlora, 4, 4)
        value["activations"] = _activations(c, s.batch, s.seq, 4, vlora, 4, s.mask, False, s.eager)
        parts["value model"] = value
    return Estimate(s.stage, parts, s)


def _with_score(lora: Lora) -> Lora:
    """A classifier's adapter: posttrain (and PEFT, for SEQ_CLS) train the score head in full."""
    return lora if "score" in lora.modules_to_save else replace(lora, modules_to_save=(*lora.modules_to_save, "score"))


def _trained(arch: Arch, method: str, lora: Lora | None, dtype: int, la: int) -> dict[str, int]:
    if lora is None:
        count, size, tensors, weights = arch.params, dtype, arch.tensors, arch.params * dtype
    else:
        saved, saved_tensors = _saved_copies(arch, lora)
        count, size, tensors = lora_parameters(arch, lora) + saved, la, 2 * len(targets(arch, lora)) + saved_tensors
        q = sum(m.in_f * m.out_f for m in arch.modules if m.kind == "linear") if method == "qlora" else 0
        base = math.ceil(q * NF4_BYTES) + (arch.params - q) * 4 if method == "qlora" else arch.params * dtype
        weights = base + count * la
    return {"weights": weights, "grads": count * size, "optimizer": 2 * count * size + 4 * tensors}


def _activations(arch: Arch, n: int, seq: int, a: int, lora: Lora | None, la: int, mask: int,
                 checkpointing: bool, eager: bool) -> int:
    h, layers = arch.hidden, arch.layers
    layer = (6 * a + 8) * h + 2 * a * arch.kv_dim + 4 * a * arch.intermediate + 4 * arch.heads + 8
    layer += 8 * arch.heads * seq if eager else 0
    total = layers * layer
    if lora is not None:
        total -= layers * (5 * h + arch.intermediate) * a
        per_input = la + (mask if lora.dropout > 0 else 0)
        total += sum(m.in_f * per_input + lora.r * la for m in targets(arch, lora))
    outside = (2 * a + 4) * h  # the final norm and the head's input
    per_token = layers * h * a + total / layers + outside if checkpointing else total + outside
    return int(n * seq * per_token)


def _logits(s: Settings, arch: Arch, n: int, a: int) -> int:
    v, h = arch.vocab, arch.hidden
    if s.stage == "reward":
        return 0
    if s.stage == "ppo":
        # rl/logprobs: the LM head runs on CHUNK_TOKENS response (or PPO-ptx) positions at a time,
        # checkpointed under gradients, so one chunk's logits exist at once: in the activation dtype,
        # the temperature-scaled fp32 copy, log-softmax, exp and the entropy product, and in backward
        # their gradients; plus the body's hidden states at the response positions (+ ptx positions).
        m, r = s.batch, s.completion
        chunk = min(CHUNK_TOKENS or m * r, max(m * r, 1))
        return chunk * v * (a + 16) * 2 + (m * r + m * s.ptx) * h * (a + 4)
    tokens = n * s.seq
    return min(tokens * v, FUSED_TILE) * a + tokens * h * (a + 4) + (v * h * 4 if s.method == "full" else 0)


# ---------------------------------------------------------------------------------------------
# From posttrain's config


def estimate_stage(cfg: Config, stage: str, source: str, *, cuda: bool | None = None) -> Estimate:
    """The memory `stage` needs on one device, starting from `source` (a model directory, Hub id,
    posttrain stage directory or LoRA adapter), before any weights load. `cuda` None: this machine."""
    return estimate(stage_settings(cfg, stage, source, cuda=cuda))


def stage_settings(cfg: Config, stage: str, source: str, *, cuda: bool | None = None) -> Settings:
    from posttrain import lineage

    estimated = registry.names(launched=True)  # the training stages
    if stage not in estimated:
        raise PosttrainError(f"no memory estimate for stage '{stage}'", fix=f"one of: {', '.join(estimated)}")
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    section = registry.STAGES[stage].section
    sc = getattr(cfg, section)
    arch, adapter = _source_arch(cfg, source)
    if stage == "reward":  # an adapter start is merged first; the reward model gets a new adapter
        adapter = None
    lora = Lora(sc.lora.r, sc.lora.target_modules if isinstance(sc.lora.target_modules, str)
                else tuple(sc.lora.target_modules), sc.lora.dropout, tuple(sc.lora.modules_to_save))
    dtype = {"float32": 4, "bfloat16": 2, "float16": 2}.get(cfg.model.dtype, 2 if cuda else 4)
    common = dict(stage=stage, section=section, arch=arch, method=sc.method, lora=lora, adapter=adapter or lora,
                  dtype=dtype, continues_adapter=adapter is not None, eager=cfg.model.attn_implementation == "eager",
                  mask=1 if cuda else 4)  # CUDA's fused dropout keeps a bool mask, the CPU one a float tensor
    if stage == "ppo":
        pc = cfg.ppo
        rm = pc.reward_model or lineage.chain_reward_dir(cfg)
        reward = _reward_arch(cfg, rm, arch)
        return Settings(**common, act=dtype, batch=pc.mini_batch_size // pc.gradient_accumulation_steps,
                        accumulation=pc.gradient_accumulation_steps, seq=pc.max_prompt_length + pc.max_new_tokens,
                        checkpointing=False, reference="none", completion=pc.max_new_tokens, rollout=pc.batch_size,
                        ptx=(cfg.sft.training.get("max_length") or 1024) if pc.ptx_coef > 0 else 0,
                        rewards=(reward,), value=_reward_arch(cfg, pc.value_model or rm, arch)[0])
    t = sc.training
    key = "gradient_checkpointing" if t.get("gradient_checkpointing") is not None else "activation_checkpointing"
    autocast = t.get("bf16", cuda) or t.get("fp16", False)
    if registry.STAGES[stage].rl:  # TRL's RLOO/GRPO (PPO returned above)
        seq = ONLINE_PROMPT_TOKENS + (t.get("max_completion_length") or 512)
        reference = "copy" if t.get("beta", TRL_BETA[stage]) != 0 else "none"
        rms = tuple(_reward_arch(cfg, r.model or lineage.chain_reward_dir(cfg), arch)
                    for r in sc.rewards if r.function is None)
    else:
        seq = t.get("max_length", 1024) or arch.positions or 1024  # None: no truncation
        reference, rms = (sc.reference if stage == "dpo" else "none"), ()
    return Settings(**common, act=2 if dtype == 2 or autocast else 4, batch=t.get("per_device_train_batch_size", 8),
                    accumulation=t.get("gradient_accumulation_steps", 1), seq=seq,
                    checkpointing=bool(t.get(key, True)), reference=reference, rewards=rms,
                    checkpointing_key=key)


def _source_arch(cfg: Config, source: str) -> tuple[Arch, Lora | None]:
    """The architecture under `source`, and the adapter it holds if it is a LoRA adapter directory."""
    from posttrain import models

    base = models.adapter_base(source)
    if base is None:
        return architecture(_auto_config(cfg, source), cfg.model.trust_remote_code), None
    a = json.loads((Path(source) / "adapter_config.json").read_text())
    t = a.get("target_modules") or "all-linear"
    lora = Lora(a.get("r", 8), t if isinstance(t, str) else tuple(sorted(t)), a.get("lora_dropout") or 0.0,
                tuple(a.get("modules_to_save") or ()))
    return architecture(_auto_config(cfg, base), cfg.model.trust_remote_code), lora


def _reward_arch(cfg: Config, path: str, policy: Arch) -> tuple[Arch, bool]:
    """A reward (or value) model's architecture and whether it loads in 4 bits (a QLoRA reward
    stage); before the reward stage has run, it is taken to be the policy's (the default start)."""
    from posttrain import manifest

    if not Path(path).exists():
        return policy, False
    arch, _ = _source_arch(cfg, path)
    return arch, (manifest.read(path) or {}).get("method") == "qlora"


def _auto_config(cfg: Config, source: str):
    from transformers import AutoConfig

    from posttrain import gguf

    try:
        return AutoConfig.from_pretrained(gguf.resolve(source), revision=cfg.model.revision,
                                          trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as e:
        raise PosttrainError(f"can't read the model config of '{source}' for the memory estimate: "
                             f"{str(e).splitlines()[0]}", fix="check the path (or download the model first)") from None


# ---------------------------------------------------------------------------------------------
# The check


def available_bytes() -> int:
    """Free memory where training will run: the current CUDA device's free memory, else the
    system's available RAM."""
    import torch

    from posttrain import launch

    if torch.cuda.is_available():
        # this process's GPU (LOCAL_RANK under a launcher): asking for the current device before the
        # trainer has set it would open a context on GPU 0 from every process
        return torch.cuda.mem_get_info(launch.local_rank(torch.cuda.current_device()))[0]
    import psutil

    return psutil.virtual_memory().available


def check(est: Estimate, available: int) -> str | None:
    """None when the estimate fits; else one line with the need, the biggest parts, and the
    cheapest change that fits (trying, in order of quality cost: gradient checkpointing, a smaller
    per-device batch with more accumulation, a precomputed DPO reference, LoRA, QLoRA; each kept
    only if still needed once a later one is in), or that nothing does."""
    if est.total <= available:
        return None
    s0 = est.settings
    big = sorted(est.groups().items(), key=lambda kv: -kv[1])[:4]
    head = (f"the {est.stage} stage needs about {_size(est.total)} ("
            + ", ".join(f"{k} {_size(v)}" for k, v in big) + f") and {_size(available)} is available")

    def fits(s: Settings) -> bool:
        return estimate(s).total <= available

    steps: list[str] = []
    s = s0
    for key in FIXES:
        nxt = _apply(key, s, fits)
        if nxt is None:
            continue
        s, steps = nxt, steps + [key]
        if fits(s):
            s, steps = _prune(s, s0, steps, fits)
            return f"{head}: set {_describe(s, steps)} (about {_size(estimate(s).total)})"
    tried = f" even with {_describe(s, steps)}" if steps else ""
    return (f"{head}, and it does not fit{tried} (about {_size(estimate(s).total)}): use a device with more "
            "memory, a smaller model or shorter sequences")


def _apply(key: str, s: Settings, fits) -> Settings | None:
    if key == "checkpointing":
        return replace(s, checkpointing=True) if s.stage != "ppo" and not s.checkpointing else None
    if key == "batch":  # the largest smaller batch that fits; accumulation keeps the global batch
        total = s.batch * s.accumulation
        options = [replace(s, batch=b, accumulation=total // b) for b in range(s.batch - 1, 0, -1) if total % b == 0]
        return next((o for o in options if fits(o)), options[-1]) if options else None
    if key == "reference":
        return replace(s, reference="precomputed") if s.stage == "dpo" and s.reference == "copy" else None
    if key == "lora":
        return replace(s, method="lora") if s.method == "full" else None
    return replace(s, method="qlora") if s.method != "qlora" else None


def _prune(s: Settings, s0: Settings, steps: list[str], fits) -> tuple[Settings, list[str]]:
    """Undo the earlier changes the last one made unnecessary (costliest first), and give back as
    much of the per-device batch as now fits."""
    for k in reversed(steps[:-1]):
        if k == "lora" and s.method == "qlora":
            continue  # QLoRA is LoRA too: one setting, said once
        if k == "batch":
            total = s0.batch * s0.accumulation
            larger = [replace(s, batch=b, accumulation=total // b) for b in range(s0.batch, s.batch, -1)
                      if total % b == 0]
            s = next((t for t in larger if fits(t)), s)
            steps = [x for x in steps if x != k or s.batch != s0.batch]
            continue
        fields = {"checkpointing": ("checkpointing",), "reference": ("reference",), "lora": ("method",)}[k]
        trial = replace(s, **{f: getattr(s0, f) for f in fields})
        if fits(trial):
            s, steps = trial, [x for x in steps if x != k]
    return s, steps


def _describe(s: Settings, steps: list[str]) -> str:
    sec = s.section
    said = {
        "checkpointing": f"{sec}.training.{s.checkpointing_key}: true",
        "batch": f"ppo.gradient_accumulation_steps: {s.accumulation}" if s.stage == "ppo" else
        f"{sec}.training.per_device_train_batch_size: {s.batch} with gradient_accumulation_steps: {s.accumulation}",
        "reference": "dpo.reference: precomputed",
        "lora": f"{sec}.method: lora",
        "qlora": f"{sec}.method: qlora",
    }
    return " and ".join(said[k] for k in steps if not (k == "lora" and "qlora" in steps))


def _size(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"
