"""Whole trainer calls: minisae.train.train for TopK and BatchTopK, and sparsify's TopK
training loop, each timed from the outside as a user feels it, in one run.

Scope: CPU. One call = building the SAE, then train(sae, batches, TrainConfig(...),
log=False) over n_samples random Gaussian samples (a pool of 16 batches in memory,
cycled), everything in between included: setup, warmup steps, the finite checks every
log_every steps, the last step. Two shapes:

    toy64   D=64,  F=512,  k=5,  batch 4096, 2M samples (488 steps)
    big     D=768, F=6144, k=32, batch 4096, 24 steps by default

sparsify (toy64 only, where it is installed; see sae_train.py): its SparseCoder and the
step of its Trainer (the loop of sae_train.sparsify_step) over the same batches and as
many steps, timed the same way; its Trainer class itself needs a Hugging Face model and
dataset, so the loop is what is compared. Its default optimizer is signum; Adam on both
sides.

Calls alternate (A B C A B C ...) so a change in the machine's load hits every side; the
report gives each side's median over the repeats, their ratios, and the spread of single
step times (the interval between the loop's requests for the next batch) of each side's
last call: median, 90th percentile, max, and the steps slower than 1.5x the median with
their positions, to show where slow steps come from. With one thread (OMP_NUM_THREADS=1,
recommended on a shared machine) every time is the process's CPU time
(time.process_time), which other jobs do not inflate; with more, wall time.

    python benchmarks/train_calls.py [--shapes toy64,big] [--repeats 3] [--big-steps 24]
"""

import argparse
import itertools
import os
import statistics
import subprocess
import time

import torch

import minisae
from minisae.sae import make_sae
from minisae.train import TrainConfig, train
from sae_train import load_sparsify, sparsify_train

def clock():
    return time.process_time() if torch.get_num_threads() == 1 else time.perf_counter()


SHAPES = {"toy64": (64, 512, 5, 4096), "big": (768, 6144, 32, 4096)}  # D, F, k, B


class TimedPool:
    """Cycles over batches in memory and records when each is asked for."""

    def __init__(self, pool):
        self.pool, self.times = itertools.cycle(pool), []

    def __iter__(self):
        return self

    def __next__(self):
        self.times.append(clock())
        return next(self.pool)

    def steps(self):
        return [b - a for a, b in zip(self.times, self.times[1:])]


def pool_of(D, B, n=16):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, D, generator=g) for _ in range(n)]


def minisae_call(variant, D, F, k, B, n_steps, pool):
    data = TimedPool(pool)
    t = clock()
    sae = make_sae(variant, D, F, k=k, seed=0)
    train(sae, data, TrainConfig(n_samples=n_steps * B, batch_size=B, lr=1e-3), log=False)
    return clock() - t, data.steps()


def sparsify_call(mods, D, F, k, B, n_steps, pool):
    """sae_train.sparsify_train, n_steps steps, with the setup inside the timing."""
    data = TimedPool(pool)
    t = clock()
    sparsify_train(mods, D, F, k, 1e-3, data, n_steps)
    return clock() - t, data.steps()


def spread(steps) -> str:
    med = statistics.median(steps)
    p90 = sorted(steps)[int(0.9 * (len(steps) - 1))]
    slow = [i for i, s in enumerate(steps) if s > 1.5 * med]
    where = ", ".join(map(str, slow[:12])) + (" ..." if len(slow) > 12 else "")
    return (f"step ms: median {1e3 * med:.1f}, p90 {1e3 * p90:.1f}, max {1e3 * max(steps):.1f}; "
            f"{len(slow)} of {len(steps)} steps > 1.5x median" + (f" (steps {where})" if slow else ""))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="toy64,big")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--toy-samples", type=int, default=2_000_000)
    parser.add_argument("--big-steps", type=int, default=24)
    args = parser.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    git = lambda *a: subprocess.run(["git", *a], cwd=root, capture_output=True, text=True).stdout.strip()
    commit, dirty = git("rev-parse", "--short", "HEAD"), git("status", "--porcelain", "minisae")
    kind = "CPU time" if torch.get_num_threads() == 1 else "wall time"
    print(f"whole trainer calls, CPU, {kind}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, this checkout {commit}"
          f"{' + uncommitted changes' if dirty else ''}; minisae imported from {os.path.dirname(minisae.__file__)}; "
          f"load average {os.getloadavg()[0]:.2f} at start")
    mods = load_sparsify()
    for shape in args.shapes.split(","):
        D, F, k, B = SHAPES[shape]
        n_steps = args.toy_samples // B if shape == "toy64" else args.big_steps
        pool = pool_of(D, B)
        sides = {"topk": lambda: minisae_call("topk", D, F, k, B, n_steps, pool),
                 "batchtopk": lambda: minisae_call("batchtopk", D, F, k, B, n_steps, pool)}
        if mods is not None and shape == "toy64":
            sides["sparsify topk"] = lambda: sparsify_call(mods, D, F, k, B, n_steps, pool)
        times, last = {name: [] for name in sides}, {}
        for _ in range(args.repeats):
            for name, call in sides.items():
                seconds, last[name] = call()
                times[name].append(seconds)
        print(f"\n{shape}: D={D} F={F} k={k} batch {B}, {n_steps} steps ({n_steps * B:,} samples) per call, "
              f"{args.repeats} calls per side, alternating; load average {os.getloadavg()[0]:.2f} at the end")
        med = {name: statistics.median(t) for name, t in times.items()}
        for name, t in times.items():
            calls = ", ".join(f"{s:.2f}" for s in t)
            print(f"  {name:14s} {n_steps * B / med[name]:>10,.0f} samples/s (median call {med[name]:.2f} s; "
                  f"calls {calls} s)")
            print(f"  {'':14s} {spread(last[name])}")
        print(f"  batchtopk / topk time per sample: {med['batchtopk'] / med['topk']:.2f}x")
        if "sparsify topk" in med:
            print(f"  topk speed / sparsify's: {med['sparsify topk'] / med['topk']:.2f}x")


if __name__ == "__main__":
    main()
