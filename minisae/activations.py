"""Activations: run the language model once, keep one hook point's activations on disk.

    contexts (N_ctx, T) --model(stop_at=hook)--> acts (B, T, D)
        --drop position 0 (BOS)--> (B*(T-1), D) --* scale--> rows of a float32 .npy,
        written at seeded random positions, so the file is shuffled across contexts

Why these steps:
- stop_at: nothing after the hooked layer is computed (minisae.models.hooks).
- Drop the BOS position. The first position's activation is an outlier, often with a
  norm many times the others (attention sinks, Xiao et al. 2023); an SAE would spend
  latents and loss on it. The evaluation never replaces it either (minisae.evaluate).
- Scale. x_stored = scale * x_raw, with one scalar per file chosen so that
  E||x_stored|| = sqrt(D) (Anthropic, "Circuits Updates - April 2024", training SAEs;
  SAELens's `expected_average_only_in`). Then the sparsity coefficient and learning rate
  mean the same at every layer and model, whose raw norms differ by 10-100x. The scale
  is estimated on 64 contexts spread evenly through the data, stored in the sidecar and
  undone with x_raw = x_stored / scale.
- Shuffle. Consecutive tokens of a context are strongly correlated; an SAE batch should
  look like a sample of the whole corpus. Row j of the run goes to row perm[j] of the file.
- One pass, many SAEs: a sweep reads the same file (np.load(..., mmap_mode='r')).

Next to `acts.npy` a sidecar `acts.json` records model, hook, n_tokens, d, scale, the
compute dtype, the mean raw activation (for mean-ablation in minisae.evaluate) and the
corpus. Both files are written under temporary names and renamed when complete.
"""

import json
import math
import os
from pathlib import Path

import numpy as np
import torch

from minisae.data import Progress, _atomic_write


def model_device(model) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def hook_acts(model, idx, hook: str, bf16: bool = False) -> torch.Tensor:
    """The activation at `hook` for positions 1..T-1 (BOS dropped), float32 on CPU: (B, T-1, D)."""
    device = model_device(model)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        acts = model(idx.to(device), stop_at=hook)  # (B, T, D)
    acts = acts[:, 1:].float().cpu()  # (B, T-1, D)
    if not torch.isfinite(acts).all():
        raise ValueError(f"non-finite activations (NaN or Inf) at {hook}"
                         + (" under bf16 autocast; try bf16=False" if bf16 else ""))
    return acts


def estimate_scale(model, contexts, hook: str, n_contexts: int = 64, batch_size: int = 8,
                   bf16: bool = False) -> float:
    """sqrt(D) / mean ||x|| over positions >= 1 of n_contexts contexts spread evenly
    through `contexts` (the first few would all come from the same documents)."""
    pick = torch.linspace(0, len(contexts) - 1, min(n_contexts, len(contexts))).long()
    norms = []
    for i in range(0, len(pick), batch_size):
        acts = hook_acts(model, contexts[pick[i:i + batch_size]], hook, bf16)  # (B, T-1, D)
        norms.append(acts.double().norm(dim=-1).flatten())
    mean_norm = torch.cat(norms).mean().item()
    if not mean_norm > 0:
        raise ValueError(f"activations at {hook} are all zero; cannot scale them to norm sqrt(D)")
    return math.sqrt(acts.shape[-1]) / mean_norm


def sidecar_path(path) -> Path:
    return Path(path).with_suffix(".json")


def collect_activations(model, contexts, hook: str, path, model_name: str = "", corpus=None,
                        batch_size: int = 8, normalize: bool = True, bf16: bool = False,
                        seed: int = 0, verbose: bool = True) -> dict:
    """Run `model` over `contexts` (N_ctx, T), store the hook's activations at `path`
    (.npy, (N_ctx*(T-1), D) float32, shuffled) and return the sidecar's metadata.

    corpus: a dict describing the text (split, max_tokens, ...) copied into the sidecar.
    """
    if contexts.ndim != 2 or contexts.shape[1] < 2 or len(contexts) == 0:
        raise ValueError(f"contexts must be (N, T) with N >= 1 and T >= 2, got {tuple(contexts.shape)}")
    if hasattr(model, "hook_names") and hook not in model.hook_names():
        raise ValueError(f"unknown hook point {hook!r}; valid names look like {model.hook_names()[0]!r}")
    path = Path(path)
    n_ctx, T = contexts.shape
    n_tokens = n_ctx * (T - 1)
    scale = estimate_scale(model, contexts, hook, batch_size=batch_size, bf16=bf16) if normalize else 1.0
    perm = np.random.default_rng(seed).permutation(n_tokens)  # row j of the run -> row perm[j]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    bar = Progress(f"activations at {hook}", n_tokens) if verbose else None
    out, total = None, None
    try:
        for start in range(0, n_ctx, batch_size):
            acts = hook_acts(model, contexts[start:start + batch_size], hook, bf16)  # (B, T-1, D)
            rows = acts.reshape(-1, acts.shape[-1]).double()  # (B*(T-1), D)
            if out is None:  # the width is known once the model has run
                out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32,
                                                shape=(n_tokens, rows.shape[1]))
                total = torch.zeros(rows.shape[1], dtype=torch.float64)  # (D,)
            total += rows.sum(0)
            first = start * (T - 1)
            out[perm[first:first + len(rows)]] = (rows * scale).float().numpy()
            if bar:
                bar.update(first + len(rows))
        out.flush()
        d = out.shape[1]
        del out
        meta = {
            "model": model_name, "hook": hook, "n_tokens": n_tokens, "d": d,
            "scale": scale, "normalized": normalize, "dtype": "float32",
            "compute_dtype": "bfloat16" if bf16 else "float32",
            "n_contexts": n_ctx, "ctx_len": T, "bos_dropped": True, "seed": seed,
            "mean": (total / n_tokens).tolist(),  # raw units, for mean-ablation
            "corpus": corpus or {}, "file": path.name,
        }
        os.replace(tmp, path)
        _atomic_write(sidecar_path(path), lambda f: f.write(json.dumps(meta, indent=1).encode()))
    finally:
        if tmp.exists():
            tmp.unlink()
    if bar:
        bar.close(n_tokens)
    return meta


def load_activations(path, model_name=None, hook=None):
    """(acts, meta): the stored activations as a read-only memmap (N, D) float32, scaled
    (divide by meta['scale'] for raw units), and the sidecar. Checks that the two agree,
    and the model and hook if given."""
    path = Path(path)
    side = sidecar_path(path)
    if not path.exists():
        raise ValueError(f"no activation file at {path}")
    if not side.exists():
        raise ValueError(f"{path} has no sidecar {side.name}; it is incomplete or not ours")
    with open(side, encoding="utf-8") as f:
        meta = json.load(f)
    acts = np.load(path, mmap_mode="r")  # (N, D)
    if acts.dtype != np.float32 or acts.shape != (meta["n_tokens"], meta["d"]):
        raise ValueError(f"sidecar {side.name} says ({meta['n_tokens']}, {meta['d']}) float32 "
                         f"but {path.name} holds {acts.shape} {acts.dtype}: mismatched files")
    for key, want in (("model", model_name), ("hook", hook)):
        if want is not None and meta[key] != want:
            raise ValueError(f"{path.name} holds {key} {meta[key]!r}, not {want!r}")
    return acts, meta


def iter_batches(acts, batch_size: int, seed: int = 0, device="cpu", block_batches: int = 8,
                 drop_last: bool = False):
    """One epoch of float32 batches (batch_size, D) from stored activations.

    The file is already shuffled, so we read contiguous blocks of block_batches batches
    (fast on a memmap), visit the blocks in a seeded random order and permute the rows
    inside each block. Another seed gives another order for the next epoch.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    rng = np.random.default_rng(seed)
    block = batch_size * block_batches
    for start in rng.permutation(np.arange(0, len(acts), block)):
        rows = np.asarray(acts[start:start + block])  # (block, D), read from disk
        rows = rows[rng.permutation(len(rows))]
        for i in range(0, len(rows), batch_size):
            batch = rows[i:i + batch_size]
            if drop_last and len(batch) < batch_size:
                continue
            yield torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(device)
