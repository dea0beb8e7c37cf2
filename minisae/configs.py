"""One @dataclass per experiment on a language model: every setting a run uses, with its
default and why, in one place (nanoGPT's GPTConfig). The command line (minisae/cli.py)
builds these from its flags, whose names are the field names; the library takes them
instead of long keyword lists; results files record them with `dataclasses.asdict`.

    LMConfig          what every SAE trained on a language model needs (model, data, training)
      SweepConfig     `lm`:     one hook point, several variants and sparsity settings
      LayersConfig    `layers`: one variant and setting, many layers
    SAESource         an SAE file, the model it reads and some text: `features`, `steer`, `links`
      FeaturesConfig, SteerConfig, LinksConfig

The toy experiment has its own `minisae.toy.ToyConfig`. This file imports nothing but
the standard library, so `python -m minisae CMD --help` stays instant.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional


@dataclass
class LMConfig:
    model: str = "gpt2"  # gpt2, gpt2-medium, gpt2-large, gpt2-xl, gpt2-random, smollm2
    weights: Optional[Path] = None  # a local weights file (safetensors or GGUF) instead of the download
    site: str = "resid_pre"  # resid_pre, attn_out, resid_mid, mlp_out, resid_post
    tokens: int = 4_000_000  # training tokens per SAE (passes = tokens / stored tokens)
    collect_tokens: Optional[int] = None  # tokens of activations to store; None: as many as --tokens
    eval_tokens: int = 65_536  # held-out tokens for the spliced evaluation
    expansion: int = 8  # F = expansion x D latents
    batch_size: int = 4096  # activations per training step
    lr: float = 4e-4  # Adam learning rate after warmup
    ctx_len: int = 128  # tokens per context, BOS included
    bf16: bool = False  # bfloat16 autocast for the model's forward and the SAE's training forward
    text: Optional[list] = None  # your own text files instead of the offline corpus
    seed: int = 0  # data order, SAE initialisation, the activation file's shuffle
    out: Path = Path("runs/lm")  # the run folder: activations, SAEs, results, figures
    device: str = "auto"  # auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N, mps
    distribute: str = "data"  # under torchrun: data (every SAE split over the ranks) or sweep (SAEs to ranks)

    def check(self):
        """ValueError for settings that cannot work, before any model is loaded."""
        for name in ("tokens", "eval_tokens", "expansion", "batch_size"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.ctx_len < 3:
            raise ValueError(f"--ctx-len must be at least 3 (BOS, a token, and one to predict), got {self.ctx_len}")
        if self.tokens < self.batch_size:
            raise ValueError(f"--tokens {self.tokens} is less than one training batch (--batch-size "
                             f"{self.batch_size}); give at least {self.batch_size}")
        if self.collect_tokens is not None and not self.collect_tokens > 0:
            raise ValueError(f"--collect-tokens must be positive, got {self.collect_tokens}")
        if not 0 < self.lr < float("inf"):
            raise ValueError(f"--lr must be a positive number, got {self.lr}")
        if self.distribute not in ("data", "sweep"):
            raise ValueError(f"--distribute must be data or sweep, got {self.distribute!r}")
        return self


@dataclass
class SweepConfig(LMConfig):
    layer: int = 6  # the hook point is blocks.{layer}.hook_{site}
    variants: tuple = ("relu", "gated", "topk")  # the variants to sweep, in this order
    sweep: tuple = ()  # VARIANT:KNOB=V1,V2,... overriding the default values (minisae.sweep.SWEEPS)


@dataclass
class LayersConfig(LMConfig):
    model: str = "smollm2"
    site: str = "resid_post"
    tokens: int = 300_000
    eval_tokens: int = 16_384
    out: Path = Path("runs/layers")
    layers: Optional[str] = None  # e.g. 0-29, 0-29:2 (every other), 0,5,10; None: all
    variant: str = "topk"  # one variant for every layer
    setting: Optional[str] = None  # KNOB=VALUE; None: minisae.sweep.LAYERS_SETTING for the variant
    max_disk_gb: float = 8.0  # activation files on disk at once: layers are collected in chunks that fit
    keep_acts: bool = False  # keep each chunk's activation files after its SAEs are trained

    def check(self):
        super().check()
        if not self.max_disk_gb > 0:
            raise ValueError(f"--max-disk-gb must be positive, got {self.max_disk_gb}")
        return self


@dataclass
class SAESource:
    """An SAE file, the model it was trained on, and text to run it over."""
    sae: str  # an SAE: a directory in SAELens's or sparsify's layout, an old .pt, or hf:OWNER/REPO/PATH
    model: Optional[str] = None  # only as a check: the SAE's own model is the one loaded
    layer: Optional[int] = None  # check that the SAE was trained at this layer
    site: Optional[str] = None  # ... and at this site
    weights: Optional[Path] = None  # a local weights file for the model
    text_tokens: int = 65_536  # tokens of text to scan
    split: str = "heldout"  # heldout or train split of the offline corpus
    text: Optional[list] = None  # your own text files instead of the offline corpus
    ctx_len: int = 128
    bf16: bool = False  # bfloat16 autocast for the model
    device: str = "auto"  # auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N, mps

    def check(self):
        if not self.text_tokens > 0:
            raise ValueError(f"the number of text tokens to scan must be positive, got {self.text_tokens}")
        if self.ctx_len < 3:
            raise ValueError(f"--ctx-len must be at least 3 (BOS, a token, and one to predict), got {self.ctx_len}")
        return self


@dataclass
class FeaturesConfig:
    source: SAESource
    latents: Optional[str] = None  # comma-separated latent indices, e.g. 3,17,42
    top: int = 8  # without --latents: this many latents ...
    by: str = "random"  # ... ranked by density, max or mean, or a seeded random sample of the live ones
    k: int = 10  # max-activating examples per latent
    seed: int = 0
    out: Path = Path("runs/features")


@dataclass
class SteerConfig:
    source: SAESource  # its text is the calibration text for the latent's typical activation
    latent: int = 0
    strength: float = 1.0  # A: added A x the latent's typical activation along its decoder row
    prompt: str = ""
    new_tokens: int = 30  # tokens to generate
    unit: str = "mean"  # typical activation: mean when active, or max
    sample: bool = False  # sample instead of greedy decoding
    temperature: float = 1.0
    seed: int = 0


@dataclass
class LinksConfig:
    source: SAESource  # SAE A, the earlier hook point
    sae_b: Path = field(default=None)  # SAE B, at a later hook point of the same model
    latents: Optional[str] = None  # source latents of A; None: the --top most active
    top: int = 16
    edges: int = 24  # edges drawn in the graph
    out: Path = Path("runs/links")
