"""How good is an SAE? The numbers the literature reports, each defined once.

    L0        mean number of active latents per sample: E_x ||f(x)||_0
    MSE       E_x ||x - x_hat||^2 (summed over D, as in the training loss)
    FVU       fraction of variance unexplained: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2,
              numerator and denominator accumulated separately over all samples (a mean of
              per-batch ratios would weight batches wrongly)
    dead      fraction of latents that never fire on the evaluation data
    dense     fraction firing on more than 10% of samples (too dense to be a feature)
    density   log10 firing frequency per latent, for the histogram
    MMCS      mean max cosine similarity: for each ground-truth feature, the best cosine
              with any decoder row, averaged (Sharkey et al. 2022)
    recovered fraction of ground-truth features whose best cosine is > 0.9
    gamma     relative reconstruction bias (Gated SAE paper, sec. 5.1):
              gamma = argmin_g E||x_hat / g - x||^2 = E||x_hat||^2 / E[x_hat . x];
              gamma < 1: reconstructions are shrunk; 1: unbiased

Which definition each key of `Accumulator.result` follows, where SAELens (6.x evals.py,
get_sparsity_and_variance_metrics) or SAEBench (0.6, evals/core/main.py) use the name too:

    mse                  E_x ||x - x_hat||^2, summed over D, in the units of x (with
                         result(scale=s) for inputs s x: those of x). SAELens's `mse`.
                         SAEBench 0.6's `mse` differs: each token's sum divided by the
                         number of tokens in its batch, then averaged (E_x ||.||^2 / batch size).
    explained_variance   1 - FVU: 1 - E||x - x_hat||^2 / (E||x||^2 - ||E x||^2) over the whole
                         dataset. SAELens's (ExplainedVarianceCalculator). SAEBench 0.6 reports
                         another quantity under this name, kept here as
    saebench_explained_variance
                         1 - E||x - x_hat||^2 / (E||x||^2 - (E||x||^2 / D)^2): its "total
                         variance" subtracts the square of the mean of x_d^2 over dimensions,
                         not ||E x||^2, so it depends on the units of x (those of x, as mse)
                         and is not comparable with explained_variance.
    l2_ratio             E_x ||x_hat|| / ||x||, per sample then averaged (||x|| < 1e-4 divides
                         by 1). SAELens's and SAEBench's.
    cossim               E_x cos(x, x_hat), per sample then averaged. SAELens's and SAEBench's.
    shrinkage_gamma      E||x_hat||^2 / E[x_hat . x]: SAEBench's relative_reconstruction_bias.
"""

import math

import torch


def l0(f):
    return (f != 0).sum(-1).float().mean().item()  # f (B, F)


def mse(x, x_hat):
    return (x - x_hat).pow(2).sum(-1).mean().item()


def fvu(x, x_hat):
    """On one set of samples; for many batches use `Accumulator`."""
    return ((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()


def shrinkage_gamma(x, x_hat):
    return (x_hat.pow(2).sum() / (x_hat * x).sum()).item()


def cosine_matrix(A, B):
    """Cosine similarities between the rows of A (N, D) and of B (M, D): (N, M)."""
    A = A / A.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    B = B / B.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return A @ B.T


def max_cosines(ground_truth, W_dec):
    """For each ground-truth feature (G, D), its best cosine with a decoder row (F, D)."""
    return cosine_matrix(ground_truth, W_dec).max(dim=1).values  # (G,)


def mmcs(ground_truth, W_dec):
    return max_cosines(ground_truth, W_dec).mean().item()


def recovered_frac(ground_truth, W_dec, threshold: float = 0.9):
    return (max_cosines(ground_truth, W_dec) > threshold).float().mean().item()


def mmcs_by_frequency_quartile(ground_truth, W_dec, probs):
    """MMCS over each quartile of ground-truth features sorted by firing probability,
    from the most frequent quartile to the rarest."""
    best = max_cosines(ground_truth, W_dec)[torch.argsort(probs, descending=True)]  # (G,)
    return [q.mean().item() for q in torch.tensor_split(best, 4)]  # sizes differ by at most 1


class Accumulator:
    """Streams batches of (x, x_hat, f) and gives the dataset-level metrics at the end."""

    def __init__(self, n_latents: int):
        self.n, self.active, self.sse = 0, 0.0, 0.0
        self.sum_x = self.sum_xx = None
        self.hat_sq, self.hat_dot = 0.0, 0.0
        self.l2_ratio, self.cossim = 0.0, 0.0  # sums over samples
        self.fired = torch.zeros(n_latents, dtype=torch.long)  # (F,)

    @torch.no_grad()
    def add(self, x, x_hat, f):
        x, x_hat = x.double(), x_hat.double()
        self.n += x.shape[0]
        self.active += (f != 0).sum().item()
        self.sse += (x - x_hat).pow(2).sum().item()
        sx, sxx = x.sum(0), x.pow(2).sum(0)  # (D,)
        self.sum_x = sx if self.sum_x is None else self.sum_x + sx
        self.sum_xx = sxx if self.sum_xx is None else self.sum_xx + sxx
        self.hat_sq += x_hat.pow(2).sum().item()
        self.hat_dot += (x_hat * x).sum().item()
        norm_x, norm_hat = x.norm(dim=-1), x_hat.norm(dim=-1)  # (B,)
        self.l2_ratio += (norm_hat / torch.where(norm_x < 1e-4, 1.0, norm_x)).sum().item()
        self.cossim += ((x * x_hat).sum(-1) / (norm_x * norm_hat).clamp_min(1e-12)).sum().item()
        self.fired += (f != 0).sum(0).cpu()

    def result(self, dense_threshold: float = 0.1, scale: float = 1.0) -> dict:
        """The metrics; `scale`: the samples added were s x, and mse (and SAEBench's
        unit-dependent explained variance) are reported for x."""
        if self.n == 0:
            raise ValueError("no samples were added")
        # total variance about the mean: sum ||x - mean||^2 = sum x^2 - n * mean^2
        var = (self.sum_xx - self.sum_x.pow(2) / self.n).sum().item()
        freq = self.fired.double() / self.n  # (F,)
        mse = self.sse / self.n / scale ** 2  # in the units of x
        sq = self.sum_xx.sum().item() / self.n / scale ** 2  # E||x||^2
        saebench_var = sq - (sq / self.sum_x.numel()) ** 2  # SAEBench 0.6's "total variance"
        return {
            "l0": self.active / self.n,
            "mse": mse,
            "fvu": self.sse / var if var > 0 else float("nan"),  # undefined without variance
            "explained_variance": 1 - self.sse / var if var > 0 else float("nan"),
            "saebench_explained_variance": 1 - mse / saebench_var if saebench_var != 0 else float("nan"),
            "l2_ratio": self.l2_ratio / self.n,
            "cossim": self.cossim / self.n,
            "shrinkage_gamma": self.hat_sq / self.hat_dot if self.hat_dot != 0 else float("nan"),
            "dead_frac": (self.fired == 0).float().mean().item(),
            "dense_frac": (freq > dense_threshold).float().mean().item(),
            "log10_density": [math.log10(p) if p > 0 else None for p in freq.tolist()],
        }


@torch.no_grad()
def evaluate_sae(sae, batches) -> dict:
    """Dataset-level metrics of an SAE over an iterable of input batches (B, D)."""
    was_training = sae.training
    sae.eval()
    acc = Accumulator(sae.n_latents)
    for x in batches:
        f = sae.encode(x)
        acc.add(x, sae.decode(f), f)
    sae.train(was_training)
    return acc.result()


def density_histogram(log10_density, bins: int = 50):
    """(counts, edges) of log10 firing frequency over the latents that fired; the number
    of dead latents is reported separately since log10(0) is -inf."""
    vals = torch.tensor([v for v in log10_density if v is not None], dtype=torch.float64)
    if vals.numel() == 0:
        return [], []
    counts, edges = torch.histogram(vals, bins=bins)
    return counts.tolist(), edges.tolist()
