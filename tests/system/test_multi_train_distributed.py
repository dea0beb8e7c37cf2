"""A sweep in one pass under data parallelism: two gloo processes on 127.0.0.1 run
`multi_train` with a process group, each on its half of every global batch, and every SAE
of the pass must equal the SAE trained alone by `train` in one process on the global
batches, to float64 rounding (the tolerance of tests/system/test_distributed.py): ReLU
with latents that start dead and are resampled on rank 0, TopK with AuxK at work."""

import os
import socket

import pytest
import torch

from minisae import distributed
from minisae.multi_train import multi_train
from minisae.sae import make_sae
from minisae.train import TrainConfig, train

pytestmark = pytest.mark.slow  # processes spawned

D, F, B, STEPS = 16, 64, 64, 120
CASES = [  # (variant, SAE settings, training settings, steps)
    ("relu", dict(sparsity_coef=0.05), dict(resample_every=50, resample_dead_after=B * 20), STEPS),
    ("topk", dict(k=2, dead_after=B * 10, k_aux=8), dict(resample_dead_after=B * 10), STEPS),
    ("relu", dict(sparsity_coef=0.2), dict(resample_every=30, resample_dead_after=B * 10), STEPS // 2),
]


def data():
    return torch.randn(STEPS, B, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def sae_and_config(variant, settings, tsettings, steps):
    sae = make_sae(variant, D, F, seed=1, **settings).double()
    with torch.no_grad():
        sae.b_enc[:8] = -50.0  # 8 latents start dead
    return sae, TrainConfig(n_samples=steps * B, batch_size=B, lr=3e-3, log_every=25, seed=0, **tsettings)


def worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    group = distributed.from_env(torch.device("cpu"))
    b = B // world
    shares = iter(x[rank * b:(rank + 1) * b] for x in data())  # this rank's rows of every global batch
    saes, cfgs = zip(*[sae_and_config(*case) for case in CASES])
    multi_train(list(saes), shares, list(cfgs), log=False, group=group)
    torch.save([sae.state_dict() for sae in saes], os.path.join(out, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_pass_over_two_processes_equals_each_sae_alone_in_one(tmp_path):
    torch.multiprocessing.spawn(worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for i, case in enumerate(CASES):
        sae, cfg = sae_and_config(*case)
        train(sae, iter(data()), cfg, log=False)
        for name, want in sae.state_dict().items():
            for r in ranks:
                torch.testing.assert_close(r[i][name], want, rtol=1e-9, atol=1e-10, msg=f"{case[0]} {i} {name}")
        if case[0] == "relu":
            assert (sae.b_enc[:8] != -50.0).all()  # the latents that started dead were resampled
        else:
            assert (sae.samples_since_fired >= B * 10).any()  # dead latents to the end: AuxK ran on every step
