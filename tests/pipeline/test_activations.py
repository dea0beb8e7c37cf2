"""Activation collection: the stored file against a plain run of the model, the scale,
the seeded shuffle, the loader's batches, and the errors.

TinyLM follows the interface of minisae.models (forward(idx, hooks, stop_at), the five
hook sites per layer) with a causal prefix-mean standing in for attention, so tests run
in milliseconds with no weights to download."""

import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn as nn

from minisae.pipeline import activations as A
from minisae.pipeline import batches as B
from minisae.pipeline.store import load_activations
from minisae.models.hooks import StopForward, all_hook_names, check_hook_names, run_hook


class TinyLM(nn.Module):
    """Embedding; per layer x += prefix_mean(W_mix x), x += MLP(x); LayerNorm; unembed."""

    def __init__(self, vocab_size=64, d_model=16, n_layer=2, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.vocab_size, self.d_model, self.n_layer = vocab_size, d_model, n_layer
        self.wte = nn.Embedding(vocab_size, d_model)
        self.mix = nn.ModuleList(nn.Linear(d_model, d_model) for _ in range(n_layer))
        self.mlp = nn.ModuleList(nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(),
                                               nn.Linear(4 * d_model, d_model)) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)

    def hook_names(self):
        return all_hook_names(self.n_layer)

    def unembed(self, resid):
        return self.lm_head(self.ln_f(resid))

    def forward(self, idx, hooks=None, stop_at=None):
        if hooks:
            check_hook_names(hooks, self.hook_names())
        try:
            x = self.wte(idx)  # (B, T, D)
            steps = torch.arange(1, idx.shape[1] + 1, device=idx.device)[:, None]  # (T, 1)
            for l in range(self.n_layer):
                x = run_hook(f"blocks.{l}.hook_resid_pre", x, hooks, stop_at)
                a = run_hook(f"blocks.{l}.hook_attn_out", self.mix[l](x).cumsum(1) / steps, hooks, stop_at)
                x = run_hook(f"blocks.{l}.hook_resid_mid", x + a, hooks, stop_at)
                m = run_hook(f"blocks.{l}.hook_mlp_out", self.mlp[l](x), hooks, stop_at)
                x = run_hook(f"blocks.{l}.hook_resid_post", x + m, hooks, stop_at)
            return self.unembed(x)  # (B, T, V)
        except StopForward as stop:
            return stop.act


HOOK = "blocks.1.hook_resid_mid"


@pytest.fixture
def setup(tmp_path):
    model = TinyLM().eval()
    contexts = torch.randint(2, 64, (40, 12), generator=torch.Generator().manual_seed(1))
    contexts[:, 0] = 1  # BOS
    with torch.no_grad():
        raw = model(contexts, stop_at=HOOK)[:, 1:].reshape(-1, model.d_model).double()  # (N, D)
    return model, contexts, raw, tmp_path


def sorted_rows(x):
    x = np.asarray(x)
    return x[np.lexsort(x.T[::-1])]


def test_round_trip_holds_every_non_bos_row_once(setup):
    model, contexts, raw, tmp = setup
    meta = A.collect_activations(model, contexts, HOOK, tmp / "acts.npy", model_name="tiny",
                                 corpus={"split": "train"}, batch_size=7, normalize=False, verbose=False)
    acts, loaded = load_activations(tmp / "acts.npy", model_name="tiny", hook=HOOK)
    assert loaded == meta and acts.dtype == np.float32 and acts.shape == (40 * 11, 16)
    assert meta["scale"] == 1.0 and meta["corpus"] == {"split": "train"} and meta["bos_dropped"]
    perm = np.random.default_rng(0).permutation(len(raw))  # documented: run row j -> file row perm[j]
    np.testing.assert_array_equal(acts[perm], raw.float())
    assert not np.array_equal(acts, raw.float().numpy())  # shuffled
    np.testing.assert_allclose(meta["mean"], raw.mean(0).numpy(), rtol=1e-12, atol=1e-12)
    assert sorted(os.listdir(tmp)) == ["acts.json", "acts.npy"]  # no temp files left


def test_shuffle_is_seeded(setup):
    model, contexts, _, tmp = setup
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        A.collect_activations(model, contexts, HOOK, tmp / f"{name}.npy", seed=seed, verbose=False)
    a, b, c = (load_activations(tmp / f"{n}.npy")[0] for n in "abc")
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    np.testing.assert_array_equal(sorted_rows(a), sorted_rows(c))


def test_scale_gives_mean_norm_sqrt_d_and_is_undone(setup):
    model, contexts, raw, tmp = setup
    meta = A.collect_activations(model, contexts, HOOK, tmp / "acts.npy", verbose=False)
    acts, _ = load_activations(tmp / "acts.npy")
    # 40 contexts <= the 64 used for the estimate, so the estimate used all of them
    mean_norm = np.linalg.norm(acts.astype(np.float64), axis=1).mean()
    assert math.isclose(mean_norm, math.sqrt(16), rel_tol=1e-6)
    assert math.isclose(meta["scale"], 4.0 / raw.norm(dim=1).mean().item(), rel_tol=1e-12)
    np.testing.assert_allclose(sorted_rows(acts / meta["scale"]), sorted_rows(raw), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(meta["mean"], raw.mean(0).numpy(), rtol=1e-12, atol=1e-12)  # raw units


def test_bf16_autocast_is_recorded_and_close(setup):
    model, contexts, raw, tmp = setup
    meta = A.collect_activations(model, contexts, HOOK, tmp / "acts.npy", normalize=False,
                                 bf16=True, verbose=False)
    acts, _ = load_activations(tmp / "acts.npy")
    assert meta["compute_dtype"] == "bfloat16"
    perm = np.random.default_rng(0).permutation(len(raw))
    err = np.abs(acts[perm] - raw.numpy()).max() / raw.abs().max().item()
    # bf16 keeps 8 significant bits (rounding 2^-9 = 0.002 relative): the autocast did
    # run (err > 0) and the errors stay within a few roundings
    assert 0 < err < 0.01


def test_batches_cover_one_epoch_exactly_once(setup):
    model, contexts, _, tmp = setup
    A.collect_activations(model, contexts, HOOK, tmp / "acts.npy", verbose=False)
    acts, _ = load_activations(tmp / "acts.npy")
    batches = list(B.iter_batches(acts, 32, seed=3, block_batches=4))
    assert all(b.dtype == torch.float32 and b.shape[1] == 16 for b in batches)
    assert [len(b) for b in batches].count(32) == len(batches) - 1  # one short batch: 440 % 32
    np.testing.assert_array_equal(sorted_rows(torch.cat(batches)), sorted_rows(acts))
    again = list(B.iter_batches(acts, 32, seed=3, block_batches=4))
    assert all(torch.equal(x, y) for x, y in zip(batches, again))
    other = torch.cat(list(B.iter_batches(acts, 32, seed=4, block_batches=4)))
    assert not torch.equal(torch.cat(batches), other)
    assert all(len(b) == 32 for b in B.iter_batches(acts, 32, drop_last=True))


def test_nan_activations_raise_and_leave_nothing(setup):
    model, contexts, _, tmp = setup
    with torch.no_grad():
        model.wte.weight[contexts[30, 5]] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        A.collect_activations(model, contexts, HOOK, tmp / "acts.npy", normalize=False, verbose=False)
    assert os.listdir(tmp) == []


def test_mismatched_or_missing_sidecar_raises(setup):
    model, contexts, _, tmp = setup
    A.collect_activations(model, contexts, HOOK, tmp / "acts.npy", model_name="tiny", verbose=False)
    with pytest.raises(ValueError, match="hook"):
        load_activations(tmp / "acts.npy", hook="blocks.0.hook_resid_pre")
    with pytest.raises(ValueError, match="model"):
        load_activations(tmp / "acts.npy", model_name="gpt2")
    side = json.loads((tmp / "acts.json").read_text())
    (tmp / "acts.json").write_text(json.dumps(dict(side, n_tokens=side["n_tokens"] + 1)))
    with pytest.raises(ValueError, match="mismatched"):
        load_activations(tmp / "acts.npy")
    (tmp / "acts.json").unlink()
    with pytest.raises(ValueError, match="sidecar"):
        load_activations(tmp / "acts.npy")


def test_bad_inputs_raise(setup):
    model, contexts, _, tmp = setup
    with pytest.raises(ValueError, match="unknown hook"):
        A.collect_activations(model, contexts, "blocks.9.hook_resid_pre", tmp / "a.npy", verbose=False)
    with pytest.raises(ValueError, match="contexts"):
        A.collect_activations(model, contexts[:, :1], HOOK, tmp / "a.npy", verbose=False)
    with pytest.raises(ValueError, match="all zero"):
        A.estimate_scale(_zero_model(model), contexts, HOOK)


def _zero_model(model):
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    return model


def test_sae_positions_leave_out_bos_and_sinks():
    act = torch.ones(2, 5, 3)
    act[0, 2] *= 100  # a sink
    keep = A.sae_positions(act, max_norm=10.0)
    assert keep.tolist() == [[False, True, False, True, True], [False, True, True, True, True]]
    assert A.sae_positions(act).tolist() == [[False] + [True] * 4] * 2  # no limit: only BOS
    assert A.sae_positions(act[:, 1:], 10.0, bos=False).tolist() == [[True, False, True, True], [True] * 4]


def test_attention_sinks_are_dropped_and_the_rest_kept_in_shuffled_order(setup):
    model, contexts, _, tmp = setup
    with torch.no_grad():
        model.wte.weight[7] *= 1000  # token 7: a planted sink, norm far above the others
        raw = model(contexts, stop_at=HOOK)[:, 1:].reshape(-1, model.d_model).double()  # (N, D)
    norms = raw.norm(dim=1)
    max_norm = A.MAX_NORM_MULTIPLE * norms.median().item()  # 40 contexts: the estimate sees all
    sink = norms > max_norm
    assert 0 < sink.sum() < 0.2 * len(raw)
    meta = A.collect_activations(model, contexts, HOOK, tmp / "acts.npy", verbose=False)
    acts, _ = load_activations(tmp / "acts.npy")
    assert math.isclose(meta["max_norm"], max_norm, rel_tol=1e-12)
    assert meta["n_sinks_dropped"] == sink.sum() and meta["n_tokens"] == len(raw) - sink.sum()
    kept = raw[~sink]
    assert math.isclose(meta["scale"], 4.0 / kept.norm(dim=1).mean().item(), rel_tol=1e-12)  # sinks left out
    np.testing.assert_allclose(meta["mean"], kept.mean(0).numpy(), rtol=1e-12, atol=1e-12)
    # the order: run row j goes to row perm[j], then the sink rows are taken out
    perm = np.random.default_rng(0).permutation(len(raw))
    full, is_sink = np.empty((len(raw), 16), np.float32), np.empty(len(raw), bool)
    full[perm], is_sink[perm] = (raw * meta["scale"]).float().numpy(), sink.numpy()
    np.testing.assert_array_equal(acts, full[~is_sink])
    assert sorted(os.listdir(tmp)) == ["acts.json", "acts.npy"]  # no temp files left
    everything = A.collect_activations(model, contexts, HOOK, tmp / "all.npy", max_norm_multiple=None,
                                       verbose=False)
    assert everything["n_tokens"] == len(raw) and everything["max_norm"] is None
