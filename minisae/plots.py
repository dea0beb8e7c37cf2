"""Figures, drawn from the result files (never by hand). One function per figure family;
each reads plain dicts and lists so a figure can be redrawn from the JSON alone."""

import math
from pathlib import Path

import numpy as np

from minisae.utils import atomic_write, pyplot

COLORS = {"relu": "tab:blue", "gated": "tab:orange", "topk": "tab:green", "jumprelu": "tab:red",
          "batchtopk": "tab:purple"}


def _plt():
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
    ax.set(xticks=list(xs), xticklabels=variants, ylim=(min(mm + rf) - 0.05, 1.02), title="Ground-truth recovery",
           ylabel="score (1 = every true feature found)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, fontsize=8)
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

    # (c) shrinkage: gamma per variant, and true vs recovered magnitudes, one panel per
    # variant so that neither cloud hides the other
    shown = [v for v in ("relu", "topk") if v in extras]
    fig, axes = plt.subplots(1, 1 + len(shown), figsize=(4.2 * (1 + len(shown)), 4))
    a1 = axes[0]
    gam = [results["variants"][v]["shrinkage_gamma"] for v in variants]
    a1.bar(list(xs), gam, color=[COLORS[v] for v in variants])
    a1.axhline(1.0, color="k", lw=1)
    for x, g in zip(xs, gam):
        a1.text(x, g, f"{g:.3f}", ha="center", va="bottom", fontsize=8)
    a1.set(xticks=list(xs), xticklabels=variants, ylim=(min(gam) - 0.05, max(gam) + 0.03),
           ylabel="gamma", title="reconstruction bias gamma (1 = unbiased)")
    for ax, v in zip(axes[1:], shown):
        c, f = extras[v]["magnitudes"]
        ax.plot(c, f, ".", ms=1.5, alpha=0.25, color=COLORS[v])
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="code = true coefficient")
        ax.set(xlabel="true coefficient c_i", ylabel="code of the matching latent", xlim=(0, 1), ylim=(0, 1.1),
               title=f"{v}: " + ("L1 shrinks codes below the line" if v == "relu" else "codes on the line"))
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "toy_shrinkage.png", dpi=120)
    plt.close(fig)


def _by_variant(rows):
    out = {}
    for r in rows:
        out.setdefault(r["variant"], []).append(r)
    return {v: sorted(rs, key=lambda r: r["l0"]) for v, rs in out.items()}


def _l0_axis(ax, l0s):
    """A log L0 axis with plain tick labels (10, 20, 50, ...) that do not collide."""
    from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter
    ax.set_xscale("log")
    lo, hi = min(l0s), max(l0s)
    ticks = [t for t in (1, 2, 3, 5, 10, 20, 30, 50, 100, 200, 300, 500, 1000, 2000) if lo / 1.25 <= t <= hi * 1.25]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlim(lo / 1.25, hi * 1.25)
    ax.set_xlabel("L0 (active latents per token, log scale)")


def _log_y_plain(ax):
    """Log y axis labelled 0.05, 0.1, 0.2, ... instead of 5 x 10^-2."""
    from matplotlib.ticker import FormatStrFormatter, LogLocator
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_locator(LogLocator(subs=(2.0, 3.0, 5.0)))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))


BAND = (30, 60)  # L0 where the variants are compared at matched sparsity (docs/05_smollm2.md)


def _band(ax):
    ax.axvspan(*BAND, color="0.92", zorder=0, label=f"L0 {BAND[0]}-{BAND[1]}: compared at matched L0")


def lm_figures(results: dict, out_dir: Path):
    """L0 vs loss recovered against both ablations and KL vs L0 side by side (the Gated
    SAE paper's figure; upper-left is better for loss recovered, lower-left for KL), FVU
    vs L0, and the density histograms, from lm_results.json's content. Error bars: one
    standard error of CE_sae - CE_clean (rows that have it); open markers: loss recovered
    with the sinks replaced too (rows that have it)."""
    plt = _plt()
    groups = _by_variant(results["rows"])
    l0s = [r["l0"] for r in results["rows"]]
    title = f"{results['model']} {results['hook']}"

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    for ax, base in zip(axes, ("mean", "zero")):
        _band(ax)
        ax.axhline(1.0, color="k", lw=0.8, ls=":", label="1 = as good as the clean model")
        for v, rs in groups.items():
            ys = [r[f"loss_recovered_{base}"] for r in rs]
            se = [r.get(f"loss_recovered_{base}_se") for r in rs]
            ax.errorbar([r["l0"] for r in rs], ys, yerr=None if None in se else se, fmt="o-",
                        color=COLORS.get(v), label=v, capsize=3)
            sinks = [(r["l0"], r[f"loss_recovered_{base}_with_sinks"]) for r in rs
                     if r.get(f"loss_recovered_{base}_with_sinks") is not None]
            if sinks:
                ax.plot(*zip(*sinks), "o", mfc="none", color=COLORS.get(v))
        if any(r.get(f"loss_recovered_{base}_with_sinks") is not None for r in results["rows"]):
            ax.plot([], [], "o", mfc="none", color="0.3", label="open: sinks replaced too")
        _l0_axis(ax, l0s)
        ax.set(ylabel=f"loss recovered vs {base}-ablation", title=f"loss recovered ({base}-ablation)")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()  # one key for all three panels, below them
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    ax = axes[2]
    _band(ax)
    for v, rs in groups.items():
        ax.plot([r["l0"] for r in rs], [r["kl"] for r in rs], "o-", color=COLORS.get(v), label=v)
    _l0_axis(ax, l0s)
    _log_y_plain(ax)
    ax.set(ylabel="KL(clean || SAE spliced in), nats/token", title="KL to the clean model (lower is better)")
    ax.grid(alpha=0.3, which="both")
    fig.suptitle(f"{title}: splicing each SAE into the model")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(out_dir / "lm_l0_loss_recovered.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4.4))
    _band(ax)
    for v, rs in groups.items():
        ax.plot([r["l0"] for r in rs], [r["fvu"] for r in rs], "o-", color=COLORS.get(v), label=v)
    _l0_axis(ax, l0s)
    _log_y_plain(ax)
    ax.set(ylabel="FVU (fraction of variance unexplained)",
           title="reconstruction (lower-left is better)")
    fig.suptitle(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
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
    directions (minisae.interp.links)."""
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


def norms_figure(ratio, path: Path, title: str, max_norm_multiple: float, bands: tuple):
    """The histogram of activation norm / median norm over positions (`python -m minisae norms`)."""
    plt = _plt()
    r = ratio.flatten().numpy()
    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.geomspace(min(r.min(), 0.3), max(r.max(), 100) * 1.1, 80)
    ax.hist(r, bins=bins, color="tab:blue")
    ax.axvline(max_norm_multiple, color="tab:red", ls="--", lw=1,
               label=f"{max_norm_multiple:g}x the median: above it a position is a sink (kept clean)")
    ax.axvspan(*bands, color="0.93", zorder=0, label=f"{bands[0]:g}x-{bands[1]:g}x")
    ax.set(xscale="log", yscale="log", xlabel="norm / median norm (log scale)",
           ylabel="positions (log scale)", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def autointerp_figure(summaries, path, model: str):
    """Per SAE, the mean detection and simulation scores of the explanations beside the
    token-set baseline and the control (`python -m minisae explain`)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    keys = [("detection_balanced_accuracy", "detection: balanced accuracy", 0.5),
            ("detection_auroc", "detection: AUROC of P(yes)", 0.5),
            ("simulation_correlation", "simulation: correlation r", 0.0)]
    xs = range(len(summaries))
    for ax, (key, title, chance) in zip(axes, keys):
        kinds = (("explanation", "C0", "LLM explanation"), ("baseline", "C2", "token-set baseline"),
                 ("control", "C7", "shuffled control"), ("baseline_rule", "C1", "token set, read by rule (no LLM)"))
        for off, (kind, color, label) in enumerate(kinds):
            ax.bar([x + (off - 1.5) * 0.2 for x in xs], [s.get(f"{kind}_{key}", math.nan) for s in summaries], 0.2,
                   color=color, label=label)
        ax.axhline(chance, color="k", lw=0.8, ls="--")
        ax.set_xticks(list(xs), [f"{s['sae']}\nL0 {s['l0']:.0f}" for s in summaries], fontsize=7)
        ax.set_title(title, fontsize=9)
    axes[0].legend(fontsize=7)
    n = min(s["n_latents"] for s in summaries)
    fig.suptitle(f"Automated interpretability, scorer = explainer = {model}, "
                 f">= {n} latents per SAE", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def autointerp_verdict_figure(summaries, path, model: str):
    """One panel per scorer: per SAE the mean score with its 95% bootstrap interval over
    latents, first the known answers (token set vs shuffled token set: the validation),
    then the explainer's sentences vs the shuffled control; a blind scorer's panel is
    greyed and says so (minisae.autointerp.verdict)."""
    plt = _plt()
    methods = list(dict.fromkeys(m for s in summaries for m in s["verdict"]))  # every scorer any run used
    missing = {"validation": None, "validated": None, "result": {k: (math.nan,) * 3 for k in ("score", "control")}}
    fig, axes = plt.subplots(1, len(methods), figsize=(6 * len(methods), 5), squeeze=False)
    xs = range(len(summaries))
    for ax, m in zip(axes[0], methods):
        vs = [s["verdict"].get(m) or missing for s in summaries]
        bars = [("result", "score", "C0", "explainer's sentence" if m != "intruder" else "P(intruder)"),
                ("result", "control", "C7", "shuffled sentence" if m != "intruder" else "chance 1/k")]
        if m != "intruder":
            vs = [v if v["validation"] else {**v, "validation": v["result"]} for v in vs]  # a run without m: NaN
            bars = [("validation", "score", "C2", "token set (true by construction)"),
                    ("validation", "control", "C1", "shuffled token set")] + bars
        for off, (part, side, color, label) in enumerate(bars):
            shown = list(vs) if part == "validation" else \
                [v if v["validated"] is not False else None for v in vs]  # a blind scorer's results are not drawn
            ci = [v[part][side] if v else (math.nan,) * 3 for v in shown]  # (mean, low, high) per SAE
            mean, err = [c[0] for c in ci], [[c[0] - c[1] for c in ci], [c[2] - c[0] for c in ci]]
            ax.bar([x + (off - (len(bars) - 1) / 2) * 0.2 for x in xs], mean, 0.2, yerr=err, capsize=2,
                   color=color, label=label)
        blind = [v["validated"] is False for v in vs]
        if any(blind):
            ax.set_facecolor("0.92")  # grey: this scorer failed its validation for some SAE
        ax.axhline(0.25 if m == "intruder" else 0.0, color="k", lw=0.8, ls="--")
        ax.set_xticks(list(xs), [f"{s['sae']}\nL0 {s['l0']:.0f}" + ("\nBLIND" if b else "")
                                 for s, b in zip(summaries, blind)], fontsize=6, rotation=35, ha="right")
        ax.set_title({"surprisal": "surprisal: gain gap, nats/token", "overlap": "token overlap: gap",
                      "intruder": "intruder: P(correct), no explanation", "detection": "detection: AUROC",
                      "simulation": "simulation: r"}.get(m, m), fontsize=9)
        ax.legend(fontsize=6)
    n = min(max(v["validation"]["n"] if v["validation"] else 0, v["result"]["n"])
            for s in summaries for v in s["verdict"].values())
    fig.suptitle(f"Automated interpretability with validated scorers, explainer = scorer = {model}; "
                 f">= {n} latents per SAE, 95% bootstrap intervals", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def absorption_figures(results: dict, out_dir: Path):
    """The absorption job's figures (minisae/toy/absorption.py), from its JSON alone."""
    plt = _plt()
    variants = list(results["variants"])
    rows = results["variants"]
    colors = [COLORS.get(v, "tab:brown") for v in variants]  # matryoshka_batchtopk: brown
    xs = list(range(len(variants)))

    # (a) the scores: absorption rate (lower is better), MCC and F1 (higher is better);
    # dots are the seeds, bars their mean
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    a1.bar(xs, [rows[v]["absorption"] for v in variants], color=colors, alpha=0.8)
    for x, v in zip(xs, variants):
        seeds = [r["absorption"] for r in rows[v]["per_seed"]]
        a1.plot([x] * len(seeds), seeds, "k.", ms=4)
        a1.text(x, rows[v]["absorption"], f"{rows[v]['absorption']:.2f}", ha="center", va="bottom", fontsize=8)
    a1.set(xticks=xs, ylabel="absorption rate (0 = none, the truth's)", ylim=(0, 1.05),
           title="Parent latent silent while its child's latent fires")
    a1.set_xticklabels(variants, rotation=20, fontsize=8)
    for off, key, label in ((-0.2, "mcc", "MCC (codes, one-to-one)"), (0.2, "f1", "F1 of the matched latents")):
        vals = [rows[v][key] for v in variants]
        a2.bar([x + off for x in xs], vals, 0.4, label=label, color=colors,
               alpha=0.9 if key == "mcc" else 0.45, edgecolor="k", lw=0.5)
        for x, val in zip(xs, vals):
            a2.text(x + off, val, f"{val:.2f}", ha="center", va="bottom", fontsize=7)
    low = min(min(rows[v]["mcc"], rows[v]["f1"]) for v in variants)
    a2.set(xticks=xs, ylim=(max(0, low - 0.1), 1.04), ylabel="score (1 = the truth)", title="Recovery of the truth")
    a2.set_xticklabels(variants, rotation=20, fontsize=8)
    a2.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(out_dir / "absorption_scores.png", dpi=120)
    plt.close(fig)

    # (b) one parent and its children, per variant: what each matched latent points at
    # (decoder cosines) and when it fires. Absorption reads as a parent column that is
    # empty in every "with child" row, and child latents that point half at the parent.
    fig, axes = plt.subplots(2, len(variants), figsize=(2.6 * len(variants), 6.4), squeeze=False)
    for j, v in enumerate(variants):
        view = rows[v]["parent_view"]
        names = [f"p{view['parent']}"] + [f"k{k}" for k in view["children"]]
        lat = [f"#{i}" for i in view["latents"]]
        for ax, key, ylabels, title in ((axes[0, j], "cosines", [f"{n}: {l}" for n, l in zip(names, lat)], "cos(W_dec, g)"),
                                        (axes[1, j], "firing", ["p alone"] + [f"p + {n}" for n in names[1:]],
                                         "P(latent fires)")):
            mat = np.array(view[key])
            ax.imshow(mat, cmap="Blues" if key == "firing" else "RdBu_r", vmin=0 if key == "firing" else -1, vmax=1)
            for (r, c), val in np.ndenumerate(mat):
                ax.text(c, r, f"{val:.1f}", ha="center", va="center", fontsize=6,
                        color="white" if abs(val) > 0.6 else "black")
            ax.set_xticks(range(len(names)))
            ax.set_xticklabels(names if key == "cosines" else lat, fontsize=6, rotation=90)
            ax.set_yticks(range(len(ylabels)))
            ax.set_yticklabels(ylabels if j == 0 else [], fontsize=6)
            ax.set_title(f"{v}\n{title}" if key == "cosines" else title, fontsize=8, pad=3)
    axes[0, 0].set_ylabel("matched latent (rows)", fontsize=7)
    axes[1, 0].set_ylabel("samples where", fontsize=7)
    fig.suptitle("One parent p and its children k: top, each matched latent's cosine with the true "
                 "directions; bottom, how often each fires", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_dir / "absorption_parent.png", dpi=120)
    plt.close(fig)

    # (c) the frontier on both datasets: the hierarchy lets a latent stand for two features
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, data in zip(axes, ("hierarchical", "independent")):
        for v, rs in _by_variant([r for r in results["sweep"] if r["data"] == data]).items():
            ax.plot([r["l0"] for r in rs], [r["fvu"] for r in rs], "o-", color=COLORS.get(v, "tab:brown"), label=v, ms=4)
        ax.axvline(results["truth"]["l0"], color="gray", ls=":", lw=1)
        ax.set(xlabel="L0 (active latents per sample)", yscale="log", title=f"{data} features")
    axes[0].set_ylabel("FVU (lower-left is better)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "absorption_frontier.png", dpi=120)
    plt.close(fig)


def first_letter_figure(results: dict, path):
    """Per letter: each SAE's absorption rate (top) and absorption fraction (middle), blank where a
    letter is left out of the means; the probe's held-out accuracy (bottom)."""
    plt = _plt()
    letters = "abcdefghijklmnopqrstuvwxyz"
    fig, axes = plt.subplots(3, 1, figsize=(11, 8), sharex=True, gridspec_kw={"height_ratios": [2, 2, 1]})
    xs, n = np.arange(len(letters), dtype=float), len(results["saes"])
    width = 0.8 / max(1, n)
    for j, row in enumerate(results["saes"]):
        at = (xs + (j - (n - 1) / 2) * width).tolist()
        per = row["per_letter"]
        for ax, key, value in ((axes[0], "absorption_rate", lambda r: r["rate"]),
                               (axes[1], "absorption_fraction", lambda r: r["fraction_sum"] / r["measured"])):
            ax.bar(at, [value(per[L]) if L in row["letters"] else float("nan") for L in letters], width,
                   label=f"{row['name']} (mean {'-' if row[key] is None else format(row[key], '.4f')})")
    for ax, label in zip(axes, ("absorption rate", "absorption fraction", "probe accuracy")):
        ax.set_ylabel(label)
    for ax in axes[:2]:
        ax.set_ylim(0, ax.get_ylim()[1] * 1.5)  # room for the legend above the bars
        ax.legend(fontsize=7, ncol=2, loc="upper left")
    axes[2].bar(xs.tolist(), [results["probe"]["per_letter"][L]["accuracy"] or 0.0 for L in letters], 0.6,
                color="grey")
    axes[2].set_xticks(xs.tolist(), list(letters))
    axes[0].set_title(f"First letters at {results['model']} {results['hook']}, on the words the probe gets right")
    fig.tight_layout()
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=120))
    plt.close(fig)


CIRCUIT_PANELS = [("graph", "replacement", "graph vs the replacement model\n(SAEs spliced in, errors frozen)"),
          ("graph", "real", "graph vs the real model\n(one decoder term removed)"),
          ("real_gradient", "real", "real model's gradient x activation\nvs the real model")]


def circuit_interventions_figure(pairs, stats, path):
    """Predicted against measured change of the target logit, one panel per comparison."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(CIRCUIT_PANELS), figsize=(14, 4.6))
    for ax, (pred, key, title) in zip(axes, CIRCUIT_PANELS):
        x = [p[f"predicted_{pred}"] for p in pairs]
        y = [p[f"measured_{key}"] for p in pairs]
        ax.scatter(x, y, s=12, alpha=0.7)
        lo, hi = min(x + y), max(x + y)
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        s = stats[f"{pred}_vs_{key}"]
        ax.set(xlabel="predicted change of the target logit", ylabel="measured change",
               title=f"{title}\nPearson {s['pearson']:.2f}, Spearman {s['spearman']:.2f}, n={s['n']}")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
