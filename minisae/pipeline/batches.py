"""Batches for training, from stored activations (minisae.pipeline.activations): a seeded order
over a memmap read in large contiguous blocks, one rank's share of each batch under
torchrun (minisae.distributed), pinned memory on CUDA, and a background reader so a
training step never waits for the disk."""

import queue
import threading

import numpy as np
import torch

from minisae.utils import crash_point


def iter_batches(acts, batch_size: int, seed: int = 0, device="cpu", block_batches: int = 8,
                 drop_last: bool = False, rank: int = 0, world: int = 1):
    """One epoch of float32 batches (batch_size, D) from stored activations.

    The file is already shuffled, so we read contiguous blocks of block_batches batches
    (fast on a memmap), visit the blocks in a seeded random order and permute the rows
    inside each block. Another seed gives another order for the next epoch.

    Several processes (world > 1, minisae.distributed): every rank draws the same order
    and reads only its share of each global batch, rows rank*b .. (rank+1)*b with
    b = batch_size / world: (b, D). On CUDA a batch goes through pinned host memory
    with a non-blocking copy, so the copy overlaps the previous step's work.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if batch_size % world:
        raise ValueError(f"batch_size {batch_size} does not divide into {world} processes")
    device = torch.device(device)
    pin = device.type == "cuda"
    rng = np.random.default_rng(seed)
    block, b = batch_size * block_batches, batch_size // world
    for start in rng.permutation(np.arange(0, len(acts), block)):
        n = min(block, len(acts) - start)
        perm = rng.permutation(n)
        rows = np.asarray(acts[start:start + n])[perm] if world == 1 else None  # (block, D), read from disk
        for i in range(0, n, batch_size):
            if drop_last and min(batch_size, n - i) < batch_size:
                continue
            if world == 1:
                batch = rows[i:i + batch_size]
            else:  # only this rank's rows of the global batch
                batch = acts[start + perm[i + rank * b:i + (rank + 1) * b]]  # (b, D)
            x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
            yield (x.pin_memory() if pin else x).to(device, non_blocking=pin)


def prefetch(batches, depth: int = 2):
    """The same batches, read `depth` ahead by a background thread, so a training step
    never waits for the disk (numpy releases the GIL while it reads and copies). The
    thread stops when this generator is closed or dropped."""
    q, stop, done = queue.Queue(maxsize=depth), threading.Event(), object()

    def put(item):
        while not stop.is_set():
            try:
                return q.put(item, timeout=0.1)
            except queue.Full:
                pass

    def work():
        try:
            for x in batches:
                if stop.is_set():
                    return
                put(x)
        except BaseException as e:  # handed to the consumer, raised there
            put(e)
        put(done)

    threading.Thread(target=work, daemon=True).start()
    try:
        while (x := q.get()) is not done:
            if isinstance(x, BaseException):
                raise x
            yield x
    finally:
        stop.set()


def activation_batches(acts, batch_size: int, seed: int, device="cpu", group=None):
    """Endless batches from stored activations: epoch after epoch, a new order each, read
    ahead by a background thread; with a process group, this rank's share of each."""

    def epochs():
        epoch, n = 0, 0
        while True:
            for batch in iter_batches(acts, batch_size, seed=seed + epoch, device=device, drop_last=True,
                                      rank=group.rank if group else 0, world=group.world if group else 1):
                yield batch
                n += 1
                if n == 3:
                    crash_point("train")  # the kill tests stop here, a few steps into training
            epoch += 1

    return prefetch(epochs())
