"""Gemma Scope's layout (Lieberum et al. 2024): one JumpReLU SAE per params.npz.

    DIR/params.npz    W_enc (D, F), W_dec (F, D), b_enc (F,), b_dec (D,), threshold (F,)

The Gemma Scope tutorial computes, with nothing taken from the input first,

    pre = x W_enc + b_enc,   f = 1[pre > threshold] * ReLU(pre),   x_hat = f W_dec + b_dec

which is minisae's JumpReLU SAE (pre = W_enc (x - b_dec) + b_enc) with b_enc' = b_enc +
b_dec W_enc, since x W_enc = (x - b_dec) W_enc + b_dec W_enc, and theta = threshold: exact.
The file names neither model nor hook; the hub folder does
(google/gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71): layer_L of a "-res"
repository reads blocks.L.hook_resid_post, of a "-mlp" one blocks.L.hook_mlp_out.

A .npz is a zip of .npy files: each member's header (shape, dtype) is checked, and its
size against what that header implies, before any array is read, and nothing is unpickled.
"""

import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from minisae.formats.common import regular_file
from minisae.sae import make_sae

NAMES = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")


def headers(path) -> dict:
    """name -> (shape, numpy dtype) of every array in the .npz at `path`, from the headers only."""
    regular_file(path, "a Gemma Scope SAE is a params.npz file")
    try:
        with zipfile.ZipFile(path) as zf:
            out = {}
            for info in zf.infolist():
                with zf.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    read = {(1, 0): np.lib.format.read_array_header_1_0,
                            (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                    if read is None:
                        raise ValueError(f"{path}: {info.filename}: .npy version {version} is not supported")
                    shape, _, dtype = read(f)
                if info.file_size > int(np.prod(shape)) * dtype.itemsize + 65_536:
                    raise ValueError(f"{path}: {info.filename} holds {info.file_size} bytes, more than its "
                                     f"header's {list(shape)} {dtype} need")
                out[info.filename.removesuffix(".npy")] = (tuple(shape), dtype)
            return out
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise ValueError(f"{path}: not a readable .npz file ({e})") from None


def load(path) -> tuple:
    """(JumpReLU SAE, meta) from a Gemma Scope params.npz (or the folder holding it)."""
    path = Path(path)
    path = path / "params.npz" if path.is_dir() else path
    info = headers(path)
    if set(info) != set(NAMES):
        raise ValueError(f"{path}: a Gemma Scope params.npz holds exactly {list(NAMES)}; this one holds "
                         f"{sorted(info)[:12]}")
    D, F = info["W_enc"][0] if len(info["W_enc"][0]) == 2 else (0, 0)
    want = {"W_enc": (D, F), "W_dec": (F, D), "b_enc": (F,), "b_dec": (D,), "threshold": (F,)}
    for name, shape in want.items():
        got, dtype = info[name]
        if got != shape or dtype.kind != "f" or not D or not F:
            raise ValueError(f"{path}: {name} is {list(got)} {dtype}; W_enc's shape makes it a float array "
                             f"of shape {list(shape)}")
    with np.load(path, allow_pickle=False) as z:
        t = {n: torch.from_numpy(np.array(z[n], dtype=np.float32)) for n in NAMES}
    for name, v in t.items():
        if not torch.isfinite(v).all():
            raise ValueError(f"{path}: {name} holds NaN or Inf values")
    sae = make_sae("jumprelu", D, F)
    with torch.no_grad():
        sae.W_enc.copy_(t["W_enc"].T)  # (F, D)
        sae.W_dec.copy_(t["W_dec"])
        sae.b_enc.copy_(t["b_enc"] + t["b_dec"] @ t["W_enc"])  # (F,): the input is not shifted by b_dec
        sae.b_dec.copy_(t["b_dec"])
        sae.activation.theta.copy_(t["threshold"])
    return sae, {"model": None, "hook": hook_of(path), "scale": 1.0, "max_norm": None, "mean": None,
                 "origin": "gemma-scope"}


def hook_of(path):
    """'.../gemma-scope-2b-pt-res/layer_20/...' -> 'blocks.20.hook_resid_post'; None if unsure."""
    text = str(Path(path).resolve())
    layer = re.search(r"/layer_(\d+)/", text)
    site = re.search(r"gemma-scope-[^/]*-(res|mlp)(?:-canonical)?/", text)
    if not (layer and site):
        return None
    return f"blocks.{layer[1]}.hook_{'resid_post' if site[1] == 'res' else 'mlp_out'}"
