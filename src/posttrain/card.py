"""Model cards: a README.md in the Hugging Face model-card format for every finished stage.

Written from the stage's manifest just before it (posttrain.json last: a card alone never makes a
directory look finished), and rewritten by the eval stage with the model's row of the eval table.
The YAML front matter carries what the Hub indexes: base_model, datasets (local files by name and
content hash), library_name (peft for an adapter), tags (posttrain, trl for the TRL stages, the
method) and the license when the parent's card names one. The body says what the stage did and
from what, the settings that matter, its key metrics, how to load it and its limits. It holds
nothing the manifest does not: no token (the config refuses one), and no path the user did not
give (the config's paths and the stage's output directory).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

from posttrain import registry

CARD = "README.md"
# Stage settings worth a line besides `training:` (the rest is in posttrain.json and config.resolved.yaml).
SETTINGS = ("method", "reference", "loss_type", "beta", "assistant_only_loss", "kl_coef", "cliprange", "gamma",
            "lam", "batch_size", "mini_batch_size", "ppo_epochs", "max_new_tokens", "temperature", "ptx_coef",
            "steps", "dtype", "nf4_round_trip", "tolerance")


def write(directory: str | Path, m: dict, key_metrics: dict, evaluation: list[dict] | None = None) -> Path:
    """Write README.md for the finished stage described by manifest `m`; `evaluation`: the eval
    stage's rows for this model (itself and what it is compared with)."""
    path = Path(directory) / CARD
    tmp = path.with_name(f".{CARD}.tmp")
    tmp.write_text(render(Path(directory), m, key_metrics, evaluation), encoding="utf-8")
    tmp.replace(path)
    return path


def render(directory: Path, m: dict, key_metrics: dict, evaluation: list[dict] | None = None) -> str:
    stage = m.get("stage", "")
    record = registry.STAGES.get(stage)
    cfg = m.get("config") or {}
    adapter = (directory / "adapter_config.json").is_file()
    front = {k: v for k, v in {
        "base_model": _base_model(m, cfg, adapter) if record and (record.model or record.role == "export") else None,
        "datasets": _datasets(m) or None,
        "library_name": "gguf" if stage == "export" else None if not (record and record.model)
        else "peft" if adapter else "transformers",
        "license": _parent_license(m),
        "pipeline_tag": "text-generation" if record and record.compared else None,
        "tags": _tags(stage, record, m),
    }.items() if v}
    lines = ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip(), "---", "",
             f"# {directory.name}: posttrain {stage}", ""]
    if record:
        lines += [record.help, ""]
    lines += [_lineage(m, cfg), ""]
    settings = _settings(m, cfg, record)
    if settings:
        lines += ["## Settings", "", "| setting | value |", "|---|---|"]
        lines += [f"| {k} | {_cell(v)} |" for k, v in settings.items()] + [""]
    shown = {k: v for k, v in key_metrics.items() if v is not None}
    if shown:
        lines += ["## Key metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_cell(v)} |" for k, v in shown.items()] + [""]
    if evaluation:
        lines += _evaluation(evaluation) + [""]
    if record and record.model:
        lines += _how_to_load(directory.name, record.role, adapter, m) + [""]
    elif stage == "export":
        lines += _how_to_run(m) + [""]
    lines += _limits(stage, m) + [""]
    versions = m.get("versions") or {}
    made = ", ".join(f"{k} {versions[k]}" for k in ("posttrain", "trl", "transformers", "peft") if k in versions)
    lines += [f"Made with {made or 'posttrain'}, finished {m.get('finished', '')}; the full record is "
              "`posttrain.json` in this directory.", ""]
    return "\n".join(lines)


def _base_model(m: dict, cfg: dict, adapter: bool) -> str | None:
    """The model under an adapter (its base), else the model this one was trained from (the parent),
    else the chain's starting model. Paths and names as the user gave them."""
    if adapter and m.get("adapter_base"):
        return m["adapter_base"]
    parent = m.get("parent") or {}
    return parent.get("path") or (cfg.get("model") or {}).get("name_or_path")


def _datasets(m: dict) -> list[str]:
    """Local files by name and content hash (a Hub dataset id would be its name)."""
    files = dict((m.get("data") or {}).get("files") or {})
    for d in (m.get("datasets") or {}).values():
        files.update(d.get("files") or {})
    return [f"{Path(name).name}@{h}" for name, h in files.items()]


def _parent_license(m: dict) -> str | None:
    parent = (m.get("parent") or {}).get("path")
    card = Path(parent) / CARD if parent and Path(parent).is_dir() else None
    if card is None or not card.is_file():
        return None
    front = read_front_matter(card.read_text(encoding="utf-8"))
    return front.get("license") if isinstance(front.get("license"), str) else None


def read_front_matter(text: str) -> dict:
    if not text.startswith("---\n") or "\n---" not in text[4:]:
        return {}
    try:
        found = yaml.safe_load(text[4:text.index("\n---", 4)])
    except yaml.YAMLError:
        return {}
    return found if isinstance(found, dict) else {}


def _tags(stage: str, record, m: dict) -> list[str]:
    tags = ["posttrain"]
    if record and record.trl_config:
        tags.append("trl")
    tags.append(stage)
    method = m.get("method")
    if method in ("lora", "qlora"):
        tags.append(method)
    if stage == "reward":
        tags.append("reward-model")
    if stage == "export":
        tags += ["gguf", str(m.get("type"))]
    return tags


def _lineage(m: dict, cfg: dict) -> str:
    parent = m.get("parent") or {}
    start = (cfg.get("model") or {}).get("name_or_path")
    if not parent:
        text = f"Made from the data of the chain that starts at `{start}`." if start else ""
    else:
        what = f"the {parent['stage']} stage" if parent.get("stage") else "the model"
        text = f"Started from {what} at `{parent.get('path')}`" + (
            f"; the chain starts at `{start}`." if start and start != parent.get("path") else ".")
    origin = m.get("origin")
    if origin:
        text += (f" The weights come from the GGUF file `{origin.get('file')}` (SHA-256 "
                 f"{str(origin.get('sha256', ''))[:16]}, {origin.get('quantization')}), dequantised.")
    return text


def _settings(m: dict, cfg: dict, record) -> dict:
    out = {k: m[k] for k in SETTINGS if k in m and m[k] is not None}
    section = cfg.get(record.section) if record else None
    if isinstance(section, dict):
        out.update({k: section[k] for k in SETTINGS if k in section and k not in out and section[k] is not None})
        if out.get("method") in ("lora", "qlora") and isinstance(section.get("lora"), dict):
            lora = section["lora"]
            out["lora"] = f"r {lora.get('r')}, alpha {lora.get('alpha')}, target {lora.get('target_modules')}"
        out.update({f"training.{k}": v for k, v in (section.get("training") or {}).items() if k not in out})
    template = (cfg.get("template") or {}).get("name")
    if template and record and record.role != "eval":
        out["chat template"] = template
    return out


def _evaluation(rows: list[dict]) -> list[str]:
    """This model's eval row beside the rows it is compared with, with its differences from the first."""
    keys = [k for k in rows[0]["metrics"] if any(r["metrics"].get(k) is not None for r in rows)]
    lines = ["## Evaluation", "", "Held-out data, same settings for every model (the eval stage's eval.json); "
             "differences from the first row in parentheses.", "",
             "| model | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    first = rows[0]["metrics"]
    for r in rows:
        cells = []
        for k in keys:
            v, base = r["metrics"].get(k), first.get(k)
            delta = "" if r is rows[0] or not _number(v) or not _number(base) else f" ({v - base:+.3g})"
            cells.append(_cell(v) + delta)
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    return lines


def eval_metrics(row: dict) -> dict:
    """One model's row of eval.json as its card shows it: held-out NLL and pair accuracy, then per decoding each
    scorer, the mean reward and the mean KL."""
    out = {"held-out NLL": (row.get("nll") or {}).get("nll"),
           "pair accuracy": (row.get("preference") or {}).get("accuracy")}
    for name, dm in (row.get("decodings") or {}).items():
        out.update({f"{name} {s}": v for s, v in (dm.get("scores") or {}).items()})
        out[f"{name} reward"] = (dm.get("reward") or {}).get("mean")
        out[f"{name} KL"] = (dm.get("kl") or {}).get("mean")
    return out


def _how_to_load(name: str, role: str, adapter: bool, m: dict) -> list[str]:
    repo = f"<this directory or repo id, e.g. ./{name}>"
    if role == "reward":
        load = ("from transformers import AutoModelForSequenceClassification, AutoTokenizer\n"
                f"model = AutoModelForSequenceClassification.from_pretrained(\"{repo}\", num_labels=1)")
        use = "# score = model(**tok.apply_chat_template(conversation, return_tensors=\"pt\", return_dict=True)).logits"
    elif adapter:
        load = ("from peft import AutoPeftModelForCausalLM\nfrom transformers import AutoTokenizer\n"
                f"model = AutoPeftModelForCausalLM.from_pretrained(\"{repo}\")  # loads the base, then this adapter")
        use = _generate_lines()
    else:
        load = ("from transformers import AutoModelForCausalLM, AutoTokenizer\n"
                f"model = AutoModelForCausalLM.from_pretrained(\"{repo}\")")
        use = _generate_lines()
    eot = (m.get("special_tokens") or {}).get("eot")
    return ["## How to load", "", "```python", load, f"tok = AutoTokenizer.from_pretrained(\"{repo}\")", use, "```",
            "", "The chat template the model was trained with is the tokenizer's (`chat_template.jinja`); "
            + (f"generation stops at its end-of-turn token (id {eot}, in generation_config.json)." if eot is not None
               else "render conversations with it.")]


def _how_to_run(m: dict) -> list[str]:
    """An exported file: llama.cpp, Ollama (the Modelfile beside it), llama-cpp-python."""
    file = (m.get("file") or {}).get("file", "<file>.gguf")
    trip = (m.get("checks") or {}).get("round_trip") or {}
    lines = ["## How to run", "", "llama.cpp (the chat template and end-of-turn token are in the file):", "",
             "```sh", f"llama-cli -m {file} -cnv", f"llama-server -m {file}   # OpenAI-compatible server", "```", "",
             "Ollama (the Modelfile beside the file holds the template in Ollama's syntax and the stop tokens):", "",
             "```sh", "ollama create my-model -f Modelfile", "ollama run my-model", "```", "",
             "Python (llama-cpp-python):", "", "```python", "from llama_cpp import Llama",
             f"llm = Llama(model_path=\"{file}\")",
             "print(llm.create_chat_completion([{\"role\": \"user\", \"content\": \"Hello!\"}]))", "```"]
    if trip:
        lines += ["", f"Checked when exported: read back with transformers, its logits are within "
                  f"{trip.get('relative_diff', 0):.2e} of the source model's logit scale (tolerance "
                  f"{trip.get('tolerance')}), and {trip.get('same_answers')} of {trip.get('probes')} greedy answers "
                  "to the probe prompts are the same."]
    return lines


def _generate_lines() -> str:
    return ("ids = tok.apply_chat_template([{\"role\": \"user\", \"content\": \"Hello!\"}], "
            "add_generation_prompt=True, return_tensors=\"pt\", return_dict=True)\n"
            "out = model.generate(**ids, max_new_tokens=64)\n"
            "print(tok.decode(out[0, ids[\"input_ids\"].shape[1]:], skip_special_tokens=True))")


def _limits(stage: str, m: dict) -> list[str]:
    rows = (m.get("data") or {}).get("rows")
    lines = ["## Limits", ""]
    if rows:
        lines.append(f"- Trained on {rows:,} rows of the data named above; it knows what they show and no more.")
    if stage == "reward":
        lines.append("- A reward model scores what its preference pairs rewarded; outside them its scores mean little.")
    record = registry.STAGES.get(stage)
    if record and (record.rl or record.policy and record.data == "preference"):  # RL and DPO
        lines.append("- Optimised against a reward or preferences: check the eval's KL and held-out likelihoods for "
                     "reward hacking, not only the score.")
    if m.get("origin"):
        lines.append("- Its starting weights are a dequantised GGUF image, not the original checkpoint.")
    lines.append("- Not evaluated for safety; use it as the evaluation shows, not beyond.")
    return lines


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return str(v)
