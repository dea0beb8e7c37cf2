"""Transcoders: a sparse dictionary that reads one site and writes another.

An SAE reconstructs its own input. A transcoder (Dunefsky, Chlenski & Nanda 2024,
"Transcoders Find Interpretable LLM Feature Circuits") reads what goes into an MLP and
predicts what comes out, so that it can stand in for the MLP:

    x     = s_in  * mlp_in             the MLP's normalised input, scaled           (N, D)
    y     = s_out * mlp_out            the MLP's output, scaled                     (N, D)
    f     = sigma(W_enc (x - b_dec) + b_enc)                                          (N, F)
    y_hat = W_dec^T f + b_dec,         loss = ||y - y_hat||^2 + sparsity

It is minisae's SAE with another target (`SAE.loss(x, target=y)`), trained by the same
loop fed (x, y) pairs (minisae/train.py). Subtracting b_dec, an output-space vector, from
the input is only a reparametrisation of the encoder bias (b_enc - W_enc b_dec), which
the saved file folds away. Each side gets its own scale (E||s x|| = sqrt(D), as for SAEs).
mlp_in is blocks.L.ln2.hook_normalized, the hook SAELens's transcoders read (resid_mid
/ its rms, before the norm's weight: minisae/models/hooks.py), so the MLP is a function
of x alone. `site="resid_mid"` reads the residual before the norm instead, and the
transcoder has to learn the norm too.

A skip transcoder (Paulo, Shabalin & Belrose 2025, "Transcoders Beat Sparse
Autoencoders for Interpretability"; Anthropic's cross-layer transcoders) adds a dense
linear path, y_hat = W_dec^T f + b_dec + W_skip x, so the latents only carry what is not
linear in x. Here W_skip is the least-squares fit of y on x (centred, in float64), made
once before training, and the latents are trained on the residual y - W_skip x: two
stages rather than the joint training of the papers, which may leave some loss behind.
`linear=True` keeps W_skip alone (every latent off): the dense baseline the latents of a
skip transcoder have to add to.

Evaluation splices it in place of the MLP: at every position but BOS (and, reading
resid_mid, its sinks: mlp_in has a norm of about sqrt(D) everywhere), mlp_out is replaced by
y_hat / s_out computed from that forward's own input, and the next-token loss is compared
with zero- and mean-ablating mlp_out:

    loss recovered (vs ablation a) = (CE_a - CE_tc) / (CE_a - CE_clean),   KL(clean || tc)

Saved in SAELens's transcoder layout (architecture "transcoder" for ReLU,
"jumprelu_transcoder" for JumpReLU, "skip_transcoder" and "jumprelu_skip_transcoder" with
W_skip; SAELens has no TopK transcoder), which computes f = sigma(x_raw W_enc + b_enc),
y_raw = f W_dec + b_dec (+ x_raw W_skip^T), so with r = s_in / s_out: W_enc' = r W_enc^T,
b_enc' = (b_enc - W_enc b_dec) / s_out, b_dec' = b_dec / s_out, W_skip' = r W_skip,
threshold' = theta / s_out (codes in raw output units, as for minisae's SAE files).
"""

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from minisae.formats.common import positive_int, read_cfg, read_tensors, write_dir
from minisae.models import load_model
from minisae.models.hooks import hook_name
from minisae.pipeline.activations import estimate_norms, hooks_acts
from minisae.pipeline.data import load_contexts
from minisae.pipeline.sweep import BASE, LAYERS_SETTING, SWEEPS
from minisae.sae import make_sae, variant_name
from minisae.train import TrainConfig, train
from minisae.utils import Progress, atomic_write_text, model_device

ARCHITECTURES = {"relu": "transcoder", "jumprelu": "jumprelu_transcoder"}  # with "skip_" before "transcoder"
SKIP = {"skip_transcoder": "transcoder", "jumprelu_skip_transcoder": "jumprelu_transcoder"}  # SAELens's names


def architecture(variant: str, skip: bool) -> str:
    return ARCHITECTURES[variant].replace("transcoder", "skip_transcoder") if skip else ARCHITECTURES[variant]


def fit_skip(x, y, rcond: float = 1e-6):
    """W_skip (D_out, D_in): the least-squares linear map from x to y, both (N, D), centred
    (the offset is left to b_dec), solved in float64 by SVD, minimum norm: directions of x
    with a singular value under rcond x the largest get none (GPT-2's LayerNorm output
    sums to 0 over D, so one direction of x is empty and W_skip would be arbitrary there)."""
    xc, yc = x.double() - x.double().mean(0), y.double() - y.double().mean(0)  # (N, D)
    return torch.linalg.lstsq(xc, yc, rcond=rcond, driver="gelsd").solution.T.float()  # (D_out, D_in)


def transcode(tc: dict, x):
    """y_hat (N, D_out) of a transcoder dict for scaled inputs x (N, D_in), skip path included."""
    y_hat = tc["sae"](x)  # (N, D_out)
    return y_hat if tc.get("W_skip") is None else y_hat + x @ tc["W_skip"].to(x).T


def collect_pairs(model, contexts, hook_in: str, hook_out: str, max_norm=None, batch_size: int = 8,
                  verbose: bool = True):
    """(x_in (N, D), y (N, D)) raw, float32: the two sites at every position but BOS whose
    input norm is at most max_norm (the input's sinks stay out, as for SAEs)."""
    xs, ys = [], []
    bar = Progress("collecting", len(contexts), "contexts") if verbose else None
    for s in range(0, len(contexts), batch_size):
        acts = hooks_acts(model, contexts[s:s + batch_size], [hook_in, hook_out])  # each (B, T-1, D)
        keep = torch.ones(acts[hook_in].shape[:2], dtype=torch.bool)  # (B, T-1)
        if max_norm is not None:
            keep &= acts[hook_in].norm(dim=-1) <= max_norm
        xs.append(acts[hook_in][keep])
        ys.append(acts[hook_out][keep])
        if bar:
            bar.update(min(s + batch_size, len(contexts)))
    if bar:
        bar.close(len(contexts))
    return torch.cat(xs), torch.cat(ys)


def pair_batches(x, y, batch_size: int, seed: int = 0):
    """Endless shuffled (x, y) batches, a new permutation each pass."""
    if len(x) < batch_size:
        raise ValueError(f"{len(x)} (input, output) pairs are fewer than one batch of {batch_size}: "
                         "collect more tokens or use a smaller batch")
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(len(x), generator=g)  # (N,)
        for s in range(0, len(x) - batch_size + 1, batch_size):
            idx = perm[s:s + batch_size]
            yield x[idx], y[idx]


def train_transcoder(model, contexts, layer: int, variant: str = "relu", expansion: int = 4, n_samples: int = 100_000,
                     batch_size: int = 256, lr: float = 1e-3, seed: int = 0, log: bool = True, site: str = "mlp_in",
                     skip: bool = False, linear: bool = False, **settings) -> dict:
    """A transcoder from `site` (mlp_in or resid_mid) to mlp_out of block `layer`, trained on
    `contexts`: {"sae", "W_skip" (None without skip), "hook_in", "hook_out", "scale_in",
    "scale_out", "max_norm", "mean_out"}."""
    hook_in, hook_out = hook_name(layer, site, model.n_layer), hook_name(layer, "mlp_out")
    norms = estimate_norms(model, contexts, [hook_in, hook_out])
    (s_in, max_norm), (s_out, _) = norms[hook_in], norms[hook_out]
    x, y = collect_pairs(model, contexts, hook_in, hook_out, max_norm)  # (N, D) each, raw
    x_s, y_s = x * s_in, y * s_out  # (N, D) each, scaled
    W_skip = fit_skip(x_s, y_s) if skip or linear else None  # (D, D)
    target = y_s if W_skip is None else y_s - x_s @ W_skip.T  # (N, D): what the latents have to carry
    sae = make_sae(variant, model.d_model, expansion * model.d_model, seed=seed, **settings)
    with torch.no_grad():
        sae.b_dec.copy_(target.mean(0))  # the mean target, as b_dec = the data mean for an SAE
        if linear:  # pre = -1 everywhere: no latent fires, y_hat = b_dec + W_skip x
            sae.W_enc.zero_()
            sae.b_enc.fill_(-1.0)
    if not linear:
        cfg = TrainConfig(n_samples=n_samples, batch_size=batch_size, lr=lr, seed=seed, resample_every=0)
        train(sae, pair_batches(x_s, target, batch_size, seed), cfg, log=log)
    return {"sae": sae.eval(), "W_skip": W_skip, "hook_in": hook_in, "hook_out": hook_out, "scale_in": s_in,
            "scale_out": s_out, "max_norm": max_norm, "mean_out": y.mean(0).tolist()}


@torch.no_grad()
def evaluate_transcoder(model, tc: dict, contexts, batch_size: int = 8, verbose: bool = True) -> dict:
    """CE of the clean model, with the transcoder in place of the MLP, and with mlp_out
    zero- and mean-ablated at the same positions; KL(clean || each); loss recovered; the
    transcoder's L0 and its FVU on the output (the module docstring)."""
    sae, s_in, s_out, max_norm = tc["sae"], tc["scale_in"], tc["scale_out"], tc["max_norm"]
    mean_out = torch.tensor(tc["mean_out"], device=model_device(model))  # (D,)
    splices = {"tc": lambda x, y: transcode(tc, x * s_in) / s_out, "zero": lambda x, y: torch.zeros_like(y),
               "mean": lambda x, y: mean_out.expand(y.shape)}
    ce = dict.fromkeys(["clean", *splices], 0.0)
    kl = dict.fromkeys(splices, 0.0)
    l0, sq_err, sum_y, sum_y2, n_pred, n_rows = 0.0, 0.0, 0.0, 0.0, 0, 0
    bar = Progress("evaluating", len(contexts), "contexts") if verbose else None
    for s in range(0, len(contexts), batch_size):
        idx = contexts[s:s + batch_size].to(model_device(model))  # (B, T)
        targets = idx[:, 2:].flatten()  # (B*(T-2),): the predictions at positions 1..T-2
        logp_clean = F.log_softmax(model(idx)[:, 1:-1].float(), -1)  # (B, T-2, V)
        ce["clean"] += F.nll_loss(logp_clean.flatten(0, 1), targets, reduction="sum").item()
        for name, fn in splices.items():
            seen = {}

            def read_in(act):  # mlp_in (or resid_mid) of this forward: the transcoder's input
                seen["x"] = act

            def replace_out(act, fn=fn):  # act (B, T, D): mlp_out, replaced where the transcoder reads
                keep = torch.ones(act.shape[:2], dtype=torch.bool, device=act.device)  # (B, T)
                keep[:, 0] = False
                if max_norm is not None:
                    keep &= seen["x"].norm(dim=-1) <= max_norm
                out = act.clone()
                out[keep] = fn(seen["x"][keep].float(), act[keep].float()).to(act.dtype)
                return out

            logits = model(idx, hooks={tc["hook_in"]: read_in, tc["hook_out"]: replace_out})  # (B, T, V)
            logp = F.log_softmax(logits[:, 1:-1].float(), -1)  # (B, T-2, V)
            ce[name] += F.nll_loss(logp.flatten(0, 1), targets, reduction="sum").item()
            kl[name] += F.kl_div(logp, logp_clean, log_target=True, reduction="sum").item()
        # the transcoder's own numbers, at the positions it reads
        x_raw, y_raw = collect_pairs(model, idx, tc["hook_in"], tc["hook_out"], max_norm, verbose=False)  # (N, D)
        x, y = x_raw.to(mean_out.device) * s_in, y_raw.to(mean_out.device) * s_out  # (N, D)
        f = sae.encode(x)  # (N, F)
        l0 += (f > 0).sum().item()
        skip = 0 if tc.get("W_skip") is None else x @ tc["W_skip"].to(x).T  # (N, D)
        sq_err += (sae.decode(f) + skip - y).pow(2).sum().item()
        sum_y, sum_y2 = sum_y + y.double().sum(0), sum_y2 + y.double().pow(2).sum().item()
        n_pred, n_rows = n_pred + len(targets), n_rows + len(x)
        if bar:
            bar.update(s + len(idx))
    if bar:
        bar.close(len(contexts))
    out = {f"ce_{k}": v / n_pred for k, v in ce.items()}
    out.update({f"kl_{k}": v / n_pred for k, v in kl.items()})
    for a in ("zero", "mean"):
        out[f"loss_recovered_{a}"] = (out[f"ce_{a}"] - out["ce_tc"]) / (out[f"ce_{a}"] - out["ce_clean"])
    variance = sum_y2 - (sum_y * sum_y).sum().item() / n_rows  # sum_t ||y_t - mean y||^2
    out.update(l0=l0 / n_rows, fvu=sq_err / variance, n_predictions=n_pred, n_tokens=n_rows)
    return out


def save_transcoder(tc: dict, path, model_name: str, extra=None) -> Path:
    """SAELens's transcoder layout (the module docstring), atomically (formats.common.write_dir)."""
    sae, s_in, s_out = tc["sae"], tc["scale_in"], tc["scale_out"]
    variant = variant_name(sae.activation)
    if variant not in ARCHITECTURES:
        raise ValueError(f"SAELens has transcoders of ReLU and JumpReLU only, not {variant}")
    with torch.no_grad():
        t = {"W_enc": (sae.W_enc * s_in / s_out).T, "b_enc": (sae.b_enc - sae.W_enc @ sae.b_dec) / s_out,
             "W_dec": sae.W_dec, "b_dec": sae.b_dec / s_out}  # (D, F), (F,), (F, D), (D,)
        if variant == "jumprelu":
            t["threshold"] = sae.activation.theta / s_out
        if tc.get("W_skip") is not None:
            t["W_skip"] = tc["W_skip"] * s_in / s_out  # (D_out, D_in)
    t = {k: v.detach().float().contiguous() for k, v in t.items()}
    cfg = {"architecture": architecture(variant, tc.get("W_skip") is not None),
           "d_in": sae.d, "d_sae": sae.n_latents, "d_out": sae.d,
           "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": False, "normalize_activations": "none",
           "reshape_activations": "none",
           "metadata": {"sae_lens_version": "6.0.0", "model_name": model_name, "hook_name": tc["hook_in"],
                        "hook_name_out": tc["hook_out"], "hook_head_index": None, "prepend_bos": True,
                        "minisae": {"variant": variant, "max_norm": tc["max_norm"], "mean_out": tc["mean_out"],
                                    **(extra or {})}}}
    return write_dir(path, cfg, t, "sae_weights.safetensors", check=load_transcoder)


def load_transcoder(path) -> dict:
    """A transcoder folder written by save_transcoder, as train_transcoder returns it (scales 1)."""
    path = Path(path)
    cfg = read_cfg(path / "cfg.json")
    arch = cfg.get("architecture")
    variant = {v: k for k, v in ARCHITECTURES.items()}.get(SKIP.get(arch, arch))
    if variant is None or cfg.get("apply_b_dec_to_input") is not False:
        raise ValueError(f"{path} is not a ReLU or JumpReLU (skip) transcoder in SAELens's layout")
    try:
        D, F_, d_out = (positive_int(cfg[k], k, path) for k in ("d_in", "d_sae", "d_out"))
        md = cfg["metadata"]
        hooks = md["hook_name"], md["hook_name_out"]
    except (KeyError, TypeError):
        raise ValueError(f"{path}/cfg.json lacks d_in, d_sae, d_out or metadata.hook_name(_out)") from None
    shapes = {"W_enc": (D, F_), "b_enc": (F_,), "W_dec": (F_, d_out), "b_dec": (d_out,)}
    if variant == "jumprelu":
        shapes["threshold"] = (F_,)
    if arch in SKIP:
        shapes["W_skip"] = (d_out, D)
    t = read_tensors(path / "sae_weights.safetensors", shapes)
    sae = make_sae(variant, D, F_)
    with torch.no_grad():  # pre = W_enc (x - b_dec) + b_enc with b_enc absorbing W_enc b_dec
        sae.W_enc.copy_(t["W_enc"].T)
        sae.W_dec.copy_(t["W_dec"])
        sae.b_dec.copy_(t["b_dec"])
        sae.b_enc.copy_(t["b_enc"] + sae.W_enc @ sae.b_dec)
        if variant == "jumprelu":
            sae.activation.theta.copy_(t["threshold"])
    ours = md.get("minisae", {})
    return {"sae": sae.eval(), "W_skip": t.get("W_skip"), "hook_in": hooks[0], "hook_out": hooks[1], "scale_in": 1.0,
            "scale_out": 1.0, "max_norm": ours.get("max_norm"), "mean_out": ours.get("mean_out")}


def run(cfg) -> dict:
    """`python -m minisae transcoder` (cfg: minisae.configs.TranscoderConfig): train a
    transcoder in place of the MLP of block cfg.layer, evaluate it spliced in, save it
    (ReLU, JumpReLU) and transcoder_results.json in cfg.out."""
    torch.manual_seed(cfg.seed)
    model, tok = load_model(cfg.model, weights=cfg.weights)
    model.eval()
    hook_name(cfg.layer, cfg.target, model.n_layer)  # the layer exists, before any text is read
    knob, _, value = (cfg.setting or f"{SWEEPS[cfg.variant][0]}={LAYERS_SETTING[cfg.variant]}").partition("=")
    settings = {**BASE[cfg.variant], knob.strip(): int(value) if knob.strip() == "k" else float(value)}
    train_ctx = load_contexts(tok, name=cfg.model, split="train", ctx_len=cfg.ctx_len, max_tokens=cfg.collect_tokens)
    eval_ctx = load_contexts(tok, name=cfg.model, split="heldout", ctx_len=cfg.ctx_len, max_tokens=cfg.eval_tokens)
    tc = train_transcoder(model, train_ctx, cfg.layer, cfg.variant, cfg.expansion, cfg.tokens, cfg.batch_size,
                          cfg.lr, cfg.seed, site=cfg.site, skip=cfg.skip, linear=cfg.linear, **settings)
    res = evaluate_transcoder(model, tc, eval_ctx)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"model": cfg.model, "hook_in": tc["hook_in"], "hook_out": tc["hook_out"], "variant": cfg.variant,
               "skip": cfg.skip or cfg.linear, "linear": cfg.linear, "settings": settings,
               "n_latents": tc["sae"].n_latents, **res,
               "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(cfg).items()}}
    name = f"transcoder-{tc['hook_in']}-{cfg.variant}{'-linear' if cfg.linear else '-skip' if cfg.skip else ''}"
    if cfg.variant in ARCHITECTURES:
        save_transcoder(tc, out / name, cfg.model, {"settings": settings})
        summary["saved"] = str(out / name)
    atomic_write_text(out / "transcoder_results.json", json.dumps(summary, indent=1) + "\n")
    print(f"{tc['hook_in']} -> {tc['hook_out']}: L0 {res['l0']:.1f}, FVU {res['fvu']:.3f}, loss recovered "
          f"{res['loss_recovered_zero']:.3f} vs zero-ablation ({res['loss_recovered_mean']:.3f} vs mean), "
          f"KL {res['kl_tc']:.4f} (zero {res['kl_zero']:.4f}, mean {res['kl_mean']:.4f}); "
          f"CE clean {res['ce_clean']:.4f}, transcoder {res['ce_tc']:.4f}")
    print(f"wrote {out}/transcoder_results.json" + (f" and {out}/{name}" if "saved" in summary else
                                                    f" ({cfg.variant} is not saved: SAELens has no such transcoder)"),
          file=sys.stderr)
    return summary
