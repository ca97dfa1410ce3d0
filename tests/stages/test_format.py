"""posttrain.stages.format (`posttrain format`): the datasets it is told to format are written as
parquet with a manifest that counts the rows, lists each dropped row with its reason, and holds
the per-role trained-token shares and the template hash. (Through the CLI, and the later stages
reusing the output: test_cli.py, test_safeguards.py; with real tokenizers: test_family_templates.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from datasets import Dataset

from posttrain import manifest, models
from posttrain.errors import PosttrainError
from posttrain.stages import format as format_stage


def test_format_writes_the_chosen_datasets_and_records_dropped_rows(make_config, tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"What is {i} + 1?"},
                          {"role": "assistant", "content": f"{i} + 1 = {i + 1}"}]} for i in range(9)]
    rows.insert(4, {"messages": [{"role": "user", "content": "no answer"}]})  # row 4: no assistant turn
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = make_config(data__mine={"kind": "sft", "train": [{"path": str(path)}], "eval_fraction": 0.2,
                                  "max_bad_fraction": 0.2},
                      format={"datasets": ["mine"]})
    out = format_stage.run(cfg)

    assert out == Path(cfg.output_dir) / "format"
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["mine"]  # sft and preference were not asked for
    m = manifest.read(out)
    r = m["datasets"]["mine"]
    assert (r["kind"], r["rows_in"], r["dropped"]) == ("sft", 10, 1)
    assert r["train_rows"] + r["eval_rows"] == 9 and r["eval_rows"] > 0
    (dropped,) = r["dropped_rows"]
    assert dropped["row"] == 4 and dropped["source"] == str(path) and "assistant" in dropped["reason"]
    assert len(Dataset.from_parquet(str(out / "mine" / "train.parquet"))) == r["train_rows"]
    assert len(Dataset.from_parquet(str(out / "mine" / "eval.parquet"))) == r["eval_rows"]
    assert r["checks"]["roles"]["user"]["trained"] == 0 and r["checks"]["roles"]["assistant"]["trained"] > 0
    assert m["template_hash"] == models.load_tokenizer(cfg).template_hash
    assert m["stage"] == "format" and m["parent"] is None

    # a finished output is not overwritten unless asked
    with pytest.raises(PosttrainError, match="already holds a finished stage"):
        format_stage.run(cfg)
    assert format_stage.run(cfg, overwrite=True) == out
