"""The Ollama Modelfile: the template for each family, the system prompt a template inserts, the
stop parameters, and the file it points at; on the real tokenizers' templates."""

from __future__ import annotations

import pytest

from posttrain import ollama, templates


def test_family_of_builtin_names():
    assert ollama.family("chatml") == "chatml"
    assert ollama.family("chatml with its default system prompt") == "chatml"
    assert ollama.family("gemma") == "gemma"
    assert ollama.family("llama3") is None and ollama.family(None) is None


def test_stops_end_of_turn_first_without_repeats():
    assert ollama.stops("chatml", "<|im_end|>", "<|endoftext|>") == ["<|im_end|>", "<|im_start|>", "<|endoftext|>"]
    assert ollama.stops("chatml", "<|im_end|>", "<|im_end|>") == ["<|im_end|>", "<|im_start|>"]
    assert ollama.stops("gemma", "<end_of_turn>", "<eos>") == ["<end_of_turn>", "<start_of_turn>", "<eos>"]
    assert ollama.stops("llama3", "<|eot_id|>", None) == ["<|eot_id|>"]


def test_modelfile_with_a_template_and_system():
    text = ollama.modelfile("m-q8_0.gguf", "chatml with its default system prompt", system="Be kind.",
                            stop=["<|im_end|>"])
    lines = text.splitlines()
    assert "FROM ./m-q8_0.gguf" in lines and 'SYSTEM """Be kind."""' in lines
    assert 'TEMPLATE """' + ollama.TEMPLATES["chatml"] + '"""' in text
    assert lines[-1] == 'PARAMETER stop "<|im_end|>"'


def test_modelfile_without_a_known_template_leaves_it_to_the_file():
    text = ollama.modelfile("m.gguf", "llama3", system="ignored", stop=["<|eot_id|>"])
    assert "TEMPLATE" not in text.replace("# No TEMPLATE", "") and "SYSTEM" not in text
    assert "tokenizer.chat_template" in text


def test_modelfile_refuses_a_system_prompt_it_cannot_quote():
    with pytest.raises(ValueError, match='"""'):
        ollama.modelfile("m.gguf", "chatml", system='say """', stop=[])


@pytest.mark.real
def test_smollm2_template_gets_chatml_and_its_default_system_prompt(real_models):
    from transformers import AutoTokenizer

    _, converted = real_models("smollm2")
    tok = AutoTokenizer.from_pretrained(str(converted))
    name, _ = templates.builtin_equivalent(tok, tok.chat_template)
    system = templates.inserted_system(tok, tok.chat_template)
    assert ollama.family(name) == "chatml" and system.startswith("You are a helpful AI assistant named SmolLM")
    text = ollama.modelfile("smol.gguf", name, system=system, stop=ollama.stops(name, "<|im_end|>", tok.eos_token))
    assert f'SYSTEM """{system}"""' in text
    assert 'PARAMETER stop "<|im_end|>"' in text and 'PARAMETER stop "<|im_start|>"' in text


@pytest.mark.real
def test_gemma_tokenizer_with_the_gemma_builtin_gets_the_gemma_template(real_models):
    from transformers import AutoTokenizer

    _, converted = real_models("gemma3")
    tok = AutoTokenizer.from_pretrained(str(converted))
    name, _ = templates.builtin_equivalent(tok, templates.GEMMA)
    assert ollama.family(name) == "gemma" and templates.inserted_system(tok, templates.GEMMA) is None
    stops = ollama.stops(name, "<end_of_turn>", tok.eos_token)
    assert stops == ["<end_of_turn>", "<start_of_turn>", "<eos>"]
    assert "<start_of_turn>model" in ollama.modelfile("g.gguf", name, system=None, stop=stops)
