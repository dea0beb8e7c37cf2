"""The main job, `python -m minisae toy`: every SAE variant on synthetic data whose
features we know, plus the toy-model-of-superposition figures.

Scope, honestly: one synthetic dataset (toy_models/sparse_features.py defaults: 512
features in 256 dimensions, about 5 active per sample), one training budget per run, one
seed. Every variant sees the same data stream and the same number of samples. The
settings below were tuned by hand on this dataset (see docs/03_variants.md); they are
not a claim about the best settings elsewhere.

Writes into --out (default figures/):
    toy_results.json            one entry per variant (relu, gated, topk, jumprelu,
                                batchtopk) with l0, fvu, mmcs, recovered_frac, dead_frac,
                                shrinkage_gamma, mmcs_by_frequency_quartile,
                                train_samples, train_seconds and the settings used;
                                plus "sweep": the frontier runs
    toy_frontier.png            L0 vs FVU from a small sparsity sweep per variant
    toy_recovery.png            MMCS and recovered fraction per variant
    toy_recovery_by_frequency.png  best cosine per ground-truth feature vs its frequency
    toy_shrinkage.png           gamma per variant; true vs recovered feature magnitudes
    superposition_*.png         the toy model of superposition (chapter 1)
"""

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from minisae import metrics
from minisae.sae import make_sae
from minisae.train import TrainConfig, sample_stream, train
from toy_models.sparse_features import SparseFeatures, SparseFeaturesConfig

VARIANTS = ("relu", "gated", "topk", "jumprelu", "batchtopk")

# The main run's settings per variant, and the knob the frontier sweep turns.
# dead_after (samples) matters for the rare features: the rarest fires ~3 times in
# 10,000 samples, so a latent that learned it is silent for a few thousand samples.
SETTINGS = {
    "relu": dict(sparsity_coef=2e-2),
    "gated": dict(sparsity_coef=2e-1),
    "topk": dict(k=6, dead_after=50_000),
    "jumprelu": dict(sparsity_coef=2e-2, bandwidth=0.05, theta_init=0.05),
    "batchtopk": dict(k=6, dead_after=50_000),
}
SWEEP = {
    "relu": ("sparsity_coef", [2e-2, 8e-2, 3.2e-1]),
    "gated": ("sparsity_coef", [5e-2, 2e-1, 8e-1]),
    "topk": ("k", [3, 6, 12]),
    "jumprelu": ("sparsity_coef", [1e-3, 1e-2, 1e-1]),
    "batchtopk": ("k", [3, 6, 12]),
}


@dataclass
class ToyConfig:
    n_latents: int = 512  # F = G: one latent per ground-truth feature, no room for duplicates
    batch_size: int = 1024
    lr: float = 1e-2
    n_samples: int = 500_000  # per main run
    sweep_samples: int = 150_000  # per frontier run
    resample_every: int = 250  # steps; for the penalty-based variants (relu, gated, jumprelu)
    eval_samples: int = 32_768
    seed: int = 0

    @classmethod
    def quick(cls):
        return cls(n_samples=60_000, sweep_samples=20_000, eval_samples=8192)


def train_variant(variant, settings, data, cfg: ToyConfig, n_samples: int, log=True):
    sae = make_sae(variant, data.cfg.d, cfg.n_latents, seed=cfg.seed, **settings)
    init = torch.Generator().manual_seed(cfg.seed + 1)
    sae.init_b_dec_(data.sample(4096, init)[0])
    uses_auxk = variant in ("topk", "batchtopk")  # these revive dead latents with AuxK instead
    tcfg = TrainConfig(n_samples=n_samples, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed,
                       resample_every=0 if uses_auxk else cfg.resample_every, dead_after=50_000, log_every=200)
    # the same data stream (seed) for every variant
    out = train(sae, sample_stream(data, cfg.batch_size, seed=cfg.seed + 2), tcfg, log=log)
    return sae, out


@torch.no_grad()
def ground_truth_metrics(sae, data, cfg: ToyConfig) -> dict:
    gen = torch.Generator().manual_seed(cfg.seed + 3)  # held-out samples, the same for all
    xs = [data.sample(4096, gen)[0] for _ in range(cfg.eval_samples // 4096)]
    ev = metrics.evaluate_sae(sae, xs)
    W, gt = sae.W_dec.detach(), data.ground_truth
    return {"l0": ev["l0"], "fvu": ev["fvu"], "mmcs": metrics.mmcs(gt, W),
            "recovered_frac": metrics.recovered_frac(gt, W), "dead_frac": ev["dead_frac"],
            "shrinkage_gamma": ev["shrinkage_gamma"],
            "mmcs_by_frequency_quartile": metrics.mmcs_by_frequency_quartile(gt, W, data.probs)}


@torch.no_grad()
def magnitudes(sae, data, n: int = 4096, seed: int = 7):
    """Pairs (true c_i, code of the latent best matching feature i) over active features,
    for the shrinkage scatter."""
    x, c = data.sample(n, torch.Generator().manual_seed(seed))  # (n, D), (n, G)
    f = sae.encode(x)  # (n, F)
    best = metrics.cosine_matrix(data.ground_truth, sae.W_dec).argmax(1)  # (G,)
    f_matched = f[:, best]  # (n, G)
    on = c > 0
    return c[on].tolist(), f_matched[on].tolist()


def matched_l0(sweep) -> list:
    """For every sweep point of a non-ReLU variant, the ReLU SAE's FVU at the same L0,
    interpolated linearly in (log L0, log FVU) between the ReLU sweep points around it
    (None outside the ReLU sweep's L0 range)."""
    relu = sorted((r["l0"], r["fvu"]) for r in sweep if r["variant"] == "relu")
    out = []
    for r in sweep:
        if r["variant"] == "relu":
            continue
        fvu_relu = None
        for (l0a, fa), (l0b, fb) in zip(relu, relu[1:]):
            if l0a <= r["l0"] <= l0b:
                t = (math.log(r["l0"]) - math.log(l0a)) / (math.log(l0b) - math.log(l0a))
                fvu_relu = math.exp((1 - t) * math.log(fa) + t * math.log(fb))
        out.append({"variant": r["variant"], "l0": r["l0"], "fvu": r["fvu"], "relu_fvu_at_l0": fvu_relu,
                    "shrinkage_gamma": r["shrinkage_gamma"]})
    return out


def run(out_dir: Path, seed: int = 0, quick: bool = False, variants=VARIANTS, superposition=True) -> dict:
    torch.manual_seed(seed)
    cfg = ToyConfig.quick() if quick else ToyConfig()
    cfg.seed = seed
    out_dir.mkdir(parents=True, exist_ok=True)
    data = SparseFeatures(SparseFeaturesConfig(seed=seed))
    t_start = time.time()
    results = {"config": dataclasses.asdict(cfg), "data": dataclasses.asdict(data.cfg), "variants": {}, "sweep": []}
    if superposition:
        from toy_models.superposition import make_figures
        print("toy model of superposition: figures", file=sys.stderr)
        results["superposition"] = make_figures(out_dir, seed=seed, quick=quick)
    extras = {}  # per variant: data for the figures that is too long for the JSON
    for v in variants:
        print(f"{v}: main run, {cfg.n_samples:,} samples, {SETTINGS[v]}", file=sys.stderr)
        sae, out = train_variant(v, SETTINGS[v], data, cfg, cfg.n_samples)
        row = ground_truth_metrics(sae, data, cfg)
        row.update(train_samples=out["train_samples"], train_seconds=out["train_seconds"], settings=SETTINGS[v],
                   n_latents=cfg.n_latents, batch_size=cfg.batch_size, lr=cfg.lr)
        results["variants"][v] = row
        extras[v] = {"magnitudes": magnitudes(sae, data),
                     "best_cos": metrics.max_cosines(data.ground_truth, sae.W_dec.detach()).tolist()}
        print(f"  {v}: " + ", ".join(f"{k} {row[k]:.4g}" for k in ("l0", "fvu", "mmcs", "recovered_frac",
                                                                     "shrinkage_gamma", "train_seconds")), file=sys.stderr)
    for v in variants:
        knob, values = SWEEP[v]
        for val in values:
            settings = {**SETTINGS[v], knob: val}
            sae, out = train_variant(v, settings, data, cfg, cfg.sweep_samples, log=False)
            row = ground_truth_metrics(sae, data, cfg)
            results["sweep"].append({"variant": v, knob: val, **row, "train_samples": out["train_samples"]})
            print(f"  sweep {v} {knob}={val}: l0 {row['l0']:.2f} fvu {row['fvu']:.4f}", file=sys.stderr)
    results["matched_l0_vs_relu"] = matched_l0(results["sweep"]) if "relu" in variants else []
    results["total_seconds"] = time.time() - t_start
    with open(out_dir / "toy_results.json", "w") as fh:
        json.dump(results, fh, indent=1)
    from minisae import plots
    plots.toy_figures(results, extras, data.probs.tolist(), out_dir)
    print(f"wrote {out_dir / 'toy_results.json'} and figures in {results['total_seconds']:.0f}s", file=sys.stderr)
    return results
