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
says "batchtopk", so minisae reads it back as one.

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

import torch

from minisae.formats import flag, positive_int, read_cfg, read_tensors

ARCHITECTURES = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu", "gated": "gated", "batchtopk": "jumprelu"}
VARIANTS = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu", "gated": "gated"}
# model names other tools use for minisae's models (TransformerLens, Hugging Face)
MODEL_NAMES = {"gpt2": "gpt2", "gpt2-small": "gpt2", "openai-community/gpt2": "gpt2", "gpt2-medium": "gpt2-medium",
               "gpt2-large": "gpt2-large", "gpt2-xl": "gpt2-xl", "smollm2": "smollm2",
               "HuggingFaceTB/SmolLM2-135M-Instruct": "smollm2"}
EXPORT_NAMES = {"smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}
LAYOUT_VERSION = "6.0.0"  # SAELens reads metadata.sae_lens_version to tell a 6.x cfg.json from an older one
DTYPE_NAMES = {torch.float32: "float32", torch.float64: "float64"}


def to_files(sae, scale: float = 1.0, model=None, hook=None, max_norm=None, mean=None, **extra) -> tuple:
    """(cfg.json dict, tensors, weights file name) for `sae` with `scale` folded in."""
    from minisae.sae import part_settings, variant_name
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
        if variant == "batchtopk":
            if act.threshold < 0:
                raise ValueError("this BatchTopK SAE has no inference threshold yet: train it before saving")
            t["threshold"] = torch.full_like(bias, float(act.threshold) / s)
    t = {k: v.detach().contiguous() for k, v in t.items()}
    folded = s * float(extra.pop("folded_scale", 1.0))  # a file loaded from a fold has scale 1 and says what it folded
    ours = {**{k: v for k, v in extra.items() if k not in ("variant", "settings")}, "variant": variant,
            "settings": part_settings(act), "max_norm": max_norm, "mean": mean, "folded_scale": folded,
            "model": model, "hook": hook}
    cfg = {"architecture": ARCHITECTURES[variant], "d_in": sae.d, "d_sae": sae.n_latents,
           "dtype": DTYPE_NAMES.get(sae.W_enc.dtype, "float32"), "device": "cpu", "apply_b_dec_to_input": True,
           "normalize_activations": "none", "reshape_activations": "none",
           "metadata": {"sae_lens_version": LAYOUT_VERSION, "model_name": EXPORT_NAMES.get(model, model),
                        "hook_name": hook, "hook_head_index": None, "prepend_bos": True, "minisae": ours}}
    training = extra.get("training")
    if isinstance(training, dict) and isinstance(training.get("ctx_len"), int):
        cfg["metadata"]["context_size"] = training["ctx_len"]  # SAEBench runs its evaluations at this length
    if variant == "topk":
        cfg.update(k=act.k, rescale_acts_by_decoder_norm=False)
    if sae.W_enc.dtype not in DTYPE_NAMES:  # bf16 / f16 SAEs are written as float32
        t = {k: v.float() for k, v in t.items()}
    return cfg, t, "sae_weights.safetensors"


def load(path) -> tuple:
    """(minisae SAE, meta) from a SAELens directory, written by minisae or by SAELens."""
    from minisae.sae import make_sae
    cfg_path, w_path = path / "cfg.json", path / "sae_weights.safetensors"
    cfg = read_cfg(cfg_path)
    md = cfg.get("metadata", {})
    if not isinstance(md, dict):
        raise ValueError(f"{cfg_path}: metadata must be a JSON object, got {md!r:.60}")
    if "metadata" not in cfg:  # before SAELens 6: the metadata fields sat at the top level
        md = {"model_name": cfg.get("model_name"), "hook_name": cfg.get("hook_name", cfg.get("hook_point")),
              "hook_head_index": cfg.get("hook_head_index", cfg.get("hook_point_head_index"))}
    ours = md.get("minisae") or {}
    if not isinstance(ours, dict):
        raise ValueError(f"{cfg_path}: metadata.minisae must be a JSON object, got {ours!r:.60}")
    arch = architecture(cfg, cfg_path)
    D, F = positive_int(cfg.get("d_in"), "d_in", cfg_path), positive_int(cfg.get("d_sae"), "d_sae", cfg_path)
    check_conventions(cfg, md, cfg_path)
    names = {"standard": ("b_enc",), "topk": ("b_enc",), "jumprelu": ("b_enc", "threshold"),
             "gated": ("b_gate", "b_mag", "r_mag")}[arch]
    t = read_tensors(w_path, {"W_enc": (D, F), "W_dec": (F, D), "b_dec": (D,), **{n: (F,) for n in names}})
    bias = t["b_gate"] if arch == "gated" else t["b_enc"]  # (F,)
    if not flag(cfg.get("apply_b_dec_to_input"), "apply_b_dec_to_input", cfg_path, True):
        shift = t["b_dec"] @ t["W_enc"]  # (F,): x W_enc = (x - b_dec) W_enc + b_dec W_enc
        bias = bias + shift
        if arch == "gated":
            t["b_mag"] = t["b_mag"] + shift * t["r_mag"].exp()
    variant, threshold = VARIANTS[arch], t.get("threshold")
    if ours.get("variant") == "batchtopk" and arch == "jumprelu" and bool((threshold == threshold[0]).all()):
        variant = "batchtopk"
    settings = settings_of(ours, cfg_path) if ours.get("variant") == variant else {}
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
        elif variant == "batchtopk":
            sae.activation.threshold.fill_(float(threshold[0]))
    return sae, meta_of(cfg, md, ours, cfg_path)


def architecture(cfg: dict, cfg_path) -> str:
    arch = cfg.get("architecture")
    if arch is None and "metadata" not in cfg:  # before SAELens 6 (handle_pre_6_0_config's defaults)
        kwargs = cfg.get("activation_fn_kwargs") or {}
        fn = cfg.get("activation_fn", cfg.get("activation_fn_str", "relu"))
        arch = "topk" if fn == "topk" and isinstance(kwargs, dict) and "k" in kwargs else "standard"
        if arch == "topk":
            cfg["k"] = kwargs["k"]
    if arch not in VARIANTS:
        raise ValueError(f"{cfg_path}: unknown architecture {arch!r:.60}; minisae reads {', '.join(VARIANTS)}")
    return arch


def check_conventions(cfg: dict, md: dict, cfg_path):
    """ValueError for what minisae's SAE cannot express: input normalisations, hook_z
    reshaping, one attention head, a fine-tuning scaling factor."""
    norm = cfg.get("normalize_activations", "none")
    norm = {None: "none", False: "none", True: "expected_average_only_in"}.get(norm, norm)  # pre-6 booleans
    if norm not in ("none", "expected_average_only_in"):
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
        and not isinstance(v, bool) or (k == "k_aux" and v is None)
    if not isinstance(settings, dict) or not all(number(k, v) for k, v in settings.items()):
        raise ValueError(f"{cfg_path}: metadata.minisae.settings must map names to numbers (k, k_aux, dead_after: "
                         f"integers), got {settings!r:.100}")
    return {k: v for k, v in settings.items() if k != "n_latents"}


def meta_of(cfg: dict, md: dict, ours: dict, cfg_path) -> dict:
    """What HookedSAE needs: model, hook, scale (1: folded, or the file's input scaling
    factor), max_norm, mean, and minisae's other metadata."""
    model = ours.get("model") or md.get("model_name")
    hook = ours.get("hook") or md.get("hook_name")
    for name, v in (("model_name", model), ("hook_name", hook)):
        if v is not None and not isinstance(v, str):
            raise ValueError(f"{cfg_path}: {name} must be a string, got {v!r:.60}")
    scale = scaling_factor(cfg, md, cfg_path) if cfg.get("normalize_activations") in (True, "expected_average_only_in") \
        else 1.0
    max_norm, mean = ours.get("max_norm"), ours.get("mean")
    if max_norm is not None and (not isinstance(max_norm, (int, float)) or isinstance(max_norm, bool) or
                                 not max_norm > 0):
        raise ValueError(f"{cfg_path}: metadata.minisae.max_norm must be a positive number, got {max_norm!r:.60}")
    if mean is not None and (not isinstance(mean, list) or len(mean) != cfg["d_in"] or
                             not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in mean)):
        raise ValueError(f"{cfg_path}: metadata.minisae.mean must be a list of d_in = {cfg['d_in']} numbers")
    rest = {k: v for k, v in ours.items() if k not in ("model", "hook", "max_norm", "mean", "settings")}
    return {**rest, "model": MODEL_NAMES.get(model, model), "hook": hook, "scale": float(scale),
            "max_norm": max_norm, "mean": mean}
