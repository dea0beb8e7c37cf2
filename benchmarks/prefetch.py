"""What the background reader (minisae.pipeline.batches.prefetch) buys: SAE training on stored
activations with the batches read ahead by a thread against read in the training loop.

Scope: wall time of minisae.train.train for --steps steps (TopK k=48, 4x expansion,
batch 1,024, bf16 autocast, the chapter-5 settings) on an activation file `lm` wrote,
and the time to read the same batches alone. "cold": the file is evicted from the page
cache first (needs root: /proc/sys/vm/drop_caches), so every block comes from the disk,
as in the first pass of a sweep whose activations exceed memory; "warm": it is cached.
Wall time, so run it on a quiet machine and compare the rows of one run.

    python benchmarks/prefetch.py ACTS.npy [--steps 300]
"""

import argparse
import os
import time

import numpy as np
import torch

from minisae.pipeline.batches import iter_batches
from minisae.sae import make_sae
from minisae.pipeline.batches import activation_batches
from minisae.train import TrainConfig, train


def drop_page_cache() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return True
    except OSError:
        return False


def batches(acts, B, ahead: bool):
    """`lm`'s own batches (read ahead), or the same epochs read in the loop."""
    if ahead:
        return activation_batches(acts, B, seed=0)
    return (x for epoch in range(10**9) for x in iter_batches(acts, B, seed=epoch, drop_last=True))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("acts", help="an (N, D) float32 .npy of stored activations")
    p.add_argument("--steps", type=int, default=300)
    args = p.parse_args()
    B = 1024
    acts = np.load(args.acts, mmap_mode="r")  # (N, D)
    D = acts.shape[1]
    print(f"{args.acts}: {acts.shape[0]:,} x {D} float32 ({acts.nbytes / 2**20:.0f} MiB); {args.steps} steps of "
          f"{B}; TopK k=48, F={4 * D}, bf16; torch {torch.get_num_threads()} threads")
    print("| page cache | reader | read alone, s | training, s | samples/s |")
    print("|---|---|---|---|---|")
    for cache in ("cold", "warm"):
        for ahead in (False, True):
            if cache == "cold" and not drop_page_cache():
                print("| cold | (needs root to drop the page cache: skipped) | | | |")
                break
            it = batches(acts, B, ahead)
            t = time.perf_counter()
            for _, x in zip(range(args.steps), it):
                pass
            read_s = time.perf_counter() - t
            it.close()
            if cache == "cold":
                drop_page_cache()
            sae = make_sae("topk", D, 4 * D, seed=0, k=48, dead_after=500_000)
            cfg = TrainConfig(n_samples=args.steps * B, batch_size=B, lr=1e-3, bf16=True, resample_dead_after=1_000_000,
                              log_every=50)
            it = batches(acts, B, ahead)
            t = time.perf_counter()
            train(sae, it, cfg, log=False)
            train_s = time.perf_counter() - t
            it.close()
            print(f"| {cache} | {'background thread' if ahead else 'in the loop'} | {read_s:.2f} | {train_s:.2f} | "
                  f"{args.steps * B / train_s:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
