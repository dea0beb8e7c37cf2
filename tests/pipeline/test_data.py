"""The offline corpus, the held-out split and the contexts.

Docstring extraction is checked against Python itself: import a small generated package
and read its objects' __doc__ with inspect.getdoc. The tokenizer here is a byte-level
one (id = byte + 3), so the tests need no vocabulary files."""

import importlib
import inspect
import os
import sys
import textwrap

import numpy as np
import pytest
import torch

from minisae.pipeline import data


class ByteTokenizer:
    bos_id = 1

    def __init__(self):
        self.calls = 0

    def encode(self, text):
        self.calls += 1
        return [b + 3 for b in text.encode("utf-8")]

    def decode(self, ids):
        return bytes(i - 3 for i in ids if i >= 3).decode("utf-8", errors="replace")


USER_CACHE = os.environ.get("MINISAE_CACHE")  # before the fixture below replaces it


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MINISAE_CACHE", str(tmp_path / "cache"))


def docs_of(n, size=50):
    return [(f"mod{i}", f"document {i} " + "x" * (size + i % 7)) for i in range(n)]


MODULE = textwrap.dedent('''
    """Module docstring.

        Indented line kept relative to the first."""
    import sys

    def add_docstr(obj, doc):
        obj.__doc__ = doc
        return obj

    def add_newdoc(place, name, doc):
        method, doc = doc
        getattr(globals()[name], method).__doc__ = doc

    class Widget:
        """A widget."""

        def wobble(self):
            pass

        def spin(self):
            """Spin the widget.

            Twice, if needed.
            """

        async def later(self):
            """Spin later."""

    def helper():
        return 1

    if sys.version_info > (3,):
        def conditional():
            """Defined inside an if."""

    add_docstr(helper, """Help with {thing}.""".format(thing="things"))
    add_newdoc("fakepkg.core", "Widget", ("wobble", """Wobble the widget."""))
''')


def test_docstrings_match_inspect(tmp_path, monkeypatch):
    pkg = tmp_path / "src" / "fakepkg"
    (pkg / "tests").mkdir(parents=True)
    (pkg / "__init__.py").write_text('"""The fake package."""\n')
    (pkg / "core.py").write_text(MODULE)
    (pkg / "tests" / "test_core.py").write_text('"""A test suite."""\n')
    (pkg / "test_helpers.py").write_text('"""Test helpers."""\n')
    (pkg / "conftest.py").write_text('"""Fixtures."""\n')
    (pkg / "broken.py").write_text('"""Does not parse."""\ndef f(:\n')
    (pkg / "nodoc.py").write_text("x = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    core = importlib.import_module("fakepkg.core")
    expected = [inspect.getdoc(o) for o in (core, core.Widget, core.Widget.spin, core.Widget.later,
                                            core.conditional, core.helper, core.Widget.wobble)]
    docs = dict(data.package_documents(pkg, "fakepkg"))
    assert sorted(docs) == ["fakepkg", "fakepkg.core"]  # tests, helpers, broken, empty skipped
    assert docs["fakepkg"] == "The fake package."
    # docs set by add_docstr / add_newdoc come last, in source order; a .format template
    # is kept with its placeholder
    assert docs["fakepkg.core"] == "\n\n".join(expected[:5] + ["Help with {thing}.", expected[6]])
    assert expected[5] == "Help with things." and expected[6] == "Wobble the widget."
    del sys.modules["fakepkg.core"], sys.modules["fakepkg"]


def test_split_is_disjoint_and_stable():
    docs = docs_of(2000)
    train, held = data.split_documents(docs, 0.05)
    names_t, names_h = {s for s, _ in train}, {s for s, _ in held}
    assert not names_t & names_h
    assert len(train) + len(held) == len(docs)
    assert 50 <= len(held) <= 150  # ~5% of 2000, binomial sd ~10
    again = data.split_documents(list(reversed(docs)), 0.05)
    assert {s for s, _ in again[1]} == names_h  # same split whatever the order
    sub = data.split_documents(docs[:500], 0.05)[1]  # a module's side never changes
    assert sub == [d for d in held if d in docs[:500]]
    with pytest.raises(ValueError, match="heldout_frac"):
        data.split_documents(docs, 1.5)


def test_stream_joins_documents_with_bos_in_hash_order():
    tok = ByteTokenizer()
    docs = docs_of(5)
    stream = data.token_stream(docs, tok, "bytes", verbose=False)
    ordered = sorted(docs, key=lambda d: data._unit_hash("order:" + d[0]))
    expected = []
    for i, (_, text) in enumerate(ordered):
        expected += ([tok.bos_id] if i else []) + tok.encode(text)
    assert stream.dtype == np.int32 and stream.tolist() == expected
    assert data.token_stream(docs[::-1], tok, "bytes", verbose=False).tolist() == expected


def test_contexts_start_with_bos_and_tile_the_stream():
    stream = np.arange(10, 10 + 1000, dtype=np.int32)
    ctx = data.make_contexts(stream, bos_id=1, ctx_len=128)
    assert ctx.dtype == torch.long and ctx.shape == (1000 // 127, 128)
    assert (ctx[:, 0] == 1).all()
    assert ctx[:, 1:].reshape(-1).tolist() == stream[: 7 * 127].tolist()
    with pytest.raises(ValueError, match="ctx_len"):
        data.make_contexts(stream, 1, ctx_len=1)


def test_max_tokens_is_a_deterministic_prefix_and_the_cache_is_used(tmp_path):
    tok = ByteTokenizer()
    docs = docs_of(300)
    small = data.token_stream(docs, tok, "bytes", max_tokens=1000, verbose=False)
    assert len(small) == 1000 and tok.calls < 30  # only the first documents were tokenised
    full = data.token_stream(docs, tok, "bytes", verbose=False)
    assert (full[:1000] == small).all()
    assert len(list((tmp_path / "cache").glob("corpus-bytes-*.npy"))) == 1
    calls = tok.calls
    cached = data.token_stream(docs, tok, "bytes", max_tokens=1000, verbose=False)
    assert tok.calls == calls + 1  # only the probe string: the stream came from the cache
    assert (cached == small).all()
    changed = docs[:-1] + [(docs[-1][0], docs[-1][1] + "!")]
    data.token_stream(changed, tok, "bytes", verbose=False)  # other text: another cache file
    assert len(list((tmp_path / "cache").glob("corpus-bytes-*.npy"))) == 2


def test_load_contexts_from_text_files(tmp_path):
    paths = []
    for i in range(4):
        p = tmp_path / f"book{i}.txt"
        p.write_text("\n\n".join(f"Paragraph {j} of book {i}. " * 20 for j in range(400)))
        paths.append(str(p))
    tok = ByteTokenizer()
    train = data.load_contexts(tok, "bytes", "train", ctx_len=64, text_paths=paths, verbose=False)
    held = data.load_contexts(tok, "bytes", "heldout", ctx_len=64, text_paths=paths,
                              heldout_frac=0.2, verbose=False)
    assert train.shape[1] == held.shape[1] == 64 and (train[:, 0] == 1).all()
    few = data.load_contexts(tok, "bytes", "train", ctx_len=64, max_tokens=64 * 5 + 10,
                             text_paths=paths, verbose=False)
    assert torch.equal(few, train[:5])
    with pytest.raises(ValueError, match="empty"):
        data.load_contexts(tok, "bytes", "heldout", text_paths=paths, heldout_frac=0.0)
    with pytest.raises(ValueError, match="does not exist"):
        data.text_file_documents([str(tmp_path / "missing.txt")])


def test_tokenizer_without_bos_is_refused():
    tok = ByteTokenizer()
    tok.bos_id = None
    with pytest.raises(ValueError, match="bos_id"):
        data.token_stream(docs_of(3), tok, verbose=False)


def test_default_corpus_is_big_and_has_no_tests(monkeypatch):
    # the user's cache dir: the first run parses ~60 MB of source (~30 CPU-s), later ~1 s
    if USER_CACHE:
        monkeypatch.setenv("MINISAE_CACHE", USER_CACHE)
    else:
        monkeypatch.delenv("MINISAE_CACHE")
    docs = data.default_corpus()
    assert sum(len(t) for _, t in docs) > 5_000_000
    sources = {s for s, _ in docs}
    assert {"json", "numpy.linalg", "torch.nn.functional", "matplotlib.pyplot"} <= sources
    assert "pydoc_data.topics.assignment" in sources
    assert not any(part.startswith("test") for s in sources for part in s.split("."))
    train, held = data.split_documents(docs)
    assert 0.02 < len(held) / len(docs) < 0.08
