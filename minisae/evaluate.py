"""Evaluate an SAE where it matters: spliced into the language model, on held-out text.

A low reconstruction error says little on its own: the model may rely on exactly the
directions the SAE drops. So we replace the activation at `hook` and measure what the
model's next-token loss does (Bricken et al. 2023; Gated SAE paper, sec. 5.1). For held-out
contexts idx (B, T), BOS at position 0, four forward passes per batch (two in a sweep:
`baselines` computes clean, zero and mean once):

    clean   the model untouched
    sae     the SAE's positions of the hook's activation x replaced by
            x_hat = sae(x * scale) / scale     (the SAE was trained on x * scale, see
                                                minisae.activations; this undoes it)
    zero    the same positions replaced by 0                    (zero-ablation)
    mean    the same positions replaced by the mean training activation, raw units

The SAE's positions are minisae.activations.sae_positions: all but position 0 (BOS) and
the attention sinks above max_norm (the sidecar's; None for none). Those keep their clean
activation in every variant: the SAE never saw them in training and their outlier norm
would dominate. The fraction left clean is reported as `sink_frac`.

    CE_v   = mean of -log p_v(idx[b, t+1] | idx[b, :t+1]) over contexts b and the T-2
             predictions made at positions t = 1..T-2 (targets idx[:, 2:])
    KL     = same mean of  sum_V p_clean log(p_clean / p_sae)
    loss recovered (vs ablation a) = (CE_a - CE_sae) / (CE_a - CE_clean)
    KL_a   = the same KL for ablation a (kl_zero, kl_mean)

SAEBench / SAELens names, beside ours (SAELens evals.py get_downstream_reconstruction_metrics
and get_sparsity_and_variance_metrics, which SAEBench's core evaluation reports):

    ce_loss_score = (CE_zero - CE_sae) / (CE_zero - CE_clean)   = loss_recovered_zero
    kl_div_score  = (KL_zero - KL_sae) / KL_zero                 KL recovered vs zero-ablation
    explained_variance, l2_ratio, cossim                         minisae.metrics (on the SAE's
                                                                 positions, raw units)

SAELens splices every position, BOS included, unless told to ignore tokens; minisae leaves
BOS and the sinks clean (below), so the two agree only up to those positions.

The prediction made at position 0 (target idx[:, 1]) sees only position 0, which no
variant changes, so it is the same in all four and is left out; loss recovered would not
change if it were kept (a shared term cancels), CE and KL would be diluted by 1/(T-1).

Loss recovered is 1 when splicing the SAE costs nothing and 0 when it is as bad as
deleting the activation. Zero-ablation is the usual baseline; on the residual stream it
is so destructive (SmolLM2: uniform logits, CE = ln V) that any SAE scores near 1, so we
also report the stricter mean-ablation. The SAE-side numbers (L0, FVU, dead and dense
latents, log10 firing frequency per latent) come from minisae.metrics on the same tokens,
in the SAE's (scaled) units; FVU does not depend on the scale.
"""

import math

import torch
import torch.nn.functional as F

from minisae.activations import sae_positions
from minisae.metrics import Accumulator
from minisae.utils import Progress, model_device


def splice_hook(replace, max_norm=None):
    """A hook that replaces the rows act[keep] (N, D), keep = sae_positions(act, max_norm),
    with replace(act[keep]) and keeps the clean activation everywhere else (BOS, sinks)."""

    def hook(act):  # act (B, T, D)
        keep = sae_positions(act, max_norm)  # (B, T)
        out = act.clone()
        out[keep] = replace(act[keep]).to(act.dtype)
        return out

    return hook


def _log_probs(model, idx, hooks, bf16: bool):
    """log p for the predictions at positions 1..T-2, float32: (B, T-2, V)."""
    with torch.autocast(idx.device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = model(idx, hooks=hooks)  # (B, T, V)
    return F.log_softmax(logits[:, 1:-1].float(), dim=-1)


def _check(model, contexts, hook, mean_act=None):
    if contexts.ndim != 2 or contexts.shape[1] < 3 or len(contexts) == 0:
        raise ValueError(f"contexts must be (N, T) with N >= 1 and T >= 3, got {tuple(contexts.shape)}")
    if hasattr(model, "hook_names") and hook not in model.hook_names():
        raise ValueError(f"unknown hook point {hook!r}; valid names look like {model.hook_names()[0]!r}")
    if mean_act is not None:
        return torch.as_tensor(mean_act, dtype=torch.float32, device=model_device(model))  # (D,)


def _cross_entropies(model, contexts, hook, replace: dict, batch_size, bf16, verbose, max_norm=None) -> dict:
    """Mean CE of the clean model and of each splice in `replace` (name -> function of
    the (N, D) rows the SAE reads), and KL(clean || splice) of each: kl (the 'sae'
    splice), kl_zero, kl_mean."""
    kl_name = lambda v: "kl" if v == "sae" else f"kl_{v}"
    totals = dict.fromkeys(["clean", *replace, *map(kl_name, replace)], 0.0)
    n_pred = 0
    was_training = model.training
    model.eval()
    bar = Progress("evaluating", len(contexts), "contexts") if verbose else None
    for start in range(0, len(contexts), batch_size):
        idx = contexts[start:start + batch_size].to(model_device(model))  # (B, T)
        targets = idx[:, 2:].flatten()  # (B*(T-2),)
        logp_clean = _log_probs(model, idx, None, bf16)  # (B, T-2, V)
        totals["clean"] += F.nll_loss(logp_clean.flatten(0, 1), targets, reduction="sum").item()
        for v, fn in replace.items():
            logp = _log_probs(model, idx, {hook: splice_hook(fn, max_norm)}, bf16)  # (B, T-2, V)
            totals[v] += F.nll_loss(logp.flatten(0, 1), targets, reduction="sum").item()
            # KL(clean || splice) = sum_V p_clean (log p_clean - log p_splice)
            totals[kl_name(v)] += F.kl_div(logp, logp_clean, log_target=True, reduction="sum").item()
        n_pred += len(targets)
        if bar:
            bar.update(start + len(idx))
    if bar:
        bar.close(len(contexts))
    model.train(was_training)
    out = {f"ce_{v}": totals[v] / n_pred for v in ("clean", *replace)}
    out.update({kl_name(v): totals[kl_name(v)] / n_pred for v in replace})
    out["n_predictions"] = n_pred
    return out


@torch.no_grad()
def baselines(model, contexts, hook: str, mean_act, batch_size: int = 8, bf16: bool = False,
              verbose: bool = True, max_norm=None) -> dict:
    """ce_clean, ce_zero, ce_mean, kl_zero, kl_mean (and n_predictions): the part of `evaluate` that does not
    depend on the SAE. A sweep computes it once and passes it to every `evaluate`."""
    mean_act = _check(model, contexts, hook, mean_act)
    out = _cross_entropies(model, contexts, hook, {"zero": torch.zeros_like,
                                                   "mean": lambda x: mean_act.expand(x.shape)},
                           batch_size, bf16, verbose, max_norm)
    return {**out, "max_norm": max_norm}


@torch.no_grad()
def evaluate_spliced(model, hsae, contexts, batch_size: int = 8, bf16: bool = False,
                     dense_threshold: float = 0.1, baselines=None, verbose: bool = True) -> dict:
    """LM-side and SAE-side metrics of the hooked SAE `hsae` (minisae.hooked_sae: the SAE,
    its hook, activation scale, sink threshold max_norm and mean raw activation) spliced
    into `model` over `contexts` (N, T).

    baselines: the output of `baselines(...)` on the same contexts, to skip the zero and
    mean forwards (2 forward passes per batch instead of 4).
    Returns ce_clean, ce_sae, ce_zero, ce_mean, kl, kl_zero, kl_mean, loss_recovered_zero,
    loss_recovered_mean, ce_loss_score, kl_div_score, l0, fvu, explained_variance, mse,
    l2_ratio, cossim, shrinkage_gamma, dead_frac, dense_frac,
    log10_density (per latent, None if it never fired), n_predictions, n_tokens (the
    positions the SAE replaced), sink_frac (positions >= 1 left clean as sinks).
    """
    hook, sae, scale, max_norm = hsae.hook, hsae.sae, hsae.scale, hsae.max_norm
    if baselines is None and hsae.mean is None:
        raise ValueError("without precomputed baselines the hooked SAE needs its mean activation (mean=...)")
    _check(model, contexts, hook)
    mean_act = None if hsae.mean is None else torch.as_tensor(hsae.mean, dtype=torch.float32,
                                                               device=model_device(model))  # (D,)
    acc = None

    def sae_replace(x):  # x (N, D), raw units
        nonlocal acc
        xs = x.float() * scale  # (N, D), the SAE's units
        if mean_act is not None and xs.shape[1] != mean_act.shape[0]:
            raise ValueError(f"activation width {xs.shape[1]} at {hook} != mean_act width {mean_act.shape[0]}")
        with torch.autocast(xs.device.type, enabled=False):  # the SAE runs in float32
            f = sae.encode(xs)  # (N, F)
            x_hat = sae.decode(f)  # (N, D)
        if acc is None:
            acc = Accumulator(f.shape[-1])
        acc.add(xs, x_hat, f)
        return x_hat / scale

    replace = {"sae": sae_replace}
    if baselines is None:
        replace.update(zero=torch.zeros_like, mean=lambda x: mean_act.expand(x.shape))
    was_training = sae.training
    sae.eval()
    out = _cross_entropies(model, contexts, hook, replace, batch_size, bf16, verbose, max_norm)
    sae.train(was_training)
    if baselines is not None:
        if baselines["n_predictions"] != out["n_predictions"] or baselines.get("max_norm") != max_norm or \
                not math.isclose(baselines["ce_clean"], out["ce_clean"], rel_tol=1e-6):
            raise ValueError("baselines were computed on other contexts (or another model or max_norm): "
                             f"ce_clean {baselines['ce_clean']} vs {out['ce_clean']} here")
        out.update(ce_zero=baselines["ce_zero"], ce_mean=baselines["ce_mean"],
                   kl_zero=baselines.get("kl_zero", float("nan")), kl_mean=baselines.get("kl_mean", float("nan")))
    for a in ("zero", "mean"):
        gap = out[f"ce_{a}"] - out["ce_clean"]
        out[f"loss_recovered_{a}"] = (out[f"ce_{a}"] - out["ce_sae"]) / gap if gap != 0 else float("nan")
    out["ce_loss_score"] = out["loss_recovered_zero"]
    out["kl_div_score"] = (out["kl_zero"] - out["kl"]) / out["kl_zero"] if out["kl_zero"] > 0 else float("nan")
    out.update(acc.result(dense_threshold))
    out["n_tokens"] = acc.n
    out["sink_frac"] = 1 - acc.n / (len(contexts) * (contexts.shape[1] - 1))
    return out
