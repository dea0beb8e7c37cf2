"""Cross-layer links: which latents of an SAE at one layer feed which latents at a later one.

Cunningham et al. 2023 ("Sparse Autoencoders Find Highly Interpretable Features in
Language Models", sec. 5) trace features through consecutive residual-stream layers two
ways; so do we. Both SAEs read the same basis (resid_post of block L is resid_pre of
block L+1, and every sublayer writes into it), so their directions compare directly.

(a) Decoder similarity.   C = cos(W_dec_a, W_dec_b)              (F_a, F_b)
    best match of latent i of A:  j*(i) = argmax_j C[i, j], with cosine max_j C[i, j]
    Baseline: the same statistic for random directions (F_a against F_b unit vectors in
    R^D), so a histogram shows how far above chance the matches are.

(b) Ablation edges. Remove latent i's contribution at A's hook, keeping the SAE's error:
        x' = x - (x_hat - x_hat[f_i = 0]) / scale_a = x - f_i W_dec_a[i] / scale_a
    (decode is affine, so the difference is exactly latent i's term). Only that term
    changes; splicing x_hat instead would also remove the SAE's error everywhere (the
    error-term idea of Marks et al. 2024, "Sparse Feature Circuits"). Then, at B's hook,
        edge(i, j) = mean over tokens of  f_b_j(x) - f_b_j(x')     positive: i excites j
    One forward per source latent, so we take a few sources (the most active by default),
    and skip the contexts where latent i never fires: there x' = x and the change is 0.
"""

import json
import sys
from pathlib import Path

import torch

from minisae.features import (add_common_arguments, check_latents, check_site, format_example,
                              load_sae_and_model, load_text, parse_latents, scan)
from minisae.metrics import cosine_matrix


def decoder_cosines(sae_a, sae_b):
    """Cosines between every decoder row of A and of B: (F_a, F_b)."""
    return cosine_matrix(sae_a.W_dec.detach().float(), sae_b.W_dec.detach().float())


def random_best_cosines(n_a: int, n_b: int, d: int, seed: int = 0):
    """Best-match cosines of n_a random unit vectors against n_b others in R^d: (n_a,)."""
    from minisae.sae import unit_vectors
    g = torch.Generator().manual_seed(seed)
    return cosine_matrix(unit_vectors(n_a, d, g), unit_vectors(n_b, d, g)).max(1).values


def check_order(model, hook_a: str, hook_b: str):
    names = model.hook_names()
    if names.index(hook_b) <= names.index(hook_a):
        raise ValueError(f"SAE B's hook {hook_b} must come after SAE A's hook {hook_a} in the forward pass")


@torch.no_grad()
def ablation_edges(model, sae_a, meta_a, sae_b, meta_b, contexts, sources, batch_size: int = 8,
                   bf16: bool = False, verbose: bool = True):
    """edge (S, F_b): the mean over tokens (positions 1..T-1) of the change of every latent
    of B when each source latent of A is removed (see the module docstring)."""
    from minisae.activations import model_device, sae_positions
    from minisae.data import Progress
    check_latents(sources, sae_a.n_latents)
    device = model_device(model)
    (hook_a, scale_a), (hook_b, scale_b) = (meta_a["hook"], meta_a["scale"]), (meta_b["hook"], meta_b["scale"])
    check_order(model, hook_a, hook_b)

    def run(idx, hooks, keep=None):  # B's codes at positions 1..T-1 (b, T-1, F_b), 0 at B's sinks
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            x = model(idx, hooks=hooks, stop_at=hook_b)[:, 1:].float()  # (b, T-1, D)
        keep = sae_positions(x, meta_b.get("max_norm"), bos=False) if keep is None else keep  # (b, T-1)
        return sae_b.encode(x.reshape(-1, x.shape[-1]) * scale_b).view(*x.shape[:2], -1) * keep[..., None], keep

    edges = torch.zeros(len(sources), sae_b.n_latents, dtype=torch.float64)  # (S, F_b)
    n_tokens = 0
    bar = Progress("ablating", len(contexts), "contexts") if verbose else None
    for s in range(0, len(contexts), batch_size):
        idx = contexts[s:s + batch_size].to(device)  # (B, T)
        seen = []
        f_b, keep_b = run(idx, {hook_a: lambda act: seen.append(act[:, 1:].float())})  # (B, T-1, F_b); reads A's hook
        x_a = seen[0]  # (B, T-1, D), raw units
        keep_a = sae_positions(x_a, meta_a.get("max_norm"), bos=False)[..., None]  # (B, T-1, 1): A's sinks stay
        f_a = sae_a.encode(x_a.reshape(-1, x_a.shape[-1]) * scale_a).view(*x_a.shape[:2], -1) * keep_a  # (B, T-1, F_a)
        n_tokens += f_a.shape[0] * f_a.shape[1]
        for n, i in enumerate(sources):
            fires = (f_a[..., i] > 0).any(1)  # (B,): contexts where latent i is on somewhere
            if not fires.any():
                continue
            remove = f_a[fires][..., i, None] * sae_a.W_dec[i].detach().float() / scale_a  # (b, T-1, D)

            def ablate(act, remove=remove):  # act (b, T, D): subtract latent i's term, BOS untouched
                out = act.clone()
                out[:, 1:] -= remove.to(act.dtype)
                return out

            f_b_ablated, _ = run(idx[fires], {hook_a: ablate}, keep_b[fires])
            edges[n] += (f_b[fires] - f_b_ablated).double().sum((0, 1)).cpu()
        if bar:
            bar.update(s + len(idx))
    if bar:
        bar.close(len(contexts))
    return edges / n_tokens


# ---------------------------------------------------------------- figures

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_cosines(best, baseline, path, title: str):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    bins = torch.linspace(min(best.min().item(), baseline.min().item()), 1, 50).tolist()
    ax.hist(baseline.tolist(), bins=bins, alpha=0.6, label="random directions (same count, same D)")
    ax.hist(best.tolist(), bins=bins, alpha=0.6, label="SAE A vs SAE B")
    ax.set(xlabel="best-match cosine of each latent of A", ylabel="latents", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_graph(sources, edges, path, title: str, n_edges: int = 24):
    """Two columns of nodes (A left, B right); the n_edges strongest |edge| as lines,
    width by strength, red when ablating the source lowers the target (i excites j)."""
    plt = _plt()
    flat = edges.abs().flatten()
    keep = flat.topk(min(n_edges, int((flat > 0).sum()))).indices.tolist()
    pairs = [(sources[k // edges.shape[1]], k % edges.shape[1], edges.flatten()[k].item()) for k in keep]
    left = sorted({i for i, _, _ in pairs})
    right = sorted({j for _, j, _ in pairs})
    y = lambda items, v: 1 - (items.index(v) + 0.5) / len(items)
    fig, ax = plt.subplots(figsize=(5, max(3, 0.3 * max(len(left), len(right), 1))))
    top = max((abs(w) for _, _, w in pairs), default=1.0)
    for i, j, w in pairs:
        ax.plot([0, 1], [y(left, i), y(right, j)], color="tab:red" if w > 0 else "tab:blue",
                lw=0.5 + 4 * abs(w) / top, alpha=0.7)
    for x, items, ha in ((0, left, "right"), (1, right, "left")):
        for v in items:
            ax.plot(x, y(items, v), "ko", ms=4)
            ax.text(x + (-0.04 if x == 0 else 0.04), y(items, v), str(v), ha=ha, va="center", fontsize=7)
    ax.text(0.5, -0.02, "width: mean change of B's latent when A's latent is removed\n"
            "red: removal lowers it (A excites B); blue: removal raises it", ha="center", va="top", fontsize=7)
    ax.text(0, 1.01, "A", ha="center", va="bottom")
    ax.text(1, 1.01, "B", ha="center", va="bottom")
    ax.set(xlim=(-0.3, 1.3), ylim=(-0.08, 1.04), title=title)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- command line

def add_arguments(p):
    p.add_argument("--sae-a", type=Path, required=True, help="SAE at the earlier hook")
    p.add_argument("--sae-b", type=Path, required=True, help="SAE at a later hook of the same model")
    p.add_argument("--latents", help="source latents of A (comma-separated); default: the --top most active")
    p.add_argument("--top", type=int, default=16)
    p.add_argument("--edges", type=int, default=24, help="strongest edges drawn in the graph")
    p.add_argument("--out", type=Path, default=Path("runs/links"))
    add_common_arguments(p, tokens_default=16_384, site_checks=False)


def top_tokens(tokenizer, examples, n: int = 5) -> list:
    """The distinct tokens a latent fires hardest on, from its max-activating examples."""
    seen = []
    for ex in examples:
        t = tokenizer.decode([ex["tokens"][ex["center"]]])
        if t not in seen:
            seen.append(t)
    return seen[:n]


def run_cli(args):
    from minisae.sae import SAE
    sae_a, meta_a, model, tok = load_sae_and_model(args.sae_a, args.model, weights=args.weights)
    sae_b, meta_b = SAE.load(args.sae_b)
    check_site(meta_b, meta_a["model"])
    sae_b = sae_b.float()
    if sae_a.d != sae_b.d:
        raise ValueError(f"the SAEs read activations of different widths ({sae_a.d} vs {sae_b.d})")
    check_order(model, meta_a["hook"], meta_b["hook"])
    contexts = load_text(args, tok, meta_a["model"])
    stats_a, _ = scan(model, sae_a, meta_a["hook"], meta_a["scale"], contexts, bf16=args.bf16,
                       max_norm=meta_a.get("max_norm"))
    if args.latents:
        sources = parse_latents(args.latents, sae_a.n_latents)
    else:  # the most often active latents: each source costs one forward per context it fires in
        sources = torch.tensor(stats_a["density"]).topk(min(args.top, sae_a.n_latents)).indices.tolist()

    C = decoder_cosines(sae_a, sae_b)  # (F_a, F_b)
    best_cos, best_j = C.max(1)  # (F_a,)
    edges = ablation_edges(model, sae_a, meta_a, sae_b, meta_b, contexts, sources, bf16=args.bf16)  # (S, F_b)
    strongest = edges.abs().argmax(1)  # (S,)
    rows = [{"source": i, "best_match": best_j[i].item(), "cosine": best_cos[i].item(),
             "strongest_edge": strongest[n].item(), "edge": edges[n, strongest[n]].item(),
             "edge_to_best_match": edges[n, best_j[i]].item()} for n, i in enumerate(sources)]
    both = [r for r in rows if r["best_match"] == r["strongest_edge"] and r["edge"] != 0]

    # top tokens of the sources and of their matches, from their max-activating examples
    _, top_a = scan(model, sae_a, meta_a["hook"], meta_a["scale"], contexts, sources, k=5, bf16=args.bf16,
                    max_norm=meta_a.get("max_norm"))
    targets = sorted({r["best_match"] for r in rows} | {r["strongest_edge"] for r in rows})
    _, top_b = scan(model, sae_b, meta_b["hook"], meta_b["scale"], contexts, targets, k=5, bf16=args.bf16,
                    max_norm=meta_b.get("max_norm"))
    for r in rows:
        r["tokens_a"] = top_tokens(tok, top_a.result(r["source"]))
        r["tokens_b"] = top_tokens(tok, top_b.result(r["strongest_edge"]))

    args.out.mkdir(parents=True, exist_ok=True)
    title = f"{meta_a['hook']} -> {meta_b['hook']}"
    baseline = random_best_cosines(sae_a.n_latents, sae_b.n_latents, sae_a.d)
    plot_cosines(best_cos, baseline, args.out / "links_cosines.png", title)
    plot_graph(sources, edges, args.out / "links_graph.png", title, args.edges)
    summary = {"model": meta_a["model"], "hook_a": meta_a["hook"], "hook_b": meta_b["hook"],
               "n_tokens": stats_a["n_tokens"], "median_best_cosine": best_cos.median().item(),
               "median_random_best_cosine": baseline.median().item(), "rows": rows,
               "joined_by_both": [r["source"] for r in both]}
    (args.out / "links.json").write_text(json.dumps(summary, indent=1))

    print(f"{title}: median best-match cosine {summary['median_best_cosine']:.3f} "
          f"(random directions: {summary['median_random_best_cosine']:.3f}), {stats_a['n_tokens']:,} tokens")
    print(f"{'A':>6} {'best B':>7} {'cos':>6} {'edge B':>7} {'edge':>9}  both")
    for r in rows:
        print(f"{r['source']:>6} {r['best_match']:>7} {r['cosine']:6.3f} {r['strongest_edge']:>7} "
              f"{r['edge']:9.2e}  {'yes' if r in both else ''}")
    print(f"\njoined by both measures: {len(both)} of {len(rows)} source latents")
    for r in both:
        print(f"  A {r['source']} {r['tokens_a']}  ->  B {r['strongest_edge']} {r['tokens_b']}")
        for ex in top_a.result(r["source"])[:2]:
            print("      " + format_example(tok, ex))
    print(f"wrote {args.out}/links.json, links_cosines.png, links_graph.png", file=sys.stderr)
    return summary
