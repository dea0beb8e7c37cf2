"""Hostile cfg.json values: any JSON value at any key either loads to a working SAE or is
one ValueError naming the file; never another exception type, never a hang.

Hypothesis puts an arbitrary JSON value (NaN and Infinity included, as Python's json
module reads them; deep nesting; huge integers) at a key of a valid file's cfg.json (at
the top level, in metadata, in metadata.minisae or in its settings), for SAEs written by
minisae in SAELens's and sparsify's layouts, and for an old minisae .pt file's dictionary.
What loads must encode and decode finite values, and what loads must save and load again
(`convert` never writes what its own reader rejects). The file-system cases (a config of
3 GB, a FIFO, a directory, a symlink loop) are written out one by one.
"""

import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from minisae import formats
from minisae.formats.common import MAX_CFG_BYTES
from minisae.pipeline.hooked_sae import HookedSAE

D, F = 8, 16
HOOK = "blocks.1.hook_resid_pre"
# keys a reader looks at, and a few it must not trip over (names of save()'s own arguments)
NEW_KEYS = ["path", "sae", "layout", "source", "scale", "folded_scale", "variant", "activation_fn_str",
            "activation_fn_kwargs", "activation_fn", "sae_lens_version", "normalize_activations",
            "norm_scaling_factor", "hook_point", "hook_name", "model_name", "reshape_activations",
            "hook_head_index", "finetuning_scaling_factor", "rescale_acts_by_decoder_norm", "num_latents",
            "expansion_factor", "k", "threshold", "mean", "max_norm", "model", "hook", "training", "settings",
            "minisae", "metadata", "d_in", "d_sae", "architecture", "k_aux", "dead_after", "sparsity_coef"]

numbers = st.one_of(st.integers(-3, 40), st.integers(min_value=-(2 ** 70), max_value=2 ** 70),
                    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0, 1, 4.5, -1.0, 1e308]))
scalars = st.one_of(st.none(), st.booleans(), numbers, st.text(max_size=12),
                    st.sampled_from(["", "topk", "standard", "jumprelu", "gated", "relu", "batchtopk", "none",
                                     "expected_average_only_in", "5.1.0", "6.0.0", "x.y", HOOK, "gpt2", "hook_z"]))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=D + 1),
                                                            st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                           max_leaves=12)
deep = st.integers(17, 3000).map(lambda n: f"<deep {n}>")  # written as n nested lists by dump()
values = st.one_of(json_values, deep, st.lists(numbers, min_size=D, max_size=D))  # a mean of the right length


def written(random_sae, variant, layout):
    folder = Path(tempfile.mkdtemp(prefix=f"fuzz-{variant}-"))
    sae = random_sae(variant, D, F, seed=1, dtype=torch.float32)
    HookedSAE(sae, "gpt2", HOOK, 2.0, max_norm=30.0, mean=[0.1] * D,
              extra={"training": {"ctx_len": 64}}).save(folder / "sae", layout=layout)
    return folder / "sae"


@pytest.fixture
def originals(random_sae):
    made = {(v, "saelens"): written(random_sae, v, "saelens") for v in ("relu", "topk", "batchtopk", "jumprelu",
                                                                          "gated")}
    made["topk", "sparsify"] = written(random_sae, "topk", "sparsify")
    yield made
    for path in made.values():
        shutil.rmtree(path.parent, ignore_errors=True)


def put(cfg: dict, where: str, key: str, value):
    """cfg with `value` at `key` of the dictionary at `where` (made if absent or not a dict)."""
    node = cfg
    for part in [p for p in where.split(".") if p]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[key] = value
    return cfg


def dump(cfg: dict) -> str:
    """json.dumps, with each "<deep N>" string written as N nested lists (too deep for
    Python's own json module to build or write)."""
    text = json.dumps(cfg)
    for n in {int(m) for m in re.findall(r'"<deep (\d+)>"', text)}:
        text = text.replace(f'"<deep {n}>"', "[" * n + "]" * n)
    return text


def loads_or_fails_clearly(path: Path, folder: Path):
    """HookedSAE.load(path) gives a working SAE or one ValueError naming the file."""
    start = time.perf_counter()
    try:
        hsae = HookedSAE.load(path)
    except ValueError as e:
        assert str(path) in str(e), f"the error does not name the file: {e}"
        assert time.perf_counter() - start < 5
        return
    x = torch.randn(32, hsae.d, generator=torch.Generator().manual_seed(0))  # (B, D) raw
    f = hsae.encode_raw(x)  # (B, F)
    assert f.shape == (32, hsae.n_latents) and torch.isfinite(f).all()
    assert torch.isfinite(hsae.decode_raw(f)).all()
    assert hsae.mean is None or all(abs(v) < float("inf") for v in hsae.mean)
    again = hsae.save(folder / "again")  # what loads saves, and what it saves loads
    back = HookedSAE.load(again)  # the scale is folded in: its codes are f / scale, its reconstructions alike
    torch.testing.assert_close(back.encode_raw(x) * hsae.scale, f, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(back.decode_raw(back.encode_raw(x)), hsae.decode_raw(f), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(which=st.sampled_from([("relu", "saelens"), ("topk", "saelens"), ("batchtopk", "saelens"),
                              ("jumprelu", "saelens"), ("gated", "saelens"), ("topk", "sparsify")]),
       where=st.sampled_from(["", "metadata", "metadata.minisae", "metadata.minisae.settings", "minisae",
                              "minisae.settings"]),
       key=st.data(), value=values)
def test_any_value_at_any_key_loads_or_is_one_value_error(originals, which, where, key, value):
    src = originals[which]
    cfg = json.loads((src / "cfg.json").read_text())
    node = cfg
    for part in [p for p in where.split(".") if p]:
        node = node.get(part) if isinstance(node.get(part), dict) else {}
    name = key.draw(st.sampled_from(sorted(set(node) | set(NEW_KEYS))))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        shutil.copytree(src, folder / "sae")
        (folder / "sae" / "cfg.json").write_text(dump(put(cfg, where, name, value)))
        loads_or_fails_clearly(folder / "sae", folder)


@pytest.mark.slow
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(where=st.sampled_from(["", "meta", "settings"]), key=st.sampled_from(NEW_KEYS + ["variant", "d"]),
       value=st.one_of(json_values, st.lists(numbers, min_size=D, max_size=D)))
def test_any_value_in_an_old_pt_file_loads_or_is_one_value_error(random_sae, where, key, value):
    sae = random_sae("topk", D, F, seed=2, dtype=torch.float32)
    ckpt = {"variant": "topk", "d": D, "n_latents": F, "settings": {"k": 4},
            "state_dict": sae.state_dict(), "meta": {"model": "gpt2", "hook": HOOK, "scale": 2.0, "mean": [0.0] * D}}
    (ckpt[where] if where else ckpt)[key] = value
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "old.pt"
        torch.save(ckpt, path)
        loads_or_fails_clearly(path, Path(tmp))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_weights_in_an_old_pt_file_are_refused(random_sae, tmp_path, bad):
    sae = random_sae("relu", D, F, dtype=torch.float32)
    state = sae.state_dict()
    state["W_dec"][3, 2] = bad
    torch.save({"variant": "relu", "d": D, "n_latents": F, "state_dict": state,
                "meta": {"hook": HOOK, "scale": 1.0}}, tmp_path / "old.pt")
    with pytest.raises(ValueError, match="W_dec.* finite") as e:
        formats.load(tmp_path / "old.pt")
    assert str(tmp_path / "old.pt") in str(e.value)


@pytest.mark.parametrize("where,key,value,match", [
    ("", "architecture", ["topk"], "unknown architecture"),
    ("", "normalize_activations", ["none"], "normalize_activations"),
    ("metadata.minisae", "folded_scale", [2.0], "folded_scale must be a positive number"),
    ("metadata.minisae", "folded_scale", None, "folded_scale must be a positive number"),
    ("metadata.minisae", "folded_scale", {"s": 2}, "folded_scale must be a positive number"),
    ("metadata.minisae", "mean", [float("nan")] * D, "mean must be a list of d_in = 8 numbers, all finite"),
    ("metadata.minisae", "mean", [float("inf")] * D, "mean must be a list of d_in = 8 numbers, all finite"),
    ("metadata.minisae", "hook", "", None),  # and metadata.hook_name "" below: no hook at all
    ("metadata.minisae.settings", "k", 4.5, "settings must map names to numbers"),
    ("", "k", 4.5, "k must be a positive integer"),
])
def test_the_hostile_values_of_the_report(originals, tmp_path, where, key, value, match):
    src = originals["topk", "saelens"]
    cfg = json.loads((src / "cfg.json").read_text())
    if (key, value) == ("hook", ""):
        cfg["metadata"]["hook_name"] = ""
        match = "hook_name must be a non-empty string"
    shutil.copytree(src, tmp_path / "sae")
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps(put(cfg, where, key, value)))
    with pytest.raises(ValueError, match=match) as e:
        HookedSAE.load(tmp_path / "sae")
    assert str(tmp_path / "sae" / "cfg.json") in str(e.value)


def test_metadata_keys_named_like_save_arguments_round_trip(originals, tmp_path):
    """metadata.minisae keys `path`, `sae`, `layout` are carried, not passed as arguments."""
    src = originals["topk", "saelens"]
    cfg = json.loads((src / "cfg.json").read_text())
    cfg["metadata"]["minisae"].update(path="/elsewhere", sae={"a": 1}, layout="x")
    shutil.copytree(src, tmp_path / "sae")
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps(cfg))
    hsae = HookedSAE.load(tmp_path / "sae")
    assert hsae.extra["path"] == "/elsewhere" and hsae.extra["sae"] == {"a": 1}
    formats.convert(tmp_path / "sae", tmp_path / "copy")
    back = json.loads((tmp_path / "copy" / "cfg.json").read_text())["metadata"]["minisae"]
    assert back["path"] == "/elsewhere" and back["sae"] == {"a": 1}


def test_a_uniform_negative_batchtopk_threshold_is_refused(originals, tmp_path):
    src = originals["batchtopk", "saelens"]
    shutil.copytree(src, tmp_path / "sae")
    from minisae.models.safetensors import load_safetensors, save_safetensors
    w = tmp_path / "sae" / "sae_weights.safetensors"
    t = {k: v.copy() for k, v in load_safetensors(w).items()}
    t["threshold"][:] = -1.0
    save_safetensors(w, t)
    with pytest.raises(ValueError, match="negative inference threshold") as e:
        HookedSAE.load(tmp_path / "sae")
    assert str(tmp_path / "sae" / "cfg.json") in str(e.value)


def test_sparsify_num_latents_false_is_refused(originals, tmp_path):
    src = originals["topk", "sparsify"]
    shutil.copytree(src, tmp_path / "sae")
    cfg = json.loads((src / "cfg.json").read_text())
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps({**cfg, "num_latents": False}))
    with pytest.raises(ValueError, match="num_latents must be a positive integer, got False"):
        HookedSAE.load(tmp_path / "sae")


# ---------------------------------------------------------------- the file itself

def test_a_3_gb_cfg_is_refused_without_reading_it(originals, tmp_path):
    shutil.copytree(originals["topk", "saelens"], tmp_path / "sae")
    with open(tmp_path / "sae" / "cfg.json", "r+b") as f:
        f.truncate(3 << 30)  # sparse: 3 GB long, nothing on disk
    start = time.perf_counter()
    with pytest.raises(ValueError, match=f"{3 << 30} bytes, too large for a config \\(limit {MAX_CFG_BYTES}\\)"):
        HookedSAE.load(tmp_path / "sae")
    assert time.perf_counter() - start < 1  # reading 3 GB would take seconds


def test_a_deeply_nested_cfg_is_one_value_error(originals, tmp_path):
    for depth in (40, 100_000):
        shutil.rmtree(tmp_path / "sae", ignore_errors=True)
        shutil.copytree(originals["topk", "saelens"], tmp_path / "sae")
        (tmp_path / "sae" / "cfg.json").write_text('{"metadata": ' + "[" * depth + "]" * depth + "}")
        with pytest.raises(ValueError, match="nested|not valid JSON"):
            HookedSAE.load(tmp_path / "sae")


@pytest.mark.parametrize("kind,match", [("directory", "is a directory, not a file"),
                                        ("fifo", "is not a regular file"),
                                        ("loop", "cannot be read .*Too many levels of symbolic links"),
                                        ("dangling", "missing \\(a symlink to nothing\\)")])
@pytest.mark.parametrize("target", ["cfg.json", "sae_weights.safetensors"])
def test_a_cfg_that_is_not_a_file_is_named_for_what_it_is(originals, tmp_path, kind, match, target):
    shutil.copytree(originals["topk", "saelens"], tmp_path / "sae")
    path = tmp_path / "sae" / target
    path.unlink()
    if kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)  # opening it to read would wait for a writer forever
    elif kind == "loop":
        os.symlink(path, path)
    else:
        os.symlink(tmp_path / "nowhere", path)
    with pytest.raises(ValueError, match=match) as e:
        HookedSAE.load(tmp_path / "sae")
    assert str(path) in str(e.value)
