"""Chapter 1's loop closed: a TopK (k = 1) SAE on the hidden activations of a toy model of
superposition finds the columns of W. A short run (fewer toy steps and SAE samples than
the command's defaults) must still find every stored feature's direction."""

from minisae.toy import superposition_sae as S


def test_topk_sae_finds_the_toy_models_features():
    r = S.run(seed=0, toy_steps=600, n_samples=50_000, train_samples=400_000, log=False)
    assert r["features_stored"] >= 10  # a sparse toy model stores far more than its 5 dimensions
    assert r["mmcs"] > 0.9 and r["recovered_0.9"] >= r["features_stored"] * 3 // 4, r


def test_too_few_latents_cannot_hold_every_direction():
    """With 5 latents for 20 stored directions (no expansion) the dictionary cannot hold them all."""
    r = S.run(seed=0, toy_steps=600, n_latents=5, n_samples=50_000, train_samples=200_000, log=False)
    assert r["recovered_0.9"] <= 5 < r["features_stored"]
