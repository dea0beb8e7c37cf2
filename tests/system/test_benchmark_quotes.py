"""Speed numbers chapters 6 and 9 quote come from the benchmark outputs kept in
benchmarks/results/: each quote below must be in its chapter, and its source line in the
results file (a re-run that changes the file makes this test name the stale quote)."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHAPTER = ROOT / "docs" / "09_gpus.md"
RESULTS = ROOT / "benchmarks" / "results"

# (what the chapter says, the results file, what that file says)
QUOTES = [
    ("1.64x and 1.54x sparsify's speed", "cpu_train_calls.txt", "topk speed / sparsify's: 1.64x"),
    ("1.64x and 1.54x sparsify's speed", "cpu_train_calls.txt", "topk speed / sparsify's: 1.54x"),
    ("(363,708 and 373,994 samples/s", "cpu_train_calls.txt", "topk              363,708 samples/s"),
    ("(363,708 and 373,994 samples/s", "cpu_train_calls.txt", "topk              373,994 samples/s"),
    ("against 221,242 and 243,230)", "cpu_train_calls.txt", "sparsify topk     221,242 samples/s"),
    ("against 221,242 and 243,230)", "cpu_train_calls.txt", "sparsify topk     243,230 samples/s"),
    ("1.58x on two\nthreads", "cpu_train_calls.txt", "topk speed / sparsify's: 1.58x"),
    ("gave 1.43x in the same sitting", "cpu_train_calls.txt", "topk speed / sparsify's: 1.43x"),
    ("1.03-1.09x TopK's time", "cpu_train_calls.txt", "batchtopk / topk time per sample: 1.03x"),
    ("1.03-1.09x TopK's time", "cpu_train_calls.txt", "batchtopk / topk time per sample: 1.09x"),
    ("(1.19x on two\nthreads)", "cpu_train_calls.txt", "batchtopk / topk time per sample: 1.19x"),
    ("and 0.99x at 768 x 6,144", "cpu_train_calls.txt", "batchtopk / topk time per sample: 0.99x"),
    ("takes 54.7 ms instead of\n187.8 ms, 3.4x", "cpu_transcoder_step.txt", "fast path / reference: 3.43x faster"),
    ("takes 54.7 ms instead of\n187.8 ms, 3.4x", "cpu_transcoder_step.txt", "fast          54.7 ms"),
    ("takes 54.7 ms instead of\n187.8 ms, 3.4x", "cpu_transcoder_step.txt", "reference    187.8 ms"),
    ("4.1, 3.2, 3.1 and 1.9 s, so 2.13x", "cpu_multi_train.txt", "one pass, 2 SAEs at a time   CPU    3.5 s (1.17x)   wall    1.9 s (2.13x"),
    ("4.1, 3.2, 3.1 and 1.9 s, so 2.13x", "cpu_multi_train.txt", "one at a time, 2 threads     CPU    6.4 s (0.64x)   wall    3.2 s (1.28x"),
    ("took 25.2 s and stacked 25.8 s (0.98x", "cpu_multi_train.txt",
     "each SAE on its own 25.2 s, stacked 25.8 s, own / stacked 0.98x; every SAE bit for bit the same: True"),
    ("median 363.7 ms, p90 418.6, max 460.8", "cpu_train_calls.txt", "step ms: median 363.7, p90 418.6, max 460.8"),
    ("today's median 358.9, p90 400.5, max 417.7", "cpu_train_calls.txt", "step ms: median 358.9, p90 400.5, max 417.7"),
    ("(808-862 minor faults each, 74-137 in the\nothers)", "cpu_step_spread.txt", "808 in those, 74 in the others"),
    ("(808-862 minor faults each, 74-137 in the\nothers)", "cpu_step_spread.txt", "862 in those, 137 in the others"),
    ("(33 and\n117 steps over 1.25x the median, against 54 and 76)", "cpu_step_spread.txt",
     "33 of 487 steps > 1.25x median"),
    ("(33 and\n117 steps over 1.25x the median, against 54 and 76)", "cpu_step_spread.txt",
     "117 of 487 steps > 1.25x median"),
    ("medians 699.6 -> 685.9 and 683.8 -> 625.0 ms on one thread", "cpu_step_spread.txt", "median 699.6, p90 743.3"),
    ("medians 699.6 -> 685.9 and 683.8 -> 625.0 ms on one thread", "cpu_step_spread.txt", "median 625.0, p90 660.4"),
    ("436.0 -> 397.8 and 389.5 -> 317.7 ms on two", "cpu_step_spread.txt", "median 317.7, p90 336.6"),
    ("1.04x at 64", "cpu_multi_train.txt", "own / stacked 1.04x; every SAE bit for bit the same: True"),
    ("the sparse paths took 12.4 s, so stacking would be 1.43x slower", "cpu_multi_train.txt",
     "one pass, each SAE on its own: 12.4 s   stacked (ReLU x3, Gated x3, TopK x3, JumpReLU x3, BatchTopK x3; the rest "
     "on their own): 17.7 s   stacked / own 1.43"),
    ("16.7, 11.5, 13.6 and 7.5 s, so 2.24x", "cpu_multi_train.txt",
     "one at a time, 2 threads     CPU   22.8 s (0.73x)   wall   11.5 s (1.46x"),
    ("16.7, 11.5, 13.6 and 7.5 s, so 2.24x", "cpu_multi_train.txt",
     "one pass, 2 SAEs at a time   CPU   13.6 s (1.23x)   wall    7.5 s (2.24x"),
    ("1.83x sparsify's speed on one thread (363,008 against 198,802", "cpu_train_calls.txt",
     "topk speed / sparsify's: 1.83x"),
    ("1.76x on two (564,336 against 319,798)", "cpu_train_calls.txt", "topk speed / sparsify's: 1.76x"),
    ("BatchTopK 1.10x and 1.23x TopK's time there, 1.09x at 768 x 6,144", "cpu_train_calls.txt",
     "batchtopk / topk time per sample: 1.23x"),
    ("BatchTopK 1.10x and 1.23x TopK's time there, 1.09x at 768 x 6,144", "cpu_train_calls.txt",
     "batchtopk / topk time per sample: 1.10x"),
]


# chapter 6's numbers for `steer` and the models' product for a few rows
CHAPTER_6 = ROOT / "docs" / "06_features.md"
QUOTES_6 = [
    ("11.6 s the first time and 5.0 s later, against 16.8 s", "cpu_steer.txt",
     "before            16.8   28.8     6.2         5.6     10.71"),
    ("11.6 s the first time and 5.0 s later, against 16.8 s", "cpu_steer.txt",
     "after, first      11.6   18.6     6.7         1.4     42.86"),
    ("11.6 s the first time and 5.0 s later, against 16.8 s", "cpu_steer.txt",
     "after, kept        5.0    5.4     0.0         1.4     42.86"),
    ("59 s the first time", "cpu_steer.txt", "after, first      58.9   36.6    37.3         5.2     11.54"),
    ("27 s on later calls", "cpu_steer.txt", "after, kept       26.9   10.2     0.0         9.2      6.52"),
    ("7 min 12 s for a scan", "cpu_steer.txt", "before           432.3  146.3   114.5       273.6      0.22"),
    ("up to 7.6x", "cpu_few_rows_linear.txt", "SmolLM2 unembed 49152x576           1.00x      5.92x*     7.62x*"),
]


CHAPTERS = {"chapter 6": CHAPTER_6, "chapter 9": CHAPTER}
ALL_QUOTES = [("chapter 9", *q) for q in QUOTES] + [("chapter 6", *q) for q in QUOTES_6]


@pytest.mark.parametrize("chapter,doc,results,line", ALL_QUOTES,
                         ids=[f"{c}:{r}:{l[:40]}" for c, _, r, l in ALL_QUOTES])
def test_chapters_quote_the_kept_benchmark_outputs(chapter, doc, results, line):
    text = CHAPTERS[chapter].read_text(encoding="utf-8")
    assert doc in text or " ".join(doc.split()) in " ".join(text.split()), f"{chapter} no longer says {doc!r}"
    assert line in (RESULTS / results).read_text(encoding="utf-8"), f"{results} does not say {line!r}"
