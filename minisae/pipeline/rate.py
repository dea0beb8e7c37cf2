"""How fast an activation collection ran, against what the device could do.

    forward_flop_per_token = FLOPs of one counted forward (up to the stop layer) / its B*T tokens
    tokens_per_s           = n_contexts * T / the whole collection's wall seconds
    achieved_flop_per_s    = forward_flop_per_token * tokens_per_s
    of_roofline            = achieved_flop_per_s / matmul_flop_per_s

The FLOPs come from torch's own counter (`torch.utils.flop_counter.FlopCounterMode`), not
a hand formula: every matmul (2 m n k) and attention's QK^T and AV (each 2 B H T^2 hd,
counted over the full T x T as torch counts it, not halved for the causal mask). The
counter knows the CUDA attention kernels but not the CPU one, so `ATTENTION_ON_CPU`
adds it. The roofline is the device's matmul rate, measured in-process in the compute
dtype on a (4096, D) x (D, 4D) product at the model's width: a transformer forward is
mostly such products, so no forward can beat it by much, and of_roofline says how much
of the device the collection used. Near 1: the forward is compute-bound at the matmul
rate; far below: something else bounds the rate (small batches, kernel launches, or the
host's copies and writes; the `*_s` keys of the sidecar split the time).

Batch size: `auto_batch_size` picks contexts per forward from the free device memory
(rule in its docstring); on the CPU it keeps 8.
"""

import time

import torch
from torch.utils.flop_counter import FlopCounterMode

MAX_AUTO_BATCH = 256  # contexts per forward at most, whatever the memory
# the sidecar keys that say how fast a collection ran, not what it stored: they differ run to run
RATE_KEYS = ("tokens_per_s", "forward_flop_per_token", "achieved_flop_per_s", "matmul_flop_per_s",
             "of_roofline", "collect_s", "norms_s", "forward_s", "copy_s", "write_s")


def _sdpa_flop(q, k, v, *args, **kwargs) -> int:
    """QK^T and AV of attention on shapes q (B, H, Tq, hd), k (B, Hk, Tk, hd), v (B, Hk, Tk, hv)."""
    b, h, tq, hd = q
    return 2 * b * h * tq * k[2] * hd + 2 * b * h * tq * k[2] * v[3]


ATTENTION_ON_CPU = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flop}


def flop_counter():
    """A FlopCounterMode that also counts the CPU attention kernel; .get_total_flops() after."""
    with FlopCounterMode(display=False):  # its first count imports torch._dynamo (1-2 s): done here, off the clock
        torch.ones(1, 1) @ torch.ones(1, 1)
    return FlopCounterMode(display=False, custom_mapping=ATTENTION_ON_CPU)


def sync(device):
    """Wait for the device's queued work (CUDA and MPS run asynchronously), so a clock read after it is honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


@torch.no_grad()
def matmul_flop_per_s(d: int, device, dtype=torch.float32, rows: int = 4096, repeats: int = 3,
                      budget_s: float = 0.2) -> float:
    """The device's matmul rate in FLOP/s: the best of `repeats` timed (rows, d) x (d, 4d)
    products in `dtype`, after one untimed warm-up; fewer once budget_s is spent (a CPU
    takes ~0.1 s per product at D = 576). On a GPU, where one such product takes tens of
    microseconds, each timing covers 20 products queued back to back, so the launch and
    the synchronisation do not count as matmul time."""
    device = torch.device(device)
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(rows, d, generator=g).to(device, dtype)  # (4096, D)
    b = torch.randn(d, 4 * d, generator=g).to(device, dtype)  # (D, 4D)
    inner = 1 if device.type == "cpu" else 20
    best, start = float("inf"), time.perf_counter()
    for i in range(repeats + 1):
        sync(device)
        t = time.perf_counter()
        for _ in range(inner):
            a @ b
        sync(device)
        if i:  # the first call warms up the kernels
            best = min(best, (time.perf_counter() - t) / inner)
            if time.perf_counter() - start > budget_s:
                break
    return 2 * rows * d * 4 * d / max(best, 1e-9)


def auto_batch_size(device, d: int, ctx_len: int, n_hooks: int = 1) -> int:
    """Contexts per forward for a collection. CPU (and MPS): 8. CUDA: a quarter of the free
    memory (torch.cuda.mem_get_info) over (64 + 2 n_hooks) float32 tensors of (T, D) per
    context, a generous bound on what a forward up to the stop layer keeps alive (the
    residual stream, the MLP's 4D hidden, q/k/v, the hooked copies), capped at
    MAX_AUTO_BATCH and at least 1. SmolLM2 (D 576, T 128) on a free 80 GB GPU: 256."""
    device = torch.device(device)
    if device.type != "cuda":
        return 8
    free, _ = torch.cuda.mem_get_info(device)
    per_context = (64 + 2 * n_hooks) * ctx_len * d * 4  # bytes
    return max(1, min(MAX_AUTO_BATCH, int(free // 4 // per_context)))


def rate_report(n_tokens: int, flop_per_token: float, seconds: dict, d: int, device, bf16: bool) -> dict:
    """The sidecar's rate keys, all numbers: tokens_per_s (n_tokens run through the model
    over seconds['collect_s'], the whole wait), forward_flop_per_token, achieved_flop_per_s,
    matmul_flop_per_s (measured now), of_roofline, and the seconds themselves."""
    tokens_per_s = n_tokens / max(seconds["collect_s"], 1e-9)
    peak = matmul_flop_per_s(d, device, torch.bfloat16 if bf16 else torch.float32)
    achieved = flop_per_token * tokens_per_s
    return {"tokens_per_s": tokens_per_s, "forward_flop_per_token": flop_per_token,
            "achieved_flop_per_s": achieved, "matmul_flop_per_s": peak, "of_roofline": achieved / peak,
            **seconds}


def rate_line(r: dict) -> str:
    """One line for the user: the rate, where the time went, and the rate against the roofline."""
    return (f"{r['tokens_per_s']:,.0f} tokens/s in {r['collect_s']:.1f}s (forward {r['forward_s']:.1f}s, "
            f"copy to host {r['copy_s']:.1f}s, write {r['write_s']:.1f}s, scale estimate {r['norms_s']:.1f}s); "
            f"{r['forward_flop_per_token'] / 1e6:.3g} MFLOP/token -> {r['achieved_flop_per_s'] / 1e12:.3g} "
            f"TFLOP/s = {100 * r['of_roofline']:.2g}% of the measured matmul rate "
            f"{r['matmul_flop_per_s'] / 1e12:.3g} TFLOP/s")
