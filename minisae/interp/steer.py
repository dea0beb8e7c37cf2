"""Steering: add a latent's decoder direction to the model's activations while it writes.

If latent i is a feature the model uses, pushing its direction into the residual stream
should push the text towards it (Templeton et al. 2024, "Scaling Monosemanticity":
clamping the Golden Gate Bridge feature). At the SAE's hook, every position t >= 1:

    x'[t] = x[t] + A * a_i * W_dec[i] / scale                     (D,) added to (B, T, D)

- W_dec[i] is latent i's unit decoder row, in the SAE's units: activations were
  multiplied by `scale` before training (minisae.pipeline.activations), so / scale converts the
  vector back to the model's raw units.
- a_i is latent i's mean activation when active (or its max, --unit max), measured on a
  few held-out contexts: a_i * W_dec[i] is what the latent typically writes, so the
  strength A reads "A times its typical size"; A = 0 changes nothing, exactly.
- Position 0 (BOS) is left alone, as in the SAE's training and evaluation: its outlier
  activation is the model's attention sink (minisae.pipeline.data), not text.
- Generation runs with a key/value cache (minisae.models.kv_cache): the prompt's forward
  once, then one new position per token, and the hook adds the vector to each new
  position as it passes the layer, so the prompt and every generated token are steered,
  as when the whole growing sequence is re-run each step (`generate`, the plain loop;
  tests/interp/test_steer_cached.py checks the two agree). The unsteered, steered and
  control continuations run as one batch of three rows.
- a_i is measured once per SAE and text sample and kept beside the SAE
  (typical_activations.json in its folder, keyed by the sample and the weights' digest):
  the scan of the calibration text costs far more than the generation.

Greedy by default; --sample draws from softmax(logits / temperature) with a seeded
torch.Generator, and the unsteered and steered runs use the same seed, so a difference
between the two continuations comes from the steering alone.

A control: any push of this size changes a greedy continuation somewhere, so "the text
changed" is no evidence. `steer` also continues with a random direction of the same
norm; the latent's steering means something only where it differs from that control in
the latent's direction (its max-activating examples say which).
"""

import hashlib
import json
import math
import sys
from pathlib import Path

import torch

from minisae import formats
from minisae.interp.features import load_text, scan
from minisae.models.kv_cache import forward_cached
from minisae.pipeline.hooked_sae import check_latents, load_with_model
from minisae.utils import Progress, atomic_write_text, model_device


def steering_vector(hsae, latent: int, strength: float):
    """strength * W_dec[latent] / scale, in the model's raw units: (D,)."""
    if not math.isfinite(strength):
        raise ValueError(f"the steering strength must be a finite number, got {strength}")
    return strength * hsae.direction(latent)  # (D,)


def add_hook(vector, first: int = 1):
    """A hook adding `vector` (D,), or one per row (B, 1, D), to every position of what it
    sees from index `first` on: 1 for a sequence that starts with BOS (left alone), 0 for
    the new positions of a cached step (all after BOS)."""

    def hook(act):  # act (B, T, D)
        out = act.clone()
        out[:, first:] += vector.to(act.device, act.dtype)
        return out

    return hook


def typical_activation(model, hsae, contexts, latent: int, unit: str = "mean", bf16: bool = False,
                       verbose: bool = False) -> float:
    """Latent's mean (or max) activation when active on `contexts`, in the SAE's units."""
    if unit not in ("mean", "max"):
        raise ValueError(f"unit must be 'mean' or 'max', got {unit!r}")
    check_latents([latent], hsae.n_latents)
    stats, _ = scan(model, hsae, contexts, bf16=bf16, verbose=verbose)
    return typical_from_stats(stats, latent, unit)


def typical_from_stats(stats: dict, latent: int, unit: str = "mean") -> float:
    """Latent's mean (or max) activation when active, read off a scan's statistics."""
    if unit not in ("mean", "max"):
        raise ValueError(f"unit must be 'mean' or 'max', got {unit!r}")
    if stats["density"][latent] == 0:
        raise ValueError(f"latent {latent} never fired on {stats['n_tokens']:,} tokens; its typical size is "
                         "unknown: scan more text (--calib-tokens) or pick a live latent")
    return stats["mean_active" if unit == "mean" else "max"][latent]


def weights_digest(sae) -> str:
    """sha256 of the SAE's tensors: a stored measurement belongs to these weights only."""
    h = hashlib.sha256()
    for name, t in sae.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def typical_file(sae_path):
    """Where an SAE's typical activations are kept: typical_activations.json in its folder
    (the hub's cached download for hf:...), beside an old .pt file."""
    local = formats.resolve(sae_path)
    local = local.parent if local.is_file() and local.suffix != ".pt" else local  # DIR/cfg.json -> DIR
    return local / "typical_activations.json" if local.is_dir() else local.with_name(local.name + ".typical.json")


def kept_samples(path, digest: str, n_latents: int) -> dict:
    """{sample key: statistics} kept in `path` for the weights with this digest; {} where the
    file is absent, unreadable, or for other weights (then it is measured again and replaced)."""
    try:
        kept = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(kept, dict) or kept.get("weights_sha256") != digest or not isinstance(kept.get("samples"), dict):
        return {}
    return {key: stats for key, stats in kept["samples"].items()
            if isinstance(stats, dict) and all(len(stats.get(k) or ()) == n_latents for k in ("density", "mean_active", "max"))}


def stored_stats(model, tokenizer, hsae, src, verbose: bool = True) -> dict:
    """The scan's per-latent density, mean_active and max on the SAESource's text, measured
    once and kept in typical_file(src.sae) under a key naming the sample (your own --text
    files are scanned each time: they may change). Adds "sample" (what was scanned) and
    "stored" (whether it came from the file)."""
    key = f"{src.text_tokens} tokens, {src.split} split, contexts of {src.ctx_len}, {'bf16' if src.bf16 else 'fp32'}"
    key += f", weights {src.weights}" if src.weights else ""
    path, digest = (None, None) if src.text else (typical_file(src.sae), weights_digest(hsae.sae))
    kept = kept_samples(path, digest, hsae.n_latents) if path is not None else {}
    if key in kept:
        return {**kept[key], "sample": key, "stored": True}
    if verbose:
        print(f"measuring the latents' typical activations on {key} (once: kept in {path})"
              if path else f"measuring the latents' typical activations on {src.text_tokens:,} tokens of your text",
              file=sys.stderr)
    stats, _ = scan(model, hsae, load_text(src, tokenizer, hsae.model_name), bf16=src.bf16, verbose=verbose)
    stats = {k: stats[k] for k in ("n_tokens", "density", "mean_active", "max")}
    if path is not None:
        try:
            atomic_write_text(path, json.dumps({"weights_sha256": digest, "samples": {**kept, key: stats}}))
        except OSError as e:  # a read-only folder: measured, used, not kept
            print(f"could not keep the typical activations in {path}: {e}", file=sys.stderr)
    return {**stats, "sample": key, "stored": False}


def encode_prompt(tokenizer, prompt: str) -> list:
    ids = tokenizer.encode(prompt) if prompt else []
    if not ids:
        raise ValueError("the prompt is empty: give at least one token of text to continue")
    return [tokenizer.bos_id] + ids


@torch.no_grad()
def generate(model, ids, n_tokens: int, hooks=None, sample: bool = False, temperature: float = 1.0,
             seed: int = 0, on_token=None) -> list:
    """Continue token ids (BOS first) by n_tokens, re-running the full sequence each step:
    the plain reference of generate_cached, for any hooks on the whole sequence."""
    if sample and not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if len(ids) + n_tokens > model.n_ctx:
        raise ValueError(f"{len(ids)} prompt + {n_tokens} new tokens exceed the context of {model.n_ctx}")
    g = torch.Generator().manual_seed(seed)  # on the CPU, so a seed means the same on any device
    idx = torch.tensor([ids], device=model_device(model))  # (1, T)
    for _ in range(n_tokens):
        logits = model(idx, hooks=hooks)[0, -1].float().cpu()  # (V,)
        nxt = pick(logits, sample, temperature, g)  # (1,)
        idx = torch.cat([idx, nxt[None].to(idx.device)], dim=1)  # (1, T+1)
        if on_token:
            on_token()
    return idx[0, len(ids):].tolist()


def pick(logits, sample: bool, temperature: float, g):
    """The next token of logits (V,): the argmax, or a draw from softmax(logits / temperature)."""
    if sample:
        return torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=g)  # (1,)
    return logits.argmax(-1, keepdim=True)  # (1,)


@torch.no_grad()
def generate_cached(model, ids, n_tokens: int, hook=None, vectors=(None,), sample: bool = False,
                    temperature: float = 1.0, seed: int = 0, on_token=None, logits=None) -> list:
    """`generate` with a key/value cache, for len(vectors) continuations of `ids` at once:
    row r adds vectors[r] (D,) at `hook` at every position but BOS (None: nothing), as
    {hook: add_hook(vectors[r])} does in `generate`. The rows run as one batch: the prompt
    once, then one position per row and token. Each row draws from a generator of its own
    seeded with `seed`, so a row samples what a run of its own would. Returns the rows' new
    ids; logits: a list to append each step's (R, V) to."""
    if sample and not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if len(ids) + n_tokens > model.n_ctx:
        raise ValueError(f"{len(ids)} prompt + {n_tokens} new tokens exceed the context of {model.n_ctx}")
    device, R = model_device(model), len(vectors)
    push = None if hook is None or all(v is None for v in vectors) else torch.stack(
        [torch.zeros(model.d_model) if v is None else v.detach().cpu().float() for v in vectors])[:, None]  # (R, 1, D)
    gens = [torch.Generator().manual_seed(seed) for _ in range(R)]  # as in generate: the same draws per row
    new_ids, cache, out = torch.tensor([ids] * R, device=device), None, [[] for _ in range(R)]  # new_ids (R, S)
    for _ in range(n_tokens):
        first = 1 if cache is None else 0  # BOS is position 0 of the prompt's run only
        hooks = {hook: add_hook(push, first)} if push is not None else None
        resid, cache = forward_cached(model, new_ids, cache, hooks)  # (R, S, D)
        step_logits = model.unembed(resid[:, -1:])[:, -1].float().cpu()  # (R, V)
        if logits is not None:
            logits.append(step_logits)
        nxt = torch.cat([pick(step_logits[r], sample, temperature, gens[r]) for r in range(R)])  # (R,)
        for r in range(R):
            out[r].append(nxt[r].item())
        new_ids = nxt[:, None].to(device)  # (R, 1)
        if on_token:
            on_token(R)
    return out


def steer(model, tokenizer, hsae, latent: int, strength: float, prompt: str, n_tokens: int = 30,
          typical: float = 1.0, sample: bool = False, temperature: float = 1.0, seed: int = 0,
          verbose: bool = False) -> dict:
    """Unsteered, steered and control (random direction, same norm) continuations of
    `prompt`; strength is in units of `typical` (the latent's typical activation, SAE units)."""
    ids = encode_prompt(tokenizer, prompt)
    vec = steering_vector(hsae, latent, strength * typical)  # (D,)
    bar, done = (Progress("generating", 3 * n_tokens, "tokens") if verbose else None), [0]

    def tick(n):
        done[0] += n
        bar.update(done[0])

    rand = torch.randn(vec.shape, generator=torch.Generator().manual_seed(seed))  # (D,)
    rand = rand / rand.norm() * vec.norm()  # a random direction, same norm: the control
    out = {"prompt": prompt, "latent": latent, "strength": strength, "added_norm": vec.norm().item()}
    names, vectors = ("unsteered", "steered", "control"), (None, vec, rand)
    # One thread: a step's products are (3, D) rows against the weights, too small to share
    # out; on a busy 2-core machine the threads' hand-offs made 10 steps take 47-66 s
    # instead of 3.5 s (measured, SmolLM2). The threads of everything else stay as set.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = generate_cached(model, ids, n_tokens, hsae.hook, vectors, sample, temperature, seed,
                               on_token=tick if bar else None)  # the three continuations as one batch
    finally:
        torch.set_num_threads(threads)
    for name, new in zip(names, rows):
        out[f"{name}_ids"] = new
        out[name] = tokenizer.decode(new)
    if bar:
        bar.close(done[0])
    return out


def run(cfg) -> dict:
    """`python -m minisae steer` (cfg: minisae.configs.SteerConfig); with cfg.out, what it
    prints to stdout is also written to cfg.out/steer-{latent}.txt."""
    src = cfg.check().source  # the settings, before anything loads (SteerConfig.check)
    hsae, model, tok = load_with_model(src.sae, src.model, src.layer, src.site, src.weights, src.device,
                                       latents=[cfg.latent])  # a bad latent fails before the model loads
    encode_prompt(tok, cfg.prompt)  # and so does an empty prompt
    stats = stored_stats(model, tok, hsae, src)
    typical = typical_from_stats(stats, cfg.latent, cfg.unit)
    out = steer(model, tok, hsae, cfg.latent, cfg.strength, cfg.prompt, cfg.new_tokens, typical,
                cfg.sample, cfg.temperature, cfg.seed, verbose=True)
    text = (f"latent {cfg.latent} at {hsae.hook}: {cfg.unit} activation {typical:.3f} (SAE units, on "
            f"{stats['sample']}); adding {cfg.strength:g} x that along W_dec[{cfg.latent}], norm "
            f"{out['added_norm']:.3f} in raw units\n"
            f"prompt:    {cfg.prompt!r}\nunsteered: {out['unsteered']!r}\nsteered:   {out['steered']!r}\n"
            f"random direction, same norm (control): {out['control']!r}\n")
    print(text, end="")
    if cfg.out is not None:
        path = Path(cfg.out) / f"steer-{cfg.latent}.txt"
        atomic_write_text(path, text)
        print(f"wrote {path}", file=sys.stderr)
    return {**out, "typical": typical, "sample": stats["sample"]}
