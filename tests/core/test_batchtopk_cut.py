"""BatchTopK.select's sampled cut (minisae/variants.py guess_cut) at sizes where the sample
is a strided subset of the batch: the answer is that of one top-k*B over the flattened
matrix whether the guess holds (the candidate path) or fails (the whole-matrix search),
against the naive reference. tests/core/test_sparse_decode.py covers small matrices, where
the sample is the whole batch."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from minisae.variants import BatchTopK, guess_cut

pytestmark = pytest.mark.usefixtures("one_thread")


def reference(pre, n):
    """The n entries of one top-n over the flattened ReLU(pre), ascending: (n,)."""
    return torch.relu(pre).flatten().topk(n).indices.sort().values


@settings(max_examples=10, deadline=None)
@given(B=st.integers(64, 256), log_f=st.integers(7, 10), k=st.integers(1, 16), skew=st.floats(0, 3),
       seed=st.integers(0, 2**16))
def test_select_equals_the_flattened_topk_where_the_sample_is_a_subset(B, log_f, k, skew, seed):
    g = torch.Generator().manual_seed(seed)
    n_lat = 2**log_f
    pre = torch.randn(B, n_lat, generator=g) * torch.exp(skew * torch.randn(B, 1, generator=g))  # (B, F)
    part = BatchTopK(n_lat, k=k)
    rows, cols = part.select(pre)
    assert torch.equal(rows * n_lat + cols, reference(pre, k * B))
    assert part.threshold.item() == torch.relu(pre).flatten().topk(k * B).values.min().item()


def test_a_cut_guessed_too_high_falls_back_to_the_whole_matrix():
    """Large values planted at exactly the sampled positions put the guess above the true
    cut: fewer than k*B candidates, so the whole matrix is searched, with the same answer."""
    B, n_lat, k = 256, 512, 4
    pre = torch.randn(B, n_lat, generator=torch.Generator().manual_seed(0))  # (B, F)
    flat = pre.view(-1)
    stride = max(1, flat.numel() // 2**15) | 1
    flat[::stride] = 10 + torch.rand(flat[::stride].shape, generator=torch.Generator().manual_seed(1))
    n = k * B
    assert (flat > guess_cut(flat, n)).sum() < n  # the guess is wrong here
    rows, cols = BatchTopK(n_lat, k=k).select(pre)
    assert torch.equal(rows * n_lat + cols, reference(pre, n))


def test_the_guess_lies_below_the_cut_with_a_modest_margin_on_gaussian_data():
    """Typical data: at least n entries above the guess (the fast path runs) and not many
    more (its cost grows with the candidates)."""
    for B, n_lat, k in ((4096, 512, 5), (1024, 6144, 32)):
        flat = torch.randn(B * n_lat, generator=torch.Generator().manual_seed(B))
        n = k * B
        above = int((flat > guess_cut(flat, n)).sum())
        assert n <= above <= 1.6 * n
