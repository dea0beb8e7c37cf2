"""Matryoshka BatchTopK: a BatchTopK SAE whose dictionary's prefixes also reconstruct alone.

A wide SAE splits a general feature into specific ones and lets one latent absorb
another's direction ("feature absorption", Chanin et al. 2024): "starts with s" stops
firing on "snake" because a "snake" latent covers both. Matryoshka SAEs (Nabeshima 2024; Bussmann et al.
2025) train nested dictionaries at once: the first m latents must reconstruct x without
the rest, for every m in a ladder of prefixes, so the early latents learn the general
features and the later ones add detail on top instead of absorbing them.
"""

import torch

from minisae.variants import BatchTopK


def default_prefixes(n_latents: int) -> tuple:
    """The doubling ladder F/64, F/32, ..., F/2, F (repeats and zeros dropped): Bussmann
    et al.'s code trains on this ladder (group sizes D/4, D/4, D/2, D, ..., 8D for F = 16D)."""
    return tuple(sorted({max(1, n_latents >> s) for s in range(7)}))


class MatryoshkaBatchTopK(BatchTopK):
    """Matryoshka BatchTopK SAE (Bussmann et al. 2025, "Learning Multi-Level Features with
    Matryoshka SAEs", sec. 3; Nabeshima 2024, "Matryoshka Sparse Autoencoders").

        f        = BatchTopK_k(pre)                  training: the k*B largest of ReLU(pre);
                                                     inference: ReLU(pre) above a fixed threshold   (B, F)
        x_hat_m  = f[:, :m] W_dec[:m] + b_dec        prefix m decodes alone, m in prefixes           (B, D)
        loss     = sum_{m in prefixes} ||x - x_hat_m||^2 + aux_coef * L_auxk

    prefixes m_1 < m_2 < ... < m_G = F: the nested dictionaries (the last is always the
    whole one; a ladder that stops short of F gets F appended, as SAELens does). The code
    is BatchTopK's over the whole dictionary, unchanged (its selection, running inference
    threshold and AuxK on the full reconstruction's residual are inherited); only the loss
    differs. The sum is unweighted, as in the paper's eq. and SAELens's
    MatryoshkaBatchTopKTrainingSAE (so SAELens's matryoshka_widths mean the same);
    dictionary_learning weights prefix i by group_weights[i] (default 1/G) and then
    averages over the G prefixes: 1/G^2 times our sum. Nabeshima samples prefixes at random
    instead of using a fixed ladder. (Inherited from BatchTopK, unlike SAELens: AuxK is not
    scaled by min(n_dead / k_aux, 1), and the first batch sets the threshold.)

    How the total equals the paper's: SAE.loss adds ||x - x_hat_F||^2 (its "recon", the
    term m = F); `loss_terms` adds "prefixes" = the sum over m_1..m_{G-1} and "auxk".
    With prefixes = (F,) the "prefixes" term is 0 and this is BatchTopK exactly.
    """

    def __init__(self, n_latents: int, k: int = 32, prefixes=None, k_aux=None, aux_coef: float = 1 / 32,
                 dead_after: int = 1_000_000, threshold_momentum: float = 0.01):
        super().__init__(n_latents, k, k_aux, aux_coef, dead_after, threshold_momentum)
        prefixes = default_prefixes(n_latents) if prefixes is None else prefixes
        if not isinstance(prefixes, (tuple, list)) or not all(type(m) is int for m in prefixes) or not prefixes:
            raise ValueError(f"prefixes must be a non-empty tuple of ints, got {prefixes!r:.80}")
        if not all(a < b for a, b in zip((0, *prefixes), prefixes)) or prefixes[-1] > n_latents:
            raise ValueError(f"prefixes must be strictly increasing in 1..n_latents={n_latents}, got {prefixes}")
        self.prefixes = tuple(prefixes) + ((n_latents,) if prefixes[-1] < n_latents else ())

    def prefix_reconstructions(self, f, sae):
        """[(m, x_hat_m)] for the inner prefixes m < F, as a running sum: each group of
        latents [a, m) is decoded once and added to the previous prefix's x_hat."""
        out, x_hat, a = [], sae.b_dec, 0  # x_hat_0 = b_dec
        for m in self.prefixes[:-1]:
            x_hat = x_hat + f[:, a:m] @ sae.W_dec[a:m]  # (B, D) = f[:, :m] W_dec[:m] + b_dec
            out.append((m, x_hat))
            a = m
        return out

    def loss_terms(self, x, pre, f, x_hat, sae, coef_scale=1.0):
        inner = [(x - x_hat_m).pow(2).sum(-1).mean() for _, x_hat_m in self.prefix_reconstructions(f, sae)]
        return {**super().loss_terms(x, pre, f, x_hat, sae, coef_scale),  # auxk
                "prefixes": torch.stack(inner).sum() if inner else pre.new_zeros(())}
