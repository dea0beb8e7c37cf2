"""The same code on an accelerator: training, resampling (CPU generators), bf16 autocast,
scanning and the `lm` command give the CPU's results on `device` (tests/conftest.py:
$MINISAE_TEST_DEVICE, else CUDA if present; skipped with the reason otherwise).

float64 where the device has it (CUDA), so the comparison with the CPU is tight; MPS has
no float64, so there it is float32 against float32 with float32's tolerance."""

import json
import os
from pathlib import Path

import pytest
import torch

from minisae.sae import make_sae
from minisae.train import TrainConfig, train

pytestmark = pytest.mark.device

D, F, B, STEPS = 16, 64, 64, 120


def precision(device):
    return (torch.float32, dict(rtol=1e-4, atol=1e-5)) if device.type == "mps" else \
        (torch.float64, dict(rtol=1e-9, atol=1e-10))


def trained(variant, device, dtype, bf16=False):
    sae = make_sae(variant, D, F, seed=1, **({"k": 2, "dead_after": B * 10} if variant == "topk" else {}))
    sae = sae.to(device, dtype)
    with torch.no_grad():
        sae.b_enc[:8] = -50.0  # dead from the start: resampled (ReLU) or pulled by AuxK (TopK)
    data = torch.randn(STEPS, B, D, generator=torch.Generator().manual_seed(0), dtype=dtype).to(device)
    cfg = TrainConfig(n_samples=STEPS * B, batch_size=B, lr=3e-3, log_every=20, bf16=bf16,
                      resample_every=40 if variant == "relu" else 0, resample_dead_after=B * 10)
    out = train(sae, iter(data), cfg, log=False)
    return sae, out


@pytest.mark.parametrize("variant", ["relu", "topk"])
def test_training_on_the_device_equals_the_cpu(device, variant):
    dtype, tol = precision(device)
    on_device, _ = trained(variant, device, dtype)
    on_cpu, _ = trained(variant, torch.device("cpu"), dtype)
    for (name, a), b in zip(on_device.state_dict().items(), on_cpu.state_dict().values()):
        assert a.device.type == device.type, name
        torch.testing.assert_close(a.cpu(), b, **tol, msg=name)
    if variant == "relu":  # resampling drew the same inputs with the CPU generator
        assert not torch.allclose(on_cpu.b_enc[:8], torch.full((8,), -50.0, dtype=dtype))


def test_bf16_autocast_on_the_device(device):
    if device.type == "cpu":
        pytest.skip("bf16 autocast on the CPU is covered by tests/core/test_train.py")
    sae, out = trained("topk", device, torch.float32, bf16=True)
    assert torch.isfinite(torch.tensor(out["history"][-1]["loss"]))
    assert sae.W_enc.dtype == torch.float32  # weights and Adam stay float32


def test_scan_on_the_device_equals_the_cpu(device, gpt2):
    from minisae.interp.features import scan
    from minisae.pipeline.hooked_sae import HookedSAE
    hook = "blocks.1.hook_resid_post"
    sae = make_sae("relu", 64, 96, seed=0)
    with torch.no_grad():
        sae.b_enc.fill_(-1.0)
    ctx = torch.randint(0, 50257, (6, 16), generator=torch.Generator().manual_seed(0))
    cpu = scan(gpt2, HookedSAE(sae, "gpt2-random", hook, 30.0), ctx, [0, 5], k=3, verbose=False)
    import copy
    model = copy.deepcopy(gpt2).to(device).eval()
    dev = scan(model, HookedSAE(copy.deepcopy(sae).to(device), "gpt2-random", hook, 30.0), ctx, [0, 5], k=3,
               verbose=False)
    torch.testing.assert_close(torch.tensor(dev[0]["density"]), torch.tensor(cpu[0]["density"]))
    assert [e["context"] for e in dev[1].result(0)] == [e["context"] for e in cpu[1].result(0)]


@pytest.mark.skipif(not (os.environ.get("MINISAE_GPT2_TOKENIZER_DIR") and
                         (Path(os.environ["MINISAE_GPT2_TOKENIZER_DIR"]) / "encoder.json").exists()),
                    reason="set MINISAE_GPT2_TOKENIZER_DIR to a folder with GPT-2's encoder.json + vocab.bpe")
def test_lm_command_on_the_device(device, tmp_path, monkeypatch):
    from minisae.cli import main
    monkeypatch.setenv("MINISAE_CACHE", str(tmp_path / "cache"))
    args = ["lm", "--model", "gpt2-random", "--layer", "1", "--site", "resid_post", "--tokens", "4096",
            "--collect-tokens", "2048", "--variants", "topk", "--sweep", "topk:k=4", "--expansion", "2",
            "--batch-size", "256", "--eval-tokens", "1024"]
    main(args + ["--device", str(device), "--out", str(tmp_path / "dev")])
    main(args + ["--device", "cpu", "--out", str(tmp_path / "cpu")])
    dev, cpu = (json.loads((tmp_path / d / "lm_results.json").read_text()) for d in ("dev", "cpu"))
    assert dev["device"].startswith(device.type) and cpu["device"] == "cpu"
    assert dev["rows"][0]["l0"] == 4.0
    for key in ("fvu", "ce_clean", "ce_sae"):  # float32 on both: the same run up to rounding
        assert dev["rows"][0][key] == pytest.approx(cpu["rows"][0][key], rel=1e-3), key


def test_links_and_explain_codes_on_the_device_equal_the_cpu(device, gpt2):
    """The two other readers of a hooked SAE: links' ablation edges (model, SAE A and SAE B
    on the device) and explain's codes of stored activations (activations on the CPU, SAE
    on the device)."""
    import copy
    from minisae.autointerp.explain import hook_activations, latent_codes
    from minisae.pipeline.hooked_sae import HookedSAE
    from minisae.interp.links import ablation_edges
    sae_a, sae_b = make_sae("relu", 64, 96, seed=0), make_sae("relu", 64, 80, seed=1)
    ha = HookedSAE(sae_a, "gpt2-random", "blocks.1.hook_resid_post", 30.0)
    hb = HookedSAE(sae_b, "gpt2-random", "blocks.2.hook_resid_post", 30.0)
    ctx = torch.randint(0, 50257, (5, 12), generator=torch.Generator().manual_seed(1))
    cpu_edges = ablation_edges(gpt2, ha, hb, ctx, [0, 3, 7], verbose=False)
    x = hook_activations(gpt2, ha.hook, ctx)  # (N, T-1, D) on the CPU
    cpu_stats, cpu_codes = latent_codes(ha, x, [0, 3])
    model = copy.deepcopy(gpt2).to(device).eval()
    da, db = (HookedSAE(copy.deepcopy(h.sae).to(device), h.model_name, h.hook, h.scale) for h in (ha, hb))
    dev_edges = ablation_edges(model, da, db, ctx, [0, 3, 7], verbose=False)
    dev_stats, dev_codes = latent_codes(da, x, [0, 3])
    assert dev_edges.device.type == "cpu" and dev_codes.device.type == "cpu"
    torch.testing.assert_close(dev_edges, cpu_edges, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dev_codes, cpu_codes, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.tensor(dev_stats["density"]), torch.tensor(cpu_stats["density"]))
