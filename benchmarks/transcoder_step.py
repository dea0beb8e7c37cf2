"""A transcoder's training step: the fast path against the dense reference, in one run.

Scope: CPU, one thread (CPU time of this process). A TopK transcoder (x -> target, two
different sites) at SmolLM2's width by default (D = 576, F = 2304, k = 32, batch 1024):
`Trainer.step` on (x, target) pairs as `train` feeds them, with the loss the trainer
chooses (minisae/sparse_decode.py's sparse path, the target passed on) against the same
step with the reference `SAE.loss` (what a transcoder's step took before the fast paths
read a target). Both sides alternate, --repeats times; each reports its fastest mean over
--steps steps after 3 warm-up steps.

    OMP_NUM_THREADS=1 python benchmarks/transcoder_step.py [--d 576] [--latents 2304] [--k 32] [--batch 1024]
"""

import argparse
import time
from functools import partial

import torch

from minisae.sae import make_sae
from minisae.sparse_decode import reference_loss
from minisae.train import TrainConfig, Trainer


def step_ms(path, pairs, args) -> float:
    sae = make_sae("topk", args.d, args.latents, k=args.k, seed=0)
    trainer = Trainer(sae, TrainConfig(n_samples=(args.steps + 3) * args.batch, batch_size=args.batch, lr=1e-3,
                                       resample_every=0), log=False)
    if path == "reference":
        trainer.loss_fn = partial(reference_loss, sae)
    for i in range(3):
        trainer.step(pairs[i % len(pairs)])
    t = time.process_time()
    for i in range(args.steps):
        trainer.step(pairs[i % len(pairs)])
    return (time.process_time() - t) / args.steps * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--d", type=int, default=576)
    ap.add_argument("--latents", type=int, default=2304)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    pairs = [(torch.randn(args.batch, args.d, generator=g), torch.randn(args.batch, args.d, generator=g))
             for _ in range(8)]
    print(f"TopK transcoder step, D={args.d} F={args.latents} k={args.k} batch {args.batch}, "
          f"{torch.get_num_threads()} thread(s), CPU ms per step (fastest mean of {args.steps} steps, "
          f"{args.repeats} alternating calls per side)")
    times = {"reference": [], "fast": []}
    for _ in range(args.repeats):
        for path in times:
            times[path].append(step_ms(path, pairs, args))
    for path, ts in times.items():
        print(f"  {path:10s} {min(ts):7.1f} ms   (calls: {', '.join(f'{t:.1f}' for t in ts)})")
    print(f"  fast path / reference: {min(times['reference']) / min(times['fast']):.2f}x faster")


if __name__ == "__main__":
    main()
