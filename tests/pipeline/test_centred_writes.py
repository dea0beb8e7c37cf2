"""center_writing_weights (TransformerLens, SAELens's GPT-2 residual SAEs), checked on a
random GPT-2 (minisae/pipeline/hooked_sae.py states the argument).

We centre the model's writing weights ourselves, over d_model: W_E (wte), W_pos (wpe),
and each attention and MLP c_proj's output columns and bias, keeping an untied copy of the
raw unembedding as TransformerLens does. Then, at every hook point, the centred model's
activation is the raw model's minus its mean over d_model, with the same logits; an SAE
whose SAELens metadata says center_writing_weights gives, on the raw model through
minisae, the codes the same SAE without the flag gives on the centred model; and spliced
in, the two give the same logits (and, LayerNorm reading every write, so does a splice
that leaves the mean out)."""

import copy
import types

import pytest
import torch
import torch.nn.functional as F

from minisae import formats
from minisae.models.gpt2 import CONFIGS, GPT2
from minisae.pipeline.hooked_sae import HookedSAE, centre_encoder_

HOOK = "blocks.2.hook_resid_pre"
FLAG = {"model_from_pretrained_kwargs": {"center_writing_weights": True}}


@pytest.fixture(scope="module")
def models():
    """(raw, centred) GPT-2s in float64, every parameter random (LayerNorm gains and biases too)."""
    torch.manual_seed(0)
    raw = GPT2(CONFIGS["gpt2-random"]).double().eval()
    with torch.no_grad():
        for name, p in raw.named_parameters():
            gain = name.endswith(("ln_1.weight", "ln_2.weight")) or name == "ln_f.weight"
            p.copy_(1 + 0.2 * torch.randn_like(p) if gain else 0.1 * torch.randn_like(p))
        p_raw_wte = raw.wte.weight.clone()
    centred = copy.deepcopy(raw)
    with torch.no_grad():
        for emb in (centred.wte, centred.wpe):  # (V, D), (n_ctx, D): each vector centred
            emb.weight.sub_(emb.weight.mean(-1, keepdim=True))
        for block in centred.h:
            for proj in (block.attn.c_proj, block.mlp.c_proj):  # nn.Linear: weight (D, in), bias (D,)
                proj.weight.sub_(proj.weight.mean(0, keepdim=True))
                proj.bias.sub_(proj.bias.mean())
    centred.lm_head = types.MethodType(lambda self, x: F.linear(x, p_raw_wte), centred)  # W_U stays untied, raw
    return raw, centred


@pytest.fixture(scope="module")
def idx():
    return torch.randint(0, 50257, (3, 12), generator=torch.Generator().manual_seed(1))


def test_the_centred_residual_is_the_raw_one_minus_its_mean(models, idx):
    raw, centred = models
    for name in raw.hook_names():
        if name.endswith("hook_normalized"):
            continue  # after a LayerNorm: the same in both models
        x, x_c = raw(idx, stop_at=name), centred(idx, stop_at=name)  # (B, T, D)
        assert torch.allclose(x_c, x - x.mean(-1, keepdim=True), atol=1e-10), name
        assert not torch.allclose(x_c, x, atol=1e-3), name  # the means are not zero: the check has teeth
    assert torch.allclose(raw(idx), centred(idx), atol=1e-9)  # the same logits


@pytest.mark.parametrize("variant", ["relu", "topk", "jumprelu", "gated", "batchtopk"])
def test_a_centred_sae_reads_the_raw_model_as_the_centred_one(models, idx, tmp_path, random_sae, variant):
    raw, centred = models
    sae = random_sae(variant, 64, 128, dtype=torch.float32)
    with torch.no_grad():
        sae.b_dec.add_(1.0)  # a decoder bias with a clear mean: the fold's bias term matters
    formats.save(sae, tmp_path / "flag", model="gpt2-random", hook=HOOK, saelens_metadata=FLAG)
    formats.save(sae, tmp_path / "plain", model="gpt2-random", hook=HOOK)
    flagged, plain = HookedSAE.load(tmp_path / "flag"), HookedSAE.load(tmp_path / "plain")
    assert flagged.centred and not plain.centred
    flagged.check_model(raw)
    x, x_c = raw(idx, stop_at=HOOK).float(), centred(idx, stop_at=HOOK).float()  # (B, T, D)

    f_raw, keep = flagged.encode_positions(x)  # through minisae, on the raw model
    f_c, keep_c = plain.encode_positions(x_c)  # the same SAE, without the flag, on the centred model
    assert torch.equal(keep, keep_c) and f_raw.abs().sum() > 0
    assert torch.allclose(f_raw, f_c, atol=1e-4), (f_raw - f_c).abs().max()
    assert not torch.allclose(plain.encode_positions(x)[0], f_c, atol=1e-2)  # without the flag: other codes
    assert torch.allclose(flagged.sae.encode(x.reshape(-1, 64)), plain.sae.encode(x_c.reshape(-1, 64)), atol=1e-4)

    # spliced in: the raw model with the flagged SAE == the centred model with the plain one
    splice = lambda h: (lambda a: h.reconstruct_raw(a.reshape(-1, 64)).view(a.shape).to(a))
    logits_raw = raw(idx, hooks={HOOK: splice(flagged)})
    logits_c = centred(idx, hooks={HOOK: splice(plain)})
    assert torch.allclose(logits_raw, logits_c, atol=1e-4), (logits_raw - logits_c).abs().max()
    assert not torch.allclose(logits_raw, raw(idx), atol=1e-3)  # the splice changed something
    # the added mean makes the error the same vector in both streams ...
    err_raw = flagged.reconstruct_raw(x.reshape(-1, 64)) - x.reshape(-1, 64)
    err_c = plain.reconstruct_raw(x_c.reshape(-1, 64)) - x_c.reshape(-1, 64)
    assert torch.allclose(err_raw, err_c, atol=1e-4)
    # ... and LayerNorm, reading every write, ignores it: leaving it out changes no logit
    no_mean = raw(idx, hooks={HOOK: lambda a: flagged.decode_raw(flagged.encode_raw(a.reshape(-1, 64))).view(a.shape)
                              .to(a)})
    assert torch.allclose(no_mean, logits_raw, atol=1e-4)


@pytest.mark.parametrize("variant", ["relu", "gated"])
def test_the_fold_is_idempotent_and_survives_a_round_trip(tmp_path, random_sae, variant):
    sae = random_sae(variant, 16, 32, dtype=torch.float64)
    once = centre_encoder_(copy.deepcopy(sae))
    twice = centre_encoder_(copy.deepcopy(once))
    for (name, a), (_, b) in zip(once.state_dict().items(), twice.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-12), name
    x = torch.randn(20, 16, dtype=torch.float64)
    assert torch.allclose(once.encode(x), sae.encode(x - x.mean(-1, keepdim=True)), atol=1e-10)
    # saved with the flag (convert keeps SAELens's metadata), read back: the same codes
    h = HookedSAE(sae.float(), "gpt2", HOOK, extra={"saelens_metadata": FLAG})
    h.save(tmp_path / "s")
    again = HookedSAE.load(tmp_path / "s")
    assert again.centred
    assert torch.allclose(again.encode_raw(x), h.encode_raw(x), atol=1e-5)


def test_a_centred_sae_is_refused_on_a_model_without_layernorm(random_sae):
    h = HookedSAE(random_sae("relu", 8, 16, dtype=torch.float32), "smollm2", "blocks.0.hook_resid_pre",
                  extra={"saelens_metadata": FLAG})
    rms = types.SimpleNamespace(hook_names=lambda: ["blocks.0.hook_resid_pre"], d_model=8,
                                norm=torch.nn.Module())  # a Llama: its final norm is RMSNorm, no ln_f
    with pytest.raises(ValueError, match="only under LayerNorm"):
        h.check_model(rms)


def test_prepend_bos_false_is_refused_in_one_line(random_sae):
    h = HookedSAE(random_sae("relu", 8, 16, dtype=torch.float32), "gpt2", "blocks.0.hook_resid_pre",
                  extra={"saelens_metadata": {"prepend_bos": False}})
    with pytest.raises(ValueError, match="prepend_bos: false") as e:
        h.check_site()
    assert "\n" not in str(e.value)
