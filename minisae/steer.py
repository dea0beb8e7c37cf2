"""Steering: add a latent's decoder direction to the model's activations while it writes.

If latent i is a feature the model uses, pushing its direction into the residual stream
should push the text towards it (Templeton et al. 2024, "Scaling Monosemanticity":
clamping the Golden Gate Bridge feature). At the SAE's hook, every position t >= 1:

    x'[t] = x[t] + A * a_i * W_dec[i] / scale                     (D,) added to (B, T, D)

- W_dec[i] is latent i's unit decoder row, in the SAE's units: activations were
  multiplied by `scale` before training (minisae.activations), so / scale converts the
  vector back to the model's raw units.
- a_i is latent i's mean activation when active (or its max, --unit max), measured on a
  few held-out contexts: a_i * W_dec[i] is what the latent typically writes, so the
  strength A reads "A times its typical size"; A = 0 changes nothing, exactly.
- Position 0 (BOS) is left alone, as in the SAE's training and evaluation: its outlier
  activation is the model's attention sink (minisae.data), not text.
- Generation re-runs the whole growing sequence through the steered model at each step,
  so the prompt and every generated token are steered. A cached implementation that
  hooks only the prompt's forward steers the first new token and none after it.

Greedy by default; --sample draws from softmax(logits / temperature) with a seeded
torch.Generator, and the unsteered and steered runs use the same seed, so a difference
between the two continuations comes from the steering alone.

A control: any push of this size changes a greedy continuation somewhere, so "the text
changed" is no evidence. `steer` also continues with a random direction of the same
norm; the latent's steering means something only where it differs from that control in
the latent's direction (its max-activating examples say which).
"""

import sys
from pathlib import Path

import torch

from minisae.features import add_common_arguments, check_latents, load_sae_and_model, load_text, scan


def steering_vector(sae, latent: int, strength: float, scale: float):
    """strength * W_dec[latent] / scale, in the model's raw units: (D,)."""
    check_latents([latent], sae.n_latents)
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    d = sae.W_dec[latent].detach().float()  # (D,)
    return strength * d / d.norm() / scale


def add_hook(vector):
    """A hook adding `vector` (D,) to every position but the first (BOS)."""

    def hook(act):  # act (B, T, D)
        out = act.clone()
        out[:, 1:] += vector.to(act.device, act.dtype)
        return out

    return hook


def typical_activation(model, sae, meta, contexts, latent: int, unit: str = "mean", bf16: bool = False) -> float:
    """Latent's mean (or max) activation when active on `contexts`, in the SAE's units."""
    if unit not in ("mean", "max"):
        raise ValueError(f"unit must be 'mean' or 'max', got {unit!r}")
    check_latents([latent], sae.n_latents)
    stats, _ = scan(model, sae, meta["hook"], meta["scale"], contexts, bf16=bf16, verbose=False,
                    max_norm=meta.get("max_norm"))
    if stats["density"][latent] == 0:
        raise ValueError(f"latent {latent} never fired on {stats['n_tokens']:,} tokens; its typical size is "
                         "unknown: scan more text (--calib-tokens) or pick a live latent")
    return stats["mean_active" if unit == "mean" else "max"][latent]


def encode_prompt(tokenizer, prompt: str) -> list:
    ids = tokenizer.encode(prompt) if prompt else []
    if not ids:
        raise ValueError("the prompt is empty: give at least one token of text to continue")
    return [tokenizer.bos_id] + ids


@torch.no_grad()
def generate(model, ids, n_tokens: int, hooks=None, sample: bool = False, temperature: float = 1.0,
             seed: int = 0) -> list:
    """Continue token ids (BOS first) by n_tokens, re-running the full sequence each step."""
    if sample and not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if len(ids) + n_tokens > model.n_ctx:
        raise ValueError(f"{len(ids)} prompt + {n_tokens} new tokens exceed the context of {model.n_ctx}")
    from minisae.activations import model_device
    g = torch.Generator().manual_seed(seed)  # on the CPU, so a seed means the same on any device
    idx = torch.tensor([ids], device=model_device(model))  # (1, T)
    for _ in range(n_tokens):
        logits = model(idx, hooks=hooks)[0, -1].float().cpu()  # (V,)
        if sample:
            nxt = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=g)  # (1,)
        else:
            nxt = logits.argmax(-1, keepdim=True)  # (1,)
        idx = torch.cat([idx, nxt[None].to(idx.device)], dim=1)  # (1, T+1)
    return idx[0, len(ids):].tolist()


def steer(model, tokenizer, sae, meta, latent: int, strength: float, prompt: str, n_tokens: int = 30,
          typical: float = 1.0, sample: bool = False, temperature: float = 1.0, seed: int = 0) -> dict:
    """Unsteered, steered and control (random direction, same norm) continuations of
    `prompt`; strength is in units of `typical` (the latent's typical activation, SAE units)."""
    ids = encode_prompt(tokenizer, prompt)
    vec = steering_vector(sae, latent, strength * typical, meta["scale"])  # (D,)
    kw = dict(n_tokens=n_tokens, sample=sample, temperature=temperature, seed=seed)
    rand = torch.randn(vec.shape, generator=torch.Generator().manual_seed(seed))  # (D,)
    rand = rand / rand.norm() * vec.norm()  # a random direction, same norm: the control
    out = {"prompt": prompt, "latent": latent, "strength": strength, "added_norm": vec.norm().item()}
    for name, hooks in (("unsteered", None), ("steered", {meta["hook"]: add_hook(vec)}),
                        ("control", {meta["hook"]: add_hook(rand)})):
        out[f"{name}_ids"] = generate(model, ids, hooks=hooks, **kw)
        out[name] = tokenizer.decode(out[f"{name}_ids"])
    return out


def add_arguments(p):
    p.add_argument("--sae", type=Path, required=True, help="an SAE file written by `python -m minisae lm`")
    p.add_argument("--latent", type=int, required=True)
    p.add_argument("--scale", type=float, required=True,
                   help="strength A, in units of the latent's typical activation (see --unit)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--tokens", dest="new_tokens", type=int, default=30, help="tokens to generate")
    p.add_argument("--unit", default="mean", choices=("mean", "max"),
                   help="typical activation: mean when active, or max, on held-out text")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    add_common_arguments(p, "--calib-tokens", 8192)  # text to measure the typical activation on


def run_cli(args):
    sae, meta, model, tok = load_sae_and_model(args.sae, args.model, args.layer, args.site, args.weights)
    check_latents([args.latent], sae.n_latents)
    encode_prompt(tok, args.prompt)  # fail on an empty prompt before the calibration pass
    typical = typical_activation(model, sae, meta, load_text(args, tok, meta["model"]), args.latent,
                                 args.unit, args.bf16)
    out = steer(model, tok, sae, meta, args.latent, args.scale, args.prompt, args.new_tokens, typical,
                args.sample, args.temperature, args.seed)
    print(f"latent {args.latent} at {meta['hook']}: {args.unit} activation {typical:.3f} (SAE units); adding "
          f"{args.scale:g} x that along W_dec[{args.latent}], norm {out['added_norm']:.3f} in raw units", file=sys.stderr)
    print(f"prompt:    {args.prompt!r}\nunsteered: {out['unsteered']!r}\nsteered:   {out['steered']!r}\n"
          f"random direction, same norm (control): {out['control']!r}")
    return out
