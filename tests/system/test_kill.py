"""Kill tests: `python -m minisae lm` on gpt2-random, killed with SIGKILL during the
activation collection, during training and while writing lm_results.json, then started
again into the same folder, must finish with the rows of an uninterrupted run, leave no
temporary files, and never reuse what was made with other weights or settings.

The process kills itself at a named point ($MINISAE_CRASH_AT, minisae.utils.crash_point):
the same SIGKILL an OOM killer sends, at a place a timer could not hit reliably."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # processes spawned per test

needs_vocab = pytest.mark.skipif(
    not (os.environ.get("MINISAE_GPT2_TOKENIZER_DIR") and
         (Path(os.environ["MINISAE_GPT2_TOKENIZER_DIR"]) / "encoder.json").exists()),
    reason="set MINISAE_GPT2_TOKENIZER_DIR to a folder with GPT-2's encoder.json + vocab.bpe")

ARGS = ["lm", "--model", "gpt2-random", "--layer", "1", "--site", "resid_post", "--tokens", "4096",
        "--collect-tokens", "2048", "--variants", "relu,topk", "--sweep", "relu:sparsity_coef=1",
        "--sweep", "topk:k=4", "--expansion", "2", "--batch-size", "256", "--eval-tokens", "1024"]
TIMING = {"train_seconds", "eval_seconds"}


def run(out, *extra, crash=None, cache=None):
    env = {**os.environ, "MINISAE_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    env.pop("MINISAE_CRASH_AT", None)
    if crash:
        env["MINISAE_CRASH_AT"] = crash
    return subprocess.run([sys.executable, "-m", "minisae", *ARGS, "--out", str(out), *extra], env=env,
                          capture_output=True, text=True, timeout=300)


def rows(out):
    res = json.loads((Path(out) / "lm_results.json").read_text())
    return [{k: v for k, v in r.items() if k not in TIMING} for r in res["rows"]]


def temporaries(out):
    return sorted(p.name for p in Path(out).rglob("*") if p.name.endswith((".tmp", ".part")) or ".tmp" in p.name)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    base = tmp_path_factory.mktemp("kill")
    done = run(base / "ref", cache=base / "cache")
    assert done.returncode == 0, done.stderr[-2000:]
    return base, rows(base / "ref")


@needs_vocab
@pytest.mark.parametrize("point", ["collect", "train", "write:lm_results.json"])
def test_killed_run_resumes_to_the_same_rows(reference, point):
    base, want = reference
    out = base / point.replace(":", "_")
    killed = run(out, crash=point, cache=base / "cache")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    if point == "write:lm_results.json":  # killed before the rename: the file is old or absent, never half
        assert not (out / "lm_results.json").exists()
        assert temporaries(out)  # the temporary the killed write left ...
    again = run(out, cache=base / "cache")
    assert again.returncode == 0, again.stderr[-2000:]
    assert rows(out) == want
    assert temporaries(out) == []  # ... is gone after the restart


@pytest.mark.parity
@needs_vocab
def test_other_settings_or_weights_are_never_reused(reference, tmp_path):
    base, want = reference
    out = tmp_path / "run"
    assert run(out, cache=base / "cache").returncode == 0
    assert rows(out) == want
    bf16 = run(out, "--bf16", cache=base / "cache")  # other dtype: collect and train again
    assert bf16.returncode == 0, bf16.stderr[-2000:]
    assert "not reusing" in bf16.stderr and "reusing the finished row" not in bf16.stderr
    meta = json.loads(next(out.glob("acts-*.json")).read_text())
    assert meta["compute_dtype"] == "bfloat16"

    transformers = pytest.importorskip("transformers", reason="other GPT-2 weights are written with transformers")
    from minisae.models.gpt2 import CONFIGS
    from models.test_gpt2 import save_hf_checkpoint  # tests/ is on sys.path (conftest.py)
    cfg = CONFIGS["gpt2-random"]
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.d_model, n_positions=cfg.n_ctx,
        vocab_size=cfg.vocab_size))
    weights = save_hf_checkpoint(hf, tmp_path / "other.safetensors")
    other = run(out, "--weights", str(weights), cache=base / "cache")
    assert other.returncode == 0, other.stderr[-2000:]
    assert "not reusing" in other.stderr and "reusing the finished row" not in other.stderr
    assert rows(out) != want
    again = run(out, "--weights", str(weights), cache=base / "cache")  # the same again: all reused
    assert "reusing the finished row" in again.stderr and "collecting again" not in again.stderr


@needs_vocab
def test_damaged_results_file_is_set_aside(reference, tmp_path):
    base, want = reference
    out = tmp_path / "run"
    out.mkdir()
    (out / "lm_results.json").write_text('{"rows": [')  # as a killed non-atomic writer would leave it
    done = run(out, cache=base / "cache")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "damaged" in done.stderr and (out / "lm_results.json.damaged").exists()
    assert rows(out) == want


@needs_vocab
def test_truncated_activation_file_is_collected_again(reference, tmp_path):
    base, want = reference
    out = tmp_path / "run"
    assert run(out, cache=base / "cache").returncode == 0
    acts = next(out.glob("acts-*.npy"))
    with open(acts, "r+b") as f:
        f.truncate(acts.stat().st_size // 2)
    sae = out / rows(out)[0]["sae"]  # and one finished SAE: a file, or a folder of files
    for f in ([sae] if sae.is_file() else [p for p in sae.iterdir() if p.suffix == ".safetensors"]):
        with open(f, "r+b") as fh:
            fh.truncate(f.stat().st_size // 2)
    again = run(out, cache=base / "cache")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "truncated" in again.stderr and str(acts.name) in again.stderr
    assert f"not reusing {rows(out)[0]['sae']}" in again.stderr  # retrained, not trusted
    assert rows(out) == want
