"""`python -m minisae norms`: the norms it scans equal a per-position loop, its band
counts equal a plain count, and on gpt2-random (real tokenizer) the whole command writes
its figure and a JSON whose in-between list is exactly the positions between 3x and 30x."""

import json
import math
import os

import pytest
import torch

from minisae.pipeline import norms as N
from test_activations import HOOK, TinyLM  # pytest puts tests/ on sys.path


def test_scan_equals_a_per_position_loop():
    model = TinyLM().eval()
    contexts = torch.randint(0, 64, (5, 9), generator=torch.Generator().manual_seed(0))
    got = N.scan(model, contexts, HOOK, bf16=False, batch_size=2)  # (5, 8)
    assert got.shape == (5, 8)
    with torch.no_grad():
        for b in range(5):
            act = model(contexts[b:b + 1], stop_at=HOOK)[0]  # (T, D)
            for t in range(1, 9):  # BOS (position 0) left out
                assert math.isclose(got[b, t - 1].item(), act[t].double().norm().item(), rel_tol=1e-6)


def test_summary_counts():
    ratio = torch.tensor([[0.5, 1.0, 2.99, 3.0], [10.0, 10.2, 30.0, 31.0]], dtype=torch.float64)
    s = N.summary(ratio)
    assert s == {"n_positions": 8, "below_3x": 3, "3x_to_30x": 4, "above_30x": 1, "above_10x": 3, "max_ratio": 31.0}


def test_bad_config():
    with pytest.raises(ValueError, match="--tokens"):
        N.NormsConfig(tokens=0).check()
    with pytest.raises(ValueError, match="--split"):
        N.NormsConfig(split="test").check()


TOKENIZER_DIR = os.environ.get("MINISAE_GPT2_TOKENIZER_DIR")


@pytest.mark.skipif(not TOKENIZER_DIR or not os.path.isdir(TOKENIZER_DIR),
                    reason="set MINISAE_GPT2_TOKENIZER_DIR to a dir with GPT-2's encoder.json + vocab.bpe")
def test_command_on_gpt2_random(tmp_path, monkeypatch, capsys):
    from minisae import cli
    monkeypatch.setattr(N, "BANDS", (1.05, 30.0))  # gpt2-random has no sinks: a band that catches some rows
    cli.main(["norms", "--model", "gpt2-random", "--layer", "1", "--tokens", "1024", "--ctx-len", "32",
              "--device", "cpu", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "norms_gpt2-random_l1.json").read_text())
    assert (tmp_path / "norms_gpt2-random_l1.png").stat().st_size > 0
    s = res["summary"]["float32"]
    assert s["n_positions"] == 32 * 31 and s["below_1.05x"] + s["1.05x_to_30x"] + s["above_30x"] == 32 * 31
    assert len(res["between"]) == s["1.05x_to_30x"] > 0
    assert all(1.05 <= r["float32"] <= 30 for r in res["between"])


def test_the_sink_claims_match_the_committed_measurement():
    """The numbers the docs and activations.py quote about the layer-15 norms are those of
    figures/norms_smollm2_l15.json, which `python -m minisae norms ...` (chapter 5) writes."""
    import json
    from pathlib import Path

    import minisae.pipeline.activations as A
    root = Path(__file__).resolve().parents[2]
    got = json.loads((root / "figures" / "norms_smollm2_l15.json").read_text())
    s = got["summary"]["float32"]
    between = sorted(round(r["float32"], 1) for r in got["between"])
    claim = (f"of {s['n_positions']:,} held-out positions after BOS, {s['below_3x']:,} are\n  below 3x the median norm "
             f"and {s['above_30x']} above 30x (up to {s['max_ratio']:.0f}x")
    assert claim in A.__doc__
    assert f"{s['3x_to_30x']} lie between" in A.__doc__ and between == [10.2] * 4 + [27.4]
    chapter = (root / "docs" / "05_smollm2.md").read_text()
    assert (f"Of the {s['n_positions']:,} positions after BOS, {s['below_3x']:,} are below 3x the median norm "
            f"and {s['above_30x']} above 30x\n(up to {s['max_ratio']:.0f}x), but {s['3x_to_30x']} sit in between") in chapter
