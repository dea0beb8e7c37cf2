"""Synthetic activations with a known ground-truth dictionary.

Following Sharkey et al. 2022 ("Taking features out of superposition with sparse
autoencoders") and Cunningham et al. 2023: G ground-truth features are unit-norm random
directions g_i in R^d (G > d, so they are in superposition), and a sample is

    x = sum_i c_i g_i (+ b),   c_i ~ U[0, 1] if feature i is active, else 0.

Feature i is active with probability p_i = s * decay^i, s chosen so that on average
`mean_active` features are active per sample. With the defaults (G=512, d=256, decay
0.99, 5 active) p_0 = 0.05 and the rarest feature fires about 3 times in 10,000 samples:
those rare features are what separates a careful SAE from a quick one.

Optional correlations (Sharkey et al. use correlated features too): each feature's
activity is decided by thresholding a Gaussian u ~ N(0, Sigma) at the quantile that keeps
its marginal p_i (a Gaussian copula), with Sigma a random low-rank-plus-identity
correlation matrix. `correlation=0` gives independent features.

Optional structure, each off by default (then the data and the random stream are exactly
the plain ones above: nothing extra is drawn from either generator):

    Zipf        p_i = s * (i + 1)^-a instead of s * decay^i  (zipf_exponent a > 0), the
                power law of feature frequencies seen in language models.
    hierarchy   P trees of features (n_parents P > 0), as in "A is for Absorption"
                (Chanin et al. 2024) and SAELens's synthetic HierarchyNode. Features
                0..P-1 are the roots; every node above the last level (hierarchy_depth
                levels below the roots) has C = children_per_parent children, numbered
                breadth first: the children of node k are P + k C, ..., P + k C + C - 1.
                A root fires like any feature. When node k fires, with probability q =
                child_prob exactly one of its children fires, chosen uniformly, else none:
                children fire only with their parent and exclude each other, and
                    p_child = p_parent * q / C.
                The weights of the tree's non-root features in the schedule are replaced
                by these, and s is chosen so the expected count is still `mean_active`.
                `parents` maps each node with children to its children.
    magnitudes  c_i ~ |N(1, sigma^2)| instead of U[0, 1]  (magnitude_std sigma, 0 = every
                active feature at size 1): features of a roughly fixed size, the regime in
                which a latent can fold a parent into a child exactly (absorption).
    bias        a fixed random vector b with ||b|| = bias_norm added to every sample (not
                a feature: c does not record it; the SAE's b_dec should learn it).

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
    zipf_exponent: float = 0.0  # 0 = the geometric decay above; a > 0: p_i proportional to (i + 1)**-a
    n_parents: int = 0  # P roots of feature trees; 0 = no hierarchy
    children_per_parent: int = 4  # C mutually exclusive children of every node above the last level
    hierarchy_depth: int = 1  # levels below the roots: 1 = parents and children, 2 = also grandchildren
    child_prob: float = 0.75  # q = P(one of its children fires | a node fires)
    magnitude_std: float | None = None  # None: c ~ U[0, 1]; sigma >= 0: c ~ |N(1, sigma^2)|
    bias_norm: float = 0.0  # ||b|| of the vector added to every sample; 0 = none
    seed: int = 0  # fixes the dictionary, the probabilities' order and the correlations


def check_config(cfg: SparseFeaturesConfig):
    if cfg.n_features <= 0 or cfg.d <= 0 or cfg.mean_active <= 0 or not 0 < cfg.decay <= 1:
        raise ValueError(f"need positive sizes, mean_active > 0 and decay in (0, 1], got {cfg}")
    if not 0 <= cfg.correlation < 1:
        raise ValueError(f"correlation must be in [0, 1), got {cfg.correlation}")
    if cfg.correlation > 0 and cfg.n_factors <= 0:
        raise ValueError(f"n_factors must be positive when correlation > 0, got {cfg.n_factors}")
    if cfg.zipf_exponent < 0 or cfg.bias_norm < 0 or (cfg.magnitude_std is not None and cfg.magnitude_std < 0):
        raise ValueError(f"zipf_exponent, bias_norm and magnitude_std must be >= 0, got {cfg}")
    if cfg.n_parents < 0:
        raise ValueError(f"n_parents must be >= 0, got {cfg.n_parents}")
    if cfg.n_parents > 0:
        if cfg.children_per_parent < 1 or cfg.hierarchy_depth < 1 or not 0 < cfg.child_prob <= 1:
            raise ValueError(f"need children_per_parent >= 1, hierarchy_depth >= 1, child_prob in (0, 1], got {cfg}")
        size = cfg.n_parents * sum(cfg.children_per_parent ** i for i in range(cfg.hierarchy_depth + 1))
        if size > cfg.n_features:
            raise ValueError(f"the feature trees need {size} features, more than n_features={cfg.n_features}")


def tree_levels(n_parents: int, n_children: int, depth: int) -> list:
    """[(first, end)) index ranges of the nodes that have children, one per level, top
    first. Node k's children are n_parents + k * n_children + j, j < n_children."""
    levels, first, width = [], 0, n_parents
    for _ in range(depth if n_parents > 0 else 0):
        levels.append((first, first + width))
        first, width = first + width, width * n_children
    return levels


class SparseFeatures:
    """A fixed dictionary (G, D) and feature probabilities (G,); `sample` draws data."""

    def __init__(self, cfg: SparseFeaturesConfig = SparseFeaturesConfig()):
        check_config(cfg)
        self.cfg = cfg
        G, P, C = cfg.n_features, cfg.n_parents, cfg.children_per_parent
        g = torch.Generator().manual_seed(cfg.seed)
        D = torch.randn(G, cfg.d, generator=g)  # (G, D)
        self.dictionary = D / D.norm(dim=-1, keepdim=True)  # (G, D) unit rows
        if cfg.zipf_exponent > 0:
            p = (torch.arange(G, dtype=torch.float64) + 1) ** -cfg.zipf_exponent  # (G,)
        else:
            p = cfg.decay ** torch.arange(G, dtype=torch.float64)  # (G,)
        self.levels = tree_levels(P, C, cfg.hierarchy_depth)
        self.parents = {}  # node with children -> its children, top level first
        for first, end in self.levels:  # a child's weight: its parent's * q / C (parents come first)
            for k in range(first, end):
                kids = list(range(P + k * C, P + (k + 1) * C))
                self.parents[k] = kids
                p[kids] = p[k] * cfg.child_prob / C
        p = p * cfg.mean_active / p.sum()
        if p.max() > 1:
            raise ValueError(f"mean_active={cfg.mean_active} is too large for {cfg.n_features} features")
        self.probs = p.float()  # (G,) the marginal probability of every feature
        self.factors = None
        if cfg.correlation > 0:
            A = torch.randn(G, cfg.n_factors, generator=g)  # (G, n_factors)
            self.factors = (A / A.norm(dim=-1, keepdim=True)) * cfg.correlation ** 0.5
        self.bias = None
        if cfg.bias_norm > 0:
            b = torch.randn(cfg.d, generator=g)  # (D,)
            self.bias = b * cfg.bias_norm / b.norm()  # (D,)

    @classmethod
    def from_superposition(cls, W: torch.Tensor, probs: torch.Tensor):
        """Dataset x = W c from a toy model's W (m, n): ground truth = the columns of W.
        probs (n,) are the toy model's feature probabilities (1 - S)."""
        m, n = W.shape
        self = cls.__new__(cls)
        self.cfg = SparseFeaturesConfig(n_features=n, d=m, mean_active=float(probs.sum()))
        self.dictionary = W.T.detach().float().clone()  # (G, D), not normalised: x = W c exactly
        self.probs = probs.float()
        self.factors = self.bias = None
        self.levels, self.parents = [], {}
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
        if self.levels:
            active = self.fire_children(active, generator)
        # ~mean_active of the G features are on per sample: draw coefficients for those
        # only and sum their directions, rather than multiply a (n, G) matrix of zeros
        rows, cols = active.nonzero(as_tuple=True)  # (nnz,) each
        if self.cfg.magnitude_std is None:
            vals = torch.rand(rows.numel(), generator=generator)  # (nnz,) c_i ~ U[0, 1]
        else:
            vals = (1 + self.cfg.magnitude_std * torch.randn(rows.numel(), generator=generator)).abs()  # (nnz,)
        c = torch.zeros(n, G).index_put_((rows, cols), vals)  # (n, G)
        x = torch.zeros(n, self.dictionary.shape[1]).index_add_(0, rows, vals[:, None] * self.dictionary[cols])  # (n, D)
        if self.bias is not None:
            x = x + self.bias
        return x, c  # (n, D), (n, G)

    def fire_children(self, active, generator):
        """Overwrite the activity of every tree's non-root nodes (n, G): one uniform u per
        sample and node k; if k fires and u < q, child floor(u / q * C) fires (u / q is
        uniform on [0, 1) given u < q), else none. Levels top down, so a grandchild sees
        its parent's final state."""
        P, C, q = self.cfg.n_parents, self.cfg.children_per_parent, self.cfg.child_prob
        n = active.shape[0]
        u = torch.rand(n, self.levels[-1][1], generator=generator)  # (n, nodes with children)
        for first, end in self.levels:
            uk = u[:, first:end]  # (n, K)
            on = active[:, first:end] & (uk < q)  # (n, K): node fires and picks a child
            pick = (uk / q * C).long().clamp_max(C - 1)  # (n, K): which child
            kids = torch.zeros(n, end - first, C, dtype=torch.bool)  # (n, K, C)
            kids.scatter_(2, pick[..., None], on[..., None])
            active[:, P + first * C:P + end * C] = kids.reshape(n, -1)
        return active
