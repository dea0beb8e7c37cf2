"""Metrics against the ground truth (minisae/truth_metrics.py): the Hungarian solver
against scipy and a brute force over permutations, Pearson against numpy, and the
invariants every metric must keep: relabelling latents changes nothing, the truth itself
scores perfectly, and a dictionary built to absorb its parents scores absorption 1."""

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays

from minisae import truth_metrics as tm
from toy_models.sparse_features import SparseFeatures, SparseFeaturesConfig

pytestmark = pytest.mark.usefixtures("one_thread")
fast = settings(max_examples=40, deadline=None)

shapes = st.tuples(st.integers(1, 9), st.integers(1, 9))
# small integers make ties, the hard case for the bookkeeping; floats the generic one
costs = shapes.flatmap(lambda s: st.one_of(
    arrays(np.float64, s, elements=st.integers(-3, 3).map(float)),
    arrays(np.float64, s, elements=st.floats(-100, 100, allow_nan=False))))


def check_matching(cost, rows, cols):
    n, m = cost.shape
    assert len(rows) == len(cols) == min(n, m)
    assert len(set(rows.tolist())) == len(rows) and len(set(cols.tolist())) == len(cols)
    assert list(rows) == sorted(rows)


@fast
@given(cost=costs)
def test_hungarian_total_equals_scipy(cost):
    scipy_opt = pytest.importorskip("scipy.optimize")
    rows, cols = tm.linear_sum_assignment(cost)
    check_matching(cost, rows, cols)
    r, c = scipy_opt.linear_sum_assignment(cost)
    assert cost[rows, cols].sum() == pytest.approx(cost[r, c].sum(), abs=1e-9)


@fast
@given(cost=shapes.filter(lambda s: max(s) <= 6).flatmap(
    lambda s: arrays(np.float64, s, elements=st.floats(-10, 10, allow_nan=False))))
def test_hungarian_total_equals_brute_force(cost):
    """Every injective map of the shorter side into the longer, scored naively."""
    rows, cols = tm.linear_sum_assignment(cost)
    check_matching(cost, rows, cols)
    a = cost if cost.shape[0] <= cost.shape[1] else cost.T
    injections = itertools.permutations(range(a.shape[1]), a.shape[0])
    best = min(sum(a[i, j] for i, j in enumerate(perm)) for perm in injections)
    assert cost[rows, cols].sum() == pytest.approx(best, abs=1e-9)


def test_correlation_matrix_against_numpy():
    g = torch.Generator().manual_seed(0)
    c, f = torch.rand(200, 5, generator=g), torch.rand(200, 7, generator=g)
    f[:, 3] = 0  # a dead latent: correlation 0, not nan
    with np.errstate(invalid="ignore"):  # the dead latent's column is nan here
        ref = np.corrcoef(c.double().T.numpy(), f.double().T.numpy())[:5, 5:]  # (G, F)
    ref[:, 3] = 0
    assert np.allclose(tm.correlation_matrix(c, f).numpy(), ref, atol=1e-12)


def hierarchical(seed=0, **kw):
    cfg = dict(n_features=24, d=12, mean_active=3, n_parents=3, children_per_parent=3, child_prob=0.6,
               magnitude_std=0.1, seed=seed)
    data = SparseFeatures(SparseFeaturesConfig(**{**cfg, **kw}))
    x, c = data.sample(3000, torch.Generator().manual_seed(seed + 1))
    return data, c


def report(c, f, truth, W_dec, parents):
    out = tm.truth_report(c, f, truth, W_dec, parents)
    out.pop("matching")  # labels, not scores
    return out


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), extra=st.integers(0, 6))
def test_the_truth_scores_perfectly_under_any_labelling(seed, extra):
    """f = the true codes, positively rescaled, shuffled, with `extra` dead latents;
    W_dec the true directions in the same order: MCC 1, F1 1, absorption 0."""
    data, c = hierarchical(seed)
    G = c.shape[1]
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(G + extra, generator=g)  # latent j holds column perm[j] of [c, 0]
    f = torch.cat([c * (0.5 + torch.rand(G, generator=g)), torch.zeros(len(c), extra)], 1)[:, perm]  # (N, F)
    W = torch.cat([data.ground_truth, torch.zeros(extra, data.cfg.d)])[perm]  # (F, D)
    out = report(c, f, data.ground_truth, W, data.parents)
    assert out["mcc"] == pytest.approx(1) and out["mcc_decoder"] == pytest.approx(1)
    assert out["f1"] == pytest.approx(1) and out["precision"] == pytest.approx(1) and out["recall"] == pytest.approx(1)
    assert out["absorption"] == 0 and out["uniqueness"] == 1
    assert out["split_frac"] == 0


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_permuting_latents_changes_nothing(seed):
    """Noisy codes and directions; the same SAE with its latents relabelled."""
    data, c = hierarchical(seed)
    g = torch.Generator().manual_seed(seed)
    F = c.shape[1] + 4
    f = torch.relu(torch.cat([c, torch.zeros(len(c), 4)], 1) + 0.3 * torch.randn(len(c), F, generator=g))  # (N, F)
    W = torch.cat([data.ground_truth, torch.zeros(4, data.cfg.d)]) + 0.3 * torch.randn(F, data.cfg.d, generator=g)
    perm = torch.randperm(F, generator=g)
    a = report(c, f, data.ground_truth, W, data.parents)
    b = report(c, f[:, perm], data.ground_truth, W[perm], data.parents)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == pytest.approx(b[k], abs=1e-9), k


def test_absorbing_dictionary_scores_absorption_one():
    """The SAE of "A is for Absorption": the parent's latent fires only when the parent is
    alone; each child's latent carries parent + child (its decoder row too)."""
    data, c = hierarchical(3)
    f = c.clone()  # (N, G)
    W = data.ground_truth.clone()  # (G, D)
    for p, kids in data.parents.items():
        with_child = (c[:, kids] > 0).any(1)  # (N,)
        for k in kids:
            f[:, k] = torch.where(c[:, k] > 0, c[:, k] + c[:, p], 0)
            W[k] = data.ground_truth[k] + data.ground_truth[p]
        f[with_child, p] = 0
    out = tm.truth_report(c, f, data.ground_truth, W, data.parents)
    assert out["matching"] == list(range(c.shape[1]))  # each latent still matched to its own feature
    assert out["absorption"] == 1
    assert all(r == 1 for r in out["absorption_per_parent"].values())
    assert out["f1"] < 1  # the parents' latents miss most of their parents' events
    # the truth, and an SAE that never fires, absorb nothing
    assert tm.truth_report(c, c, data.ground_truth, data.ground_truth, data.parents)["absorption"] == 0
    assert tm.truth_report(c, 0 * c, data.ground_truth, data.ground_truth, data.parents)["absorption"] == 0


def test_detection_against_a_loop():
    g = torch.Generator().manual_seed(1)
    c = (torch.rand(50, 4, generator=g) < 0.3).float()
    f = (torch.rand(50, 6, generator=g) < 0.3).float()
    m = torch.tensor([2, 0, -1, 5])
    det = tm.detection(c, f, m)
    for i, j in enumerate(m.tolist()):
        fired = [j >= 0 and f[n, j] != 0 for n in range(50)]
        tp = sum(fi and c[n, i] > 0 for n, fi in enumerate(fired))
        prec, rec = tp / max(1, sum(fired)), tp / max(1, int((c[:, i] > 0).sum()))
        assert det["precision"][i].item() == pytest.approx(prec)
        assert det["recall"][i].item() == pytest.approx(rec)
        assert det["f1"][i].item() == pytest.approx(2 * prec * rec / (prec + rec) if prec + rec else 0)


def test_splitting_and_uniqueness_count_duplicates():
    truth = torch.eye(4, 6)  # (G, D)
    W = torch.stack([truth[0], truth[0] + 0.1 * truth[1], truth[1], truth[2], truth[2]])  # (F, D), no latent for 3
    assert tm.splitting(truth, W).tolist() == [2, 1, 2, 0]
    assert tm.uniqueness(truth, W) == 3 / 4  # feature 3's best latent is shared with another


def test_fewer_latents_than_features_leave_features_unmatched():
    c = torch.rand(100, 5, generator=torch.Generator().manual_seed(0))
    value, m = tm.mcc(c, c[:, :3])
    assert sorted(m.tolist()) == [-1, -1, 0, 1, 2] and value == pytest.approx(3 / 5)
