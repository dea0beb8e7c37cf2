"""The fast path of every variant: encode and decode only the latents that matter.

A TopK SAE keeps k of its F latents per sample. The readable reference (minisae/sae.py,
minisae/variants.py) scatters the k values into a dense code f (B, F) and decodes it with
a full product f @ W_dec; autograd then runs that product backwards twice and sends a
dense (B, F) gradient back through the encoder, two more full products. All but a
fraction k/F of those multiply-adds are multiplications by zero. Here the code is kept as
the list of its N non-zero positions, and every product after the first touches only
them:

    pre          = W_enc (x - b_dec) + b_enc, once, without autograd     (B, F)
    (rows, cols) = the selected entries: sample rows[j] uses latent cols[j]  (N,) each
    vals_j       = pre[rows_j, cols_j]           with a sparse backward      (N,)
    x_hat[b]     = sum_{j: rows_j = b} ReLU(vals_j) W_dec[cols_j] + b_dec    (B, D)

The values and gradients are those of the reference (tests/core/test_sparse_decode.py checks
outputs, gradients and AuxK against it); only the order of the additions differs. One
dense product (B x D x F) is left, the encoder's forward; the rest costs O(N D).

Matryoshka BatchTopK (minisae/matryoshka.py) also needs every prefix's reconstruction
x_hat_m = f[:, :m] W_dec[:m] + b_dec. With the entries sorted by latent group
[m_{g-1}, m_g), each group is decoded once into a partial P_g (B, D), and x_hat_m is the
running sum b_dec + P_1 + ... + P_g: no entry is decoded twice (`decode_prefixes`,
`PrefixErrors`; tests/core/test_matryoshka.py checks them against the reference).

The dense reference is as fast when k/F is large (the dense products run at full
matrix-multiply speed, the sparse ones gather rows one by one); `worth_it` is the rule,
measured with benchmarks/sae_train.py --crossover.

The penalty-based variants have no k, but the same structure: every term of their loss
and gradient is zero outside a set of entries read off `pre`, so the same pieces apply
(`penalty_loss`):

    ReLU       the positive entries, pre > 0 (ReLU passes no gradient elsewhere)
    Gated      the open gates, pi_gate > 0 (the code, the L1 term and the auxiliary
               reconstruction all read only those)
    JumpReLU   the active entries z > theta, and those in the threshold's window
               |z - theta| < eps/2 (the only ones that move theta), decoded with value 0

Their size changes from step to step (a new SAE starts with about half its entries
positive), so the path is chosen per step from the count, against a crossover of its own.
On an accelerator the reference runs: its products are cheap there, and counting the
entries would make the host wait for the device every step.
"""

from functools import lru_cache, partial
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from minisae.codes import DenseCode, SparseCode
from minisae.sae import ReLU
from minisae.variants import Gated, JumpReLU, _JumpReLUFn, _StepFn, in_window, ordered_bits

# Above this fraction of selected latents (N / (B F)) the dense reference is about as
# fast. Measured (benchmarks/sae_train.py --crossover, one thread, D=256, F=2048, B=1024):
# dense / sparse step time 3.7 at k/F = 1/256, 1.3 at 1/8, 1.03 at 1/4, 0.97 at 1/2.
CROSSOVER = 0.25


# The penalty variants' sparse path must also find its entries, and it runs in float32
# where bf16 autocast makes the dense products twice as fast: its crossover is lower.
# Measured (benchmarks/sae_train.py --crossover, one thread, ReLU, D=576, F=2304, B=1024):
# dense / sparse 1.12 at 16% positive entries and 2.0 at 7% in fp32; 0.63 and 1.20 in bf16.
PENALTY_CROSSOVER, PENALTY_CROSSOVER_BF16 = 0.15, 0.07


def worth_it(k: int, n_latents: int) -> bool:
    return k / n_latents < CROSSOVER


def loss_function(sae, sparse: bool = True):
    """The loss the training loop calls, chosen once per SAE (as sparsify picks its decoder
    once): (x, coef_scale, target=None) -> (total, parts), with parts["code"] a DenseCode
    or SparseCode; target (B, D): what x_hat should match, x itself by default (a
    transcoder's output site, as for SAE.loss).

        TopK, BatchTopK with k/F below the crossover      sparse_loss
        ReLU, Gated, JumpReLU on the CPU                   penalty_loss each step, the
                                                           reference where it is as fast
        anything else, eval mode, or sparse=False         SAE.loss, the reference

    The sparse paths are training's: BatchTopK selects by its training rule there."""
    part, sparse = sae.activation, sparse and sae.training
    if sparse and hasattr(part, "select") and worth_it(part.k, sae.n_latents):
        return partial(sparse_coded_loss, sae)
    if sparse and isinstance(part, (ReLU, Gated, JumpReLU)) and sae.W_enc.device.type == "cpu":
        return partial(penalty_or_reference_loss, sae)
    return partial(reference_loss, sae)


def reference_loss(sae, x, coef_scale: float = 1.0, pre=None, target=None):
    """SAE.loss, its dense code answering as a DenseCode (target: a transcoder's)."""
    loss, parts = sae.loss(x, coef_scale, pre=pre, target=target)
    return loss, {**parts, "code": DenseCode(parts["f"])}


def sparse_coded_loss(sae, x, coef_scale: float = 1.0, target=None):
    """sparse_loss, its SparseCode answering for itself."""
    loss, parts = sparse_loss(sae, x, coef_scale, target)
    return loss, {**parts, "code": parts["f"]}


def penalty_or_reference_loss(sae, x, coef_scale: float = 1.0, target=None):
    """penalty_loss where its entries are few enough this step, else the reference (with
    the pre-activations already computed)."""
    sae.check_input(x, finite=False)
    pre = sae.pre_activation(x)  # (B, F)
    out = penalty_loss(sae, x, pre, coef_scale, target=target)
    if out is None:
        return reference_loss(sae, x, coef_scale, pre=pre, target=target)
    loss, parts = out
    return loss, {**parts, "code": parts["f"]}


class LatentBags(NamedTuple):
    """The entries grouped by latent, for sum_by_latent: order (N,) sorts them by latent
    (stable), rows (N,) are their samples in that order, offsets (F,) where each latent's
    run starts. Both backward passes of a step use the same ones: made once per step."""
    order: torch.Tensor
    rows: torch.Tensor
    offsets: torch.Tensor

    @classmethod
    def of(cls, rows, cols, n_latents: int):
        order = stable_order(cols, n_latents)  # (N,)
        cols_sorted = cols.index_select(0, order)  # (N,)
        offsets = torch.searchsorted(cols_sorted, torch.arange(n_latents, device=cols.device))  # (F,)
        return cls(order, rows.index_select(0, order), offsets)


def stable_order(cols, n_latents: int):
    """cols.sort(stable=True).indices (N,): the entries by latent, in their order within one.

    A stable sort's permutation is unique, so any stable sort gives this one. On a CPU with
    F <= 2^16 the keys fit 16 bits, and NumPy sorts 16-bit keys stably by radix, in O(N):
    about 10x faster than torch's sort at N = 20,480 (a TopK step at B = 4096, k = 5)."""
    if cols.device.type != "cpu" or n_latents > 2**16:
        return cols.sort(stable=True).indices
    return torch.from_numpy(np.argsort(cols.numpy().astype(np.uint16), kind="stable"))


def sum_by_latent(rows_of, g, bags: LatentBags):
    """out[i] = sum_{j: cols_j = i} g_j rows_of[rows_j]   (F, D)

    For each latent, the g-weighted sum of the rows of rows_of (B, D) of the samples that
    selected it: the gradient of a weight matrix indexed by latent. One embedding_bag with
    a bag per latent (the entries sorted by latent), so nothing of size (N, D) is built."""
    return F.embedding_bag(bags.rows, rows_of, bags.offsets, mode="sum",
                           per_sample_weights=g.index_select(0, bags.order))  # (F, D)


class SelectedPre(torch.autograd.Function):
    """vals_j = pre[rows_j, cols_j] = W_enc[cols_j] . (x[rows_j] - b_dec) + b_enc[cols_j],
    read from a `pre` computed without autograd, with a backward over the N entries only
    (g_j = dL/dvals_j):

        dL/dW_enc[i] = sum_{j: cols_j = i} g_j (x[rows_j] - b_dec)
        dL/db_enc[i] = sum_{j: cols_j = i} g_j
        dL/db_dec    = -sum_i dL/db_enc[i] W_enc[i]      b_dec is shared by every sample,
                                                         so sum over them first
    """

    @staticmethod
    def forward(ctx, pre, rows, cols, x, W_enc, b_enc, b_dec, bags):
        ctx.save_for_backward(cols, x, W_enc, b_dec, *bags)
        return pre.flatten().index_select(0, rows * pre.shape[1] + cols)  # (N,)

    @staticmethod
    def backward(ctx, g):
        cols, x, W_enc, b_dec, *bags = ctx.saved_tensors
        g = g.to(W_enc.dtype)  # (N,)
        grad_W_enc = sum_by_latent(x.to(W_enc.dtype) - b_dec, g, LatentBags(*bags))  # (F, D)
        grad_b_enc = torch.zeros(W_enc.shape[0], dtype=g.dtype, device=g.device).index_add_(0, cols, g)  # (F,)
        grad_b_dec = -(grad_b_enc @ W_enc)  # (D,)
        return None, None, None, None, grad_W_enc, grad_b_enc, grad_b_dec, None


def selected_pre(pre, rows, cols, x, sae, bags=None):
    bags = bags or LatentBags.of(rows, cols, sae.n_latents)
    return SelectedPre.apply(pre, rows, cols, x, sae.W_enc, sae.b_enc, sae.b_dec, bags)  # (N,)


class DecodeRows(torch.autograd.Function):
    """out[b] = sum_{j: rows_j = b} vals_j W_dec[cols_j]   (B, D), rows sorted, with the backward

        dL/dvals_j   = g[rows_j] . W_dec[cols_j]
        dL/dW_dec[i] = sum_{j: cols_j = i} vals_j g[rows_j]
    """

    @staticmethod
    def forward(ctx, vals, rows, cols, W_dec, n_rows: int, bags):
        counts = row_counts(rows, n_rows)  # (B,) entries per row
        offsets = counts.cumsum(0) - counts  # (B,) start of each row (rows sorted); a searchsorted of
        #                                      every row is 6x slower on a CPU at Matryoshka's G*B rows
        ctx.save_for_backward(vals, cols, W_dec, offsets, *bags)
        return F.embedding_bag(cols, W_dec, offsets, mode="sum", per_sample_weights=vals)  # (B, D)

    @staticmethod
    def backward(ctx, g):
        vals, cols, W_dec, offsets, *bags = ctx.saved_tensors
        # the N dot products are what embedding_bag's own backward computes for its
        # per-sample weights (without building the (N, D) gathered rows): let it
        with torch.enable_grad():
            v = vals.detach().requires_grad_()
            out = F.embedding_bag(cols, W_dec.detach(), offsets, mode="sum", per_sample_weights=v)  # (B, D)
            grad_vals, = torch.autograd.grad(out, v, g)  # (N,)
        grad_W_dec = sum_by_latent(g, vals, LatentBags(*bags)) if ctx.needs_input_grad[3] else None  # (F, D)
        return grad_vals, None, None, grad_W_dec, None, None


def row_counts(rows, n_rows: int, device_safe=None):
    """(n_rows,) how many entries each row has: bincount on a CPU; elsewhere an index_add,
    since CUDA's bincount reads the largest index back to the host first (a sync per
    step). device_safe: force the index_add (for tests on a CPU)."""
    if device_safe is None:
        device_safe = rows.device.type != "cpu"
    if device_safe:
        return torch.zeros(n_rows, dtype=torch.long, device=rows.device).index_add_(0, rows, torch.ones_like(rows))
    return torch.bincount(rows, minlength=n_rows)


def decode_rows(vals, rows, cols, W_dec, n_rows: int, bags=None):
    """sum_{j: rows_j = b} vals_j W_dec[cols_j] for each b < n_rows (rows sorted) (B, D)."""
    bags = bags or LatentBags.of(rows, cols, W_dec.shape[0])
    return DecodeRows.apply(vals.to(W_dec.dtype), rows, cols, W_dec, n_rows, bags)


@lru_cache(maxsize=64)
def prefix_bounds(prefixes: tuple, device: torch.device):
    """The prefixes (G,) as a tensor on the device, made once: a tensor made from Python
    values each step would be a copy from the host, which on a GPU waits for the queue."""
    return torch.tensor(prefixes, device=device)


def decode_prefixes(vals, rows, cols, W_dec, n_rows: int, prefixes, bags=None):
    """P (G, B, D): P[g, b] = sum_{j: rows_j = b, m_{g-1} <= cols_j < m_g} vals_j W_dec[cols_j],
    each group's partial decode, as one decode_rows with a bag per (group, sample).
    bags: the entries' LatentBags if made already; reused for the reordered entries instead
    of sorting them by latent again."""
    G = len(prefixes)
    group = torch.bucketize(cols, prefix_bounds(tuple(prefixes), cols.device), right=True)  # (N,) in 0..G-1
    key, perm = (group * n_rows + rows).sort()  # (N,) by group, then sample
    if bags is not None:  # entry j moved to position at[j]: the same bags, indexed into the new order
        at = torch.empty_like(perm).index_copy_(0, perm, torch.arange(perm.numel(), device=perm.device))  # (N,)
        order = at.index_select(0, bags.order)  # (N,)
        bags = LatentBags(order, key.index_select(0, order), bags.offsets)
    return decode_rows(vals[perm], key, cols[perm], W_dec, G * n_rows, bags).view(G, n_rows, -1)  # (G, B, D)


class PrefixErrors(torch.autograd.Function):
    """e_m = (1/B) ||r_m||^2 with r_m = t - P_1 - ... - P_m, for every prefix m (G,), from the
    partials P (G, B, D) and t = target - b_dec (B, D), with the backward a running sum from
    the last prefix down:

        dL/dP_g = -(2/B) sum_{m >= g} dL/de_m r_m,     dL/dt = -dL/dP_1

    In place, as P is the partial decodes' own buffer and nothing else reads it: its storage
    becomes the residuals r_m (returned, as constants: r_G is the full residual) and then
    dL/dP, so no other (G, B, D) tensor is made. (Plain autograd through a cumsum of P
    made a Matryoshka step 1.5-2x a BatchTopK step at 768 x 6144, B = 4096, on a CPU; this
    about 1.2x: benchmarks/sae_train.py --variants batchtopk,matryoshka_batchtopk.)"""

    @staticmethod
    def forward(ctx, P, t):
        e = P.new_empty(P.shape[0])  # (G,)
        prev = t  # r_0
        for g in range(P.shape[0]):
            torch.sub(prev, P[g], out=P[g])  # r_g = r_{g-1} - P_g, over P_g
            prev = P[g]
            e[g] = torch.dot(prev.flatten(), prev.flatten())
        ctx.mark_dirty(P)
        ctx.mark_non_differentiable(P)
        ctx.save_for_backward(P)
        return e / t.shape[0], P

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_e, _):
        R, = ctx.saved_tensors  # (G, B, D), the residuals
        c = g_e.to(R.dtype) * (-2.0 / R.shape[1])  # (G,)
        R[-1].mul_(c[-1])  # R becomes dL/dP, from the last prefix down
        for m in range(R.shape[0] - 2, -1, -1):
            torch.addcmul(R[m + 1], R[m], c[m], out=R[m])
        return R, -R[0]


def auxk_loss_sparse(x, pre, x_hat, sae, k_aux: int, aux_coef: float, dead_after: int, target=None):
    """minisae.variants.auxk_loss on the dead latents' columns only: their top-k_aux
    per sample, ReLU, decoded without b_dec, against the detached residual target - x_hat
    (target: x itself by default)."""
    dead = (sae.samples_since_fired >= dead_after).nonzero().squeeze(-1)  # (n_dead,)
    if dead.numel() == 0:
        return pre.new_zeros(())
    B = x.shape[0]
    k = min(k_aux, dead.numel())
    z = pre[:, dead]  # (B, n_dead)
    z = ordered_bits(z) if z.device.type == "cpu" else z  # the same order, compared 1.4x faster
    idx = z.topk(k, dim=-1).indices  # (B, k_aux), into dead
    rows = torch.arange(B, device=x.device).repeat_interleave(k)  # (N,)
    cols = dead[idx].flatten()  # (N,)
    bags = LatentBags.of(rows, cols, sae.n_latents)
    vals = F.relu(selected_pre(pre, rows, cols, x, sae, bags))  # (N,)
    e = ((x if target is None else target) - x_hat).detach()  # (B, D)
    e_hat = decode_rows(vals, rows, cols, sae.W_dec, B, bags)  # (B, D), no b_dec
    return aux_coef * (e - e_hat).pow(2).sum(-1).mean()


def sparse_loss(sae, x, coef_scale: float = 1.0, target=None):
    """SAE.loss for an activation with `select` (TopK, BatchTopK, Matryoshka BatchTopK), on
    the sparse path: the same total and parts, with the code as a SparseCode. target:
    as SAE.loss's (x itself by default); the code is always read off x."""
    sae.check_input(x, finite=False)
    t = x if target is None else target  # (B, D) what x_hat should match
    part = sae.activation
    with torch.no_grad():  # the one dense product; addmm adds b_enc inside it, not in a pass of its own
        pre = torch.addmm(sae.b_enc, x - sae.b_dec, sae.W_enc.T)  # (B, F) = SAE.pre_activation(x)
        rows, cols = part.select(pre)  # (N,) each
    bags = LatentBags.of(rows, cols, sae.n_latents)  # shared by both backward passes
    vals = F.relu(selected_pre(pre, rows, cols, x, sae, bags))  # (N,)
    extra = {}
    if hasattr(part, "prefixes"):  # Matryoshka: every prefix's error, the last one is recon
        P = decode_prefixes(vals, rows, cols, sae.W_dec, x.shape[0], part.prefixes, bags)  # (G, B, D)
        errors, R = PrefixErrors.apply(P, t - sae.b_dec)  # (G,), (G, B, D) residuals
        x_hat, recon, extra["prefixes"] = t - R[-1], errors[-1], errors[:-1].sum()  # x_hat (B, D)
    else:
        x_hat = decode_rows(vals, rows, cols, sae.W_dec, x.shape[0], bags) + sae.b_dec  # (B, D)
        recon = (x_hat - t).pow(2).sum(-1).mean()
    k_aux = part.k_aux or max(1, sae.d // 2)  # as variants.auxk_terms
    extra["auxk"] = auxk_loss_sparse(x, pre, x_hat, sae, k_aux, part.aux_coef, part.dead_after, target)
    f = SparseCode(rows, cols, vals.detach(), tuple(pre.shape))
    return recon + sum(extra.values()), {"recon": recon, **extra, "f": f, "x_hat": x_hat}


def penalty_loss(sae, x, pre, coef_scale: float = 1.0, max_frac=None, target=None):
    """SAE.loss for ReLU, Gated and JumpReLU on the sparse path (the entries of the module
    docstring), given pre = SAE.pre_activation(x) (B, F); or None where the reference is
    as fast: on an accelerator, or when the entries are max_frac of the code or more
    (default: the crossover above for pre's dtype). target: as SAE.loss's."""
    part, (B, n_latents) = sae.activation, (x.shape[0], sae.n_latents)
    t = x if target is None else target  # (B, D) what x_hat should match
    if x.device.type != "cpu" or not isinstance(part, (ReLU, Gated, JumpReLU)):
        return None
    with torch.no_grad():
        pre = pre.detach()  # the sparse path's own backward starts at the N entries
        if isinstance(part, JumpReLU):  # the same comparisons as _JumpReLUFn and _StepFn make
            z = F.relu(pre)  # (B, F)
            keep = (z > part.theta) | in_window(z, part.theta, part.bandwidth)
        else:
            keep = pre > 0
        if max_frac is None:
            max_frac = PENALTY_CROSSOVER_BF16 if pre.dtype == torch.bfloat16 else PENALTY_CROSSOVER
        if keep.count_nonzero() >= max_frac * B * n_latents:  # counting is one cheap pass; the positions are not
            return None
        rows, cols = keep.nonzero(as_tuple=True)  # (N,) each, rows sorted
    bags = LatentBags.of(rows, cols, n_latents)  # shared by every backward pass below
    pre_sel = selected_pre(pre, rows, cols, x, sae, bags)  # (N,)
    if isinstance(part, ReLU):
        vals = pre_sel  # (N,) all > 0: ReLU is the identity on them
        extra = {"l1": coef_scale * part.sparsity_coef * vals.sum() / B}
    elif isinstance(part, Gated):  # pre_sel = pi_gate > 0 there: the gate is open, ReLU(pi_gate) = pi_gate
        mag = torch.exp(part.r_mag[cols]) * (pre_sel - sae.b_enc[cols]) + part.b_mag[cols]  # (N,)
        vals = F.relu(mag)  # (N,)
        x_hat_frozen = decode_rows(pre_sel, rows, cols, sae.W_dec.detach(), B, bags) + sae.b_dec.detach()  # (B, D)
        extra = {"l1": coef_scale * part.sparsity_coef * pre_sel.sum() / B,
                 "aux": (t - x_hat_frozen).pow(2).sum(-1).mean()}
    else:
        z, theta = F.relu(pre_sel), part.theta[cols]  # (N,) each
        vals = _JumpReLUFn.apply(z, theta, part.bandwidth)  # (N,), 0 in the window below theta
        extra = {"l0": coef_scale * part.sparsity_coef * _StepFn.apply(z, theta, part.bandwidth).sum() / B}
    x_hat = decode_rows(vals, rows, cols, sae.W_dec, B, bags) + sae.b_dec  # (B, D)
    recon = (x_hat - t).pow(2).sum(-1).mean()
    f = SparseCode(rows, cols, vals.detach(), (B, n_latents))
    return recon + sum(extra.values()), {"recon": recon, **extra, "f": f, "x_hat": x_hat}
