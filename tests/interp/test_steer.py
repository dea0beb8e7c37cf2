"""Steering: strength 0 changes nothing (exactly), a positive strength makes the latent's
logit-lens top token win, every generated position is steered, and bad input fails clearly.

Why the positive case is guaranteed. Steer at the LAST block's resid_post: what is added
there reaches the unembedding through the final LayerNorm only,
    logits = W_U LN(x + a v) = W_U (g * c(x + a v) / sigma(x + a v) + b),
and as a grows, c(x + a v) / sigma(x + a v) -> c(v) / sigma(v), so the logits at every
steered position tend to W_U (g * c(v)) / sigma(v) + W_U b = lens(v) / sigma(v) (b = 0
in gpt2-random's LayerNorms). The softmax of that puts its largest mass on the lens's top
token. We pick the direction v = c(W_U[t]) for a token t so that the lens's top token is
t with a clear margin (t's own embedding row), then check the limit is reached."""

import os
from pathlib import Path

import pytest
import torch

from minisae.interp import steer as S
from minisae.pipeline.hooked_sae import HookedSAE
from minisae.interp.lens import logit_lens
from minisae.sae import make_sae

LAST = "blocks.3.hook_resid_post"  # gpt2-random has 4 blocks
SCALE = 30.0  # the SAE's input scale, as in test_features


def sae_with_token_direction(model, latent=5, token=1234, n=32):
    """A ReLU SAE whose decoder row `latent` is the centred unembedding row of `token`."""
    sae = make_sae("relu", 64, n, seed=0)
    with torch.no_grad():
        v = model.wte.weight[token] - model.wte.weight[token].mean()
        sae.W_dec[latent] = v / v.norm()
    return sae.eval()


def ids(n=12, seed=0):
    t = torch.randint(0, 50256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
    return [50256] + t  # BOS first


def test_zero_strength_is_exactly_unsteered(gpt2):
    sae = make_sae("topk", 64, 32, k=4)
    idx = torch.tensor([ids()])
    for hook in ("blocks.1.hook_resid_post", LAST):
        vec = S.steering_vector(hooked(sae, SCALE), 3, 0.0)
        assert torch.equal(gpt2(idx, hooks={hook: S.add_hook(vec)}), gpt2(idx))
        for sample in (False, True):
            kw = dict(n_tokens=5, sample=sample, temperature=0.7, seed=3)
            assert S.generate(gpt2, ids(), hooks={hook: S.add_hook(vec)}, **kw) == S.generate(gpt2, ids(), **kw)


def test_steering_vector_units():
    """strength * W_dec[i] / ||W_dec[i]|| / scale: the SAE's units back to raw units."""
    sae = make_sae("relu", 64, 32)
    with torch.no_grad():
        sae.W_dec[7] *= 3.0  # not unit norm: the vector still has norm strength / scale
    v = S.steering_vector(hooked(sae, 4.0), 7, 2.5)
    torch.testing.assert_close(v, 2.5 * sae.W_dec[7].detach() / sae.W_dec[7].detach().norm() / 4.0)
    assert v.norm().item() == pytest.approx(2.5 / 4.0)


def test_positive_strength_promotes_the_lens_top_token(gpt2):
    token, latent = 1234, 5
    sae = sae_with_token_direction(gpt2, latent, token)
    assert logit_lens(gpt2, sae.W_dec[latent].detach()).argmax().item() == token
    idx = torch.tensor([ids()])  # (1, T)
    p_clean = torch.softmax(gpt2(idx)[0, 1:], -1)[:, token]  # (T-1,)
    vec = S.steering_vector(hooked(sae, SCALE), latent, 1e3)  # raw ||x|| is ~0.3 here: 1e3 / SCALE dominates it
    with torch.no_grad():
        logits = gpt2(idx, hooks={LAST: S.add_hook(vec)})[0, 1:]  # (T-1, V), BOS not steered
    assert (logits.argmax(-1) == token).all()
    assert (torch.softmax(logits, -1)[:, token] > 2 * p_clean).all()


def test_every_generated_token_is_steered(gpt2):
    """Greedy continuation under a strong push at the last layer is t, t, t, ...: each
    step's last position is a token generated under steering, and it is steered too."""
    token, latent = 1234, 5
    sae = sae_with_token_direction(gpt2, latent, token)
    vec = S.steering_vector(hooked(sae, SCALE), latent, 1e3)
    plain = S.generate(gpt2, ids(), 6)
    steered = S.generate(gpt2, ids(), 6, hooks={LAST: S.add_hook(vec)})
    assert steered == [token] * 6 and plain != steered


def test_generate_steers_every_position_of_every_step(gpt2):
    """Record what the hook does on each forward of a generation: every step re-runs the
    whole sequence, and every position but BOS (the new ones included) gets the vector."""
    vec = S.steering_vector(hooked(make_sae("relu", 64, 32), SCALE), 2, 5.0)
    hook, lengths = S.add_hook(vec), []

    def recording(act):
        out = hook(act)
        lengths.append(act.shape[1])
        assert torch.equal(out[:, 0], act[:, 0])
        torch.testing.assert_close(out[:, 1:] - act[:, 1:], vec.expand_as(act[:, 1:]), rtol=0, atol=1e-6)
        return out

    S.generate(gpt2, ids(), 5, hooks={LAST: recording})
    assert lengths == [len(ids()) + i for i in range(5)]


def test_sampling_is_seeded(gpt2):
    a = S.generate(gpt2, ids(), 8, sample=True, temperature=1.0, seed=11)
    b = S.generate(gpt2, ids(), 8, sample=True, temperature=1.0, seed=11)
    assert a == b and len(a) == 8
    with pytest.raises(ValueError, match="temperature"):
        S.generate(gpt2, ids(), 2, sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="exceed the context"):
        S.generate(gpt2, ids(), 1024)


def hooked(sae, scale=SCALE, hook="blocks.1.hook_resid_post"):
    return HookedSAE(sae, "gpt2-random", hook, scale)


class ToyTokenizer:
    bos_id = 0

    def encode(self, text):
        return [ord(c) % 50 + 1 for c in text]

    def decode(self, ids):
        return " ".join(map(str, ids))


def test_steer_gives_unsteered_steered_and_control(gpt2):
    token, latent = 1234, 5
    sae = sae_with_token_direction(gpt2, latent, token)
    out = S.steer(gpt2, ToyTokenizer(), hooked(sae, hook=LAST), latent, 0.0, "a prompt", n_tokens=4)
    assert out["unsteered_ids"] == out["steered_ids"] == out["control_ids"]
    out = S.steer(gpt2, ToyTokenizer(), hooked(sae, hook=LAST), latent, 10.0, "a prompt", n_tokens=4, typical=100.0)
    assert out["added_norm"] == pytest.approx(1000.0 / SCALE)
    assert out["steered_ids"] == [token] * 4 and out["control_ids"] != out["steered_ids"]
    assert out["steered"] == " ".join([str(token)] * 4)


def test_bad_input():
    sae = make_sae("relu", 64, 32)
    with pytest.raises(ValueError, match="prompt is empty"):
        S.encode_prompt(ToyTokenizer(), "")
    assert S.encode_prompt(ToyTokenizer(), "ab") == [0, 48, 49]
    for bad in (32, -1):
        with pytest.raises(ValueError, match="out of range"):
            S.steering_vector(hooked(sae, 1.0), bad, 1.0)
    with pytest.raises(ValueError, match="scale must be positive"):
        S.steering_vector(hooked(sae, 0.0), 0, 1.0)


def test_typical_activation_against_brute_force(gpt2):
    sae = make_sae("relu", 64, 32, seed=1)
    with torch.no_grad():
        sae.b_enc.fill_(-1.0)
        sae.b_enc[9] = -1e6  # never fires
    ctx = torch.tensor([ids(15, s) for s in range(6)])
    meta = {"hook": "blocks.1.hook_resid_post", "scale": SCALE}
    with torch.no_grad():
        f = sae.encode(gpt2(ctx, stop_at=meta["hook"])[:, 1:].reshape(-1, 64) * SCALE)[:, 4]
    assert (f > 0).any()
    assert S.typical_activation(gpt2, hooked(sae), ctx, 4) == pytest.approx(f[f > 0].mean().item(), rel=1e-5)
    assert S.typical_activation(gpt2, hooked(sae), ctx, 4, "max") == pytest.approx(f.max().item(), rel=1e-6)
    with pytest.raises(ValueError, match="never fired"):
        S.typical_activation(gpt2, hooked(sae), ctx, 9)


@pytest.mark.skipif(not (os.environ.get("MINISAE_GPT2_TOKENIZER_DIR") and
                         (Path(os.environ["MINISAE_GPT2_TOKENIZER_DIR"]) / "encoder.json").exists()),
                    reason="set MINISAE_GPT2_TOKENIZER_DIR to a folder with GPT-2's encoder.json + vocab.bpe")
def test_steer_command(tmp_path, capsys, monkeypatch):
    from minisae.__main__ import main
    from test_features import small_run_files  # pytest puts tests/ on sys.path
    monkeypatch.setenv("MINISAE_CACHE", str(tmp_path / "cache"))
    text = small_run_files(tmp_path, "--calib-tokens")
    args = ["steer", "--sae", str(tmp_path / "sae1.pt"), "--tokens", "5", *text]
    main([*args, "--latent", "3", "--strength", "4", "--prompt", "The function returns"])
    out = capsys.readouterr().out
    assert "unsteered: " in out and "steered: " in out and "(control): " in out
    with pytest.raises(ValueError, match="prompt is empty"):
        main([*args, "--latent", "3", "--strength", "4", "--prompt", ""])
    with pytest.raises(ValueError, match="out of range"):
        main([*args, "--latent", "96", "--strength", "4", "--prompt", "x"])
    with pytest.raises(ValueError, match="trained on model"):
        main([*args, "--latent", "3", "--strength", "4", "--prompt", "x", "--model", "smollm2"])
