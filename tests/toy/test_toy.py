"""The toy job's units rule: coefficients stated for inputs at E||x|| = sqrt(D) and
converted by the data's scale give the same loss (up to a constant factor) as training
on the scaled inputs; the scale itself; the dataset options."""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from minisae.sae import make_sae
from minisae.toy.run import SETTINGS, in_data_units, make_data, run

pytestmark = pytest.mark.usefixtures("one_thread")


@settings(max_examples=20, deadline=None)
@given(variant=st.sampled_from(["relu", "gated", "jumprelu", "topk"]), log_s=st.floats(-2, 3), seed=st.integers(0, 999))
def test_converted_settings_on_raw_inputs_equal_stated_settings_on_scaled_inputs(variant, log_s, seed):
    """Scaling x by s and every parameter in input units (b_dec, b_enc, Gated's b_mag,
    JumpReLU's theta) by s multiplies each loss term by s^2 when the coefficients follow
    `in_data_units`: the same optimum, found by the same Adam steps (scale-free)."""
    s = math.exp(log_s)
    stated = SETTINGS[variant]
    raw = make_sae(variant, 6, 10, seed=seed, **in_data_units(variant, stated, s)).double()
    scaled = make_sae(variant, 6, 10, seed=seed, **stated).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in raw.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3)
        if variant == "jumprelu":
            raw.activation.theta.copy_(torch.rand(10, generator=g, dtype=torch.float64) * 0.3)
        scaled.load_state_dict(raw.state_dict())
        for name in ("b_enc", "b_dec", "activation.b_mag", "activation.theta"):
            if name in dict(scaled.named_parameters()):
                dict(scaled.named_parameters())[name].mul_(s)
    x = torch.randn(16, 6, generator=g, dtype=torch.float64)
    total_raw, parts_raw = raw.loss(x)
    total_scaled, parts_scaled = scaled.loss(x * s)
    assert math.isclose(total_scaled.item(), s ** 2 * total_raw.item(), rel_tol=1e-9, abs_tol=1e-12)
    for k, v in parts_raw.items():
        if v.ndim == 0:
            assert math.isclose(parts_scaled[k].item(), s ** 2 * v.item(), rel_tol=1e-9, abs_tol=1e-12), k


def test_input_scale_brings_the_mean_norm_to_sqrt_d():
    for dim in (64, 256):
        data, s = make_data(512, dim, 0)
        x = data.sample(8192, torch.Generator().manual_seed(11))[0] * s  # other samples than the estimate's
        assert x.norm(dim=-1).mean().item() == pytest.approx(math.sqrt(dim), rel=0.02)
    assert make_data(512, 64, 0)[1] == pytest.approx(make_data(512, 256, 0)[1] / 2, rel=0.02)  # same norms, D / 4


@pytest.mark.slow
def test_dataset_options_reach_the_data_and_the_dictionary(tmp_path):
    out = run(tmp_path, quick=True, variants=("topk",), superposition=False, n_features=128, dim=32)
    assert out["data"]["n_features"] == 128 and out["data"]["d"] == 32
    assert out["config"]["n_latents"] == 128  # one latent per feature
    assert out["input_scale"] == pytest.approx(make_data(128, 32, 0)[1])
    with pytest.raises(ValueError, match="--dim"):
        run(tmp_path, quick=True, variants=("topk",), superposition=False, dim=-3)
