"""posttrain.preview (`posttrain preview`, safeguard #12): rendered samples with the trained tokens
highlighted and the trained share per role, on the tiny model; only the tokens in the loss are
highlighted; a stage without training data, -n 0 and a stage data name missing under data: are
one-line errors. (Through the CLI: test_cli.py; with real tokenizers: test_family_templates.py.)"""

from __future__ import annotations

import re

import pytest

from posttrain import models, preview, templates
from posttrain.console import console
from posttrain.errors import PosttrainError


def test_preview_shows_samples_and_the_trained_share_by_role(make_config):
    cfg = make_config()
    with console.capture() as captured:
        preview.show(cfg, "sft", 2)
    out = captured.get()
    assert "sample 0: " in out and "sample 1: " in out and "sample 2: " not in out
    assert "What is" in out and "<|im_start|>assistant" in out  # the rendered conversation
    assert "trained tokens by role" in out and "data.sft" in out
    rows = {m[0]: m[1:] for m in re.findall(r"│ (\w+) +│ +(\d+) │ +(\d+) │ +([\d.]+%) │", out)}
    assert set(rows) == {"user", "assistant"}
    assert rows["user"][1:] == ("0", "0.0%")  # the prompt is never trained
    assert 0 < int(rows["assistant"][1]) <= int(rows["assistant"][0])

    with console.capture() as captured:
        preview.show(cfg, "dpo", 1)
    assert "sample 0 (chosen)" in captured.get() and "sample 0 (rejected)" in captured.get()


def test_only_the_trained_tokens_are_highlighted(make_config):
    tok = models.load_tokenizer(make_config())
    r = templates.render(tok.tokenizer, [{"role": "user", "content": "What is 1 + 2?"},
                                         {"role": "assistant", "content": "1 + 2 = 3"}])
    text = preview.highlighted(tok.tokenizer, r)
    assert text.plain == tok.tokenizer.decode(r.input_ids)
    assert any(r.trained) and not all(r.trained)
    trained = "".join(text.plain[s.start:s.end] for s in text.spans if s.style == "bold green on grey15")
    context = "".join(text.plain[s.start:s.end] for s in text.spans if s.style == "dim")
    assert trained == "1 + 2 = 3<|im_end|>"  # the answer and its end-of-turn token
    assert "What is 1 + 2?" in context and "1 + 2 = 3" not in context


@pytest.mark.parametrize(("stage", "n", "message"), [
    ("ppo", 1, "--stage 'ppo' has no training data to preview"),
    ("sft", 0, "-n must be at least 1"),
    ("dpo", 1, "dpo.data names dataset 'nothere', which is not under data:"),
])
def test_bad_arguments_are_one_line_errors(make_config, stage, n, message):
    cfg = make_config(dpo__data="nothere")
    with pytest.raises(PosttrainError) as e:
        preview.show(cfg, stage, n)
    assert message in e.value.line() and "\n" not in e.value.line()
