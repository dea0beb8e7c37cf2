"""GPT-2 (Radford et al. 2019) with hook points, loading Hugging Face safetensors weights.

Per block L (pre-LayerNorm residual network, GPT-2 paper section 2.3):

    resid_pre  = x                                            blocks.L.hook_resid_pre
    attn_out   = c_proj(softmax(causal(q k^T / sqrt(d_head))) v),
                 q, k, v = split(c_attn(ln_1(resid_pre)))     blocks.L.hook_attn_out
    resid_mid  = resid_pre + attn_out                         blocks.L.hook_resid_mid
    mlp_in     = (resid_mid - mean) / std                     blocks.L.ln2.hook_normalized
    mlp_out    = c_proj(gelu(c_fc(w_2 * mlp_in + b_2)))       blocks.L.hook_mlp_out
    resid_post = resid_mid + mlp_out                          blocks.L.hook_resid_post

with x = wte[idx] + wpe[pos] entering block 0 and logits = ln_f(x) @ wte^T after the
last block (the unembedding is tied to the token embedding); ln_2(x) = w_2 * mlp_in + b_2. Module names are the
checkpoint keys (`h.0.attn.c_attn`, `ln_f`, ...) so loading is a name-for-name copy.
There is no dropout: this model is for reading activations, not for training.

Speed: collecting activations in bfloat16 autocast is ~2-3x faster on CPUs with bf16
units (benchmarks/lm_forward.py measures it); the activations then come back in bf16:

    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        acts = model(idx, stop_at="blocks.6.hook_resid_pre").float()   # (B, T, D)
"""

import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from minisae.models.bpe import BPETokenizer
from minisae.models.hooks import SITES, StopForward, all_hook_names, check_hook_names, hook_name, run_hook
from minisae.models.http import HTTPFailure
from minisae.models.linear import Linear, linear
from minisae.models.hub import HF, cached_path
from minisae.models.safetensors import load_safetensors, read_header


@dataclass
class GPT2Config:
    n_layer: int = 12                 # transformer blocks
    n_head: int = 12                  # attention heads; d_head = d_model / n_head
    d_model: int = 768                # residual stream width (HF: n_embd)
    n_ctx: int = 1024                 # positions (HF: n_positions)
    vocab_size: int = 50257           # GPT-2's BPE vocab, incl. <|endoftext|> = 50256
    layer_norm_epsilon: float = 1e-5  # as in the HF config
    seed: int = 0                     # random init (used by gpt2-random only)


CONFIGS = {
    "gpt2": GPT2Config(n_layer=12, n_head=12, d_model=768),
    "gpt2-medium": GPT2Config(n_layer=24, n_head=16, d_model=1024),
    "gpt2-large": GPT2Config(n_layer=36, n_head=20, d_model=1280),
    "gpt2-xl": GPT2Config(n_layer=48, n_head=25, d_model=1600),
    # tiny random model with the real vocab: exercises the whole pipeline with no download
    "gpt2-random": GPT2Config(n_layer=4, n_head=4, d_model=64),
}


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (the same parameters, weight and bias), split in two for the mlp_in hook:
    normalize(x) = (x - mean x) / sqrt(var x + eps), affine(n) = weight * n + bias."""

    def normalize(self, x):
        return F.layer_norm(x, self.normalized_shape, eps=self.eps)

    def affine(self, n):
        return n * self.weight + self.bias


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = Linear(cfg.d_model, 3 * cfg.d_model)  # q, k, v for all heads at once
        self.c_proj = Linear(cfg.d_model, cfg.d_model)

    def forward(self, x):  # x (B, T, D)
        B, T, D = x.shape
        q, k, v = self.c_attn(x).split(D, dim=2)  # each (B, T, D)
        q, k, v = (t.view(B, T, self.n_head, D // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D/H)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, D/H), scale 1/sqrt(D/H)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, D))  # (B, T, D)


class MLP(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.c_fc = Linear(cfg.d_model, 4 * cfg.d_model)
        self.c_proj = Linear(4 * cfg.d_model, cfg.d_model)

    def forward(self, x):  # x (B, T, D)
        # GPT-2 uses the tanh approximation of GELU (HF "gelu_new"), not the exact erf form
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))  # (B, T, D)


class Block(nn.Module):
    def __init__(self, cfg: GPT2Config, layer: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_epsilon)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = LayerNorm(cfg.d_model, eps=cfg.layer_norm_epsilon)
        self.mlp = MLP(cfg)
        self.names = [hook_name(layer, site) for site in SITES]

    def forward(self, x, hooks=None, stop_at=None):  # x (B, T, D)
        pre, attn, mid, mlp_in, mlp, post = self.names
        x = run_hook(pre, x, hooks, stop_at)
        attn_out = run_hook(attn, self.attn(self.ln_1(x)), hooks, stop_at)
        x = run_hook(mid, x + attn_out, hooks, stop_at)
        n = run_hook(mlp_in, self.ln_2.normalize(x), hooks, stop_at)  # (B, T, D): before ln_2's weight and bias
        mlp_out = run_hook(mlp, self.mlp(self.ln_2.affine(n)), hooks, stop_at)
        return run_hook(post, x + mlp_out, hooks, stop_at)  # (B, T, D)


class GPT2(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.config = cfg
        self.n_layer, self.d_model, self.vocab_size, self.n_ctx = cfg.n_layer, cfg.d_model, cfg.vocab_size, cfg.n_ctx
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)  # also the unembedding (tied)
        self.wpe = nn.Embedding(cfg.n_ctx, cfg.d_model)
        self.h = nn.ModuleList(Block(cfg, layer) for layer in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_epsilon)
        self._hook_names = all_hook_names(cfg.n_layer)
        self.init_weights_(cfg.seed)

    @torch.no_grad()
    def init_weights_(self, seed: int):
        """GPT-2 init: N(0, 0.02) weights, zero biases, and residual projections (c_proj)
        scaled by 1/sqrt(2 n_layer) (GPT-2 paper section 2.3), from a seeded generator."""
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif ".ln_" in name or name.startswith("ln_"):
                p.fill_(1.0)
            else:
                std = 0.02 / math.sqrt(2 * self.n_layer) if name.endswith("c_proj.weight") else 0.02
                p.normal_(0.0, std, generator=g)

    def hook_names(self) -> list:
        return list(self._hook_names)

    def unembed(self, resid):  # resid (B, T, D)
        return self.lm_head(self.ln_f(resid))  # (B, T, V)

    def lm_head(self, x):  # x (B, T, D), already normalised
        return linear(x, self.wte.weight)  # (B, T, V): tied to the token embedding

    def forward(self, idx, hooks=None, stop_at=None):
        """idx (B, T) token ids -> logits (B, T, V), or the activation at hook `stop_at` (B, T, D)."""
        self._check_input(idx, hooks, stop_at)
        pos = torch.arange(idx.shape[1], device=idx.device)  # (T,)
        x = self.wte(idx) + self.wpe(pos)  # (B, T, D)
        try:
            for block in self.h:
                x = block(x, hooks, stop_at)
        except StopForward as stop:  # nothing after the hook at `stop_at` was computed
            return stop.act
        return self.unembed(x)  # (B, T, V)

    def _check_input(self, idx, hooks, stop_at):
        if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"idx must be a (B, T) tensor of int64 (or int32) token ids, got "
                             f"{tuple(idx.shape) if isinstance(idx, torch.Tensor) else type(idx).__name__}"
                             f"{' ' + str(idx.dtype) if isinstance(idx, torch.Tensor) else ''}")
        if not 0 < idx.shape[1] <= self.n_ctx:
            raise ValueError(f"context of {idx.shape[1]} tokens: this model takes 1..{self.n_ctx} positions (n_ctx)")
        if idx.numel() and (idx.min() < 0 or idx.max() >= self.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.vocab_size}); got min {int(idx.min())}, max {int(idx.max())}")
        check_hook_names(list(hooks or {}) + ([stop_at] if stop_at is not None else []), self._hook_names)


# Hugging Face GPT-2 uses Conv1D layers, which store weights as (in, out): transposed
# relative to nn.Linear's (out, in).
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# non-parameter entries of HF checkpoints: the causal-mask buffers and the tied head
_IGNORED = (".attn.bias", ".attn.masked_bias", "lm_head.weight")


@torch.no_grad()
def load_weights_(model: GPT2, path) -> GPT2:
    """Copy a Hugging Face GPT-2 safetensors checkpoint into `model`, checking that every
    parameter is present with the shape the config implies."""
    header, _, _ = read_header(path)
    keys = {}  # our parameter name -> key in the file
    for key in header:
        name = key[len("transformer."):] if key.startswith("transformer.") else key
        if not name.endswith(_IGNORED):
            keys[name] = key
    params = dict(model.named_parameters())
    missing = [n for n in params if n not in keys]
    unexpected = [n for n in keys if n not in params]
    if missing or unexpected:
        raise ValueError(f"{path} does not fit a GPT-2 with config {model.config}: missing keys {missing[:8]}, "
                         f"unexpected keys {unexpected[:8]} ({len(missing)} missing, {len(unexpected)} unexpected)")
    for name, p in params.items():
        expected = tuple(p.shape[::-1]) if name.endswith(_CONV1D) else tuple(p.shape)
        found = header[keys[name]][1]
        if found != expected:
            raise ValueError(f"{path}: tensor {keys[name]!r} has shape {found}, expected {expected} "
                             f"for n_layer={model.n_layer}, d_model={model.d_model}, vocab_size={model.vocab_size}")
    arrays = load_safetensors(path, names=list(keys.values()))
    for name, p in params.items():
        t = torch.tensor(arrays[keys[name]], dtype=torch.float32)  # copies out of the read-only file map
        p.copy_(t.T if name.endswith(_CONV1D) else t)
    return model


def load_gpt2_tokenizer(cache_dir=None):
    """GPT-2's tokenizer (all sizes share it): from $MINISAE_GPT2_TOKENIZER_DIR if set,
    else vocab.json + merges.txt of openai-community/gpt2, cached after one download."""
    local = os.environ.get("MINISAE_GPT2_TOKENIZER_DIR")
    if local:
        return BPETokenizer.from_files(local)
    try:
        vocab = cached_path(f"{HF}/gpt2/resolve/main/vocab.json", cache_dir)
        cached_path(f"{HF}/gpt2/resolve/main/merges.txt", cache_dir)
    except (OSError, HTTPFailure) as e:
        raise ValueError(f"could not get GPT-2's tokenizer files ({e}). Offline, set MINISAE_GPT2_TOKENIZER_DIR "
                         "to a directory holding encoder.json + vocab.bpe (or vocab.json + merges.txt)") from e
    return BPETokenizer.from_files(os.path.dirname(vocab))


def load_gpt2(name: str, weights=None, cache_dir=None):
    """(model, tokenizer). `weights`: a local HF-format model.safetensors; by default
    gpt2-random is randomly initialised and the real sizes are downloaded once
    from huggingface.co/openai-community/{name} into the cache (see minisae.models.hub)."""
    if name not in CONFIGS:
        raise ValueError(f"unknown GPT-2 model {name!r}; valid names: {', '.join(CONFIGS)}")
    model = GPT2(CONFIGS[name])
    if weights is None and name != "gpt2-random":
        try:
            weights = cached_path(f"{HF}/{name}/resolve/main/model.safetensors", cache_dir)
        except (OSError, HTTPFailure) as e:
            raise ValueError(f"could not download {name}'s weights ({e}). Offline, pass --weights FILE (a Hugging "
                             "Face model.safetensors of this model) and set MINISAE_GPT2_TOKENIZER_DIR to a folder "
                             "with encoder.json + vocab.bpe; or try the pipeline on --model gpt2-random") from e
    if weights is not None:
        load_weights_(model, weights)
    return model.eval(), load_gpt2_tokenizer(cache_dir)
