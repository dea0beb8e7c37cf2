"""Training an SAE: one loop, in order, the same for every variant.

    for each batch x (B, D):        (a transcoder's: (x, target), and the loss reads target for x)
        lr, lambda    <- schedules (linear warmup; lr decays to 0 over the last part)
        loss          =  ||x - x_hat||^2 + lambda * sparsity + variant terms
        backward
        decoder       <- drop the gradient parallel to each unit-norm row
        Adam step
        decoder       <- renormalise rows to unit norm
        dead latents  <- count samples since each latent fired; every `resample_every`
                         steps re-initialise the dead ones (Towards Monosemanticity)
        log           <- loss, L0, samples/s, ETA

The loop's body is `Trainer.step`, one SAE's step on one batch: `train` feeds it the
batches one after the other, minisae/multi_train.py feeds each batch to several SAEs.

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
from functools import partial

import torch

from minisae import distributed
from minisae.configs import TrainConfig  # noqa: F401  (re-exported: from minisae.train import train, TrainConfig)
from minisae.sparse_decode import loss_function, reference_loss
from minisae.utils import Progress


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
    cfg.batch_size, and the five marked lines of `Trainer.step` keep the ranks one SAE
    (see distributed.py). minisae/multi_train.py feeds each batch to several SAEs."""
    trainer = Trainer(sae, cfg, log, group)
    for step in range(trainer.n_steps):
        trainer.step(next_batch(batches, step, trainer.n_steps))
    return trainer.finish()


def next_batch(batches, step: int, n_steps: int):
    x = next(batches, None)  # (B / world, D)
    if x is None:
        raise ValueError(f"the data ran out after {step} of {n_steps} steps; give an endless iterator or "
                         f"at least {n_steps} batches")
    return x


class Trainer:
    """One SAE's training state (optimizer, schedules, dead-latent counters, the window of
    losses), advanced one batch at a time by `step`: the loop of the module docstring.

    Nothing in a step waits for a result (on a GPU: no host-device sync; on a CPU: no
    pass over the data that only feeds a Python `if`) except AuxK's count of dead
    latents; the checks that do (finite data and loss) and the progress line's numbers
    run every `log_every` steps and before a resampling, over the steps since the last."""

    def __init__(self, sae, cfg: TrainConfig, log=True, group=None):
        self.sae, self.cfg, self.group = sae, cfg, group
        self.world = group.world if group else 1
        distributed.check_batch(cfg.batch_size, self.world)
        sae.train()
        self.loss_fn = step_loss(sae, cfg)  # the fast path where it is faster, else sae.loss (same values)
        self.ddp = distributed.wrap(sae, group, self.loss_fn) if group else None  # [dist] gradients averaged in backward
        if group and hasattr(sae.activation, "group"):
            sae.activation.group = group  # [dist] BatchTopK selects over the global batch
        self.log = log and (group is None or group.main)  # only rank 0 prints
        self.opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr, fused=True)  # one kernel for all parameters
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.n_steps = cfg.n_samples // cfg.batch_size
        self.coef_warm = max(1, int(cfg.coef_warmup_frac * self.n_steps))
        # this window's losses, checked and logged in bulk, and whether each batch was finite: on
        # the SAE's device, so that keeping them does not wait for the step (a copy to the host would)
        self.losses = torch.zeros(cfg.log_every, dtype=torch.float64, device=sae.W_enc.device)
        self.finite = torch.ones(cfg.log_every, dtype=torch.bool, device=sae.W_enc.device)
        self.pool = collections.deque(maxlen=cfg.resample_pool)  # recent batches, for resampling
        self.bar = Progress("  training", total=self.n_steps * cfg.batch_size, unit="samples") if self.log else None
        self.history, self.t0, self.seen, self.first, self.terms, self.start_loss = [], time.time(), 0, 0, "", None
        self.steps_done = 0

    def step(self, x):
        """One training step on the batch x (B / world, D), or (x, target) for a transcoder."""
        sae, cfg, opt, step = self.sae, self.cfg, self.opt, self.steps_done
        x, target = self.check_batch(x)
        # learning rate and sparsity coefficient for this step
        for param_group in opt.param_groups:
            param_group["lr"] = lr_at(step, self.n_steps, cfg)
        coef_scale = min(1.0, (step + 1) / self.coef_warm)
        # forward and loss
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            loss, parts = self.ddp(x, coef_scale) if self.ddp else self.loss_fn(x, coef_scale, target=target)
        # backward, decoder constraint, step
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sae.remove_parallel_grad_()
        opt.step()
        sae.unit_norm_decoder_()
        # dead latents, resampling, checks, the progress line
        self.end(x, target, loss.detach(), parts["code"], parts)

    def check_batch(self, x):
        """(x, target) of a batch x or (x, target), target None but for a transcoder."""
        cfg, group = self.cfg, self.group
        x, target = x if isinstance(x, tuple) else (x, None)  # a transcoder reads x, reconstructs target
        if target is not None and (group or cfg.resample_every):
            raise ValueError("a transcoder trains in one process, without resampling (its dead latents would "
                             "get input directions as outputs): set resample_every=0 (TopK and BatchTopK "
                             "revive dead latents with AuxK)")
        if x.shape[0] * self.world != cfg.batch_size:
            raise ValueError(f"data gave a batch of {x.shape[0]} on each of {self.world} process(es), "
                             f"config says {cfg.batch_size} in all")
        return x, target

    def end(self, x, target, loss, code, parts, finite=None):
        """The step's bookkeeping after the update: dead-latent counters from the code,
        the window of losses, resampling, checks and the progress line. loss: () detached;
        parts: the loss's scalar parts (logged); finite: all_finite of x and target, if known."""
        sae, cfg, group, opt, step, first = self.sae, self.cfg, self.group, self.opt, self.steps_done, self.first
        self.losses[step - first] = loss
        self.finite[step - first] = (all_finite(x) & (target is None or all_finite(target))) if finite is None else finite
        # dead latents: which latents fired in this batch
        with torch.no_grad():
            fired = code.fired()  # (F,)
            if group:
                fired = distributed.fired_anywhere(fired)  # [dist] fired on any rank's share
                if hasattr(sae.activation, "threshold"):
                    distributed.average_buffer_(sae.activation.threshold)  # [dist] one BatchTopK threshold
            sae.samples_since_fired += cfg.batch_size
            sae.samples_since_fired.masked_fill_(fired, 0)
        self.seen += cfg.batch_size
        resample = (cfg.resample_every and step < cfg.resample_until_frac * self.n_steps
                    and (step + 1) % cfg.resample_every == 0)
        if cfg.resample_every and -(step + 1) % cfg.resample_every < cfg.resample_pool:
            self.pool.append(distributed.gather_rows(x) if group else x)  # [dist] the global batch; in the pool
        # check and log: the window's losses and data at once (here the step waits for them)
        window = self.losses[:step + 1 - first]
        if resample or (step + 1) % cfg.log_every == 0 or step == self.n_steps - 1:
            check_finite_(window, self.finite[:step + 1 - first], first, opt.param_groups[0]["lr"],
                          all_ranks=group is not None)
            self.start_loss = self.start_loss if self.start_loss is not None else self.losses[0].item()  # step 0
            check_diverging_(sae, window, self.start_loss, step, cfg)
        if resample:
            n = resample_dead_(sae, opt, torch.cat(list(self.pool)), cfg, self.gen) if not group or group.main else 0
            if group:
                distributed.broadcast_from_main_(sae, opt)  # [dist] rank 0's resampled latents to all
            if self.log and n:
                print(f"\n  step {step + 1}: resampled {n} dead latents", file=sys.stderr)
        if (step + 1) % cfg.log_every == 0 or step == self.n_steps - 1:
            row = {"step": step + 1, "samples": self.seen, "seconds": time.time() - self.t0,
                   "loss": window.mean().item(),
                   **{k: v.item() for k, v in parts.items() if torch.is_tensor(v) and v.ndim == 0},
                   "l0": code.l0()}
            self.history.append(row)
            self.terms = " | " + " ".join(f"{k} {v:.4g}" for k, v in row.items()
                                          if k not in ("step", "samples", "seconds"))
            self.first = step + 1
        elif resample:
            self.first = step + 1  # the window was checked
        if self.bar:
            self.bar.update(self.seen, extra=self.terms)
        self.steps_done = step + 1

    def finish(self) -> dict:
        """Close the progress line, put the SAE in eval mode; the history."""
        if self.bar:
            self.bar.close(self.seen, extra=self.terms)
        self.sae.eval()
        if getattr(self.sae.activation, "group", None) is not None:
            self.sae.activation.group = None  # [dist] a single process from here on
        return {"history": self.history, "train_samples": self.seen, "train_seconds": time.time() - self.t0,
                "config": dataclasses.asdict(self.cfg)}


def step_loss(sae, cfg: TrainConfig):
    """The loss a step calls, (x, coef_scale, target=None) -> (total, parts): the fast path of
    minisae/sparse_decode.py, or with cfg.compile the reference compiled by torch.compile
    (forward and backward fused into a few kernels: it helps where launches, not
    arithmetic, take the time, on a GPU; its first steps pay for the compilation)."""
    if not cfg.compile:
        return loss_function(sae)
    return compiled_loss(partial(reference_loss, sae), sae.W_enc.device)


def compiled_loss(loss, device, scale_dtype=torch.float32):
    """loss (x, coef_scale, target=None) under torch.compile, coef_scale passed as a tensor:
    a Python float that changes every warmup step would recompile. One scalar on the device,
    filled each step (a new tensor would be a copy from the host, and wait for it)."""
    fn, scale = torch.compile(loss), torch.zeros((), dtype=scale_dtype, device=device)
    return lambda x, coef_scale, target=None: fn(x, scale.fill_(coef_scale), target=target)


def all_finite(x):
    """() bool: no NaN or Inf in x. Its smallest and largest entries say it (min and max
    propagate NaN): one pass that writes nothing, where isfinite(x).all() writes a
    (B, D) mask and reads it again (about a tenth of the time on a CPU)."""
    return torch.isfinite(torch.stack(torch.aminmax(x))).all()


def check_finite_(losses, finite, first: int, lr: float, all_ranks: bool = False):
    """Raise if a batch of the window that started at step `first` had NaN/Inf values,
    or if the loss stopped being finite (naming the first such step). all_ranks: every
    process raises if any does (a lone rank's error would leave the others waiting)."""
    if all_ranks:
        import torch.distributed as dist
        bad = torch.tensor([int(not finite.all() or not torch.isfinite(losses).all())], device=losses.device)
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
    if bool((sae.samples_since_fired >= cfg.resample_dead_after).all()):
        raise FloatingPointError(f"every latent is dead at step {step + 1} (none fired in {cfg.resample_dead_after:,} "
                                 f"samples): the sparsity coefficient or the learning rate ({cfg.lr:g}) is likely "
                                 "too high")


DIVERGED = 100.0  # a loss this many times the first step's means the run diverged


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
    dead = (sae.samples_since_fired >= cfg.resample_dead_after).nonzero().squeeze(-1)  # (n_dead,)
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
