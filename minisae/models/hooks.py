"""Hook points: named places in a forward pass where an activation can be read or replaced.

Names follow TransformerLens, per layer L:

    blocks.L.hook_resid_pre    residual stream entering block L
    blocks.L.hook_attn_out     output of the attention sublayer of block L
    blocks.L.hook_resid_mid    resid_pre + attn_out
    blocks.L.ln2.hook_normalized   site "mlp_in": resid_mid normalised by the norm in front
                               of the MLP, before that norm's elementwise weight (and bias):
                               (x - mean x) / std x for LayerNorm, x / rms(x) for RMSNorm;
                               the MLP reads norm.affine(mlp_in) = w * mlp_in (+ b)
    blocks.L.hook_mlp_out      output of the MLP sublayer of block L
    blocks.L.hook_resid_post   resid_mid + mlp_out  (== blocks.L+1.hook_resid_pre)

The name of mlp_in is TransformerLens's, and so is its place: TransformerLens's LayerNorm
and RMSNorm fire `hook_normalized` before `* w (+ b)`, and the folded norms of its default
processing (LayerNormPre, RMSNormPre) have no weight at all, so this is the tensor a
TransformerLens model gives there and the one SAELens's transcoders read (Dunefsky et al.
2024 trained theirs on blocks.L.ln2.hook_normalized). TransformerLens's
`blocks.L.hook_mlp_in` is another tensor: the MLP's input BEFORE the norm, here resid_mid.
The weight is a fixed diagonal map, so a transcoder mlp_in -> mlp_out still stands in for
exactly the MLP.

A hook is a function `fn(act) -> act | None` with act of shape (B, T, D). Returning a
tensor replaces the activation (that is how an SAE is spliced in and how steering adds a
direction); returning None only reads it. Every model in minisae.models calls
`run_hook` at each of these points and stops early when asked (`stop_at=name`), which
is what makes activation collection cheap: nothing after the hooked layer is computed.
"""

from typing import Callable, Optional

import torch

from minisae.configs import SITES  # ("resid_pre", ..., "mlp_in", "mlp_out", "resid_post"): checked before loading

NAMES = {"mlp_in": "ln2.hook_normalized"}  # sites whose hook is not blocks.L.hook_{site} (TransformerLens's names)

Hook = Callable[[torch.Tensor], Optional[torch.Tensor]]


def hook_name(layer: int, site: str, n_layer: Optional[int] = None) -> str:
    """'blocks.{layer}.hook_{site}' ('blocks.{layer}.ln2.hook_normalized' for mlp_in), after
    checking the site name and the layer index."""
    if site not in SITES:
        raise ValueError(f"unknown site {site!r}; valid sites: {', '.join(SITES)}")
    if n_layer is not None and not 0 <= layer < n_layer:
        raise ValueError(f"layer {layer} out of range: this model has layers 0..{n_layer - 1}")
    return f"blocks.{layer}.{NAMES.get(site, 'hook_' + site)}"


def all_hook_names(n_layer: int) -> list[str]:
    return [hook_name(layer, site) for layer in range(n_layer) for site in SITES]


class StopForward(Exception):
    """Raised inside a forward pass to stop after the hook point named in `stop_at`."""

    def __init__(self, act: torch.Tensor):
        self.act = act


def run_hook(name: str, x: torch.Tensor, hooks: Optional[dict], stop_at: Optional[str]) -> torch.Tensor:
    """Apply the hook registered at `name` (if any); stop the forward if `name == stop_at`."""
    if hooks and name in hooks:
        out = hooks[name](x)
        if out is not None:
            if out.shape != x.shape:
                raise ValueError(f"hook at {name} returned shape {tuple(out.shape)}, expected {tuple(x.shape)}")
            x = out
    if stop_at == name:
        raise StopForward(x)
    return x


def check_hook_names(names, valid: list[str]) -> None:
    """Clear error for a misspelt hook name instead of a hook that silently never runs."""
    bad = [n for n in names if n not in valid]
    if bad:
        raise ValueError(f"unknown hook point(s) {bad}; valid names look like {valid[0]!r} ... {valid[-1]!r}")
