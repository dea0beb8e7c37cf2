"""Chapter 7 quotes its results from the file its documented command writes
(figures/autointerp_results.json, by explain.compare): the verdict table and the table of
explainer styles must be exactly what that file renders to."""

import json
from pathlib import Path

from minisae.autointerp.verdict import effects_markdown, verdict_markdown

ROOT = Path(__file__).resolve().parents[2]


def test_chapter_7_tables_come_from_the_results_file():
    results = json.loads((ROOT / "figures" / "autointerp_results.json").read_text())
    chapter = (ROOT / "docs" / "07_autointerp.md").read_text(encoding="utf-8")
    assert verdict_markdown(results["rows"]) in chapter
    assert effects_markdown(results["style_effects"]) in chapter
    assert (ROOT / "figures" / "autointerp_verdict.png").exists()
