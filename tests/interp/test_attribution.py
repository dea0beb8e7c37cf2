"""Attribution edges in float64 on small random models: every edge against a finite
difference (an infinitesimal amount of the upstream latent removed, model re-run);
completeness (latents + error nodes = the first-order change when all nodes shrink
together, and not without the error nodes); the same numbers whatever the batching;
positions the SAE does not read carry no node; the first-order limit of links'
ablation edges; and the checks on the inputs."""

import pytest
import torch

from minisae.interp import attribution as At
from minisae.interp import links as Li
from minisae.models.gpt2 import CONFIGS, GPT2
from minisae.models.llama import Llama, LlamaConfig, RMSNorm
from minisae.pipeline.hooked_sae import HookedSAE

HOOK_A, HOOK_B = "blocks.1.hook_resid_post", "blocks.2.hook_resid_post"


def gpt2_64():
    torch.manual_seed(0)
    return GPT2(CONFIGS["gpt2-random"]).double().eval()


def rms_normalize_float64(self, x):
    """Our RMSNorm rounds to float32 as HF's does; a float64 finite difference needs float64
    (RMSNorm.forward is affine(normalize(x)), and the MLP's norm runs as the two halves)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


def llama_64():
    torch.manual_seed(0)
    cfg = LlamaConfig(n_layer=3, d_model=48, d_mlp=80, n_head=6, n_kv_head=2, vocab_size=97, n_ctx=32)
    return Llama(cfg).double().eval()


def contexts(n, T, vocab, seed=0):
    return torch.randint(0, vocab, (n, T), generator=torch.Generator().manual_seed(seed))


def hooked(sae, hook, scale, max_norm=None):
    return HookedSAE(sae.eval(), "test", hook, scale, max_norm)


def scale_of(model, ctx, hook):
    """As minisae.pipeline.activations does: E||scale * x|| = sqrt(D)."""
    with torch.no_grad():
        x = model(ctx, stop_at=hook)[:, 1:]
    return (x.shape[-1] ** 0.5 / x.norm(dim=-1).mean()).item()


def moved_target(model, ha, hb, ctx, move, j):
    """m_j / n after x_a -> x_a - move(x_a) at A's hook (positions 1..): the plain
    reference, no autograd; B's positions are the clean run's."""
    with torch.no_grad():
        clean_b = model(ctx, stop_at=hb.hook)[:, 1:]
        keep_b = hb.positions(clean_b, bos=False)  # (N, T-1)

        def hook(act):
            out = act.clone()
            out[:, 1:] = act[:, 1:] - move(act[:, 1:])
            return out
        x_b = model(ctx, hooks={ha.hook: hook}, stop_at=hb.hook)[:, 1:]  # (N, T-1, D)
        f_b = hb.sae.encode(x_b.reshape(-1, x_b.shape[-1]) * hb.scale).view(*x_b.shape[:2], -1)
        return (f_b[..., j] * keep_b).sum().item() / keep_b.numel()


def finite_difference(model, ha, hb, ctx, direction, j, eps=1e-5):
    """-(d/d eps) m_j(x_a - eps * direction(x_a)) / n, central difference."""
    plus = moved_target(model, ha, hb, ctx, lambda x: eps * direction(x), j)
    minus = moved_target(model, ha, hb, ctx, lambda x: -eps * direction(x), j)
    return (minus - plus) / (2 * eps)


def latent_term(ha, i):
    """x_a (N, T', D) -> f_a_i(t) d_i at the positions A reads: what ablating latent i removes."""
    def term(x):
        f, _ = At.codes(ha, x)
        return f[..., i, None] * ha.sae.W_dec[i] / ha.scale
    return term


def pair(model, random_sae, ctx, variant_a="relu", variant_b="topk", max_norm_a=None):
    D = model.d_model
    sae_a = random_sae(variant_a, D, 40, seed=1)
    sae_b = random_sae(variant_b, D, 30, seed=2, **({"k": 6} if variant_b == "topk" else {}))
    return (hooked(sae_a, HOOK_A, scale_of(model, ctx, HOOK_A), max_norm_a),
            hooked(sae_b, HOOK_B, scale_of(model, ctx, HOOK_B)))


@pytest.mark.parametrize("make_model, variants", [(gpt2_64, ("relu", "topk")), (gpt2_64, ("topk", "jumprelu")),
                                                  (gpt2_64, ("relu", "gated")), (llama_64, ("relu", "topk"))])
def test_edges_against_finite_differences(random_sae, monkeypatch, make_model, variants):
    monkeypatch.setattr(RMSNorm, "normalize", rms_normalize_float64)
    model = make_model()
    ctx = contexts(3, 9, model.vocab_size if hasattr(model, "vocab_size") else 50257)
    ha, hb = pair(model, random_sae, ctx, *variants)
    with torch.no_grad():
        f_a, _ = At.codes(ha, model(ctx, stop_at=HOOK_A)[:, 1:])
        f_b, _ = At.codes(hb, model(ctx, stop_at=HOOK_B)[:, 1:])
    sources = f_a.flatten(0, 1).sum(0).topk(3).indices.tolist()  # active somewhere
    targets = f_b.flatten(0, 1).sum(0).topk(3).indices.tolist()
    edges, _ = At.attribution_edges(model, ha, hb, ctx, targets, batch_size=2, chunk=2, verbose=False)
    checked = 0
    for i in sources:
        for n, j in enumerate(targets):
            want = finite_difference(model, ha, hb, ctx, latent_term(ha, i), j)
            torch.testing.assert_close(edges[i, n].item(), want, rtol=1e-6, atol=1e-9)
            checked += abs(want) > 1e-4
    assert checked >= 3  # not a comparison of zeros


@pytest.mark.parametrize("make_model", [gpt2_64, llama_64])
def test_completeness_needs_the_error_node(random_sae, monkeypatch, make_model):
    """sum_i attr(i -> j) + sum_t attr(e_t -> j) = -(d/d eps) m_j(x_a - eps (x_a - b_a)) / n
    at the positions A reads (A's sinks excluded: max_norm cuts some)."""
    monkeypatch.setattr(RMSNorm, "normalize", rms_normalize_float64)
    model = make_model()
    ctx = contexts(3, 10, getattr(model, "vocab_size", 50257), seed=1)
    with torch.no_grad():
        norms = model(ctx, stop_at=HOOK_A)[:, 1:].norm(dim=-1)
    ha, hb = pair(model, random_sae, ctx, max_norm_a=norms.quantile(0.8).item())
    targets = list(range(hb.n_latents))
    edges, error = At.attribution_edges(model, ha, hb, ctx, targets, chunk=7, verbose=False)
    b_a = ha.sae.b_dec.detach() / ha.scale

    def all_nodes(x):  # x_a - b_a where A reads, 0 elsewhere
        return (x - b_a) * ha.positions(x, bos=False)[..., None]

    assert (error.abs().sum((0, 1)) > 0).sum() >= 5
    assert (error[~ha.positions(model(ctx, stop_at=HOOK_A)[:, 1:], bos=False)] == 0).all()  # sinks: no node
    missed = 0
    for n, j in enumerate(targets):
        want = finite_difference(model, ha, hb, ctx, all_nodes, j)
        total = edges[:, n].sum().item() + error[..., n].sum().item()
        torch.testing.assert_close(total, want, rtol=1e-6, atol=1e-9)
        missed += abs(edges[:, n].sum().item() - want) > 1e-3  # the latents alone do not add up
    assert missed >= 5


def test_batching_changes_nothing(random_sae):
    model = gpt2_64()
    ctx = contexts(5, 8, 50257, seed=2)
    ha, hb = pair(model, random_sae, ctx)
    targets = [0, 3, 4, 9, 29]
    e1, r1 = At.attribution_edges(model, ha, hb, ctx, targets, batch_size=5, chunk=5, verbose=False)
    e2, r2 = At.attribution_edges(model, ha, hb, ctx, targets, batch_size=2, chunk=1, verbose=False)
    torch.testing.assert_close(e1, e2, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(r1, r2, rtol=1e-10, atol=1e-13)
    single = [At.attribution_edges(model, ha, hb, ctx, [j], verbose=False)[0][:, 0] for j in targets]
    torch.testing.assert_close(e1, torch.stack(single, 1), rtol=1e-10, atol=1e-13)


def test_dead_latent_has_no_edges(random_sae):
    model = gpt2_64()
    ctx = contexts(3, 8, 50257)
    ha, hb = pair(model, random_sae, ctx)
    with torch.no_grad():
        ha.sae.b_enc[7] = -1e6  # never fires
    edges, _ = At.attribution_edges(model, ha, hb, ctx, [0, 1, 2], verbose=False)
    assert torch.equal(edges[7], torch.zeros(3, dtype=torch.float64))
    assert edges.abs().sum() > 0


def test_first_order_limit_of_the_ablation_edges(random_sae):
    """links.ablation_edges (float32) with latent i's term shrunk by alpha, divided by
    alpha, tends to the attribution edge as alpha -> 0. B is a ReLU SAE, continuous in x
    (a TopK's selection jumps); on this random model the full ablation (alpha = 1) is far
    outside the linear regime, a thousandth of it is inside."""
    model = GPT2(CONFIGS["gpt2-random"]).eval()
    ctx = contexts(4, 10, 50257, seed=3)
    ha, hb = pair(model, random_sae, ctx, "relu", "relu")
    hb.sae.float()
    sources, targets = [0, 1, 2, 3], list(range(hb.n_latents))
    errors = []
    for alpha in (1.0, 1e-3):
        small = HookedSAE(random_sae("relu", 64, 40, seed=1).float().eval(), "test", HOOK_A, ha.scale)
        with torch.no_grad():
            small.sae.W_dec.mul_(alpha)  # ablating latent i now removes alpha * f_i d_i
        ablation = Li.ablation_edges(model, small, hb, ctx, sources, verbose=False) / alpha  # (S, F_b)
        attr, _ = At.attribution_edges(model, small, hb, ctx, targets, verbose=False)
        attr = attr[sources] / alpha  # (S, F_b)
        assert attr.abs().max() > 1
        errors.append(((ablation - attr).norm() / attr.norm()).item())
    assert errors[1] < 1e-2 and errors[0] > 0.1


def test_bad_inputs(random_sae):
    model = gpt2_64()
    ctx = contexts(2, 8, 50257)
    ha, hb = pair(model, random_sae, ctx)
    with pytest.raises(ValueError, match="must come after"):
        At.attribution_edges(model, hb, ha, ctx, [0], verbose=False)
    with pytest.raises(ValueError, match="out of range"):
        At.attribution_edges(model, ha, hb, ctx, [30], verbose=False)
