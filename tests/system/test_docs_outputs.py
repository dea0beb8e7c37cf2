"""Outputs the docs quote are what a documented command wrote: a code block introduced by
a line `<!-- output: PATH -->` must equal the file PATH verbatim, a file committed under
docs/outputs/ or figures/, and a `python -m minisae` command on the same page writes into
PATH's folder (its `--out`). Re-running that command regenerates the file; this test then
says which quotes went stale."""

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHAPTERS = sorted((ROOT / "docs").glob("*.md"))
OUTPUT = re.compile(r"<!-- output: (\S+) -->\s*```[a-z]*\n(.*?)```", re.S)


def out_dirs(text: str) -> set:
    """The --out folders of the page's `python -m minisae` commands (continuation lines joined)."""
    joined = re.sub(r"\\\n\s*", " ", text)
    dirs = set()
    for cmd in re.findall(r"python -m minisae [^\n`]*", joined):
        try:
            argv = shlex.split(cmd, comments=True)
        except ValueError:  # a quoted argument that spans lines: its --out comes later on the line
            argv = cmd.split()
        dirs.update(argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--out")
    return dirs


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.name)
def test_quoted_outputs_are_the_files_a_command_wrote(chapter):
    text = chapter.read_text(encoding="utf-8")
    for path, block in OUTPUT.findall(text):
        assert path.startswith(("docs/outputs/", "figures/")), f"{chapter.name}: {path} is not a committed output"
        assert (ROOT / path).is_file(), f"{chapter.name} quotes {path}, which does not exist"
        assert block == (ROOT / path).read_text(encoding="utf-8"), \
            f"{chapter.name}: the quote of {path} differs from the file (re-run its command, then update the quote)"
        assert str(Path(path).parent) in out_dirs(text), f"{chapter.name}: no command there writes to {Path(path).parent}"


def test_the_docs_quote_outputs():
    assert any(OUTPUT.search(c.read_text(encoding="utf-8")) for c in CHAPTERS)
