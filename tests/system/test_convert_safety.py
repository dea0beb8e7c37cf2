"""`convert` and every SAE write: never replace what minisae did not write without
--force, never put in place a folder its own reader rejects, and survive a kill at any
point of the write: the old SAE or the new one is readable afterwards, and the next write
or read of that folder leaves no temporary behind.

The kills are SIGKILLs at named points (minisae.utils.crash_point): `write:NAME` after the
new folder is complete and checked, `swap:NAME` between the two renames that replace the
old one. Each is tried on each kind of thing already at the destination (nothing, an SAE
directory, an old .pt file), in a forked copy of this process; one run goes through a
real `python -m minisae convert` process."""

import json
import multiprocessing
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minisae import formats
from minisae.cli import entry
from minisae.formats.common import write_dir
from minisae.sae import part_settings

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture
def sae_dir(random_sae, tmp_path):
    """A TopK SAE minisae wrote (the source of every convert here)."""
    sae = random_sae("topk", 8, 16, dtype=torch.float32, k=4)
    return formats.save(sae, tmp_path / "src", model="gpt2", hook=HOOK, scale=2.0), sae


def codes(path, x):
    sae, meta = formats.load(path)
    return sae.encode(x * meta["scale"])


def leftovers(folder):
    """Temporaries of a writer: dot-named .tmp / .old / .part entries."""
    return sorted(p.name for p in Path(folder).iterdir() if p.name.startswith(".")
                  and p.name.endswith((".tmp", ".old", ".part")))


def old_pt(path, sae):
    """An SAE file in minisae's old torch.save layout."""
    torch.save({"variant": "topk", "d": sae.d, "n_latents": sae.n_latents, "settings": part_settings(sae.activation),
                "state_dict": sae.state_dict(), "meta": {"model": "gpt2", "hook": HOOK, "scale": 1.0}}, path)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("minisae: error: ") and "Traceback" not in err, err
    return lines[0]


def test_convert_never_replaces_what_minisae_did_not_write(sae_dir, tmp_path, capsys):
    src, sae = sae_dir
    ckpt = tmp_path / "my_checkpoint.pt"
    torch.save({"weights": torch.arange(3.0)}, ckpt)  # someone's own checkpoint
    theirs = tmp_path / "theirs"  # an SAE directory another tool wrote (no minisae metadata)
    formats.save(sae, theirs, model="gpt2", hook=HOOK)
    cfg = json.loads((theirs / "cfg.json").read_text())
    del cfg["metadata"]["minisae"]
    (theirs / "cfg.json").write_text(json.dumps(cfg))
    before = {p: p.read_bytes() for p in (ckpt, theirs / "cfg.json")}
    for dst in (ckpt, theirs):
        assert entry(["convert", str(src), str(dst)]) == 2
        line = one_error_line(capsys)
        assert str(dst) in line and "not an SAE written by minisae" in line and "--force" in line, line
    assert {p: p.read_bytes() for p in before} == before  # untouched
    for dst in (ckpt, theirs):  # --force: replaced by the converted SAE
        assert entry(["convert", str(src), str(dst), "--force"]) == 0
        x = torch.randn(5, 8)
        torch.testing.assert_close(codes(dst, x), codes(src, x))
    assert entry(["convert", str(src), str(ckpt)]) == 0  # now minisae's own: replaced without asking
    assert leftovers(tmp_path) == []


def test_what_is_not_an_sae_is_never_replaced_even_with_force(sae_dir, tmp_path, capsys):
    src, _ = sae_dir
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text("{}")
    for dst in ("notes.txt", "run"):
        for force in ([], ["--force"]):
            assert entry(["convert", str(src), str(tmp_path / dst), *force]) == 2
            assert "not replacing it" in one_error_line(capsys)
    assert (tmp_path / "notes.txt").read_text() == "mine" and (tmp_path / "run" / "results.json").read_text() == "{}"


def test_an_old_minisae_pt_and_an_sae_it_wrote_are_replaced(sae_dir, tmp_path):
    src, sae = sae_dir
    old_pt(tmp_path / "old.pt", sae)
    for dst in (tmp_path / "old.pt", src.parent / "again"):
        formats.convert(src, dst)
        formats.convert(src, dst, to="sparsify")  # over minisae's own SAE: no flag needed
        assert formats.load(dst)[1]["layout"] == "sparsify"


def test_a_folder_its_own_reader_rejects_is_never_put_in_place(sae_dir, tmp_path, capsys):
    """The written folder is read back before it replaces anything: a converted file whose
    metadata the reader refuses (here a mean of the wrong length) leaves the old SAE."""
    src, sae = sae_dir
    bad = tmp_path / "bad.pt"
    torch.save({"variant": "topk", "d": 8, "n_latents": 16, "settings": part_settings(sae.activation),
                "state_dict": sae.state_dict(), "meta": {"model": "gpt2", "hook": HOOK, "mean": [0.0] * 3}}, bad)
    assert entry(["convert", str(bad), str(src)]) == 2
    assert "mean" in one_error_line(capsys)
    x = torch.randn(4, 8)
    assert formats.load(src)[1]["hook"] == HOOK and codes(src, x).shape == (4, 16)  # the old SAE, unchanged
    assert leftovers(tmp_path) == []

    def reject(folder):
        raise ValueError(f"{folder}/cfg.json: rejected")

    with pytest.raises(ValueError, match=r"new: not written, its own reader rejects it: .*/new/cfg.json: rejected"):
        write_dir(tmp_path / "new", {"a": 1}, {"W": torch.zeros(2)}, "sae.safetensors", check=reject)
    assert not (tmp_path / "new").exists() and leftovers(tmp_path) == []


def convert_then_die(src, dst, point):
    os.environ["MINISAE_CRASH_AT"] = point
    formats.convert(src, dst, to="sparsify")
    os._exit(0)  # not reached when the crash point fires


@pytest.mark.parametrize("point", ["write", "swap"])
@pytest.mark.parametrize("before", ["nothing", "sae", "pt"])
def test_a_write_killed_anywhere_leaves_the_old_or_the_new_sae(sae_dir, tmp_path, point, before):
    src, sae = sae_dir
    dst = tmp_path / "out" / "layers.1.pt"  # a name an old .pt file may have, and a directory too
    dst.parent.mkdir()
    if before == "sae":
        formats.save(sae, dst, model="gpt2", hook=HOOK)  # SAELens layout: the kill must keep this one
    elif before == "pt":
        old_pt(dst, sae)
    child = multiprocessing.get_context("fork").Process(target=convert_then_die, args=(src, dst, f"{point}:layers.1.pt"))
    child.start()
    child.join(60)
    assert child.exitcode == -signal.SIGKILL
    assert leftovers(dst.parent)  # the killed writer's temporary (and the old SAE moved aside, for swap)
    if before == "nothing":  # nothing was there: nothing is, until the next write
        assert formats.sae_entries(dst.parent) == []
    else:  # the next read finds the old SAE, put back if the kill came between the renames
        sae_back, meta = formats.load(dst)
        assert meta["layout"] == ("saelens" if before == "sae" else "pt")
        torch.testing.assert_close(sae_back.W_dec, sae.W_dec)
    assert leftovers(dst.parent) == []  # ... and tidied what the killed writer left
    formats.convert(src, dst, to="sparsify")  # the next write goes through
    assert formats.load(dst)[1]["layout"] == "sparsify" and leftovers(dst.parent) == []


def test_listings_of_saes_skip_temporaries(sae_dir, tmp_path):
    """explain --sae RUN lists RUN/saes: a killed writer's dot-directories are not SAEs."""
    src, sae = sae_dir
    saes = tmp_path / "run" / "saes"
    for name in ("relu-a", "topk-b"):
        formats.save(sae, saes / name, model="gpt2", hook=HOOK)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has exited
    (saes / f".relu-a.{pid}.tmp").mkdir()  # half-written
    (saes / f".relu-a.{pid}.tmp" / "cfg.json").write_text("{")
    formats.save(sae, saes / f".topk-b.{os.getppid()}.tmp", model="gpt2", hook=HOOK)  # a live writer's: kept
    assert [p.name for p in formats.sae_entries(saes)] == ["relu-a", "topk-b"]
    assert leftovers(saes) == [f".topk-b.{os.getppid()}.tmp"]


@pytest.mark.slow  # real processes: python and torch start in seconds
def test_convert_killed_between_the_renames_in_a_real_process(sae_dir, tmp_path):
    src, sae = sae_dir
    dst = tmp_path / "dst"
    formats.convert(src, dst)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MINISAE_CRASH_AT": "swap:dst"}
    args = [sys.executable, "-m", "minisae", "convert", str(src), str(dst), "--to", "sparsify"]
    killed = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not dst.exists() and len(leftovers(tmp_path)) == 2  # the old SAE aside, the new one not yet in place
    env.pop("MINISAE_CRASH_AT")
    again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    assert formats.load(dst)[1]["layout"] == "sparsify" and leftovers(tmp_path) == []
