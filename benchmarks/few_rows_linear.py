"""The models' product for a few rows: torch's x W^T (F.linear) against (W x^T)^T
(minisae.models.linear), at SmolLM2's and GPT-2's weight shapes, for 1 to 8 rows.

Scope: one process, fp32 (--dtype bfloat16: the same in bf16, where minisae keeps
F.linear), the CPU, torch's threads as set (OMP_NUM_THREADS). Each cell
is the best of 3 passes over enough copies of the weight (about 300 MB) that the weights
come from memory, not the cache, as in a model's forward; the ratio is F.linear's time
over the other order's, measured in the same pass; a * marks the cells where
minisae.models.linear takes the other order (other_order).

    python benchmarks/few_rows_linear.py [--rows 1,2,3,4,5,6,8] [--dtype float32]
"""

import argparse
import time

import torch
import torch.nn.functional as F

from minisae.models.linear import other_order

SHAPES = {"SmolLM2 q/o": (576, 576), "SmolLM2 gate/up": (1536, 576), "SmolLM2 down": (576, 1536),
          "SmolLM2 unembed": (49152, 576), "GPT-2 c_fc": (3072, 768), "GPT-2 c_proj (mlp)": (768, 3072),
          "GPT-2 unembed": (50257, 768)}


def best_seconds(fn, weights, passes: int = 3) -> float:
    best = float("inf")
    for _ in range(passes):
        t0 = time.perf_counter()
        for w in weights:
            fn(w)
        best = min(best, time.perf_counter() - t0)
    return best / len(weights)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="1,2,3,4,5,6,8", help="row counts to time")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    rows, dtype = [int(r) for r in args.rows.split(",")], getattr(torch, args.dtype)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.dtype}; F.linear time / (W x^T)^T time "
          f"(>1: the other order is faster); * where minisae takes the other order"
          + ("" if dtype == torch.float32 else " in float32 (in this dtype it keeps F.linear)"))
    print(f"{'weight (out, in)':32s}" + "".join(f"{f'{r} rows':>10s}" for r in rows))
    gen = torch.Generator().manual_seed(0)
    for name, (out, inp) in SHAPES.items():
        copies = max(1, int(3e8 // (out * inp * 4)))
        weights = torch.randn(copies, out, inp, generator=gen).to(dtype)  # (copies, out, in)
        cells = []
        for r in rows:
            x = torch.randn(r, inp, generator=gen).to(dtype)  # (R, in)
            ref = best_seconds(lambda w: F.linear(x, w), weights)
            other = best_seconds(lambda w: (w @ x.T).T.contiguous(), weights)
            cells.append(f"{ref / other:8.2f}x" + ("*" if other_order(r, out, inp) else " "))
        print(f"{f'{name} {out}x{inp}':32s}" + " ".join(cells))
        del weights


if __name__ == "__main__":
    main()
