"""The training loop: determinism, schedules, dead-latent bookkeeping and resampling
(Towards Monosemanticity, "Neuron Resampling"), failure on a diverging loss, and a short
run on synthetic data with a known dictionary that must actually learn."""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from minisae.metrics import evaluate_sae
from minisae.sae import make_sae, variant_classes
from minisae.train import TrainConfig, all_finite, lr_at, resample_dead_, sample_stream, train
from toy_models.sparse_features import SparseFeatures, SparseFeaturesConfig

VARIANTS = list(variant_classes())
pytestmark = pytest.mark.usefixtures("one_thread")
SETTINGS = {"relu": {"sparsity_coef": 1e-2}, "gated": {"sparsity_coef": 1e-2}, "jumprelu": {"sparsity_coef": 1e-2},
            "topk": {"k": 4}, "batchtopk": {"k": 4}, "matryoshka_batchtopk": {"k": 4}}


def toy_data(seed=0):
    return SparseFeatures(SparseFeaturesConfig(n_features=32, d=16, mean_active=3, seed=seed))


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# -- configuration and schedules -------------------------------------------------------

@pytest.mark.parametrize("kw", [
    {"n_samples": 0}, {"batch_size": 0}, {"batch_size": -8}, {"lr": 0.0}, {"lr": -1e-3}, {"lr": float("nan")},
    {"n_samples": 10, "batch_size": 16},
])
def test_bad_sizes_and_learning_rate(kw):
    with pytest.raises(ValueError):
        TrainConfig(**{"n_samples": 64, "batch_size": 16, **kw})


@pytest.mark.parametrize("kw,name", [
    ({"lr_warmup_frac": -0.1}, "lr_warmup_frac"), ({"lr_decay_frac": 1.5}, "lr_decay_frac"),
    ({"coef_warmup_frac": -1.0}, "coef_warmup_frac"), ({"resample_until_frac": 2.0}, "resample_until_frac"),
    ({"resample_every": -1}, "resample_every"), ({"resample_dead_after": 0}, "resample_dead_after"),
    ({"resample_pool": 0}, "resample_pool"), ({"log_every": 0}, "log_every"),
])
def test_bad_schedule_and_resampling_settings(kw, name):
    """Fractions outside [0, 1] silently distort the schedules (lr_decay_frac = 1.5 scales
    the whole run's lr down), log_every = 0 divides by zero mid-run and resample_pool = 0
    fails only at the first resampling: all are caught when the config is made."""
    with pytest.raises(ValueError, match=name):
        TrainConfig(n_samples=64, batch_size=16, **kw)


@settings(max_examples=40, deadline=None)
@given(n_steps=st.integers(1, 300), warm=st.floats(0, 0.5), decay=st.floats(0, 0.5), lr=st.floats(1e-5, 1))
def test_lr_schedule_warms_up_holds_and_decays_to_zero(n_steps, warm, decay, lr):
    cfg = TrainConfig(n_samples=n_steps, batch_size=1, lr=lr, lr_warmup_frac=warm, lr_decay_frac=decay)
    lrs = [lr_at(s, n_steps, cfg) for s in range(n_steps + 1)]
    assert all(0 < v <= lr * (1 + 1e-12) for v in lrs[:-1])
    assert lrs[-1] == 0.0  # the line through the decay phase reaches 0 at the end of training
    n_warm = max(1, int(warm * n_steps))
    n_decay = n_steps - int((1 - decay) * n_steps)
    if n_warm + n_decay <= n_steps:  # phases do not overlap
        # warmup: linear from lr / n_warm, reaching lr at its last step
        assert lrs[:n_warm] == pytest.approx([lr * (s + 1) / n_warm for s in range(n_warm)], rel=1e-12)
        # hold: lr itself
        assert all(v == lr for v in lrs[n_warm:n_steps - n_decay])
        # decay: equal steps down, ending one step above 0
        tail = lrs[n_steps - n_decay:]
        diffs = [a - b for a, b in zip(tail, tail[1:])]
        assert diffs == pytest.approx([lr / max(1, n_decay)] * n_decay, rel=1e-9)


def test_train_applies_the_lr_and_sparsity_schedules(monkeypatch, spy_loss):
    """The optimizer steps with lr_at(step) and the loss sees the sparsity coefficient ramp
    linearly from 1/n to 1 over the first coef_warmup_frac of the steps."""
    cfg = TrainConfig(n_samples=40 * 8, batch_size=8, lr=1e-2, lr_warmup_frac=0.1, lr_decay_frac=0.25,
                      coef_warmup_frac=0.2)
    sae = make_sae("relu", 4, 6)
    lrs, coefs = [], []
    step = torch.optim.Adam.step

    def recording_step(self, *a, **kw):
        lrs.append(self.param_groups[0]["lr"])
        return step(self, *a, **kw)

    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    spy_loss(lambda loss: lambda x, coef_scale=1.0, **kw: (coefs.append(coef_scale), loss(x, coef_scale, **kw))[1])
    train(sae, iter([randn(8, 4, seed=s) for s in range(40)]), cfg, log=False)
    assert lrs == [lr_at(s, 40, cfg) for s in range(40)]
    assert coefs == pytest.approx([(s + 1) / 8 for s in range(8)] + [1.0] * 32)


# -- determinism and the decoder constraint ---------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_same_seed_same_weights(variant):
    data = toy_data()
    cfg = TrainConfig(n_samples=30 * 16, batch_size=16, lr=3e-3, resample_every=10, resample_dead_after=16, resample_pool=2)

    def run(data_seed):
        sae = make_sae(variant, 16, 24, seed=1, **SETTINGS[variant])
        train(sae, sample_stream(data, 16, data_seed), cfg, log=False)
        return sae.state_dict()

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["W_enc"], c["W_enc"])  # the data do matter


def test_samples_since_fired_counts_per_latent(spy_loss):
    """Latent 0 can never fire (encoder row 0, bias far below zero): its counter is the
    number of samples seen; a latent that fired in the last batch is at 0."""
    sae = make_sae("relu", 4, 6, sparsity_coef=0.0)
    with torch.no_grad():
        sae.W_enc[0] = 0.0
        sae.b_enc[0] = -1e6
    codes = []
    spy_loss(lambda loss: lambda x, coef_scale=1.0, **kw: (lambda out: (codes.append(out[1]["code"].to_dense()), out)[1])(
        loss(x, coef_scale, **kw)))
    train(sae, iter([randn(8, 4, seed=s) for s in range(5)]), TrainConfig(n_samples=5 * 8, batch_size=8), log=False)
    # reference: walk back from the last batch to the last one in which each latent fired
    for i in range(6):
        fired_in = [s for s, f in enumerate(codes) if (f[:, i] > 0).any()]
        expected = 8 * (5 - 1 - fired_in[-1]) if fired_in else 40
        assert sae.samples_since_fired[i] == expected, i
    assert sae.samples_since_fired[0] == 40


# -- failures ---------------------------------------------------------------------------

def test_diverging_loss_raises_floating_point_error():
    """Finite inputs whose squares overflow float32 give an infinite loss: stop at once
    rather than train on NaN weights."""
    sae = make_sae("relu", 4, 6)
    batches = iter([randn(8, 4, seed=s) * 1e20 for s in range(3)])
    with pytest.raises(FloatingPointError, match="step 0"):
        train(sae, batches, TrainConfig(n_samples=24, batch_size=8), log=False)


def test_nan_loss_mid_run_raises_floating_point_error(spy_loss):
    sae = make_sae("topk", 4, 6, k=2)
    calls = []

    def loss_then_nan(loss):
        def spy(x, coef_scale=1.0, **kw):
            calls.append(1)
            total, parts = loss(x, coef_scale, **kw)
            return (total * float("nan") if len(calls) == 3 else total), parts
        return spy

    spy_loss(loss_then_nan)
    with pytest.raises(FloatingPointError, match="step 2"):
        train(sae, iter([randn(8, 4, seed=s) for s in range(5)]), TrainConfig(n_samples=40, batch_size=8), log=False)


def test_bad_batches_are_value_errors():
    sae = make_sae("relu", 4, 6)
    bad = randn(8, 4)
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        train(sae, iter([bad]), TrainConfig(n_samples=8, batch_size=8), log=False)
    with pytest.raises(ValueError, match="batch of 5"):
        train(sae, iter([randn(5, 4)]), TrainConfig(n_samples=8, batch_size=8), log=False)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 300), st.integers(0, 10**6), st.sampled_from([None, math.nan, math.inf, -math.inf]),
       st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
def test_the_finite_check_is_isfinite_all(n, where, bad, dtype):
    """all_finite (min and max of x, one pass) answers as the plain isfinite(x).all(), a bad
    value anywhere (the first, the last, the tail a vectorised loop leaves over)."""
    x = randn(n, 3).to(dtype)
    if bad is not None:
        x.view(-1)[where % x.numel()] = bad
    assert bool(all_finite(x)) == bool(torch.isfinite(x).all()) == (bad is None)


# -- resampling dead latents ------------------------------------------------------------

@pytest.mark.parametrize("variant", ["relu", "jumprelu"])
def test_resampling_reads_no_batch_beyond_the_training_steps(variant):
    """The resampling pool is the last `resample_pool` training batches: a stream of
    exactly n_steps batches is enough, and every batch read is trained on."""
    sae = make_sae(variant, 4, 12, **SETTINGS[variant])
    with torch.no_grad():
        sae.b_enc[:6] = -1e3  # six latents that never fire: every resampling has work
    reads = []

    def stream():
        for s in range(12):
            reads.append(s)
            yield randn(8, 4, seed=s)

    cfg = TrainConfig(n_samples=12 * 8, batch_size=8, resample_every=4, resample_dead_after=8, resample_pool=3,
                      resample_until_frac=1.0)
    train(sae, stream(), cfg, log=False)
    assert reads == list(range(12))
    assert (sae.b_enc[:6] > -1e3).all()  # they were resampled


def test_nonfinite_loss_is_caught_before_a_resampling(spy_loss):
    """The finiteness check waits for the log interval, but not past a resampling, which
    would draw from NaN losses; the step named is the first bad one."""
    sae = make_sae("relu", 4, 6)
    calls = []

    def loss_then_nan(loss):
        def spy(x, coef_scale=1.0, **kw):
            calls.append(1)
            total, parts = loss(x, coef_scale, **kw)
            return (total * float("nan") if len(calls) >= 2 else total), parts
        return spy

    spy_loss(loss_then_nan)
    cfg = TrainConfig(n_samples=40, batch_size=8, resample_every=3, resample_dead_after=1, log_every=100)
    with pytest.raises(FloatingPointError, match="step 1 "):
        train(sae, iter([randn(8, 4, seed=s) for s in range(5)]), cfg, log=False)
    assert len(calls) == 3  # stopped at the resampling after step 2, not at the end



def adam_after_steps(sae, n=3):
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for s in range(n):
        opt.zero_grad()
        sae.loss(torch.randn(8, sae.d, generator=torch.Generator().manual_seed(s), dtype=sae.W_dec.dtype))[0].backward()
        opt.step()
    return opt


@pytest.mark.parametrize("variant", VARIANTS)
def test_resample_reinitialises_only_dead_latents(random_sae, variant):
    sae = random_sae(variant, 5, 9, seed=4)
    opt = adam_after_steps(sae)
    dead = torch.tensor([1, 4, 7])
    alive = torch.ones(9, dtype=torch.bool)
    alive[dead] = False
    sae.samples_since_fired.copy_(torch.where(alive, 999, 1000))
    before = {k: v.clone() for k, v in sae.state_dict().items()}
    moments = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in sae.parameters()}
    pool = [torch.randn(6, 5, generator=torch.Generator().manual_seed(10 + i), dtype=torch.float64) for i in range(2)]
    cfg = TrainConfig(n_samples=64, batch_size=6, resample_dead_after=1000, resample_pool=2)
    n = resample_dead_(sae, opt, torch.cat(pool), cfg, torch.Generator().manual_seed(0))
    assert n == 3 and sae.training  # back in training mode after the pool's eval-mode pass
    assert (sae.samples_since_fired[dead] == 0).all() and (sae.samples_since_fired[alive] == 999).all()
    # live latents and the shared parameters are untouched
    for name, p in sae.named_parameters():
        if p.ndim and p.shape[0] == 9:
            assert torch.equal(p[alive], before[name][alive]), name
        else:
            assert torch.equal(p, before[name]), name
    if variant in ("batchtopk", "matryoshka_batchtopk"):
        assert torch.equal(sae.activation.threshold, before["activation.threshold"])
    # new decoder rows: unit-norm directions of pool inputs, centred on b_dec
    candidates = torch.cat(pool) - sae.b_dec
    candidates = candidates / candidates.norm(dim=-1, keepdim=True)
    for i in dead:
        assert torch.cdist(sae.W_dec[i][None], candidates).min() < 1e-12
    # encoder rows along them with 0.2 x the mean live encoder norm; bias and part reset
    live_norm = before["W_enc"][alive].norm(dim=-1).mean()
    assert torch.allclose(sae.W_enc[dead], 0.2 * live_norm * sae.W_dec[dead], atol=1e-12)
    assert (sae.b_enc[dead] == 0).all()
    if variant == "gated":
        assert (sae.activation.r_mag[dead] == 0).all() and (sae.activation.b_mag[dead] == 0).all()
    if variant == "jumprelu":
        assert (sae.activation.theta[dead] == sae.activation.theta_init).all()
    # Adam's moments zeroed for the dead rows only
    for p in sae.parameters():
        for k, v in opt.state[p].items():
            old = moments[id(p)][k]
            if v.ndim and p.shape[0] == 9:  # indexed by latent
                assert (v[dead] == 0).all() and torch.equal(v[alive], old[alive]), k
            else:
                assert torch.equal(v, old), k


def test_resample_without_dead_latents_changes_nothing(random_sae):
    sae = random_sae("relu", 4, 6)
    opt = adam_after_steps(sae)
    before = {k: v.clone() for k, v in sae.state_dict().items()}
    pool = torch.zeros(0, 4, dtype=torch.float64)  # must not even be used
    assert resample_dead_(sae, opt, pool, TrainConfig(n_samples=8, batch_size=8, resample_dead_after=10), torch.Generator()) == 0
    assert all(torch.equal(v, before[k]) for k, v in sae.state_dict().items())


def test_resample_picks_inputs_with_probability_proportional_to_squared_loss():
    """An identity SAE (W_enc = W_dec = I on the first D latents) reconstructs x >= 0
    exactly, so only the two pool inputs with negative entries have a loss: 1 and 3. With
    p proportional to loss^2 the second is picked with probability 9/10 (proportional to the
    loss it would be 3/4). 400 draws: std sqrt(0.09/400) = 0.015, tolerance 4 std."""
    D, n_dead = 4, 400
    sae = make_sae("relu", D, D + n_dead).double()
    with torch.no_grad():
        for p in sae.parameters():
            p.zero_()
        sae.W_enc[:D] = torch.eye(D)
        sae.W_dec[:D] = torch.eye(D)
        sae.W_dec[D:] = 1.0  # the dead latents' code is 0, their rows do not matter
    opt = torch.optim.Adam(sae.parameters())
    sae.samples_since_fired[D:] = 10
    y1, y3 = torch.tensor([-1.0, 0.5, 0, 0]), torch.tensor([0.2, 0, -math.sqrt(3), 0])
    pool = torch.cat([torch.rand(20, D, generator=torch.Generator().manual_seed(0)), y1[None], y3[None]]).double()
    assert (sae(pool) - pool).pow(2).sum(-1)[-2:].tolist() == pytest.approx([1.0, 3.0])
    cfg = TrainConfig(n_samples=8, batch_size=8, resample_dead_after=10, resample_pool=1)
    resample_dead_(sae, opt, pool, cfg, torch.Generator().manual_seed(0))
    new = sae.W_dec[D:]
    is_y1 = torch.isclose(new, (y1 / y1.norm()).double()).all(-1)
    is_y3 = torch.isclose(new, (y3 / y3.norm()).double()).all(-1)
    assert (is_y1 | is_y3).all()
    assert abs(is_y3.double().mean().item() - 0.9) < 4 * 0.015


# -- learning ---------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_short_training_on_toy_data_learns(variant):
    """200 steps on 32 sparse features in 16 dimensions: the held-out FVU falls far below
    the untrained SAE's (measured ~1.8 -> 0.06-0.12 with these settings) and the training
    reconstruction error goes down."""
    data = toy_data()
    held_out = [data.sample(256, torch.Generator().manual_seed(99))[0]]
    sae = make_sae(variant, 16, 32, seed=0, **SETTINGS[variant])
    sae.init_b_dec_(data.sample(512, torch.Generator().manual_seed(5))[0])
    if variant in ("batchtopk", "matryoshka_batchtopk"):  # its inference threshold comes from a training-mode pass
        sae.train()(held_out[0])
    before = evaluate_sae(sae, held_out)["fvu"]
    cfg = TrainConfig(n_samples=64 * 200, batch_size=64, lr=3e-3, log_every=20)
    hist = train(sae, sample_stream(data, 64, 1), cfg, log=False)["history"]
    after = evaluate_sae(sae, held_out)
    assert after["fvu"] < 0.25 * before and after["fvu"] < 0.2
    assert hist[-1]["recon"] < hist[0]["recon"]
    assert 0 < after["l0"] < 16


# -- Training that cannot be going anywhere stops with the likely cause, not a "successful" ----------
# run with FVU 1e7: a diverging loss, every latent dead, data that runs out, and settings
# that cannot work are all clear errors.

def stream(d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randn(64, d, generator=g)


def test_a_huge_learning_rate_is_reported_as_divergence():
    sae = make_sae("relu", 8, 32, sparsity_coef=1e-3)
    cfg = TrainConfig(n_samples=64 * 200, batch_size=64, lr=1e3, log_every=10)
    with pytest.raises(FloatingPointError, match="diverged|every latent is dead|loss became"):
        train(sae, stream(), cfg, log=False)


def test_every_latent_dead_is_reported():
    sae = make_sae("relu", 8, 32, sparsity_coef=1e-3)
    with torch.no_grad():
        sae.b_enc.fill_(-1e4)  # no latent can fire
    cfg = TrainConfig(n_samples=64 * 40, batch_size=64, lr=1e-4, log_every=5, resample_dead_after=64 * 10)
    with pytest.raises(FloatingPointError, match="every latent is dead"):
        train(sae, stream(), cfg, log=False)


def test_a_normal_run_is_not_stopped():
    sae = make_sae("topk", 8, 32, k=4)
    out = train(sae, stream(), TrainConfig(n_samples=64 * 100, batch_size=64, lr=1e-3, log_every=10), log=False)
    assert out["history"][-1]["loss"] < out["history"][0]["loss"]


def test_data_that_runs_out():
    sae = make_sae("relu", 8, 32)
    cfg = TrainConfig(n_samples=64 * 10, batch_size=64, lr=1e-3)
    with pytest.raises(ValueError, match="ran out after 3 of 10 steps"):
        train(sae, iter([torch.randn(64, 8) for _ in range(3)]), cfg, log=False)


@pytest.mark.parametrize("variant, settings, message", [
    ("jumprelu", dict(theta_init=math.nan), "theta_init"),
    ("jumprelu", dict(theta_init=0.0), "theta_init"),
    ("jumprelu", dict(bandwidth=math.inf), "bandwidth"),
    ("batchtopk", dict(k=2, threshold_momentum=math.nan), "threshold_momentum"),
    ("batchtopk", dict(k=2, threshold_momentum=1.5), "threshold_momentum"),
    ("relu", dict(sparsity_coef=math.nan), "sparsity_coef"),
    ("topk", dict(k=40), "k must be in 1..n_latents=32"),
])
def test_settings_that_cannot_work(variant, settings, message):
    with pytest.raises(ValueError, match=message):
        make_sae(variant, 8, 32, **settings)
