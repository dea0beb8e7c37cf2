"""SAEs trained in one stack (minisae/stacked.py: weights stacked, one batched product for
all) against their reference, each SAE trained alone with `train`: the same weights,
buffers and history for every variant a stack serves, with resampling and AuxK at work.
Against the dense reference alone, bit for bit in float32; against the CPU's default, the
sparse paths, to float64's tolerance.

There the stack's dense products add in another order than the sparse paths (and in
float64 its batched products than the SAE's own), so the two agree to the order of float additions,
about 1e-16 of a gradient's terms. Adam magnifies that where a gradient is near its eps
(1e-8): the update lr g / (|g| + eps) changes by up to lr / (4 eps) = 2.5e5 times a change
in g there, so a weight may move 1e-11..1e-9 differently in a step (TopK's weights do:
2.5e-9 at the most, from the second step on). The tolerance, 1e-7, is a hundred times
that and still a million times below what a wrong gradient, selection or schedule gives."""

import pytest
import torch

import minisae.train
from minisae import sparse_decode
from minisae.multi_train import multi_train
from minisae.sae import ReLU, make_sae, revives_dead
from minisae.stacked import PARTS, Stack, stack_key, stack_trainers, stacked_loss
from minisae.train import TrainConfig, Trainer, sample_stream, train
from toy_models.sparse_features import SparseFeatures, SparseFeaturesConfig

pytestmark = pytest.mark.usefixtures("one_thread")
D, F, B = 16, 48, 32
SETTINGS = {"relu": [{"sparsity_coef": c} for c in (0.05, 0.3, 2.0)],
            "gated": [{"sparsity_coef": c} for c in (0.05, 0.3, 2.0)],
            "jumprelu": [{"sparsity_coef": c, "bandwidth": 0.05, "theta_init": 0.05} for c in (0.005, 0.02, 0.2)],
            "topk": [{"k": k, "dead_after": 3 * B, "aux_coef": a} for k, a in ((1, 0.1), (2, 1 / 32), (4, 0.5))],
            "batchtopk": [{"k": k, "dead_after": 3 * B} for k in (1, 2, 4)],
            "matryoshka_batchtopk": [{"k": k, "dead_after": 3 * B, "prefixes": (6, 24)} for k in (1, 2, 4)]}
VARIANTS = list(SETTINGS)
DATA = SparseFeatures(SparseFeaturesConfig(n_features=40, d=D, mean_active=3, seed=0))
TOL = dict(rtol=1e-7, atol=1e-7)


def sae_and_config(variant, i, n_steps=30, dtype=torch.float64, **cfg):
    """The i-th SAE of a sweep (float64 unless told): its own setting and seed, a shared schedule."""
    sae = make_sae(variant, D, F, seed=i, **SETTINGS[variant][i % 3]).to(dtype)
    sae.init_b_dec_(DATA.sample(256, torch.Generator().manual_seed(99))[0].to(dtype))
    with torch.no_grad():
        sae.b_enc[:6] = -10.0  # six latents start dead: resampling and AuxK have work from the start
    cfg = TrainConfig(**{"n_samples": n_steps * B, "batch_size": B, "lr": 1e-2, "seed": 10 + i, "log_every": 7,
                         "resample_every": 0 if revives_dead(variant) else 6, "resample_dead_after": 2 * B,
                         "resample_pool": 3, **cfg})
    return sae, cfg


def stream(dtype=torch.float64):
    return (x.to(dtype) for x in sample_stream(DATA, B, seed=5))


def without_times(history):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


def assert_close_training(jobs, monkeypatch):
    """jobs: [(variant, i)]. Trains them with stacking on, and each alone; returns the
    number of latents resampled in the stacked run and its results."""
    resampled = []
    resample = minisae.train.resample_dead_
    monkeypatch.setattr(minisae.train, "resample_dead_", lambda *a: resampled.append(resample(*a)) or resampled[-1])
    together = [sae_and_config(*job) for job in jobs]
    outs = multi_train([s for s, _ in together], stream(), [c for _, c in together], log=False, stack=True)
    n_resampled = sum(resampled)
    for (sae, _), out, job in zip(together, outs, jobs):
        alone, cfg = sae_and_config(*job)
        ref = train(alone, stream(), cfg, log=False)
        assert set(sae.state_dict()) == set(alone.state_dict())
        for name, value in alone.state_dict().items():
            mine = sae.state_dict()[name]
            assert mine.is_contiguous() and mine.untyped_storage().nbytes() == value.untyped_storage().nbytes(), name
            torch.testing.assert_close(mine, value, **TOL, msg=lambda m: f"{job} {name}: {m}")
        assert len(out["history"]) == len(ref["history"])
        for row, ref_row in zip(out["history"], ref["history"]):
            assert row.keys() == ref_row.keys()
            for k in row:
                if k != "seconds":
                    assert row[k] == pytest.approx(ref_row[k], rel=1e-7, abs=1e-7), (job, k)
        assert out["train_samples"] == ref["train_samples"]
        assert not sae.training
    return n_resampled, outs


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_stacked_loss_is_each_saes_loss(variant):
    """stacked_loss against SAE.loss of each SAE, one step's values and gradients, with
    AuxK's dead latents different in each SAE (none in the second)."""
    pairs = [sae_and_config(variant, i) for i in range(3)]
    g = torch.Generator().manual_seed(1)
    for i, (sae, _) in enumerate(pairs):
        with torch.no_grad():
            sae.b_enc.normal_(0, 0.3, generator=g)
            for p in sae.activation.parameters():
                p.add_(torch.rand(p.shape, generator=g, dtype=p.dtype) * 0.1)
        sae.samples_since_fired[:] = torch.randint(0, 8 * B, (F,), generator=g) * (i != 1)
    stack = Stack([Trainer(s, c, log=False) for s, c in pairs])
    x = DATA.sample(B, g)[0].double()
    losses, parts, f = stacked_loss(stack, x, 0.7)
    losses.sum().backward()
    threshold = stack.buffers["threshold"].clone() if "threshold" in stack.buffers else None
    if threshold is not None:
        stack.buffers["threshold"].fill_(-1.0)  # as before the stacked loss: SAE.loss updates it once more
    for i, (sae, _) in enumerate(pairs):
        ref, ref_parts = sae.loss(x, 0.7)
        ref.backward()
        torch.testing.assert_close(losses[i], ref, **TOL)
        for k, v in parts.items():
            torch.testing.assert_close(v[i], ref_parts[k], **TOL, msg=lambda m: f"{k} of SAE {i}: {m}")
        torch.testing.assert_close(f[i], ref_parts["f"], **TOL)
        for name, p in sae.named_parameters():
            torch.testing.assert_close(stack.params[name.split(".")[-1]].grad[i], p.grad, **TOL,
                                       msg=lambda m: f"gradient of {name}, SAE {i}: {m}")
    if threshold is not None:
        torch.testing.assert_close(threshold, stack.buffers["threshold"], **TOL)
    if revives_dead(variant):  # AuxK was at work in SAEs 0 and 2, not in 1
        assert parts["auxk"][0] > 0 and parts["auxk"][1] == 0 and parts["auxk"][2] > 0


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_stack_is_the_dense_reference_bit_for_bit(variant, monkeypatch, dtype=torch.float32):
    """Against each SAE trained alone on the dense reference (SAE.loss, as the penalty
    variants run on a GPU; on a CPU the sparse paths run unless told not to), the stack does the same arithmetic in
    float32: its batched products are the SAE's own products one slice at a time, so the
    SAEs end bit for bit equal (weights, buffers, history), resampling and AuxK included.
    (In float64 one step's encoder gradient already differs in its last bits on this CPU,
    every other gradient and the loss bit for bit: the tolerance tests below.)"""
    dense = lambda sae: sparse_decode.loss_function(sae, sparse=False)  # noqa: E731
    together = [sae_and_config(variant, i, dtype=dtype) for i in range(3)]
    outs = multi_train([s for s, _ in together], stream(dtype), [c for _, c in together], log=False, stack=True)
    monkeypatch.setattr(minisae.train, "loss_function", dense)
    for i, ((sae, _), out) in enumerate(zip(together, outs)):
        alone, cfg = sae_and_config(variant, i, dtype=dtype)
        ref = train(alone, stream(dtype), cfg, log=False)
        for name, value in alone.state_dict().items():
            assert torch.equal(sae.state_dict()[name], value), (i, name)
        assert without_times(out["history"]) == without_times(ref["history"]), i


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_sae_of_a_stack_equals_the_sae_trained_alone(variant, monkeypatch):
    n_resampled, outs = assert_close_training([(variant, 0), (variant, 1), (variant, 2)], monkeypatch)
    if revives_dead(variant):  # AuxK had dead latents to train, and some SAE none at times
        assert any(row["auxk"] > 0 for out in outs for row in out["history"])
    else:
        assert n_resampled > 0  # resampling ran and changed latents


def test_a_pass_stacks_what_shares_a_key_and_steps_the_rest_alone(monkeypatch):
    """Two stacks (relu, topk); a lone Matryoshka SAE, a shorter relu run, and an SAE whose
    part is not one a stack knows step one by one."""
    jobs = [("relu", 0), ("topk", 0), ("relu", 1), ("topk", 1)]
    assert_close_training(jobs, monkeypatch)
    pairs = [sae_and_config(*j) for j in jobs] + [sae_and_config("relu", 2, n_steps=12),
                                                  sae_and_config("matryoshka_batchtopk", 0)]
    odd = make_sae("relu", D, F).double()
    odd.activation = type("ScaledReLU", (ReLU,), {})()  # a part of its own: its math is not the stack's
    pairs.append((odd, pairs[0][1]))
    stacks, singles = stack_trainers([Trainer(s, c, log=False) for s, c in pairs])
    assert [len(s.trainers) for s in stacks] == [2, 2] and len(singles) == 3
    assert stack_key(odd, pairs[0][1]) is None and type(odd.activation) not in PARTS


def test_a_stack_equals_the_saes_alone_for_a_transcoder_target(monkeypatch):
    """(x, target) batches: every SAE of the stack reconstructs the target."""
    def pairs():
        g = torch.Generator().manual_seed(3)
        while True:
            x = torch.randn(B, D, generator=g, dtype=torch.float64)
            yield x, torch.tanh(x) @ torch.ones(D, D, dtype=torch.float64) / D
    jobs = [sae_and_config("topk", i, resample_every=0) for i in range(2)]
    outs = multi_train([s for s, _ in jobs], pairs(), [c for _, c in jobs], log=False, stack=True)
    for i, ((sae, _), out) in enumerate(zip(jobs, outs)):
        alone, cfg = sae_and_config("topk", i, resample_every=0)
        train(alone, pairs(), cfg, log=False)
        for name, value in alone.state_dict().items():
            torch.testing.assert_close(sae.state_dict()[name], value, **TOL)


@pytest.mark.parametrize("variant", ["gated", "batchtopk"])
def test_a_stack_over_own_batches_equals_each_sae_alone_on_its_stream(variant):
    """own_batches: each SAE of the stack reads its own batch (stacked (N, B, D)), as the
    SAEs of a model's layers do; each equals the SAE trained alone on its own stream."""
    seeds = [30, 31, 32]
    streams = [(x.double() for x in sample_stream(DATA, B, seed=s)) for s in seeds]
    jobs = [sae_and_config(variant, i) for i in range(3)]
    multi_train([s for s, _ in jobs], (list(xs) for xs in zip(*streams)), [c for _, c in jobs], log=False,
                stack=True, own_batches=True)
    for i, (sae, _) in enumerate(jobs):
        alone, cfg = sae_and_config(variant, i)
        train(alone, (x.double() for x in sample_stream(DATA, B, seed=seeds[i])), cfg, log=False)
        for name, value in alone.state_dict().items():
            torch.testing.assert_close(sae.state_dict()[name], value, **TOL, msg=lambda m: f"{i} {name}: {m}")


def test_stacking_is_off_on_the_cpu_unless_asked(monkeypatch):
    made = []
    monkeypatch.setattr(Stack, "__init__", lambda self, trainers: made.append(len(trainers)) or 1 / 0)
    jobs = [sae_and_config("relu", i, n_steps=2) for i in range(2)]
    multi_train([s for s, _ in jobs], stream(), [c for _, c in jobs], log=False)  # stack=None: the CPU's default
    assert made == []
    with pytest.raises(ZeroDivisionError):
        multi_train([s for s, _ in jobs], stream(), [c for _, c in jobs], log=False, stack=True)
    assert made == [2]


def test_a_bad_batch_in_a_stack_names_its_step():
    jobs = [sae_and_config("relu", i, n_steps=10) for i in range(2)]

    def bad():
        for step, x in enumerate(stream()):
            yield x.fill_(float("nan")) if step == 4 else x
    with pytest.raises(ValueError, match="batch of step 4 contains NaN"):
        multi_train([s for s, _ in jobs], bad(), [c for _, c in jobs], log=False, stack=True)
    for sae, _ in jobs:  # each holds tensors of its own again: it can be saved as it is
        for t in [*sae.parameters(), *sae.buffers()]:
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size()


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["relu", "topk", "batchtopk"])
def test_a_compiled_stack_equals_the_eager_stack(variant):
    """TrainConfig.compile: the stacked loss under torch.compile (one fused graph for N
    SAEs), against the eager stack, a few steps with AuxK at work."""
    torch._dynamo.reset()
    fused = [sae_and_config(variant, i, n_steps=8, compile=True) for i in range(3)]
    eager = [sae_and_config(variant, i, n_steps=8) for i in range(3)]
    for pairs in (fused, eager):
        multi_train([s for s, _ in pairs], stream(), [c for _, c in pairs], log=False, stack=True)
    for (a, _), (b, _) in zip(fused, eager):
        for name, value in b.state_dict().items():
            torch.testing.assert_close(a.state_dict()[name], value, **TOL)
