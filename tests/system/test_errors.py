"""Every error a user can make on the command line is one line on stderr, names the flag
or file, says what would be valid, and comes before any expensive work (these run in
well under a second each: no model is loaded, no activation collected)."""

import subprocess
import sys
import time

import pytest

from minisae.cli import entry

SAE = "/nonexistent/sae"
CASES = [
    (["lm", "--batch-size", "0"], "--batch-size must be positive"),
    (["lm", "--lr", "0"], "--lr must be a positive number"),
    (["lm", "--lr", "nan"], "--lr must be a positive number"),
    (["lm", "--tokens", "100", "--batch-size", "512"], "--tokens 100 is less than one training batch"),
    (["lm", "--expansion", "0"], "--expansion must be positive"),
    (["lm", "--collect-tokens", "0"], "--collect-tokens must be positive"),
    (["lm", "--ctx-len", "1"], "--ctx-len must be at least 3"),
    (["lm", "--eval-tokens", "-5"], "--eval-tokens must be positive"),
    (["lm", "--sweep", "topk16"], "expected VARIANT:KNOB"),
    (["lm", "--sweep", "sparse:k=3"], "unknown variant 'sparse'"),
    (["lm", "--variants", "relu,sparse"], "valid variants"),
    (["lm", "--device", "tpu"], "unknown device 'tpu'"),
    (["layers", "--max-disk-gb", "0"], "--max-disk-gb must be positive"),
    (["layers", "--variant", "sparse"], "valid variants"),
    (["steer", "--sae", SAE, "--latent", "1", "--strength", "nan", "--prompt", "x"], "--strength must be a finite"),
    (["steer", "--sae", SAE, "--latent", "1", "--strength", "2", "--prompt", "x", "--tokens", "-3"],
     "--tokens must be a positive number"),
    (["steer", "--sae", SAE, "--latent", "1", "--strength", "2", "--prompt", "x", "--sample", "--temperature", "0"],
     "--temperature must be positive"),
    (["features", "--sae", SAE, "--top", "0"], "--top and --k must be positive"),
    (["features", "--sae", SAE, "--tokens", "0"], "text tokens to scan must be positive"),
    (["features", "--sae", SAE, "--ctx-len", "2"], "--ctx-len must be at least 3"),
    (["features", "--sae", SAE], SAE),
    (["links", "--sae-a", SAE, "--sae-b", SAE, "--edges", "0"], "--top and --edges must be positive"),
]


@pytest.mark.parametrize("argv, message", CASES, ids=[" ".join(a[:3]) for a, _ in CASES])
def test_one_clear_line(argv, message, capsys):
    t0 = time.perf_counter()
    assert entry(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("minisae: error: "), err
    assert message in err, err
    assert time.perf_counter() - t0 < 20  # before any model or activation pass


def test_cuda_without_cuda(capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert entry(["lm", "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


@pytest.mark.slow
def test_debug_shows_the_traceback_and_the_process_exit_status():
    bad = [sys.executable, "-m", "minisae", "lm", "--batch-size", "0"]
    plain = subprocess.run(bad, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 2 and plain.stderr.count("\n") == 1 and "Traceback" not in plain.stderr
    debug = subprocess.run(bad[:3] + ["--debug"] + bad[3:], capture_output=True, text=True, timeout=120)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "--batch-size must be positive" in debug.stderr
