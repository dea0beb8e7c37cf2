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


def test_float64_and_wide_shapes():
    """SmolLM2's unembedding shape in float64, three rows: to float64's rounding."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 1, 576, dtype=torch.float64, generator=gen)
    w = torch.randn(4096, 576, dtype=torch.float64, generator=gen)
    torch.testing.assert_close(linear(x, w), F.linear(x, w), rtol=1e-12, atol=1e-12)


def test_which_order():
    """The other order for 2 rows, and for 3-4 where W does not narrow; F.linear otherwise."""
    assert [other_order(r, 576, 576) for r in range(1, 7)] == [False, True, True, True, False, False]
    assert [other_order(r, 576, 1536) for r in range(1, 7)] == [False, True, False, False, False, False]
    assert other_order(3, 49152, 576) and not other_order(0, 576, 576)


def test_gradients():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(5, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, generator=gen, requires_grad=True)
    torch.autograd.gradcheck(linear, (x, w, b))
    g = torch.randn(3, 5, dtype=torch.float64, generator=gen)
    got = torch.autograd.grad(linear(x, w, b), (x, w, b), g)
    ref = torch.autograd.grad(F.linear(x, w, b), (x, w, b), g)
    for a, r in zip(got, ref):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)


def test_falls_back_to_f_linear():
    """Autocast and mixed dtypes take F.linear: the same dtype and bits as before."""
    gen = torch.Generator().manual_seed(3)
    x, w, b = torch.randn(3, 16, generator=gen), torch.randn(8, 16, generator=gen), torch.randn(8, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, ref = linear(x, w, b), F.linear(x, w, b)
    assert got.dtype == ref.dtype == torch.bfloat16 and torch.equal(got, ref)
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
