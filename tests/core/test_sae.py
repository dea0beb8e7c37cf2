"""The SAE against a naive per-sample reference, hand-derived gradients, and invariants.

The reference (`naive_forward`) loops over samples and latents with Python floats and
follows the papers' formulas, not minisae's vectorised code: e.g. the Gated magnitude path
builds W_mag = exp(r_mag) * W_gate explicitly, TopK sorts each row with `sorted`.
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings, strategies as st
from hypothesis.extra.numpy import arrays

from minisae import formats
from minisae.sae import ReLU, SAE, make_sae, variant_classes, variant_name
from minisae.train import TrainConfig, train

VARIANTS = list(variant_classes())
BATCHTOPKS = ("batchtopk", "matryoshka_batchtopk")  # the same code: a batch-wide top-k, then a threshold
pytestmark = pytest.mark.usefixtures("one_thread")
fast = settings(max_examples=25, deadline=None)
sizes = st.tuples(st.integers(1, 4), st.integers(1, 5), st.integers(1, 8))  # B, D, F


def naive_forward(sae, x):
    """(f, x_hat) as nested lists, one sample and one latent at a time."""
    W_enc, b_enc, W_dec, b_dec = (t.tolist() for t in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))
    part, variant = sae.activation, variant_name(sae.activation)
    n_lat, d = len(b_enc), len(b_dec)
    f = []
    for row in x.tolist():
        c = [row[j] - b_dec[j] for j in range(d)]
        pre = [sum(W_enc[i][j] * c[j] for j in range(d)) + b_enc[i] for i in range(n_lat)]
        if variant == "relu":
            f.append([max(p, 0.0) for p in pre])
        elif variant == "gated":  # f = 1[pi_gate > 0] * ReLU(W_mag (x - b_dec) + b_mag)
            r, b_mag = part.r_mag.tolist(), part.b_mag.tolist()
            mag = [sum(math.exp(r[i]) * W_enc[i][j] * c[j] for j in range(d)) + b_mag[i] for i in range(n_lat)]
            f.append([max(mag[i], 0.0) if pre[i] > 0 else 0.0 for i in range(n_lat)])
        elif variant == "jumprelu":
            theta = part.theta.tolist()
            f.append([max(p, 0.0) if max(p, 0.0) > t else 0.0 for p, t in zip(pre, theta)])
        elif variant == "topk":
            top = sorted(range(n_lat), key=lambda i: pre[i], reverse=True)[:part.k]
            f.append([max(pre[i], 0.0) if i in top else 0.0 for i in range(n_lat)])
        elif variant in BATCHTOPKS and not part.training:
            t = float(part.threshold)
            f.append([max(p, 0.0) if max(p, 0.0) > t else 0.0 for p in pre])
        else:  # batchtopk training: ReLU(pre), rank filled in below across the whole batch
            f.append([max(p, 0.0) for p in pre])
    if variant in BATCHTOPKS and part.training:
        entries = sorted(((v, b, i) for b, row in enumerate(f) for i, v in enumerate(row)), reverse=True)
        keep = {(b, i) for _, b, i in entries[:part.k * len(f)]}
        f = [[v if (b, i) in keep else 0.0 for i, v in enumerate(row)] for b, row in enumerate(f)]
    x_hat = [[sum(fb[i] * W_dec[i][j] for i in range(n_lat)) + b_dec[j] for j in range(d)] for fb in f]
    return f, x_hat


def latent_params(sae):
    """The parameters indexed by latent: encoder and decoder rows, b_enc, the part's own."""
    return [sae.W_enc, sae.b_enc, sae.W_dec, *sae.activation.parameters()]


def tensors_of(sae):
    return {k: v.clone() for k, v in sae.state_dict().items()}


# -- the SAE against the naive reference ------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("training", [True, False])
@fast
@given(shape=sizes, seed=st.integers(0, 2**16), k_frac=st.floats(0, 1))
def test_forward_matches_naive_reference(random_sae, variant, training, shape, seed, k_frac):
    B, D, n_lat = shape
    settings_ = {"k": 1 + int(k_frac * (n_lat - 1))} if variant in ("topk", *BATCHTOPKS) else {}
    sae = random_sae(variant, D, n_lat, seed=seed, **settings_).train(training)
    x = torch.randn(B, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    f_ref, x_hat_ref = naive_forward(sae, x)
    f = sae.encode(x)
    assert torch.allclose(f, torch.tensor(f_ref, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.allclose(sae(x), torch.tensor(x_hat_ref, dtype=torch.float64), rtol=0, atol=1e-12)


@fast
@given(shape=sizes, seed=st.integers(0, 2**16), coef=st.floats(0, 2))
def test_relu_l1_gradients_match_hand_derivation(random_sae, shape, seed, coef):
    """loss = (1/B) sum_b ||x_hat_b - x_b||^2 + lam (1/B) sum_b sum_i f_bi, differentiated by hand:
        r = x_hat - x,  dL/dx_hat = 2r/B,  dL/dpre = (dL/dx_hat W_dec^T + lam/B) * 1[pre > 0]
        dW_dec = f^T dL/dx_hat,  dW_enc = dL/dpre^T (x - b_dec),  db_enc = sum_b dL/dpre
        db_dec = sum_b dL/dx_hat - sum_b dL/dpre W_enc   (decoder path + the centring)"""
    B, D, n_lat = shape
    sae = random_sae("relu", D, n_lat, seed=seed, sparsity_coef=coef)
    x = torch.randn(B, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    loss, _ = sae.loss(x)
    loss.backward()
    with torch.no_grad():
        c = x - sae.b_dec  # (B, D)
        pre = c @ sae.W_enc.T + sae.b_enc  # (B, F)
        f = pre.clamp_min(0)
        r = f @ sae.W_dec + sae.b_dec - x  # (B, D)
        g_xhat = 2 * r / B
        g_pre = (g_xhat @ sae.W_dec.T + coef / B) * (pre > 0)  # (B, F)
        expected = {"W_dec": f.T @ g_xhat, "W_enc": g_pre.T @ c, "b_enc": g_pre.sum(0),
                    "b_dec": g_xhat.sum(0) - g_pre.sum(0) @ sae.W_enc}
    for name, g in expected.items():
        assert torch.allclose(getattr(sae, name).grad, g, rtol=1e-10, atol=1e-12), name


# -- invariants --------------------------------------------------------------------------

@st.composite
def cases(draw):
    """(D, F, seed for a random SAE, an input batch (B, D) drawn element by element)."""
    B, D, n_lat = draw(sizes)
    x = draw(arrays(np.float64, (B, D), elements=st.floats(-100, 100, allow_nan=False)))
    return D, n_lat, draw(st.integers(0, 2**16)), torch.from_numpy(x)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("training", [True, False])
@fast
@given(case=cases())
def test_codes_nonnegative_and_forward_is_decode_of_encode(random_sae, variant, training, case):
    D, n_lat, seed, x = case
    sae = random_sae(variant, D, n_lat, seed=seed).train(training)
    f = sae.encode(x)
    assert f.shape == (x.shape[0], n_lat) and (f >= 0).all()
    assert torch.equal(sae(x), sae.decode(f))


def decision_margin(sae, x):
    """Distance of x's pre-activations from the nearest point where the code jumps (for
    comparisons of two mathematically equal SAEs computed with different rounding)."""
    pre = sae.pre_activation(x)
    part, name = sae.activation, variant_name(sae.activation)
    z = pre.clamp_min(0)
    if name == "gated":
        return pre.abs().min().item()
    if name == "jumprelu":
        return (z - part.theta).abs().min().item()
    if name in BATCHTOPKS and not part.training:
        return (z - part.threshold).abs().min().item()
    if name in ("topk", *BATCHTOPKS):
        k = part.k * (x.shape[0] if name in BATCHTOPKS else 1)
        vals = (z.flatten()[None] if name in BATCHTOPKS else pre).sort(-1, descending=True).values
        if k >= vals.shape[-1]:
            return math.inf
        gap = vals[:, k - 1] - vals[:, k]  # a tie at the k-th place matters only if it is kept > 0
        return torch.where(vals[:, k - 1] > 0, gap, math.inf).min().item()
    return math.inf  # ReLU is continuous


@pytest.mark.parametrize("variant", ["relu", "gated", "jumprelu"])
@fast
@given(case=cases(), log_n=st.lists(st.floats(-2, 2), min_size=8, max_size=8))
def test_fold_decoder_norm_keeps_outputs(random_sae, variant, case, log_n):
    """Per-latent rescaling: exact for ReLU, Gated and JumpReLU."""
    D, n_lat, seed, x = case
    sae = random_sae(variant, D, n_lat, seed=seed)
    with torch.no_grad():
        sae.W_dec *= torch.tensor(log_n[:n_lat], dtype=torch.float64).exp()[:, None]
    assume(decision_margin(sae, x) > 1e-6)
    f, x_hat, norms = sae.encode(x), sae(x), sae.W_dec.norm(dim=-1)
    sae.fold_decoder_norm_()
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(n_lat, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(sae(x), x_hat, rtol=1e-9, atol=1e-9)
    # latent i's code is multiplied by its old decoder-row norm
    assert torch.allclose(sae.encode(x), f * norms, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("variant,training", [("topk", True), ("batchtopk", True), ("batchtopk", False)])
@fast
@given(shape=sizes, seed=st.integers(0, 2**16), log_c=st.floats(-2, 2))
def test_fold_decoder_norm_common_scale_keeps_topk_outputs(random_sae, variant, training, shape, seed, log_c):
    """TopK and BatchTopK rank across latents: a common scale c of all decoder rows folds exactly."""
    B, D, n_lat = shape
    sae = random_sae(variant, D, n_lat, seed=seed).train(training)
    with torch.no_grad():
        sae.W_dec *= math.exp(log_c) / sae.W_dec.norm(dim=-1, keepdim=True)  # all rows norm c
    x = torch.randn(B, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    assume(decision_margin(sae, x) > 1e-6)
    x_hat = sae(x)
    sae.fold_decoder_norm_()
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(n_lat, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(sae(x), x_hat, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("training", [True, False])
@fast
@given(shape=sizes, seed=st.integers(0, 2**16))
def test_permuting_latents_permutes_codes_and_keeps_reconstruction(random_sae, variant, training, shape, seed):
    B, D, n_lat = shape
    sae = random_sae(variant, D, n_lat, seed=seed).train(training)
    x = torch.randn(B, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    assume(decision_margin(sae, x) > 1e-9)
    f, x_hat = sae.encode(x), sae(x)
    perm = torch.randperm(n_lat, generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        for p in latent_params(sae):
            p.copy_(p[perm])
    assert torch.allclose(sae.encode(x), f[:, perm], rtol=0, atol=1e-12)
    assert torch.allclose(sae(x), x_hat, rtol=0, atol=1e-12)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("training", [True, False])
@fast
@given(x=arrays(np.float64, st.tuples(st.integers(1, 4), st.integers(1, 6)), elements=st.floats(0, 1e3)))
def test_identity_dictionary_reconstructs_nonnegative_inputs_exactly(variant, training, x):
    """F = D, W_enc = W_dec = I, all biases 0 (Gated: r_mag = b_mag = 0; JumpReLU: theta = 0;
    TopK/BatchTopK: k = D, threshold 0): every input x >= 0 is its own code and reconstruction."""
    x = torch.from_numpy(x)
    D = x.shape[1]
    sae = make_sae(variant, D, D, **({"k": D} if variant in ("topk", *BATCHTOPKS) else {})).double().train(training)
    with torch.no_grad():
        for p in sae.parameters():
            p.zero_()
        sae.W_enc.copy_(torch.eye(D))
        sae.W_dec.copy_(torch.eye(D))
        if variant in BATCHTOPKS:
            sae.activation.threshold.fill_(0.0)
    assert torch.equal(sae.encode(x), x)
    assert torch.equal(sae(x), x)


@fast
@given(shape=st.tuples(st.integers(1, 6), st.integers(1, 6)), seed=st.integers(0, 2**16), log_norm=st.floats(-3, 3))
def test_remove_parallel_grad_leaves_only_the_orthogonal_part(shape, seed, log_norm):
    n_lat, D = shape
    sae = make_sae("relu", D, n_lat, seed=seed).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.W_dec.mul_(math.exp(log_norm))  # the rows need not be unit norm
    grad = torch.randn(n_lat, D, generator=g, dtype=torch.float64)
    sae.W_dec.grad = grad.clone()
    sae.remove_parallel_grad_()
    new = sae.W_dec.grad
    assert torch.allclose((new * sae.W_dec).sum(-1), torch.zeros(n_lat, dtype=torch.float64), atol=1e-10)
    # what was removed is parallel to the row: grad - new = a_i * W_dec[i]
    removed = grad - new
    assert torch.allclose(removed.norm(dim=-1) * sae.W_dec.norm(dim=-1), (removed * sae.W_dec).sum(-1).abs(), atol=1e-10)
    # a gradient already orthogonal is left as it is
    sae.W_dec.grad = new.clone()
    sae.remove_parallel_grad_()
    assert torch.allclose(sae.W_dec.grad, new, atol=1e-12)


def test_remove_parallel_grad_without_grad_is_a_no_op():
    sae = make_sae("relu", 3, 4)
    sae.remove_parallel_grad_()
    assert sae.W_dec.grad is None


@pytest.mark.parametrize("variant", VARIANTS)
def test_decoder_rows_unit_norm_after_a_training_step(variant):
    sae = make_sae(variant, 6, 10, seed=1, **({"k": 3} if variant in ("topk", *BATCHTOPKS) else {}))
    before = sae.W_dec.detach().clone()
    data = iter([torch.randn(16, 6, generator=torch.Generator().manual_seed(0))])
    train(sae, data, TrainConfig(n_samples=16, batch_size=16, lr=0.05), log=False)
    assert not torch.equal(sae.W_dec, before)  # the step did move the decoder
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(10), atol=1e-6)


# -- bad input ---------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [torch.zeros(4, 5), torch.zeros(4), torch.zeros(2, 4, 6)])
def test_wrong_input_shape_is_a_value_error(bad):
    sae = make_sae("relu", 6, 8)
    with pytest.raises(ValueError, match=r"\(batch, 6\)"):
        sae(bad)
    with pytest.raises(ValueError, match=r"\(batch, 6\)"):
        sae.loss(bad)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_input_is_a_value_error(value):
    sae = make_sae("topk", 6, 8, k=2)
    x = torch.randn(4, 6)
    x[2, 3] = value
    with pytest.raises(ValueError, match="NaN or Inf"):
        sae.encode(x)
    with pytest.raises(ValueError, match="NaN or Inf"):
        sae.init_b_dec_(x)


@pytest.mark.parametrize("d,n_latents", [(0, 4), (4, 0), (-1, 4)])
def test_nonpositive_sizes(d, n_latents):
    with pytest.raises(ValueError, match="sizes must be positive"):
        make_sae("relu", d, n_latents)
    with pytest.raises(ValueError, match="sizes must be positive"):
        SAE(d, n_latents, ReLU())


@pytest.mark.parametrize("variant,settings_,match", [
    ("relu", {"sparsity_coef": -1e-3}, "sparsity_coef"),
    ("relu", {"sparsity_coef": float("nan")}, "sparsity_coef"),
    ("gated", {"sparsity_coef": -1.0}, "sparsity_coef"),
    ("jumprelu", {"sparsity_coef": -1.0}, "sparsity_coef"),
    ("jumprelu", {"bandwidth": 0.0}, "bandwidth"),
    ("jumprelu", {"bandwidth": -0.01}, "bandwidth"),
    ("topk", {"k": 0}, "k must be"),
    ("topk", {"k": -3}, "k must be"),
    ("topk", {"k": 9}, "k must be"),
    ("batchtopk", {"k": 0}, "k must be"),
    ("batchtopk", {"k": 9}, "k must be"),
    ("topk", {"k": 2, "k_aux": 0}, "k_aux"),
    ("batchtopk", {"k": 2, "aux_coef": -1.0}, "aux_coef"),
    ("topk", {"k": 2, "dead_after": 0}, "dead_after"),
])
def test_bad_settings(variant, settings_, match):
    with pytest.raises(ValueError, match=match):
        make_sae(variant, 4, 8, **settings_)


def test_unknown_variant_lists_the_valid_ones():
    with pytest.raises(ValueError, match="relux") as e:
        make_sae("relux", 4, 8)
    assert all(name in str(e.value) for name in VARIANTS)


def test_batchtopk_inference_before_training_is_a_value_error():
    sae = make_sae("batchtopk", 4, 8, k=2).eval()
    with pytest.raises(ValueError, match="threshold"):
        sae(torch.randn(3, 4))


# -- saving and loading ------------------------------------------------------------------

NON_DEFAULT = {"relu": {"sparsity_coef": 0.123}, "gated": {"sparsity_coef": 0.2},
               "jumprelu": {"sparsity_coef": 0.3, "bandwidth": 0.05, "theta_init": 0.02},
               "topk": {"k": 3, "k_aux": 2, "aux_coef": 0.1, "dead_after": 1234},
               "batchtopk": {"k": 3, "k_aux": 5, "dead_after": 99, "threshold_momentum": 0.05},
               "matryoshka_batchtopk": {"k": 3, "prefixes": (2, 6, 12), "k_aux": 5, "threshold_momentum": 0.05}}


@pytest.mark.parametrize("variant", VARIANTS)
def test_save_load_round_trip(random_sae, variant, tmp_path):
    """A loaded SAE is the saved one: same class, settings, weights and outputs, ready for
    inference as `train` leaves it (BatchTopK's batch-independent threshold mode). The
    file is a directory in SAELens's layout (tests/formats/test_formats.py tests the layouts)."""
    sae = random_sae(variant, 5, 12, seed=3, dtype=torch.float32, **NON_DEFAULT[variant]).eval()
    x = torch.randn(7, 5, generator=torch.Generator().manual_seed(0))
    formats.save(sae, tmp_path / "sae", hook="blocks.3.hook_resid_post")
    assert sorted(p.name for p in (tmp_path / "sae").iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    loaded, meta = formats.load(tmp_path / "sae")
    assert (meta["hook"], meta["scale"], meta["folded_scale"], meta["layout"]) == ("blocks.3.hook_resid_post", 1.0,
                                                                                  1.0, "saelens")
    assert type(loaded.activation) is type(sae.activation)
    for k, value in NON_DEFAULT[variant].items():
        assert getattr(loaded.activation, k) == value, k
    for k, v in sae.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    before = tensors_of(loaded)
    assert torch.equal(loaded(x), sae(x))
    assert torch.equal(loaded(x[:1]), sae(x[:1]))
    for k, v in tensors_of(loaded).items():  # using a loaded SAE changes nothing in it
        assert torch.equal(v, before[k]), k


def legacy_file(sae, path):
    """The single torch.save file minisae wrote before it used SAELens's layout."""
    from minisae.sae import part_settings, variant_name
    torch.save({"variant": variant_name(sae.activation), "d": sae.d, "n_latents": sae.n_latents,
                "settings": part_settings(sae.activation), "state_dict": sae.state_dict(), "meta": {}}, path)


def test_legacy_file_loads(random_sae, tmp_path):
    sae = random_sae("batchtopk", 5, 12, dtype=torch.float32, **NON_DEFAULT["batchtopk"]).eval()
    legacy_file(sae, tmp_path / "sae.pt")
    loaded, meta = formats.load(tmp_path / "sae.pt")
    assert meta["layout"] == "pt" and type(loaded.activation) is type(sae.activation)
    x = torch.randn(7, 5)
    assert torch.equal(loaded(x), sae(x))


def test_load_corrupt_file(tmp_path):
    path = tmp_path / "bad.pt"
    path.write_bytes(b"this is not a torch file")
    with pytest.raises(ValueError, match="cannot read SAE file"):
        formats.load(path)
    with pytest.raises(ValueError, match="no such SAE file or directory"):
        formats.load(tmp_path / "missing.pt")


def test_load_not_an_sae_file(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match="not an SAE file"):
        formats.load(path)


@pytest.mark.parametrize("tamper", ["n_latents", "shape", "missing"])
def test_load_mismatched_weights(tmp_path, tamper):
    path = tmp_path / "sae.pt"
    legacy_file(make_sae("gated", 4, 6), path)
    ckpt = torch.load(path, weights_only=True)
    if tamper == "n_latents":
        ckpt["n_latents"] = 7
    elif tamper == "shape":
        ckpt["state_dict"]["W_dec"] = torch.zeros(6, 5)
    else:
        del ckpt["state_dict"]["activation.r_mag"]
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match="weights do not match"):
        formats.load(path)


def test_load_unknown_variant(tmp_path):
    path = tmp_path / "sae.pt"
    legacy_file(make_sae("relu", 4, 6), path)
    ckpt = torch.load(path, weights_only=True)
    ckpt["variant"] = "mystery"
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match="unknown variant 'mystery'"):
        formats.load(path)
