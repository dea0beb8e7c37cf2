"""Exercise for chapter 10 (docs/10_absorption.md): the Matryoshka loss.

Copy this file, fill in the function and check your copy:

    cp exercises/ch10_absorption.py my_ch10.py
    python -m minisae check my_ch10.py

A Matryoshka SAE (Bussmann et al. 2025; Nabeshima 2024) asks the first m latents of its
dictionary to reconstruct x alone, for every m in a ladder of prefixes m_1 < m_2 < ... <
m_G = F, and adds the errors. A general feature that every prefix needs settles in the
first latents, where the later, specific ones cannot absorb it: a latent late in the
dictionary that folded the parent's direction into its own would leave the shorter
prefixes without the parent. A function that still raises NotImplementedError is skipped.

Conventions (minisae/sae.py): B batch, D input width, F latents. W_dec is stored as
(F, D); row i is latent i's direction and x_hat = f @ W_dec + b_dec. Inputs are float64
tensors: return float64 too.
"""

import torch  # noqa: F401  (you will need it)


def matryoshka_loss(x, f, W_dec, b_dec, prefixes):
    """The Matryoshka reconstruction loss.

        x_hat_m = f[:, :m] @ W_dec[:m] + b_dec                   the first m latents alone   (B, D)
        loss    = sum_{m in prefixes} mean_b ||x_b - x_hat_m,b||^2

    x (B, D), f (B, F) the codes, W_dec (F, D), b_dec (D,), prefixes a tuple of ints,
    strictly increasing, in 1..F, whose last entry is F  ->  the loss, a 0-dim tensor.

    The last prefix is the whole dictionary: its term is the plain SAE's reconstruction
    error, so with prefixes = (F,) this is that error alone. Every prefix keeps b_dec.
    The squared error is summed over D and averaged over the batch, and the prefixes'
    terms are added, not averaged (the paper and SAELens; dictionary_learning weights
    them). In minisae this is SAE.loss's "recon" term (m = F) plus
    MatryoshkaBatchTopK.loss_terms's "prefixes" term (the m < F), minisae/matryoshka.py.
    """
    raise NotImplementedError
