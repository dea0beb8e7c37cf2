"""Every scorer on every latent, the scorer validated first, then a verdict with error bars.

Per latent four explanations are scored on the same held-out windows, the known answers first:

    baseline           the latent's own token set, read by rule from its explainer windows
                       ('the tokens "x", "y"'): true by construction, as far as tokens go
    baseline_control   another latent's token set (the same seeded derangement)
    explanation        the explainer's sentence
    control            another latent's sentence

and, with no explanation, the intruder test (minisae.autointerp.intruder). One number per
latent and scorer (SCORE_KEY), then per scorer (minisae.autointerp.stats):

    validation   paired test  baseline vs baseline_control   p < ALPHA: the scorer can see
                                                              a true explanation; else blind
    result       paired test  explanation vs control          shown only for a validated scorer
    intruder     paired test  p_correct vs 1/k                 (no explanation to validate)
"""

from minisae.autointerp.intruder import intruder_score
from minisae.autointerp.scoring import detection_score, overlap_score, simulation_score
from minisae.autointerp.stats import ALPHA, paired, separates
from minisae.autointerp.surprisal import NEUTRAL, mean_logprobs, surprisal_score
SCORE_KEY = {"detection": "auroc", "simulation": "correlation", "surprisal": "gap", "overlap": "gap",
             "intruder": "p_correct"}
KINDS = ("baseline", "baseline_control", "explanation", "control")  # the known answers first


def score_latent(chat, explanations: dict, held: dict, methods, seed: int = 0) -> dict:
    """{kind: {method: result}} for every kind in explanations, plus {"intruder": result}.
    held: minisae.autointerp.examples.held_out_for_scoring's windows of one latent."""
    texts, labels = held["texts"], held["labels"]
    neutral = mean_logprobs(chat, NEUTRAL, texts) if "surprisal" in methods else None  # shared by all kinds
    out = {}
    for kind, text in explanations.items():
        s = {}
        if "detection" in methods:
            s["detection"] = detection_score(chat, text, texts, labels)
        if "simulation" in methods:
            s["simulation"] = simulation_score(chat, text, held["tokens"], held["acts"])
        if "surprisal" in methods:
            s["surprisal"] = surprisal_score(chat, text, texts, labels, neutral)
        if "overlap" in methods:
            s["overlap"] = overlap_score(text, texts, labels)
        out[kind] = s
    if "intruder" in methods:
        firing = [t for t, y in zip(texts, labels) if y]
        silent = [t for t, y in zip(texts, labels) if not y]
        out["intruder"] = intruder_score(chat, firing[:3], silent[0], seed)
    return out


def per_latent(rows, kind: str, method: str) -> list:
    """One number per latent: rows[j]["scores"][kind][method][SCORE_KEY[method]] (None if absent)."""
    key = SCORE_KEY[method]
    return [r["scores"].get(kind, {}).get(method, {}).get(key) for r in rows]


def verdict(rows, methods, seed: int = 0) -> dict:
    """{method: {"validation", "validated", "result", "token_set"}} over the scored latents."""
    out = {}
    for m in methods:
        if m == "intruder":
            p = [r["scores"]["intruder"]["p_correct"] for r in rows]
            chance = [r["scores"]["intruder"]["chance"] for r in rows]
            out[m] = {"validation": None, "validated": None, "result": paired(p, chance, seed)}
            continue
        val = paired(per_latent(rows, "baseline", m), per_latent(rows, "baseline_control", m), seed)
        out[m] = {"validation": val, "validated": separates(val),
                  "result": paired(per_latent(rows, "explanation", m), per_latent(rows, "control", m), seed)}
    return out


def paired_by_latent(rows_a, rows_b, method: str, kind: str = "explanation", seed: int = 0) -> dict:
    """paired() of run b's scores against run a's on the latents both scored: the effect of
    a change (an explainer style) latent by latent, each latent its own control."""
    a = {r["latent"]: r for r in rows_a}
    common = [r for r in rows_b if r["latent"] in a]
    return paired(per_latent(common, kind, method), per_latent([a[r["latent"]] for r in common], kind, method), seed)


def _ci(t) -> str:
    m, lo, hi = t
    return f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def verdict_markdown(summaries) -> str:
    """The chapter's table: per SAE and scorer, its validation (token set vs shuffled token
    set), then the explainer's result (explanation vs shuffled explanation), or 'blind'."""
    lines = ["| SAE | L0 | scorer (per latent) | latents | token set [95% CI] | shuffled token set | "
             "validation: difference, p | explanation [95% CI] | shuffled explanation | difference, p |",
             "|" + "---|" * 10]
    for s in summaries:
        for m, v in s["verdict"].items():
            res, val = v["result"], v["validation"]
            if val is None:  # the intruder: no explanation, its control is chance
                check = ["", "", "no explanation; vs chance"]
            else:
                check = [_ci(val["score"]), _ci(val["control"]), f"{val['diff'][0]:+.3f}, p={val['p_sign_flip']:.4f} "
                         + ("valid" if v["validated"] else "**blind**")]
            shown = v["validated"] is not False and res["n"] > 0  # a blind scorer's numbers are not results
            cells = [_ci(res["score"]), _ci(res["control"]), f"{res['diff'][0]:+.3f}, p={res['p_sign_flip']:.4f}"] \
                if shown else ["(blind)" if v["validated"] is False else "(no explainer)"] * 3
            n = val["n"] if val else res["n"]
            lines.append(f"| {s['sae']} | {s['l0']:.1f} | {m} ({SCORE_KEY[m]}) | {n} | "
                         + " | ".join(check + cells) + " |")
    return "\n".join(lines) + f"\n\n(sign-flip test over latents, two-sided; valid: p < {ALPHA} and positive)"


def effects_markdown(effects) -> str:
    """The effect of an explainer style: its explanations' score minus the base run's, same latents."""
    lines = ["| run | vs | scorer | run [95% CI] | vs [95% CI] | run - vs, p | latents |", "|" + "---|" * 7]
    lines += [f"| {e['style']} | {e['base']} | {e['method']} ({SCORE_KEY[e['method']]}) | {_ci(e['score'])} | "
              f"{_ci(e['control'])} | {e['diff'][0]:+.3f}, p={e['p_sign_flip']:.4f} | {e['n']} |" for e in effects]
    return "\n".join(lines)
