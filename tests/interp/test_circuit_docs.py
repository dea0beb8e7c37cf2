"""Chapter 11 quotes its circuit numbers from the file its documented command writes
(`python -m minisae circuit ... --out figures` writes figures/circuit_results.json): the
three tables, rebuilt here from that file with the chapter's rounding, must appear in the
chapter verbatim. After a re-run of the command, this test prints the tables to paste."""

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHAPTER = ROOT / "docs" / "11_circuits.md"
RESULTS = ROOT / "figures" / "circuit_results.json"


def graph_table(r: dict) -> str:
    p = r["prompts"][0]
    layers = ", ".join(h.split(".")[1] for h in r["hooks"])
    cfg = r["config"]
    share = p["influence_share"]
    rows = [("prompt", f"{p['prompt']!r} ({len(p['tokens'])} tokens with BOS)"),
            ("target", f"{p['target_token']!r} (probability {p['target_prob']:.2f})"),
            ("SAE layers (resid_post)", layers),
            ("nodes / latents / edges", f"{p['nodes_before']:,} / {p['latents_before']:,} / {p['edges_before']:,}"),
            (f"after pruning (node {cfg['node_threshold']}, edge {cfg['edge_threshold']})",
             f"{p['nodes_after']:,} / {p['latents_after']:,} / {p['edges_after']:,}"),
            ("influence held by the kept nodes", f"{p['influence_kept_final']:.0%}"),
            ("influence by kind: latents / errors / embeddings",
             f"{share['latent']:.0%} / {share['error']:.0%} / {share['embedding']:.0%}"),
            ("graph + pruning, wall / CPU", f"{p['seconds_wall']:.1f} s / {p['seconds_cpu']:.1f} s")]
    rows += [(f"kept at node {s['node_threshold']}, edge {s['edge_threshold']}",
              f"{s['nodes']:,} / {s['latents']:,} / {s['edges']:,}") for s in p["threshold_sweep"]]
    return "\n".join(["| the graph | |", "|---|---|", *(f"| {a} | {b} |" for a, b in rows)]) + "\n"


def intervention_table(r: dict) -> str:
    names = {"graph_vs_replacement": "graph's total attribution vs ablation in the replacement model",
             "graph_vs_real": "graph's total attribution vs ablation in the real model",
             "real_gradient_vs_real": "real model's gradient x activation vs ablation in the real model"}
    lines = ["| prediction vs measurement | Pearson | Spearman | ablations |", "|---|---|---|---|"]
    for key, name in names.items():
        c = r["correlations"][key]
        lines.append(f"| {name} | {c['pearson']:.3f} | {c['spearman']:.3f} | {c['n']} |")
    return "\n".join(lines) + "\n"


def layer_table(r: dict) -> str:
    lines = ["| layer of the ablated latent | Pearson | Spearman | ablations |", "|---|---|---|---|"]
    for hook, c in r["correlations_by_layer"].items():
        lines.append(f"| {hook.split('.')[1]} | {c['pearson']:.2f} | {c['spearman']:.2f} | {c['n']} |")
    return "\n".join(lines) + "\n"


@pytest.mark.skipif(not RESULTS.exists(), reason="figures/circuit_results.json has not been written")
def test_chapter_tables_match_the_results():
    r = json.loads(RESULTS.read_text())
    text = CHAPTER.read_text()
    for table in (graph_table(r), intervention_table(r), layer_table(r)):
        assert table in text, "docs/11_circuits.md is stale; paste:\n" + table
