"""Stage directories: the manifest marks a finished stage; --overwrite clears stale files; a
directory that is not a posttrain stage is never wiped."""

from __future__ import annotations

import pytest

from posttrain import manifest
from posttrain.config import load_config
from posttrain.data import to_canonical
from posttrain.errors import PosttrainError


def test_manifest_write_is_atomic_and_marks_finished(tmp_path):
    assert not manifest.is_finished(tmp_path)
    manifest.write(tmp_path, {"stage": "sft"})
    assert manifest.is_finished(tmp_path) and manifest.read(tmp_path) == {"stage": "sft"}
    assert not list(tmp_path.glob(".*.tmp"))


def test_overwrite_clears_stale_files_and_resume_keeps_checkpoints(tmp_path):
    d = tmp_path / "sft"
    (d / "checkpoints" / "checkpoint-10").mkdir(parents=True)
    (d / "stale.parquet").write_text("old")
    manifest.write(d, {"stage": "sft"})
    with pytest.raises(PosttrainError, match="--overwrite"):
        manifest.prepare_output(d, overwrite=False)
    manifest.prepare_output(d, overwrite=True, resume=True)
    assert (d / "checkpoints" / "checkpoint-10").exists() and not manifest.is_finished(d)
    manifest.prepare_output(d, overwrite=True)
    assert list(d.iterdir()) == []


def test_never_wipes_a_directory_that_is_not_a_stage(tmp_path):
    (tmp_path / "thesis.tex").write_text("precious")
    with pytest.raises(PosttrainError, match="not empty"):
        manifest.prepare_output(tmp_path, overwrite=True)
    assert (tmp_path / "thesis.tex").read_text() == "precious"


def test_prompt_repeated_inside_chosen_is_stripped():
    """ultrafeedback_binarized: prompt column + chosen/rejected that repeat the user turn."""
    user = {"role": "user", "content": "Hi?"}
    row = {"prompt": "Hi?", "chosen": [user, {"role": "assistant", "content": "Hello."}],
           "rejected": [user, {"role": "assistant", "content": "Go away."}]}
    out = to_canonical(row, "preference", {})
    assert out == {"prompt": [user], "chosen": [{"role": "assistant", "content": "Hello."}],
                   "rejected": [{"role": "assistant", "content": "Go away."}]}


def test_set_addresses_list_items(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("model: {name_or_path: m}\ndata:\n  sft:\n    kind: sft\n    train:\n      - path: a.jsonl\n")
    cfg = load_config(cfg_file, ["data.sft.train.0.limit=5"])
    assert cfg.data["sft"].train[0].limit == 5
    with pytest.raises(PosttrainError, match="not an index"):
        load_config(cfg_file, ["data.sft.train.3.limit=5"])
