"""Per-SAE training time of the chapter-5 sweep, this checkout against another one.

Scope: the training loop only (minisae.train.train, as `lm` calls it: batch 1,024, lr 1e-3,
bf16 autocast, resampling every 2M tokens for the penalty variants), one SAE per variant
at its middle sweep value (relu 1.5, gated 2, jumprelu 1, topk and batchtopk k=48), 4x
expansion, on stored SmolLM2 layer-15 activations (an `acts-*.npy` that `lm` wrote; any
(N, D) float32 .npy works), cycled in shuffled batches. Real activations matter: a
trained ReLU SAE is sparse, random Gaussian inputs keep half its code on.

Each SAE trains in its own process on one thread; the time is that process's CPU time
(time.process_time), which other jobs on a shared machine inflate far less than wall
time. Old and new run one after the other per variant, so both see the same machine.

    python benchmarks/sweep_sae.py ACTS.npy --other /path/to/old/checkout [--tokens 1000000]

(`git worktree add /tmp/old COMMIT` makes the other checkout.)
"""

import argparse
import json
import os
import subprocess
import sys

SETTINGS = {"relu": {"sparsity_coef": 1.5}, "gated": {"sparsity_coef": 2.0}, "jumprelu": {"sparsity_coef": 1.0,
            "bandwidth": 0.05, "theta_init": 0.1}, "topk": {"k": 48, "dead_after": 500_000},
            "batchtopk": {"k": 48, "dead_after": 500_000}}

CHILD = r"""
import json, sys, time
import numpy as np, torch
torch.set_num_threads(1)
from minisae.sae import make_sae
from minisae.train import TrainConfig, train
path, variant, settings, tokens = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
acts = torch.from_numpy(np.load(path, mmap_mode="r")[:]).float()  # (N, D), in memory
N, D = acts.shape
B = 1024

def batches():
    g = torch.Generator().manual_seed(0)
    while True:
        for idx in torch.randperm(N, generator=g)[: N // B * B].view(-1, B):
            yield acts[idx]

sae = make_sae(variant, D, 4 * D, seed=0, **settings)
cfg = TrainConfig(n_samples=tokens, batch_size=B, lr=1e-3, seed=0, bf16=True, resample_dead_after=1_000_000, log_every=50,
                  resample_every=0 if variant in ("topk", "batchtopk") else 2_000_000 // B)
t0 = time.process_time()
out = train(sae, batches(), cfg, log=False)
print(json.dumps({"cpu_s": time.process_time() - t0, "l0": out["history"][-1].get("l0")}))
"""


def run(checkout, path, variant, tokens):
    env = {**os.environ, "PYTHONPATH": checkout, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", CHILD, path, variant, json.dumps(SETTINGS[variant]), str(tokens)],
                         env=env, capture_output=True, text=True, cwd=checkout)
    if out.returncode:
        raise SystemExit(f"{checkout}: {variant} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("acts", help="an (N, D) float32 .npy of stored activations")
    p.add_argument("--other", required=True, help="the checkout to compare with (e.g. a git worktree)")
    p.add_argument("--tokens", type=int, default=1_000_000)
    p.add_argument("--variants", default=",".join(SETTINGS))
    args = p.parse_args()
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    print(f"per-SAE training on {args.acts}, {args.tokens:,} tokens, batch 1024, bf16, one thread (CPU seconds)")
    print("| variant | setting | other checkout | this checkout | speed-up | L0 (other / this) |")
    print("|---|---|---|---|---|---|")
    for v in args.variants.split(","):
        old, new = run(os.path.abspath(args.other), args.acts, v, args.tokens), run(here, args.acts, v, args.tokens)
        setting = ", ".join(f"{k} {x}" for k, x in SETTINGS[v].items() if k in ("k", "sparsity_coef"))
        l0s = " / ".join("-" if r["l0"] is None else f"{r['l0']:.1f}" for r in (old, new))
        print(f"| {v} | {setting} | {old['cpu_s']:.1f} s | {new['cpu_s']:.1f} s | {old['cpu_s'] / new['cpu_s']:.2f}x | {l0s} |",
              flush=True)


if __name__ == "__main__":
    main()
