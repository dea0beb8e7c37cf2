"""`python -m minisae absorption --quick`: the job runs end to end from the command line,
writes its JSON and figures, and TopK absorbs parents where the truth absorbs none."""

import json

import pytest

from minisae.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

SCORES = {"l0", "fvu", "mcc", "mcc_decoder", "precision", "recall", "f1", "uniqueness", "absorption", "split_frac"}


def test_quick_run_writes_scores_and_topk_absorbs(tmp_path):
    main(["absorption", "--out", str(tmp_path), "--quick"])
    res = json.loads((tmp_path / "absorption_results.json").read_text())
    assert {"topk", "batchtopk", "relu"} <= set(res["variants"])
    for v, row in res["variants"].items():
        assert SCORES <= set(row), v
        assert 0 <= row["absorption"] <= 1 and 0 <= row["mcc"] <= 1 + 1e-6, v
        view = row["parent_view"]
        assert len(view["cosines"]) == len(view["firing"]) == 1 + len(view["children"])
    truth = res["truth"]
    assert truth["absorption"] == 0 and truth["mcc"] == pytest.approx(1) and truth["f1"] == pytest.approx(1)
    assert res["variants"]["topk"]["absorption"] > truth["absorption"] + 0.2
    assert {r["data"] for r in res["sweep"]} == {"hierarchical", "independent"}
    for name in ("absorption_scores.png", "absorption_parent.png", "absorption_frontier.png"):
        assert (tmp_path / name).stat().st_size > 0
