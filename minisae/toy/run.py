"""The main job, `python -m minisae toy`: every SAE variant on synthetic data whose
features we know, plus the toy-model-of-superposition figures.

Scope, honestly: one synthetic dataset (toy_models/sparse_features.py defaults: 512
features in 256 dimensions, about 5 active per sample; --features/--dim change the
first two, e.g. 512 in 64, 8x overcomplete), one training budget per run, one seed.
Every variant sees the same data stream and the same number of samples. Coefficients
are stated for inputs scaled to E||x|| = sqrt(D), as for language models. The settings
below were tuned by hand on the default dataset (see docs/03_variants.md); they are not
a claim about the best settings elsewhere.

Writes into --out (`python -m minisae toy --out figures` regenerates the committed ones):
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
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from functools import lru_cache
from pathlib import Path

import torch

from minisae import metrics, plots
from minisae.configs import ToyConfig, TrainConfig
from minisae.multi_train import multi_train
from minisae.sae import make_sae, revives_dead
from minisae.train import sample_stream, train
from minisae.utils import atomic_write_text
from toy_models.sparse_features import SparseFeatures, SparseFeaturesConfig
from toy_models.superposition import make_figures

VARIANTS = ("relu", "gated", "topk", "jumprelu", "batchtopk")

# The main run's settings per variant, and the knob the frontier sweep turns. Penalties
# and thresholds are stated in the units of inputs scaled to E||x|| = sqrt(D), the
# language-model pipeline's units (`make_data`); `in_data_units` converts them for the
# data at hand (on the default data, scale 13.1, ReLU's 0.5 is an L1 coefficient of
# 0.038 on the raw inputs). Tuned by hand on the default data, 500k samples.
# dead_after (samples) matters for the rare features: the rarest fires ~3 times in
# 10,000 samples, so a latent that learned it is silent for a few thousand samples.
SETTINGS = {
    "relu": dict(sparsity_coef=0.5),
    "gated": dict(sparsity_coef=2.5),
    "topk": dict(k=6, dead_after=50_000),
    "jumprelu": dict(sparsity_coef=3.5, bandwidth=0.65, theta_init=0.3),
    "batchtopk": dict(k=5, dead_after=50_000),  # k: an average over the batch; 5 = the data's mean L0
}
SWEEP = {
    "relu": ("sparsity_coef", [0.25, 1.0, 4.0]),
    "gated": ("sparsity_coef", [0.65, 2.5, 10.0]),
    "topk": ("k", [3, 6, 12]),
    "jumprelu": ("sparsity_coef", [0.17, 1.7, 17.0]),
    "batchtopk": ("k", [3, 6, 12]),
}
# how each setting scales with the inputs (x -> s x): an L1 penalty on codes ~ s against a
# squared error ~ s^2 scales as s; JumpReLU's L0 penalty (a count) as s^2; thresholds as s
POWER = {("relu", "sparsity_coef"): 1, ("gated", "sparsity_coef"): 1, ("jumprelu", "sparsity_coef"): 2,
         ("jumprelu", "bandwidth"): 1, ("jumprelu", "theta_init"): 1}


def in_data_units(variant: str, settings: dict, scale: float) -> dict:
    """Settings stated for inputs at E||x|| = sqrt(D), for the raw data, whose inputs are
    that divided by `scale`: the same loss up to a constant factor, so the same optimum."""
    return {k: v / scale ** POWER[variant, k] if (variant, k) in POWER else v for k, v in settings.items()}


@lru_cache(maxsize=4)
def make_data(n_features: int, dim: int, seed: int):
    """The synthetic dataset and the scale s that would bring its inputs to E||x|| = sqrt(D).

    minisae/pipeline/activations.py scales language-model activations that way (Anthropic, April
    2024 update) so that one coefficient means the same at every layer and model. Here the
    SAEs train on the raw inputs (at scale ~1, where lr 1e-2 and ~500 steps were tuned)
    and the settings are converted instead (`in_data_units`): the same rule. With it the
    L1 coefficient follows the interference between features, ~ ||x|| / sqrt(D): twice
    as strong in 64 dimensions as in 256 for the same features."""
    data = SparseFeatures(SparseFeaturesConfig(n_features=n_features, d=dim, seed=seed))
    x = data.sample(16_384, torch.Generator().manual_seed(seed + 4))[0]  # (N, D)
    return data, math.sqrt(dim) / x.norm(dim=-1).mean().item()


# The SAEs' weights are drawn from a seed apart from the data's. `make_sae` draws W_dec
# as `unit_vectors(F, D)` from its seed, and SparseFeatures draws its true dictionary the
# same way from its own: with one seed for both, every SAE would start at the truth
# (MMCS 1.0 before the first step) and the job would measure keeping features, not finding them.
INIT_SEED = 100


def make_variant(variant, settings, data, scale: float, cfg: ToyConfig, n_samples: int):
    """An SAE and its TrainConfig; settings in the units of inputs at E||x|| = sqrt(D),
    scale: the data's (`make_data`)."""
    sae = make_sae(variant, data.cfg.d, cfg.n_latents, seed=cfg.seed + INIT_SEED,
                   **in_data_units(variant, settings, scale))
    init = torch.Generator().manual_seed(cfg.seed + 1)
    sae.init_b_dec_(data.sample(4096, init)[0])
    tcfg = TrainConfig(n_samples=n_samples, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed,
                       resample_every=0 if revives_dead(variant) else cfg.resample_every,  # AuxK instead
                       resample_dead_after=50_000, log_every=200)
    return sae, tcfg


def data_stream(data, cfg: ToyConfig):
    """The same data stream (seed) for every variant."""
    return sample_stream(data, cfg.batch_size, seed=cfg.seed + 2)


def train_variant(variant, settings, data, scale: float, cfg: ToyConfig, n_samples: int, log=True):
    """One SAE trained alone; settings as for `make_variant`."""
    sae, tcfg = make_variant(variant, settings, data, scale, cfg, n_samples)
    return sae, train(sae, data_stream(data, cfg), tcfg, log=log)


@lru_cache(maxsize=4)
def held_out(data, n: int, seed: int) -> list:
    """The evaluation batches, the same for every SAE (made once per process)."""
    gen = torch.Generator().manual_seed(seed)
    return [data.sample(4096, gen)[0] for _ in range(n // 4096)]


@torch.no_grad()
def ground_truth_metrics(sae, data, cfg: ToyConfig) -> dict:
    ev = metrics.evaluate_sae(sae, held_out(data, cfg.eval_samples, cfg.seed + 3))
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


def run_group(cfg: ToyConfig, jobs) -> list:
    """Several SAEs, jobs [(variant, settings, n_samples, main)], trained in one pass over
    the data stream (minisae/multi_train.py: each equals the SAE trained alone), then each
    evaluated; for a main run also the figures' data. Runs in a worker."""
    data, scale = make_data(cfg.n_features, cfg.dim, cfg.seed)
    saes, tcfgs = zip(*[make_variant(v, settings, data, scale, cfg, n) for v, settings, n, _ in jobs])
    outs = multi_train(list(saes), data_stream(data, cfg), list(tcfgs), log=False)
    done = []
    for sae, out, (variant, settings, _, main) in zip(saes, outs, jobs):
        row = ground_truth_metrics(sae, data, cfg)
        row.update(train_samples=out["train_samples"], train_seconds=out["train_seconds"],
                   settings_in_data_units=in_data_units(variant, settings, scale))
        extras = {"magnitudes": magnitudes(sae, data),
                  "best_cos": metrics.max_cosines(data.ground_truth, sae.W_dec.detach()).tolist()} if main else None
        done.append({"row": row, "extras": extras})
    return done


def passes(jobs, variants) -> list:
    """Which jobs train together: one pass per variant, its main run and its sweep on one
    stream (the sweep's shorter runs read its first batches), five passes for the pool to
    share out. As indices into jobs."""
    return [[i for i, job in enumerate(jobs) if job[0] == v] for v in variants]


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


def run(out_dir: Path, seed: int = 0, quick: bool = False, variants=VARIANTS, superposition=True,
        n_features: int = None, dim: int = None) -> dict:
    """The whole job. The SAEs (and the superposition figures) are independent, so they
    are trained side by side in `cfg.workers` processes of one thread each: on small
    matrices that beats one process with several threads, which mostly wait for each
    other. Each variant's SAEs (its main run and its frontier runs) read the same data
    stream, so they train in one pass over it (`run_group`), which makes each batch once
    instead of four times. Each SAE is seeded on its own and ends exactly as if trained
    alone, so the results depend neither on the order nor on the grouping."""
    cfg = ToyConfig.quick() if quick else ToyConfig()
    cfg.seed = seed
    if n_features:
        cfg.n_features = cfg.n_latents = n_features  # one latent per ground-truth feature
    cfg.dim = dim or cfg.dim
    if cfg.n_features <= 0 or cfg.dim <= 0:
        raise ValueError(f"--features and --dim must be positive, got {cfg.n_features}, {cfg.dim}")
    out_dir.mkdir(parents=True, exist_ok=True)
    data, scale = make_data(cfg.n_features, cfg.dim, seed)  # checks the data settings here, not in a worker
    t_start = time.time()
    results = {"config": dataclasses.asdict(cfg), "data": dataclasses.asdict(data.cfg), "input_scale": scale,
               "variants": {}, "sweep": []}
    jobs = [(v, SETTINGS[v], cfg.n_samples, True) for v in variants]  # main runs first: the longest
    jobs += [(v, {**SETTINGS[v], SWEEP[v][0]: val}, cfg.sweep_samples, False) for v in variants for val in SWEEP[v][1]]
    workers = cfg.workers or os.cpu_count() or 1
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=torch.set_num_threads, initargs=(1,)) as pool:
        if superposition:
            print("toy model of superposition: figures (in a worker)", file=sys.stderr)
            figures = pool.submit(make_figures, out_dir, seed=seed, quick=quick)
        groups = passes(jobs, variants)
        futures = [pool.submit(run_group, cfg, [jobs[i] for i in group]) for group in groups]
        extras, done_of = {}, {}  # extras per variant: data for the figures that is too long for the JSON
        for group, future in zip(groups, futures):
            done_of.update(zip(group, future.result()))
        for i, (v, settings, n, main) in enumerate(jobs):
            done = done_of[i]
            row = done["row"]
            if main:
                row.update(settings=settings, n_latents=cfg.n_latents, batch_size=cfg.batch_size, lr=cfg.lr)
                results["variants"][v] = row
                extras[v] = done["extras"]
                print(f"  {v} {settings}: " + ", ".join(f"{k} {row[k]:.4g}" for k in (
                    "l0", "fvu", "mmcs", "recovered_frac", "shrinkage_gamma", "train_seconds")), file=sys.stderr)
            else:
                knob = SWEEP[v][0]
                results["sweep"].append({"variant": v, knob: settings[knob], **row})
                print(f"  sweep {v} {knob}={settings[knob]}: l0 {row['l0']:.2f} fvu {row['fvu']:.4f}", file=sys.stderr)
        if superposition:
            results["superposition"] = figures.result()
    results["matched_l0_vs_relu"] = matched_l0(results["sweep"]) if "relu" in variants else []
    results["total_seconds"] = time.time() - t_start
    atomic_write_text(out_dir / "toy_results.json", json.dumps(results, indent=1))
    plots.toy_figures(results, extras, data.probs.tolist(), out_dir)
    print(f"wrote {out_dir / 'toy_results.json'} and figures in {results['total_seconds']:.0f}s", file=sys.stderr)
    return results
