"""Byte-level BPE: hand-derived merges, known GPT-2 ids, round trips, and parity with
Hugging Face `tokenizers` (an independent Rust implementation) on docstrings and unicode.

The real GPT-2 vocab is read from $MINISAE_GPT2_TOKENIZER_DIR (encoder.json + vocab.bpe
or vocab.json + merges.txt); tests that need it skip when it is not set."""

import functools
import importlib.util
import inspect
import os
import unicodedata

import pytest
from hypothesis import given, settings, strategies as st

from minisae.models.bpe import BPETokenizer, bytes_to_unicode, gpt2_pattern, merge_reference

TOKENIZER_DIR = os.environ.get("MINISAE_GPT2_TOKENIZER_DIR")
needs_vocab = pytest.mark.skipif(
    not TOKENIZER_DIR or not os.path.isdir(TOKENIZER_DIR),
    reason="set MINISAE_GPT2_TOKENIZER_DIR to a dir with GPT-2's encoder.json + vocab.bpe")

TRICKY = [
    "Hello world", "  leading spaces", "trailing   ", "tabs\t\tand\nnewlines\r\n\r\n", "x  \n  y",
    "'s 'S 't 're 'VE 'll 'd 'm don't I'M", "1,000,000.50 and 3.14159e-10", "٣٤٥ arabic digits",
    "²³ superscripts, Ⅻ roman numeral, ½ fraction", "héllo wörld ça", "e\u0301 combining accent",
    "日本語のテキスト、中文。", "😀👍🏽 emoji 🇫🇷", "\u00a0nbsp\u00a0 \u3000ideographic\u3000",
    "\x1c\x1d\x1e\x1f separators", "zero\u200bwidth \u180e mongolian \x85 next-line",
    "<|endoftext|> as text", "mixed🙂123abc!!!   \n", "a" * 300, " " * 50 + "x", "",
    "def f(x):\n    return x ** 2  # square\n", "Ωμέγα Кириллица עברית العربية हिन्दी",
]


def tiny_tokenizer(merges=(("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a")), without=()):
    """Byte alphabet (256 tokens, less the bytes in `without`) + a few merges: runs without any files."""
    encoder = {c: i for i, c in enumerate(c for b, c in bytes_to_unicode().items() if b not in without)}
    for a, b in merges:
        encoder.setdefault(a + b, len(encoder))
    return BPETokenizer(encoder, merges)


@functools.lru_cache(maxsize=None)
def real_tokenizer(split_digits=False):
    return BPETokenizer.from_files(TOKENIZER_DIR, split_digits=split_digits)


def docstring_sample(max_chars=300_000):
    """Docstrings of a few stdlib modules: ordinary English-and-code text."""
    import argparse, collections, decimal, difflib, email.message, json, pathlib, re, statistics, textwrap
    docs = []
    for mod in (argparse, collections, decimal, difflib, email.message, json, pathlib, re, statistics, textwrap):
        for obj in [mod, *vars(mod).values()]:
            if inspect.ismodule(obj) or inspect.isclass(obj) or inspect.isfunction(obj):
                docs.append(obj.__doc__ if isinstance(obj.__doc__, str) else "")
    return "\n\n".join(d for d in docs if d)[:max_chars]


# Characters that Python's unicodedata knows (category != Cn) and that UTF-8 can encode:
# newer Unicode versions may class characters unknown to Python's tables differently.
assigned_text = st.text(st.characters(blacklist_categories=("Cs", "Cn")), max_size=60)


def test_merge_order_is_by_rank():
    # hand-derived: the lower-ranked pair merges first and blocks the other
    assert tiny_tokenizer([("a", "b"), ("b", "c")]).bpe("abc") == ["ab", "c"]
    assert tiny_tokenizer([("b", "c"), ("a", "b")]).bpe("abc") == ["a", "bc"]
    # all occurrences of the best pair merge in one left-to-right pass: aaaa -> aa aa
    assert tiny_tokenizer([("a", "a")]).bpe("aaaaa") == ["aa", "aa", "a"]




short_token = st.text("abc", min_size=1, max_size=3)


@settings(max_examples=500, deadline=None)
@given(word=st.text("abc", max_size=40), merges=st.lists(st.tuples(short_token, short_token), max_size=15))
def test_heap_merge_equals_naive_loop(word, merges):
    """Any merge list, in any order (also "ab c" ranked before "a b", which no trained list
    does): the heap merge of BPETokenizer.bpe gives exactly the loop's tokens."""
    vocab = sorted({"a", "b", "c"} | {t for a, b in merges for t in (a, b, a + b)})
    tok = BPETokenizer({t: i for i, t in enumerate(vocab)}, merges)
    assert tok.bpe(word) == merge_reference(tok.bpe_ranks, word)


def test_heap_merge_on_long_repetitive_words():
    # runs of one pair and overlapping occurrences, long enough for many sweeps
    tok = tiny_tokenizer([("a", "a"), ("aa", "aa"), ("aaaa", "a"), ("a", "b"), ("ab", "ab"), ("b", "a")])
    for word in ["a" * 1001, "ab" * 777 + "a", "aab" * 333, "ba" * 500 + "a" * 7]:
        assert tok.bpe(word) == merge_reference(tok.bpe_ranks, word)


def test_tiny_tokenizer_by_hand():
    tok = tiny_tokenizer()
    ids = tok.encode(" the thin")
    # " the" -> Ġ t h e -> (Ġ,t) rank 0 -> Ġt h e -> (h,e) -> Ġt he -> (Ġt,he) -> Ġthe;
    # " thin" -> Ġt h in (no rule joins Ġt+h)
    assert [k for i in ids for k, v in tok.encoder.items() if v == i] == ["Ġthe", "Ġt", "h", "in"]
    assert tok.decode(ids) == " the thin"


def test_pretokenize_splits_like_gpt2():
    words = gpt2_pattern().findall("Hello world's  x\n\n  1234 héllo!!")
    assert words == ["Hello", " world", "'s", " ", " x", "\n\n ", " 1234", " héllo", "!!"]


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_pretokenize_is_lossless(text):
    assert "".join(gpt2_pattern().findall(text)) == text


@pytest.mark.skipif(importlib.util.find_spec("regex") is None,
                    reason="the `regex` package (reference for \\p{L}, \\p{N}) is not installed")
@settings(max_examples=300, deadline=None)
@given(assigned_text)
def test_pattern_matches_regex_package(text):
    import regex
    ref = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
    assert gpt2_pattern().findall(text) == ref.findall(text)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_roundtrip_tiny(text):
    tok = tiny_tokenizer()
    assert tok.decode(tok.encode(text)) == text


@needs_vocab
@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
def test_roundtrip_real_vocab(text):
    tok = real_tokenizer()
    assert tok.decode(tok.encode(text)) == text


@needs_vocab
def test_known_gpt2_ids():
    tok = real_tokenizer()
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode(" the") == [262]
    assert tok.encode("The") == [464]
    assert tok.encode("\n") == [198]
    assert tok.encode("!") == [0]
    assert tok.bos_id == 50256 and tok.vocab_size == 50257
    assert tok.encode("<|endoftext|>", allowed_special=True) == [50256]
    assert tok.encode("a<|endoftext|>b", allowed_special=True) == [64, 50256, 65]
    assert 50256 not in tok.encode("<|endoftext|>")  # plain text by default
    assert tok.decode([50256]) == "<|endoftext|>"


@needs_vocab
def test_both_file_layouts_load_the_same(tmp_path):
    with open(os.path.join(TOKENIZER_DIR, "encoder.json"), encoding="utf-8") as f:
        (tmp_path / "vocab.json").write_text(f.read(), encoding="utf-8")
    with open(os.path.join(TOKENIZER_DIR, "vocab.bpe"), encoding="utf-8") as f:
        (tmp_path / "merges.txt").write_text(f.read(), encoding="utf-8")
    a, b = real_tokenizer(), BPETokenizer.from_files(tmp_path)
    assert a.encoder == b.encoder and a.bpe_ranks == b.bpe_ranks


@functools.lru_cache(maxsize=None)
def hf_tokenizer(tok: BPETokenizer):
    """The same vocab and merges in Hugging Face `tokenizers`: ByteLevel pre-tokenizer
    (GPT-2 regex), optionally preceded by Digits(individual_digits=True) as in SmolLM2."""
    tokenizers = pytest.importorskip("tokenizers", reason="HF `tokenizers` is the parity reference")
    from tokenizers import decoders, models, pre_tokenizers
    merges = sorted(tok.bpe_ranks, key=tok.bpe_ranks.get)
    hf = tokenizers.Tokenizer(models.BPE(tok.encoder, merges))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if tok.split_digits:
        hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        hf.pre_tokenizer = byte_level
    hf.decoder = decoders.ByteLevel()
    return hf


@pytest.mark.parity
@pytest.mark.parametrize("split_digits", [False, True])
def test_parity_with_hf_tokenizers_tiny(split_digits):
    tok = tiny_tokenizer()
    tok.split_digits = split_digits
    hf = hf_tokenizer(tok)
    for text in TRICKY + [docstring_sample(50_000)]:
        assert tok.encode(text) == hf.encode(text).ids, text[:80]


@pytest.mark.parity
@needs_vocab
@pytest.mark.parametrize("split_digits", [False, True])
def test_parity_with_hf_tokenizers_real_vocab(split_digits):
    tok = real_tokenizer(split_digits=split_digits)
    hf = hf_tokenizer(tok)
    for text in TRICKY:
        assert tok.encode(text) == hf.encode(text).ids, text
    text = docstring_sample()
    ours, ref = tok.encode(text), hf.encode(text).ids
    assert len(ours) > 10_000 and ours == ref


@pytest.mark.parity
@needs_vocab
@pytest.mark.skipif(importlib.util.find_spec("tokenizers") is None,
                    reason="HF `tokenizers` is the parity reference")
@settings(max_examples=200, deadline=None)
@given(assigned_text)
def test_parity_with_hf_tokenizers_random_unicode(text):
    tok = real_tokenizer()
    assert tok.encode(text) == hf_tokenizer(tok).encode(text).ids


def test_bad_input_is_reported():
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match="not in the vocab"):
        tok.decode([10**6])
    with pytest.raises(ValueError, match="expects a str"):
        tok.encode(b"bytes")
    with pytest.raises(ValueError, match="vocab .* is empty"):
        BPETokenizer({}, [])
    with pytest.raises(ValueError, match="pair of token strings"):
        BPETokenizer(tok.encoder, [("a", "b", "c")])
    for bad in (7, None, "ab", " a", ("a", ""), ("a", 1)):
        with pytest.raises(ValueError, match="merge 1 .*pair of token strings"):
            BPETokenizer(tok.encoder, [("Ġ", "t"), bad])
    with pytest.raises(ValueError, match=r"merge 0 \('q', 'zz'\) uses or makes \['zz', 'qzz'\], not in the vocab"):
        BPETokenizer(tok.encoder, [("q", "zz")])
    with pytest.raises(ValueError, match="no tokenizer files"):
        BPETokenizer.from_files(os.path.dirname(__file__) + "/no_such_dir")


def test_unicode_classes_cover_categories():
    # spot checks of the \p{L} / \p{N} emulation against unicodedata itself
    for ch in "aZéßΩЖ日あ" + "\U00010400":
        assert unicodedata.category(ch)[0] == "L" and gpt2_pattern().fullmatch(ch)
    words = gpt2_pattern().findall("x²Ⅻ٣")
    assert words == ["x", "²Ⅻ٣"]


# SmolLM2's vocab has no token for these bytes; 0xF1 starts 4-byte UTF-8 (U+40000..U+7FFFF)
MISSING = (0x04, 0x06, 0x1D, 0xF1)
X90, X80 = bytes_to_unicode()[0x90], bytes_to_unicode()[0x80]  # characters of bytes 0x90, 0x80


@functools.lru_cache(maxsize=None)
def missing_byte_tokenizer(split_digits=False):
    tok = tiny_tokenizer(merges=[("!", "!"), ("a", "b"), ("Ġ", "t"), (X90, X80)], without=MISSING)
    tok.split_digits = split_digits
    return tok


def test_missing_bytes_are_dropped_before_merging():
    tok = missing_byte_tokenizer()
    pieces = lambda text: [tok.decode([i]) for i in tok.encode(text)]
    assert tok.missing_bytes == list(MISSING)
    assert len(tok.encoder) == 256 - len(MISSING) + 4
    # hand-derived: "!\x04!" is one pre-token; without \x04 the two '!' are adjacent and merge
    assert pieces("!\x04!") == ["!!"]
    assert pieces("!\x04\x06\x04!!") == ["!!", "!"]
    # "a\x04b": the regex cuts \x04 off as its own word, so a and b never meet
    assert pieces("a\x04b") == ["a", "b"]
    assert tok.encode("\x04\x1d") == [] and tok.encode("\U00050000") != []
    # U+50000 = F1 90 80 80: F1 dropped, then bytes (0x90, 0x80) merge
    assert tok.encode("\U00050000") == [tok.encoder[X90 + X80], tok.encoder[X80]]
    assert tok.decode(tok.encode("x\x04y")) == "xy"


# text where the missing bytes sit inside words, between punctuation and in 4-byte characters
text_with_missing_bytes = st.text(st.sampled_from(list("!!ab \n1") + ["\x04", "\x06", "\x1d", "\U00050000", "é"]),
                                  max_size=40)


@pytest.mark.parity
@pytest.mark.parametrize("split_digits", [False, True])
def test_missing_bytes_parity_with_hf_tokenizers(split_digits):
    tok = missing_byte_tokenizer(split_digits)
    hf = hf_tokenizer(tok)
    for text in TRICKY + ["!\x04!", "a\x04b", "\x04", "!!\x04", "\x04\x04 x", " \x06t", "\U00050000\U00050001"]:
        assert tok.encode(text) == hf.encode(text).ids, repr(text)


@pytest.mark.parity
@pytest.mark.skipif(importlib.util.find_spec("tokenizers") is None,
                    reason="HF `tokenizers` is the parity reference")
@settings(max_examples=300, deadline=None)
@given(text_with_missing_bytes)
def test_missing_bytes_parity_random(text):
    tok = missing_byte_tokenizer()
    assert tok.encode(text) == hf_tokenizer(tok).encode(text).ids
