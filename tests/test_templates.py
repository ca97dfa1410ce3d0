"""Chat templates on the tiny offline tokenizer: exact renderings, loss masks, the checks that
catch broken templates, and loading tokenizers (special tokens and the pad token)."""

from __future__ import annotations

import copy

import pytest

from posttrain import demo, models, templates, tiny
from posttrain.config import validate_dict
from posttrain.errors import PosttrainError
from posttrain.templates import CHATML, Rendered, check_rendered, render, required_tokens, role_shares, template_hash
from tests.helpers import LLAMA3_LIKE

CONV = [
    {"role": "system", "content": "You add numbers."},
    {"role": "user", "content": "What is 39 + 45?"},
    {"role": "assistant", "content": "39 + 45 = 84"},
]
MULTI = [
    {"role": "user", "content": "What is 39 + 45?"},
    {"role": "assistant", "content": "39 + 45 = 84"},
    {"role": "user", "content": "What is 10 + 20?"},
    {"role": "assistant", "content": "10 + 20 = 30"},
]

# ChatML whose {% generation %} markers leave <|im_end|> outside (the model would never learn to stop).
EOT_OUTSIDE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- generation -%}{{- message['content'] -}}{%- endgeneration -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)
# ChatML without generation markers: nothing is in the loss.
NO_MARKERS = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
)
DOUBLE_BOS = "{{ bos_token }}{{ bos_token }}" + CHATML



@pytest.fixture(scope="module")
def tok():
    return tiny.build_tokenizer(demo.corpus())


def with_template(tok, template: str):
    t = copy.deepcopy(tok)
    t.chat_template = template
    return t


def trained_runs(r: Rendered) -> list[list[int]]:
    """Contiguous runs of trained token ids."""
    runs, cur = [], []
    for i, m in zip(r.input_ids, r.trained, strict=True):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return runs


# ---------------------------------------------------------------------------------------------
# The tiny tokenizer itself (guards for the hand counts below)


def test_tiny_tokenizer_special_tokens(tok):
    assert tok.bos_token == "<|endoftext|>"
    assert tok.eos_token == "<|endoftext|>"
    assert tok.pad_token == "<|pad|>"
    assert tok.pad_token_id != tok.eos_token_id
    assert len(tok.tokenize("<|im_start|>")) == 1
    assert len(tok.tokenize("<|im_end|>")) == 1
    assert tok.tokenize("12345") == ["1", "2", "3", "4", "5"]


# ---------------------------------------------------------------------------------------------
# Rendering


def test_chatml_renders_exact_string(tok):
    text = tok.apply_chat_template(CONV, tokenize=False)
    assert text == (
        "<|im_start|>system\nYou add numbers.<|im_end|>\n"
        "<|im_start|>user\nWhat is 39 + 45?<|im_end|>\n"
        "<|im_start|>assistant\n39 + 45 = 84<|im_end|>\n"
    )


def test_chatml_generation_prompt(tok):
    text = tok.apply_chat_template(CONV[:2], tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou add numbers.<|im_end|>\n"
        "<|im_start|>user\nWhat is 39 + 45?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert text.endswith("<|im_start|>assistant\n")


def test_render_text_round_trips(tok):
    r = render(tok, CONV)
    assert r.text == (
        "<|im_start|>system\nYou add numbers.<|im_end|>\n"
        "<|im_start|>user\nWhat is 39 + 45?<|im_end|>\n"
        "<|im_start|>assistant\n39 + 45 = 84<|im_end|>\n"
    )


def test_render_trains_exactly_assistant_content_and_im_end(tok):
    r = render(tok, CONV)
    trained = [i for i, m in zip(r.input_ids, r.trained, strict=True) if m]
    assert tok.decode(trained) == "39 + 45 = 84<|im_end|>"
    assert trained == tok("39 + 45 = 84<|im_end|>", add_special_tokens=False)["input_ids"]
    # one contiguous run; the newline after <|im_end|> is not trained
    assert len(trained_runs(r)) == 1
    assert r.trained[-1] is False
    assert tok.decode(r.input_ids[-1:]) == "\n"


def test_render_multi_turn_trains_both_assistant_turns(tok):
    r = render(tok, MULTI)
    runs = trained_runs(r)
    assert [tok.decode(run) for run in runs] == ["39 + 45 = 84<|im_end|>", "10 + 20 = 30<|im_end|>"]


def test_render_roles_and_spans(tok):
    r = render(tok, CONV)
    assert [s[0] for s in r.spans] == ["system", "user", "assistant"]
    assert r.spans[0][1] == 0 and r.spans[-1][2] == len(r.input_ids)
    for (_, _, end), (_, start, _) in zip(r.spans, r.spans[1:]):
        assert end == start
    for role, start, end in r.spans:
        assert set(r.roles[start:end]) == {role}
    # every trained token belongs to the assistant
    assert {role for role, m in zip(r.roles, r.trained, strict=True) if m} == {"assistant"}
    assert tok.decode(r.input_ids[r.spans[1][1]:r.spans[1][2]]) == "<|im_start|>user\nWhat is 39 + 45?<|im_end|>\n"


def test_render_without_assistant_only_trains_everything(tok):
    r = render(tok, CONV, assistant_only=False)
    assert all(r.trained)
    assert len(r.trained) == len(r.input_ids)


# ---------------------------------------------------------------------------------------------
# check_rendered: positive and negative controls


def test_check_rendered_passes_on_good_conversation(tok):
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    assert check_rendered(render(tok, CONV), tok, eot, where="t") is None
    assert check_rendered(render(tok, MULTI), tok, eot, where="t") is None


def test_check_rendered_rejects_eot_outside_generation(tok):
    t = with_template(tok, EOT_OUTSIDE)
    r = render(t, CONV)
    # the template still trains the content, just not the end-of-turn token
    assert tok.decode([i for i, m in zip(r.input_ids, r.trained, strict=True) if m]) == "39 + 45 = 84"
    with pytest.raises(PosttrainError) as info:
        check_rendered(r, t, t.convert_tokens_to_ids("<|im_end|>"), where="data.sft row 0")
    line = info.value.line()
    assert line.startswith("data.sft row 0: ")
    assert "<|im_end|>" in line
    assert "end-of-turn" in line


def test_check_rendered_rejects_eot_outside_in_second_turn_only(tok):
    # first assistant turn fine, second one's <|im_end|> untrained: still caught
    r = render(tok, MULTI)
    last_trained = max(k for k, m in enumerate(r.trained) if m)
    r.trained[last_trained] = False
    with pytest.raises(PosttrainError):
        check_rendered(r, tok, tok.convert_tokens_to_ids("<|im_end|>"), where="x")


def test_check_rendered_rejects_template_without_markers(tok):
    t = with_template(tok, NO_MARKERS)
    r = render(t, CONV)
    assert not any(r.trained)
    with pytest.raises(PosttrainError) as info:
        check_rendered(r, t, t.convert_tokens_to_ids("<|im_end|>"), where="w")
    assert "no token of this conversation is in the loss" in info.value.line()
    assert "generation" in info.value.line()


def test_check_rendered_rejects_duplicated_bos(tok):
    t = with_template(tok, DOUBLE_BOS)
    r = render(t, CONV)
    assert r.input_ids[:2] == [tok.bos_token_id, tok.bos_token_id]
    with pytest.raises(PosttrainError) as info:
        check_rendered(r, t, t.convert_tokens_to_ids("<|im_end|>"), where="w")
    assert "BOS" in info.value.line()


def test_check_rendered_single_bos_is_fine(tok):
    t = with_template(tok, "{{ bos_token }}" + CHATML)
    r = render(t, CONV)
    assert r.input_ids[0] == tok.bos_token_id and r.input_ids[1] != tok.bos_token_id
    assert check_rendered(r, t, t.convert_tokens_to_ids("<|im_end|>"), where="w") is None


# ---------------------------------------------------------------------------------------------
# role_shares


def test_role_shares_hand_built():
    a = Rendered(input_ids=[1, 2, 3, 4, 5], trained=[False, False, True, True, False],
                 roles=["user", "user", "assistant", "assistant", "assistant"])
    b = Rendered(input_ids=[6, 7, 8], trained=[False, True, True], roles=["system", "assistant", "assistant"])
    assert role_shares([a, b]) == {
        "user": {"tokens": 2, "trained": 0, "trained_share": 0.0},
        "assistant": {"tokens": 5, "trained": 4, "trained_share": 0.8},
        "system": {"tokens": 1, "trained": 0, "trained_share": 0.0},
    }


def test_role_shares_rounds_to_four_places():
    r = Rendered(input_ids=[1, 2, 3], trained=[True, False, False], roles=["assistant"] * 3)
    assert role_shares([r]) == {"assistant": {"tokens": 3, "trained": 1, "trained_share": 0.3333}}


def test_role_shares_empty():
    assert role_shares([]) == {}


def test_role_shares_on_rendered_conversation(tok):
    # Digits are single tokens and 'system', 'user', 'assistant' are single tokens in the tiny
    # vocabulary, so the counts are by hand:
    #   system:    <|im_start|> system \n 7 <|im_end|> \n          = 6 tokens, 0 trained
    #   user:      <|im_start|> user \n 1 2 <|im_end|> \n          = 7 tokens, 0 trained
    #   assistant: <|im_start|> assistant \n 3 4 5 <|im_end|> \n   = 8 tokens, 4 trained (3 4 5 <|im_end|>)
    assert tok.tokenize("system") == ["system"]
    assert tok.tokenize("user") == ["user"]
    assert tok.tokenize("assistant") == ["assistant"]
    conv = [
        {"role": "system", "content": "7"},
        {"role": "user", "content": "12"},
        {"role": "assistant", "content": "345"},
    ]
    r = render(tok, conv)
    assert len(r.input_ids) == 21
    assert role_shares([r, r]) == {
        "system": {"tokens": 12, "trained": 0, "trained_share": 0.0},
        "user": {"tokens": 14, "trained": 0, "trained_share": 0.0},
        "assistant": {"tokens": 16, "trained": 8, "trained_share": 0.5},
    }


# ---------------------------------------------------------------------------------------------
# template_hash and required_tokens


def test_template_hash_is_stable(tok):
    h = template_hash(tok, CHATML)
    assert h == template_hash(tok, CHATML)
    assert h == template_hash(copy.deepcopy(tok), CHATML)
    assert len(h) == 16
    int(h, 16)


def test_template_hash_changes_with_template_text(tok):
    assert template_hash(tok, CHATML) != template_hash(tok, CHATML + " ")
    assert template_hash(tok, CHATML) != template_hash(tok, "{{ bos_token }}" + CHATML)


def test_template_hash_changes_with_pad_token(tok):
    t = copy.deepcopy(tok)
    t.pad_token = "<|im_start|>"
    assert t.pad_token_id != tok.pad_token_id
    assert template_hash(t, CHATML) != template_hash(tok, CHATML)


def test_required_tokens_chatml():
    assert required_tokens(CHATML) == ["<|im_start|>", "<|im_end|>"]


def test_required_tokens_of_other_templates():
    assert required_tokens(LLAMA3_LIKE) == ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    assert required_tokens("<s>[INST] {{ x }} [/INST]</s>") == ["<s>", "[INST]", "[/INST]", "</s>"]
    assert required_tokens("{{ messages }}") == []


def test_has_generation_markers():
    assert templates.has_generation_markers(CHATML)
    assert templates.has_generation_markers("{% generation %}x{% endgeneration %}")
    assert not templates.has_generation_markers(NO_MARKERS)


def test_resolve():
    assert templates.resolve("chatml", None) == CHATML
    assert templates.resolve("tokenizer", "TEMPLATE") == "TEMPLATE"
    with pytest.raises(PosttrainError):
        templates.resolve("tokenizer", None)
    with pytest.raises(PosttrainError):
        templates.resolve("no/such/file.jinja", None)


def test_end_of_turn_id_chatml(tok):
    assert templates.end_of_turn_id(tok, CHATML) == tok.convert_tokens_to_ids("<|im_end|>")


# ---------------------------------------------------------------------------------------------
# models.load_tokenizer on a saved tiny model


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return tiny.init_tiny(tmp_path_factory.mktemp("tiny"), demo.corpus())


def cfg_for(path, model_extra=None, template=None):
    raw = {"model": {"name_or_path": str(path), **(model_extra or {})}, "stages": ["format"]}
    if template is not None:
        raw["template"] = template
    return validate_dict(raw)


def test_load_tokenizer_default(tiny_model_dir):
    info = models.load_tokenizer(cfg_for(tiny_model_dir))
    t = info.tokenizer
    assert info.template == CHATML
    assert t.chat_template == CHATML
    assert info.added_tokens == []
    assert info.eot_id == t.convert_tokens_to_ids("<|im_end|>")
    assert t.pad_token == "<|pad|>"
    assert len(info.template_hash) == 16


def test_load_tokenizer_template_from_tokenizer(tiny_model_dir):
    info = models.load_tokenizer(cfg_for(tiny_model_dir, template={"name": "tokenizer"}))
    assert info.template == CHATML


@pytest.mark.parametrize("pad", ["<|im_end|>", "<|endoftext|>"])
def test_pad_equal_to_eos_or_eot_is_rejected(tiny_model_dir, pad):
    with pytest.raises(PosttrainError) as info:
        models.load_tokenizer(cfg_for(tiny_model_dir, {"pad_token": pad}))
    line = info.value.line()
    assert "pad" in line
    assert pad in line


def test_pad_not_in_vocab_is_rejected(tiny_model_dir):
    with pytest.raises(PosttrainError) as info:
        models.load_tokenizer(cfg_for(tiny_model_dir, {"pad_token": "<|nope|>"}))
    assert "model.pad_token '<|nope|>'" in info.value.line()


def test_configured_distinct_pad_is_used(tiny_model_dir):
    info = models.load_tokenizer(cfg_for(tiny_model_dir, {"pad_token": "<|im_start|>"}))
    assert info.tokenizer.pad_token == "<|im_start|>"


def test_template_file_with_missing_tokens_is_rejected(tiny_model_dir, tmp_path):
    p = tmp_path / "llama3.jinja"
    p.write_text(LLAMA3_LIKE, encoding="utf-8")
    with pytest.raises(PosttrainError) as info:
        models.load_tokenizer(cfg_for(tiny_model_dir, template={"name": str(p)}))
    line = info.value.line()
    assert "<|start_header_id|>" in line
    assert "add_special_tokens" in line


def test_template_file_tokens_added_when_allowed(tiny_model_dir, tmp_path):
    p = tmp_path / "llama3.jinja"
    p.write_text(LLAMA3_LIKE, encoding="utf-8")
    info = models.load_tokenizer(cfg_for(tiny_model_dir, template={"name": str(p), "add_special_tokens": True}))
    t = info.tokenizer
    assert info.added_tokens == ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    vocab = t.get_vocab()
    for token in info.added_tokens:
        assert token in vocab
        assert len(t.tokenize(token)) == 1
    assert info.template == LLAMA3_LIKE
    assert info.eot_id == t.convert_tokens_to_ids("<|eot_id|>")
    assert t.pad_token == "<|pad|>"
    r = render(t, CONV)
    assert r.text == (
        "<|start_header_id|>system<|end_header_id|>\n\nYou add numbers.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 39 + 45?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n39 + 45 = 84<|eot_id|>"
    )
    assert t.decode([i for i, m in zip(r.input_ids, r.trained, strict=True) if m]) == "39 + 45 = 84<|eot_id|>"
    assert check_rendered(r, t, info.eot_id, where="w") is None


def test_pad_equal_to_eos_gets_a_distinct_pad(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    t.pad_token = t.eos_token
    assert t.pad_token_id == t.eos_token_id
    out = tmp_path / "pad_is_eos"
    t.save_pretrained(out)
    reloaded = AutoTokenizer.from_pretrained(str(out))
    assert reloaded.pad_token == "<|endoftext|>"  # the broken state really was saved

    info = models.load_tokenizer(cfg_for(out))
    fixed = info.tokenizer
    # the only special token that is neither bos/eos nor used by ChatML
    assert fixed.pad_token == "<|pad|>"
    assert fixed.pad_token_id not in {fixed.eos_token_id, info.eot_id}


# ---------------------------------------------------------------------------------------------
# False positives found on real tokenizers (issue 15), on toy analogues; the real-tokenizer
# regressions are in test_family_templates.py


def test_bos_written_as_a_turn_token_is_not_a_duplicate(tok):
    # SmolLM2's bos_token is <|im_start|>, which ChatML writes at the start of every turn
    t = copy.deepcopy(tok)
    t.bos_token = "<|im_start|>"
    t.chat_template = CHATML
    eot = t.convert_tokens_to_ids("<|im_end|>")
    r = render(t, MULTI)
    assert r.input_ids.count(t.bos_token_id) == 4
    assert templates.bos_in_turns(t) is True
    assert check_rendered(r, t, eot, where="w") is None
    # negative control, one token over: {{ bos_token }} + ChatML starts with <|im_start|> twice
    t.chat_template = "{{ bos_token }}" + CHATML
    r = render(t, MULTI)
    assert r.input_ids[:2] == [t.bos_token_id, t.bos_token_id]
    with pytest.raises(PosttrainError, match="BOS"):
        check_rendered(r, t, eot, where="w")


LLAMA2_LIKE = (  # Llama 2 writes {{ bos_token }} before every user turn
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{- bos_token + '<|im_start|>' + message['content'] + '<|im_end|>' -}}"
    "{%- else -%}{%- generation -%}{{- message['content'] + '<|im_end|>' -}}{%- endgeneration -%}{%- endif -%}"
    "{%- endfor -%}"
)


def test_bos_the_template_writes_before_every_turn_is_not_a_duplicate(tok):
    t = copy.deepcopy(tok)
    t.bos_token = "<|pad|>"  # a BOS distinct from eos, as in most tokenizers
    t.chat_template = LLAMA2_LIKE
    eot = t.convert_tokens_to_ids("<|im_end|>")
    r = render(t, MULTI)
    assert r.input_ids.count(t.bos_token_id) == 2
    assert check_rendered(r, t, eot, where="w") is None
    # where the template writes BOS only at the start, one inside the conversation is caught
    t.chat_template = "{{ bos_token }}" + CHATML
    assert check_rendered(render(t, MULTI), t, eot, where="w") is None
    bad = [MULTI[0], {"role": "assistant", "content": "39 + 45 = <|pad|>84"}]
    with pytest.raises(PosttrainError) as info:
        check_rendered(render(t, bad), t, eot, where="data.sft row 2")
    assert "assistant message" in info.value.line() and "'<|pad|>'" in info.value.line()


def test_end_of_turn_token_that_is_only_an_added_special_token(tok):
    # Gemma's <end_of_turn> is special in added_tokens_decoder but not one of all_special_ids
    from transformers import AddedToken

    t = copy.deepcopy(tok)
    t.add_tokens([AddedToken("<|turn_end|>", special=True)])
    template = CHATML.replace("<|im_end|>", "<|turn_end|>")
    t.chat_template = template
    eot = t.convert_tokens_to_ids("<|turn_end|>")
    assert eot not in t.all_special_ids
    assert templates.end_of_turn_id(t, template) == eot
    assert check_rendered(render(t, MULTI), t, eot, where="w") is None


def test_trained_newline_after_the_end_of_turn_token_is_fine(tok):
    # TRL's Gemma training templates put '<end_of_turn>\n' in the markers: the model still learns to stop
    template = CHATML.replace("message['content'] + '<|im_end|>' -}}{%- endgeneration -%}{{- '\\n' -}}",
                              "message['content'] + '<|im_end|>\\n' -}}{%- endgeneration -%}")
    assert template != CHATML
    t = with_template(tok, template)
    eot = t.convert_tokens_to_ids("<|im_end|>")
    r = render(t, MULTI)
    assert [tok.decode(run) for run in trained_runs(r)] == ["39 + 45 = 84<|im_end|>\n", "10 + 20 = 30<|im_end|>\n"]
    assert templates.end_of_turn_id(t, template) == eot
    assert check_rendered(r, t, eot, where="w") is None
    # ... but a trained newline with no end-of-turn token before it is still caught
    t = with_template(tok, EOT_OUTSIDE.replace("message['content'] -}}", "message['content'] + '\\n' -}}"))
    with pytest.raises(PosttrainError, match="end-of-turn"):
        check_rendered(render(t, CONV), t, eot, where="w")


def test_check_rows_names_the_row_a_template_refuses(tok):
    t = with_template(tok, "{%- if messages|length > 2 -%}{{ raise_exception('too long') }}{%- endif -%}" + CHATML)
    rows = [{"messages": CONV[1:]}, {"messages": CONV}]
    with pytest.raises(PosttrainError) as info:
        templates.check_rows(rows, "sft", t, t.convert_tokens_to_ids("<|im_end|>"), "sft")
    assert info.value.line().startswith("data.sft row 1: the chat template cannot render this conversation: too long")


def test_inserted_system_prompt_gets_a_system_span(tok):
    system = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    t = with_template(tok, templates.with_default_system(CHATML, system))
    r = render(t, MULTI)
    assert [s[0] for s in r.spans] == ["system", "user", "assistant", "user", "assistant"]
    assert tok.decode(r.input_ids[r.spans[0][1]:r.spans[0][2]]) == f"<|im_start|>system\n{system}<|im_end|>\n"
    assert tok.decode(r.input_ids[r.spans[1][1]:r.spans[1][2]]) == "<|im_start|>user\nWhat is 39 + 45?<|im_end|>\n"
    # a conversation with its own system message is rendered as it is
    assert render(t, CONV).text == render(tok, CONV).text


def test_resolve_tokenizer_without_template_names_the_fitting_builtin():
    with pytest.raises(PosttrainError) as info:
        templates.resolve("tokenizer", None, {"<|im_start|>": 1, "<|im_end|>": 2})
    assert "template.name: chatml" in info.value.line()
    with pytest.raises(PosttrainError) as info:
        templates.resolve("tokenizer", None, lambda: {"<start_of_turn>": 105, "<end_of_turn>": 106})
    assert "template.name: gemma" in info.value.line()
    with pytest.raises(PosttrainError) as info:
        templates.resolve("tokenizer", None, {"a": 0})
    assert "add_special_tokens: true" in info.value.line()


def test_without_markers_keeps_the_markers_whitespace_control():
    """The markers' `-` trims whitespace; without them the template must render the same text, for
    the built-ins and for a template whose markers carry the only trimming."""
    import jinja2

    from posttrain import templates

    own = "user:\n  {%- generation -%}\n  {{ m }}  {%- endgeneration -%}\n!"
    env = jinja2.Environment()
    env.add_extension("jinja2.ext.do")
    stripped = templates.without_markers(own)
    assert not templates.has_generation_markers(stripped) and "endgeneration" not in stripped
    assert env.from_string(stripped).render(m="hi") == "user:hi!"
    plain = "a {% generation %} b {% endgeneration %} c"
    assert env.from_string(templates.without_markers(plain)).render() == "a  b  c"
