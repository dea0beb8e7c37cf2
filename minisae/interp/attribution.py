"""Attribution edges: every ablation edge of links.py to first order, from gradients.

links.py measures edge(i, j) by ablation: remove latent i's term at A's hook, re-run the
model, read the change of latent j of B. That costs a forward pass per source latent.
Attribution patching (Syed et al. 2023, "Attribution Patching Outperforms Automated
Circuit Discovery") replaces each re-run by its first-order Taylor term, and sparse
feature circuits (Marks et al. 2024) apply it to SAE latents with an error node.

At every position t the SAE at A reads (positions 1..T-1, sinks excluded), the
activation is the sum of its nodes:

    x_a(t) = sum_i f_a_i(t) d_i + b_a + e_a(t)       d_i = W_dec_a[i] / scale_a     (D,)
                                                     b_a = b_dec_a / scale_a        (D,)
    e_a(t) = x_a(t) - x_hat_a(t)                     the error node: what the SAE misses

The target is latent j of B summed over B's positions, m_j = sum_t f_b_j(t). Ablating
latent i (as links.py does, the error kept) moves x_a(t) by -f_a_i(t) d_i, so

    m_j(x) - m_j(x')  ~=  sum_t f_a_i(t) d_i . g_j(t)         g_j(t) = dm_j / dx_a(t)  (D,)

    attr(i -> j)     = (1/n) sum_t f_a_i(t) d_i . g_j(t)      n = tokens (positions 1..T-1)
    attr(e_t -> j)   = (1/n) e_a(t) . g_j(t)                  one error node per position

the same normalisation as links.ablation_edges. One backward pass per target j gives
g_j at every position, hence the edges from every upstream latent and error node at
once. It starts at B's hook from a row of B's encoder, dm_j/dx_b(t) =
f_j'(pre_j(t)) scale_b W_enc_b[j] (`slopes`), and the targets' backward passes run as one
batched (vmapped) call (`torch.autograd.grad(..., is_grads_batched=True)`), only from B's
hook back to A's.

Completeness. The nodes and the constant b_a add up to x_a, so

    sum_i attr(i -> j) + sum_t attr(e_t -> j) = (1/n) sum_t g_j(t) . (x_a(t) - b_a)

the first-order change of m_j / n when every node goes to zero together. The error node
makes this exact at the point of linearisation: the model runs on its own activation,
not on the SAE's reconstruction. Without it the sum would miss sum_t e_a(t) . g_j(t),
which is not small when the SAE leaves 20-30% of the variance unexplained.

Where the estimate breaks: m_j is only piecewise smooth. A TopK latent of B is not even
continuous: pushed out of (or into) the top k, its code jumps between its value and 0,
and no first-order term sees the jump, however small the ablation (on SmolLM2's layers
15 -> 16 the switching carries half of the ablation edges: docs/11_circuits.md). A ReLU
that crosses zero, and the curvature of the norms, softmax and the MLP, grow with the
size of the ablation, i.e. with f_a_i.
"""

import torch

from minisae.interp.links import check_order
from minisae.pipeline.hooked_sae import check_latents
from minisae.utils import Progress, model_device


def codes(hsae, x):
    """x (B, T', D) raw, no BOS -> (f (B, T', F) with 0 where the SAE does not read, keep (B, T')),
    in the SAE's dtype (float64 SAEs stay float64 for the tests)."""
    keep = hsae.positions(x, bos=False)  # (B, T')
    f = hsae.sae.encode(x.reshape(-1, x.shape[-1]).to(hsae.sae.W_dec.dtype) * hsae.scale)  # (B*T', F)
    return f.view(*x.shape[:2], -1) * keep[..., None], keep


def slopes(hsae, x, targets):
    """(J, B, T'): f_j'(pre_j) of each target latent j of the hooked SAE at every position
    of x (B, T', D) raw, 0 where the SAE does not read. Every variant's code f_j is a
    function of its own pre-activation pre_j = s W_enc[j] . x + c_j alone (TopK's and
    BatchTopK's selections are piecewise constant), so its gradient in x is a row of the
    encoder:  d f_j(t) / d x(t) = f_j'(pre_j(t)) * s * W_enc[j]."""
    sae, keep = hsae.sae, hsae.positions(x, bos=False)  # (B, T')
    with torch.enable_grad():
        pre = sae.pre_activation(x.reshape(-1, x.shape[-1]).to(sae.W_dec.dtype) * hsae.scale)  # (B*T', F)
        pre = pre.detach().requires_grad_(True)
        slope, = torch.autograd.grad(sae.activation(pre, sae).sum(), pre)  # (B*T', F): f_j'(pre_j)
    return slope[:, targets].T.reshape(len(targets), *x.shape[:2]) * keep  # (J, B, T')


@torch.no_grad()
def attribution_edges(model, hsae_a, hsae_b, contexts, targets, batch_size: int = 8, chunk: int = 16,
                      verbose: bool = True):
    """(edges (F_a, J), error (N, T-1, J)), float64: attr(i -> j) from every latent i of A
    and attr(e_t -> j) from A's error node at every position t of the N contexts, to each
    target latent j of B in `targets` (see the module docstring). `chunk` targets share
    one batched backward pass."""
    check_latents(targets, hsae_b.n_latents)
    check_order(model, hsae_a.hook, hsae_b.hook)
    device = model_device(model)
    d = hsae_a.sae.W_dec.detach() / hsae_a.scale  # (F_a, D): d_i, raw units
    edges = torch.zeros(hsae_a.n_latents, len(targets), dtype=torch.float64)  # (F_a, J)
    error = torch.zeros(*contexts.shape, len(targets), dtype=torch.float64)[:, 1:]  # (N, T-1, J)
    bar = Progress("attributing", len(contexts), "contexts") if verbose else None
    for s in range(0, len(contexts), batch_size):
        idx = contexts[s:s + batch_size].to(device)  # (B, T)
        leaf = []

        def swap(act):  # act (B, T, D): positions 1.. become the leaf we differentiate against
            leaf.append(act[:, 1:].detach().requires_grad_(True))  # (B, T-1, D)
            torch.set_grad_enabled(True)  # record the graph from A's hook on, not before
            return torch.cat([act[:, :1], leaf[0]], 1)

        with torch.enable_grad():
            with torch.no_grad():  # ends with grad mode restored
                x_b = model(idx, hooks={hsae_a.hook: swap}, stop_at=hsae_b.hook)[:, 1:]  # (B, T-1, D)
        x_a = leaf[0]  # (B, T-1, D)
        f_a, keep_a = codes(hsae_a, x_a.detach())  # (B, T-1, F_a)
        x_hat = hsae_a.decode_raw(f_a.flatten(0, 1)).view_as(x_a)  # (B, T-1, D)
        e_a = (x_a.detach() - x_hat) * keep_a[..., None]  # (B, T-1, D): the error nodes
        on = f_a.flatten(0, 1).amax(0) > 0  # (F_a,): latents active in this batch
        f_on, d_on = f_a.flatten(0, 1)[:, on].to(d.dtype), d[on]  # (B*(T-1), U), (U, D)
        slope = slopes(hsae_b, x_b.detach(), targets)  # (J, B, T-1)
        rows = hsae_b.scale * hsae_b.sae.W_enc[targets]  # (J, D): B's readout of each target
        for c in range(0, len(targets), chunk):
            J = min(chunk, len(targets) - c)
            # dm_j/dx_b(t) = slope_j(t) * row_j; then back to A's hook: one backward per target, batched
            dm_dxb = slope[c:c + J, ..., None] * rows[c:c + J, None, None, :]  # (J, B, T-1, D)
            g, = torch.autograd.grad(x_b, x_a, dm_dxb.to(x_b.dtype), is_grads_batched=True,
                                     retain_graph=c + J < len(targets))  # (J, B, T-1, D): g_j(t)
            # sum_t f_a_i(t) g_j(t), then . d_i: only the latents active in the batch
            moved = torch.einsum("nu,jnd->jud", f_on, g.flatten(1, 2).to(d.dtype))  # (J, U, D)
            edges[on, c:c + J] += (moved * d_on).sum(-1).T.double().cpu()  # (U, J)
            error[s:s + len(idx), :, c:c + J] = (g * e_a).sum(-1).permute(1, 2, 0).double().cpu()
        if bar:
            bar.update(s + len(idx))
    if bar:
        bar.close(len(contexts))
    n_tokens = error.shape[0] * error.shape[1]
    return edges / n_tokens, error / n_tokens
