"""Evaluate an SAE where it matters: spliced into the language model, on held-out text.

A low reconstruction error says little on its own: the model may rely on exactly the
directions the SAE drops. So we replace the activation at `hook` and measure what the
model's next-token loss does (Bricken et al. 2023; Gated SAE paper, sec. 5.1). For held-out
contexts idx (B, T), BOS at position 0, four forward passes per batch (two in a sweep:
`baselines` computes clean, zero and mean once):

    clean   the model untouched
    sae     the SAE's positions of the hook's activation x replaced by
            x_hat = sae(x * scale) / scale     (the SAE was trained on x * scale, see
                                                minisae.pipeline.activations; this undoes it)
    zero    the same positions replaced by 0                    (zero-ablation)
    mean    the same positions replaced by the mean training activation, raw units

The SAE's positions are minisae.pipeline.activations.sae_positions: all but position 0 (BOS) and
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
    explained_variance, l2_ratio, cossim, mse                    minisae.metrics (on the SAE's
                                                                 positions, raw units; which
                                                                 definition each follows is there)
    mse_scaled = mse * scale^2: in the SAE's training units

SAELens splices every position, BOS included, unless told to ignore tokens; minisae leaves
BOS and the sinks clean (below), so the two agree only up to those positions.

Two more numbers let a reader judge the headline (with_sinks=True, as `lm` and `layers` ask):

    ce_diff_se = std_t(d_t) / sqrt(n),  d_t = nll_sae(t) - nll_clean(t)   per prediction t
                 the standard error of CE_sae - CE_clean (ce_diff_se_zero, _mean: of the
                 ablations); loss_recovered_a_se = ce_diff_se / (CE_a - CE_clean), the
                 uncertainty of the gap itself left out (it is many gaps' se away from 0).
                 Tokens of one context are correlated, so this is a lower bound.
    *_with_sinks  the same splices with the sinks replaced too (only BOS kept clean):
                 ce_sae_with_sinks, ce_zero_with_sinks, ce_mean_with_sinks and
                 loss_recovered_zero_with_sinks, loss_recovered_mean_with_sinks, the number
                 a tool that does not set the sinks aside would report.

The prediction made at position 0 (target idx[:, 1]) sees only position 0, which no
variant changes, so it is the same in all four and is left out; loss recovered would not
change if it were kept (a shared term cancels), CE and KL would be diluted by 1/(T-1).

Loss recovered is 1 when splicing the SAE costs nothing and 0 when it is as bad as
deleting the activation. Zero-ablation is the usual baseline; on the residual stream it
is so destructive that any SAE scores near 1, so we also report the stricter
mean-ablation. (SmolLM2 has no biases, so a zero residual stream at every position gives
uniform logits, CE = ln V = 10.80; here BOS keeps its clean activation, so that holds only
at the last layer. At layer 15 later layers still read BOS, and CE_zero is 15.2, far
above ln V: figures/lm_results.json.) The SAE-side numbers (L0, FVU, dead and dense
latents, log10 firing frequency per latent) come from minisae.metrics on the same tokens,
in the SAE's (scaled) units; FVU does not depend on the scale.
"""

import math

import torch
import torch.nn.functional as F

from minisae.metrics import Accumulator
from minisae.pipeline.activations import sae_positions
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


def _check(model, contexts, hook):
    if contexts.ndim != 2 or contexts.shape[1] < 3 or len(contexts) == 0:
        raise ValueError(f"contexts must be (N, T) with N >= 1 and T >= 3, got {tuple(contexts.shape)}")
    if hasattr(model, "hook_names") and hook not in model.hook_names():
        raise ValueError(f"unknown hook point {hook!r}; valid names look like {model.hook_names()[0]!r}")


def _cross_entropies(model, contexts, hook, replace: dict, batch_size, bf16, verbose, max_norm=None,
                     replace_with_sinks=None) -> dict:
    """Mean CE of the clean model and of each splice in `replace` (name -> function of
    the (N, D) rows the SAE reads), and KL(clean || splice) of each: kl (the 'sae'
    splice), kl_zero, kl_mean; the standard error of each CE difference from clean
    (ce_diff_se, ce_diff_se_zero, ...). Each splice in `replace_with_sinks` runs with the
    sinks replaced too (BOS alone kept clean) and is named NAME_with_sinks."""
    kl_name = lambda v: "kl" if v == "sae" else f"kl_{v}"
    se_name = lambda v: "ce_diff_se" if v == "sae" else f"ce_diff_se_{v}"
    splices = [(v, fn, max_norm) for v, fn in replace.items()]
    splices += [(f"{v}_with_sinks", fn, None) for v, fn in (replace_with_sinks or {}).items()]
    names = [v for v, _, _ in splices]
    totals = dict.fromkeys(["clean", *names, *map(kl_name, names)], 0.0)
    diffs = {v: [0.0, 0.0] for v in names}  # sum of d_t and of d_t^2, d_t = nll_v(t) - nll_clean(t)
    n_pred = 0
    was_training = model.training
    model.eval()
    bar = Progress("evaluating", len(contexts), "contexts") if verbose else None
    for start in range(0, len(contexts), batch_size):
        idx = contexts[start:start + batch_size].to(model_device(model))  # (B, T)
        targets = idx[:, 2:].flatten()  # (B*(T-2),)
        logp_clean = _log_probs(model, idx, None, bf16)  # (B, T-2, V)
        nll_clean = F.nll_loss(logp_clean.flatten(0, 1), targets, reduction="none")  # (B*(T-2),)
        totals["clean"] += nll_clean.double().sum().item()
        for v, fn, mn in splices:
            logp = _log_probs(model, idx, {hook: splice_hook(fn, mn)}, bf16)  # (B, T-2, V)
            nll = F.nll_loss(logp.flatten(0, 1), targets, reduction="none")  # (B*(T-2),)
            totals[v] += nll.double().sum().item()
            d = nll.double() - nll_clean.double()  # (B*(T-2),) per-prediction CE difference
            diffs[v][0] += d.sum().item()
            diffs[v][1] += (d * d).sum().item()
            # KL(clean || splice) = sum_V p_clean (log p_clean - log p_splice)
            totals[kl_name(v)] += F.kl_div(logp, logp_clean, log_target=True, reduction="sum").item()
        n_pred += len(targets)
        if bar:
            bar.update(start + len(idx))
    if bar:
        bar.close(len(contexts))
    model.train(was_training)
    out = {f"ce_{v}": totals[v] / n_pred for v in ("clean", *names)}
    out.update({kl_name(v): totals[kl_name(v)] / n_pred for v in names})
    for v, (s1, s2) in diffs.items():  # sample variance of d_t, then the standard error of its mean
        var = max(s2 - s1 * s1 / n_pred, 0.0) / max(n_pred - 1, 1)
        out[se_name(v)] = math.sqrt(var / n_pred)
    out["n_predictions"] = n_pred
    return out


@torch.no_grad()
def baselines(model, contexts, hook: str, mean_act, batch_size: int = 8, bf16: bool = False,
              verbose: bool = True, max_norm=None, with_sinks: bool = False) -> dict:
    """ce_clean, ce_zero, ce_mean, kl_zero, kl_mean, ce_diff_se_zero, ce_diff_se_mean (and
    n_predictions): the part of `evaluate` that does not depend on the SAE. A sweep
    computes it once and passes it to every `evaluate`. with_sinks: also the ablations
    with the sinks replaced too (ce_zero_with_sinks, ...; the same passes when max_norm is None)."""
    _check(model, contexts, hook)
    mean_act = torch.as_tensor(mean_act, dtype=torch.float32, device=model_device(model))  # (D,)
    ablations = {"zero": torch.zeros_like, "mean": lambda x: mean_act.expand(x.shape)}
    out = _cross_entropies(model, contexts, hook, ablations, batch_size, bf16, verbose, max_norm,
                           ablations if with_sinks and max_norm is not None else None)
    if with_sinks and max_norm is None:  # no sinks: replacing them changes nothing
        out.update(_renamed_with_sinks(out, ("zero", "mean")))
    return {**out, "max_norm": max_norm}


def _renamed_with_sinks(out: dict, splices) -> dict:
    """The *_with_sinks keys of `out` copied from the plain ones (for a run without sinks)."""
    new = {}
    for v in splices:
        kl, se = ("kl", "ce_diff_se") if v == "sae" else (f"kl_{v}", f"ce_diff_se_{v}")
        new.update({f"ce_{v}_with_sinks": out[f"ce_{v}"], f"kl_{v}_with_sinks": out[kl],
                    f"ce_diff_se_{v}_with_sinks": out[se]})
    return new


@torch.no_grad()
def evaluate_spliced(model, hsae, contexts, batch_size: int = 8, bf16: bool = False,
                     dense_threshold: float = 0.1, baselines=None, verbose: bool = True,
                     with_sinks: bool = False) -> dict:
    """LM-side and SAE-side metrics of the hooked SAE `hsae` (minisae.pipeline.hooked_sae: the SAE,
    its hook, activation scale, sink threshold max_norm and mean raw activation) spliced
    into `model` over `contexts` (N, T).

    baselines: the output of `baselines(...)` on the same contexts, to skip the zero and
    mean forwards (2 forward passes per batch instead of 4).
    Returns ce_clean, ce_sae, ce_zero, ce_mean, kl, kl_zero, kl_mean, loss_recovered_zero,
    loss_recovered_mean, ce_loss_score, kl_div_score, l0, fvu, explained_variance,
    saebench_explained_variance, mse (raw units), mse_scaled,
    l2_ratio, cossim, shrinkage_gamma, dead_frac, dense_frac,
    log10_density (per latent, None if it never fired), n_predictions, n_tokens (the
    positions the SAE replaced), sink_frac (positions >= 1 left clean as sinks),
    ce_diff_se (and _zero, _mean), loss_recovered_zero_se, loss_recovered_mean_se.
    with_sinks: also the splices with the sinks replaced too (one more forward per batch;
    `baselines` must then have been computed with_sinks): ce_sae_with_sinks,
    kl_sae_with_sinks, loss_recovered_zero_with_sinks, loss_recovered_mean_with_sinks, ...
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

    def sae_replace_sinks(x):  # x (N, D), raw units: the same SAE, nothing accumulated
        with torch.autocast(x.device.type, enabled=False):
            return sae(x.float() * scale) / scale

    replace = {"sae": sae_replace}
    if baselines is None:
        replace.update(zero=torch.zeros_like, mean=lambda x: mean_act.expand(x.shape))
    if baselines is not None and with_sinks and "ce_zero_with_sinks" not in baselines:
        raise ValueError("with_sinks needs baselines computed with_sinks=True")
    sinks_too = with_sinks and max_norm is not None
    replace_sinks = {"sae": sae_replace_sinks, **{k: v for k, v in replace.items() if k != "sae"}}
    was_training = sae.training
    sae.eval()
    out = _cross_entropies(model, contexts, hook, replace, batch_size, bf16, verbose, max_norm,
                           replace_sinks if sinks_too else None)
    sae.train(was_training)
    if with_sinks and not sinks_too:  # no sinks: replacing them changes nothing
        out.update(_renamed_with_sinks(out, replace))
    if baselines is not None:
        if baselines["n_predictions"] != out["n_predictions"] or baselines.get("max_norm") != max_norm or \
                not math.isclose(baselines["ce_clean"], out["ce_clean"], rel_tol=1e-6):
            raise ValueError("baselines were computed on other contexts (or another model or max_norm): "
                             f"ce_clean {baselines['ce_clean']} vs {out['ce_clean']} here")
        out.update(ce_zero=baselines["ce_zero"], ce_mean=baselines["ce_mean"],
                   kl_zero=baselines.get("kl_zero", float("nan")), kl_mean=baselines.get("kl_mean", float("nan")))
        out.update({k: v for k, v in baselines.items() if k.startswith("ce_diff_se_") or k.endswith("_with_sinks")})
    for a in ("zero", "mean"):
        gap = out[f"ce_{a}"] - out["ce_clean"]
        out[f"loss_recovered_{a}"] = (out[f"ce_{a}"] - out["ce_sae"]) / gap if gap != 0 else float("nan")
        out[f"loss_recovered_{a}_se"] = out["ce_diff_se"] / abs(gap) if gap != 0 else float("nan")
        if with_sinks:
            gap = out[f"ce_{a}_with_sinks"] - out["ce_clean"]
            out[f"loss_recovered_{a}_with_sinks"] = ((out[f"ce_{a}_with_sinks"] - out["ce_sae_with_sinks"]) / gap
                                                     if gap != 0 else float("nan"))
    out["ce_loss_score"] = out["loss_recovered_zero"]
    out["kl_div_score"] = (out["kl_zero"] - out["kl"]) / out["kl_zero"] if out["kl_zero"] > 0 else float("nan")
    out.update(acc.result(dense_threshold, scale=scale))  # mse in raw units, as SAELens's
    out["mse_scaled"] = out["mse"] * scale ** 2  # in the SAE's own (training) units
    out["n_tokens"] = acc.n
    out["sink_frac"] = 1 - acc.n / (len(contexts) * (contexts.shape[1] - 1))
    return out
