"""Exported files run in llama.cpp itself (llama-cpp-python), not only read back by transformers.

llama-cpp-python is on PyPI as a source distribution only; building it takes 7.5 minutes on 2 CPU
cores, more than CI's test budget allows, so these tests are marked `llama_cpp`, deselected by
`make test`, and run by `make test-llama-cpp` (which builds and installs it first). For the tiny
model (f16), SmolLM2-135M-Instruct (q8_0, its own template with the default system prompt) and
Gemma-3-270M (f16, the Gemma template), each exported by posttrain: llama.cpp tokenises a rendered
chat exactly as transformers does, its logits on it are within the export tolerance of the
model's (relative to the logit scale), its greedy answer is the model's token for token, and a
chat completion through the template stored in the file ends at the end-of-turn token.
"""

from __future__ import annotations

import pytest
import torch

from posttrain import manifest
from posttrain.config import validate_dict
from posttrain.sections import EXPORT_TOLERANCE
from posttrain.stages import export

pytestmark = [pytest.mark.llama_cpp, pytest.mark.slow]
PROMPT = "What is the capital of France?"
N = 16


@pytest.fixture(scope="module")
def sources(tiny_dir, real_models):
    return {"tiny": (tiny_dir, "chatml", "f16"), "smollm2": (real_models("smollm2")[1], "tokenizer", "q8_0"),
            "gemma3": (real_models("gemma3")[1], "gemma", "f16")}


@pytest.mark.parametrize("name", ["tiny", "smollm2", "gemma3"])
def test_llama_cpp_answers_like_the_model(sources, name, tmp_path):
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, template, type_ = sources[name]
    out = export.run(validate_dict({"model": {"name_or_path": str(source)}, "template": {"name": template},
                                    "stages": ["export"], "output_dir": str(tmp_path),
                                    "export": {"type": type_, "probe_prompts": [PROMPT], "max_new_tokens": 4}}))
    m = manifest.read(out)
    file = out / m["file"]["file"]
    eot = m["tokenizer"]["eot"]["id"] if m["tokenizer"]["eot"] else m["tokenizer"]["eos"]["id"]

    tok = AutoTokenizer.from_pretrained(str(source))
    text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], chat_template=None if template ==
                                   "tokenizer" else _template(template), tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False).input_ids
    model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
        theirs = model.generate(torch.tensor([ids]), max_new_tokens=N, do_sample=False, eos_token_id=eot,
                                pad_token_id=eot)[0, len(ids):].tolist()

    llm = Llama(model_path=str(file), n_ctx=512, n_threads=2, logits_all=True, verbose=False, seed=0)
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
    llm.eval(ids)
    scores = torch.tensor(llm.scores[: len(ids)])
    relative = float((scores - logits).abs().max() / logits.abs().max())
    mine = []
    for t in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
        mine.append(t)
        if t == eot or len(mine) == N:
            break
    print(f"\n{name} {type_}: llama.cpp logits {relative:.2e} of scale {float(logits.abs().max()):.1f}; "
          f"llama.cpp {tok.decode(mine)!r} / transformers {tok.decode(theirs)!r}")
    assert relative <= EXPORT_TOLERANCE[type_]
    assert mine == theirs


def test_chat_completion_through_the_files_template_stops_at_end_of_turn(sources, tmp_path):
    from llama_cpp import Llama

    source, template, _ = sources["smollm2"]
    out = export.run(validate_dict({"model": {"name_or_path": str(source)}, "template": {"name": template},
                                    "stages": ["export"], "output_dir": str(tmp_path),
                                    "export": {"type": "q8_0", "probe_prompts": [PROMPT], "max_new_tokens": 4}}))
    llm = Llama(model_path=str(out / manifest.read(out)["file"]["file"]), n_ctx=512, n_threads=2, verbose=False)
    reply = llm.create_chat_completion([{"role": "user", "content": PROMPT}], max_tokens=48, temperature=0.0,
                                       top_k=1)["choices"][0]
    print(f"\nsmollm2 q8_0 chat completion: {reply['message']['content']!r} ({reply['finish_reason']})")
    assert reply["finish_reason"] == "stop" and "Paris" in reply["message"]["content"]


def _template(name: str) -> str:
    from posttrain import templates

    return templates.BUILTINS[name].template
