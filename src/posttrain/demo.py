"""The offline demo task: two-digit addition, answered in two styles.

"What is 39 + 45?" is answered either concisely ("39 + 45 = 84", the preferred style) or
verbosely ("Well, I think the answer is 84."). SFT data mixes both styles, so the SFT model
learns the skill and produces both styles; preference pairs prefer the concise one (and a
correct sum over a sum off by one digit), so the later stages (reward model, PPO, DPO) have a
preference to learn that a tiny model can judge. Exact match (the answer's last number equals
the sum) measures the skill; `concise` measures the style. The reward model's pairs are style only
(concise over verbose, both correct): that is what a tiny reward model can judge, and what PPO
then optimises; exact match shows whether the skill survives it. Held-out prompts use (a, b) pairs
that no training row contains. Deterministic from the seed.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

CONCISE_SHARE = 0.6
SPLITS = {"sft_train": 4000, "sft_eval": 500, "pref_train": 2000, "pref_eval": 300,
          "reward_train": 1000, "reward_eval": 200}
NUMBER = re.compile(r"-?\d+")
CONCISE = re.compile(r"^\s*(\d+) \+ (\d+) = (\d+)\s*$")


def question(a: int, b: int) -> str:
    return f"What is {a} + {b}?"


def concise(a: int, b: int, s: int | None = None) -> str:
    return f"{a} + {b} = {a + b if s is None else s}"


def verbose(a: int, b: int, s: int | None = None) -> str:
    return f"Well, I think the answer is {a + b if s is None else s}."


def off_by_one_digit(s: int, rng: random.Random) -> int:
    digits = list(str(s))
    i = rng.randrange(len(digits))
    d = int(digits[i])
    choices = [x for x in (d - 1, d + 1) if 0 <= x <= 9 and not (i == 0 and x == 0)]
    digits[i] = str(rng.choice(choices))
    return int("".join(digits))


def make_rows(seed: int = 0) -> dict[str, list[dict]]:
    """All demo splits, as rows in the shapes posttrain reads (messages / prompt-chosen-rejected)."""
    rng = random.Random(seed)
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    rng.shuffle(pairs)
    n_eval = SPLITS["sft_eval"] + SPLITS["pref_eval"]
    held_out, pool = pairs[:n_eval], pairs[n_eval:]
    out: dict[str, list[dict]] = {}
    out["sft_train"] = [
        {"messages": [
            {"role": "user", "content": question(a, b)},
            {"role": "assistant", "content": concise(a, b) if rng.random() < CONCISE_SHARE else verbose(a, b)},
        ]}
        for a, b in pool[: SPLITS["sft_train"]]
    ]
    out["sft_eval"] = [
        {"messages": [{"role": "user", "content": question(a, b)}, {"role": "assistant", "content": concise(a, b)}]}
        for a, b in held_out[: SPLITS["sft_eval"]]
    ]

    def pref(a: int, b: int) -> dict:
        if rng.random() < 0.5:  # style preference: concise over verbose, both correct
            chosen, rejected = concise(a, b), verbose(a, b)
        else:  # correctness preference: right sum over a sum off by one digit
            chosen, rejected = concise(a, b), concise(a, b, off_by_one_digit(a + b, rng))
        return {"prompt": question(a, b), "chosen": chosen, "rejected": rejected}

    pref_pool = pool[SPLITS["sft_train"]:] + pool[: SPLITS["sft_train"]]
    out["pref_train"] = [pref(a, b) for a, b in pref_pool[: SPLITS["pref_train"]]]
    out["pref_eval"] = [pref(a, b) for a, b in held_out[SPLITS["sft_eval"]:]]

    # The reward model's pairs are about style only: a tiny model can judge how an answer is given
    # (concise vs verbose) far better than whether a sum is right (pairwise accuracy ~0.6).
    def style(a: int, b: int) -> dict:
        return {"prompt": question(a, b), "chosen": concise(a, b), "rejected": verbose(a, b)}

    out["reward_train"] = [style(a, b) for a, b in pool[: SPLITS["reward_train"]]]
    out["reward_eval"] = [style(a, b) for a, b in held_out[SPLITS["sft_eval"]:][: SPLITS["reward_eval"]]]
    return out


def write_data(directory: str | Path, seed: int = 0) -> dict[str, Path]:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, rows in make_rows(seed).items():
        p = directory / f"{name}.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths[name] = p
    return paths


def corpus(seed: int = 0) -> list[str]:
    """Text to train the tiny tokenizer on: every string the demo data contains."""
    texts = ["system", "user", "assistant"] * 50
    for rows in make_rows(seed).values():
        for r in rows:
            if "messages" in r:
                texts += [m["content"] for m in r["messages"]]
            else:
                texts += [r["prompt"], r["chosen"], r["rejected"]]
    return texts


def score(prompt: str, response: str) -> dict[str, float]:
    """exact: the answer's last number is the sum; concise: the answer is in the concise style."""
    a, b = (int(x) for x in NUMBER.findall(prompt)[:2])
    numbers = NUMBER.findall(response)
    exact = float(bool(numbers) and int(numbers[-1]) == a + b)
    m = CONCISE.match(response)
    return {"exact": exact, "concise": float(bool(m) and (int(m[1]), int(m[2])) == (a, b))}


def exact_reward(prompts, completions, **kwargs) -> list[float]:
    """Verifier reward for GRPO/RLOO on the demo task (`posttrain.demo:exact_reward`): 1.0 when the
    answer's last number is the sum asked for, else 0.0. Takes TRL's conversational or text form."""
    def text(x):
        return x[-1]["content"] if isinstance(x, list) else x

    return [score(text(p), text(c))["exact"] for p, c in zip(prompts, completions, strict=True)]


def concise_reward(prompts, completions, **kwargs) -> list[float]:
    """The demo's style as a function (`posttrain.demo:concise_reward`): 1.0 for "a + b = s"."""
    def text(x):
        return x[-1]["content"] if isinstance(x, list) else x

    return [score(text(p), text(c))["concise"] for p, c in zip(prompts, completions, strict=True)]


def evaluate(model_dir: str | Path, eval_file: str | Path, n: int = 200, batch_size: int = 64,
             sample: bool = False, seed: int = 0) -> dict[str, float]:
    """Greedy (or, with `sample`, temperature-1 sampled) answers of the model in `model_dir` to the
    first `n` held-out prompts, scored. Sampling shows the policy's whole distribution: a model
    that answers concisely 60% of the time can still be 100% concise greedily.

    Returns mean exact match, mean concise-style share, and the share of answers that ended with
    the end-of-turn token (a model that never stops is broken however right its digits are).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    rows = [json.loads(line) for line in Path(eval_file).read_text().splitlines()[:n]]
    prompts = [r["messages"][0]["content"] for r in rows]
    totals = {"exact": 0.0, "concise": 0.0, "ended": 0.0}
    torch.manual_seed(seed)
    decoding = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0} if sample else {"do_sample": False}
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                 for p in chunk]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=24, **decoding, eos_token_id=eot,
                                 pad_token_id=tok.pad_token_id)
        for p, ids in zip(chunk, out[:, enc["input_ids"].shape[1]:], strict=True):
            ids = ids.tolist()
            ended = eot in ids
            text = tok.decode(ids[: ids.index(eot)] if ended else ids, skip_special_tokens=True)
            s = score(p, text)
            totals["exact"] += s["exact"]
            totals["concise"] += s["concise"]
            totals["ended"] += float(ended)
    return {k: round(v / len(prompts), 4) for k, v in totals.items()}


def preference_accuracy(model_dir: str | Path, pref_file: str | Path) -> dict[str, float]:
    """Share of held-out pairs where the model gives the chosen answer a higher log-probability
    than the rejected one (whole answer including the end-of-turn token, given the prompt).

    Split by pair type: `style` (concise over verbose, both correct) and `correct` (right sum
    over a sum off by one digit, same style). Reference-free, so any two models compare.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    tok.padding_side = "right"
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    rows = [json.loads(line) for line in Path(pref_file).read_text().splitlines()]
    texts, starts = [], []
    for r in rows:
        user = [{"role": "user", "content": r["prompt"]}]
        prompt = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        for answer in (r["chosen"], r["rejected"]):
            texts.append(tok.apply_chat_template(user + [{"role": "assistant", "content": answer}], tokenize=False))
            starts.append(len(tok(prompt, add_special_tokens=False)["input_ids"]))
    logps = []
    for i in range(0, len(texts), 128):
        enc = tok(texts[i:i + 128], add_special_tokens=False, return_tensors="pt", padding=True)
        with torch.no_grad():
            logits = model(**enc).logits[:, :-1].log_softmax(-1)
        token_logps = logits.gather(-1, enc["input_ids"][:, 1:, None])[..., 0]
        positions = torch.arange(token_logps.shape[1])[None, :]
        first = torch.tensor(starts[i:i + 128])[:, None] - 1  # the first answer token is predicted here
        keep = (positions >= first) & (enc["attention_mask"][:, 1:] == 1)
        logps += (token_logps * keep).sum(-1).tolist()
    hits: dict[str, list[float]] = {"style": [], "correct": []}
    for j, r in enumerate(rows):
        kind = "correct" if CONCISE.match(r["rejected"]) else "style"
        hits[kind].append(float(logps[2 * j] > logps[2 * j + 1]))
    every = hits["style"] + hits["correct"]
    return {"all": round(sum(every) / len(every), 4),
            **{k: round(sum(v) / len(v), 4) if v else float("nan") for k, v in hits.items()}}


def main(argv: list[str] | None = None) -> int:
    """`python -m posttrain.demo EVAL_FILE MODEL_DIR... [--pairs PREF_EVAL]`: the demo's table."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m posttrain.demo", description=main.__doc__)
    parser.add_argument("eval_file")
    parser.add_argument("models", nargs="+")
    parser.add_argument("-n", type=int, default=200)
    parser.add_argument("--pairs", help="held-out preference pairs (jsonl) for the preference accuracy")
    args = parser.parse_args(argv)
    print(f"held-out prompts: {args.n} (pairs no stage trained on); greedy decoding")
    if args.pairs:
        print("preference accuracy: share of held-out pairs where log p(chosen) > log p(rejected) "
              "(style: concise vs verbose; correct: right sum vs off by one digit)")
    print("sampled: temperature 1, the distribution PPO optimises (greedy decoding can hide it)")
    head = f"{'model':<22} {'exact match':>11} {'concise':>8} {'ended':>6} {'sampled: exact':>14} {'concise':>8}"
    print(head + (f" {'pref (style / correct)':>23}" if args.pairs else ""))
    for m in args.models:
        r = evaluate(m, args.eval_file, args.n)
        s = evaluate(m, args.eval_file, args.n, sample=True)
        row = (f"{str(m):<22} {r['exact']:>11.1%} {r['concise']:>8.1%} {r['ended']:>6.0%} {s['exact']:>14.1%} "
               f"{s['concise']:>8.1%}")
        if args.pairs:
            p = preference_accuracy(m, args.pairs)
            row += f" {p['all']:>8.1%} ({p['style']:.0%} / {p['correct']:.0%})"
        print(row, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
