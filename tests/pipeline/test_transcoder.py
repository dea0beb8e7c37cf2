"""Transcoders: SAE.loss with a target against the formula (and unchanged without one);
the training loop fed (input, target) pairs learns a sparse linear map; the splice
evaluation against its own ablations (a transcoder that outputs 0 or the mean is exactly
zero- or mean-ablation); the SAELens transcoder layout read back by minisae and by the
real sae-lens, same outputs on raw activations."""

import json
import os
from pathlib import Path

import pytest
import torch

from minisae.models.gpt2 import CONFIGS, GPT2
from minisae.pipeline import transcoder as Tc
from minisae.sae import make_sae
from minisae.train import TrainConfig, train


def test_loss_with_a_target(random_sae):
    for variant in ("relu", "topk", "gated", "jumprelu"):
        sae = random_sae(variant, 8, 12)
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(5, 8, generator=g, dtype=torch.float64), torch.randn(5, 8, generator=g, dtype=torch.float64)
        _, parts = sae.loss(x, target=y)
        assert torch.equal(parts["x_hat"], sae(x))
        torch.testing.assert_close(parts["recon"], (sae(x) - y).pow(2).sum(-1).mean())
        same, same_parts = sae.loss(x)
        loss_x, parts_x = sae.loss(x, target=x)
        assert torch.equal(same, loss_x) and torch.equal(same_parts["recon"], parts_x["recon"])


def test_training_loop_learns_a_sparse_map():
    """y = M x on inputs made of a few of 16 directions at a time: the pairs go through
    minisae.train.train unchanged, and the loss falls far below predicting the mean."""
    g = torch.Generator().manual_seed(0)
    dirs, M = torch.randn(16, 12, generator=g), torch.randn(12, 12, generator=g) / 12 ** 0.5
    codes = torch.rand(4096, 16, generator=g) * (torch.rand(4096, 16, generator=g) < 0.15)
    x = codes @ dirs  # (N, D)
    y = x @ M.T  # (N, D)
    sae = make_sae("topk", 12, 32, k=4, seed=0)
    hist = train(sae, Tc.pair_batches(x, y, 128), TrainConfig(n_samples=60_000, batch_size=128, lr=3e-3,
                                                              resample_every=0), log=False)
    with torch.no_grad():
        fvu = (sae(x) - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum()
    assert fvu < 0.15 and hist["history"][-1]["l0"] <= 4
    with pytest.raises(ValueError, match="without resampling"):
        train(make_sae("relu", 12, 32), Tc.pair_batches(x, y, 128),
              TrainConfig(n_samples=1280, batch_size=128, resample_every=5), log=False)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = GPT2(CONFIGS["gpt2-random"]).eval()
    ctx = torch.randint(0, 50256, (12, 16), generator=torch.Generator().manual_seed(0))
    ctx[:, 0] = 50256
    tc = Tc.train_transcoder(model, ctx, layer=1, variant="relu", expansion=2, n_samples=8192, batch_size=128,
                             log=False, sparsity_coef=1e-3)
    return model, ctx, tc


def test_splice_against_ablations(tiny):
    """The transcoder with W_dec = 0 outputs b_dec / s_out: with b_dec = 0 that is zero
    ablation, with b_dec = s_out * mean it is mean ablation, exactly."""
    model, ctx, tc = tiny
    res = Tc.evaluate_transcoder(model, tc, ctx, verbose=False)
    assert res["ce_zero"] != res["ce_clean"] and 0 < res["l0"] and res["fvu"] < 1
    x, y = Tc.collect_pairs(model, ctx, tc["hook_in"], tc["hook_out"], tc["max_norm"], verbose=False)  # (N, D)
    y_hat, y = tc["sae"](x * tc["scale_in"]), y * tc["scale_out"]
    assert res["fvu"] == pytest.approx(((y_hat - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum()).item(), rel=1e-4)
    assert res["loss_recovered_zero"] == pytest.approx(
        (res["ce_zero"] - res["ce_tc"]) / (res["ce_zero"] - res["ce_clean"]))
    for b_dec, ablation in ((torch.zeros(64), "zero"), (torch.tensor(tc["mean_out"]) * tc["scale_out"], "mean")):
        sae = make_sae("relu", 64, 128)
        with torch.no_grad():
            sae.W_dec.zero_()
            sae.b_dec.copy_(b_dec)
        out = Tc.evaluate_transcoder(model, {**tc, "sae": sae}, ctx, verbose=False)
        assert out["ce_tc"] == pytest.approx(out[f"ce_{ablation}"], rel=1e-6)
        assert out[f"loss_recovered_{ablation}"] == pytest.approx(0, abs=1e-5)


def test_skip_is_the_least_squares_map_and_linear_is_it_alone(tiny):
    """W_skip and b_dec satisfy the normal equations: the error is orthogonal to every input
    dimension and to the constant (GPT-2's mlp_in sums to 0 over D, so W_skip itself is not
    unique; its fit is); --linear: no latent fires, the output is b_dec + W_skip x; the
    transcoder reads mlp_in, ln2.hook_normalized, by default."""
    model, ctx, _ = tiny
    lin = Tc.train_transcoder(model, ctx, layer=1, variant="topk", expansion=2, n_samples=1024, batch_size=128,
                              log=False, linear=True, k=4)
    assert lin["hook_in"] == "blocks.1.ln2.hook_normalized"
    x, y = Tc.collect_pairs(model, ctx, lin["hook_in"], lin["hook_out"], lin["max_norm"], verbose=False)  # (N, D)
    xs, ys = (x * lin["scale_in"]).double(), (y * lin["scale_out"]).double()
    X = torch.cat([xs, torch.ones(len(xs), 1, dtype=torch.float64)], 1)  # (N, D + 1)
    with torch.no_grad():
        err = ys - (lin["sae"].b_dec.double() + xs @ lin["W_skip"].double().T)  # (N, D)
        assert (X.T @ err).abs().max() < 1e-4 * (X.T @ ys).abs().max()  # the normal equations
        assert (lin["sae"].encode(xs.float()) == 0).all()
        torch.testing.assert_close(Tc.transcode(lin, xs.float()), lin["sae"].b_dec + xs.float() @ lin["W_skip"].T)
    res = Tc.evaluate_transcoder(model, lin, ctx, verbose=False)
    assert res["l0"] == 0 and res["fvu"] < 1 and res["ce_tc"] < res["ce_zero"]
    skip = Tc.train_transcoder(model, ctx, layer=1, variant="relu", expansion=2, n_samples=1024, batch_size=128,
                               log=False, skip=True, sparsity_coef=1e-3)
    assert torch.equal(skip["W_skip"], lin["W_skip"])  # the same fit, then latents trained on its residual


@pytest.mark.formats
@pytest.mark.parametrize("variant", ["relu", "jumprelu"])
@pytest.mark.parametrize("skip", [False, True])
def test_saelens_layout_round_trip(tiny, tmp_path, random_sae, variant, skip):
    tc = tiny[2] if variant == "relu" else {**tiny[2], "sae": random_sae("jumprelu", 64, 128, dtype=torch.float32)}
    if skip:
        tc = {**tc, "W_skip": torch.randn(64, 64, generator=torch.Generator().manual_seed(3)) / 8}
    Tc.save_transcoder(tc, tmp_path / "tc", "gpt2-random")
    back = Tc.load_transcoder(tmp_path / "tc")
    # the hook SAELens's transcoders name: TransformerLens's ln2.hook_normalized
    assert back["hook_in"] == "blocks.1.ln2.hook_normalized" and back["hook_out"] == "blocks.1.hook_mlp_out"
    x = torch.randn(20, 64) * 0.3  # raw units
    ours = Tc.transcode(tc, x * tc["scale_in"]) / tc["scale_out"]  # (20, D)
    with torch.no_grad():
        torch.testing.assert_close(Tc.transcode(back, x), ours, rtol=1e-5, atol=1e-6)
        sl = pytest.importorskip("sae_lens")
        theirs = sl.SAE.load_from_disk(str(tmp_path / "tc"))
        names = {"relu": "Transcoder", "jumprelu": "JumpReLUTranscoder"}[variant]
        assert type(theirs).__name__ == (names.replace("Transcoder", "SkipTranscoder") if skip else names)
        torch.testing.assert_close(theirs(x), ours, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(theirs.encode(x), tc["sae"].encode(x * tc["scale_in"]) / tc["scale_out"],
                                   rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="ReLU and JumpReLU only"):
        Tc.save_transcoder({**tc, "sae": make_sae("topk", 64, 128, k=4)}, tmp_path / "tk", "gpt2-random")


def test_command_errors():
    from minisae.__main__ import main
    for args, msg in ((["--setting", "k"], "bad --setting"), (["--variant", "foo"], "unknown --variant"),
                      (["--tokens", "0"], "--tokens must be positive"),
                      (["--model", "gpt2-random", "--layer", "4"], "out of range"),
                      (["--site", "resid_pre"], "reads mlp_in or resid_mid"),
                      (["--target", "resid_post"], "writes mlp_out")):
        with pytest.raises(ValueError, match=msg):
            main(["transcoder", *args])


@pytest.mark.skipif(not (os.environ.get("MINISAE_GPT2_TOKENIZER_DIR") and
                         (Path(os.environ["MINISAE_GPT2_TOKENIZER_DIR"]) / "encoder.json").exists()),
                    reason="set MINISAE_GPT2_TOKENIZER_DIR to a folder with GPT-2's encoder.json + vocab.bpe")
@pytest.mark.slow
def test_command(tmp_path, monkeypatch):
    from minisae.__main__ import main
    monkeypatch.setenv("MINISAE_CACHE", str(tmp_path / "cache"))
    res = main(["transcoder", "--model", "gpt2-random", "--layer", "1", "--expansion", "2", "--tokens", "4096",
                "--collect-tokens", "2048", "--eval-tokens", "512", "--batch-size", "128", "--ctx-len", "32",
                "--out", str(tmp_path / "out")])
    assert json.loads((tmp_path / "out" / "transcoder_results.json").read_text())["ce_tc"] == res["ce_tc"]
    back = Tc.load_transcoder(tmp_path / "out" / "transcoder-blocks.1.ln2.hook_normalized-relu")
    assert back["hook_out"] == "blocks.1.hook_mlp_out" and back["W_skip"] is None
