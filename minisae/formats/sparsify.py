"""EleutherAI sparsify's file layout: one directory per hook point, TopK SAEs.

    DIR/cfg.json           {"activation": "topk", "k": K, "num_latents": F, "expansion_factor": F / D,
                            "normalize_decoder": true, "multi_topk": false, "skip_connection": false,
                            "transcode": false, "d_in": D}
    DIR/sae.safetensors    encoder.weight (F, D), encoder.bias (F,), W_dec (F, D), b_dec (D,)

sparsify's SparseCoder computes

    pre = ReLU(encoder(x - b_dec)),  (top_acts, top_indices) = TopK_k(pre),
    x_hat = sum_j top_acts_j W_dec[top_indices_j] + b_dec

which is minisae's TopK SAE with the same storage: W_enc = encoder.weight, b_enc =
encoder.bias (taking the k largest of ReLU(pre) or the ReLU of the k largest pre gives the
same code). sparsify names the directory after the module whose output it reads, in the
Hugging Face model's names: `layers.6` (GPT-2: `h.6`) is the output of block 6, which
minisae calls blocks.6.hook_resid_post; `.mlp` and `.self_attn` / `.attn` are the MLP and
attention outputs. minisae adds a "minisae" entry to cfg.json (sparsify ignores fields it
does not know) with the model, hook and metadata; the scale is folded as in
minisae/formats/saelens.py. Writing is for TopK SAEs only: that is all sparsify stores.
"""

import re

import torch

from minisae.formats.common import flag, positive_int, read_cfg, read_tensors
from minisae.formats.saelens import meta_of
from minisae.formats.saelens import to_files as saelens_files
from minisae.sae import make_sae, variant_name

SITES = {"": "resid_post", "mlp": "mlp_out", "self_attn": "attn_out", "attn": "attn_out"}


def to_files(sae, /, scale: float = 1.0, **meta) -> tuple:
    """(cfg.json dict, tensors, weights file name) for a TopK `sae` with `scale` folded in."""
    if variant_name(sae.activation) != "topk":
        raise ValueError(f"sparsify stores TopK SAEs only; this one is {variant_name(sae.activation)} "
                         "(save it in the SAELens layout instead)")
    cfg, t, _ = saelens_files(sae, scale, **meta)  # the same folding, the same metadata
    D, F = sae.d, sae.n_latents
    out = {"activation": "topk", "expansion_factor": F // D if F % D == 0 else 0, "normalize_decoder": True,
           "num_latents": F, "k": sae.activation.k, "multi_topk": False, "skip_connection": False,
           "transcode": False, "d_in": D, "minisae": cfg["metadata"]["minisae"]}
    tensors = {"encoder.weight": t["W_enc"].T.contiguous(), "encoder.bias": t["b_enc"], "W_dec": t["W_dec"],
               "b_dec": t["b_dec"]}
    return out, tensors, "sae.safetensors"


def load(path) -> tuple:
    """(minisae TopK SAE, meta) from a sparsify directory."""
    cfg_path = path / "cfg.json"
    cfg = read_cfg(cfg_path)
    D = positive_int(cfg.get("d_in"), "d_in", cfg_path)
    n, e = cfg.get("num_latents", 0), cfg.get("expansion_factor", 32)
    unset = n is None or (type(n) is int and n == 0)  # sparsify's default 0: expansion_factor x d_in
    F = D * positive_int(e, "expansion_factor", cfg_path) if unset else positive_int(n, "num_latents", cfg_path)
    k = positive_int(cfg.get("k", 32), "k", cfg_path)
    if k > F:
        raise ValueError(f"{cfg_path}: k = {k} is more than the {F} latents")
    if cfg.get("activation", "topk") != "topk":
        raise ValueError(f"{cfg_path}: activation {cfg['activation']!r:.40} is not supported (minisae reads topk)")
    for name in ("skip_connection", "transcode"):
        if flag(cfg.get(name), name, cfg_path, False):
            raise ValueError(f"{cfg_path}: {name} = true is not supported (minisae reads plain SAEs)")
    t = read_tensors(path / "sae.safetensors", {"encoder.weight": (F, D), "encoder.bias": (F,), "W_dec": (F, D),
                                                "b_dec": (D,)})
    sae = make_sae("topk", D, F, k=k).to(t["W_dec"].dtype)
    with torch.no_grad():
        sae.W_enc.copy_(t["encoder.weight"])
        sae.b_enc.copy_(t["encoder.bias"])
        sae.W_dec.copy_(t["W_dec"])
        sae.b_dec.copy_(t["b_dec"])
    ours = cfg.get("minisae") or {}
    if not isinstance(ours, dict):
        raise ValueError(f"{cfg_path}: the minisae entry must be a JSON object, got {ours!r:.60}")
    md = {"model_name": ours.get("model"), "hook_name": ours.get("hook") or hook_of(path.resolve().name)}
    return sae, meta_of({"d_in": D}, md, {**ours, "hook": md["hook_name"]}, cfg_path)


def hook_of(name: str):
    """sparsify's hook point name -> minisae's: 'layers.6' -> 'blocks.6.hook_resid_post',
    'h.3.mlp' -> 'blocks.3.hook_mlp_out'; None if the name is not one of these."""
    m = re.fullmatch(r"(?:model\.|transformer\.|gpt_neox\.)?(?:layers|h)\.(\d+)(?:\.(mlp|self_attn|attn))?", name)
    return f"blocks.{m[1]}.hook_{SITES[m[2] or '']}" if m else None
