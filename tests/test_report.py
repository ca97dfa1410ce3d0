"""The report's rendering and the per-stage peak memory, without training anything (the report of a
real chain is checked in tests/stages/test_eval.py)."""

from __future__ import annotations

from pathlib import Path

from posttrain import report
from posttrain.console import PeakMemory


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


def test_peak_memory_sees_an_allocation_inside_the_block():
    with PeakMemory() as before:
        pass
    with PeakMemory(interval=0.01) as peak:
        block = bytearray(300 * 2**20)  # 300 MB, touched
        block[:: 4096] = b"x" * len(block[:: 4096])
        del block
    assert peak.rss_mb > before.rss_mb + 250
    import torch

    assert (peak.cuda_mb is None) == (not torch.cuda.is_available())
