"""Intruder detection: which of these windows does not belong? No explanation at all.

The scorer sees k windows of text: k - 1 where the latent fires and one where it is silent
(the intruder), in a seeded order, and answers with the intruder's number (after delphi's
intruder scorer, which takes its intruders from other latents; a silent window of the same
text is the easier, cleaner version for a small model). We read the answer's probability
instead of sampling it:

    q_j       = P(answer j) / sum_m P(answer m)      j = 1..k, the first answer token
    p_correct = q_{intruder}                          chance: 1/k

It measures whether the latent's firing windows have something in common that a reader
can see, before anyone explains it, so it scores the latent (and the reader), not an
explanation. Per latent p_correct is the score; 1/k is its control.
"""

import torch

SYSTEM = "You find the odd one out. Answer with a number only."


def intruder_messages(texts) -> list:
    body = "\n".join(f"{j + 1}. \"{' '.join(t.split())}\"" for j, t in enumerate(texts))
    user = (f"Here are {len(texts)} text excerpts. All but one share something: a word, a kind of word or a "
            f"topic. One does not.\n\n{body}\n\nWhich excerpt is the odd one out? Answer with its number.")
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def intruder_order(k: int, seed: int) -> list:
    """A seeded order of k windows: index k - 1 (the intruder) lands anywhere."""
    return torch.randperm(k, generator=torch.Generator().manual_seed(seed)).tolist()


def intruder_score(chat, firing, silent: str, seed: int = 0) -> dict:
    """firing: the texts of k - 1 firing windows; silent: one silent window's text."""
    texts = list(firing) + [silent]
    order = intruder_order(len(texts), seed)
    shown = [texts[j] for j in order]
    q = chat.option_probs([intruder_messages(shown)], [str(j + 1) for j in range(len(shown))])[0]  # (k,)
    where = order.index(len(texts) - 1)  # the intruder's place in what was shown
    return {"p_correct": q[where], "correct": float(max(range(len(q)), key=lambda j: (q[j], -j)) == where),
            "chance": 1 / len(texts), "q": q}
