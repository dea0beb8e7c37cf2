"""`python -m minisae lm`: SAEs on a language model's activations, L0 vs loss recovered.

    model, tokenizer   <- minisae.models.load_model (GPT-2, or SmolLM2 from its GGUF)
    contexts           <- minisae.data: offline corpus, train / held-out split by module
    activations        <- minisae.activations: one pass, stored once, reused by the sweep
    for each variant, for each sweep value:
        train an SAE on the stored activations (as many passes as --tokens needs)
        evaluate it spliced into the model on held-out contexts (minisae.evaluate)
    lm_results.json, figures (minisae.plots), and every SAE in DIR/saes/

The SAE code does not know which model it is looking at: activations are scaled to
E||x|| = sqrt(D) (minisae.activations), so one set of sweep values serves every model,
layer and site. Scope: one hook point per call, one seed, default settings chosen on
SmolLM2's layer-15 residual stream (docs/05_smollm2.md); they are a start, not tuned per
layer.
"""

import json
import sys
import time
from pathlib import Path

import torch

from minisae.sae import make_sae
from minisae.train import TrainConfig, train

# Sweep values per variant (activations scaled to E||x|| = sqrt(D)), calibrated on
# SmolLM2's layer-15 residual stream (4x expansion, batch 1,024, lr 1e-3, 4M tokens):
# together they span L0 from about 10 to 200 there (docs/05_smollm2.md). L0 falls
# steeply with the L1 coefficient (ReLU: 1 -> L0 ~240 after 500k tokens, 4 -> ~7).
# TopK and BatchTopK have two values each: what a 2-core CPU afforded in one session
# (4M tokens per SAE; add k=128 for their high-L0 end when you have the time). JumpReLU's
# L0 after 4M tokens: 0.1 -> 192, 1 -> 17.5, 4 -> 12.6 (nothing yet in 30-60).
SWEEPS = {
    "relu": ("sparsity_coef", [1.0, 1.5, 2.0]),
    "gated": ("sparsity_coef", [1.0, 2.0, 4.0]),
    "topk": ("k", [16, 48]),
    "jumprelu": ("sparsity_coef", [0.1, 1.0, 4.0]),
    "batchtopk": ("k", [16, 48]),
}
# Settings shared by the sweep (per variant); dead_after in tokens, as in Gao et al.
BASE = {"relu": {}, "gated": {}, "topk": {"dead_after": 500_000}, "batchtopk": {"dead_after": 500_000},
        "jumprelu": {"bandwidth": 0.05, "theta_init": 0.1}}


def parse_sweep(specs) -> dict:
    """['topk:k=16,32', 'relu:sparsity_coef=1,2'] -> {'topk': ('k', [16, 32]), ...}."""
    out = {}
    for spec in specs or []:
        try:
            variant, rest = spec.split(":", 1)
            knob, values = rest.split("=", 1)
            vals = [int(v) if knob == "k" else float(v) for v in values.split(",")]
        except ValueError:
            raise ValueError(f"bad --sweep {spec!r}; expected VARIANT:KNOB=V1,V2,... e.g. topk:k=16,32,64")
        out[variant] = (knob, vals)
    return out


def activation_batches(acts, batch_size: int, seed: int):
    """Endless batches from stored activations: epoch after epoch, a new order each."""
    from minisae.activations import iter_batches
    epoch = 0
    while True:
        yield from iter_batches(acts, batch_size, seed=seed + epoch, drop_last=True)
        epoch += 1


def collect(model, tokenizer, model_name, hook, n_tokens, path, ctx_len, bf16, text=None, seed=0):
    """Collect (or reuse) the activation file for the training split; return its metadata."""
    from minisae import activations, data
    from minisae.activations import MAX_NORM_MULTIPLE
    corpus = {"split": "train", "max_tokens": n_tokens, "text": text}
    if path.exists() and activations.sidecar_path(path).exists():
        _, meta = activations.load_activations(path, model_name=model_name, hook=hook)
        if meta["corpus"] == corpus and meta["ctx_len"] == ctx_len and meta.get("max_norm_multiple") == MAX_NORM_MULTIPLE:
            print(f"reusing {path} ({meta['n_tokens']:,} tokens)", file=sys.stderr)
            return meta
    contexts = data.load_contexts(tokenizer, name=model_name, split="train", ctx_len=ctx_len,
                                  max_tokens=n_tokens, text_paths=text)
    return activations.collect_activations(model, contexts, hook, path, model_name=model_name,
                                           corpus=corpus,
                                           bf16=bf16, seed=seed)


def train_one(model, model_name, acts, meta, heldout, base, variant, knob, value, out, name,
              tokens, expansion=8, batch_size=4096, lr=4e-4, bf16=False, seed=0) -> dict:
    """Train one SAE on stored activations `acts` (sidecar `meta`), evaluate it spliced in at
    meta['hook'] on the held-out contexts (`base`: evaluate.baselines on them), save it as
    out/saes/{name}.pt; return its row of lm_results.json."""
    from minisae import evaluate
    from minisae.metrics import density_histogram

    settings = {**BASE[variant], knob: value}
    sae = make_sae(variant, meta["d"], expansion * meta["d"], seed=seed, **settings)
    sae.init_b_dec_(torch.from_numpy(acts[:8192].copy()))
    cfg = TrainConfig(n_samples=tokens, batch_size=batch_size, lr=lr, seed=seed, bf16=bf16,
                      resample_every=0 if variant in ("topk", "batchtopk") else 2_000_000 // batch_size,
                      dead_after=1_000_000, log_every=50)
    print(f"{variant} {knob}={value}", file=sys.stderr)
    result = train(sae, activation_batches(acts, batch_size, seed), cfg)
    t0 = time.perf_counter()
    ev = evaluate.evaluate(model, sae, heldout, meta["hook"], meta["mean"], scale=meta["scale"], bf16=bf16,
                           baselines=base, max_norm=meta["max_norm"])
    ev["eval_seconds"] = time.perf_counter() - t0
    counts, edges = density_histogram(ev.pop("log10_density"))
    sae.save(out / "saes" / f"{name}.pt", model=model_name, hook=meta["hook"], scale=meta["scale"],
             max_norm=meta["max_norm"], settings=settings)
    row = {"variant": variant, "knob": knob, "value": value, **ev,
           "train_tokens_asked": tokens, "train_tokens": result["train_samples"], "train_seconds": result["train_seconds"],
           "n_passes": result["train_samples"] / meta["n_tokens"], "n_latents": sae.n_latents,
           "density_hist": {"counts": counts, "edges": edges}, "sae": f"saes/{name}.pt"}
    print(f"  -> L0 {row['l0']:.1f}  FVU {row['fvu']:.3f}  loss recovered mean {row['loss_recovered_mean']:.3f}"
          f" zero {row['loss_recovered_zero']:.3f}  ({row['train_seconds']:.0f}s)", file=sys.stderr)
    return row


def finished_rows(out, model_name, hook, meta, heldout_tokens, bf16, lr, batch_size, expansion, seed,
                  tokens) -> dict:
    """{(variant, knob, value): row} of an earlier, interrupted run into the same `out` with
    the same model, hook, activations, evaluation and training settings, whose SAE file is
    there: a sweep can be stopped and started again without training anything twice."""
    path = out / "lm_results.json"
    if not path.exists():
        return {}
    with open(path, encoding="utf-8") as fh:
        old = json.load(fh)
    same = (old.get("model"), old.get("hook"), old.get("heldout_tokens"), old.get("bf16"), old.get("lr"),
            old.get("batch_size"), old.get("expansion"), old.get("seed"),
            old.get("activations", {}).get("n_tokens"), old.get("activations", {}).get("scale"))
    if same != (model_name, hook, heldout_tokens, bf16, lr, batch_size, expansion, seed, meta["n_tokens"],
                meta["scale"]):
        return {}
    return {(r["variant"], r["knob"], r["value"]): r for r in old.get("rows", [])
            if r.get("train_tokens_asked") == tokens and (out / r["sae"]).exists()}


def run(model_name="gpt2", weights=None, layer=6, site="resid_pre", tokens=4_000_000, collect_tokens=None,
        variants=("relu", "gated", "topk"), sweep=None, out=Path("runs/lm"), expansion=8, batch_size=4096,
        lr=4e-4, eval_tokens=65_536, ctx_len=128, bf16=False, text=None, seed=0) -> list:
    from minisae import activations, data, evaluate, plots
    from minisae.models import load_model
    from minisae.models.hooks import hook_name

    sweeps = {**{v: SWEEPS[v] for v in variants if v in SWEEPS}, **parse_sweep(sweep)}
    bad = [v for v in list(variants) + list(sweeps) if v not in SWEEPS]
    if bad:
        raise ValueError(f"unknown variant(s) {bad}; valid variants: {', '.join(SWEEPS)}")
    if tokens <= 0 or eval_tokens <= 0:
        raise ValueError("--tokens and --eval-tokens must be positive")
    out = Path(out)
    (out / "saes").mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model(model_name, weights=weights)
    model.eval()
    hook = hook_name(layer, site, model.n_layer)
    acts_path = out / f"acts-{model_name}-{hook}.npy"
    meta = collect(model, tokenizer, model_name, hook, collect_tokens or tokens, acts_path, ctx_len, bf16, text, seed)
    acts, meta = activations.load_activations(acts_path, model_name=model_name, hook=hook)
    heldout = data.load_contexts(tokenizer, name=model_name, split="heldout", ctx_len=ctx_len,
                                 max_tokens=eval_tokens, text_paths=text)
    n_passes = tokens / meta["n_tokens"]
    print(f"{meta['n_tokens']:,} stored tokens at {hook}, scale {meta['scale']:.4g}; each SAE trains on "
          f"{tokens:,} tokens ({n_passes:.2f} passes); evaluation on {heldout.numel():,} held-out tokens",
          file=sys.stderr)

    rows = []
    base = evaluate.baselines(model, heldout, hook, meta["mean"], bf16=bf16, max_norm=meta["max_norm"])
    done = finished_rows(out, model_name, hook, meta, heldout.numel(), bf16, lr, batch_size, expansion, seed,
                         tokens)
    for variant in variants:
        knob, values = sweeps[variant]
        for value in values:
            key = (variant, knob, value)
            if key in done:
                print(f"{variant} {knob}={value}: reusing the finished row in {out / 'lm_results.json'}",
                      file=sys.stderr)
                rows.append(done[key])
            else:
                rows.append(train_one(model, model_name, acts, meta, heldout, base, variant, knob, value, out,
                                      name=f"{variant}-{knob}{value}", tokens=tokens, expansion=expansion,
                                      batch_size=batch_size, lr=lr, bf16=bf16, seed=seed))
            results = {"model": model_name, "hook": hook, "activations": {k: meta[k] for k in
                       ("n_tokens", "d", "scale", "max_norm", "n_sinks_dropped", "compute_dtype", "ctx_len")},
                       "heldout_tokens": heldout.numel(), "bf16": bf16, "lr": lr, "batch_size": batch_size,
                       "expansion": expansion, "seed": seed, "rows": rows}
            with open(out / "lm_results.json", "w") as fh:  # rewritten after every SAE: nothing lost
                json.dump(results, fh, indent=1)
    plots.lm_figures(results, out)
    return rows
