"""A sweep trained in one pass (minisae.multi_train) against one SAE at a time (minisae.train).

Scope: the toy job's 20 SAEs (`python -m minisae toy`: 5 main runs and the 15 frontier
runs, their settings and data) with the sample counts scaled by --frac, training only
(no evaluation), on one thread in one process. "One at a time" trains each SAE with
`train` on its own data stream, as a sweep did; "one pass" reads the stream once and
feeds every SAE (`multi_train`). Both end at the same weights, checked bit for bit. The
times are CPU seconds of this process (time.process_time; other jobs on a shared machine
inflate them less than wall time), measured in one run, one after the other.

--compile also times the step of one SAE per variant with TrainConfig.compile against the
eager step (the CPU's fast path), after a first call that compiles.

--stack times the one product every SAE's step makes, pre = (x - b_dec) W_enc^T + b_enc,
for the 20 SAEs as 20 `addmm` against one `baddbmm` over weights stacked (20, F, D): what
stacking the SAEs would save on this machine, and whether it gives the same numbers.

--stacked trains the sweep in one pass twice, each SAE stepped on its own (the CPU's
default, its sparse paths) and with the SAEs that share a variant, shape and schedule
stacked (multi_train stack=True, minisae/stacked.py: the dense products batched); CPU
seconds of the whole calls on one thread, the stacks formed, and the largest weight
difference between the two (they agree up to the order of float additions); then both
again with every SAE stepped on its own on the dense reference (SAE.loss, what the
stack batches, and what a GPU runs), and whether the two are bit for bit the same.

--cores trains the sweep four ways, each --repeats times, interleaved: one at a time
and in one pass, on one thread, and with two cores: one at a time with torch on two
threads, and one pass with two SAEs' steps at a time (multi_train threads=2, each step
on one thread). CPU seconds and wall seconds per call, medians; on a shared machine the
wall times depend on the load (printed), the CPU seconds less.

--toy-job runs the whole toy job (`python -m minisae toy`, every worker, figures and all)
twice in this run: each SAE trained alone in its own worker task, as before
`minisae.toy.run.passes`, and one pass per variant; wall seconds, and whether every
number of toy_results.json but the timings is the same.

    python benchmarks/multi_train.py [--frac 0.2] [--dim 256] [--compile] [--stack] [--stacked] [--cores]
        [--toy-job]
"""

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import torch

from minisae.configs import ToyConfig
from minisae.multi_train import multi_train
from minisae.stacked import stack_trainers
from minisae.toy import run as toy
from minisae.toy.run import SETTINGS, SWEEP, VARIANTS, data_stream, make_data, make_variant
from minisae.train import Trainer, train
from sae_train import dense_reference  # benchmarks/sae_train.py


def sweep_jobs(cfg: ToyConfig, frac: float):
    """The toy job's SAEs: (variant, settings, n_samples), main runs then the frontier."""
    jobs = [(v, SETTINGS[v], int(cfg.n_samples * frac)) for v in VARIANTS]
    return jobs + [(v, {**SETTINGS[v], SWEEP[v][0]: val}, int(cfg.sweep_samples * frac))
                   for v in VARIANTS for val in SWEEP[v][1]]


def build(jobs, data, scale, cfg):
    return zip(*[make_variant(v, settings, data, scale, cfg, n) for v, settings, n in jobs])


def one_at_a_time(jobs, data, scale, cfg, intra: int = 1):
    """(CPU seconds, wall seconds, SAEs): each SAE trained alone, torch on `intra` threads."""
    saes, tcfgs = build(jobs, data, scale, cfg)
    torch.set_num_threads(intra)
    t0, w0 = time.process_time(), time.perf_counter()
    for sae, tcfg in zip(saes, tcfgs):
        train(sae, data_stream(data, cfg), tcfg, log=False)
    t, w = time.process_time() - t0, time.perf_counter() - w0
    torch.set_num_threads(1)
    return t, w, saes


def one_pass(jobs, data, scale, cfg, threads: int = 1, stack: bool = False):
    """(CPU seconds, wall seconds, SAEs): one pass, its steps in `threads` threads."""
    saes, tcfgs = build(jobs, data, scale, cfg)
    t0, w0 = time.process_time(), time.perf_counter()
    multi_train(list(saes), data_stream(data, cfg), list(tcfgs), log=False, threads=threads, stack=stack)
    return time.process_time() - t0, time.perf_counter() - w0, saes


def same(a, b) -> bool:
    return all(torch.equal(x.state_dict()[k], y.state_dict()[k]) for x, y in zip(a, b) for k in x.state_dict())


def step_seconds(variant, data, scale, cfg, compile: bool, steps: int = 30):
    """Median seconds per step of `steps` steps after a first (compiling) call."""
    sae, tcfg = make_variant(variant, SETTINGS[variant], data, scale, cfg, cfg.batch_size)
    tcfg = dataclasses.replace(tcfg, n_samples=(steps + 1) * cfg.batch_size, compile=compile)
    times, stream, trainer = [], data_stream(data, cfg), Trainer(sae, tcfg, log=False)
    for _ in range(steps + 1):
        x = next(stream)
        t0 = time.perf_counter()
        trainer.step(x)
        times.append(time.perf_counter() - t0)
    return sorted(times[1:])[steps // 2]


def stacked_product(saes, data, cfg, repeats: int = 20):
    """Median seconds (CPU seconds on one thread, else wall) of the encoder product of N
    SAEs three ways: N addmm, one baddbmm over W_enc stacked (N, F, D) as the SAEs store
    it, and one over W_enc^T stacked (N, D, F) contiguous; each stacked result's largest
    difference from the N addmm."""
    clock = time.process_time if torch.get_num_threads() == 1 else time.perf_counter
    x = data.sample(cfg.batch_size, torch.Generator().manual_seed(1))[0]  # (B, D)
    W = torch.stack([s.W_enc.detach() for s in saes])  # (N, F, D)
    W_t = W.transpose(1, 2).contiguous()  # (N, D, F)
    b_enc = torch.stack([s.b_enc.detach() for s in saes])[:, None, :]  # (N, 1, F)
    b_dec = torch.stack([s.b_dec.detach() for s in saes])[:, None, :]  # (N, 1, D)
    ways = {"addmm": lambda: [torch.addmm(s.b_enc, x - s.b_dec, s.W_enc.T) for s in saes],  # N x (B, F)
            "baddbmm (N, F, D)": lambda: torch.baddbmm(b_enc, x - b_dec, W.transpose(1, 2)),  # (N, B, F)
            "baddbmm (N, D, F)": lambda: torch.baddbmm(b_enc, x - b_dec, W_t)}  # (N, B, F)
    with torch.no_grad():
        times = {}
        for name, fn in ways.items():
            fn()
            runs = []
            for _ in range(repeats):
                t0 = clock()
                fn()
                runs.append(clock() - t0)
            times[name] = sorted(runs)[repeats // 2]
        ref = torch.stack(ways["addmm"]())  # (N, B, F)
        diffs = {name: (fn() - ref).abs().max().item() for name, fn in ways.items() if name != "addmm"}
    return times, diffs


def without_times(obj):
    """toy_results.json without its timings (they differ from run to run): *seconds, train_s."""
    if isinstance(obj, dict):
        return {k: without_times(v) for k, v in obj.items() if not k.endswith(("seconds", "_s"))}
    return [without_times(v) for v in obj] if isinstance(obj, list) else obj


def toy_job(alone: bool) -> tuple:
    """Wall seconds of the toy job and its results; alone: one worker task per SAE."""
    passes = toy.passes
    if alone:
        toy.passes = lambda jobs, variants: [[i] for i in range(len(jobs))]
    try:
        with tempfile.TemporaryDirectory() as out:
            t0 = time.perf_counter()
            results = toy.run(Path(out))
            return time.perf_counter() - t0, results
    finally:
        toy.passes = passes


def cores(args, jobs, data, scale, cfg):
    """--cores: four ways to train the sweep, called in turn (A B C D A B C D ...), each
    call's CPU and wall seconds; medians over --repeats, with the load average."""
    import os
    import statistics
    ways = {"one at a time, 1 thread": lambda: one_at_a_time(jobs, data, scale, cfg, intra=1),
            "one pass, 1 thread": lambda: one_pass(jobs, data, scale, cfg, threads=1),
            "one at a time, 2 threads": lambda: one_at_a_time(jobs, data, scale, cfg, intra=2),
            "one pass, 2 SAEs at a time": lambda: one_pass(jobs, data, scale, cfg, threads=2)}
    times, saes = {w: [] for w in ways}, {}
    loads = [os.getloadavg()[0]]
    for _ in range(args.repeats):
        for name, call in ways.items():
            cpu, wall, saes[name] = call()
            times[name].append((cpu, wall))
            loads.append(os.getloadavg()[0])
    med = {w: (statistics.median(c for c, _ in t), statistics.median(w_ for _, w_ in t)) for w, t in times.items()}
    print(f"{args.repeats} calls per way, alternating; load average (1 min) {min(loads):.1f}-{max(loads):.1f} "
          f"over the run ({', '.join(f'{v:.1f}' for v in loads)})")
    base_cpu, base_wall = med["one at a time, 1 thread"]
    for name, (cpu, wall) in med.items():
        calls = ", ".join(f"{w_:.1f}" for _, w_ in times[name])
        print(f"  {name:28s} CPU {cpu:6.1f} s ({base_cpu / cpu:4.2f}x)   wall {wall:6.1f} s ({base_wall / wall:4.2f}x;"
              f" calls {calls})")
    ref = saes["one at a time, 1 thread"]
    print("  identical weights to one at a time on 1 thread: " + ", ".join(
        f"{name}: {same(ref, s)}" for name, s in saes.items() if name != "one at a time, 1 thread"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frac", type=float, default=0.2, help="fraction of the toy job's samples per SAE")
    ap.add_argument("--dim", type=int, default=256, help="the data's dimension (the toy's --dim)")
    ap.add_argument("--compile", action="store_true", help="also time the compiled step against the eager one")
    ap.add_argument("--stack", action="store_true", help="also time the encoder product, N addmm against one baddbmm")
    ap.add_argument("--stacked", action="store_true", help="also the one pass with same-shape SAEs stacked")
    ap.add_argument("--cores", action="store_true", help="the sweep four ways, one and two threads, "
                    "interleaved: CPU and wall seconds")
    ap.add_argument("--repeats", type=int, default=3, help="calls per way with --cores")
    ap.add_argument("--toy-job", action="store_true", help="also time the whole toy job, SAEs alone against one pass")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = ToyConfig(dim=args.dim)
    data, scale = make_data(cfg.n_features, cfg.dim, cfg.seed)
    jobs = sweep_jobs(cfg, args.frac)
    steps = sum(n // cfg.batch_size for _, _, n in jobs)
    print(f"toy sweep: {len(jobs)} SAEs, 512 features in {cfg.dim} dims, {cfg.n_latents} latents, batch "
          f"{cfg.batch_size}, {steps} SAE steps in all (--frac {args.frac}); one thread, CPU seconds")
    if args.cores:
        cores(args, jobs, data, scale, cfg)
        return
    t_alone, _, alone = one_at_a_time(jobs, data, scale, cfg)
    t_pass, _, together = one_pass(jobs, data, scale, cfg)
    print(f"one at a time: {t_alone:.1f} s   one pass: {t_pass:.1f} s   speed-up {t_alone / t_pass:.2f}x   "
          f"identical weights: {same(alone, together)}")
    if args.compile:
        print("step time, eager (the CPU's fast path) against TrainConfig.compile (one SAE, median of 30 steps):")
        for v in VARIANTS:
            eager, fused = step_seconds(v, data, scale, cfg, False), step_seconds(v, data, scale, cfg, True)
            print(f"  {v:10s} eager {eager * 1e3:6.1f} ms   compiled {fused * 1e3:6.1f} ms   "
                  f"compiled / eager {fused / eager:.2f}")
    if args.stack:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            times, diffs = stacked_product(together, data, cfg)
            base = times["addmm"]
            print(f"encoder product of the {len(together)} SAEs, {threads} thread(s), median of 20 "
                  f"({'CPU' if threads == 1 else 'wall'} ms): " + ", ".join(
                      f"{n} {t * 1e3:.1f}" + (f" ({base / t:.2f}x, largest difference {diffs[n]:.1e})" if n in diffs else "")
                      for n, t in times.items()))
        torch.set_num_threads(1)
    if args.stacked:
        saes, tcfgs = build(jobs, data, scale, cfg)
        stacks, _ = stack_trainers([Trainer(s, c, log=False) for s, c in zip(saes, tcfgs)])
        sizes = [f"{type(s.part).__name__} x{len(s.trainers)}" for s in stacks]
        t_stack, _, stacked = one_pass(jobs, data, scale, cfg, stack=True)
        diff = max((a.state_dict()[k] - b.state_dict()[k]).abs().max().item()
                   for a, b in zip(together, stacked) for k in a.state_dict() if a.state_dict()[k].is_floating_point())
        print(f"one pass, each SAE on its own: {t_pass:.1f} s   stacked ({', '.join(sizes)}; the rest on their "
              f"own): {t_stack:.1f} s   stacked / own {t_stack / t_pass:.2f}   largest weight difference {diff:.1e}")
        with dense_reference():  # each SAE stepped on its own takes the dense reference
            t_dense, _, dense = one_pass(jobs, data, scale, cfg)
            t_dense_stack, _, dense_stacked = one_pass(jobs, data, scale, cfg, stack=True)
        print(f"on the dense reference (SAE.loss, as on a GPU), one pass: each SAE on its own {t_dense:.1f} s, "
              f"stacked {t_dense_stack:.1f} s, own / stacked {t_dense / t_dense_stack:.2f}x; every SAE bit for bit "
              f"the same: {same(dense, dense_stacked)}")
    if args.toy_job:
        t_alone, r_alone = toy_job(alone=True)
        t_pass, r_pass = toy_job(alone=False)
        print(f"toy job (python -m minisae toy, wall seconds, its worker processes): each SAE alone {t_alone:.1f} s, "
              f"one pass per variant {t_pass:.1f} s, speed-up {t_alone / t_pass:.2f}x; same results but the "
              f"timings: {without_times(r_alone) == without_times(r_pass)}")


if __name__ == "__main__":
    main()
