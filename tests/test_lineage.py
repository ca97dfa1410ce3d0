"""posttrain.lineage: the stage inputs key. Every part of what a stage reads changes it (the config
sections, each data file's content, the template's text, the parent's identity), and nothing else
does; an in-place edit of a data file changes it, a touch does not (safeguard #26).

The key of a GGUF parent and the origin passed down the chain are in test_gguf.py; the chain's
skip and resume decisions in test_chain.py and test_safeguards.py.
"""

from __future__ import annotations

import json
import os

from posttrain import lineage
from tests.helpers import chain_config
from tests.helpers import own_sft_data as _sft_data
from tests.helpers import same_size_edit as _same_size_edit


def _sft_key(tiny_dir, demo_data, tmp_path, parent=None, **changes) -> str:
    from posttrain import lineage
    from posttrain.config import validate_dict

    raw = chain_config(tiny_dir, demo_data, tmp_path / "out", **changes)
    return lineage.stage_key(validate_dict(raw), "sft", str(parent or tiny_dir))


def test_every_part_of_the_sft_inputs_key_changes_it(tiny_dir, demo_data, tmp_path):
    """Issue 17 (b): model, template, seed, the sft section, each data source (its config and its
    file's content) and the parent each change SFT's key; what SFT does not read does not."""
    import shutil

    data = tmp_path / "data"
    data.mkdir()
    for name in ("sft_train.jsonl", "sft_eval.jsonl", "pref_train.jsonl", "pref_eval.jsonl"):
        shutil.copy(demo_data / name, data / name)
    parent = tmp_path / "model"
    shutil.copytree(tiny_dir, parent)
    base = _sft_key(parent, data, tmp_path)
    assert _sft_key(parent, data, tmp_path) == base  # deterministic
    training = chain_config(tiny_dir, data, tmp_path)["sft"]["training"]
    changed = {
        "model": _sft_key(parent, data, tmp_path, model={"name_or_path": str(parent), "dtype": "float32"}),
        "template name": _sft_key(parent, data, tmp_path, template={"name": "llama3"}),
        "template system prompt": _sft_key(parent, data, tmp_path, template={"name": "chatml",
                                                                               "system_prompt": "Be brief."}),
        "seed": _sft_key(parent, data, tmp_path, seed=1),
        "sft section": _sft_key(parent, data, tmp_path, sft__training={**training, "learning_rate": 1e-3}),
        "sft assistant_only_loss": _sft_key(parent, data, tmp_path, sft__assistant_only_loss=False),
        "sft data source": _sft_key(parent, data, tmp_path, data__sft={
            "kind": "sft", "train": [{"path": str(data / "sft_train.jsonl")}]}),
        "parent path": _sft_key(parent, data, tmp_path, parent=tiny_dir),
    }
    for part, key in changed.items():
        assert key != base, f"changing the {part} leaves SFT's inputs key the same"
    assert len(set(changed.values())) == len(changed)

    # not read by SFT: the DPO section and the preference data
    assert _sft_key(parent, data, tmp_path, dpo__training={"beta": 0.5}) == base
    assert _sft_key(parent, data, tmp_path, data__preference={
        "kind": "preference", "train": [{"path": str(data / "pref_eval.jsonl")}]}) == base

    # the contents of each data file SFT reads (train and eval)
    for name in ("sft_train.jsonl", "sft_eval.jsonl"):
        f = data / name
        text = f.read_text()
        f.write_text(text + text.splitlines(keepends=True)[0])
        assert _sft_key(parent, data, tmp_path) != base, f"a changed {name} leaves SFT's key the same"
        f.write_text(text)
        assert _sft_key(parent, data, tmp_path) == base

    # the parent's identity: its config (a re-run parent changes every child's key)
    cfg_file = parent / "config.json"
    original = cfg_file.read_text()
    cfg_file.write_text(json.dumps({**json.loads(original), "posttrain_test": 1}))
    assert _sft_key(parent, data, tmp_path) != base, "a changed parent leaves SFT's key the same"
    cfg_file.write_text(original)
    assert _sft_key(parent, data, tmp_path) == base

    # a .jinja template: its text, not only its path (editing the file must rerun SFT)
    from posttrain import templates

    jinja = tmp_path / "chat.jinja"
    jinja.write_text(templates.BUILTINS["chatml"].template)
    with_file = _sft_key(parent, data, tmp_path, template={"name": str(jinja)})
    assert _sft_key(parent, data, tmp_path, template={"name": str(jinja)}) == with_file
    jinja.write_text(templates.BUILTINS["chatml"].template + "\n")
    assert _sft_key(parent, data, tmp_path, template={"name": str(jinja)}) != with_file, \
        "an edited .jinja template leaves SFT's key the same"


def test_stage_key_follows_an_in_place_data_edit(make_config, own_data, tiny_dir):
    cfg = make_config(data__sft=_sft_data(own_data))
    key = lineage.stage_key(cfg, "sft", str(tiny_dir))
    path = own_data / "sft_train.jsonl"
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # touched, not changed
    assert lineage.stage_key(cfg, "sft", str(tiny_dir)) == key, "the key is on content, not on mtime"
    _same_size_edit(path)
    assert lineage.stage_key(cfg, "sft", str(tiny_dir)) != key
