"""The real-model demo task (configs/smollm2-cpu.yaml, configs/gemma3-cpu.yaml): short factual
answers in a format the base models never use, in two styles a preference can pick between.

Questions from five families a 135M/270M model can partly answer already (capitals, opposites,
plurals, past tenses, small sums). The SFT data answers every one in the quiz format

    Answer: Paris                                        brief, plain label
    Answer: Paris. Paris is the capital of France.       explained, plain label
    **Answer:** Paris                                    brief, bold label
    **Answer:** Paris. Paris is the capital of France.   explained, bold label

mixing the styles (brief 30%, bold 30%, independently), so the SFT model can give all four and the
later stages have something to choose:
  - the reward model's pairs prefer brief over explained (both correct, same label): PPO optimises
    that;
  - the DPO pairs prefer the bold label over the plain one (both brief, both correct).
Each preference is a surface feature a checker confirms exactly, and each is moved by one stage, so
each stage's effect shows by itself in the report (SFT: `format`; PPO: `brief`; DPO: `bold`). The
bold goes on the label, not on the answer: measured on SmolLM2, "Answer: **Paris**" puts the answer
after "**" without its leading space, and the model then recalls far fewer answers (38% correct vs
93% for plain answers after SFT), so DPO towards it traded the skill for the style.

Scorers (`posttrain.realtask:<name>`, eval `kind: function`; they abstain on prompts that are not
task questions):
  - format:  the response starts with the label, "Answer: " or "**Answer:** " (the base models: 0%);
  - brief:   in the format, and nothing after the answer but a full stop (PPO's preference);
  - bold:    in the format, with the bold label (DPO's preference);
  - correct: the right answer appears as a word, in any format (the knowledge: SFT should keep or
    raise the base's share, and the later stages keep SFT's).
Retention outside the task: `python -m posttrain.realtask retention CONFIG` (KL from the base model
on general text the base model samples itself; see `retention`).

Held-out questions use items (countries, words, sums) that no training row contains. Deterministic
from the seed; no model is needed to write the data.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from posttrain import demo

BRIEF_SHARE = 0.3  # share of SFT answers in the brief style (PPO's preference)
BOLD_SHARE = 0.3  # share of SFT answers with the bold label (DPO's preference)
EVAL_SHARE = 0.25  # items held out per family
SFT_ROWS = 1200
REWARD_PAIRS = 600
DPO_PAIRS = 600
LABEL, BOLD_LABEL = "Answer:", "**Answer:**"

CAPITALS = [
    ("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Germany", "Berlin"),
    ("the United Kingdom", "London"), ("Russia", "Moscow"), ("China", "Beijing"), ("India", "New Delhi"),
    ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Canada", "Ottawa"), ("Australia", "Canberra"),
    ("Brazil", "Brasilia"), ("Argentina", "Buenos Aires"), ("Mexico", "Mexico City"), ("Peru", "Lima"),
    ("Chile", "Santiago"), ("Colombia", "Bogota"), ("Portugal", "Lisbon"), ("Greece", "Athens"),
    ("Turkey", "Ankara"), ("Poland", "Warsaw"), ("Sweden", "Stockholm"), ("Norway", "Oslo"),
    ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Ireland", "Dublin"), ("Austria", "Vienna"),
    ("Hungary", "Budapest"), ("the Czech Republic", "Prague"), ("the Netherlands", "Amsterdam"),
    ("Belgium", "Brussels"), ("Switzerland", "Bern"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"),
    ("South Korea", "Seoul"), ("North Korea", "Pyongyang"), ("Indonesia", "Jakarta"), ("the Philippines", "Manila"),
    ("Malaysia", "Kuala Lumpur"), ("Pakistan", "Islamabad"), ("Iran", "Tehran"), ("Iraq", "Baghdad"),
    ("Saudi Arabia", "Riyadh"), ("Nigeria", "Abuja"), ("Ghana", "Accra"), ("Ethiopia", "Addis Ababa"),
    ("Morocco", "Rabat"), ("Algeria", "Algiers"), ("Tunisia", "Tunis"), ("Cuba", "Havana"),
    ("Jamaica", "Kingston"), ("Venezuela", "Caracas"), ("Ukraine", "Kyiv"), ("Romania", "Bucharest"),
    ("Bulgaria", "Sofia"), ("Serbia", "Belgrade"), ("Croatia", "Zagreb"), ("Iceland", "Reykjavik"),
    ("New Zealand", "Wellington"), ("Afghanistan", "Kabul"), ("Bangladesh", "Dhaka"), ("Nepal", "Kathmandu"),
    ("Syria", "Damascus"), ("Lebanon", "Beirut"), ("Jordan", "Amman"), ("Qatar", "Doha"), ("Uganda", "Kampala"),
    ("Senegal", "Dakar"), ("Zimbabwe", "Harare"), ("Mongolia", "Ulaanbaatar"), ("Cambodia", "Phnom Penh"),
    ("Estonia", "Tallinn"), ("Latvia", "Riga"), ("Lithuania", "Vilnius"), ("Slovakia", "Bratislava"),
    ("Uruguay", "Montevideo"), ("Ecuador", "Quito"), ("Panama", "Panama City"),
]
ALSO = {"Kyiv": ["Kiev"], "Bogota": ["Bogotá"], "Brasilia": ["Brasília"], "Reykjavik": ["Reykjavík"]}
OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("early", "late"), ("happy", "sad"), ("fast", "slow"),
    ("open", "closed"), ("full", "empty"), ("tall", "short"), ("wet", "dry"), ("rich", "poor"),
    ("strong", "weak"), ("loud", "quiet"), ("thick", "thin"), ("true", "false"), ("win", "lose"),
    ("left", "right"), ("push", "pull"), ("buy", "sell"), ("love", "hate"), ("good", "bad"), ("high", "low"),
    ("clean", "dirty"), ("day", "night"), ("black", "white"), ("north", "south"), ("east", "west"),
    ("inside", "outside"), ("before", "after"), ("above", "below"), ("friend", "enemy"), ("alive", "dead"),
    ("awake", "asleep"), ("cheap", "expensive"), ("deep", "shallow"), ("wide", "narrow"), ("first", "last"),
    ("give", "take"), ("laugh", "cry"), ("remember", "forget"), ("accept", "reject"), ("question", "answer"),
    ("always", "never"), ("increase", "decrease"), ("maximum", "minimum"), ("positive", "negative"),
    ("sweet", "sour"), ("smooth", "rough"), ("safe", "dangerous"), ("near", "far"), ("on", "off"),
    ("yes", "no"), ("come", "go"), ("arrive", "leave"), ("entrance", "exit"), ("summer", "winter"),
    ("boy", "girl"), ("king", "queen"), ("war", "peace"), ("success", "failure"), ("visible", "invisible"),
    ("possible", "impossible"), ("import", "export"), ("minor", "major"), ("ancient", "modern"),
]
PLURALS = [
    ("mouse", "mice"), ("child", "children"), ("man", "men"), ("woman", "women"), ("tooth", "teeth"),
    ("foot", "feet"), ("goose", "geese"), ("person", "people"), ("cactus", "cacti"), ("leaf", "leaves"),
    ("knife", "knives"), ("wolf", "wolves"), ("half", "halves"), ("box", "boxes"), ("bus", "buses"),
    ("city", "cities"), ("baby", "babies"), ("story", "stories"), ("party", "parties"), ("dog", "dogs"),
    ("cat", "cats"), ("book", "books"), ("car", "cars"), ("tree", "trees"), ("house", "houses"),
    ("apple", "apples"), ("church", "churches"), ("watch", "watches"), ("fox", "foxes"), ("potato", "potatoes"),
    ("tomato", "tomatoes"), ("hero", "heroes"), ("sheep", "sheep"), ("fish", "fish"), ("deer", "deer"),
    ("ox", "oxen"), ("crisis", "crises"), ("wife", "wives"), ("life", "lives"), ("dish", "dishes"),
    ("key", "keys"), ("toy", "toys"), ("glass", "glasses"), ("brush", "brushes"), ("horse", "horses"),
]
PAST = [
    ("run", "ran"), ("go", "went"), ("eat", "ate"), ("see", "saw"), ("take", "took"), ("write", "wrote"),
    ("sing", "sang"), ("swim", "swam"), ("drink", "drank"), ("give", "gave"), ("come", "came"), ("buy", "bought"),
    ("think", "thought"), ("teach", "taught"), ("catch", "caught"), ("fly", "flew"), ("know", "knew"),
    ("grow", "grew"), ("throw", "threw"), ("draw", "drew"), ("speak", "spoke"), ("break", "broke"),
    ("choose", "chose"), ("drive", "drove"), ("ride", "rode"), ("sleep", "slept"), ("keep", "kept"),
    ("feel", "felt"), ("leave", "left"), ("meet", "met"), ("sit", "sat"), ("stand", "stood"), ("tell", "told"),
    ("sell", "sold"), ("find", "found"), ("hold", "held"), ("make", "made"), ("say", "said"), ("pay", "paid"),
    ("walk", "walked"), ("play", "played"), ("jump", "jumped"), ("cook", "cooked"), ("dance", "danced"),
    ("bring", "brought"), ("begin", "began"), ("forget", "forgot"), ("wear", "wore"),
]
QUESTIONS = {
    "capital": ["What is the capital of {x}?", "Name the capital city of {x}.", "Which city is the capital of {x}?"],
    "opposite": ["What is the opposite of {x}?", "Give the opposite of the word {x}.",
                 "Which word means the opposite of {x}?"],
    "plural": ["What is the plural of {x}?", "Give the plural form of the word {x}.", "One {x}, two what?"],
    "past": ["What is the past tense of {x}?", "Give the past tense of the verb {x}.",
             "Today I {x}; yesterday I what?"],
    "sum": ["What is {x}?", "Compute {x}.", "How much is {x}?"],
}


@dataclass(frozen=True)
class Item:
    family: str
    subject: str  # what the question is about: a country, a word, "7 + 5"
    answer: str
    explanation: str  # the sentence the explained style adds

    @property
    def accepts(self) -> list[str]:
        return [self.answer] + ALSO.get(self.answer, [])


def items() -> list[Item]:
    out = [Item("capital", c, a, f"{a} is the capital of {c}.") for c, a in CAPITALS]
    out += [Item("opposite", w, o, f"{o.capitalize()} is the opposite of {w}.") for w, o in OPPOSITES]
    out += [Item("plural", s, p, f"One {s}, two {p}.") for s, p in PLURALS]
    out += [Item("past", v, p, f"Today I {v}, yesterday I {p}.") for v, p in PAST]
    out += [Item("sum", f"{a} + {b}", str(a + b), f"{a} plus {b} makes {a + b}.")
            for a in range(2, 13) for b in range(2, 13)]
    return out


def question(item: Item, template: int) -> str:
    return QUESTIONS[item.family][template].format(x=item.subject)


def answer(item: Item, *, brief: bool, bold: bool) -> str:
    return f"{BOLD_LABEL if bold else LABEL} {item.answer}" + ("" if brief else f". {item.explanation}")


def split_items(seed: int = 0) -> tuple[list[Item], list[Item]]:
    """(train, held out): EVAL_SHARE of each family held out, the same for every split of the data."""
    rng = random.Random(seed)
    train, held = [], []
    for family in QUESTIONS:
        fam = [i for i in items() if i.family == family]
        rng.shuffle(fam)
        k = round(len(fam) * EVAL_SHARE)
        held += fam[:k]
        train += fam[k:]
    return train, held


def make_rows(seed: int = 0) -> dict[str, list[dict]]:
    """Every split, in the shapes posttrain reads (messages; prompt/chosen/rejected as text)."""
    rng = random.Random(seed)
    train, held = split_items(seed)
    # the sums are many and alike: a third of the draws, so the word families are not crowded out
    weights = [1.0 if i.family != "sum" else 0.35 for i in train]

    def draw(pool: list[Item], n: int, w: list[float] | None = None) -> list[tuple[Item, int]]:
        return [(it, rng.randrange(3)) for it in rng.choices(pool, weights=w, k=n)]

    def msgs(q: str, a: str) -> dict:
        return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}

    out: dict[str, list[dict]] = {}
    out["sft_train"] = [msgs(question(it, t), answer(it, brief=rng.random() < BRIEF_SHARE,
                                                     bold=rng.random() < BOLD_SHARE))
                        for it, t in draw(train, SFT_ROWS, weights)]
    # held out: every held-out item once, question template by turns; the reference is the preferred
    # answer (brief, bold label), so NLL on it falls as the chain learns the format and both preferences
    # in a shuffled order, so that eval.max_samples below 89 still takes every family
    mixed = random.Random(seed + 1).sample(held, len(held))
    out["sft_eval"] = [msgs(question(it, k % 3), answer(it, brief=True, bold=True)) for k, it in enumerate(mixed)]

    def reward_pair(it: Item, t: int) -> dict:  # brief over explained, same boldness, both correct
        bold = rng.random() < 0.5
        return {"prompt": question(it, t), "chosen": answer(it, brief=True, bold=bold),
                "rejected": answer(it, brief=False, bold=bold)}

    def dpo_pair(it: Item, t: int) -> dict:  # bold label over plain, both brief, both correct
        return {"prompt": question(it, t), "chosen": answer(it, brief=True, bold=True),
                "rejected": answer(it, brief=True, bold=False)}

    out["reward_train"] = [reward_pair(it, t) for it, t in draw(train, REWARD_PAIRS, weights)]
    out["reward_eval"] = [reward_pair(it, k % 3) for k, it in enumerate(held[::2])]  # 45: the accuracy gate
    out["dpo_train"] = [dpo_pair(it, t) for it, t in draw(train, DPO_PAIRS, weights)]
    out["dpo_eval"] = [dpo_pair(it, k % 3) for k, it in enumerate(held[1::2])]  # 44: DPO's and eval's accuracy
    return out


def write_data(directory: str | Path, seed: int = 0) -> dict[str, Path]:
    return demo.write_rows(directory, make_rows(seed))


# ---------------------------------------------------------------------------------------------
# Checkers


def _lookup() -> dict[str, Item]:
    return {question(it, t): it for it in items() for t in range(3)}


LOOKUP = _lookup()


def _norm(text: str) -> str:
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return " ".join(re.sub(r"[^a-z0-9 ]", " ", text.lower()).split())


def check(question_text: str, response: str) -> dict[str, float] | None:
    """All four checks of one response, or None when the question is not a task question."""
    it = LOOKUP.get(question_text.strip())
    if it is None:
        return None
    r = response.strip()
    bold = r.startswith(BOLD_LABEL + " ")
    fmt = bold or r.startswith(LABEL + " ")
    rest = r[len(BOLD_LABEL if bold else LABEL):].strip() if fmt else ""
    cut = re.search(r"[.!?\n]", rest)  # the answer runs to the first sentence end
    core, tail = (rest[:cut.start()], rest[cut.start():]) if cut else (rest, "")
    brief = fmt and bool(core.strip()) and len(core.split()) <= 4 and tail.strip() in ("", ".")
    said = f" {_norm(r)} "
    correct = any(f" {_norm(a)} " in said for a in it.accepts)
    return {"format": float(fmt), "brief": float(brief), "bold": float(bold), "correct": float(correct)}


def _text(x) -> str:
    return x[-1]["content"] if isinstance(x, list) else x


def _scorer(name: str):
    def score(prompts, completions, **kwargs) -> list[float | None]:
        out = []
        for p, c in zip(prompts, completions, strict=True):
            got = check(_text(p), _text(c))
            out.append(None if got is None else got[name])
        return out

    score.__name__ = name
    score.__doc__ = f"`posttrain.realtask:{name}` as an eval scorer or reward function (None: not a task question)."
    return score


format = _scorer("format")  # noqa: A001 - the scorer's name in the report
brief = _scorer("brief")
bold = _scorer("bold")
correct = _scorer("correct")


# ---------------------------------------------------------------------------------------------
# Retention: KL from the base model on general text it samples itself

GENERAL = [
    "The history of the printing press begins", "Bees are small insects that", "In the morning, many people like to",
    "The ocean covers most of the Earth and", "A good night's sleep is important because", "The city of Rome was",
    "Learning a new language takes time, but", "The first computers were large machines that",
    "Rain forms when water vapour in the air", "A healthy breakfast usually includes", "The moon orbits the Earth and",
    "Football is a popular sport in", "When you plant a seed in the ground,", "Music has been part of human life since",
    "The library was quiet except for", "Trains were an important invention because", "Cats are known for",
    "The recipe calls for two cups of flour and", "Mountains are formed when", "Her favourite book was about",
    "The weather today is expected to", "Electric cars are becoming more common as",
    "The river flows through the valley",
    "Children learn to read by", "A volcano erupts when", "The museum opened a new exhibition on",
    "Exercise helps the body by", "The old man sat on the bench and", "Photosynthesis is the process by which plants",
    "The market was busy with people selling", "Birds migrate south in the winter because",
    "The scientist looked through the microscope and", "Coffee is grown in many countries, including",
    "The teacher asked the students to", "Bread is made from", "The storm knocked down trees and",
    "Ancient Egyptians built the pyramids", "A bicycle has two wheels and", "The internet changed the way people",
    "Snow covered the village, and", "Elephants are the largest land animals and", "The train left the station at",
    "Writing a letter by hand is", "Most plants need sunlight, water and", "The boy opened the box and found",
    "Chess is a game of strategy in which", "The sun is a star that", "Fresh vegetables from the garden",
]


def retention_text(cfg, tok, *, n_tokens: int, seed: int) -> list[list[int]]:
    """Token ids of each GENERAL prefix (tokenized as the tokenizer does by default: Gemma's adds
    <bos>, SmolLM2's nothing) plus the base model's own temperature-1 continuation of n_tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    from posttrain import models

    model = AutoModelForCausalLM.from_pretrained(models.local(cfg.model.name_or_path), dtype=torch.float32).eval()
    torch.manual_seed(seed)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    out = []
    with torch.no_grad():
        for i in range(0, len(GENERAL), 16):
            batch = [tok(p)["input_ids"] for p in GENERAL[i:i + 16]]
            width = max(map(len, batch))
            ids = torch.tensor([[pad] * (width - len(b)) + b for b in batch])
            mask = torch.tensor([[0] * (width - len(b)) + [1] * len(b) for b in batch])
            gen = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0,
                                 top_k=0, max_new_tokens=n_tokens, min_new_tokens=n_tokens, pad_token_id=pad)
            out += [b + gen[j, width:].tolist() for j, b in enumerate(batch)]
    return out


def text_nll(model, seqs: list[list[int]], n_scored: int, pad: int, batch_size: int = 16) -> list[float]:
    """Mean NLL per token of the last n_scored tokens of each sequence (plain text, no template)."""
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(seqs), batch_size):
            chunk = seqs[i:i + batch_size]
            width = max(map(len, chunk))
            ids = torch.tensor([s + [pad] * (width - len(s)) for s in chunk])
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in chunk])
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            lp = logits.log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
            for j, s in enumerate(chunk):  # predictions of tokens len-n_scored .. len-1
                out.append(-lp[j, len(s) - 1 - n_scored:len(s) - 1].mean().item())
    return out


# Retention tolerances, in nats per token of KL(base || model) on general text (see `retention`).
# SFT teaches a format the base never uses: it may move general text, but by at most SFT_DRIFT (the
# model's perplexity on the base's own text at most e^0.5 = 1.65x the base's). Every later stage
# changes one preference, not the language: it may add at most STAGE_DRIFT beyond its parent.
SFT_DRIFT = 0.5
STAGE_DRIFT = 0.2


def kl_rows(rows: list[dict], parents: dict[str, str | None], *, sft_drift: float = SFT_DRIFT,
            stage_drift: float = STAGE_DRIFT) -> list[dict]:
    """Adds to each row (label, per_sequence NLLs on the same sequences) its KL from the base (the mean
    paired difference, with its standard error) and the verdict against the tolerances: a model
    trained from the base (SFT, control of a chain without SFT) is held to sft_drift from the base; a
    model trained from another evaluated model to stage_drift beyond that parent."""
    by = {r["label"]: r for r in rows}
    base = by.get("base")
    for r in rows:
        r.update(nll=sum(r["per_sequence"]) / len(r["per_sequence"]), kl_from_base=None, kl_se=None, parent=None,
                 added=None, allowed=None, within_tolerance=None)
    if base is None:
        return rows
    for r in rows:
        d = [a - b for a, b in zip(r["per_sequence"], base["per_sequence"], strict=True)]
        mean = sum(d) / len(d)
        se = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d)) if len(d) > 1 else 0.0
        r.update(kl_from_base=mean, kl_se=se)
    for r in rows:
        if r is base:
            continue
        parent = parents.get(r["label"])
        parent = parent if parent in by and parent != "base" else None
        added = r["kl_from_base"] - (by[parent]["kl_from_base"] if parent else 0.0)
        allowed = stage_drift if parent else sft_drift
        r.update(parent=parent or "base", added=added, allowed=allowed, within_tolerance=added <= allowed)
    return rows


def retention(config: str, *, n_tokens: int = 32, seed: int = 0, sft_drift: float = SFT_DRIFT,
              stage_drift: float = STAGE_DRIFT) -> dict:
    """NLL per token, for every model the chain's eval compares, of general text the *base* model sampled
    (48 prose prefixes, 32 sampled tokens each, plain text, no chat template). The base's NLL on its own
    samples estimates its entropy; a model's NLL minus the base's estimates KL(base || model) per token:
    how far the chain moved the model away from what it knew, outside the task. Reported with the
    standard error of the paired per-sequence differences, and judged per stage: what a stage adds
    beyond its parent against the tolerances above. Writes <output_dir>/retention.json and retention.md."""
    import torch

    from posttrain import config as config_mod
    from posttrain import lineage, models
    from posttrain.stages import eval as eval_stage

    cfg = config_mod.load_config(config)
    torch.manual_seed(seed)
    root = Path(cfg.output_dir)
    t0 = time.time()
    cache = root / "retention-text.json"  # the base's samples: drawn once, reused while these match
    key = {"model": cfg.model.name_or_path, "n_tokens": n_tokens, "seed": seed, "prefixes": GENERAL}
    tok = models.load_tokenizer(cfg, need_masks=True)
    cached = json.loads(cache.read_text()) if cache.is_file() else {}
    if cached.get("key") == key:
        seqs = cached["sequences"]
    else:
        seqs = retention_text(cfg, tok.tokenizer, n_tokens=n_tokens, seed=seed)
        cache.write_text(json.dumps({"key": key, "sequences": seqs}))
    pad = tok.tokenizer.pad_token_id
    device = torch.device("cpu")
    targets = [(label, path) for label, path in lineage.eval_models(cfg) if label == "base" or Path(path).is_dir()]
    rows = []
    for label, path in targets:
        mtok = models.load_tokenizer(cfg, eval_stage.tokenizer_source(path), need_masks=True)
        probes = [mtok.tokenizer(p)["input_ids"][:16] for p in GENERAL[:4]]
        model, _ = eval_stage.load_model(cfg, path, mtok, device, probes=probes)
        per_seq = text_nll(model, seqs, n_tokens, pad)
        rows.append({"label": label, "path": path, "per_sequence": per_seq})
        print(f"retention: {label}: NLL {sum(per_seq) / len(per_seq):.4f} per token ({len(per_seq)} x {n_tokens})",
              flush=True)
        del model
    parents = {label: eval_stage.parent_label(path, targets) for label, path in targets}
    kl_rows(rows, parents, sft_drift=sft_drift, stage_drift=stage_drift)
    result = {"sft_drift": sft_drift, "stage_drift": stage_drift, "n_prefixes": len(seqs),
              "tokens_per_prefix": n_tokens, "seed": seed, "models": rows, "wall_time_s": round(time.time() - t0, 1)}
    (root / "retention.json").write_text(json.dumps(result, indent=2) + "\n")
    md = retention_table(result)
    (root / "retention.md").write_text(md)
    print(md)
    return result


def retention_table(result: dict) -> str:
    lines = [f"Retention: NLL per token of {result['n_prefixes']} general-text continuations "
             f"({result['tokens_per_prefix']} tokens each) that the base model sampled itself (temperature 1, "
             "plain text); NLL − base NLL estimates KL(base ‖ model) per token (± one standard error of the "
             f"paired per-sequence differences). Tolerance: a model trained from the base (SFT) moves it by at "
             f"most {result['sft_drift']} nats/token; each later stage adds at most {result['stage_drift']} "
             "beyond its parent.", "",
             "| model | NLL / token | KL from base (nats/token) | parent | added | allowed | within tolerance |",
             "|---|---|---|---|---|---|---|"]
    for r in result["models"]:
        if r["kl_from_base"] is None or r["label"] == "base":
            lines.append(f"| {r['label']} | {r['nll']:.4f} | – | – | – | – | – |")
            continue
        lines.append(f"| {r['label']} | {r['nll']:.4f} | {r['kl_from_base']:+.4f} ± {r['kl_se']:.4f} | {r['parent']} "
                     f"| {r['added']:+.4f} | ≤ {r['allowed']} | {'yes' if r['within_tolerance'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m posttrain.realtask", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data", help="write the task's data files into DIR")
    d.add_argument("dir")
    d.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("retention", help="KL from the base model on general text, for every model of a chain")
    r.add_argument("config")
    r.add_argument("--sft-drift", type=float, default=SFT_DRIFT,
                   help="nats/token a model trained from the base may move it")
    r.add_argument("--stage-drift", type=float, default=STAGE_DRIFT,
                   help="nats/token each later stage may add beyond its parent")
    args = ap.parse_args(argv)
    if args.cmd == "data":
        for name, p in write_data(args.dir, args.seed).items():
            print(f"{name}: {sum(1 for _ in p.open())} rows -> {p}")
    else:
        retention(args.config, sft_drift=args.sft_drift, stage_drift=args.stage_drift)
    return 0


if __name__ == "__main__":
    sys.exit(main())
