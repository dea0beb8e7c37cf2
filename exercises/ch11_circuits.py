"""Exercise for chapter 11 (docs/11_circuits.md): one attribution edge.

Copy this file, fill in the function and check your copy:

    cp exercises/ch11_circuits.py my_ch11.py
    python -m minisae check my_ch11.py

An SAE at site A writes latent i's term f_a_i(t) d_i into the activation x(t) at every
position t; a layer turns x into the activation B reads; B's SAE gives latent j's code
f_b_j(t). Ablating latent i changes m_j = sum_t f_b_j(t) by, to first order,

    sum_t f_a_i(t) d_i . g_j(t),      g_j(t) = dm_j / dx(t)

one backward pass from m_j gives g_j at every position (attribution patching, Syed et al.
2023; sparse feature circuits, Marks et al. 2024). This is the edge of section 11.1 for
one pair (i, j); minisae/interp/attribution.py computes all of them at once on a real
model. A function that still raises NotImplementedError is skipped.

Conventions (minisae/sae.py): T positions, D width, F latents. W_dec_a is (F_a, D), row i
is latent i's direction d_i; W_enc_b is (F_b, D). Inputs are float64 tensors: return
float64 too.
"""

import torch  # noqa: F401  (you will need it)


def attribution_edge(x, f_a, W_dec_a, layer, W_enc_b, b_enc_b, b_dec_b, i, j):
    """The attribution edge from latent i of A to latent j of B.

        x_b     = layer(x)                                       B's activation        (T, D)
        f_b_j(t) = ReLU(W_enc_b[j] . (x_b(t) - b_dec_b) + b_enc_b[j])   B is a ReLU SAE
        m_j     = sum_t f_b_j(t)
        edge    = (1/T) sum_t f_a[t, i] W_dec_a[i] . g_j(t),     g_j(t) = dm_j / dx(t)   (D,)

    x (T, D) A's activation at T positions, f_a (T, F_a) A's codes there, W_dec_a (F_a, D),
    layer a differentiable torch function (T, D) -> (T, D) that may mix positions (as
    attention does: then g_j(t) gets terms from every later position), W_enc_b (F_b, D),
    b_enc_b (F_b,), b_dec_b (D,), i and j latent indices  ->  the edge, a 0-dim tensor.

    x is given: do not rebuild it from f_a (the error node of section 11.1 stays in it).
    Divide by T as links.ablation_edges and attribution.py do (an edge per token).
    Hint: torch.autograd.grad(m_j, x) with x.requires_grad_() on a detached copy.
    """
    raise NotImplementedError
