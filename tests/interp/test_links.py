"""Cross-layer links: decoder cosines against a naive loop and under permutations, an SAE
matched against itself, ablation edges against a plain reference (and against the SAE
math alone when B reads the very activation A's ablation changes), dead latents giving
no edges, and the checks on the pair of SAEs."""

import json
import os
from pathlib import Path

import pytest
import torch

from minisae import formats
from minisae.interp import links as Li
from minisae.pipeline.hooked_sae import HookedSAE
from minisae.sae import make_sae
from test_features import SCALE, contexts, relu_sae  # pytest puts tests/ on sys.path


def meta(layer, site="resid_post", scale=SCALE):
    return {"model": "gpt2-random", "hook": f"blocks.{layer}.hook_{site}", "scale": scale}


def test_decoder_cosines_naive_and_permutation_invariant():
    a, b = relu_sae(d=16, n=12, seed=0), relu_sae(d=16, n=20, seed=1)
    with torch.no_grad():
        a.W_dec.mul_(torch.rand(12, 1) + 0.5)  # rows not unit: cosines must not care
    C = Li.decoder_cosines(a, b)  # (12, 20)
    A, B = a.W_dec.detach().double(), b.W_dec.detach().double()
    naive = torch.tensor([[float(A[i] @ B[j] / (A[i].norm() * B[j].norm())) for j in range(20)] for i in range(12)],
                         dtype=torch.float64)
    torch.testing.assert_close(C.double(), naive, rtol=1e-5, atol=1e-6)
    pa, pb = torch.randperm(12), torch.randperm(20)
    with torch.no_grad():
        a.W_dec.copy_(a.W_dec[pa])
        b.W_dec.copy_(b.W_dec[pb])
    torch.testing.assert_close(Li.decoder_cosines(a, b), C[pa][:, pb])


def test_best_match_against_itself_is_identity():
    a = relu_sae(d=64, n=200, seed=3)
    best_cos, best_j = Li.decoder_cosines(a, a).max(1)
    assert torch.equal(best_j, torch.arange(200))
    torch.testing.assert_close(best_cos, torch.ones(200))
    base = Li.random_best_cosines(200, 200, 64)
    assert base.shape == (200,) and (base > 0).all() and (base < 0.7).all()  # random pairs in R^64


def hooked(sae, m):
    return HookedSAE.from_meta(sae, {"model": "gpt2-random", **m})


def naive_edges(model, sae_a, ma, sae_b, mb, ctx, sources):
    """Every context, every source: one full forward with latent i's term removed."""
    out = torch.zeros(len(sources), sae_b.n_latents, dtype=torch.float64)
    with torch.no_grad():
        x_a = model(ctx, stop_at=ma["hook"])[:, 1:]  # (N, T-1, D)
        f_a = sae_a.encode(x_a.reshape(-1, x_a.shape[-1]) * ma["scale"]).view(*x_a.shape[:2], -1)
        enc_b = lambda x: sae_b.encode(x[:, 1:].reshape(-1, x.shape[-1]) * mb["scale"])
        clean = enc_b(model(ctx, stop_at=mb["hook"]))  # (N*(T-1), F_b)
        for n, i in enumerate(sources):
            def hook(act, i=i):
                out_ = act.clone()
                out_[:, 1:] = act[:, 1:] - f_a[..., i, None] * sae_a.W_dec[i] / ma["scale"]
                return out_
            ablated = enc_b(model(ctx, hooks={ma["hook"]: hook}, stop_at=mb["hook"]))
            out[n] = (clean - ablated).double().mean(0)
    return out


def test_ablation_edges_against_naive(gpt2):
    sae_a, sae_b, ctx = relu_sae(seed=0, bias=-1.5), relu_sae(n=40, seed=1), contexts(n=10, T=12)
    sources = [0, 5, 17, 50]
    edges = Li.ablation_edges(gpt2, hooked(sae_a, meta(1)), hooked(sae_b, meta(2)), ctx, sources, batch_size=3, verbose=False)
    want = naive_edges(gpt2, sae_a, meta(1), sae_b, meta(2), ctx, sources)
    assert (want.abs().sum(1) > 0).all()  # every source does something downstream
    torch.testing.assert_close(edges, want, rtol=1e-4, atol=1e-7)


def test_edges_through_the_same_activation(gpt2):
    """resid_post of block 1 is resid_pre of block 2: the ablation reaches B unchanged,
    so edge(i, j) = mean_t f_b_j(x) - f_b_j(x - f_a_i(x) W_dec_a[i] / scale_a), no model needed."""
    sae_a, sae_b, ctx = relu_sae(seed=0), relu_sae(n=30, seed=2), contexts(n=6, T=10)
    sources = [1, 2, 3]
    edges = Li.ablation_edges(gpt2, hooked(sae_a, meta(1)), hooked(sae_b, meta(2, "resid_pre", 20.0)), ctx, sources, verbose=False)
    assert (edges.abs().sum(1) > 0).all()
    with torch.no_grad():
        x = gpt2(ctx, stop_at="blocks.1.hook_resid_post")[:, 1:].reshape(-1, 64)  # (N*(T-1), D)
        f_a = sae_a.encode(x * SCALE)
        for n, i in enumerate(sources):
            x_abl = x - f_a[:, i, None] * sae_a.W_dec[i] / SCALE
            want = (sae_b.encode(x * 20.0) - sae_b.encode(x_abl * 20.0)).double().mean(0)
            torch.testing.assert_close(edges[n], want, rtol=1e-4, atol=1e-6)


def test_dead_latent_has_no_edges(gpt2):
    sae_a, sae_b, ctx = relu_sae(seed=0), relu_sae(seed=1), contexts(n=8, T=12)
    with torch.no_grad():
        sae_a.b_enc[7] = -1e6  # never fires
    edges = Li.ablation_edges(gpt2, hooked(sae_a, meta(1)), hooked(sae_b, meta(3)), ctx, [7, 8], verbose=False)
    assert torch.equal(edges[0], torch.zeros(sae_b.n_latents, dtype=torch.float64))
    assert edges[1].abs().sum() > 0


def test_bad_pairs(gpt2):
    a, b, ctx = relu_sae(), relu_sae(), contexts(n=2, T=8)
    for later, earlier in ((meta(2), meta(1)), (meta(1), meta(1)), (meta(1, "mlp_out"), meta(1, "attn_out"))):
        with pytest.raises(ValueError, match="must come after"):
            Li.ablation_edges(gpt2, hooked(a, later), hooked(b, earlier), ctx, [0], verbose=False)
    with pytest.raises(ValueError, match="out of range"):
        Li.ablation_edges(gpt2, hooked(a, meta(1)), hooked(b, meta(2)), ctx, [96], verbose=False)


@pytest.mark.skipif(not (os.environ.get("MINISAE_GPT2_TOKENIZER_DIR") and
                         (Path(os.environ["MINISAE_GPT2_TOKENIZER_DIR"]) / "encoder.json").exists()),
                    reason="set MINISAE_GPT2_TOKENIZER_DIR to a folder with GPT-2's encoder.json + vocab.bpe")
def test_links_command(tmp_path, capsys, monkeypatch):
    from minisae.__main__ import main
    from test_features import small_run_files
    monkeypatch.setenv("MINISAE_CACHE", str(tmp_path / "cache"))
    text = small_run_files(tmp_path)
    args = ["links", "--sae-a", str(tmp_path / "sae1.pt"), "--top", "3", "--out", str(tmp_path / "out"), *text]
    main([*args, "--sae-b", str(tmp_path / "sae2.pt")])
    res = json.loads((tmp_path / "out" / "links.json").read_text())
    assert res["hook_a"] == "blocks.1.hook_resid_post" and len(res["rows"]) == 3
    for name in ("links_cosines.png", "links_graph.png"):
        assert (tmp_path / "out" / name).stat().st_size > 1000
    assert "joined by both measures" in capsys.readouterr().out
    with pytest.raises(ValueError, match="must come after"):
        main([*args, "--sae-b", str(tmp_path / "sae1.pt")])
    formats.save(make_sae("relu", 64, 8), tmp_path / "other.pt", model="smollm2", hook="blocks.2.hook_resid_post",
                                 scale=1.0, settings={})
    with pytest.raises(ValueError, match="trained on model 'smollm2', not 'gpt2-random'"):
        main([*args, "--sae-b", str(tmp_path / "other.pt")])
