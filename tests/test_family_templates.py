"""The built-in family templates (gemma, llama3, mistral, phi3; chatml is in test_templates.py):
the exact text of each family's published template, the generation markers, the tokens they need,
the built-in that fits a tokenizer, and the checks on the real SmolLM2 and Gemma-3 tokenizers.

Expected strings are written out by hand from the published formats:
- Gemma 3 (google/gemma-3-*-it): {{ bos_token }}, then per turn '<start_of_turn>' + (user|model) +
  '\\n' + content|trim + '<end_of_turn>\\n'; the system message is folded into the first user turn as
  system + '\\n\\n' (the system text itself is not trimmed); generation prompt '<start_of_turn>model\\n'.
- Llama 3 (Meta-Llama-3-8B-Instruct): bos_token, then per message '<|start_header_id|>' + role +
  '<|end_header_id|>\\n\\n' + content|trim + '<|eot_id|>'; generation prompt the assistant header.
- Mistral (mistral-common v3, Mistral-7B-Instruct-v0.3): bos_token + '[INST] ' + user + '[/INST]' +
  ' ' + assistant|trim + eos_token ...; the system message + '\\n\\n' opens the last user message.
- Phi-3 (Phi-3-mini-4k-instruct): '<|system|>\\n', '<|user|>\\n', '<|assistant|>\\n' + content +
  '<|end|>\\n'; then '<|assistant|>\\n' with a generation prompt, eos_token without.
They are also compared with the published template texts over a set of conversations: Gemma 3,
Llama 3 and Phi-3 as TRL ships them (trl/chat_templates/*.jinja), and Mistral v0.3's
Hugging Face template (below, tool branches left out).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from posttrain import demo, models, templates, tiny
from posttrain.config import validate_dict
from posttrain.errors import PosttrainError
from posttrain.templates import BUILTINS, check_rendered, render


def S(text):
    return {"role": "system", "content": text}


def U(text):
    return {"role": "user", "content": text}


def A(text):
    return {"role": "assistant", "content": text}


# Mistral-7B-Instruct-v0.3's Hugging Face chat template, without its tool branches (two long
# raise_exception messages split in two).
MISTRAL_V03_HF = """{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- set ns = namespace() %}
{%- set ns.index = 0 %}
{%- for message in loop_messages %}
    {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}
        {{- raise_exception("After the optional system message, conversation roles must alternate "
                            + "user/assistant/user/assistant/...") }}
    {%- endif %}
    {%- set ns.index = ns.index + 1 %}
{%- endfor %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\\n\\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token}}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an "
                            + "initial optional system message!") }}
    {%- endif %}
{%- endfor %}
"""

# bos / eos of each family's own tokenizers, for the hand-written expected strings
FAMILY_SPECIALS = {
    "gemma": {"bos_token": "<bos>", "eos_token": "<eos>"},
    "llama3": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    "mistral": {"bos_token": "<s>", "eos_token": "</s>"},
    "phi3": {"bos_token": "<s>", "eos_token": "<|endoftext|>"},
}
# the end-of-turn text each family's assistant turn is trained to end with
EOT_TEXT = {"gemma": "<end_of_turn>", "llama3": "<|eot_id|>", "mistral": None, "phi3": "<|end|>"}


@pytest.fixture(scope="module")
def tok():
    return tiny.build_tokenizer(demo.corpus())


def text(tok, name_or_template: str, messages, gen=False, specials=None):
    template = BUILTINS[name_or_template].template if name_or_template in BUILTINS else name_or_template
    specials = specials if specials is not None else FAMILY_SPECIALS.get(name_or_template, {})
    return tok.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=gen,
                                   **specials)


def published(name: str) -> str:
    import trl

    files = {"gemma": "gemma3.jinja", "llama3": "llama3.jinja", "phi3": "phi3.jinja"}
    if name == "mistral":
        return MISTRAL_V03_HF
    return (Path(trl.__file__).parent / "chat_templates" / files[name]).read_text(encoding="utf-8")


def trained_runs(r) -> list[list[int]]:
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


def cfg_for(path, template: dict, **model):
    return validate_dict({"model": {"name_or_path": str(path), **model}, "template": template, "stages": ["format"]})


# ---------------------------------------------------------------------------------------------
# Exact text, written out by hand


SYS_CONV = [S(" Be brief. "), U("  Hi  "), A(" Hello!\n")]
MULTI = [U("2 + 2?"), A("4"), U("3 + 3?"), A("6")]
SYS_MULTI = [S("Be brief."), *MULTI]

EXPECTED = {
    ("gemma", "sys", False):
        "<bos><start_of_turn>user\n Be brief. \n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n",
    ("gemma", "prompt", True): "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
    ("gemma", "prompt", False): "<bos><start_of_turn>user\nHi<end_of_turn>\n",
    ("gemma", "multi", False):
        "<bos><start_of_turn>user\n2 + 2?<end_of_turn>\n<start_of_turn>model\n4<end_of_turn>\n"
        "<start_of_turn>user\n3 + 3?<end_of_turn>\n<start_of_turn>model\n6<end_of_turn>\n",
    ("gemma", "sys_multi", True):
        "<bos><start_of_turn>user\nBe brief.\n\n2 + 2?<end_of_turn>\n<start_of_turn>model\n4<end_of_turn>\n"
        "<start_of_turn>user\n3 + 3?<end_of_turn>\n<start_of_turn>model\n6<end_of_turn>\n<start_of_turn>model\n",
    ("llama3", "sys", False):
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>",
    ("llama3", "prompt", True):
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
    ("llama3", "prompt", False): "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>",
    ("llama3", "multi", False):
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n2 + 2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n3 + 3?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n6<|eot_id|>",
    ("llama3", "sys_multi", True):
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n2 + 2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n3 + 3?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n6<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
    # mistral-common v3: the system message opens the last user message (also when the
    # conversation ends with the assistant's answer)
    ("mistral", "sys", False): "<s>[INST]  Be brief. \n\n  Hi  [/INST] Hello!</s>",
    ("mistral", "prompt", True): "<s>[INST] Hi[/INST]",
    ("mistral", "prompt", False): "<s>[INST] Hi[/INST]",
    ("mistral", "multi", False): "<s>[INST] 2 + 2?[/INST] 4</s>[INST] 3 + 3?[/INST] 6</s>",
    ("mistral", "sys_multi", True): "<s>[INST] 2 + 2?[/INST] 4</s>[INST] Be brief.\n\n3 + 3?[/INST] 6</s>",
    ("phi3", "sys", False):
        "<|system|>\n Be brief. <|end|>\n<|user|>\n  Hi  <|end|>\n<|assistant|>\n Hello!\n<|end|>\n<|endoftext|>",
    ("phi3", "prompt", True): "<|user|>\nHi<|end|>\n<|assistant|>\n",
    ("phi3", "prompt", False): "<|user|>\nHi<|end|>\n<|endoftext|>",
    ("phi3", "multi", False):
        "<|user|>\n2 + 2?<|end|>\n<|assistant|>\n4<|end|>\n<|user|>\n3 + 3?<|end|>\n<|assistant|>\n6<|end|>\n"
        "<|endoftext|>",
    ("phi3", "sys_multi", True):
        "<|system|>\nBe brief.<|end|>\n<|user|>\n2 + 2?<|end|>\n<|assistant|>\n4<|end|>\n"
        "<|user|>\n3 + 3?<|end|>\n<|assistant|>\n6<|end|>\n<|assistant|>\n",
}
CONVS = {"sys": SYS_CONV, "prompt": [U("Hi")], "multi": MULTI, "sys_multi": SYS_MULTI}


@pytest.mark.parametrize(("name", "conv", "gen"), sorted(EXPECTED))
def test_builtin_renders_the_published_text(tok, name, conv, gen):
    assert text(tok, name, CONVS[conv], gen) == EXPECTED[(name, conv, gen)]


@pytest.mark.parametrize("name", ["gemma", "llama3", "phi3"])
@pytest.mark.parametrize("gen", [False, True])
def test_builtin_matches_the_published_template(tok, name, gen):
    convs = [[U("Hi")], [U("  Hi  "), A(" Hello \n")], [S(" Be brief. "), U("Hi")], SYS_CONV, MULTI, SYS_MULTI,
             [S("x"), U("a"), A("b"), U("c")], [U("Ünïcödé 🙂 你好"), A("")],
             [U("a\n\nb"), A("```\ncode\n```")]]
    for conv in convs:
        assert text(tok, name, conv, gen) == text(tok, published(name), conv, gen, FAMILY_SPECIALS[name]), conv


@pytest.mark.parametrize("gen", [False, True])
def test_mistral_matches_v03_where_it_keeps_the_system_message(tok, gen):
    # Without a system message, or when the conversation ends with a user turn (the prompt at
    # inference), the v0.3 Hugging Face template and mistral-common v3 render the same text.
    convs = [[U("Hi")], [U("  Hi  "), A(" Hello \n")], MULTI, [S("Be brief."), U("Hi")],
             [S("x"), U("a"), A("b"), U("c")], [U("Ünïcödé 🙂"), A("")]]
    for conv in convs:
        assert text(tok, "mistral", conv, gen) == text(tok, MISTRAL_V03_HF, conv, gen, FAMILY_SPECIALS["mistral"])


def test_mistral_keeps_the_system_message_of_a_training_conversation(tok):
    # The v0.3 Hugging Face template drops it when the last message is the assistant's;
    # mistral-common v3 (followed here) puts it before the last user message, as at inference.
    hf = text(tok, MISTRAL_V03_HF, SYS_MULTI, False, FAMILY_SPECIALS["mistral"])
    assert "Be brief." not in hf
    ours = text(tok, "mistral", SYS_MULTI)
    assert ours == "<s>[INST] 2 + 2?[/INST] 4</s>[INST] Be brief.\n\n3 + 3?[/INST] 6</s>"
    # the prompt of the last answer is what inference renders for that prompt
    assert ours.startswith(text(tok, "mistral", SYS_MULTI[:4], True))
    assert text(tok, "mistral", SYS_MULTI[:4], True) == text(tok, MISTRAL_V03_HF, SYS_MULTI[:4], True,
                                                            FAMILY_SPECIALS["mistral"])


@pytest.mark.parametrize("name", ["gemma", "mistral"])
def test_builtin_refuses_non_alternating_roles_like_the_published_one(tok, name):
    from jinja2.exceptions import TemplateError

    with pytest.raises(TemplateError, match="alternate"):
        text(tok, name, [U("a"), U("b"), A("c")])


def test_required_tokens_of_builtins():
    assert templates.required_tokens(BUILTINS["gemma"].template) == ["<start_of_turn>", "<end_of_turn>"]
    assert templates.required_tokens(BUILTINS["llama3"].template) == [
        "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    assert templates.required_tokens(BUILTINS["mistral"].template) == ["[INST]", "[/INST]"]
    assert templates.required_tokens(BUILTINS["phi3"].template) == [
        "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    for b in BUILTINS.values():  # every token a built-in writes is declared (so _ensure_tokens checks it)
        assert set(templates.SPECIAL_LOOKING.findall(b.template)) <= set(b.tokens)
        assert templates.has_generation_markers(b.template)


def test_resolve_builtins():
    for name, b in BUILTINS.items():
        assert templates.resolve(name, None) == b.template


@pytest.mark.parametrize(("vocab", "name"), [
    ({"<start_of_turn>", "<end_of_turn>", "<s>", "</s>"}, "gemma"),
    ({"<|im_start|>", "<|im_end|>"}, "chatml"),
    ({"<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"}, "llama3"),
    ({"<s>", "</s>", "[INST]", "[/INST]"}, "mistral"),
    ({"<|user|>", "<|assistant|>", "<|end|>", "<|system|>"}, "phi3"),
    ({"<s>", "</s>", "<unk>"}, None),
    ({"<|eot_id|>"}, None),  # one llama3 token is not enough
])
def test_suggest(vocab, name):
    assert templates.suggest(vocab) == name


# ---------------------------------------------------------------------------------------------
# On the tiny tokenizer: tokens added only when allowed, masks, checks


@pytest.mark.parametrize("name", ["gemma", "llama3", "mistral", "phi3"])
def test_builtin_needs_its_tokens_unless_adding_is_allowed(tiny_dir, name):
    with pytest.raises(PosttrainError) as info:
        models.load_tokenizer(cfg_for(tiny_dir, {"name": name}))
    line = info.value.line()
    for t in BUILTINS[name].tokens:
        assert t in line
    assert "add_special_tokens" in line
    assert "template.name: chatml" in line  # the built-in the tiny tokenizer has the tokens for


@pytest.mark.parametrize("name", ["gemma", "llama3", "mistral", "phi3"])
def test_builtin_trains_content_and_end_of_turn_only(tiny_dir, name):
    info = models.load_tokenizer(cfg_for(tiny_dir, {"name": name, "add_special_tokens": True}))
    t = info.tokenizer
    assert info.added_tokens == list(BUILTINS[name].tokens)
    for token in info.added_tokens:
        assert len(t.tokenize(token)) == 1
    eot = EOT_TEXT[name] or t.eos_token
    assert info.eot_id == t.convert_tokens_to_ids(eot)
    assert info.eot_id != t.pad_token_id
    r = render(t, [S("You add."), U("39 + 45?"), A("84"), U("10 + 20?"), A("30")])
    # (mistral's ' ' after [/INST] is outside the markers; here it is a token of its own)
    assert [t.decode(run) for run in trained_runs(r)] == [f"84{eot}", f"30{eot}"]
    assert {role for role, m in zip(r.roles, r.trained, strict=True) if m} == {"assistant"}
    assert check_rendered(r, t, info.eot_id, where="w") is None


def test_phi3_closing_eos_is_not_trained_and_spans_stay_exact(tiny_dir):
    # Phi-3 ends a conversation with eos_token (not prefix-preserving): the spans stop where the
    # prefix and the whole conversation part, and the closing eos is not in the loss.
    t = models.load_tokenizer(cfg_for(tiny_dir, {"name": "phi3", "add_special_tokens": True})).tokenizer
    r = render(t, [U("12"), A("345")])
    assert r.text == "<|user|>\n12<|end|>\n<|assistant|>\n345<|end|>\n<|endoftext|>"
    (_, u0, u1), (_, a0, a1) = r.spans
    assert t.decode(r.input_ids[u0:u1]) == "<|user|>\n12<|end|>\n"
    assert t.decode(r.input_ids[a0:a1]) == "<|assistant|>\n345<|end|>\n<|endoftext|>"
    assert r.trained[-1] is False


def test_mistral_system_in_last_turn_keeps_roles_straight(tiny_dir):
    t = models.load_tokenizer(cfg_for(tiny_dir, {"name": "mistral", "add_special_tokens": True})).tokenizer
    r = render(t, [S("7"), U("12"), A("3"), U("45"), A("6")])
    assert r.text == "<|endoftext|>[INST] 12[/INST] 3<|endoftext|>[INST] 7\n\n45[/INST] 6<|endoftext|>"
    shares = templates.role_shares([r])
    assert shares["user"]["trained"] == 0 and shares["system"]["trained"] == 0
    assert shares["assistant"]["trained"] == sum(r.trained)


# ---------------------------------------------------------------------------------------------
# A tokenizer's own template without markers that renders like a built-in


@pytest.mark.parametrize("name", ["gemma", "llama3", "phi3"])
def test_published_template_is_recognised_as_its_builtin(tok, name):
    t = copy.deepcopy(tok)
    assert templates.builtin_equivalent(t, published(name)) == (name, BUILTINS[name].template)


def test_mistral_v03_template_is_not_taken_for_the_builtin(tok):
    # it drops the system message of a training conversation: not the same rendering
    assert templates.builtin_equivalent(copy.deepcopy(tok), MISTRAL_V03_HF) is None


def test_template_with_a_default_system_prompt_gets_the_builtin_with_that_prompt(tok):
    smol_like = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                 "{{ '<|im_start|>system\nYou are \"helpful\" ☃.<|im_end|>\n' }}{% endif %}"
                 "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    name, derived = templates.builtin_equivalent(tok, smol_like)
    assert name == "chatml with its default system prompt"
    assert templates.has_generation_markers(derived)
    for conv in ([U("a"), A("b")], [S("s"), U("a"), A("b")], MULTI):
        for gen in (False, True):
            assert text(tok, derived, conv, gen) == text(tok, smol_like, conv, gen)
    assert templates.inserted_system(tok, smol_like) == 'You are "helpful" ☃.'
    assert templates.inserted_system(tok, BUILTINS["chatml"].template) is None


def test_tokenizer_without_template_error_names_chatml_for_the_tiny_tokenizer(tiny_dir, tmp_path):
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(str(tiny_dir))
    t.chat_template = None
    t.save_pretrained(tmp_path / "bare")
    assert AutoTokenizer.from_pretrained(str(tmp_path / "bare")).chat_template is None
    with pytest.raises(PosttrainError) as info:
        models.load_tokenizer(cfg_for(tmp_path / "bare", {"name": "tokenizer"}))
    line = info.value.line()
    assert "has no chat template" in line
    assert "template.name: chatml" in line


# ---------------------------------------------------------------------------------------------
# The real Gemma-3-270M base tokenizer: no chat template, but the turn tokens


@pytest.fixture(scope="module")
def gemma_dir(real_models):
    return real_models("gemma3")[1]


@pytest.fixture(scope="module")
def smol_dir(real_models):
    return real_models("smollm2")[1]


@pytest.fixture(scope="module")
def gemma(gemma_dir):
    return models.load_tokenizer(cfg_for(gemma_dir, {"name": "gemma"}))


@pytest.fixture(scope="module")
def gemma_raw(gemma_dir):
    """The tokenizer as it is saved (don't change it)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gemma_dir))


GEMMA_CONV = [S("You add numbers."), U("What is 39 + 45?"), A("39 + 45 = 84"), U("And 1 + 1?"), A("2")]


@pytest.mark.real
def test_gemma_base_tokenizer_facts(gemma_raw):
    t = gemma_raw
    assert t.chat_template is None
    ids = t.convert_tokens_to_ids(["<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>", "<pad>"])
    assert ids == [105, 106, 2, 1, 0]
    assert t("hi")["input_ids"][0] == 2  # plain encoding adds <bos>


@pytest.mark.real
def test_gemma_template_on_gemma_base_adds_no_tokens(gemma, gemma_raw):
    t = gemma.tokenizer
    assert gemma.added_tokens == []
    assert len(t) == len(gemma_raw)
    assert gemma.template == BUILTINS["gemma"].template
    assert gemma.eot_id == 106 == t.convert_tokens_to_ids("<end_of_turn>")
    assert t.pad_token == "<pad>" and t.pad_token_id == 0


@pytest.mark.real
def test_gemma_renders_ids_and_mask(gemma):
    t = gemma.tokenizer
    r = render(t, GEMMA_CONV)
    assert r.text == (
        "<bos><start_of_turn>user\nYou add numbers.\n\nWhat is 39 + 45?<end_of_turn>\n"
        "<start_of_turn>model\n39 + 45 = 84<end_of_turn>\n"
        "<start_of_turn>user\nAnd 1 + 1?<end_of_turn>\n<start_of_turn>model\n2<end_of_turn>\n"
    )
    ids = r.input_ids
    assert ids[0] == 2 and ids.count(2) == 1  # exactly one <bos>
    assert ids.count(105) == 4 and ids.count(106) == 4  # the turn tokens are single tokens
    assert [t.decode(run) for run in trained_runs(r)] == ["39 + 45 = 84<end_of_turn>", "2<end_of_turn>"]
    # nothing else is trained: the model header before and the newline after stay out
    for run_end in (k for k in range(len(ids) - 1) if r.trained[k] and not r.trained[k + 1]):
        assert ids[run_end] == 106 and t.decode(ids[run_end + 1:run_end + 2]) == "\n"
    assert check_rendered(r, t, gemma.eot_id, where="w") is None
    assert templates.bos_in_turns(t) is False


@pytest.mark.real
def test_gemma_trims_content_and_stays_prefix_preserving(gemma):
    # Gemma's template trims every user/model content (as the published one does): the trained text
    # is the trimmed answer + <end_of_turn>, and the prompt with its generation prompt is a token
    # prefix of the conversation, so what is trained is what the model continues at inference
    # (and DPO's prompt/completion split is exact), whatever whitespace the data has.
    t = gemma.tokenizer
    conv = [S("  Be kind.  "), U("  Héllo — ça va? 你好 🙂\n"), A("\n Bien, merci! 🙂 \n"),
            U(" x "), A("   ")]
    r = render(t, conv)
    assert r.text == ("<bos><start_of_turn>user\n  Be kind.  \n\nHéllo — ça va? 你好 🙂<end_of_turn>\n"
                      "<start_of_turn>model\nBien, merci! 🙂<end_of_turn>\n"
                      "<start_of_turn>user\nx<end_of_turn>\n<start_of_turn>model\n<end_of_turn>\n")
    # a whitespace-only answer trains just <end_of_turn>
    assert [t.decode(run) for run in trained_runs(r)] == ["Bien, merci! 🙂<end_of_turn>", "<end_of_turn>"]
    assert check_rendered(r, t, gemma.eot_id, where="w") is None
    for i in range(1, len(conv)):
        head = t.apply_chat_template(conv[:i], tokenize=True, return_dict=True)["input_ids"]
        assert r.input_ids[:len(head)] == list(head)
        if conv[i]["role"] == "assistant":
            prompt = t.apply_chat_template(conv[:i], tokenize=True, return_dict=True, add_generation_prompt=True)
            assert r.input_ids[:len(prompt["input_ids"])] == list(prompt["input_ids"])


@pytest.mark.real
def test_gemma_bos_checks(gemma):
    t = gemma.tokenizer
    eot = gemma.eot_id
    r = render(t, GEMMA_CONV)
    assert check_rendered(r, t, eot, where="w") is None  # one <bos>: fine
    # the template's {{ bos_token }} plus the tokenizer's own <bos> on plain encoding: caught
    doubled = t(r.text)["input_ids"]
    assert doubled[:2] == [2, 2] and doubled[1:] == r.input_ids
    with pytest.raises(PosttrainError, match="BOS"):
        check_rendered(templates.Rendered(doubled, [False, *r.trained], ["?"] * len(doubled), spans=[]), t, eot, "w")
    # a template that writes it twice: caught
    t.chat_template = "{{ bos_token }}" + BUILTINS["gemma"].template
    try:
        with pytest.raises(PosttrainError, match="BOS"):
            check_rendered(render(t, GEMMA_CONV), t, eot, "w")
    finally:
        t.chat_template = gemma.template
    # '<bos>' spelled in a message becomes a BOS inside the conversation: caught, with where it is
    bad = [U("Say <bos> please"), A("no")]
    with pytest.raises(PosttrainError) as info:
        check_rendered(render(t, bad), t, eot, "data.sft row 3")
    assert "'<bos>'" in info.value.line() and "user message" in info.value.line()
    assert info.value.line().startswith("data.sft row 3: ")


@pytest.mark.real
def test_gemma_tokenizer_template_error_names_gemma(gemma_raw):
    # what load_tokenizer does with template.name: tokenizer (the tokenizer is loaded once per module)
    with pytest.raises(PosttrainError) as info:
        templates.resolve("tokenizer", gemma_raw.chat_template, gemma_raw.get_vocab)
    line = info.value.line()
    assert "has no chat template" in line
    assert "template.name: gemma" in line


@pytest.mark.real
def test_gemma_chatml_error_names_gemma(gemma_raw):
    # what load_tokenizer does with template.name: chatml
    with pytest.raises(PosttrainError) as info:
        models._ensure_tokens(gemma_raw, templates.required_tokens(templates.resolve("chatml", None)), False)
    line = info.value.line()
    assert "<|im_start|>" in line and "template.name: gemma" in line
    assert "template.name: tokenizer" not in line  # it has none


@pytest.mark.real
def test_gemma_template_error_on_bad_roles_names_the_row(gemma, tmp_path):
    from posttrain.data import format_dataset
    from posttrain.sections import DataConfig

    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"messages": [U("a"), U("b"), A("c")]}) + "\n")
    f = format_dataset("sft", DataConfig(kind="sft", train=[{"path": str(p)}], eval_fraction=0))
    with pytest.raises(PosttrainError) as info:
        templates.check_rows(f.train, "sft", gemma.tokenizer, gemma.eot_id, "sft")
    line = info.value.line()
    assert line.startswith("data.sft row 0: ") and "alternate" in line


@pytest.mark.real
def test_gemma_pair_that_differs_only_in_trimmed_whitespace_is_caught(gemma, tok):
    # data.py keeps the pair (the texts differ), but Gemma's template trims them to the same tokens
    rows = [{"prompt": [U("What is 2 + 2?")], "chosen": [A("4")], "rejected": [A("5")]},
            {"prompt": [U("What is 2 + 3?")], "chosen": [A(" 5")], "rejected": [A("5\n")]}]
    with pytest.raises(PosttrainError) as info:
        templates.check_rows(rows, "preference", gemma.tokenizer, gemma.eot_id, "preference")
    assert info.value.line().startswith("data.preference row 1: chosen and rejected render to the same tokens")
    # negative control: ChatML keeps the whitespace, so the two sides differ and the rows pass
    t = copy.deepcopy(tok)
    t.chat_template = BUILTINS["chatml"].template
    stats = templates.check_rows(rows, "preference", t, t.convert_tokens_to_ids("<|im_end|>"), "preference")
    assert stats["checked_rows"] == 2


@pytest.mark.real
def test_format_and_preview_with_gemma_base(make_config, gemma_dir, tmp_path):
    from posttrain import manifest, preview
    from posttrain.stages import format as format_stage

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"messages": m}) + "\n" for m in (
        [S("  You are terse.  "), U("  Héllo — ça va? 你好 🙂  "), A("\n Bien, merci! 🙂 \n")],
        [U("What is 2 + 2?"), A("4"), U("And 3 + 3?"), A("  6  ")],
        [U("Code?"), A("```python\nprint('x')\n```")],
    )))
    cfg = make_config(model={"name_or_path": str(gemma_dir)}, template={"name": "gemma"},
                      data__extra={"kind": "sft", "train": [{"path": str(rows)}], "eval_fraction": 0})
    out = format_stage.run(cfg)
    m = manifest.read(out)
    for name in ("sft", "preference", "extra"):
        roles = m["datasets"][name]["checks"]["roles"]
        assert roles["user"]["trained"] == 0
        assert roles["assistant"]["trained_share"] > 0.3
    assert m["special_tokens"]
    preview.show(cfg, "sft", 1)


# ---------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct tokenizer: bos_token = <|im_start|>, pad = eos = <|im_end|>,
# a ChatML template that inserts a default system prompt


SMOL_DEFAULT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.mark.real
def test_smollm2_chatml_is_not_a_duplicated_bos(smol_dir):
    # <|im_start|> is SmolLM2's bos_token and opens every ChatML turn: not a duplicate BOS
    info = models.load_tokenizer(cfg_for(smol_dir, {"name": "chatml"}))
    t = info.tokenizer
    assert t.bos_token == "<|im_start|>"
    r = render(t, [S("s"), U("a"), A("b"), U("c"), A("d")])
    assert r.input_ids.count(t.bos_token_id) == 5
    assert templates.bos_in_turns(t) is True
    assert check_rendered(r, t, info.eot_id, where="w") is None
    # negative control: {{ bos_token }} before ChatML starts the conversation with <|im_start|> twice
    t2 = copy.deepcopy(t)
    t2.chat_template = "{{ bos_token }}" + BUILTINS["chatml"].template
    r2 = render(t2, [U("a"), A("b")])
    assert r2.input_ids[:2] == [t.bos_token_id, t.bos_token_id]
    with pytest.raises(PosttrainError, match="BOS"):
        check_rendered(r2, t2, info.eot_id, where="w")


@pytest.mark.real
def test_smollm2_pad_is_distinct_from_eos_and_unused(smol_dir):
    info = models.load_tokenizer(cfg_for(smol_dir, {"name": "chatml"}))
    t = info.tokenizer
    assert t.eos_token == "<|im_end|>" == t.convert_ids_to_tokens(info.eot_id)
    assert t.pad_token_id not in {t.eos_token_id, info.eot_id, t.bos_token_id, t.unk_token_id}
    assert t.added_tokens_decoder[t.pad_token_id].special
    assert t.pad_token not in templates.required_tokens(info.template)


@pytest.mark.real
def test_smollm2_own_template_gets_markers_and_keeps_its_default_system(smol_dir):
    from transformers import AutoTokenizer

    original = AutoTokenizer.from_pretrained(str(smol_dir)).chat_template
    assert not templates.has_generation_markers(original)
    info = models.load_tokenizer(cfg_for(smol_dir, {"name": "tokenizer"}))
    t = info.tokenizer
    assert templates.has_generation_markers(info.template)
    assert info.added_tokens == []
    for conv in ([U("a"), A("b")], [S("s"), U("a"), A("b")], [U("a"), A("b"), U("c"), A("d")]):
        for gen in (False, True):
            assert text(t, info.template, conv, gen, {}) == text(t, original, conv, gen, {})
    r = render(t, [U("What is 2 + 2?"), A("4")])
    assert r.text.startswith(f"<|im_start|>system\n{SMOL_DEFAULT}<|im_end|>\n<|im_start|>user\n")
    # the inserted system prompt is the system's tokens, not the user's; only the answer is trained
    assert [s[0] for s in r.spans] == ["system", "user", "assistant"]
    assert t.decode(r.input_ids[r.spans[0][1]:r.spans[0][2]]) == f"<|im_start|>system\n{SMOL_DEFAULT}<|im_end|>\n"
    assert [t.decode(run) for run in trained_runs(r)] == ["4<|im_end|>"]
    assert check_rendered(r, t, info.eot_id, where="w") is None


@pytest.mark.real
@pytest.mark.parametrize("template", ["chatml", "tokenizer"])
def test_format_and_preview_with_smollm2(make_config, smol_dir, tmp_path, template):
    from posttrain import manifest, preview
    from posttrain.stages import format as format_stage

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"messages": m}) + "\n" for m in (
        [S("  You are terse.  "), U("  Héllo — ça va? 你好 🙂  "), A("\n Bien, merci! 🙂 \n")],
        [U("What is 2 + 2?"), A("4"), U("And 3 + 3?"), A("  6  ")],
        [U("Empty-ish"), A("   "), U("Again"), A("ok")],
    )))
    cfg = make_config(model={"name_or_path": str(smol_dir)}, template={"name": template},
                      data__extra={"kind": "sft", "train": [{"path": str(rows)}], "eval_fraction": 0})
    out = format_stage.run(cfg)
    m = manifest.read(out)
    for name in ("sft", "preference", "extra"):
        roles = m["datasets"][name]["checks"]["roles"]
        assert roles["user"]["trained"] == 0
        assert roles.get("system", {"trained": 0})["trained"] == 0
        assert roles["assistant"]["trained_share"] > 0.3
    if template == "tokenizer":  # the default system prompt shows as system tokens
        assert m["datasets"]["sft"]["checks"]["roles"]["system"]["tokens"] > 0
    preview.show(cfg, "sft", 1)


def test_gemma2_tokenizer_template_works_through_trls_patch(tiny_dir, tmp_path):
    # Gemma 1/2 templates refuse a system message, so they are not the gemma built-in; TRL's training
    # version trains '<end_of_turn>\n'. The probes then skip the system message, and the trained
    # newline after <end_of_turn> does not count as a missing end-of-turn token.
    import trl
    from transformers import AutoTokenizer

    chat_templates = Path(trl.__file__).parent / "chat_templates"
    t = AutoTokenizer.from_pretrained(str(tiny_dir))
    t.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]},
                         replace_extra_special_tokens=False)
    t.chat_template = (chat_templates / "gemma.jinja").read_text(encoding="utf-8")
    t.save_pretrained(tmp_path / "gemma2ish")
    info = models.load_tokenizer(cfg_for(tmp_path / "gemma2ish", {"name": "tokenizer"}))
    assert info.template == (chat_templates / "gemma_training.jinja").read_text(encoding="utf-8")
    assert info.eot_id == info.tokenizer.convert_tokens_to_ids("<end_of_turn>")
    stats = templates.check_rows([{"messages": MULTI}], "sft", info.tokenizer, info.eot_id, "sft")
    assert stats["roles"]["user"]["trained"] == 0
