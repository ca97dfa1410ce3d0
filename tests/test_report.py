"""The report's rendering, without training anything (the report of a real chain is checked in
tests/stages/test_eval.py; the per-stage peak memory it shows in test_console.py)."""

from __future__ import annotations

from pathlib import Path

from posttrain import report


def test_html_escapes_text_and_embeds_images(tmp_path):
    from PIL import Image as PILImage

    png = tmp_path / "report" / "x.png"
    png.parent.mkdir()
    PILImage.new("RGB", (4, 4)).save(png)
    blocks = [("h2", "a <b>"), ("p", "<script>alert(1)</script>"),
              ("table", report.Table(["model", "x"], [["sft", "<img src=http://evil>"]])),
              ("image", report.Image(png, "alt"))]
    page = report.to_html(blocks, "t")
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "<img src=http" not in page and "&lt;img src=http" in page and "data:image/png;base64," in page
    md = report.to_markdown(blocks, tmp_path)
    assert "![alt](report/x.png)" in md


def test_markdown_table_escapes_pipes():
    md = report.to_markdown([("table", report.Table(["a", "b"], [["x | y", "z"]]))], Path("."))
    assert md.splitlines() == ["| a | b |", "|---|---|", "| x \\| y | z |"]


def test_cells_show_the_change_against_the_parent():
    assert report._cell(0.912, 0.822, "pct") == "91.2% (+9.0 pt)"
    assert report._cell(2.5, 3.0, "num") == "2.5 (-0.5)"
    assert report._cell(0.5, None, "pct") == "50.0%"
    assert report._cell(float("nan"), 1.0, "num") == "n/a"
    assert report._cell(None, 1.0, "num") == "–"


def test_report_of_a_directory_without_a_chain_still_renders(tmp_path):
    md, page = report.write(tmp_path)
    assert md.read_text().startswith("# posttrain report") and page.read_text().startswith("<!doctype html>")


def test_the_header_gives_the_chain_time_not_the_last_runs():
    """Issue 17: an up-to-date re-run takes 0.1 s; the header gives what the stages cost when they ran."""
    from posttrain.report import _chain_time

    assert _chain_time({"chain_time_s": 812.4, "wall_time_s": 0.1}) == \
        "chain time 812 s (the last run, which skipped up-to-date stages: 0 s)"
    assert _chain_time({"chain_time_s": 812.4, "wall_time_s": 815.0}) == "chain time 812 s"  # a full run
    assert _chain_time({"wall_time_s": 3.0}) == "wall time 3.0 s"  # an older record


def _model(label, parent, exact, reward, kl=None):
    dec = {"scores": {"exact": exact}, "reward": {"mean": reward}, "ended": 1.0, "length": 5.0, "distinct_2": 0.1}
    if kl is not None:
        dec["kl"] = {"mean": kl}
    return {"label": label, "parent": parent, "decodings": {"greedy": dec, "sampled": dec}}


def test_the_verdict_opens_with_each_stage_against_its_parent_and_the_control():
    """Issue 17: per stage, the change against its parent (sampled decoding), KL, time, and the
    difference to the control for the stages after it; the base (no parent) has no row."""
    from posttrain.report import verdict_blocks

    ev = {"settings": {"decoding": [{"name": "greedy", "temperature": 0.0}, {"name": "sampled", "temperature": 1.0}]},
          "models": [_model("base", None, 0.0, -1.0), _model("sft", "base", 0.5, 1.0, 0.0),
                     _model("control", "sft", 0.6, 0.5, 0.7), _model("ppo", "sft", 0.55, 2.0, 0.1)]}
    stages = [{"stage": "sft", "seconds": 54.8}, {"stage": "control", "seconds": 31.7},
              {"stage": "ppo", "seconds": 21.3}]
    (h, title), (p, text), (t, table) = verdict_blocks(ev, stages)
    assert (h, title, p, t) == ("h2", "Verdict", "p", "table") and "sampled decoding" in text
    assert table.header == ["stage", "from", "change", "KL to ref", "time", "beyond the control"]
    assert table.rows == [
        ["sft", "base", "exact +50.0 pt, reward +2", "0", "55 s", "–"],
        ["control", "sft", "exact +10.0 pt, reward -0.5", "0.7", "32 s", "–"],
        ["ppo", "sft", "exact +5.0 pt, reward +1", "0.1", "21 s", "exact -5.0 pt, reward +1.5"],
    ]
    assert verdict_blocks({**ev, "models": ev["models"][:1]}, stages) == []  # only the base: no verdict


def test_curves_come_from_the_stage_table_and_an_unknown_stage_has_none(tmp_path):
    """report plots the keys the stage's registry record names; a chain record of a stage this
    version does not know (an older or newer posttrain wrote it) gets no curves, not a traceback."""
    for stage in ("sft", "not-a-stage"):
        d = tmp_path / stage
        d.mkdir()
        (d / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.0}\n')
    blocks = report.curve_blocks([{"stage": "not-a-stage", "path": str(tmp_path / "not-a-stage")}], tmp_path)
    assert blocks == []
    blocks = report.curve_blocks([{"stage": "sft", "path": str(tmp_path / "sft")}], tmp_path)
    assert [kind for kind, _ in blocks] == ["h2", "image"] and blocks[1][1].path.is_file()
