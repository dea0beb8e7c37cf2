"""minisae.models.linear: the few-rows product against F.linear and float64, gradients,
the cases that must fall back to F.linear, and the models built on it."""

import pytest
import torch
import torch.nn.functional as F

from minisae.models.linear import Linear, linear, other_order


def ref64(x, w, b):
    """x W^T + b in float64: the reference both products are held to."""
    y = x.double() @ w.double().T
    return y if b is None else y + b.double()


@pytest.mark.parametrize("shape", [(1, 16), (2, 16), (3, 16), (4, 16), (5, 16), (1, 3, 16), (3, 1, 16), (2, 2, 16),
                                   (8, 16), (2, 4, 16)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("out", [40, 8])  # W widens (other order for 2-4 rows) or narrows (2 rows only)
def test_equals_f_linear(shape, bias, out):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=gen)
    w = torch.randn(out, 16, generator=gen)
    b = torch.randn(out, generator=gen) if bias else None
    got, ref = linear(x, w, b), F.linear(x, w, b)
    assert got.shape == ref.shape == (*shape[:-1], out) and got.dtype == ref.dtype and got.is_contiguous()
    exact = ref64(x, w, b)
    # each within float32's rounding of a 16-term sum, and the two within twice that of each other
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.double(), exact, **tol)
    torch.testing.assert_close(ref.double(), exact, **tol)
    torch.testing.assert_close(got, ref, rtol=2e-5, atol=2e-5)
    if not other_order(x.numel() // x.shape[-1], *w.shape):  # F.linear itself: the same bits
        assert torch.equal(got, ref)


def test_wide_shape():
    """SmolLM2's unembedding shape, three rows (steer's step): both products to float64's
    result, within float32's rounding of a 576-term sum."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 1, 576, generator=gen)
    w = torch.randn(4096, 576, generator=gen)
    exact = ref64(x, w, None)
    torch.testing.assert_close(linear(x, w).double(), exact, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(F.linear(x, w).double(), exact, rtol=1e-4, atol=1e-4)


def test_gradients():
    """The other order's gradients (float32) against F.linear's in float64."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 8, generator=gen, requires_grad=True)
    w = torch.randn(5, 8, generator=gen, requires_grad=True)
    b = torch.randn(5, generator=gen, requires_grad=True)
    g = torch.randn(3, 5, generator=gen)
    got = torch.autograd.grad(linear(x, w, b), (x, w, b), g)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    ref = torch.autograd.grad(F.linear(x64, w64, b64), (x64, w64, b64), g.double())
    for a, r in zip(got, ref):
        torch.testing.assert_close(a.double(), r, rtol=1e-5, atol=1e-5)


def test_falls_back_to_f_linear():
    """Autocast, float64, bfloat16 and mixed dtypes take F.linear: the same dtype and bits as before."""
    gen = torch.Generator().manual_seed(3)
    x, w, b = torch.randn(3, 16, generator=gen), torch.randn(8, 16, generator=gen), torch.randn(8, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, ref = linear(x, w, b), F.linear(x, w, b)
    assert got.dtype == ref.dtype == torch.bfloat16 and torch.equal(got, ref)
    for dtype in (torch.float64, torch.bfloat16):
        assert torch.equal(linear(x.to(dtype), w.to(dtype), b.to(dtype)), F.linear(x.to(dtype), w.to(dtype), b.to(dtype)))
    with pytest.raises(RuntimeError):  # mixed dtypes are F.linear's error, as before
        linear(x.double(), w, b)
    empty = torch.randn(0, 16)
    assert linear(empty, w, b).shape == (0, 8)


def test_layer_is_nn_linear():
    """Linear keeps nn.Linear's parameters, state dict and isinstance."""
    torch.manual_seed(4)
    layer, plain = Linear(16, 24), torch.nn.Linear(16, 24)
    plain.load_state_dict(layer.state_dict())
    assert isinstance(layer, torch.nn.Linear) and list(layer.state_dict()) == list(plain.state_dict())
    x = torch.randn(2, 3, 16)  # six rows: F.linear, bit for bit
    assert torch.equal(layer(x), plain(x))
    x = torch.randn(3, 1, 16)  # three rows: the other order
    torch.testing.assert_close(layer(x), plain(x), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_models_few_rows(name):
    """A model's forward over three rows of one token (a generation step of `steer`) equals
    the same rows inside a batch of eight, where every product is F.linear's."""
    from minisae.models.gpt2 import GPT2, GPT2Config
    from minisae.models.llama import Llama, LlamaConfig
    torch.manual_seed(5)
    if name == "gpt2":
        model = GPT2(GPT2Config(n_layer=2, n_head=4, d_model=64, vocab_size=300, n_ctx=32))
    else:
        model = Llama(LlamaConfig(n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_mlp=128, vocab_size=300, n_ctx=32))
    model.eval()
    idx = torch.randint(0, 300, (8, 1))
    with torch.no_grad():
        few, many = model(idx[:3]), model(idx)[:3]  # (3, 1, V): 3 rows through `linear`'s other order
    torch.testing.assert_close(few, many, rtol=1e-5, atol=1e-5)


def test_which_product_runs(monkeypatch):
    """F.linear is not called where the rule picks the other order, and is called elsewhere."""
    import minisae.models.linear as L
    calls = []
    real = L.F.linear
    monkeypatch.setattr(L.F, "linear", lambda *a: calls.append(a[0].shape) or real(*a))
    linear(torch.randn(3, 16), torch.randn(24, 16))  # widening W, 3 rows: the other order
    assert calls == []
    linear(torch.randn(3, 16), torch.randn(8, 16))  # narrowing W, 3 rows: F.linear
    linear(torch.randn(5, 16), torch.randn(24, 16))  # 5 rows: F.linear
    assert calls == [(3, 16), (5, 16)]
