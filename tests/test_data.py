"""Data formatting: every input shape into the canonical conversational forms, and whole files
through format_dataset. Expected outputs are written out by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from posttrain.data import RowError, detect_shape, format_dataset, to_canonical
from posttrain.errors import PosttrainError
from posttrain.sections import DataConfig
from tests.helpers import row_cases as _rows


def U(text):
    return {"role": "user", "content": text}


def A(text):
    return {"role": "assistant", "content": text}


def S(text):
    return {"role": "system", "content": text}


# ---------------------------------------------------------------------------------------------
# detect_shape


@pytest.mark.parametrize(
    ("columns", "shape"),
    [
        (["messages"], "messages"),
        (["messages", "id"], "messages"),
        (["conversations"], "sharegpt"),
        (["instruction", "input", "output"], "alpaca"),
        (["instruction", "output"], "alpaca"),
        (["prompt", "completion"], "prompt_completion"),
        (["system", "prompt", "completion"], "prompt_completion"),
    ],
)
def test_detect_shape_sft(columns, shape):
    assert detect_shape(columns, "sft") == shape


@pytest.mark.parametrize(
    "columns", [["chosen", "rejected"], ["prompt", "chosen", "rejected"], ["system", "prompt", "chosen", "rejected"]]
)
def test_detect_shape_preference(columns):
    assert detect_shape(columns, "preference") == "preference"


def test_detect_shape_unknown_sft_columns():
    with pytest.raises(PosttrainError) as info:
        detect_shape(["question", "answer"], "sft")
    assert "['answer', 'question']" in info.value.line()
    assert "columns:" in info.value.line()


def test_detect_shape_instruction_without_output_is_unknown():
    with pytest.raises(PosttrainError):
        detect_shape(["instruction", "input"], "sft")


def test_detect_shape_preference_needs_chosen_and_rejected():
    with pytest.raises(PosttrainError) as info:
        detect_shape(["prompt", "chosen"], "preference")
    assert "'chosen' and 'rejected'" in info.value.line()


def test_detect_shape_sft_columns_are_not_preference():
    with pytest.raises(PosttrainError):
        detect_shape(["messages"], "preference")


# ---------------------------------------------------------------------------------------------
# to_canonical, SFT shapes


def test_openai_messages():
    row = {"messages": [S("Be brief."), U("Hi"), A("Hello!"), U("Bye"), A("Bye!")]}
    assert to_canonical(row, "messages", {}) == {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Bye!"},
        ]
    }


def test_openai_messages_extra_keys_are_dropped():
    row = {"messages": [{"role": "user", "content": "Hi", "name": "bob"},
                        {"role": "assistant", "content": "Yo", "x": 1}]}
    assert to_canonical(row, "messages", {}) == {
        "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    }


def test_sharegpt_conversations():
    row = {
        "conversations": [
            {"from": "system", "value": "You add numbers."},
            {"from": "human", "value": "What is 1 + 2?"},
            {"from": "gpt", "value": "1 + 2 = 3"},
        ]
    }
    assert to_canonical(row, "sharegpt", {}) == {
        "messages": [
            {"role": "system", "content": "You add numbers."},
            {"role": "user", "content": "What is 1 + 2?"},
            {"role": "assistant", "content": "1 + 2 = 3"},
        ]
    }


def test_sharegpt_missing_value_key():
    with pytest.raises(RowError) as info:
        to_canonical({"conversations": [{"from": "human", "text": "hi"}]}, "sharegpt", {})
    assert "conversations[0]" in str(info.value)


def test_alpaca_with_input():
    row = {"instruction": "Translate to French.", "input": "cheese", "output": "fromage"}
    assert to_canonical(row, "alpaca", {}) == {
        "messages": [
            {"role": "user", "content": "Translate to French.\n\ncheese"},
            {"role": "assistant", "content": "fromage"},
        ]
    }


@pytest.mark.parametrize("inp", ["", None, "<missing>"])
def test_alpaca_without_input(inp):
    row = {"instruction": "Name a colour.", "output": "Blue"}
    if inp != "<missing>":
        row["input"] = inp
    assert to_canonical(row, "alpaca", {}) == {
        "messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue"}]
    }


def test_alpaca_empty_output_is_row_error():
    with pytest.raises(RowError):
        to_canonical({"instruction": "Say hi.", "input": "", "output": "   "}, "alpaca", {})


def test_alpaca_non_text_instruction():
    with pytest.raises(RowError) as info:
        to_canonical({"instruction": 5, "output": "x"}, "alpaca", {})
    assert "'instruction'" in str(info.value)


def test_prompt_completion_text():
    assert to_canonical({"prompt": "What is 2 + 2?", "completion": "2 + 2 = 4"}, "prompt_completion", {}) == {
        "messages": [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "2 + 2 = 4"}]
    }


def test_prompt_completion_message_lists():
    row = {"prompt": [S("sys"), U("q1"), A("a1"), U("q2")], "completion": [A("a2")]}
    assert to_canonical(row, "prompt_completion", {}) == {
        "messages": [
            {"role": "system", "content": "sys"},
            {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "q2"},
            {"role": "assistant", "content": "a2"},
        ]
    }


def test_prompt_completion_empty_completion():
    with pytest.raises(RowError):
        to_canonical({"prompt": "q", "completion": ""}, "prompt_completion", {})


def test_system_column_becomes_first_message():
    row = {"system": "Be terse.", "prompt": "q", "completion": "a"}
    assert to_canonical(row, "prompt_completion", {}) == {
        "messages": [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "a"},
        ]
    }


def test_system_column_with_messages():
    row = {"system": "Be terse.", "messages": [U("q"), A("a")]}
    assert to_canonical(row, "messages", {})["messages"] == [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
    ]


def test_system_prompt_default_used_only_without_system():
    row = {"messages": [U("q"), A("a")]}
    assert to_canonical(row, "messages", {}, system_prompt="Default.")["messages"][0] == {
        "role": "system",
        "content": "Default.",
    }
    row = {"messages": [S("Own."), U("q"), A("a")]}
    out = to_canonical(row, "messages", {}, system_prompt="Default.")["messages"]
    assert out == [{"role": "system", "content": "Own."}, {"role": "user", "content": "q"},
                   {"role": "assistant", "content": "a"}]


def test_system_column_not_text():
    with pytest.raises(RowError) as info:
        to_canonical({"system": 3, "prompt": "q", "completion": "a"}, "prompt_completion", {})
    assert "'system'" in str(info.value)


def test_role_mapping():
    row = {"messages": [{"role": "human", "content": "q"}, {"role": "bot", "content": "a"}]}
    assert to_canonical(row, "messages", {"bot": "assistant"}) == {
        "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    }


def test_custom_role_mapping():
    row = {"conversations": [{"from": "asker", "value": "q"}, {"from": "oracle", "value": "a"}]}
    assert to_canonical(row, "sharegpt", {"asker": "user", "oracle": "assistant"}) == {
        "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    }


def test_unknown_role_raises_row_error():
    row = {"messages": [{"role": "narrator", "content": "q"}, {"role": "assistant", "content": "a"}]}
    with pytest.raises(RowError) as info:
        to_canonical(row, "messages", {})
    assert "'narrator'" in str(info.value)
    assert "messages[0]" in str(info.value)


def test_role_mapped_to_invalid_role_raises_row_error():
    row = {"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}
    with pytest.raises(RowError):
        to_canonical(row, "messages", {"bot": "robot"})


@pytest.mark.parametrize("role", [["user"], {"name": "user"}])
def test_non_text_role_raises_row_error(role):
    # A role that is a list or mapping is bad data, not a crash.
    row = {"messages": [{"role": role, "content": "q"}, {"role": "assistant", "content": "a"}]}
    with pytest.raises(RowError):
        to_canonical(row, "messages", {})


def test_empty_assistant_raises_row_error():
    with pytest.raises(RowError) as info:
        to_canonical({"messages": [U("q"), A("   ")]}, "messages", {})
    assert "assistant" in str(info.value)


def test_no_assistant_raises_row_error():
    with pytest.raises(RowError):
        to_canonical({"messages": [U("q")]}, "messages", {})


@pytest.mark.parametrize("value", [[], "just text", None, [{"role": "user"}], [{"role": "user", "content": 3}]])
def test_malformed_messages_raise_row_error(value):
    with pytest.raises(RowError):
        to_canonical({"messages": value}, "messages", {})


# ---------------------------------------------------------------------------------------------
# to_canonical, preference shapes


def test_preference_explicit_text_prompt():
    row = {"prompt": "What is 39 + 45?", "chosen": "39 + 45 = 84", "rejected": "39 + 45 = 85"}
    assert to_canonical(row, "preference", {}) == {
        "prompt": [{"role": "user", "content": "What is 39 + 45?"}],
        "chosen": [{"role": "assistant", "content": "39 + 45 = 84"}],
        "rejected": [{"role": "assistant", "content": "39 + 45 = 85"}],
    }


def test_preference_explicit_message_list_prompt():
    row = {"prompt": [S("sys"), U("q")], "chosen": [A("good")], "rejected": [A("bad")]}
    assert to_canonical(row, "preference", {}) == {
        "prompt": [{"role": "system", "content": "sys"}, {"role": "user", "content": "q"}],
        "chosen": [{"role": "assistant", "content": "good"}],
        "rejected": [{"role": "assistant", "content": "bad"}],
    }


def test_preference_implicit_prompt_from_message_lists():
    row = {
        "chosen": [U("q1"), A("a1"), U("q2"), A("good")],
        "rejected": [U("q1"), A("a1"), U("q2"), A("bad")],
    }
    assert to_canonical(row, "preference", {}) == {
        "prompt": [
            {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "q2"},
        ],
        "chosen": [{"role": "assistant", "content": "good"}],
        "rejected": [{"role": "assistant", "content": "bad"}],
    }


def test_preference_implicit_prompt_from_hh_text():
    row = {
        "chosen": "\n\nHuman: What is 2 + 2?\n\nAssistant: 4",
        "rejected": "\n\nHuman: What is 2 + 2?\n\nAssistant: 5",
    }
    assert to_canonical(row, "preference", {}) == {
        "prompt": [{"role": "user", "content": "What is 2 + 2?"}],
        "chosen": [{"role": "assistant", "content": "4"}],
        "rejected": [{"role": "assistant", "content": "5"}],
    }


def test_preference_implicit_prompt_from_multi_turn_hh_text():
    row = {
        "chosen": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Add 1 and 2.\n\nAssistant: 3",
        "rejected": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Add 1 and 2.\n\nAssistant: 12",
    }
    assert to_canonical(row, "preference", {}) == {
        "prompt": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Add 1 and 2."},
        ],
        "chosen": [{"role": "assistant", "content": "3"}],
        "rejected": [{"role": "assistant", "content": "12"}],
    }


def test_preference_hh_text_without_leading_newlines():
    row = {"chosen": "Human: q\n\nAssistant: yes", "rejected": "Human: q\n\nAssistant: no"}
    assert to_canonical(row, "preference", {}) == {
        "prompt": [{"role": "user", "content": "q"}],
        "chosen": [{"role": "assistant", "content": "yes"}],
        "rejected": [{"role": "assistant", "content": "no"}],
    }


def test_preference_plain_text_without_prompt_is_row_error():
    with pytest.raises(RowError):
        to_canonical({"chosen": "good", "rejected": "bad"}, "preference", {})


def test_preference_no_shared_prefix_is_row_error():
    with pytest.raises(RowError):
        to_canonical({"chosen": [U("a"), A("x")], "rejected": [U("b"), A("y")]}, "preference", {})


def test_preference_system_column_goes_first_in_prompt():
    row = {"system": "Be exact.", "prompt": "q", "chosen": "good", "rejected": "bad"}
    assert to_canonical(row, "preference", {}) == {
        "prompt": [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "q"}],
        "chosen": [{"role": "assistant", "content": "good"}],
        "rejected": [{"role": "assistant", "content": "bad"}],
    }


def test_preference_chosen_equals_rejected():
    with pytest.raises(RowError) as info:
        to_canonical({"prompt": "q", "chosen": "same", "rejected": "same"}, "preference", {})
    assert "chosen == rejected" in str(info.value)


def test_preference_chosen_equals_rejected_implicit():
    row = {"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: a"}
    with pytest.raises(RowError):
        to_canonical(row, "preference", {})


def test_preference_empty_assistant():
    with pytest.raises(RowError):
        to_canonical({"prompt": "q", "chosen": [A("")], "rejected": [A("bad")]}, "preference", {})
    with pytest.raises(RowError):
        to_canonical({"chosen": "\n\nHuman: q\n\nAssistant: ", "rejected": "\n\nHuman: q\n\nAssistant: b"},
                     "preference", {})


def test_preference_chosen_ending_with_user_is_row_error():
    with pytest.raises(RowError) as info:
        to_canonical({"prompt": "q", "chosen": [A("a"), U("more?")], "rejected": [A("b")]}, "preference", {})
    assert "'chosen'" in str(info.value)


def test_preference_role_mapping():
    row = {
        "prompt": [{"role": "asker", "content": "q"}],
        "chosen": [{"role": "bot", "content": "good"}],
        "rejected": [{"role": "bot", "content": "bad"}],
    }
    assert to_canonical(row, "preference", {"asker": "user", "bot": "assistant"}) == {
        "prompt": [{"role": "user", "content": "q"}],
        "chosen": [{"role": "assistant", "content": "good"}],
        "rejected": [{"role": "assistant", "content": "bad"}],
    }


# ---------------------------------------------------------------------------------------------
# Property: arbitrary rows give a canonical row or a RowError, nothing else

@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=_rows())
def test_to_canonical_only_raises_row_error(case):
    shape, row, roles, system_prompt = case
    try:
        out = to_canonical(row, shape, roles, system_prompt)
    except RowError as e:
        assert str(e)
        return
    if shape == "preference":
        assert set(out) == {"prompt", "chosen", "rejected"}
        assert out["prompt"] and out["chosen"] and out["rejected"]
        assert out["chosen"][-1]["role"] == "assistant" and out["rejected"][-1]["role"] == "assistant"
        assert out["chosen"] != out["rejected"]
        messages = out["prompt"] + out["chosen"] + out["rejected"]
    else:
        assert set(out) == {"messages"}
        messages = out["messages"]
        assert any(m["role"] == "assistant" and m["content"].strip() for m in messages)
    for m in messages:
        assert set(m) == {"role", "content"}
        assert m["role"] in ("system", "user", "assistant", "tool")
        assert isinstance(m["content"], str)


# ---------------------------------------------------------------------------------------------
# Whole files through format_dataset


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    """No network here: make Hub look-ups fail at once instead of retrying."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def dc(path, kind="sft", columns=None, roles=None, **kw) -> DataConfig:
    src = {"path": str(path)}
    if columns:
        src["columns"] = columns
    if roles:
        src["roles"] = roles
    return DataConfig.model_validate({"kind": kind, "train": [src], **kw})


def good(i: int) -> dict:
    return {"messages": [U(f"What is {i} + 1?"), A(f"{i} + 1 = {i + 1}")]}


def test_format_jsonl_messages(tmp_path):
    p = jsonl(tmp_path / "sft.jsonl", [good(1), good(2), good(3)])
    f = format_dataset("sft", dc(p))
    assert f.rows_in == 3
    assert f.dropped == []
    assert f.eval is None
    assert list(f.train) == [
        {"messages": [{"role": "user", "content": "What is 1 + 1?"}, {"role": "assistant", "content": "1 + 1 = 2"}]},
        {"messages": [{"role": "user", "content": "What is 2 + 1?"}, {"role": "assistant", "content": "2 + 1 = 3"}]},
        {"messages": [{"role": "user", "content": "What is 3 + 1?"}, {"role": "assistant", "content": "3 + 1 = 4"}]},
    ]
    assert list(f.files) == [str(p)]
    assert len(f.files[str(p)]) == 16


def test_format_csv_preference_with_column_mapping(tmp_path):
    p = tmp_path / "pairs.csv"
    p.write_text(
        "system,question,chatgpt,llama2-13b-chat\n"
        "Be exact.,What is 1 + 1?,2,3\n"
        "Be kind.,Say hi.,Hi!,Go away.\n",
        encoding="utf-8",
    )
    cols = {"question": "prompt", "chatgpt": "chosen", "llama2-13b-chat": "rejected"}
    f = format_dataset("preference", dc(p, kind="preference", columns=cols))
    assert f.rows_in == 2 and f.dropped == []
    assert list(f.train) == [
        {
            "prompt": [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "What is 1 + 1?"}],
            "chosen": [{"role": "assistant", "content": "2"}],
            "rejected": [{"role": "assistant", "content": "3"}],
        },
        {
            "prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Say hi."}],
            "chosen": [{"role": "assistant", "content": "Hi!"}],
            "rejected": [{"role": "assistant", "content": "Go away."}],
        },
    ]


def test_format_parquet(tmp_path):
    import pandas as pd

    p = tmp_path / "alpaca.parquet"
    pd.DataFrame(
        [{"instruction": "Double it.", "input": "4", "output": "8"},
         {"instruction": "Say yes.", "input": "", "output": "yes"}]
    ).to_parquet(p)
    f = format_dataset("sft", dc(p))
    assert list(f.train) == [
        {"messages": [{"role": "user", "content": "Double it.\n\n4"}, {"role": "assistant", "content": "8"}]},
        {"messages": [{"role": "user", "content": "Say yes."}, {"role": "assistant", "content": "yes"}]},
    ]


def test_format_json_array_sharegpt(tmp_path):
    p = tmp_path / "chats.json"
    p.write_text(json.dumps([{"conversations": [{"from": "human", "value": "hey"},
                                                {"from": "gpt", "value": "hello"}]}]))
    f = format_dataset("sft", dc(p))
    assert list(f.train) == [{"messages": [{"role": "user", "content": "hey"},
                                           {"role": "assistant", "content": "hello"}]}]


def test_format_roles_mapping_from_config(tmp_path):
    p = jsonl(tmp_path / "r.jsonl", [{"conversations": [{"from": "q", "value": "hey"},
                                                        {"from": "ans", "value": "yo"}]}])
    f = format_dataset("sft", dc(p, roles={"q": "user", "ans": "assistant"}))
    assert list(f.train) == [{"messages": [{"role": "user", "content": "hey"}, {"role": "assistant", "content": "yo"}]}]


def test_format_system_prompt_is_added(tmp_path):
    p = jsonl(tmp_path / "s.jsonl", [{"prompt": "q", "completion": "a"}])
    f = format_dataset("sft", dc(p), system_prompt="Sys.")
    assert list(f.train) == [
        {"messages": [{"role": "system", "content": "Sys."}, {"role": "user", "content": "q"},
                      {"role": "assistant", "content": "a"}]}
    ]


def test_format_limit(tmp_path):
    p = jsonl(tmp_path / "l.jsonl", [good(i) for i in range(10)])
    src = {"path": str(p), "limit": 4}
    f = format_dataset("sft", DataConfig.model_validate({"kind": "sft", "train": [src]}))
    assert len(f.train) == 4 and f.rows_in == 4


@pytest.mark.parametrize(("n", "fraction", "n_train", "n_eval"),
                         [(20, 0.1, 18, 2), (20, 0.25, 15, 5), (10, 0.01, 9, 1)])
def test_eval_fraction_split_sizes(tmp_path, n, fraction, n_train, n_eval):
    p = jsonl(tmp_path / "e.jsonl", [good(i) for i in range(n)])
    f = format_dataset("sft", dc(p, eval_fraction=fraction))
    assert len(f.train) == n_train
    assert len(f.eval) == n_eval
    # the split is a partition of the rows
    seen = {r["messages"][0]["content"] for r in f.train} | {r["messages"][0]["content"] for r in f.eval}
    assert seen == {f"What is {i} + 1?" for i in range(n)}


def test_explicit_eval_source_wins_over_fraction(tmp_path):
    tr = jsonl(tmp_path / "tr.jsonl", [good(i) for i in range(6)])
    ev = jsonl(tmp_path / "ev.jsonl", [good(100), good(101)])
    d = DataConfig.model_validate({"kind": "sft", "train": [{"path": str(tr)}], "eval": [{"path": str(ev)}],
                                   "eval_fraction": 0.5})
    f = format_dataset("sft", d)
    assert len(f.train) == 6
    assert [r["messages"][0]["content"] for r in f.eval] == ["What is 100 + 1?", "What is 101 + 1?"]
    assert f.rows_in == 8


def test_bad_rows_under_limit_are_dropped_and_reported(tmp_path):
    rows = [good(i) for i in range(10)]
    rows[3] = {"messages": [U("q"), A("")]}  # empty assistant
    rows[7] = {"messages": [U("q"), {"role": "narrator", "content": "a"}]}  # unknown role
    p = jsonl(tmp_path / "b.jsonl", rows)
    f = format_dataset("sft", dc(p, max_bad_fraction=0.2))
    assert len(f.train) == 8
    assert f.rows_in == 10
    assert [(s, i) for s, i, _ in f.dropped] == [(str(p), 3), (str(p), 7)]
    assert "assistant" in f.dropped[0][2]
    assert "narrator" in f.dropped[1][2]


def test_bad_rows_over_limit_raise_naming_the_row(tmp_path):
    rows = [good(i) for i in range(10)]
    rows[4] = {"messages": [U("q"), A("")]}
    rows[6] = {"messages": [U("q"), A("")]}
    p = jsonl(tmp_path / "b.jsonl", rows)
    with pytest.raises(PosttrainError) as info:
        format_dataset("mine", dc(p, max_bad_fraction=0.1))
    line = info.value.line()
    assert "2 of 10 rows" in line
    assert "data.mine" in line
    assert "row 4" in line
    assert str(p) in line
    assert "max_bad_fraction" in line


def test_default_max_bad_fraction_rejects_one_bad_row_in_ten(tmp_path):
    rows = [good(i) for i in range(9)] + [{"messages": [U("q"), A(" ")]}]
    p = jsonl(tmp_path / "b.jsonl", rows)
    with pytest.raises(PosttrainError) as info:
        format_dataset("sft", dc(p))
    assert "row 9" in info.value.line()


def test_empty_file_raises(tmp_path):
    p = tmp_path / "empty.jsonl"
    p.write_text("")
    with pytest.raises(PosttrainError) as info:
        format_dataset("sft", dc(p))
    assert str(p) in info.value.line()


def test_empty_file_error_says_empty(tmp_path):
    # The message must tell the user the file is empty, not blame row types or show
    # an internal exception name.
    p = tmp_path / "empty.jsonl"
    p.write_text("")
    with pytest.raises(PosttrainError) as info:
        format_dataset("sft", dc(p))
    assert "empty" in info.value.line()
    assert "StopIteration" not in info.value.line()


def test_header_only_csv_raises(tmp_path):
    p = tmp_path / "h.csv"
    p.write_text("prompt,completion\n")
    with pytest.raises(PosttrainError):
        format_dataset("sft", dc(p))


def test_missing_file_raises(tmp_path):
    with pytest.raises(PosttrainError) as info:
        format_dataset("sft", dc(tmp_path / "nope.jsonl"))
    assert "does not exist" in info.value.line()
    assert "nope.jsonl" in info.value.line()


def test_relative_missing_file_raises(tmp_path):
    with pytest.raises(PosttrainError) as info:
        format_dataset("sft", dc("data/nope.jsonl"))
    assert "does not exist" in info.value.line()


def test_unsupported_extension(tmp_path):
    p = tmp_path / "x.txt"
    p.write_text("hello")
    with pytest.raises(PosttrainError) as info:
        format_dataset("sft", dc(p))
    assert "unsupported extension" in info.value.line()


def test_column_mapping_names_missing_column(tmp_path):
    p = jsonl(tmp_path / "c.jsonl", [{"prompt": "q", "completion": "a"}])
    with pytest.raises(PosttrainError) as info:
        format_dataset("sft", dc(p, columns={"question": "prompt"}))
    line = info.value.line()
    assert "question" in line
    assert "completion" in line  # lists the columns the file does have


def test_unrecognised_columns(tmp_path):
    p = jsonl(tmp_path / "c.jsonl", [{"q": "q", "a": "a"}])
    with pytest.raises(PosttrainError) as info:
        format_dataset("sft", dc(p))
    assert "cannot tell the shape" in info.value.line()


def test_non_utf8_file(tmp_path):
    p = tmp_path / "latin.jsonl"
    p.write_bytes(b'{"prompt": "caf\xe9", "completion": "ok"}\n')
    with pytest.raises(PosttrainError) as info:
        format_dataset("sft", dc(p))
    assert "UTF-8" in info.value.line()
    assert str(p) in info.value.line()


def test_invalid_json_line(tmp_path):
    p = tmp_path / "broken.jsonl"
    p.write_text('{"prompt": "q", "completion": "a"}\n{"prompt": [}\n')
    with pytest.raises(PosttrainError) as info:
        format_dataset("sft", dc(p))
    assert str(p) in info.value.line()


def test_mixed_schema_rows(tmp_path):
    rows = [good(0), good(1), {"messages": "not a list"}, good(2)]
    p = jsonl(tmp_path / "mixed.jsonl", rows)
    try:
        f = format_dataset("sft", dc(p, max_bad_fraction=0.5))
    except PosttrainError as e:
        assert str(p) in e.line()
    else:
        # This datasets version reads the row; it must then be dropped as bad, row 2.
        assert len(f.train) == 3
        assert [(s, i) for s, i, _ in f.dropped] == [(str(p), 2)]


def test_mixed_schema_rows_over_limit(tmp_path):
    rows = [good(0), {"messages": "not a list"}, good(1)]
    p = jsonl(tmp_path / "mixed.jsonl", rows)
    with pytest.raises(PosttrainError):
        format_dataset("sft", dc(p))


def test_list_valued_roles_in_file_give_posttrain_error(tmp_path):
    # Every row's roles are lists (a consistent, loadable schema): all rows are bad data.
    rows = [{"messages": [{"role": ["user"], "content": "q"}, {"role": ["assistant"], "content": "a"}]}] * 3
    p = jsonl(tmp_path / "listroles.jsonl", rows)
    with pytest.raises(PosttrainError):
        format_dataset("sft", dc(p))


def test_hub_name_not_available_offline(tmp_path):
    with pytest.raises(PosttrainError) as info:
        format_dataset("sft", dc("nonexistent-org/nonexistent-ds"))
    assert "nonexistent-org/nonexistent-ds" in info.value.line()


def test_all_rows_bad_but_allowed_still_raises(tmp_path):
    p = jsonl(tmp_path / "allbad.jsonl", [{"messages": [U("q"), A("")]}] * 2)
    with pytest.raises(PosttrainError) as info:
        format_dataset("sft", dc(p, max_bad_fraction=1.0))
    assert "no training rows" in info.value.line()


def test_multiple_train_sources_concatenate(tmp_path):
    a = jsonl(tmp_path / "a.jsonl", [good(1)])
    b = tmp_path / "b.csv"
    b.write_text("prompt,completion\nhello,world\n")
    d = DataConfig.model_validate({"kind": "sft", "train": [{"path": str(a)}, {"path": str(b)}]})
    f = format_dataset("sft", d)
    assert list(f.train) == [
        {"messages": [{"role": "user", "content": "What is 1 + 1?"}, {"role": "assistant", "content": "1 + 1 = 2"}]},
        {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]},
    ]
    assert set(f.files) == {str(a), str(b)}


def test_file_hash_follows_the_content_when_a_file_is_rewritten(tmp_path):
    """file_hash is cached per (path, size, mtime): a rewrite, even of the same size, is hashed again."""
    import os

    from posttrain.data import file_hash

    p = tmp_path / "a.jsonl"
    p.write_text('{"x": 1}\n')
    first = file_hash(p)
    assert file_hash(p) == first
    p.write_text('{"x": 2}\n')
    st = p.stat()
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # coarse-mtime filesystems
    assert file_hash(p) != first
