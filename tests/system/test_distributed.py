"""Data-parallel training (minisae.distributed) equals single-process training.

Two processes on 127.0.0.1 with the gloo backend each train on their half of every
global batch; one process trains on the global batches. After 300 steps the parameters,
the Adam moments' effect and the dead-latent counters must agree to float64 rounding,
for ReLU (with latents that start dead and are resampled on rank 0), TopK (with dead
latents, so AuxK acts), BatchTopK and Matryoshka BatchTopK (whose selection runs over the
global batch). Also: devices resolve or fail with a clear error."""

import os
import socket

import pytest
import torch

from minisae import distributed, utils
from minisae.sae import make_sae
from minisae.train import TrainConfig, train

pytestmark = pytest.mark.slow  # processes spawned per test

D, F, B, STEPS = 16, 64, 64, 300
CASES = {
    # 8 latents start dead (b_enc -50). ReLU: resampled at steps 50, 100, ...
    "relu": (dict(sparsity_coef=0.05), dict(resample_every=50, resample_dead_after=B * 20)),
    # TopK: once dead (10 batches), AuxK pulls them towards the error
    "topk": (dict(k=2, dead_after=B * 10, k_aux=8), dict(resample_dead_after=B * 10)),
    # BatchTopK and Matryoshka: the k*B largest of the global batch, selected across ranks,
    # one running threshold; AuxK as TopK
    "batchtopk": (dict(k=2, dead_after=B * 10, k_aux=8), dict(resample_dead_after=B * 10)),
    "matryoshka_batchtopk": (dict(k=2, prefixes=(8, 32), dead_after=B * 10, k_aux=8),
                             dict(resample_dead_after=B * 10)),
}


def data():
    return torch.randn(STEPS, B, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def new_sae(variant):
    settings, _ = CASES[variant]
    sae = make_sae(variant, D, F, seed=1, **settings).double()
    with torch.no_grad():
        sae.b_enc[:8] = -50.0  # 8 latents start dead
    return sae


def run(variant, rank=0, world=1, group=None):
    _, tsettings = CASES[variant]
    cfg = TrainConfig(n_samples=STEPS * B, batch_size=B, lr=3e-3, log_every=25, seed=0, **tsettings)
    b = B // world
    shares = iter(x[rank * b:(rank + 1) * b] for x in data())  # this rank's rows of every global batch
    sae = new_sae(variant)
    train(sae, shares, cfg, log=False, group=group)
    return {"params": {k: v.clone() for k, v in sae.state_dict().items()},
            "since": sae.samples_since_fired.clone()}


def worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    group = distributed.from_env(torch.device("cpu"))
    assert group.rank == rank and group.world == world and group.main == (rank == 0)
    torch.save({v: run(v, rank, world, group) for v in CASES}, os.path.join(out, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    torch.multiprocessing.spawn(worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.mark.parametrize("variant", list(CASES))
def test_two_processes_equal_one(two_ranks, variant):
    one = run(variant)
    r0, r1 = two_ranks[0][variant], two_ranks[1][variant]
    for name, want in one["params"].items():
        torch.testing.assert_close(r0["params"][name], want, rtol=1e-9, atol=1e-10, msg=name)
        assert torch.equal(r0["params"][name], r1["params"][name]), name  # the ranks are one SAE
    # dead-latent bookkeeping: identical on every rank, and equal to one process's
    assert torch.equal(r0["since"], one["since"]) and torch.equal(r1["since"], one["since"])


def test_the_cases_exercise_dead_latents():
    """What the equality above covers: ReLU resamples its dead latents, TopK's AuxK acts."""
    sae = new_sae("relu")
    dead_before = sae.W_dec[:8].clone()
    run_relu = run("relu")
    assert not torch.allclose(run_relu["params"]["W_dec"][:8], dead_before)  # resampled directions
    sae = new_sae("topk")
    cfg = TrainConfig(n_samples=12 * B, batch_size=B, lr=3e-3, log_every=4, resample_dead_after=B * 10)
    train(sae, iter(data()[:12]), cfg, log=False)
    assert (sae.samples_since_fired[:8] >= B * 10).all()  # dead after 10 of the 300 steps ...
    sae.train()
    _, parts = sae.loss(data()[12])
    assert parts["auxk"] > 0  # ... so from there on the AuxK term is at work


def test_batch_must_divide_and_devices_resolve():
    with pytest.raises(ValueError, match="does not divide into 3 processes"):
        distributed.check_batch(64, 3)
    assert utils.resolve_device("cpu") == torch.device("cpu")
    assert utils.resolve_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(ValueError, match="unknown device"):
        utils.resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            utils.resolve_device("cuda:0")
    if not torch.backends.mps.is_available():
        with pytest.raises(ValueError, match="MPS"):
            utils.resolve_device("mps")


LM = ["lm", "--model", "gpt2-random", "--layer", "1", "--site", "resid_post", "--tokens", "4096",
      "--collect-tokens", "2048", "--variants", "relu,topk", "--sweep", "relu:sparsity_coef=1", "--sweep",
      "topk:k=4", "--expansion", "2", "--batch-size", "256", "--eval-tokens", "1024", "--device", "cpu"]


def lm_rows(out):
    import json
    rows = json.loads((out / "lm_results.json").read_text())["rows"]
    return [{k: v for k, v in r.items() if not k.endswith("_seconds")} for r in rows]


@pytest.mark.skipif(not os.environ.get("MINISAE_GPT2_TOKENIZER_DIR"),
                    reason="set MINISAE_GPT2_TOKENIZER_DIR to a folder with GPT-2's encoder.json + vocab.bpe")
def test_torchrun_lm_equals_one_process(tmp_path):
    """`torchrun --nproc-per-node 2 -m minisae lm` in both modes writes the rows one process
    writes (ReLU and TopK: their losses are means over samples, so the split is exact)."""
    import subprocess
    import sys
    env = {**os.environ, "MINISAE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "minisae", *LM, "--out", str(tmp_path / "one")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    for mode in ("data", "sweep"):
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                              "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "minisae",
                              *LM, "--distribute", mode, "--out", str(tmp_path / mode)], env=env,
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        got, want = lm_rows(tmp_path / mode), lm_rows(tmp_path / "one")
        assert [r["variant"] for r in got] == ["relu", "topk"]
        for g, w in zip(got, want):
            for key in ("l0", "fvu", "ce_sae", "dead_frac"):
                assert g[key] == pytest.approx(w[key], rel=1e-4, abs=1e-6), (mode, g["variant"], key)
