"""Llama (Touvron et al. 2023), written out with hook points. Its weights and tokenizer come
from a GGUF file: minisae/models/llama_gguf.py.

One block, for the residual stream x (B, T, D):

    a = Attn(RMSNorm(x))                 grouped-query causal attention with rotary positions
    x = x + a
    m = W_down (SiLU(W_gate n) * W_up n),  n = RMSNorm(x)      (SwiGLU, Shazeer 2020;
                                                   x / rms(x) is the mlp_in hook)
    x = x + m

    RMSNorm(x) = w * x / sqrt(mean(x^2) + eps)          (Zhang & Sennrich 2019; no mean, no bias)
    logits     = RMSNorm_final(x) @ W_E^T                (embeddings tied: unembedding = W_E)

Rotary embeddings (RoPE, Su et al. 2021) rotate each query and key before the dot product,
by an angle proportional to the position t, so q_s . k_t depends only on s - t. With
head dimension hd, dimension i (i < hd/2) is paired with i + hd/2 (`rotate_half`, the
Hugging Face layout) and the pair is rotated by t * base^(-2i/hd).

Grouped-query attention (Ainslie et al. 2023): n_head query heads share n_kv_head key/value
heads; query head h reads kv head h // (n_head // n_kv_head). SmolLM2-135M: 9 and 3.

Module and parameter names are those of Hugging Face `LlamaModel` (q_proj, gate_proj,
input_layernorm, ...), so our state_dict loads into `transformers` unchanged; GGUF_NAMES
maps them to the GGUF tensor names (attn_q, ffn_gate, attn_norm, ...).
Extra shape letters here: H query heads, Hkv key/value heads, hd head dimension, M MLP width.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from minisae.models.hooks import StopForward, all_hook_names, check_hook_names, hook_name, run_hook
from minisae.models.linear import Linear, linear


@dataclass
class LlamaConfig:
    n_layer: int = 30             # llama.block_count
    d_model: int = 576            # llama.embedding_length
    d_mlp: int = 1536             # llama.feed_forward_length
    n_head: int = 9               # llama.attention.head_count
    n_kv_head: int = 3            # llama.attention.head_count_kv
    vocab_size: int = 49152       # llama.vocab_size (else the length of the token list)
    n_ctx: int = 8192             # llama.context_length: the longest context trained on
    rope_base: float = 100000.0   # llama.rope.freq_base
    norm_eps: float = 1e-5        # llama.attention.layer_norm_rms_epsilon

    def __post_init__(self):
        # sane ranges first, so that a corrupt value is named instead of dividing by zero
        # below or hanging while a million blocks are built
        for field, limit in LIMITS.items():
            v = getattr(self, field)
            if not _is_int(v) or not 1 <= v <= limit:
                raise ValueError(f"{field} ({GGUF_KEYS[field]}) = {v!r:.50}: expected an integer in 1..{limit}")
        if not _is_number(self.rope_base) or not 1 < self.rope_base <= MAX_ROPE_BASE:
            raise ValueError(f"rope_base ({GGUF_KEYS['rope_base']}) = {self.rope_base!r:.50}: expected a number "
                             f"in (1, {MAX_ROPE_BASE:g}]")
        if not _is_number(self.norm_eps) or not 0 < self.norm_eps < 1:
            raise ValueError(f"norm_eps ({GGUF_KEYS['norm_eps']}) = {self.norm_eps!r:.50}: expected a number in (0, 1)")
        if self.d_model % self.n_head or self.n_head % self.n_kv_head or (self.d_model // self.n_head) % 2:
            raise ValueError(f"d_model {self.d_model} must divide into n_head {self.n_head} heads of even "
                             f"size (RoPE turns pairs) and n_head into n_kv_head {self.n_kv_head} groups")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @classmethod
    def from_gguf(cls, metadata: dict, source: str = "GGUF metadata") -> "LlamaConfig":
        """The config a GGUF file's metadata states; `source` (the file) starts every error.
        Types and ranges are checked here; llama_gguf_tensor_shapes checks the values
        against the tensors the file holds."""
        arch = metadata.get("general.architecture")
        if arch != "llama":
            raise ValueError(f"{source}: general.architecture is {arch!r:.50}; this model reads only 'llama' GGUF files")
        missing = [key for field, key in GGUF_KEYS.items() if field != "vocab_size" and key not in metadata]
        if missing:
            raise ValueError(f"{source}: metadata lacks {missing}")
        values = {field: metadata[key] for field, key in GGUF_KEYS.items() if key in metadata}
        if "vocab_size" not in values:  # optional key: else the length of the token list
            tokens = metadata.get("tokenizer.ggml.tokens")
            if not isinstance(tokens, list):
                raise ValueError(f"{source}: metadata has neither llama.vocab_size nor a tokenizer.ggml.tokens list")
            values["vocab_size"] = len(tokens)
        try:
            cfg = cls(**values)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None
        for key in ("llama.rope.dimension_count", "llama.attention.key_length", "llama.attention.value_length"):
            if metadata.get(key, cfg.head_dim) != cfg.head_dim:
                raise ValueError(f"{source}: {key} = {metadata[key]!r:.50} differs from the head dimension "
                                 f"{cfg.head_dim} (partial rotary or a separate head size is not supported)")
        return cfg


# LlamaConfig field -> GGUF metadata key
GGUF_KEYS = dict(n_layer="llama.block_count", d_model="llama.embedding_length", d_mlp="llama.feed_forward_length",
                 n_head="llama.attention.head_count", n_kv_head="llama.attention.head_count_kv",
                 vocab_size="llama.vocab_size", n_ctx="llama.context_length", rope_base="llama.rope.freq_base",
                 norm_eps="llama.attention.layer_norm_rms_epsilon")
# Upper bounds far above any released Llama (3.1 405B: 126 layers, d_model 16384, MLP 53248,
# 128 heads, 128k vocab and context) and far below what would hang building the modules.
LIMITS = dict(n_layer=1024, d_model=1 << 16, d_mlp=1 << 20, n_head=1024, n_kv_head=1024,
              vocab_size=1 << 24, n_ctx=1 << 24)
MAX_ROPE_BASE = 1e12  # Llama 3: 5e5; long-context variants: up to ~1e8


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def normalize(self, x):
        """x / rms(x), before the weight: the mlp_in hook point (models/hooks.py)."""
        # in float32 even under bf16 autocast, as HF LlamaRMSNorm does: mean(x^2) is a long sum
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    def affine(self, n):
        return self.weight * n

    def forward(self, x):
        return self.affine(self.normalize(x))


def rotary_cos_sin(T: int, head_dim: int, base: float, device=None):
    """cos and sin of the rotation angle t * base^(-2i/hd), each (T, hd) in the half-split layout."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)  # (hd/2,)
    angles = torch.arange(T, device=device).float()[:, None] * inv_freq[None, :]              # (T, hd/2)
    angles = torch.cat([angles, angles], dim=-1)   # (T, hd): dims i and i + hd/2 share an angle
    return angles.cos(), angles.sin()


def rotate_half(x):
    """(x1, x2) -> (-x2, x1) on the two halves of the last axis: a 90 degree turn of each pair."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def unpermute_qk(w, n_head: int):
    """Undo llama.cpp's `permute` (convert_hf_to_gguf.py) of a q or k weight (n_head*hd, D).

    llama.cpp rotates adjacent pairs (2j, 2j+1) of a head ("interleaved" RoPE), so its
    converter reorders each head's output rows from [0..hd/2 | hd/2..hd] to
    [0, hd/2, 1, hd/2+1, ...]. Putting the rows back lets us use the Hugging Face
    `rotate_half` pairing and keeps our weights identical to HF LlamaForCausalLM's.
    Rotating the raw GGUF rows with rotate_half instead mixes the wrong dimensions: the
    model still answers "Paris", but its loss rises from ~1.9 to ~3.2 nats/token on simple
    English sentences (and from 3.21 to 5.66 on the pydoc text of tests/models/test_llama.py)."""
    out, d = w.shape
    return w.reshape(n_head, out // n_head // 2, 2, d).transpose(1, 2).reshape(out, d)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.q_proj = Linear(cfg.d_model, cfg.n_head * cfg.head_dim, bias=False)
        self.k_proj = Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.v_proj = Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.o_proj = Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=False)

    def qkv(self, x, cos, sin):
        """Queries, keys and values of x (B, T, D), RoPE applied to q and k (cos, sin: (T, hd))."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)     # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin, v

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q, k, v = self.qkv(x, cos, sin)                                              # (B, H|Hkv, T, hd)
        # each kv head serves n_head // n_kv_head consecutive query heads
        k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)                 # (B, H, T, hd)
        v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)                 # (B, H, T, hd)
        # softmax(q k^T / sqrt(hd) + causal mask) v
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)                   # (B, H, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))                       # (B, T, D)


class LlamaMLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = Linear(cfg.d_model, cfg.d_mlp, bias=False)
        self.up_proj = Linear(cfg.d_model, cfg.d_mlp, bias=False)
        self.down_proj = Linear(cfg.d_mlp, cfg.d_model, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # (B, T, M) -> (B, T, D)


class LlamaBlock(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = LlamaAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = LlamaMLP(cfg)


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.n_layer, self.d_model, self.vocab_size, self.n_ctx = cfg.n_layer, cfg.d_model, cfg.vocab_size, cfg.n_ctx
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(LlamaBlock(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)

    def hook_names(self) -> list:
        return all_hook_names(self.n_layer)

    def unembed(self, resid):
        """Final RMSNorm, then the tied unembedding W_E^T: (B, T, D) -> (B, T, V)."""
        return linear(self.norm(resid), self.embed_tokens.weight)

    def forward(self, idx, hooks=None, stop_at=None):
        """idx (B, T) token ids -> logits (B, T, V); with stop_at, the activation there (B, T, D)."""
        if not isinstance(idx, torch.Tensor) or idx.ndim != 2 or idx.dtype not in (torch.long, torch.int):
            raise ValueError(f"idx must be an integer tensor of shape (B, T), got {getattr(idx, 'shape', type(idx))}")
        B, T = idx.shape
        if not 0 < T <= self.n_ctx:
            raise ValueError(f"sequence length {T} outside 1..{self.n_ctx} (the model's context length)")
        if idx.numel() and (idx.min() < 0 or idx.max() >= self.vocab_size):
            raise ValueError(f"token ids must lie in 0..{self.vocab_size - 1}")
        check_hook_names(list(hooks or {}) + ([stop_at] if stop_at is not None else []), self.hook_names())

        cos, sin = rotary_cos_sin(T, self.cfg.head_dim, self.cfg.rope_base, idx.device)  # (T, hd) each
        x = self.embed_tokens(idx)                                                        # (B, T, D)
        try:
            for L, block in enumerate(self.layers):
                x = run_hook(hook_name(L, "resid_pre"), x, hooks, stop_at)
                a = run_hook(hook_name(L, "attn_out"), block.self_attn(block.input_layernorm(x), cos, sin),
                             hooks, stop_at)                                              # (B, T, D)
                x = run_hook(hook_name(L, "resid_mid"), x + a, hooks, stop_at)
                norm = block.post_attention_layernorm
                n = run_hook(hook_name(L, "mlp_in"), norm.normalize(x), hooks, stop_at)   # (B, T, D): x / rms(x)
                m = run_hook(hook_name(L, "mlp_out"), block.mlp(norm.affine(n)), hooks, stop_at)  # (B, T, D)
                x = run_hook(hook_name(L, "resid_post"), x + m, hooks, stop_at)
        except StopForward as stop:
            return stop.act
        return self.unembed(x)                                                            # (B, T, V)
