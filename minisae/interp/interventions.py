"""Checking a circuit by intervention, and `python -m minisae circuit`.

The graph (minisae.interp.circuit) predicts, to first order, what ablating a latent node u
(its code set to 0 at its position) does to the target logit:

    graph prediction      -total(u)        along the graph: the replacement model, each SAE
                                           spliced in with its error frozen at the clean value
    measured (replacement)  logit(alpha_u = 0) - logit   in that replacement model, every later
                                           latent re-encoded from what reaches its hook
    measured (real model)   the same with only u's term f_u d_u removed from the real model's
                                           activation; its first-order prediction is
                                           -v_u . d logit/dx (graph.real_total), nothing frozen

We ablate the strongest latents of each pruned graph, spread over its layers (the
strongest of each layer first), and report Pearson and Spearman correlations between
prediction and measurement, overall and per layer. An ablation is not small: the
later TopK SAEs switch latents on and off (docs/11_circuits.md 11.2), attention and the
norms bend, so the linear prediction errs most on the largest nodes.
"""

import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from minisae import plots
from minisae.interp import circuit as Ci
from minisae.interp import circuit_page
from minisae.interp.features import TopExamples
from minisae.interp.lens import lens_tokens
from minisae.models import load_model
from minisae.pipeline.activations import hooks_acts
from minisae.pipeline.data import load_contexts
from minisae.pipeline.hooked_sae import HookedSAE
from minisae.pipeline.layers import parse_layers
from minisae.utils import Progress, atomic_write_text


@torch.no_grad()
def ablate(model, hsaes, graph, idx, u):
    """(change in the replacement model, change in the real model) of the target logit
    when latent node u is set to 0 at its position."""
    v, k, t = int(graph.index[graph.target]), int(graph.layer[u]), int(graph.pos[u])
    hs = hsaes[k - 1]
    clean = model(idx)[0, -1, v].item()
    rep = Ci.replacement_logits(model, hsaes, graph, idx, {u: 0.0})[0, -1, v].item()
    term = graph.value[u].item() * hs.sae.W_dec[int(graph.index[u])].detach() / hs.scale  # (D,)

    def remove(act):
        out = act.clone()
        out[0, t] -= term.to(act.dtype)
        return out
    real = model(idx, hooks={hs.hook: remove})[0, -1, v].item()
    return rep - clean, real - clean


def strongest_by_layer(graph, kept, total, n: int) -> list:
    """n latent nodes of the pruned graph, spread over the SAE layers: the strongest (by
    |total|) of each layer, then the second strongest of each, ... The strongest nodes of
    the whole graph sit at the last layer, two blocks from the logits, where the graph is
    nearly linear: an honest check must also ablate the early ones."""
    by_layer = {}
    for u in sorted(kept, key=lambda u: -abs(total[u].item())):
        by_layer.setdefault(int(graph.layer[u]), []).append(u)
    order = [us[r] for r in range(max(map(len, by_layer.values()), default=0))
             for _, us in sorted(by_layer.items()) if r < len(us)]
    return order[:n]


def correlations(pred, meas) -> dict:
    """Pearson and Spearman (Pearson of the ranks; ties are rare in floats) of two lists."""
    p, m = torch.tensor(pred, dtype=torch.float64), torch.tensor(meas, dtype=torch.float64)
    pearson = lambda a, b: torch.corrcoef(torch.stack([a, b]))[0, 1].item()
    rank = lambda a: a.argsort().argsort().double()
    return {"pearson": pearson(p, m), "spearman": pearson(rank(p), rank(m)), "n": len(pred)}


def load_saes(paths, layers=None, model_name=None):
    """The hooked SAEs of `paths` (SAE folders, or run folders with saes/), only those at
    `layers` (a list) if given; all of one model, at distinct hooks."""
    found = []
    for p in map(Path, paths):
        found += sorted(q for q in (p / "saes").iterdir() if q.is_dir()) if (p / "saes").is_dir() else [p]
    hsaes = [HookedSAE.load(str(q)).check_site(model_name) for q in found]
    layer_of = lambda h: int(h.hook.split(".")[1])
    if layers is not None:
        hsaes = [h for h in hsaes if layer_of(h) in layers]
    names = {h.model_name for h in hsaes}
    if not hsaes or len(names) != 1 or len({h.hook for h in hsaes}) != len(hsaes):
        raise ValueError(f"need SAEs of one model at distinct hooks; found {[(h.model_name, h.hook) for h in hsaes]}")
    return hsaes


@torch.no_grad()
def latent_info(model, tok, hsaes, graph, nodes, scan_tokens, k, model_name):
    """{node: {lens, examples}} of the latent nodes: one scan of held-out text, reading every
    SAE's hook in one forward pass per batch (features.TopExamples), and the logit lens."""
    if not nodes:  # pruning kept no latent: nothing to scan
        return {}
    by_layer = {}
    for u in nodes:
        by_layer.setdefault(int(graph.layer[u]), set()).add(int(graph.index[u]))
    contexts = load_contexts(tok, name=model_name, split="heldout", max_tokens=scan_tokens, verbose=False)
    tops = {L: TopExamples(sorted(lat), k) for L, lat in by_layer.items()}
    hooks = [hsaes[L - 1].hook for L in tops]
    bar = Progress("scanning", len(contexts), "contexts")
    for s in range(0, len(contexts), 8):
        idx = contexts[s:s + 8]  # (B, T)
        acts = hooks_acts(model, idx, hooks)  # {hook: (B, T-1, D)}
        for L, top in tops.items():
            f, _ = hsaes[L - 1].encode_positions(acts[hsaes[L - 1].hook], bos=False)  # (B, T-1, F)
            top.add(idx, f[..., top.latents], torch.arange(s, s + len(idx)))
        bar.update(s + len(idx))
    bar.close(len(contexts))
    return {u: {"examples": tops[int(graph.layer[u])].result(int(graph.index[u])),
                "lens": lens_tokens(model, tok, hsaes[int(graph.layer[u]) - 1].sae.W_dec[int(graph.index[u])].detach(), 6)}
            for u in nodes}


SWEEP = [(0.8, 0.98), (0.7, 0.9), (0.6, 0.8), (0.5, 0.8)]  # (node, edge) thresholds reported for the first prompt


def prompt_ids(tok, text):
    if tok.bos_id is None:
        raise ValueError("this model's tokenizer has no BOS token; the SAEs read contexts that start with one")
    return torch.tensor([[tok.bos_id, *tok.encode(text)]])  # (1, T)


def run(cfg):
    """`python -m minisae circuit` (cfg: minisae.configs.CircuitConfig)."""
    layers = None if cfg.layers is None else parse_layers(cfg.layers, 10_000)
    hsaes = load_saes(cfg.sae, layers, cfg.model)
    model, tok = load_model(hsaes[0].model_name, weights=cfg.weights)
    model.eval()
    for h in hsaes:
        h.check_model(model)
    hsaes.sort(key=lambda h: model.hook_names().index(h.hook))  # forward order
    target = None
    if cfg.target_token is not None:
        ids = tok.encode(cfg.target_token)
        if len(ids) != 1:
            raise ValueError(f"--target-token {cfg.target_token!r} is {len(ids)} tokens; give one token "
                             "(with its leading space, e.g. ' Paris')")
        target = ids[0]
    out = Path(cfg.out)
    results = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
               "model": hsaes[0].model_name, "hooks": [h.hook for h in hsaes], "prompts": [], "interventions": []}
    for n, text in enumerate([cfg.prompt, *cfg.check_prompts]):
        idx = prompt_ids(tok, text)
        wall, cpu = time.perf_counter(), time.process_time()
        graph = Ci.build_graph(model, hsaes, idx, target if n == 0 else None, cfg.logits)
        pruned = Ci.prune(graph, cfg.node_threshold, cfg.edge_threshold)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        free = torch.tensor([k not in ("embedding", "logit") for k in graph.kind])
        inf = pruned.node_influence
        kept_lat = [u for u in pruned.nodes.nonzero()[:, 0].tolist() if graph.kind[u] == "latent"]
        row = {"prompt": text, "tokens": [tok.decode([t]) for t in graph.tokens],
               "target_token": tok.decode([int(graph.index[graph.target])]),
               "target_prob": graph.probs[graph.target].item(), "seconds_wall": wall, "seconds_cpu": cpu,
               "nodes_before": len(graph.kind), "edges_before": int((graph.adjacency != 0).sum()),
               "latents_before": sum(k == "latent" for k in graph.kind),
               "nodes_after": int(pruned.nodes.sum()), "edges_after": int(pruned.edges.sum()),
               "latents_after": len(kept_lat),
               "influence_kept_node_step": (inf[free & pruned.node_step].sum() / inf[free].sum()).item(),
               "influence_kept_final": (inf[free & pruned.nodes].sum() / inf[free].sum()).item(),
               "influence_share": {k: (inf[torch.tensor([x == k for x in graph.kind])].sum() / inf.sum()).item()
                                   for k in ("latent", "error", "embedding")}}
        results["prompts"].append(row)
        print(f"{text!r} -> {row['target_token']!r}: {row['nodes_before']} nodes, {row['edges_before']} edges; "
              f"pruned {row['nodes_after']} nodes ({len(kept_lat)} latents), {row['edges_after']} edges; "
              f"{wall:.1f} s wall, {cpu:.1f} s CPU")
        if n == 0:  # what other thresholds would keep (circuit-tracer's defaults are 0.8 and 0.98)
            row["threshold_sweep"] = []
            for nt, et in SWEEP:
                q = Ci.prune(graph, nt, et)
                row["threshold_sweep"].append({
                    "node_threshold": nt, "edge_threshold": et, "nodes": int(q.nodes.sum()), "edges": int(q.edges.sum()),
                    "latents": sum(graph.kind[u] == "latent" for u in q.nodes.nonzero()[:, 0].tolist())})
            atomic_write_text(out / f"circuit-{cfg.name}.json", json.dumps(Ci.to_json(graph, pruned)) + "\n")
            info = latent_info(model, tok, hsaes, graph, kept_lat, cfg.scan_tokens, cfg.examples, hsaes[0].model_name)
            meta = {"prompt": text, "target": row["target_token"], "SAEs": ", ".join(results["hooks"]),
                    "nodes / edges before pruning": f"{row['nodes_before']} / {row['edges_before']}",
                    "after": f"{row['nodes_after']} / {row['edges_after']}",
                    "thresholds (node, edge)": f"{cfg.node_threshold}, {cfg.edge_threshold}",
                    "command": "python -m minisae circuit"}
            page = out / f"circuit-{cfg.name}.html"
            atomic_write_text(page, circuit_page.render(graph, pruned, tok, info, f"circuit: {text!r}", meta))
            print(f"wrote {page}")
        total = graph.total()
        for u in strongest_by_layer(graph, kept_lat, total, cfg.interventions):
            rep, real = ablate(model, hsaes, graph, idx, u)
            results["interventions"].append({
                "prompt": n, "hook": graph.hooks[int(graph.layer[u]) - 1], "pos": int(graph.pos[u]),
                "latent": int(graph.index[u]), "code": graph.value[u].item(),
                "predicted_graph": -total[u].item(), "predicted_real_gradient": -graph.real_total[u].item(),
                "measured_replacement": rep, "measured_real": real})
    pairs = results["interventions"]
    if pairs:
        get = lambda key: [p[key] for p in pairs]
        results["correlations"] = {
            "graph_vs_replacement": correlations(get("predicted_graph"), get("measured_replacement")),
            "graph_vs_real": correlations(get("predicted_graph"), get("measured_real")),
            "real_gradient_vs_real": correlations(get("predicted_real_gradient"), get("measured_real"))}
        results["correlations_by_layer"] = {
            h: correlations([p["predicted_graph"] for p in pairs if p["hook"] == h],
                            [p["measured_replacement"] for p in pairs if p["hook"] == h])
            for h in results["hooks"] if sum(p["hook"] == h for p in pairs) >= 3}
        for key, c in results["correlations"].items():
            print(f"{key}: Pearson {c['pearson']:.3f}, Spearman {c['spearman']:.3f} over {c['n']} ablations")
        plots.circuit_interventions_figure(pairs, results["correlations"], out / "circuit_interventions.png")
    atomic_write_text(out / "circuit_results.json", json.dumps(results, indent=1) + "\n")
    print(f"wrote {out / 'circuit_results.json'}")
    return results
