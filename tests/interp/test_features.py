"""Max-activating examples, latent statistics, logit lens and the HTML page.

References: the top-k examples against a brute-force sort of every (value, context,
position) with the same tie rule, windows sliced by hand; statistics and histograms
against numpy on all activations; the logit lens against autograd (a Jacobian-vector
product of the model's own `unembed`). Models: gpt2-random built in the test (no
download) and a one-layer Llama with random weights."""

import os
import random
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

from minisae import formats
from minisae.interp import feature_page
from minisae.interp import lens as L
from minisae.interp import features as Fe
from minisae.pipeline.hooked_sae import HookedSAE, parse_latents
from minisae.models.gpt2 import CONFIGS, GPT2
from minisae.sae import make_sae

HOOK = "blocks.1.hook_resid_post"
SCALE = 30.0  # about sqrt(D) / mean ||x|| at gpt2-random's residual stream (~0.26), as in minisae.pipeline.activations


def relu_sae(d=64, n=96, seed=0, bias=-1.0):
    sae = make_sae("relu", d, n, seed=seed)
    with torch.no_grad():
        sae.b_enc.fill_(bias)  # most latents fire on a few tokens only
    return sae.eval()


def hooked(sae, max_norm=None):
    return HookedSAE(sae, "gpt2-random", HOOK, SCALE, max_norm)


def contexts(n=24, T=16, seed=0, vocab=50257):
    c = torch.randint(0, vocab - 1, (n, T), generator=torch.Generator().manual_seed(seed))
    c[:, 0] = vocab - 1  # BOS
    return c


class ToyTokenizer:
    """Token t decodes to a short string; a few are HTML specials, one is a newline."""
    SPECIAL = {0: "<b>", 1: "&amp;", 2: '"q"', 3: "\n"}

    def decode(self, ids):
        return "".join(self.SPECIAL.get(t, f" t{t}") for t in ids)


# ---------------------------------------------------------------- top examples

def brute_force_top(f, idx, ids, k, before=12, after=4):
    """All (value, context, pos) with value > 0, sorted by value desc, then context and
    position asc; the first k, each with its window sliced from the full context."""
    B, Tm1 = f.shape
    items = [(f[b, p].item(), int(ids[b]), p + 1, b) for b in range(B) for p in range(Tm1) if f[b, p] > 0]
    items.sort(key=lambda t: (-t[0], t[1], t[2]))
    out = []
    for v, c, pos, b in items[:k]:
        lo, hi = max(0, pos - before), min(idx.shape[1], pos + after + 1)
        acts = [0.0] + f[b].tolist()
        out.append({"value": v, "context": c, "pos": pos, "tokens": idx[b, lo:hi].tolist(),
                    "acts": acts[lo:hi], "center": pos - lo})
    return out


def test_top_examples_with_ties_match_brute_force_in_any_order():
    """Values from {0, 0.5, 1, 2}: many exact ties, so the tie rule decides the set."""
    g = torch.Generator().manual_seed(0)
    N, T, L, k = 40, 10, 3, 7
    idx = torch.randint(0, 100, (N, T), generator=g)
    f = torch.tensor([0.0, 0.5, 1.0, 2.0])[torch.randint(0, 4, (N, T - 1, L), generator=g)]  # (N, T-1, L)
    f[:, :, 2] = 0.0
    f[5, 3, 2] = 1.5  # latent 2 fires once: fewer than k examples
    want = {j: brute_force_top(f[..., j], idx, torch.arange(N), k) for j in range(L)}
    for trial in range(4):
        perm = torch.randperm(N, generator=g) if trial else torch.arange(N)
        top = Fe.TopExamples([0, 1, 2], k=k)
        cuts = sorted(random.Random(trial).sample(range(1, N), 5))  # uneven batches
        for s, e in zip([0] + cuts, cuts + [N]):
            top.add(idx[perm[s:e]], f[perm[s:e]], perm[s:e])
            assert all(len(h) <= k for h in top.heaps.values())
        for j in range(L):
            assert top.result(j) == want[j], (trial, j)
    assert len(want[2]) == 1


def test_scan_top_examples_are_the_top_activations(gpt2):
    sae, ctx = relu_sae(), contexts()
    latents = [0, 7, 31]
    _, top = Fe.scan(gpt2, hooked(sae), ctx, latents, k=5, batch_size=5, verbose=False)
    with torch.no_grad():  # reference: one forward over everything, all latents
        x = gpt2(ctx, stop_at=HOOK)[:, 1:]  # (N, T-1, D)
        f = sae.encode(x.reshape(-1, 64) * SCALE).view(len(ctx), -1, sae.n_latents)  # (N, T-1, F)
    for j in latents:
        want, got = brute_force_top(f[..., j], ctx, torch.arange(len(ctx)), 5), top.result(j)
        assert len(got) == 5
        assert [(e["context"], e["pos"], e["tokens"], e["center"]) for e in got] == \
               [(e["context"], e["pos"], e["tokens"], e["center"]) for e in want]
        np.testing.assert_allclose([e["value"] for e in got], [e["value"] for e in want], rtol=1e-5)
        np.testing.assert_allclose(sum((e["acts"] for e in got), []), sum((e["acts"] for e in want), []),
                                   rtol=1e-5, atol=1e-6)


def test_scan_is_stable_under_corpus_order(gpt2):
    sae, ctx = relu_sae(), contexts(n=20)
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(3))
    s1, a = Fe.scan(gpt2, hooked(sae), ctx, [2, 9], k=4, verbose=False)
    s2, b = Fe.scan(gpt2, hooked(sae), ctx[perm], [2, 9], k=4, ids=perm, batch_size=3, verbose=False)
    for j in (2, 9):
        assert len(a.result(j)) == 4
        assert [(e["context"], e["pos"], e["tokens"]) for e in a.result(j)] == \
               [(e["context"], e["pos"], e["tokens"]) for e in b.result(j)]
        assert s1["hist"][j] == s2["hist"][j]  # same bins and counts in any order
    np.testing.assert_allclose(s1["density"], s2["density"])


def test_memory_is_bounded():
    """A corpus 500x larger than what is kept: the heaps never hold more than k each."""
    g = torch.Generator().manual_seed(1)
    top, k, stored = Fe.TopExamples([0, 1], k=4), 4, []
    for s in range(250):
        f = torch.rand(4, 15, 2, generator=g)  # every token fires: 120 candidates per batch
        top.add(torch.randint(0, 9, (4, 16), generator=g), f, torch.arange(4 * s, 4 * s + 4))
        stored.append(top.n_stored())
    assert max(stored) == 2 * k and 250 * 4 * 15 > 500 * max(stored)  # 15000 tokens seen, 8 kept
    assert all(v > 0.99 for v in (e["value"] for e in top.result(0)))  # the top of 15000 uniforms


# ---------------------------------------------------------------- statistics

def test_stats_and_histogram_against_numpy():
    g = torch.Generator().manual_seed(2)
    f = torch.relu(torch.randn(3000, 5, generator=g) * torch.tensor([1, 10, 0.01, 1, 1]))  # (N, F)
    f[:, 3] = 0  # dead latent
    st = Fe.LatentStats(5, hist_latents=[0, 1, 2, 3])
    for chunk in torch.split(f, [1, 7, 500, 1492, 1000]):
        st.add(chunk)
    r = st.result()
    a = f.numpy().astype(np.float64)
    np.testing.assert_allclose(r["density"], (a > 0).mean(0))
    np.testing.assert_allclose(r["max"], a.max(0), rtol=1e-6)
    np.testing.assert_allclose(r["mean_active"][:3], [a[a[:, i] > 0, i].mean() for i in range(3)], rtol=1e-6)
    assert r["mean_active"][3] == 0 and r["hist"][3]["width"] is None
    for i in range(3):
        h, vals = r["hist"][i], a[a[:, i] > 0, i]
        w = h["width"]
        assert vals.max() < Fe.N_BINS * w <= 2 * vals.max() and np.log2(w) == int(np.log2(w))  # smallest power of 2
        want = np.bincount(np.floor(vals / w).astype(int), minlength=Fe.N_BINS)
        assert h["counts"] == want.tolist()


# ---------------------------------------------------------------- logit lens

def _jvp_unembed(model, x, d):
    return torch.autograd.functional.jvp(lambda r: model.unembed(r[None, None])[0, 0], x, d)[1]


def test_logit_lens_gpt2_layernorm_vs_autograd(gpt2):
    """For d orthogonal to the centred x, LayerNorm's Jacobian at x maps d to g*c(d)/sigma:
    jvp(unembed, x, d) * sigma(x) must equal lens(d) (gain and centring included)."""
    m = GPT2(CONFIGS["gpt2-random"]).double().eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        m.ln_f.weight.copy_(torch.rand(64, generator=g, dtype=torch.float64) + 0.5)
        m.ln_f.bias.copy_(torch.randn(64, generator=g, dtype=torch.float64))
    x, d = torch.randn(2, 64, generator=g, dtype=torch.float64)
    xc = x - x.mean()
    d = d - (d @ xc) / (xc @ xc) * xc
    d = d / d.norm()
    sigma = (xc.pow(2).mean() + m.ln_f.eps).sqrt()
    want = _jvp_unembed(m, x, d) * sigma  # (V,)
    torch.testing.assert_close(L.logit_lens(m, d).double(), want, rtol=1e-4, atol=1e-6)


def test_logit_lens_llama_rmsnorm_vs_autograd():
    from minisae.models.llama import Llama, LlamaConfig
    m = Llama(LlamaConfig(n_layer=1, d_model=16, d_mlp=32, n_head=2, n_kv_head=1, vocab_size=50, n_ctx=32))
    m = m.double().eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        m.norm.weight.copy_(torch.rand(16, generator=g, dtype=torch.float64) + 0.5)
        m.embed_tokens.weight.normal_(generator=g)
    x, d = torch.randn(2, 16, generator=g, dtype=torch.float64)
    d = d - (d @ x) / (x @ x) * x
    d = d / d.norm()
    rms = (x.pow(2).mean() + m.norm.eps).sqrt()
    torch.testing.assert_close(L.logit_lens(m, d).double(), _jvp_unembed(m, x, d) * rms, rtol=1e-4, atol=1e-6)
    lens = L.lens_tokens(m, ToyTokenizer(), d * 3.0, n=3)  # the scale of d does not matter
    assert [v for _, v in lens["promoted"]] == pytest.approx(L.logit_lens(m, d).topk(3).values.tolist(), rel=1e-5)
    assert lens["suppressed"][0][1] == pytest.approx(L.logit_lens(m, d).min().item(), rel=1e-5)


# ---------------------------------------------------------------- checks, display

def check_site(meta, *asked, **asked_by_name):
    h = HookedSAE.from_meta(None, meta).check_site(*asked, **asked_by_name)
    return h.model_name, h.hook


def test_check_site_and_latents():
    meta = {"model": "gpt2-random", "hook": "blocks.1.hook_resid_post", "scale": 2.0}
    assert check_site(meta) == ("gpt2-random", "blocks.1.hook_resid_post")
    assert check_site(meta, "gpt2-random", 1, "resid_post") == ("gpt2-random", "blocks.1.hook_resid_post")
    with pytest.raises(ValueError, match="trained on model 'gpt2-random', not 'smollm2'"):
        check_site(meta, "smollm2")
    with pytest.raises(ValueError, match="trained at blocks.1.hook_resid_post"):
        check_site(meta, layer=2)
    with pytest.raises(ValueError, match="trained at"):
        check_site(meta, site="mlp_out")
    with pytest.raises(ValueError, match="metadata"):
        check_site({"hook": "blocks.1.hook_resid_post"})
    assert parse_latents("3, 17,42", 50) == [3, 17, 42]
    for bad in ("3,50", "-1", ""):
        with pytest.raises(ValueError, match="out of range"):
            parse_latents(bad, 50)
    with pytest.raises(ValueError, match="integers"):
        parse_latents("3;4", 50)


class Balance(HTMLParser):
    """Checks that every tag is closed in order; collects sections and text."""
    VOID = {"meta", "br", "img", "hr", "input", "link"}

    def __init__(self):
        super().__init__()
        self.stack, self.sections, self.text, self.bad = [], [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag in ("script", "link", "img", "iframe") or "src" in attrs or \
                not attrs.get("href", "#").startswith("#"):  # links within the page only
            self.bad.append(tag)  # no scripts, no external assets
        if tag == "section":
            self.sections.append(attrs["id"])
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack.pop() == tag, f"unbalanced </{tag}>"

    def handle_data(self, data):
        self.text.append(data)


def test_html_page_is_well_formed(gpt2):
    sae, ctx = relu_sae(), contexts(vocab=50257)
    ctx[:, 1:] %= 8  # token ids 0..7: the HTML specials of ToyTokenizer appear
    latents = [1, 4, 30]
    stats, top = Fe.scan(gpt2, hooked(sae), ctx, latents, k=3, verbose=False)
    rows = Fe.report(gpt2, ToyTokenizer(), hooked(sae), stats, top)
    page = feature_page.render_html("test <page>", rows, ToyTokenizer())
    p = Balance()
    p.feed(page)
    p.close()
    assert p.stack == [] and p.bad == []
    assert p.sections == [f"latent-{i}" for i in latents]
    text = "".join(p.text)
    for r in rows:
        assert f"density {r['density']:.3e}" in text and f"max {r['max']:.4g}" in text
        assert all(f"{e['value']:.3f}" in text for e in r["examples"])
    assert "<b>" in text and "&amp;" in text and "test <page>" in text  # escaped, shown as text
    lines = []
    feature_page.print_report(rows, ToyTokenizer(), file=type("W", (), {"write": lambda s, t: lines.append(t)})())
    shown = "".join(lines)
    assert "[[" in shown and "\\n" in shown and "latent 30" in shown


needs_vocab = pytest.mark.skipif(
    not (os.environ.get("MINISAE_GPT2_TOKENIZER_DIR") and
         (Path(os.environ["MINISAE_GPT2_TOKENIZER_DIR"]) / "encoder.json").exists()),
    reason="set MINISAE_GPT2_TOKENIZER_DIR to a folder with GPT-2's encoder.json + vocab.bpe")


def small_run_files(tmp_path, tokens_flag="--tokens"):
    """Two saved SAEs on gpt2-random (layers 1 and 2) and a small text file."""
    import pydoc_data.topics
    for layer, seed in ((1, 0), (2, 1)):
        formats.save(relu_sae(seed=seed), tmp_path / f"sae{layer}.pt", model="gpt2-random",
                                 hook=f"blocks.{layer}.hook_resid_post", scale=SCALE, settings={})
    (tmp_path / "text.txt").write_text("\n\n".join(list(pydoc_data.topics.topics.values())[:30]))
    return ["--text", str(tmp_path / "text.txt"), "--split", "train", tokens_flag, "4096", "--ctx-len", "64"]


@needs_vocab
def test_features_command(tmp_path, capsys, monkeypatch):
    from minisae.__main__ import main
    monkeypatch.setenv("MINISAE_CACHE", str(tmp_path / "cache"))
    text = small_run_files(tmp_path)
    main(["features", "--sae", str(tmp_path / "sae1.pt"), "--top", "3", "--by", "density", "--k", "4",
          "--out", str(tmp_path / "out"), *text])
    out = capsys.readouterr().out
    assert out.count("=== latent") == 3 and "[[" in out and "logit lens promoted" in out
    p = Balance()
    p.feed((tmp_path / "out" / "features-sae1.html").read_text(encoding="utf-8"))
    assert len(p.sections) == 3 and p.stack == []
    capsys.readouterr()
    main(["features", "--sae", str(tmp_path / "sae1.pt"), "--top", "2", "--out", str(tmp_path / "r"), *text])
    assert capsys.readouterr().out.count("=== latent") == 2  # --by random (the default): 2 live latents
    with pytest.raises(ValueError, match="trained on model"):
        main(["features", "--sae", str(tmp_path / "sae1.pt"), "--model", "gpt2", "--latents", "1", *text])
    with pytest.raises(ValueError, match="trained at"):
        main(["features", "--sae", str(tmp_path / "sae1.pt"), "--layer", "2", "--latents", "1", *text])
    with pytest.raises(ValueError, match="out of range"):
        main(["features", "--sae", str(tmp_path / "sae1.pt"), "--latents", "96", *text])
