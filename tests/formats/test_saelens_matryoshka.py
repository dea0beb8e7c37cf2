"""Matryoshka BatchTopK in SAELens's layout, both ways with the real sae-lens.

SAELens saves a trained matryoshka_batchtopk SAE for inference as a jumprelu whose every
threshold is the global BatchTopK threshold, and records how it was trained in
metadata.training_architecture ("matryoshka_batchtopk") and
metadata.training_architecture_details (k, matryoshka_widths, ...). minisae writes the
same, so sae_lens's SAE.load_from_disk reads our file, and reads SAELens's back as a
Matryoshka SAE with its widths as prefixes. Their training loss is ours too: the same
weights give the same reconstruction terms, prefix by prefix.
"""

import json
import warnings

import pytest
import torch

from minisae import formats
from minisae.matryoshka import MatryoshkaBatchTopK
from minisae.sae import SAE

D, F, PREFIXES = 16, 32, (4, 12, 32)


def sae_lens():
    return pytest.importorskip("sae_lens", reason="sae-lens not installed (pip install -e '.[formats]')")


def close(a, b, rel=1e-5):
    """max |a - b| <= rel * max |b| (two libraries' float32 outputs)."""
    return (a - b).abs().max().item() <= rel * max(b.abs().max().item(), 1e-30)


def ours(seed=3, threshold=0.4):
    sae = SAE(D, F, MatryoshkaBatchTopK(F, k=4, prefixes=PREFIXES, threshold_momentum=0.05), seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(F, D, generator=g) * 0.5)
        sae.b_enc.copy_(torch.randn(F, generator=g) * 0.5)
        sae.b_dec.copy_(torch.randn(D, generator=g) * 0.5)
        sae.activation.threshold.fill_(threshold)
    return sae.eval()


def theirs_training(sl, seed=7, **cfg):
    """sae_lens's MatryoshkaBatchTopKTrainingSAE with every parameter random."""
    from sae_lens.saes.sae import SAEMetadata
    md = SAEMetadata(model_name="gpt2-small", hook_name="blocks.8.hook_resid_pre", prepend_bos=True)
    config = sl.MatryoshkaBatchTopKTrainingSAEConfig(d_in=D, d_sae=F, k=4, matryoshka_widths=list(PREFIXES),
                                                     metadata=md, **cfg)
    sae = sl.MatryoshkaBatchTopKTrainingSAE(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        sae.topk_threshold.fill_(0.3)
    return sae


def test_our_file_is_a_sae_lens_jumprelu_with_the_training_record(tmp_path):
    sl = sae_lens()
    sae, s = ours(), 2.5
    formats.save(sae, tmp_path / "m", "saelens", scale=s, model="gpt2", hook="blocks.2.hook_resid_pre")
    cfg = json.loads((tmp_path / "m" / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and cfg["metadata"]["training_architecture"] == "matryoshka_batchtopk"
    details = cfg["metadata"]["training_architecture_details"]
    assert details["matryoshka_widths"] == list(PREFIXES) and details["k"] == 4
    theirs = sl.SAE.load_from_disk(str(tmp_path / "m"))
    assert torch.equal(theirs.threshold, torch.full((F,), 0.4 / s))  # one global threshold, scale folded in
    x = torch.randn(256, D, generator=torch.Generator().manual_seed(1)) * 3  # raw activations
    with torch.no_grad():
        f = sae.encode(x * s) / s  # the code of the scaled SAE, in raw units
        f_theirs = theirs.encode(x)
        assert (f != 0).any() and (f == 0).any() and close(f_theirs, f)
        assert close(theirs.decode(f_theirs), sae.decode(f * s) / s)


def test_our_file_round_trips_as_matryoshka(tmp_path):
    sae = ours()
    formats.save(sae, tmp_path / "m", "saelens")
    back, meta = formats.load(tmp_path / "m")
    assert type(back.activation) is MatryoshkaBatchTopK and back.activation.prefixes == PREFIXES
    assert (back.activation.k, back.activation.threshold_momentum) == (4, 0.05)
    for name, p in sae.state_dict().items():
        if name != "samples_since_fired":
            assert torch.equal(back.state_dict()[name], p), name


@pytest.mark.parametrize("rescale", [True, False])
def test_sae_lens_file_loads_as_matryoshka(tmp_path, rescale):
    """SAELens's inference file of its trained Matryoshka SAE (decoder norms folded in where it
    rescaled by them): minisae reads it as a Matryoshka SAE that encodes and decodes alike."""
    sl = sae_lens()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trained = theirs_training(sl, rescale_acts_by_decoder_norm=rescale)
        trained.save_inference_model(str(tmp_path / "t"))
        theirs = sl.SAE.load_from_disk(str(tmp_path / "t"))
    back, meta = formats.load(tmp_path / "t")
    assert type(back.activation) is MatryoshkaBatchTopK and back.activation.prefixes == PREFIXES
    assert back.activation.k == 4 and meta["hook"] == "blocks.8.hook_resid_pre"
    x = torch.randn(256, D, generator=torch.Generator().manual_seed(2)) * 2
    with torch.no_grad():
        f = theirs.encode(x)
        assert (f != 0).any() and close(back.eval().encode(x), f)
        assert close(back.decode(f), theirs.decode(f))


def test_the_training_loss_is_sae_lens_s(tmp_path):
    """Same weights, same batch: SAELens's mse_loss is our recon, and its inner_mse_loss_m
    (one per inner width) sum to our prefixes term: the widths mean the same in both."""
    sl = sae_lens()
    from sae_lens.saes.sae import TrainStepInput
    theirs = theirs_training(sl, rescale_acts_by_decoder_norm=False)
    sae = SAE(D, F, MatryoshkaBatchTopK(F, k=4, prefixes=PREFIXES)).train()
    with torch.no_grad():
        sae.W_enc.copy_(theirs.W_enc.T)
        sae.b_enc.copy_(theirs.b_enc)
        sae.W_dec.copy_(theirs.W_dec)
        sae.b_dec.copy_(theirs.b_dec)
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(4)) * 2
    out = theirs.training_forward_pass(TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=None,
                                                      n_training_steps=0, is_logging_step=False))
    total, parts = sae.loss(x)
    assert torch.equal(parts["f"] > 0, out.feature_acts > 0)
    assert close(parts["recon"], out.losses["mse_loss"])
    inner = {m: out.losses[f"inner_mse_loss_{m}"] for m in PREFIXES[:-1]}
    assert close(parts["prefixes"], sum(inner.values())) and close(total, out.loss)
