"""Security defaults: no pickle weights unless allowed, a loud trust_remote_code, and configs that
cannot run code (YAML tags are refused; `module:function` hooks are the only imports, tested in
test_online.py / test_metrics.py). The planted-secret search over a whole chain's artifacts is in
tests/stages/test_eval.py."""

from __future__ import annotations

import shutil

import pytest

from posttrain import models
from posttrain.config import load_config
from posttrain.errors import PosttrainError


@pytest.fixture(scope="module")
def pickled_model(tiny_dir, tmp_path_factory):
    """The tiny model with its weights as pytorch_model.bin only."""
    from transformers import AutoModelForCausalLM

    d = tmp_path_factory.mktemp("pickled")
    for f in tiny_dir.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy(f, d / f.name)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir))
    import torch

    torch.save(model.state_dict(), d / "pytorch_model.bin")
    return d


def test_pickle_weights_are_refused_unless_allowed(make_config, pickled_model):
    cfg = make_config(model={"name_or_path": str(pickled_model)})
    tok = models.load_tokenizer(cfg, need_masks=False)
    with pytest.raises(PosttrainError, match="only as pickle .*pytorch_model.bin.*allow_pickle_weights"):
        models.load_causal_lm(cfg, str(pickled_model), "full", cfg.sft.lora, tok)
    allowed = make_config(model={"name_or_path": str(pickled_model), "allow_pickle_weights": True})
    model = models.load_causal_lm(allowed, str(pickled_model), "full", allowed.sft.lora, tok)
    assert sum(p.numel() for p in model.parameters()) > 0


def test_safetensors_models_load_without_the_setting(make_config, tiny_dir):
    cfg = make_config()
    tok = models.load_tokenizer(cfg, need_masks=False)
    assert models.load_causal_lm(cfg, str(tiny_dir), "full", cfg.sft.lora, tok) is not None


def test_trust_remote_code_warns_and_names_the_repository(make_config, tiny_dir, capsys):
    models._warned_remote_code.clear()
    models.load_tokenizer(make_config(), need_masks=False)
    assert "trust_remote_code" not in capsys.readouterr().err
    models.load_tokenizer(make_config(model={"name_or_path": str(tiny_dir), "trust_remote_code": True}),
                          need_masks=False)
    err = " ".join(capsys.readouterr().err.split())
    assert "trust_remote_code is on" in err and str(tiny_dir) in err


@pytest.mark.parametrize("tag", ["!!python/object/apply:os.system ['touch pwned']", "!!python/name:os.system"])
def test_a_config_cannot_construct_python_objects(tag, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = tmp_path / "evil.yaml"
    p.write_text(f"model:\n  name_or_path: {tag}\n")
    with pytest.raises(PosttrainError):
        load_config(p)
    assert not (tmp_path / "pwned").exists()
