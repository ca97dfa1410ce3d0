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
    return write_rows(directory, make_rows(seed))


def write_rows(directory: str | Path, splits: dict[str, list[dict]]) -> dict[str, Path]:
    """<directory>/<split>.jsonl for each split; a file whose content is unchanged is not rewritten
    (it keeps its mtime)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, rows in splits.items():
        p = directory / f"{name}.jsonl"
        text = "".join(json.dumps(r) + "\n" for r in rows)
        if not p.is_file() or p.read_text() != text:
            p.write_text(text)
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
