"""First letters in a real model: a probe, k-sparse probing of SAE latents, and feature
absorption (Chanin et al. 2024, "A is for Absorption"; SAEBench's absorption eval, written anew).

The data
    words   vocabulary tokens that are a space and 2+ lowercase ASCII letters (" cat"); label y =
            the first letter (26 classes); at most `per_letter` words per letter (seeded), split
            train / held-out by word, each letter on its own: a held-out word is never trained on
    prompt  BOS + n_icl lines "{w} has the first letter: {W}\\n" (SAEBench's template; the example
            words drawn once from the training words and then dropped from the data) + the word
    x       the activation at the SAE's hook at the word's position (D,). Attention is causal, so
            what follows the word cannot change x: the prompt ends at the word. The prefix is the
            same for every word; its keys and values are computed once (minisae.models.kv_cache)
            and each word costs one position (SAEBench draws new examples for every prompt).

The probe and k-sparse probing, the 26 letters as classes (their math: minisae/interp/probe.py)
    probe   one logistic regression per letter against the rest, on the training words' x; its
            accuracy on the held-out words (per letter: recall and F1); p_l = w_l / ||w_l||, the
            letter's probe direction
    M_l     the letter's main latents: k-sparse probing on the SAE codes f (N, F) of the training
            words, k growing from 1 while the TRAINING F1 rises by more than split_f1_jump (0.03)
            at each step (SAEBench's feature-splitting rule reads the held-out F1; we keep the
            held-out words out of every choice); F1 at k on the held-out words

Absorption (SAEBench's "full absorption"), on each held-out word of letter l that the probe gets
right and the SAE reads (norm <= its max_norm):
    d_i = decoder row i, b = decoder bias, both in raw units (HookedSAE: W_dec / scale)
    a_i = f_i (d_i . p_l)               latent i's part of the reconstruction along the probe
    P   = (x - b) . p_l                 the word's own part (SAEBench takes x . p_l; we remove
                                        the bias, which holds the mean and belongs to no latent)
    j   = argmax_i a_i
    absorbed  <=>  f_i = 0 for every i in M_l              the letter's main latents are silent
              and  cos(d_j, p_l) >= cos_threshold (0.025)  another latent points along the letter
              and  P > 0 and a_j >= proj_threshold P (0.4) and carries at least 40% of it
    rate_l = #absorbed / #measured; the SAE's rate is the mean of rate_l over the letters whose
    probe F1 >= min_probe_f1 (0.6, SAEBench's) with >= min_tokens words measured. Thresholds are
    SAEBench's; 0.025 is a small cosine: the 40% share is what makes the latent carry the letter.
    Partial absorption, SAEBench's "absorption fraction" (Demian Till), spread over several latents:
    m = sum_{i in M_l} a_i;  A = the sum of the frac_latents (3) largest a_i > 0 of the other
    latents with cos(d_i, p_l) >= frac_cos (0.1);  fraction = 0 if P <= 0, m >= P or A < 0.4 P;
    else 1 if m <= 0; else min(A, P - m) / (min(A, P - m) + m). Averaged like the rate.
"""

import dataclasses
import json
import re
import sys
import time
from pathlib import Path

import torch

from minisae import plots
from minisae.interp.probe import k_sparse, main_latents, probe_report, probe_scores, train_probe
from minisae.models import load_model
from minisae.models.hooks import StopForward
from minisae.models.kv_cache import forward_cached
from minisae.pipeline.hooked_sae import HookedSAE
from minisae.sae import variant_name
from minisae.utils import Progress, atomic_write_text, model_device, resolve_device

LETTERS = "abcdefghijklmnopqrstuvwxyz"
TEMPLATE = "{word} has the first letter: {upper}\n"  # SAEBench's "{word} has the first letter:" + " X"


# ---------------------------------------------------------------- words and prompts

def letter_words(tokenizer, vocab_size: int) -> list:
    """[(token id, text)] of every token that decodes to a space and 2+ lowercase letters."""
    words = [(i, tokenizer.decode([i])) for i in range(vocab_size)]
    return [(i, w) for i, w in words if re.fullmatch(r" [a-z]{2,}", w)]


def split_words(words, per_letter: int, n_icl: int, test_frac: float, seed: int):
    """(icl, train, test), lists of (id, text, label): per letter a seeded sample of at most
    per_letter words, the last test_frac of it held out; n_icl prompt examples taken from the
    training words (and removed from them)."""
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for label, letter in enumerate(LETTERS):
        mine = [(i, w, label) for i, w in words if w[1] == letter]
        mine = [mine[j] for j in torch.randperm(len(mine), generator=g)[:per_letter].tolist()]
        n_test = round(test_frac * len(mine))
        train += mine[:len(mine) - n_test]
        test += mine[len(mine) - n_test:]
    pick = set(torch.randperm(len(train), generator=g)[:n_icl].tolist())
    icl = [w for j, w in enumerate(train) if j in pick]
    return icl, [w for j, w in enumerate(train) if j not in pick], test


def prefix_ids(tokenizer, icl) -> list:
    """BOS + the example lines, checked to end so that the next token starts a new line."""
    text = "".join(TEMPLATE.format(word=w, upper=w[1].upper()) for _, w, _ in icl)
    ids = [tokenizer.bos_id] + tokenizer.encode(text)
    if icl and tokenizer.decode(ids[-1:]) != "\n":
        raise ValueError(f"the prompt prefix does not end in its own newline token: {text[-40:]!r}")
    return ids


@torch.no_grad()
def word_activations(model, hook: str, prefix: list, word_ids: list, bf16=False, batch_size=256, verbose=True):
    """x (N, D) float32 on the CPU: the activation at `hook` of each word appended to `prefix`."""
    device = model_device(model)

    def stop(act):  # nothing after the hook is computed (minisae.models.hooks)
        raise StopForward(act)

    out = []
    bar = Progress("word activations", len(word_ids), "words") if verbose else None
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        _, cache = forward_cached(model, torch.tensor([prefix], device=device))  # the prefix, once
        for s in range(0, len(word_ids), batch_size):
            idx = torch.tensor(word_ids[s:s + batch_size], device=device)[:, None]  # (B, 1)
            try:
                forward_cached(model, idx, cache, hooks={hook: stop})
            except StopForward as got:
                out.append(got.act[:, 0].float().cpu())  # (B, D)
            if bar:
                bar.update(s + len(idx))
    if bar:
        bar.close(len(word_ids))
    return torch.cat(out)  # (N, D)


# ---------------------------------------------------------------- absorption

def absorption(x, f, y, dirs, main, W_dec, b_dec, cfg) -> dict:
    """Per word (N,): silent (no main latent fires), absorbed (the rule of the module docstring)
    and SAEBench's absorption fraction. x (N, D) raw; f (N, F); y (N,); dirs (C, D) unit probe
    directions; main [C lists]; W_dec (F, D), b_dec (D,) in raw units."""
    along = (W_dec @ dirs.T).T[y]  # (N, F): d_i . p_l for the word's own letter l
    cos = along / W_dec.norm(dim=1).clamp_min(1e-12)  # (N, F)
    a = f * along  # (N, F)
    P = ((x - b_dec) * dirs[y]).sum(1)  # (N,)
    is_main = torch.zeros(len(main), f.shape[1], dtype=torch.bool)  # (C, F)
    for l, ids in enumerate(main):
        is_main[l, ids] = True
    M = is_main[y]  # (N, F)
    silent = ~((f != 0) & M).any(1)  # (N,)
    j, rows = a.argmax(1), torch.arange(len(y))
    full = silent & (cos[rows, j] >= cfg.cos_threshold) & (P > 0) & (a[rows, j] >= cfg.proj_threshold * P)
    # the fraction: up to frac_latents others (cos >= frac_cos) may share what the main ones miss
    m = (a * M).sum(1)  # (N,) the main latents' part
    others = torch.where(~M & (cos >= cfg.frac_cos) & (a > 0), a, torch.zeros(()))  # (N, F)
    A = others.topk(min(cfg.frac_latents, f.shape[1]), dim=1).values.sum(1)  # (N,)
    took = torch.minimum(A, P - m)
    frac = torch.where(m <= 0, torch.ones(()), (took / (took + m).clamp_min(1e-12)).clamp(0, 1))
    frac = torch.where((P <= 0) | (m >= P) | (A < cfg.proj_threshold * P), torch.zeros(()), frac)
    return {"silent": silent, "absorbed": full, "fraction": frac, "top": j, "top_cos": cos[rows, j],
            "top_share": a[rows, j] / P}


def measure_sae(hsae, x_train, y_train, x_test, y_test, probe, right, cfg, words=None) -> dict:
    """k-sparse F1, main latents and absorption of one hooked SAE; `right` (N_test,) marks the
    held-out words the probe gets right; `words` (their texts) name the absorbed ones."""
    with torch.no_grad():
        f_train, f_test = hsae.encode_raw(x_train).cpu(), hsae.encode_raw(x_test).cpu()  # (N, F)
        W_dec, b_dec = hsae.sae.W_dec.detach().cpu() / hsae.scale, hsae.sae.b_dec.detach().cpu() / hsae.scale
    read = hsae.positions(x_test[:, None], bos=False)[:, 0].cpu()  # (N,) under the sink threshold
    ks = k_sparse(f_train, y_train, f_test, y_test, len(LETTERS), cfg.max_k, cfg.sparse_l2, cfg.probe_steps)
    main = main_latents(ks["latents"], ks["f1_train"], cfg.split_f1_jump)
    on = right & read  # the measured words
    got = absorption(x_test[on], f_test[on], y_test[on], probe["dirs"], main, W_dec, b_dec, cfg)
    best_cos = ((W_dec / W_dec.norm(dim=1, keepdim=True)) @ probe["dirs"].T).max(0).values  # (C,)
    texts = [w for w, keep in zip(words or [None] * len(on), on.tolist()) if keep]
    per = {}
    for l, L in enumerate(LETTERS):
        mine = y_test[on] == l
        n = int(mine.sum())
        hits = (mine & got["absorbed"]).nonzero()[:, 0].tolist()  # [word, absorbing latent, its cosine, share]
        absorbed_words = [[texts[i], got["top"][i].item(), round(got["top_cos"][i].item(), 3),
                           round(got["top_share"][i].item(), 3)] for i in hits]
        per[L] = {"measured": n, "absorbed": int(got["absorbed"][mine].sum()),
                  "main_silent": int(got["silent"][mine].sum()), "fraction_sum": got["fraction"][mine].sum().item(),
                  "rate": int(got["absorbed"][mine].sum()) / n if n else None, "main_latents": main[l],
                  "absorbed_words": absorbed_words, "best_cos": best_cos[l].item(),
                  "f1": {str(k): ks["f1_test"][k - 1][l].item() for k in cfg.report_ks}}
    return {"n_latents": hsae.n_latents, "l0_words": (f_test > 0).sum(1).double().mean().item(),
            "unread_words": int((~read).sum()), "k_sparse_f1": {str(k): ks["f1_test"][k - 1].mean().item()
                                                                  for k in cfg.report_ks}, "per_letter": per}


def summarise(row: dict, probe_per_letter: dict, cfg) -> dict:
    """Over the letters kept (probe F1 >= min_probe_f1, >= min_tokens words measured): the mean of
    the per-letter rates (SAEBench's score), the rate pooled over their words, the mean
    absorption fraction, the share of words whose main latents are silent, the mean best cosine."""
    keep = [L for L, r in row["per_letter"].items()
            if r["measured"] >= cfg.min_tokens and probe_per_letter[L]["f1"] >= cfg.min_probe_f1]
    per = [row["per_letter"][L] for L in keep]
    n = sum(r["measured"] for r in per)
    mean = lambda values: sum(values) / len(values) if values else None
    return {"letters": "".join(keep), "tokens_measured": n, "absorption_rate": mean([r["rate"] for r in per]),
            "absorption_pooled": sum(r["absorbed"] for r in per) / n if n else None,
            "absorption_fraction": mean([r["fraction_sum"] / r["measured"] for r in per]),
            "main_silent_rate": sum(r["main_silent"] for r in per) / n if n else None,
            "best_cos": mean([r["best_cos"] for r in per])}


# ---------------------------------------------------------------- the run

def sae_name(path) -> str:
    """NAME, or RUN/NAME for an SAE in an `lm` run's folder (RUN/saes/NAME): two runs' SAEs differ."""
    p = Path(str(path).rstrip("/"))
    return f"{p.parent.parent.name}/{p.name}" if p.parent.name == "saes" and p.parent.parent.name else p.name


def lm_row(path):
    """The SAE's row of the `lm` run it came from (RUN/saes/NAME -> RUN/lm_results.json), if any."""
    results = Path(path).parent.parent / "lm_results.json"
    try:
        rows = json.loads(results.read_text(encoding="utf-8"))["rows"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    row = next((r for r in rows if r.get("sae") == f"saes/{Path(path).name}"), None)
    return {k: row.get(k) for k in ("l0", "fvu", "loss_recovered_mean")} if row else None


def run(cfg) -> dict:
    """`python -m minisae first-letter` (cfg: minisae.configs.FirstLetterConfig)."""
    cfg.check()
    device = resolve_device(cfg.device)
    hsaes = [HookedSAE.load(p).check_site(cfg.model) for p in cfg.saes]  # every SAE before the model
    if len({(h.model_name, h.hook) for h in hsaes}) > 1:
        raise ValueError("the SAEs read different hooks or models: " + ", ".join(f"{p}: {h.model_name} {h.hook}"
                         for p, h in zip(cfg.saes, hsaes)) + "; compare SAEs of one hook point")
    model_name = hsaes[0].model_name or cfg.model
    if model_name is None:
        raise ValueError(f"{cfg.saes[0]} does not say which model it was trained on: name it with --model")
    t0 = time.time()
    model, tok = load_model(model_name, weights=cfg.weights)
    for h in hsaes:
        h.model_name = model_name
        h.check_model(model).sae.to(device)
    model.to(device).eval()
    icl, train, test = split_words(letter_words(tok, model.vocab_size), cfg.per_letter, cfg.n_icl,
                                   cfg.test_frac, cfg.seed)
    prefix = prefix_ids(tok, icl)
    print(f"{len(train):,} training and {len(test):,} held-out words, {len(prefix)}-token prefix; "
          f"{model_name} {hsaes[0].hook}", file=sys.stderr)
    acts = word_activations(model, hsaes[0].hook, prefix, [i for i, _, _ in train + test], cfg.bf16, cfg.batch_size)
    x_train, x_test = acts[:len(train)], acts[len(train):]
    y_train, y_test = torch.tensor([l for *_, l in train]), torch.tensor([l for *_, l in test])
    probe = train_probe(x_train, y_train, len(LETTERS), cfg.probe_l2, cfg.probe_steps)
    scores = probe_scores(probe, x_test)
    got = probe_report(scores, y_test, LETTERS)
    report = {"accuracy": got["accuracy"], "per_letter": got["per_class"]}  # as the results file names it
    print(f"probe: held-out accuracy {report['accuracy']:.3f} on {len(test):,} words", file=sys.stderr)
    right = scores.argmax(0) == y_test
    rows = []
    for path, h in zip(cfg.saes, hsaes):
        row = measure_sae(h, x_train, y_train, x_test, y_test, probe, right, cfg, [w for _, w, _ in test])
        row = {"name": sae_name(path), "sae": str(path), "variant": variant_name(h.sae.activation),
               "lm_eval": lm_row(path), **row}
        row.update(summarise(row, report["per_letter"], cfg))
        rows.append(row)
        print(f"  {row['name']}: L0 {row['l0_words']:.1f}, k=1 F1 {row['k_sparse_f1']['1']:.3f}, absorption rate "
              f"{fmt(row['absorption_rate'], '.4f')} over {row['tokens_measured']} words", file=sys.stderr)
    results = {"model": model_name, "hook": hsaes[0].hook, "config": json.loads(json.dumps(
        dataclasses.asdict(cfg), default=str)), "prefix": tok.decode(prefix[1:]), "n_train": len(train), "n_test": len(test),
        "probe": report, "saes": rows, "seconds": time.time() - t0}
    out = Path(cfg.out)
    atomic_write_text(out / "first_letter_results.json", json.dumps(results, indent=1))
    plots.first_letter_figure(results, out / "first_letter_absorption.png")
    print(results_table(results))
    print(f"wrote {out / 'first_letter_results.json'} and {out / 'first_letter_absorption.png'}", file=sys.stderr)
    return results


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def results_table(results: dict) -> str:
    """The chapter's tables (docs/10_absorption.md): the probe per letter, then one row per SAE."""
    per, ks = results["probe"]["per_letter"], results["config"]["report_ks"]
    lines = ["| | " + " | ".join(LETTERS) + " |", "|---|" + "---|" * len(LETTERS),
             "| held-out words | " + " | ".join(str(per[L]["n_test"]) for L in LETTERS) + " |",
             "| probe accuracy | " + " | ".join(f"{per[L]['accuracy']:.2f}" for L in LETTERS) + " |", "",
             "| SAE | variant | L0 (text) | L0 (words) | " + " | ".join(f"F1 k={k}" for k in ks)
             + " | absorption rate | pooled | absorption fraction | main latents silent | best cosine | letters | words |",
             "|---|---|---|---|" + "---|" * len(ks) + "---|---|---|---|---|---|---|"]
    for r in results["saes"]:
        text_l0 = f"{r['lm_eval']['l0']:.1f}" if r.get("lm_eval") else "-"
        lines.append(f"| {r['name']} | {r['variant']} | {text_l0} | {r['l0_words']:.1f} | "
                     + " | ".join(f"{r['k_sparse_f1'][str(k)]:.3f}" for k in ks)
                     + "".join(f" | {fmt(r[key], spec)}" for key, spec in (
                         ("absorption_rate", ".4f"), ("absorption_pooled", ".4f"), ("absorption_fraction", ".4f"),
                         ("main_silent_rate", ".3f"), ("best_cos", ".2f")))
                     + f" | {len(r['letters'])} | {r['tokens_measured']} |")
    return "\n".join(lines) + "\n"
