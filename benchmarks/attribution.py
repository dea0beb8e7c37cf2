"""Attribution edges (minisae/interp/attribution.py) against the ablation edges of
`links` (minisae/interp/links.py): agreement and cost, on the same latents and contexts,
in one run.

Scope: one pair of SAEs (A at an earlier hook, B at a later one) on held-out text; the
sources are the --top most often active latents of A (as `links` picks them), the
targets the --targets latents of B with the largest ablation edges from those sources.
Both methods run in float32 on the CPU, one after the other in this process, timed by
process CPU time (time.process_time: other jobs on a shared machine inflate it far less
than wall time) and wall time. Printed:

  - agreement over the sources x targets edges both compute: Spearman and Pearson
    correlation, sign agreement, overlap of the 10 strongest edges of each;
  - where the linear estimate breaks: the same ablation with latent i's term shrunk to
    alpha = 0.1 (divided by alpha) against the full one (alpha = 1); each ablation edge
    split into the change at positions where the target stays on (or off) and where the
    ablation switches it; the edges with the largest relative error, with the source's
    mean code and the target's density;
  - cost per edge: each method's time over the edges it produces (ablation: sources x
    every latent of B; attribution: every latent of A x targets).

    OMP_NUM_THREADS=1 python benchmarks/attribution.py --sae-a A --sae-b B [--tokens 1024]
"""

import argparse
import copy
import sys
import time

import torch
from scipy.stats import pearsonr, spearmanr

from minisae.interp.attribution import attribution_edges, codes
from minisae.interp.links import ablation_edges
from minisae.pipeline.data import load_contexts
from minisae.pipeline.hooked_sae import HookedSAE, load_with_model


def timed(fn):
    cpu, wall = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - cpu, time.perf_counter() - wall


def shrunk(hsae, alpha):
    """A copy of hsae whose decoder rows are alpha times as long: ablating latent i then
    removes alpha f_i d_i (the codes, read through the encoder, do not change)."""
    sae = copy.deepcopy(hsae.sae)
    with torch.no_grad():
        sae.W_dec.mul_(alpha)
    return HookedSAE(sae, hsae.model_name, hsae.hook, hsae.scale, hsae.max_norm, hsae.mean)


@torch.no_grad()
def split_by_switching(model, hsae_a, hsae_b, contexts, sources, targets):
    """The ablation edges (S, J) split in two: the change of f_b_j at the positions where
    target j is on (or off) in both runs, which the gradient can see, and at the positions
    where the ablation switches it on or off (a TopK latent pushed out of or into the top
    k jumps from its value to 0), which no first-order term sees."""
    x_a = model(contexts, stop_at=hsae_a.hook)[:, 1:]  # (N, T-1, D)
    f_a, _ = codes(hsae_a, x_a)  # (N, T-1, F_a)
    f_b, keep_b = codes(hsae_b, model(contexts, stop_at=hsae_b.hook)[:, 1:])
    f_b = f_b[..., targets]  # (N, T-1, J)
    smooth, jump = torch.zeros(len(sources), len(targets)), torch.zeros(len(sources), len(targets))
    for n, i in enumerate(sources):
        remove = f_a[..., i, None] * hsae_a.sae.W_dec[i] / hsae_a.scale  # (N, T-1, D)
        x_b = model(contexts, hooks={hsae_a.hook: lambda act, r=remove: torch.cat([act[:, :1], act[:, 1:] - r], 1)},
                    stop_at=hsae_b.hook)[:, 1:]
        f_b2 = hsae_b.sae.encode(x_b.flatten(0, 1) * hsae_b.scale).view(*x_b.shape[:2], -1)[..., targets]
        f_b2 = f_b2 * keep_b[..., None]  # (N, T-1, J): B's positions are the clean run's, as in links
        switched = (f_b > 0) != (f_b2 > 0)
        delta = f_b - f_b2
        smooth[n], jump[n] = (delta * ~switched).sum((0, 1)), (delta * switched).sum((0, 1))
    n_tokens = f_b.shape[0] * f_b.shape[1]
    return smooth / n_tokens, jump / n_tokens


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sae-a", required=True)
    p.add_argument("--sae-b", required=True)
    p.add_argument("--tokens", type=int, default=1024, help="held-out text tokens (contexts of --ctx-len)")
    p.add_argument("--ctx-len", type=int, default=128)
    p.add_argument("--top", type=int, default=8, help="source latents of A: the most often active")
    p.add_argument("--targets", type=int, default=64, help="target latents of B: the largest ablation edges")
    args = p.parse_args(argv)
    torch.manual_seed(0)

    hsae_a, model, tok = load_with_model(args.sae_a, device="cpu")
    hsae_b = HookedSAE.load(args.sae_b).check_site(hsae_a.model_name).check_model(model)
    contexts = load_contexts(tok, name=hsae_a.model_name, split="heldout", ctx_len=args.ctx_len,
                             max_tokens=args.tokens)
    n_tokens = contexts.shape[0] * (contexts.shape[1] - 1)
    with torch.no_grad():
        f_a, _ = codes(hsae_a, model(contexts, stop_at=hsae_a.hook)[:, 1:])  # (N, T-1, F_a)
    density = (f_a > 0).flatten(0, 1).float().mean(0)  # (F_a,)
    sources = density.topk(args.top).indices.tolist()
    n_active = int((density > 0).sum())

    abl, abl_cpu, abl_wall = timed(lambda: ablation_edges(model, hsae_a, hsae_b, contexts, sources))  # (S, F_b)
    targets = abl.abs().sum(0).topk(args.targets).indices.tolist()
    (attr, error), attr_cpu, attr_wall = timed(
        lambda: attribution_edges(model, hsae_a, hsae_b, contexts, targets))  # (F_a, J), (N, T-1, J)
    a = abl[:, targets].flatten()  # (S*J,)
    b = attr[sources].flatten()  # (S*J,)

    lines = [f"{hsae_a.hook} -> {hsae_b.hook} ({hsae_a.model_name}), {n_tokens:,} held-out tokens in "
             f"{len(contexts)} contexts of {contexts.shape[1]}; {len(sources)} sources (most active of A) x "
             f"{len(targets)} targets (largest ablation edges in B) = {len(a)} edges; "
             f"torch threads {torch.get_num_threads()}",
             "", "agreement, attribution vs ablation, over those edges:",
             f"  Spearman {spearmanr(a, b).statistic:.3f}   Pearson {pearsonr(a, b).statistic:.3f}   "
             f"same sign {(a.sign() == b.sign()).double().mean():.3f}",
             f"  |attribution| / |ablation| (median over edges) {(b.abs() / a.abs()).median():.3f}"]
    for n in (10, 25):
        top_abl, top_attr = set(a.abs().topk(n).indices.tolist()), set(b.abs().topk(n).indices.tolist())
        lines.append(f"  top {n} edges by |ablation| and by |attribution|: {len(top_abl & top_attr)} in common")
    per_source = [spearmanr(abl[s, targets], attr[i]).statistic for s, i in enumerate(sources)]
    lines.append("  Spearman per source: " + " ".join(f"{r:.2f}" for r in per_source))

    lines += ["", "where the linear estimate breaks: ablation of alpha * (latent i's term), divided by alpha"]
    for alpha in (0.1, 1.0):
        part = abl if alpha == 1.0 else ablation_edges(model, shrunk(hsae_a, alpha), hsae_b, contexts, sources,
                                                       verbose=False) / alpha
        p = part[:, targets].flatten()
        lines.append(f"  alpha {alpha:>4}: Spearman {spearmanr(p, b).statistic:.3f}, relative error "
                     f"||ablation/alpha - attribution|| / ||attribution|| = {(p - b).norm() / b.norm():.3f}")
    smooth, jump = split_by_switching(model, hsae_a, hsae_b, contexts, sources, targets)  # (S, J) each
    sm, jm = smooth.flatten().double(), jump.flatten().double()
    lines.append(f"  ablation = smooth part + switching part: the switching part carries "
                 f"{jm.abs().sum() / (sm.abs().sum() + jm.abs().sum()):.3f} of sum |ablation| "
                 f"(check: max |smooth + switching - ablation| {(sm + jm - a).abs().max():.1e})")
    lines.append(f"  attribution vs the smooth part alone: Spearman {spearmanr(sm, b).statistic:.3f}, "
                 f"relative error ||smooth - attribution|| / ||attribution|| = {(sm - b).norm() / b.norm():.3f}")
    rel = (b - a).abs() / a.abs().clamp_min(1e-12)
    mean_code = f_a.flatten(0, 1).sum(0) / (f_a > 0).flatten(0, 1).sum(0).clamp_min(1)  # (F_a,): when active
    with torch.no_grad():
        f_b, _ = codes(hsae_b, model(contexts, stop_at=hsae_b.hook)[:, 1:])
    density_b = (f_b > 0).flatten(0, 1).float().mean(0)
    lines.append("  the 5 strongest ablation edges, and the 5 worst estimated among the top half by |ablation|:")
    lines.append(f"    {'A':>6} {'B':>6} {'ablation':>10} {'attribution':>12} {'A code':>7} {'B density':>9}")
    strong = a.abs().topk(len(a) // 2).indices
    worst = strong[rel[strong].topk(5).indices]
    for e in [*a.abs().topk(5).indices.tolist(), *worst.tolist()]:
        i, j = sources[e // len(targets)], targets[e % len(targets)]
        lines.append(f"    {i:>6} {j:>6} {a[e].item():10.3e} {b[e].item():12.3e} {mean_code[i].item():7.2f} "
                     f"{density_b[j].item():9.3f}")
    err_share = error.sum((0, 1)).abs() / (attr.sum(0).abs() + error.sum((0, 1)).abs())  # (J,)
    lines.append(f"  error nodes' share of each target's total attribution (median): {err_share.median():.3f}")

    per_abl, per_attr = abl_cpu / (len(sources) * hsae_b.n_latents), attr_cpu / (hsae_a.n_latents * len(targets))
    lines += ["", "cost (CPU seconds of this process; wall in brackets):",
              f"  ablation:    {abl_cpu:7.1f} s ({abl_wall:.1f})  {len(sources)} sources x {hsae_b.n_latents} "
              f"latents of B = {len(sources) * hsae_b.n_latents:,} edges, {per_abl:.2e} s per edge",
              f"  attribution: {attr_cpu:7.1f} s ({attr_wall:.1f})  {hsae_a.n_latents} latents of A x "
              f"{len(targets)} targets = {hsae_a.n_latents * len(targets):,} edges, {per_attr:.2e} s per edge",
              f"  attribution is {per_abl / per_attr:.1f}x cheaper per edge",
              f"  edges into these {len(targets)} targets from all {n_active} latents of A active on this text: "
              f"ablation would take {n_active} runs, about {abl_cpu / len(sources) * n_active:,.0f} s at the "
              f"measured cost per source (the most active ones: an upper bound), against "
              f"{attr_cpu:.1f} s: {abl_cpu / len(sources) * n_active / attr_cpu:,.0f}x"]
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
