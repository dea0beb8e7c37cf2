"""The metric keys that share a name with SAELens or SAEBench follow the definition
minisae/metrics.py states: `explained_variance` and `mse` as SAELens 6.x computes them (its
own ExplainedVarianceCalculator, run here), `saebench_explained_variance` as SAEBench 0.6's
core evaluation computes its `explained_variance` (its code's arithmetic, written out per
batch), and `mse` in the units of x when the samples were s x."""

import pytest
import torch

from minisae.metrics import Accumulator


def batches(n=5, B=64, D=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(D, generator=g) * 3  # a large mean component, as residual streams have
    for _ in range(n):
        x = torch.randn(B, D, generator=g, dtype=torch.float64) + mean
        yield x, x + 0.3 * torch.randn(B, D, generator=g, dtype=torch.float64)  # (x, x_hat)


def accumulate(scale=1.0):
    acc = Accumulator(4)
    for x, x_hat in batches():
        acc.add(scale * x, scale * x_hat, torch.zeros(len(x), 4))
    return acc.result(scale=scale)


def saebench_06(pairs):
    """sae_bench/evals/core/main.py (0.6.0), get_sparsity_and_variance_metrics: explained_variance and mse."""
    mean_sum_of_squares, mean_act_per_dimension, mean_sum_of_resid_squared, mses = [], [], [], []
    for x, x_hat in pairs:
        resid = (x - x_hat).pow(2).sum(dim=-1)  # (B,)
        mses.append(resid / len(x))
        mean_sum_of_squares.append(x.pow(2).sum(dim=-1).mean(dim=0))
        mean_act_per_dimension.append(x.pow(2).mean(dim=0))  # (D,)
        mean_sum_of_resid_squared.append(resid.mean(dim=0))
    total_variance = torch.stack(mean_sum_of_squares).mean(0) - torch.cat(mean_act_per_dimension).mean(0) ** 2
    ev = 1 - torch.stack(mean_sum_of_resid_squared).mean(0) / total_variance
    return ev.item(), torch.cat(mses).mean().item()


def test_explained_variance_and_mse_are_sae_lens_s():
    sl_evals = pytest.importorskip("sae_lens.evals", reason="sae-lens not installed (pip install -e '.[formats]')")
    calc = sl_evals.ExplainedVarianceCalculator()
    resid, n = 0.0, 0
    for x, x_hat in batches():
        calc.add_batch(sae_output=x_hat, hidden_acts=x)
        resid, n = resid + (x - x_hat).pow(2).sum().item(), n + len(x)
    res = accumulate()
    assert res["explained_variance"] == pytest.approx(calc.compute(), rel=1e-9)
    assert res["mse"] == pytest.approx(resid / n, rel=1e-12)  # SAELens: per-token sums, averaged


def test_saebench_explained_variance_is_saebench_0_6_s_and_differs():
    ev, saebench_mse = saebench_06(batches())
    res = accumulate()
    assert res["saebench_explained_variance"] == pytest.approx(ev, rel=1e-9)
    assert abs(res["saebench_explained_variance"] - res["explained_variance"]) > 0.01  # not the same quantity
    assert res["mse"] == pytest.approx(saebench_mse * 64, rel=1e-12)  # SAEBench's mse: divided by the batch size


@pytest.mark.parametrize("scale", [0.25, 7.0])
def test_mse_is_in_the_units_of_x_when_the_samples_were_scaled(scale):
    plain, scaled = accumulate(), accumulate(scale)
    for key in ("mse", "saebench_explained_variance", "explained_variance", "fvu", "cossim"):
        assert scaled[key] == pytest.approx(plain[key], rel=1e-9), key
