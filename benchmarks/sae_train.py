"""SAE training throughput (samples/s = tokens/s) of minisae.train.train, per variant.

Scope: CPU, the real training loop (minisae.train.train: forward, loss, backward, decoder
gradient projection, Adam step, decoder renormalisation, dead-latent counting; no
resampling), at d = 576 (SmolLM2-135M's width) with 8x and 16x expansion, batch 4096, in
fp32 and in bfloat16 autocast (TrainConfig(bf16=True): forward and loss in bf16, weights
and Adam in fp32). Each variant uses the middle setting of `python -m minisae lm`'s sweep
(e.g. TopK k=48). The data are random Gaussian batches already in memory, so neither
reading activations from disk nor the data's sparsity is measured (every variant's
encoder and decoder are dense matrix multiplies here, whatever L0 is). Median step time
over --steps steps after --warmup steps; on a shared machine single timings vary by up to
2x, so compare ratios from one run, not across runs. No comparison with other libraries.

    python benchmarks/sae_train.py [--variants relu,topk] [--expansions 8,16] [--steps 5]
    OMP_NUM_THREADS=1 python benchmarks/sae_train.py ...   (one thread, on a busy machine)
"""

import argparse
import itertools
import statistics

import torch

from minisae.lm import BASE, SWEEPS
from minisae.sae import make_sae
from minisae.train import TrainConfig, train


def samples_per_second(variant, d, n_latents, batch, steps, warmup, bf16, seed=0) -> float:
    knob, values = SWEEPS[variant]
    sae = make_sae(variant, d, n_latents, seed=seed, **{**BASE[variant], knob: values[1]})
    g = torch.Generator().manual_seed(seed)
    pool = [torch.randn(batch, d, generator=g) for _ in range(4)]  # (B, D) each, cycled
    cfg = TrainConfig(n_samples=(warmup + steps) * batch, batch_size=batch, lr=4e-4, bf16=bf16,
                      resample_every=0, log_every=1, seed=seed)
    history = train(sae, itertools.cycle(pool), cfg, log=False)["history"]  # one row per step
    ends = [0.0] + [row["seconds"] for row in history]
    step_times = [b - a for a, b in zip(ends, ends[1:])][warmup:]
    return batch / statistics.median(step_times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default=",".join(SWEEPS), help="comma-separated")
    parser.add_argument("--d", type=int, default=576)
    parser.add_argument("--expansions", default="8,16", help="comma-separated: latents = expansion x d")
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    variants = args.variants.split(",")
    bad = [v for v in variants if v not in SWEEPS]
    if bad:
        raise ValueError(f"unknown variant(s) {bad}; valid: {', '.join(SWEEPS)}")
    if args.steps < 1 or args.warmup < 0:
        raise ValueError("--steps must be >= 1 and --warmup >= 0")

    print(f"SAE training, d={args.d}, batch {args.batch}, median of {args.steps} steps after {args.warmup}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'variant':<10} {'setting':<18} {'F':>6} {'fp32 samples/s':>15} {'bf16 samples/s':>15} {'bf16/fp32':>9}")
    for expansion in map(int, args.expansions.split(",")):
        for v in variants:
            F = expansion * args.d
            fp32, bf16 = (samples_per_second(v, args.d, F, args.batch, args.steps, args.warmup, b) for b in (False, True))
            knob, values = SWEEPS[v]
            print(f"{v:<10} {f'{knob}={values[1]}':<18} {F:>6} {fp32:>15,.0f} {bf16:>15,.0f} {bf16 / fp32:>9.2f}",
                  flush=True)


if __name__ == "__main__":
    main()
