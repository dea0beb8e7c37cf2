"""Chapters 2 and 3 quote the toy job's results from the file its documented command
writes (`python -m minisae toy --out figures` writes figures/toy_results.json): the two
tables of chapter 3, rebuilt here from that file with the chapter's rounding, and the
numbers chapter 2 quotes for the plain SAE. After a re-run of the command, this test says
which quotes went stale and prints the tables to paste."""

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "figures" / "toy_results.json"


def main_table(results: dict) -> str:
    lines = ["| variant | settings | L0 | FVU | MMCS | recovered | MMCS by frequency quartile (common → rare) "
             "| dead | gamma | samples | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, v in results["variants"].items():
        settings = ", ".join(f"{k}={val}" for k, val in v["settings"].items())
        quartiles = " / ".join(f"{q:.3f}" for q in v["mmcs_by_frequency_quartile"])
        lines.append(f"| {name} | {settings} | {v['l0']:.2f} | {v['fvu']:.4f} | {v['mmcs']:.4f} "
                     f"| {v['recovered_frac']:.3f} | {quartiles} | {v['dead_frac']:.3f} "
                     f"| {v['shrinkage_gamma']:.3f} | {v['train_samples']:,} | {v['train_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def frontier_table(results: dict) -> str:
    lines = ["| variant | sweep point L0 | FVU | ReLU FVU at that L0 | gamma |", "|---|---|---|---|---|"]
    for r in results["matched_l0_vs_relu"]:
        relu = "outside ReLU range" if r["relu_fvu_at_l0"] is None else f"{r['relu_fvu_at_l0']:.4f}"
        lines.append(f"| {r['variant']} | {r['l0']:.2f} | {r['fvu']:.4f} | {relu} | {r['shrinkage_gamma']:.3f} |")
    return "\n".join(lines) + "\n"


def chapter2_quotes(results: dict) -> list:
    relu = results["variants"]["relu"]
    q = relu["mmcs_by_frequency_quartile"]
    return [f"reaches MMCS {relu['mmcs']:.3f}",
            f"recovers {round(relu['recovered_frac'] * 512)} of the 512 features at cosine > 0.9",
            f"L0 {relu['l0']:.1f}", f"gamma {relu['shrinkage_gamma']:.3f}",
            "MMCS is " + ", ".join(f"{x:.3f}" for x in q[:3]) + f" and {q[3]:.3f}"]


def test_chapter3_tables_are_the_results_file():
    results = json.loads(RESULTS.read_text())
    text = (ROOT / "docs" / "03_variants.md").read_text(encoding="utf-8")
    for table in (main_table(results), frontier_table(results)):
        assert table in text, "chapter 3's table is stale; the file renders:\n" + table


def test_chapter2_quotes_the_results_file():
    results = json.loads(RESULTS.read_text())
    text = " ".join((ROOT / "docs" / "02_sae.md").read_text(encoding="utf-8").split())
    stale = [q for q in chapter2_quotes(results) if q not in text]
    assert not stale, f"chapter 2 does not quote these from {RESULTS.name}: {stale}"


def test_the_saes_do_not_start_at_the_truth():
    """The job's SAEs are seeded apart from its data: before training, no decoder is the
    true dictionary (a shared seed made MMCS 1.0 at step 0)."""
    from minisae import metrics
    from minisae.configs import ToyConfig
    from minisae.toy.run import SETTINGS, make_data, make_variant
    cfg = ToyConfig()
    data, scale = make_data(cfg.n_features, cfg.dim, cfg.seed)
    for variant in SETTINGS:
        sae, _ = make_variant(variant, SETTINGS[variant], data, scale, cfg, cfg.batch_size)
        assert metrics.mmcs(data.ground_truth, sae.W_dec.detach()) < 0.5, variant
