"""The circuit as one self-contained HTML page: an inline SVG of the pruned graph (no
scripts, no external files), then a section per latent node with its logit lens and
max-activating examples (minisae.interp.features, lens).

Layout: one row per layer (the embeddings at the bottom, each SAE's hook above the one
before, the logits at the top), one column per position of the prompt; the nodes of a
cell sit side by side, the largest total attribution to the target in the middle. An edge's
width grows with |A[y, u]| (its largest in the graph is 4 px), its colour is its sign
(blue: u raises y; red: u lowers y). A latent node links to its section below."""

import html

from minisae.interp.feature_page import html_token_text

POS, NEG = "#1f6fb4", "#d62728"  # edge colours: positive, negative
COL_W, ROW_H, LEFT, TOP = 110, 90, 170, 100  # px


def _xy(graph, pruned):
    """{node: (x, y)} for the kept nodes."""
    kept = pruned.nodes.nonzero()[:, 0].tolist()
    total = graph.total()
    n_rows = int(graph.layer.max()) + 1
    cells = {}
    for u in kept:
        cells.setdefault((int(graph.layer[u]), int(graph.pos[u])), []).append(u)
    xy = {}
    for (k, t), us in cells.items():
        us.sort(key=lambda u: -abs(total[u].item()))
        order = sorted(range(len(us)), key=lambda j: (j % 2, j if j % 2 == 0 else -j))  # largest in the middle
        step = min(14.0, (COL_W - 14) / max(len(us), 1))
        for slot, j in enumerate(order):
            x = LEFT + COL_W * (t + 0.5) + (slot - (len(us) - 1) / 2) * step
            xy[us[j]] = (x, TOP + ROW_H * (n_rows - 1 - k))
    return xy


def node_label(graph, tokenizer, u) -> str:
    kind, k, t, i = graph.kind[u], int(graph.layer[u]), int(graph.pos[u]), int(graph.index[u])
    tok = repr(tokenizer.decode([graph.tokens[t]]))
    if kind == "embedding":
        return f"embedding of {tok} (position {t})"
    if kind == "logit":
        return f"logit of {tokenizer.decode([i])!r}"
    where = f"{graph.hooks[k - 1]}, position {t} ({tok})"
    return f"latent {i} at {where}" if kind == "latent" else f"error node at {where}"


def svg(graph, pruned, tokenizer) -> str:
    e = html.escape
    xy = _xy(graph, pruned)
    total = graph.total()
    T, n_rows = len(graph.tokens), int(graph.layer.max()) + 1
    width, height = LEFT + COL_W * T + 20, TOP + ROW_H * (n_rows - 1) + 60
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-size="11" '
           f'font-family="sans-serif">']
    rows = ["embeddings", *graph.hooks, "logits"]
    for k, name in enumerate(rows):
        y = TOP + ROW_H * (n_rows - 1 - k)
        out.append(f'<text x="4" y="{y + 4}">{e(name)}</text>'
                   f'<line x1="{LEFT}" y1="{y}" x2="{width - 20}" y2="{y}" stroke="#eee"/>')
    for t, tok in enumerate(graph.tokens):
        out.append(f'<text x="{LEFT + COL_W * (t + 0.5)}" y="{height - 20}" text-anchor="middle">'
                   f'{e(repr(tokenizer.decode([tok]))[:14])}</text>')
    A = graph.adjacency
    kept = pruned.edges.nonzero().tolist()
    top = max((abs(A[y, u].item()) for y, u in kept), default=1.0) or 1.0
    for y, u in sorted(kept, key=lambda p: abs(A[p[0], p[1]].item())):  # the strongest drawn last, on top
        a = A[y, u].item()
        (x1, y1), (x2, y2) = xy[u], xy[y]
        out.append(f'<line class="edge" x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" '
                   f'stroke="{POS if a > 0 else NEG}" stroke-opacity="0.6" stroke-width="{0.3 + 3.7 * abs(a) / top:.2f}">'
                   f'<title>{e(node_label(graph, tokenizer, u))} -&gt; {e(node_label(graph, tokenizer, y))}: '
                   f'{a:+.4g}</title></line>')
    logit_rank = {u: r for r, u in enumerate(sorted((u for u in xy if graph.kind[u] == "logit"), key=lambda u: xy[u][0]))}
    for u, (x, y) in xy.items():
        kind, tip = graph.kind[u], e(f"{node_label(graph, tokenizer, u)}; value {graph.value[u].item():.4g}; "
                                      f"total attribution to the target {total[u].item():+.4g}")
        if kind == "latent":
            out.append(f'<a href="#n{u}"><circle cx="{x:.1f}" cy="{y:.1f}" r="5" fill="#f0a830" stroke="#000">'
                       f'<title>{tip}</title></circle></a>')
        elif kind == "error":
            out.append(f'<rect x="{x - 4:.1f}" y="{y - 4:.1f}" width="8" height="8" fill="#bbb" stroke="#555">'
                       f'<title>{tip}</title></rect>')
        else:
            fill = "#9c6" if u == graph.target else "#cde" if kind == "logit" else "#eee"
            label = repr(tokenizer.decode([int(graph.index[u])]))[:12] if kind == "logit" else ""
            out.append(f'<rect x="{x - 6:.1f}" y="{y - 6:.1f}" width="12" height="12" fill="{fill}" stroke="#333">'
                       f'<title>{tip}</title></rect>')
            if label:
                p = graph.probs[u].item()
                out.append(f'<text x="{x:.1f}" y="{y - 10 - 13 * logit_rank[u]:.1f}" text-anchor="middle">'
                           f'{e(label)} {p:.2f}</text>')  # stacked: the logits share one cell
    out.append("</svg>")
    return "\n".join(out)


KEY = ("<p class=\"key\">Rows: the embeddings (bottom), each SAE's hook, the logits at the last position (top, "
       "with their probabilities; green: the target). Columns: the prompt's positions. Orange circle: an SAE "
       "latent (a link to its section below); grey square: an error node, what the SAE does not reconstruct "
       "at that layer and position (at BOS and sinks, the whole activation); light square: an embedding. An edge "
       "is gradient x activation through the blocks between two rows: width by strength, "
       f"<span style=\"color:{POS}\">blue</span> raises, <span style=\"color:{NEG}\">red</span> lowers. Hover "
       "for values. Total attribution: the node's first-order effect on the target logit along the graph "
       "(SAEs spliced in, errors frozen).</p>")


def _section(graph, tokenizer, u, info, total) -> str:
    e = html.escape
    out = [f'<section id="n{u}"><h3>{e(node_label(graph, tokenizer, u))}</h3>'
           f'<p>code {graph.value[u].item():.4g}; total attribution to the target {total[u].item():+.4g}</p>']
    for kind in ("promoted", "suppressed"):
        toks = " ".join(f"<code>{e(repr(t))}</code> ({v:+.3f})" for t, v in info["lens"][kind])
        out.append(f"<p>logit lens, {kind}: {toks}</p>")
    for ex in info["examples"]:
        peak = max(max(ex["acts"]), 1e-12)
        spans = "".join(f'<span{" class=center" if j == ex["center"] else ""} '
                        f'style="background:rgba(255,140,0,{max(a, 0) / peak:.2f})" title="{a:.3f}">'
                        f'{e(html_token_text(tokenizer, t))}</span>'
                        for j, (t, a) in enumerate(zip(ex["tokens"], ex["acts"])))
        out.append(f'<div class="ex"><b>{ex["value"]:.3f}</b> {spans}</div>')
    if not info["examples"]:
        out.append("<p>(never fired on the scanned text)</p>")
    out.append('<p><a href="#top">back to the graph</a></p></section>')
    return "\n".join(out)


def render(graph, pruned, tokenizer, info: dict, title: str, meta: dict = None) -> str:
    """The page: metadata, the key, the SVG, then each kept latent (info[u]: lens, examples)."""
    e = html.escape
    total = graph.total()
    out = [f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{e(title)}</title><style>"
           "body{font-family:sans-serif;margin:1em}"
           ".ex{font-family:monospace;white-space:pre-wrap;margin:2px 0;border-left:3px solid #eee;padding-left:4px}"
           ".center{outline:1px solid #000}td{padding:0 1em 0 0}.key{font-size:90%;color:#333;max-width:70em}"
           "</style></head><body>", f"<h1 id=\"top\">{e(title)}</h1>"]
    if meta:
        out.append("<table>" + "".join(f"<tr><td>{e(str(k))}</td><td>{e(str(v))}</td></tr>"
                                       for k, v in meta.items()) + "</table>")
    out += [KEY, svg(graph, pruned, tokenizer), "<h2>Latent nodes, by total attribution to the target</h2>"]
    for u in sorted(info, key=lambda u: -abs(total[u].item())):
        out.append(_section(graph, tokenizer, u, info[u], total))
    out.append("</body></html>\n")
    return "\n".join(out)
