"""Tests for toy_models/superposition.py: diagnostics against per-feature loops in
float64, the model and loss against naive formulas, and short training runs."""

import math

import pytest
import torch

from toy_models.superposition import (
    SuperpositionConfig,
    dimensions_per_feature,
    feature_dimensionality,
    feature_norms,
    forward,
    hidden_activations,
    interference,
    make_figures,
    sample_features,
    toy_loss,
    train,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The toy models are tiny; a second thread only adds synchronisation (as in
    make_figures), which on a busy 2-core machine slowed training ~25x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _naive_diagnostics(W):
    """Per-feature loops over one instance W (D, G): norms, interference, D_i."""
    D, G = W.shape
    norms, interf, dim = [], [], []
    for i in range(G):
        w_i = [W[d, i].item() for d in range(D)]
        n_i = math.sqrt(sum(v * v for v in w_i))
        w_hat = [v / n_i for v in w_i]
        dots_sq = [sum(w_hat[d] * W[d, j].item() for d in range(D)) ** 2 for j in range(G)]
        norms.append(n_i)
        interf.append(sum(dots_sq[j] for j in range(G) if j != i))
        dim.append(n_i ** 2 / sum(dots_sq))
    return norms, interf, dim


def test_diagnostics_match_per_feature_loops():
    W = torch.randn(3, 4, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    norms, interf, dim = feature_norms(W), interference(W), feature_dimensionality(W)
    for k in range(3):
        ref = _naive_diagnostics(W[k])
        torch.testing.assert_close(norms[k], torch.tensor(ref[0], dtype=torch.float64))
        torch.testing.assert_close(interf[k], torch.tensor(ref[1], dtype=torch.float64))
        torch.testing.assert_close(dim[k], torch.tensor(ref[2], dtype=torch.float64))
        frob = sum(W[k, d, i].item() ** 2 for d in range(4) for i in range(7))
        assert dimensions_per_feature(W)[k].item() == pytest.approx(4 / frob, rel=1e-12)


def test_dimensionality_of_known_geometries():
    # orthogonal features each own a dimension: D_i = 1, no interference
    W = torch.eye(3, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    torch.testing.assert_close(feature_dimensionality(W), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(interference(W), torch.zeros(3, dtype=torch.float64))
    # an antipodal pair shares one dimension: D_i = 1/2 each, interference = ||W_j||^2 = 1
    W = torch.tensor([[1.0, -1.0]], dtype=torch.float64)  # (D=1, G=2)
    torch.testing.assert_close(feature_dimensionality(W), torch.full((2,), 0.5, dtype=torch.float64))
    torch.testing.assert_close(interference(W), torch.ones(2, dtype=torch.float64))
    # a regular pentagon in 2-D: 5 features in 2 dimensions, D_i = 2/5
    angles = 2 * math.pi * torch.arange(5, dtype=torch.float64) / 5
    W = torch.stack([angles.cos(), angles.sin()])  # (D=2, G=5)
    torch.testing.assert_close(feature_dimensionality(W), torch.full((5,), 0.4, dtype=torch.float64))
    # a feature the model dropped (W_i = 0) has D_i = 0, not nan
    W = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(feature_dimensionality(W), torch.tensor([1.0, 0.0], dtype=torch.float64))


def test_forward_and_loss_match_naive_formula():
    gen = torch.Generator().manual_seed(1)
    I, B, D, G = 2, 3, 2, 5
    W = torch.randn(I, D, G, generator=gen, dtype=torch.float64)
    b = torch.randn(I, G, generator=gen, dtype=torch.float64)
    x = torch.rand(I, B, G, generator=gen, dtype=torch.float64)
    importance = 0.9 ** torch.arange(G, dtype=torch.float64)
    x_hat = forward(W, b, x)
    for k in range(I):
        total = 0.0
        for s in range(B):
            h = [sum(W[k, d, j].item() * x[k, s, j].item() for j in range(G)) for d in range(D)]
            for i in range(G):
                pre = sum(W[k, d, i].item() * h[d] for d in range(D)) + b[k, i].item()
                assert x_hat[k, s, i].item() == pytest.approx(max(pre, 0.0), abs=1e-12)
                total += importance[i].item() * (x[k, s, i].item() - max(pre, 0.0)) ** 2
        assert toy_loss(x, x_hat, importance)[k].item() == pytest.approx(total / B, rel=1e-12)


def test_sample_features_distribution():
    gen = torch.Generator().manual_seed(2)
    x = sample_features(torch.tensor([1.0, 0.1]), 20_000, 10, gen)  # (2, B, G)
    assert x.shape == (2, 20_000, 10) and x.min() >= 0 and x.max() <= 1
    assert (x[0] == 0).float().mean() < 1e-3  # dense: every feature present
    present = (x[1] > 0).float().mean().item()  # 200k draws: std of the rate ~ 7e-4
    assert present == pytest.approx(0.1, abs=4e-3)
    # present values are U[0, 1]: mean 1/2, variance 1/12
    vals = x[1][x[1] > 0]
    assert vals.mean().item() == pytest.approx(0.5, abs=0.01)
    assert vals.var().item() == pytest.approx(1 / 12, abs=0.005)


def test_dense_keeps_top_two_features_sparse_keeps_more():
    # n=5 features, m=2 dims. Dense (S=0): like PCA, only the 2 most important features,
    # orthogonal. Very sparse (S=0.99): superposition, all 5 features (a pentagon).
    W, _ = train(SuperpositionConfig(n_features=5, n_hidden=2, sparsities=(0.0, 0.99), steps=2000, lr=3e-2))
    dense, sparse = feature_norms(W)  # (G,) each
    assert (dense[:2] > 0.9).all() and (dense[2:] < 0.1).all(), dense
    assert (sparse > 0.5).sum() > 2, sparse
    dim = feature_dimensionality(W)
    torch.testing.assert_close(dim[0, :2], torch.ones(2), atol=0.02, rtol=0)


def test_training_is_deterministic_given_seed():
    cfg = SuperpositionConfig(n_features=6, n_hidden=3, sparsities=(0.0, 0.9), steps=50)
    W1, b1 = train(cfg)
    W2, b2 = train(cfg)
    assert torch.equal(W1, W2) and torch.equal(b1, b2)
    W3, _ = train(SuperpositionConfig(n_features=6, n_hidden=3, sparsities=(0.0, 0.9), steps=50, seed=1))
    assert not torch.equal(W1, W3)


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_features=0), "n_features"),
    (dict(n_hidden=-1), "n_hidden"),
    (dict(steps=0), "steps"),
    (dict(batch_size=0), "batch_size"),
    (dict(sparsities=(0.5, 1.0)), "sparsity"),
    (dict(sparsities=(-0.1,)), "sparsity"),
    (dict(sparsities=()), "sparsities"),
    (dict(lr=0.0), "lr"),
    (dict(importance_decay=-0.5), "importance_decay"),
])
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SuperpositionConfig(**kwargs)


def test_hidden_activations():
    gen = torch.Generator().manual_seed(3)
    W = torch.randn(4, 9, generator=gen)  # (D, G)
    h, dictionary = hidden_activations(W, 500, 0.2, torch.Generator().manual_seed(4))
    assert h.shape == (500, 4) and dictionary.shape == (9, 4)
    torch.testing.assert_close(dictionary.norm(dim=1), torch.ones(9))
    torch.testing.assert_close(dictionary * feature_norms(W)[:, None], W.T)
    # h is W x for the same x that sample_features draws from the same seed
    x = sample_features(torch.tensor([0.2]), 500, 9, torch.Generator().manual_seed(4))[0]
    torch.testing.assert_close(h, x @ W.T)
    with pytest.raises(ValueError, match="feature_prob"):
        hidden_activations(W, 10, 0.0, gen)
    with pytest.raises(ValueError, match="shape"):
        hidden_activations(W[None], 10, 0.5, gen)
    with pytest.raises(ValueError, match="n_samples"):
        hidden_activations(W, 0, 0.5, gen)


@pytest.mark.slow
def test_quick_make_figures_writes_three_pngs(tmp_path):
    results = make_figures(tmp_path, seed=0, quick=True)
    for name in ("n5_m2", "n20_m5", "dimensionality"):
        png = tmp_path / f"superposition_{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert len(results[name]["n_represented"]) == len(results[name]["feature_probs"])
