"""Showing features to a person: one line per example in the terminal, one self-contained
HTML page (no scripts, no external files) with every chosen latent's statistics, logit
lens and max-activating examples, each token shaded by its activation.

The rows come from minisae.interp.features.report: dicts with latent, density, mean_active,
max, hist, lens and examples (tokens, acts, center, value)."""

import html
import sys


def token_text(tokenizer, t: int) -> str:
    return tokenizer.decode([t]).replace("\n", "\\n").replace("\t", "\\t")


def format_example(tokenizer, ex: dict) -> str:
    """One line: the window with the activating token as [[token]], after its value."""
    parts = [token_text(tokenizer, t) for t in ex["tokens"]]
    parts[ex["center"]] = f"[[{parts[ex['center']]}]]"
    return f"{ex['value']:8.3f}  {''.join(parts)}"


def print_report(rows, tokenizer, file=None):
    file = file or sys.stdout
    for r in rows:
        print(f"\n=== latent {r['latent']}: density {r['density']:.2e}, mean when active {r['mean_active']:.3f}, "
              f"max {r['max']:.3f}", file=file)
        for kind in ("promoted", "suppressed"):
            print(f"  logit lens {kind}: " + "  ".join(repr(t) for t, _ in r["lens"][kind]), file=file)
        for ex in r["examples"] or []:
            print("  " + format_example(tokenizer, ex), file=file)
        if not r["examples"]:
            print("  (never fired on these tokens)", file=file)


def _histogram_svg(hist) -> str:
    if not hist or hist["width"] is None:
        return "<p>no activations</p>"
    counts, w = hist["counts"], hist["width"]
    top = max(counts)
    bars = "".join(f'<rect x="{6 * j}" y="{40 - 40 * c / top:.1f}" width="5" height="{40 * c / top:.1f}"/>'
                   for j, c in enumerate(counts) if c)
    return (f'<svg width="{6 * len(counts)}" height="40" fill="#d2691e"><title>activation histogram, bins of '
            f'{w:g} from 0 to {w * len(counts):g}</title>{bars}</svg> <small>0 .. {w * len(counts):g}</small>')


def html_token_text(tokenizer, t: int) -> str:
    """A token for the page: a newline shows as a visible return sign and then breaks the
    line (the example reads like the text it came from), a tab as an arrow and a tab."""
    return tokenizer.decode([t]).replace("\n", "\u21b5\n").replace("\t", "\u2192\t")


KEY = ("<p class=\"key\">How to read an example: each token's background is orange with opacity "
       "activation / the latent's max on this page "
       "<span style=\"background:rgba(255,140,0,0.15)\">&nbsp;low&nbsp;</span>"
       "<span style=\"background:rgba(255,140,0,0.5)\">&nbsp;half&nbsp;</span>"
       "<span style=\"background:rgba(255,140,0,1)\">&nbsp;max&nbsp;</span>; "
       "the outlined token is the one the example was picked for (its value in bold in front); "
       "hover a token to see its activation. \u21b5 marks a newline of the text, \u2192 a tab. "
       "Density: the fraction of tokens where the latent fires; the histogram shows its activations "
       "where it fires; the logit lens lists the tokens its decoder direction promotes and suppresses "
       "(a hint only in middle layers, docs/06_features.md).</p>")


def render_html(title: str, rows, tokenizer, meta: dict = None) -> str:
    """One self-contained page (no scripts, no external files): the run's metadata, an
    index of the latents (links within the page), a key to the colours, then each latent:
    each token's background is orange with opacity f / max_f of its latent; hovering
    shows the value."""
    e = html.escape
    out = [f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{e(title)}</title><style>"
           "body{font-family:sans-serif;max-width:70em;margin:auto}"
           ".ex{font-family:monospace;white-space:pre-wrap;margin:2px 0;border-left:3px solid #eee;padding-left:4px}"
           ".center{outline:1px solid #000}td{padding:0 1em 0 0}.key{font-size:90%;color:#333}</style></head><body>",
           f"<h1 id=\"top\">{e(title)}</h1>"]
    if meta:
        cells = "".join(f"<tr><td>{e(str(k))}</td><td>{e(str(v))}</td></tr>" for k, v in meta.items())
        out.append(f"<table class=\"meta\">{cells}</table>")
    out.append(KEY)
    index = "".join(f'<tr><td><a href="#latent-{r["latent"]}">latent {r["latent"]}</a></td>'
                    f'<td>density {r["density"]:.2e}</td><td>max {r["max"]:.3g}</td>'
                    f'<td>{e(" ".join(repr(t) for t, _ in r["lens"]["promoted"][:3]))}</td></tr>' for r in rows)
    head = "<tr><th>latent</th><th>firing frequency</th><th>max activation</th><th>logit lens, top promoted</th></tr>"
    out.append(f"<h2>Index</h2><table>{head}{index}</table>")
    for r in rows:
        peak = max(r["max"], 1e-12)
        out.append(f'<section id="latent-{r["latent"]}"><h2>latent {r["latent"]}</h2><table><tr>'
                   f'<td>density {r["density"]:.3e}</td><td>mean when active {r["mean_active"]:.4g}</td>'
                   f'<td>max {r["max"]:.4g}</td><td>{_histogram_svg(r["hist"])}</td></tr></table>')
        for kind in ("promoted", "suppressed"):
            toks = " ".join(f"<code>{e(repr(t))}</code> ({v:+.3f})" for t, v in r["lens"][kind])
            out.append(f"<p>logit lens, {kind}: {toks}</p>")
        for ex in r["examples"]:
            spans = []
            for j, (t, a) in enumerate(zip(ex["tokens"], ex["acts"])):
                cls = ' class="center"' if j == ex["center"] else ""
                spans.append(f'<span{cls} style="background:rgba(255,140,0,{max(a, 0) / peak:.2f})" '
                             f'title="{a:.3f}">{e(html_token_text(tokenizer, t))}</span>')
            out.append(f'<div class="ex"><b>{ex["value"]:.3f}</b> {"".join(spans)}</div>')
        if not r["examples"]:
            out.append("<p>(never fired on these tokens)</p>")
        out.append('<p><a href="#top">back to the index</a></p></section>')
    out.append("</body></html>\n")
    return "\n".join(out)
