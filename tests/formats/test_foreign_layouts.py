"""Published SAEs in other libraries' layouts: each file is written here in that layout,
opened by minisae, and its codes and reconstructions compared, to 1e-5 relative, with the
library's own forward written out from its source as a naive reference:

    Gemma Scope params.npz      the tutorial: f = 1[pre > threshold] ReLU(pre), pre = x W_enc + b_enc
    openai/sparse_autoencoder   latents = ReLU(encoder(x - pre_bias) + latent_bias)
    dictionary_learning ae.pt   f = ReLU(encoder(x - bias)); TopK / BatchTopK on ReLU(encoder(x - b_dec))
    SAELens with scaling_factor an all-ones tensor is dropped, as SAELens drops it

and what cannot be read as it is meant (openai's TopK files, which layer-normalise their
input; a sparsify run folder of several hook points) is one ValueError saying why.
"""

import json

import numpy as np
import pytest
import torch

from minisae import formats
from minisae.models.safetensors import load_safetensors, save_safetensors
from minisae.pipeline.hooked_sae import HookedSAE

D, F = 16, 48


def close(a, b, rel=1e-5):
    return (a - b).abs().max().item() <= rel * max(b.abs().max().item(), 1e-30)


def randn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


X = randn(400, D, seed=99, scale=2.0)  # (B, D) raw activations


# ---------------------------------------------------------------- Gemma Scope

def gemma_params(seed=1):
    return {"W_enc": randn(D, F, seed=seed) / 2, "W_dec": randn(F, D, seed=seed + 1) / 4,
            "b_enc": randn(F, seed=seed + 2) / 2, "b_dec": randn(D, seed=seed + 3),
            "threshold": torch.rand(F, generator=torch.Generator().manual_seed(seed + 4)) * 1.2 - 0.1}


def gemma_tutorial(p, x):
    """The Gemma Scope tutorial's JumpReLUSAE.encode / decode, in float64."""
    p = {k: v.double() for k, v in p.items()}
    pre = x.double() @ p["W_enc"] + p["b_enc"]  # (B, F)
    acts = (pre > p["threshold"]) * torch.relu(pre)
    return acts, acts @ p["W_dec"] + p["b_dec"]


def test_gemma_scope_params_npz(tmp_path):
    folder = tmp_path / "gemma-scope-2b-pt-res" / "layer_20" / "width_16k" / "average_l0_71"
    folder.mkdir(parents=True)
    p = gemma_params()
    np.savez(folder / "params.npz", **{k: v.numpy() for k, v in p.items()})
    f_ref, x_ref = gemma_tutorial(p, X)
    assert (f_ref != 0).any() and (f_ref == 0).any()
    for path in (folder, folder / "params.npz"):
        sae, meta = formats.load(path)
        assert meta["layout"] == "npz" and meta["hook"] == "blocks.20.hook_resid_post"
        with torch.no_grad():
            f = sae.encode(X)
            assert close(f, f_ref.float()) and ((f != 0) == (f_ref != 0)).float().mean() > 0.999
            assert close(sae.decode(f), x_ref.float())
    formats.convert(folder, tmp_path / "as_saelens")  # and rewritten in SAELens's layout, alike
    again, _ = formats.load(tmp_path / "as_saelens")
    with torch.no_grad():
        assert close(again.encode(X), f_ref.float())


@pytest.mark.parametrize("change,match", [
    (lambda p: p.pop("threshold"), r"holds exactly \['W_enc'"),
    (lambda p: p.update(extra=np.zeros(3)), r"holds exactly"),
    (lambda p: p.update(b_enc=np.zeros(F + 1, np.float32)), r"b_enc is \[49\] float32"),
    (lambda p: p.update(threshold=np.zeros(F, np.int64)), r"threshold is \[48\] int64"),
    (lambda p: p.update(threshold=np.array([object()] * F)), r"threshold is \[48\] object"),
    (lambda p: p["W_dec"].__setitem__((0, 0), np.nan), "W_dec holds NaN"),
])
def test_a_damaged_params_npz_is_one_value_error(tmp_path, change, match):
    p = {k: v.numpy().copy() for k, v in gemma_params().items()}
    change(p)
    np.savez(tmp_path / "params.npz", **p)
    with pytest.raises(ValueError, match=match) as e:
        formats.load(tmp_path / "params.npz")
    assert str(tmp_path / "params.npz") in str(e.value)


def test_a_file_that_is_not_a_zip_is_one_value_error(tmp_path):
    (tmp_path / "params.npz").write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(ValueError, match="not a readable .npz file"):
        formats.load(tmp_path)


# ---------------------------------------------------------------- openai/sparse_autoencoder

def openai_state(activation="ReLU", seed=2):
    """What their Autoencoder(n_latents=F, n_inputs=D).state_dict() holds."""
    sd = {"pre_bias": randn(D, seed=seed), "encoder.weight": randn(F, D, seed=seed + 1) / 2,
          "latent_bias": randn(F, seed=seed + 2) / 2, "decoder.weight": randn(D, F, seed=seed + 3) / 4,
          "stats_last_nonzero": torch.zeros(F, dtype=torch.long), "latents_activation_frequency": torch.ones(F),
          "latents_mean_square": torch.zeros(F), "activation": activation}
    sd["activation_state_dict"] = {"k": 8, "postact_fn": "ReLU"} if activation == "TopK" else {}
    return sd


def openai_forward(sd, x):
    """Their Autoencoder.encode / decode with normalize=False (every ReLU file)."""
    latents = torch.relu((x - sd["pre_bias"]) @ sd["encoder.weight"].T + sd["latent_bias"])  # (B, F)
    return latents, latents @ sd["decoder.weight"].T + sd["pre_bias"]


def test_openai_relu_state_dict(tmp_path):
    sd = openai_state()
    torch.save(sd, tmp_path / "6.pt")
    sae, meta = formats.load(tmp_path / "6.pt")
    f_ref, x_ref = openai_forward(sd, X)
    with torch.no_grad():
        f = sae.encode(X)
        assert (f_ref != 0).any() and close(f, f_ref) and close(sae.decode(f), x_ref)
    assert meta["origin"] == "openai" and meta["hook"] is None


def test_openai_topk_files_are_refused_with_the_reason(tmp_path):
    torch.save(openai_state("TopK"), tmp_path / "v5.pt")
    with pytest.raises(ValueError, match="layer-normalised"):
        formats.load(tmp_path / "v5.pt")


# ---------------------------------------------------------------- dictionary_learning

def dl_state(cls, seed=3, k=6, threshold=0.4):
    bias = "bias" if cls == "AutoEncoder" else "b_dec"
    sd = {bias: randn(D, seed=seed), "encoder.weight": randn(F, D, seed=seed + 1) / 2,
          "encoder.bias": randn(F, seed=seed + 2) / 2, "decoder.weight": randn(D, F, seed=seed + 3) / 4}
    if cls != "AutoEncoder":
        sd.update(k=torch.tensor(k, dtype=torch.int), threshold=torch.tensor(threshold))
    return sd


def dl_forward(cls, sd, x):
    """Their AutoEncoder / AutoEncoderTopK / BatchTopKSAE encode (defaults) and decode."""
    bias = sd["bias"] if cls == "AutoEncoder" else sd["b_dec"]
    z = torch.relu((x - bias) @ sd["encoder.weight"].T + sd["encoder.bias"])  # (B, F)
    if cls == "AutoEncoderTopK":
        top = z.topk(int(sd["k"]), dim=-1)
        z = torch.zeros_like(z).scatter_(-1, top.indices, top.values)
    elif cls == "BatchTopKSAE":
        z = z * (z > sd["threshold"])
    return z, z @ sd["decoder.weight"].T + bias


@pytest.mark.parametrize("cls,config", [("AutoEncoder", False), ("AutoEncoder", True),
                                        ("AutoEncoderTopK", False), ("AutoEncoderTopK", True),
                                        ("BatchTopKSAE", True)])
def test_dictionary_learning_ae_pt(tmp_path, cls, config):
    sd = dl_state(cls)
    torch.save(sd, tmp_path / "ae.pt")
    if config:
        (tmp_path / "config.json").write_text(json.dumps({"trainer": {
            "dict_class": cls, "lm_name": "openai-community/gpt2", "layer": 3, "submodule_name": "resid_post_layer_3"}}))
    f_ref, x_ref = dl_forward(cls, sd, X)
    assert (f_ref != 0).any() and (f_ref == 0).any()
    for path in (tmp_path, tmp_path / "ae.pt"):
        sae, meta = formats.load(path)
        with torch.no_grad():
            f = sae.encode(X)
            assert close(f, f_ref) and close(sae.decode(f), x_ref)
        assert (meta["model"], meta["hook"]) == (("gpt2", "blocks.3.hook_resid_post") if config else (None, None))
    if config:
        assert HookedSAE.load(tmp_path).hook == "blocks.3.hook_resid_post"


@pytest.mark.parametrize("cls,state,match", [
    ("GatedAutoEncoder", "AutoEncoder", "'GatedAutoEncoder' .* is not supported"),
    ("BatchTopKSAE", "BatchTopKSAE-uncalibrated", "needs its inference threshold"),
    ("AutoEncoderTopK", "AutoEncoderTopK-bigk", "k = 99 is more than the 48 latents"),
])
def test_dictionary_learning_refusals(tmp_path, cls, state, match):
    sd = dl_state(state.split("-")[0], k=99 if "bigk" in state else 6,
                  threshold=-1.0 if "uncalibrated" in state else 0.4)
    torch.save(sd, tmp_path / "ae.pt")
    (tmp_path / "config.json").write_text(json.dumps({"trainer": {"dict_class": cls}}))
    with pytest.raises(ValueError, match=match):
        formats.load(tmp_path)


def test_an_unknown_pt_says_what_it_holds(tmp_path):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match=r"not an SAE file minisae knows .* it holds \['weights'\]"):
        formats.load(tmp_path / "x.pt")


# ---------------------------------------------------------------- sparsify runs, SAELens's scaling_factor

def test_a_sparsify_run_folder_names_its_hook_points(random_sae, tmp_path):
    for name in ("layers.0", "layers.6"):
        HookedSAE(random_sae("topk", 8, 16), None, None).save(tmp_path / "run" / name, layout="sparsify")
    with pytest.raises(ValueError, match=r"is not an SAE but holds 2 \(layers.0, layers.6\): name one"):
        formats.load(tmp_path / "run")
    assert formats.load(tmp_path / "run" / "layers.6")[1]["hook"] == "blocks.6.hook_resid_post"


@pytest.mark.parametrize("ones", [True, False])
def test_an_all_ones_scaling_factor_is_dropped_as_sae_lens_drops_it(random_sae, tmp_path, ones):
    HookedSAE(random_sae("relu", D, F, dtype=torch.float32), "gpt2", "blocks.1.hook_resid_pre").save(tmp_path / "s")
    plain, _ = formats.load(tmp_path / "s")
    w = tmp_path / "s" / "sae_weights.safetensors"
    t = {k: v.copy() for k, v in load_safetensors(w).items()}
    t["scaling_factor"] = np.ones(F, np.float32) if ones else np.full(F, 2.0, np.float32)
    save_safetensors(w, t)
    if not ones:
        with pytest.raises(ValueError, match="scaling_factor tensor that is not all ones"):
            formats.load(tmp_path / "s")
        return
    sae, _ = formats.load(tmp_path / "s")
    with torch.no_grad():
        assert torch.equal(sae.encode(X), plain.encode(X))
    sl = pytest.importorskip("sae_lens", reason="sae-lens not installed (pip install -e '.[formats]')")
    theirs = sl.SAE.load_from_disk(str(tmp_path / "s"))
    with torch.no_grad():
        assert close(sae.encode(X), theirs.encode(X))
