"""``make bench`` rewrites BENCHMARKS.md's results section; a partial run (``--only``) keeps the other tables."""
from __future__ import annotations

from benchmarks import run_all


def test_a_partial_run_replaces_only_its_own_tables(tmp_path, monkeypatch):
    page = tmp_path / "BENCHMARKS.md"
    page.write_text("# Benchmarks\n\nprose above\n\n" + run_all.BEGIN + "\n" + run_all.END + "\nprose below\n")
    monkeypatch.setattr(run_all, "MARKDOWN", str(page))
    rows = [["sim_overhead_ratio_w16", 1.7, "<= 2.0", "met"]]
    run_all.write_markdown({"cpu": "A"}, {"overhead": "| a |\n|---|\n| 1 |", "ddp_hook": "| b |\n|---|\n| 2 |"}, rows)
    run_all.write_markdown({"cpu": "B"}, {"ddp_hook": "| b |\n|---|\n| 3 |"}, rows, partial=["ddp_hook"])
    text = page.read_text()
    assert text.startswith("# Benchmarks\n\nprose above") and text.rstrip().endswith("prose below")
    assert run_all.results_sections(text) == {"overhead": "| a |\n|---|\n| 1 |", "ddp_hook": "| b |\n|---|\n| 3 |"}
    assert "Machine: cpu A" in text and "Partial run (--only ddp_hook): cpu B" in text
    run_all.write_markdown({"cpu": "C"}, {"ddp_hook": "| b |\n|---|\n| 4 |"}, rows, partial=["ddp_hook"])
    text = page.read_text()
    assert text.count("Partial run (--only ddp_hook)") == 1 and "cpu C" in text and "cpu B" not in text
    run_all.write_markdown({"cpu": "D"}, {"overhead": "| a |\n|---|\n| 5 |"}, rows)  # a full run starts over
    assert run_all.results_sections(page.read_text()) == {"overhead": "| a |\n|---|\n| 5 |"}
    assert "Partial run" not in page.read_text()
