"""SAE files: which layout a path holds; load, save and convert.

minisae writes an SAE as a directory in SAELens's layout, and reads three layouts:

    DIR/cfg.json + DIR/sae_weights.safetensors     SAELens 6.x (minisae's own format)
                                                   -> minisae/formats/saelens.py
    DIR/cfg.json + DIR/sae.safetensors             EleutherAI sparsify, one DIR per hook point
                                                   -> minisae/formats/sparsify.py
    FILE.pt                                        minisae's old torch.save dictionary (read only;
                                                   `python -m minisae convert FILE.pt DIR` rewrites it)
                                                   -> minisae/formats/legacy.py
    FILE.pt, DIR/ae.pt (+ DIR/config.json)         openai/sparse_autoencoder's and dictionary_learning's
                                                   state dicts (read only) -> minisae/formats/foreign_pt.py
    DIR/params.npz                                 Gemma Scope's JumpReLU SAEs (read only)
                                                   -> minisae/formats/npz.py
    hf:OWNER/REPO/PATH[@REVISION]                  either directory layout on the Hugging Face hub,
                                                   downloaded once into the cache (minisae/models/hub.py)
    saelens:RELEASE/ID                             a SAELens release name, e.g.
                                                   saelens:gpt2-small-res-jb/blocks.8.hook_resid_pre: the hub
                                                   folder SAELens's table names, its config overrides applied
                                                   (minisae/formats/releases.py)

    load(path)                    -> (sae, meta)   meta: model, hook, scale, max_norm, mean, layout, ...
    save(sae, path, layout, **meta)                fold meta['scale'] into the weights, write DIR
    convert(src, dst, to, force)                   load any layout, save as `to`
    sae_entries(folder)           -> [path]        the SAEs of a folder (an lm run's saes/), no temporaries

An SAE is written only over nothing, an empty folder or an SAE minisae wrote (`force`:
also over a .pt file or another tool's SAE folder), and read back by its own reader
before it replaces anything; a write killed half-way leaves the old SAE (common.write_dir).

A file from elsewhere deserves the same suspicion as a download: the checks every
layout shares (cfg.json, the weights' header, atomic directory writes) are in
minisae/formats/common.py. The SAE class itself neither saves nor loads: these functions
and HookedSAE.save / HookedSAE.load (minisae/pipeline/hooked_sae.py) are the entry points.
"""

import os
import zipfile
from pathlib import Path

from minisae.formats import foreign_pt, legacy, npz, releases, saelens, sparsify
from minisae.formats.common import MAX_CFG_BYTES, SAE_FILES, is_sparsify_cfg, read_cfg, regular_file, tidy, write_dir
from minisae.formats.saelens import SAELENS_METADATA
from minisae.models.hub import DOWNLOAD_TIMEOUT, hub_file, parse_hub_ref
from minisae.models.safetensors import read_header
from minisae.sae import part_settings

LAYOUTS = {"saelens": saelens, "sparsify": sparsify}  # the layouts minisae writes
READERS = {**LAYOUTS, "pt": foreign_pt, "npz": npz}  # and the ones it reads: old .pt files, Gemma Scope's .npz
HUB_PREFIX = "hf:"


# ---------------------------------------------------------------- which layout

def detect(path) -> str:
    """'saelens', 'sparsify' or 'pt' for a local path; ValueError if it is none of them."""
    p = Path(path)
    if p.is_dir():
        if os.path.lexists(p / "sae_weights.safetensors"):  # lexists: its reader names a dangling link
            return "saelens"
        if os.path.lexists(p / "sae.safetensors"):
            return "sparsify"
        if os.path.lexists(p / "params.npz"):
            return "npz"
        if os.path.lexists(p / "ae.pt"):
            return "pt"
        if not os.path.lexists(p / "cfg.json"):  # one that is a directory or a FIFO: its reader says so
            several = sorted(d.name for d in p.iterdir() if (d / "cfg.json").is_file())
            if several:  # a sparsify run: one folder per hook point
                raise ValueError(f"{p} is not an SAE but holds {len(several)} ({', '.join(several[:6])}"
                                 f"{', ...' if len(several) > 6 else ''}): name one, e.g. {p / several[0]}")
            raise ValueError(f"{p}: no cfg.json; an SAE directory holds cfg.json and sae_weights.safetensors "
                             "(SAELens) or sae.safetensors (sparsify)")
        return "sparsify" if is_sparsify_cfg(p / "cfg.json") else "saelens"  # its reader names the missing file
    if p.is_file():
        if p.name == "cfg.json" or p.suffix == ".safetensors":
            return detect(p.parent)
        return "npz" if p.suffix == ".npz" else "pt"
    if os.path.lexists(p):
        regular_file(p, "an SAE is a directory or a .pt file")  # a FIFO, a symlink loop: say which
    raise ValueError(f"{p}: no such SAE file or directory")


def resolve(ref, timeout: float = DOWNLOAD_TIMEOUT) -> Path:
    """A local path for `ref`: itself, or for hf:OWNER/REPO/PATH[@REVISION] the cached
    download of that hub folder (cfg.json first, then the weights file its layout names),
    each file within `timeout` seconds and checked before it is cached: cfg.json must be
    a JSON object of at most MAX_CFG_BYTES, the weights a safetensors file. For
    saelens:RELEASE/ID, the folder SAELens's table names, with the files of its layout."""
    if releases.is_release(ref):
        r = releases.lookup(ref)
        if r.conversion is not None:  # Gemma Scope's params.npz, dictionary_learning's config.json + ae.pt
            checks = {"params.npz": npz.headers, "config.json": read_cfg, "ae.pt": zip_file}
            for name in r.files:
                local = hub_file(r.repo, f"{r.path}/{name}", timeout=timeout,
                                 max_bytes=MAX_CFG_BYTES if name == "config.json" else None, verify=checks[name])
            return Path(local).parent
        return hub_folder(r.repo, r.path, "main", timeout)  # its folder may hold what hf: names refuse (':')
    if not str(ref).startswith(HUB_PREFIX):
        return Path(ref)
    return hub_folder(*parse_hub_ref(str(ref)[len(HUB_PREFIX):]), timeout)


def hub_folder(repo: str, folder: str, revision: str, timeout: float) -> Path:
    """The cached download of a hub folder in SAELens's or sparsify's layout (see resolve)."""
    join = lambda name: f"{folder}/{name}" if folder else name
    cfg = Path(hub_file(repo, join("cfg.json"), revision, timeout=timeout, max_bytes=MAX_CFG_BYTES,
                        verify=read_cfg))
    weights = "sae.safetensors" if is_sparsify_cfg(cfg) else "sae_weights.safetensors"
    hub_file(repo, join(weights), revision, timeout=timeout, verify=read_header)
    return cfg.parent


def zip_file(path):
    """ValueError unless `path` is a zip archive (torch.save's format since torch 1.6)."""
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a torch.save file (a zip archive)")


# ---------------------------------------------------------------- load, save, convert

def load(path, timeout: float = DOWNLOAD_TIMEOUT) -> tuple:
    """(sae, meta) from any layout; the SAE in eval mode, float32 unless the file is float64.
    What a killed writer of this SAE left is tidied first (common.tidy: a replacement
    killed half-way leaves the old SAE)."""
    release = releases.lookup(path) if releases.is_release(path) else None  # an unknown name: before any download
    local = resolve(path, timeout)
    tidy(local.parent)
    layout = detect(local)
    if layout in LAYOUTS and local.is_file():  # DIR/cfg.json or DIR/*.safetensors: the directory is the SAE
        local = local.parent
    if layout == "pt" and local.is_dir():  # dictionary_learning's DIR/ae.pt (+ DIR/config.json)
        local = local / "ae.pt"
    if release is not None and layout == "saelens":  # the release's overrides, applied as SAELens applies them
        scale = {} if release.norm_scaling_factor is None else {"norm_scaling_factor": release.norm_scaling_factor}
        sae, meta = saelens.load(local, overrides={**release.overrides, **scale})
    else:
        sae, meta = READERS[layout].load(local)
    if release is not None and layout != "saelens":  # what the table says of a file that does not
        carried = {k: v for k, v in release.overrides.items() if k in SAELENS_METADATA}
        meta = {**meta, "model": meta.get("model") or release.model,
                "saelens_metadata": {**(meta.get("saelens_metadata") or {}), **carried}}
    return sae.eval(), {**meta, "layout": layout, "source": str(path)}


def save(sae, path, /, layout: str = "saelens", **meta) -> Path:
    """Write `sae` as a directory in `layout`, meta['scale'] (default 1) folded into the
    weights; the other meta (model, hook, max_norm, mean, anything else) goes into cfg.json."""
    return write(sae, path, layout, meta)


def write(sae, path, layout: str, meta: dict, force: bool = False) -> Path:
    """save(), the metadata as one dict. What is at `path` is replaced only if it is an SAE
    minisae wrote (or nothing, or an empty folder); `force` also replaces a .pt file or an
    SAE directory another tool wrote, never a folder holding other files. The folder is
    read back by the layout's own reader before it replaces anything (common.write_dir)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; minisae writes saelens or sparsify")
    if os.path.lexists(path) and not force and not written_by_minisae(path):
        raise ValueError(f"{path} exists and is not an SAE written by minisae: not replacing it "
                         "(choose another name, or `convert --force` replaces it)")
    cfg, tensors, weights_name = LAYOUTS[layout].to_files(sae, **meta)
    return write_dir(path, cfg, tensors, weights_name, check=LAYOUTS[layout].load)


def written_by_minisae(path) -> bool:
    """Whether `path` holds an SAE minisae wrote (its cfg.json has minisae's metadata, or
    an old minisae .pt file), or an empty folder: what save may replace without asking."""
    p = Path(path)
    if p.is_dir() and not p.is_symlink():
        names = {q.name for q in p.iterdir()}
        if not names:
            return True
        if "cfg.json" not in names or not names <= SAE_FILES:
            return False
        try:
            cfg = read_cfg(p / "cfg.json")
        except ValueError:
            return False
        md = cfg.get("metadata")
        return isinstance(cfg.get("minisae"), dict) or isinstance(md, dict) and isinstance(md.get("minisae"), dict)
    if p.is_file() and not p.is_symlink() and p.suffix == ".pt":
        try:
            legacy.load(p)
        except ValueError:
            return False
        return True
    return False


def sae_entries(folder) -> list:
    """The SAEs in a folder of them (an lm run's saes/): directories and .pt files, sorted,
    never a dot-named temporary of a writer; what killed writers left is tidied first."""
    tidy(folder)
    return sorted(p for p in Path(folder).iterdir()
                  if not p.name.startswith(".") and (p.is_dir() or p.suffix == ".pt"))


def convert(src, dst, to: str = "saelens", force: bool = False, timeout: float = DOWNLOAD_TIMEOUT) -> Path:
    """Read the SAE at `src` (any layout, a hub reference too: each file downloaded within
    `timeout` seconds) and write it to `dst` as `to`; what is at `dst` is replaced only if
    minisae wrote it, or with `force` (see write)."""
    sae, meta = load(src, timeout)
    keep = {k: v for k, v in meta.items() if k not in ("layout", "source", "settings", "variant")}
    out = write(sae, dst, to, keep, force)
    print(f"{src} ({meta['layout']}) -> {out} ({to}): {meta.get('model')} {meta.get('hook')}, "
          f"{sae.n_latents} latents, {type(sae.activation).__name__} {part_settings(sae.activation)}")
    return out
