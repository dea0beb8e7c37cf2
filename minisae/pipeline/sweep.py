"""A sparsity sweep on a language model: which settings each variant tries, and the one
step every SAE of `lm` and `layers` goes through.

    train_and_evaluate(cfg, model, acts, meta, heldout, base, variant, knob, value):
        SAE  = make_sae(variant, D, expansion x D, BASE[variant] + {knob: value})
        train it on the stored activations `acts` (as many passes as cfg.tokens needs)
        evaluate it spliced into the model at meta['hook'] on the held-out contexts
        save it as out/saes/NAME/, SAELens's layout (minisae/formats/__init__.py: scale folded in;
        hook, sinks, mean and the training config in cfg.json)
        -> one row of lm_results.json / layers_results.json
    train_in_one_pass(cfg, model, acts, meta, heldout, base, keys, names):
        the same for several SAEs, trained together in one pass over `acts` (`lm --one-pass`)

The SAE code does not know which model it is looking at: activations are scaled to
E||x|| = sqrt(D) (minisae.pipeline.activations), so one set of sweep values serves every model,
layer and site. The values were calibrated on SmolLM2's layer-15 residual stream
(docs/05_smollm2.md); they are a start, not tuned per layer.
"""

import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from minisae.metrics import density_histogram
from minisae.multi_train import multi_train
from minisae.pipeline import evaluate
from minisae.pipeline.batches import activation_batches
from minisae.pipeline.hooked_sae import HookedSAE
from minisae.sae import make_sae, revives_dead
from minisae.train import TrainConfig, train
from minisae.utils import model_device

# Sweep values per variant (activations scaled to E||x|| = sqrt(D)). Together they span
# L0 from about 13 to 215 on SmolLM2's layer 15 after 4M tokens (4x expansion, batch
# 1,024, lr 1e-3), each variant with points near L0 15-20, 35-50 and 130-215; L0 falls
# steeply with the L1 coefficient. docs/05_smollm2.md has the measured L0 of each value.
SWEEPS = {
    "relu": ("sparsity_coef", [0.5, 0.7, 1.0, 1.5, 2.0]),
    "gated": ("sparsity_coef", [1.0, 2.0, 4.0]),
    "topk": ("k", [16, 48, 128]),
    "jumprelu": ("sparsity_coef", [0.1, 0.2, 0.4, 1.0, 4.0]),
    "batchtopk": ("k", [16, 48, 128]),
    "matryoshka_batchtopk": ("k", [16, 48, 128]),  # its default ladder of prefixes (minisae/matryoshka.py)
}
# The one setting `layers` uses per variant unless --setting says otherwise: a middle
# point of the sweep (L0 about 20-50 on SmolLM2's layer 15).
LAYERS_SETTING = {"relu": 1.5, "gated": 2.0, "topk": 48, "jumprelu": 1.0, "batchtopk": 48, "matryoshka_batchtopk": 48}
# Settings shared by the sweep (per variant); dead_after in tokens, as in Gao et al.
BASE = {"relu": {}, "gated": {}, "topk": {"dead_after": 500_000}, "batchtopk": {"dead_after": 500_000},
        "matryoshka_batchtopk": {"dead_after": 500_000}, "jumprelu": {"bandwidth": 0.05, "theta_init": 0.1}}


def parse_sweep(specs) -> dict:
    """['topk:k=16,32', 'relu:sparsity_coef=1,2'] -> {'topk': ('k', [16, 32]), ...}."""
    out = {}
    for spec in specs or []:
        try:
            variant, rest = spec.split(":", 1)
            knob, values = rest.split("=", 1)
            vals = [int(v) if knob == "k" else float(v) for v in values.split(",")]
        except ValueError:
            raise ValueError(f"bad --sweep {spec!r}; expected VARIANT:KNOB=V1,V2,... e.g. topk:k=16,32,64") from None
        if variant not in SWEEPS:
            raise ValueError(f"bad --sweep {spec!r}: unknown variant {variant!r}; valid variants: {', '.join(SWEEPS)}")
        out[variant] = (knob, vals)
    return out


def train_and_evaluate(cfg, model, acts, meta, heldout, base, variant, knob, value, name, seed=None,
                       group=None):
    """Train one SAE on stored activations `acts` (sidecar `meta`) with the settings of
    `cfg` (minisae.configs.LMConfig), on the model's device, evaluate it spliced in at
    meta['hook'] on the held-out contexts (`base`: evaluate.baselines on them), save it
    as cfg.out/saes/{name}/ (SAELens's layout); return its row of lm_results.json. With a process group
    (torchrun) every rank trains its share of each batch and rank 0 alone evaluates,
    saves and returns the row (the others return None)."""

    seed = cfg.seed if seed is None else seed
    device = model_device(model)
    sae, tcfg = sae_and_config(cfg, acts, meta, variant, knob, value, seed, device)
    if group is None or group.main:
        print(f"{variant} {knob}={value}", file=sys.stderr)
    result = train(sae, activation_batches(acts, cfg.batch_size, seed, device, group), tcfg, group=group)
    if group is not None and not group.main:
        return None
    return evaluate_and_save(cfg, model, meta, heldout, base, sae, result, variant, knob, value, name)


def train_in_one_pass(cfg, model, acts, meta, heldout, base, keys, names, group=None) -> list:
    """The SAEs of `keys` [(variant, knob, value)] trained together in one pass over the
    activations (minisae/multi_train.py: each batch read once, each SAE ending as
    `train_and_evaluate` would train it alone), then each evaluated and saved as
    cfg.out/saes/{name}/; their rows (None on ranks other than 0 under torchrun)."""
    device = model_device(model)
    saes, tcfgs = zip(*[sae_and_config(cfg, acts, meta, *key, cfg.seed, device) for key in keys])
    if group is None or group.main:
        print(f"{len(keys)} SAEs in one pass: " + ", ".join(f"{v} {k}={x}" for v, k, x in keys), file=sys.stderr)
    results = multi_train(list(saes), activation_batches(acts, cfg.batch_size, cfg.seed, device, group),
                          list(tcfgs), group=group, stack=STACK[cfg.stack])
    if group is not None and not group.main:
        return [None] * len(keys)
    return [evaluate_and_save(cfg, model, meta, heldout, base, sae, result, *key, name)
            for sae, result, key, name in zip(saes, results, keys, names)]


STACK = {"auto": None, "on": True, "off": False}  # --stack as multi_train's stack=


def sae_and_config(cfg, acts, meta, variant, knob, value, seed, device):
    """A new SAE of the sweep (b_dec at the mean of the first activations) and its TrainConfig."""
    settings = {**BASE[variant], knob: value}
    sae = make_sae(variant, meta["d"], cfg.expansion * meta["d"], seed=seed, **settings).to(device)
    sae.init_b_dec_(torch.from_numpy(acts[:8192].copy()).to(device))
    batch_size = cfg.batch_size
    tcfg = TrainConfig(n_samples=cfg.tokens, batch_size=batch_size, lr=cfg.lr, seed=seed, bf16=cfg.bf16,
                       resample_every=0 if revives_dead(variant) else 2_000_000 // batch_size,
                       resample_dead_after=1_000_000, log_every=50, compile=cfg.compile)
    return sae, tcfg


def evaluate_and_save(cfg, model, meta, heldout, base, sae, result, variant, knob, value, name) -> dict:
    """Evaluate a trained SAE spliced into the model, save it; its row of lm_results.json."""
    hsae = HookedSAE(sae, meta["model"], meta["hook"], meta["scale"], meta["max_norm"], meta["mean"])
    t0 = time.perf_counter()
    ev = evaluate.evaluate_spliced(model, hsae, heldout, bf16=cfg.bf16, baselines=base, with_sinks=True)
    ev["eval_seconds"] = time.perf_counter() - t0
    counts, edges = density_histogram(ev.pop("log10_density"))
    hsae.extra = {"training": config_dict(cfg), "sweep": {"variant": variant, knob: value},
                  "corpus": meta.get("corpus"), "train_tokens": result["train_samples"]}
    hsae.save(Path(cfg.out) / "saes" / name)
    row = {"variant": variant, "knob": knob, "value": value, **ev,
           "train_tokens_asked": cfg.tokens, "train_tokens": result["train_samples"],
           "train_seconds": result["train_seconds"], "n_passes": result["train_samples"] / meta["n_tokens"],
           "n_latents": sae.n_latents, "density_hist": {"counts": counts, "edges": edges}, "sae": f"saes/{name}"}
    print(f"  -> L0 {row['l0']:.1f}  FVU {row['fvu']:.3f}  loss recovered mean {row['loss_recovered_mean']:.3f}"
          f" zero {row['loss_recovered_zero']:.3f}  ({row['train_seconds']:.0f}s)", file=sys.stderr)
    return row


# Fields of a run's config that do not change what one SAE of it is: where the run is
# written, and which other SAEs it trains.
NOT_PER_SAE = ("out", "variants", "sweep", "layers", "variant", "setting", "max_disk_gb", "keep_acts",
               "device", "distribute", "one_pass", "compile", "stack")  # compile, stack: the same SAE up to
#                                                                          the order of float additions


def same_sae_settings(cfg_a: dict, cfg_b: dict) -> bool:
    """Would an SAE trained under config a be the one config b trains? (Both as dicts.)"""
    strip = lambda c: {k: v for k, v in c.items() if k not in NOT_PER_SAE}
    return strip(cfg_a) == strip(cfg_b)


def config_dict(cfg) -> dict:
    """asdict(cfg) with paths and tuples as JSON writes them, so it compares equal to a
    config read back from a results file."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def check_sae_settings(sweeps: dict, cfg, d: int):
    """Build every SAE a sweep will train ({variant: (knob, values)}, width d) before any
    activation is collected, so a bad setting (an unknown knob, k larger than the
    dictionary, a negative coefficient) fails in a second, not after the activation pass."""
    for variant, (knob, values) in sweeps.items():
        for value in values:
            try:
                make_sae(variant, d, cfg.expansion * d, **{**BASE[variant], knob: value})
            except (ValueError, TypeError) as e:
                raise ValueError(f"--sweep {variant}:{knob}={value} cannot work with {cfg.expansion * d} latents "
                                 f"(--expansion {cfg.expansion} x d_model {d}): {e}") from None


def read_results(path):
    """The results file at `path` as a dict, or None if there is none. A damaged one (a
    run killed while writing it, before writes were atomic; a hand edit) is renamed to
    PATH.damaged and reported, never fatal: the run starts its table afresh."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            old = json.load(fh)
        if not isinstance(old, dict) or not isinstance(old.get("rows", []), list):
            raise ValueError("not a results table")
        return old
    except (OSError, ValueError) as e:
        aside = path.with_name(path.name + ".damaged")
        path.replace(aside)
        print(f"{path} is damaged ({e}); moved it to {aside.name} and starting a new table", file=sys.stderr)
        return None


def finished_rows(path, cfg, meta, heldout_tokens: int) -> dict:
    """{(variant, knob, value): row} of an earlier, interrupted run in the results file
    `path` made with the same config (all but NOT_PER_SAE), the same activations (model,
    weights, hook, dtype, count, scale) and the same evaluation, whose SAE file is still
    there and loads: a sweep can be stopped and started again without training anything
    twice, and never reuses an SAE made otherwise."""
    old = read_results(path)
    if old is None:
        return {}
    acts = old.get("activations", {})
    same_acts = all(acts.get(k) == meta.get(k) for k in ("n_tokens", "scale", "weights", "compute_dtype"))
    if not same_sae_settings(old.get("config", {}), config_dict(cfg)) or old.get("hook") != meta["hook"] or \
            old.get("heldout_tokens") != heldout_tokens or not same_acts:
        print(f"{path}: made with other settings or activations; its SAEs are not reused", file=sys.stderr)
        return {}
    done = {}
    for r in old.get("rows", []):
        try:
            HookedSAE.load(Path(path).parent / r["sae"])
        except (ValueError, OSError, KeyError, TypeError) as e:
            print(f"not reusing {r.get('sae')}: {e}", file=sys.stderr)
            continue
        if "mse" in r and "mse_scaled" not in r:  # written when mse was in the SAE's units
            r["mse_scaled"], r["mse"] = r["mse"], r["mse"] / meta["scale"] ** 2
        done[(r["variant"], r["knob"], r["value"])] = r
    return done
