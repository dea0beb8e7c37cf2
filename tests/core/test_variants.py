"""The SAE variants: each part against the property that defines it in its paper.

TopK against a per-row `sorted` loop; BatchTopK's batch-level budget and its
batch-independent inference; Gated as a JumpReLU (Rajamanoharan et al. 2024b, sec. 3.2);
the stop-gradients of the Gated auxiliary loss and of AuxK, with the gradients that are
left derived by hand; JumpReLU's straight-through pseudo-gradients against a naive loop.
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings, strategies as st
from hypothesis.extra.numpy import arrays

from minisae.sae import make_sae, variant_classes
from minisae.variants import auxk_loss

VARIANTS = list(variant_classes())
pytestmark = pytest.mark.usefixtures("one_thread")
fast = settings(max_examples=25, deadline=None)
sizes = st.tuples(st.integers(1, 5), st.integers(1, 5), st.integers(1, 8))  # B, D, F


def pre_arrays(max_b=5, max_f=8, elements=st.floats(-5, 5, allow_nan=False)):
    """Pre-activations (B, F) drawn element by element: zeros, ties and signs included."""
    return arrays(np.float64, st.tuples(st.integers(1, max_b), st.integers(1, max_f)), elements=elements).map(torch.from_numpy)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# -- TopK ------------------------------------------------------------------------------

@fast
@given(pre=pre_arrays(), k_frac=st.floats(0, 1))
def test_topk_active_count_and_kept_values_match_a_sort_loop(pre, k_frac):
    n_lat = pre.shape[1]
    k = 1 + int(k_frac * (n_lat - 1))
    sae = make_sae("topk", 2, n_lat, k=k).double()
    f = sae.activation(pre, sae)
    for row, f_row in zip(pre.tolist(), f):
        top = sorted(row, reverse=True)[:k]
        positive = [v for v in top if v > 0]
        assert (f_row > 0).sum().item() == min(k, sum(v > 0 for v in row)) == len(positive)
        assert sorted(f_row[f_row > 0].tolist(), reverse=True) == positive  # values kept unshrunk
        assert all(f_row[i] in (0.0, row[i]) for i in range(n_lat))  # each entry is 0 or its pre


@fast
@given(shape=st.tuples(st.integers(1, 5), st.integers(1, 10)), seed=st.integers(0, 2**16), k_frac=st.floats(0, 1))
def test_topk_equals_per_row_sort_loop(shape, seed, k_frac):
    """Continuous pre-activations (no ties): exactly the per-row reference, index for index."""
    B, n_lat = shape
    k = 1 + int(k_frac * (n_lat - 1))
    pre = randn(B, n_lat, seed=seed)
    sae = make_sae("topk", 2, n_lat, k=k).double()
    ref = torch.zeros_like(pre)
    for b in range(B):
        for i in sorted(range(n_lat), key=lambda i: pre[b, i].item(), reverse=True)[:k]:
            ref[b, i] = max(pre[b, i].item(), 0.0)
    assert torch.equal(sae.activation(pre, sae), ref)


@pytest.mark.parametrize("variant,training", [(v, t) for v in VARIANTS for t in (True, False)
                                              if not (v in ("batchtopk", "matryoshka_batchtopk") and t)])
@fast
@given(shape=sizes, seed=st.integers(0, 2**16))
def test_encoders_are_batch_independent(random_sae, variant, training, shape, seed):
    """A sample's code does not depend on the other samples: alone == in the batch, and a
    permuted batch gives permuted codes (all but BatchTopK in training)."""
    B, D, n_lat = shape
    sae = random_sae(variant, D, n_lat, seed=seed).train(training)
    x = randn(B, D, seed=seed)
    f = sae.encode(x)
    perm = torch.randperm(B, generator=torch.Generator().manual_seed(seed))
    assert torch.allclose(sae.encode(x[perm]), f[perm], rtol=0, atol=1e-12)
    for b in range(B):
        assert torch.allclose(sae.encode(x[b:b + 1]), f[b:b + 1], rtol=0, atol=1e-12)


# -- BatchTopK -------------------------------------------------------------------------

@fast
@given(pre=pre_arrays(), k_frac=st.floats(0, 1))
def test_batchtopk_training_keeps_the_k_times_b_largest(pre, k_frac):
    B, n_lat = pre.shape
    k = 1 + int(k_frac * (n_lat - 1))
    sae = make_sae("batchtopk", 2, n_lat, k=k).double().train()
    f = sae.activation(pre, sae)
    n_pos = int((pre > 0).sum())
    assert int((f > 0).sum()) == min(k * B, n_pos)  # exactly k*B when there are enough
    kept, dropped = pre[f > 0], pre[(f == 0) & (pre > 0)]
    assert torch.equal(f[f > 0], kept)  # kept values are the pre-activations themselves
    if kept.numel() and dropped.numel():
        assert kept.min() >= dropped.max()  # nothing dropped beats anything kept


@fast
@given(pres=st.lists(pre_arrays(elements=st.floats(-5, 5, allow_nan=False)), min_size=1, max_size=4))
def test_batchtopk_threshold_is_running_mean_of_smallest_kept(pres):
    """Reference: t <- m_1 on the first batch, then t <- (1 - mu) t + mu m_j, m_j the
    smallest positive value kept in batch j (batches with nothing kept leave t alone)."""
    n_lat = min(p.shape[1] for p in pres)
    sae = make_sae("batchtopk", 2, n_lat, k=1, threshold_momentum=0.3).double().train()
    t = None
    for pre in pres:
        pre = pre[:, :n_lat]
        B = pre.shape[0]
        kept = sorted((v for v in pre.flatten().tolist() if v > 0), reverse=True)[:B]
        if kept:
            t = kept[-1] if t is None else 0.7 * t + 0.3 * kept[-1]
        sae.activation(pre, sae)
    assert math.isclose(float(sae.activation.threshold), -1.0 if t is None else t, rel_tol=1e-12)


@fast
@given(pre=pre_arrays(), t=st.floats(0, 3))
def test_batchtopk_inference_is_a_fixed_threshold(pre, t):
    sae = make_sae("batchtopk", 2, pre.shape[1], k=1).double().eval()
    sae.activation.threshold.fill_(t)
    f = sae.activation(pre, sae)
    z = pre.clamp_min(0)
    assert torch.equal(f, torch.where(z > t, z, torch.zeros_like(z)))
    assert float(sae.activation.threshold) == t  # inference does not move the threshold


# -- Gated -----------------------------------------------------------------------------

@fast
@given(shape=sizes, seed=st.integers(0, 2**16), x_scale=st.floats(0.1, 10))
def test_gated_is_a_jumprelu(random_sae, shape, seed, x_scale):
    """Gated == JumpReLU with W_enc = exp(r_mag) W_gate, b_enc = b_mag and
    theta = b_mag - exp(r_mag) b_gate, on any input (Jumping Ahead, sec. 3.2)."""
    B, D, n_lat = shape
    gated = random_sae("gated", D, n_lat, seed=seed)
    jump = make_sae("jumprelu", D, n_lat).double()
    r, b_mag = gated.activation.r_mag, gated.activation.b_mag
    with torch.no_grad():
        jump.W_enc.copy_(r.exp()[:, None] * gated.W_enc)
        jump.b_enc.copy_(b_mag)
        jump.activation.theta.copy_(b_mag - r.exp() * gated.b_enc)
        jump.W_dec.copy_(gated.W_dec)
        jump.b_dec.copy_(gated.b_dec)
    x = randn(B, D, seed=seed) * x_scale
    assume(gated.pre_activation(x).abs().min() > 1e-9)  # no sample on the gate's edge
    assert torch.allclose(jump.encode(x), gated.encode(x), rtol=0, atol=1e-10)
    assert torch.allclose(jump(x), gated(x), rtol=0, atol=1e-10)


@fast
@given(shape=sizes, seed=st.integers(0, 2**16), coef=st.floats(0, 2))
def test_gated_aux_and_l1_send_no_gradient_into_decoder_or_magnitudes(random_sae, shape, seed, coef):
    """The auxiliary reconstruction uses a frozen decoder (paper eq. 8): W_dec gets nothing
    from it, and b_dec only through the encoder's centring x - b_dec. Neither term
    reaches r_mag, b_mag. Hand-derived gate gradient:
        L_aux = (1/B) sum_b ||x_b - ReLU(pi_b) W_dec - b_dec||^2 + lam (1/B) sum_b sum_i ReLU(pi_bi)
        dL/dpi = (-(2/B) r W_dec^T + lam/B) * 1[pi > 0],   r = x - x_hat_frozen"""
    B, D, n_lat = shape
    sae = random_sae("gated", D, n_lat, seed=seed, sparsity_coef=coef)
    x = randn(B, D, seed=seed)
    pre = sae.pre_activation(x)
    f = sae.activation(pre, sae)
    terms = sae.activation.loss_terms(x=x, pre=pre, f=f, x_hat=sae.decode(f), sae=sae)
    sum(terms.values()).backward()
    for p in [sae.W_dec, *sae.activation.parameters()]:
        assert p.grad is None or torch.equal(p.grad, torch.zeros_like(p))
    with torch.no_grad():
        c = x - sae.b_dec
        gate = pre.clamp_min(0)
        r = x - gate @ sae.W_dec - sae.b_dec
        g_pre = (-(2 / B) * r @ sae.W_dec.T + coef / B) * (pre > 0)  # (B, F)
    assert torch.allclose(sae.W_enc.grad, g_pre.T @ c, rtol=1e-10, atol=1e-12)
    assert torch.allclose(sae.b_enc.grad, g_pre.sum(0), rtol=1e-10, atol=1e-12)
    assert torch.allclose(sae.b_dec.grad, -g_pre.sum(0) @ sae.W_enc, rtol=1e-10, atol=1e-12)


# -- AuxK ------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["topk", "batchtopk"])
def test_auxk_is_zero_when_nothing_is_dead(random_sae, variant):
    sae = random_sae(variant, 4, 8, seed=1, k=2, dead_after=100)
    sae.samples_since_fired.fill_(99)
    x = randn(6, 4)
    loss, parts = sae.loss(x)
    assert parts["auxk"].item() == 0.0
    assert parts["auxk"].grad_fn is None  # a constant: no parameter receives a gradient from it


@fast
@given(shape=sizes, seed=st.integers(0, 2**16), k_aux=st.integers(1, 6), dead_bits=st.integers(1, 2**8 - 1))
def test_auxk_against_naive_reference_and_its_stop_gradient(random_sae, shape, seed, k_aux, dead_bits):
    """Reference: per sample, the k_aux largest pre-activations among dead latents (Python
    sorted), ReLU, decoded without b_dec; the target e = x - x_hat is a constant, so x_hat
    gets no gradient and only dead latents' rows move. Hand-derived:
        dL/de_hat = -(2c/B)(e - e_hat),  dW_dec = f_aux^T dL/de_hat,
        dL/dpre = (dL/de_hat W_dec^T) * 1[selected, pre > 0],  db_dec = -sum_b dL/dpre W_enc"""
    B, D, n_lat = shape
    dead = torch.tensor([(dead_bits >> i) & 1 for i in range(n_lat)], dtype=torch.bool)
    assume(dead.any())
    sae = random_sae("topk", D, n_lat, seed=seed, k=1, dead_after=10)
    sae.samples_since_fired.copy_(torch.where(dead, 10, 9))
    x = randn(B, D, seed=seed)
    x_hat = randn(B, D, seed=seed + 1).requires_grad_()
    pre = sae.pre_activation(x)
    loss = auxk_loss(x, pre, x_hat, sae, k_aux=k_aux, aux_coef=0.7, dead_after=10)
    # the naive reference
    W_dec = sae.W_dec.tolist()
    e = (x - x_hat).tolist()
    f_aux = torch.zeros(B, n_lat, dtype=torch.float64)
    total = 0.0
    for b in range(B):
        chosen = sorted((i for i in range(n_lat) if dead[i]), key=lambda i: pre[b, i].item(), reverse=True)[:k_aux]
        for i in chosen:
            f_aux[b, i] = max(pre[b, i].item(), 0.0)
        e_hat = [sum(f_aux[b, i].item() * W_dec[i][j] for i in range(n_lat)) for j in range(D)]
        total += sum((e[b][j] - e_hat[j]) ** 2 for j in range(D))
    assert math.isclose(loss.item(), 0.7 * total / B, rel_tol=1e-10, abs_tol=1e-12)
    loss.backward()
    assert x_hat.grad is None  # the residual is detached
    with torch.no_grad():
        g_ehat = -(2 * 0.7 / B) * ((x - x_hat) - f_aux @ sae.W_dec)  # (B, D)
        g_pre = (g_ehat @ sae.W_dec.T) * (f_aux > 0)  # (B, F)
    assert torch.allclose(sae.W_dec.grad, f_aux.T @ g_ehat, rtol=1e-10, atol=1e-12)
    assert torch.allclose(sae.W_enc.grad, g_pre.T @ (x - sae.b_dec), rtol=1e-10, atol=1e-12)
    assert torch.allclose(sae.b_dec.grad, -g_pre.sum(0) @ sae.W_enc, rtol=1e-10, atol=1e-12)
    assert (sae.W_dec.grad[~dead] == 0).all() and (sae.W_enc.grad[~dead] == 0).all() and (sae.b_enc.grad[~dead] == 0).all()


# -- JumpReLU --------------------------------------------------------------------------

@fast
@given(pre=pre_arrays(), thetas=st.lists(st.floats(-1, 3), min_size=8, max_size=8))
def test_jumprelu_forward_is_zero_below_theta_and_z_above(pre, thetas):
    n_lat = pre.shape[1]
    sae = make_sae("jumprelu", 2, n_lat).double()
    theta = torch.tensor(thetas[:n_lat], dtype=torch.float64)
    sae.activation.theta.data.copy_(theta)
    f = sae.activation(pre, sae)
    z = pre.clamp_min(0)
    above = z > theta
    assert torch.equal(f[above], z[above])
    assert (f[~above] == 0).all()


def jump_case(seed, B, n_lat, eps):
    """A JumpReLU part with pre-activations crowded around the thresholds, so that many
    fall inside the kernel's window |z - theta| < eps/2 and many outside."""
    sae = make_sae("jumprelu", 2, n_lat, bandwidth=eps).double()
    g = torch.Generator().manual_seed(seed)
    theta = torch.rand(n_lat, generator=g, dtype=torch.float64) * 2
    sae.activation.theta.data.copy_(theta)
    pre = (theta + (torch.rand(B, n_lat, generator=g, dtype=torch.float64) - 0.5) * 3 * eps).requires_grad_()
    return sae, pre, torch.randn(B, n_lat, generator=g, dtype=torch.float64)


@fast
@given(seed=st.integers(0, 2**16), B=st.integers(1, 6), n_lat=st.integers(1, 6), eps=st.floats(0.01, 1))
def test_jumprelu_theta_pseudo_gradient_matches_paper_formula(seed, B, n_lat, eps):
    """d f_bi / d theta_i = -(theta_i / eps) K((z_bi - theta_i) / eps), K(u) = 1[|u| < 1/2]
    (Jumping Ahead, eq. 11); d f / d z = H(z - theta); upstream gradient G."""
    sae, pre, G = jump_case(seed, B, n_lat, eps)
    z = pre.detach().clamp_min(0)
    theta = sae.activation.theta.detach()
    assume(((z - theta).abs() - eps / 2).abs().min() > 1e-9)  # no sample on the window's edge
    (sae.activation(pre, sae) * G).sum().backward()
    ref = [sum(-(theta[i].item() / eps) * (abs((z[b, i] - theta[i]).item() / eps) < 0.5) * G[b, i].item()
               for b in range(B)) for i in range(n_lat)]
    assert torch.allclose(sae.activation.theta.grad, torch.tensor(ref, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert torch.equal(pre.grad, G * ((z > theta) & (pre.detach() > 0)))


@fast
@given(seed=st.integers(0, 2**16), B=st.integers(1, 6), n_lat=st.integers(1, 6), eps=st.floats(0.01, 1), coef=st.floats(0.1, 3))
def test_jumprelu_l0_step_pseudo_gradient(seed, B, n_lat, eps, coef):
    """L0 term lam (1/B) sum_b sum_i H(z_bi - theta_i): d/dtheta_i = lam (1/B) sum_b -(1/eps) K(...),
    nothing for z (Jumping Ahead, eq. 12); its value is lam * the mean count of z > theta."""
    sae, pre, _ = jump_case(seed, B, n_lat, eps)
    sae.activation.sparsity_coef = coef
    z = pre.detach().clamp_min(0)
    theta = sae.activation.theta.detach()
    assume(((z - theta).abs() - eps / 2).abs().min() > 1e-9)
    f = sae.activation(pre, sae)
    l0 = sae.activation.loss_terms(x=None, pre=pre, f=f, x_hat=None, sae=sae, coef_scale=0.5)["l0"]
    assert math.isclose(l0.item(), 0.5 * coef * (z > theta).sum().item() / B, rel_tol=1e-12)
    l0.backward()
    ref = [0.5 * coef / B * sum(-(1 / eps) * (abs((z[b, i] - theta[i]).item() / eps) < 0.5) for b in range(B))
           for i in range(n_lat)]
    assert torch.allclose(sae.activation.theta.grad, torch.tensor(ref, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert pre.grad is None  # nothing for z: not even a (B, F) matrix of zeros
