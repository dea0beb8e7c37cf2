"""The one timing helper the benchmark scripts share (run them as `python benchmarks/X.py`,
which puts this folder on sys.path)."""

import statistics
import time


def tokens_per_second(fn, n_tokens, repeats):
    """n_tokens / median wall time of `repeats` calls of fn, after one warm-up call."""
    fn()  # warm-up: first calls allocate and pick kernels
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return n_tokens / statistics.median(times)
