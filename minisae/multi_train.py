"""A sweep trained in one pass: every SAE of a sweep reads the same batches, so read each
batch once and feed it to all of them.

The reference is the one-at-a-time loop, minisae/train.py, run once per SAE:

    for i in 1..N:                      for each batch x (B, D):            (one pass)
        for each batch x (B, D):            for i in 1..N (still training):
            step(SAE_i, x)          ==>         step(SAE_i, x)

`step` is `minisae.train.Trainer.step`, unchanged: each SAE keeps its own optimizer,
schedules, dead-latent counters, resampling generator and checks, so each ends exactly
(bit for bit) as the SAE trained alone with `train` on the same stream
(tests/core/test_multi_train.py, every variant, with resampling and AuxK). What the pass
saves is the reading or making of the batches: N streams become one. The SAEs may train
for different numbers of samples (a frontier sweep's short runs beside its main runs):
a shorter run's batches are the first ones of the longer run's stream, and it stops there.

Stacking the SAEs' weights goes one step further (`stack=True`, minisae/stacked.py):
where N SAEs share a variant, a shape and a schedule,

    W_enc (N, F, D), b_enc (N, 1, F), b_dec (N, 1, D)
    pre   = bmm(x - b_dec, W_enc^T) + b_enc          (N, B, F), one product for N SAEs
    x_hat = bmm(f, W_dec) + b_dec                    (N, B, D)

which turns N launch sequences into one: the win on a GPU, where a small SAE's step
waits on kernel launches, and the default there. On a CPU the products already run at
the matrix-multiply rate and each SAE's sparse path (minisae/sparse_decode.py) skips most
of them, so the steps here stay per SAE unless asked (benchmarks/multi_train.py --stacked
measures both). A stacked SAE ends as trained alone on the dense reference (bit for bit in
float32 on a CPU), and as on the sparse paths up to the order of float additions
(tests/core/test_stacked.py); an SAE stepped on its own, bit for bit as alone.

What a CPU with several cores can use instead is the independence of the SAEs: with
`threads=T` each batch's steps are handed out to T threads, each running whole SAE
steps with one intra-op thread. A small SAE's products are too small to split well over
the cores (the threads of one product wait for each other); T SAEs at a time can keep
the cores busy without that wait, where the cores are free (the toy sweep 2.06-2.13x one
at a time on an idle 2-core CPU; nothing gained under other jobs: docs/09_gpus.md). Every operation still runs on one thread, as in `train`
with torch.set_num_threads(1), so each SAE ends bit for bit as trained alone on one
thread (tests/core/test_multi_train.py); torch releases Python's lock inside its
operations, so the threads overlap except for the steps' Python.
"""

import time
from concurrent.futures import ThreadPoolExecutor

import torch

from minisae.configs import TrainConfig
from minisae.stacked import Stack, stack_trainers
from minisae.train import Trainer, next_batch
from minisae.utils import Progress


def multi_train(saes, batches, cfgs, log=True, group=None, threads: int = 1, stack=None,
                own_batches: bool = False) -> list:
    """Train the SAEs in place on one iterator of batches (B, D); returns each one's
    history, as `train` returns it. cfgs: one TrainConfig per SAE, or one for all; they
    must agree on batch_size, and may differ in everything else (n_samples, lr,
    resampling, seed). group: as for `train` (torchrun, data mode: every SAE's step
    averages its gradients over the ranks; `batches` gives this rank's share).

    Each result's train_seconds is the time of that SAE's own steps plus its share of the
    batch reading (a batch's reading split over the SAEs that used it); "joint_seconds"
    is the whole pass's wall time. threads: how many SAE steps run at once (module
    docstring; one process only); 1 runs them in this thread with torch's own threading.
    stack: train the SAEs that can share a stack (minisae/stacked.py: same variant, shape
    and schedule) as one, their weights stacked; None: on accelerators only, where it
    saves kernel launches (on a CPU each SAE's sparse path is faster). A stacked SAE does
    the dense reference's arithmetic (module docstring).
    own_batches: each item of `batches` is a list of N batches, SAE i's is item i (SAEs at
    different sites, e.g. a model's layers, trained together: nothing read is shared, but
    stacks still serve SAEs of one shape)."""
    cfgs = [cfgs] * len(saes) if isinstance(cfgs, TrainConfig) else list(cfgs)
    if not saes or len(cfgs) != len(saes):
        raise ValueError(f"need one TrainConfig per SAE (or one for all), got {len(cfgs)} for {len(saes)} SAEs")
    batch_size = cfgs[0].batch_size
    if not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    if threads > 1 and group is not None:  # two threads' collectives would meet other ranks' in another order
        raise ValueError("threads > 1 trains without a process group: under torchrun, one SAE step at a time")
    if any(c.batch_size != batch_size for c in cfgs):
        raise ValueError(f"the SAEs of one pass read the same batches: batch sizes differ, "
                         f"{sorted({c.batch_size for c in cfgs})}")
    trainers = [Trainer(sae, cfg, log=False, group=group) for sae, cfg in zip(saes, cfgs)]
    n_steps = max(t.n_steps for t in trainers)
    if stack is None:
        stack = saes[0].W_enc.device.type != "cpu"
    stacks, singles = stack_trainers(trainers) if stack and group is None else ([], trainers)
    units = stacks + singles  # what steps: a Stack of several SAEs, or one SAE's Trainer
    members = [[trainers.index(t) for t in u.trainers] if isinstance(u, Stack) else [trainers.index(u)]
               for u in units]  # the SAEs of each unit
    seconds = [0.0] * len(units)
    main = log and (group is None or group.main)
    bar = Progress(f"  training {len(saes)} SAEs", total=n_steps * batch_size, unit="samples") if main else None

    def step(i, x):  # unit i's step: SAE i's own, exactly as `train` runs it, or a stack's
        t0 = time.perf_counter()
        units[i].step(x)
        return time.perf_counter() - t0

    n_main = torch.get_num_threads()
    pool = ThreadPoolExecutor(threads, initializer=torch.set_num_threads, initargs=(1,)) if threads > 1 else None
    t_start = time.perf_counter()
    try:
        for step_i in range(n_steps):
            t0 = time.perf_counter()
            x = next_batch(batches, step_i, n_steps)  # (B / world, D): read once
            if own_batches and len(x) != len(saes):
                raise ValueError(f"own_batches: each item must hold one batch per SAE, {len(saes)}; got {len(x)}")
            active = [i for i, u in enumerate(units) if step_i < u.n_steps]
            inputs = [[x[j] for j in members[i]] if isinstance(units[i], Stack) else x[members[i][0]]
                      for i in active] if own_batches else [x] * len(active)  # each unit's batch(es)
            read = (time.perf_counter() - t0) / sum(len(members[i]) for i in active)  # per SAE
            if pool:  # the slowest steps first, so that no thread is left with a long one at the end
                order = sorted(range(len(active)), key=lambda j: -seconds[active[j]])
                active, inputs = [active[j] for j in order], [inputs[j] for j in order]
                took = pool.map(step, active, inputs)
            else:
                took = (step(i, xi) for i, xi in zip(active, inputs))
            for i, s in zip(active, took):
                seconds[i] += len(members[i]) * read + s
            if bar:
                bar.update((step_i + 1) * batch_size, extra=f" | {len(active)} training")
    except BaseException:
        for s in stacks:  # each SAE its own tensors again, as far as it got
            s.release()
        raise
    finally:
        if pool:
            pool.shutdown()
            torch.set_num_threads(n_main)  # the workers' setting is torch's default for new threads
    if bar:
        bar.close(n_steps * batch_size)
    joint = time.perf_counter() - t_start
    results = [None] * len(trainers)
    for u, own, s in zip(units, members, seconds):  # a stack's time split evenly over its SAEs
        for i, out in zip(own, u.finish() if isinstance(u, Stack) else [u.finish()]):
            results[i] = {**out, "train_seconds": s / len(own), "joint_seconds": joint}
    return results
