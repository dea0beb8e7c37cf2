"""Several processes, one SAE: data-parallel training with `torchrun`, and devices.

    torchrun --nproc-per-node N -m minisae lm ...

starts N copies of the same command; each learns its rank r (0..N-1) from the
environment. Each reads its own disjoint share of every global batch (rows
r*B/N .. (r+1)*B/N, minisae.pipeline.batches.iter_batches) and the SAE's loss runs inside
`torch.nn.parallel.DistributedDataParallel`, which averages the gradients of all ranks
during backward. The mean of N per-rank means over B/N samples is the mean over B, so
for every loss that is a mean over samples (reconstruction, L1, AuxK) the step is the
single-process step on the global batch. What DDP does not know about, SAEs need:

- dead latents: each rank sees only its share, so "latent i fired in this batch" is
  OR-ed over ranks (`fired_anywhere`) before the counters are updated; every rank then
  holds the same counters and AuxK masks the same latents;
- resampling: the pool of recent batches is gathered from all ranks (the global
  batches, in order), rank 0 picks the new directions and broadcasts every per-latent
  parameter and its Adam moments (`broadcast_from_main_`), so the ranks stay identical;
- BatchTopK: its top-k runs over the global batch, which no rank holds whole; each rank's
  own k*B largest entries hold all of the global k*B largest, so the ranks gather those,
  agree on the cut and each keeps its entries above it (`variants.shared_selection`, set
  up by the trainer through the part's `group`). The running threshold is the same on
  every rank, and averaged over ranks after every step (`average_buffer_`) all the same.

Backend: `nccl` on CUDA, `gloo` on CPU (tests/system/test_distributed.py spawns 2 CPU
processes on 127.0.0.1 and checks the result equals single-process training).
Only rank 0 prints, evaluates and writes files; activation collection runs once, on
rank 0, while the others wait.
"""

import inspect
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

# ---------------------------------------------------------------- devices

def autocast_dtype(device: torch.device):
    """The reduced-precision type for `--bf16` autocast on this device: bfloat16 on CUDA
    and CPU; on MPS bfloat16 needs macOS 14 (torch falls back with a warning otherwise)."""
    return torch.bfloat16


# ---------------------------------------------------------------- the process group

@dataclass
class Group:
    rank: int  # this process, 0..world-1
    world: int  # number of processes
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def from_env(device: torch.device) -> "Group | None":
    """The process group torchrun describes in the environment (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT), initialised once; None when not started by torchrun.
    On CUDA each rank takes the GPU numbered by its LOCAL_RANK."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    rank = int(os.environ["RANK"])
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    return Group(rank, world, device)


def check_batch(batch_size: int, world: int):
    if batch_size % world:
        raise ValueError(f"--batch-size {batch_size} does not divide into {world} processes: each rank takes "
                         f"batch_size / world rows of every batch; use a multiple of {world}")


def barrier(group):
    if group is not None:
        dist.barrier()


def from_main(obj):
    """Rank 0's value of a picklable object, on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj) -> list:
    """Every rank's picklable object, in rank order, on every rank."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# ---------------------------------------------------------------- what SAEs add to DDP

class LossModule(torch.nn.Module):
    """DDP averages gradients of what its module's forward computes: here, the SAE's loss
    as the trainer computes it (`loss_fn`, the function minisae.sparse_decode chose)."""

    def __init__(self, sae, loss_fn):
        super().__init__()
        self.sae, self.loss_fn = sae, loss_fn

    def forward(self, x, coef_scale: float):
        return self.loss_fn(x, coef_scale)


def wrap(sae, group: Group, loss_fn):
    """loss_fn (the SAE's loss) inside DistributedDataParallel. Buffers (dead-latent counters, BatchTopK's
    threshold) are not broadcast from rank 0 at every forward: the trainer agrees on them
    explicitly (below), which is what keeps them right, not merely equal."""
    ids = [group.device.index] if group.device.type == "cuda" else None
    DDP = torch.nn.parallel.DistributedDataParallel
    # newer torch names the switch forward_sync_buffers (it still syncs once at init, where
    # the ranks' buffers are equal anyway)
    no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters \
        else {"broadcast_buffers": False}
    return DDP(LossModule(sae, loss_fn), device_ids=ids, **no_sync)


def fired_anywhere(fired):
    """(F,) bool: latent i fired in some rank's share of this batch (an OR over ranks)."""
    if not dist.is_initialized():
        return fired
    n = fired.to(torch.int32)
    dist.all_reduce(n, op=dist.ReduceOp.MAX)
    return n.bool()


def gather_rows(x):
    """The global batch (world * b, D) from every rank's share x (b, D), in rank order."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


@torch.no_grad()
def broadcast_from_main_(sae, opt):
    """Every parameter, buffer and Adam moment of the SAE from rank 0 to all ranks."""
    for t in [*sae.parameters(), *sae.buffers()]:
        dist.broadcast(t.data, src=0)
    for p in sae.parameters():
        for moment in opt.state.get(p, {}).values():
            if torch.is_tensor(moment):
                dist.broadcast(moment, src=0)


@torch.no_grad()
def average_buffer_(buf):
    """buf <- its mean over ranks (BatchTopK's running threshold)."""
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    buf /= dist.get_world_size()
