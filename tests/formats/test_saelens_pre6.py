"""SAELens configs written before 6.0, read as SAELens reads them.

Before SAELens 6 a TopK SAE was an "architecture": "standard" config whose
`activation_fn_str` was "topk" with `activation_fn_kwargs: {"k": K}` (SAEBench's published
TopK SAEs are written so). SAELens's handle_config_defaulting turns such a config into a
TopK one; minisae must too, not read it as a ReLU SAE. Each file here is loaded by the real
sae_lens and by minisae, and the codes compared to 1e-5 relative.
"""

import json

import pytest
import torch

from minisae import formats
from minisae.models.safetensors import save_safetensors

D, F, K = 16, 64, 8


def close(a, b, rel=1e-5):
    return (a - b).abs().max().item() <= rel * max(b.abs().max().item(), 1e-30)


def old_file(path, **cfg):
    """A SAELens directory whose cfg.json has the pre-6 top-level fields, random weights."""
    g = torch.Generator().manual_seed(5)
    t = {"W_enc": torch.randn(D, F, generator=g), "W_dec": torch.randn(F, D, generator=g) / 4,
         "b_enc": torch.randn(F, generator=g) / 2, "b_dec": torch.randn(D, generator=g) / 2}
    base = {"architecture": "standard", "d_in": D, "d_sae": F, "dtype": "float32", "device": "cpu",
            "model_name": "gpt2-small", "hook_name": "blocks.8.hook_resid_pre", "hook_layer": 8,
            "hook_head_index": None, "activation_fn_str": "topk", "activation_fn_kwargs": {"k": K},
            "apply_b_dec_to_input": True, "finetuning_scaling_factor": False, "context_size": 128,
            "prepend_bos": True, "normalize_activations": "none", "dataset_path": "monology/pile-uncopyrighted"}
    path.mkdir()
    save_safetensors(path / "sae_weights.safetensors", {k: v.numpy() for k, v in t.items()})
    (path / "cfg.json").write_text(json.dumps({**base, **cfg}))
    return path


@pytest.mark.formats
@pytest.mark.parametrize("extra", [{}, {"sae_lens_version": "5.10.2"}, {"sae_lens_version": "3.13.0"},
                                   {"activation_fn": "topk"}])
def test_a_pre_6_topk_config_is_a_topk_sae(extra, tmp_path):
    sl = pytest.importorskip("sae_lens", reason="sae-lens not installed (pip install -e '.[formats]')")
    path = old_file(tmp_path / "sae", **extra)
    if "activation_fn" in extra:  # written with the 6.x key name, still without a version
        cfg = json.loads((path / "cfg.json").read_text())
        del cfg["activation_fn_str"]
        (path / "cfg.json").write_text(json.dumps(cfg))
    theirs = sl.SAE.load_from_disk(str(path))
    ours, meta = formats.load(path)
    assert type(theirs).__name__ == "TopKSAE" and type(ours.activation).__name__ == "TopK"
    assert ours.activation.k == K and meta["hook"] == "blocks.8.hook_resid_pre" and meta["model"] == "gpt2"
    x = torch.randn(300, D, generator=torch.Generator().manual_seed(1)) * 2
    with torch.no_grad():
        f, f_ours = theirs.encode(x), ours.encode(x)
        assert close(f_ours, f) and ((f_ours != 0).sum(-1) <= K).all() and ((f_ours != 0).sum(-1) == K).any()
        assert close(ours.decode(f_ours), theirs.decode(f))


@pytest.mark.formats
def test_a_6x_config_keeps_its_architecture(tmp_path):
    """From 6.0 on, `architecture` is the whole truth: SAELens reads a "standard" config as a
    ReLU SAE whatever an old activation_fn_str says, and so does minisae."""
    sl = pytest.importorskip("sae_lens", reason="sae-lens not installed (pip install -e '.[formats]')")
    path = old_file(tmp_path / "sae", sae_lens_version="6.2.0")
    theirs = sl.SAE.load_from_disk(str(path))
    ours, _ = formats.load(path)
    assert type(theirs).__name__ == "StandardSAE" and type(ours.activation).__name__ == "ReLU"
    x = torch.randn(300, D, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert close(ours.encode(x), theirs.encode(x))


@pytest.mark.parametrize("cfg,match", [
    ({"activation_fn_str": "tanh-relu"}, "activation_fn 'tanh-relu' is not supported"),
    ({"activation_fn_kwargs": {"k": 4.5}}, "k must be a positive integer"),
    ({"activation_fn_kwargs": {"k": F + 1}}, "more than d_sae"),
    ({"activation_fn_kwargs": [32]}, "activation_fn_kwargs must be a JSON object"),
    ({"sae_lens_version": 5}, "sae_lens_version must be a version string"),
])
def test_what_a_pre_6_config_cannot_mean_is_refused(cfg, match, tmp_path):
    """An old activation SAELens 6 would drop (and so read silently as ReLU) is refused."""
    path = old_file(tmp_path / "sae", **cfg)
    with pytest.raises(ValueError, match=match) as e:
        formats.load(path)
    assert str(path / "cfg.json") in str(e.value)


@pytest.mark.formats
@pytest.mark.parametrize("version", [None, "6.3.1"])
def test_convert_carries_saelens_metadata_through(tmp_path, version):
    """What minisae does not use from SAELens's metadata is written back unchanged; only a
    pre-6 version is replaced, since the file convert writes is in the 6.x layout."""
    sl = pytest.importorskip("sae_lens", reason="sae-lens not installed (pip install -e '.[formats]')")
    extra = {"neuronpedia_id": "gpt2-small/8-res-jb", "seqpos_slice": [1, None], "exclude_special_tokens": [50256],
             "model_from_pretrained_kwargs": {"center_writing_weights": False}, "prepend_bos": False,
             "context_size": 64}
    if version:
        extra["sae_lens_version"] = version
    path = old_file(tmp_path / "sae", **extra)
    formats.convert(path, tmp_path / "copy")
    md = json.loads((tmp_path / "copy" / "cfg.json").read_text())["metadata"]
    for key, value in {**extra, "dataset_path": "monology/pile-uncopyrighted", "model_name": "gpt2-small"}.items():
        assert md[key] == value, key
    assert md["sae_lens_version"] == (version or "6.0.0") and md["hook_name"] == "blocks.8.hook_resid_pre"
    theirs = sl.SAE.load_from_disk(str(tmp_path / "copy"))
    assert theirs.cfg.metadata.neuronpedia_id == "gpt2-small/8-res-jb" and theirs.cfg.metadata.prepend_bos is False
    x = torch.randn(100, D, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert close(theirs.encode(x), formats.load(path)[0].encode(x))


def test_an_sae_trained_without_bos_is_refused_before_a_model(tmp_path, gpt2):
    """minisae's contexts always start with BOS: an SAE whose metadata says prepend_bos
    false would read other activations than it was trained on; it opens (and converts),
    but is refused before a model is loaded for it. One whose model was loaded with
    center_writing_weights is read on minisae's GPT-2 with its input centred
    (tests/pipeline/test_centred_writes.py checks the model side)."""
    from minisae.pipeline.hooked_sae import HookedSAE
    g = torch.Generator().manual_seed(0)
    path = tmp_path / "sae"
    path.mkdir()
    save_safetensors(path / "sae_weights.safetensors", {
        "W_enc": torch.randn(64, 128, generator=g).numpy(), "W_dec": torch.randn(128, 64, generator=g).numpy(),
        "b_enc": torch.zeros(128).numpy(), "b_dec": torch.randn(64, generator=g).numpy()})
    x = torch.randn(10, 64, generator=g)
    for bos, centered, match in ((True, False, None), (False, False, "prepend_bos: false"), (True, True, None)):
        (path / "cfg.json").write_text(json.dumps({
            "architecture": "standard", "d_in": 64, "d_sae": 128, "sae_lens_version": "6.1.0",
            "metadata": {"model_name": "gpt2", "hook_name": "blocks.1.hook_resid_pre", "prepend_bos": bos,
                         "model_from_pretrained_kwargs": {"center_writing_weights": centered}}}))
        hsae = HookedSAE.load(path)
        if match is None:
            hsae.check_site("gpt2").check_model(gpt2)
            x_in = x - x.mean(-1, keepdim=True) if centered else x
            assert hsae.centred == centered
            assert torch.allclose(hsae.encode_raw(x), formats.load(path)[0].encode(x_in), atol=1e-4)
        else:
            with pytest.raises(ValueError, match=match):
                hsae.check_site("gpt2")  # before any model is loaded
