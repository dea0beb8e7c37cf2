"""The structured options of the synthetic data (toy_models/sparse_features.py):
hierarchy, Zipf frequencies, magnitude noise, bias. With every option off the data must
be bit for bit what it was before they existed (the toy job's results depend on it), so
the plain sampler is written out again here as the reference."""

import math

import pytest
import torch

from toy_models.sparse_features import SparseFeatures, SparseFeaturesConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def gen(seed):
    return torch.Generator().manual_seed(seed)


def plain_reference(G, d, mean_active, decay, correlation, n_factors, seed, n, sample_seed):
    """The sampler before the structured options, with a dense matrix product."""
    g = gen(seed)
    D = torch.randn(G, d, generator=g)
    D = D / D.norm(dim=-1, keepdim=True)
    p = decay ** torch.arange(G, dtype=torch.float64)
    p = (p * mean_active / p.sum()).float()
    s = gen(sample_seed)
    if correlation == 0:
        active = torch.rand(n, G, generator=s) < p
    else:
        A = torch.randn(G, n_factors, generator=g)
        A = A / A.norm(dim=-1, keepdim=True) * correlation ** 0.5
        z = torch.randn(n, n_factors, generator=s)
        u = z @ A.T + torch.randn(n, G, generator=s) * (1 - A.pow(2).sum(-1)).sqrt()
        active = torch.special.ndtr(u) < p
    c = torch.zeros(n, G)
    c[active] = torch.rand(int(active.sum()), generator=s)  # row-major order, as nonzero()
    return D, p, c, c @ D, s


@pytest.mark.parametrize("kw", [dict(), dict(correlation=0.4, n_factors=3), dict(decay=0.9, mean_active=2, seed=7)])
def test_defaults_are_bit_identical_to_the_plain_sampler(kw):
    cfg = SparseFeaturesConfig(**{"n_features": 48, "d": 12, **kw})
    D, p, c, x, s = plain_reference(48, 12, cfg.mean_active, cfg.decay, cfg.correlation, cfg.n_factors, cfg.seed,
                                    n=300, sample_seed=5)
    data = SparseFeatures(cfg)
    g = gen(5)
    x1, c1 = data.sample(300, g)
    assert torch.equal(data.dictionary, D) and torch.equal(data.probs, p) and torch.equal(c1, c)
    assert torch.allclose(x1, x, atol=1e-6)  # index_add_ sums in another order than the matmul
    assert torch.equal(torch.rand(4, generator=g), torch.rand(4, generator=s))  # nothing extra was drawn
    assert data.parents == {} and data.bias is None


def test_default_dataset_unchanged():
    """The toy job's dataset: the same numbers as the plain sampler, exactly."""
    data = SparseFeatures()
    D, p, c, _, _ = plain_reference(512, 256, 5.0, 0.99, 0.0, 8, 0, 1000, 4)
    assert torch.equal(data.dictionary, D) and torch.equal(data.probs, p)
    assert torch.equal(data.sample(1000, gen(4))[1], c)


def tree_cfg(**kw):
    return SparseFeaturesConfig(**{**dict(n_features=60, d=20, mean_active=4, n_parents=2, children_per_parent=3,
                                          hierarchy_depth=2, child_prob=0.8), **kw})


def test_tree_layout_breadth_first():
    data = SparseFeatures(tree_cfg())
    assert data.parents == {0: [2, 3, 4], 1: [5, 6, 7], **{k: [2 + 3 * k + j for j in range(3)] for k in range(2, 8)}}
    assert sorted(data.parents[7]) == [23, 24, 25]  # 2 + 6 + 18 = 26 tree features, 0..25


def test_children_fire_only_with_their_parent_and_exclude_each_other():
    data = SparseFeatures(tree_cfg(correlation=0.5))
    _, c = data.sample(20_000, gen(0))
    active = c > 0
    for p, kids in data.parents.items():
        on = active[:, kids]  # (N, C)
        assert (on.sum(1) <= 1).all()
        assert not (on.any(1) & ~active[:, p]).any()
        # given the parent, some child fires with probability q = 0.8 (binomial, 5 std)
        n_p = active[:, p].sum().item()
        assert abs(on[active[:, p]].any(1).float().mean().item() - 0.8) < 5 * math.sqrt(0.16 / n_p)


@pytest.mark.parametrize("kw", [dict(), dict(zipf_exponent=0.8, n_parents=0), dict(zipf_exponent=0.7)])
def test_marginals_match_the_stated_probabilities(kw):
    """Every feature's frequency within 5 binomial std of p_i; a tree's children have
    p_parent * q / C; the expected count is mean_active."""
    data = SparseFeatures(tree_cfg(**kw))
    p = data.probs.double()
    assert p.sum().item() == pytest.approx(4, rel=1e-6)
    for parent, kids in data.parents.items():
        assert torch.allclose(p[kids], p[parent] * 0.8 / 3, rtol=1e-6)
    n = 40_000
    freq = (data.sample(n, gen(1))[1] > 0).double().mean(0)
    assert ((freq - p).abs() < 5 * (p * (1 - p) / n).sqrt() + 1e-12).all()


def test_zipf_probabilities_follow_the_power_law():
    data = SparseFeatures(SparseFeaturesConfig(n_features=100, d=10, mean_active=1.5, zipf_exponent=1.5))
    p = data.probs.double()
    i = torch.arange(100, dtype=torch.float64)
    assert torch.allclose(p / p[0], (i + 1) ** -1.5, rtol=1e-5)


@pytest.mark.parametrize("std", [0.0, 0.2])
def test_magnitudes_and_bias(std):
    data = SparseFeatures(SparseFeaturesConfig(n_features=30, d=10, mean_active=3, magnitude_std=std, bias_norm=2.0))
    x, c = data.sample(5000, gen(2))
    vals = c[c > 0].double()
    if std == 0:
        assert (vals == 1).all()
    else:  # |N(1, 0.04)|: mean 1 and std 0.2 (folding at 0 is 5 std away)
        assert abs(vals.mean().item() - 1) < 5 * 0.2 / math.sqrt(vals.numel())
        assert vals.std().item() == pytest.approx(0.2, rel=0.05)
    assert data.bias.norm().item() == pytest.approx(2.0)
    assert torch.allclose(x - c @ data.dictionary, data.bias.expand_as(x), atol=1e-5)


def test_determinism_and_shapes():
    a, b = (SparseFeatures(tree_cfg(bias_norm=1, magnitude_std=0.1)) for _ in range(2))
    xa, ca = a.sample(64, gen(3))
    xb, cb = b.sample(64, gen(3))
    assert xa.shape == (64, 20) and ca.shape == (64, 60)
    assert torch.equal(xa, xb) and torch.equal(ca, cb) and torch.equal(a.bias, b.bias)
    assert not torch.equal(ca, a.sample(64, gen(4))[1])


@pytest.mark.parametrize("kw", [dict(n_parents=-1), dict(n_parents=4, children_per_parent=4, hierarchy_depth=2),
                                dict(n_parents=1, child_prob=0), dict(zipf_exponent=-1), dict(magnitude_std=-0.1),
                                dict(bias_norm=-1), dict(n_parents=1, children_per_parent=0)])
def test_invalid_settings_rejected(kw):
    with pytest.raises(ValueError):
        SparseFeatures(SparseFeaturesConfig(**{"n_features": 60, "d": 8, "mean_active": 2, **kw}))
