"""SAELens's file layout (6.x), minisae's own format for an SAE.

    DIR/cfg.json                  {"architecture": "standard" | "topk" | "jumprelu" | "gated",
                                   "d_in": D, "d_sae": F, "dtype": "float32", "device": "cpu",
                                   "apply_b_dec_to_input": true, "normalize_activations": "none",
                                   "reshape_activations": "none", "k": K (topk only),
                                   "metadata": {"model_name", "hook_name", "prepend_bos", ...,
                                                "minisae": {what minisae needs beyond SAELens}}}
    DIR/sae_weights.safetensors   W_enc (D, F), W_dec (F, D), b_dec (D,) and
                                    standard, topk   b_enc (F,)
                                    jumprelu         b_enc (F,), threshold (F,)
                                    gated            b_gate (F,), b_mag (F,), r_mag (F,)    (no b_enc)

SAELens computes, with sae_in = x - b_dec (apply_b_dec_to_input):

    standard   f = ReLU(sae_in W_enc + b_enc)
    topk       f = ReLU(TopK_k(sae_in W_enc + b_enc))
    jumprelu   pre = sae_in W_enc + b_enc,  f = ReLU(pre) * 1[pre > threshold]
    gated      f = 1[sae_in W_enc + b_gate > 0] * ReLU(sae_in (W_enc * exp(r_mag)) + b_mag)
    x_hat = f W_dec + b_dec

which is minisae's SAE with W_enc stored transposed: relu -> standard, topk -> topk,
jumprelu -> jumprelu (threshold = theta; ReLU(pre) * 1[pre > theta] equals minisae's
z * 1[z > theta], z = ReLU(pre), for any sign of theta), gated -> gated (b_gate = b_enc).
BatchTopK is saved as SAELens saves its own: a jumprelu whose every threshold is the
global inference threshold (exact: z * 1[z > t] either way); metadata.minisae.variant
says "batchtopk", so minisae reads it back as one. Matryoshka BatchTopK likewise, as
SAELens saves its matryoshka_batchtopk: a jumprelu with the global threshold, plus
metadata.training_architecture = "matryoshka_batchtopk" and training_architecture_details
(k, matryoshka_widths = our prefixes, topk_threshold_lr = threshold_momentum, ...); a file
so marked, ours or SAELens's, is read back as a Matryoshka SAE.

Folding the activation scale. minisae trains on x_s = s x (HookedSAE.scale). Dividing
the pre-activations by s,

    pre / s = W_enc (x - b_dec / s) + b_enc / s,

and every activation commutes with a common positive factor (ReLU, TopK's ranking, a
threshold compared with pre, the gate's sign, the magnitude exp(r_mag) (pre - b_gate) + b_mag).
So with b_enc' = b_enc / s, b_dec' = b_dec / s, threshold' = theta / s, b_mag' = b_mag / s
(W_enc, W_dec, r_mag unchanged) the code is f' = f / s and x_hat' = f' W_dec + b_dec' =
x_hat / s: the file reads raw activations and returns raw reconstructions, decoder rows
keep unit norm, and a code is the length of its latent's contribution in raw units.
(SAELens's own fold_activation_norm_scaling_factor multiplies W_enc by s and divides W_dec
by s instead, leaving codes in scaled units and decoder rows of norm 1 / s.)

Reading other writers' files: apply_b_dec_to_input = false moves b_dec's term into the
encoder bias (b_enc' = b_enc + b_dec W_enc, the gated biases likewise); topk with
rescale_acts_by_decoder_norm folds the decoder norms n into the encoder (W_enc * n,
b_enc * n, W_dec / n: exactly SAELens's fold_W_dec_norm). Configs written before SAELens 6
(no metadata, hook_point, activation_fn_str) are read as SAELens reads them.
"""

import math
import re

import torch

from minisae.formats.common import flag, positive_int, read_cfg, read_tensors
from minisae.matryoshka import MatryoshkaBatchTopK
from minisae.models.safetensors import read_header
from minisae.sae import make_sae, part_settings, variant_name

ARCHITECTURES = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu", "gated": "gated", "batchtopk": "jumprelu",
                 "matryoshka_batchtopk": "jumprelu"}
VARIANTS = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu", "gated": "gated"}
BATCHTOPKS = ("batchtopk", "matryoshka_batchtopk")  # saved as a jumprelu with one global threshold
# model names other tools use for minisae's models (TransformerLens, Hugging Face)
MODEL_NAMES = {"gpt2": "gpt2", "gpt2-small": "gpt2", "openai-community/gpt2": "gpt2", "gpt2-medium": "gpt2-medium",
               "gpt2-large": "gpt2-large", "gpt2-xl": "gpt2-xl", "smollm2": "smollm2",
               "HuggingFaceTB/SmolLM2-135M-Instruct": "smollm2"}
EXPORT_NAMES = {"smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}
LAYOUT_VERSION = "6.0.0"  # SAELens reads metadata.sae_lens_version to tell a 6.x cfg.json from an older one
DTYPE_NAMES = {torch.float32: "float32", torch.float64: "float64"}
# SAELens's metadata fields (its LLM_METADATA_KEYS) that minisae carries from a file it reads
# to the file it writes (convert), unchanged, beside its own model_name, hook_name and minisae
SAELENS_METADATA = ("model_name", "model_class_name", "model_from_pretrained_kwargs", "prepend_bos",
                    "exclude_special_tokens", "neuronpedia_id", "context_size", "seqpos_slice", "dataset_path",
                    "sae_lens_version", "sae_lens_training_version", "hook_name_out", "hook_head_index_out",
                    "hf_hook_name", "hf_hook_name_out")


def to_files(sae, /, scale: float = 1.0, model=None, hook=None, max_norm=None, mean=None, **extra) -> tuple:
    """(cfg.json dict, tensors, weights file name) for `sae` with `scale` folded in."""
    variant = variant_name(sae.activation)
    if not (isinstance(scale, (int, float)) and 0 < scale < float("inf")):
        raise ValueError(f"the activation scale must be positive, got {scale!r}")
    act, s = sae.activation, float(scale)
    with torch.no_grad():
        t = {"W_enc": sae.W_enc.T.clone(), "W_dec": sae.W_dec.clone(), "b_dec": sae.b_dec / s}  # (D, F) (F, D) (D,)
        bias = sae.b_enc / s  # (F,)
        if variant == "gated":
            t.update(b_gate=bias, b_mag=act.b_mag / s, r_mag=act.r_mag.clone())
        else:
            t["b_enc"] = bias
        if variant == "jumprelu":
            t["threshold"] = act.theta / s
        if variant in BATCHTOPKS:
            if act.threshold < 0:
                raise ValueError("this BatchTopK SAE has no inference threshold yet: train it before saving")
            t["threshold"] = torch.full_like(bias, float(act.threshold) / s)
    t = {k: v.detach().contiguous() for k, v in t.items()}
    folded = s * float(extra.pop("folded_scale", 1.0))  # a file loaded from a fold has scale 1 and says what it folded
    carried = extra.pop("saelens_metadata", None) or {}  # what another writer's metadata held, unchanged
    ours = {**{k: v for k, v in extra.items() if k not in ("variant", "settings")}, "variant": variant,
            "settings": part_settings(act), "max_norm": max_norm, "mean": mean, "folded_scale": folded,
            "model": model, "hook": hook}
    cfg = {"architecture": ARCHITECTURES[variant], "d_in": sae.d, "d_sae": sae.n_latents,
           "dtype": DTYPE_NAMES.get(sae.W_enc.dtype, "float32"), "device": "cpu", "apply_b_dec_to_input": True,
           "normalize_activations": "none", "reshape_activations": "none",
           "metadata": {"prepend_bos": True, **carried, "sae_lens_version": LAYOUT_VERSION,
                        "model_name": EXPORT_NAMES.get(model, model), "hook_name": hook, "hook_head_index": None,
                        "minisae": ours}}
    md = cfg["metadata"]
    if isinstance(carried.get("model_name"), str) and MODEL_NAMES.get(carried["model_name"]) == model:  # its own name
        md["model_name"] = carried["model_name"]
    major = re.match(r"\s*v?(\d+)", str(carried.get("sae_lens_version", "")))
    if major and int(major[1]) >= 6:  # a 6.x version stays; an older one did not write this layout
        md["sae_lens_version"] = carried["sae_lens_version"]
    training = extra.get("training")
    if "context_size" not in carried and isinstance(training, dict) and isinstance(training.get("ctx_len"), int):
        md["context_size"] = training["ctx_len"]  # SAEBench runs its evaluations at this length
    if variant == "topk":
        cfg.update(k=act.k, rescale_acts_by_decoder_norm=False)
    if variant == "matryoshka_batchtopk":  # how SAELens records the training of its inference jumprelu
        md.update(training_architecture=variant, training_architecture_details={
            "k": act.k, "matryoshka_widths": list(act.prefixes), "topk_threshold_lr": act.threshold_momentum,
            "aux_loss_coefficient": act.aux_coef, "use_matryoshka_aux_loss": False,
            "rescale_acts_by_decoder_norm": False})
    if sae.W_enc.dtype not in DTYPE_NAMES:  # bf16 / f16 SAEs are written as float32
        t = {k: v.float() for k, v in t.items()}
    return cfg, t, "sae_weights.safetensors"


def load(path, overrides=None) -> tuple:
    """(minisae SAE, meta) from a SAELens directory, written by minisae or by SAELens.
    `overrides` (a SAELens release's config_overrides, minisae/formats/releases.py) replace
    cfg.json's fields as SAELens replaces them; those that are metadata go into metadata."""
    cfg_path, w_path = path / "cfg.json", path / "sae_weights.safetensors"
    cfg = {**read_cfg(cfg_path), **(overrides or {})}
    md = cfg.get("metadata", {})
    if not isinstance(md, dict):
        raise ValueError(f"{cfg_path}: metadata must be a JSON object, got {md!r:.60}")
    if "metadata" not in cfg:  # before SAELens 6: the metadata fields sat at the top level
        md = {**{k: v for k, v in cfg.items() if k in SAELENS_METADATA}, "model_name": cfg.get("model_name"),
              "hook_name": cfg.get("hook_name", cfg.get("hook_point")),
              "hook_head_index": cfg.get("hook_head_index", cfg.get("hook_point_head_index"))}
    else:
        md = {**md, **{k: v for k, v in (overrides or {}).items() if k in SAELENS_METADATA}}
    ours = md.get("minisae") or {}
    if not isinstance(ours, dict):
        raise ValueError(f"{cfg_path}: metadata.minisae must be a JSON object, got {ours!r:.60}")
    arch = architecture(cfg, md, cfg_path)
    D, F = positive_int(cfg.get("d_in"), "d_in", cfg_path), positive_int(cfg.get("d_sae"), "d_sae", cfg_path)
    check_conventions(cfg, md, cfg_path)
    names = {"standard": ("b_enc",), "topk": ("b_enc",), "jumprelu": ("b_enc", "threshold"),
             "gated": ("b_gate", "b_mag", "r_mag")}[arch]
    shapes = {"W_enc": (D, F), "W_dec": (F, D), "b_dec": (D,), **{n: (F,) for n in names}}
    if w_path.is_file() and "scaling_factor" in read_header(w_path)[0]:  # written by SAELens before 6
        shapes["scaling_factor"] = (F,)
    t = read_tensors(w_path, shapes)
    if "scaling_factor" in t:  # SAELens drops an all-ones one; any other would rescale the code
        if not torch.allclose(t["scaling_factor"], torch.ones_like(t["scaling_factor"])):
            raise ValueError(f"{w_path}: a scaling_factor tensor that is not all ones (a fine-tuning scaling "
                             "factor) is not supported")
        del t["scaling_factor"]
    bias = t["b_gate"] if arch == "gated" else t["b_enc"]  # (F,)
    if not flag(cfg.get("apply_b_dec_to_input"), "apply_b_dec_to_input", cfg_path, True):
        shift = t["b_dec"] @ t["W_enc"]  # (F,): x W_enc = (x - b_dec) W_enc + b_dec W_enc
        bias = bias + shift
        if arch == "gated":
            t["b_mag"] = t["b_mag"] + shift * t["r_mag"].exp()
    variant, threshold = VARIANTS[arch], t.get("threshold")
    uniform = arch == "jumprelu" and bool((threshold == threshold[0]).all())
    if ours.get("variant") in BATCHTOPKS and uniform:
        variant = ours["variant"]
        if threshold[0] < 0:  # minisae's mark of a threshold not estimated yet; its writer refuses to save one
            raise ValueError(f"{cfg_path}: a BatchTopK SAE with a negative inference threshold "
                             f"({float(threshold[0]):.4g}): it was never estimated")
    settings = settings_of(ours, cfg_path) if ours.get("variant") == variant else {}
    trained = saelens_matryoshka(md, F) if not ours.get("variant") and uniform and threshold[0] >= 0 else None
    if trained:  # SAELens's trained matryoshka_batchtopk: its widths are our prefixes
        variant, settings = "matryoshka_batchtopk", trained
    if arch == "topk":
        settings["k"] = positive_int(cfg.get("k"), "k", cfg_path)
        if settings["k"] > F:
            raise ValueError(f"{cfg_path}: k = {settings['k']} is more than d_sae = {F}")
        if flag(cfg.get("rescale_acts_by_decoder_norm"), "rescale_acts_by_decoder_norm", cfg_path, False):
            n = t["W_dec"].norm(dim=-1).clamp_min(1e-8)  # (F,)
            t["W_enc"], bias, t["W_dec"] = t["W_enc"] * n, bias * n, t["W_dec"] / n[:, None]
    try:
        sae = make_sae(variant, D, F, **settings)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{cfg_path}: metadata.minisae.settings do not fit a {variant} SAE: {e}") from None
    sae.to(t["W_enc"].dtype)
    with torch.no_grad():
        sae.W_enc.copy_(t["W_enc"].T)
        sae.W_dec.copy_(t["W_dec"])
        sae.b_enc.copy_(bias)
        sae.b_dec.copy_(t["b_dec"])
        if variant == "gated":
            sae.activation.b_mag.copy_(t["b_mag"])
            sae.activation.r_mag.copy_(t["r_mag"])
        elif variant == "jumprelu":
            sae.activation.theta.copy_(threshold)
        elif variant in BATCHTOPKS:
            sae.activation.threshold.fill_(float(threshold[0]))
    return sae, meta_of(cfg, md, ours, cfg_path)


def architecture(cfg: dict, md: dict, cfg_path) -> str:
    """The SAELens architecture of `cfg`, read as SAELens's handle_config_defaulting reads
    it: a config with no sae_lens_version, or one before 6.0, is a pre-6 config, whose
    default architecture is "standard" and whose `activation_fn_str` (or `activation_fn`)
    "topk" with activation_fn_kwargs.k makes it a TopK SAE whatever "architecture" says
    (SAEBench's published TopK SAEs are written so)."""
    arch = cfg.get("architecture")
    if before_6(cfg, md, cfg_path):
        arch = "standard" if arch is None else arch
        fn = cfg.get("activation_fn", cfg.get("activation_fn_str", "relu"))
        kwargs = cfg.get("activation_fn_kwargs")
        kwargs = {} if kwargs is None else kwargs
        if not isinstance(kwargs, dict):
            raise ValueError(f"{cfg_path}: activation_fn_kwargs must be a JSON object, got {kwargs!r:.60}")
        if fn == "topk" and kwargs.get("k") is not None:
            arch, cfg["k"] = "topk", kwargs["k"]
        elif fn not in ("relu", None) and arch == "standard":  # SAELens 6 would drop it and read a ReLU
            raise ValueError(f"{cfg_path}: activation_fn {fn!r:.60} is not supported (minisae reads relu, "
                             "and topk with activation_fn_kwargs.k)")
    if not isinstance(arch, str) or arch not in VARIANTS:
        raise ValueError(f"{cfg_path}: unknown architecture {arch!r:.60}; minisae reads {', '.join(VARIANTS)}")
    return arch


def before_6(cfg: dict, md: dict, cfg_path) -> bool:
    """True for a config written before SAELens 6.0: no sae_lens_version (at the top level
    or in metadata), or a major version below 6."""
    version = cfg.get("sae_lens_version") or md.get("sae_lens_version")
    if not version:
        return True
    m = re.match(r"\s*v?(\d+)", version) if isinstance(version, str) else None
    if m is None:
        raise ValueError(f"{cfg_path}: sae_lens_version must be a version string like '6.0.0', got {version!r:.60}")
    return int(m[1]) < 6


def check_conventions(cfg: dict, md: dict, cfg_path):
    """ValueError for what minisae's SAE cannot express: input normalisations, hook_z
    reshaping, one attention head, a fine-tuning scaling factor."""
    norm = cfg.get("normalize_activations", "none")
    if norm is None or isinstance(norm, bool):  # pre-6 booleans
        norm = "expected_average_only_in" if norm else "none"
    if not isinstance(norm, str) or norm not in ("none", "expected_average_only_in"):
        raise ValueError(f"{cfg_path}: normalize_activations = {norm!r:.60} is not supported (minisae reads 'none', "
                         "or 'expected_average_only_in' with its scaling factor)")
    if norm == "expected_average_only_in" and scaling_factor(cfg, md, cfg_path) is None:
        raise ValueError(f"{cfg_path}: normalize_activations is 'expected_average_only_in' but no "
                         "norm_scaling_factor is given: the SAE's input scale is unknown")
    if cfg.get("reshape_activations", "none") not in ("none", None):
        raise ValueError(f"{cfg_path}: reshape_activations = {cfg['reshape_activations']!r:.60} (hook_z SAEs) "
                         "is not supported")
    if md.get("hook_head_index") is not None:
        raise ValueError(f"{cfg_path}: SAEs of one attention head (hook_head_index) are not supported")
    if cfg.get("finetuning_scaling_factor"):
        raise ValueError(f"{cfg_path}: finetuning_scaling_factor is not supported")


def scaling_factor(cfg: dict, md: dict, cfg_path):
    s = cfg.get("norm_scaling_factor", md.get("norm_scaling_factor"))
    if s is not None and (not isinstance(s, (int, float)) or isinstance(s, bool) or not 0 < s < float("inf")):
        raise ValueError(f"{cfg_path}: norm_scaling_factor must be a positive number, got {s!r:.60}")
    return s


def settings_of(ours: dict, cfg_path) -> dict:
    """metadata.minisae.settings: the variant's constructor arguments, numbers only."""
    settings = ours.get("settings") or {}
    number = lambda k, v: (isinstance(v, int) if k in ("k", "k_aux", "dead_after") else isinstance(v, (int, float))) \
        and not isinstance(v, bool) or (k == "k_aux" and v is None) or \
        (k == "prefixes" and isinstance(v, list) and all(type(m) is int for m in v))
    if not isinstance(settings, dict) or not all(number(k, v) for k, v in settings.items()):
        raise ValueError(f"{cfg_path}: metadata.minisae.settings must map names to numbers (k, k_aux, dead_after: "
                         f"integers; prefixes: a list of integers), got {settings!r:.100}")
    return {k: v for k, v in settings.items() if k != "n_latents"}


def saelens_matryoshka(md: dict, n_latents: int):
    """{k, prefixes} of a matryoshka_batchtopk SAE SAELens trained, from its metadata's
    training record; None where there is none or minisae's part cannot take it (a
    fractional k: SAELens's BatchTopK keeps int(k B) entries; then the file is a jumprelu)."""
    details = md.get("training_architecture_details")
    if md.get("training_architecture") != "matryoshka_batchtopk" or not isinstance(details, dict):
        return None
    k, widths = details.get("k"), details.get("matryoshka_widths")
    if not isinstance(k, (int, float)) or isinstance(k, bool) or k != int(k) or not isinstance(widths, list):
        return None
    try:
        MatryoshkaBatchTopK(n_latents, k=int(k), prefixes=widths)
    except (TypeError, ValueError):
        return None
    return {"k": int(k), "prefixes": tuple(widths)}


def meta_of(cfg: dict, md: dict, ours: dict, cfg_path) -> dict:
    """What HookedSAE needs: model, hook, scale (1: folded, or the file's input scaling
    factor), max_norm, mean, and minisae's other metadata."""
    model = ours.get("model") or md.get("model_name")
    hook = ours.get("hook") or md.get("hook_name")
    for name, v in (("model_name", model), ("hook_name", hook)):
        if v is not None and (not isinstance(v, str) or not v.strip()):
            raise ValueError(f"{cfg_path}: {name} must be a non-empty string, got {v!r:.60}")
    scale = scaling_factor(cfg, md, cfg_path) if cfg.get("normalize_activations") in (True, "expected_average_only_in") \
        else 1.0
    max_norm, mean = ours.get("max_norm"), ours.get("mean")
    if max_norm is not None and (not isinstance(max_norm, (int, float)) or isinstance(max_norm, bool) or
                                 not max_norm > 0):
        raise ValueError(f"{cfg_path}: metadata.minisae.max_norm must be a positive number, got {max_norm!r:.60}")
    if mean is not None and (not isinstance(mean, list) or len(mean) != cfg["d_in"] or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in mean)):
        raise ValueError(f"{cfg_path}: metadata.minisae.mean must be a list of d_in = {cfg['d_in']} numbers, "
                         "all finite")
    folded = ours.get("folded_scale", 1.0)
    if not isinstance(folded, (int, float)) or isinstance(folded, bool) or not 0 < folded < float("inf"):
        raise ValueError(f"{cfg_path}: metadata.minisae.folded_scale must be a positive number, got {folded!r:.60}")
    rest = {k: v for k, v in ours.items() if k not in ("model", "hook", "max_norm", "mean", "settings")}
    carried = {k: v for k, v in md.items() if k in SAELENS_METADATA}  # written back unchanged by to_files
    return {**rest, "model": MODEL_NAMES.get(model, model), "hook": hook, "scale": float(scale),
            "max_norm": max_norm, "mean": mean, **({"saelens_metadata": carried} if carried else {})}
