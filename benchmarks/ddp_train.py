"""SAE training samples/s in 1 process against N processes (torch.distributed), and on a
GPU against that GPU's own bf16 matmul rate.

Scope: the full training step of minisae.train.train (forward, loss, backward with DDP's
gradient all-reduce, decoder constraint, Adam, dead-latent bookkeeping with its
all-reduce) on synthetic activations already in memory, for ReLU and TopK at one shape
(default D=512, F=4096, global batch 4096). CPU: 1 process with all the cores against N
processes (gloo on 127.0.0.1) with cores / N threads each, the same global batch, so the
ratio is what data parallelism buys on this machine (on one CPU it mostly cannot: the
cores are shared, and the all-reduce of the gradients, 2*D*F floats per step, is extra
work). GPU (when one is there, --device cuda): one process, fp32 and bf16 autocast, next
to the GPU's measured bf16 matmul rate: the fraction of the roofline a dense step
(12*D*F FLOP per sample) reaches. Timings: the median step after warm-up steps; on a
shared machine compare ratios from one run.

    python benchmarks/ddp_train.py [--procs 2] [--d 512] [--latents 4096] [--batch 4096] [--steps 20]
    python benchmarks/ddp_train.py --device cuda
"""

import argparse
import os
import socket
import statistics
import sys
import time

import torch

from minisae import distributed, utils
from minisae.sae import make_sae
from minisae.train import TrainConfig, train

SETTINGS = {"relu": dict(sparsity_coef=1.0), "topk": dict(k=32)}


def step_times(variant, args, device, rank=0, world=1, group=None):
    """Seconds per step of `train` (median over the timed steps) on this rank's share."""
    sae = make_sae(variant, args.d, args.latents, seed=0, **SETTINGS[variant]).to(device)
    b = args.batch // world
    x = torch.randn(b, args.d, generator=torch.Generator().manual_seed(rank)).to(device)  # (b, D)
    stamps = []

    def batches():
        while True:
            if device.type == "cuda":
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())
            yield x

    n = args.warmup + args.steps
    cfg = TrainConfig(n_samples=n * args.batch, batch_size=args.batch, lr=1e-4, bf16=args.bf16, log_every=n,
                      lr_warmup_frac=0.0, coef_warmup_frac=0.0)
    train(sae, batches(), cfg, log=False, group=group)
    if device.type == "cuda":
        torch.cuda.synchronize()
    stamps.append(time.perf_counter())
    gaps = [b - a for a, b in zip(stamps[args.warmup:], stamps[args.warmup + 1:])]
    return statistics.median(gaps)


def worker(rank, world, port, args, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(max(1, args.threads // world))
    group = distributed.from_env(torch.device("cpu"))
    out = {v: step_times(v, args, torch.device("cpu"), rank, world, group) for v in SETTINGS}
    if rank == 0:
        queue.put(out)
    torch.distributed.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def matmul_rate(device, dtype, n=4096, repeats=10):
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * n ** 3 * repeats / (time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--latents", type=int, default=4096)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (CPU runs)")
    p.add_argument("--device", default="cpu", help="cpu (1 vs --procs processes) or cuda (one GPU)")
    args = p.parse_args()
    device = utils.resolve_device(args.device)
    shape = f"D={args.d}, F={args.latents}, global batch {args.batch}"
    if device.type == "cuda":
        peak = {dt: matmul_rate(device, dt) for dt in (torch.float32, torch.bfloat16)}
        print(f"{torch.cuda.get_device_name(device)}: matmul {peak[torch.float32] / 1e12:.1f} TFLOP/s fp32 "
              f"(TF32 {'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'}), "
              f"{peak[torch.bfloat16] / 1e12:.1f} TFLOP/s bf16; {shape}")
        print("| variant | precision | samples/s | dense-step FLOP/s | of the bf16 matmul roofline |")
        print("|---|---|---|---|---|")
        for bf16 in (False, True):
            args.bf16 = bf16
            for v in SETTINGS:
                sps = args.batch / step_times(v, args, device)
                flops = 12 * args.d * args.latents * sps
                print(f"| {v} | {'bf16' if bf16 else 'fp32'} | {sps:,.0f} | {flops / 1e12:.1f} T | "
                      f"{flops / peak[torch.bfloat16]:.0%} |")
        return
    torch.set_num_threads(args.threads)
    one = {v: step_times(v, args, device) for v in SETTINGS}
    ctx = torch.multiprocessing.get_context("spawn")
    queue = ctx.SimpleQueue()
    torch.multiprocessing.start_processes(worker, args=(args.procs, free_port(), args, queue), nprocs=args.procs,
                                          join=True, start_method="spawn")
    many = queue.get()
    print(f"CPU, {args.threads} threads in all, {shape}, torch {torch.__version__}"
          f"{', bf16 autocast' if args.bf16 else ''}; load average {os.getloadavg()[0]:.1f}")
    print(f"| variant | 1 process samples/s | {args.procs} processes samples/s | ratio |")
    print("|---|---|---|---|")
    for v in SETTINGS:
        a, b = args.batch / one[v], args.batch / many[v]
        print(f"| {v} | {a:,.0f} | {b:,.0f} | {b / a:.2f}x |")


if __name__ == "__main__":
    sys.exit(main())
