"""Activations: run the language model once, keep one hook point's activations on disk.

    contexts (N_ctx, T) --model(stop_at=hook)--> acts (B, T, D)
        --drop position 0 (BOS) and attention sinks--> (N_keep, D) --* scale-->
        rows of a float32 .npy, in a seeded random order (shuffled across contexts)

Why these steps:
- stop_at: nothing after the hooked layer is computed (minisae.models.hooks).
- Drop the BOS position. The first position's activation is an outlier, often with a
  norm many times the others (attention sinks, Xiao et al. 2023); an SAE would spend
  latents and loss on it. The evaluation never replaces it either (minisae.pipeline.evaluate).
- Drop the other attention sinks too: positions whose norm exceeds MAX_NORM_MULTIPLE x the
  median norm. Measured on SmolLM2's layer-15 residual stream (`python -m minisae norms`,
  figures/norms_smollm2_l15.json): of 16,256 held-out positions after BOS, 16,206 are
  below 3x the median norm and 45 above 30x (up to 143x: a document separator
  <|endoftext|> inside a context, the first "\n" or "." of a context); 5 lie between, a
  "," right after <|endoftext|> at 10.2x and one <|endoftext|> at 27.4x. The sinks hold
  most of the variance, so an SAE trained on them learns little else (low FVU, no loss
  recovered). Same rule as dictionary_learning's `max_activation_norm_multiple`
  (saprmarks/dictionary_learning PR #52). `sae_positions` is the one definition of the
  positions an SAE reads; evaluation, features and links use it too.
- Scale. x_stored = scale * x_raw, with one scalar per file chosen so that
  E||x_stored|| = sqrt(D) over the kept positions (Anthropic, "Circuits Updates - April 2024", training SAEs;
  SAELens's `expected_average_only_in`). Then the sparsity coefficient and learning rate
  mean the same at every layer and model, whose raw norms differ by 10-100x. The scale
  and the sink threshold max_norm are estimated on 64 contexts spread evenly through
  the data, stored in the sidecar; x_raw = x_stored / scale undoes the scale.
- Shuffle. Consecutive tokens of a context are strongly correlated; an SAE batch should
  look like a sample of the whole corpus. Row j of the run goes to row perm[j] of the file.
- One pass, many SAEs: a sweep reads the same file (np.load(..., mmap_mode='r')).

The file, its sidecar `acts.json` (what made the rows, their scale) and how they are read
back and reused: minisae.pipeline.store.

The sidecar also says how fast the collection ran (printed as one line; minisae.pipeline.rate):
batch_size (contexts per forward), tokens_per_s (n_contexts x T over the whole wait),
forward_flop_per_token (torch's count, first batch, up to the stop layer),
achieved_flop_per_s (their product), matmul_flop_per_s (the device's, measured in the
compute dtype), of_roofline (achieved / matmul), and seconds: collect_s (all), norms_s
(scale estimate), forward_s (model and sink test, on its device), copy_s (to the host),
write_s (float64 sum and scale, memmap writes, pass 2).
"""

import contextlib
import json
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from minisae.pipeline import rate
from minisae.pipeline.store import sidecar_path
from minisae.utils import Progress, atomic_write, crash_point, model_device

MAX_NORM_MULTIPLE = 10.0  # positions above this x the median norm are attention sinks


@torch.no_grad()
def hooks_acts(model, idx, hooks: list, bf16: bool = False, on_device: bool = False) -> dict:
    """{hook: activation at positions 1..T-1 (BOS dropped), float32 on CPU (B, T-1, D)},
    read by hooks in one forward pass that stops after the deepest of them
    (on_device: left on the model's device, for work there before the copy)."""
    got = {}

    def reader(name):
        def read(act):  # act (B, T, D); returning None only reads it
            got[name] = act[:, 1:].float() if on_device else act[:, 1:].float().cpu()  # (B, T-1, D)
        return read

    device = model_device(model)
    last = max(hooks, key=model.hook_names().index)  # nothing after it is computed
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        model(idx.to(device), hooks={h: reader(h) for h in hooks}, stop_at=last)
    for h, acts in got.items():  # all finite <=> min and max finite (both propagate NaN); 40x faster than isfinite
        if not torch.stack([acts.amin(), acts.amax()]).isfinite().all():
            raise ValueError(f"non-finite activations (NaN or Inf) at {h}"
                             + (" under bf16 autocast; try bf16=False" if bf16 else ""))
    return got


def hook_acts(model, idx, hook: str, bf16: bool = False) -> torch.Tensor:
    """The activation at `hook` for positions 1..T-1 (BOS dropped), float32 on CPU: (B, T-1, D)."""
    return hooks_acts(model, idx, [hook], bf16)[hook]


def sae_positions(act, max_norm=None, bos: bool = True):
    """(B, T) bool: the positions an SAE reads and replaces in act (B, T, D): every
    position but 0 (BOS) whose norm is at most max_norm (raw units; None: no limit).
    bos=False: act starts after the BOS position (act[:, 1:] of a context)."""
    keep = torch.ones(act.shape[:2], dtype=torch.bool, device=act.device)  # (B, T)
    if bos:
        keep[:, 0] = False
    if max_norm is not None:
        keep &= act.float().norm(dim=-1) <= max_norm
    return keep


def estimate_norms(model, contexts, hooks: list, n_contexts: int = 64, batch_size: int = 8,
                   bf16: bool = False, max_norm_multiple=MAX_NORM_MULTIPLE) -> dict:
    """{hook: (scale, max_norm)} over positions >= 1 of n_contexts contexts spread evenly
    through `contexts` (the first few would all come from the same documents):
    max_norm = max_norm_multiple x the median norm (None: keep every position) and
    scale = sqrt(D) / the mean norm of the positions at or under max_norm."""
    pick = torch.linspace(0, len(contexts) - 1, min(n_contexts, len(contexts))).long()
    norms = {h: [] for h in hooks}
    for i in range(0, len(pick), batch_size):
        for h, acts in hooks_acts(model, contexts[pick[i:i + batch_size]], hooks, bf16).items():
            norms[h].append(acts.double().norm(dim=-1).flatten())  # (B*(T-1),)
    out = {}
    for h in hooks:
        n = torch.cat(norms[h])
        max_norm = None if max_norm_multiple is None else max_norm_multiple * n.median().item()
        mean_norm = (n if max_norm is None else n[n <= max_norm]).mean().item()
        if not mean_norm > 0:
            raise ValueError(f"activations at {h} are all zero; cannot scale them to norm sqrt(D)")
        out[h] = (math.sqrt(model.d_model) / mean_norm, max_norm)
    return out


def estimate_scale(model, contexts, hook: str, n_contexts: int = 64, batch_size: int = 8,
                   bf16: bool = False) -> float:
    return estimate_norms(model, contexts, [hook], n_contexts, batch_size, bf16)[hook][0]


def scatter_rows_(out, where, rows, pool=None, threads: int = 1):
    """out[where] = rows (float64 rounded to out's float32 as numpy assigns), in `threads`
    slices on `pool`: numpy releases the GIL as it copies, so the first write to each page
    of the memmap, pass 1's main cost on the host, runs on several cores at once."""
    if pool is None or threads < 2:
        out[where] = rows
        return
    cuts = np.linspace(0, len(rows), threads + 1).astype(int)
    list(pool.map(lambda a, b: out.__setitem__(where[a:b], rows[a:b]), cuts[:-1], cuts[1:]))


def collect_activations(model, contexts, hook: str, path, model_name: str = "", corpus=None,
                        batch_size=None, normalize: bool = True, bf16: bool = False,
                        seed: int = 0, verbose: bool = True,
                        max_norm_multiple=MAX_NORM_MULTIPLE, producer=None) -> dict:
    """Run `model` over `contexts` (N_ctx, T), store the hook's activations at `path`
    (.npy, (N_keep, D) float32, shuffled: every position but BOS and the sinks above
    max_norm_multiple x the median norm) and return the sidecar's metadata.

    corpus: a dict describing the text (split, max_tokens, ...) copied into the sidecar;
    producer: more keys for the sidecar that say what made the file (e.g. the weights);
    batch_size: contexts per forward, None: chosen for the device (rate.auto_batch_size).
    """
    return collect_many(model, contexts, [hook], [path], model_name, corpus, batch_size, normalize, bf16,
                        seed, verbose, max_norm_multiple, producer)[0]


def collect_many(model, contexts, hooks: list, paths: list, model_name: str = "", corpus=None,
                 batch_size=None, normalize: bool = True, bf16: bool = False,
                 seed: int = 0, verbose: bool = True, max_norm_multiple=MAX_NORM_MULTIPLE, producer=None) -> list:
    """`collect_activations` for several hooks in one pass over the model: paths[i] (+ its
    sidecar) holds hooks[i]; every file uses the same shuffle. Returns the metadata list.

    Pass 1 writes row j of the run (positions 1..T-1 of every context, in order) to row
    perm[j] of a temporary file and marks the sinks; pass 2 copies the other rows, in that
    shuffled order, to the final file (skipped when there is no sink to drop).
    Per batch: the sink test on the model's device (on a GPU its float32 norm may round
    differently from the host's, which matters only within a rounding of max_norm); the
    float32 rows to the host; there, in float64, their sum (for the mean) and the scale;
    numpy rounds them to float32 as it writes them (as torch's .float() does)."""
    if contexts.ndim != 2 or contexts.shape[1] < 2 or len(contexts) == 0:
        raise ValueError(f"contexts must be (N, T) with N >= 1 and T >= 2, got {tuple(contexts.shape)}")
    bad = [h for h in hooks if h not in model.hook_names()]
    if bad:
        raise ValueError(f"unknown hook point(s) {bad}; valid names look like {model.hook_names()[0]!r}")
    if len(hooks) != len(paths) or not hooks:
        raise ValueError("give one path per hook")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be positive or None (automatic), got {batch_size}")
    counter = rate.flop_counter()  # counts the first batch's forward
    clock = {k: 0.0 for k in ("norms_s", "forward_s", "copy_s", "write_s")}
    t = t0 = time.perf_counter()

    def tick(key):  # add the seconds since the last tick to clock[key]
        nonlocal t
        now = time.perf_counter()
        clock[key] += now - t
        t = now

    paths = [Path(p) for p in paths]
    n_ctx, T = contexts.shape
    n_rows = n_ctx * (T - 1)
    device = model_device(model)
    batch_size = batch_size or rate.auto_batch_size(device, model.d_model, T, len(hooks))
    norms = estimate_norms(model, contexts, hooks, batch_size=batch_size, bf16=bf16,
                           max_norm_multiple=max_norm_multiple)  # {hook: (scale, max_norm)}
    tick("norms_s")
    perm = np.random.default_rng(seed).permutation(n_rows)  # row j of the run -> row perm[j]
    tmps = [p.with_name(f".{p.name}.{os.getpid()}.tmp") for p in paths]
    finals = [p.with_name(f".{p.name}.{os.getpid()}.final.tmp") for p in paths]
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
    label = hooks[0] if len(hooks) == 1 else f"{len(hooks)} hooks"
    bar = Progress(f"activations at {label}", n_rows) if verbose else None
    outs, totals, sinks, done, metas = {}, {}, {}, {}, []
    threads = min(8, torch.get_num_threads())  # OMP_NUM_THREADS=1 keeps the writes on one core
    pool = ThreadPoolExecutor(threads) if threads > 1 else None
    try:
        for start in range(0, n_ctx, batch_size):  # pass 1
            first, idx = start * (T - 1), contexts[start:start + batch_size]
            with counter if start == 0 else contextlib.nullcontext():
                got = hooks_acts(model, idx, hooks, bf16, on_device=True)  # {h: (B, T-1, D)} on the device
            sink_of = {h: ~sae_positions(got[h], norms[h][1], bos=False).flatten() for h in hooks}  # (B*(T-1),)
            rate.sync(device)
            tick("forward_s")
            if start == 0:  # host buffers, reused: a fresh 100 MB tensor a batch costs a page fault per 4 KB
                D = got[hooks[0]].shape[-1]
                wide, spare = (torch.empty(batch_size * (T - 1), D, dtype=torch.float64) for _ in "ab")
                pinned = {h: torch.empty(batch_size, T - 1, D, pin_memory=True)
                          for h in hooks} if device.type == "cuda" else None  # each (B, T-1, D)
            if pinned:
                got = {h: pinned[h][:len(idx)].copy_(got[h]) for h in hooks}  # float32 (B, T-1, D)
            else:
                got = {h: got[h].cpu() for h in hooks}  # on the CPU: the same tensors
            sink_of = {h: sink_of[h].cpu() for h in hooks}
            tick("copy_s")
            for h, tmp in zip(hooks, tmps):
                rows, sink = wide[:sink_of[h].numel()], sink_of[h]  # (B*(T-1), D)
                rows.view(got[h].shape).copy_(got[h])  # float32 -> float64, exact
                if h not in outs:  # the width is known once the model has run
                    outs[h] = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32,
                                                        shape=(n_rows, rows.shape[1]))
                    totals[h] = torch.zeros(rows.shape[1], dtype=torch.float64)  # (D,)
                    sinks[h] = np.zeros(n_rows, dtype=bool)  # in file order
                keep = (~sink).nonzero().squeeze(1)  # (N_keep,): rows[~sink], copied into spare
                totals[h] += rows.sum(0) if len(keep) == len(rows) else \
                    torch.index_select(rows, 0, keep, out=spare[:len(keep)]).sum(0)
                where = perm[first:first + len(rows)]
                sinks[h][where] = sink.numpy()
                if normalize:
                    rows.mul_(norms[h][0])  # float64, rounded once to float32 below, as always
                scatter_rows_(outs[h], where, rows.numpy(), pool, threads)  # float64 -> float32 rows of the file
            tick("write_s")
            if bar:
                bar.update(first + len(rows))
            if start:
                crash_point("collect")  # the kill tests stop here, half-way through pass 1
        for h, tmp, final in zip(hooks, tmps, finals):
            src = outs.pop(h)
            n_keep, d = int((~sinks[h]).sum()), src.shape[1]
            if n_keep == 0:
                raise ValueError(f"every position at {h} is above max_norm; nothing to store")
            if n_keep == n_rows:  # pass 1's file is the final file: on disk before the rename
                src.flush()
            else:  # pass 2: the kept rows, in file order, to a file of their own (pass 1's never needs the disk)
                dst = np.lib.format.open_memmap(final, mode="w+", dtype=np.float32, shape=(n_keep, d))
                at, step = 0, 65_536
                for i in range(0, n_rows, step):
                    block = src[i:i + step][~sinks[h][i:i + step]]
                    dst[at:at + len(block)] = block
                    at += len(block)
                dst.flush()
                del dst
                tmp.unlink()
                tmp = final
            del src
            done[h] = (tmp, n_keep, d)
        tick("write_s")
        clock["collect_s"] = time.perf_counter() - t0  # the whole wait, both passes
        speed = rate.rate_report(n_ctx * T, counter.get_total_flops() / contexts[:batch_size].numel(),
                                 clock, model.d_model, device, bf16)
        for h, path in zip(hooks, paths):
            tmp, n_keep, d = done[h]
            meta = {
                "model": model_name, "hook": h, "n_tokens": n_keep, "d": d,
                "scale": norms[h][0] if normalize else 1.0, "normalized": normalize, "dtype": "float32",
                "compute_dtype": "bfloat16" if bf16 else "float32",
                "n_contexts": n_ctx, "ctx_len": T, "bos_dropped": True, "seed": seed,
                "max_norm": norms[h][1], "max_norm_multiple": max_norm_multiple, "n_sinks_dropped": n_rows - n_keep,
                "mean": (totals[h] / n_keep).tolist(),  # raw units, for mean-ablation
                "corpus": corpus or {}, "file": path.name, **(producer or {}),
                "batch_size": batch_size, **speed,  # how fast, not what: never compared for reuse
            }
            sidecar_path(path).unlink(missing_ok=True)  # an old sidecar must never describe the new rows
            os.replace(tmp, path)
            atomic_write(sidecar_path(path), lambda f: f.write(json.dumps(meta, indent=1).encode()))
            metas.append(meta)
    finally:
        if pool:
            pool.shutdown()
        outs.clear()  # close the memmaps before removing what is left of them
        for tmp in tmps + finals:
            if tmp.exists():
                tmp.unlink()
    if bar:
        bar.close(n_rows)
    if verbose:
        print(f"activations at {label}: {rate.rate_line(speed)}", file=sys.stderr)
    return metas
