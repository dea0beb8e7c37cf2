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

import math
import sys

import torch

from minisae.features import load_text, scan
from minisae.hooked_sae import check_latents
from minisae.utils import model_device


def steering_vector(hsae, latent: int, strength: float):
    """strength * W_dec[latent] / scale, in the model's raw units: (D,)."""
    if not math.isfinite(strength):
        raise ValueError(f"the steering strength must be a finite number, got {strength}")
    return strength * hsae.direction(latent)  # (D,)


def add_hook(vector):
    """A hook adding `vector` (D,) to every position but the first (BOS)."""

    def hook(act):  # act (B, T, D)
        out = act.clone()
        out[:, 1:] += vector.to(act.device, act.dtype)
        return out

    return hook


def typical_activation(model, hsae, contexts, latent: int, unit: str = "mean", bf16: bool = False,
                       verbose: bool = False) -> float:
    """Latent's mean (or max) activation when active on `contexts`, in the SAE's units."""
    if unit not in ("mean", "max"):
        raise ValueError(f"unit must be 'mean' or 'max', got {unit!r}")
    check_latents([latent], hsae.n_latents)
    stats, _ = scan(model, hsae, contexts, bf16=bf16, verbose=verbose)
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
             seed: int = 0, on_token=None) -> list:
    """Continue token ids (BOS first) by n_tokens, re-running the full sequence each step."""
    if sample and not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if len(ids) + n_tokens > model.n_ctx:
        raise ValueError(f"{len(ids)} prompt + {n_tokens} new tokens exceed the context of {model.n_ctx}")
    g = torch.Generator().manual_seed(seed)  # on the CPU, so a seed means the same on any device
    idx = torch.tensor([ids], device=model_device(model))  # (1, T)
    for _ in range(n_tokens):
        logits = model(idx, hooks=hooks)[0, -1].float().cpu()  # (V,)
        if sample:
            nxt = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=g)  # (1,)
        else:
            nxt = logits.argmax(-1, keepdim=True)  # (1,)
        idx = torch.cat([idx, nxt[None].to(idx.device)], dim=1)  # (1, T+1)
        if on_token:
            on_token()
    return idx[0, len(ids):].tolist()


def steer(model, tokenizer, hsae, latent: int, strength: float, prompt: str, n_tokens: int = 30,
          typical: float = 1.0, sample: bool = False, temperature: float = 1.0, seed: int = 0,
          verbose: bool = False) -> dict:
    """Unsteered, steered and control (random direction, same norm) continuations of
    `prompt`; strength is in units of `typical` (the latent's typical activation, SAE units)."""
    ids = encode_prompt(tokenizer, prompt)
    vec = steering_vector(hsae, latent, strength * typical)  # (D,)
    from minisae.utils import Progress
    bar, done = (Progress("generating", 3 * n_tokens, "tokens") if verbose else None), [0]

    def tick():
        done[0] += 1
        bar.update(done[0])

    kw = dict(n_tokens=n_tokens, sample=sample, temperature=temperature, seed=seed, on_token=tick if bar else None)
    rand = torch.randn(vec.shape, generator=torch.Generator().manual_seed(seed))  # (D,)
    rand = rand / rand.norm() * vec.norm()  # a random direction, same norm: the control
    out = {"prompt": prompt, "latent": latent, "strength": strength, "added_norm": vec.norm().item()}
    for name, hooks in (("unsteered", None), ("steered", {hsae.hook: add_hook(vec)}),
                        ("control", {hsae.hook: add_hook(rand)})):
        out[f"{name}_ids"] = generate(model, ids, hooks=hooks, **kw)
        out[name] = tokenizer.decode(out[f"{name}_ids"])
    if bar:
        bar.close(done[0])
    return out


def run(cfg) -> dict:
    """`python -m minisae steer` (cfg: minisae.configs.SteerConfig)."""
    from minisae.hooked_sae import load_with_model
    src = cfg.source
    if not cfg.new_tokens > 0:
        raise ValueError(f"--tokens must be a positive number of tokens to generate, got {cfg.new_tokens}")
    if not math.isfinite(cfg.strength):
        raise ValueError(f"--strength must be a finite number, got {cfg.strength}")
    if cfg.sample and not 0 < cfg.temperature < float("inf"):
        raise ValueError(f"--temperature must be positive, got {cfg.temperature}")
    hsae, model, tok = load_with_model(src.sae, src.model, src.layer, src.site, src.weights, src.device)
    check_latents([cfg.latent], hsae.n_latents)  # a bad latent fails before the calibration pass
    encode_prompt(tok, cfg.prompt)  # and so does an empty prompt
    print(f"measuring latent {cfg.latent}'s typical activation on {src.text_tokens:,} tokens", file=sys.stderr)
    typical = typical_activation(model, hsae, load_text(src, tok, hsae.model_name), cfg.latent, cfg.unit,
                                 src.bf16, verbose=True)
    out = steer(model, tok, hsae, cfg.latent, cfg.strength, cfg.prompt, cfg.new_tokens, typical,
                cfg.sample, cfg.temperature, cfg.seed, verbose=True)
    print(f"latent {cfg.latent} at {hsae.hook}: {cfg.unit} activation {typical:.3f} (SAE units); adding "
          f"{cfg.strength:g} x that along W_dec[{cfg.latent}], norm {out['added_norm']:.3f} in raw units",
          file=sys.stderr)
    print(f"prompt:    {cfg.prompt!r}\nunsteered: {out['unsteered']!r}\nsteered:   {out['steered']!r}\n"
          f"random direction, same norm (control): {out['control']!r}")
    return out
