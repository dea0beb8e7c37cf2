"""Small helpers every part of minisae shares: one progress line, one atomic file write,
one cache directory, the device a model lives on, matplotlib without a display.

None of these know anything about SAEs; they are here so that there is one copy of each.
"""

import os
import sys
import time
from pathlib import Path


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
    """Fault injection for the kill tests (tests/test_kill.py): when $MINISAE_CRASH_AT
    equals `name`, the process kills itself here with SIGKILL, as the OOM killer or a
    power cut would: no cleanup, no finally blocks. Does nothing otherwise."""
    if os.environ.get("MINISAE_CRASH_AT") == name:
        import signal
        os.kill(os.getpid(), signal.SIGKILL)


def atomic_write_text(path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def model_device(model):
    """The device of a module's first parameter (CPU for a module without parameters)."""
    import torch
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def pyplot():
    """matplotlib.pyplot with the file-only Agg backend: figures are written, never shown."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt
