"""Chapter 1's loop, closed: an SAE trained on the hidden activations of a toy model of
superposition finds the toy model's feature directions again.

    toy model (chapter 1):  h = W x,  W: (D, G), G = 20 features in D = 5 dimensions, 1-S = 0.01
    SAE (chapters 2-3):     f = TopK(W_enc (h - b_dec) + b_enc),  h_hat = W_dec^T f + b_dec
    score:                  MMCS = mean over the stored features i of max_j cos(W_i, W_dec[j])

The true dictionary is known: the columns W_i of the toy model. Only the features the toy
model stores (||W_i|| > 0.5) are scored; a dropped feature has no direction to find. With
1-S = 0.01 almost every h holds at most one feature, so an SAE that may use one latent per
input (TopK, k = 1) and has as many latents as there are features (an expansion of G / D = 4)
is enough.

    python -m minisae.toy.superposition_sae            # ~40 s on a quiet 2-core CPU

Scope: one seed, one sparsity, one SAE; the point is that the pieces fit, not a study.
"""

import argparse
import sys
import time

import torch

from minisae.metrics import max_cosines
from minisae.sae import make_sae
from minisae.train import TrainConfig, train
from toy_models.superposition import SuperpositionConfig, feature_norms, hidden_activations
from toy_models.superposition import train as train_toy


def batches(h: torch.Tensor, batch_size: int, seed: int):
    """Endless shuffled batches (B, D) of the rows of h, a new order every pass."""
    g = torch.Generator().manual_seed(seed)
    while True:
        for idx in torch.randperm(len(h), generator=g).split(batch_size):
            if len(idx) == batch_size:
                yield h[idx]


def run(seed: int = 0, n_features: int = 20, n_hidden: int = 5, feature_prob: float = 0.01, k: int = 1,
        n_latents: int = 20, n_samples: int = 200_000, train_samples: int = 2_000_000, toy_steps: int = 2000,
        log: bool = True) -> dict:

    t0 = time.perf_counter()
    # 1. the toy model of chapter 1, one instance, uniform importance
    W, _ = train_toy(SuperpositionConfig(n_features=n_features, n_hidden=n_hidden, sparsities=(1 - feature_prob,),
                                         importance_decay=1.0, seed=seed, steps=toy_steps))
    W = W[0]  # (D, G)
    kept = feature_norms(W) > 0.5  # (G,) the features the toy model stores
    t_toy = time.perf_counter() - t0
    # 2. its hidden activations, and the true dictionary (unit columns of W)
    h, truth = hidden_activations(W, n_samples, feature_prob, torch.Generator().manual_seed(seed + 1))  # (N, D), (G, D)
    # 3. an SAE on h
    sae = make_sae("topk", n_hidden, n_latents, seed=seed, k=k)
    sae.init_b_dec_(h[:8192])
    train(sae, batches(h, 1024, seed), TrainConfig(n_samples=train_samples, batch_size=1024, lr=3e-3, seed=seed),
          log=log)
    best = max_cosines(truth[kept], sae.W_dec.detach())  # (G_kept,)
    out = {"features_stored": int(kept.sum()), "n_features": n_features, "n_hidden": n_hidden,
           "expansion": n_latents / n_hidden, "k": k, "mmcs": best.mean().item(),
           "min_cos": best.min().item(), "recovered_0.9": int((best > 0.9).sum()),
           "toy_seconds": t_toy, "total_seconds": time.perf_counter() - t0}
    return out


def main():
    p = argparse.ArgumentParser(description="An SAE on the hidden activations of a toy model of superposition")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--k", type=int, default=1, help="latents per input (TopK)")
    p.add_argument("--latents", type=int, default=20, help="SAE latents (expansion = latents / 5)")
    args = p.parse_args()
    r = run(seed=args.seed, k=args.k, n_latents=args.latents)
    print(f"toy model: {r['features_stored']} of {r['n_features']} features stored in {r['n_hidden']} dimensions "
          f"({r['toy_seconds']:.0f} s); TopK SAE, k = {r['k']}, {args.latents} latents (expansion "
          f"{r['expansion']:g}): MMCS {r['mmcs']:.3f} over the stored features, worst {r['min_cos']:.3f}, "
          f"{r['recovered_0.9']} of {r['features_stored']} above cosine 0.9 ({r['total_seconds']:.0f} s)",
          file=sys.stdout)


if __name__ == "__main__":
    main()
