"""Exercises for chapter 3 (docs/03_variants.md): TopK, the Gated forward, JumpReLU's
straight-through gradient and the AuxK loss.

Copy this file, fill in each piece and check your copy:

    cp exercises/ch3_variants.py my_ch3.py
    python -m minisae check my_ch3.py

The checker draws small inputs with Hypothesis and runs each piece against the properties
minisae's own tests use and against minisae's code (the reference solutions,
exercises/solutions.py). For a failure it prints the property, what went wrong and a
small input that shows it. A piece that still raises NotImplementedError is skipped.

Conventions (minisae/sae.py): B batch, D input width, F latents. W_enc (here W_gate) and
W_dec are stored as (F, D); row i of W_dec is latent i's direction. The pre-activations
are pre = W_enc (x - b_dec) + b_enc, (B, F). Inputs are float64 tensors: return float64 too.
"""

import torch


def topk_activation(pre, k):
    """TopK (Gao et al. 2024): keep the k largest pre-activations of each row, zero the rest.

        f = ReLU(TopK_k(pre))

    pre (B, F), k an int in 1..F  ->  f (B, F).

    Each row has at most k nonzero entries, and a kept entry is its pre-activation itself,
    not shrunk. The ReLU matters: in a row with fewer than k positive entries the k
    largest include negative ones, and a code must be >= 0.
    """
    raise NotImplementedError


def gated_forward(x, W_gate, b_gate, r_mag, b_mag, b_dec):
    """The Gated SAE's encoder (Rajamanoharan et al. 2024): a gate decides which latents
    fire, a magnitude path how strongly.

        pi_gate = W_gate (x - b_dec) + b_gate                       (B, F)
        pi_mag  = W_mag  (x - b_dec) + b_mag,   W_mag = exp(r_mag) * W_gate  (row i scaled by exp(r_mag[i]))
        f       = 1[pi_gate > 0] * ReLU(pi_mag)                     (B, F)

    x (B, D), W_gate (F, D), b_gate (F,), r_mag (F,), b_mag (F,), b_dec (D,)  ->  f (B, F).

    The two paths share their directions but not their biases: b_gate belongs to the gate
    alone. The step 1[pi_gate > 0] passes no gradient, so the reconstruction loss cannot
    reach b_gate through f (the gate learns from the auxiliary loss instead).
    """
    raise NotImplementedError


class JumpReLUFn(torch.autograd.Function):
    """JumpReLU (Rajamanoharan et al. 2024b) with its straight-through pseudo-gradient.

        forward:   f = z * H(z - theta)            z (B, F), theta (F,), eps a float
        backward:  dL/dz     = dL/df * H(z - theta)                      the true gradient
                   dL/dtheta = sum_b dL/df * -(theta / eps) * K((z - theta) / eps)   (F,)
                   with K(u) = 1[|u| < 1/2], the rectangle kernel (Jumping Ahead eq. 11)

    H is the Heaviside step: its derivative is 0 almost everywhere, so theta would never
    learn. The pseudo-gradient lets entries within eps/2 of theta tell it which way to
    move. Used as `JumpReLUFn.apply(z, theta, eps)`; backward returns one gradient per
    input of forward (None for eps). Save what backward needs with ctx.save_for_backward.
    """

    @staticmethod
    def forward(ctx, z, theta, eps):
        raise NotImplementedError

    @staticmethod
    def backward(ctx, grad_f):
        raise NotImplementedError


def auxk_loss(x, pre, x_hat, W_dec, dead, k_aux, aux_coef):
    """AuxK (Gao et al. 2024, sec. A.2): the dead latents model what the live ones miss.

        e     = x - x_hat                                   the error, a constant target (B, D)
        f_aux = ReLU(TopK_k_aux(pre restricted to the dead latents))                   (B, F)
        e_hat = W_dec^T f_aux                               decoded without b_dec       (B, D)
        loss  = aux_coef * (1/B) sum_b ||e_b - e_hat_b||^2

    x (B, D), pre (B, F), x_hat (B, D), W_dec (F, D), dead (F,) bool, k_aux an int >= 1,
    aux_coef a float  ->  a 0-dim tensor.

    Only dead latents may be chosen (at most min(k_aux, number of dead) per row), so live
    latents get no gradient from this loss. The error is detached: the term trains the dead
    latents and must not move x_hat. With no dead latent the loss is 0.
    """
    raise NotImplementedError
