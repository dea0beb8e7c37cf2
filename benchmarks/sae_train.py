"""SAE training speed of minisae.train.train against the machine's matmul roofline and,
where it is installed, against EleutherAI's sparsify, all measured in one run.

Scope: CPU (or --device cuda). The full training step of the real loop (data from memory, forward, loss,
backward, decoder constraint, Adam, dead-latent bookkeeping; no resampling), per variant,
at d = 768 x 6144 latents (batch 4096) and at two toy shapes (64 x 512, batch 4096;
256 x 512, batch 1024, the shape of `python -m minisae toy`). Random Gaussian batches.
Step time = the shortest interval between the loop's requests for the next batch, and
the matmul rate from the fastest of its repeats: on a machine shared with other jobs
the least-disturbed run is the best estimate of both. With one thread
(OMP_NUM_THREADS=1, recommended on a shared machine) every time is the process's CPU
time (time.process_time), which other jobs do not inflate; with more, wall time.

Roofline: the rate of one (B, D) x (D, F) matmul measured in this run (fp32 and bf16),
divided by the FLOP of a step: a dense step does 6 products of 2 B D F FLOP
(forward, and two each in the backward of encoder and decoder) = 12 D F per sample; a
TopK step whose decoder and its backward touch only the k selected rows needs 6 D F
(encoder forward and its two backward products). minisae's sparse path also keeps the
encoder's backward to the selected entries, so TopK can exceed its "roofline": the
fraction says how the step compares with that many dense multiply-adds.

sparsify (pip install --no-deps eai-sparsify einops natsort simple_parsing
docstring_parser accelerate): its SparseCoder and the step of its Trainer (forward with
the fused encoder and embedding_bag decoder, fvu loss, backward, parallel-gradient
removal, Adam, unit-norm decoder, did_fire bookkeeping), at the same shapes, torch and
threads. Its package __init__ imports the Trainer's data stack (datasets, schedulefree),
which the step does not use, so the benchmark loads sparsify.sparse_coder without it.
Its default optimizer is signum; we use Adam on both sides.

--breakdown: where the time of one step goes (each phase timed on its own, in the order
of SAE.loss and train; "rest" = the full step minus the phases: Python, allocation).
--crossover: TopK step time, sparse path against dense reference, for several k/F.

On a shared machine timings vary by 2x between runs: compare ratios within one run.

    python benchmarks/sae_train.py [--variants relu,topk] [--shapes big,toy64,toy256] [--steps 8]
    PYTHONPATH=/path/to/sparsify python benchmarks/sae_train.py --breakdown --crossover
"""

import argparse
import contextlib
import functools
import importlib
import importlib.util
import itertools
import sys
import types

import torch

import minisae.train
import timing  # benchmarks/timing.py
from minisae.sae import make_sae
from minisae.train import TrainConfig, train

DEVICE = torch.device("cpu")  # --device


def clock():
    return timing.clock(DEVICE)  # process time with one thread, else wall time after the device's work


SHAPES = {"big": (768, 6144, 4096, 32), "toy64": (64, 512, 4096, 32), "toy256": (256, 512, 1024, 6)}  # D, F, B, k
SETTINGS = {"relu": {"sparsity_coef": 1e-3}, "gated": {"sparsity_coef": 1e-3}, "jumprelu": {"sparsity_coef": 1e-3},
            "topk": {}, "batchtopk": {}, "matryoshka_batchtopk": {}}  # Matryoshka: the default ladder F/64 .. F
SPARSE = ("topk", "batchtopk", "matryoshka_batchtopk")


def matmul_flops(D, F, B, dtype, repeats=7) -> float:
    """FLOP/s of one (B, D) x (D, F) product, the step's building block."""
    g = torch.Generator().manual_seed(0)
    x, W = torch.randn(B, D, generator=g).to(DEVICE, dtype), torch.randn(F, D, generator=g).to(DEVICE, dtype)
    x @ W.T
    times = []
    for _ in range(repeats):
        t = clock()
        x @ W.T
        times.append(clock() - t)
    return 2 * B * D * F / min(times)


class TimedBatches:
    """Cycles over batches in memory and records when each is asked for."""

    def __init__(self, pool):
        self.pool, self.times = itertools.cycle(pool), []

    def __next__(self):
        self.times.append(clock())
        return next(self.pool)

    def step_time(self, warmup):
        return min(b - a for a, b in zip(self.times[warmup:], self.times[warmup + 1:]))


def pool_of(D, B, n=3):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, D, generator=g).to(DEVICE) for _ in range(n)]


def make(variant, D, F, k, dead=0, seed=0):
    settings = dict(SETTINGS[variant], **({"k": k, "dead_after": 10**9} if variant in SPARSE else {}))
    sae = make_sae(variant, D, F, seed=seed, **settings).to(DEVICE)
    sae.samples_since_fired[:dead] = 10**9  # dead latents: AuxK runs (TopK, BatchTopK)
    return sae


def minisae_step(variant, D, F, B, k, steps, warmup, bf16=False, dead=0, sparse=True) -> float:
    """Seconds per step of `train`; sparse=False: every step on the dense reference (SAE.loss)."""
    sae = make(variant, D, F, k, dead)
    data = TimedBatches(pool_of(D, B))
    cfg = TrainConfig(n_samples=(warmup + steps + 1) * B, batch_size=B, lr=1e-4, bf16=bf16, resample_every=0,
                      log_every=10**6, resample_dead_after=10**9)
    with contextlib.nullcontext() if sparse else dense_reference():
        train(sae, data, cfg, log=False)
    return data.step_time(warmup)


@contextlib.contextmanager
def dense_reference():
    """Every Trainer made inside takes the dense reference (SAE.loss) for its steps, not the
    sparse path: the trainer asks minisae.train.loss_function for its loss."""
    chooser = minisae.train.loss_function
    minisae.train.loss_function = functools.partial(chooser, sparse=False)
    try:
        yield
    finally:
        minisae.train.loss_function = chooser


def load_sparsify():
    """sparsify.sparse_coder, or None where sparsify is not installed."""
    spec = importlib.util.find_spec("sparsify")
    if spec is None:
        return None
    if "sparsify" not in sys.modules:  # a bare package: skip __init__'s Trainer imports
        pkg = types.ModuleType("sparsify")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["sparsify"] = pkg
    return importlib.import_module("sparsify.sparse_coder"), importlib.import_module("sparsify.config")


def sparsify_train(mods, D, F, k, lr, data, n_steps):
    """sparsify's Trainer loop for one SAE (auxk_alpha = 0, its default; fvu loss), n_steps
    batches from `data`: the steps minisae's are compared with."""
    sparse_coder, config = mods
    torch.manual_seed(0)
    sae = sparse_coder.SparseCoder(D, config.SparseCoderConfig(num_latents=F, k=k))
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    since_fired = torch.zeros(F, dtype=torch.long)
    did_fire = torch.zeros(F, dtype=torch.bool)
    for _ in range(n_steps):
        x = next(data)
        sae.set_decoder_norm_to_unit_norm()
        out = sae(x)
        did_fire[out.latent_indices.flatten()] = True
        float(out.fvu.detach())  # the Trainer's running average
        out.fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        since_fired += x.shape[0]
        since_fired[did_fire] = 0
        did_fire.zero_()


def sparsify_step(mods, D, F, B, k, steps, warmup) -> float:
    """The fastest step of sparsify_train after `warmup` steps."""
    data = TimedBatches(pool_of(D, B))
    sparsify_train(mods, D, F, k, 1e-4, data, warmup + steps + 1)
    return data.step_time(warmup)


def timed(fn):
    t = clock()
    out = fn()
    return out, clock() - t


def breakdown(variant, D, F, B, k, dead=0, repeats=3) -> dict:
    """Seconds per phase of one step, each phase run on its own (fastest of `repeats`)."""
    from minisae import sparse_decode as sd
    from minisae.codes import DenseCode

    sae = make(variant, D, F, k, dead).train()
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)
    x = pool_of(D, B, 1)[0]
    part = sae.activation
    sparse = variant in SPARSE and sd.worth_it(k, F)
    rows = []
    for _ in range(repeats):
        r = {}
        if sparse:
            with torch.no_grad():
                pre, r["encoder matmul"] = timed(lambda: torch.addmm(sae.b_enc, x - sae.b_dec, sae.W_enc.T))
                (idx_r, idx_c), r["top-k selection"] = timed(lambda: part.select(pre))

            def decode():
                vals = torch.relu(sd.selected_pre(pre, idx_r, idx_c, x, sae))
                x_hat = sd.decode_rows(vals, idx_r, idx_c, sae.W_dec, B) + sae.b_dec
                return vals, x_hat, (x_hat - x).pow(2).sum(-1).mean()
            (vals, x_hat, loss), r["decode + loss"] = timed(decode)
            k_aux = part.k_aux or max(1, D // 2)
            auxk, r["AuxK"] = timed(lambda: sd.auxk_loss_sparse(x, pre, x_hat, sae, k_aux, part.aux_coef, part.dead_after))
            loss = loss + auxk
            f = sd.SparseCode(idx_r, idx_c, vals.detach(), (B, F))
        else:
            pre, r["encoder matmul"] = timed(lambda: sae.pre_activation(x))
            f, r["activation"] = timed(lambda: part(pre, sae))
            x_hat, r["decode + loss"] = timed(lambda: f @ sae.W_dec + sae.b_dec)
            extra, r["variant terms"] = timed(lambda: part.loss_terms(x=x, pre=pre, f=f, x_hat=x_hat, sae=sae))
            loss = (x_hat - x).pow(2).sum(-1).mean() + sum(extra.values())
        opt.zero_grad(set_to_none=True)
        _, r["backward"] = timed(loss.backward)
        _, r["constraint"] = timed(lambda: (sae.remove_parallel_grad_(), sae.unit_norm_decoder_()))
        _, r["Adam"] = timed(opt.step)
        with torch.no_grad():
            code = f if isinstance(f, sd.SparseCode) else DenseCode(f)
            _, r["bookkeeping"] = timed(lambda: sae.samples_since_fired.masked_fill_(code.fired(), 0))
        rows.append(r)
    return {name: min(r[name] for r in rows) for name in rows[0]}


def crossover(D=256, F=2048, B=1024, steps=4, warmup=2):
    print(f"\ncrossover: TopK step at D={D}, F={F}, B={B}, sparse path / dense reference")
    print(f"{'k':>5} {'k/F':>7} {'dense s/step':>13} {'sparse s/step':>14} {'dense/sparse':>12}")
    for k in (8, 64, 256, 512, 1024):
        dense = minisae_step("topk", D, F, B, k, steps, warmup, sparse=False)
        sparse = minisae_step("topk", D, F, B, k, steps, warmup, sparse=True)
        print(f"{k:>5} {k / F:>7.3f} {dense:>13.4f} {sparse:>14.4f} {dense / sparse:>12.2f}", flush=True)


def penalty_crossover(D=576, F=2304, B=1024, steps=5, warmup=1):
    """ReLU's loss and backward, sparse path (forced) against the dense reference, with
    b_enc shifted so that a given fraction of the code is positive; fp32 and bf16."""
    from minisae import sparse_decode
    print(f"\ncrossover: ReLU loss + backward at D={D}, F={F}, B={B}, sparse path / dense reference")
    print(f"{'dtype':>6} {'positive':>9} {'dense s':>9} {'sparse s':>9} {'dense/sparse':>12}")
    x = torch.randn(B, D, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    for bf16 in (False, True):
        for shift in (0.0, -0.5, -1.0, -1.5, -2.0):  # Gaussian x, unit rows: about 50% .. 2% positive
            sae = make_sae("relu", D, F, seed=0).to(DEVICE).train()
            with torch.no_grad():
                sae.b_enc.fill_(shift)
            frac = (sae.pre_activation(x) > 0).float().mean().item()
            times = {}
            for sparse in (False, True):
                def step():
                    with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=bf16):
                        loss = sparse_decode.penalty_loss(sae, x, sae.pre_activation(x), max_frac=1.01)[0] \
                            if sparse else sae.loss(x)[0]
                    sae.zero_grad(set_to_none=True)
                    loss.backward()
                for _ in range(warmup):
                    step()
                best = float("inf")
                for _ in range(steps):
                    t = clock()
                    step()
                    best = min(best, clock() - t)
                times[sparse] = best
            print(f"{'bf16' if bf16 else 'fp32':>6} {frac:>9.3f} {times[False]:>9.4f} {times[True]:>9.4f} "
                  f"{times[False] / times[True]:>12.2f}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default="relu,gated,jumprelu,topk,batchtopk", help="comma-separated")
    parser.add_argument("--shapes", default="big,toy64,toy256", help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--bf16", action="store_true", help="also every variant under bf16 autocast")
    parser.add_argument("--breakdown", action="store_true", help="where the time goes, TopK and ReLU")
    parser.add_argument("--crossover", action="store_true", help="sparse vs dense step: TopK for several k/F, "
                        "ReLU for several fractions of positive entries")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto (sparsify: CPU only)")
    args = parser.parse_args()
    global DEVICE
    from minisae.utils import resolve_device
    DEVICE = resolve_device(args.device)
    variants, shapes = args.variants.split(","), args.shapes.split(",")
    bad = [v for v in variants if v not in SETTINGS] + [s for s in shapes if s not in SHAPES]
    if bad:
        raise ValueError(f"unknown variant(s)/shape(s) {bad}; valid: {', '.join(SETTINGS)}; {', '.join(SHAPES)}")
    if args.steps < 1 or args.warmup < 0:
        raise ValueError("--steps must be >= 1 and --warmup >= 0")
    sparsify = load_sparsify() if DEVICE.type == "cpu" else None
    print(f"SAE training step on {DEVICE}, fastest of {args.steps} steps after {args.warmup}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; sparsify {'found' if sparsify else 'not installed'}")
    for shape in shapes:
        D, F, B, k = SHAPES[shape]
        rate = {"fp32": matmul_flops(D, F, B, torch.float32), "bf16": matmul_flops(D, F, B, torch.bfloat16)}
        print(f"\n{shape}: D={D} F={F} B={B} (TopK k={k}); matmul {rate['fp32'] / 1e9:,.0f} GFLOP/s fp32, "
              f"{rate['bf16'] / 1e9:,.0f} bf16; roofline samples/s: dense {rate['fp32'] / (12 * D * F):,.0f}, "
              f"sparse {rate['fp32'] / (6 * D * F):,.0f} (fp32)")
        print(f"{'variant':<14} {'dtype':<5} {'samples/s':>10} {'of roofline':>12} {'vs sparsify':>12}")
        spf = sparsify_step(sparsify, D, F, B, k, args.steps, args.warmup) if sparsify else None
        if spf:
            roofline = rate["fp32"] / (6 * D * F)
            print(f"{'sparsify topk':<14} {'fp32':<5} {B / spf:>10,.0f} {B / spf / roofline:>11.0%} {1.0:>11.2f}x", flush=True)
        rows = [(v, 0) for v in variants] + ([("topk", F // 10)] if "topk" in variants else [])
        for (v, dead), dtype in itertools.product(rows, ["fp32", "bf16"] if args.bf16 else ["fp32"]):
            t = minisae_step(v, D, F, B, k, args.steps, args.warmup, bf16=dtype == "bf16", dead=dead)
            flop = (6 if v in SPARSE else 12) * D * F
            name = v + (f"+{dead} dead" if dead else "")
            vs = f"{spf / t:>11.2f}x" if spf and v == "topk" and dtype == "fp32" else ""  # sparsify: fp32
            print(f"{name:<14} {dtype:<5} {B / t:>10,.0f} {B / t / (rate[dtype] / flop):>11.0%} {vs}", flush=True)
        if args.breakdown:
            step = {v: minisae_step(v, D, F, B, k, args.steps, args.warmup, dead=dead) for v, dead in (("relu", 0), ("topk", F // 10))}
            for v, dead in (("relu", 0), ("topk", F // 10)):
                phases = breakdown(v, D, F, B, k, dead)
                phases["rest (Python, allocation)"] = max(0.0, step[v] - sum(phases.values()))
                total = sum(phases.values())
                print(f"  breakdown {v}{f' ({dead} dead)' if dead else ''}: step {step[v] * 1e3:.1f} ms: " +
                      ", ".join(f"{n} {t / total:.0%}" for n, t in phases.items()), flush=True)
    if args.crossover:
        crossover()
        penalty_crossover()


if __name__ == "__main__":
    main()
