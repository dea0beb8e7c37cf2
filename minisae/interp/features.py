"""Reading a feature: where it fires (max-activating examples), how often, and what it writes.

An SAE latent is only a candidate feature; we read it the way Towards Monosemanticity
(Bricken et al. 2023) and Neuronpedia present one, from one pass over held-out text:

    x  = model(idx, stop_at=hook)[:, 1:]        (B, T-1, D)  BOS dropped, as in training
    f  = sae.encode(x * scale)                  (B*(T-1), F) the SAE's units (minisae.pipeline.activations)
    density_i = #{f_i > 0} / n_tokens           firing frequency
    mean_i    = sum f_i / #{f_i > 0}            mean activation when active
    histogram of f_i over the tokens where it fires

    top examples: for each chosen latent, the k tokens with the largest f_i and a window
    of context. A min-heap of size k per latent (heapq): a token enters only if its key
    beats the heap's smallest, so memory is O(k) per latent whatever the corpus size.
    key = (f_i, -context_id, -position): ties go to the earlier context and position,
    so the kept set is exactly the top k under one fixed order, whatever order the
    contexts arrive in (pass their ids).

    logit lens: the tokens each chosen latent's direction promotes or suppresses
    (minisae.interp.lens); the page and the terminal view: minisae.interp.feature_page.

Histograms are streamed with bins [j w, (j+1) w), j < 32, w a power of two that doubles
(merging bin pairs, which is exact) when a larger value arrives: the final bins are the
same whatever the corpus order.
"""

import heapq
import math
from pathlib import Path

import torch

from minisae.interp import feature_page
from minisae.interp.lens import lens_tokens
from minisae.pipeline.activations import hook_acts
from minisae.pipeline.data import load_contexts
from minisae.pipeline.hooked_sae import check_latents, load_with_model, parse_latents
from minisae.utils import Progress, atomic_write_text

N_BINS = 32  # histogram bins per latent (even, so pairs can merge)


# ---------------------------------------------------------------- streaming statistics

class TopExamples:
    """Per latent, the k largest keys (value, -context_id, -pos) seen: a bounded min-heap.

    Each heap entry is (value, -context_id, -pos, example) where example is a dict with
    the window's token ids, the latent's activation on each (0 at BOS) and the index of
    the activating token in the window. Keys are unique, so entries never compare dicts.
    """

    def __init__(self, latents, k: int = 10, before: int = 12, after: int = 4):
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        self.latents, self.k, self.before, self.after = list(latents), k, before, after
        self.heaps = {i: [] for i in self.latents}

    def add(self, idx, f, ids):
        """idx (B, T) token ids; f (B, T-1, L) activations of self.latents at positions 1..T-1;
        ids: the B contexts' ids."""
        for j, i in enumerate(self.latents):
            heap, v = self.heaps[i], f[..., j]  # v (B, T-1)
            floor = v.flatten().topk(min(self.k, v.numel())).values[-1].item()  # k-th in this batch
            if len(heap) == self.k:
                floor = max(floor, heap[0][0])  # nothing below the heap's smallest can enter
            for b, p in (v >= floor).logical_and(v > 0).nonzero().tolist():
                key = (v[b, p].item(), -int(ids[b]), -(p + 1))  # p + 1: position in the context
                if len(heap) < self.k or key > heap[0][:3]:
                    entry = (*key, self._example(idx[b], v[b], p + 1))
                    (heapq.heappush if len(heap) < self.k else heapq.heapreplace)(heap, entry)

    def _example(self, tokens, acts, pos) -> dict:
        lo, hi = max(0, pos - self.before), min(len(tokens), pos + self.after + 1)
        window_acts = [0.0] + acts.tolist()  # position 0 (BOS) has no activation
        return {"tokens": tokens[lo:hi].tolist(), "acts": window_acts[lo:hi], "center": pos - lo}

    def result(self, i) -> list:
        """Latent i's examples, largest first: dicts with value, context, pos, tokens, acts, center."""
        return [{"value": v, "context": -c, "pos": -p, **ex} for v, c, p, ex in sorted(self.heaps[i], reverse=True)]

    def n_stored(self) -> int:
        return sum(len(h) for h in self.heaps.values())


class LatentStats:
    """Firing counts, sums and maxima for every latent; streamed histograms for a few."""

    def __init__(self, n_latents: int, hist_latents=()):
        self.n = 0
        self.count = torch.zeros(n_latents, dtype=torch.long)  # (F,)
        self.total = torch.zeros(n_latents, dtype=torch.float64)  # (F,)
        self.max = torch.zeros(n_latents)  # (F,)
        self.hist = {i: [None, torch.zeros(N_BINS, dtype=torch.long)] for i in hist_latents}  # i -> [w, counts]

    def add(self, f):  # f (N, F)
        self.n += len(f)
        self.count += (f > 0).sum(0)
        self.total += f.double().sum(0)
        self.max = torch.maximum(self.max, f.max(0).values)
        for i, h in self.hist.items():
            vals = f[:, i][f[:, i] > 0]  # (n_active,)
            if len(vals) == 0:
                continue
            top = vals.max().item()
            if h[0] is None:  # the smallest power of two w with top < N_BINS * w (frexp: exact)
                h[0] = math.ldexp(1.0, math.frexp(top / N_BINS)[1])
            while top >= N_BINS * h[0]:  # double the width: merge neighbouring bins (exact)
                h[1] = torch.cat([h[1].view(-1, 2).sum(1), torch.zeros(N_BINS // 2, dtype=torch.long)])
                h[0] *= 2
            h[1] += torch.bincount((vals / h[0]).floor().long(), minlength=N_BINS)

    def result(self) -> dict:
        if self.n == 0:
            raise ValueError("no tokens were scanned")
        mean = torch.where(self.count > 0, self.total / self.count.clamp_min(1), torch.zeros((), dtype=torch.float64))
        return {"n_tokens": self.n, "density": (self.count / self.n).tolist(), "mean_active": mean.tolist(),
                "max": self.max.tolist(), "hist": {i: {"width": w, "counts": c.tolist()} for i, (w, c) in self.hist.items()}}


@torch.no_grad()
def scan(model, hsae, contexts, latents=(), k: int = 10, ids=None, batch_size: int = 8, bf16: bool = False,
         verbose: bool = True):
    """One pass over contexts (N, T): (stats for all latents, TopExamples of `latents`) of
    the hooked SAE `hsae` (minisae.pipeline.hooked_sae). Positions the SAE does not read (attention
    sinks above its max_norm) count as code 0 and are left out of the stats, as in training."""
    if latents:
        check_latents(latents, hsae.n_latents)
    ids = torch.arange(len(contexts)) if ids is None else torch.as_tensor(ids)
    stats, top = LatentStats(hsae.n_latents, latents), TopExamples(latents, k)
    bar = Progress("scanning", len(contexts), "contexts") if verbose else None
    for s in range(0, len(contexts), batch_size):
        idx = contexts[s:s + batch_size]  # (B, T)
        x = hook_acts(model, idx, hsae.hook, bf16)  # (B, T-1, D), raw units, BOS dropped
        f, keep = hsae.encode_positions(x, bos=False)  # (B, T-1, F), (B, T-1)
        f, keep = f.cpu(), keep.cpu()  # the statistics are kept on the CPU
        stats.add(f[keep])
        if top.latents:
            top.add(idx, f[..., top.latents], ids[s:s + batch_size])  # (B, T-1, L)
        if bar:
            bar.update(s + len(idx))
    if bar:
        bar.close(len(contexts))
    return stats.result(), top


# ---------------------------------------------------------------- the report

def report(model, tokenizer, hsae, stats: dict, top: TopExamples, n_lens: int = 8) -> list:
    """Per chosen latent: index, density, mean_active, max, hist, lens, examples."""
    return [{"latent": i, "density": stats["density"][i], "mean_active": stats["mean_active"][i],
             "max": stats["max"][i], "hist": stats["hist"].get(i), "examples": top.result(i),
             "lens": lens_tokens(model, tokenizer, hsae.sae.W_dec[i].detach(), n_lens)} for i in top.latents]


def pick_latents(stats: dict, how: str, n: int, seed: int = 0) -> list:
    """n latents ranked by density, max or mean activation, or (how='random') a seeded
    random sample of the live ones: a fair picture, not the best-looking ones."""
    if how == "random":
        live = torch.tensor(stats["density"]).nonzero()[:, 0]  # (n_live,)
        pick = torch.randperm(len(live), generator=torch.Generator().manual_seed(seed))[:n]
        return sorted(live[pick].tolist())
    key = {"density": "density", "max": "max", "mean": "mean_active"}[how]
    values = torch.tensor(stats[key])  # (F,)
    return values.topk(min(n, len(values))).indices.tolist()


def load_text(src, tokenizer, model_name):
    """The contexts (N, ctx_len) of an SAESource's text (minisae.configs)."""
    return load_contexts(tokenizer, name=model_name, split=src.split, ctx_len=src.ctx_len,
                         max_tokens=src.text_tokens, text_paths=src.text)


def run(cfg) -> list:
    """`python -m minisae features` (cfg: minisae.configs.FeaturesConfig): the chosen
    latents' statistics, logit lens and max-activating examples, in the terminal and as
    an HTML page in cfg.out."""
    src = cfg.source
    hsae, model, tok = load_with_model(src.sae, src.model, src.layer, src.site, src.weights, src.device,
                                       latents=cfg.latents)
    latents = parse_latents(cfg.latents, hsae.n_latents) if cfg.latents else None
    contexts = load_text(src, tok, hsae.model_name)
    if latents is None:  # a first pass ranks all latents; the second keeps the examples
        stats, _ = scan(model, hsae, contexts, bf16=src.bf16)
        latents = pick_latents(stats, cfg.by, cfg.top, cfg.seed)
    stats, top = scan(model, hsae, contexts, latents, k=cfg.k, bf16=src.bf16)
    rows = report(model, tok, hsae, stats, top)
    print(f"{hsae.model_name} {hsae.hook}, {stats['n_tokens']:,} tokens of the {src.split} split")
    feature_page.print_report(rows, tok)
    name = Path(src.sae).name.removesuffix(".pt")  # an SAE folder's name may hold dots: blocks.15.hook_...
    page = Path(cfg.out) / f"features-{name}.html"
    meta = {"SAE": str(src.sae), "model": hsae.model_name, "hook": hsae.hook, "latents in the SAE": hsae.n_latents,
            "text": f"{stats['n_tokens']:,} tokens of the {src.split} split" + (" (your files)" if src.text else ""),
            "latents shown": cfg.latents or f"{cfg.top} by {cfg.by}" + (f", seed {cfg.seed}" if cfg.by == "random" else ""),
            "examples per latent": cfg.k, "command": "python -m minisae features"}
    html = feature_page.render_html(f"{Path(src.sae).name}: {hsae.model_name} {hsae.hook}", rows, tok, meta)
    atomic_write_text(page, html)
    print(f"\nwrote {page}")
    return rows
