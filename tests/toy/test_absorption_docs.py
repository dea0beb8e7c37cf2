"""Chapter 10 quotes its results from the file its documented command writes
(`python -m minisae absorption --out figures` writes figures/absorption_results.json):
the table, rebuilt here from that file with the chapter's rounding, and every number its
text quotes must appear in the chapter verbatim. After a re-run of the command, this test
says which quotes went stale and prints the table to paste."""

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHAPTER = ROOT / "docs" / "10_absorption.md"
RESULTS = ROOT / "figures" / "absorption_results.json"


def results_table(results: dict) -> str:
    """The chapter's table: one row per variant, means over seeds; the last column each seed's absorption."""
    lines = ["| variant | settings | L0 | FVU | MCC | F1 | absorption rate | absorption by seed |",
             "|---|---|---|---|---|---|---|---|"]
    for name, v in results["variants"].items():
        settings = ", ".join(f"{k}={val}" for k, val in v["settings"].items())
        seeds = " / ".join(f"{s['absorption']:.2f}" for s in v["per_seed"])
        lines.append(f"| {name} | {settings} | {v['l0']:.2f} | {v['fvu']:.4f} | {v['mcc']:.3f} | {v['f1']:.3f} "
                     f"| {v['absorption']:.3f} | {seeds} |")
    return "\n".join(lines) + "\n"


def sweep_row(results: dict, variant: str, data: str, k: int) -> dict:
    (row,) = [r for r in results["sweep"] if r["variant"] == variant and r["data"] == data and r.get("k") == k]
    return row


def sweep_fvu(results: dict, variant: str, data: str, k: int) -> str:
    return f"{sweep_row(results, variant, data, k)['fvu']:.3f}"


def quotes(results: dict) -> list:
    """The numbers the chapter's text quotes, each in the phrase that quotes it."""
    v = results["variants"]
    topk, mat = v["topk"]["parent_view"], v["matryoshka_batchtopk"]["parent_view"]
    topk_kids = [row[0] for row in topk["cosines"][1:]]  # the children's latents, cosine with g_p
    mat_kids = [abs(row[0]) for row in mat["cosines"][1:]]
    others = [u["uniqueness"] for name, u in v.items() if name != "matryoshka_batchtopk"]
    absorbed = [u["absorption"] for name, u in v.items() if name != "matryoshka_batchtopk"]
    mat_seeds = [f"{s['absorption']:.2f}" for s in v["matryoshka_batchtopk"]["per_seed"]]
    btk_seeds = [s["absorption"] for s in v["batchtopk"]["per_seed"]]
    return [
        f"true L0 is {results['truth']['l0']:.2f}",
        f"took {results['total_seconds']:.0f} s",
        f"{v['matryoshka_batchtopk']['absorption']:.3f} ({', '.join(mat_seeds[:-1])} and {mat_seeds[-1]} over the seeds)",
        f"is between {min(absorbed):.2f} and {max(absorbed):.2f}",
        f"BatchTopK {min(btk_seeds):.2f} to {max(btk_seeds):.2f}",
        f"cosine {topk['cosines'][0][0]:.2f} with g_p",
        f"between {min(topk_kids):.2f} and {max(topk_kids):.2f}",
        f"latent #{mat['latents'][0]}, cosine {mat['cosines'][0][0]:.2f} with g_p",
        f"fires on {mat['firing'][0][0]:.2f} of the samples where p fires alone",
        f"and on {min(row[0] for row in mat['firing'][1:]):.2f} or more",
        f"at most {max(mat_kids):.2f} in absolute value",
        (f"latent #{mat['latents'][1]} (cosine {mat['cosines'][1][1]:.2f} with g_{mat['children'][0]} and "
         f"{mat['cosines'][1][2]:.2f} with g_{mat['children'][1]})"),
        f"fires on {mat['firing'][2][1]:.2f} of the samples with child {mat['children'][1]}",
        f"uniqueness {v['matryoshka_batchtopk']['uniqueness']:.3f} against {min(others):.3f} to {max(others):.3f}",
        (f"FVU {sweep_fvu(results, 'matryoshka_batchtopk', 'hierarchical', 8)} against "
         f"{sweep_fvu(results, 'batchtopk', 'hierarchical', 8)}"),
        (f"(L0 {sweep_row(results, 'matryoshka_batchtopk', 'hierarchical', 8)['l0']:.2f} against "
         f"{sweep_row(results, 'batchtopk', 'hierarchical', 8)['l0']:.2f})"),
        (f"({sweep_fvu(results, 'matryoshka_batchtopk', 'independent', 8)} against "
         f"{sweep_fvu(results, 'batchtopk', 'independent', 8)})"),
    ]


def test_chapter_10_table_and_numbers_come_from_the_results_file():
    results = json.loads(RESULTS.read_text(encoding="utf-8"))
    chapter = CHAPTER.read_text(encoding="utf-8")
    table = results_table(results)
    assert table in chapter, f"the chapter's table differs from {RESULTS.name}; it should read:\n{table}"
    prose = " ".join(chapter.split())  # a quote may wrap over lines
    stale = [q for q in quotes(results) if q not in prose]
    assert not stale, f"docs/10_absorption.md no longer quotes {RESULTS.name}: {stale}"
    for name in ("scores", "parent", "frontier"):
        assert f"](../figures/absorption_{name}.png)" in chapter and (ROOT / f"figures/absorption_{name}.png").exists()
