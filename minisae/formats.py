"""SAE files: which layout a path holds, the checks every reader shares, atomic writes.

minisae writes an SAE as a directory in SAELens's layout, and reads three layouts:

    DIR/cfg.json + DIR/sae_weights.safetensors     SAELens 6.x (minisae's own format)
                                                   -> minisae/saelens_format.py
    DIR/cfg.json + DIR/sae.safetensors             EleutherAI sparsify, one DIR per hook point
                                                   -> minisae/sparsify_format.py
    FILE.pt                                        minisae's old torch.save dictionary (read only;
                                                   `python -m minisae convert FILE.pt DIR` rewrites it)
    hf:OWNER/REPO/PATH[@REVISION]                  either directory layout on the Hugging Face hub,
                                                   downloaded once into the cache (minisae/models/hub.py)

    load(path)                    -> (sae, meta)   meta: model, hook, scale, max_norm, mean, layout, ...
    save(sae, path, layout, **meta)                fold meta['scale'] into the weights, write DIR
    convert(src, dst, to)                          load any layout, save as `to`

A file from elsewhere deserves the same suspicion as a download: before anything is
allocated, cfg.json's sizes must be positive integers, every tensor the architecture
needs must be in the safetensors header with exactly the shape those sizes imply and a
float dtype, and nothing else may be there; the loaded weights must be finite. Every
problem is one ValueError naming the file. A directory is written under a temporary
sibling name and renamed into place when complete, so a killed writer never leaves a
half-written SAE that a later run would reuse.
"""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

FLOAT_DTYPES = ("F32", "F64", "F16", "BF16")  # safetensors names; F16/BF16 are read as float32
MAX_CFG_BYTES = 64 << 20  # cfg.json holds settings and a mean activation: kilobytes, not gigabytes
HUB_PREFIX = "hf:"


# ---------------------------------------------------------------- which layout

def detect(path) -> str:
    """'saelens', 'sparsify' or 'pt' for a local path; ValueError if it is none of them."""
    p = Path(path)
    if p.is_dir():
        if (p / "sae_weights.safetensors").exists():
            return "saelens"
        if (p / "sae.safetensors").exists():
            return "sparsify"
        if not (p / "cfg.json").is_file():
            raise ValueError(f"{p}: no cfg.json; an SAE directory holds cfg.json and sae_weights.safetensors "
                             "(SAELens) or sae.safetensors (sparsify)")
        return "sparsify" if _is_sparsify_cfg(p / "cfg.json") else "saelens"  # its reader names the missing file
    if p.is_file():
        if p.name == "cfg.json" or p.suffix == ".safetensors":
            return detect(p.parent)
        return "pt"
    raise ValueError(f"{p}: no such SAE file or directory")


def _is_sparsify_cfg(path) -> bool:
    try:
        cfg = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False  # read_cfg reports it when the SAELens reader opens it
    return isinstance(cfg, dict) and "architecture" not in cfg and "num_latents" in cfg


def resolve(ref) -> Path:
    """A local path for `ref`: itself, or for hf:OWNER/REPO/PATH[@REVISION] the cached
    download of that hub folder (cfg.json first, then the weights file its layout names)."""
    if not str(ref).startswith(HUB_PREFIX):
        return Path(ref)
    from minisae.models.hub import hub_file, parse_hub_ref
    repo, folder, revision = parse_hub_ref(str(ref)[len(HUB_PREFIX):])
    join = lambda name: f"{folder}/{name}" if folder else name
    cfg = Path(hub_file(repo, join("cfg.json"), revision))
    weights = "sae.safetensors" if _is_sparsify_cfg(cfg) else "sae_weights.safetensors"
    hub_file(repo, join(weights), revision)
    return cfg.parent


# ---------------------------------------------------------------- load, save, convert

def load(path) -> tuple:
    """(sae, meta) from any layout; the SAE in eval mode, float32 unless the file is float64."""
    local = resolve(path)
    layout = detect(local)
    if layout != "pt" and local.is_file():  # DIR/cfg.json or DIR/*.safetensors: the directory is the SAE
        local = local.parent
    if layout == "saelens":
        from minisae import saelens_format
        sae, meta = saelens_format.load(local)
    elif layout == "sparsify":
        from minisae import sparsify_format
        sae, meta = sparsify_format.load(local)
    else:
        sae, meta = load_legacy(local)
    return sae.eval(), {**meta, "layout": layout, "source": str(path)}


def save(sae, path, layout: str = "saelens", **meta) -> Path:
    """Write `sae` as a directory in `layout`, meta['scale'] (default 1) folded into the
    weights; the other meta (model, hook, max_norm, mean, anything else) goes into cfg.json."""
    if layout == "saelens":
        from minisae.saelens_format import to_files
    elif layout == "sparsify":
        from minisae.sparsify_format import to_files
    else:
        raise ValueError(f"unknown layout {layout!r}; minisae writes saelens or sparsify")
    cfg, tensors, weights_name = to_files(sae, **meta)
    return write_dir(path, cfg, tensors, weights_name)


def convert(src, dst, to: str = "saelens") -> Path:
    """Read the SAE at `src` (any layout, a hub reference too) and write it to `dst` as `to`."""
    from minisae.sae import part_settings
    sae, meta = load(src)
    keep = {k: v for k, v in meta.items() if k not in ("layout", "source", "settings", "variant")}
    out = save(sae, dst, to, **keep)
    print(f"{src} ({meta['layout']}) -> {out} ({to}): {meta.get('model')} {meta.get('hook')}, "
          f"{sae.n_latents} latents, {type(sae.activation).__name__} {part_settings(sae.activation)}")
    return out


def write_dir(path, cfg: dict, tensors: dict, weights_name: str) -> Path:
    """Write cfg.json and the weights into a temporary sibling directory, then rename it
    to `path` (replacing an old SAE there): a reader sees the old SAE or the new one."""
    from minisae.models.safetensors import save_safetensors
    path = Path(path)
    if path.is_dir() and not {p.name for p in path.iterdir()} <= {"cfg.json", "sae_weights.safetensors",
                                                                   "sae.safetensors"}:
        raise ValueError(f"{path} exists and holds more than an SAE: not replacing it; choose another name")
    if path.exists() and not path.is_dir() and path.suffix != ".pt":
        raise ValueError(f"{path} is a file, not an SAE: not replacing it; choose another name")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    old = path.with_name(f".{path.name}.{os.getpid()}.old")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_safetensors(tmp / weights_name, tensors)
        (tmp / "cfg.json").write_text(json.dumps(cfg, indent=1), encoding="utf-8")
        for name in (weights_name, "cfg.json"):
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        if path.is_dir() and not path.is_symlink():
            path.rename(old)
        elif path.exists():
            path.unlink()  # an old single-file SAE (.pt) at this name
        tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return path


# ---------------------------------------------------------------- shared checks

def read_cfg(path) -> dict:
    """cfg.json as a dict, or ValueError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: missing; an SAE directory needs its cfg.json")
    if path.stat().st_size > MAX_CFG_BYTES:
        raise ValueError(f"{path}: {path.stat().st_size} bytes, too large for a config (limit {MAX_CFG_BYTES})")
    try:
        cfg = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: must hold a JSON object, got {type(cfg).__name__}")
    return cfg


def positive_int(value, name: str, path) -> int:
    """A size or k from a config: a positive integer (JSON true is not one)."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{path}: {name} must be a positive integer, got {value!r:.60}")
    return value


def flag(value, name: str, path, default: bool) -> bool:
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ValueError(f"{path}: {name} must be true or false, got {value!r:.60}")
    return value


def read_tensors(path, shapes: dict) -> dict:
    """name -> torch tensor for exactly the tensors in `shapes` (name -> shape), each
    checked in the header (present, that shape, a float dtype, nothing extra) before any
    data is read. F16/BF16 become float32; the values must be finite."""
    from minisae.models.safetensors import load_safetensors, read_header
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: missing; the SAE's weights file is not there")
    header, _, _ = read_header(path)  # ValueError naming the file for a malformed one
    missing = [n for n in shapes if n not in header]
    if missing:
        raise ValueError(f"{path}: missing tensor(s) {missing}; it holds {sorted(header)}")
    extra = sorted(set(header) - set(shapes))
    if extra:
        raise ValueError(f"{path}: unexpected tensor(s) {extra} for this architecture (expected {sorted(shapes)})")
    for name, shape in shapes.items():
        dtype, got, _ = header[name]
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"{path}: tensor {name} has dtype {dtype}; minisae reads {', '.join(FLOAT_DTYPES)}")
        if got != tuple(shape):
            raise ValueError(f"{path}: tensor {name} has shape {list(got)}, but cfg.json's sizes "
                             f"make it {list(shape)}")
    wide = any(header[n][0] == "F64" for n in shapes)
    out = {}
    for name, arr in load_safetensors(path, list(shapes)).items():
        t = torch.from_numpy(np.array(arr, dtype=np.float64 if wide else np.float32))
        if not torch.isfinite(t).all():
            raise ValueError(f"{path}: tensor {name} holds NaN or Inf values")
        out[name] = t
    return out


# ---------------------------------------------------------------- minisae's old .pt files

def load_legacy(path) -> tuple:
    """(sae, meta) from the torch.save dictionary minisae wrote before it used SAELens's
    layout: {'variant', 'd', 'n_latents', 'settings', 'state_dict', 'meta'}. The stored
    shapes are checked against d and n_latents before the SAE is built."""
    from minisae.sae import make_sae
    how = f"(rewrite it with `python -m minisae convert {path} NEW_DIR`)"
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for a damaged or foreign file
        raise ValueError(f"cannot read SAE file {path}: not an SAE directory and not a minisae .pt file ({e})") from None
    if not isinstance(ckpt, dict) or not {"variant", "d", "n_latents", "state_dict"} <= ckpt.keys():
        raise ValueError(f"{path} is not an SAE file written by minisae")
    d, F = positive_int(ckpt["d"], "d", path), positive_int(ckpt["n_latents"], "n_latents", path)
    state, settings = ckpt["state_dict"], ckpt.get("settings", {})
    if not isinstance(state, dict) or not isinstance(settings, dict) or not isinstance(ckpt.get("meta", {}), dict):
        raise ValueError(f"{path}: state_dict, settings and meta must be dictionaries {how}")
    for name, shape in (("W_enc", (F, d)), ("W_dec", (F, d)), ("b_enc", (F,)), ("b_dec", (d,))):
        if not isinstance(state.get(name), torch.Tensor) or tuple(state[name].shape) != shape:
            raise ValueError(f"{path}: weights do not match the saved configuration: {name} should be {list(shape)} {how}")
    settings = {k: v for k, v in settings.items() if k != "n_latents"}  # make_sae passes it
    try:
        sae = make_sae(ckpt["variant"], d, F, **settings).to(state["W_enc"].dtype)
        sae.load_state_dict(state)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"{path}: weights do not match the saved configuration: {e}") from None
    return sae, ckpt.get("meta", {})
