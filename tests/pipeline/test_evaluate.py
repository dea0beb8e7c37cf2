"""LM-side evaluation: exact values at the ends of the scale (identity SAE: loss
recovered 1 and KL 0; an SAE that outputs the ablation: loss recovered 0), BOS kept in
every splice, and every number against a naive one-context, one-position-at-a-time
reference in float64. Last, the whole pipeline on gpt2-random with the real tokenizer."""

import math
import os

import numpy as np
import pytest
import torch
import torch.nn as nn

from minisae.pipeline import evaluate as E
from minisae.pipeline.hooked_sae import HookedSAE
from test_activations import HOOK, TinyLM  # pytest puts tests/ on sys.path


class Identity(nn.Module):
    """x_hat = x, with f = x as the 'code' (F = D)."""

    def encode(self, x):
        return x.clone()

    def decode(self, f):
        return f.clone()

    def forward(self, x):
        return self.decode(self.encode(x))


class Constant(nn.Module):
    """x_hat = value for every input; no latent ever fires."""

    def __init__(self, value):
        super().__init__()
        self.value = value

    def encode(self, x):
        return torch.zeros(len(x), 3)

    def decode(self, f):
        return self.value.expand(len(f), -1).clone()


class ReluSAE(nn.Module):
    """f = ReLU(W_enc (x - b_dec) + b_enc);  x_hat = W_dec^T f + b_dec, random weights."""

    def __init__(self, d=16, n_latents=40, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W_enc = nn.Parameter(torch.randn(n_latents, d, generator=g) / d**0.5)
        self.W_dec = nn.Parameter(torch.randn(n_latents, d, generator=g) / d**0.5)
        self.b_enc = nn.Parameter(torch.randn(n_latents, generator=g) - 1.0)
        self.b_dec = nn.Parameter(torch.randn(d, generator=g) * 0.1)

    def encode(self, x):
        return torch.relu((x - self.b_dec) @ self.W_enc.T + self.b_enc)  # (B, F)

    def decode(self, f):
        return f @ self.W_dec + self.b_dec  # (B, D)

    def forward(self, x):
        return self.decode(self.encode(x))


@pytest.fixture
def lm():
    model = TinyLM().eval()
    contexts = torch.randint(2, 64, (10, 12), generator=torch.Generator().manual_seed(2))
    contexts[:, 0] = 1
    with torch.no_grad():
        mean = model(contexts, stop_at=HOOK)[:, 1:].reshape(-1, 16).mean(0) + 0.3  # (D,)
    return model, contexts, mean


def hooked(sae, mean, scale=1.0, max_norm=None, hook=HOOK):
    return HookedSAE(sae, "gpt2-random", hook, scale, max_norm, mean)


def run(model, sae, contexts, mean, scale, max_norm=None):
    return E.evaluate_spliced(model, hooked(sae, mean, scale, max_norm), contexts, batch_size=4, verbose=False)


def median_norm(model, contexts):
    """A max_norm that makes about half the positions 'sinks': a hard test of the mask."""
    with torch.no_grad():
        return model(contexts, stop_at=HOOK)[:, 1:].norm(dim=-1).median().item()


def test_identity_recovers_everything_exactly(lm):
    model, contexts, mean = lm
    r = run(model, Identity(), contexts, mean, scale=4.0)  # x * 4 / 4 == x exactly
    assert r["ce_sae"] == r["ce_clean"] and r["kl"] == 0.0
    assert r["loss_recovered_zero"] == 1.0 and r["loss_recovered_mean"] == 1.0
    assert r["fvu"] == 0.0 and r["ce_zero"] != r["ce_clean"] and r["ce_mean"] != r["ce_clean"]
    # SAEBench / SAELens names: a perfect splice scores 1 on each
    assert (r["ce_loss_score"], r["kl_div_score"], r["explained_variance"]) == (1.0, 1.0, 1.0)
    assert math.isclose(r["l2_ratio"], 1.0, rel_tol=1e-12) and math.isclose(r["cossim"], 1.0, rel_tol=1e-12)
    assert r["n_tokens"] == 10 * 11 and r["n_predictions"] == 10 * 10


def test_ablation_sae_recovers_nothing_exactly(lm):
    model, contexts, mean = lm
    zero = run(model, Constant(torch.zeros(16)), contexts, mean, scale=4.0)
    assert zero["ce_sae"] == zero["ce_zero"] and zero["loss_recovered_zero"] == 0.0
    assert zero["l0"] == 0.0 and zero["dead_frac"] == 1.0 and zero["kl"] > 0
    assert zero["kl"] == zero["kl_zero"] and zero["kl_div_score"] == 0.0 and zero["ce_loss_score"] == 0.0
    # the SAE works in scaled units: outputting mean * scale splices in the mean
    avg = run(model, Constant(mean * 4.0), contexts, mean, scale=4.0)
    assert avg["ce_sae"] == avg["ce_mean"] and avg["loss_recovered_mean"] == 0.0


class RecordingLM(TinyLM):
    """TinyLM that keeps (activation in, activation out) of every hook call."""

    seen = None

    def forward(self, idx, hooks=None, stop_at=None):
        if hooks:
            self.seen = self.seen or []
            hooks = {name: self._record(fn) for name, fn in hooks.items()}
        return super().forward(idx, hooks, stop_at)

    def _record(self, fn):
        def hook(act):
            out = fn(act)
            self.seen.append((act.clone(), out.clone()))
            return out
        return hook


def test_bos_is_never_replaced(lm):
    _, contexts, mean = lm
    model, sae, scale = RecordingLM().eval(), ReluSAE(), 3.0
    run(model, sae, contexts, mean, scale)
    assert len(model.seen) == 3 * 3  # three batches (4 + 4 + 2 contexts), three splices each
    for i, (act, out) in enumerate(model.seen):
        assert torch.equal(out[:, 0], act[:, 0])  # BOS keeps its clean activation
        rest = act[:, 1:]
        want = [sae(rest.reshape(-1, 16) * scale).reshape(rest.shape) / scale,
                torch.zeros_like(rest), mean.expand(rest.shape)][i % 3]
        torch.testing.assert_close(out[:, 1:], want, rtol=1e-6, atol=1e-6)


def naive(model, sae, contexts, mean, scale, max_norm=None):
    """One context at a time, one position at a time, float64 log-softmax; positions
    whose norm is above max_norm keep their clean activation."""
    ce = {"clean": [], "sae": [], "zero": [], "mean": []}
    kl, xs, fs, x_hats = [], [], [], []
    for idx in contexts:
        idx = idx[None]  # (1, T)
        with torch.no_grad():
            act = model(idx, stop_at=HOOK)[0]  # (T, D)
            rows = {"sae": [act[0]], "zero": [act[0]], "mean": [act[0]]}
            for t in range(1, idx.shape[1]):
                if max_norm is not None and act[t].norm() > max_norm:
                    for v in rows:
                        rows[v].append(act[t])
                    continue
                x = act[t] * scale
                f = sae.encode(x[None])[0]
                x_hat = sae.decode(f[None])[0]
                xs.append(x.double()), fs.append(f.double()), x_hats.append(x_hat.double())
                rows["sae"].append(x_hat / scale)
                rows["zero"].append(torch.zeros_like(x))
                rows["mean"].append(mean)
            logp = {"clean": model(idx)[0].double().log_softmax(-1)}  # (T, V)
            for v in ("sae", "zero", "mean"):
                new = torch.stack(rows[v])[None]
                logp[v] = model(idx, hooks={HOOK: lambda a, new=new: new})[0].double().log_softmax(-1)
        for t in range(1, idx.shape[1] - 1):  # predictions at positions 1..T-2
            target = idx[0, t + 1]
            for v in ce:
                ce[v].append(-logp[v][t, target].item())
            p = logp["clean"][t].exp()
            kl.append((p * (logp["clean"][t] - logp["sae"][t])).sum().item())
    X, Xh, Fm = torch.stack(xs).numpy(), torch.stack(x_hats).numpy(), torch.stack(fs).numpy()
    out = {f"ce_{v}": float(np.mean(c)) for v, c in ce.items()}
    out["kl"] = float(np.mean(kl))
    out["fvu"] = ((X - Xh) ** 2).sum() / ((X - X.mean(0)) ** 2).sum()
    out["l0"] = (Fm != 0).sum(1).mean()
    freq = (Fm != 0).mean(0)
    out["dead_frac"], out["dense_frac"] = (freq == 0).mean(), (freq > 0.1).mean()
    out["log10_density"] = [math.log10(p) if p > 0 else None for p in freq]
    for a in ("zero", "mean"):
        out[f"loss_recovered_{a}"] = (out[f"ce_{a}"] - out["ce_sae"]) / (out[f"ce_{a}"] - out["ce_clean"])
    return out


@pytest.mark.parametrize("scale,sinks", [(1.0, False), (0.37, False), (0.37, True)])
def test_against_naive_reference(lm, scale, sinks):
    model, contexts, mean = lm
    sae = ReluSAE()
    max_norm = median_norm(model, contexts) if sinks else None
    got, want = run(model, sae, contexts, mean, scale, max_norm), naive(model, sae, contexts, mean, scale, max_norm)
    assert 0 < got["l0"] < 40 and 0 < got["fvu"]  # a non-trivial SAE
    for key in ("ce_clean", "ce_sae", "ce_zero", "ce_mean", "kl", "fvu", "loss_recovered_zero",
                "loss_recovered_mean"):
        assert math.isclose(got[key], want[key], rel_tol=1e-5, abs_tol=1e-7), key
    assert got["l0"] == want["l0"]
    for key in ("dead_frac", "dense_frac"):  # metrics computes these fractions in float32
        assert math.isclose(got[key], want[key], rel_tol=1e-7), key
    assert [d is None for d in got["log10_density"]] == [d is None for d in want["log10_density"]]
    live = [(g, w) for g, w in zip(got["log10_density"], want["log10_density"]) if w is not None]
    assert all(math.isclose(g, w, rel_tol=1e-12, abs_tol=1e-12) for g, w in live)


def test_precomputed_baselines_give_the_same_numbers(lm):
    model, contexts, mean = lm
    sae = ReluSAE()
    base = E.baselines(model, contexts, HOOK, mean, batch_size=4, verbose=False)
    assert set(base) == {"ce_clean", "ce_zero", "ce_mean", "kl_zero", "kl_mean", "n_predictions", "max_norm",
                         "ce_diff_se_zero", "ce_diff_se_mean"}
    full = run(model, sae, contexts, mean, 0.37)
    fast = E.evaluate_spliced(model, hooked(sae, mean, 0.37), contexts, batch_size=4, baselines=base, verbose=False)
    assert fast == full
    other = E.baselines(model, contexts[:6], HOOK, mean, verbose=False)
    with pytest.raises(ValueError, match="other contexts"):
        E.evaluate_spliced(model, hooked(sae, mean), contexts, baselines=other, verbose=False)
    with pytest.raises(ValueError, match="max_norm"):  # same contexts, other sink threshold
        E.evaluate_spliced(model, hooked(sae, mean, max_norm=1.0), contexts, baselines=base, verbose=False)


def test_sinks_are_never_replaced(lm):
    _, contexts, mean = lm
    model, sae, scale = RecordingLM().eval(), ReluSAE(), 3.0
    max_norm = median_norm(model, contexts)
    r = run(model, sae, contexts, mean, scale, max_norm)
    n_keep = 0
    for i, (act, out) in enumerate(model.seen):
        keep = act.norm(dim=-1) <= max_norm  # (B, T)
        keep[:, 0] = False
        assert 0 < keep.sum() < keep[:, 1:].numel()
        assert torch.equal(out[~keep], act[~keep])  # BOS and sinks keep their clean activation
        rows = act[keep]
        want = [sae(rows * scale) / scale, torch.zeros_like(rows), mean.expand(rows.shape)][i % 3]
        torch.testing.assert_close(out[keep], want, rtol=1e-6, atol=1e-6)
        n_keep += int(keep.sum()) if i % 3 == 0 else 0
    assert r["n_tokens"] == n_keep and math.isclose(r["sink_frac"], 1 - n_keep / (10 * 11))


def test_bad_inputs_raise(lm):
    model, contexts, mean = lm
    with pytest.raises(ValueError, match="T >= 3"):
        run(model, Identity(), contexts[:, :2], mean, 1.0)
    with pytest.raises(ValueError, match="unknown hook"):
        E.evaluate_spliced(model, hooked(Identity(), mean, hook="blocks.7.hook_mlp_out"), contexts, verbose=False)
    with pytest.raises(ValueError, match="scale"):
        run(model, Identity(), contexts, mean, 0.0)
    with pytest.raises(ValueError, match="width"):
        run(model, Identity(), contexts, mean[:8], 1.0)


TOKENIZER_DIR = os.environ.get("MINISAE_GPT2_TOKENIZER_DIR")


@pytest.mark.skipif(not TOKENIZER_DIR or not os.path.isdir(TOKENIZER_DIR),
                    reason="set MINISAE_GPT2_TOKENIZER_DIR to a dir with GPT-2's encoder.json + vocab.bpe")
def test_pipeline_on_gpt2_random(tmp_path, monkeypatch):
    from pydoc_data.topics import topics

    from minisae.pipeline import activations, data, store
    from minisae.models.gpt2 import load_gpt2

    monkeypatch.setenv("MINISAE_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "topics.txt"
    text.write_text("\n\n".join(topics[k] for k in sorted(topics)))
    model, tok = load_gpt2("gpt2-random")
    kw = dict(ctx_len=32, text_paths=[str(text)], heldout_frac=0.2, verbose=False)
    train = data.load_contexts(tok, "gpt2", "train", max_tokens=32 * 48, **kw)
    held = data.load_contexts(tok, "gpt2", "heldout", max_tokens=32 * 8, **kw)
    assert train.shape == (48, 32) and held.shape == (8, 32) and (train[:, 0] == 50256).all()
    hook = "blocks.2.hook_resid_pre"
    meta = activations.collect_activations(model, train, hook, tmp_path / "acts.npy", model_name="gpt2-random",
                                           verbose=False)
    acts, meta = store.load_activations(tmp_path / "acts.npy", "gpt2-random", hook)
    assert acts.shape == (48 * 31, 64)
    assert math.isclose(np.linalg.norm(acts.astype(np.float64), axis=1).mean(), 8.0, rel_tol=1e-6)
    r = E.evaluate_spliced(model, hooked(Identity(), meta["mean"], meta["scale"], hook=hook), held, verbose=False)
    # x * scale / scale is within an ulp of x; the splice changes CE by ~1e-7 nats
    assert abs(r["ce_sae"] - r["ce_clean"]) < 1e-5 and r["kl"] < 1e-6
    assert all(math.isfinite(r[k]) for k in ("ce_clean", "ce_zero", "ce_mean", "loss_recovered_mean"))


# -- The numbers beside the headline of an evaluation: the standard error of each CE ----------
# difference (against per-prediction differences computed one context at a time in
# float64) and loss recovered with the sinks replaced too (against an evaluation that has
# no sink threshold at all, which is what replacing the sinks means).

def per_prediction_nll(model, contexts, hooks=None):
    """-log p(target) of the predictions at positions 1..T-2, one context at a time, float64."""
    out = []
    for idx in contexts:
        with torch.no_grad():
            logp = model(idx[None], hooks=hooks)[0].double().log_softmax(-1)  # (T, V)
        out += [-logp[t, idx[t + 1]].item() for t in range(1, len(idx) - 1)]
    return np.array(out)


def naive_se(d):
    return float(np.std(d, ddof=1) / math.sqrt(len(d)))


@pytest.mark.parametrize("sinks", [False, True])
def test_ce_difference_standard_errors_match_per_prediction_differences(lm, sinks):
    model, contexts, mean = lm
    sae, scale = ReluSAE(), 0.37
    max_norm = median_norm(model, contexts) if sinks else None
    got = E.evaluate_spliced(model, hooked(sae, mean, scale, max_norm), contexts, batch_size=4, verbose=False)
    clean = per_prediction_nll(model, contexts)
    replace = {"sae": lambda x: sae(x * scale) / scale, "zero": torch.zeros_like,
               "mean": lambda x: mean.expand(x.shape)}
    for v, fn in replace.items():
        d = per_prediction_nll(model, contexts, {HOOK: E.splice_hook(fn, max_norm)}) - clean
        key = "ce_diff_se" if v == "sae" else f"ce_diff_se_{v}"
        assert math.isclose(got[key], naive_se(d), rel_tol=1e-4), key
        assert math.isclose(got[f"ce_{v}"] - got["ce_clean"], d.mean(), rel_tol=1e-4, abs_tol=1e-7), v
    for a in ("zero", "mean"):
        gap = got[f"ce_{a}"] - got["ce_clean"]
        assert got[f"loss_recovered_{a}_se"] == got["ce_diff_se"] / abs(gap)


def test_identical_splice_has_zero_standard_error(lm):
    from test_evaluate import Identity
    model, contexts, mean = lm
    got = E.evaluate_spliced(model, hooked(Identity(), mean, 4.0), contexts, batch_size=4, verbose=False,
                             with_sinks=True)
    assert got["ce_diff_se"] == 0.0 and got["loss_recovered_mean_se"] == 0.0
    assert got["ce_diff_se_zero"] > 0 and got["ce_sae_with_sinks"] == got["ce_clean"]


def test_with_sinks_equals_an_evaluation_without_a_sink_threshold(lm):
    model, contexts, mean = lm
    sae, scale = ReluSAE(), 0.37
    max_norm = median_norm(model, contexts)  # about half the positions are sinks: a hard case
    got = E.evaluate_spliced(model, hooked(sae, mean, scale, max_norm), contexts, batch_size=4, verbose=False,
                             with_sinks=True)
    every = E.evaluate_spliced(model, hooked(sae, mean, scale, None), contexts, batch_size=4, verbose=False)
    for v in ("sae", "zero", "mean"):
        assert math.isclose(got[f"ce_{v}_with_sinks"], every[f"ce_{v}"], rel_tol=1e-6), v
    for a in ("zero", "mean"):
        assert math.isclose(got[f"loss_recovered_{a}_with_sinks"], every[f"loss_recovered_{a}"], rel_tol=1e-5), a
        assert got[f"loss_recovered_{a}_with_sinks"] != got[f"loss_recovered_{a}"]  # the sinks do matter here
    # the SAE-side metrics still describe the SAE's own positions only
    plain = E.evaluate_spliced(model, hooked(sae, mean, scale, max_norm), contexts, batch_size=4, verbose=False)
    for key in ("ce_sae", "l0", "fvu", "n_tokens", "sink_frac", "loss_recovered_mean"):
        assert got[key] == plain[key], key


def test_with_sinks_through_precomputed_baselines(lm):
    model, contexts, mean = lm
    sae, scale = ReluSAE(), 0.37
    for max_norm in (median_norm(model, contexts), None):
        base = E.baselines(model, contexts, HOOK, mean, batch_size=4, verbose=False, max_norm=max_norm,
                           with_sinks=True)
        fast = E.evaluate_spliced(model, hooked(sae, mean, scale, max_norm), contexts, batch_size=4,
                                  baselines=base, verbose=False, with_sinks=True)
        full = E.evaluate_spliced(model, hooked(sae, mean, scale, max_norm), contexts, batch_size=4,
                                  verbose=False, with_sinks=True)
        assert fast == full
        if max_norm is None:  # no sinks: the same numbers under both names
            assert full["loss_recovered_mean_with_sinks"] == full["loss_recovered_mean"]
    plain = E.baselines(model, contexts, HOOK, mean, batch_size=4, verbose=False)
    with pytest.raises(ValueError, match="with_sinks"):
        E.evaluate_spliced(model, hooked(sae, mean, scale), contexts, baselines=plain, verbose=False,
                           with_sinks=True)
