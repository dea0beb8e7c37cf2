"""What the explainer is asked: the windows written out with their activating tokens marked,
the system prompt, and the cleaning of its answer; and the token-set baseline, an
explanation written by a fixed rule with no language model.
"""

import re
from collections import Counter

from minisae.interp.feature_page import token_text

STOP = ("\n", ". ")  # the explanation is one sentence: generation ends with it


EXPLAINER_SYSTEM = "You explain what a neuron in a language model detects, in one short sentence."


def format_window(tokenizer, w: dict, peak: float) -> str:
    """The window's text with every token where the latent fires as <<token>>, then the
    activations on a 0-10 scale (10 = the latent's largest among the shown examples)."""
    parts, acts = [], []
    for t, v in zip(w["tokens"], w["acts"]):
        s = token_text(tokenizer, t)
        if v > 0:
            parts.append(f"<<{s}>>")
            acts.append(f'"{s.strip() or s}" {max(1, round(10 * v / peak))}')
        else:
            parts.append(s)
    return "".join(parts) + "\n   (activations: " + ", ".join(acts) + ")"


STYLES = ("plain", "unmarked", "contrastive", "fewshot")

# fewshot: one worked example before the real question, in the same format (made-up text)
FEWSHOT_USER = ("Here are text excerpts where one neuron fires. The tokens where it fires are marked <<like this>>, "
                "and after each excerpt their activation strength from 1 to 10.\n\n"
                '1. It costs ten dollars<< per>> month\n   (activations: "per" 10)\n'
                '2. we drove 60 miles<< per>> hour\n   (activations: "per" 7)\n'
                '3. three times<< a>> day\n   (activations: "a" 3)\n\n'
                "In one short sentence, what does this neuron detect?")
FEWSHOT_ANSWER = 'The word "per" or "a" in a rate, after an amount.'


def explainer_messages(tokenizer, examples, lens=None, style: str = "plain", contrast=()) -> list:
    """The explainer's conversation for one latent: its windows in the given order
    (strongest first), numbered, and optionally the logit-lens tokens. style: plain (the
    firing tokens marked, with their strengths), unmarked (the windows' text only),
    contrastive (plus `contrast`, windows where it is silent), fewshot (plus a worked example)."""
    if style not in STYLES:
        raise ValueError(f"the explainer style must be one of {', '.join(STYLES)}, got {style!r}")
    if style == "unmarked":
        body = "\n".join(f"{j + 1}. {tokenizer.decode(w['tokens'])}" for j, w in enumerate(examples))
        user = "Here are text excerpts where one neuron fires.\n\n" + body
    else:
        peak = max(max(w["acts"]) for w in examples)
        body = "\n".join(f"{j + 1}. {format_window(tokenizer, w, peak)}" for j, w in enumerate(examples))
        user = ("Here are text excerpts where one neuron fires. The tokens where it fires are marked <<like this>>, "
                "and after each excerpt their activation strength from 1 to 10.\n\n" + body)
    if style == "contrastive" and contrast:
        user += "\n\nExcerpts where it does NOT fire:\n" + "\n".join(
            f"- {tokenizer.decode(w['tokens'])}" for w in contrast)
    if lens:
        user += "\n\nTokens the neuron makes more likely next: " + ", ".join(f'"{t.strip()}"' for t, _ in lens)
    user += "\n\nIn one short sentence, what does this neuron detect?"
    shots = [{"role": "user", "content": FEWSHOT_USER}, {"role": "assistant", "content": FEWSHOT_ANSWER}] \
        if style == "fewshot" else []
    return [{"role": "system", "content": EXPLAINER_SYSTEM}, *shots, {"role": "user", "content": user}]


def clean_explanation(text: str) -> str:
    """The first sentence of the reply, at most 200 characters."""
    text = " ".join(text.split())
    m = re.match(r"(.+?[.!?])(\s|$)", text)
    return (m[1] if m else text)[:200] or "(no explanation)"


def token_set_explanation(tokenizer, examples, n: int = 5) -> str:
    """The baseline explainer, no language model: the n tokens that most often carry the
    latent in its examples (ties: larger total activation, then smaller token id)."""
    count, total = Counter(), Counter()
    for w in examples:
        for t, v in zip(w["tokens"], w["acts"]):
            if v > 0:
                count[t] += 1
                total[t] += v
    top = sorted(count, key=lambda t: (-count[t], -total[t], t))[:n]
    return "the tokens " + ", ".join(f'"{token_text(tokenizer, t)}"' for t in top)
