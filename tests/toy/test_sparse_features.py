"""The synthetic sparse-features dataset (Sharkey et al. 2022): determinism, the stated
probabilities, and statistical checks whose tolerances are derived from the sampling
noise (several standard deviations; the generators are seeded, so they are also stable)."""

import math

import pytest
import torch

from toy_models.sparse_features import SparseFeatures, SparseFeaturesConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_seeded_determinism():
    a, b, c = (SparseFeatures(SparseFeaturesConfig(n_features=64, d=16, correlation=0.3, seed=s)) for s in (3, 3, 4))
    assert torch.equal(a.dictionary, b.dictionary) and torch.equal(a.probs, b.probs) and torch.equal(a.factors, b.factors)
    assert not torch.equal(a.dictionary, c.dictionary)
    xa, ca = a.sample(50, gen(0))
    xb, cb = b.sample(50, gen(0))
    assert torch.equal(xa, xb) and torch.equal(ca, cb)
    assert not torch.equal(ca, a.sample(50, gen(1))[1])


def test_dictionary_rows_unit_norm_and_probabilities_as_stated():
    """Defaults: G = 512 features in d = 256, p_i = s * 0.99^i with sum p_i = 5, so
    p_0 / p_511 = 0.99^-511 (about 169)."""
    data = SparseFeatures()
    assert data.dictionary.shape == (512, 256)
    assert torch.allclose(data.dictionary.norm(dim=-1), torch.ones(512), atol=1e-6)
    assert torch.equal(data.ground_truth, data.dictionary / data.dictionary.norm(dim=-1, keepdim=True))
    p = data.probs.double()
    assert p.sum().item() == pytest.approx(5.0, rel=1e-6)
    assert (p[0] / p[511]).item() == pytest.approx(0.99 ** -511, rel=1e-5)
    assert torch.allclose(p[1:] / p[:-1], torch.full((511,), 0.99, dtype=torch.float64), rtol=1e-5)
    assert p[0].item() == pytest.approx(5 * 0.01 / (1 - 0.99 ** 512), rel=1e-6)


def test_samples_are_sums_of_active_features_with_uniform_coefficients():
    data = SparseFeatures(SparseFeaturesConfig(n_features=40, d=8, mean_active=4))
    x, c = data.sample(30, gen(0))
    assert ((c >= 0) & (c < 1)).all()
    D = data.dictionary.tolist()
    for xb, cb in zip(x.tolist(), c.tolist()):
        ref = [sum(cb[i] * D[i][j] for i in range(40)) for j in range(8)]
        assert xb == pytest.approx(ref, abs=1e-5)


def test_mean_number_of_active_features_is_five():
    """The count per sample is a sum of independent Bernoullis: variance sum p(1-p) < 5, so
    the mean over N = 10,000 samples has std < sqrt(5 / N) = 0.022; tolerance 5 std.
    Coefficients are U[0, 1], so the mean coefficient of an active feature is 1/2
    (std of that mean ~ sqrt(1/12 / 50,000) = 0.0013)."""
    data = SparseFeatures()
    _, c = data.sample(10_000, gen(0))
    active = c > 0
    p = data.probs.double()
    std = math.sqrt((p * (1 - p)).sum().item() / 10_000)
    assert abs(active.sum(1).double().mean().item() - 5.0) < 5 * std
    assert abs(c[active].double().mean().item() - 0.5) < 5 * math.sqrt(1 / 12 / active.sum().item())


def freq_z_scores(active, p):
    """(empirical frequency - p) / its binomial std, per feature."""
    n = active.shape[0]
    return (active.double().mean(0) - p) / (p * (1 - p) / n).sqrt()


def phi(active, i, j):
    """Correlation coefficient of two features' activity indicators."""
    a, b = active[:, i].double(), active[:, j].double()
    return torch.corrcoef(torch.stack([a, b]))[0, 1].item()


@pytest.mark.parametrize("correlation", [0.0, 0.6])
def test_marginal_probabilities_are_kept(correlation):
    """Each feature fires with its p_i, with or without the Gaussian copula. With 64
    features at N = 20,000, a per-feature |z| above 5 has probability ~4e-5 in all."""
    data = SparseFeatures(SparseFeaturesConfig(n_features=64, d=16, mean_active=6, decay=0.97, correlation=correlation))
    _, c = data.sample(20_000, gen(1))
    z = freq_z_scores(c > 0, data.probs.double())
    assert z.abs().max() < 5


def joint_active_prob(p_i, p_j, r):
    """P(both active) under the Gaussian copula: P(u_i < a, u_j < b) for standard normals
    with correlation r, a = Phi^-1(p_i), b = Phi^-1(p_j), by integrating over u_i:
        int_{-inf}^{a} phi(t) Phi((b - r t) / sqrt(1 - r^2)) dt   (trapezoid rule)."""
    a, b = torch.special.ndtri(torch.tensor([p_i, p_j], dtype=torch.float64))
    t = torch.linspace(-12, a.item(), 100_001, dtype=torch.float64)
    dens = torch.exp(-t ** 2 / 2) / math.sqrt(2 * math.pi) * torch.special.ndtr((b - r * t) / math.sqrt(1 - r * r))
    return torch.trapezoid(dens, t).item()


def test_correlated_features_co_occur_as_the_copula_says():
    """For the 5 most positively and 5 most negatively correlated pairs (rho_ij = <a_i, a_j>),
    the frequency of both firing matches the bivariate-normal probability (|z| < 5), which
    is above p_i p_j for rho > 0 and below for rho < 0; without correlation the pairs are
    independent (phi within 5 / sqrt(N))."""
    cfg = SparseFeaturesConfig(n_features=32, d=16, mean_active=6, decay=0.97, correlation=0.6, n_factors=4)
    data = SparseFeatures(cfg)
    rho = (data.factors @ data.factors.T).double().triu(1)  # (G, G), each pair once
    n = 20_000
    active = data.sample(n, gen(2))[1] > 0
    active0 = SparseFeatures(SparseFeaturesConfig(**{**cfg.__dict__, "correlation": 0.0})).sample(n, gen(2))[1] > 0
    p = data.probs.double().tolist()
    pairs = [divmod(int(k), 32) for k in torch.cat([rho.flatten().topk(5).indices, (-rho).flatten().topk(5).indices])]
    for i, j in pairs:
        r = rho[i, j].item()
        ref = joint_active_prob(p[i], p[j], r)
        assert (ref > p[i] * p[j]) == (r > 0)
        both = (active[:, i] & active[:, j]).double().mean().item()
        assert abs(both - ref) < 5 * math.sqrt(ref * (1 - ref) / n), (i, j, r)
        assert abs(phi(active0, i, j)) < 5 / math.sqrt(n)


def test_from_superposition_uses_columns_exactly():
    W = torch.randn(5, 12, generator=gen(0))
    probs = torch.rand(12, generator=gen(1)) * 0.3
    data = SparseFeatures.from_superposition(W, probs)
    x, c = data.sample(20, gen(2))
    assert torch.allclose(x, c @ W.T, atol=1e-6)
    assert torch.allclose(data.ground_truth, (W / W.norm(dim=0)).T, atol=1e-6)
    assert torch.equal(data.probs, probs)


@pytest.mark.parametrize("kw,match", [
    ({"n_features": 0}, "positive sizes"), ({"d": 0}, "positive sizes"), ({"d": -4}, "positive sizes"),
    ({"mean_active": 0.0}, "mean_active"), ({"mean_active": -1.0}, "mean_active"),
    ({"decay": 0.0}, "decay"), ({"decay": 1.5}, "decay"),
    ({"correlation": 1.0}, "correlation"), ({"correlation": -0.1}, "correlation"),
    ({"n_features": 10, "mean_active": 11.0}, "too large"),
    ({"correlation": 0.5, "n_factors": 0}, "n_factors"), ({"correlation": 0.5, "n_factors": -2}, "n_factors"),
])
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        SparseFeatures(SparseFeaturesConfig(**kw))
