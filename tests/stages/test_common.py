"""posttrain.stages.common, the pieces every training stage shares: the save-time re-open checks
(an empty or missing adapter, a tokenizer saved with another template; safeguards #20, #23), the
parent agreement check, and the trainer arguments (evaluation at every save, progress bars).
"""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from posttrain import manifest, models
from posttrain.errors import PosttrainError
from posttrain.stages import common
from tests.helpers import OTHER_TEMPLATE

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# common.check_saved re-opens what a stage saved (`saved_adapter`: conftest.py)


@pytest.fixture
def saved_copy(saved_adapter, tmp_path, make_config):
    """A copy of `saved_adapter` to break, and the TokenizerInfo a stage would have trained with."""
    d = tmp_path / "stage"
    shutil.copytree(saved_adapter, d)
    return d, models.load_tokenizer(make_config(), str(d), need_masks=False)


def test_check_saved_accepts_a_good_adapter(saved_copy):
    d, tok = saved_copy
    common.check_saved(d, tok, "lora")
    common.check_saved(d, tok, "qlora")


def test_check_saved_refuses_an_all_zero_adapter(saved_copy):
    d, tok = saved_copy
    path = d / "adapter_model.safetensors"
    weights = load_file(str(path))
    assert any("lora_B" in k for k in weights)
    save_file({k: torch.zeros_like(v) if "lora_B" in k else v for k, v in weights.items()}, str(path))
    with pytest.raises(PosttrainError, match=r"is empty or all zeros \(nothing was trained\)"):
        common.check_saved(d, tok, "lora")
    common.check_saved(d, tok, "full")  # a full model has no adapter to check


def test_check_saved_refuses_a_missing_adapter(saved_copy):
    d, tok = saved_copy
    (d / "adapter_model.safetensors").unlink()
    with pytest.raises(PosttrainError, match=r"no adapter was saved in"):
        common.check_saved(d, tok, "lora")


def test_check_saved_refuses_a_tokenizer_saved_with_another_template(saved_copy):
    from transformers import AutoTokenizer

    d, tok = saved_copy
    other = AutoTokenizer.from_pretrained(str(d))
    other.chat_template = OTHER_TEMPLATE
    other.save_pretrained(str(d))
    for method in ("full", "lora"):
        with pytest.raises(PosttrainError, match=r"the tokenizer saved in .* renders differently"):
            common.check_saved(d, tok, method)


# ---------------------------------------------------------------------------------------------
# The parent a stage continues


def test_parent_with_another_vocabulary_size_is_refused(make_config, tmp_path):
    cfg = make_config()
    tok = models.load_tokenizer(cfg)
    parent = tmp_path / "sft"
    parent.mkdir()
    recorded = common.special_tokens(tok)
    manifest.write(parent, {"stage": "sft", "template_hash": tok.template_hash, "special_tokens": recorded})
    common.check_agrees_with_parent(str(parent), tok)  # positive control
    manifest.write(parent, {"stage": "sft", "template_hash": tok.template_hash,
                            "special_tokens": {**recorded, "vocab_size": recorded["vocab_size"] + 3}})
    n = recorded["vocab_size"]
    with pytest.raises(PosttrainError, match=rf"special tokens differ \(vocab_size {n + 3} → {n}\)"):
        common.check_agrees_with_parent(str(parent), tok)
    common.check_agrees_with_parent(str(parent), tok, allow=True, setting="dpo.allow_template_mismatch")


# ---------------------------------------------------------------------------------------------
# The trainer's arguments


def test_trainer_kwargs_evaluate_at_every_save_when_there_is_eval_data(make_config, tmp_path):
    cfg = make_config(sft__training={"save_steps": 7})
    kw = common.trainer_kwargs(cfg, "sft", tmp_path, has_eval=True)
    assert (kw["eval_strategy"], kw["eval_steps"], kw["metric_for_best_model"]) == ("steps", 7, "eval_loss")
    kw = common.trainer_kwargs(cfg, "sft", tmp_path, has_eval=False)
    assert kw["eval_strategy"] == "no" and "metric_for_best_model" not in kw
    cfg = make_config(sft__training={"save_steps": 7, "eval_strategy": "no"})
    assert common.trainer_kwargs(cfg, "sft", tmp_path, has_eval=True)["eval_strategy"] == "no"  # the user's


def test_progress_bars_only_on_a_terminal(make_config, tmp_path, monkeypatch):
    """Issue 17: written to a file or CI, the trainer logs one line per logging step instead of a
    progress bar redrawn with \\r; on a terminal the bar stays; the user's setting wins."""
    import sys

    cfg = make_config()
    for tty in (False, True):
        monkeypatch.setattr(sys.stderr, "isatty", lambda tty=tty: tty)
        assert common.trainer_kwargs(cfg, "sft", tmp_path, has_eval=False)["disable_tqdm"] is (not tty)
    cfg = make_config(sft__training={"disable_tqdm": False})
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert common.trainer_kwargs(cfg, "sft", tmp_path, has_eval=False)["disable_tqdm"] is False
