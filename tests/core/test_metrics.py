"""Every metric against its brute-force definition (Python loops over samples and latents),
and the streamed `Accumulator` over several batches against the one-shot functions."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays

from minisae import metrics

pytestmark = pytest.mark.usefixtures("one_thread")
fast = settings(max_examples=30, deadline=None)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def sparse_codes(B, n_lat, seed, density=0.3):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, n_lat, generator=g, dtype=torch.float64) * (torch.rand(B, n_lat, generator=g) < density)


def cos(u, v):
    return sum(a * b for a, b in zip(u, v)) / math.sqrt(sum(a * a for a in u) * sum(b * b for b in v))


def best_cosines(gt, W):
    return [max(cos(g, w) for w in W.tolist()) for g in gt.tolist()]


# -- per-batch metrics -----------------------------------------------------------------

@fast
@given(f=arrays(np.float64, st.tuples(st.integers(1, 6), st.integers(1, 8)), elements=st.sampled_from([0.0, 0.0, 0.5, 2.0, -1.0])))
def test_l0_counts_nonzeros_per_sample(f):
    counts = [sum(v != 0 for v in row) for row in f.tolist()]
    assert metrics.l0(torch.from_numpy(f)) == pytest.approx(sum(counts) / len(counts), rel=1e-6)


@fast
@given(B=st.integers(2, 8), D=st.integers(1, 6), seed=st.integers(0, 2**16), offset=st.floats(-10, 10))
def test_mse_fvu_gamma_match_definitions(B, D, seed, offset):
    x = randn(B, D, seed=seed) + offset
    x_hat = 0.8 * x + 0.3 * randn(B, D, seed=seed + 1)
    X, H = x.tolist(), x_hat.tolist()
    sq = [sum((a - b) ** 2 for a, b in zip(r, h)) for r, h in zip(X, H)]
    mean = [sum(r[j] for r in X) / B for j in range(D)]
    tot = sum((r[j] - mean[j]) ** 2 for r in X for j in range(D))
    assert metrics.mse(x, x_hat) == pytest.approx(sum(sq) / B, rel=1e-12)
    assert metrics.fvu(x, x_hat) == pytest.approx(sum(sq) / tot, rel=1e-10)
    hat_sq = sum(h * h for r in H for h in r)
    dot = sum(a * b for r, h in zip(X, H) for a, b in zip(r, h))
    assert metrics.shrinkage_gamma(x, x_hat) == pytest.approx(hat_sq / dot, rel=1e-10)


@fast
@given(B=st.integers(1, 8), D=st.integers(1, 6), seed=st.integers(0, 2**16), c=st.floats(0.1, 3))
def test_gamma_is_the_scale_of_a_scaled_reconstruction_and_minimises_the_error(B, D, seed, c):
    """gamma = argmin_g E||x_hat / g - x||^2 (Gated SAE paper, sec. 5.1): for x_hat = c x it
    is c; for any x_hat, moving g away from gamma does not lower the error."""
    x = randn(B, D, seed=seed)
    assert metrics.shrinkage_gamma(x, c * x) == pytest.approx(c, rel=1e-12)
    x_hat = c * x + 0.2 * randn(B, D, seed=seed + 1)
    gamma = metrics.shrinkage_gamma(x, x_hat)
    if gamma > 0:
        err = lambda g: (x_hat / g - x).pow(2).sum().item()
        assert err(gamma) <= min(err(gamma * 1.01), err(gamma / 1.01))


@fast
@given(G=st.integers(1, 6), n_lat=st.integers(1, 6), D=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_cosines_mmcs_and_recovered_fraction(G, n_lat, D, seed):
    gt, W = randn(G, D, seed=seed), randn(n_lat, D, seed=seed + 1)
    ref = [[cos(g, w) for w in W.tolist()] for g in gt.tolist()]
    assert torch.allclose(metrics.cosine_matrix(gt, W), torch.tensor(ref, dtype=torch.float64), atol=1e-12)
    best = best_cosines(gt, W)
    assert metrics.mmcs(gt, W) == pytest.approx(sum(best) / G, rel=1e-10, abs=1e-12)
    for t in (0.0, 0.5, 0.9):
        assert metrics.recovered_frac(gt, W, t) == pytest.approx(sum(b > t for b in best) / G, rel=1e-6)


@fast
@given(n_lat=st.integers(1, 8), D=st.integers(1, 5), seed=st.integers(0, 2**16), log_s=st.floats(-3, 3))
def test_mmcs_of_a_dictionary_containing_the_ground_truth_is_one(n_lat, D, seed, log_s):
    """Each ground-truth direction found, in any order and at any scale, gives MMCS = 1."""
    W = randn(n_lat, D, seed=seed)
    gt = W[torch.randperm(n_lat, generator=torch.Generator().manual_seed(seed))] * math.exp(log_s)
    assert metrics.mmcs(gt, W) == pytest.approx(1.0, abs=1e-12)
    assert metrics.recovered_frac(gt, W) == 1.0


@fast
@given(G=st.integers(4, 20), D=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_mmcs_by_frequency_quartile(G, D, seed):
    """Four groups of features, most frequent first, sizes differing by at most one; each
    value the mean best cosine of its group."""
    gt, W = randn(G, D, seed=seed), randn(6, D, seed=seed + 1)
    probs = torch.rand(G, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    out = metrics.mmcs_by_frequency_quartile(gt, W, probs)
    assert len(out) == 4
    best = best_cosines(gt, W)
    order = sorted(range(G), key=lambda i: -probs[i].item())
    sizes = [G // 4 + (q < G % 4) for q in range(4)]  # e.g. G = 10: 3, 3, 2, 2
    start = 0
    for q, n in enumerate(sizes):
        group = order[start:start + n]
        assert out[q] == pytest.approx(sum(best[i] for i in group) / n, rel=1e-10, abs=1e-12)
        start += n


# -- the streamed accumulator ---------------------------------------------------------

@fast
@given(batch_sizes=st.lists(st.integers(1, 6), min_size=1, max_size=4), D=st.integers(1, 5),
       n_lat=st.integers(1, 8), seed=st.integers(0, 2**16), offset=st.floats(-5, 5))
def test_accumulator_over_batches_equals_one_shot_definitions(batch_sizes, D, n_lat, seed, offset):
    xs = [randn(b, D, seed=seed + i) + offset for i, b in enumerate(batch_sizes)]
    hats = [0.7 * x + 0.2 * randn(*x.shape, seed=seed + 100 + i) for i, x in enumerate(xs)]
    fs = [sparse_codes(b, n_lat, seed + i) for i, b in enumerate(batch_sizes)]
    acc = metrics.Accumulator(n_lat)
    for x, h, f in zip(xs, hats, fs):
        acc.add(x, h, f)
    res = acc.result(dense_threshold=0.25)
    x, x_hat, f = torch.cat(xs), torch.cat(hats), torch.cat(fs)
    N = x.shape[0]
    assert res["l0"] == pytest.approx(metrics.l0(f), rel=1e-6)
    assert res["mse"] == pytest.approx(metrics.mse(x, x_hat), rel=1e-10)
    if N > 1:
        assert res["fvu"] == pytest.approx(metrics.fvu(x, x_hat), rel=1e-8)
    else:  # one sample has no variance: FVU is undefined
        assert math.isnan(res["fvu"])
    assert res["shrinkage_gamma"] == pytest.approx(metrics.shrinkage_gamma(x, x_hat), rel=1e-10)
    fired = [sum(f[b, i].item() != 0 for b in range(N)) for i in range(n_lat)]
    assert res["dead_frac"] == pytest.approx(sum(c == 0 for c in fired) / n_lat)
    assert res["dense_frac"] == pytest.approx(sum(c / N > 0.25 for c in fired) / n_lat)
    for got, c in zip(res["log10_density"], fired):
        assert (got is None) if c == 0 else got == pytest.approx(math.log10(c / N), rel=1e-12, abs=1e-12)


def test_accumulator_undefined_ratios_are_nan_not_a_crash():
    """FVU without variance (a single sample) and gamma with x_hat = 0 (E[x_hat . x] = 0)
    are undefined; the other metrics of such an evaluation are still meaningful."""
    acc = metrics.Accumulator(3)
    acc.add(torch.ones(1, 2), torch.zeros(1, 2), torch.zeros(1, 3))
    res = acc.result()
    assert math.isnan(res["fvu"]) and math.isnan(res["shrinkage_gamma"])
    assert res["mse"] == 2.0 and res["l0"] == 0.0 and res["dead_frac"] == 1.0


def test_accumulator_without_samples_is_a_value_error():
    with pytest.raises(ValueError, match="no samples"):
        metrics.Accumulator(4).result()


@pytest.mark.parametrize("variant", ["relu", "batchtopk"])
def test_evaluate_sae_uses_inference_mode_and_restores_the_mode(random_sae, variant):
    """evaluate_sae streams the batches through the SAE in eval mode (BatchTopK: the fixed
    threshold, not the batch's top k*B) and leaves the SAE as it found it."""
    sae = random_sae(variant, 4, 8, seed=2).train()
    state = {k: v.clone() for k, v in sae.state_dict().items()}
    batches = [randn(5, 4, seed=s) for s in range(3)]
    res = metrics.evaluate_sae(sae, batches)
    assert sae.training
    for k, v in sae.state_dict().items():
        assert torch.equal(v, state[k]), k
    sae.eval()
    acc = metrics.Accumulator(8)
    for x in batches:
        f = sae.encode(x)
        acc.add(x, sae.decode(f), f)
    assert res == acc.result()


def test_density_histogram_counts_the_latents_that_fired():
    dens = [-1.0, None, -2.5, -0.2, None, -1.7]
    counts, edges = metrics.density_histogram(dens, bins=4)
    assert sum(counts) == 4 and len(edges) == 5
    assert edges[0] == -2.5 and edges[-1] == -0.2
    assert metrics.density_histogram([None, None]) == ([], [])


def test_saebench_names_against_per_sample_loops():
    """explained_variance = 1 - FVU; l2_ratio and cossim averaged per sample, as SAELens's
    evals.py computes them (a tiny ||x|| divides by 1), against plain Python loops."""
    g = torch.Generator().manual_seed(0)
    x, x_hat = torch.randn(40, 6, generator=g, dtype=torch.float64), torch.randn(40, 6, generator=g, dtype=torch.float64)
    x[3] = 1e-6  # below SAELens's 1e-4 guard
    acc = metrics.Accumulator(5)
    for i in range(0, 40, 16):
        acc.add(x[i:i + 16], x_hat[i:i + 16], torch.ones(len(x[i:i + 16]), 5))
    r = acc.result()
    norm = lambda v: math.sqrt(sum(t * t for t in v.tolist()))
    ratios = [norm(b) / (norm(a) if norm(a) >= 1e-4 else 1.0) for a, b in zip(x, x_hat)]
    cosines = [float(a @ b) / (norm(a) * norm(b)) for a, b in zip(x, x_hat)]
    assert math.isclose(r["explained_variance"], 1 - metrics.fvu(x, x_hat), rel_tol=1e-12)
    assert math.isclose(r["l2_ratio"], sum(ratios) / 40, rel_tol=1e-12)
    assert math.isclose(r["cossim"], sum(cosines) / 40, rel_tol=1e-12)
