"""The collection's rate report (minisae.pipeline.rate) and its cheaper write path.

- the sidecar's rate keys exist and are sane on a CPU collection;
- torch's FLOP count of a forward up to the stop layer equals a hand count for gpt2-random;
- the files are byte for byte those of the write path before it was made cheaper
  (`reference_collect`, that code kept here as the naive reference);
- the automatic batch size: 8 on the CPU, the memory rule on CUDA (memory faked)."""

import json
import math

import numpy as np
import pytest
import torch

from minisae.models.gpt2 import CONFIGS, GPT2, GPT2Config
from minisae.pipeline import activations as A
from minisae.pipeline import rate
from minisae.pipeline.store import load_activations


def gpt2_random():
    return GPT2(CONFIGS["gpt2-random"]).eval()  # 4 layers, D 64, 4 heads


def contexts(n=30, T=24, vocab=50257, seed=1):
    return torch.randint(0, vocab, (n, T), generator=torch.Generator().manual_seed(seed))


def test_rate_keys_are_in_the_sidecar_and_sane(tmp_path):
    model, ctx = gpt2_random(), contexts()
    meta = A.collect_activations(model, ctx, "blocks.2.hook_resid_pre", tmp_path / "acts.npy", verbose=False)
    _, side = load_activations(tmp_path / "acts.npy")
    assert side == meta and set(rate.RATE_KEYS) <= set(meta)
    assert all(isinstance(meta[k], float) and meta[k] > 0 for k in rate.RATE_KEYS if k != "copy_s")
    assert meta["copy_s"] >= 0 and 0 < meta["of_roofline"] < 2
    parts = meta["norms_s"] + meta["forward_s"] + meta["copy_s"] + meta["write_s"]
    assert parts <= meta["collect_s"] * (1 + 1e-9)  # parts of the wait
    assert math.isclose(meta["tokens_per_s"], ctx.numel() / meta["collect_s"])
    assert math.isclose(meta["achieved_flop_per_s"], meta["forward_flop_per_token"] * meta["tokens_per_s"])
    assert meta["batch_size"] == 8  # automatic on the CPU


def hand_flop_per_token(cfg: GPT2Config, T: int, n_attn: int, n_mlp: int) -> int:
    """2 FLOP per matmul weight per token (c_attn D x 3D, c_proj D x D; c_fc D x 4D, c_proj
    4D x D), plus attention's QK^T and AV: 2 T D each per token, over the full T x T."""
    D = cfg.d_model
    return n_attn * (2 * (3 * D * D + D * D) + 2 * 2 * T * D) + n_mlp * 2 * (4 * D * D + 4 * D * D)


@pytest.mark.parametrize("hook, n_attn, n_mlp", [
    ("blocks.2.hook_resid_pre", 2, 2),     # layers 0 and 1 whole
    ("blocks.1.hook_resid_mid", 2, 1),     # layer 1's attention, not its MLP
    ("blocks.3.hook_resid_post", 4, 4),    # the whole stack (no unembedding: it stops there)
])
def test_forward_flops_match_a_hand_count(hook, n_attn, n_mlp):
    model, idx = gpt2_random(), contexts(n=3, T=20)
    with rate.flop_counter() as counter:
        A.hooks_acts(model, idx, [hook])
    got = counter.get_total_flops() / idx.numel()
    assert got == hand_flop_per_token(CONFIGS["gpt2-random"], 20, n_attn, n_mlp)


@torch.no_grad()
def reference_collect(model, contexts, hooks, paths, batch_size, normalize, bf16, seed, max_norm_multiple):
    """The write path as it was: rows to float64 on the host, the sink test there, the kept
    rows' sum, scale, .float(), scattered to rows perm[j]; pass 2 drops the sinks."""
    n_ctx, T = contexts.shape
    n_rows = n_ctx * (T - 1)
    norms = A.estimate_norms(model, contexts, hooks, batch_size=batch_size, bf16=bf16,
                             max_norm_multiple=max_norm_multiple)
    perm = np.random.default_rng(seed).permutation(n_rows)
    outs = {h: None for h in hooks}
    totals, sinks = {}, {h: np.zeros(n_rows, dtype=bool) for h in hooks}
    for start in range(0, n_ctx, batch_size):
        got = A.hooks_acts(model, contexts[start:start + batch_size], hooks, bf16)  # float32 on the CPU
        for h in hooks:
            rows = got[h].reshape(-1, got[h].shape[-1]).double()
            if outs[h] is None:
                outs[h], totals[h] = np.zeros((n_rows, rows.shape[1]), np.float32), torch.zeros(rows.shape[1], dtype=torch.float64)
            sink = ~A.sae_positions(got[h], norms[h][1], bos=False).flatten()
            totals[h] += rows[~sink].sum(0)
            where = perm[start * (T - 1):start * (T - 1) + len(rows)]
            sinks[h][where] = sink.numpy()
            outs[h][where] = (rows * (norms[h][0] if normalize else 1.0)).float().numpy()
    for h, path in zip(hooks, paths):
        np.save(path, outs[h][~sinks[h]])
        n_keep = int((~sinks[h]).sum())
        path.with_suffix(".json").write_text(json.dumps({
            "n_tokens": n_keep, "scale": norms[h][0] if normalize else 1.0, "max_norm": norms[h][1],
            "n_sinks_dropped": n_rows - n_keep, "mean": (totals[h] / n_keep).tolist()}))


@pytest.mark.parametrize("batch_size, normalize, bf16, multiple", [
    (8, True, False, A.MAX_NORM_MULTIPLE),  # the defaults: no sinks in a random model, no pass 2
    (7, True, True, 1.05),                  # many sinks (pass 2), bf16 autocast, a short last batch
    (5, False, False, 1.1),
])
def test_files_are_byte_identical_to_the_previous_write_path(tmp_path, batch_size, normalize, bf16, multiple):
    model, ctx = gpt2_random(), contexts(n=23, T=17)
    hooks = ["blocks.2.hook_resid_pre", "blocks.0.hook_mlp_out"]
    new = [tmp_path / f"new{i}.npy" for i in range(2)]
    old = [tmp_path / f"old{i}.npy" for i in range(2)]
    metas = A.collect_many(model, ctx, hooks, new, batch_size=batch_size, normalize=normalize, bf16=bf16,
                           seed=4, verbose=False, max_norm_multiple=multiple)
    reference_collect(model, ctx, hooks, old, batch_size, normalize, bf16, 4, multiple)
    for meta, a, b in zip(metas, new, old):
        assert a.read_bytes() == b.read_bytes()  # header, rows and their order
        ref = json.loads(b.with_suffix(".json").read_text())
        assert {k: meta[k] for k in ref} == ref  # the same float64 mean, bit for bit
    if multiple < 2:
        assert all(m["n_sinks_dropped"] > 0 for m in metas)  # pass 2 ran


def test_threaded_scatter_equals_one_assignment():
    from concurrent.futures import ThreadPoolExecutor
    rows = np.random.default_rng(0).standard_normal((1001, 7)) * 1e3  # float64
    where = np.random.default_rng(1).permutation(1500)[:1001]
    want = np.zeros((1500, 7), np.float32)
    want[where] = rows.astype(np.float32)
    with ThreadPoolExecutor(3) as pool:
        got = np.zeros((1500, 7), np.float32)
        A.scatter_rows_(got, where, rows, pool, 3)
    assert got.tobytes() == want.tobytes()


def test_automatic_batch_size(monkeypatch):
    assert rate.auto_batch_size("cpu", 576, 128) == 8
    GB = 1 << 30
    per_context = 66 * 128 * 576 * 4  # (64 + 2 x 1 hook) float32 (T, D) tensors
    for free, want in ((70 * GB, 256), (1 * GB, GB // 4 // per_context), (1000, 1)):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device, free=free: (free, 80 * GB))
        assert rate.auto_batch_size(torch.device("cuda"), 576, 128) == want
    with pytest.raises(ValueError, match="batch_size must be positive"):
        A.collect_activations(gpt2_random(), contexts(), "blocks.0.hook_resid_post", "x.npy", batch_size=0)


def test_matmul_rate_is_a_rate():
    for dtype in (torch.float32, torch.bfloat16):
        assert 1e8 < rate.matmul_flop_per_s(64, "cpu", dtype) < 1e15  # between 0.1 GFLOP/s and 1 PFLOP/s


def test_the_chapter_quotes_its_cpu_run():
    """docs/09_gpus.md shows the line of the run whose sidecar is in figures/, verbatim."""
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    meta = json.loads((root / "figures" / "collect_rate_cpu_smollm2_l15.json").read_text())
    chapter = (root / "docs" / "09_gpus.md").read_text()
    assert rate.rate_line(meta) in chapter
    assert f"about {meta['forward_flop_per_token'] / 1e6:.0f} MFLOP of forward" in chapter
    assert f"forward-bound ({meta['forward_s']:.1f} of {meta['collect_s']:.1f} s)" in chapter
    assert f"host's writes at {meta['write_s']:.1f} s" in chapter and 0.4 < meta["of_roofline"] < 0.6  # "about half"
    assert meta["compute_dtype"] == "bfloat16" and meta["batch_size"] == 8 and meta["hook"] == "blocks.15.hook_resid_post"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the pinned host buffers and the automatic batch")
def test_a_cuda_collection_stores_the_devices_own_rows(tmp_path):
    model, ctx, hook = gpt2_random().cuda(), contexts(n=300, T=24), "blocks.2.hook_resid_pre"
    meta = A.collect_activations(model, ctx, hook, tmp_path / "acts.npy", normalize=False, verbose=False)
    acts, _ = load_activations(tmp_path / "acts.npy")
    B = meta["batch_size"]
    assert B > 8 and meta["n_sinks_dropped"] == 0 and 0 < meta["of_roofline"] < 2
    raw = torch.cat([A.hook_acts(model, ctx[i:i + B], hook) for i in range(0, len(ctx), B)])  # same batches
    perm = np.random.default_rng(0).permutation(len(ctx) * 23)  # run row j -> file row perm[j]
    np.testing.assert_array_equal(acts[perm], raw.reshape(-1, 64).numpy())
