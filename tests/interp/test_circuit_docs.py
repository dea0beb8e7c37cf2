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



# 11.5's comparison of SAE variants: the same `layers` command with ReLU SAEs, then the
# same `circuit` command with --layers 6-24:6 on both runs' SAEs; the two circuit results
# and both runs' layers_results.json copied into docs/outputs/circuit_relu/.
RELU = ROOT / "docs" / "outputs" / "circuit_relu"


def span(values, fmt: str) -> str:
    lo, hi = format(min(values), fmt), format(max(values), fmt)
    return lo if lo == hi else f"{lo}-{hi}"


def variant_table(runs) -> str:
    """runs: [(layers_results, circuit_results)], one per SAE variant; L0 and FVU over the graph's layers."""
    lines = ["| SAEs | L0 | FVU | graph vs replacement: Pearson / Spearman | graph vs real: Pearson / Spearman "
             "| ablations |", "|---|---|---|---|---|---|"]
    for layers, circuit in runs:
        rows = [r for r in layers["rows"] if r["hook"] in circuit["hooks"]]
        c = circuit["correlations"]
        rep, real = c["graph_vs_replacement"], c["graph_vs_real"]
        lines.append(f"| {layers['variant']} {layers['knob']}={layers['value']:g} "
                     f"| {span([r['l0'] for r in rows], '.1f')} | {span([r['fvu'] for r in rows], '.2f')} "
                     f"| {rep['pearson']:.3f} / {rep['spearman']:.3f} | {real['pearson']:.3f} / {real['spearman']:.3f} "
                     f"| {rep['n']} |")
    return "\n".join(lines) + "\n"


def test_variant_comparison_matches_the_results():
    load = lambda name: json.loads((RELU / name).read_text())
    topk, relu = load("topk_circuit_results.json"), load("circuit_results.json")
    # the same check on both: prompts, SAE layers, number of ablations
    assert [p["prompt"] for p in relu["prompts"]] == [p["prompt"] for p in topk["prompts"]]
    assert relu["hooks"] == topk["hooks"] and relu["config"]["interventions"] == topk["config"]["interventions"]
    table = variant_table([(load("topk_layers_results.json"), topk), (load("layers_results.json"), relu)])
    text = CHAPTER.read_text()
    assert table in text, "docs/11_circuits.md is stale; paste:\n" + table
    for r in (topk, relu):
        assert layer_table(r) in text, "docs/11_circuits.md is stale; paste:\n" + layer_table(r)


def test_variant_comparison_prose_matches_the_results():
    """The paragraph after the tables: ablations below the last SAE layer, the layer-24 share,
    the IOI prompt's empty pruned graph, the FVU ratio; correlations by scipy, not minisae."""
    from scipy.stats import pearsonr, spearmanr

    load = lambda name: json.loads((RELU / name).read_text())
    text = " ".join(CHAPTER.read_text().split())
    relu, topk = load("circuit_results.json"), load("topk_circuit_results.json")
    below = {}
    for name, r in (("relu", relu), ("topk", topk)):
        iv = [i for i in r["interventions"] if i["hook"] != r["hooks"][-1]]
        g, m = [i["predicted_graph"] for i in iv], [i["measured_replacement"] for i in iv]
        below[name] = (f"{pearsonr(g, m)[0]:.3f}", f"{spearmanr(g, m)[0]:.3f}", len(iv),
                       f"{max(abs(x) for x in m):.2f}")
    (rp, rs, rn, rmax), (tp, ts, tn, tmax) = below["relu"], below["topk"]
    assert (f"gives Pearson {rp} / Spearman {rs} over {rn} ablations for ReLU and {tp} / {ts} over {tn} "
            f"for TopK") in text
    assert f"those {rn} ReLU ablations move the logit by at most {rmax}" in text
    assert f"TopK's move it by up to {tmax}" in text
    n24 = sum(i["hook"] == relu["hooks"][-1] for i in relu["interventions"])
    assert f"({n24} of {len(relu['interventions'])} ablations" in text
    assert relu["prompts"][0]["latents_after"] == 0 and "none on the IOI prompt" in text
    fvu = lambda name: {r["hook"]: r["fvu"] for r in load(name)["rows"] if r["hook"] in relu["hooks"]}
    relu_fvu, topk_fvu = fvu("layers_results.json"), fvu("topk_layers_results.json")
    assert all(2 <= relu_fvu[h] / topk_fvu[h] <= 3 for h in relu["hooks"]) and "two to three times TopK's" in text
