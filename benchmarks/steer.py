"""Chapter 6's `steer` command, as written, before and after: its wall and CPU time, where
they go (the calibration scan, the generation), in one run.

Scope: CPU, the real SmolLM2 and chapter 5's small layer-15 SAE (run chapter 5's small
`layers` command first), the command of docs/06_features.md:

    python -m minisae steer --sae runs/layers_small/saes/blocks.15.hook_resid_post-topk-k32 \\
        --latent 2091 --strength 8 --tokens 20 --prompt "def forward(self, x):\\n"

without its --out DIR (which the other checkout may not have), run three times, each a
fresh process (imports, model loading, everything a user waits for):

    before        another checkout of minisae (--before DIR, e.g. made with
                  `git archive COMMIT | tar -x -C DIR`): there the command scans 8,192
                  tokens for the latent's typical activation at every call and generates by
                  re-running the whole sequence for each token
    after, first  this checkout on a fresh copy of the SAE folder: it scans once and keeps
                  every latent's statistics in typical_activations.json beside the SAE, and
                  generates with a key/value cache
    after, kept   this checkout again: the statistics are read from that file

Wall time of each process (time.perf_counter around it), its CPU time (user + system,
resource.getrusage of the children), and the scan's and the generation's own wall times
from the command's progress lines. Generation rate: the 3 x 20 new tokens over the
generation's wall time. The three runs also print their continuations, which must agree.
OMP_NUM_THREADS is passed on as it is set for this script (unset: torch's default).

    python benchmarks/steer.py --before /tmp/old [--sae runs/layers_small/saes/...]
"""

import argparse
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAE = "runs/layers_small/saes/blocks.15.hook_resid_post-topk-k32"
ARGS = ["--latent", "2091", "--strength", "8", "--tokens", "20", "--prompt", "def forward(self, x):\n"]
DONE = re.compile(r"(scanning|generating): [^\r\n]*?\(done in ([\d.]+)s\)")


def run(cwd, sae):
    """(wall s, CPU s, {'scanning': s, 'generating': s}, stdout) of one `steer` process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "minisae", "steer", "--sae", str(sae), *ARGS], cwd=cwd,
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(cwd)})
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode:
        raise SystemExit(f"steer failed in {cwd}:\n{p.stderr[-2000:]}")
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return wall, cpu, {name: float(s) for name, s in DONE.findall(p.stderr)}, p.stdout


def continuations(stdout):
    return [line for line in stdout.splitlines() if line.startswith(("unsteered:", "steered:", "random direction"))]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", type=Path, required=True, help="the other checkout (its root folder)")
    parser.add_argument("--sae", type=Path, default=ROOT / SAE)
    args = parser.parse_args()
    if not (args.sae / "cfg.json").is_file():
        raise SystemExit(f"{args.sae}: no SAE there; run chapter 5's small `layers` command first")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    print(f"`steer` as chapter 6 writes it, each run a fresh process; this checkout {commit.strip()} (+ uncommitted "
          f"changes if any), before: {args.before}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start")
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / args.sae.name
        shutil.copytree(args.sae, copy, ignore=shutil.ignore_patterns("typical_activations.json"))
        rows = [("before", *run(args.before, args.sae)), ("after, first", *run(ROOT, copy)),
                ("after, kept", *run(ROOT, copy))]
    print(f"load average {os.getloadavg()[0]:.2f} at the end\n")
    print(f"{'run':<14} {'wall s':>7} {'CPU s':>6} {'scan s':>7} {'generate s':>11} {'tokens/s':>9}")
    for name, wall, cpu, phases, _ in rows:
        gen = phases.get("generating")
        print(f"{name:<14} {wall:>7.1f} {cpu:>6.1f} {phases.get('scanning', 0):>7.1f} {gen:>11.1f} {60 / gen:>9.2f}")
    (_, w0, c0, p0, out0), (_, w1, c1, p1, out1), (_, w2, c2, p2, out2) = rows
    print(f"\nafter, kept / before: wall {w0 / w2:.1f}x faster, CPU {c0 / c2:.1f}x; "
          f"generation per token {p0['generating'] / p2['generating']:.1f}x faster "
          f"({p0['generating'] / p1['generating']:.1f}x in the first run)")
    same = continuations(out0) == continuations(out1) == continuations(out2)
    print(f"the three runs' continuations agree: {'yes' if same else 'NO'}")
    print("\nafter, kept, its output:\n" + out2)
    if not same:
        print("before, its output:\n" + out0)


if __name__ == "__main__":
    main()
