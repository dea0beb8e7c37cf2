"""Matryoshka BatchTopK, minisae against SAELens's `matryoshka_batchtopk`, on chapter 10's
hierarchical data: scores against the truth and the speed of whole training calls, in one run.

Scope: CPU, 2 threads (torch.set_num_threads(2)), one small synthetic dataset (the
defaults of `python -m minisae absorption`: 16 parents x 4 children + 48 independent
features, G = 128 in D = 64, sizes |N(1, 0.1^2)|), F = 128 latents, k = 4, the doubling
ladder of prefixes 2, 4, ..., 128 on both sides, batch 1024, lr 1e-2, 585 steps
(599,040 samples: the 600,000 of chapter 10 rounded down to whole batches on both sides),
3 seeds. Not a claim about language-model SAEs, GPUs or other sizes.

The same samples: for each seed the batches are drawn once, as chapter 10 draws them
(`sample_stream(data, 1024, seed + 2)`), kept in memory, and the same list is fed to both
trainers; each trainer's iterator counts what it took (both take exactly 585 batches).
SAELens trains with its own trainer, `SAETrainer(...).fit()` (sae_lens/training/
sae_trainer.py: its training_forward_pass and loss, Adam, gradient clipping, lr scheduler,
dead-latent window), configured as its synthetic-data helper `train_toy_sae`
(sae_lens/synthetic/training.py) configures it, with our batches as its data provider
(that helper draws its own samples from its own generator, so it cannot take them).
minisae trains with `minisae.train.train`, as chapter 10 does (`absorption.train_one`).

Same settings where both libraries have the knob: k, the prefixes (SAELens's
matryoshka_widths), batch, lr with the same schedule (linear warmup over 5 steps, constant,
linear decay to 0 over the last 117 steps: SAELens's lr_warm_up_steps / lr_decay_steps
reproduce minisae's lr_at step for step), Adam betas (0.9, 0.999), AuxK coefficient 1/32
(SAELens's default is 1.0), k_aux = D/2, "dead" after 20 steps without firing (minisae
dead_after = 20,000 samples; SAELens dead_feature_window = 19 steps: dead when > 19),
threshold momentum 0.01 (SAELens topk_threshold_lr). Each library's own choices stay (the
differences, also in the JSON): SAELens initialises W_dec with kaiming-uniform rows of norm
0.1, W_enc = W_dec^T, b_dec = 0, keeps the decoder free and rescales codes by its row
norms (rescale_acts_by_decoder_norm, its default), clips the gradient norm to 1, scales
AuxK by min(n_dead / k_aux, 1), feeds AuxK the raw (not ReLU'd) pre-activations, and starts
its threshold at 0; minisae draws unit-norm rows, sets b_dec to the mean of 4096 samples,
keeps decoder rows unit norm (gradient projection + renormalisation) and lets the first
batch set the threshold. Neither prints progress (minisae log=False; SAELens's tqdm bar
off with TQDM_DISABLE=1).

Scores: both SAEs in their inference form (minisae: eval mode, the BatchTopK threshold;
SAELens: `save_inference_model` + `SAE.load_from_disk`, its JumpReLU with the threshold
folded by decoder norm), scored by the same code (`minisae.toy.absorption.evaluate`:
minisae/truth_metrics.py) on the same 16,384 evaluation samples: L0, FVU, MCC (codes,
Hungarian matching), F1 and absorption.

Speed: samples/s of a whole training call (what a user waits for: building the SAE and its
trainer, every step, to the trained SAE; not the scoring), each seed's call of each library,
alternating (minisae first for seeds 0 and 2, SAELens first for seed 1) after one untimed
20-step warm-up call each; the median of the 3 calls, wall time (timing.clock; with
--threads 1 the process's CPU time). The machine is shared: only the ratio within one run
means something.

    python benchmarks/absorption_saelens.py [--seeds 3] [--threads 2] [--out benchmarks/results/absorption_saelens.json]
"""

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # SAELens's progress bar off, as minisae's (log=False)

import timing
import torch

from minisae.configs import AbsorptionConfig
from minisae.sae import make_sae
from minisae.toy.absorption import INIT_SEED, SETTINGS, evaluate, make_data
from minisae.train import TrainConfig, sample_stream, train
from minisae.utils import atomic_write_text

VARIANT = "matryoshka_batchtopk"
THREADS = 2
DEFAULT_OUT = Path(__file__).parent / "results" / "absorption_saelens.json"
SCORES = ("l0", "fvu", "mcc", "f1", "absorption", "precision", "recall", "uniqueness", "mcc_decoder")
DIFFERENCES = [
    ("init: SAELens W_dec kaiming-uniform rows scaled to norm 0.1 (decoder_init_norm), W_enc = W_dec^T, "
     "b_enc = b_dec = 0; minisae unit-norm rows, W_enc = W_dec, b_dec = mean of 4096 samples"),
    ("decoder: SAELens free rows, codes rescaled by row norms (rescale_acts_by_decoder_norm=True); "
     "minisae unit-norm rows (gradient projection + renormalisation)"),
    "SAELens clips the gradient norm to 1.0; minisae does not clip",
    ("AuxK: SAELens scales it by min(n_dead / k_aux, 1) and decodes the raw top pre-activations of the "
     "dead latents; minisae unscaled, ReLU of them"),
    "BatchTopK threshold: SAELens starts at 0; minisae's first batch sets it",
    "Adam: minisae fused=True, SAELens the default implementation (same betas, eps, lr)",
]


class Counted:
    """An iterator over a list of batches that counts what it gave."""

    def __init__(self, batches):
        self.batches, self.taken = batches, 0

    def __iter__(self):
        return self

    def __next__(self):
        if self.taken == len(self.batches):
            raise StopIteration
        self.taken += 1
        return self.batches[self.taken - 1]


def train_config(cfg: AbsorptionConfig, n_steps: int, seed: int) -> TrainConfig:
    """minisae's, as absorption.train_one builds it (AuxK revives dead latents: no resampling)."""
    return TrainConfig(n_samples=n_steps * cfg.batch_size, batch_size=cfg.batch_size, lr=cfg.lr, seed=seed,
                       resample_every=0, resample_dead_after=20_000)


def lr_steps(tcfg: TrainConfig) -> tuple:
    """(warmup steps, decay steps) of minisae.train.lr_at, for SAELens's scheduler."""
    n_steps = tcfg.n_samples // tcfg.batch_size
    return max(1, int(tcfg.lr_warmup_frac * n_steps)), n_steps - int((1 - tcfg.lr_decay_frac) * n_steps)


def minisae_call(cfg, data, batches, seed):
    """Chapter 10's minisae training (absorption.train_one) on the given batches."""
    sae = make_sae(VARIANT, cfg.dim, cfg.n_latents, seed=seed, **SETTINGS[VARIANT])
    sae.init_b_dec_(data.sample(4096, torch.Generator().manual_seed(seed + 1))[0])
    train(sae, batches, train_config(cfg, len(batches.batches), seed), log=False)
    return sae


def saelens_sae(d: int, n_latents: int, k: int, prefixes, aux_coef: float, momentum: float, seed: int):
    """SAELens's MatryoshkaBatchTopKTrainingSAE, its weights drawn from torch's global generator
    seeded with `seed` (SAELens draws its init from it)."""
    from sae_lens import (
        MatryoshkaBatchTopKTrainingSAE,
        MatryoshkaBatchTopKTrainingSAEConfig,
    )
    torch.manual_seed(seed)
    return MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(
        d_in=d, d_sae=n_latents, k=k, matryoshka_widths=list(prefixes), aux_loss_coefficient=aux_coef,
        topk_threshold_lr=momentum))


def saelens_trainer(sae, batches, tcfg: TrainConfig, dead_after: int):
    """SAELens's SAETrainer configured as its train_toy_sae does, with minisae's schedule and
    dead-latent rule: dead after ceil(dead_after / batch) steps without firing."""
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer
    warm, decay = lr_steps(tcfg)
    dead_steps = -(-dead_after // tcfg.batch_size)  # minisae: dead when samples_since_fired >= dead_after
    trainer_cfg = SAETrainerConfig(
        n_checkpoints=0, checkpoint_path=None, save_final_checkpoint=False,
        total_training_samples=tcfg.n_samples, device="cpu", autocast=False, lr=tcfg.lr, lr_end=tcfg.lr,
        lr_scheduler_name="constant", lr_warm_up_steps=warm if warm > 1 else 0,  # lr_at: 1 step = none
        adam_beta1=0.9, adam_beta2=0.999,
        lr_decay_steps=decay, n_restart_cycles=1, train_batch_size_samples=tcfg.batch_size,
        dead_feature_window=dead_steps - 1,  # SAELens: dead when steps since fired > window
        feature_sampling_window=2000, logger=LoggingConfig(log_to_wandb=False, eval_every_n_wandb_logs=2**31 - 1),
        n_batches_for_norm_estimate=1000)
    return SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=batches)


def saelens_call(cfg, batches, seed):
    part = make_sae(VARIANT, cfg.dim, cfg.n_latents, **SETTINGS[VARIANT]).activation  # minisae's k, prefixes, AuxK
    sae = saelens_sae(cfg.dim, cfg.n_latents, part.k, part.prefixes, part.aux_coef, part.threshold_momentum, seed)
    saelens_trainer(sae, batches, train_config(cfg, len(batches.batches), seed), part.dead_after).fit()
    return sae


def saelens_inference(sae):
    """The SAE a SAELens user loads after training: save_inference_model (a JumpReLU, the
    decoder norms folded into the encoder and threshold), then SAE.load_from_disk."""
    from sae_lens import SAE
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sae.save_inference_model(tmp)
        return SAE.load_from_disk(tmp).eval()


def scores(sae, data, x, c) -> dict:
    row = evaluate(sae, data, x, c)
    return {k: row[k] for k in SCORES}


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    cfg = AbsorptionConfig()
    B = cfg.batch_size
    n_steps = args.samples // B
    data, _, (x, c) = make_data(cfg, True)
    seeds = [cfg.seed + INIT_SEED + s for s in range(args.seeds)]
    calls = {"minisae": lambda b, s: minisae_call(cfg, data, b, s), "saelens": lambda b, s: saelens_call(cfg, b, s)}
    infer = {"minisae": lambda sae: sae.eval(), "saelens": saelens_inference}
    warm_stream = sample_stream(data, B, seed=0)
    warm = [next(warm_stream) for _ in range(20)]
    for name, call in calls.items():  # untimed: first calls load modules and allocate
        call(Counted(warm), seeds[0])
    out = {name: {"per_seed": [], "call_seconds": []} for name in calls}
    for i, seed in enumerate(seeds):
        stream = sample_stream(data, B, seed=seed + 2)  # chapter 10's stream for this seed
        batches = [next(stream) for _ in range(n_steps)]  # (B, D) each, the same list for both
        order = list(calls) if i % 2 == 0 else list(calls)[::-1]
        for name in order:
            fed = Counted(batches)
            start = timing.clock()
            sae = calls[name](fed, seed)
            seconds = timing.clock() - start
            assert fed.taken == n_steps, f"{name} took {fed.taken} of {n_steps} batches"
            row = {"seed": seed, **scores(infer[name](sae), data, x, c), "train_seconds": seconds}
            out[name]["per_seed"].append(row)
            out[name]["call_seconds"].append(seconds)
            print(f"  {name} seed {seed}: {n_steps * B / seconds:,.0f} samples/s, "
                  + ", ".join(f"{k} {row[k]:.3f}" for k in ("l0", "fvu", "mcc", "f1", "absorption")), file=sys.stderr)
    for name, side in out.items():
        side["mean"] = {k: statistics.mean(r[k] for r in side["per_seed"]) for k in SCORES}
        side["samples_per_s"] = n_steps * B / statistics.median(side["call_seconds"])
    import sae_lens
    part = make_sae(VARIANT, cfg.dim, cfg.n_latents, **SETTINGS[VARIANT]).activation
    warm_steps, decay_steps = lr_steps(train_config(cfg, n_steps, 0))
    return {
        "command": "python benchmarks/absorption_saelens.py" + (f" --seeds {args.seeds}" if args.seeds != 3 else "")
                   + (f" --samples {args.samples}" if args.samples != AbsorptionConfig.n_samples else "")
                   + (f" --threads {args.threads}" if args.threads != THREADS else "")
                   + (f" --out {args.out}" if args.out != DEFAULT_OUT else ""),
        "settings": {"data": dataclasses.asdict(data.cfg), "n_latents": cfg.n_latents, "k": part.k,
                     "prefixes": list(part.prefixes), "batch_size": B, "lr": cfg.lr, "steps": n_steps,
                     "samples": n_steps * B, "lr_warmup_steps": warm_steps, "lr_decay_steps": decay_steps,
                     "aux_coef": part.aux_coef, "k_aux": cfg.dim // 2, "dead_after_samples": part.dead_after,
                     "threshold_momentum": part.threshold_momentum, "seeds": seeds, "eval_samples": len(x),
                     "threads": args.threads, "timing": ("wall" if args.threads > 1 else "CPU (timing.clock, one thread)")
                     + " time of whole training calls, alternating, median of "
                                                   f"{len(seeds)}; one untimed 20-step warm-up call each",
                     "differences": DIFFERENCES},
        "commit": commit(),
        "versions": {"torch": torch.__version__, "sae_lens": sae_lens.__version__, "python": platform.python_version()},
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "loadavg_start": list(load_start), "loadavg_end": list(os.getloadavg()),
        "libraries": out,
        "ratio": out["minisae"]["samples_per_s"] / out["saelens"]["samples_per_s"],
    }


def commit() -> str:
    """This checkout's commit, and whether files differ from it (git, read only)."""
    git = lambda *a: subprocess.run(["git", *a], cwd=Path(__file__).parent, capture_output=True, text=True,
                                check=False).stdout
    head = git("rev-parse", "--short", "HEAD").strip() or "unknown"
    return head + (" + uncommitted changes" if git("status", "--porcelain", "--untracked-files=no").strip() else "")


def table(results: dict) -> str:
    rows = []
    for name, side in results["libraries"].items():
        m = side["mean"]
        seeds = " / ".join(f"{r['absorption']:.2f}" for r in side["per_seed"])
        ratio = side["samples_per_s"] / results["libraries"]["saelens"]["samples_per_s"]
        rows.append((name, f"{m['l0']:.2f}", f"{m['fvu']:.4f}", f"{m['mcc']:.3f}", f"{m['f1']:.3f}",
                     f"{m['absorption']:.3f}", seeds, f"{side['samples_per_s']:,.0f}", f"{ratio:.2f}x"))
    return timing.table(rows, ["library", "L0", "FVU", "MCC", "F1", "absorption", "absorption by seed",
                               "samples/s", "speed vs SAELens"])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--samples", type=int, default=AbsorptionConfig.n_samples, help="per call, rounded down to batches")
    p.add_argument("--threads", type=int, default=THREADS, help="torch threads (2: the comparison's setting)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args()
    results = run(args)
    atomic_write_text(args.out, json.dumps(results, indent=1) + "\n")
    print(table(results))
    print(f"wrote {args.out}; load average {results['loadavg_start'][0]:.2f} at start, "
          f"{results['loadavg_end'][0]:.2f} at the end", file=sys.stderr)


if __name__ == "__main__":
    main()
