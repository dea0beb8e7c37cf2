"""`python -m minisae lm`: SAEs on a language model's activations, L0 vs loss recovered.

    model, tokenizer   <- minisae.models.load_model (GPT-2, or SmolLM2 from its GGUF)
    contexts           <- minisae.pipeline.data: offline corpus, train / held-out split by module
    activations        <- minisae.pipeline.activations: one pass, stored once, reused by the sweep
    for each variant, for each sweep value (minisae.pipeline.sweep):
        train an SAE on the stored activations (as many passes as --tokens needs)
        evaluate it spliced into the model on held-out contexts (minisae.pipeline.evaluate)
    (--one-pass: all the SAEs train together first, each batch read once for all of them,
    minisae/multi_train.py; the same SAEs, then evaluated one by one)
    lm_results.json, figures (minisae.plots), and every SAE in DIR/saes/

Every setting is in one SweepConfig (minisae.configs), written into lm_results.json.
A run started again into the same folder with the same config reuses the stored
activations and every SAE already finished. Scope: one hook point per call, one seed.
"""

import json
import sys
from pathlib import Path

from minisae import distributed, plots, utils
from minisae.formats.common import tidy
from minisae.models import known_d_model, load_model, weights_identity
from minisae.models.hooks import hook_name
from minisae.pipeline import activations, data, evaluate, store
from minisae.pipeline.activations import MAX_NORM_MULTIPLE
from minisae.pipeline.sweep import (SWEEPS, check_sae_settings, config_dict, finished_rows, parse_sweep,
                                    train_and_evaluate, train_in_one_pass)
from minisae.utils import atomic_write_text


def producer(cfg, hook: str) -> dict:
    """What an activation file of this run must have been made with to be reused: model,
    weights, hook, dtype, text, context length and normalisation (the sidecar's keys)."""
    return {"model": cfg.model, "weights": weights_identity(cfg.model, cfg.weights), "hook": hook,
            "compute_dtype": "bfloat16" if cfg.bf16 else "float32", "ctx_len": cfg.ctx_len,
            "corpus": {"split": "train", "max_tokens": cfg.collect_tokens or cfg.tokens,
                       "text": [str(t) for t in cfg.text] if cfg.text else None},
            "normalized": True, "max_norm_multiple": MAX_NORM_MULTIPLE, "seed": cfg.seed}


def collect(model, tokenizer, cfg, want: dict, path):
    """Collect (or reuse, if made exactly as `want` says) the activation file of the
    training split; return its metadata."""
    meta, why_not = store.reusable(path, want)
    if meta is not None:
        print(f"reusing {path} ({meta['n_tokens']:,} tokens)", file=sys.stderr)
        return meta
    if path.exists() or store.sidecar_path(path).exists():
        print(f"not reusing {path}: {why_not}; collecting again", file=sys.stderr)
    contexts = data.load_contexts(tokenizer, name=cfg.model, split="train", ctx_len=cfg.ctx_len,
                                  max_tokens=want["corpus"]["max_tokens"], text_paths=cfg.text)
    return activations.collect_activations(model, contexts, want["hook"], path, model_name=cfg.model,
                                           corpus=want["corpus"], bf16=cfg.bf16, seed=cfg.seed,
                                           producer={"weights": want["weights"]})


def run(cfg) -> list:
    """`python -m minisae lm` (cfg: minisae.configs.SweepConfig): returns the rows of
    lm_results.json, one per SAE. Under torchrun (minisae.distributed) rank 0 collects
    the activations, evaluates, writes and returns the rows; with cfg.distribute 'data'
    all ranks train every SAE together, with 'sweep' each rank trains its own SAEs."""

    cfg.check()
    device = utils.resolve_device(cfg.device)
    sweeps = {**{v: SWEEPS[v] for v in cfg.variants if v in SWEEPS}, **parse_sweep(cfg.sweep)}
    bad = [v for v in list(cfg.variants) if v not in SWEEPS]
    if bad:
        raise ValueError(f"unknown variant(s) {bad}; valid variants: {', '.join(SWEEPS)}")
    d = known_d_model(cfg.model, cfg.weights)
    if d is not None:  # a bad k or setting fails before anything is loaded (again below, on the model)
        check_sae_settings(sweeps, cfg, d)
    group = distributed.from_env(device)
    if group:
        device = group.device
        if cfg.distribute == "data":
            distributed.check_batch(cfg.batch_size, group.world)
    main = group is None or group.main
    data.check_text_files(cfg.text)
    out = Path(cfg.out)
    (out / "saes").mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model(cfg.model, weights=cfg.weights)
    model.to(device).eval()
    hook = hook_name(cfg.layer, cfg.site, model.n_layer)
    check_sae_settings(sweeps, cfg, model.d_model)  # a bad k or setting fails before the activation pass
    acts_path = out / f"acts-{cfg.model}-{hook}.npy"
    if main:  # one process collects; the others wait for its file
        for p in store.remove_stale_temporaries(out):
            print(f"removed {p}, left by a killed run", file=sys.stderr)
        tidy(out / "saes")  # SAE writes a kill interrupted: the old SAE back, their temporaries gone
        collect(model, tokenizer, cfg, producer(cfg, hook), acts_path)
    distributed.barrier(group)
    acts, meta = store.load_activations(acts_path, model_name=cfg.model, hook=hook)
    heldout = data.load_contexts(tokenizer, name=cfg.model, split="heldout", ctx_len=cfg.ctx_len,
                                 max_tokens=cfg.eval_tokens, text_paths=cfg.text, verbose=main)
    if main:
        print(f"{meta['n_tokens']:,} stored tokens at {hook}, scale {meta['scale']:.4g}; each SAE trains on "
              f"{cfg.tokens:,} tokens ({cfg.tokens / meta['n_tokens']:.2f} passes); evaluation on "
              f"{heldout.numel():,} held-out tokens; {device}"
              + (f", {group.world} processes ({cfg.distribute})" if group else ""), file=sys.stderr)

    evaluates = main or cfg.distribute == "sweep"
    base = evaluate.baselines(model, heldout, hook, meta["mean"], bf16=cfg.bf16, max_norm=meta["max_norm"],
                              verbose=main, with_sinks=True) if evaluates else None
    results_path = out / "lm_results.json"
    done = finished_rows(results_path, cfg, meta, heldout.numel()) if main else {}
    keys = [(v, sweeps[v][0], value) for v in cfg.variants for value in sweeps[v][1]]
    todo = [k for k in keys if k not in done]
    if group:  # every rank must agree on what is left to train
        todo = distributed.from_main(todo)
    results = {"model": cfg.model, "hook": hook, "activations": {k: meta.get(k) for k in
               ("n_tokens", "d", "scale", "max_norm", "n_sinks_dropped", "compute_dtype", "ctx_len", "weights")},
               "heldout_tokens": heldout.numel(), "bf16": cfg.bf16, "lr": cfg.lr,
               "batch_size": cfg.batch_size, "expansion": cfg.expansion, "seed": cfg.seed,
               "device": str(device), "dtype": "bfloat16 autocast" if cfg.bf16 else "float32",
               "world_size": group.world if group else 1, "config": config_dict(cfg), "rows": []}

    def name(key):
        variant, knob, value = key
        return f"{variant}-{knob}{value}"

    def train_one(key, group):
        return train_and_evaluate(cfg, model, acts, meta, heldout, base, *key, name=name(key), group=group)

    def write(rows_by_key):  # in sweep order, after every SAE: nothing lost
        results["rows"] = [rows_by_key[k] for k in keys if k in rows_by_key]
        atomic_write_text(results_path, json.dumps(results, indent=1))

    rows_by_key = dict(done)
    for key in keys:
        if key in done:
            print(f"{key[0]} {key[1]}={key[2]}: reusing the finished row in {results_path}", file=sys.stderr)
    if group and cfg.distribute == "sweep":  # SAEs handed out round-robin; rows gathered on rank 0
        share = todo[group.rank::group.world]
        if cfg.one_pass and share:  # this rank's SAEs in one pass
            mine = dict(zip(share, train_in_one_pass(cfg, model, acts, meta, heldout, base, share,
                                                     [name(k) for k in share])))
        else:
            mine = {k: train_one(k, None) for k in share}
        for part in distributed.gather_objects(mine):
            rows_by_key.update(part or {})
    elif cfg.one_pass and todo:  # every SAE left, trained together: each batch read once
        rows = train_in_one_pass(cfg, model, acts, meta, heldout, base, todo, [name(k) for k in todo], group)
        if main:
            rows_by_key.update(zip(todo, rows))
    else:
        for key in todo:
            row = train_one(key, group)
            if main:
                rows_by_key[key] = row
                write(rows_by_key)
    distributed.barrier(group)
    if not main:
        return []
    write(rows_by_key)
    plots.lm_figures(results, out)
    return results["rows"]
