"""Training that cannot be going anywhere stops with the likely cause, not a "successful"
run with FVU 1e7: a diverging loss, every latent dead, data that runs out, and settings
that cannot work are all clear errors."""

import math

import pytest
import torch

from minisae.sae import make_sae
from minisae.train import TrainConfig, train


def stream(d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randn(64, d, generator=g)


def test_a_huge_learning_rate_is_reported_as_divergence():
    sae = make_sae("relu", 8, 32, sparsity_coef=1e-3)
    cfg = TrainConfig(n_samples=64 * 200, batch_size=64, lr=1e3, log_every=10)
    with pytest.raises(FloatingPointError, match="diverged|every latent is dead|loss became"):
        train(sae, stream(), cfg, log=False)


def test_every_latent_dead_is_reported():
    sae = make_sae("relu", 8, 32, sparsity_coef=1e-3)
    with torch.no_grad():
        sae.b_enc.fill_(-1e4)  # no latent can fire
    cfg = TrainConfig(n_samples=64 * 40, batch_size=64, lr=1e-4, log_every=5, dead_after=64 * 10)
    with pytest.raises(FloatingPointError, match="every latent is dead"):
        train(sae, stream(), cfg, log=False)


def test_a_normal_run_is_not_stopped():
    sae = make_sae("topk", 8, 32, k=4)
    out = train(sae, stream(), TrainConfig(n_samples=64 * 100, batch_size=64, lr=1e-3, log_every=10), log=False)
    assert out["history"][-1]["loss"] < out["history"][0]["loss"]


def test_data_that_runs_out():
    sae = make_sae("relu", 8, 32)
    cfg = TrainConfig(n_samples=64 * 10, batch_size=64, lr=1e-3)
    with pytest.raises(ValueError, match="ran out after 3 of 10 steps"):
        train(sae, iter([torch.randn(64, 8) for _ in range(3)]), cfg, log=False)


@pytest.mark.parametrize("variant, settings, message", [
    ("jumprelu", dict(theta_init=math.nan), "theta_init"),
    ("jumprelu", dict(theta_init=0.0), "theta_init"),
    ("jumprelu", dict(bandwidth=math.inf), "bandwidth"),
    ("batchtopk", dict(k=2, threshold_momentum=math.nan), "threshold_momentum"),
    ("batchtopk", dict(k=2, threshold_momentum=1.5), "threshold_momentum"),
    ("relu", dict(sparsity_coef=math.nan), "sparsity_coef"),
    ("topk", dict(k=40), "k must be in 1..n_latents=32"),
])
def test_settings_that_cannot_work(variant, settings, message):
    with pytest.raises(ValueError, match=message):
        make_sae(variant, 8, 32, **settings)
