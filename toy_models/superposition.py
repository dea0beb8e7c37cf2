"""The toy model of superposition (Elhage et al. 2022, "Toy Models of Superposition").

n sparse features x are squeezed through m < n hidden dimensions and read back out:

    h  = W x                       W: (m, n), column W_i is feature i's direction
    x' = ReLU(W^T h + b)
    L  = E_x [ sum_i I_i (x_i - x'_i)^2 ]     I_i: importance of feature i

Each x_i is 0 with probability S (the sparsity) and uniform on [0, 1] otherwise. With
dense features (S = 0) the model keeps the m most important features, orthogonally, and
drops the rest, as PCA would. Sparse features make it worth storing more than m
features in m dimensions, as directions that interfere a little: superposition. The
ReLU and the bias b filter out that small interference (paper, "Demonstrating
Superposition").

Many instances, one per sparsity, train at once as one batched W of shape (I, m, n).
In the package's shape convention the paper's n features are G (ground-truth features)
and its m hidden dimensions are D (the width an SAE reads); I counts instances:

    W  (I, D, G)    b  (I, G)    x, x'  (I, B, G)    h  (I, B, D)

Diagnostics (paper, "Demonstrating Superposition" and "The Geometry of Superposition"),
with W_i_hat = W_i / ||W_i||:

    ||W_i||                                      is feature i represented? (1 yes, 0 no)
    sum_{j != i} (W_i_hat . W_j)^2               how much other features interfere with i
    D_i = ||W_i||^2 / sum_j (W_i_hat . W_j)^2    fraction of a dimension feature i gets

Regenerate the figures of docs/01_superposition.md with
    python -m toy_models.superposition --out figures
Scope: the paper's uniform-feature toy model only (no correlated features, no
computation-in-superposition model). The dimensionality figure uses n=200, m=20 instead
of the paper's n=400, m=30, and far fewer steps than the paper's runs, to fit the CPU
budget of `python -m minisae toy`; its clusters are visible but looser.
"""

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class SuperpositionConfig:
    n_features: int = 5  # n in the paper (G here): features in x
    n_hidden: int = 2  # m in the paper (D here): hidden dimensions, m < n for superposition
    sparsities: tuple[float, ...] = (0.0, 0.9)  # S per instance: P(x_i = 0), in [0, 1)
    importance_decay: float = 0.9  # I_i = decay**i (paper's intro figure); 1.0 = uniform
    batch_size: int = 1024  # paper's colab
    steps: int = 2000  # paper's colab: 10k at lr 1e-3; we take fewer, larger steps
    # peak Adam lr, cosine-decayed to 0 so the geometry settles; at 3e-2 more of the
    # sparse features die (W_i -> 0 where its ReLU never fires), at 3e-3 fewer are learned
    lr: float = 1e-2
    seed: int = 0

    def __post_init__(self):
        for name in ("n_features", "n_hidden", "batch_size", "steps", "importance_decay", "lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if len(self.sparsities) == 0:
            raise ValueError("sparsities must name at least one instance")
        for S in self.sparsities:
            if not 0.0 <= S < 1.0:
                raise ValueError(f"sparsity S must be in [0, 1), got {S}")


def sample_features(feature_prob: torch.Tensor, batch_size: int, n_features: int,
                    generator: torch.Generator) -> torch.Tensor:
    """x_i = 0 with probability S = 1 - feature_prob, else U[0, 1]; one row per instance."""
    p = feature_prob[:, None, None]  # (I, 1, 1)
    u = torch.rand(len(feature_prob), batch_size, n_features, generator=generator)  # (I, B, G)
    # one draw serves both: P(u < p) = p, and given u < p, u / p is uniform on [0, 1)
    return torch.where(u < p, u / p, 0.0)  # (I, B, G)


def forward(W: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x' = ReLU(W^T W x + b), batched over instances."""
    h = x @ W.transpose(1, 2)  # (I, B, D)   h = W x
    return torch.relu(h @ W + b[:, None, :])  # (I, B, G)


def toy_loss(x: torch.Tensor, x_hat: torch.Tensor, importance: torch.Tensor) -> torch.Tensor:
    """Per-instance loss: sum_i I_i (x_i - x'_i)^2, averaged over the batch."""
    return (importance * (x - x_hat) ** 2).sum(-1).mean(-1)  # (I,)


def train(cfg: SuperpositionConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Train all instances in one loop; returns W (I, D, G) and b (I, G)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    I, G, D = len(cfg.sparsities), cfg.n_features, cfg.n_hidden
    feature_prob = 1.0 - torch.tensor(cfg.sparsities)  # (I,)
    importance = cfg.importance_decay ** torch.arange(G, dtype=torch.float32)  # (G,)
    # Xavier-normal init per instance, zero bias, as in the paper's colab
    W = (torch.randn(I, D, G, generator=gen) * math.sqrt(2 / (D + G))).requires_grad_()
    b = torch.zeros(I, G, requires_grad=True)
    opt = torch.optim.Adam([W, b], lr=cfg.lr)
    for step in range(cfg.steps):
        # learning rate: cosine decay from cfg.lr to 0, so the last steps settle the geometry
        for group in opt.param_groups:
            group["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        x = sample_features(feature_prob, cfg.batch_size, G, gen)  # (I, B, G)
        # forward
        x_hat = forward(W, b, x)  # (I, B, G)
        # loss: summed over instances, so each instance gets exactly its own gradient
        loss = toy_loss(x, x_hat, importance).sum()
        # backward and step
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return W.detach(), b.detach()


def feature_norms(W: torch.Tensor) -> torch.Tensor:
    """||W_i||, the length of each feature's column: (..., D, G) -> (..., G)."""
    return W.norm(dim=-2)


def _overlaps(W: torch.Tensor) -> torch.Tensor:
    """(W_i_hat . W_j) for all i, j: (..., D, G) -> (..., G, G), row i = feature i."""
    W_hat = W / feature_norms(W).clamp_min(1e-12)[..., None, :]  # (..., D, G)
    return W_hat.transpose(-1, -2) @ W  # (..., G, G)


def interference(W: torch.Tensor) -> torch.Tensor:
    """sum_{j != i} (W_i_hat . W_j)^2: (..., D, G) -> (..., G)."""
    sq = _overlaps(W) ** 2  # (..., G, G)
    return sq.sum(-1) - sq.diagonal(dim1=-2, dim2=-1)  # drop j = i


def feature_dimensionality(W: torch.Tensor) -> torch.Tensor:
    """D_i = ||W_i||^2 / sum_j (W_i_hat . W_j)^2: (..., D, G) -> (..., G).

    The j = i term of the denominator is ||W_i||^2 itself, so D_i = 1 for a feature
    with a dimension of its own, 1/2 for an antipodal pair, 2/5 in a pentagon, and 0
    for a feature the model does not represent (W_i = 0).
    """
    norm_sq = feature_norms(W) ** 2  # (..., G)
    return norm_sq / (norm_sq + interference(W)).clamp_min(1e-12)


def dimensions_per_feature(W: torch.Tensor) -> torch.Tensor:
    """m / ||W||_F^2, "dimensions per feature": (..., D, G) -> (...).

    ||W||_F^2 = sum_i ||W_i||^2 counts the features the model represents (those with
    ||W_i|| ~ 1), so this is hidden dimensions per represented feature.
    """
    return W.shape[-2] / (W ** 2).sum((-2, -1))


def hidden_activations(W: torch.Tensor, n_samples: int, feature_prob: float,
                       generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample x from the toy distribution and return (h = W x, ground-truth dictionary).

    W is one trained instance (D, G). h is (n_samples, D): the activations an SAE would
    read. The dictionary is (G, D): the columns of W, unit-normalised. A feature the
    model dropped (||W_i|| near 0) barely shows in h; keep only rows with
    feature_norms(W) > 0.5 before scoring how well an SAE recovers the features.
    """
    if W.ndim != 2:
        raise ValueError(f"W must be one instance of shape (D, G), got {tuple(W.shape)}")
    if n_samples <= 0:
        raise ValueError(f"n_samples must be positive, got {n_samples}")
    if not 0.0 < feature_prob <= 1.0:
        raise ValueError(f"feature_prob = 1 - S must be in (0, 1], got {feature_prob}")
    x = sample_features(torch.tensor([feature_prob]), n_samples, W.shape[1], generator)[0]
    h = x.to(W.dtype) @ W.T  # (B, D)
    ground_truth = (W / feature_norms(W).clamp_min(1e-12)).T  # (G, D)
    return h, ground_truth


# ----------------------------------------------------------------------------- figures


def _plot_n5_m2(W, probs, path):
    """Paper's intro figure: each column W_i of an (m=2, n=5) W as a 2-D arrow."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(probs), figsize=(2.0 * len(probs), 2.4))
    colours = plt.cm.viridis(torch.linspace(0, 0.9, W.shape[-1]).numpy())
    for ax, W_inst, p in zip(axes, W, probs):
        for i in reversed(range(W.shape[-1])):  # most important drawn last, on top
            x, y = W_inst[:, i].tolist()
            ax.plot([0, x], [0, y], color=colours[i], lw=2)
            ax.scatter([x], [y], color=colours[i], s=18, zorder=3)
        ax.set(xlim=(-1.5, 1.5), ylim=(-1.5, 1.5), xticks=[], yticks=[], aspect="equal")
        ax.set_title(f"1-S = {p:g}", fontsize=9)
    # the key: one colour per feature, with its importance
    handles = [plt.Line2D([], [], color=colours[i], lw=2, marker="o", ms=4,
                          label=f"feature {i} (I = {0.9 ** i:.2f})") for i in range(W.shape[-1])]
    fig.legend(handles=handles, loc="lower center", ncol=W.shape[-1], fontsize=8, frameon=False)
    fig.suptitle("n=5 features in m=2 dims, importance 0.9^i (dark = most important): "
                 "columns W_i of W as the feature probability 1-S falls", fontsize=9)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_n20_m5(W, probs, path):
    """Paper's "Demonstrating Superposition" panels: W^T W, and ||W_i|| coloured by
    interference sum_{j != i} (W_i_hat . W_j)^2 (dark = own dimension, yellow = shared)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(probs), figsize=(2.2 * len(probs), 5.2),
                             gridspec_kw={"height_ratios": [1, 1.1]})
    norms, interf = feature_norms(W), interference(W).clamp(0, 1)  # (I, G) each
    G = W.shape[-1]
    for k, p in enumerate(probs):
        top, bottom = axes[0, k], axes[1, k]
        image = top.imshow((W[k].T @ W[k]).numpy(), cmap="RdBu", vmin=-1, vmax=1)
        top.set(xticks=[], yticks=[], title=f"1-S = {p:g}")
        bottom.barh(range(G), norms[k].numpy(), color=plt.cm.viridis(interf[k].numpy()))
        bottom.set(xlim=(0, 1.3), ylim=(G - 0.5, -0.5), yticks=[])
    axes[0, 0].set_ylabel("W^T W")
    axes[1, 0].set_ylabel("||W_i||, feature 0 on top")
    fig.suptitle("n=20 features, m=5 dims, importance 0.7^i. Top: W^T W (blue +1, red -1). "
                 "Bottom: ||W_i||, coloured by interference (dark 0, yellow >= 1)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.93, 1))
    # colour bars: W^T W entries (top row) and interference (bottom row)
    for row, mappable, label in ((0, image, "(W^T W)_ij"),
                                 (1, plt.cm.ScalarMappable(cmap="viridis", norm=plt.Normalize(0, 1)),
                                  "interference, clipped at 1")):
        box = axes[row, -1].get_position()
        cax = fig.add_axes((0.945, box.y0, 0.012, box.height))
        fig.colorbar(mappable, cax=cax).set_label(label, fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_dimensionality(W, probs, path):
    """Paper's "Feature Dimensionality" figure: D_i per feature against 1/(1-S)."""
    import matplotlib.pyplot as plt

    D_i, per_feature = feature_dimensionality(W), dimensions_per_feature(W)  # (I, G), (I,)
    x = 1.0 / torch.as_tensor(probs)  # (I,)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for frac, name in [(1, "1"), (3 / 4, "3/4"), (2 / 3, "2/3"), (1 / 2, "1/2"),
                       (2 / 5, "2/5"), (3 / 8, "3/8")]:
        ax.axhline(frac, color="grey", lw=0.6, ls=":")
        ax.text(1.01, frac, name, va="center", fontsize=8, color="grey",
                transform=ax.get_yaxis_transform())  # x in axes units, y in data units
    # jitter each instance's points sideways (in log x) so clusters stay visible
    gen = torch.Generator().manual_seed(0)
    jitter = torch.exp(0.08 * torch.randn(W.shape[-1], generator=gen))  # (G,)
    for k in range(len(x)):
        ax.scatter((x[k] * jitter).numpy(), D_i[k].numpy(), s=6, alpha=0.35, color="C0")
    ax.plot(x.numpy(), per_feature.numpy(), color="k", lw=1.5, label="m / ||W||_F^2")
    ax.set(xscale="log", ylim=(-0.03, 1.1), xlabel="1 / (1-S)  (sparser ->)",
           ylabel="feature dimensionality D_i",
           title=f"n={W.shape[-1]}, m={W.shape[-2]}, uniform importance: D_i sticks at "
                 "fractions such as 1/2 and 2/5")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def make_figures(out_dir: Path, seed: int = 0, quick: bool = False) -> dict:
    """Train the three experiments and write superposition_*.png into out_dir.

    Full mode takes about a minute on the project's 2-core CPU while other jobs run;
    quick mode (~7 s there, for tests) trains 10x fewer steps, so its pictures are
    rougher. Returns train seconds and diagnostics per figure.
    """
    import matplotlib

    matplotlib.use("Agg")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scale = 0.1 if quick else 1.0
    probs_5 = (1.0, 0.5, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01)  # 1 - S
    probs_20 = (1.0, 0.3, 0.1, 0.03, 0.01, 0.003, 0.001)
    probs_dim = tuple(10 ** (-k / 6) for k in range(13))  # 1 .. 0.01, log-spaced
    experiments = [  # (name, plot, 1 - S per instance, the rest of the config)
        ("n5_m2", _plot_n5_m2, probs_5,
         # lr 3e-2: the dense instance must leave a slow saddle (features 1 and 2 sharing
         # a direction); in 2k steps 3/10 seeds reach the top-2 solution at 1e-2, 10/10 at 3e-2
         dict(n_features=5, n_hidden=2, importance_decay=0.9, steps=int(2000 * scale),
              lr=3e-2)),
        ("n20_m5", _plot_n20_m5, probs_20,
         dict(n_features=20, n_hidden=5, importance_decay=0.7, steps=int(2000 * scale))),
        ("dimensionality", _plot_dimensionality, probs_dim,
         dict(n_features=200, n_hidden=20, importance_decay=1.0, batch_size=256,
              steps=int(2000 * scale))),
    ]
    # The models are tiny: a second intra-op thread costs more in synchronisation than it
    # saves, and on a busy 2-core machine it made training ~25x slower (measured).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    results = {}
    try:
        for name, plot, probs, kwargs in experiments:
            cfg = SuperpositionConfig(sparsities=tuple(1.0 - p for p in probs), seed=seed, **kwargs)
            t0 = time.perf_counter()
            W, _ = train(cfg)  # (I, D, G)
            train_s = time.perf_counter() - t0
            plot(W, probs, out_dir / f"superposition_{name}.png")
            results[name] = {
                "train_s": round(train_s, 2),
                "feature_probs": list(probs),
                "n_represented": (feature_norms(W) > 0.5).sum(-1).tolist(),
                "dims_per_feature": [round(v, 3) for v in dimensions_per_feature(W).tolist()],
            }
    finally:
        torch.set_num_threads(threads)
    return results


def main():
    parser = argparse.ArgumentParser(description="Toy models of superposition: figures")
    parser.add_argument("--out", type=Path, default=Path("figures"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="~10x fewer steps (tests)")
    args = parser.parse_args()
    for name, r in make_figures(args.out, args.seed, args.quick).items():
        print(f"{name}: trained in {r['train_s']} s, features with ||W_i|| > 0.5 per "
              f"instance {r['n_represented']}")


if __name__ == "__main__":
    main()
