"""The explain step: the prompt builder on a hand-made latent (its examples appear,
highlighted, in order), how examples are split between explainer and scorer (quantiles,
no overlap, balanced silent windows), the token-set baseline, and a whole run of
explain_sae on gpt2-random with a scripted chat model: deterministic with a seed, files
written, the page showing the explanations."""

import json
import math
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from minisae.autointerp import explain as E
from minisae.configs import SAESource


class ToyTokenizer:
    """Token t decodes to ' t{t}'; 7 decodes to a newline."""

    def decode(self, ids):
        return "".join("\n" if t == 7 else f" t{t}" for t in ids)


def window(tokens, acts):
    peak = max(range(len(acts)), key=lambda j: acts[j])
    return {"tokens": tokens, "acts": acts, "center": peak, "value": acts[peak], "context": 0, "start": 0}


def test_prompt_shows_each_example_highlighted_in_order():
    tok = ToyTokenizer()
    examples = [window([1, 2, 3], [0.0, 4.0, 0.0]), window([4, 5, 7, 6], [2.0, 0.0, 0.0, 1.0]),
                window([8, 9], [0.0, 0.5])]
    msgs = E.explainer_messages(tok, examples)
    user = msgs[-1]["content"]
    assert msgs[0]["role"] == "system" and msgs[-1]["role"] == "user"
    lines = [ln for ln in user.split("\n") if ln[:2] in ("1.", "2.", "3.")]
    assert lines == ["1.  t1<< t2>> t3", "2. << t4>> t5\\n<< t6>>", "3.  t8<< t9>>"]  # in order, \n escaped
    # activations on 0-10, relative to the largest shown (4.0); every firing token at least 1
    assert '(activations: "t2" 10)' in user and '(activations: "t4" 5, "t6" 2)' in user
    assert '(activations: "t9" 1)' in user
    assert user.index("1. ") < user.index("2. ") < user.index("3. ")
    assert "makes more likely" not in user
    with_lens = E.explainer_messages(tok, examples, lens=[(" cat", 1.0), (" dog", 0.5)])[-1]["content"]
    assert 'Tokens the neuron makes more likely next: "cat", "dog"' in with_lens


def test_token_set_baseline_counts_firing_tokens():
    tok = ToyTokenizer()
    examples = [window([1, 2, 2, 3], [0.0, 1.0, 2.0, 0.5]), window([3, 4, 1], [0.1, 9.0, 0.0])]
    # counts: t2 x2, t3 x2 (total 0.6), t4 x1 (9.0); t1 never fires
    assert E.token_set_explanation(tok, examples, n=3) == 'the tokens " t2", " t3", " t4"'
    assert E.token_set_explanation(tok, examples, n=1) == 'the tokens " t2"'  # tie on count: larger total


def test_clean_explanation_keeps_the_first_sentence():
    assert E.clean_explanation("  The word 'the'.\nMore text. ") == "The word 'the'."
    assert E.clean_explanation("no full stop here") == "no full stop here"
    assert E.clean_explanation("") == "(no explanation)"
    assert len(E.clean_explanation("x" * 500)) == 200


def hand_latent(N=12, T=20, seed=0):
    """Codes a (N, T-1): context c fires at position 2c mod (T-1) with value N - c (so
    context 0 is the strongest); contexts 8.. never fire."""
    g = torch.Generator().manual_seed(seed)
    contexts = torch.randint(10, 1000, (N, T), generator=g)
    contexts[:, 0] = 0  # BOS
    a = torch.zeros(N, T - 1)
    for c in range(8):
        a[c, (2 * c) % (T - 1)] = float(N - c)
    return contexts, a


def test_split_examples_quantiles_no_overlap_and_balance():
    contexts, a = hand_latent()
    explain, held, labels = E.split_examples(contexts, a, n_explain=4, n_score=3, window=8, after=2, seed=0)
    shown = [w["context"] for w in explain]
    assert shown[:2] == [0, 1]  # the strongest half, in order ...
    assert all(c > 1 for c in shown[2:]) and shown[2:] == sorted(shown[2:])  # ... then lower ranks
    pos = [w["context"] for w, y in zip(held, labels) if y]
    neg = [w for w, y in zip(held, labels) if not y]
    assert not set(shown) & set(pos)  # the scorer never sees an explainer example
    assert labels == [1] * len(pos) + [0] * len(neg) and len(pos) == len(neg) == 3
    assert all(max(w["acts"]) > 0 for w in held[:3]) and all(max(w["acts"]) == 0 for w in neg)
    assert all(w["context"] not in shown + pos for w in neg)
    for w in explain + held:  # windows cut from the context at positions 1 + start ...
        c, s = w["context"], w["start"]
        assert w["tokens"] == contexts[c, 1 + s:1 + s + 8].tolist() and w["acts"] == a[c, s:s + 8].tolist()
    for w in explain + held[:3]:  # ... with the peak inside, `after` tokens from the end where there is room
        peak = int(a[w["context"]].argmax())
        assert w["start"] <= peak < w["start"] + 8 and w["value"] == a[w["context"]].max().item()
    again = E.split_examples(contexts, a, 4, 3, 8, 2, seed=0)
    assert again == (explain, held, labels)  # deterministic with a seed


def test_split_examples_rare_latent():
    contexts, a = hand_latent()
    a[1:] = 0  # fires in one context only: nothing to score
    assert E.split_examples(contexts, a, 4, 3, 8, 2) is None


def test_config_checks():
    src = SAESource(sae=Path("x.pt"))
    with pytest.raises(ValueError, match="--n-score"):
        E.ExplainConfig(src, n_score=0).check()
    with pytest.raises(ValueError, match="--after"):
        E.ExplainConfig(src, window=4, after=4).check()
    with pytest.raises(ValueError, match="methods"):
        E.ExplainConfig(src, methods=("vibes",)).check()
    with pytest.raises(ValueError, match="--api-model needs --endpoint"):
        E.ExplainConfig(src, api_model="gpt").check()


class ScriptedChat:
    """Explains every latent by the first highlighted token it sees; says yes when a
    window's text contains the explained token."""

    def __init__(self):
        self.calls = 0

    def complete(self, messages, max_tokens, seed=None, stop=()):
        self.calls += 1
        user = messages[-1]["content"]
        return f"The token{user.split('<<')[1].split('>>')[0]}. And more."

    def yes_prob(self, convs):
        out = []
        for m in convs:
            first, text = m[-1]["content"].split("\n")[0], m[-1]["content"].split('Text: "')[1]
            out.append(0.9 if first.split("The token")[-1].rstrip(".") in text else 0.2)
        return out

    def line_probs(self, items):
        out = []
        for m, lines in items:
            word = m[-1]["content"].split("\n")[0].split("The token")[-1].rstrip(".")
            out.append([0.9 if line.split('"')[1] == word else 0.1 for line in lines])
        return out


def test_explain_sae_on_gpt2_random(gpt2, tmp_path):
    from minisae.pipeline.hooked_sae import HookedSAE
    from minisae.sae import make_sae
    torch.manual_seed(0)
    sae = make_sae("relu", 64, 32, seed=0)
    with torch.no_grad():
        sae.b_enc.fill_(-1.0)  # sparse: most latents fire on a few tokens
    hsae = HookedSAE(sae.eval(), "gpt2-random", "blocks.1.hook_resid_post", 30.0)
    contexts = torch.randint(8, 500, (24, 32), generator=torch.Generator().manual_seed(1))
    contexts[:, 0] = 50256
    x = E.hook_activations(gpt2, hsae.hook, contexts)  # (N, T-1, D)
    assert x.shape == (24, 31, 64)
    cfg = E.ExplainConfig(SAESource(sae=tmp_path / "s.pt"), n_latents=4, n_explain=4, n_score=2, window=8,
                          after=2, out=tmp_path / "out")
    chat = ScriptedChat()
    res = E.explain_sae(chat, hsae, gpt2, ToyTokenizer(), contexts, x, cfg, "s")
    again = E.explain_sae(ScriptedChat(), hsae, gpt2, ToyTokenizer(), contexts, x, cfg, "s")
    strip = lambda r: [{k: v for k, v in row.items() if not k.endswith("_s")} for row in r["latents"]]
    assert strip(res) == strip(again)  # deterministic with a seed
    rows = res["latents"]
    assert len(rows) >= 2 and res["summary"]["n_latents"] == len(rows)
    assert chat.calls == len(rows)  # one explainer call per scored latent
    for r in rows:
        assert r["explanation"].startswith("The token") and r["explanation"].endswith(".")
        assert "And more" not in r["explanation"]  # one sentence
        assert r["control_from"] != r["latent"]
        d = r["scores"]["explanation"]["detection"]
        assert 0 <= d["balanced_accuracy"] <= 1 and len(d["p_yes"]) == len(r["labels"])
    # the summary is the mean over latents
    vals = [r["scores"]["explanation"]["detection"]["balanced_accuracy"] for r in rows]
    assert res["summary"]["explanation_detection_balanced_accuracy"] == pytest.approx(sum(vals) / len(vals))
    stats, _ = E.latent_codes(hsae, x)
    assert res["summary"]["l0"] == pytest.approx(sum(stats["density"]))
    saved = json.loads((tmp_path / "out" / "explanations-s.json").read_text())
    assert saved["summary"]["n_latents"] == len(rows) and saved["latents"][0]["explanation"] == rows[0]["explanation"]
    page = (tmp_path / "out" / "explanations-s.html").read_text(encoding="utf-8")
    HTMLParser().feed(page)
    for r in rows:
        assert f'latent {r["latent"]}</h2><p><b>explanation:</b>' in page
    assert page.count("token-set baseline") == len(rows)


def test_latent_codes_match_features_scan(gpt2):
    from minisae.interp.features import scan
    from minisae.pipeline.hooked_sae import HookedSAE
    from minisae.sae import make_sae
    sae = make_sae("relu", 64, 16, seed=2)
    with torch.no_grad():
        sae.b_enc.fill_(-0.5)
    hsae = HookedSAE(sae.eval(), "gpt2-random", "blocks.1.hook_resid_post", 30.0, max_norm=None)
    contexts = torch.randint(8, 500, (6, 16), generator=torch.Generator().manual_seed(3))
    contexts[:, 0] = 50256
    x = E.hook_activations(gpt2, hsae.hook, contexts)
    mine, a = E.latent_codes(hsae, x, [3, 5])
    theirs, _ = scan(gpt2, hsae, contexts, verbose=False)
    assert mine["density"] == pytest.approx(theirs["density"]) and mine["max"] == pytest.approx(theirs["max"])
    f, _ = hsae.encode_positions(x, bos=False)
    assert torch.equal(a, f[..., [3, 5]])


def test_comparison_table_and_figure(tmp_path):
    s = {"sae": "topk-k32", "l0": 31.6, "n_latents": 50, "explain_s_per_latent": 9.0, "score_s_per_latent": 4.0}
    for kind in ("explanation", "baseline", "control", "baseline_rule"):
        s.update({f"{kind}_detection_balanced_accuracy": 0.6, f"{kind}_detection_auroc": 0.7,
                  f"{kind}_simulation_correlation": 0.1})
    cfg = E.ExplainConfig(SAESource(sae=Path("x")), run_dir=tmp_path, out=tmp_path)
    E.write_comparison([s, {**s, "sae": "relu", "explanation_simulation_correlation": math.nan}], cfg)
    assert (tmp_path / "autointerp_scores.png").stat().st_size > 1000
    rows = json.loads((tmp_path / "autointerp_results.json").read_text())["rows"]
    assert [r["sae"] for r in rows] == ["topk-k32", "relu"]
    md = E.table_markdown([s])
    assert md.splitlines()[2].startswith("| topk-k32 | 31.6 | 50 | 0.600 | 0.700 | 0.100 |")


def test_explain_command_end_to_end(gpt2, tmp_path, monkeypatch, capsys):
    """`python -m minisae explain` through cli.py: one SAE file, then an lm run folder
    (--sae RUN) compared; the model loader, the text and the chat model are stand-ins."""
    from minisae.cli import main
    from minisae.pipeline.hooked_sae import HookedSAE
    from minisae.sae import make_sae
    run = tmp_path / "run"
    for name, bias in (("relu-a", -1.0), ("relu-b", -1.2)):
        sae = make_sae("relu", 64, 32, seed=0)
        with torch.no_grad():
            sae.b_enc.fill_(bias)
        (run / "saes").mkdir(parents=True, exist_ok=True)
        HookedSAE(sae.eval(), "gpt2-random", "blocks.1.hook_resid_post", 30.0).save(run / "saes" / f"{name}.pt")
    contexts = torch.randint(8, 500, (24, 32), generator=torch.Generator().manual_seed(1))
    contexts[:, 0] = 50256
    monkeypatch.setattr(E, "load_with_model", lambda path, *a, **k: (HookedSAE.load(path), gpt2, ToyTokenizer()))
    monkeypatch.setattr(E, "load_text", lambda src, tok, name: contexts)
    monkeypatch.setattr(E, "make_chat", lambda cfg: ScriptedChat())
    flags = ["--n-latents", "3", "--n-explain", "4", "--n-score", "2", "--window", "8", "--out", str(tmp_path / "out")]
    main(["explain", "--sae", str(run / "saes" / "relu-a.pt"), *flags])
    out = capsys.readouterr().out
    assert "=== latent" in out and "explanation" in out and "token-set" in out  # report, scores, table
    assert (tmp_path / "out" / "explanations-relu-a.json").exists()
    leftover = run / "saes" / f".relu-a.pt.{2 ** 22 + 1}.tmp"  # a killed writer's half-written folder
    leftover.mkdir()  # (PIDs stop below 2 ** 22 on Linux: that process is not running)
    (leftover / "cfg.json").write_text("{")
    summaries = main(["explain", "--sae", str(run), *flags, "--figures", str(tmp_path / "fig")])
    assert [s["sae"] for s in summaries] == ["relu-a", "relu-b"] and not leftover.exists()
    assert (tmp_path / "fig" / "autointerp_scores.png").exists()
    saved = json.loads((tmp_path / "fig" / "autointerp_results.json").read_text())["rows"]
    assert [(r["sae"], r["l0"], r["n_latents"]) for r in saved] == [(s["sae"], s["l0"], s["n_latents"]) for s in summaries]
    with pytest.raises(ValueError, match="holds no SAE"):
        (tmp_path / "empty" / "saes").mkdir(parents=True)
        main(["explain", "--sae", str(tmp_path / "empty"), *flags])


def test_split_examples_dense_latent_has_nothing_silent():
    contexts, a = hand_latent()
    a += 0.1  # fires everywhere: no silent window, no balanced test
    assert E.split_examples(contexts, a, 4, 3, 8, 2) is None
