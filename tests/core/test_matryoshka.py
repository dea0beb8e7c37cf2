"""Matryoshka BatchTopK (minisae/matryoshka.py) against a naive float64 reference.

The reference selects the k*B largest entries of ReLU(pre) with Python's `sorted` and
decodes every prefix from scratch, f[:, :m] @ W_dec[:m] + b_dec, summing the squared
errors in a loop over the prefixes (the code under test builds them as a running sum).
With the single prefix F the part must be BatchTopK exactly; permuting latents inside a
group and adding a prefix boundary change the loss as the formula says.
"""

import pytest
import torch
from hypothesis import assume, given, settings, strategies as st

from minisae import sparse_decode
from minisae.codes import SparseCode
from minisae.matryoshka import MatryoshkaBatchTopK, default_prefixes
from minisae.sae import SAE, part_settings
from minisae.train import TrainConfig, train
from minisae.variants import BatchTopK

pytestmark = pytest.mark.usefixtures("one_thread")
fast = settings(max_examples=25, deadline=None)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def random_sae(D, n_lat, seed=0, part=MatryoshkaBatchTopK, **settings):
    """An SAE with this part and every parameter random (float64)."""
    sae = SAE(D, n_lat, part(n_lat, **settings), seed=seed).double()
    g = torch.Generator().manual_seed(seed + 12345)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
        sae.activation.threshold.fill_(float(torch.rand((), generator=g, dtype=torch.float64)) * 0.5)
    return sae


def ladders(n_lat, draw_bits):
    """A strictly increasing tuple in 1..n_lat from the bits of draw_bits (may stop short of n_lat)."""
    chosen = tuple(m for m in range(1, n_lat + 1) if (draw_bits >> (m - 1)) & 1)
    return chosen or (n_lat,)


def naive_selection(pre, k):
    """(B, F) bool: the k*B largest entries of ReLU(pre) over the whole batch, by `sorted`."""
    B, n_lat = pre.shape
    z = pre.clamp_min(0).tolist()
    entries = sorted(((z[b][i], b, i) for b in range(B) for i in range(n_lat)), reverse=True)[:k * B]
    mask = torch.zeros(B, n_lat, dtype=torch.bool)
    for _, b, i in entries:
        mask[b, i] = True
    return mask


def naive_loss(sae, x, prefixes, mask):
    """sum_m ||x - (f[:, :m] W_dec[:m] + b_dec)||^2 (summed over D, mean over B), each prefix
    from scratch, with autograd into the parameters; f = ReLU(pre) on `mask`."""
    pre = (x - sae.b_dec) @ sae.W_enc.T + sae.b_enc  # (B, F)
    f = pre.clamp_min(0) * mask  # (B, F)
    errors = {}
    for m in prefixes:
        x_hat_m = f[:, :m] @ sae.W_dec[:m] + sae.b_dec  # (B, D)
        errors[m] = ((x - x_hat_m) ** 2).sum(-1).mean()
    return sum(errors.values()), errors, f


def grads(sae, loss):
    sae.zero_grad(set_to_none=True)
    loss.backward()
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in sae.named_parameters()}


cases = st.tuples(st.integers(1, 5), st.integers(1, 5), st.integers(1, 10), st.floats(0, 1),
                  st.integers(1, 2**10 - 1), st.integers(0, 2**16))  # B, D, F, k fraction, ladder bits, seed


# -- the loss against the naive reference ------------------------------------------------

@fast
@given(case=cases)
def test_loss_and_gradients_equal_a_naive_sum_over_prefixes(case):
    B, D, n_lat, k_frac, bits, seed = case
    k, prefixes = max(1, round(k_frac * n_lat)), ladders(n_lat, bits)
    sae = random_sae(D, n_lat, seed=seed, k=k, prefixes=prefixes).train()
    x = randn(B, D, seed=seed)
    total, parts = sae.loss(x)
    g = grads(sae, total)
    with torch.no_grad():
        mask = naive_selection((x - sae.b_dec) @ sae.W_enc.T + sae.b_enc, k)
    full = sorted(set(prefixes) | {n_lat})  # the whole dictionary is always a prefix
    ref, errors, f_ref = naive_loss(sae, x, full, mask)
    g_ref = grads(sae, ref)
    assert torch.equal(parts["f"] > 0, f_ref > 0)
    assert torch.allclose(total, ref, rtol=1e-10, atol=1e-12)
    assert torch.allclose(parts["recon"], errors[n_lat], rtol=1e-10, atol=1e-12)
    inner = sum(e for m, e in errors.items() if m < n_lat)
    assert torch.allclose(parts["prefixes"], torch.as_tensor(inner, dtype=torch.float64), rtol=1e-10, atol=1e-12)
    assert parts["auxk"].item() == 0.0  # nothing is dead
    for name in g_ref:
        assert torch.allclose(g[name], g_ref[name], rtol=1e-9, atol=1e-12), name


@fast
@given(case=cases, dead_bits=st.integers(0, 2**10 - 1))
def test_one_prefix_is_batchtopk_exactly(case, dead_bits):
    """prefixes = (F,): the same code, loss, AuxK, gradients and threshold as BatchTopK."""
    B, D, n_lat, k_frac, _, seed = case
    k = max(1, round(k_frac * n_lat))
    dead = torch.tensor([(dead_bits >> i) & 1 for i in range(n_lat)], dtype=torch.bool)
    x = randn(B, D, seed=seed)
    runs = []
    for part, extra in ((BatchTopK, {}), (MatryoshkaBatchTopK, {"prefixes": (n_lat,)})):
        sae = random_sae(D, n_lat, seed=seed, part=part, k=k, k_aux=2, dead_after=10, **extra).train()
        sae.samples_since_fired.copy_(torch.where(dead, 10, 9))
        total, parts = sae.loss(x)
        runs.append((sae, total, parts, grads(sae, total)))
    (bt, t_bt, p_bt, g_bt), (mt, t_mt, p_mt, g_mt) = runs
    assert p_mt["prefixes"].item() == 0.0
    assert torch.equal(t_mt, t_bt) and torch.equal(p_mt["auxk"], p_bt["auxk"]) and torch.equal(p_mt["f"], p_bt["f"])
    assert all(torch.equal(g_mt[n], g_bt[n]) for n in g_bt)
    assert torch.equal(mt.activation.threshold, bt.activation.threshold)


@fast
@given(case=cases, m_frac=st.floats(0, 1, exclude_max=True))
def test_adding_a_boundary_adds_that_prefix_error(case, m_frac):
    """loss(ladder + {m}) - loss(ladder) = ||x - x_hat_m||^2 for a new boundary m < F."""
    B, D, n_lat, k_frac, bits, seed = case
    assume(n_lat >= 2)
    m = 1 + int(m_frac * (n_lat - 1))  # in 1..F-1
    prefixes = tuple(p for p in ladders(n_lat, bits) if p != m) or (n_lat,)
    x, k = randn(B, D, seed=seed), max(1, round(k_frac * n_lat))
    loss = lambda ladder: random_sae(D, n_lat, seed=seed, k=k, prefixes=ladder).train().loss(x)[0]
    with_m = loss(tuple(sorted({*prefixes, m})))
    sae = random_sae(D, n_lat, seed=seed, k=k).train()
    f = sae.encode(x)
    err_m = (x - f[:, :m] @ sae.W_dec[:m] - sae.b_dec).pow(2).sum(-1).mean()
    assert torch.allclose(with_m - loss(prefixes), err_m, rtol=1e-9, atol=1e-10)


@fast
@given(case=cases, training=st.booleans())
def test_permuting_latents_inside_groups_keeps_code_and_loss(case, training):
    """The prefixes see groups of latents, not their order: a permutation within each
    group [m_{i-1}, m_i) permutes the code and leaves every reconstruction unchanged."""
    B, D, n_lat, k_frac, bits, seed = case
    k, prefixes = max(1, round(k_frac * n_lat)), ladders(n_lat, bits)
    sae = random_sae(D, n_lat, seed=seed, k=k, prefixes=prefixes).train(training)
    x = randn(B, D, seed=seed)
    z = (sae.pre_activation(x).clamp_min(0)).flatten().sort(descending=True).values.tolist()
    assume(all(a - b > 1e-9 for a, b in zip(z, z[1:]) if a > 0))  # no ties for the k*B-th place
    f = sae.encode(x)
    total, parts = sae.loss(x) if training else (None, None)
    g = torch.Generator().manual_seed(seed + 1)
    perm = torch.cat([a + torch.randperm(b - a, generator=g) for a, b in zip((0,) + sae.activation.prefixes,
                                                                              sae.activation.prefixes)])
    with torch.no_grad():
        for p in (sae.W_enc, sae.b_enc, sae.W_dec):
            p.copy_(p[perm])
    assert torch.allclose(sae.encode(x), f[:, perm], rtol=0, atol=1e-12)
    if training:
        total2, parts2 = sae.loss(x)
        assert torch.allclose(total2, total, rtol=1e-12, atol=1e-12)
        assert torch.allclose(parts2["prefixes"], parts["prefixes"], rtol=1e-12, atol=1e-12)


# -- the sparse path (minisae/sparse_decode.py) -------------------------------------------

@fast
@given(case=cases, k_aux=st.integers(1, 8), dead_bits=st.integers(0, 2**10 - 1), estimated=st.booleans(),
       transcoder=st.booleans())
def test_sparse_path_equals_the_dense_reference(case, k_aux, dead_bits, estimated, transcoder):
    """Per-group partial decodes summed prefix by prefix (decode_prefixes, PrefixErrors):
    the same loss, parts, code, x_hat, threshold and gradients for every parameter as
    SAE.loss, AuxK at work on random dead latents; transcoder: another target than x."""
    B, D, n_lat, k_frac, bits, seed = case
    k, prefixes = max(1, round(k_frac * n_lat)), ladders(n_lat, bits)
    dead = torch.tensor([(dead_bits >> i) & 1 for i in range(n_lat)], dtype=torch.bool)
    x = randn(B, D, seed=seed)
    target = randn(B, D, seed=seed + 1) if transcoder else None
    runs = []
    for sparse in (False, True):
        sae = random_sae(D, n_lat, seed=seed, k=k, prefixes=prefixes, k_aux=k_aux, dead_after=10).train()
        sae.samples_since_fired.copy_(torch.where(dead, 10, 9))
        if not estimated:
            sae.activation.threshold.fill_(-1.0)
        total, parts = sparse_decode.sparse_loss(sae, x, target=target) if sparse else sae.loss(x, target=target)
        runs.append((sae, total, parts, grads(sae, total)))
    (ref, t_ref, p_ref, g_ref), (sp, t_sp, p_sp, g_sp) = runs
    assert isinstance(p_sp["f"], SparseCode) and set(p_sp) == set(p_ref)
    assert torch.allclose(t_sp, t_ref, rtol=1e-10, atol=1e-12)
    for name in ("recon", "prefixes", "auxk", "x_hat"):
        assert torch.allclose(p_sp[name], p_ref[name], rtol=1e-10, atol=1e-12), name
    f_sp, f_ref = p_sp["f"].to_dense(), p_ref["f"].detach()
    assert torch.equal(f_sp > 0, f_ref > 0) and torch.allclose(f_sp, f_ref, rtol=1e-12, atol=1e-14)
    for name in g_ref:
        assert torch.allclose(g_sp[name], g_ref[name], rtol=1e-9, atol=1e-12), name
    assert torch.equal(sp.activation.threshold, ref.activation.threshold)


def test_the_loop_takes_the_sparse_path_below_the_crossover():
    sae = SAE(8, 64, MatryoshkaBatchTopK(64, k=2, prefixes=(4, 16))).train()
    loss, parts = sparse_decode.loss_function(sae)(torch.randn(32, 8))
    assert isinstance(parts["code"], SparseCode) and parts["prefixes"] > 0


# -- shapes, signs, the training step ------------------------------------------------------

@fast
@given(case=cases, training=st.booleans())
def test_shapes_nonnegative_codes_and_terms(case, training):
    B, D, n_lat, k_frac, bits, seed = case
    sae = random_sae(D, n_lat, seed=seed, k=max(1, round(k_frac * n_lat)), prefixes=ladders(n_lat, bits))
    sae.train(training)
    x = randn(B, D, seed=seed)
    f = sae.encode(x)
    assert f.shape == (B, n_lat) and (f >= 0).all()
    assert torch.equal(sae(x), sae.decode(f)) and sae(x).shape == (B, D)
    if training:
        _, parts = sae.loss(x)
        assert all(parts[n].ndim == 0 and parts[n] >= 0 for n in ("recon", "prefixes", "auxk"))
        ladder = sae.activation.prefix_reconstructions(parts["f"], sae)
        assert [m for m, _ in ladder] == list(sae.activation.prefixes[:-1])
        assert all(x_hat_m.shape == (B, D) for _, x_hat_m in ladder)


def trained(seed, data_seed=0, k=3):
    """Three steps of the training loop; k = 3 of 12 takes the reference loss, k = 1 the sparse path."""
    sae = SAE(6, 12, MatryoshkaBatchTopK(12, k=k, prefixes=(2, 5)), seed=seed)
    data = iter([torch.randn(16, 6, generator=torch.Generator().manual_seed(data_seed + i)) for i in range(3)])
    train(sae, data, TrainConfig(n_samples=48, batch_size=16, lr=0.05), log=False)
    return sae


@pytest.mark.parametrize("k", [3, 1])
def test_decoder_rows_unit_norm_after_training_steps(k):
    before = SAE(6, 12, MatryoshkaBatchTopK(12, k=k, prefixes=(2, 5)), seed=1).W_dec.detach().clone()
    sae = trained(seed=1, k=k)
    assert not torch.equal(sae.W_dec, before)  # the steps did move the decoder
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(12), atol=1e-6)
    assert float(sae.activation.threshold) > 0  # estimated from the training batches


def test_training_is_deterministic_for_a_seed():
    a, b, c = trained(seed=3), trained(seed=3), trained(seed=4)
    assert all(torch.equal(a.state_dict()[n], b.state_dict()[n]) for n in a.state_dict())
    assert not torch.equal(a.W_enc, c.W_enc)


# -- inference ------------------------------------------------------------------------------

@fast
@given(case=cases, t=st.floats(0, 2))
def test_inference_is_a_fixed_threshold_and_batch_independent(case, t):
    B, D, n_lat, k_frac, bits, seed = case
    sae = random_sae(D, n_lat, seed=seed, k=max(1, round(k_frac * n_lat)), prefixes=ladders(n_lat, bits)).eval()
    sae.activation.threshold.fill_(t)
    x = randn(B, D, seed=seed)
    z = sae.pre_activation(x).clamp_min(0)
    f = sae.encode(x)
    assert torch.equal(f, torch.where(z > t, z, torch.zeros_like(z)))
    for b in range(B):
        assert torch.allclose(sae.encode(x[b:b + 1]), f[b:b + 1], rtol=0, atol=1e-12)
    assert float(sae.activation.threshold) == t  # inference leaves it alone


def test_inference_before_training_is_a_value_error():
    sae = SAE(4, 8, MatryoshkaBatchTopK(8, k=2, prefixes=(2, 4))).eval()
    with pytest.raises(ValueError, match="threshold not estimated"):
        sae.encode(torch.randn(3, 4))


# -- settings ---------------------------------------------------------------------------------

@pytest.mark.parametrize("n_lat,expected", [(6144, (96, 192, 384, 768, 1536, 3072, 6144)), (12, (1, 3, 6, 12)),
                                            (1, (1,))])
def test_default_prefixes_are_a_doubling_ladder(n_lat, expected):
    assert default_prefixes(n_lat) == expected
    assert MatryoshkaBatchTopK(n_lat, k=1).prefixes == expected


def test_settings_read_back_and_the_whole_dictionary_is_appended():
    part = MatryoshkaBatchTopK(16, k=4, prefixes=[2, 8], k_aux=3, threshold_momentum=0.1)
    assert part.prefixes == (2, 8, 16)
    settings_ = part_settings(part)
    assert settings_ == {"n_latents": 16, "k": 4, "prefixes": (2, 8, 16), "k_aux": 3, "aux_coef": 1 / 32,
                         "dead_after": 1_000_000, "threshold_momentum": 0.1}
    assert part_settings(MatryoshkaBatchTopK(**settings_)) == settings_


@pytest.mark.parametrize("settings_,match", [
    ({"prefixes": ()}, "non-empty tuple of ints"),
    ({"prefixes": (2, 2.5)}, "non-empty tuple of ints"),
    ({"prefixes": (True, 4)}, "non-empty tuple of ints"),
    ({"prefixes": 4}, "non-empty tuple of ints"),
    ({"prefixes": (0, 4)}, "strictly increasing"),
    ({"prefixes": (4, 2, 8)}, "strictly increasing"),
    ({"prefixes": (2, 2, 8)}, "strictly increasing"),
    ({"prefixes": (2, 9)}, "strictly increasing in 1..n_latents=8"),
    ({"k": 0}, "k must be in 1..n_latents"),
    ({"k": 9}, "k must be in 1..n_latents"),
    ({"threshold_momentum": 0.0}, "threshold_momentum"),
    ({"aux_coef": -1.0}, "aux_coef"),
])
def test_bad_settings_are_one_line_value_errors(settings_, match):
    with pytest.raises(ValueError, match=match) as e:
        MatryoshkaBatchTopK(8, **{"k": 2, **settings_})
    assert "\n" not in str(e.value)
