"""The sparse autoencoder, written out step by step.

    pre   = W_enc (x - b_dec) + b_enc          pre-activations            (B, F)
    f     = sigma(pre)                         sparse code, f >= 0        (B, F)
    x_hat = W_dec^T f + b_dec                  reconstruction             (B, D)
    loss  = ||x - x_hat||^2 + sparsity(f) [+ the variant's auxiliary terms]

`sigma` is the swappable part. The plain SAE of Towards Monosemanticity (Bricken et al.
2023) uses sigma = ReLU with an L1 penalty lambda * sum_i f_i, written below as `ReLU`.
The other members of the family (Gated, TopK, JumpReLU, BatchTopK) live in
`minisae/variants.py`, Matryoshka BatchTopK in `minisae/matryoshka.py`; they plug into
the same `SAE` as its `activation`: each is a small module with
`forward(pre, sae) -> f` and `loss_terms(...) -> dict of extra losses`.

Conventions, kept everywhere in minisae:
- Storage: W_enc is (F, D) and W_dec is (F, D); row i of W_dec is feature i's direction
  in activation space, so in code `pre = (x - b_dec) @ W_enc.T + b_enc` and
  `x_hat = f @ W_dec + b_dec`.
- Reconstruction error is the squared error summed over D and averaged over the batch.
- Decoder rows have unit norm. Without a constraint the L1 penalty is cheated: halve f_i
  and double W_dec[i] and the reconstruction is unchanged while the penalty halves. We
  follow Towards Monosemanticity and openai/sparse_autoencoder: after every optimizer
  step the rows are renormalised (`unit_norm_decoder_`), and before it the gradient
  component parallel to each row is removed (`remove_parallel_grad_`), since a step along
  the row would only be undone by the renormalisation and would disturb Adam's moments.
- Initialisation: W_dec rows random unit vectors, W_enc = W_dec (the encoder starts as the
  decoder's transpose, Gao et al. 2024 sec. 2.2), b_enc = 0, b_dec = the data mean
  (`init_b_dec_`; Towards Monosemanticity uses the geometric median, the mean is close
  for our data and one line).
"""

import inspect

import torch
import torch.nn as nn
import torch.nn.functional as F

from minisae import matryoshka, variants


class ReLU(nn.Module):
    """The plain SAE: f = ReLU(pre), sparsity loss lambda * sum_i f_i (L1).

    With unit-norm decoder rows f_i is exactly the length of feature i's contribution to
    x_hat, so the L1 penalty measures what it should. It also pulls every active f_i
    towards 0, so reconstructions come out shrunk (Wright & Sharkey 2024; the Gated SAE
    paper measures it as gamma < 1, see metrics.shrinkage_gamma).
    """

    def __init__(self, sparsity_coef: float = 1e-3):
        super().__init__()
        if not sparsity_coef >= 0:
            raise ValueError(f"sparsity_coef must be >= 0, got {sparsity_coef}")
        self.sparsity_coef = sparsity_coef  # lambda; the trainer may warm it up from 0

    def forward(self, pre, sae):
        return F.relu(pre)  # (B, F)

    def loss_terms(self, x, pre, f, x_hat, sae, coef_scale=1.0):
        return {"l1": coef_scale * self.sparsity_coef * f.sum(-1).mean()}


def unit_vectors(n: int, d: int, generator=None) -> torch.Tensor:
    """n random directions, uniform on the unit sphere in R^d."""
    v = torch.randn(n, d, generator=generator)  # (n, d)
    return v / v.norm(dim=-1, keepdim=True)


class SAE(nn.Module):
    """f = sigma(W_enc (x - b_dec) + b_enc);  x_hat = W_dec^T f + b_dec.

    d: input width D; n_latents: dictionary size F; activation: the swappable part
    (ReLU here, or one of minisae.variants). Construct with `make_sae` to pick a variant
    by name.
    """

    def __init__(self, d: int, n_latents: int, activation: nn.Module, seed: int = 0):
        super().__init__()
        if d <= 0 or n_latents <= 0:
            raise ValueError(f"sizes must be positive, got d={d}, n_latents={n_latents}")
        g = torch.Generator().manual_seed(seed)
        W = unit_vectors(n_latents, d, g)  # (F, D)
        self.W_enc = nn.Parameter(W.clone())  # (F, D)
        self.b_enc = nn.Parameter(torch.zeros(n_latents))  # (F,)
        self.W_dec = nn.Parameter(W.clone())  # (F, D), unit-norm rows
        self.b_dec = nn.Parameter(torch.zeros(d))  # (D,)
        self.activation = activation
        # samples seen since each latent last fired; the trainer updates it, AuxK and
        # resampling read it to know which latents are dead
        self.register_buffer("samples_since_fired", torch.zeros(n_latents, dtype=torch.long))
        self.d, self.n_latents = d, n_latents

    # -- the three steps ------------------------------------------------------------
    def pre_activation(self, x):
        # (x - b_dec) @ W_enc.T + b_enc as one product (addmm): the bias is added inside it,
        # and under bf16 autocast pre stays bf16 (a separate + would make it float32)
        return torch.addmm(self.b_enc, x - self.b_dec, self.W_enc.T)  # (B, F)

    def encode(self, x, return_info: bool = False):
        """x (B, D) -> f (B, F); with return_info also the pre-activations (for the docs)."""
        self.check_input(x)
        pre = self.pre_activation(x)  # (B, F)
        f = self.activation(pre, self)  # (B, F)
        return (f, {"pre": pre, "active": f > 0}) if return_info else f

    def decode(self, f):
        if f.ndim != 2 or f.shape[1] != self.n_latents:
            raise ValueError(f"expected codes of shape (batch, {self.n_latents}), got {tuple(f.shape)}")
        return torch.addmm(self.b_dec, f, self.W_dec)  # (B, D) = f @ W_dec + b_dec

    def forward(self, x):
        return self.decode(self.encode(x))  # (B, D)

    # -- the loss -------------------------------------------------------------------
    def loss(self, x, coef_scale: float = 1.0, pre=None, target=None):
        """Total loss and its parts. coef_scale multiplies the sparsity coefficient (the
        trainer's warmup). The reconstruction term is summed over D, averaged over B.
        x is checked for its shape only: a finiteness check reads all of x and waits for
        the result, so the trainer does it in bulk at each progress line instead. pre:
        the pre-activations, where a caller has them already (the fast path's fallback).
        target (B, D): what x_hat should match, x itself by default; a transcoder reads
        one site and reconstructs another (Dunefsky et al. 2024), e.g. an MLP's input
        and its output (minisae/pipeline/transcoder.py)."""
        self.check_input(x, finite=False)
        target = x if target is None else target  # (B, D)
        pre = self.pre_activation(x) if pre is None else pre  # (B, F)
        f = self.activation(pre, self)  # (B, F)
        x_hat = self.decode(f)  # (B, D)
        recon = (x_hat - target).pow(2).sum(-1).mean()
        extra = self.activation.loss_terms(x=target, pre=pre, f=f, x_hat=x_hat, sae=self, coef_scale=coef_scale)
        total = recon + sum(extra.values())
        return total, {"recon": recon, **extra, "f": f, "x_hat": x_hat}

    # -- the decoder constraint (in-place helpers end with _) ------------------------
    @torch.no_grad()
    def remove_parallel_grad_(self):
        """Drop the part of each W_dec row's gradient that points along the row."""
        if self.W_dec.grad is None:
            return
        W = self.W_dec / self.W_dec.norm(dim=-1, keepdim=True)  # (F, D)
        self.W_dec.grad -= (self.W_dec.grad * W).sum(-1, keepdim=True) * W

    @torch.no_grad()
    def unit_norm_decoder_(self):
        self.W_dec /= self.W_dec.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def fold_decoder_norm_(self):
        """Make W_dec rows unit norm without changing any output: latent i's code is
        multiplied by n_i = ||W_dec[i]|| (its encoder row, bias and any per-latent
        parameters in pre-activation units) and its decoder row divided by n_i. Exact
        for ReLU, Gated and JumpReLU; TopK and BatchTopK rank pre-activations across
        latents, so only a common rescaling of all latents leaves them unchanged."""
        n = self.W_dec.norm(dim=-1)  # (F,)
        self.W_enc *= n[:, None]
        self.b_enc *= n
        self.W_dec /= n[:, None]
        if hasattr(self.activation, "rescale_latents_"):
            self.activation.rescale_latents_(n)

    @torch.no_grad()
    def init_b_dec_(self, x):
        """b_dec = mean of a data sample x (N, D), so x - b_dec is centred from step 0."""
        self.check_input(x)
        self.b_dec.copy_(x.mean(0))

    def check_input(self, x, finite: bool = True):
        if x.ndim != 2 or x.shape[1] != self.d:
            raise ValueError(f"expected input of shape (batch, {self.d}), got {tuple(x.shape)}")
        if finite and not torch.isfinite(x).all():
            raise ValueError("input contains NaN or Inf values")


def part_settings(part: nn.Module) -> dict:
    """The constructor arguments of an activation part, read back from its attributes
    (each part stores its arguments under their own names), for save/load and logging."""
    names = inspect.signature(type(part).__init__).parameters
    return {n: getattr(part, n) for n in names if n != "self"}


def variant_name(activation: nn.Module) -> str:
    for name, cls in variant_classes().items():
        if type(activation) is cls:
            return name
    raise ValueError(f"unknown activation part {type(activation).__name__}")


def revives_dead(variant: str) -> bool:
    """Whether the variant's part revives dead latents itself (AuxK): then the trainer's
    resampling is switched off for it."""
    return getattr(variant_classes()[variant], "revives_dead", False)


def variant_classes() -> dict:
    return {"relu": ReLU, "gated": variants.Gated, "topk": variants.TopK,
            "jumprelu": variants.JumpReLU, "batchtopk": variants.BatchTopK,
            "matryoshka_batchtopk": matryoshka.MatryoshkaBatchTopK}


def make_sae(variant: str, d: int, n_latents: int, seed: int = 0, **settings) -> SAE:
    """An SAE of the named variant; `settings` go to the variant's part (e.g. k=32,
    sparsity_coef=1e-3). Variants that need the dictionary size receive it."""
    classes = variant_classes()
    if variant not in classes:
        raise ValueError(f"unknown variant {variant!r}; valid variants: {', '.join(classes)}")
    cls = classes[variant]
    params = inspect.signature(cls.__init__).parameters
    unknown = [k for k in settings if k not in params or k == "n_latents"]
    if unknown:
        valid = [p for p in params if p not in ("self", "n_latents")]
        raise ValueError(f"unknown setting(s) {unknown} for variant {variant!r}; valid: {', '.join(valid)}")
    if "n_latents" in params:
        settings["n_latents"] = n_latents
    return SAE(d, n_latents, cls(**settings), seed=seed)
