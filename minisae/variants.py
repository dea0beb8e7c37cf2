"""The SAE family as swappable parts of the one `SAE` in minisae/sae.py.

Each part is the SAE's `activation`: `forward(pre, sae) -> f` turns the pre-activations
pre = W_enc (x - b_dec) + b_enc (B, F) into the code f (B, F), and
`loss_terms(x, pre, f, x_hat, sae, coef_scale) -> dict` returns its extra loss terms
(the reconstruction term is the SAE's, the same for all). Each fixes a problem of the
plain ReLU + L1 SAE, whose L1 penalty both selects which latents fire and shrinks how
strongly they fire:

    Gated      separate "which" (a gate) from "how much" (a magnitude)
    JumpReLU   a learned threshold per latent and a penalty on L0 itself
    TopK       no penalty at all: keep the k largest pre-activations per sample
    BatchTopK  keep the k*B largest across the batch, a fixed threshold at inference
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class Gated(nn.Module):
    """Gated SAE (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated SAEs").

        pi_gate = W_gate (x - b_dec) + b_gate             which latents fire   (B, F)
        pi_mag  = W_mag  (x - b_dec) + b_mag              how strongly         (B, F)
        f       = 1[pi_gate > 0] * ReLU(pi_mag),   W_mag = exp(r_mag) * W_gate (row-wise)
        loss    = ||x - x_hat||^2 + lambda ||ReLU(pi_gate)||_1 + ||x - x_hat_frozen(ReLU(pi_gate))||^2

    The SAE's W_enc, b_enc are W_gate, b_gate. The L1 penalty acts only on the gate path,
    so it no longer shrinks the magnitudes. The Heaviside passes no gradient, so the gate
    learns from the last two terms; the auxiliary reconstruction decodes ReLU(pi_gate)
    with a stop-gradient copy of the decoder (paper eq. 8, W_dec and b_dec frozen): it
    trains the gate to be a good reconstruction on its own without pulling the decoder
    towards it. dictionary_learning freezes the decoder as the paper does; SAELens lets
    gradient into it, and we follow the paper.
    """

    def __init__(self, n_latents: int, sparsity_coef: float = 1e-3):
        super().__init__()
        if not sparsity_coef >= 0:
            raise ValueError(f"sparsity_coef must be >= 0, got {sparsity_coef}")
        self.n_latents, self.sparsity_coef = n_latents, sparsity_coef
        self.r_mag = nn.Parameter(torch.zeros(n_latents))  # (F,) log of the row-wise scale
        self.b_mag = nn.Parameter(torch.zeros(n_latents))  # (F,)

    def magnitude(self, pre, sae):
        # W_mag (x - b_dec) = exp(r_mag) * W_gate (x - b_dec) = exp(r_mag) * (pi_gate - b_gate)
        return torch.exp(self.r_mag) * (pre - sae.b_enc) + self.b_mag  # (B, F)

    def forward(self, pre, sae):
        return (pre > 0).to(pre.dtype) * F.relu(self.magnitude(pre, sae))  # (B, F)

    def loss_terms(self, x, pre, f, x_hat, sae, coef_scale=1.0):
        gate = F.relu(pre)  # (B, F)
        x_hat_frozen = gate @ sae.W_dec.detach() + sae.b_dec.detach()  # (B, D)
        return {"l1": coef_scale * self.sparsity_coef * gate.sum(-1).mean(),
                "aux": (x - x_hat_frozen).pow(2).sum(-1).mean()}

    @torch.no_grad()
    def rescale_latents_(self, n):
        self.b_mag *= n  # W_gate, b_gate (the SAE's W_enc, b_enc) are rescaled by the SAE

    @torch.no_grad()
    def reset_latents_(self, idx):
        self.r_mag[idx], self.b_mag[idx] = 0.0, 0.0  # a resampled latent starts as at init


def auxk_loss(x, pre, x_hat, sae, k_aux: int, aux_coef: float, dead_after: int):
    """AuxK (Gao et al. 2024, sec. A.2): model the error e = x - x_hat, detached, with the
    top-k_aux pre-activations of the dead latents, decoded without b_dec:

        e_hat = W_dec^T TopK_aux(pre[dead]),   L_aux = aux_coef * ||e - e_hat||^2

    Dead latents get a gradient towards what the live ones miss, and since e is detached
    the term cannot move x_hat. Zero when no latent is dead."""
    dead = sae.samples_since_fired >= dead_after  # (F,)
    n_dead = int(dead.sum())
    if n_dead == 0:
        return pre.new_zeros(())
    e = (x - x_hat).detach()  # (B, D)
    vals, idx = pre.masked_fill(~dead, float("-inf")).topk(min(k_aux, n_dead), dim=-1)  # (B, k_aux)
    f_aux = torch.zeros_like(pre).scatter(-1, idx, F.relu(vals))  # (B, F)
    e_hat = f_aux @ sae.W_dec  # (B, D), no b_dec
    return aux_coef * (e - e_hat).pow(2).sum(-1).mean()


def auxk_terms(part, x, pre, x_hat, sae) -> dict:
    """The loss term of every part that revives its dead latents with AuxK (TopK, BatchTopK,
    and the parts built on them): k_aux defaults to D/2, "dead" is the part's dead_after."""
    k_aux = part.k_aux or max(1, sae.d // 2)
    return {"auxk": auxk_loss(x, pre, x_hat, sae, k_aux, part.aux_coef, part.dead_after)}


def _check_k(k, n_latents, k_aux, aux_coef, dead_after):
    if not 0 < k <= n_latents:
        raise ValueError(f"k must be in 1..n_latents={n_latents}, got {k}")
    if k_aux is not None and k_aux <= 0:
        raise ValueError(f"k_aux must be positive, got {k_aux}")
    if not aux_coef >= 0 or dead_after <= 0:
        raise ValueError(f"need aux_coef >= 0 and dead_after > 0, got {aux_coef}, {dead_after}")


class TopK(nn.Module):
    """TopK SAE (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

        f = ReLU(TopK_k(pre))      keep the k largest pre-activations of each row

    L0 is at most k by construction, so there is no sparsity penalty and nothing shrinks
    the kept values. Latents that stop being chosen get no gradient and die; the AuxK
    term revives them. "Dead" = not fired in the last `dead_after` samples (the paper uses
    10M tokens on GPT-2; on small data use far fewer). k_aux defaults to D/2 (paper: 512
    for GPT-2 small's D = 768, "a power of two close to d_model / 2").
    """

    revives_dead = True  # AuxK keeps latents alive: the trainer's resampling is not needed

    def __init__(self, n_latents: int, k: int = 32, k_aux=None, aux_coef: float = 1 / 32, dead_after: int = 1_000_000):
        super().__init__()
        _check_k(k, n_latents, k_aux, aux_coef, dead_after)
        self.n_latents, self.k, self.k_aux, self.aux_coef, self.dead_after = n_latents, k, k_aux, aux_coef, dead_after

    def forward(self, pre, sae):
        vals, idx = pre.topk(self.k, dim=-1)  # (B, K)
        return torch.zeros_like(pre).scatter(-1, idx, F.relu(vals))  # (B, F)

    def loss_terms(self, x, pre, f, x_hat, sae, coef_scale=1.0):
        return auxk_terms(self, x, pre, x_hat, sae)

    def select(self, pre):
        """The entries `forward` keeps, as (rows, cols) (B K,) each, for the sparse path
        (minisae/sparse_decode.py)."""
        idx = topk_by_bits(pre, self.k)  # (B, K), the same k in any order
        rows = torch.arange(pre.shape[0], device=pre.device).repeat_interleave(self.k)  # (B K,)
        return rows, idx.flatten()


class BatchTopK(nn.Module):
    """BatchTopK SAE (Bussmann et al. 2024, "BatchTopK Sparse Autoencoders").

        training:   f = ReLU(pre) kept only at the k*B largest entries of the whole batch
        inference:  f = ReLU(pre) * 1[ReLU(pre) > threshold]

    L0 averages k over the batch but varies per sample: easy inputs use fewer latents, hard
    ones more. At inference one sample's code must not depend on the rest of the batch, so
    we use a fixed threshold: a running mean (momentum `threshold_momentum`) of the
    smallest value kept in each training batch (the paper estimates it the same way, as an
    average over training batches). AuxK as for TopK.
    """

    revives_dead = True  # AuxK, as TopK

    def __init__(self, n_latents: int, k: int = 32, k_aux=None, aux_coef: float = 1 / 32,
                 dead_after: int = 1_000_000, threshold_momentum: float = 0.01):
        super().__init__()
        _check_k(k, n_latents, k_aux, aux_coef, dead_after)
        self.n_latents, self.k, self.k_aux, self.aux_coef, self.dead_after = n_latents, k, k_aux, aux_coef, dead_after
        if not 0 < threshold_momentum <= 1:  # NaN fails this too
            raise ValueError(f"threshold_momentum must be in (0, 1], got {threshold_momentum}")
        self.threshold_momentum = threshold_momentum
        self.register_buffer("threshold", torch.tensor(-1.0))  # -1: not yet estimated

    group = None  # [dist] set by the training loop under torchrun: select over the global batch

    def forward(self, pre, sae):
        z = F.relu(pre)  # (B, F)
        if not self.training:
            if self.threshold < 0:
                raise ValueError("BatchTopK threshold not estimated yet: train the SAE first")
            return z * (z > self.threshold)  # (B, F)
        if self.group is not None:  # [dist] this rank's share of the global batch's K*B_global largest
            keep, smallest = shared_selection(z.flatten(), self.k * z.shape[0] * self.group.world)
            self.update_threshold_(smallest.reshape(1))
            return z * keep.view_as(z)  # (B, F)
        vals, idx = z.flatten().topk(self.k * z.shape[0])  # (K*B,)
        f = torch.zeros_like(z).flatten().scatter(0, idx, vals).view_as(z)  # (B, F)
        self.update_threshold_(vals)
        return f

    @torch.no_grad()
    def update_threshold_(self, vals):
        """Running mean of the smallest positive kept value; no host sync (it runs every step)."""
        m = torch.where(vals > 0, vals, float("inf")).min()  # inf: nothing positive was kept
        t = self.threshold
        new = torch.where(t < 0, m, (1 - self.threshold_momentum) * t + self.threshold_momentum * m)
        self.threshold.copy_(torch.where(torch.isfinite(m), new, t))

    def loss_terms(self, x, pre, f, x_hat, sae, coef_scale=1.0):
        return auxk_terms(self, x, pre, x_hat, sae)

    def select(self, pre):
        """The entries `forward` keeps in training, as (rows, cols) (K*B,) each with rows
        sorted, for the sparse path (minisae/sparse_decode.py); updates the threshold.

        The same K*B entries as a top-k over the whole flattened (B, F), found faster: a
        cut t >= 0 a little below the (K*B)-th largest entry is guessed from a sample
        (guess_cut), and the entries above t are the candidates. If there are K*B or more,
        the (K*B)-th largest lies above t, so the K*B largest candidates are the answer;
        else (an unlucky sample, or fewer than K*B positive entries) the whole matrix is
        searched. ReLU is monotone, so pre is compared as it is: no (B, F) copy of ReLU(pre)."""
        n_latents, n = pre.shape[1], self.k * pre.shape[0]
        flat = pre.flatten()  # (B*F,)
        if self.group is not None:  # [dist] as in forward
            keep, smallest = shared_selection(flat, n * self.group.world)
            self.update_threshold_(smallest.reshape(1))
            idx = keep.nonzero().squeeze(1)  # (N,) ascending: rows sorted
            return idx // n_latents, idx % n_latents
        cand = (flat > guess_cut(flat, n)).nonzero().squeeze(1)  # (C,) ascending: row-major
        if cand.numel() >= n:
            vals = flat[cand]  # (C,), all > t >= 0
            keys = bits_of(vals) if vals.device.type == "cpu" else vals  # (C,) the same order (bits_of)
            pick = keys.topk(n, sorted=False).indices  # (K*B,)
            vals, idx = vals[pick], cand[pick.sort().values]  # (K*B,) each; idx ascending
        else:
            vals, idx = F.relu(flat).topk(n, sorted=False)  # (K*B,), zeros too where few are positive
            idx = idx.sort().values  # (K*B,) row-major: rows ascending
        self.update_threshold_(vals)
        return idx // n_latents, idx % n_latents

    @torch.no_grad()
    def rescale_latents_(self, n):
        # one global threshold: exact for a common scale of all latents (as for the ranking)
        if self.threshold >= 0:
            self.threshold *= n.mean()


def shared_selection(flat, n: int):
    """[dist] BatchTopK over the global batch, from one rank's share flat (N,) of it: a mask
    of the entries among the n largest of all ranks' entries (and positive), and the
    smallest positive kept value of all ranks (for the running threshold). Each rank's own
    n largest hold every entry of the global n largest, so gathering those finds the cut:
    every rank then keeps what one process would keep of the whole batch (ties aside)."""
    import torch.distributed as dist
    mine = flat.topk(min(n, flat.numel()), sorted=False).values  # (n,)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    cut = torch.cat(every).topk(n, sorted=False).values.min()  # () the global n-th largest
    keep = (flat >= cut) & (flat > 0)  # (N,)
    smallest = torch.where(keep, flat, float("inf")).min()  # () inf: nothing kept here
    dist.all_reduce(smallest, op=dist.ReduceOp.MIN)
    return keep, smallest


def guess_cut(flat, n: int, sample: int = 2**15):
    """A value t >= 0 a little below the n-th largest entry of flat (N,), from a strided
    sample of about `sample` entries: the sample's r-th largest, r its expected count above
    the cut plus a margin of 4 standard deviations (binomial), so that the whole of flat has
    n or more entries above t for all but rare samples. The stride is odd, so on a flattened
    (B, F) with F a power of two the sample visits every column."""
    stride = max(1, flat.numel() // sample) | 1
    s = flat[::stride]  # (S,)
    expected = s.numel() * n / flat.numel()  # sampled entries above the cut, on average
    r = min(s.numel(), int(expected + 4 * math.sqrt(expected) + 8))
    return s.topk(r, sorted=False).values.min().clamp(min=0)  # () tensor: no host sync


def bits_of(t):
    """t's IEEE bit patterns read as signed integers of the same width (a view, no copy).

    For t >= 0 they order like the values (a larger float has a larger exponent, or the
    same exponent and a larger mantissa), and every t >= 0 is above every t < 0 (sign bit
    set: a negative integer). torch's topk on integers skips the NaN test its float
    comparison makes, and runs 1.4x faster on a CPU (one thread, (4096, 512), k = 5: 5.2 ->
    3.9 ms; docs/09_gpus.md); only the order among negative values differs."""
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


def ordered_bits(t):
    """bits_of(t) with the negative values' bits other than the sign flipped: integers that
    order exactly like the values, negative ones too (-0.0 just below 0.0; NaN aside). One
    elementwise pass: worth it where the topk is dear, AuxK's k_aux of the dead latents."""
    i = bits_of(t)
    return i ^ ((i >> (8 * t.element_size() - 1)) & torch.iinfo(i.dtype).max)


def topk_by_bits(pre, k: int):
    """pre.topk(k, dim=-1, sorted=False).indices (B, K) for what TopK keeps of it.

    Where 64 k <= F, torch's CPU topk returns its k sorted (a partial sort), so on the
    bits (bits_of) it gives the same indices in the same order for every row with k or
    more positive entries, and for a row with fewer the same positive entries in the same
    places, then others whose ReLU is 0 as before: the same code, the same gradients,
    bit for bit (tests/core/test_sparse_decode.py; equal values, as in bf16, may come in
    another order, as a topk's ties may). Elsewhere the k come in an order that
    depends on every comparison, negative entries' too, so the floats are compared."""
    if pre.device.type == "cpu" and 64 * k <= pre.shape[-1]:
        return bits_of(pre).topk(k, dim=-1, sorted=False).indices  # (B, K)
    return pre.topk(k, dim=-1, sorted=False).indices  # (B, K)


def in_window(z, theta, eps):
    """(.., F) bool: the pre-activations whose pseudo-gradient moves theta, K((z - theta) / eps) = 1."""
    return (z - theta).abs() < eps / 2


class _JumpReLUFn(torch.autograd.Function):
    """z * H(z - theta) with the straight-through pseudo-gradient for theta
    (JumpReLU paper, eq. 11): d/dtheta = -(theta / eps) * K((z - theta) / eps),
    K the rectangle kernel 1[|u| < 1/2]. The gradient for z is the true one."""

    @staticmethod
    def forward(ctx, z, theta, eps):
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return z * (z > theta)

    @staticmethod
    def backward(ctx, g):
        z, theta = ctx.saved_tensors
        window = in_window(z, theta, ctx.eps).to(g.dtype)
        g_theta = (-(theta / ctx.eps) * window * g).sum_to_size(theta.shape)  # (F,): summed over B
        return g * (z > theta), g_theta, None


class _StepFn(torch.autograd.Function):
    """H(z - theta) with d/dtheta = -(1 / eps) * K((z - theta) / eps), and no gradient for z."""

    @staticmethod
    def forward(ctx, z, theta, eps):
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, g):
        z, theta = ctx.saved_tensors
        window = in_window(z, theta, ctx.eps).to(g.dtype)
        g_theta = (-(1.0 / ctx.eps) * window * g).sum_to_size(theta.shape)  # (F,): summed over B
        return None, g_theta, None  # None: no gradient for z (no (B, F) zeros)


class JumpReLU(nn.Module):
    """JumpReLU SAE (Rajamanoharan et al. 2024b, "Jumping Ahead").

        z = ReLU(pre),   f = z * H(z - theta),   loss += lambda * sum_i H(z_i - theta_i)

    A latent fires only above its own learned threshold theta_i (parameterised directly),
    and when it fires its value is z itself, unshrunk. The penalty counts active latents
    (L0). H has zero derivative almost everywhere, so theta learns through straight-through
    pseudo-gradients with a rectangle kernel of bandwidth eps: only pre-activations within
    eps/2 of the threshold tell theta which way to move. eps is in the units of the
    pre-activations: the paper uses 0.001 with inputs scaled to E||x||^2 = D, where active
    latents are of order 1; keep eps about 1% of a typical active value. The leading ReLU
    keeps codes non-negative even if a theta goes below zero (for theta >= 0 it changes
    nothing), which also makes a Gated SAE exactly a JumpReLU with
    theta = b_mag - exp(r_mag) * b_gate (paper sec. 3.2 / our tests).
    """

    def __init__(self, n_latents: int, sparsity_coef: float = 1e-3, bandwidth: float = 0.01, theta_init: float = 0.001):
        super().__init__()
        if not 0 <= sparsity_coef < math.inf or not 0 < bandwidth < math.inf:
            raise ValueError(f"need finite sparsity_coef >= 0 and bandwidth > 0, got {sparsity_coef}, {bandwidth}")
        if not 0 < theta_init < math.inf:
            raise ValueError(f"theta_init (the initial threshold) must be a positive number, got {theta_init}")
        self.n_latents, self.sparsity_coef, self.bandwidth, self.theta_init = n_latents, sparsity_coef, bandwidth, theta_init
        self.theta = nn.Parameter(torch.full((n_latents,), float(theta_init)))  # (F,)

    def forward(self, pre, sae):
        return _JumpReLUFn.apply(F.relu(pre), self.theta, self.bandwidth)  # (B, F)

    def loss_terms(self, x, pre, f, x_hat, sae, coef_scale=1.0):
        l0 = _StepFn.apply(F.relu(pre), self.theta, self.bandwidth).sum(-1).mean()
        return {"l0": coef_scale * self.sparsity_coef * l0}

    @torch.no_grad()
    def rescale_latents_(self, n):
        self.theta *= n

    @torch.no_grad()
    def reset_latents_(self, idx):
        self.theta[idx] = self.theta_init
