"""Figures, drawn from the result files (never by hand). One function per figure family;
each reads plain dicts and lists so a figure can be redrawn from the JSON alone."""

from pathlib import Path

COLORS = {"relu": "tab:blue", "gated": "tab:orange", "topk": "tab:green", "jumprelu": "tab:red",
          "batchtopk": "tab:purple"}


def _plt():
    from minisae.utils import pyplot
    return pyplot()


def toy_figures(results: dict, extras: dict, probs: list, out_dir: Path):
    plt = _plt()
    variants = list(results["variants"])

    # (a) the frontier: L0 vs FVU per variant, lower-left is better
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for v in variants:
        rows = sorted((r for r in results["sweep"] if r["variant"] == v), key=lambda r: r["l0"])
        ax.plot([r["l0"] for r in rows], [r["fvu"] for r in rows], "o-", color=COLORS[v], label=v)
    ax.set(xlabel="L0 (active latents per sample)", ylabel="FVU (fraction of variance unexplained)",
           yscale="log", title="Sparsity vs reconstruction (lower-left is better)")
    ax.axvline(5.0, color="gray", ls=":", lw=1)
    ax.text(5.0, ax.get_ylim()[1], " true L0 = 5", va="top", color="gray", fontsize=8)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "toy_frontier.png", dpi=120)
    plt.close(fig)

    # (b) recovery of the ground truth per variant
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    xs = range(len(variants))
    mm = [results["variants"][v]["mmcs"] for v in variants]
    rf = [results["variants"][v]["recovered_frac"] for v in variants]
    ax.bar([x - 0.2 for x in xs], mm, 0.4, label="MMCS")
    ax.bar([x + 0.2 for x in xs], rf, 0.4, label="recovered (cos > 0.9)")
    for x, a, b in zip(xs, mm, rf):
        ax.text(x - 0.2, a, f"{a:.3f}", ha="center", va="bottom", fontsize=7)
        ax.text(x + 0.2, b, f"{b:.3f}", ha="center", va="bottom", fontsize=7)
    ax.set(xticks=list(xs), xticklabels=variants, ylim=(min(mm + rf) - 0.05, 1.02), title="Ground-truth recovery")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out_dir / "toy_recovery.png", dpi=120)
    plt.close(fig)

    # recovery against feature frequency: the rare features are learned last
    fig, ax = plt.subplots(figsize=(6, 4))
    for v in variants:
        order = sorted(range(len(probs)), key=lambda i: probs[i])
        ax.plot([probs[i] for i in order], [extras[v]["best_cos"][i] for i in order], ".", ms=3,
                color=COLORS[v], label=v, alpha=0.6)
    ax.axhline(0.9, color="gray", ls=":", lw=1)
    ax.set(xscale="log", xlabel="feature probability p_i", ylabel="best cosine with a decoder row",
           title="Recovery against feature frequency")
    ax.legend(markerscale=4)
    fig.tight_layout()
    fig.savefig(out_dir / "toy_recovery_by_frequency.png", dpi=120)
    plt.close(fig)

    # (c) shrinkage: gamma per variant, and true vs recovered magnitudes
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    gam = [results["variants"][v]["shrinkage_gamma"] for v in variants]
    a1.bar(list(xs), gam, color=[COLORS[v] for v in variants])
    a1.axhline(1.0, color="k", lw=1)
    for x, g in zip(xs, gam):
        a1.text(x, g, f"{g:.3f}", ha="center", va="bottom", fontsize=8)
    a1.set(xticks=list(xs), xticklabels=variants, ylim=(min(gam) - 0.05, max(gam) + 0.03),
           title="relative reconstruction bias gamma (1 = unbiased)")
    for v in ("topk", "relu"):  # relu drawn last, on top
        if v in extras:
            c, f = extras[v]["magnitudes"]
            a2.plot(c, f, ".", ms=1.5, alpha=0.25, color=COLORS[v], label=v)
    a2.plot([0, 1], [0, 1], "k--", lw=1)
    a2.set(xlabel="true coefficient c_i", ylabel="code of the matching latent",
           title="L1 shrinks active features", xlim=(0, 1), ylim=(0, 1.1))
    a2.legend(markerscale=5)
    fig.tight_layout()
    fig.savefig(out_dir / "toy_shrinkage.png", dpi=120)
    plt.close(fig)


def _by_variant(rows):
    out = {}
    for r in rows:
        out.setdefault(r["variant"], []).append(r)
    return {v: sorted(rs, key=lambda r: r["l0"]) for v, rs in out.items()}


def lm_figures(results: dict, out_dir: Path):
    """L0 vs loss recovered (the Gated SAE paper's figure; upper-left is better), FVU vs
    L0, and the density histograms, from lm_results.json's content."""
    plt = _plt()
    groups = _by_variant(results["rows"])
    title = f"{results['model']} {results['hook']}"

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, base in zip(axes, ("mean", "zero")):
        ax.axvspan(30, 60, color="0.9", zorder=0)  # where the issue compares variants at matched L0
        for v, rs in groups.items():
            ax.plot([r["l0"] for r in rs], [r[f"loss_recovered_{base}"] for r in rs], "o-",
                    color=COLORS.get(v), label=v)
        ax.set(xscale="log", xlabel="L0 (active latents per token)",
               ylabel=f"loss recovered ({base}-ablation)", title=f"{title}: vs {base}-ablation")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "lm_l0_loss_recovered.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for v, rs in groups.items():
        ax.plot([r["l0"] for r in rs], [r["fvu"] for r in rs], "o-", color=COLORS.get(v), label=v)
    ax.set(xscale="log", yscale="log", xlabel="L0 (active latents per token)", ylabel="FVU",
           title=f"{title}: reconstruction (lower-left is better)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "lm_fvu_l0.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(groups), figsize=(3.2 * len(groups), 3), sharey=True, squeeze=False)
    for ax, (v, rs) in zip(axes[0], groups.items()):
        for r in rs:
            h = r["density_hist"]
            if h["counts"]:
                ax.stairs(h["counts"], h["edges"], label=f"L0 {r['l0']:.0f}, dead {r['dead_frac']:.0%}")
        ax.set(title=v, xlabel="log10 firing frequency")
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel("latents")
    fig.tight_layout()
    fig.savefig(out_dir / "lm_density.png", dpi=120)
    plt.close(fig)


def layer_figures(results: dict, out_dir: Path):
    """One SAE per layer (layers_results.json): L0, FVU, loss recovered and the four
    cross-entropies against depth, in one 2x2 figure, layers_depth.png."""
    plt = _plt()
    rows = sorted(results["rows"], key=lambda r: r["layer"])
    layers = [r["layer"] for r in rows]
    color = COLORS.get(results["variant"])
    title = f"{results['model']} {results['site']}, {results['variant']} {results['knob']}={results['value']}"

    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    (a_l0, a_fvu), (a_lr, a_ce) = axes
    a_l0.plot(layers, [r["l0"] for r in rows], "o-", color=color)
    a_l0.set(ylabel="L0 (active latents per token)", title="sparsity")
    a_fvu.plot(layers, [r["fvu"] for r in rows], "o-", color=color)
    a_fvu.set(ylabel="FVU", yscale="log", title="reconstruction (lower is better)")
    for base, style in (("mean", "o-"), ("zero", "s--")):
        a_lr.plot(layers, [r[f"loss_recovered_{base}"] for r in rows], style, color=color,
                  label=f"vs {base}-ablation")
    a_lr.set(xlabel="layer", ylabel="loss recovered", title="splicing the SAE in (1 = no loss)")
    a_lr.legend()
    for key, style, c, label in (("ce_clean", "-", "k", "clean"), ("ce_sae", "o-", color, "SAE spliced in"),
                                 ("ce_mean", "--", "gray", "mean-ablated"), ("ce_zero", ":", "gray", "zero-ablated")):
        a_ce.plot(layers, [r[key] for r in rows], style, color=c, label=label)
    a_ce.set(xlabel="layer", ylabel="cross-entropy (nats/token)", title="held-out next-token loss")
    a_ce.legend(fontsize=8)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)  # layers are whole numbers
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_dir / "layers_depth.png", dpi=120)
    plt.close(fig)


def link_cosines(best: list, baseline: list, path, title: str):
    """Histogram of each latent of A's best-match decoder cosine with B, against random
    directions (minisae.links)."""
    import numpy as np
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    bins = np.linspace(min(min(best), min(baseline)), 1, 50)
    ax.hist(baseline, bins=bins, alpha=0.6, label="random directions (same count, same D)")
    ax.hist(best, bins=bins, alpha=0.6, label="SAE A vs SAE B")
    ax.set(xlabel="best-match cosine of each latent of A", ylabel="latents", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def link_graph(sources: list, edges: list, path, title: str, n_edges: int = 24):
    """Two columns of nodes (A left, B right); the n_edges strongest |edge| (edges: S lists
    of F_b values) as lines, width by strength, red when ablating the source lowers the
    target (i excites j)."""
    import numpy as np
    plt = _plt()
    E = np.asarray(edges, dtype=float)  # (S, F_b)
    flat = np.abs(E).ravel()
    n = min(n_edges, int((flat > 0).sum()))
    keep = np.argsort(-flat, kind="stable")[:n].tolist()
    pairs = [(sources[k // E.shape[1]], k % E.shape[1], float(E.flat[k])) for k in keep]
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
