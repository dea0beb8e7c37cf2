"""GPT-2: parity with Hugging Face `transformers` on random weights (logits and every hook
point), hook semantics, the weight loader's checks, and the download cache (file:// URLs)."""

import importlib.util
import os

import numpy as np
import pytest
import torch

from minisae.models import load_model
from minisae.models.gpt2 import CONFIGS, GPT2, load_gpt2, load_weights_
from minisae.models.hub import cached_path, download
from minisae.models.safetensors import save_safetensors

needs_transformers = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                        reason="`transformers` (the reference GPT-2) is not installed")
needs_tokenizer = pytest.mark.skipif(
    not os.environ.get("MINISAE_GPT2_TOKENIZER_DIR"),
    reason="set MINISAE_GPT2_TOKENIZER_DIR to a dir with GPT-2's encoder.json + vocab.bpe")
CFG = CONFIGS["gpt2-random"]
SITES = ("resid_pre", "attn_out", "resid_mid", "mlp_in", "mlp_out", "resid_post")


@pytest.fixture(scope="module")
def hf_model():
    """A randomly initialised HF GPT2LMHeadModel the size of gpt2-random. All parameters,
    LayerNorm gains and biases included, are perturbed so a mis-mapped one shows up."""
    transformers = pytest.importorskip("transformers", reason="`transformers` (the reference GPT-2) is not installed")
    config = transformers.GPT2Config(n_layer=CFG.n_layer, n_head=CFG.n_head, n_embd=CFG.d_model,
                                     n_positions=CFG.n_ctx, vocab_size=CFG.vocab_size)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel._from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def save_hf_checkpoint(hf, path, prefix="transformer.", drop=(), reshape=None):
    """The HF state dict as a safetensors file, keys and Conv1D (in, out) layout as HF
    writes them, plus the causal-mask buffers old checkpoints carry."""
    tensors = {}
    for key, t in hf.state_dict().items():
        key = prefix + key[len("transformer."):] if key.startswith("transformer.") else key
        if key not in drop:
            tensors[key] = t.clone()
    for layer in range(hf.config.n_layer):
        tensors[f"{prefix}h.{layer}.attn.bias"] = torch.tril(torch.ones(1, 1, 8, 8))
        tensors[f"{prefix}h.{layer}.attn.masked_bias"] = torch.tensor(-1e4)
    if reshape:
        key, shape = reshape
        tensors[key] = torch.zeros(shape)
    save_safetensors(path, tensors)
    return path


def hf_activations(hf, idx):
    """Logits and the six hook-point activations per layer, read from HF's modules; mlp_in
    (ln2.hook_normalized) is HF's resid_mid normalised by a naive float64 LayerNorm without
    weight and bias, and "mlp_input" what HF's MLP reads (ln_2's output)."""
    acts, handles = {}, []
    first = lambda out: out[0] if isinstance(out, tuple) else out
    for layer, block in enumerate(hf.transformer.h):
        name = f"blocks.{layer}.hook_"
        handles += [
            block.register_forward_pre_hook(lambda m, args, kw, n=name: acts.__setitem__(
                n + "resid_pre", (args or (kw["hidden_states"],))[0]), with_kwargs=True),
            block.attn.register_forward_hook(lambda m, a, out, n=name: acts.__setitem__(n + "attn_out", first(out))),
            block.ln_2.register_forward_pre_hook(lambda m, args, n=name: acts.__setitem__(n + "resid_mid", args[0])),
            block.mlp.register_forward_pre_hook(lambda m, args, n=name: acts.__setitem__(n + "mlp_input", args[0])),
            block.mlp.register_forward_hook(lambda m, a, out, n=name: acts.__setitem__(n + "mlp_out", first(out))),
            block.register_forward_hook(lambda m, a, out, n=name: acts.__setitem__(n + "resid_post", first(out))),
        ]
    with torch.no_grad():
        out = hf(idx, output_hidden_states=True)
    for h in handles:
        h.remove()
    for layer, block in enumerate(hf.transformer.h):
        x = acts[f"blocks.{layer}.hook_resid_mid"].double()  # (B, T, D)
        centred = x - x.mean(-1, keepdim=True)
        n = centred / (centred.pow(2).mean(-1, keepdim=True) + block.ln_2.eps).sqrt()
        acts[f"blocks.{layer}.ln2.hook_normalized"] = n.float()
    return out.logits, out.hidden_states, acts


@pytest.fixture(scope="module")
def ours(hf_model, tmp_path_factory):
    path = save_hf_checkpoint(hf_model, tmp_path_factory.mktemp("ckpt") / "model.safetensors")
    return load_weights_(GPT2(CFG), path).eval()


def tokens(B=2, T=12, seed=0):
    return torch.randint(0, CFG.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parity
@needs_transformers
def test_logits_and_every_hook_point_match_hf(hf_model, ours):
    idx = tokens()
    ref_logits, hidden, ref_acts = hf_activations(hf_model, idx)
    acts = {}
    hooks = {n: (lambda x, n=n: acts.__setitem__(n, x)) for n in ours.hook_names()}
    with torch.no_grad():
        logits = ours(idx, hooks=hooks)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    mlp_input = {name: ref_acts.pop(name) for name in list(ref_acts) if name.endswith("mlp_input")}
    assert acts.keys() == ref_acts.keys() == set(ours.hook_names())
    for name in ours.hook_names():
        torch.testing.assert_close(acts[name], ref_acts[name], atol=1e-5, rtol=1e-5, msg=name)
    for layer, block in enumerate(ours.h):  # the MLP reads ln_2's weight and bias applied to mlp_in
        with torch.no_grad():
            torch.testing.assert_close(block.ln_2.affine(acts[f"blocks.{layer}.ln2.hook_normalized"]),
                                       mlp_input[f"blocks.{layer}.hook_mlp_input"], atol=1e-5, rtol=1e-5)
    # HF's hidden_states: entry L is resid_pre of block L; the last has ln_f applied
    for layer in range(CFG.n_layer):
        torch.testing.assert_close(acts[f"blocks.{layer}.hook_resid_pre"], hidden[layer], atol=1e-5, rtol=1e-5)
    last = acts[f"blocks.{CFG.n_layer - 1}.hook_resid_post"]
    with torch.no_grad():
        torch.testing.assert_close(ours.ln_f(last), hidden[-1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.unembed(last), ref_logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parity
@needs_transformers
def test_checkpoint_without_prefix_loads_the_same(hf_model, ours, tmp_path):
    path = save_hf_checkpoint(hf_model, tmp_path / "m.safetensors", prefix="")
    other = load_weights_(GPT2(CFG), path)
    for (n, a), (_, b) in zip(ours.named_parameters(), other.named_parameters()):
        assert torch.equal(a, b), n


def test_hook_semantics():
    model = GPT2(CFG).eval()
    idx = tokens()
    acts = {}
    with torch.no_grad():
        base = model(idx, hooks={n: (lambda x, n=n: acts.__setitem__(n, x)) for n in model.hook_names()})
        for layer in range(CFG.n_layer - 1):  # resid_post of L is resid_pre of L+1
            assert torch.equal(acts[f"blocks.{layer}.hook_resid_post"], acts[f"blocks.{layer + 1}.hook_resid_pre"])
        for name in ("blocks.0.hook_resid_pre", "blocks.1.hook_mlp_out", "blocks.3.hook_resid_post"):
            assert torch.equal(model(idx, stop_at=name), acts[name])
        # identity and read-only hooks leave the logits bit-for-bit unchanged
        assert torch.equal(model(idx, hooks={"blocks.2.hook_resid_mid": lambda x: x}), base)
        assert torch.equal(model(idx, hooks={"blocks.2.hook_resid_mid": lambda x: None}), base)
        assert torch.equal(model(idx, hooks={"blocks.2.ln2.hook_normalized": lambda x: x}), base)
        assert torch.equal(model(idx, stop_at="blocks.2.ln2.hook_normalized"), acts["blocks.2.ln2.hook_normalized"])
        # splicing mlp_in: ln_2 of resid_mid is ln_2.affine of what the hook returns, nothing else
        doubled = model(idx, hooks={"blocks.2.ln2.hook_normalized": lambda x: 2 * x})
        block = model.h[2]
        by_hand = model(idx, hooks={"blocks.2.hook_mlp_out": lambda x: block.mlp(
            block.ln_2.affine(2 * acts["blocks.2.ln2.hook_normalized"]))})
        torch.testing.assert_close(doubled, by_hand, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(doubled, base)
        # a replacing hook changes everything downstream, nothing upstream
        later = {}
        zeroed = model(idx, hooks={"blocks.1.hook_attn_out": torch.zeros_like,
                                   "blocks.1.hook_resid_pre": lambda x: later.__setitem__("pre", x),
                                   "blocks.2.hook_resid_pre": lambda x: later.__setitem__("next", x)})
        assert not torch.allclose(zeroed, base)
        assert torch.equal(later["pre"], acts["blocks.1.hook_resid_pre"])
        assert not torch.allclose(later["next"], acts["blocks.2.hook_resid_pre"])
        # stop_at really stops: hooks after it never run
        ran = []
        model(idx, hooks={"blocks.3.hook_resid_pre": ran.append}, stop_at="blocks.1.hook_mlp_out")
        assert ran == []


def test_random_model_is_seeded_and_shaped():
    a, b = GPT2(CFG), GPT2(CFG)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert (a.n_layer, a.d_model, a.vocab_size, a.n_ctx) == (4, 64, 50257, 1024)
    assert len(a.hook_names()) == 6 * a.n_layer
    with torch.no_grad():
        assert a(tokens()).shape == (2, 12, CFG.vocab_size)
        assert a(tokens(), stop_at="blocks.2.hook_resid_pre").shape == (2, 12, CFG.d_model)


def test_bad_input_is_reported():
    model = GPT2(CFG)
    cases = [
        (dict(idx=torch.tensor([[0, CFG.vocab_size]])), r"token ids must be in \[0, 50257\)"),
        (dict(idx=torch.tensor([[-1, 3]])), "token ids must be in"),
        (dict(idx=torch.zeros(1, CFG.n_ctx + 1, dtype=torch.long)), "1..1024 positions"),
        (dict(idx=torch.zeros(1, 4)), r"int64 \(or int32\) token ids"),
        (dict(idx=torch.zeros(4, dtype=torch.long)), r"\(B, T\) tensor"),
        (dict(idx=tokens(), hooks={"blocks.0.hook_resid": print}), "unknown hook point"),
        (dict(idx=tokens(), stop_at="blocks.4.hook_resid_pre"), "unknown hook point"),
        (dict(idx=tokens(), stop_at="h.0.ln_1"), "unknown hook point"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            model(**kwargs)
    for name in ("gpt3", "smollm"):
        with pytest.raises(ValueError, match="valid names: gpt2, gpt2-medium"):
            load_gpt2(name)
    with pytest.raises(ValueError, match="valid models"):
        load_model("gpt-2")


@pytest.mark.parity
@needs_transformers
def test_loader_rejects_checkpoints_that_do_not_fit(hf_model, tmp_path):
    bad = save_hf_checkpoint(hf_model, tmp_path / "shape.safetensors",
                             reshape=("transformer.h.1.mlp.c_fc.weight", (64, 128)))
    with pytest.raises(ValueError, match=r"'transformer.h.1.mlp.c_fc.weight' has shape \(64, 128\), expected \(64, 256\)"):
        load_weights_(GPT2(CFG), bad)
    missing = save_hf_checkpoint(hf_model, tmp_path / "missing.safetensors", drop=("transformer.ln_f.bias",))
    with pytest.raises(ValueError, match=r"missing keys \['ln_f.bias'\]"):
        load_weights_(GPT2(CFG), missing)
    path = save_hf_checkpoint(hf_model, tmp_path / "ok.safetensors")
    with pytest.raises(ValueError, match="unexpected keys"):  # a 4-layer file into a 2-layer model
        load_weights_(GPT2(type(CFG)(n_layer=2, n_head=4, d_model=64)), path)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated"):
        load_weights_(GPT2(CFG), truncated)


@pytest.mark.parity
@needs_tokenizer
@needs_transformers
def test_load_gpt2_random_end_to_end(hf_model, tmp_path):
    path = save_hf_checkpoint(hf_model, tmp_path / "model.safetensors")
    model, tok = load_gpt2("gpt2-random", weights=path)
    idx = torch.tensor([tok.encode("Hello world, this is a test.")])
    assert idx[0, :2].tolist() == [15496, 995] and tok.bos_id == 50256
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf_model(idx).logits, atol=1e-4, rtol=1e-4)
    random_model, _ = load_model("gpt2-random")
    assert random_model.n_layer == CFG.n_layer and not random_model.training


# ---- download cache (minisae.models.hub), exercised with file:// URLs ----

def source_file(tmp_path, nbytes=3_000_000):
    src = tmp_path / "src" / "model.safetensors"
    src.parent.mkdir()
    src.write_bytes(np.random.default_rng(0).bytes(nbytes))
    return src


def leftovers(directory):
    return [f for _, _, files in os.walk(directory) for f in files if f.endswith(".part")]


def test_download_verifies_and_caches(tmp_path, capsys):
    import hashlib
    src = source_file(tmp_path)
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    cache = tmp_path / "cache"
    path = cached_path(src.as_uri(), cache_dir=cache, sha256=sha)
    assert open(path, "rb").read() == src.read_bytes()
    assert "MB" in capsys.readouterr().err  # progress line
    src.unlink()  # a second call must not touch the source
    assert cached_path(src.as_uri(), cache_dir=cache, sha256=sha) == path
    assert leftovers(cache) == []


def test_hash_mismatch_leaves_nothing(tmp_path):
    src = source_file(tmp_path)
    dest = tmp_path / "cache" / "model.safetensors"
    with pytest.raises(ValueError, match="sha256 mismatch"):
        download(src.as_uri(), dest, sha256="0" * 64, progress=False)
    assert not dest.exists() and leftovers(tmp_path / "cache") == []
    with pytest.raises(ValueError, match=r"^file://.*/nope: "):  # a failed transfer: one line, nothing left
        download((tmp_path / "nope").as_uri(), dest, progress=False)
    assert not dest.exists() and leftovers(tmp_path / "cache") == []


def test_cached_path_rejects_paths_leaving_the_cache(tmp_path):
    with pytest.raises(ValueError, match="'..'"):
        cached_path("https://example.com/a/../../etc/passwd", cache_dir=tmp_path)
