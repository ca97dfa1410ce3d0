"""`posttrain eval`: every model of a chain on the same held-out data, with the same recorded settings.

Reads top to bottom:
 1. which models (the base and each model stage of the chain, or --models), and the judges: the
    reward model that scores generations and the reference for KL (both optional);
 2. held-out data once: prompts with reference answers, conversations for NLL, preference pairs;
 3. per model: load (an adapter is applied and must change the base's outputs), generate with
    every decoding (same seed each time), then score: task scorers, end-of-turn share, length,
    distinct-n, reward-model score, KL to the reference; NLL and preference accuracy;
 4. win rates against the base and against each model's parent stage, then eval.json,
    generations.jsonl and the manifest (written last).

The metric arithmetic is in posttrain.metrics; the report (tables, plots) in posttrain.report.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from posttrain import data, gguf, lineage, manifest, metrics, models
from posttrain.config import Config, check_stage, stage_output
from posttrain.console import console, peak_memory_mb, summary
from posttrain.errors import PosttrainError
from posttrain.stages import common

RESULTS = "eval.json"
GENERATIONS = "generations.jsonl"
ADAPTER_MIN_EFFECT = 1e-6  # max |Δlogit| below this: the adapter changes nothing


@dataclass
class HeldOut:
    prompts: list[list[dict]]  # messages up to the user turn
    references: list[str]  # the data's answer (last assistant turn)
    conversations: list[list[dict]]  # whole conversations, for NLL on assistant tokens
    pairs: list[dict] = field(default_factory=list)  # {"prompt", "chosen", "rejected"} as messages


def run(cfg: Config, *, base: str | None = None, output: str | None = None, resume: bool = False,
        overwrite: bool = False, models_: list[str] | None = None) -> Path:
    del base, resume  # the models come from eval.models / --models or the chain; nothing to resume
    started, t0 = manifest.now(), time.time()
    ec = cfg.eval
    out = stage_output(cfg, "eval", output)
    if models_:
        cfg = cfg.model_copy(update={"eval": ec.model_copy(update={"models": list(models_)})})
        ec = cfg.eval
    check_stage(cfg, "eval")
    targets = lineage.eval_models(cfg)
    for label, path in targets:
        if not ec.models and label != "base" and not manifest.is_finished(path):
            raise PosttrainError(f"eval compares the chain's {label} stage, and '{path}' holds no finished {label} "
                                 "stage", fix="run the chain first (posttrain run), or name the models with --models")
        _check_exists(label, path)
    rm_path, kl_path = lineage.eval_judges(cfg)
    for label, path in (("eval.reward_model", rm_path), ("eval.kl_reference", kl_path)):
        if path:
            _check_exists(label, path)
    read = [Path(p).resolve() for _, p in targets] + [Path(p).resolve() for p in (rm_path, kl_path) if p]
    if out.resolve() in read:
        raise PosttrainError(f"the eval output '{out}' is one of the models it reads", fix="choose another --output")
    if manifest.is_finished(out) and not overwrite:
        raise PosttrainError(f"'{out}' already holds a finished eval", fix="pass --overwrite, or choose --output")
    if ec.lm_eval is not None:
        from posttrain import lm_eval

        lm_eval.check_tasks(ec.lm_eval.tasks, ec.lm_eval.include_path)
    scorers = load_scorers(cfg)
    key = lineage.stage_key(cfg, "eval", None)

    # 1-2. tokenizer (the config's template for every model), data, judges
    tok = models.load_tokenizer(cfg, tokenizer_source(targets[-1][1]), need_masks=True)
    held = held_out(cfg, tok)
    seed = cfg.seed if ec.seed is None else ec.seed
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    judge = _load_judge(cfg, rm_path, tok, device) if rm_path else None
    kl_ref = load_model(cfg, kl_path, tok, device, probes=_probe_ids(tok, held))[0] if kl_path else None
    judges_mb = models.weights_mb(getattr(judge, "model", None), kl_ref)
    manifest.prepare_output(out, overwrite=True)
    lineage.mark_started(out, key)

    # 3. every model, one at a time
    results, generations = [], []
    for label, path in targets:
        console.rule(f"eval: {label} ({path})")
        m0 = time.time()
        model_tok = models.load_tokenizer(cfg, tokenizer_source(path), need_masks=True)
        model, loaded = load_model(cfg, path, model_tok, device, probes=_probe_ids(tok, held))
        row = {"label": label, "path": path, "parent": parent_label(path, targets), "loaded": loaded,
               "weights_mb": round(models.weights_mb(model), 1),
               "template_hash": model_tok.template_hash, "decodings": {}}
        if model_tok.template_hash != tok.template_hash:
            console.print(f"[yellow]warning[/] {label}: its tokenizer renders the template differently from "
                          f"{targets[-1][0]}'s; its prompts differ from the other models'")
        for dec in ec.decoding:
            torch.manual_seed(seed)
            gens = generate(model, model_tok, held.prompts, temperature=dec.temperature, top_p=dec.top_p,
                            max_new_tokens=ec.max_new_tokens, batch_size=ec.batch_size, device=device)
            dm = generation_metrics(scorers, gens, held)
            rewards = judge(gens) if judge is not None else None
            if rewards is not None:
                dm["reward"] = {**metrics.distribution(rewards), "per_response": rewards}
            if kl_ref is not None:
                dm["kl"] = metrics.distribution(kl_to_reference(model, kl_ref, gens, model_tok, ec.batch_size, device))
            row["decodings"][dec.name] = dm
            generations += [{"model": label, "decoding": dec.name, "index": i, "response": g["text"],
                             "ended": g["ended"], "tokens": len(g["ids"]),
                             "scores": {n: v[i] for n, v in dm["per_response"].items()},
                             "reward": rewards[i] if rewards is not None else None}
                            for i, g in enumerate(gens)]
        row["nll"] = nll(model, model_tok, held.conversations, ec.batch_size, device)
        if held.pairs:
            row["preference"] = preference(model, model_tok, held.pairs, ec.batch_size, device)
        del model  # before lm-eval loads its own copy
        if ec.lm_eval is not None:
            row["lm_eval"] = _lm_eval(path, ec, seed)
        row["seconds"] = round(time.time() - m0, 1)
        results.append(row)

    # 4. win rates (same prompts, same decoding), then the files
    if judge is not None:
        add_win_rates(results)
    for row in results:
        for dm in row["decodings"].values():
            dm.pop("per_response")
    samples = _samples(held, generations, [lbl for lbl, _ in targets], ec.show_samples)
    settings = {
        "data": ec.data, "pairs": lineage.eval_pairs(cfg), "prompts": len(held.prompts),
        "conversations": len(held.conversations), "pair_count": len(held.pairs),
        "template": cfg.template.name, "template_hash": tok.template_hash,
        "decoding": [d.model_dump() for d in ec.decoding],
        "max_new_tokens": ec.max_new_tokens, "seed": seed, "scorers": [s.model_dump() for s in ec.scorers],
        "reward_model": rm_path, "kl_reference": kl_path, "device": device.type,
        "judges_weights_mb": round(judges_mb, 1),
    }
    (out / RESULTS).write_text(json.dumps({"settings": settings, "models": results, "samples": samples},
                                          indent=2, default=_json_default) + "\n")
    with (out / GENERATIONS).open("w") as f:
        for g in generations:
            f.write(json.dumps(g, default=_json_default) + "\n")
    update_cards(results)
    common.write_manifest(
        out, "eval", cfg, tok, parent=None, key=key, started=started, settings=settings,
        models=[{"label": lbl, **(lineage.parent_record(p) or {})} for lbl, p in targets],
        metrics={"wall_time_s": round(time.time() - t0, 2), "peak_memory_mb": round(peak_memory_mb(), 1)},
    )
    _print_summary(results, ec, out)
    common.finished(out)
    return out


def update_cards(results: list[dict]) -> None:
    """Each compared model that is a finished posttrain stage gets its rows of the eval table in its
    model card: the base model's, its parent's (when compared) and its own."""
    from posttrain import card

    by_label = {r["label"]: r for r in results}
    for r in results:
        m = manifest.read(r["path"]) if Path(r["path"]).is_dir() else None
        if m is None or r["label"] == "base":
            continue
        rows = [by_label[x] for x in dict.fromkeys(("base", r.get("parent"))) if x in by_label and x != r["label"]]
        card.write(r["path"], m, common.key_metrics(m),
                   [{"label": x["label"], "metrics": card.eval_metrics(x)} for x in [*rows, r]])


# ---------------------------------------------------------------------------------------------
# Models and data


def _check_exists(label: str, path: str) -> None:
    """A local model must be there and finished; a name whose parent directory doesn't exist here
    is taken for a Hub id (its loading gives the offline/Hub error)."""
    p = Path(path)
    fix = "run the chain (or that stage) first, or name the models with --models"
    if p.is_dir():
        unfinished = (p / "posttrain.started.json").is_file() and not manifest.is_finished(p)
        if unfinished or not ((p / "config.json").is_file() or (p / "adapter_config.json").is_file()):
            raise PosttrainError(f"eval: model '{label}' at '{path}' is not a finished stage or model directory",
                                 fix=fix)
    elif p.is_file() and gguf.is_gguf(path):
        return  # a GGUF file: loaded through its conversion (models.local)
    elif str(p.parent) not in ("", ".") and p.parent.is_dir():
        raise PosttrainError(f"eval: model '{label}': '{path}' does not exist", fix=fix)


def load_model(cfg: Config, path: str, tok: models.TokenizerInfo, device, *, probes) -> tuple[object, dict]:
    """A causal LM for evaluation, frozen, with the loading settings training used (dtype, revision,
    attention kernel, remote code). A LoRA adapter is applied to its base (an adapter on a full-
    precision adapter: the inner one merged first; a QLoRA adapter on CUDA: on its base quantized to
    4 bits, as it was trained, left unmerged) and must change the base's logits on the probe
    prompts: an adapter that changes nothing was saved empty or never trained, and evaluating it
    would credit the base's numbers to it. Generation settings saved with the model are dropped:
    every model generates with exactly the eval's decoding."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    under = models.adapter_base(path)
    recorded = manifest.read(path) if under is not None else None
    quantized = (recorded or {}).get("method") == "qlora" and torch.cuda.is_available()
    source = models.local(under or path)
    if under is not None and models.adapter_base(under) is not None:  # adapter on adapter
        if quantized:
            raise PosttrainError(f"'{path}' is a QLoRA adapter on another adapter ('{under}')",
                                 fix="merge the inner adapter first (posttrain merge) and evaluate on that")
        base_model, _ = load_model(cfg, under, tok, device, probes=probes)
    else:
        models.check_weights(cfg, source)
        base_model = AutoModelForCausalLM.from_pretrained(source, **models.load_kwargs(cfg, "qlora" if quantized
                                                                                       else "full"))
        _fit_vocab(base_model, tok)
        if not quantized:
            base_model = base_model.to(device)
    if under is None:
        model, loaded = base_model, {"kind": "full"}
    else:
        from peft import PeftModel

        model = PeftModel.from_pretrained(base_model, path).eval().requires_grad_(False)
        effect = adapter_effect(model, probes, device)
        if effect < ADAPTER_MIN_EFFECT:
            raise PosttrainError(f"the adapter in '{path}' does not change its base's outputs (max |Δlogit| "
                                 f"{effect:.1e} on {len(probes)} prompts): it is empty or untrained",
                                 fix="retrain that stage; check that its trainable parameters changed")
        if not quantized:
            model = model.merge_and_unload()
        loaded = {"kind": "adapter", "base": under, "method": (recorded or {}).get("method"),
                  "adapter_effect_max_abs_logit": effect}
    model.generation_config = GenerationConfig(pad_token_id=tok.tokenizer.pad_token_id)
    return model.eval().requires_grad_(False), loaded


def tokenizer_source(path: str) -> str:
    """Where a model's tokenizer is: its own directory, or for an adapter saved without one, its base's."""
    under = models.adapter_base(path)
    if under is None or (Path(path) / "tokenizer_config.json").is_file():
        return path
    return tokenizer_source(under)


def _fit_vocab(model, tok: models.TokenizerInfo) -> None:
    if len(tok.tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tok.tokenizer))


def adapter_effect(peft_model, probes: list[list[int]], device) -> float:
    """Max |logit with the adapter − logit without| over the probe sequences."""
    import torch

    worst = 0.0
    with torch.no_grad():
        for ids in probes:
            x = torch.tensor([ids], device=device)
            on = peft_model(input_ids=x).logits.float()
            with peft_model.disable_adapter():
                off = peft_model(input_ids=x).logits.float()
            worst = max(worst, (on - off).abs().max().item())
    return worst


def _probe_ids(tok: models.TokenizerInfo, held: HeldOut, n: int = 4) -> list[list[int]]:
    return [_prompt_ids(tok, p) for p in held.prompts[:n]]


def _prompt_ids(tok: models.TokenizerInfo, messages: list[dict]) -> list[int]:
    return list(tok.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                                  return_dict=True)["input_ids"])


def held_out(cfg: Config, tok: models.TokenizerInfo) -> HeldOut:
    """The eval splits, formatted as the training stages read them, cut to eval.max_samples."""
    from posttrain.rl.prompts import to_prompt

    ec = cfg.eval
    _, ev, _ = data.stage_data(cfg, ec.data, tok)
    if ev is None or len(ev) == 0:
        raise PosttrainError(f"eval: data.{ec.data} has no held-out rows",
                             fix=f"add data.{ec.data}.eval sources or set data.{ec.data}.eval_fraction")
    rows = ev.select(range(min(ec.max_samples, len(ev))))
    prompts, references, conversations = [], [], []
    for row in rows:
        p = to_prompt(row, "sft")
        conversations.append(row["messages"])
        if p["prompt"] and p["prompt"][-1]["role"] == "user":
            prompts.append(p["prompt"])
            references.append(p["reference"])
    if not prompts:
        raise PosttrainError(f"eval: no held-out conversation of data.{ec.data} ends a user turn before an answer")
    pairs = []
    name = lineage.eval_pairs(cfg)
    if name is not None:
        _, pev, _ = data.stage_data(cfg, name, tok)
        if (pev is None or len(pev) == 0) and ec.pairs is not None:
            raise PosttrainError(f"eval.pairs: data.{name} has no held-out pairs",
                                 fix=f"add data.{name}.eval sources or set data.{name}.eval_fraction")
        if pev is not None:
            pairs = [dict(r) for r in pev.select(range(min(ec.max_samples, len(pev))))]
    return HeldOut(prompts, references, conversations, pairs)


# ---------------------------------------------------------------------------------------------
# Generation and per-response metrics


def generate(model, tok: models.TokenizerInfo, prompts: list[list[dict]], *, temperature: float, top_p: float,
             max_new_tokens: int, batch_size: int, device) -> list[dict]:
    """Responses to every prompt: token ids through the end-of-turn token, text without it, and
    whether it ended. Greedy when temperature is 0."""
    from posttrain.rl import rollout

    pad = tok.tokenizer.pad_token_id
    out = []
    for i in range(0, len(prompts), batch_size):
        queries = [_prompt_ids(tok, p) for p in prompts[i:i + batch_size]]
        ids, mask = rollout.left_pad(queries, pad)
        batch = rollout.sample(model, ids.to(device), mask.to(device), eot_id=tok.eot_id, pad_id=pad,
                               temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
        for q, r, m, ended in zip(queries, batch.responses.tolist(), batch.mask.tolist(), batch.ended.tolist(),
                                  strict=True):
            resp = [t for t, k in zip(r, m, strict=True) if k]
            body = resp[:-1] if ended else resp
            out.append({"query": q, "ids": resp, "ended": bool(ended),
                        "text": tok.tokenizer.decode(body, skip_special_tokens=True).strip()})
    return out


def load_scorers(cfg: Config) -> dict:
    """name -> f(prompts, texts, references) -> one score (or None: abstain) per response. A
    `function` scorer is imported once and called as an RL reward function is, with the same checks
    (stages/online.wrap_function: keywords it doesn't take are not passed; a raise, a wrong length or a
    non-finite number is a one-line error)."""
    out = {}
    for s in cfg.eval.scorers:
        if s.kind == "exact":
            out[s.name] = lambda p, t, r: metrics.exact(t, r)
        elif s.kind == "normalized":
            out[s.name] = lambda p, t, r: metrics.normalized(t, r)
        elif s.kind == "regex":
            out[s.name] = lambda p, t, r, pattern=s.pattern: metrics.regex(pattern, t, r)
        else:
            from posttrain.rl.rewards import load_function
            from posttrain.stages.online import wrap_function

            fn = wrap_function(load_function(s.function, cfg._source_dir), s.function, s.name,
                               f"eval scorer '{s.name}'")
            if inspect.iscoroutinefunction(fn):
                out[s.name] = lambda p, t, r, fn=fn: asyncio.run(fn(**_scorer_args(p, t, r)))
            else:
                out[s.name] = lambda p, t, r, fn=fn: fn(**_scorer_args(p, t, r))
    return out


def _scorer_args(prompts: list[list[dict]], texts: list[str], references: list[str]) -> dict:
    """The conversational shape TRL gives reward functions."""
    return {"prompts": prompts, "completions": [[{"role": "assistant", "content": t}] for t in texts],
            "reference": references}


def generation_metrics(scorers: dict, gens: list[dict], held: HeldOut) -> dict:
    """Task scores (means over the responses a scorer did not abstain on), end-of-turn share, mean
    length (tokens, end-of-turn excluded) and distinct-1/2."""
    texts = [g["text"] for g in gens]
    per_response = {name: fn(held.prompts, texts, held.references) for name, fn in scorers.items()}
    bodies = [g["ids"][:-1] if g["ended"] else g["ids"] for g in gens]
    return {
        "scores": {n: _mean([x for x in v if x is not None]) for n, v in per_response.items()},
        "ended": sum(g["ended"] for g in gens) / len(gens),
        "length": sum(len(b) for b in bodies) / len(bodies),
        "distinct_1": metrics.distinct_n(bodies, 1),
        "distinct_2": metrics.distinct_n(bodies, 2),
        "per_response": per_response,
    }


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _load_judge(cfg: Config, rm_path: str, tok: models.TokenizerInfo, device):
    """A function gens -> the reward model's score of each response (as the RL stages read it: the
    prompt, the response through end-of-turn, and the template's suffix after it)."""
    from posttrain.rl import rewards, rollout

    rewards.check_same_tokenizer(tok, rm_path, "eval")
    rm = rewards.load_reward_model(rm_path).to(device)
    rewards.check_pad(rm, tok.tokenizer.pad_token_id, rm_path, "eval")
    suffix = rollout.template_suffix(tok.tokenizer, tok.eot_id)

    def judge(gens: list[dict]) -> dict:
        seqs = [g["query"] + g["ids"] + (suffix if g["ended"] else []) for g in gens]
        return rewards.score_ids(rm, seqs, tok.tokenizer.pad_token_id, batch_size=cfg.eval.batch_size)

    judge.model = rm
    return judge


def kl_to_reference(model, ref, gens: list[dict], tok: models.TokenizerInfo, batch_size: int, device) -> list[float]:
    """Per response: Σ_t KL(model(·|prompt, y<t) || ref(·|prompt, y<t)) along the model's own response."""
    import torch

    from posttrain.rl import rollout

    pad = tok.tokenizer.pad_token_id
    out: list[float] = []
    for i in range(0, len(gens), batch_size):
        chunk = gens[i:i + batch_size]
        q, qm = rollout.left_pad([g["query"] for g in chunk], pad)
        width = max(1, max(len(g["ids"]) for g in chunk))
        r = torch.full((len(chunk), width), pad, dtype=torch.long)
        m = torch.zeros_like(r)
        for j, g in enumerate(chunk):
            r[j, :len(g["ids"])] = torch.tensor(g["ids"], dtype=torch.long)
            m[j, :len(g["ids"])] = 1
        batch = rollout.Batch(q.to(device), qm.to(device), r.to(device), m.to(device),
                              torch.tensor([g["ended"] for g in chunk], device=device))
        with torch.no_grad():
            per_token = _response_kl(model, ref, batch)
        out += metrics.masked_sums(per_token, batch.mask)
    return out


def _response_kl(model, ref, batch):
    """KL(model || ref) at each response position, [B, Lr], from the two models' hidden states,
    with a chunk of positions' full-vocabulary logits at a time (rl/logprobs.py)."""
    from posttrain.rl import logprobs, rollout

    p, q = logprobs.logits_function(model), logprobs.logits_function(ref)
    hp, hq = rollout.response_hidden(model, batch), rollout.response_hidden(ref, batch)
    return logprobs.map_chunks(lambda a, b: (metrics.kl_per_position(p(a), q(b)),), batch.mask.shape, hp, hq)[0]


# ---------------------------------------------------------------------------------------------
# Likelihood metrics


def _assistant_logps(model, tok: models.TokenizerInfo, conversations: list[list[dict]], batch_size: int,
                     device) -> list[tuple[float, int]]:
    """(Σ log p, token count) over the assistant tokens of each conversation (the template's loss
    mask, as SFT and PPO-ptx train on it), whole conversations, no truncation."""
    import torch

    from posttrain.rl import logprobs, rollout

    out = []
    for i in range(0, len(conversations), batch_size):
        examples = rollout.sft_examples(tok.tokenizer, conversations[i:i + batch_size], max_length=10**9)
        ids, attn, labels = rollout.right_pad_sft(examples, tok.tokenizer.pad_token_id)
        taught = labels[:, 1:] != -100  # only these positions reach the LM head, a chunk at a time
        logps = torch.zeros(taught.shape)
        with torch.no_grad():
            hidden = logprobs.hidden_states(model, input_ids=ids.to(device), attention_mask=attn.to(device))
            logps[taught] = logprobs.token_logprobs(model, hidden[:, :-1][taught.to(device)],
                                                    ids[:, 1:][taught].to(device))[0].cpu()
        mask = taught.float()
        out += list(zip(metrics.masked_sums(logps, mask), mask.sum(-1).long().tolist(), strict=True))
    return out


def nll(model, tok: models.TokenizerInfo, conversations: list[list[dict]], batch_size: int, device) -> dict:
    """Mean negative log-likelihood per assistant token of the held-out conversations, and perplexity."""
    import math

    pairs = _assistant_logps(model, tok, conversations, batch_size, device)
    tokens = sum(n for _, n in pairs)
    if tokens == 0:
        raise PosttrainError("eval: no assistant token in the held-out conversations (the template's loss mask is "
                             "empty)", fix="check the template's {% generation %} markers with `posttrain preview`")
    value = -sum(s for s, _ in pairs) / tokens
    return {"nll": value, "perplexity": math.exp(min(value, 50.0)), "tokens": tokens}


def preference(model, tok: models.TokenizerInfo, pairs: list[dict], batch_size: int, device) -> dict:
    """Held-out preference accuracy: log p(chosen answer | prompt) > log p(rejected answer | prompt),
    summed over the answer's tokens including end-of-turn. Reference-free, so any models compare."""
    convs = [p["prompt"] + p["chosen"] for p in pairs] + [p["prompt"] + p["rejected"] for p in pairs]
    logps = [s for s, _ in _assistant_logps(model, tok, convs, batch_size, device)]
    return metrics.preference_accuracy(logps[:len(pairs)], logps[len(pairs):])


# ---------------------------------------------------------------------------------------------
# Comparisons and output


def add_win_rates(results: list[dict]) -> None:
    """Reward-model win rate of each model against the base model (when it is evaluated) and against
    its parent stage (when that is), on the same prompts and decoding."""
    by_label = {r["label"]: r for r in results}
    base = by_label.get("base")
    for r in results:
        for name, dm in r["decodings"].items():
            mine = dm["reward"]["per_response"]
            if base is not None and r is not base:
                dm["win_rate_vs_base"] = metrics.win_rate(mine, base["decodings"][name]["reward"]["per_response"])
            parent = by_label.get(r["parent"]) if r["parent"] else None
            if parent is not None:
                dm["win_rate_vs_parent"] = metrics.win_rate(mine, parent["decodings"][name]["reward"]["per_response"])
    for r in results:
        for dm in r["decodings"].values():
            dm["reward_scores"] = dm["reward"].pop("per_response")


def parent_label(path: str, targets: list[tuple[str, str]]) -> str | None:
    """The label of the evaluated model this one was trained from (its manifest's parent)."""
    m = manifest.read(path) if Path(path).is_dir() else None
    parent = ((m or {}).get("parent") or {}).get("path")
    if parent is None:
        return None
    for label, p in targets:
        if Path(p).resolve() == Path(parent).resolve() or p == parent:
            return label
    return None


def _samples(held: HeldOut, generations: list[dict], labels: list[str], n: int) -> list[dict]:
    rows = []
    for i in range(min(n, len(held.prompts))):
        responses: dict[str, dict] = {lbl: {} for lbl in labels}
        for g in generations:
            if g["index"] == i:
                responses[g["model"]][g["decoding"]] = g["response"]
        rows.append({"prompt": held.prompts[i][-1]["content"], "reference": held.references[i],
                     "responses": responses})
    return rows


def _lm_eval(path: str, ec, seed: int) -> dict:
    from posttrain import lm_eval

    le = ec.lm_eval
    reason = lm_eval.skip_reason(path, le.apply_chat_template)
    if reason is not None:
        console.print(f"[yellow]lm-eval skipped[/] for {path}: {reason}")
        return {"skipped": reason}
    return lm_eval.run_tasks(path, le.tasks, include_path=le.include_path, limit=le.limit, num_fewshot=le.num_fewshot,
                             batch_size=le.batch_size, apply_chat_template=le.apply_chat_template, seed=seed)


def _json_default(o):
    return float(o) if hasattr(o, "__float__") else str(o)


def _print_summary(results: list[dict], ec, out: Path) -> None:
    first = ec.decoding[0].name
    rows = {}
    for r in results:
        dm = r["decodings"][first]
        parts = [f"{n} {v:.1%}" for n, v in dm["scores"].items()]
        if "reward" in dm:
            parts.append(f"reward {dm['reward']['mean']:+.2f}")
        if "kl" in dm:
            parts.append(f"KL {dm['kl']['mean']:.2f}")
        parts.append(f"ended {dm['ended']:.0%}")
        parts.append(f"NLL {r['nll']['nll']:.3f}")
        if "preference" in r:
            parts.append(f"pref {r['preference']['accuracy']:.0%}")
        rows[r["label"]] = "  ".join(parts)
    summary(f"eval ({first} decoding; all decodings in {out / RESULTS})", rows)


def key_metrics(m: dict) -> dict:
    """The chain summary's numbers for this stage (chain.key_metrics)."""
    return {"models": len(m.get("models", [])), "prompts": m.get("settings", {}).get("prompts")}
