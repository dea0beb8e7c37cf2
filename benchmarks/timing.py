"""The one timing and table helper the benchmark scripts share (run them as
`python benchmarks/X.py`, which puts this folder on sys.path).

    clock(device)                  seconds, after the device's queued work is done
    seconds(fn, repeats, device)   median wall time of fn, after a warm-up call
    tokens_per_second(...)         a count over that median
    timed_in(precision, fn, device) fn under a precision context (bf16 autocast or none)
    table(rows, headers)           a markdown table, printed as the results files keep it
"""

import statistics
import time

import torch


def clock(device=None) -> float:
    """perf_counter after the device finished its queued work (a CUDA launch returns at
    once; the work is what we time). With one CPU thread, process time: it is what the
    work cost, whatever else the shared machine was doing."""
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return time.perf_counter()
    return time.process_time() if torch.get_num_threads() == 1 else time.perf_counter()


def seconds(fn, repeats: int, device=None) -> float:
    """Median time of `repeats` calls of fn, after one warm-up call (first calls allocate
    and pick kernels)."""
    fn()
    times = []
    for _ in range(repeats):
        start = clock(device)
        fn()
        times.append(clock(device) - start)
    return statistics.median(times)


def tokens_per_second(fn, n_tokens, repeats, device=None) -> float:
    """n_tokens / median time of `repeats` calls of fn."""
    return n_tokens / seconds(fn, repeats, device)


def timed_in(precision, fn):
    """fn called under a precision context (bf16 autocast, or contextlib.nullcontext)."""
    def run():
        with precision():
            return fn()
    return run


def table(rows, headers) -> str:
    """A markdown table: rows are tuples of already formatted strings (or numbers)."""
    rows = [[f"{v:,.0f}" if isinstance(v, float) else str(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                                            enumerate(zip(cells, widths))) + " |"
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])
