"""Automated interpretability: a language model explains each latent, another call scores it.

The last step of the research loop (Bills et al. 2023; Paulo et al. 2024): instead of a
person reading every latent's max-activating examples (minisae.interp.features), an explainer
model reads them and writes one sentence, and a scorer measures how well that sentence
predicts where the latent fires on text neither has seen (minisae.autointerp.scoring).

For each latent i, from one pass over held-out contexts (N, T) (codes f_i at every read position):

    firing contexts   sorted by their peak max_t f_i, strongest first
    explainer sees    the n_explain//2 strongest + the rest evenly spaced over the lower
                      ranks (a few quantiles of activation strength, not just the top), each
                      a window of `window` tokens around its peak, tokens with f_i > 0 marked
                      <<like this>>, then their activations on a 0-10 scale (Bills et al.)
    scorer sees       n_score other firing windows, evenly spaced over the ranks, and as
                      many silent windows (f_i = 0 on every token), drawn with the seed

Four explanations of each latent are scored the same way (minisae.autointerp.verdict), the
known answers first: a token-set baseline with no language model (the latent's most
frequent activating tokens in the explainer's examples: 'the tokens "x", "y", "z"'),
another latent's token set, the explainer's sentence, and another latent's sentence (a
seeded derangement, minisae.autointerp.scoring). A scorer that cannot tell the token set
from the shuffled one is blind, and its verdict on the sentences is not a result. The
token set is also read by a rule (scoring.TokenRule: yes where one of its tokens appears).
"""

import dataclasses
import html
import json
import math
import sys
import time
from pathlib import Path

from minisae import formats, plots
from minisae.autointerp import chat, endpoint
from minisae.autointerp.examples import (contrast_windows, held_out_for_scoring, hook_activations, latent_codes,
                                         split_examples)
from minisae.autointerp.prompts import STOP, clean_explanation, explainer_messages, token_set_explanation
from minisae.autointerp.scoring import TokenRule, derangement, score
from minisae.autointerp.verdict import (SCORE_KEY, effects_markdown, paired_by_latent, score_latent, verdict,
                                        verdict_markdown)
from minisae.configs import ExplainConfig
from minisae.interp.feature_page import print_report, render_html
from minisae.interp.features import load_text, pick_latents
from minisae.interp.lens import lens_tokens
from minisae.pipeline.hooked_sae import HookedSAE, load_with_model, parse_latents
from minisae.utils import Progress, atomic_write_text, model_device

# ---------------------------------------------------------------- backends

def make_chat(cfg: ExplainConfig):
    """The explainer and scorer: an OpenAI-compatible endpoint, or SmolLM2 run locally."""
    if cfg.endpoint:
        return endpoint.OpenAIChat(cfg.endpoint, cfg.api_model, cfg.api_key_env, cfg.timeout, cfg.retries,
                               temperature=cfg.temperature, seed=cfg.seed)
    return chat.LocalChat.from_gguf(cfg.chat_weights, temperature=cfg.temperature, seed=cfg.seed, bf16=cfg.chat_bf16)


# ---------------------------------------------------------------- one SAE

def _mean(values):
    v = [x for x in values if x is not None and not math.isnan(x)]
    return sum(v) / len(v) if v else math.nan


def summarize(rows) -> dict:
    """Means over latents of every score of every explanation kind, and the times."""
    out = {"n_latents": len(rows)}
    for kind in ("explanation", "baseline", "control", "baseline_rule"):
        for method, key in (("detection", "balanced_accuracy"), ("detection", "auroc"),
                            ("simulation", "correlation")):
            vals = [r["scores"].get(kind, {}).get(method, {}).get(key) for r in rows]
            out[f"{kind}_{method}_{key}"] = _mean(vals)
    out["explain_s_per_latent"] = _mean([r["explain_s"] for r in rows])
    out["score_s_per_latent"] = _mean([r["score_s"] for r in rows])
    return out


def explain_latents(chat, hsae, model, tokenizer, contexts, a, stats, latents, cfg: ExplainConfig) -> list:
    """Explain, then score (explanation, token-set baseline, shuffled control) each latent."""
    rows = []
    bar = Progress("explaining", len(latents), "latents")
    for j, i in enumerate(latents):  # 1) explanations
        t0 = time.time()
        split = split_examples(contexts, a[..., j], cfg.n_explain, cfg.n_score, cfg.window, cfg.after, cfg.seed + i)
        lens = lens_tokens(model, tokenizer, hsae.sae.W_dec[i].detach().to(model_device(model)), 8)
        row = {"latent": i, "density": stats["density"][i], "mean_active": stats["mean_active"][i],
               "max": stats["max"][i], "hist": stats["hist"].get(i), "lens": lens}
        if split is None:
            row.update(examples=[], explanation=None, baseline=None, explain_s=0.0)
        else:
            explain, held, labels = split
            contrast = contrast_windows(contexts, a[..., j], explain, held, cfg.n_explain // 2, cfg.window,
                                        cfg.seed + i) if cfg.style == "contrastive" else ()
            reply = chat.complete(explainer_messages(tokenizer, explain, lens["promoted"] if cfg.lens else None,
                                                     cfg.style, contrast),
                                  cfg.max_new_tokens, seed=cfg.seed + i, stop=STOP) if cfg.explainer else None
            row.update(examples=explain, held_out=held, labels=labels, reply=reply,
                       explanation=clean_explanation(reply) if cfg.explainer else None,
                       baseline=token_set_explanation(tokenizer, explain),
                       explain_s=time.time() - t0)
        rows.append(row)
        bar.update(j + 1, extra=f", {row['explain_s']:.1f}s last")
    bar.close(len(latents))
    scored = [r for r in rows if r["baseline"] is not None]  # the latents with windows to score
    if len(scored) < 2:
        raise ValueError(f"only {len(scored)} of the {len(latents)} latents fire in 2 or more contexts: "
                         "scan more text (--tokens) or pick other latents")
    perm = derangement(len(scored), cfg.seed)
    bar = Progress("scoring", len(scored), "latents")
    for j, r in enumerate(scored):  # 2) the known answers, then the explanations, on held-out windows
        t0 = time.time()
        held = held_out_for_scoring(r["held_out"], r["labels"], tokenizer)
        ctrl = scored[perm[j]]
        r["control_from"] = ctrl["latent"]
        kinds = {"baseline": r["baseline"], "baseline_control": ctrl["baseline"]}  # the known answers first
        if cfg.explainer:
            kinds.update(explanation=r["explanation"], control=ctrl["explanation"])
        r["scores"] = score_latent(chat, kinds,
                                   held, cfg.methods, cfg.seed + r["latent"])
        r["score_s"] = time.time() - t0
        r["scores"]["baseline_rule"] = score(TokenRule(), r["baseline"], held, cfg.methods)  # no LLM: instant
        bar.update(j + 1, extra=f", {r['score_s']:.1f}s last")
    bar.close(len(scored))
    return scored


def print_scores(rows, file=None):
    file = file or sys.stdout
    f = lambda s, m, k: f"{s.get(m, {}).get(k, math.nan):.2f}"
    for r in rows:
        print(f"\nlatent {r['latent']}: {r['explanation']}", file=file)
        for kind in ("explanation", "baseline", "control", "baseline_control", "baseline_rule"):
            s = r["scores"].get(kind)
            if not s:  # the token rule reads detection and simulation only
                continue
            what = r["baseline"] if kind == "baseline" else \
                f"from latent {r['control_from']}" if "control" in kind else ""
            cells = [f"detection bal.acc {f(s, 'detection', 'balanced_accuracy')} AUROC {f(s, 'detection', 'auroc')}",
                     f"simulation r {f(s, 'simulation', 'correlation')}"] if kind == "baseline_rule" or \
                {"detection", "simulation"} & set(s) else []
            cells += [f"{m} {f(s, m, SCORE_KEY[m])}" for m in ("surprisal", "overlap") if m in s]
            print(f"  {kind:16s} {'  '.join(cells)}  {what}", file=file)
        if "intruder" in r["scores"]:
            print(f"  intruder         P(correct) {r['scores']['intruder']['p_correct']:.2f} (chance "
                  f"{r['scores']['intruder']['chance']:.2f})", file=file)


def render_page(title: str, rows, tokenizer) -> str:
    """The features page (minisae.interp.feature_page) with each latent's explanation and scores under its title."""
    page = render_html(title, rows, tokenizer)
    for r in rows:
        s = r["scores"]
        cell = lambda k: (f"detection {s.get(k, {}).get('detection', {}).get('balanced_accuracy', math.nan):.2f}, "
                          f"simulation r {s.get(k, {}).get('simulation', {}).get('correlation', math.nan):.2f}")
        text = html.escape(r["explanation"] or "(no explainer)")
        note = (f'<p><b>explanation:</b> {text} ({cell("explanation")})<br>'
                f'<b>token-set baseline:</b> {html.escape(r["baseline"])} ({cell("baseline")})<br>'
                f'<b>control</b> (latent {r["control_from"]}\'s explanation): {cell("control")}</p>')
        head = f'<section id="latent-{r["latent"]}"><h2>latent {r["latent"]}</h2>'
        page = page.replace(head, head + note, 1)
    return page


def explain_sae(chat, hsae, model, tokenizer, contexts, x, cfg: ExplainConfig, name: str) -> dict:
    """Explain and score one SAE on raw activations x (N, T-1, D): the result dict, also
    written as explanations-{name}.json and .html in cfg.out."""
    stats, _ = latent_codes(hsae, x)
    if cfg.latents:
        latents = parse_latents(cfg.latents, hsae.n_latents)
    else:
        latents = pick_latents(stats, "random", cfg.n_latents, cfg.seed)
    stats, a = latent_codes(hsae, x, latents)  # a (N, T-1, L)
    l0 = sum(stats["density"])  # mean active latents per read token
    rows = explain_latents(chat, hsae, model, tokenizer, contexts, a, stats, latents, cfg)
    summary = {"sae": name, "l0": l0, "n_tokens": stats["n_tokens"], "n_asked": len(latents), **summarize(rows),
               "verdict": verdict(rows, cfg.methods, cfg.seed)}
    result = {"config": json.loads(json.dumps(dataclasses.asdict(cfg), default=str)), "model": hsae.model_name,
              "hook": hsae.hook, "summary": summary,
              "latents": [{k: v for k, v in r.items() if k != "hist"} for r in rows]}
    out = Path(cfg.out)
    atomic_write_text(out / f"explanations-{name}.json", json.dumps(result, indent=1))
    atomic_write_text(out / f"explanations-{name}.html",
                      render_page(f"{name}: {hsae.model_name} {hsae.hook}, explained", rows, tokenizer))
    return result


# ---------------------------------------------------------------- the command

def run(cfg: ExplainConfig) -> list:
    """`python -m minisae explain`: one SAE (cfg.source.sae), or every SAE of cfg.run_dir
    with a comparison table and figure. Returns the per-SAE summaries."""
    cfg.check()
    src = cfg.source.check()
    if cfg.run_dir is None and (Path(str(src.sae)) / "saes").is_dir():  # --sae RUN: an lm run folder
        cfg = dataclasses.replace(cfg, run_dir=Path(str(src.sae)))
    if cfg.run_dir:  # every SAE of an lm run: directories (SAELens layout) or old .pt files, no temporaries
        paths = formats.sae_entries(Path(cfg.run_dir) / "saes") if (Path(cfg.run_dir) / "saes").is_dir() else []
        if not paths:
            raise ValueError(f"{cfg.run_dir}/saes holds no SAE: give the folder of a `python -m minisae lm` run")
    else:
        paths = [src.sae]
    hsae, model, tok = load_with_model(paths[0], src.model, src.layer, src.site, src.weights, src.device,
                                       latents=cfg.latents)
    contexts = load_text(src, tok, hsae.model_name)
    x = hook_activations(model, hsae.hook, contexts, src.bf16)  # (N, T-1, D)
    chat = make_chat(cfg)
    summaries = []
    for p in paths:
        h = HookedSAE.load(p).check_site(hsae.model_name).check_model(model)
        if h.hook != hsae.hook:
            raise ValueError(f"{p} reads {h.hook}, not {hsae.hook} like {paths[0]}: compare SAEs of one hook point")
        print(f"\n{p}: {h.model_name} {h.hook}, {contexts.numel():,} tokens of the {src.split} split", file=sys.stderr)
        result = explain_sae(chat, h, model, tok, contexts, x, cfg, Path(str(p)).stem)
        if len(paths) == 1:
            print_report([{**r, "hist": None} for r in result["latents"]], tok)
            print_scores(result["latents"])
        summaries.append(result["summary"])
        print_table([result["summary"]])
        print(verdict_markdown([result["summary"]]))
    if cfg.run_dir:
        write_comparison(summaries, cfg)
    return summaries


TABLE = [("sae", "SAE", "{}"), ("l0", "L0", "{:.1f}"), ("n_latents", "latents", "{}"),
         ("explanation_detection_balanced_accuracy", "detection", "{:.3f}"),
         ("explanation_detection_auroc", "det. AUROC", "{:.3f}"),
         ("explanation_simulation_correlation", "simulation r", "{:.3f}"),
         ("baseline_detection_balanced_accuracy", "token-set det.", "{:.3f}"),
         ("baseline_simulation_correlation", "token-set r", "{:.3f}"),
         ("control_detection_balanced_accuracy", "control det.", "{:.3f}"),
         ("control_simulation_correlation", "control r", "{:.3f}"),
         ("baseline_rule_detection_balanced_accuracy", "token rule det.", "{:.3f}"),
         ("baseline_rule_simulation_correlation", "token rule r", "{:.3f}"),
         ("explain_s_per_latent", "explain s/latent", "{:.1f}"), ("score_s_per_latent", "score s/latent", "{:.1f}")]


def table_markdown(summaries) -> str:
    lines = ["| " + " | ".join(h for _, h, _ in TABLE) + " |", "|" + "---|" * len(TABLE)]
    lines += ["| " + " | ".join(fmt.format(s[k]) for k, _, fmt in TABLE) + " |" for s in summaries]
    return "\n".join(lines)


def print_table(summaries, file=None):
    print(table_markdown(summaries), file=file or sys.stdout)


def write_comparison(summaries, cfg: ExplainConfig, effects=()):
    """autointerp_results.json and the figures in cfg.figures (default cfg.out): per SAE
    the verdict of every scorer (autointerp_verdict.png) and, where detection or
    simulation ran, their means (autointerp_scores.png); `effects`, the paired effects of
    explainer styles, go into the JSON too. summaries: explain_sae's, or read back from its
    files with `[json.load(open(f))["summary"] for f in files]`."""
    figures = Path(cfg.figures or cfg.out)
    atomic_write_text(figures / "autointerp_results.json",
                      json.dumps({"config": json.loads(json.dumps(dataclasses.asdict(cfg), default=str)),
                                  "rows": summaries, "style_effects": list(effects)}, indent=1))
    model = cfg.api_model or "SmolLM2-135M (local)"
    if {"detection", "simulation"} & set(cfg.methods):
        plots.autointerp_figure(summaries, figures / "autointerp_scores.png", model)
    if all("verdict" in s for s in summaries):  # summaries of older runs have none
        plots.autointerp_verdict_figure(summaries, figures / "autointerp_verdict.png", model)
        print(verdict_markdown(summaries))
    if effects:
        print("\n" + effects_markdown(effects))
    print(f"wrote {figures / 'autointerp_results.json'} and the figures autointerp_*.png in {figures}")


def compare(files, figures) -> list:
    """The comparison (tables, autointerp_results.json, figures) from explain runs' files
    explanations-NAME.json, e.g. of SAEs from different lm runs. A run is named "NAME",
    "NAME style" for another --style, "NAME (no explainer)" for --no-explainer; every run
    with explanations is compared, latent by latent, with the first such run of its SAE
    (verdict.paired_by_latent) by every scorer validated there. Returns the summaries."""
    results = [json.loads(Path(f).read_text()) for f in files]
    base, effects = {}, []
    for r in results:
        c, name = r["config"], r["summary"]["sae"]
        style, explainer = c.get("style", "plain"), c.get("explainer", True)
        r["summary"]["sae"] = name + (f" {style}" if explainer and style != "plain" else "") + \
            ("" if explainer else " (no explainer)")
        if not explainer:
            continue
        if name not in base:
            base[name] = r
            continue
        ok = {m for m, v in base[name]["summary"]["verdict"].items() if v["validated"]}  # blind: no results
        for m in (m for m in c["methods"] if m in ok):
            effects.append({"sae": name, "style": r["summary"]["sae"], "base": base[name]["summary"]["sae"],
                            "method": m, **paired_by_latent(base[name]["latents"], r["latents"], m)})
    methods = tuple(dict.fromkeys(m for r in results for m in r["config"]["methods"]))
    cfg = dataclasses.replace(ExplainConfig(source=None), figures=Path(figures), methods=methods)
    summaries = [r["summary"] for r in results]
    write_comparison(summaries, cfg, effects)
    return summaries
