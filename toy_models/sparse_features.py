"""Synthetic activations with a known ground-truth dictionary.

Following Sharkey et al. 2022 ("Taking features out of superposition with sparse
autoencoders") and Cunningham et al. 2023: G ground-truth features are unit-norm random
directions g_i in R^d (G > d, so they are in superposition), and a sample is

    x = sum_i c_i g_i,   c_i ~ U[0, 1] if feature i is active, else 0.

Feature i is active with probability p_i = s * decay^i, s chosen so that on average
`mean_active` features are active per sample. With the defaults (G=512, d=256, decay
0.99, 5 active) p_0 = 0.05 and the rarest feature fires about 3 times in 10,000 samples:
those rare features are what separates a careful SAE from a quick one.

Optional correlations (Sharkey et al. use correlated features too): each feature's
activity is decided by thresholding a Gaussian u ~ N(0, Sigma) at the quantile that keeps
its marginal p_i (a Gaussian copula), with Sigma a random low-rank-plus-identity
correlation matrix. `correlation=0` gives independent features.

`SparseFeatures.from_superposition` turns a trained toy model of superposition into the
same kind of dataset: x = W c with the columns of W as the ground truth.
"""

from dataclasses import dataclass

import torch


@dataclass
class SparseFeaturesConfig:
    n_features: int = 512  # G, ground-truth features
    d: int = 256  # D, dimension of the activations
    mean_active: float = 5.0  # expected number of active features per sample
    decay: float = 0.99  # p_i proportional to decay**i
    correlation: float = 0.0  # 0 = independent; in (0, 1): strength of the shared low-rank part
    n_factors: int = 8  # rank of the shared part when correlation > 0
    seed: int = 0  # fixes the dictionary, the probabilities' order and the correlations


class SparseFeatures:
    """A fixed dictionary (G, D) and feature probabilities (G,); `sample` draws data."""

    def __init__(self, cfg: SparseFeaturesConfig = SparseFeaturesConfig()):
        if cfg.n_features <= 0 or cfg.d <= 0 or cfg.mean_active <= 0 or not 0 < cfg.decay <= 1:
            raise ValueError(f"need positive sizes, mean_active > 0 and decay in (0, 1], got {cfg}")
        if not 0 <= cfg.correlation < 1:
            raise ValueError(f"correlation must be in [0, 1), got {cfg.correlation}")
        if cfg.correlation > 0 and cfg.n_factors <= 0:
            raise ValueError(f"n_factors must be positive when correlation > 0, got {cfg.n_factors}")
        self.cfg = cfg
        g = torch.Generator().manual_seed(cfg.seed)
        D = torch.randn(cfg.n_features, cfg.d, generator=g)  # (G, D)
        self.dictionary = D / D.norm(dim=-1, keepdim=True)  # (G, D) unit rows
        p = cfg.decay ** torch.arange(cfg.n_features, dtype=torch.float64)  # (G,)
        p = p * cfg.mean_active / p.sum()
        if p.max() > 1:
            raise ValueError(f"mean_active={cfg.mean_active} is too large for {cfg.n_features} features")
        self.probs = p.float()  # (G,)
        self.factors = None
        if cfg.correlation > 0:
            A = torch.randn(cfg.n_features, cfg.n_factors, generator=g)  # (G, n_factors)
            self.factors = (A / A.norm(dim=-1, keepdim=True)) * cfg.correlation ** 0.5

    @classmethod
    def from_superposition(cls, W: torch.Tensor, probs: torch.Tensor):
        """Dataset x = W c from a toy model's W (m, n): ground truth = the columns of W.
        probs (n,) are the toy model's feature probabilities (1 - S)."""
        m, n = W.shape
        self = cls.__new__(cls)
        self.cfg = SparseFeaturesConfig(n_features=n, d=m, mean_active=float(probs.sum()))
        self.dictionary = W.T.detach().float().clone()  # (G, D), not normalised: x = W c exactly
        self.probs = probs.float()
        self.factors = None
        return self

    @property
    def ground_truth(self) -> torch.Tensor:
        """Unit-norm ground-truth directions (G, D), for MMCS."""
        return self.dictionary / self.dictionary.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def sample(self, n: int, generator: torch.Generator):
        """(x (n, D), c (n, G)): activations and their true feature coefficients."""
        G = self.dictionary.shape[0]
        if self.factors is None:
            active = torch.rand(n, G, generator=generator) < self.probs  # (n, G)
        else:  # Gaussian copula: correlated activity with the same marginals p_i
            z = torch.randn(n, self.factors.shape[1], generator=generator)  # (n, n_factors)
            rho = self.factors.pow(2).sum(-1)  # (G,) shared variance
            u = z @ self.factors.T + torch.randn(n, G, generator=generator) * (1 - rho).sqrt()  # (n, G) ~ N(0, 1)
            active = torch.special.ndtr(u) < self.probs  # (n, G)
        # ~mean_active of the G features are on per sample: draw coefficients for those
        # only and sum their directions, rather than multiply a (n, G) matrix of zeros
        rows, cols = active.nonzero(as_tuple=True)  # (nnz,) each
        vals = torch.rand(rows.numel(), generator=generator)  # (nnz,) c_i ~ U[0, 1]
        c = torch.zeros(n, G).index_put_((rows, cols), vals)  # (n, G)
        x = torch.zeros(n, self.dictionary.shape[1]).index_add_(0, rows, vals[:, None] * self.dictionary[cols])  # (n, D)
        return x, c  # (n, D), (n, G)
