"""Surprisal scoring: does the explanation, read as context, make the latent's text more likely?

A scorer that needs no instruction following, only next-token log-probabilities, which a
135M model gives far better than it answers yes/no (EleutherAI delphi's surprisal scorer,
after Paulo et al. 2024). For a window w of tokens w_1..w_n and a prefix P,

    lp(w | P)   = (1/n) sum_t log p(w_t | P, w_<t)          nats per token
    gain(w)     = lp(w | P(explanation)) - lp(w | P(neutral))

where P(e) = "...The neuron fires on: {e}\\nExcerpts:\\n" and the neutral explanation is
delphi's "Various unrelated sentences." The neutral prefix removes what makes a window
easy or hard to predict on its own; what is left is what the explanation adds. An
explanation of latent i should raise the likelihood of the windows where i fires more
than of the windows where it is silent:

    gap   = mean_{w fires} gain(w) - mean_{w silent} gain(w)     (0 = the explanation is no help)
    AUROC = P(gain of a firing window > gain of a silent one)     (0.5 = chance)

Per latent, gap is the score; the shuffled control (another latent's explanation on the
same windows) is what it must beat (minisae.autointerp.stats).
"""

import math

from minisae.autointerp.scoring import auroc

PREFIX = ("Below are short text excerpts on which one neuron of a language model fires.\n"
          "The neuron fires on: {}\nExcerpts:\n")
NEUTRAL = "Various unrelated sentences."  # delphi's explanation-free prompt


def prefix(explanation: str) -> str:
    return PREFIX.format(" ".join(explanation.split()))


def mean_logprobs(chat, explanation: str, texts) -> list:
    """Per window text, its mean next-token log-probability after prefix(explanation)."""
    return [sum(lp) / len(lp) for lp in chat.text_logprobs(prefix(explanation), texts)]


def surprisal_score(chat, explanation: str, texts, labels, neutral=None) -> dict:
    """gap and AUROC of the gains of one explanation on one latent's windows (labels 1 / 0).
    neutral: the windows' mean_logprobs under NEUTRAL, if already computed (they do not
    depend on the explanation, so a latent's several explanations share them)."""
    base = neutral if neutral is not None else mean_logprobs(chat, NEUTRAL, texts)
    gains = [a - b for a, b in zip(mean_logprobs(chat, explanation, texts), base)]
    pos = [g for g, y in zip(gains, labels) if y]
    neg = [g for g, y in zip(gains, labels) if not y]
    if not pos or not neg:
        return {"gap": math.nan, "auroc": math.nan, "gains": gains}
    return {"gap": sum(pos) / len(pos) - sum(neg) / len(neg), "auroc": auroc(gains, labels), "gains": gains}
