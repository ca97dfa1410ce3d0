"""lm-evaluation-harness on the tiny random-init model, with local task YAMLs (no Hub access).

The demo's question ("What is a + b?") as a generate_until task (exact_match) and a multiple_choice
task (acc) run both of lm-eval's request paths. The scoring checks need no trained model: the gold
answers are what this model does, computed here by hand. Multiple choice: the gold label is the
answer the model prefers (acc must be 1.0) or the other one (0.0), from its log-probabilities under
its chat template. Generation: the target is the model's own greedy continuation of the chat prompt
(a random model repeats the prompt's last token: newlines after the ChatML assistant header, "?"
after the raw question), so exact_match is 1.0 with the chat template applied and 0.0 without it.
A sampled generation task (scored by answer length) shows that the seed reaches the sampling.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from posttrain import demo
from posttrain.errors import PosttrainError
from posttrain.lm_eval import run_tasks

pytestmark = pytest.mark.usefixtures("one_thread")
MARGIN = 0.05  # nats / logits: hand-computed choices closer than this could flip with batching
MAX_NEW = 12
TASKS = ["add_gen", "add_mc", "add_sampled"]
SAMPLED_PY = '''def chars(doc, results):
    return {"chars": float(len(results[0]))}
'''


def _yaml(name: str, data, output_type: str, target: str) -> str:
    """A local lm-eval task: `dataset_path: json` with data_files reads a jsonl file, no Hub access.
    `doc_to_target` names a column (no Jinja, which would drop a trailing newline)."""
    head = (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"test_split: test\noutput_type: {output_type}\ndoc_to_text: question\ndoc_to_target: {target}\n")
    if output_type == "multiple_choice":
        return head + ("doc_to_choice: choices\n"
                       "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    return head + (f"generation_kwargs:\n  until: ['<|im_end|>']\n  max_gen_toks: {MAX_NEW}\n  do_sample: false\n"
                   "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")


def _logprob(model, tok, context: str, continuation: str) -> float:
    """log p(continuation | context) as lm-eval's HFLM computes it: trailing whitespace of the
    context moves to the continuation, and the continuation's tokens are those of the whole text
    after the context's (tokenizer defaults: this tokenizer adds no BOS)."""
    whole = tok.encode(context + continuation)
    n = len(tok.encode(context.rstrip()))
    with torch.no_grad():
        logps = model(torch.tensor([whole[:-1]])).logits[0].log_softmax(-1)
    return float(logps[n - 1:].gather(-1, torch.tensor(whole[n:])[:, None]).sum())


def _greedy(model, tok, context: str) -> str:
    """The greedy continuation lm-eval's generate_until gets (special tokens dropped when decoding)."""
    ids = torch.tensor([tok.encode(context)])
    out = model.generate(ids, max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=tok.pad_token_id,
                         output_scores=True, return_dict_in_generate=True)
    top2 = [s[0].topk(2).values for s in out.scores]
    assert min(float(v[0] - v[1]) for v in top2) > MARGIN, "near-tie in greedy decoding"
    return tok.decode(out.sequences[0, ids.shape[1]:], skip_special_tokens=True).split("<|im_end|>")[0]


@pytest.fixture(scope="module")
def task_dir(tiny_dir, tmp_path_factory):
    """Task YAMLs: add_gen / add_mc (the demo's answers); add_best / add_worst (gold = the answer the
    tiny model prefers / does not prefer); add_greedy (target = its greedy chat continuation)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = tmp_path_factory.mktemp("lm_eval_tasks")
    tok = AutoTokenizer.from_pretrained(str(tiny_dir))
    assert tok.chat_template, "the tiny model must carry its chat template"
    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir)).eval()
    docs, picked, greedy = [], [], []
    for a, b in [(a, b) for a in range(11, 99, 7) for b in range(12, 99, 9)]:
        q, choices = demo.question(a, b), [demo.concise(a, b), demo.concise(a, b, a + b + 1)]
        docs.append({"question": q, "answer": demo.concise(a, b), "choices": choices, "label": 0})
        if len(picked) == 6:
            continue
        chat = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        # under a chat template lm-eval joins context and choice with no delimiter
        logps = [_logprob(model, tok, chat, c) for c in choices]
        if abs(logps[0] - logps[1]) > MARGIN:
            best = int(logps[1] > logps[0])
            picked.append({"question": q, "choices": choices, "best": best, "worst": 1 - best})
        if len(greedy) < 4:
            target, raw = _greedy(model, tok, chat), _greedy(model, tok, q)
            assert target != raw  # else exact_match could not tell whether the template was applied
            greedy.append({"question": q, "target": target})
    assert len(picked) == 6
    for name, rows in {"add": docs, "picked": picked, "greedy": greedy}.items():
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "add_gen.yaml").write_text(_yaml("add_gen", d / "add.jsonl", "generate_until", "answer"))
    (d / "add_mc.yaml").write_text(_yaml("add_mc", d / "add.jsonl", "multiple_choice", "label"))
    (d / "add_best.yaml").write_text(_yaml("add_best", d / "picked.jsonl", "multiple_choice", "best"))
    (d / "add_worst.yaml").write_text(_yaml("add_worst", d / "picked.jsonl", "multiple_choice", "worst"))
    (d / "add_greedy.yaml").write_text(_yaml("add_greedy", d / "greedy.jsonl", "generate_until", "target"))
    # sampled at temperature 1, scored by answer length: numbers that move with the torch seed
    (d / "sampled.py").write_text(SAMPLED_PY)
    (d / "add_sampled.yaml").write_text(
        _yaml("add_sampled", d / "add.jsonl", "generate_until", "answer")
        .replace("do_sample: false", "do_sample: true\n  temperature: 1.0")
        .replace("metric: exact_match", "metric: chars") + "process_results: !function sampled.chars\n")
    return d


@pytest.fixture(scope="module")
def first_run(tiny_dir, task_dir):
    return run_tasks(str(tiny_dir), TASKS, include_path=str(task_dir), limit=4, num_fewshot=2, batch_size=4,
                     device="cpu")


def test_results_are_numeric_and_settings_recorded(first_run):
    import lm_eval

    results, settings = first_run["results"], first_run["settings"]
    assert set(results) == set(TASKS)
    assert set(results["add_gen"]) == {"exact_match", "exact_match_stderr"}
    assert set(results["add_mc"]) == {"acc", "acc_stderr"}
    assert set(results["add_sampled"]) == {"chars", "chars_stderr"}
    for metrics in results.values():
        assert all(type(v) is float and math.isfinite(v) for v in metrics.values()), metrics
    assert 0.0 <= results["add_mc"]["acc"] <= 1.0
    assert settings["tasks"] == TASKS and settings["limit"] == 4 and settings["seed"] == 0
    assert settings["num_fewshot"] == 2 and settings["n_shot"] == dict.fromkeys(TASKS, 2)
    assert settings["n_samples"] == dict.fromkeys(TASKS, 4)
    assert settings["apply_chat_template"] is True and len(settings["chat_template_sha256"]) == 16
    assert settings["lm_eval_version"] == lm_eval.__version__ and settings["batch_size"] == 4
    json.dumps(first_run)  # recordable as it is


def test_same_seed_same_numbers(tiny_dir, task_dir, first_run):
    """Sampled generation and few-shot draws follow the seed: a rerun gives the same numbers,
    another seed other samples (so the seed really reaches the sampling)."""
    kwargs = {"include_path": str(task_dir), "limit": 4, "num_fewshot": 2, "batch_size": 4, "device": "cpu"}
    assert run_tasks(str(tiny_dir), TASKS, **kwargs) == first_run
    other = run_tasks(str(tiny_dir), ["add_sampled"], seed=1, **kwargs)
    assert other["results"]["add_sampled"]["chars"] != first_run["results"]["add_sampled"]["chars"]


def test_scores_match_hand_computed_answers(tiny_dir, task_dir):
    """acc is 1.0 where the gold label is the model's own preference and 0.0 where it is the other
    answer; exact_match is 1.0 on the model's own greedy chat continuation, and 0.0 without the
    chat template: the template is really applied, and only when asked."""
    chat = run_tasks(str(tiny_dir), ["add_best", "add_worst", "add_greedy"], include_path=str(task_dir),
                     device="cpu")
    assert chat["results"]["add_best"]["acc"] == 1.0
    assert chat["results"]["add_worst"]["acc"] == 0.0
    assert chat["results"]["add_greedy"]["exact_match"] == 1.0
    assert chat["settings"]["n_samples"] == {"add_best": 6, "add_worst": 6, "add_greedy": 4}
    raw = run_tasks(str(tiny_dir), ["add_greedy"], include_path=str(task_dir), device="cpu", apply_chat_template=False)
    assert raw["results"]["add_greedy"]["exact_match"] == 0.0
    assert raw["settings"]["chat_template_sha256"] is None


def test_unknown_task_is_one_line_error(tiny_dir, task_dir):
    with pytest.raises(PosttrainError, match="add_mcq") as e:
        run_tasks(str(tiny_dir), ["add_mc", "add_mcq"], include_path=str(task_dir), limit=1, device="cpu")
    assert "include_path" in str(e.value) and "did you mean 'add_mc'" in str(e.value)


def test_adapter_dir_is_refused(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(PosttrainError, match="posttrain merge"):
        run_tasks(str(tmp_path), ["add_mc"], device="cpu")


def test_missing_lm_eval_names_the_extra(tiny_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now raises ImportError
    with pytest.raises(PosttrainError, match=r"pip install 'posttrain\[lm-eval\]'"):
        run_tasks(str(tiny_dir), ["add_mc"], device="cpu")


def test_import_is_light():
    """The CLI imports this module for every command: lm_eval, torch and transformers must wait."""
    code = ("import sys, posttrain.lm_eval; "
            "print(sorted(m for m in ('lm_eval', 'torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_eval_stage_runs_lm_eval_tasks_and_the_report_shows_them(make_config, tiny_dir, task_dir, tmp_path):
    """`eval.lm_eval` runs the tasks on every full model, with the eval seed, and the report has them."""
    from posttrain import report
    from posttrain.stages import eval as eval_stage

    cfg = make_config(output_dir=str(tmp_path), eval__max_samples=4, eval__max_new_tokens=4,
                      eval__lm_eval={"tasks": ["add_mc"], "include_path": str(task_dir), "limit": 4})
    out = eval_stage.run(cfg, models_=[str(tiny_dir)], output=str(tmp_path / "eval"))
    row = json.loads((out / "eval.json").read_text())["models"][0]
    assert set(row["lm_eval"]["results"]["add_mc"]) >= {"acc"}
    assert row["lm_eval"]["settings"]["seed"] == cfg.seed and row["lm_eval"]["settings"]["limit"] == 4
    md, _ = report.write(tmp_path)
    assert "add_mc/acc" in md.read_text()
