"""`python -m minisae layers`: one SAE per layer, and how L0, FVU and loss recovered change with depth.

The source article trains one SAE at every layer's residual stream of GPT-3 (96 layers,
96 SAEs). Here: one variant and one setting (e.g. topk k=32) at one site of every chosen
layer of a model, each trained and evaluated exactly as one row of `python -m minisae lm`
(minisae.lm.train_one), with each layer's own scale, mean (for mean-ablation) and baselines.

    contexts                      <- minisae.data, the train split, as in lm
    for each chunk of layers:
        one forward pass per batch, read hooks at the chunk's layers, stop after the last
            -> one shuffled activation file per layer (activations.collect_many)
        for each layer of the chunk: baselines, train_one (train, evaluate, save the SAE)
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
import sys
from pathlib import Path


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


def run(model_name="smollm2", weights=None, site="resid_post", variant="topk", setting=None, layers=None,
        tokens=300_000, collect_tokens=None, eval_tokens=16_384, out=Path("runs/layers"), expansion=8,
        batch_size=4096, lr=4e-4, ctx_len=128, bf16=False, text=None, seed=0, max_disk_gb=8.0,
        keep_acts=False) -> list:
    from minisae import activations, data, evaluate, lm, plots
    from minisae.models import load_model
    from minisae.models.hooks import hook_name

    if variant not in lm.SWEEPS:
        raise ValueError(f"unknown variant {variant!r}; valid variants: {', '.join(lm.SWEEPS)}")
    if setting is None:  # the second value of lm's sweep: topk k=48, relu sparsity_coef=1.5, ...
        setting = f"{lm.SWEEPS[variant][0]}={lm.SWEEPS[variant][1][1]}"
    (knob, values), = lm.parse_sweep([f"{variant}:{setting}"]).values()
    if len(values) != 1:
        raise ValueError(f"--setting {setting!r} gives {len(values)} values; the layers command takes one")
    value = values[0]
    if tokens <= 0 or eval_tokens <= 0 or not max_disk_gb > 0:
        raise ValueError("--tokens, --eval-tokens and --max-disk-gb must be positive")
    out = Path(out)
    model, tokenizer = load_model(model_name, weights=weights)
    model.eval()
    layers = parse_layers(layers, model.n_layer)
    hooks = {L: hook_name(L, site, model.n_layer) for L in layers}
    (out / "saes").mkdir(parents=True, exist_ok=True)
    corpus = {"split": "train", "max_tokens": collect_tokens or tokens, "text": text}
    contexts = data.load_contexts(tokenizer, name=model_name, split="train", ctx_len=ctx_len,
                                  max_tokens=collect_tokens or tokens, text_paths=text)
    heldout = data.load_contexts(tokenizer, name=model_name, split="heldout", ctx_len=ctx_len,
                                 max_tokens=eval_tokens, text_paths=text)
    layer_bytes = contexts.shape[0] * (ctx_len - 1) * model.d_model * 4
    per_chunk = max(1, int(max_disk_gb * 1e9 // layer_bytes))
    chunks = [layers[i:i + per_chunk] for i in range(0, len(layers), per_chunk)]
    print(f"{len(layers)} layers of {model_name} at {site}, {variant} {knob}={value}: {layer_bytes / 1e9:.2f} GB "
          f"of activations per layer, {len(chunks)} chunk(s) of <= {per_chunk} layers", file=sys.stderr)

    rows, results = [], None
    for chunk in chunks:
        paths = [out / f"acts-{model_name}-{hooks[L]}.npy" for L in chunk]
        activations.collect_many(model, contexts, [hooks[L] for L in chunk], paths, model_name=model_name,
                                 corpus=corpus, bf16=bf16, seed=seed)
        for L, path in zip(chunk, paths):
            acts, meta = activations.load_activations(path, model_name=model_name, hook=hooks[L])
            print(f"layer {L} ({hooks[L]}), scale {meta['scale']:.4g}, {meta['n_sinks_dropped']:,} sink "
                  f"positions dropped", file=sys.stderr)
            base = evaluate.baselines(model, heldout, hooks[L], meta["mean"], bf16=bf16, max_norm=meta["max_norm"])
            row = lm.train_one(model, model_name, acts, meta, heldout, base, variant, knob, value, out,
                               name=f"{hooks[L]}-{variant}-{knob}{value}", tokens=tokens, expansion=expansion,
                               batch_size=batch_size, lr=lr, bf16=bf16, seed=seed + L)
            rows.append({"layer": L, "hook": hooks[L], "scale": meta["scale"], "max_norm": meta["max_norm"],
                         "n_sinks_dropped": meta["n_sinks_dropped"], **row})
            results = {"model": model_name, "site": site, "variant": variant, "knob": knob, "value": value,
                       "stored_tokens": meta["n_tokens"], "heldout_tokens": heldout.numel(), "bf16": bf16,
                       "lr": lr, "batch_size": batch_size, "expansion": expansion, "rows": rows}
            with open(out / "layers_results.json", "w") as fh:  # rewritten after every layer
                json.dump(results, fh, indent=1)
            del acts  # the memmap, before its file is removed
        if not keep_acts:
            for path in paths:
                path.unlink()
                activations.sidecar_path(path).unlink()
    plots.layer_figures(results, out)
    return rows


def add_arguments(p):
    p.add_argument("--model", default="smollm2", help="gpt2, gpt2-medium, ..., gpt2-random, smollm2")
    p.add_argument("--weights", type=Path, help="a local weights file (safetensors or GGUF) instead of the download")
    p.add_argument("--site", default="resid_post", help="resid_pre, attn_out, resid_mid, mlp_out, resid_post")
    p.add_argument("--layers", help="e.g. 0-29, 0-29:2 (every other), 0,5,10 (default: all)")
    p.add_argument("--variant", default="topk", help="relu, gated, topk, jumprelu, batchtopk")
    p.add_argument("--setting", help="KNOB=VALUE, e.g. k=32 or sparsity_coef=2 (default: the second "
                   "value of lm's sweep for the variant)")
    p.add_argument("--tokens", type=int, default=300_000, help="training tokens per SAE")
    p.add_argument("--collect-tokens", type=int, help="tokens of activations to store per layer (default: --tokens)")
    p.add_argument("--eval-tokens", type=int, default=16_384, help="held-out tokens for each layer's evaluation")
    p.add_argument("--expansion", type=int, default=8, help="latents = expansion x d_model")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--ctx-len", type=int, default=128)
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the LM and the SAE forward")
    p.add_argument("--text", nargs="+", help="your own text files instead of the offline corpus")
    p.add_argument("--max-disk-gb", type=float, default=8.0, help="activation files on disk at once; "
                   "layers are collected in chunks that fit")
    p.add_argument("--keep-acts", action="store_true", help="keep the activation files (default: delete each "
                   "chunk's after its SAEs are trained)")
    p.add_argument("--out", type=Path, default=Path("runs/layers"))
    p.add_argument("--seed", type=int, default=0)


def run_cli(args):
    run(args.model, weights=args.weights, site=args.site, variant=args.variant, setting=args.setting,
        layers=args.layers, tokens=args.tokens, collect_tokens=args.collect_tokens, eval_tokens=args.eval_tokens,
        out=args.out, expansion=args.expansion, batch_size=args.batch_size, lr=args.lr, ctx_len=args.ctx_len,
        bf16=args.bf16, text=args.text, seed=args.seed, max_disk_gb=args.max_disk_gb, keep_acts=args.keep_acts)
