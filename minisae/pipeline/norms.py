"""`python -m minisae norms`: how the activation norms at one hook point are spread, as
multiples of their median: the evidence behind the sink rule (docs/05_smollm2.md).

    r_t = ||x_t|| / median_t ||x_t||        over positions t >= 1 (BOS left out) of the text

An SAE reads a position only if r_t <= MAX_NORM_MULTIPLE = 10 (minisae.pipeline.activations.sae_positions,
with the median of the training text). This command draws the histogram of r_t on a log
axis (figure norms_MODEL_lLAYER.png), counts the positions in bands (below 3x, 3-30x, above
30x) and lists every position between 3x and 30x with its token: those are the ones whose
side of the threshold can depend on the precision (--bf16 also runs a bfloat16 autocast
pass and shows both ratios) or on which text set the median.
"""

import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from minisae import plots
from minisae.configs import NormsConfig
from minisae.models import load_model
from minisae.models.hooks import hook_name
from minisae.pipeline import data
from minisae.pipeline.activations import MAX_NORM_MULTIPLE, hooks_acts
from minisae.utils import Progress, atomic_write_text, resolve_device

BANDS = (3.0, 30.0)  # the two clusters: below 3x (ordinary positions) and above 30x (sinks)


def scan(model, contexts, hook: str, bf16: bool, batch_size: int = 8):
    """Norms of the activation at `hook`, positions 1..T-1 of every context: (N, T-1) float64."""
    out = []
    bar = Progress(f"norms at {hook}" + (" (bf16)" if bf16 else ""), contexts.numel())
    with torch.no_grad():
        for start in range(0, len(contexts), batch_size):
            acts = hooks_acts(model, contexts[start:start + batch_size], [hook], bf16)[hook]  # (B, T-1, D)
            out.append(acts.double().norm(dim=-1))  # (B, T-1)
            bar.update(min(start + batch_size, len(contexts)) * contexts.shape[1])
    bar.close(contexts.numel())
    return torch.cat(out)  # (N, T-1)


def summary(ratio) -> dict:
    """Counts of positions by their multiple r of the median norm: (N, T-1) -> dict."""
    lo, hi = BANDS
    r = ratio.flatten()
    return {"n_positions": int(r.numel()), f"below_{lo:g}x": int((r < lo).sum()),
            f"{lo:g}x_to_{hi:g}x": int(((r >= lo) & (r <= hi)).sum()), f"above_{hi:g}x": int((r > hi).sum()),
            "above_10x": int((r > 10).sum()), "max_ratio": float(r.max())}


def run(cfg: NormsConfig) -> dict:
    cfg.check()
    device = resolve_device(cfg.device)  # an absent device fails before the model is loaded
    model, tokenizer = load_model(cfg.model, weights=cfg.weights)
    model.to(device).eval()
    hook = hook_name(cfg.layer, cfg.site, model.n_layer)
    contexts = data.load_contexts(tokenizer, name=cfg.model, split=cfg.split, ctx_len=cfg.ctx_len,
                                  max_tokens=cfg.tokens)
    norms = {"float32": scan(model, contexts, hook, bf16=False)}  # (N, T-1)
    if cfg.bf16:
        norms["bfloat16"] = scan(model, contexts, hook, bf16=True)
    ratios = {k: v / v.median() for k, v in norms.items()}  # (N, T-1) each
    lo, hi = BANDS
    r32 = ratios["float32"]
    between = ((r32 >= lo) & (r32 <= hi)).nonzero().tolist()
    if cfg.bf16:
        rb = ratios["bfloat16"]
        between = sorted({tuple(p) for p in between} | {tuple(p) for p in ((rb >= lo) & (rb <= hi)).nonzero().tolist()})
    rows = []
    for b, t in between:
        window = contexts[b, max(0, t - 6):t + 3].tolist()  # position t of the norms is t + 1 of the context
        rows.append({"context": b, "position": t + 1, "token": tokenizer.decode([int(contexts[b, t + 1])]),
                     "window": tokenizer.decode(window), **{k: float(v[b, t]) for k, v in ratios.items()}})
    result = {"config": json.loads(json.dumps(asdict(cfg), default=str)), "hook": hook,
              "median_norm": {k: float(v.median()) for k, v in norms.items()},
              "summary": {k: summary(v) for k, v in ratios.items()}, "between": rows}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"norms_{cfg.model}_l{cfg.layer}"
    atomic_write_text(out / f"{stem}.json", json.dumps(result, indent=1))
    s = result["summary"]["float32"]
    plots.norms_figure(r32, out / f"{stem}.png", f"{cfg.model} {hook}: {s['n_positions']:,} {cfg.split} positions",
                       MAX_NORM_MULTIPLE, BANDS)
    for k, sm in result["summary"].items():
        print(f"{k}: {sm['n_positions']:,} positions, median norm {result['median_norm'][k]:.4g}; "
              f"below {lo:g}x {sm[f'below_{lo:g}x']:,}, {lo:g}x-{hi:g}x {sm[f'{lo:g}x_to_{hi:g}x']:,}, "
              f"above {hi:g}x {sm[f'above_{hi:g}x']:,}; above 10x {sm['above_10x']:,}; max {sm['max_ratio']:.1f}x")
    for r in rows:
        both = "  ".join(f"{k} {r[k]:.3f}x" for k in ratios)
        print(f"  context {r['context']} position {r['position']}: {both}  token {r['token']!r} in {r['window']!r}")
    print(f"wrote {out / (stem + '.png')} and {stem}.json", file=sys.stderr)
    return result
