"""A sweep in one pass (minisae/multi_train.py) against its reference, the one-at-a-time
loop: each SAE trained with `multi_train` beside others must end exactly as the same SAE
trained alone with `train` on the same stream (weights, buffers, history), for every
variant, with dead-latent resampling and AuxK at work, and with SAEs of different lengths."""

import pytest
import torch

import minisae.train
from minisae.multi_train import multi_train
from minisae.sae import make_sae, revives_dead, variant_classes
from minisae.train import TrainConfig, sample_stream, train
from toy_models.sparse_features import SparseFeatures, SparseFeaturesConfig

VARIANTS = list(variant_classes())
pytestmark = pytest.mark.usefixtures("one_thread")
D, F, B = 16, 48, 32
# three settings per variant
SETTINGS = {"relu": [{"sparsity_coef": c} for c in (0.05, 0.3, 2.0)],
            "gated": [{"sparsity_coef": c} for c in (0.05, 0.3, 2.0)],
            "jumprelu": [{"sparsity_coef": c, "bandwidth": 0.05, "theta_init": 0.05} for c in (0.005, 0.02, 0.2)],
            "topk": [{"k": k, "dead_after": 3 * B} for k in (1, 2, 4)],
            "batchtopk": [{"k": k, "dead_after": 3 * B} for k in (1, 2, 4)],
            "matryoshka_batchtopk": [{"k": k, "dead_after": 3 * B} for k in (1, 2, 4)]}
DATA = SparseFeatures(SparseFeaturesConfig(n_features=40, d=D, mean_active=3, seed=0))


def sae_and_config(variant, i, n_steps):
    """The i-th SAE of a sweep: its own setting, seed and length."""
    sae = make_sae(variant, D, F, seed=i, **SETTINGS[variant][i % 3])
    sae.init_b_dec_(DATA.sample(256, torch.Generator().manual_seed(99))[0])
    with torch.no_grad():
        sae.b_enc[:6] = -10.0  # six latents start dead: resampling and AuxK have work from the start
    cfg = TrainConfig(n_samples=n_steps * B, batch_size=B, lr=1e-2, seed=10 + i, log_every=7,
                      resample_every=0 if revives_dead(variant) else 6, resample_dead_after=2 * B, resample_pool=3)
    return sae, cfg


def without_times(history):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


def assert_same_training(jobs, monkeypatch, threads=1):
    """jobs: [(variant, i, n_steps)]. Trains them in one pass (its steps in `threads`
    threads) and one at a time; returns the number of latents resampled in the one-pass
    run and its results."""
    resampled = []
    resample = minisae.train.resample_dead_
    monkeypatch.setattr(minisae.train, "resample_dead_", lambda *a: resampled.append(resample(*a)) or resampled[-1])
    together = [sae_and_config(*job) for job in jobs]
    outs = multi_train([s for s, _ in together], sample_stream(DATA, B, seed=5), [c for _, c in together], log=False,
                       threads=threads)
    n_resampled = sum(resampled)
    for (sae, _), out, job in zip(together, outs, jobs):
        alone, cfg = sae_and_config(*job)
        ref = train(alone, sample_stream(DATA, B, seed=5), cfg, log=False)
        assert set(sae.state_dict()) == set(alone.state_dict())
        for name, value in alone.state_dict().items():
            assert torch.equal(sae.state_dict()[name], value), (job, name)  # bit for bit: the same operations
        assert without_times(out["history"]) == without_times(ref["history"]), job
        assert out["train_samples"] == ref["train_samples"] == job[2] * B
        assert not sae.training
    return n_resampled, outs


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_sae_of_a_pass_equals_the_sae_trained_alone(variant, monkeypatch):
    n_resampled, outs = assert_same_training([(variant, 0, 30), (variant, 1, 18), (variant, 2, 30)], monkeypatch)
    if revives_dead(variant):  # AuxK had dead latents to train
        assert any(row["auxk"] > 0 for out in outs for row in out["history"])
    else:
        assert n_resampled > 0  # resampling ran and changed latents


def test_a_pass_of_mixed_variants_and_lengths(monkeypatch):
    jobs = [(v, i, n) for i, (v, n) in enumerate(zip(VARIANTS * 2, [12, 25, 7, 25, 19, 25, 3, 12, 25, 9]))]
    assert_same_training(jobs, monkeypatch)


def test_a_pass_in_two_threads_equals_the_saes_trained_alone(monkeypatch):
    """threads=2: two SAEs' steps at a time, each on one intra-op thread; every variant,
    with resampling and AuxK, each SAE bit for bit as trained alone on one thread."""
    jobs = [(v, i, n) for i, (v, n) in enumerate(zip(VARIANTS * 2, [12, 25, 7, 25, 19, 25, 3, 12, 25, 9]))]
    n_resampled, _ = assert_same_training(jobs, monkeypatch, threads=2)
    assert n_resampled > 0 and torch.get_num_threads() == 1  # the caller's setting is back


def own_streams(seeds):
    """Each SAE's own stream, zipped: the batches of `multi_train(own_batches=True)`."""
    return (list(xs) for xs in zip(*[sample_stream(DATA, B, seed=s) for s in seeds]))


def test_a_pass_over_own_batches_equals_each_sae_alone_on_its_stream():
    """own_batches: SAE i reads item i of each step's list (a model's layers, each its own
    activations); every variant, each bit for bit as trained alone on its own stream."""
    jobs = [(v, i, n) for i, (v, n) in enumerate(zip(VARIANTS, [12, 25, 7, 25, 19, 25]))]
    seeds = [20 + i for i in range(len(jobs))]
    together = [sae_and_config(*job) for job in jobs]
    outs = multi_train([s for s, _ in together], own_streams(seeds), [c for _, c in together], log=False,
                       own_batches=True)
    for (sae, _), out, job, seed in zip(together, outs, jobs, seeds):
        alone, cfg = sae_and_config(*job)
        ref = train(alone, sample_stream(DATA, B, seed=seed), cfg, log=False)
        for name, value in alone.state_dict().items():
            assert torch.equal(sae.state_dict()[name], value), (job, name)
        assert without_times(out["history"]) == without_times(ref["history"]), job
    with pytest.raises(ValueError, match="one batch per SAE, 6; got 2"):
        multi_train([s for s, _ in together], own_streams(seeds[:2]), [c for _, c in together], log=False,
                    own_batches=True)


def test_seconds_split_the_pass():
    """train_seconds: each SAE's own steps and its share of the reading; together the
    SAEs' seconds are the pass's time, less the loop's own bookkeeping."""
    saes, cfgs = zip(*[sae_and_config("topk", i, n) for i, n in enumerate((5, 10, 10))])
    outs = multi_train(list(saes), sample_stream(DATA, B, seed=5), list(cfgs), log=False)
    total = sum(o["train_seconds"] for o in outs)
    assert all(o["joint_seconds"] == outs[0]["joint_seconds"] for o in outs)
    assert 0 < total <= outs[0]["joint_seconds"]
    assert all(o["train_seconds"] > 0 for o in outs)


def test_one_config_for_all_and_the_progress_line(capsys):
    saes = [make_sae("relu", D, F, seed=i) for i in range(2)]
    cfg = TrainConfig(n_samples=4 * B, batch_size=B, lr=1e-3)
    outs = multi_train(saes, sample_stream(DATA, B, seed=1), cfg)
    assert [o["train_samples"] for o in outs] == [4 * B, 4 * B]
    assert "training 2 SAEs" in capsys.readouterr().err


def test_bad_input_is_a_clear_error():
    saes = [make_sae("relu", D, F, seed=i) for i in range(2)]
    a, b = TrainConfig(n_samples=4 * B, batch_size=B), TrainConfig(n_samples=4 * B, batch_size=2 * B)
    with pytest.raises(ValueError, match="threads must be a positive integer"):
        multi_train(saes, sample_stream(DATA, B, seed=1), a, threads=0)
    with pytest.raises(ValueError, match="without a process group"):
        multi_train(saes, sample_stream(DATA, B, seed=1), a, threads=2, group=object())
    with pytest.raises(ValueError, match="batch sizes differ"):
        multi_train(saes, sample_stream(DATA, B, seed=1), [a, b], log=False)
    with pytest.raises(ValueError, match="one TrainConfig per SAE"):
        multi_train(saes, sample_stream(DATA, B, seed=1), [a], log=False)
    with pytest.raises(ValueError, match="one TrainConfig per SAE"):
        multi_train([], sample_stream(DATA, B, seed=1), [], log=False)
    with pytest.raises(ValueError, match="the data ran out after 3 of 4 steps"):
        multi_train(saes, iter([torch.randn(B, D)] * 3), a, log=False)
