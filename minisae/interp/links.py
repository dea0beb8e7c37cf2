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

from minisae import plots
from minisae.interp.feature_page import format_example
from minisae.interp.features import load_text, scan
from minisae.metrics import cosine_matrix
from minisae.pipeline.hooked_sae import HookedSAE, check_latents, load_with_model, parse_latents
from minisae.sae import unit_vectors
from minisae.utils import Progress, atomic_write_text, model_device


def decoder_cosines(sae_a, sae_b):
    """Cosines between every decoder row of A and of B: (F_a, F_b)."""
    return cosine_matrix(sae_a.W_dec.detach().float(), sae_b.W_dec.detach().float())


def random_best_cosines(n_a: int, n_b: int, d: int, seed: int = 0):
    """Best-match cosines of n_a random unit vectors against n_b others in R^d: (n_a,)."""
    g = torch.Generator().manual_seed(seed)
    return cosine_matrix(unit_vectors(n_a, d, g), unit_vectors(n_b, d, g)).max(1).values


def check_order(model, hook_a: str, hook_b: str):
    names = model.hook_names()
    if names.index(hook_b) <= names.index(hook_a):
        raise ValueError(f"SAE B's hook {hook_b} must come after SAE A's hook {hook_a} in the forward pass")


@torch.no_grad()
def ablation_edges(model, hsae_a, hsae_b, contexts, sources, batch_size: int = 8, bf16: bool = False,
                   verbose: bool = True):
    """edge (S, F_b): the mean over tokens (positions 1..T-1) of the change of every latent
    of B (hooked SAE hsae_b) when each source latent of A (hsae_a, at an earlier hook) is
    removed (see the module docstring)."""
    check_latents(sources, hsae_a.n_latents)
    device = model_device(model)
    hook_a, hook_b = hsae_a.hook, hsae_b.hook
    check_order(model, hook_a, hook_b)

    def codes_b(idx, hooks, keep=None):  # B's codes at positions 1..T-1 (b, T-1, F_b), 0 at B's sinks
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            x = model(idx, hooks=hooks, stop_at=hook_b)[:, 1:].float()  # (b, T-1, D)
        keep = hsae_b.positions(x, bos=False) if keep is None else keep  # (b, T-1)
        return hsae_b.encode_raw(x.reshape(-1, x.shape[-1])).view(*x.shape[:2], -1) * keep[..., None], keep

    edges = torch.zeros(len(sources), hsae_b.n_latents, dtype=torch.float64)  # (S, F_b)
    n_tokens = 0
    bar = Progress("ablating", len(contexts), "contexts") if verbose else None
    for s in range(0, len(contexts), batch_size):
        idx = contexts[s:s + batch_size].to(device)  # (B, T)
        seen = []
        f_b, keep_b = codes_b(idx, {hook_a: lambda act: seen.append(act[:, 1:].float())})  # (B, T-1, F_b); reads A's hook
        x_a = seen[0]  # (B, T-1, D), raw units
        f_a, _ = hsae_a.encode_positions(x_a, bos=False)  # (B, T-1, F_a), 0 at A's sinks: they stay
        n_tokens += f_a.shape[0] * f_a.shape[1]
        for n, i in enumerate(sources):
            fires = (f_a[..., i] > 0).any(1)  # (B,): contexts where latent i is on somewhere
            if not fires.any():
                continue
            remove = f_a[fires][..., i, None] * hsae_a.sae.W_dec[i].detach().float() / hsae_a.scale  # (b, T-1, D)

            def ablate(act, remove=remove):  # act (b, T, D): subtract latent i's term, BOS untouched
                out = act.clone()
                out[:, 1:] -= remove.to(act.dtype)
                return out

            f_b_ablated, _ = codes_b(idx[fires], {hook_a: ablate}, keep_b[fires])
            edges[n] += (f_b[fires] - f_b_ablated).double().sum((0, 1)).cpu()
        if bar:
            bar.update(s + len(idx))
    if bar:
        bar.close(len(contexts))
    return edges / n_tokens


# ---------------------------------------------------------------- the command

def top_tokens(tokenizer, examples, n: int = 5) -> list:
    """The distinct tokens a latent fires hardest on, from its max-activating examples."""
    seen = []
    for ex in examples:
        t = tokenizer.decode([ex["tokens"][ex["center"]]])
        if t not in seen:
            seen.append(t)
    return seen[:n]


def run(cfg) -> dict:
    """`python -m minisae links` (cfg: minisae.configs.LinksConfig): decoder cosines and
    ablation edges from SAE A (cfg.source) to SAE B (cfg.sae_b), printed, in links.json
    and two figures in cfg.out."""
    src = cfg.source
    hsae_a, model, tok = load_with_model(src.sae, src.model, weights=src.weights, device=src.device,
                                         latents=cfg.latents)
    hsae_b = HookedSAE.load(cfg.sae_b).check_site(hsae_a.model_name).check_model(model)
    hsae_b.sae.to(model_device(model))
    check_order(model, hsae_a.hook, hsae_b.hook)
    contexts = load_text(src, tok, hsae_a.model_name)
    stats_a, _ = scan(model, hsae_a, contexts, bf16=src.bf16)
    if cfg.latents:
        sources = parse_latents(cfg.latents, hsae_a.n_latents)
    else:  # the most often active latents: each source costs one forward per context it fires in
        sources = torch.tensor(stats_a["density"]).topk(min(cfg.top, hsae_a.n_latents)).indices.tolist()

    C = decoder_cosines(hsae_a.sae, hsae_b.sae)  # (F_a, F_b)
    best_cos, best_j = C.max(1)  # (F_a,)
    edges = ablation_edges(model, hsae_a, hsae_b, contexts, sources, bf16=src.bf16)  # (S, F_b)
    strongest = edges.abs().argmax(1)  # (S,)
    rows = [{"source": i, "best_match": best_j[i].item(), "cosine": best_cos[i].item(),
             "strongest_edge": strongest[n].item(), "edge": edges[n, strongest[n]].item(),
             "edge_to_best_match": edges[n, best_j[i]].item()} for n, i in enumerate(sources)]
    both = [r for r in rows if r["best_match"] == r["strongest_edge"] and r["edge"] != 0]

    # top tokens of the sources and of their matches, from their max-activating examples
    _, top_a = scan(model, hsae_a, contexts, sources, k=5, bf16=src.bf16)
    targets = sorted({r["best_match"] for r in rows} | {r["strongest_edge"] for r in rows})
    _, top_b = scan(model, hsae_b, contexts, targets, k=5, bf16=src.bf16)
    for r in rows:
        r["tokens_a"] = top_tokens(tok, top_a.result(r["source"]))
        r["tokens_b"] = top_tokens(tok, top_b.result(r["strongest_edge"]))

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    title = f"{hsae_a.hook} -> {hsae_b.hook}"
    baseline = random_best_cosines(hsae_a.n_latents, hsae_b.n_latents, hsae_a.d)
    plots.link_cosines(best_cos.tolist(), baseline.tolist(), out / "links_cosines.png", title)
    plots.link_graph(sources, edges.tolist(), out / "links_graph.png", title, cfg.edges)
    summary = {"model": hsae_a.model_name, "hook_a": hsae_a.hook, "hook_b": hsae_b.hook,
               "n_tokens": stats_a["n_tokens"], "median_best_cosine": best_cos.median().item(),
               "median_random_best_cosine": baseline.median().item(), "rows": rows,
               "joined_by_both": [r["source"] for r in both]}
    atomic_write_text(out / "links.json", json.dumps(summary, indent=1))

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
    print(f"wrote {out}/links.json, links_cosines.png, links_graph.png", file=sys.stderr)
    return summary
