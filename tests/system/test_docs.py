"""The docs show the library's real code: every code block introduced by a line
`<!-- excerpt: PATH -->` must appear verbatim in that file, and every image a chapter
embeds must exist in figures/."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHAPTERS = sorted((ROOT / "docs").glob("*.md"))
EXCERPT = re.compile(r"<!-- excerpt: (\S+) -->\s*```[a-z]*\n(.*?)```", re.S)


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.name)
def test_excerpts_are_verbatim(chapter):
    text = chapter.read_text(encoding="utf-8")
    for path, code in EXCERPT.findall(text):
        source = (ROOT / path).read_text(encoding="utf-8")
        assert code in source, f"{chapter.name}: an excerpt no longer matches {path}:\n{code[:300]}"


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.name)
def test_embedded_figures_exist(chapter):
    text = chapter.read_text(encoding="utf-8")
    for target in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        assert (chapter.parent / target).resolve().exists(), f"{chapter.name} embeds missing {target}"


def test_docs_exist():
    assert len(CHAPTERS) >= 3
