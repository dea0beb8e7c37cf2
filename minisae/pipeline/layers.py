"""`python -m minisae layers`: one SAE per layer, and how L0, FVU and loss recovered change with depth.

The source article trains one SAE at every layer's residual stream of GPT-3 (96 layers,
96 SAEs). Here: one variant and one setting (e.g. topk k=32) at one site of every chosen
layer of a model, each trained and evaluated exactly as one row of `python -m minisae lm`
(minisae.pipeline.sweep.train_and_evaluate), with each layer's own scale, mean (for mean-ablation) and baselines.

    contexts                      <- minisae.pipeline.data, the train split, as in lm
    for each chunk of layers:
        one forward pass per batch, read hooks at the chunk's layers, stop after the last
            -> one shuffled activation file per layer (activations.collect_many)
        for each layer of the chunk: baselines, train_and_evaluate (train, evaluate, save the SAE)
        delete the chunk's activation files
    layers_results.json (rows: lm_results.json's keys + layer, hook, scale), layers_depth.png

Why chunks. Collecting with `stop_at` costs one forward up to layer L for each L: about
n_layer / 2 full forwards in all (15 for SmolLM2). One pass with read hooks at every layer
costs one, but needs the disk for all layers at once: n_layer * tokens * D * 4 bytes
(30 * 300k * 576 * 4 = 21 GB for SmolLM2). So layers go in chunks that fit --max-disk-gb
(default 8 GB, ~11 SmolLM2 layers at 300k tokens): a chunk's forward stops after its last
layer, so three chunks of ten layers cost 1/3 + 2/3 + 1 = 2 full forwards.

Each layer's SAE starts from its own random dictionary (seed + layer): with one seed for
all, briefly trained SAEs at neighbouring layers stay close to the same initial decoder
and look linked when they are not (docs/06_features.md).

Scope: one variant and one setting for all layers; the settings are lm's,
chosen on SmolLM2's layer 15 and not tuned per layer. Evaluation runs the full model five
times per layer on the held-out contexts (clean, zero, mean, and clean + SAE), which
dominates the cost on a CPU: keep --eval-tokens modest.
"""

import json
import os
import sys
from pathlib import Path

from minisae import plots
from minisae.formats.common import tidy
from minisae.models import known_d_model, load_model, weights_identity
from minisae.models.hooks import hook_name
from minisae.multi_train import multi_train
from minisae.pipeline import activations, data, evaluate, store
from minisae.pipeline.batches import activation_batches
from minisae.pipeline.sweep import (LAYERS_SETTING, STACK, SWEEPS, check_sae_settings, config_dict,
                                    evaluate_and_save, parse_sweep, sae_and_config, train_and_evaluate)
from minisae.utils import atomic_write_text, resolve_device


def parse_layers(spec, n_layer: int) -> list:
    """'0-29' / '0-29:2' (every other) / '0,5,10' / None (all) -> sorted layer indices."""
    if spec is None:
        return list(range(n_layer))
    layers = set()
    try:
        for part in str(spec).split(","):
            rng, _, step = part.partition(":")
            first, _, last = rng.partition("-")
            stop = int(last) if last else int(first)
            layers.update(range(int(first), stop + 1, int(step) if step else 1))
    except ValueError:
        raise ValueError(f"bad --layers {spec!r}; expected e.g. 0-29, 0-29:2 or 0,5,10") from None
    bad = sorted(L for L in layers if not 0 <= L < n_layer)
    if not layers or bad:
        raise ValueError(f"--layers {spec!r} gives {bad or 'no layers'}; this model has layers 0..{n_layer - 1}")
    return sorted(layers)


def run(cfg) -> list:
    """`python -m minisae layers` (cfg: minisae.configs.LayersConfig): returns the rows of
    layers_results.json, one per layer."""

    cfg.check()
    variant, setting = cfg.variant, cfg.setting
    if variant not in SWEEPS:
        raise ValueError(f"unknown variant {variant!r}; valid variants: {', '.join(SWEEPS)}")
    if setting is None:  # a middle point of lm's sweep: topk k=48, relu sparsity_coef=1.5, ...
        setting = f"{SWEEPS[variant][0]}={LAYERS_SETTING[variant]}"
    (knob, values), = parse_sweep([f"{variant}:{setting}"]).values()
    if len(values) != 1:
        raise ValueError(f"--setting {setting!r} gives {len(values)} values; the layers command takes one")
    value = values[0]
    device = resolve_device(cfg.device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("`layers` runs in one process; under torchrun use `lm` (one hook point per call)")
    data.check_text_files(cfg.text)
    d = known_d_model(cfg.model, cfg.weights)
    if d is not None:  # a bad setting fails before anything is loaded (again below, on the model)
        check_sae_settings({variant: (knob, [value])}, cfg, d)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model(cfg.model, weights=cfg.weights)
    model.to(device).eval()
    layers = parse_layers(cfg.layers, model.n_layer)
    check_sae_settings({variant: (knob, [value])}, cfg, model.d_model)  # before the activation pass
    for p in store.remove_stale_temporaries(out):
        print(f"removed {p}, left by a killed run", file=sys.stderr)
    tidy(out / "saes")  # SAE writes a kill interrupted: the old SAE back, their temporaries gone
    hooks = {L: hook_name(L, cfg.site, model.n_layer) for L in layers}
    (out / "saes").mkdir(parents=True, exist_ok=True)
    n_collect = cfg.collect_tokens or cfg.tokens
    corpus = {"split": "train", "max_tokens": n_collect, "text": [str(t) for t in cfg.text] if cfg.text else None}
    contexts = data.load_contexts(tokenizer, name=cfg.model, split="train", ctx_len=cfg.ctx_len,
                                  max_tokens=n_collect, text_paths=cfg.text)
    heldout = data.load_contexts(tokenizer, name=cfg.model, split="heldout", ctx_len=cfg.ctx_len,
                                 max_tokens=cfg.eval_tokens, text_paths=cfg.text)
    layer_bytes = contexts.shape[0] * (cfg.ctx_len - 1) * model.d_model * 4
    per_chunk = max(1, int(cfg.max_disk_gb * 1e9 // layer_bytes))
    chunks = [layers[i:i + per_chunk] for i in range(0, len(layers), per_chunk)]
    print(f"{len(layers)} layers of {cfg.model} at {cfg.site}, {variant} {knob}={value}: {layer_bytes / 1e9:.2f} GB "
          f"of activations per layer, {len(chunks)} chunk(s) of <= {per_chunk} layers", file=sys.stderr)

    rows, results = [], None
    for chunk in chunks:
        paths = [out / f"acts-{cfg.model}-{hooks[L]}.npy" for L in chunk]
        activations.collect_many(model, contexts, [hooks[L] for L in chunk], paths, model_name=cfg.model,
                                 corpus=corpus, bf16=cfg.bf16, seed=cfg.seed,
                                 producer={"weights": weights_identity(cfg.model, cfg.weights)})
        loaded = [store.load_activations(path, model_name=cfg.model, hook=hooks[L]) for L, path in zip(chunk, paths)]
        trained = train_in_one_pass(cfg, loaded, variant, knob, value, chunk, device) if cfg.one_pass else None
        for j, (L, path) in enumerate(zip(chunk, paths)):
            acts, meta = loaded[j]
            print(f"layer {L} ({hooks[L]}), scale {meta['scale']:.4g}, {meta['n_sinks_dropped']:,} sink "
                  f"positions dropped", file=sys.stderr)
            base = evaluate.baselines(model, heldout, hooks[L], meta["mean"], bf16=cfg.bf16, max_norm=meta["max_norm"],
                                      with_sinks=True)
            name = f"{hooks[L]}-{variant}-{knob}{value}"
            row = train_and_evaluate(cfg, model, acts, meta, heldout, base, variant, knob, value, name=name,
                                     seed=cfg.seed + L) if trained is None else \
                evaluate_and_save(cfg, model, meta, heldout, base, *trained[j], variant, knob, value, name)
            rows.append({"layer": L, "hook": hooks[L], "scale": meta["scale"], "max_norm": meta["max_norm"],
                         "n_sinks_dropped": meta["n_sinks_dropped"], **row})
            results = {"model": cfg.model, "site": cfg.site, "variant": variant, "knob": knob, "value": value,
                       "stored_tokens": meta["n_tokens"], "heldout_tokens": heldout.numel(), "bf16": cfg.bf16,
                       "lr": cfg.lr, "batch_size": cfg.batch_size, "expansion": cfg.expansion,
                       "config": config_dict(cfg), "rows": rows}
            atomic_write_text(out / "layers_results.json", json.dumps(results, indent=1))  # after every layer
        del acts, loaded, trained  # the memmaps, before their files are removed
        if not cfg.keep_acts:
            for path in paths:
                path.unlink()
                store.sidecar_path(path).unlink()
    plots.layer_figures(results, out)
    return rows


def train_in_one_pass(cfg, loaded, variant, knob, value, layers, device) -> list:
    """The SAEs of `layers` trained together (`--one-pass`), each on its own layer's
    activations `loaded` [(acts, meta)] with the seed and batches `train_and_evaluate`
    gives it alone (minisae/multi_train.py, own_batches: step i feeds each SAE its own
    layer's batch i; same-shape SAEs stacked with --stack); [(sae, result)] per layer."""
    jobs = [sae_and_config(cfg, acts, meta, variant, knob, value, cfg.seed + L, device)
            for L, (acts, meta) in zip(layers, loaded)]
    streams = [activation_batches(acts, cfg.batch_size, cfg.seed + L, device) for L, (acts, _) in zip(layers, loaded)]
    print(f"{len(layers)} SAEs in one pass ({variant} {knob}={value}), layers {', '.join(map(str, layers))}",
          file=sys.stderr)
    saes = [sae for sae, _ in jobs]
    results = multi_train(saes, (list(xs) for xs in zip(*streams)), [c for _, c in jobs], own_batches=True,
                          stack=STACK[cfg.stack])
    return list(zip(saes, results))
