"""The stored activation file: one hook point's activations on disk, and what reads them back.

    acts.npy   (N_keep, D) float32, row i = x_stored = scale * x_raw of one kept position,
               in a seeded random order (minisae.pipeline.activations writes it)
    acts.json  its sidecar: what made the rows, the scale that undoes them (x_raw = x_stored / scale)
               and how fast the collection ran (those keys: minisae.pipeline.activations)

Next to `acts.npy` a sidecar `acts.json` records model, hook, n_tokens (kept rows), d,
scale, max_norm (raw units) and how many sink rows were dropped, the compute dtype, the mean raw activation (for mean-ablation in minisae.pipeline.evaluate) and the
corpus. Both files are written under temporary names and renamed when complete.

load_activations reads the file back as a read-only memmap and checks it against its
sidecar; reusable says whether a stored file was made with the settings asked for (a run
then skips the collection); remove_stale_temporaries deletes what a killed collection left.
"""

import json
from pathlib import Path

import numpy as np

from minisae.utils import remove_stale


def sidecar_path(path) -> Path:
    return Path(path).with_suffix(".json")


def load_activations(path, model_name=None, hook=None):
    """(acts, meta): the stored activations as a read-only memmap (N, D) float32, scaled
    (divide by meta['scale'] for raw units), and the sidecar. Checks that the two agree,
    that the file holds every row it claims (a killed copy may be short), and the model
    and hook if given; ValueError naming the file otherwise."""
    path = Path(path)
    side = sidecar_path(path)
    if not path.exists():
        raise ValueError(f"no activation file at {path}")
    if not side.exists():
        raise ValueError(f"{path} has no sidecar {side.name}; it is incomplete or not ours")
    try:
        with open(side, encoding="utf-8") as f:
            meta = json.load(f)
        n, d = int(meta["n_tokens"]), int(meta["d"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"sidecar {side} is damaged or not ours: {e}") from None
    try:
        acts = np.load(path, mmap_mode="r")  # (N, D)
    except (OSError, ValueError) as e:  # e.g. "mmap length is greater than file size": a short file
        raise ValueError(f"activation file {path} is damaged or truncated: {e}") from None
    if acts.dtype != np.float32 or acts.shape != (n, d):
        raise ValueError(f"sidecar {side.name} says ({n}, {d}) float32 "
                         f"but {path.name} holds {acts.shape} {acts.dtype}: mismatched files")
    for key, want in (("model", model_name), ("hook", hook)):
        if want is not None and meta.get(key) != want:
            raise ValueError(f"{path.name} holds {key} {meta.get(key)!r}, not {want!r}")
    return acts, meta


def reusable(path, want: dict):
    """(meta, None) if the activation file at `path` loads and its sidecar agrees with every
    key of `want` (what produced it: model, weights, hook, dtype, corpus, context length,
    normalisation); else (None, the reason it cannot be reused)."""
    if not Path(path).exists():
        return None, "none stored yet"
    try:
        _, meta = load_activations(path)
    except ValueError as e:
        return None, str(e)
    diff = [k for k in want if meta.get(k) != want[k]]
    if diff:
        return None, "made with other settings: " + ", ".join(f"{k} {meta.get(k)!r} (now {want[k]!r})" for k in diff)
    return meta, None


def remove_stale_temporaries(folder) -> list:
    """Delete the temporary files (".NAME.PID.tmp", ".NAME.PID.final.tmp") that a killed
    process left in `folder`: a real collection's can be several GB. Files of processes
    still running are kept. Returns the removed paths."""
    return remove_stale(folder, ".*.tmp")
