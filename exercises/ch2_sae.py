"""Exercises for chapter 2 (docs/02_sae.md): the plain SAE's encoder and its L1 penalty.

Copy this file, fill in each function and check your copy:

    cp exercises/ch2_sae.py my_ch2.py
    python -m minisae check my_ch2.py

The checker draws small inputs with Hypothesis and runs each function against the
properties minisae's own tests use and against minisae's code (the reference solutions,
exercises/solutions.py). For a failure it prints the property, what went wrong and a
small input that shows it. A function that still raises NotImplementedError is skipped.

Conventions (minisae/sae.py): B batch, D input width, F latents. W_enc and W_dec are both
stored as (F, D); row i of W_dec is latent i's direction in activation space. Inputs are
float64 tensors: return float64 too.
"""

import torch  # noqa: F401  (you will need it)


def encode(x, W_enc, b_enc, b_dec):
    """The SAE's encoder.

        f = ReLU(W_enc (x - b_dec) + b_enc)

    x (B, D), W_enc (F, D), b_enc (F,), b_dec (D,)  ->  f (B, F), every entry >= 0.

    b_dec is subtracted before encoding (and added back after decoding): the SAE encodes
    how x differs from a typical activation. W_enc is stored (F, D), one row per latent,
    so mind which side of the product it goes on.
    """
    raise NotImplementedError


def l1_loss(f, W_dec, coef):
    """The L1 sparsity penalty, weighted by the decoder norms (Anthropic, April 2024 update).

        loss = coef * (1/B) sum_b sum_i f_bi ||W_dec[i]||

    f (B, F) the codes (>= 0), W_dec (F, D), coef a float  ->  a 0-dim tensor.

    minisae keeps every decoder row at unit norm, where this is its `coef * f.sum(-1).mean()`
    (ReLU.loss_terms). With free norms an unweighted penalty can be cheated: halve f_i and
    double W_dec[i], the reconstruction f @ W_dec is unchanged and the penalty halves.
    Weighting each f_i by its row's norm closes that door. The penalty is summed over the
    latents and averaged over the batch, as every loss in minisae is.
    """
    raise NotImplementedError
