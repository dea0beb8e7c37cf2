"""The numbers beside the headline of an evaluation: the standard error of each CE
difference (against per-prediction differences computed one context at a time in
float64) and loss recovered with the sinks replaced too (against an evaluation that has
no sink threshold at all, which is what replacing the sinks means)."""

import math

import numpy as np
import pytest
import torch

from minisae import evaluate as E
from test_activations import HOOK  # pytest puts tests/ on sys.path
from test_evaluate import ReluSAE, hooked, lm, median_norm  # noqa: F401  (lm is a fixture)


def per_prediction_nll(model, contexts, hooks=None):
    """-log p(target) of the predictions at positions 1..T-2, one context at a time, float64."""
    out = []
    for idx in contexts:
        with torch.no_grad():
            logp = model(idx[None], hooks=hooks)[0].double().log_softmax(-1)  # (T, V)
        out += [-logp[t, idx[t + 1]].item() for t in range(1, len(idx) - 1)]
    return np.array(out)


def naive_se(d):
    return float(np.std(d, ddof=1) / math.sqrt(len(d)))


@pytest.mark.parametrize("sinks", [False, True])
def test_ce_difference_standard_errors_match_per_prediction_differences(lm, sinks):
    model, contexts, mean = lm
    sae, scale = ReluSAE(), 0.37
    max_norm = median_norm(model, contexts) if sinks else None
    got = E.evaluate_spliced(model, hooked(sae, mean, scale, max_norm), contexts, batch_size=4, verbose=False)
    clean = per_prediction_nll(model, contexts)
    replace = {"sae": lambda x: sae(x * scale) / scale, "zero": torch.zeros_like,
               "mean": lambda x: mean.expand(x.shape)}
    for v, fn in replace.items():
        d = per_prediction_nll(model, contexts, {HOOK: E.splice_hook(fn, max_norm)}) - clean
        key = "ce_diff_se" if v == "sae" else f"ce_diff_se_{v}"
        assert math.isclose(got[key], naive_se(d), rel_tol=1e-4), key
        assert math.isclose(got[f"ce_{v}"] - got["ce_clean"], d.mean(), rel_tol=1e-4, abs_tol=1e-7), v
    for a in ("zero", "mean"):
        gap = got[f"ce_{a}"] - got["ce_clean"]
        assert got[f"loss_recovered_{a}_se"] == got["ce_diff_se"] / abs(gap)


def test_identical_splice_has_zero_standard_error(lm):
    from test_evaluate import Identity
    model, contexts, mean = lm
    got = E.evaluate_spliced(model, hooked(Identity(), mean, 4.0), contexts, batch_size=4, verbose=False,
                             with_sinks=True)
    assert got["ce_diff_se"] == 0.0 and got["loss_recovered_mean_se"] == 0.0
    assert got["ce_diff_se_zero"] > 0 and got["ce_sae_with_sinks"] == got["ce_clean"]


def test_with_sinks_equals_an_evaluation_without_a_sink_threshold(lm):
    model, contexts, mean = lm
    sae, scale = ReluSAE(), 0.37
    max_norm = median_norm(model, contexts)  # about half the positions are sinks: a hard case
    got = E.evaluate_spliced(model, hooked(sae, mean, scale, max_norm), contexts, batch_size=4, verbose=False,
                             with_sinks=True)
    every = E.evaluate_spliced(model, hooked(sae, mean, scale, None), contexts, batch_size=4, verbose=False)
    for v in ("sae", "zero", "mean"):
        assert math.isclose(got[f"ce_{v}_with_sinks"], every[f"ce_{v}"], rel_tol=1e-6), v
    for a in ("zero", "mean"):
        assert math.isclose(got[f"loss_recovered_{a}_with_sinks"], every[f"loss_recovered_{a}"], rel_tol=1e-5), a
        assert got[f"loss_recovered_{a}_with_sinks"] != got[f"loss_recovered_{a}"]  # the sinks do matter here
    # the SAE-side metrics still describe the SAE's own positions only
    plain = E.evaluate_spliced(model, hooked(sae, mean, scale, max_norm), contexts, batch_size=4, verbose=False)
    for key in ("ce_sae", "l0", "fvu", "n_tokens", "sink_frac", "loss_recovered_mean"):
        assert got[key] == plain[key], key


def test_with_sinks_through_precomputed_baselines(lm):
    model, contexts, mean = lm
    sae, scale = ReluSAE(), 0.37
    for max_norm in (median_norm(model, contexts), None):
        base = E.baselines(model, contexts, HOOK, mean, batch_size=4, verbose=False, max_norm=max_norm,
                           with_sinks=True)
        fast = E.evaluate_spliced(model, hooked(sae, mean, scale, max_norm), contexts, batch_size=4,
                                  baselines=base, verbose=False, with_sinks=True)
        full = E.evaluate_spliced(model, hooked(sae, mean, scale, max_norm), contexts, batch_size=4,
                                  verbose=False, with_sinks=True)
        assert fast == full
        if max_norm is None:  # no sinks: the same numbers under both names
            assert full["loss_recovered_mean_with_sinks"] == full["loss_recovered_mean"]
    plain = E.baselines(model, contexts, HOOK, mean, batch_size=4, verbose=False)
    with pytest.raises(ValueError, match="with_sinks"):
        E.evaluate_spliced(model, hooked(sae, mean, scale), contexts, baselines=plain, verbose=False,
                           with_sinks=True)
