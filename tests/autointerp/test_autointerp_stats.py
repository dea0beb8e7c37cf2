"""minisae.autointerp.stats against independent references: the sign-flip test against a loop
over every sign pattern (and its Monte-Carlo branch against the exact value), Wilcoxon
against scipy (a test-only reference), the bootstrap against a loop over the same draws."""

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minisae.autointerp import stats


def naive_sign_flip(d):
    """Every one of the 2^n sign patterns, in Python floats."""
    t = abs(sum(d) / len(d))
    hits = sum(abs(sum(s * x for s, x in zip(signs, d)) / len(d)) >= t - 1e-12
               for signs in itertools.product((1, -1), repeat=len(d)))
    return hits / 2 ** len(d)


diffs = st.lists(st.integers(-5, 5).map(float), min_size=1, max_size=12)


@settings(max_examples=60, deadline=None)
@given(diffs)
def test_exact_sign_flip_matches_the_loop(d):
    assert stats.sign_flip_test(d) == pytest.approx(naive_sign_flip(d), abs=1e-12)


def test_monte_carlo_sign_flip_is_near_the_exact_value_and_seeded():
    g = torch.Generator().manual_seed(0)
    d = (torch.randn(18, generator=g, dtype=torch.float64) + 0.5).tolist()  # n = 18 > 16: Monte Carlo
    t = abs(sum(d) / 18)
    signs = torch.tensor(list(itertools.product((1.0, -1.0), repeat=18)), dtype=torch.float64)  # (2^18, 18)
    exact = float(((signs @ torch.tensor(d, dtype=torch.float64)).abs() / 18 >= t - 1e-12).double().mean())
    p = stats.sign_flip_test(d, n_flips=20000, seed=1)
    assert abs(p - exact) < 4 * math.sqrt(exact * (1 - exact) / 20000) + 1e-4
    assert p == stats.sign_flip_test(d, n_flips=20000, seed=1) and p > 0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-6, 6).map(float), min_size=3, max_size=60))
def test_wilcoxon_matches_scipy(d):
    from scipy.stats import wilcoxon
    nonzero = [x for x in d if x != 0]
    if not nonzero:
        return  # nothing to rank: scipy's statistic is undefined
    ref = wilcoxon(d, zero_method="wilcox", correction=False, method="approx").pvalue
    assert stats.wilcoxon_test(d) == pytest.approx(ref, rel=1e-9, abs=1e-12)


def test_bootstrap_matches_a_loop_over_the_same_draws():
    v = [0.1, 0.5, -0.2, 0.9, 0.3, 0.3, 0.0, 1.2]
    m, lo, hi = stats.bootstrap_ci(v, n_boot=500, level=0.9, seed=3)
    idx = torch.randint(0, len(v), (500, len(v)), generator=torch.Generator().manual_seed(3)).tolist()
    means = sorted(sum(v[i] for i in row) / len(row) for row in idx)

    def quantile(q):  # linear interpolation between order statistics (numpy's default)
        h = q * (len(means) - 1)
        return means[int(h)] + (h - int(h)) * (means[min(int(h) + 1, len(means) - 1)] - means[int(h)])
    assert m == pytest.approx(sum(v) / len(v))
    assert (lo, hi) == (pytest.approx(quantile(0.05)), pytest.approx(quantile(0.95)))
    assert lo <= m <= hi
    assert stats.bootstrap_ci([2.0] * 10) == (2.0, 2.0, 2.0)
    assert math.isnan(stats.bootstrap_ci([1.0, math.nan])[1])  # one value left: no interval


def test_paired_verdicts():
    g = torch.Generator().manual_seed(0)
    control = torch.rand(120, generator=g).tolist()
    better = [c + 0.2 + 0.05 * float(torch.randn((), generator=g)) for c in control]
    same = [c + 0.05 * float(torch.randn((), generator=g)) for c in control]
    t = stats.paired(better, control)
    assert t["n"] == 120 and t["diff"][1] > 0.15 and t["p_sign_flip"] < 1e-3 and t["p_wilcoxon"] < 1e-10
    assert stats.separates(t)
    assert not stats.separates(stats.paired(same, control))
    assert not stats.separates(stats.paired(control, better))  # significant, but the wrong way
    t = stats.paired([1.0, math.nan, 2.0, None], [0.0, 0.0, math.nan, 1.0])
    assert t["n"] == 1  # a latent missing either score leaves the pair
