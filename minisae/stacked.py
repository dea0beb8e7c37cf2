"""N SAEs of one shape trained as one: their weights stacked, one batched product for all.

A sweep's SAEs (minisae/multi_train.py) often share everything but one knob: the same
variant, D and F, the same schedule, a different sparsity coefficient or k. Their
parameters can then live in one tensor each, with a leading axis for the SAE,

    W_enc, W_dec (N, F, D)    b_enc (N, F)    b_dec (N, D)    the part's per-latent ones (N, F)

and a step of all N is the step of one, with every product batched over that axis:

    pre_n   = (x - b_dec_n) W_enc_n^T + b_enc_n       baddbmm          (N, B, F)
    f_n     = sigma_n(pre_n)                          the variant's part, batched
    x_hat_n = f_n W_dec_n + b_dec_n                   baddbmm          (N, B, D)
    loss    = sum_n loss_n                            each SAE's gradient is its own slice's

One Adam over the stacked tensors is N Adams (its update is elementwise), and the
decoder constraint is row-wise, so each slice moves exactly as its SAE would alone: on
a CPU in float32 the SAEs end bit for bit as each trained alone on the dense reference
(SAE.loss), and as trained on the sparse paths up to the order of float additions
(tests/core/test_stacked.py, every variant it serves, with resampling and AuxK).
What the stack saves is launches: a step of N SAEs is one sequence of kernels instead
of N, which is what a GPU waits on when each SAE's products are small (docs/09_gpus.md).
On a CPU it saves nothing (the products already run at the matrix-multiply rate) and it
gives up the sparse paths of minisae/sparse_decode.py, so `multi_train` stacks on
accelerators only, unless told to.

Each SAE keeps its own parameters as views into the stacked tensors (so its resampling,
checks and progress line, `Trainer.end`, run on it as before) and its own `Trainer` for
that bookkeeping. A stack needs the SAEs to agree on what the batched code cannot vary
per SAE (`stack_key`): the variant and its shape-like settings, dtype, device, and the
schedule (one Adam, one learning rate per step). Per SAE: the sparsity coefficient, k,
AuxK's coefficient, the seed.
"""

from functools import partial

import torch
import torch.nn.functional as F

from minisae.codes import DenseCode
from minisae.matryoshka import MatryoshkaBatchTopK
from minisae.sae import ReLU
from minisae.train import all_finite, compiled_loss, lr_at
from minisae.variants import BatchTopK, Gated, JumpReLU, TopK, _JumpReLUFn, _StepFn

PARTS = (ReLU, Gated, JumpReLU, TopK, BatchTopK, MatryoshkaBatchTopK)  # the parts a stack batches
SCHEDULE = ("n_samples", "batch_size", "lr", "lr_warmup_frac", "lr_decay_frac", "coef_warmup_frac",
            "resample_every", "resample_until_frac", "resample_pool", "resample_dead_after", "bf16", "compile")
SHARED = {Gated: (), ReLU: (), JumpReLU: ("bandwidth",), TopK: ("k_aux", "dead_after"),
          BatchTopK: ("k_aux", "dead_after", "threshold_momentum"),
          MatryoshkaBatchTopK: ("k_aux", "dead_after", "threshold_momentum", "prefixes")}  # settings one stack shares


def stack_key(sae, cfg):
    """What SAEs must share to train in one stack (None: this SAE cannot be stacked)."""
    part = sae.activation
    if type(part) not in PARTS:
        return None
    p = sae.W_enc
    return (type(part), sae.d, sae.n_latents, p.dtype, p.device, *(getattr(part, s) for s in SHARED[type(part)]),
            *(getattr(cfg, s) for s in SCHEDULE))


class Stack:
    """The SAEs' Trainers (one `stack_key`) stepped as one. Use `step(x)` as Trainer.step,
    then `finish()`: it gives each SAE its tensors back as its own, and their histories."""

    def __init__(self, trainers: list):
        self.trainers, saes = trainers, [t.sae for t in trainers]
        self.part, self.d, device = saes[0].activation, saes[0].d, saes[0].W_enc.device
        self.n_steps = trainers[0].n_steps
        # name -> (N, ...) stacked parameter ("theta", "r_mag", ... for the part's); each
        # SAE's own parameter becomes a view of its slice
        self.params = {}
        for name, _ in saes[0].named_parameters():
            own = [s.get_parameter(name) for s in saes]
            stacked = torch.nn.Parameter(torch.stack([p.detach() for p in own]))
            for p, view in zip(own, stacked.data):
                p.data = view
            self.params[name.split(".")[-1]] = stacked
        # the same for the buffers a step updates: (N, F) dead-latent counters, (N,) BatchTopK thresholds
        owners = {"samples_since_fired": saes}
        if isinstance(self.part, BatchTopK):
            owners["threshold"] = [s.activation for s in saes]
        self.buffers = {}
        for name, own in owners.items():
            stacked = torch.stack([getattr(o, name) for o in own])
            for o, view in zip(own, stacked):
                setattr(o, name, view)
            self.buffers[name] = stacked
        # the settings that may differ per SAE
        per_sae = lambda name, dtype: torch.tensor([float(getattr(s.activation, name)) for s in saes], dtype=dtype,
                                                   device=device)  # (N,)
        # the sparsity coefficient in float64, as Python multiplies it by the warmup's scale
        self.coef = per_sae("sparsity_coef", torch.float64) if hasattr(self.part, "sparsity_coef") else None
        self.aux_coef = per_sae("aux_coef", saes[0].W_enc.dtype) if hasattr(self.part, "aux_coef") else None
        if hasattr(self.part, "k"):  # each SAE's k (N,), on the device once: no copy from the host per step
            self.k = torch.tensor([s.activation.k for s in saes], device=device)
            self.k_max = max(s.activation.k for s in saes)
        self.opt = torch.optim.Adam(self.params.values(), lr=trainers[0].cfg.lr, fused=True)  # N Adams in one
        for i, t in enumerate(trainers):  # its lr for error messages, its moments for resampling
            t.opt = SliceOfAdam(self.opt, self.params, t.sae, i)
        cfg = trainers[0].cfg
        loss = partial(stacked_loss, self)  # the coefficient in float64, as Python rounds it: a float64 scale
        self.loss = compiled_loss(loss, device, torch.float64) if cfg.compile else loss

    def step(self, x):
        """One step of every SAE on the batch x (B, D), or (x, target), or on a list of
        their own batches, one per SAE (stacked (N, B, D)): Trainer.step's loop, each
        line batched over the SAEs."""
        P, trainers, first = self.params, self.trainers, self.trainers[0]
        own = isinstance(x, list)  # each SAE its own batch
        xs = [t.check_batch(x[i] if own else x) for i, t in enumerate(trainers)]  # the same checks as alone
        x, target = xs[0]  # (B, D)
        if own:
            x = torch.stack([x_i for x_i, _ in xs])  # (N, B, D)
            target = None if target is None else torch.stack([t_i for _, t_i in xs])  # (N, B, D)
        # learning rate and sparsity coefficient for this step: one schedule for all
        for param_group in self.opt.param_groups:  # every SAE's SliceOfAdam reads these
            param_group["lr"] = lr_at(first.steps_done, first.n_steps, first.cfg)
        coef_scale = min(1.0, (first.steps_done + 1) / first.coef_warm)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=trainers[0].cfg.bf16):
            losses, parts, f = self.loss(x, coef_scale, target)  # (N,), {name: (N,)}, (N, B, F)
        self.opt.zero_grad(set_to_none=True)
        losses.sum().backward()  # each SAE's gradient is its own slice's
        with torch.no_grad():  # SAE.remove_parallel_grad_, the step, SAE.unit_norm_decoder_: row by row
            W = P["W_dec"] / P["W_dec"].norm(dim=-1, keepdim=True)  # (N, F, D)
            P["W_dec"].grad -= (P["W_dec"].grad * W).sum(-1, keepdim=True) * W
            self.opt.step()
            P["W_dec"] /= P["W_dec"].norm(dim=-1, keepdim=True)
            fired = f.amax(1) > 0  # (N, F): DenseCode.fired of every SAE
        finite = None if own else all_finite(x) & (target is None or all_finite(target))  # read once for all
        losses = losses.detach()  # (N,)
        for i, (t, (x_i, target_i)) in enumerate(zip(trainers, xs)):
            t.end(x_i, target_i, losses[i], StackedCode(fired[i], f[i]), {k: v[i] for k, v in parts.items()}, finite)

    def release(self):
        """Each SAE's tensors its own again (clones of its slices), as after training alone
        (also where training stopped with an error: the SAE can still be saved)."""
        for t in self.trainers:
            for p in t.sae.parameters():
                p.data = p.data.clone()
            for owner, name in [(t.sae, "samples_since_fired"), (t.sae.activation, "threshold")]:
                if name in owner._buffers:
                    setattr(owner, name, getattr(owner, name).clone())
        self.params, self.buffers = {}, {}

    def finish(self) -> list:
        """release(); each SAE's history."""
        self.release()
        return [t.finish() for t in self.trainers]


def stacked_loss(stack, x, coef_scale, target=None):
    """Each SAE's SAE.loss, batched: total (N,), the parts {name: (N,)}, the code (N, B, F).
    x (B, D), the same batch for all, or (N, B, D), each SAE's own; target likewise."""
    P, part, B = stack.params, stack.part, x.shape[-2]
    t = x if target is None else target  # (B, D) or (N, B, D)
    pre = torch.baddbmm(P["b_enc"][:, None], x - P["b_dec"][:, None], P["W_enc"].transpose(1, 2))  # (N, B, F)
    coef = None if stack.coef is None else (coef_scale * stack.coef).to(P["W_enc"].dtype)  # (N,)
    extra = {}
    if isinstance(part, ReLU):
        f = F.relu(pre)
        extra["l1"] = coef * f.sum(-1).mean(-1)
    elif isinstance(part, Gated):
        mag = torch.exp(P["r_mag"])[:, None] * (pre - P["b_enc"][:, None]) + P["b_mag"][:, None]  # (N, B, F)
        f = (pre > 0).to(pre.dtype) * F.relu(mag)
        gate = F.relu(pre)
        x_hat_frozen = torch.bmm(gate, P["W_dec"].detach()) + P["b_dec"].detach()[:, None]  # (N, B, D)
        extra["l1"] = coef * gate.sum(-1).mean(-1)
        extra["aux"] = (t - x_hat_frozen).pow(2).sum(-1).mean(-1)
    elif isinstance(part, JumpReLU):
        z, theta = F.relu(pre), P["theta"][:, None]  # (N, B, F), (N, 1, F)
        f = _JumpReLUFn.apply(z, theta, part.bandwidth)
        extra["l0"] = coef * _StepFn.apply(z, theta, part.bandwidth).sum(-1).mean(-1)
    elif isinstance(part, TopK):
        f = top_k(pre, stack.k, stack.k_max)
    else:  # BatchTopK (and Matryoshka's): the k B largest of each SAE's whole batch
        f = top_k(F.relu(pre).flatten(1), stack.k * B, stack.k_max * B, stack.buffers["threshold"],
                  part.threshold_momentum).view_as(pre)
    x_hat = torch.baddbmm(P["b_dec"][:, None], f, P["W_dec"])  # (N, B, D)
    recon = (x_hat - t).pow(2).sum(-1).mean(-1)  # (N,)
    if isinstance(part, (TopK, BatchTopK)):
        extra["auxk"] = stacked_auxk(stack, pre, t, x_hat)
    if isinstance(part, MatryoshkaBatchTopK):  # every inner prefix m decodes alone: f[:, :m] W_dec[:m] + b_dec
        inner, x_hat_m, a = [], P["b_dec"][:, None], 0  # x_hat_0 = b_dec
        for m in part.prefixes[:-1]:
            x_hat_m = x_hat_m + torch.bmm(f[..., a:m], P["W_dec"][:, a:m])  # (N, B, D), a running sum
            inner.append((t - x_hat_m).pow(2).sum(-1).mean(-1))  # (N,)
            a = m
        extra["prefixes"] = torch.stack(inner, -1).sum(-1) if inner else recon.new_zeros(recon.shape)  # (N,)
    return recon + sum(extra.values()), {"recon": recon, **extra}, f.detach()


def top_k(pre, k, k_max: int, threshold=None, momentum=None):
    """ReLU of each SAE's k_n largest entries along the last axis, the rest 0: (N, ..., F)
    like pre; k (N,) on pre's device. One topk of the largest, k_max; each SAE keeps the
    first k_n of it (sorted). threshold (N,): BatchTopK's running threshold, updated with
    each SAE's smallest positive kept value."""
    vals, idx = pre.topk(k_max, dim=-1)  # (N, ..., k_max), largest first
    keep = torch.arange(k_max, device=pre.device) < k.view(-1, *[1] * (pre.ndim - 1))  # (N, ..., k_max)
    vals = F.relu(vals) * keep
    if threshold is not None:  # BatchTopK.update_threshold_, for every SAE at once
        with torch.no_grad():
            m = torch.where(vals > 0, vals, float("inf")).amin(-1)  # (N,)
            new = torch.where(threshold < 0, m, (1 - momentum) * threshold + momentum * m)
            threshold.copy_(torch.where(torch.isfinite(m), new, threshold))
    return torch.zeros_like(pre).scatter(-1, idx, vals)


def stacked_auxk(stack, pre, t, x_hat):
    """variants.auxk_loss for every SAE: (N,). The dead latents differ per SAE, so the
    others are masked to -inf; ReLU makes them 0, and an SAE with none dead gets 0, as alone."""
    part, n_latents = stack.part, pre.shape[-1]
    dead = stack.buffers["samples_since_fired"] >= part.dead_after  # (N, F)
    if not torch.compiler.is_compiling() and not bool(dead.any()):  # the reference's host sync,
        return pre.new_zeros(pre.shape[0])  # once for all the SAEs (compiled: no sync, the masks say it)
    k_aux = min(part.k_aux or max(1, stack.d // 2), n_latents)
    vals, idx = pre.masked_fill(~dead[:, None], float("-inf")).topk(k_aux, dim=-1)  # (N, B, k_aux)
    f_aux = torch.zeros_like(pre).scatter(-1, idx, F.relu(vals))  # (N, B, F)
    e = (t - x_hat).detach()  # (N, B, D)
    e_hat = torch.bmm(f_aux, stack.params["W_dec"])  # (N, B, D), no b_dec
    return stack.aux_coef * (e - e_hat).pow(2).sum(-1).mean(-1) * dead.any(-1)  # (N,)


class StackedCode(DenseCode):
    """One SAE's code (B, F) of a stack, its fired latents found with all the others'."""

    def __new__(cls, fired, f):
        code = super().__new__(cls, f)
        code._fired = fired  # (F,)
        return code

    def fired(self):
        return self._fired


class SliceOfAdam:
    """One SAE's view of the stack's Adam: its learning rate and, for resampling
    (train.resample_dead_), its own slice of every moment."""

    def __init__(self, opt, params, sae, i):
        self.opt, self.i, self.param_groups = opt, i, opt.param_groups
        self.own = {name.split(".")[-1]: p for name, p in sae.named_parameters()}  # short name -> its view
        self.stacked = params  # short name -> (N, ...) parameter

    @property
    def state(self):  # {own parameter: {moment name: its slice}}, as torch.optim's state reads
        return {self.own[n]: {k: v[self.i] for k, v in self.opt.state.get(p, {}).items() if v.ndim > 0}
                for n, p in self.stacked.items()}


def stack_trainers(trainers: list) -> tuple:
    """The trainers grouped into Stacks (groups of two or more with one `stack_key`) and
    the rest, which step one by one: (stacks, singles)."""
    groups = {}
    for t in trainers:
        key = stack_key(t.sae, t.cfg) if t.group is None else None
        groups.setdefault(key if key is not None else id(t), []).append(t)
    stacks = [Stack(g) for g in groups.values() if len(g) > 1]
    singles = [g[0] for g in groups.values() if len(g) == 1]
    return stacks, singles
