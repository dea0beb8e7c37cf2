"""Section 11.3 quotes its transcoder results from the files its documented commands write
(`python -m minisae transcoder ... --out docs/outputs/transcoder_smollm2_l15*` writes
transcoder_results.json there): the table, rebuilt here from those files with the
chapter's rounding, and every number its text quotes must appear in the chapter verbatim.
After a re-run, this test says which quotes went stale and prints the table to paste."""

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHAPTER = ROOT / "docs" / "11_circuits.md"
RUNS = {name: ROOT / "docs" / "outputs" / f"transcoder_smollm2_l15{name}" / "transcoder_results.json"
        for name in ("_resid_mid", "", "_linear", "_skip")}


def load():
    return {name: json.loads(path.read_text()) for name, path in RUNS.items()}


def section(text: str) -> str:
    """Section 11.3 alone: the quotes must sit in it, not elsewhere in the chapter."""
    start = text.index("## 11.3 Transcoders")
    return text[start:text.index("\n## ", start + 1)]


def site(r: dict) -> str:
    return r["hook_in"].split(".", 2)[2]  # hook_resid_mid, ln2.hook_normalized


def results_table(runs: dict) -> str:
    lines = [("| reads | transcoder | training samples (text tokens) | L0 | FVU | loss recovered vs zero | vs mean "
              "| KL |"), "|---|---|---|---|---|---|---|---|"]
    for r in runs.values():
        c = r["config"]
        kind = "W_skip alone" if r.get("linear") else "TopK + W_skip" if r.get("skip") else "TopK"
        samples = "none" if r.get("linear") else f"{c['tokens']:,}"
        lines.append(f"| `{site(r)}` | {kind} | {samples} ({c['collect_tokens']:,}) | {r['l0']:.1f} | {r['fvu']:.3f} "
                     f"| {r['loss_recovered_zero']:.3f} | {r['loss_recovered_mean']:.3f} | {r['kl_tc']:.4f} |")
    return "\n".join(lines) + "\n"


def quotes(runs: dict) -> list:
    """The numbers the text of 11.3 quotes, each in the phrase that quotes it."""
    old, new, lin, skip = runs["_resid_mid"], runs[""], runs["_linear"], runs["_skip"]
    return [
        f"{new['n_predictions']:,} held-out predictions evaluated",
        f"costs {new['ce_zero'] - new['ce_clean']:.3f} nats per token",
        f"KL {new['kl_zero']:.3f} for zero-ablation, {new['kl_mean']:.3f} for mean-ablation",
        f"from {old['loss_recovered_zero']:.3f} to {new['loss_recovered_zero']:.3f}",
        f"FVU {new['fvu']:.2f}",
        f"({new['n_tokens']:,} positions where the `resid_mid`",
        f"replaces {old['n_tokens']:,})",
        (f"at L0 {skip['l0']:.1f} (KL {skip['kl_tc']:.4f}, FVU {skip['fvu']:.2f}) against the map's "
         f"KL {lin['kl_tc']:.4f} and FVU {lin['fvu']:.2f}"),
        (f"recovers {skip['loss_recovered_zero']:.3f} of the loss against zero-ablation and "
         f"{skip['loss_recovered_mean']:.3f} against mean-ablation (CE {skip['ce_tc']:.4f} against the map's "
         f"{lin['ce_tc']:.4f})"),
        f"trained for {new['config']['tokens'] // new['config']['batch_size']:,} steps",
        (f"recovers {lin['loss_recovered_zero']:.3f} of the loss ({lin['loss_recovered_mean']:.3f} "
         f"against mean-ablation, KL {lin['kl_tc']:.4f}, FVU {lin['fvu']:.2f})"),
    ]


@pytest.mark.skipif(not all(p.is_file() for p in RUNS.values()), reason="the transcoder results are not committed")
def test_section_11_3_quotes_its_results():
    runs = load()
    text = section(CHAPTER.read_text(encoding="utf-8"))
    table = results_table(runs)
    assert table in text, "the table of 11.3 differs from the results files; paste:\n" + table
    flat = " ".join(text.split())  # the prose wraps: compare with single spaces
    stale = [q for q in quotes(runs) if " ".join(q.split()) not in flat]
    assert not stale, f"11.3 does not quote these as the results files give them: {stale}"
    for r in runs.values():
        assert r["model"] == "smollm2" and r["variant"] == "topk" and r["settings"]["k"] == 32
        assert r["hook_out"] == "blocks.15.hook_mlp_out" and r["config"]["eval_tokens"] == 2048
    assert site(runs[""]) == site(runs["_skip"]) == site(runs["_linear"]) == "ln2.hook_normalized"
    assert runs["_skip"]["skip"] and runs["_linear"]["linear"] and runs["_linear"]["l0"] == 0
