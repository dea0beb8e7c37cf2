"""Scoring an explanation of a latent: does it predict where the latent fires?

Two scorers from the literature, each run by a chat model (minisae.autointerp.chat) on held-out text
the explainer never saw: n windows where the latent fires and n where it does not.

Detection (Paulo et al. 2024, EleutherAI delphi): for each window the scorer answers
whether the text matches the explanation. With p_j = P(yes) / (P(yes) + P(no)) on window
j and the prediction yhat_j = [p_j > 1/2],

    balanced accuracy = (TPR + TNR) / 2 = ( #{yhat=1, y=1}/#{y=1} + #{yhat=0, y=0}/#{y=0} ) / 2

0.5 is chance whatever the class balance. A small scorer that answers "yes" to everything
gets exactly 0.5, so we also report the AUROC of p (the probability that a random firing
window gets a higher p than a random silent one; ties count 1/2), which needs no threshold.

Simulation, "all at once" (Bills et al. 2023, OpenAI): the scorer sees the window one
token per line and, in one pass, gives P(yes) at each token: the simulated activation s_t.
The score is the correlation with the true activations a_t over every token of every
window (firing and silent ones together, as Bills et al. mix top and random sequences):

    r = sum (s - mean s)(a - mean a) / sqrt( sum (s - mean s)^2 * sum (a - mean a)^2 )

r is NaN when either side is constant (a scorer that says the same thing everywhere
predicts nothing).

Control: the same scorer, same windows, given another latent's explanation (a derangement:
no latent keeps its own). "Above chance" is then the gap to the control, measured, not
assumed: a scorer that rewards any fluent sentence scores the control just as well.
"""

import math
import re

import torch

# ---------------------------------------------------------------- arithmetic

def balanced_accuracy(y_true, y_pred) -> float:
    """(TPR + TNR) / 2 for 0/1 labels and predictions; ValueError without both classes."""
    y, yhat = torch.as_tensor(y_true).bool(), torch.as_tensor(y_pred).bool()  # (N,) each
    if y.shape != yhat.shape:
        raise ValueError(f"labels {tuple(y.shape)} and predictions {tuple(yhat.shape)} differ in shape")
    if y.all() or not y.any():
        raise ValueError("balanced accuracy needs both positive and negative examples")
    tpr = int((yhat & y).sum()) / int(y.sum())  # Python ints and floats: exact counts, float64
    tnr = int((~yhat & ~y).sum()) / int((~y).sum())
    return (tpr + tnr) / 2


def auroc(scores, y_true) -> float:
    """P(score of a random positive > score of a random negative), ties counting 1/2:
    the Mann-Whitney U statistic / (n_pos n_neg), from average ranks."""
    s, y = torch.as_tensor(scores, dtype=torch.float64), torch.as_tensor(y_true).bool()  # (N,)
    if y.all() or not y.any():
        raise ValueError("AUROC needs both positive and negative examples")
    order = s.argsort()
    ranks = torch.empty_like(s)
    ranks[order] = torch.arange(1, len(s) + 1, dtype=torch.float64)
    for v in s.unique():  # tied values share their average rank
        tie = s == v
        ranks[tie] = ranks[tie].mean()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def correlation(x, y) -> float:
    """Pearson's r of two equal-length sequences, in float64; NaN if either is constant."""
    x, y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)  # (N,)
    if x.shape != y.shape or x.ndim != 1 or len(x) < 2:
        raise ValueError(f"correlation needs two 1-d sequences of one length >= 2, got {tuple(x.shape)}, {tuple(y.shape)}")
    if x.max() == x.min() or y.max() == y.min():  # exactly constant (x - mean x may round to 1e-17, not 0)
        return math.nan
    dx, dy = x - x.mean(), y - y.mean()
    return float((dx * dy).sum() / (dx.square().sum() * dy.square().sum()).sqrt())


def derangement(n: int, seed: int = 0) -> list:
    """A seeded random permutation with no fixed point (n >= 2): perm[i] != i. Latent i's
    control explanation is latent perm[i]'s. Sattolo's algorithm: a uniformly random
    n-cycle, which has no fixed point by construction."""
    if n < 2:
        raise ValueError(f"a shuffled control needs at least 2 latents, got {n}")
    g = torch.Generator().manual_seed(seed)
    perm = list(range(n))
    for i in range(n - 1, 0, -1):
        j = int(torch.randint(0, i, (), generator=g))  # j < i: never i itself (Sattolo)
        perm[i], perm[j] = perm[j], perm[i]
    return perm


# ---------------------------------------------------------------- prompts

SYSTEM = "You check explanations of neurons in a language model. Answer with yes or no."


def detection_messages(explanation: str, text: str) -> list:
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Neuron explanation: {explanation}\n\nText: \"{text}\"\n\n"
                                        "Does the neuron fire on this text, according to the explanation? "
                                        "Answer yes or no."}]


def simulation_messages(explanation: str, tokens) -> tuple:
    """(messages, lines): one line per token, each to be completed with yes or no. The
    lines are not in the messages: LocalChat writes them into the assistant's turn (all at
    once), OpenAIChat appends them to the request for the endpoint to copy and answer."""
    lines = [f'"{t}":' for t in tokens]
    user = (f"Neuron explanation: {explanation}\n\nA text follows, one token per line. Copy each line and "
            "end it with yes if the neuron fires on that token, or no if it does not.")
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}], lines


# ---------------------------------------------------------------- the scorers

class TokenRule:
    """A scorer with no language model, for token-set explanations ('the tokens "a", "b"'):
    yes where the window contains (detection) or the line is (simulation) one of the quoted
    tokens. It reads the baseline literally, so it says what the token set predicts on
    held-out text with a perfect reader, separating the explanation from the scorer."""

    @staticmethod
    def _tokens(messages) -> set:
        first = messages[-1]["content"].split("\n")[0]  # "Neuron explanation: the tokens ..."
        return set(re.findall(r'"((?:[^"\\]|\\.)*)"', first))

    def yes_prob(self, conversations) -> list:
        out = []
        for m in conversations:
            text = m[-1]["content"].split('Text: "', 1)[1].rsplit('"', 1)[0]
            out.append(float(any(t.strip() and t in text for t in self._tokens(m))))
        return out

    def line_probs(self, items) -> list:
        return [[float(line[1:-2] in self._tokens(m)) for line in lines] for m, lines in items]


def detection_score(chat, explanation: str, texts, labels) -> dict:
    """Ask the scorer about each window text; labels 1 (fires) / 0 (silent)."""
    p = chat.yes_prob([detection_messages(explanation, t) for t in texts])  # [N]
    ok = [i for i, v in enumerate(p) if not math.isnan(v)]
    y, pk = [labels[i] for i in ok], [p[i] for i in ok]
    both = 0 < sum(y) < len(y)
    return {"balanced_accuracy": balanced_accuracy(y, [v > 0.5 for v in pk]) if both else math.nan,
            "auroc": auroc(pk, y) if both else math.nan, "p_yes": p, "n_unanswered": len(p) - len(ok)}


def simulation_score(chat, explanation: str, windows, acts) -> dict:
    """windows: per window its token strings; acts: per window the true activations."""
    sims = chat.line_probs([simulation_messages(explanation, w) for w in windows])  # [[p] per token]
    s = [v for sw in sims for v in sw]
    a = [float(v) for aw in acts for v in aw]
    ok = [i for i, v in enumerate(s) if not math.isnan(v)]
    r = correlation([s[i] for i in ok], [a[i] for i in ok]) if len(ok) >= 2 else math.nan
    return {"correlation": r, "simulated": sims, "n_unanswered": len(s) - len(ok)}


def score(chat, explanation: str, held_out: dict, methods=("detection", "simulation")) -> dict:
    """Both scores of one explanation on one latent's held-out windows: held_out has
    'texts', 'labels' (detection) and 'tokens', 'acts' (simulation), one entry per window."""
    out = {}
    if "detection" in methods:
        out["detection"] = detection_score(chat, explanation, held_out["texts"], held_out["labels"])
    if "simulation" in methods:
        out["simulation"] = simulation_score(chat, explanation, held_out["tokens"], held_out["acts"])
    return out


# ---------------------------------------------------------------- the cheap baseline: token overlap

def words(text: str) -> set:
    """Lower-cased words and single punctuation marks, quotes left out."""
    return set(re.findall(r"\w+|[^\w\s\"']", text.lower()))


def overlap_score(explanation: str, texts, labels) -> dict:
    """No language model: per window, the share of the explanation's words that occur in
    it, o(w) = |E & W| / |E|; gap = mean o over firing windows - mean o over silent ones,
    and the AUROC of o. It rewards an explanation that names the window's words."""
    e = words(explanation)
    o = [len(e & words(t)) / max(len(e), 1) for t in texts]
    pos, neg = [v for v, y in zip(o, labels) if y], [v for v, y in zip(o, labels) if not y]
    if not pos or not neg:
        return {"gap": math.nan, "auroc": math.nan, "overlap": o}
    return {"gap": sum(pos) / len(pos) - sum(neg) / len(neg), "auroc": auroc(o, labels), "overlap": o}
