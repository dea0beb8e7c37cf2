"""The sparse paths (minisae/sparse_decode.py) against the dense reference of
minisae/sae.py and minisae/variants.py: the same loss, parts, code and gradients for every
parameter, AuxK included, on random shapes, random parameters and random dead latents
(float64, so the only difference is the order of the additions). TopK and BatchTopK
through `sparse_loss`, ReLU, Gated and JumpReLU through `penalty_loss`."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from minisae import sparse_decode
from minisae.sae import make_sae
from minisae.codes import DenseCode, SparseCode
from minisae.sparse_decode import decode_rows, loss_function, penalty_loss, sparse_loss

pytestmark = pytest.mark.usefixtures("one_thread")
fast = settings(max_examples=30, deadline=None)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def grads(sae, loss):
    sae.zero_grad(set_to_none=True)
    loss.backward()
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in sae.named_parameters()}


@settings(max_examples=40, deadline=None)
@given(n_rows=st.integers(1, 50), n=st.integers(0, 200), seed=st.integers(0, 2**16))
def test_row_counts_both_ways_equal_bincount(n_rows, n, seed):
    """The count an accelerator takes (index_add, no read-back) equals bincount's."""
    rows = torch.randint(0, n_rows, (n,), generator=torch.Generator().manual_seed(seed)).sort().values
    ref = torch.bincount(rows, minlength=n_rows)
    for device_safe in (False, True):
        assert torch.equal(sparse_decode.row_counts(rows, n_rows, device_safe=device_safe), ref)


@fast
@given(n=st.integers(0, 3000), n_lat=st.sampled_from([1, 3, 512, 2**16, 2**16 + 1]), seed=st.integers(0, 99))
def test_stable_order_is_torchs_stable_sort(n, n_lat, seed):
    """The radix sort of 16-bit keys (NumPy) gives the permutation of torch's stable sort,
    repeated latents kept in their order; above 2^16 latents torch's own sort runs."""
    g = torch.Generator().manual_seed(seed)
    cols = torch.randint(0, min(n_lat, 1 + n // 3 + seed), (n,), generator=g) * (n_lat // min(n_lat, 1 + n // 3 + seed))
    assert torch.equal(sparse_decode.stable_order(cols, n_lat), cols.sort(stable=True).indices)


@fast
@given(variant=st.sampled_from(["topk", "batchtopk"]), B=st.integers(1, 6), D=st.integers(1, 6),
       n_lat=st.integers(1, 10), k_frac=st.floats(0, 1), k_aux=st.integers(1, 8), dead_bits=st.integers(0, 2**10 - 1),
       transcoder=st.booleans(), seed=st.integers(0, 2**16))
def test_sparse_loss_equals_dense_reference(random_sae, variant, B, D, n_lat, k_frac, k_aux, dead_bits, transcoder,
                                            seed):
    """transcoder: x_hat matches another target than x (SAE.loss's target)."""
    k = max(1, round(k_frac * n_lat))
    dead = torch.tensor([(dead_bits >> i) & 1 for i in range(n_lat)], dtype=torch.bool)
    x = randn(B, D, seed=seed)
    target = randn(B, D, seed=seed + 1) if transcoder else None
    runs = []
    for sparse in (False, True):
        sae = random_sae(variant, D, n_lat, seed=seed, k=k, k_aux=k_aux, dead_after=10).train()
        sae.samples_since_fired.copy_(torch.where(dead, 10, 9))
        if variant == "batchtopk":
            sae.activation.threshold.fill_(-1.0 if seed % 2 else 0.3)  # not yet estimated / running
        total, parts = sparse_loss(sae, x, target=target) if sparse else sae.loss(x, target=target)
        runs.append((sae, total, parts, grads(sae, total)))
    (ref, t_ref, p_ref, g_ref), (sp, t_sp, p_sp, g_sp) = runs
    assert isinstance(p_sp["f"], SparseCode) and not isinstance(p_ref["f"], SparseCode)
    assert torch.allclose(t_sp, t_ref, rtol=1e-10, atol=1e-12)
    for name in ("recon", "auxk"):
        assert torch.allclose(p_sp[name], p_ref[name], rtol=1e-10, atol=1e-12), name
    assert torch.allclose(p_sp["x_hat"], p_ref["x_hat"], rtol=1e-10, atol=1e-12)
    f_sp, f_ref = p_sp["f"].to_dense(), p_ref["f"].detach()
    assert torch.equal(f_sp > 0, f_ref > 0) and torch.allclose(f_sp, f_ref, rtol=1e-12, atol=1e-14)  # same entries
    for name in g_ref:
        assert torch.allclose(g_sp[name], g_ref[name], rtol=1e-9, atol=1e-12), name
    if variant == "batchtopk":
        assert torch.allclose(sp.activation.threshold, ref.activation.threshold, rtol=1e-12)
    # the trainer's bookkeeping reads the same from both codes
    assert torch.equal(p_sp["f"].fired(), DenseCode(p_ref["f"]).fired())
    assert torch.allclose(torch.tensor(p_sp["f"].l0()).double(), torch.tensor(DenseCode(p_ref["f"]).l0()).double())


@fast
@given(variant=st.sampled_from(["relu", "gated", "jumprelu"]), B=st.integers(1, 6), D=st.integers(1, 6),
       n_lat=st.integers(1, 10), shift=st.floats(-2, 2), bandwidth=st.floats(0.01, 1.0), coef_scale=st.floats(0, 1),
       transcoder=st.booleans(), seed=st.integers(0, 2**16))
def test_penalty_loss_equals_dense_reference(random_sae, variant, B, D, n_lat, shift, bandwidth, coef_scale,
                                             transcoder, seed):
    """shift moves b_enc, so the entries the sparse path keeps range from none to all;
    JumpReLU's thresholds are partly below bandwidth/2, where zeros sit in the window.
    transcoder: x_hat matches another target than x."""
    x = randn(B, D, seed=seed)
    target = randn(B, D, seed=seed + 1) if transcoder else None
    runs = []
    for sparse in (False, True):
        settings = {"bandwidth": bandwidth} if variant == "jumprelu" else {}
        sae = random_sae(variant, D, n_lat, seed=seed, **settings).train()
        with torch.no_grad():
            sae.b_enc += shift
        total, parts = (penalty_loss(sae, x, sae.pre_activation(x), coef_scale, max_frac=1.01, target=target)
                        if sparse else sae.loss(x, coef_scale, target=target))
        runs.append((total, parts, grads(sae, total)))
    (t_ref, p_ref, g_ref), (t_sp, p_sp, g_sp) = runs
    assert isinstance(p_sp["f"], SparseCode)
    assert set(p_sp) == set(p_ref)
    for name in set(p_ref) - {"f"}:
        assert torch.allclose(p_sp[name], p_ref[name], rtol=1e-10, atol=1e-12), name
    assert torch.allclose(t_sp, t_ref, rtol=1e-10, atol=1e-12)
    f_sp, f_ref = p_sp["f"].to_dense(), p_ref["f"].detach()
    assert torch.equal(f_sp > 0, f_ref > 0) and torch.allclose(f_sp, f_ref, rtol=1e-12, atol=1e-14)
    for name in g_ref:
        assert torch.allclose(g_sp[name], g_ref[name], rtol=1e-9, atol=1e-12), name
    assert torch.equal(p_sp["f"].fired(), DenseCode(p_ref["f"]).fired())
    assert torch.allclose(torch.tensor(p_sp["f"].l0()).double(), torch.tensor(DenseCode(p_ref["f"]).l0()).double())


def test_penalty_loss_only_below_the_crossover_and_on_the_cpu():
    x = torch.randn(64, 8)
    sae = make_sae("relu", 8, 32).train()
    with torch.no_grad():
        sae.b_enc.fill_(-1.5)  # few positive entries
    frac = ((x - sae.b_dec) @ sae.W_enc.T + sae.b_enc > 0).double().mean().item()
    assert 0 < frac < sparse_decode.PENALTY_CROSSOVER
    assert isinstance(loss_function(sae)(x)[1]["f"], SparseCode)
    with torch.no_grad():
        sae.b_enc.fill_(1.0)  # most entries positive: the reference
    assert not isinstance(loss_function(sae)(x)[1]["f"], SparseCode)
    topk = make_sae("topk", 8, 32, k=2)
    assert penalty_loss(topk, x, topk.pre_activation(x)) is None  # not a penalty variant
    sae, x = sae.to("meta"), x.to("meta")
    assert penalty_loss(sae, x, sae.pre_activation(x)) is None  # an accelerator: the reference


@fast
@given(B=st.integers(1, 6), D=st.integers(1, 5), n_lat=st.integers(1, 8), n=st.integers(0, 20), seed=st.integers(0, 2**16))
def test_decode_rows_against_scatter_and_matmul(B, D, n_lat, n, seed):
    """Any sorted rows, repeated or missing (empty rows decode to 0), any columns."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, B, (n,), generator=g).sort().values
    cols = torch.randint(0, n_lat, (n,), generator=g)
    vals = randn(n, seed=seed).requires_grad_()
    W = randn(n_lat, D, seed=seed + 1).requires_grad_()
    out = decode_rows(vals, rows, cols, W, B)
    gy = randn(B, D, seed=seed + 2)
    gv, gW = torch.autograd.grad(out, (vals, W), gy)
    f = torch.zeros(B, n_lat, dtype=torch.float64).index_put((rows, cols), vals, accumulate=True)  # (B, F)
    ref = f @ W
    rv, rW = torch.autograd.grad(ref, (vals, W), gy)
    assert torch.allclose(out, ref, rtol=1e-10, atol=1e-12)
    assert torch.allclose(gv, rv, rtol=1e-10, atol=1e-12) and torch.allclose(gW, rW, rtol=1e-10, atol=1e-12)


@fast
@given(B=st.integers(1, 12), n_lat=st.integers(2, 120), k=st.integers(1, 4), skew=st.floats(0, 4),
       seed=st.integers(0, 2**16))
def test_batchtopk_select_equals_a_topk_over_the_whole_batch(B, n_lat, k, skew, seed):
    """The candidate search (the 8k largest of each row) picks exactly the entries of one
    top-k*B over the flattened matrix, also when a row owns more than 8k of them (skewed
    rows: the fallback) and when fewer than k*B entries are positive."""
    from minisae.variants import BatchTopK
    k = min(k, n_lat)
    pre = randn(B, n_lat, seed=seed) * torch.exp(skew * randn(B, 1, seed=seed + 1)) - 0.5  # (B, F)
    part = BatchTopK(n_lat, k=k)
    rows, cols = part.select(pre)
    z = torch.relu(pre).flatten()
    want = z.topk(k * B).indices
    got = rows * n_lat + cols
    assert torch.equal(rows, rows.sort().values)  # row-major
    # the same entries; where zeros tie at the cut, any of them will do
    assert torch.equal(z[got].sort().values, z[want].sort().values)
    assert set((got[z[got] > 0]).tolist()) == set((want[z[want] > 0]).tolist())
    assert part.threshold.item() == pytest.approx(z[want][z[want] > 0].min().item() if (z[want] > 0).any() else -1.0)


def test_loss_takes_the_sparse_path_below_the_crossover_only():
    x = torch.randn(8, 6)
    small = make_sae("topk", 6, 40, k=2)  # k/F = 0.05
    large = make_sae("topk", 6, 4, k=3)  # k/F = 0.75
    assert sparse_decode.worth_it(2, 40) and not sparse_decode.worth_it(3, 4)
    assert isinstance(loss_function(small.train())(x)[1]["f"], SparseCode)
    assert not isinstance(loss_function(large.train())(x)[1]["f"], SparseCode)
    assert not isinstance(loss_function(small, sparse=False)(x)[1]["f"], SparseCode)  # the switch to the reference
    assert not isinstance(small.loss(x)[1]["f"], SparseCode)  # SAE.loss is the reference, always
    assert isinstance(loss_function(make_sae("batchtopk", 6, 40, k=2).train())(x)[1]["f"], SparseCode)


def test_batchtopk_eval_mode_uses_the_threshold_not_the_sparse_path():
    sae = make_sae("batchtopk", 6, 40, k=2)
    x = torch.randn(16, 6)
    sae.train().loss(x)  # estimates the threshold
    _, parts = loss_function(sae.eval())(x)
    assert not isinstance(parts["f"], SparseCode)
    assert torch.equal(parts["f"], sae.encode(x))


def test_bf16_autocast_runs_and_stays_close_to_fp32():
    sae = make_sae("topk", 16, 64, k=4).train()
    x = torch.randn(32, 16)
    loss = loss_function(sae)
    ref, _ = loss(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, parts = loss(x)
    assert isinstance(parts["f"], SparseCode)
    assert abs(low.item() - ref.item()) < 0.05 * ref.item()
    g = grads(sae, low)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in g.values())


@fast
@given(dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16, torch.float16]),
       B=st.integers(1, 40), F=st.sampled_from([64, 65, 128, 512, 2304]), k=st.integers(1, 40),
       shift=st.floats(0, 4), seed=st.integers(0, 2**16))
def test_topk_by_bits_keeps_what_float_topk_keeps(dtype, B, F, k, shift, seed):
    """TopK's selection on the bit patterns: where it is used (64 k <= F), the same indices
    in the same order as the float topk for rows with k or more positive entries (equal
    values, common in bf16, may come in the other order), and the same ReLU'd values in
    every place of every row (rows with fewer: shift > 0)."""
    from minisae.variants import topk_by_bits
    k = min(k, F)
    pre = (randn(B, F, seed=seed) - shift).to(dtype)  # (B, F)
    got, want = topk_by_bits(pre, k), pre.topk(k, dim=-1, sorted=False).indices  # (B, K) each
    kept = pre.gather(-1, want)  # (B, K)
    full = (pre > 0).sum(-1) >= k  # (B,)
    top = pre.double().sort(-1, descending=True).values[:, :k + 1]  # (B, K+1)
    untied = (top.diff(dim=-1) < 0).all(-1)  # (B,) the k kept distinct, the k-th above the rest
    assert torch.equal(got[full & untied], want[full & untied])
    assert torch.equal(torch.relu(pre.gather(-1, got)), torch.relu(kept))


@pytest.mark.parametrize("variant,k,F", [("topk", 5, 512), ("topk", 12, 512), ("batchtopk", 5, 512)])
def test_training_on_the_bits_is_bit_for_bit_the_float_selection(monkeypatch, variant, k, F):
    """Whole training runs, the bits path against the float comparisons it replaces
    (bits_of as the identity): the same weights bit for bit, with many samples whose
    code has fewer than k positive entries (b_enc pushed down) and AuxK at work."""
    from minisae import variants
    from minisae.train import TrainConfig

    from minisae import sparse_decode as sd
    from minisae.train import Trainer
    dead_seen = []

    def run():
        sae = make_sae(variant, 16, F, k=k, seed=0, dead_after=512)
        with torch.no_grad():
            sae.b_enc -= 1.5  # most rows have fewer than k positive pre-activations at first
            sae.b_enc[:F // 2] -= 3.0  # and half the latents die
        trainer = Trainer(sae, TrainConfig(n_samples=60 * 256, batch_size=256, lr=3e-3), log=False)
        for s in range(60):
            trainer.step(randn(256, 16, seed=s).float())
            dead_seen.append(int((sae.samples_since_fired >= 512).sum()))
        return sae.state_dict()

    fast_run = run()
    monkeypatch.setattr(variants, "bits_of", lambda t: t)
    monkeypatch.setattr(sd, "ordered_bits", lambda t: t)
    float_run = run()
    assert max(dead_seen) > 0  # AuxK was at work
    assert all(torch.equal(fast_run[n], float_run[n]) for n in fast_run)


@fast
@given(dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16, torch.float16]),
       n=st.integers(1, 300), seed=st.integers(0, 2**16))
def test_ordered_bits_order_like_the_values(dtype, n, seed):
    """Every pair of values compares as their ordered_bits do (signs, zeros, infinities)."""
    from minisae.variants import ordered_bits
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e-30, -1e-30], dtype=torch.float64)
    v = torch.cat([randn(n, seed=seed) * 10 ** (4 * randn(n, seed=seed + 1)), special]).to(dtype)  # (n+6,)
    b = ordered_bits(v)
    same_value = v[:, None] == v[None, :]
    assert torch.equal((v[:, None] > v[None, :])[~same_value], (b[:, None] > b[None, :])[~same_value])
