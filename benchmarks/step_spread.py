"""Where a TopK step's slow steps come from: each step's time beside its page faults.

Scope: CPU. `Trainer.step` of a TopK SAE (benchmarks/train_calls.py's shapes, the same
in-memory batches), each step timed alone (CPU time on one thread, else wall time) with
the process's minor page faults during it (getrusage). A fault is the kernel handing the
process a fresh page, as when glibc's malloc has returned freed memory to the system
and a later step's tensor needs it again. Each setting runs in a process of its own,
twice: glibc's defaults, and with malloc told to keep freed memory
(MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_, MALLOC_TOP_PAD_). If the faults made
the slow steps, the second would have fewer of them.

    python benchmarks/step_spread.py [--shape toy64|big] [--steps 488]
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

KEEP = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**40)}


def child(shape: str, n_steps: int):
    """Step times and faults of one training run, as JSON on stdout."""
    import torch
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import train_calls as tc
    from minisae.sae import make_sae
    from minisae.train import TrainConfig, Trainer
    D, F, k, B = tc.SHAPES[shape]
    pool = tc.pool_of(D, B)
    trainer = Trainer(make_sae("topk", D, F, k=k, seed=0), TrainConfig(n_samples=n_steps * B, batch_size=B, lr=1e-3),
                      log=False)
    rows = []
    for i in range(n_steps):
        f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, tc.clock()
        trainer.step(pool[i % len(pool)])
        rows.append((tc.clock() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0))
    print(json.dumps({"rows": rows[1:], "threads": torch.get_num_threads()}))  # the first step: set-up


def report(name: str, rows: list) -> str:
    times = [t for t, _ in rows]
    med = statistics.median(times)
    slow = [f for t, f in rows if t > 1.25 * med]
    rest = [f for t, f in rows if t <= 1.25 * med]
    return (f"  {name:30s} step ms: median {1e3 * med:.1f}, p90 {1e3 * sorted(times)[int(0.9 * (len(times) - 1))]:.1f}, "
            f"max {1e3 * max(times):.1f}; {len(slow)} of {len(rows)} steps > 1.25x median "
            f"({sum(t > 1.5 * med for t in times)} > 1.5x); minor faults per step: "
            f"{statistics.mean(slow) if slow else 0:,.0f} in those, {statistics.mean(rest):,.0f} in the others; "
            f"{sum(f for _, f in rows):,} in all")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="toy64", choices=("toy64", "big"))
    p.add_argument("--steps", type=int, default=488)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.shape, args.steps)
    print(f"TopK steps, shape {args.shape}, {args.steps} steps per run, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}; load average {os.getloadavg()[0]:.2f} at start")
    for rep in range(2):
        for name, env in (("glibc's defaults", {}), ("malloc keeps freed memory", KEEP)):
            out = subprocess.run([sys.executable, __file__, "--child", "--shape", args.shape, "--steps", str(args.steps)],
                                 env={**os.environ, **env}, capture_output=True, text=True, check=True).stdout
            print(report(name, json.loads(out)["rows"]))
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
