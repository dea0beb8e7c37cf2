"""Small helpers every part of minisae shares: one progress line, one atomic file write,
one cache directory, the device a model lives on, matplotlib without a display.

None of these know anything about SAEs; they are here so that there is one copy of each.
"""

import os
import shutil
import signal
import sys
import time
from pathlib import Path

import torch


class Progress:
    """A '\\r'-updated progress line on stderr: done/total, rate, ETA; at most 2 per second.

        bar = Progress("scanning", total=len(contexts), unit="contexts")
        bar.update(done)          # redraws at most twice a second
        bar.close(done)           # the last line, with the time it took
    """

    def __init__(self, label: str, total: int, unit: str = "tokens", scale: float = 1.0):
        self.label, self.total, self.unit, self.scale = label, total, unit, scale  # scale: e.g. 1e6 for MB
        self.t0 = self.last = time.time()

    def update(self, done: int, force: bool = False, extra: str = ""):
        now = time.time()
        if not force and now - self.last < 0.5:
            return
        self.last = now
        rate = done / max(now - self.t0, 1e-9)
        eta = (self.total - done) / rate if rate > 0 and self.total else float("inf")
        s = self.scale
        digits = 0 if rate / s >= 10 else 2
        fmt = (lambda v: f"{v / s:,.1f}") if s != 1 else (lambda v: f"{v:,}")
        total = f"/{fmt(self.total)}" if self.total else ""
        eta_text = f", ETA {eta:.0f}s" if self.total else ""
        print(f"\r{self.label}: {fmt(done)}{total} {self.unit}{extra}, {rate / s:,.{digits}f} {self.unit}/s"
              f"{eta_text} ", end="", file=sys.stderr, flush=True)

    def close(self, done: int, extra: str = ""):
        self.update(done, force=True, extra=extra)
        print(f"(done in {time.time() - self.t0:.1f}s)", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    """Where downloads and the tokenised corpus are kept: $MINISAE_CACHE or ~/.cache/minisae."""
    return Path(os.environ.get("MINISAE_CACHE") or Path.home() / ".cache" / "minisae")


def atomic_write(path, write) -> None:
    """Write via a temporary file in the same directory, then rename: a reader never sees
    half a file, and a killed writer leaves the old file (or none), never a broken one.
    `write(f)` receives the open binary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        crash_point(f"write:{path.name}")  # the kill tests stop here: the old file must survive
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def crash_point(name: str) -> None:
    """Fault injection for the kill tests (tests/system/test_kill.py): when $MINISAE_CRASH_AT
    equals `name`, the process kills itself here with SIGKILL, as the OOM killer or a
    power cut would: no cleanup, no finally blocks. Does nothing otherwise."""
    if os.environ.get("MINISAE_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def atomic_write_text(path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def process_alive(pid: int) -> bool:
    """Whether process `pid` is running (another user's counts: we may not signal it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def left_by_dead_process(path) -> bool:
    """Whether a temporary's name (".NAME.PID.tmp", ".NAME.PID.part", ...) holds the PID of
    a process no longer running: a writer that was killed. Not this process's own."""
    pid = next((int(t) for t in reversed(Path(path).name.split(".")) if t.isdigit()), None)
    return pid is not None and pid != os.getpid() and not process_alive(pid)


def remove_stale(folder, pattern: str = ".*.tmp") -> list:
    """Delete what killed processes left in `folder`: the entries matching `pattern`
    (".NAME.PID.tmp", ".NAME.PID.part", ...), files or directories, left_by_dead_process.
    Those of running processes (another writer at work) and of this one are kept.
    Returns the removed paths."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for p in folder.glob(pattern):
        if not left_by_dead_process(p):
            continue
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
        except OSError:
            pass  # a read-only folder or a race with another cleaner: the next run tries again
    return removed


def model_device(model):
    """The device of a module's first parameter (CPU for a module without parameters)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def pyplot():
    """matplotlib.pyplot with the file-only Agg backend: figures are written, never shown."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def resolve_device(spec: str = "auto") -> torch.device:
    """'auto' (CUDA if available, else MPS, else CPU), 'cpu', 'cuda', 'cuda:N' or 'mps' ->
    a torch.device; ValueError before any work if that device is not there."""
    spec = str(spec or "auto").strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ValueError(f"unknown device {spec!r}; valid: auto, cpu, cuda, cuda:N, mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {spec}: CUDA is not available here (no GPU, or a CPU-only torch); "
                             "use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"cuda:0..cuda:{torch.cuda.device_count() - 1}")
    elif device.type == "mps":
        if getattr(torch.backends, "mps", None) is None or not torch.backends.mps.is_available():
            raise ValueError(f"--device {spec}: MPS (Apple GPU) is not available here; use --device cpu or auto")
    elif device.type != "cpu":
        raise ValueError(f"unknown device {spec!r}; valid: auto, cpu, cuda, cuda:N, mps")
    return device
