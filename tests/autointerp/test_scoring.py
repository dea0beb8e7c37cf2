"""Scoring arithmetic against naive references (plain Python loops, written from the
definitions), the shuffled control's derangement, and the two scorers driven by a scripted
chat model whose answers we choose."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minisae.autointerp import scoring as S


def naive_balanced_accuracy(y, yhat):
    tp = sum(1 for a, b in zip(y, yhat) if a and b)
    tn = sum(1 for a, b in zip(y, yhat) if not a and not b)
    pos = sum(1 for a in y if a)
    neg = len(y) - pos
    return (tp / pos + tn / neg) / 2


def naive_auroc(scores, y):
    """Over every (positive, negative) pair: 1 if the positive scores higher, 1/2 on a tie."""
    pairs = [(p, n) for p, yp in zip(scores, y) if yp for n, yn in zip(scores, y) if not yn]
    return sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs)


def naive_pearson(x, y):
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy)


labels_and_preds = st.integers(2, 40).flatmap(lambda n: st.tuples(
    st.lists(st.booleans(), min_size=n, max_size=n), st.lists(st.booleans(), min_size=n, max_size=n)))


@settings(max_examples=200, deadline=None)
@given(labels_and_preds)
def test_balanced_accuracy_matches_naive(yy):
    y, yhat = yy
    if all(y) or not any(y):
        with pytest.raises(ValueError, match="both positive and negative"):
            S.balanced_accuracy(y, yhat)
        return
    assert S.balanced_accuracy(y, yhat) == pytest.approx(naive_balanced_accuracy(y, yhat), abs=1e-12)


def test_balanced_accuracy_chance_and_extremes():
    y = [1, 1, 1, 0]  # imbalanced: "always yes" is 0.75 accurate but 0.5 balanced
    assert S.balanced_accuracy(y, [1, 1, 1, 1]) == 0.5
    assert S.balanced_accuracy(y, y) == 1.0
    assert S.balanced_accuracy(y, [0, 0, 0, 1]) == 0.0
    with pytest.raises(ValueError, match="shape"):
        S.balanced_accuracy([1, 0], [1, 0, 1])


@settings(max_examples=200, deadline=None)
@given(st.integers(2, 30).flatmap(lambda n: st.tuples(
    st.lists(st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]), min_size=n, max_size=n),  # ties on purpose
    st.lists(st.booleans(), min_size=n, max_size=n))))
def test_auroc_matches_pairwise_count(sy):
    s, y = sy
    if all(y) or not any(y):
        return
    assert S.auroc(s, y) == pytest.approx(naive_auroc(s, y), abs=1e-12)


@settings(max_examples=200, deadline=None)
@given(st.integers(2, 50).flatmap(lambda n: st.tuples(
    st.lists(st.floats(-100, 100), min_size=n, max_size=n), st.lists(st.floats(-100, 100), min_size=n, max_size=n))))
def test_correlation_matches_naive(xy):
    x, y = xy
    # the naive formula is ill-conditioned for (near-)constant input; compare where both spread
    if max(x) - min(x) < 1e-3 or max(y) - min(y) < 1e-3:
        return
    assert S.correlation(x, y) == pytest.approx(naive_pearson(x, y), abs=1e-9)


def test_correlation_invariants_and_constant_input():
    x = [0.0, 1.0, 3.0, 2.0, 5.0]
    assert S.correlation(x, x) == pytest.approx(1.0)
    assert S.correlation(x, [-2 * v + 7 for v in x]) == pytest.approx(-1.0)  # affine maps: |r| = 1
    assert math.isnan(S.correlation(x, [0.3] * 5))  # a constant prediction predicts nothing
    with pytest.raises(ValueError, match="one length"):
        S.correlation([1.0, 2.0], [1.0, 2.0, 3.0])


@settings(max_examples=100, deadline=None)
@given(st.integers(2, 60), st.integers(0, 10_000))
def test_derangement_has_no_fixed_point_and_is_seeded(n, seed):
    perm = S.derangement(n, seed)
    assert sorted(perm) == list(range(n))  # a permutation
    assert all(perm[i] != i for i in range(n))  # no latent keeps its own explanation
    assert perm == S.derangement(n, seed)  # deterministic with a seed


def test_derangement_rejects_one_latent():
    with pytest.raises(ValueError, match="at least 2"):
        S.derangement(1)


def test_derangement_varies_with_the_seed():
    assert len({tuple(S.derangement(8, s)) for s in range(20)}) > 1


class ScriptedChat:
    """A chat model that says yes with the probability we give it, keyed on the explanation."""

    def __init__(self, p_by_word):
        self.p = p_by_word  # word in the explanation -> function(text or token) -> P(yes)

    def _rule(self, messages):
        user = messages[-1]["content"]
        return next(f for w, f in self.p.items() if w in user.split("\n")[0])

    def yes_prob(self, conversations):
        out = []
        for m in conversations:
            text = m[-1]["content"].split('Text: "')[1].rsplit('"', 1)[0]
            out.append(self._rule(m)(text))
        return out

    def line_probs(self, items):
        return [[self._rule(m)(line.split('"')[1]) for line in lines] for m, lines in items]


def test_detection_and_simulation_with_a_perfect_and_a_useless_scorer():
    held = {"texts": ["the cat sat", "a dog ran", "cat and cat", "nothing here"], "labels": [1, 0, 1, 0],
            "tokens": [["the", " cat", " sat"], ["a", " dog", " ran"]], "acts": [[0.0, 2.0, 0.0], [0.0, 0.0, 0.0]]}
    chat = ScriptedChat({"cats": lambda t: 0.9 if "cat" in t else 0.1, "anything": lambda t: 0.8})
    good = S.score(chat, "cats", held)
    assert good["detection"]["balanced_accuracy"] == 1.0 and good["detection"]["auroc"] == 1.0
    assert good["simulation"]["correlation"] == pytest.approx(1.0)  # predicts exactly the one firing token
    bad = S.score(chat, "anything", held)
    assert bad["detection"]["balanced_accuracy"] == 0.5 and bad["detection"]["auroc"] == 0.5  # always yes
    assert math.isnan(bad["simulation"]["correlation"])  # constant prediction


def test_simulation_leaves_out_unanswered_tokens():
    held = {"tokens": [["a", "b", "c", "d"]], "acts": [[0.0, 1.0, 0.0, 3.0]]}
    chat = ScriptedChat({"x": lambda t: {"a": 0.0, "b": math.nan, "c": 0.2, "d": 1.0}[t]})
    out = S.simulation_score(chat, "x", held["tokens"], held["acts"])
    assert out["n_unanswered"] == 1
    assert out["correlation"] == pytest.approx(naive_pearson([0.0, 0.2, 1.0], [0.0, 0.0, 3.0]))


def test_prompts_carry_the_explanation_and_every_token_in_order():
    msgs, lines = S.simulation_messages("commas in lists", ["a", ",", " b"])
    assert "commas in lists" in msgs[-1]["content"]
    assert lines == ['"a":', '",":', '" b":']
    d = S.detection_messages("commas", "x, y")
    assert 'Text: "x, y"' in d[-1]["content"] and d[0]["role"] == "system"


def test_binary_prob_is_a_two_way_softmax():
    from minisae.autointerp.chat import binary_prob
    assert binary_prob(math.log(0.3), math.log(0.1)) == pytest.approx(0.75)
    assert binary_prob(0.0, -math.inf) == 1.0 and binary_prob(-math.inf, 0.0) == 0.0
    assert math.isnan(binary_prob(-math.inf, -math.inf))
    t = torch.tensor([math.log(0.3), math.log(0.1)])
    assert binary_prob(*t.tolist()) == pytest.approx(torch.softmax(t, 0)[0].item())


def test_token_rule_reads_a_token_set_literally():
    expl = 'the tokens " of", ",", "torch"'
    rule = S.TokenRule()
    texts = ["x of y", "nothing here", "a,b", "of"]  # "of" without its space is not " of"
    assert rule.yes_prob([S.detection_messages(expl, t) for t in texts]) == [1.0, 0.0, 1.0, 0.0]
    msgs, lines = S.simulation_messages(expl, [" of", "of", ",", "torch", " torch"])
    assert rule.line_probs([(msgs, lines)]) == [[1.0, 0.0, 1.0, 1.0, 0.0]]
    held = {"texts": ["x of y", "z"], "labels": [1, 0], "tokens": [["x", " of", " y"], ["z"]],
            "acts": [[0.0, 3.0, 0.0], [0.0]]}
    out = S.score(rule, expl, held)
    assert out["detection"]["balanced_accuracy"] == 1.0 and out["simulation"]["correlation"] == pytest.approx(1.0)
