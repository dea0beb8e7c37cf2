"""Training an SAE: one loop, in order, the same for every variant.

    for each batch x (B, D):
        lr, lambda    <- schedules (linear warmup; lr decays to 0 over the last part)
        loss          =  ||x - x_hat||^2 + lambda * sparsity + variant terms
        backward
        decoder       <- drop the gradient parallel to each unit-norm row
        Adam step
        decoder       <- renormalise rows to unit norm
        dead latents  <- count samples since each latent fired; every `resample_every`
                         steps re-initialise the dead ones (Towards Monosemanticity)
        log           <- loss, L0, samples/s, ETA

Schedules follow Anthropic's April 2024 update ("Training SAEs"): the sparsity
coefficient ramps up linearly over the first 5% of steps (so latents are not killed
before they have found a direction) and the learning rate decays linearly to zero over
the last 20%. A short lr warmup keeps Adam's first steps from throwing the
freshly-initialised encoder around.
"""

import collections
import dataclasses
import sys
import time
from dataclasses import dataclass

import torch

from minisae.sparse_decode import SparseCode
from minisae.utils import Progress


@dataclass
class TrainConfig:
    n_samples: int = 2_000_000  # total training samples (tokens, for an LM)
    batch_size: int = 1024  # samples per step
    lr: float = 1e-3  # Adam learning rate after warmup
    lr_warmup_frac: float = 0.01  # linear lr warmup over this fraction of steps
    lr_decay_frac: float = 0.2  # linear decay to 0 over this last fraction of steps
    coef_warmup_frac: float = 0.05  # sparsity coefficient ramps from 0 over this fraction
    resample_every: int = 0  # steps between dead-latent resamplings; 0 = never
    resample_until_frac: float = 0.7  # no resampling after this fraction of training
    dead_after: int = 100_000  # samples without firing after which a latent counts as dead
    resample_pool: int = 16  # the last training batches before a resampling, whose losses choose its directions
    bf16: bool = False  # forward and loss under bfloat16 autocast (weights, Adam stay float32)
    log_every: int = 100  # steps between progress lines
    seed: int = 0  # seeds resampling; the data stream has its own generator

    def __post_init__(self):
        if self.n_samples <= 0 or self.batch_size <= 0 or not self.lr > 0:
            raise ValueError(f"n_samples, batch_size and lr must be positive: {self}")
        if self.n_samples < self.batch_size:
            raise ValueError(f"n_samples={self.n_samples} is less than one batch of {self.batch_size}")
        for name in ("lr_warmup_frac", "lr_decay_frac", "coef_warmup_frac", "resample_until_frac"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name, lo in (("resample_every", 0), ("dead_after", 1), ("resample_pool", 1), ("log_every", 1)):
            if getattr(self, name) < lo:
                raise ValueError(f"{name} must be >= {lo}, got {getattr(self, name)}")


def lr_at(step: int, n_steps: int, cfg: TrainConfig) -> float:
    warm = max(1, int(cfg.lr_warmup_frac * n_steps))
    decay_start = int((1 - cfg.lr_decay_frac) * n_steps)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    if step >= decay_start:
        return cfg.lr * (n_steps - step) / max(1, n_steps - decay_start)
    return cfg.lr


def train(sae, batches, cfg: TrainConfig, log=True, group=None) -> dict:
    """Train `sae` in place on an iterator of batches (B, D); returns the history.

    group: a minisae.distributed.Group when several processes train one SAE (torchrun):
    then `batches` gives this rank's share (B / world, D) of each global batch of
    cfg.batch_size, and the five marked lines keep the ranks one SAE (see distributed.py).

    Nothing in a step waits for a result (on a GPU: no host-device sync; on a CPU: no
    pass over the data that only feeds a Python `if`) except AuxK's count of dead
    latents; the checks that do (finite data and loss) and the progress line's numbers
    run every `log_every` steps and before a resampling, over the steps since the last."""
    from minisae import distributed
    world = group.world if group else 1
    distributed.check_batch(cfg.batch_size, world)
    ddp = distributed.wrap(sae, group) if group else None  # [dist] gradients averaged in backward
    log = log and (group is None or group.main)  # only rank 0 prints
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr, fused=True)  # one kernel for all parameters
    gen = torch.Generator().manual_seed(cfg.seed)
    n_steps = cfg.n_samples // cfg.batch_size
    coef_warm = max(1, int(cfg.coef_warmup_frac * n_steps))
    losses = torch.zeros(cfg.log_every, dtype=torch.float64)  # this window's losses, checked and logged in bulk
    finite = torch.ones(cfg.log_every, dtype=torch.bool)  # and whether each batch was finite
    pool = collections.deque(maxlen=cfg.resample_pool)  # recent batches, for resampling
    bar = Progress("  training", total=n_steps * cfg.batch_size, unit="samples") if log else None
    history, t0, seen, first, terms, start_loss = [], time.time(), 0, 0, "", None
    sae.train()
    for step in range(n_steps):
        x = next(batches, None)  # (B / world, D)
        if x is None:
            raise ValueError(f"the data ran out after {step} of {n_steps} steps; give an endless iterator or "
                             f"at least {n_steps} batches")
        if x.shape[0] * world != cfg.batch_size:
            raise ValueError(f"data gave a batch of {x.shape[0]} on each of {world} process(es), "
                             f"config says {cfg.batch_size} in all")
        # learning rate and sparsity coefficient for this step
        for param_group in opt.param_groups:
            param_group["lr"] = lr_at(step, n_steps, cfg)
        coef_scale = min(1.0, (step + 1) / coef_warm)
        # forward and loss
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            loss, parts = ddp(x, coef_scale) if ddp else sae.loss(x, coef_scale)
        losses[step - first] = loss.detach()
        finite[step - first] = torch.isfinite(x).all()
        # backward, decoder constraint, step
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sae.remove_parallel_grad_()
        opt.step()
        sae.unit_norm_decoder_()
        # dead latents: which latents fired in this batch
        with torch.no_grad():
            fired = fired_latents(parts["f"])  # (F,)
            if group:
                fired = distributed.fired_anywhere(fired)  # [dist] fired on any rank's share
                if hasattr(sae.activation, "threshold"):
                    distributed.average_buffer_(sae.activation.threshold)  # [dist] one BatchTopK threshold
            sae.samples_since_fired += cfg.batch_size
            sae.samples_since_fired.masked_fill_(fired, 0)
        seen += cfg.batch_size
        resample = (cfg.resample_every and step < cfg.resample_until_frac * n_steps
                    and (step + 1) % cfg.resample_every == 0)
        if cfg.resample_every and -(step + 1) % cfg.resample_every < cfg.resample_pool:
            pool.append(distributed.gather_rows(x) if group else x)  # [dist] the global batch; in the pool
        # check and log: the window's losses and data at once (here the step waits for them)
        if resample or (step + 1) % cfg.log_every == 0 or step == n_steps - 1:
            check_finite_(losses[:step + 1 - first], finite[:step + 1 - first], first, opt.param_groups[0]["lr"],
                          all_ranks=group is not None)
            start_loss = start_loss if start_loss is not None else losses[0].item()  # step 0: before any update
            check_diverging_(sae, losses[:step + 1 - first], start_loss, step, cfg)
        if resample:
            n = resample_dead_(sae, opt, torch.cat(list(pool)), cfg, gen) if not group or group.main else 0
            if group:
                distributed.broadcast_from_main_(sae, opt)  # [dist] rank 0's resampled latents to all
            if log and n:
                print(f"\n  step {step + 1}: resampled {n} dead latents", file=sys.stderr)
        if (step + 1) % cfg.log_every == 0 or step == n_steps - 1:
            row = {"step": step + 1, "samples": seen, "seconds": time.time() - t0,
                   "loss": losses[:step + 1 - first].mean().item(),
                   **{k: v.item() for k, v in parts.items() if torch.is_tensor(v) and v.ndim == 0},
                   "l0": l0(parts["f"]).item()}
            history.append(row)
            terms = " | " + " ".join(f"{k} {v:.4g}" for k, v in row.items() if k not in ("step", "samples", "seconds"))
            first = step + 1
        elif resample:
            first = step + 1  # the window was checked
        if bar:
            bar.update(seen, extra=terms)
    if bar:
        bar.close(seen, extra=terms)
    sae.eval()
    return {"history": history, "train_samples": seen, "train_seconds": time.time() - t0,
            "config": dataclasses.asdict(cfg)}


def check_finite_(losses, finite, first: int, lr: float, all_ranks: bool = False):
    """Raise if a batch of the window that started at step `first` had NaN/Inf values,
    or if the loss stopped being finite (naming the first such step). all_ranks: every
    process raises if any does (a lone rank's error would leave the others waiting)."""
    if all_ranks:
        import torch.distributed as dist
        bad = torch.tensor([int(not finite.all() or not torch.isfinite(losses).all())])
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item() and finite.all() and torch.isfinite(losses).all():
            raise FloatingPointError(f"another process saw NaN or Inf data or loss in the steps from {first}")
    if not finite.all():
        step = first + int((~finite).nonzero()[0])
        raise ValueError(f"the batch of step {step} contains NaN or Inf values")
    bad = ~torch.isfinite(losses)
    if bad.any():
        step = first + int(bad.nonzero()[0])
        raise FloatingPointError(f"loss became {losses[step - first].item()} at step {step} (lr {lr:.2e}); "
                                 "try a lower learning rate or sparsity coefficient")


def check_diverging_(sae, losses, start_loss: float, step: int, cfg: TrainConfig):
    """Stop a run that cannot be going anywhere, with the likely cause: the loss far above
    its value at the start (a learning rate too high; a finite loss of 1e7 is no success),
    or every latent dead (nothing encodes anything: sparsity coefficient or lr too high)."""
    now = losses.mean().item()
    if start_loss > 0 and now > DIVERGED * start_loss:
        raise FloatingPointError(f"training diverged: loss {now:.3g} at step {step + 1} is {now / start_loss:.0f}x "
                                 f"its value at the start ({start_loss:.3g}); the learning rate ({cfg.lr:g}) is "
                                 "likely too high")
    if bool((sae.samples_since_fired >= cfg.dead_after).all()):
        raise FloatingPointError(f"every latent is dead at step {step + 1} (none fired in {cfg.dead_after:,} "
                                 f"samples): the sparsity coefficient or the learning rate ({cfg.lr:g}) is likely "
                                 "too high")


DIVERGED = 100.0  # a loss this many times the first step's means the run diverged


def fired_latents(f):
    """(F,) bool: the latents active in some sample of this batch; for a SparseCode a
    pass over its N entries instead of the (B, F) code."""
    return f.fired() if isinstance(f, SparseCode) else f.amax(0) > 0  # codes are >= 0: (f > 0).any(0), in one pass


def l0(f):
    return f.l0() if isinstance(f, SparseCode) else (f > 0).sum(-1).float().mean()


@torch.no_grad()
def resample_dead_(sae, opt, x, cfg: TrainConfig, gen) -> int:
    """Towards Monosemanticity, "Neuron Resampling": give each dead latent the direction
    of an input the SAE reconstructs badly, chosen with probability proportional to its
    squared loss. x (N, D): the pool of inputs, the training batches just before this
    step (the trainer keeps the last `resample_pool`; no batch is drawn only for this).
    Decoder row = that input (centred, unit norm); encoder row = the same direction
    scaled to 0.2 x the mean encoder-row norm of live latents; bias 0; the variant's own
    per-latent parameters back to their initial values; Adam's moments for those entries
    reset so stale statistics do not throw the new latent off."""
    dead = (sae.samples_since_fired >= cfg.dead_after).nonzero().squeeze(-1)  # (n_dead,)
    if dead.numel() == 0:
        return 0
    was_training = sae.training
    sae.eval()  # BatchTopK must not update its threshold on the pool
    sq_loss = (sae(x) - x).pow(2).sum(-1)  # (N,)
    sae.train(was_training)
    # drawn on the CPU with the CPU generator `gen`: a seed means the same on every device
    pick = torch.multinomial(sq_loss.pow(2).cpu() + 1e-12, dead.numel(), replacement=True,
                             generator=gen).to(x.device)
    v = x[pick] - sae.b_dec  # (n_dead, D)
    v = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    alive = torch.ones(sae.n_latents, dtype=torch.bool, device=x.device)
    alive[dead] = False
    enc_norm = sae.W_enc[alive].norm(dim=-1).mean() if alive.any() else x.new_tensor(1.0)
    sae.W_dec[dead] = v
    sae.W_enc[dead] = v * 0.2 * enc_norm
    sae.b_enc[dead] = 0.0
    if hasattr(sae.activation, "reset_latents_"):
        sae.activation.reset_latents_(dead)
    for p in latent_parameters(sae):
        for moment in opt.state.get(p, {}).values():
            if torch.is_tensor(moment) and moment.ndim > 0:
                moment[dead] = 0.0
    sae.samples_since_fired[dead] = 0
    return dead.numel()


def latent_parameters(sae):
    """The parameters indexed by latent along their first axis: the encoder and decoder
    rows, b_enc, and every parameter of the activation part (all of them per-latent)."""
    return [sae.W_enc, sae.b_enc, sae.W_dec, *sae.activation.parameters()]


def sample_stream(data, batch_size: int, seed: int):
    """An endless iterator of batches from a toy dataset with a `sample(n, generator)`."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        yield data.sample(batch_size, gen)[0]
