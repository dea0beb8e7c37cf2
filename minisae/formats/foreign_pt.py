"""Other libraries' torch.save files: openai/sparse_autoencoder's state dicts and
dictionary_learning's ae.pt, besides minisae's own old .pt (minisae/formats/legacy.py).
Every .pt is read with torch.load(weights_only=True): tensors, numbers and strings, never code.

openai/sparse_autoencoder (Gao et al. 2024), Autoencoder.state_dict():

    pre_bias (D,), encoder.weight (F, D), latent_bias (F,), decoder.weight (D, F),
    three statistics buffers, "activation": "ReLU" | "TopK", "activation_state_dict": {"k", ...}

    latents = activation(encoder(x - pre_bias) + latent_bias),  recons = decoder(latents) + pre_bias

which is minisae's SAE with W_enc = encoder.weight, b_enc = latent_bias, W_dec =
decoder.weight^T, b_dec = pre_bias (exact). Their TopK files are refused: from_state_dict
turns `normalize` on for every TopK file, so each input is layer-normalised first,
x' = (x - mean(x)) / std(x), and each reconstruction scaled back; minisae's SAE has no
per-token normalisation.

dictionary_learning (Marks et al.), DIR/ae.pt with DIR/config.json beside it:

    AutoEncoder      bias (D,), encoder.weight (F, D), encoder.bias (F,), decoder.weight (D, F)
                     f = ReLU(encoder(x - bias)),                 x_hat = decoder(f) + bias
    AutoEncoderTopK  b_dec (D,), encoder.weight, encoder.bias, decoder.weight, k, threshold
                     f = TopK_k(ReLU(encoder(x - b_dec))),        x_hat = decoder(f) + b_dec
    BatchTopKSAE     the same tensors (config.json's trainer.dict_class tells them apart);
                     f = z * 1[z > threshold], z = ReLU(encoder(x - b_dec))

are minisae's relu, topk and batchtopk with W_enc = encoder.weight, b_enc = encoder.bias,
W_dec = decoder.weight^T, b_dec = bias (or b_dec): exact. config.json's trainer.lm_name and
submodule_name ("resid_post_layer_3") give the model and the hook. Other dictionary
classes (gated, jumprelu, matryoshka, crosscoders) are refused by name.
"""

import re
from pathlib import Path

import torch

from minisae.formats import legacy
from minisae.formats.common import positive_int, read_cfg
from minisae.formats.saelens import MODEL_NAMES
from minisae.sae import make_sae

OPENAI = {"pre_bias", "encoder.weight", "latent_bias"}
DICTIONARY_LEARNING = {"encoder.weight", "encoder.bias", "decoder.weight"}
DL_CLASSES = {"AutoEncoder": "relu", "AutoEncoderTopK": "topk", "BatchTopKSAE": "batchtopk"}


def load(path) -> tuple:
    """(sae, meta) from a .pt file of minisae, openai/sparse_autoencoder or dictionary_learning."""
    path = Path(path)
    ckpt = legacy.read_pt(path)
    if legacy.is_minisae(ckpt):
        return legacy.load(path, ckpt)
    if isinstance(ckpt, dict) and OPENAI <= ckpt.keys():
        return openai_sae(ckpt, path)
    if isinstance(ckpt, dict) and DICTIONARY_LEARNING <= ckpt.keys():
        return dictionary_learning_sae(ckpt, path)
    held = sorted(ckpt)[:12] if isinstance(ckpt, dict) else type(ckpt).__name__
    raise ValueError(f"{path}: not an SAE file minisae knows (minisae's old .pt, openai/sparse_autoencoder's "
                     f"state dict, dictionary_learning's ae.pt); it holds {held}")


def tensors(state: dict, shapes: dict, path) -> dict:
    """name -> float tensor of exactly that shape, with finite values; ValueError otherwise."""
    out = {}
    for name, shape in shapes.items():
        t = state.get(name)
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or tuple(t.shape) != shape:
            got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{path}: {name} must be a float tensor of shape {list(shape)}, got {got}")
        if not torch.isfinite(t).all():
            raise ValueError(f"{path}: tensor {name} holds NaN or Inf values")
        out[name] = t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
    return out


def build(variant: str, t: dict, path, **settings):
    """A minisae SAE from W_enc (F, D), b_enc (F,), W_dec (F, D), b_dec (D,)."""
    F, D = t["W_enc"].shape
    sae = make_sae(variant, D, F, **settings).to(t["W_enc"].dtype)
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(sae, name).copy_(t[name])
    return sae


def openai_sae(state: dict, path) -> tuple:
    activation = state.get("activation", "ReLU")
    if activation == "TopK":
        raise ValueError(f"{path}: an openai/sparse_autoencoder TopK file: its inputs are layer-normalised, "
                         "(x - mean(x)) / std(x) per token, before encoding (their `normalize`), which minisae's "
                         "SAE does not do; it reads their ReLU files")
    if activation != "ReLU":
        raise ValueError(f"{path}: openai/sparse_autoencoder activation {activation!r:.40} is not supported "
                         "(minisae reads ReLU)")
    F, D = state["encoder.weight"].shape if isinstance(state["encoder.weight"], torch.Tensor) else (0, 0)
    dec = "decoder.weight" if "decoder.weight" in state else "decoder.linear.weight"  # tied: the encoder's
    t = tensors(state, {"encoder.weight": (F, D), "latent_bias": (F,), "pre_bias": (D,),
                        dec: (D, F) if dec == "decoder.weight" else (F, D)}, path)
    W_dec = t[dec].T if dec == "decoder.weight" else t[dec]  # (F, D)
    sae = build("relu", {"W_enc": t["encoder.weight"], "b_enc": t["latent_bias"], "W_dec": W_dec,
                         "b_dec": t["pre_bias"]}, path)
    return sae, {"model": None, "hook": None, "scale": 1.0, "max_norm": None, "mean": None, "origin": "openai"}


def dictionary_learning_sae(state: dict, path) -> tuple:
    config = Path(path).with_name("config.json")
    trainer = read_cfg(config).get("trainer", {}) if config.exists() else {}
    if not isinstance(trainer, dict):
        raise ValueError(f"{config}: trainer must be a JSON object, got {trainer!r:.60}")
    bias = "bias" if "bias" in state else "b_dec"
    default = "AutoEncoderTopK" if "k" in state else "AutoEncoder"  # their forward without config.json
    cls = trainer.get("dict_class", default)
    if cls not in DL_CLASSES or (cls == "AutoEncoder") != (bias == "bias"):
        raise ValueError(f"{path}: dictionary_learning's {cls!r:.60} with tensors {sorted(state)[:10]} is not "
                         f"supported (minisae reads {', '.join(DL_CLASSES)})")
    W = state["encoder.weight"]
    F, D = W.shape if isinstance(W, torch.Tensor) and W.dim() == 2 else (0, 0)
    t = tensors(state, {"encoder.weight": (F, D), "encoder.bias": (F,), "decoder.weight": (D, F), bias: (D,)}, path)
    settings = {}
    if cls != "AutoEncoder":
        k = state.get("k")
        k = int(k) if isinstance(k, torch.Tensor) and k.numel() == 1 and not k.is_floating_point() else k
        settings["k"] = positive_int(k, "k", path)
        if settings["k"] > F:
            raise ValueError(f"{path}: k = {k} is more than the {F} latents")
    sae = build(DL_CLASSES[cls], {"W_enc": t["encoder.weight"], "b_enc": t["encoder.bias"],
                                  "W_dec": t["decoder.weight"].T, "b_dec": t[bias]}, path, **settings)
    if cls == "BatchTopKSAE":
        threshold = state.get("threshold")
        if not isinstance(threshold, torch.Tensor) or threshold.numel() != 1 or not float(threshold) >= 0:
            raise ValueError(f"{path}: a BatchTopKSAE needs its inference threshold (a number >= 0), got "
                             f"{threshold!r:.60}")
        sae.activation.threshold.fill_(float(threshold))
    model, sub = trainer.get("lm_name"), trainer.get("submodule_name")
    m = re.fullmatch(r"resid_post_layer_(\d+)", sub) if isinstance(sub, str) else None
    return sae, {"model": MODEL_NAMES.get(model, model) if isinstance(model, str) else None,
                 "hook": f"blocks.{m[1]}.hook_resid_post" if m else None, "scale": 1.0, "max_norm": None,
                 "mean": None, "origin": "dictionary_learning"}
