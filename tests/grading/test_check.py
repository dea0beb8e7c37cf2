"""The exercise checker (minisae/grading/check.py): it passes minisae's own code (the reference
solutions) and right answers written differently, skips unfinished exercises, and fails
plausible wrong implementations, at least three per exercise, each on the property that
names its mistake."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("hypothesis", reason="the exercise checker draws its inputs with Hypothesis")

from minisae.grading.check import check_exercise, main, report  # noqa: E402
from minisae.grading.exercises import exercises  # noqa: E402
from minisae.variants import _JumpReLUFn  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
EXERCISES = Path(__file__).resolve().parents[2] / "exercises"


# -- right answers, written independently of minisae's code ------------------------------

def encode(x, W_enc, b_enc, b_dec):
    return torch.clamp(torch.einsum("fd,bd->bf", W_enc, x - b_dec) + b_enc, min=0)


def l1_loss(f, W_dec, coef):
    return coef * (f @ W_dec.pow(2).sum(-1).sqrt()).mean()


def topk_activation(pre, k):
    order = pre.argsort(dim=-1, descending=True)[:, :k]
    mask = torch.zeros_like(pre, dtype=torch.bool).scatter(-1, order, True)
    return torch.where(mask & (pre > 0), pre, torch.zeros_like(pre))


def gated_forward(x, W_gate, b_gate, r_mag, b_mag, b_dec):
    c = x - b_dec
    W_mag = torch.exp(r_mag)[:, None] * W_gate
    return (c @ W_gate.T + b_gate > 0) * F.relu(c @ W_mag.T + b_mag)


class JumpReLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, theta, eps):
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return torch.where(z > theta, z, torch.zeros_like(z))

    @staticmethod
    def backward(ctx, g):
        z, theta = ctx.saved_tensors
        kernel = (((z - theta) / ctx.eps).abs() < 0.5).to(g.dtype)
        return g * (z > theta), (g * kernel * -(theta / ctx.eps)).sum(0), None


def auxk_loss(x, pre, x_hat, W_dec, dead, k_aux, aux_coef):
    if not dead.any():
        return torch.zeros((), dtype=pre.dtype)
    e = (x - x_hat).detach()
    pre_dead = torch.where(dead, pre, torch.full_like(pre, -torch.inf))
    vals, idx = pre_dead.topk(min(k_aux, int(dead.sum())), dim=-1)
    e_hat = (F.relu(vals)[..., None] * W_dec[idx]).sum(1)  # (B, D)
    return aux_coef * ((e - e_hat) ** 2).sum(-1).mean()


def _signs(n):
    """Every +-1 pattern of length n, as rows of a (2^n, n) tensor, from the bits of 0..2^n-1."""
    bits = (torch.arange(2 ** n)[:, None] >> torch.arange(n)) & 1  # (2^n, n)
    return 1 - 2 * bits.double()


def sign_flip_p(d):
    null = (_signs(len(d)) @ d).abs() / len(d)  # (2^n,)
    return float((null >= d.mean().abs() - 1e-12).double().mean())


def matryoshka_loss(x, f, W_dec, b_dec, prefixes):
    x_hats = b_dec + (f[:, :, None] * W_dec[None]).cumsum(1)  # (B, F, D): row i decodes latents 0..i
    err = x[:, None] - x_hats[:, torch.tensor(prefixes) - 1]  # (B, G, D)
    return (err ** 2).sum(-1).mean(0).sum()


def attribution_edge(x, f_a, W_dec_a, layer, W_enc_b, b_enc_b, b_dec_b, i, j):
    """Forward mode: the derivative of m_j along latent i's term, one jvp, no backward pass."""
    def m_j(x):
        return F.relu((layer(x) - b_dec_b) @ W_enc_b[j] + b_enc_b[j]).sum()
    delta = f_a[:, i, None] * W_dec_a[i]  # (T, D)
    return torch.autograd.functional.jvp(m_j, x, delta)[1] / x.shape[0]


RIGHT = {"encode": encode, "l1_loss": l1_loss, "topk_activation": topk_activation,
         "gated_forward": gated_forward, "JumpReLUFn": JumpReLUFn, "auxk_loss": auxk_loss,
         "sign_flip_p": sign_flip_p, "matryoshka_loss": matryoshka_loss, "attribution_edge": attribution_edge}


@pytest.mark.parametrize("name", list(RIGHT))
def test_a_right_answer_written_differently_passes(name):
    r = check_exercise(name, RIGHT[name])
    assert r.status == "PASS", report(r)


@pytest.mark.slow
def test_reference_solutions_pass_and_templates_are_skipped(capsys):
    assert main(EXERCISES / "solutions.py") == 0
    out = capsys.readouterr().out
    assert out.count(" PASS") == len(exercises()) == 9 and "9 passed, 0 failed" in out
    for template, n in ((EXERCISES / "ch2_sae.py", 2), (EXERCISES / "ch3_variants.py", 4),
                        (EXERCISES / "ch7_autointerp.py", 1), (EXERCISES / "ch10_absorption.py", 1),
                        (EXERCISES / "ch11_circuits.py", 1)):
        assert main(template) == 0
        out = capsys.readouterr().out
        assert out.count("SKIP") == n and f"0 passed, 0 failed, {n} not done yet" in out


# -- plausible wrong implementations -----------------------------------------------------

class _WrongJump(_JumpReLUFn):
    """The right JumpReLU (its forward) except for `theta_grad` and `z_grad`, which subclasses replace."""

    @classmethod
    def backward(cls, ctx, g):
        z, theta = ctx.saved_tensors
        return cls.z_grad(g, z, theta), cls.theta_grad(g, z, theta, ctx.eps).sum(0), None

    @staticmethod
    def z_grad(g, z, theta):
        return g * (z > theta)


class JumpSignFlipped(_WrongJump):
    @staticmethod
    def theta_grad(g, z, theta, eps):
        return (theta / eps) * ((z - theta).abs() < eps / 2) * g


class JumpNoThetaFactor(_WrongJump):  # the L0 step's pseudo-gradient, not JumpReLU's
    @staticmethod
    def theta_grad(g, z, theta, eps):
        return -(1 / eps) * ((z - theta).abs() < eps / 2) * g


class JumpWindowTooWide(_WrongJump):  # |z - theta| < eps: K(u) read as 1[|u| < 1]
    @staticmethod
    def theta_grad(g, z, theta, eps):
        return -(theta / eps) * ((z - theta).abs() < eps) * g


class JumpStraightThroughZ(_WrongJump):  # passes the gradient to z even where f = 0
    z_grad = staticmethod(lambda g, z, theta: g)
    theta_grad = staticmethod(lambda g, z, theta, eps: -(theta / eps) * ((z - theta).abs() < eps / 2) * g)


class JumpForwardIsStep(_WrongJump):  # returns H(z - theta), the L0 term's step, not z * H
    @staticmethod
    def forward(ctx, z, theta, eps):
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return (z > theta).to(z.dtype)

    z_grad = JumpStraightThroughZ.z_grad
    theta_grad = JumpStraightThroughZ.theta_grad


def _norms(W):
    return W.norm(dim=-1)  # (F,)


def _keep(pre, idx):
    """ReLU(pre) at the indices idx (B, K) of each row, 0 elsewhere."""
    return torch.zeros_like(pre).scatter(-1, idx, F.relu(pre.gather(-1, idx)))


def _pi(x, W, b, b_dec):
    return (x - b_dec) @ W.T + b  # (B, F)


def _auxk(x, pre, x_hat, W_dec, dead, k_aux, aux_coef, detach=True, relu=True, only_dead=True, zero_if_none=True):
    """AuxK with one of its steps switchable off, for the wrong implementations below."""
    if zero_if_none and not dead.any():
        return torch.zeros((), dtype=pre.dtype)
    e = (x - x_hat).detach() if detach else x - x_hat
    masked = pre.masked_fill(~dead, float("-inf")) if only_dead else pre
    k = min(k_aux, int(dead.sum())) if only_dead else k_aux
    vals, idx = masked.topk(k, dim=-1)
    f_aux = torch.zeros_like(pre).scatter(-1, idx, F.relu(vals) if relu else vals)
    return aux_coef * (e - f_aux @ W_dec).pow(2).sum(-1).mean()


def _all_dead_k(x, pre, x_hat, W_dec, dead, k_aux, aux_coef):  # k_aux ignored: every dead latent
    return _auxk(x, pre, x_hat, W_dec, dead, k_aux=pre.shape[1], aux_coef=aux_coef)


def _matryoshka(x, f, W_dec, b_dec, prefixes, bias=True, extra=0, groups=False, inner_grad=True, inner_only=False,
                per_sample=False, batch=torch.mean, over_prefixes=torch.sum):
    """The Matryoshka loss with one of its steps changed, for the wrong implementations below."""
    terms, a = [], 0
    for m in prefixes:
        if inner_only and m == prefixes[-1]:
            break
        lo = a if groups else 0
        W = W_dec if inner_grad or m == prefixes[-1] else W_dec.detach()
        x_hat = f[:, lo:m + extra] @ W[lo:m + extra] + (b_dec if bias else 0)  # (B, D)
        err = (x - x_hat).pow(2).sum(-1)  # (B,)
        terms.append(err if per_sample else batch(err, 0))
        a = m
    return over_prefixes(torch.stack(terms), 0) if terms else x.new_zeros(())


def _edge(x, f_a, W_dec_a, layer, W_enc_b, b_enc_b, b_dec_b, i, j, per_position=False, relu=True, mean=True,
          ablation=False, diagonal=False):
    """The attribution edge with one of its steps changed, for the wrong implementations below."""
    act = F.relu if relu else (lambda p: p)
    m = lambda x: act((layer(x) - b_dec_b) @ W_enc_b[j] + b_enc_b[j])  # (T,): f_b_j(t), or its pre-activation
    delta = f_a[:, i, None] * W_dec_a[i]  # (T, D)
    T = x.shape[0]
    if ablation:  # the full ablation, not its first-order term
        return (m(x).sum() - m(x - delta).sum()) / T
    if diagonal:  # g_j(t) from f_b_j(t) alone: what position t does to later positions is lost
        g = torch.stack([torch.autograd.grad(m(torch.cat([x[:t], row[None], x[t + 1:]]))[t], row)[0]
                         for t, row in enumerate(x.detach().clone().requires_grad_())])  # (T, D)
    else:
        xg = x.detach().requires_grad_()
        g, = torch.autograd.grad(m(xg).sum(), xg)  # (T, D)
    per_t = (delta * g).sum(-1)  # (T,)
    return per_t if per_position else per_t.sum() / (T if mean else 1)


# (exercise, what is wrong, the implementation, the property that must catch it)
WRONG = [
    ("encode", "no ReLU", lambda x, W, b, bd: (x - bd) @ W.T + b, "nonnegative"),
    ("encode", "b_dec not subtracted", lambda x, W, b, bd: F.relu(x @ W.T + b), "centring"),
    ("encode", "b_dec added instead of subtracted", lambda x, W, b, bd: F.relu((x + bd) @ W.T + b), "centring"),
    ("encode", "W_enc not transposed", lambda x, W, b, bd: F.relu((x - bd) @ W + b), "shape"),
    ("encode", "float32 output", lambda x, W, b, bd: F.relu((x - bd) @ W.T + b).float(), "shape"),
    ("l1_loss", "L1 without the decoder norms (assumes unit-norm rows)",
     lambda f, W, c: c * f.sum(-1).mean(), "norm_invariance"),
    ("l1_loss", "squared decoder norms", lambda f, W, c: c * (f * _norms(W) ** 2).sum(-1).mean(), "norm_invariance"),
    ("l1_loss", "summed over the batch", lambda f, W, c: c * (f * _norms(W)).sum(), "batch_mean"),
    ("l1_loss", "one loss per sample (no batch mean)", lambda f, W, c: c * (f * _norms(W)).sum(-1), "scalar"),
    ("l1_loss", "mean over latents too", lambda f, W, c: c * (f * _norms(W)).mean(), "minisae"),
    ("topk_activation", "TopK without the ReLU",
     lambda pre, k: torch.zeros_like(pre).scatter(-1, pre.topk(k).indices, pre.topk(k).values), "nonnegative"),
    ("topk_activation", "threshold at the k-th value with >= (keeps ties)",
     lambda pre, k: F.relu(pre) * (pre >= pre.topk(k).values[:, -1:]), "at_most_k"),
    ("topk_activation", "TopK of |pre|",
     lambda pre, k: _keep(pre, pre.abs().topk(k).indices), "largest"),
    ("topk_activation", "the k smallest",
     lambda pre, k: _keep(pre, pre.topk(k, largest=False).indices), "largest"),
    ("topk_activation", "the k-th value subtracted (a soft threshold)",
     lambda pre, k: F.relu(pre - pre.topk(min(k + 1, pre.shape[1])).values[:, -1:]), "kept_unshrunk"),
    ("gated_forward", "no gate: f = ReLU(pi_mag)",
     lambda x, W, bg, r, bm, bd: F.relu(r.exp() * _pi(x, W, 0, bd) + bm), "gate_closed"),
    ("gated_forward", "ReLU(pi_gate) as the gate, multiplied in",
     lambda x, W, bg, r, bm, bd: F.relu(_pi(x, W, bg, bd)) * F.relu(r.exp() * _pi(x, W, 0, bd) + bm),
     "no_gate_gradient"),
    ("gated_forward", "b_gate left in the magnitude path (exp(r_mag) * pi_gate + b_mag)",
     lambda x, W, bg, r, bm, bd: (_pi(x, W, bg, bd) > 0) * F.relu(r.exp() * _pi(x, W, bg, bd) + bm),
     "no_gate_gradient"),
    ("gated_forward", "r_mag used as the scale itself, no exp",
     lambda x, W, bg, r, bm, bd: (_pi(x, W, bg, bd) > 0) * F.relu(r * _pi(x, W, 0, bd) + bm), "tied"),
    ("JumpReLUFn", "forward returns the step H(z - theta)", JumpForwardIsStep, "forward"),
    ("JumpReLUFn", "straight-through gradient for z as well", JumpStraightThroughZ, "z_gradient"),
    ("JumpReLUFn", "window |z - theta| < eps instead of eps/2", JumpWindowTooWide, "window"),
    ("JumpReLUFn", "theta's pseudo-gradient with the sign flipped", JumpSignFlipped, "eq11"),
    ("JumpReLUFn", "-(1/eps) instead of -(theta/eps)", JumpNoThetaFactor, "eq11"),
    ("auxk_loss", "AuxK without detaching the error", lambda *a: _auxk(*a, detach=False), "detached"),
    ("auxk_loss", "TopK over all latents, not only the dead", lambda *a: _auxk(*a, only_dead=False), "live_no_grad"),
    ("auxk_loss", "no special case for no dead latent", lambda *a: _auxk(*a, zero_if_none=False), "none_dead"),
    ("auxk_loss", "no ReLU on the chosen pre-activations", lambda *a: _auxk(*a, relu=False), "naive"),
    ("auxk_loss", "k_aux ignored (every dead latent used)", _all_dead_k, "naive"),
    ("sign_flip_p", "ties not counted (p can be 0)",
     lambda d: float(((_signs(len(d)) @ d).abs() / len(d) > d.mean().abs() + 1e-12).double().mean()), "range"),
    ("sign_flip_p", "one-sided: mean(e d) >= mean d",
     lambda d: float(((_signs(len(d)) @ d) / len(d) >= d.mean() - 1e-12).double().mean()), "two_sided"),
    ("sign_flip_p", "sum |d| as the statistic (the same for every flip)",
     lambda d: float(((_signs(len(d)).abs() @ d.abs()) >= d.abs().sum() - 1e-12).double().mean()), "naive"),
    ("sign_flip_p", "only the flips that keep the first sign, halved",
     lambda d: float(((_signs(len(d))[_signs(len(d))[:, 0] > 0] @ d).abs() / len(d)
                      >= d.mean().abs() - 1e-12).double().mean() / 2), "zeros"),
    ("matryoshka_loss", "one loss per sample (no batch mean)", lambda *a: _matryoshka(*a, per_sample=True), "scalar"),
    ("matryoshka_loss", "b_dec forgotten", lambda *a: _matryoshka(*a, bias=False), "whole"),
    ("matryoshka_loss", "summed over the batch", lambda *a: _matryoshka(*a, batch=torch.sum), "whole"),
    ("matryoshka_loss", "the whole dictionary's term left out (only the inner prefixes)",
     lambda *a: _matryoshka(*a, inner_only=True), "whole"),
    ("matryoshka_loss", "the prefix m read as m + 1 latents", lambda *a: _matryoshka(*a, extra=1), "naive"),
    ("matryoshka_loss", "averaged over the prefixes instead of summed",
     lambda *a: _matryoshka(*a, over_prefixes=torch.mean), "naive"),
    ("matryoshka_loss", "each group [a, m) decoded alone, not the whole prefix",
     lambda *a: _matryoshka(*a, groups=True), "naive"),
    ("matryoshka_loss", "the inner prefixes' terms train no decoder (W_dec detached)",
     lambda *a: _matryoshka(*a, inner_grad=False), "grad_W_dec"),
    ("attribution_edge", "one edge per position, not summed", lambda *a: _edge(*a, per_position=True), "scalar"),
    ("attribution_edge", "the full ablation m_j(x) - m_j(x - delta), not its first-order term",
     lambda *a: _edge(*a, ablation=True), "linear"),
    ("attribution_edge", "summed over positions, not divided by T", lambda *a: _edge(*a, mean=False), "naive"),
    ("attribution_edge", "the gradient of B's pre-activation (the ReLU's slope forgotten)",
     lambda *a: _edge(*a, relu=False), "naive"),
    ("attribution_edge", "g_j(t) from f_b_j(t) alone (the layer's mixing of positions ignored)",
     lambda *a: _edge(*a, diagonal=True), "finite_difference"),
]


def test_at_least_three_wrong_implementations_per_exercise():
    for name in exercises():
        assert sum(w[0] == name for w in WRONG) >= 3, name


@pytest.mark.parametrize("name,mistake,fn,prop", WRONG, ids=[f"{w[0]}: {w[1]}" for w in WRONG])
def test_a_wrong_implementation_fails_on_the_property_that_names_its_mistake(name, mistake, fn, prop):
    r = check_exercise(name, fn, shrink=False)  # the failing property is found before shrinking starts
    assert r.status == "FAIL", f"{mistake}: not caught"
    assert r.prop.key == prop, report(r)
    text = report(r)
    assert f"property {prop}: {r.prop.says}" in text and "input: " in text


def test_report_shows_a_small_shrunk_input():
    """TopK without the ReLU: Hypothesis shrinks to one sample, one latent, k = 1 and a
    negative pre-activation, the smallest input that shows the missing ReLU."""
    wrong = next(w[2] for w in WRONG if w[1] == "TopK without the ReLU")
    r = check_exercise("topk_activation", wrong)
    assert r.case["k"] == 1 and r.case["pre"].shape == (1, 1) and r.case["pre"].item() < 0
    assert "f has negative entries" in r.why


def test_main_on_a_learners_file(tmp_path, capsys):
    """One exercise right, one wrong, one not done: exit code 1 and one line for each."""
    path = tmp_path / "mine.py"
    path.write_text(
        "import torch\n"
        "def encode(x, W_enc, b_enc, b_dec):\n"
        "    return torch.relu((x - b_dec) @ W_enc.T + b_enc)\n"
        "def l1_loss(f, W_dec, coef):\n"
        "    return coef * f.sum(-1).mean()\n"
        "def topk_activation(pre, k):\n"
        "    raise NotImplementedError\n")
    assert main(path) == 1
    out = capsys.readouterr().out
    assert "encode           PASS" in out and "topk_activation  SKIP" in out
    assert "l1_loss          FAIL  property norm_invariance" in out and "input: f = " in out
    assert "1 passed, 1 failed, 1 not done yet" in out


@pytest.mark.parametrize("text,message", [
    (None, "no such file"),
    ("x = 1\n", "defines none of the exercises"),
    ("def encode(:\n", "importing it raised SyntaxError"),
    ("import no_such_module_anywhere\n", "importing it raised ModuleNotFoundError"),
])
def test_unreadable_files_are_one_line_errors(tmp_path, capsys, text, message):
    path = tmp_path / "mine.py"
    if text is not None:
        path.write_text(text)
    assert main(path) == 2
    err = capsys.readouterr().err
    assert message in err and str(path) in err and len(err.strip().splitlines()) == 1
