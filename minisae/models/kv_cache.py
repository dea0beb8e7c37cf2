"""A key/value cache for minisae's Llama: the fast path of minisae.autointerp.chat (the plain path is
Llama.forward, which re-runs every position; tests/autointerp/test_chat.py checks the two agree).

Causal attention never lets a position see later ones, so the keys and values of a prefix
do not change when tokens are appended. Keep them per layer and run only the new tokens:

    q_new = RoPE(W_q x_new, positions P..P+S-1)                          (B, H, S, hd)
    k_all = [k_prefix ; RoPE(W_k x_new, P..P+S-1)],  v_all likewise       (B, Hkv, P+S, hd)
    y     = softmax(q_new k_all^T / sqrt(hd) + mask) v_all                new token s sees
                                                                          all P + its own s' <= s

Two uses: generation (append one token at a time: each step costs one position, not the
whole sequence) and a prefix shared by a batch (the system prompt and the explanation,
run once, then every window appended; the prefix's cache has batch 1 and broadcasts).
Right padding in the batch is harmless for the same causal reason.

Hooks (minisae.models.hooks) run at every hook point as in the plain forward, on the new
positions only: a hook that acts position by position (steering adds a vector to each
position) gives the plain forward's result when each step's new positions pass it.
GPT-2 is the same with learned positions (wpe at P..P+S-1) in place of RoPE.
"""

import torch
import torch.nn.functional as F

from minisae.models.gpt2 import GPT2
from minisae.models.hooks import check_hook_names, hook_name, run_hook
from minisae.models.llama import rotary_cos_sin


def _attend(attn, x, cos, sin, past):
    """One attention layer on new positions x (B, S, D) after the cached (k, v) of P positions."""
    B, S, _ = x.shape
    if cos is None:  # GPT-2: one c_attn for q, k, v; every head is a kv head
        q, k, v = (t.view(B, S, attn.n_head, -1).transpose(1, 2) for t in attn.c_attn(x).split(x.shape[2], dim=2))
        rep, out = 1, attn.c_proj  # (B, H, S, hd) each
    else:
        q, k, v = attn.qkv(x, cos, sin)  # (B, H, S, hd), (B, Hkv, S, hd) x 2: the plain forward's projections
        rep, out = attn.n_head // attn.n_kv_head, attn.o_proj
    if past is not None:
        pk, pv = past
        k = torch.cat([pk.expand(B, -1, -1, -1).to(k.dtype), k], dim=2)  # (B, Hkv, P+S, hd)
        v = torch.cat([pv.expand(B, -1, -1, -1).to(v.dtype), v], dim=2)
    P = k.shape[2] - S
    mask = torch.ones(S, P + S, dtype=torch.bool, device=x.device).tril(P)  # (S, P+S): prefix + causal
    y = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                       attn_mask=mask)                        # (B, H, S, hd)
    return out(y.transpose(1, 2).reshape(B, S, -1)), (k, v)


@torch.no_grad()
def forward_cached(model, idx, cache=None, hooks=None):
    """(final residual stream of the new tokens (B, S, D), the cache extended by them).
    idx (B, S) new token ids; cache: None or a list of per-layer (k, v) for P earlier positions;
    hooks: as the model's forward takes them, run on the new positions (B, S, D).
    Logits: model.unembed(resid[..., positions, :]), only where they are needed."""
    B, S = idx.shape
    P = 0 if cache is None else cache[0][0].shape[2]
    if P + S > model.n_ctx:
        raise ValueError(f"{P} cached + {S} new positions exceed the context of {model.n_ctx}")
    check_hook_names(list(hooks or {}), model.hook_names())
    if isinstance(model, GPT2):
        cos = sin = None
        x = model.wte(idx) + model.wpe(torch.arange(P, P + S, device=idx.device))  # (B, S, D)
        blocks = [(b.ln_1, b.attn, b.ln_2, b.mlp) for b in model.h]
    else:
        cos, sin = rotary_cos_sin(P + S, model.cfg.head_dim, model.cfg.rope_base, idx.device)
        cos, sin = cos[P:], sin[P:]  # (S, hd): the new tokens sit at positions P..P+S-1
        x = model.embed_tokens(idx)  # (B, S, D)
        blocks = [(b.input_layernorm, b.self_attn, b.post_attention_layernorm, b.mlp) for b in model.layers]
    new_cache = []
    for L, (norm1, attn, norm2, mlp) in enumerate(blocks):
        x = run_hook(hook_name(L, "resid_pre"), x, hooks, None)
        a, kv = _attend(attn, norm1(x), cos, sin, None if cache is None else cache[L])
        a = run_hook(hook_name(L, "attn_out"), a, hooks, None)  # (B, S, D)
        x = run_hook(hook_name(L, "resid_mid"), x + a, hooks, None)
        n = run_hook(hook_name(L, "mlp_in"), norm2.normalize(x), hooks, None)  # (B, S, D): before norm2's weight
        m = run_hook(hook_name(L, "mlp_out"), mlp(norm2.affine(n)), hooks, None)  # (B, S, D)
        x = run_hook(hook_name(L, "resid_post"), x + m, hooks, None)
        new_cache.append(kv)
    return x, new_cache
