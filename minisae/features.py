"""Reading a feature: where it fires (max-activating examples), how often, and what it writes.

An SAE latent is only a candidate feature; we read it the way Towards Monosemanticity
(Bricken et al. 2023) and Neuronpedia present one, from one pass over held-out text:

    x  = model(idx, stop_at=hook)[:, 1:]        (B, T-1, D)  BOS dropped, as in training
    f  = sae.encode(x * scale)                  (B*(T-1), F) the SAE's units (minisae.activations)
    density_i = #{f_i > 0} / n_tokens           firing frequency
    mean_i    = sum f_i / #{f_i > 0}            mean activation when active
    histogram of f_i over the tokens where it fires

    top examples: for each chosen latent, the k tokens with the largest f_i and a window
    of context. A min-heap of size k per latent (heapq): a token enters only if its key
    beats the heap's smallest, so memory is O(k) per latent whatever the corpus size.
    key = (f_i, -context_id, -position): ties go to the earlier context and position,
    so the kept set is exactly the top k under one fixed order, whatever order the
    contexts arrive in (pass their ids).

    logit lens (Bricken et al. 2023 feature pages; nostalgebraist 2020): the tokens latent
    i's direction d = W_dec[i] / ||W_dec[i]|| promotes or suppresses when it reaches the
    unembedding directly. The final norm is LayerNorm (GPT-2) or RMSNorm (Llama):
        LN(x) = g * (x - mean(x)) / sigma(x) + b        RMS(x) = g * x / rms(x)
    Freezing the per-token scale sigma (or rms), adding d changes the logits by
        lens(d) = W_U (g * c(d)) / sigma     c = centring for LayerNorm, identity for RMSNorm
    which is linear in d. 1/sigma is one positive number per token: it scales every
    logit alike and leaves the ranking unchanged, so we report W_U (g * c(d)). Keeping
    the gain g and the centring makes this the exact first-order direct effect; ignoring
    the later layers is the lens's approximation (exact at the last layer's resid_post).

Histograms are streamed with bins [j w, (j+1) w), j < 32, w a power of two that doubles
(merging bin pairs, which is exact) when a larger value arrives: the final bins are the
same whatever the corpus order.
"""

import heapq
import html
import math
import re
import sys
from pathlib import Path

import torch
import torch.nn as nn

N_BINS = 32  # histogram bins per latent (even, so pairs can merge)


# ---------------------------------------------------------------- SAE and model

def check_site(meta: dict, model_name=None, layer=None, site=None):
    """(model name, hook) the SAE was trained at; ValueError if the caller asks for another."""
    if "model" not in meta or "hook" not in meta or "scale" not in meta:
        raise ValueError("the SAE file has no model/hook/scale metadata; save it with "
                         "sae.save(path, model=..., hook=..., scale=...) as `python -m minisae lm` does")
    m = re.fullmatch(r"blocks\.(\d+)\.hook_(\w+)", meta["hook"])
    if model_name is not None and model_name != meta["model"]:
        raise ValueError(f"this SAE was trained on model {meta['model']!r}, not {model_name!r}")
    if m and ((layer is not None and layer != int(m[1])) or (site is not None and site != m[2])):
        asked = ", ".join(f"{k} {v}" for k, v in (("layer", layer), ("site", site)) if v is not None)
        raise ValueError(f"this SAE was trained at {meta['hook']}, not at {asked}: "
                         "a dictionary only reads the activations it was trained on")
    return meta["model"], meta["hook"]


def load_sae_and_model(path, model_name=None, layer=None, site=None, weights=None):
    """(sae, meta, model, tokenizer): an SAE file and the model it was trained on."""
    from minisae.models import load_model
    from minisae.sae import SAE
    sae, meta = SAE.load(path)
    name, hook = check_site(meta, model_name, layer, site)
    model, tokenizer = load_model(name, weights=weights)
    if hook not in model.hook_names():
        raise ValueError(f"hook {hook} of the SAE does not exist in model {name}")
    return sae.float(), meta, model.eval(), tokenizer


def parse_latents(text: str, n_latents: int) -> list:
    """'3,17,42' -> [3, 17, 42], each checked against the dictionary size."""
    try:
        latents = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"--latents must be comma-separated integers, got {text!r}")
    check_latents(latents, n_latents)
    return latents


def check_latents(latents, n_latents: int):
    bad = [i for i in latents if not 0 <= i < n_latents]
    if bad or not latents:
        raise ValueError(f"latent index(es) {bad or 'none'} out of range: this SAE has latents 0..{n_latents - 1}")


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
def scan(model, sae, hook: str, scale: float, contexts, latents=(), k: int = 10, ids=None,
         batch_size: int = 8, bf16: bool = False, verbose: bool = True, max_norm=None):
    """One pass over contexts (N, T): (stats for all latents, TopExamples of `latents`).
    Attention sinks above max_norm (the SAE file's) are not read: their codes count as 0
    and they are left out of the stats, as in training (minisae.activations)."""
    from minisae.activations import hook_acts, sae_positions
    from minisae.data import Progress
    if latents:
        check_latents(latents, sae.n_latents)
    ids = torch.arange(len(contexts)) if ids is None else torch.as_tensor(ids)
    stats, top = LatentStats(sae.n_latents, latents), TopExamples(latents, k)
    bar = Progress("scanning", len(contexts), "contexts") if verbose else None
    for s in range(0, len(contexts), batch_size):
        idx = contexts[s:s + batch_size]  # (B, T)
        x = hook_acts(model, idx, hook, bf16)  # (B, T-1, D), raw units
        keep = sae_positions(x, max_norm, bos=False).flatten()  # (B*(T-1),)
        f = sae.encode(x.reshape(-1, x.shape[-1]) * scale) * keep[:, None]  # (B*(T-1), F)
        stats.add(f[keep])
        if top.latents:
            top.add(idx, f[:, top.latents].view(*x.shape[:2], -1), ids[s:s + batch_size])  # (B, T-1, L)
        if bar:
            bar.update(s + len(idx))
    if bar:
        bar.close(len(contexts))
    return stats.result(), top


# ---------------------------------------------------------------- logit lens

def final_norm_and_unembedding(model):
    """(final norm module, W_U (V, D)). GPT-2 (ln_f) and Llama (norm) tie W_U to the token
    embedding (wte / embed_tokens); a separate lm_head Linear is used when there is one."""
    norm = getattr(model, "ln_f", None) or getattr(model, "norm", None)
    head = getattr(model, "lm_head", None)
    W_U = head.weight if isinstance(head, nn.Linear) else \
        getattr(getattr(model, "wte", None) or getattr(model, "embed_tokens", None), "weight", None)
    if norm is None or W_U is None:
        raise ValueError(f"cannot find the final norm and unembedding of {type(model).__name__}")
    return norm, W_U


@torch.no_grad()
def logit_lens(model, direction):
    """lens(d) = W_U (g * c(d)) for the unit direction d (D,): (V,). See the module docstring."""
    norm, W_U = final_norm_and_unembedding(model)
    d = direction.float() / direction.float().norm()  # (D,)
    if isinstance(norm, nn.LayerNorm):
        d = d - d.mean()  # LayerNorm subtracts the mean: a linear step, kept
    return W_U.float() @ (norm.weight.float() * d)  # (V,)


def lens_tokens(model, tokenizer, direction, n: int = 10) -> dict:
    """{'promoted': [(token, value)], 'suppressed': [...]}: the n largest and smallest."""
    lens = logit_lens(model, direction)  # (V,)
    up, down = lens.topk(n), (-lens).topk(n)
    show = lambda vals, ids: [(tokenizer.decode([t]), v) for v, t in zip(vals.tolist(), ids.tolist())]
    return {"promoted": show(up.values, up.indices), "suppressed": show(-down.values, down.indices)}


# ---------------------------------------------------------------- showing them

def token_text(tokenizer, t: int) -> str:
    return tokenizer.decode([t]).replace("\n", "\\n").replace("\t", "\\t")


def format_example(tokenizer, ex: dict) -> str:
    """One line: the window with the activating token as [[token]], after its value."""
    parts = [token_text(tokenizer, t) for t in ex["tokens"]]
    parts[ex["center"]] = f"[[{parts[ex['center']]}]]"
    return f"{ex['value']:8.3f}  {''.join(parts)}"


def report(model, tokenizer, sae, stats: dict, top: TopExamples, n_lens: int = 8) -> list:
    """Per chosen latent: index, density, mean_active, max, hist, lens, examples."""
    return [{"latent": i, "density": stats["density"][i], "mean_active": stats["mean_active"][i],
             "max": stats["max"][i], "hist": stats["hist"].get(i), "examples": top.result(i),
             "lens": lens_tokens(model, tokenizer, sae.W_dec[i].detach(), n_lens)} for i in top.latents]


def print_report(rows, tokenizer, file=None):
    file = file or sys.stdout
    for r in rows:
        print(f"\n=== latent {r['latent']}: density {r['density']:.2e}, mean when active {r['mean_active']:.3f}, "
              f"max {r['max']:.3f}", file=file)
        for kind in ("promoted", "suppressed"):
            print(f"  logit lens {kind}: " + "  ".join(repr(t) for t, _ in r["lens"][kind]), file=file)
        for ex in r["examples"] or []:
            print("  " + format_example(tokenizer, ex), file=file)
        if not r["examples"]:
            print("  (never fired on these tokens)", file=file)


def _histogram_svg(hist) -> str:
    if not hist or hist["width"] is None:
        return "<p>no activations</p>"
    counts, w = hist["counts"], hist["width"]
    top = max(counts)
    bars = "".join(f'<rect x="{6 * j}" y="{40 - 40 * c / top:.1f}" width="5" height="{40 * c / top:.1f}"/>'
                   for j, c in enumerate(counts) if c)
    return (f'<svg width="{6 * len(counts)}" height="40" fill="#d2691e"><title>activation histogram, bins of '
            f'{w:g} from 0 to {w * len(counts):g}</title>{bars}</svg> <small>0 .. {w * len(counts):g}</small>')


def render_html(title: str, rows, tokenizer) -> str:
    """One self-contained page (no scripts, no external files): each token's background
    is orange with opacity f / max_f of its latent; hovering shows the value."""
    e = html.escape
    out = [f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{e(title)}</title><style>"
           "body{font-family:sans-serif;max-width:70em;margin:auto}"
           ".ex{font-family:monospace;white-space:pre-wrap;margin:2px 0}"
           ".center{outline:1px solid #000}td{padding:0 1em 0 0}</style></head><body>",
           f"<h1>{e(title)}</h1>"]
    for r in rows:
        peak = max(r["max"], 1e-12)
        out.append(f'<section id="latent-{r["latent"]}"><h2>latent {r["latent"]}</h2><table><tr>'
                   f'<td>density {r["density"]:.3e}</td><td>mean when active {r["mean_active"]:.4g}</td>'
                   f'<td>max {r["max"]:.4g}</td><td>{_histogram_svg(r["hist"])}</td></tr></table>')
        for kind in ("promoted", "suppressed"):
            toks = " ".join(f"<code>{e(repr(t))}</code> ({v:+.3f})" for t, v in r["lens"][kind])
            out.append(f"<p>logit lens, {kind}: {toks}</p>")
        for ex in r["examples"]:
            spans = []
            for j, (t, a) in enumerate(zip(ex["tokens"], ex["acts"])):
                cls = ' class="center"' if j == ex["center"] else ""
                spans.append(f'<span{cls} style="background:rgba(255,140,0,{max(a, 0) / peak:.2f})" '
                             f'title="{a:.3f}">{e(token_text(tokenizer, t))}</span>')
            out.append(f'<div class="ex"><b>{ex["value"]:.3f}</b> {"".join(spans)}</div>')
        out.append("</section>")
    out.append("</body></html>\n")
    return "\n".join(out)


# ---------------------------------------------------------------- command line

def add_common_arguments(p, tokens_flag="--tokens", tokens_default=65_536, site_checks=True):
    """Arguments shared by `features`, `steer` and `links` for the model and the text."""
    p.add_argument("--model", help="model name (default and only valid value: the SAE's)")
    if site_checks:
        p.add_argument("--layer", type=int, help="check that the SAE was trained at this layer")
        p.add_argument("--site", help="check that the SAE was trained at this site")
    p.add_argument("--weights", type=Path, help="a local weights file for the model")
    p.add_argument(tokens_flag, dest="text_tokens", type=int, default=tokens_default, metavar="N",
                   help="tokens of text to scan")
    p.add_argument("--split", default="heldout", choices=("heldout", "train"))
    p.add_argument("--text", nargs="+", help="your own text files instead of the offline corpus")
    p.add_argument("--ctx-len", type=int, default=128)
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the model")


def add_arguments(p):
    p.add_argument("--sae", type=Path, required=True, help="an SAE file written by `python -m minisae lm`")
    p.add_argument("--latents", help="comma-separated latent indices, e.g. 3,17,42")
    p.add_argument("--top", type=int, default=8, help="without --latents: this many latents ...")
    p.add_argument("--by", default="random", choices=("random", "density", "max", "mean"),
                   help="... ranked by this, or a seeded random sample of the live ones (a fair picture)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--k", type=int, default=10, help="examples per latent")
    p.add_argument("--out", type=Path, default=Path("runs/features"))
    add_common_arguments(p)


def load_text(args, tokenizer, model_name):
    from minisae.data import load_contexts
    return load_contexts(tokenizer, name=model_name, split=args.split, ctx_len=args.ctx_len,
                         max_tokens=args.text_tokens, text_paths=args.text)


def run_cli(args):
    sae, meta, model, tok = load_sae_and_model(args.sae, args.model, args.layer, args.site, args.weights)
    latents = parse_latents(args.latents, sae.n_latents) if args.latents else None
    contexts = load_text(args, tok, meta["model"])
    if latents is None:  # a first pass ranks all latents; the second keeps the examples
        stats, _ = scan(model, sae, meta["hook"], meta["scale"], contexts, bf16=args.bf16,
                        max_norm=meta.get("max_norm"))
        if args.by == "random":
            live = torch.tensor(stats["density"]).nonzero()[:, 0]  # (n_live,)
            pick = torch.randperm(len(live), generator=torch.Generator().manual_seed(args.seed))[:args.top]
            latents = sorted(live[pick].tolist())
        else:
            key = {"density": "density", "max": "max", "mean": "mean_active"}[args.by]
            latents = torch.tensor(stats[key]).topk(min(args.top, sae.n_latents)).indices.tolist()
    stats, top = scan(model, sae, meta["hook"], meta["scale"], contexts, latents, k=args.k, bf16=args.bf16,
                      max_norm=meta.get("max_norm"))
    rows = report(model, tok, sae, stats, top)
    print(f"{meta['model']} {meta['hook']}, {stats['n_tokens']:,} tokens of the {args.split} split")
    print_report(rows, tok)
    args.out.mkdir(parents=True, exist_ok=True)
    page = args.out / f"features-{args.sae.stem}.html"
    page.write_text(render_html(f"{args.sae.name}: {meta['model']} {meta['hook']}", rows, tok), encoding="utf-8")
    print(f"\nwrote {page}")
    return rows
