"""The examples an explainer reads and a scorer is tested on, from one pass over held-out text.

For each latent i, from its codes f_i at every read position of the contexts (N, T):

    firing contexts   sorted by their peak max_t f_i, strongest first
    explainer sees    the n_explain//2 strongest + the rest evenly spaced over the lower
                      ranks (a few quantiles of activation strength, not just the top), each
                      a window of `window` tokens around its peak
    scorer sees       n_score other firing windows, evenly spaced over the ranks, and as
                      many silent windows (f_i = 0 on every token), drawn with the seed
"""

import torch

from minisae.interp.feature_page import token_text
from minisae.interp.features import LatentStats
from minisae.pipeline.activations import hook_acts  # (no gradients: hook_acts runs under no_grad)
from minisae.utils import Progress


def hook_activations(model, hook: str, contexts, bf16: bool = False, batch_size: int = 8):
    """Raw activations at `hook`, positions 1..T-1 of every context: (N, T-1, D). Kept in
    memory once and shared by every SAE at that hook (the model forward is the slow part)."""
    bar = Progress("activations", len(contexts), "contexts")
    out = []
    for s in range(0, len(contexts), batch_size):
        out.append(hook_acts(model, contexts[s:s + batch_size], hook, bf16))  # (B, T-1, D)
        bar.update(min(s + batch_size, len(contexts)))
    bar.close(len(contexts))
    return torch.cat(out)


def latent_codes(hsae, x, latents=(), chunk: int = 16):
    """(stats of every latent as features.scan gives them, codes of `latents` (N, T-1, L)):
    the SAE at the positions it reads (sinks: code 0, left out of the stats)."""
    stats, kept = LatentStats(hsae.n_latents, latents), []
    for s in range(0, len(x), chunk):
        with torch.no_grad():
            f, keep = hsae.encode_positions(x[s:s + chunk], bos=False)  # (B, T-1, F), (B, T-1)
        f, keep = f.cpu(), keep.cpu()  # the statistics are kept on the CPU
        stats.add(f[keep])
        kept.append(f[..., list(latents)])  # (B, T-1, L)
    return stats.result(), torch.cat(kept) if latents else None


def _spaced(items, n):
    """n items evenly spaced over the list (all of it if n >= len)."""
    if n >= len(items):
        return list(items)
    return [items[round(j * (len(items) - 1) / max(n - 1, 1))] for j in range(n)] if n > 1 else [items[0]]


def _window(contexts, a, c: int, start: int, width: int) -> dict:
    """Context c's window of token positions 1+start .. 1+start+width (position 0 is BOS)."""
    toks = contexts[c, 1 + start:1 + start + width].tolist()
    acts = a[c, start:start + width].tolist()
    peak = max(range(len(acts)), key=lambda j: (acts[j], -j))
    return {"context": c, "start": start, "tokens": toks, "acts": acts, "center": peak, "value": acts[peak]}


def split_examples(contexts, a, n_explain: int, n_score: int, window: int, after: int, seed: int = 0):
    """Latent examples from its codes a (N, T-1) on contexts (N, T): (explainer windows,
    scorer windows with labels) as described in the module docstring; None if the latent
    fires in fewer than 2 contexts or nowhere stays silent for a whole window (nothing to score)."""
    T1 = a.shape[1]
    width = min(window, T1)
    peak, where = a.max(1)  # (N,), (N,)
    firing = sorted((c for c in range(len(a)) if peak[c] > 0), key=lambda c: (-peak[c].item(), c))
    if len(firing) < 2:
        return None
    n_top = min(max(n_explain // 2, 1), len(firing) - 1)
    rest = firing[n_top:]
    shown = firing[:n_top] + _spaced(rest[::2], n_explain - n_top)  # every other rank: the rest is for scoring
    pos = _spaced([c for c in rest if c not in set(shown)], n_score)
    if not pos:
        return None
    start = lambda c: min(max(int(where[c]) - (width - 1 - after), 0), T1 - width)
    explain = [_window(contexts, a, c, start(c), width) for c in shown]
    # silent windows: non-overlapping chunks with f_i = 0 on every token, in contexts not already used
    taken = set(shown) | set(pos)
    silent = [(c, s) for c in range(len(a)) if c not in taken for s in range(0, T1 - width + 1, width)
              if a[c, s:s + width].max() <= 0]
    g = torch.Generator().manual_seed(seed)
    n = min(len(pos), len(silent))  # balanced classes: a dense latent may have few silent chunks
    if n == 0:
        return None
    neg = [silent[j] for j in torch.randperm(len(silent), generator=g)[:n].tolist()]
    held = [_window(contexts, a, c, start(c), width) for c in pos[:n]] + [_window(contexts, a, c, s, width) for c, s in neg]
    return explain, held, [1] * n + [0] * n


def held_out_for_scoring(held, labels, tokenizer) -> dict:
    return {"texts": [tokenizer.decode(w["tokens"]) for w in held], "labels": labels,
            "tokens": [[token_text(tokenizer, t) for t in w["tokens"]] for w in held],
            "acts": [w["acts"] for w in held]}


def contrast_windows(contexts, a, explain, held, n: int, window: int, seed: int = 0) -> list:
    """n silent windows (f_i = 0 on every token) for a contrastive explainer prompt, from
    contexts that neither the explainer's nor the scorer's windows come from, drawn with
    the seed: what the latent ignores, next to what it fires on."""
    width = min(window, a.shape[1])
    taken = {w["context"] for w in list(explain) + list(held)}
    silent = [(c, s) for c in range(len(a)) if c not in taken for s in range(0, a.shape[1] - width + 1, width)
              if a[c, s:s + width].max() <= 0]
    g = torch.Generator().manual_seed(seed)
    return [_window(contexts, a, c, s, width) for c, s in
            (silent[j] for j in torch.randperm(len(silent), generator=g)[:n].tolist())]
