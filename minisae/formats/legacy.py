"""minisae's old SAE files: the torch.save dictionary minisae wrote before it used
SAELens's layout (read only; `python -m minisae convert FILE.pt DIR` rewrites one)."""

import torch

from minisae.formats.common import positive_int
from minisae.formats.saelens import meta_of, settings_of
from minisae.sae import make_sae


def read_pt(path):
    """What a .pt file holds, read with torch.load(weights_only=True): tensors, numbers,
    strings, lists and dictionaries, never code. ValueError naming the file otherwise."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for a damaged or foreign file
        raise ValueError(f"cannot read SAE file {path}: not an SAE directory and not a .pt file of "
                         f"tensors ({str(e)[:300]})") from None


def is_minisae(ckpt) -> bool:
    return isinstance(ckpt, dict) and {"variant", "d", "n_latents", "state_dict"} <= ckpt.keys()


def load(path, ckpt=None) -> tuple:
    """(sae, meta) from the torch.save dictionary minisae wrote before it used SAELens's
    layout: {'variant', 'd', 'n_latents', 'settings', 'state_dict', 'meta'} (`ckpt`: that
    dictionary, when the caller has read it already). The stored shapes are checked
    against d and n_latents before the SAE is built."""
    how = f"(rewrite it with `python -m minisae convert {path} NEW_DIR`)"
    ckpt = read_pt(path) if ckpt is None else ckpt
    if not is_minisae(ckpt):
        raise ValueError(f"{path} is not an SAE file written by minisae")
    d, F = positive_int(ckpt["d"], "d", path), positive_int(ckpt["n_latents"], "n_latents", path)
    state, settings = ckpt["state_dict"], ckpt.get("settings", {})
    if not isinstance(state, dict) or not isinstance(settings, dict) or not isinstance(ckpt.get("meta", {}), dict):
        raise ValueError(f"{path}: state_dict, settings and meta must be dictionaries {how}")
    for name, shape in (("W_enc", (F, d)), ("W_dec", (F, d)), ("b_enc", (F,)), ("b_dec", (d,))):
        if not isinstance(state.get(name), torch.Tensor) or tuple(state[name].shape) != shape:
            raise ValueError(f"{path}: weights do not match the saved configuration: {name} should be {list(shape)} {how}")
    for name, t in state.items():
        if not isinstance(t, torch.Tensor) or (t.is_floating_point() and not torch.isfinite(t).all()):
            raise ValueError(f"{path}: state_dict entry {name!r:.60} is not a tensor of finite values {how}")
    settings = settings_of({"settings": settings}, path)  # numbers only, integers where they count
    try:
        sae = make_sae(ckpt["variant"], d, F, **settings).to(state["W_enc"].dtype)
        sae.load_state_dict(state)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: weights do not match the saved configuration: {e}") from None
    meta = ckpt.get("meta", {})
    scale = meta.get("scale")  # an old file's scale is not folded into its weights
    if scale is not None and (not isinstance(scale, (int, float)) or isinstance(scale, bool) or
                              not 0 < scale < float("inf")):
        raise ValueError(f"{path}: meta scale must be a positive number, got {scale!r:.60} {how}")
    return sae, {**meta_of({"d_in": d}, {}, meta, path), "scale": scale}
