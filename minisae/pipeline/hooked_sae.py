"""An SAE at a hook point of a model: the dictionary plus what it takes to use it on the
model's own (raw) activations.

An SAE is trained on scaled activations at one hook point of one model (minisae.pipeline.activations):

    x_sae = scale * x_raw                      scale: E||x_sae|| = sqrt(D) on the training data
    read  = every position but BOS (0) whose ||x_raw|| <= max_norm    (attention sinks stay out)

so every tool that runs it on a model (evaluation, features, steering, links) has to scale,
pick the positions and undo the scale in the same way. `HookedSAE` does it once:

    f     = encode_raw(x_raw)            = sae.encode(scale * x_raw)             (N, F)
    x_hat = decode_raw(f)                = sae.decode(f) / scale                 (N, D) raw units
    f, keep = encode_positions(act)      codes at the positions the SAE reads, 0 elsewhere
    d_i   = direction(i)                 = W_dec[i] / ||W_dec[i]|| / scale       (D,) raw units
                                           what one unit of latent i's code adds to x_raw

`mean` is the mean raw activation over the training data (for mean-ablation baselines).

What an SAE expects of its model. SAELens records how its model was loaded; two settings
change the activations an SAE reads:

  center_writing_weights (model_from_pretrained_kwargs; GPT-2 SAEs trained on TransformerLens's
    model, e.g. gpt2-small-res-jb). TransformerLens centres every weight that writes to the
    residual stream over d_model: W_E, W_pos, and each attention and MLP output projection
    and bias (W - mean_D W). Each write w is then w - mean(w). Every read of the residual
    stream goes through a LayerNorm, LN(x) = g (x - mean x) / std(x - mean x) + b, which
    gives the same output for x and x + c 1 (c any number per position), so every block
    computes what it computed before, and by induction the centred model's residual is
    the raw one minus its mean over d_model, x_c = P x with P = I - 1 1^T / D, at every
    hook, with the same logits (tests/pipeline/test_centred_writes.py checks it). Such an
    SAE reads P x. Centring before encoding is the same as centring the encoder's rows:

        W_enc (P x - b_dec) + b_enc = (W_enc P)(x - b_dec) + b_enc - s,   s = mean(b_dec) W_enc 1   (F,)

    (P is symmetric and P b_dec = b_dec - mean(b_dec) 1), so HookedSAE folds it into the
    dictionary once: W_enc <- W_enc P, b_enc <- b_enc - s, and for a gated SAE, whose
    magnitude path is exp(r_mag) (pre - b_enc) + b_mag, b_mag <- b_mag - exp(r_mag) s. The
    fold is idempotent (W_enc P has zero row sums, so s = 0 the second time) and every
    reader of hsae.sae gets the codes of P x. The reconstruction x_hat is one of P x: in
    raw units it is x_hat + mean(x) 1 (reconstruct_raw), which is what a splice writes
    back. With LayerNorm downstream the added mean changes no logit (the argument above);
    it makes x_hat - x the SAE's error in the raw stream. A model without LayerNorm
    (RMSNorm: x / rms(x) changes with x + c 1, as in SmolLM2) is refused: there the
    centred model would compute something else.
  prepend_bos: false. minisae's contexts always start with BOS (pipeline/data.py
    make_contexts) and its tools read the positions after it; an SAE trained without BOS
    is refused in one line.
Saved (`save`, minisae/formats/__init__.py: SAELens's layout) the scale is folded into the weights,
so the file reads raw activations and loads back with scale = 1; `load` also reads
sparsify's layout, hub folders (hf:OWNER/REPO/PATH) and old minisae .pt files.
"""

import re
from dataclasses import dataclass, field
from typing import Optional

import torch

from minisae import formats
from minisae.models import load_model
from minisae.pipeline.activations import sae_positions
from minisae.utils import resolve_device


@dataclass
class HookedSAE:
    sae: torch.nn.Module  # the dictionary: encode / decode in its own (scaled) units
    model_name: Optional[str]  # e.g. "gpt2", "smollm2"; None if the file does not say
    hook: str  # e.g. "blocks.15.hook_resid_post"
    scale: float = 1.0  # x_sae = scale * x_raw
    max_norm: Optional[float] = None  # raw-unit sink threshold; positions above it are not read
    mean: Optional[list] = None  # (D,) mean raw activation over the training data
    extra: dict = field(default_factory=dict)  # anything else saved with it (settings, training config)

    def __post_init__(self):
        if not (isinstance(self.scale, (int, float)) and 0 < self.scale < float("inf")):
            raise ValueError(f"the activation scale must be positive, got {self.scale!r}")
        if self.centred:
            centre_encoder_(self.sae)

    @property
    def centred(self) -> bool:
        """Whether the SAE reads the residual stream of TransformerLens's centred model
        (its SAELens metadata says center_writing_weights): P x, x's mean over d_model removed."""
        kwargs = (self.extra.get("saelens_metadata") or {}).get("model_from_pretrained_kwargs")
        return isinstance(kwargs, dict) and kwargs.get("center_writing_weights") is True

    # -- on raw activations ------------------------------------------------------------
    def positions(self, act, bos: bool = True):
        """(B, T) bool: the positions of act (B, T, D) the SAE reads (bos=False: act has no BOS)."""
        return sae_positions(act, self.max_norm, bos)

    def encode_raw(self, x):
        """x (N, D) raw -> codes f (N, F), run in float32."""
        return self.sae.encode(x.to(self.sae.W_dec.device, torch.float32) * self.scale)

    def decode_raw(self, f):
        """codes f (N, F) -> reconstruction (N, D) in raw units (of P x for a centred SAE)."""
        return self.sae.decode(f) / self.scale

    def reconstruct_raw(self, x):
        """x (N, D) raw -> what a splice writes in its place, (N, D): decode_raw(encode_raw(x)),
        plus x's mean over d_model for a centred SAE (which reconstructs P x)."""
        x_hat = self.decode_raw(self.encode_raw(x))  # (N, D)
        if self.centred:
            x_hat = x_hat + x.to(x_hat).mean(-1, keepdim=True)
        return x_hat

    def encode_positions(self, act, bos: bool = True):
        """act (B, T, D) raw, on any device -> (f (B, T, F) with zeros where the SAE does not
        read, keep (B, T)), both on the SAE's device."""
        keep = self.positions(act, bos).to(self.sae.W_dec.device)  # (B, T)
        f = self.encode_raw(act.reshape(-1, act.shape[-1])) * keep.reshape(-1, 1)  # (B*T, F)
        return f.view(*act.shape[:2], -1), keep

    def direction(self, latent: int):
        """Latent i's unit decoder row in raw units: (D,). latent * code value = what it adds."""
        check_latents([latent], self.n_latents)
        d = self.sae.W_dec[latent].detach().float()  # (D,)
        return d / d.norm() / self.scale

    @property
    def n_latents(self) -> int:
        return self.sae.n_latents

    @property
    def d(self) -> int:
        return self.sae.d

    # -- does it belong to this model? ---------------------------------------------------
    def check_site(self, model_name=None, layer=None, site=None):
        """ValueError if the caller asks for another model, layer or site than the SAE's."""
        if model_name is not None and self.model_name is not None and model_name != self.model_name:
            raise ValueError(f"this SAE was trained on model {self.model_name!r}, not {model_name!r}")
        m = re.fullmatch(r"blocks\.(\d+)\.hook_(\w+)", self.hook)
        if m and ((layer is not None and layer != int(m[1])) or (site is not None and site != m[2])):
            asked = ", ".join(f"{k} {v}" for k, v in (("layer", layer), ("site", site)) if v is not None)
            raise ValueError(f"this SAE was trained at {self.hook}, not at {asked}: "
                             "a dictionary only reads the activations it was trained on")
        md = self.extra.get("saelens_metadata") or {}  # what a SAELens file says of its model
        if md.get("prepend_bos") is False:
            raise ValueError("this SAE was trained on contexts without BOS (its SAELens metadata says prepend_bos: "
                             "false); minisae's contexts always start with BOS and its tools read the positions "
                             "after it, so the SAE would read other activations")
        return self

    def check_model(self, model):
        """ValueError unless `model` has the SAE's hook point and its activation width."""
        if self.hook not in model.hook_names():
            raise ValueError(f"hook {self.hook} of the SAE does not exist in model {self.model_name}")
        if getattr(model, "d_model", self.d) != self.d:
            raise ValueError(f"the SAE reads {self.d}-wide activations but {self.model_name} has "
                             f"d_model {model.d_model}")
        if self.centred and not isinstance(getattr(model, "ln_f", None), torch.nn.LayerNorm):
            raise ValueError("this SAE reads a residual stream with centred writes (SAELens: center_writing_weights), "
                             f"which equals the raw one minus its mean only under LayerNorm; {self.model_name} "
                             "normalises otherwise (RMSNorm)")
        return self

    # -- files ---------------------------------------------------------------------------
    def save(self, path, layout: str = "saelens"):
        """Write a directory (minisae/formats/__init__.py): SAELens's layout, or sparsify's for TopK.
        The scale is folded into the weights, so the file reads raw activations and loads
        back with scale 1; model, hook, max_norm, mean and `extra` go into cfg.json."""
        return formats.save(self.sae, path, layout, model=self.model_name, hook=self.hook, scale=self.scale,
                             max_norm=self.max_norm, mean=self.mean, **self.extra)

    @classmethod
    def load(cls, path):
        """From a directory in either layout, hf:OWNER/REPO/PATH[@REVISION] on the hub, or
        an old minisae .pt file: the one entry point, whatever wrote the file."""
        sae, meta = formats.load(path)
        return cls.from_meta(sae.float(), meta, path)

    @classmethod
    def from_meta(cls, sae, meta: dict, path="the SAE file"):
        if meta.get("hook") is None or meta.get("scale") is None:
            raise ValueError(f"{path} has no hook/scale metadata: it does not say which hook point it reads; "
                             "save it with HookedSAE(...).save(path) as `python -m minisae lm` does")
        extra = {k: v for k, v in meta.items() if k not in ("model", "hook", "scale", "max_norm", "mean", "settings",
                                                            "variant", "layout", "source")}
        return cls(sae, meta.get("model"), meta["hook"], meta["scale"], meta.get("max_norm"), meta.get("mean"), extra)


@torch.no_grad()
def centre_encoder_(sae):
    """Fold x -> P x (x's mean over d_model removed) into the encoder, in place: W_enc <- W_enc P,
    b_enc <- b_enc - s, b_mag <- b_mag - exp(r_mag) s (gated), s = mean(b_dec) W_enc 1 (the
    module docstring derives it). Idempotent."""
    s = sae.b_dec.mean() * sae.W_enc.sum(1)  # (F,)
    sae.W_enc.sub_(sae.W_enc.mean(1, keepdim=True))  # (F, D): each row centred, W_enc P
    sae.b_enc.sub_(s)
    if hasattr(sae.activation, "b_mag"):  # gated: pi_mag = exp(r_mag) (pre - b_enc) + b_mag
        sae.activation.b_mag.sub_(torch.exp(sae.activation.r_mag) * s)
    return sae


def load_with_model(path, model_name=None, layer=None, site=None, weights=None, device="cpu", latents=None):
    """(hooked SAE, model, tokenizer): an SAE and the model it was trained on, checked.
    An SAE file that does not name its model (sparsify's) runs on `model_name`. `latents`
    ('3,17' or a list of indices) are checked against the SAE before the model is loaded."""
    device = resolve_device(device)  # "auto", "cuda:1", ...: an absent device fails before any loading
    hsae = HookedSAE.load(path).check_site(model_name, layer, site)
    if latents is not None:
        parse_latents(latents, hsae.n_latents) if isinstance(latents, str) else check_latents(latents, hsae.n_latents)
    if hsae.model_name is None:
        if model_name is None:
            raise ValueError(f"{path} does not say which model it was trained on: name it with --model")
        hsae.model_name = model_name
    model, tokenizer = load_model(hsae.model_name, weights=weights)
    hsae.check_model(model)
    hsae.sae.to(device)
    return hsae, model.to(device).eval(), tokenizer


def parse_latents(text: str, n_latents: int) -> list:
    """'3,17,42' -> [3, 17, 42], each checked against the dictionary size."""
    try:
        latents = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"--latents must be comma-separated integers, got {text!r}") from None
    check_latents(latents, n_latents)
    return latents


def check_latents(latents, n_latents: int):
    bad = [i for i in latents if not 0 <= i < n_latents]
    if bad or not latents:
        raise ValueError(f"latent index(es) {bad or 'none'} out of range: this SAE has latents 0..{n_latents - 1}")
