"""Statistics that decide: a score per SAE with an interval, and a paired test against a control.

Every scorer gives one number per latent, s_i, and the same scorer gives the control a
number on the same latent's windows, c_i (another latent's explanation). The latents are
the sample (n >= 100), so both the interval and the test resample over latents:

    mean        m = (1/n) sum_i s_i
    interval    percentile bootstrap: draw n latents with replacement B times, take the
                mean of each draw; the interval is the (alpha/2, 1 - alpha/2) quantiles of
                those B means (Efron & Tibshirani 1993, ch. 13)
    paired d_i = s_i - c_i; H0: d_i is symmetric about 0 (the explanation is worth no more
                than another latent's)
    sign flip   T = |mean d|; under H0 each sign is a fair coin, so
                p = (1 + #{flips with |mean(e * d)| >= T}) / (1 + n_flips),  e_i = +-1
                (exact over all 2^n flips when n <= 16; else n_flips seeded random flips,
                the +1 keeps p > 0 as a Monte-Carlo p-value must be; Phipson & Smyth 2010)
    Wilcoxon    W+ = sum of the ranks of |d_i| over d_i > 0 (zeros dropped, ties averaged);
                z = (W+ - n(n+1)/4) / sqrt(n(n+1)(2n+1)/24 - sum_t (t^3 - t)/48),
                p = erfc(|z| / sqrt 2), two-sided, normal approximation (n >= 25 or so)

A scorer is *validated* when it separates explanations true by construction from shuffled
ones at p < ALPHA by the sign-flip test; otherwise it is *blind* and its scores are not results.
"""

import itertools
import math

import torch

ALPHA = 0.01  # the significance every verdict of the chapter uses


def _clean(values):
    v = torch.as_tensor([x for x in values if x is not None and not math.isnan(x)], dtype=torch.float64)  # (n,)
    return v


def bootstrap_ci(values, n_boot: int = 10000, level: float = 0.95, seed: int = 0) -> tuple:
    """(mean, low, high): the percentile bootstrap interval of the mean; NaNs left out."""
    v = _clean(values)  # (n,)
    if len(v) < 2:
        return (float(v.mean()) if len(v) else math.nan, math.nan, math.nan)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(v), (n_boot, len(v)), generator=g)  # (B, n): B resamples of the latents
    means = v[idx].mean(1)  # (B,)
    a = (1 - level) / 2
    lo, hi = torch.quantile(means, torch.tensor([a, 1 - a], dtype=torch.float64)).tolist()
    return float(v.mean()), lo, hi


def sign_flip_test(diffs, n_flips: int = 10000, seed: int = 0) -> float:
    """Two-sided p-value of H0 'd is symmetric about 0' (paired permutation test); NaNs left out."""
    d = _clean(diffs)  # (n,)
    n = len(d)
    if n == 0:
        return math.nan
    t = d.mean().abs()
    if n <= 16:  # every one of the 2^n sign patterns: the exact null distribution
        signs = torch.tensor(list(itertools.product((1.0, -1.0), repeat=n)), dtype=torch.float64)  # (2^n, n)
        null = (signs * d).mean(1).abs()  # (2^n,)
        return float((null >= t - 1e-12).double().mean())
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n_flips, n), generator=g).double() * 2 - 1  # (n_flips, n)
    null = (signs * d).mean(1).abs()  # (n_flips,)
    return float((1 + (null >= t - 1e-12).sum()) / (1 + n_flips))


def average_ranks(x) -> torch.Tensor:
    """Ranks 1..n of x, tied values sharing their average rank."""
    x = torch.as_tensor(x, dtype=torch.float64)  # (n,)
    ranks = torch.empty_like(x)
    ranks[x.argsort()] = torch.arange(1, len(x) + 1, dtype=torch.float64)
    for v in x.unique():
        tie = x == v
        ranks[tie] = ranks[tie].mean()
    return ranks


def wilcoxon_test(diffs) -> float:
    """Two-sided p-value of the Wilcoxon signed-rank test, normal approximation, zeros dropped."""
    d = _clean(diffs)
    d = d[d != 0]  # (n,)
    n = len(d)
    if n == 0:
        return math.nan
    r = average_ranks(d.abs())  # (n,)
    w_plus = r[d > 0].sum()
    _, counts = d.abs().unique(return_counts=True)
    var = n * (n + 1) * (2 * n + 1) / 24 - float((counts.double() ** 3 - counts).sum()) / 48
    if var <= 0:
        return 1.0
    z = (float(w_plus) - n * (n + 1) / 4) / math.sqrt(var)
    return math.erfc(abs(z) / math.sqrt(2))


def paired(scores, control, seed: int = 0) -> dict:
    """The verdict on one scorer's scores against its control, latent by latent: both means
    with their bootstrap intervals, the mean difference with its interval, both p-values,
    and the latents counted (a latent missing either score is left out of the pair)."""
    pairs = [(s, c) for s, c in zip(scores, control)
             if s is not None and c is not None and not math.isnan(s) and not math.isnan(c)]
    s, c = [p[0] for p in pairs], [p[1] for p in pairs]
    d = [a - b for a, b in pairs]
    return {"n": len(pairs), "score": bootstrap_ci(s, seed=seed), "control": bootstrap_ci(c, seed=seed),
            "diff": bootstrap_ci(d, seed=seed), "p_sign_flip": sign_flip_test(d, seed=seed),
            "p_wilcoxon": wilcoxon_test(d)}


def separates(test: dict, alpha: float = ALPHA) -> bool:
    """The score beats its control: the mean difference is positive and p < alpha."""
    return test["n"] > 0 and test["diff"][0] > 0 and test["p_sign_flip"] < alpha
