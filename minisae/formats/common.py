"""What every SAE layout shares: reading cfg.json and the weights with the checks a file
from elsewhere deserves, and writing a directory atomically.

Before anything is allocated, cfg.json's sizes must be positive integers, every tensor the
architecture needs must be in the safetensors header with exactly the shape those sizes
imply and a float dtype, and nothing else may be there; the loaded weights must be
finite. Every problem is one ValueError naming the file. A directory is written under a
temporary sibling name and renamed into place when complete, so a killed writer never
leaves a half-written SAE that a later run would reuse.
"""

import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import torch

from minisae.models import safetensors
from minisae.utils import crash_point, left_by_dead_process

FLOAT_DTYPES = ("F32", "F64", "F16", "BF16")  # safetensors names; F16/BF16 are read as float32
MAX_CFG_BYTES = 64 << 20  # cfg.json holds settings and a mean activation: kilobytes, not gigabytes
MAX_CFG_DEPTH = 16  # SAELens and minisae nest three levels (metadata.minisae.settings)


def is_sparsify_cfg(path) -> bool:
    try:
        cfg = read_cfg(path)
    except ValueError:
        return False  # read_cfg reports it again when the SAELens reader opens it
    return "architecture" not in cfg and "num_latents" in cfg


SAE_FILES = {"cfg.json", "sae_weights.safetensors", "sae.safetensors"}  # what an SAE directory may hold


def write_dir(path, cfg: dict, tensors: dict, weights_name: str, check=None) -> Path:
    """Write cfg.json and the weights into `.NAME.PID.tmp` next to `path`, check it with
    check(tmp) (the layout's own reader: a folder it would reject is never put in place),
    then replace `path` by two renames: the old SAE (a directory or an old .pt) to
    `.NAME.PID.old`, the new one to `path`.

    A reader sees the old SAE or the new one, never a half-written one. POSIX has no atomic
    swap of two directories, so a kill between the two renames leaves `path` missing for a
    moment; tidy() (run by the next write or load of an SAE in that folder, and by every
    listing of a folder of SAEs) then renames the old SAE back, and deletes what killed
    writers left. (A symlink swapped by one atomic rename would close that moment, at the
    price of an SAE that is a link to a hidden folder: we chose plain folders.)"""
    path = Path(path)
    if path.is_dir() and not {p.name for p in path.iterdir()} <= SAE_FILES:
        raise ValueError(f"{path} exists and holds more than an SAE: not replacing it; choose another name")
    if path.exists() and not path.is_dir() and path.suffix != ".pt":
        raise ValueError(f"{path} is a file, not an SAE: not replacing it; choose another name")
    path.parent.mkdir(parents=True, exist_ok=True)
    tidy(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    old = path.with_name(f".{path.name}.{os.getpid()}.old")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        safetensors.save_safetensors(tmp / weights_name, tensors)
        (tmp / "cfg.json").write_text(json.dumps(cfg, indent=1), encoding="utf-8")
        for name in (weights_name, "cfg.json"):
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        if check is not None:
            try:
                check(tmp)
            except ValueError as e:
                raise ValueError(f"{path}: not written, its own reader rejects it: "
                                 f"{str(e).replace(str(tmp), str(path))}") from None
        crash_point(f"write:{path.name}")  # the kill tests stop here: the old SAE must survive
        if os.path.lexists(path):
            path.rename(old)  # the old SAE: a directory, or a single-file .pt
        crash_point(f"swap:{path.name}")  # ... and here, between the renames: tidy() puts it back
        tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if os.path.lexists(old) and not os.path.lexists(path):
            old.rename(path)  # the write failed after the first rename: the old SAE back
        remove(old)
    return path


def tidy(folder) -> None:
    """Finish what killed writers of SAEs left in `folder`: an old SAE moved aside
    (`.NAME.PID.old`) whose NAME is missing is renamed back (the kill came between
    write_dir's two renames); every other `.NAME.PID.old` and `.NAME.PID.tmp` of a process
    no longer running is deleted. Only what looks like an SAE is touched (a folder of SAE
    files, an old .pt file). Does nothing where it may not write."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for p in sorted(folder.glob(".*.*.old")) + sorted(folder.glob(".*.*.tmp")):
        target = folder / p.name[1:].rsplit(".", 2)[0]  # .NAME.PID.old -> NAME
        try:
            sae_like = p.is_dir() and not p.is_symlink() and {q.name for q in p.iterdir()} <= SAE_FILES or \
                p.is_file() and target.suffix == ".pt"
            if not sae_like or not left_by_dead_process(p):
                continue
            if p.suffix == ".old" and not os.path.lexists(target):
                p.rename(target)
            else:
                remove(p)
        except OSError:
            pass  # an unreadable or read-only folder: the SAE there is still the old one or the new one


def remove(path) -> None:
    """Delete a file or a directory tree, if it is there."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.unlink(path)


def regular_file(path, what: str) -> os.stat_result:
    """os.stat of `path`, or ValueError saying exactly why it cannot be read as `what`:
    missing, a directory, a FIFO or device (which could block a reader), a symlink loop."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        dangling = " (a symlink to nothing)" if os.path.islink(path) else ""
        raise ValueError(f"{path}: missing{dangling}; {what}") from None
    except OSError as e:  # ELOOP, EACCES, ENAMETOOLONG, ...
        raise ValueError(f"{path}: cannot be read ({e.strerror}); {what}") from None
    if stat.S_ISDIR(st.st_mode):
        raise ValueError(f"{path}: is a directory, not a file; {what}")
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{path}: is not a regular file (a FIFO, socket or device); {what}")
    return st


def read_cfg(path) -> dict:
    """cfg.json as a dict, or ValueError naming the file. The size is checked on the open
    file before anything is read, and at most MAX_CFG_BYTES + 1 bytes are ever read."""
    path = Path(path)
    regular_file(path, "an SAE directory needs its cfg.json")
    try:
        # O_NONBLOCK: a FIFO put there after the check above cannot hang the open
        with os.fdopen(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb") as f:
            st = os.fstat(f.fileno())  # the file opened, not whatever the name points to now
            if not stat.S_ISREG(st.st_mode):
                raise ValueError(f"{path}: is not a regular file; an SAE directory needs its cfg.json")
            if st.st_size > MAX_CFG_BYTES:
                raise ValueError(f"{path}: {st.st_size} bytes, too large for a config (limit {MAX_CFG_BYTES})")
            raw = f.read(MAX_CFG_BYTES + 1)
    except OSError as e:
        raise ValueError(f"{path}: cannot be read ({e.strerror})") from None
    if len(raw) > MAX_CFG_BYTES:  # it grew after the check
        raise ValueError(f"{path}: more than {MAX_CFG_BYTES} bytes, too large for a config")
    try:
        cfg = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ValueError(f"{path}: not valid JSON: {str(e)[:200]}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: must hold a JSON object, got {type(cfg).__name__}")
    if nesting(cfg) > MAX_CFG_DEPTH:
        raise ValueError(f"{path}: nested more than {MAX_CFG_DEPTH} levels deep; an SAE config is flat")
    return cfg


def nesting(value) -> int:
    """How deeply lists and objects nest in a JSON value, counted without recursion."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        v, depth = todo.pop()
        if isinstance(v, (dict, list)):
            deepest = max(deepest, depth)
            todo.extend((c, depth + 1) for c in (v.values() if isinstance(v, dict) else v))
    return deepest


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
    path = Path(path)
    regular_file(path, "the SAE's weights file is not there")
    header, _, _ = safetensors.read_header(path)  # ValueError naming the file for a malformed one
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
    for name, arr in safetensors.load_safetensors(path, list(shapes)).items():
        t = torch.from_numpy(np.array(arr, dtype=np.float64 if wide else np.float32))
        if not torch.isfinite(t).all():
            raise ValueError(f"{path}: tensor {name} holds NaN or Inf values")
        out[name] = t
    return out
