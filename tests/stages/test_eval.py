"""`posttrain eval`, the control stage and the report, on a tiny chain trained once per module:
format → sft → reward → dpo (LoRA) → merge → control → eval, through the real CLI.

Checks: every model is evaluated with the recorded settings and the numbers move the right way
(SFT lowers the NLL the base has; the KL reference has KL 0; the merged model scores what its
adapter does); the control trains for the compute of the stages after SFT; the report holds every
stage, valid PNGs and no network resource; eval run twice gives identical numbers; an adapter
that changes nothing is refused (with a trained adapter as the positive control).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import yaml

from posttrain import metrics
from tests.helpers import BIN, ENV, ROOT, assert_clean_error, assert_ok, chain_config, cli, write_yaml

pytestmark = pytest.mark.slow

STAGES = ["format", "sft", "reward", "dpo", "merge", "control", "eval"]
PNG = b"\x89PNG\r\n\x1a\n"


def eval_config(tiny_dir, demo_data, out: Path, **changes) -> dict:
    raw = chain_config(tiny_dir, demo_data, out, stages=STAGES, **changes)
    raw["data"]["style"] = {"kind": "preference", "train": [{"path": str(demo_data / "reward_train.jsonl")}],
                            "eval": [{"path": str(demo_data / "reward_eval.jsonl")}]}
    raw["reward"] = {"data": "style", "length_correlation_warning": 0.95,
                     "training": {"max_steps": 12, "per_device_train_batch_size": 16, "learning_rate": 1e-3,
                                  "max_length": 64, "gradient_checkpointing": False, "logging_steps": 4,
                                  "save_steps": 1000}}
    raw["eval"] = {"max_samples": 12, "batch_size": 12, "max_new_tokens": 12,
                   "decoding": [{"name": "greedy", "temperature": 0}, {"name": "sampled", "temperature": 1.0}],
                   "scorers": [{"name": "exact", "kind": "regex", "pattern": r"(-?\d+)\D*$"},
                               {"name": "concise", "kind": "function", "function": "posttrain.demo:concise_reward"}],
                   "show_samples": 2}
    return raw


# Planted in the environment of the chain run: no artifact and no log line may contain them.
SECRETS = {"HF_TOKEN": "hf_PLANTEDsecret0123456789", "WANDB_API_KEY": "wandb-PLANTED-key-0123456789",
           "HUGGING_FACE_HUB_TOKEN": "hf_PLANTEDlegacy0123456789"}


@pytest.fixture(scope="module")
def chain(tiny_dir, demo_data, tmp_path_factory):
    import subprocess

    tmp = tmp_path_factory.mktemp("eval-chain")
    out = tmp / "out"
    cfg = write_yaml(tmp / "chain.yaml", eval_config(tiny_dir, demo_data, out))
    r = subprocess.run([str(BIN), "run", str(cfg)], capture_output=True, text=True, cwd=ROOT,
                       env={**ENV, **SECRETS}, timeout=900)
    assert_ok(r)
    (tmp / "run.log").write_text(r.stdout + r.stderr)
    return cfg, out


def results(d: Path) -> dict:
    return json.loads((d / "eval.json").read_text())


def by_label(d: Path) -> dict[str, dict]:
    return {m["label"]: m for m in results(d)["models"]}


def test_every_model_is_evaluated_with_recorded_settings(chain):
    _, out = chain
    ev = results(out / "eval")
    assert [m["label"] for m in ev["models"]] == ["base", "sft", "control", "dpo", "merge"]
    assert {m["label"]: m["parent"] for m in ev["models"]} == {
        "base": None, "sft": "base", "control": "sft", "dpo": "sft", "merge": "dpo"}
    s = ev["settings"]
    assert s["prompts"] == 12 and s["pair_count"] == 12 and s["seed"] == 0 and s["max_new_tokens"] == 12
    assert [d["name"] for d in s["decoding"]] == ["greedy", "sampled"]
    assert s["reward_model"].endswith("reward") and s["kl_reference"].endswith("sft")
    lines = (out / "eval" / "generations.jsonl").read_text().splitlines()
    assert len(lines) == 5 * 2 * 12  # every model, decoding and prompt
    assert len(ev["samples"]) == 2 and set(ev["samples"][0]["responses"]) == {"base", "sft", "control", "dpo", "merge"}


def test_no_artifact_or_log_holds_a_planted_secret(chain):
    """Every file the chain wrote (weights, checkpoints, manifests, configs, reports, TRL's pickled
    training arguments) and its terminal output, searched byte by byte."""
    cfg, out = chain
    files = [p for p in out.rglob("*") if p.is_file()] + [cfg.parent / "run.log"]
    assert len(files) > 50 and any(p.name == "training_args.bin" for p in files)
    for p in files:
        data = p.read_bytes()
        for secret in SECRETS.values():
            assert secret.encode() not in data, f"{secret} in {p}"


def test_numbers_move_the_right_way(chain):
    _, out = chain
    m = by_label(out / "eval")
    assert m["sft"]["nll"]["nll"] < m["base"]["nll"]["nll"] - 1.0  # SFT learned the held-out answers
    for name in ("greedy", "sampled"):
        assert m["sft"]["decodings"][name]["kl"]["mean"] == pytest.approx(0.0, abs=1e-5)  # the reference itself
        assert m["dpo"]["decodings"][name]["kl"]["mean"] > 0.0
        assert m["base"]["decodings"][name]["scores"]["concise"] == 0.0  # a random model: no "a + b = s"
        for row in m.values():
            d = row["decodings"][name]
            assert math.isfinite(d["reward"]["mean"]) and len(d["reward_scores"]) == 12
            assert ("win_rate_vs_base" in d) == (row["label"] != "base")
            if row["parent"]:  # against the parent's responses to the same prompts, same decoding
                parent = m[row["parent"]]["decodings"][name]["reward_scores"]
                assert d["win_rate_vs_parent"] == metrics.win_rate(d["reward_scores"], parent)
    assert m["control"]["nll"]["nll"] < m["sft"]["nll"]["nll"]  # more SFT: lower held-out NLL still
    # the merged model is the DPO adapter applied: the same numbers (fp32 merge)
    assert m["merge"]["nll"]["nll"] == pytest.approx(m["dpo"]["nll"]["nll"], rel=1e-4)
    assert m["merge"]["decodings"]["greedy"]["scores"] == m["dpo"]["decodings"]["greedy"]["scores"]
    assert m["dpo"]["loaded"]["kind"] == "adapter" and m["dpo"]["loaded"]["adapter_effect_max_abs_logit"] > 1e-4
    assert m["dpo"]["preference"]["margin"] > m["sft"]["preference"]["margin"]  # DPO widens the held-out margin


def test_control_matches_the_compute_of_the_later_stages(chain):
    _, out = chain
    from posttrain import manifest

    reward_seqs = 2 * 12 * 16  # chosen + rejected, 12 steps of 16 pairs
    dpo_seqs = 2 * 24 * 8  # 24 steps of 8 pairs
    expected = math.ceil((reward_seqs + dpo_seqs) / 16)  # SFT's batch: 16 conversations
    m = manifest.read(out / "control")
    assert m["stage"] == "control" and m["control"]["matched"] == {"reward": reward_seqs, "dpo": dpo_seqs}
    assert m["control"]["steps"] == expected == m["metrics"]["steps"]
    assert Path(m["parent"]["path"]).name == "sft"


def test_report_has_every_stage_valid_pngs_and_nothing_from_the_network(chain):
    from PIL import Image

    _, out = chain
    md = (out / "report.md").read_text()
    page = (out / "report.html").read_text()
    for stage in STAGES:
        assert f"| {stage} |" in md, stage  # the lineage table
    assert "| control |" in md and "model − control" in md  # the control row and the comparison with it
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(images) >= 5  # bars, reward histogram, curves of sft, reward, dpo, control
    for rel in images:
        p = out / rel
        assert p.read_bytes()[:8] == PNG, rel
        with Image.open(p) as im:
            im.verify()
    # every image is embedded; nothing is fetched
    assert page.count("src='data:image/png;base64,") == len(images)
    assert not re.search(r"https?://|<script|<link|@import|url\(", page, re.I)
    assert re.findall(r"src='([^']*)'", page) and all(s.startswith("data:") for s in re.findall(r"src='([^']*)'", page))
    # samples of the same prompt side by side
    assert "Sample generations" in md and md.count("Prompt: What is") == 2


def test_every_stage_has_a_model_card_and_the_models_carry_their_eval_rows(chain):
    """Issue 18: README.md in the Hugging Face format in every finished stage directory; after eval,
    each compared model's card holds its row beside the base model's (and its parent's)."""
    from posttrain import card

    _, out = chain
    fronts = {}
    for stage in STAGES:
        text = (out / stage / "README.md").read_text()
        fronts[stage] = card.read_front_matter(text)
        assert fronts[stage]["tags"][0] == "posttrain" and stage in fronts[stage]["tags"], stage
        if stage in ("sft", "dpo", "merge", "control"):
            table = text.split("## Evaluation")[1].split("\n## ")[0]
            rows = [line.split(" | ")[0][2:] for line in table.splitlines() if line.startswith("| ")][1:]
            parent = by_label(out / "eval")[stage]["parent"]
            assert rows == list(dict.fromkeys(["base", parent, stage])), (stage, rows)
        else:
            assert "## Evaluation" not in text, stage
    assert fronts["dpo"]["library_name"] == "peft" and fronts["dpo"]["base_model"].endswith("sft")
    assert fronts["merge"]["library_name"] == "transformers" and "reward-model" in fronts["reward"]["tags"]
    assert fronts["sft"]["datasets"] and all("@" in d for d in fronts["sft"]["datasets"])


def test_eval_twice_gives_identical_numbers(chain, tmp_path):
    cfg, out = chain
    runs = []
    for name in ("a", "b"):
        d = tmp_path / name
        assert_ok(cli("eval", cfg, "--models", out / "sft", "--models", out / "dpo", "-o", d))
        runs.append(results(d))
    for r in runs:
        for m in r["models"]:
            m.pop("seconds")
    assert runs[0] == runs[1]
    assert [m["label"] for m in runs[0]["models"]] == ["sft", "dpo"]
    assert runs[0]["models"][1]["parent"] == "sft"


def test_an_adapter_that_changes_nothing_is_refused(chain, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    cfg, out = chain
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(out / "sft")),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    empty = tmp_path / "empty"
    model.save_pretrained(str(empty))  # LoRA's B starts at zero: this adapter is a no-op
    r = cli("eval", cfg, "--models", empty, "-o", tmp_path / "e1")
    assert_clean_error(r, "does not change its base's outputs", str(empty))
    assert not (tmp_path / "e1" / "posttrain.json").exists()

    with torch.no_grad():  # positive control: the same adapter with B moved does change the outputs
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.05)
    moved = tmp_path / "moved"
    model.save_pretrained(str(moved))
    assert_ok(cli("eval", cfg, "--models", moved, "-o", tmp_path / "e2"))
    loaded = results(tmp_path / "e2")["models"][0]["loaded"]
    assert loaded["kind"] == "adapter" and loaded["adapter_effect_max_abs_logit"] > 1e-4


def test_a_rerun_of_the_chain_skips_everything_and_rewrites_the_report(chain):
    cfg, out = chain
    before = (out / "eval" / "posttrain.json").read_bytes()
    (out / "report.html").unlink()
    assert_ok(cli("run", cfg))
    summary = json.loads((out / "posttrain-chain.json").read_text())
    assert {r["stage"]: r["status"] for r in summary["stages"]} == {s: "up to date" for s in STAGES}
    assert (out / "eval" / "posttrain.json").read_bytes() == before
    assert (out / "report.html").is_file()
    # time and memory are those of the run that made each stage, not of skipping it
    sft = next(r for r in summary["stages"] if r["stage"] == "sft")
    assert sft["seconds"] > 1 and sft["peak_rss_mb"] > 100


def test_eval_before_the_chain_ran_or_of_a_missing_model_is_a_clean_error(tiny_dir, demo_data, tmp_path):
    cfg = write_yaml(tmp_path / "chain.yaml", eval_config(tiny_dir, demo_data, tmp_path / "out"))
    assert_clean_error(cli("eval", cfg), "holds no finished sft stage", "posttrain run")
    assert_clean_error(cli("eval", cfg, "--models", tmp_path / "nothere"), "does not exist")
    assert not (tmp_path / "out" / "eval").exists()


def test_eval_reruns_alone_when_its_scorer_code_changes(chain):
    """A scorer next to the config is part of eval's key: editing it reruns eval, nothing else."""
    cfg_path, out = chain
    raw = yaml.safe_load(cfg_path.read_text())
    raw["eval"]["scorers"].append({"name": "mine", "kind": "function", "function": "mine:score"})
    d = cfg_path.parent / "keyed"
    d.mkdir()
    cfg = write_yaml(d / "chain.yaml", raw)

    def run_with(value: float) -> dict[str, str]:
        (d / "mine.py").write_text(f"def score(prompts, completions, **kw):\n    return [{value}] * len(completions)\n")
        assert_ok(cli("run", cfg))
        summary = json.loads((out / "posttrain-chain.json").read_text())
        return {r["stage"]: r["status"] for r in summary["stages"]}

    assert run_with(0.25) == {**{s: "up to date" for s in STAGES}, "eval": "ran"}
    assert by_label(out / "eval")["sft"]["decodings"]["greedy"]["scores"]["mine"] == 0.25
    assert run_with(0.75)["eval"] == "ran"
    assert by_label(out / "eval")["sft"]["decodings"]["greedy"]["scores"]["mine"] == 0.75
    assert run_with(0.75)["eval"] == "up to date"


def test_control_reruns_when_its_step_count_changes(chain):
    cfg, out = chain
    assert_ok(cli("run", cfg, "--set", "control.steps=5"))
    summary = json.loads((out / "posttrain-chain.json").read_text())
    status = {r["stage"]: r["status"] for r in summary["stages"]}
    assert status == {**{s: "up to date" for s in STAGES}, "control": "ran", "eval": "ran"}
    from posttrain import manifest

    assert manifest.read(out / "control")["metrics"]["steps"] == 5
