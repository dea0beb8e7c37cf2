"""The logit lens of a latent: which tokens its direction promotes or suppresses.

(Bricken et al. 2023 feature pages; nostalgebraist 2020.) Latent i's direction
d = W_dec[i] / ||W_dec[i]|| reaches the unembedding directly through the final norm,
LayerNorm (GPT-2) or RMSNorm (Llama):

    LN(x) = g * (x - mean(x)) / sigma(x) + b        RMS(x) = g * x / rms(x)

Freezing the per-token scale sigma (or rms), adding d changes the logits by

    lens(d) = W_U (g * c(d)) / sigma     c = centring for LayerNorm, identity for RMSNorm

which is linear in d. 1/sigma is one positive number per token: it scales every logit
alike and leaves the ranking unchanged, so we report W_U (g * c(d)). Keeping the gain g
and the centring makes this the exact first-order direct effect; ignoring the later
layers is the lens's approximation (exact at the last layer's resid_post).
"""

import torch
import torch.nn as nn


def final_norm_and_unembedding(model):
    """(final norm module, W_U (V, D)). GPT-2 (ln_f) and Llama (norm) tie W_U to the token
    embedding (wte / embed_tokens); a separate lm_head Linear is used when there is one."""
    norm = getattr(model, "ln_f", None) or getattr(model, "norm", None)
    head = getattr(model, "lm_head", None)
    W_U = head.weight if isinstance(head, nn.Linear) else \
        getattr(getattr(model, "wte", None) or getattr(model, "embed_tokens", None), "weight", None)
    if norm is None or W_U is None:
        raise ValueError(f"cannot find the final norm and unembedding of {type(model).__name__}")
    return norm, W_U


@torch.no_grad()
def logit_lens(model, direction):
    """lens(d) = W_U (g * c(d)) for the unit direction d (D,): (V,). See the module docstring."""
    norm, W_U = final_norm_and_unembedding(model)
    d = direction.float() / direction.float().norm()  # (D,)
    if isinstance(norm, nn.LayerNorm):
        d = d - d.mean()  # LayerNorm subtracts the mean: a linear step, kept
    return W_U.float() @ (norm.weight.float() * d)  # (V,)


def lens_tokens(model, tokenizer, direction, n: int = 10) -> dict:
    """{'promoted': [(token, value)], 'suppressed': [...]}: the n largest and smallest."""
    lens = logit_lens(model, direction)  # (V,)
    up, down = lens.topk(n), (-lens).topk(n)
    show = lambda vals, ids: [(tokenizer.decode([t]), v) for v, t in zip(vals.tolist(), ids.tolist())]
    return {"promoted": show(up.values, up.indices), "suppressed": show(-down.values, down.indices)}
