"""What each exercise must satisfy: its properties, in the order the checker runs them,
and its reference, minisae's own code in the exercise's signature.

The exercises are in exercises/ch2_sae.py (encode, l1_loss), exercises/ch3_variants.py
(topk_activation, gated_forward, JumpReLUFn, auxk_loss), exercises/ch7_autointerp.py
(sign_flip_p), exercises/ch10_absorption.py (matryoshka_loss) and exercises/ch11_circuits.py
(attribution_edge); the machinery that draws
inputs and runs the properties is minisae/grading/check.py. Each property is a function
(learner's function, input dict) -> None that raises Failed with a message saying what
went wrong. The cheap, specific properties come first, so that a failure names the
mistake (the ReLU, the centring, the detach); equality with minisae's code comes last.
The naive references are loops over samples and latents with Python floats, as in tests/.
Conventions as in minisae/sae.py: W_enc, W_dec (F, D); x_hat = f @ W_dec + b_dec; squared
errors summed over D, averaged over B.
"""

import itertools
from types import SimpleNamespace

import torch

from minisae.grading.properties import (BOOLS, INTEGERS, NONNEG, ON_INPUT, SCALES, VALUES, Failed, Property, args,
                                        assume, cases, expect_close, expect_tensor, grads, show, strategies)
from minisae.autointerp.stats import sign_flip_test
from minisae.matryoshka import MatryoshkaBatchTopK
from minisae.sae import ReLU, make_sae
from minisae.variants import TopK, auxk_loss
from minisae.variants import _JumpReLUFn as ref_JumpReLUFn  # the reference for the JumpReLUFn exercise


def nonnegative(fn, case, names, what="f"):
    f = fn(*args(case, *names))
    if (f < 0).any():
        raise Failed(f"{what} has negative entries: {show(f.detach())}")


# -- chapter 2: encode, the L1 loss ------------------------------------------------------

ENC = ("x", "W_enc", "b_enc", "b_dec")


def _encode_shape(fn, c):
    expect_tensor(fn(*args(c, *ENC)), (c["x"].shape[0], c["W_enc"].shape[0]), "f")


def _encode_centring(fn, c):
    moved = dict(c, x=c["x"] + c["shift"], b_dec=c["b_dec"] + c["shift"])
    expect_close(fn(*args(moved, *ENC)), fn(*args(c, *ENC)), "f with x and b_dec shifted", ON_INPUT)


def _encode_minisae(fn, c):
    expect_close(fn(*args(c, *ENC)), ref_encode(*args(c, *ENC)), "f")


def _l1_scalar(fn, c):
    expect_tensor(fn(*args(c, "f", "W_dec", "coef")), (), "the loss")


def _l1_norm_invariance(fn, c):
    moved = dict(c, f=c["f"] * c["c"], W_dec=c["W_dec"] / c["c"][:, None])  # c (F,) > 0
    expect_close(fn(*args(moved, "f", "W_dec", "coef")), fn(*args(c, "f", "W_dec", "coef")),
                 "the loss with f_i * c_i and W_dec[i] / c_i", ON_INPUT)


def _l1_batch_mean(fn, c):
    twice = dict(c, f=torch.cat([c["f"], c["f"]]))
    expect_close(fn(*args(twice, "f", "W_dec", "coef")), fn(*args(c, "f", "W_dec", "coef")),
                 "the loss on the batch twice", ON_INPUT)


def _l1_minisae(fn, c):
    expect_close(fn(*args(c, "f", "W_dec", "coef")), ref_l1_loss(*args(c, "f", "W_dec", "coef")), "the loss")


# -- chapter 3: TopK, the Gated forward, JumpReLU's gradient, AuxK ------------------------

def _topk_shape(fn, c):
    expect_tensor(fn(*args(c, "pre", "k")), c["pre"].shape, "f")


def _topk_at_most_k(fn, c):
    f = fn(*args(c, "pre", "k"))
    n = (f != 0).sum(-1)
    if (n > c["k"]).any():
        raise Failed(f"rows have {show(n)} nonzero entries, k = {c['k']}: f = {show(f)}")


def _topk_kept_unshrunk(fn, c):
    f, pre = fn(*args(c, "pre", "k")), c["pre"]
    bad = (f != 0) & (f != pre)
    if bad.any():
        raise Failed(f"f = {show(f)} has entries that are neither 0 nor their pre-activation")


def _topk_largest(fn, c):
    f = fn(*args(c, "pre", "k"))
    for b, row in enumerate(c["pre"].tolist()):  # the naive reference: a per-row sort
        want = [v for v in sorted(row, reverse=True)[:c["k"]] if v > 0]
        got = sorted((v for v in f[b].tolist() if v != 0), reverse=True)
        if got != want:
            raise Failed(f"row {b} keeps {show(got)}, the largest positive {c['k']} are {show(want)}")


def _topk_minisae(fn, c):
    vals = c["pre"].sort(-1, descending=True).values
    k = c["k"]
    if k < vals.shape[1]:  # a tie at the k-th place may be broken either way
        assume(((vals[:, k - 1] - vals[:, k] > 1e-9) | (vals[:, k - 1] <= 0)).all())
    expect_close(fn(*args(c, "pre", "k")), ref_topk_activation(*args(c, "pre", "k")), "f")


GATED = ("x", "W_gate", "b_gate", "r_mag", "b_mag", "b_dec")


def _pi_gate(c):
    return (c["x"] - c["b_dec"]) @ c["W_gate"].T + c["b_gate"]  # (B, F)


def _gated_shape(fn, c):
    expect_tensor(fn(*args(c, *GATED)), (c["x"].shape[0], c["W_gate"].shape[0]), "f")


def _gated_closed(fn, c):
    f, pi = fn(*args(c, *GATED)), _pi_gate(c)
    if (f.detach()[pi <= 0] != 0).any():
        raise Failed(f"f = {show(f.detach())} is nonzero where pi_gate = {show(pi)} <= 0")


def _gated_no_gate_gradient(fn, c):
    a = args(c, *GATED, grad=("b_gate",))
    (g,) = grads(fn(*a).sum(), [a[2]])
    if (g != 0).any():
        raise Failed(f"d sum(f) / d b_gate = {show(g)}, expected zeros")


def _gated_tied(fn, c):
    tied = dict(c, r_mag=torch.zeros_like(c["r_mag"]), b_mag=c["b_gate"])
    expect_close(fn(*args(tied, *GATED)), _pi_gate(c).clamp_min(0), "f with r_mag = 0, b_mag = b_gate")


def _gated_minisae(fn, c):
    assume((_pi_gate(c).abs() > 1e-9).all())  # the step may round either way at 0
    expect_close(fn(*args(c, *GATED)), ref_gated_forward(*args(c, *GATED)), "f")


WINDOW_OFFSETS = (0.0, 0.2, -0.2, 0.4, -0.4, 0.6, -0.6, 0.8, -0.8, 1.4, -1.4)  # (z - theta) / eps, never 1/2


def _jump_cases():
    """z crowded around theta, z = theta + u * eps with u from WINDOW_OFFSETS, so that
    entries fall both inside and outside the kernel's window |z - theta| < eps/2 (and
    none on its edge, where rounding could put them either side)."""
    def then(c):
        c["z"] = c["theta"] + c.pop("u") * c["eps"]
        return c
    return cases(then, u=("BF", WINDOW_OFFSETS), theta="F", eps=strategies().sampled_from([1.0, 0.5, 0.1]), G="BF")


def _jump(fn, c, grad=()):
    """f = fn.apply(z, theta, eps); the gradients of L = sum(f * G) for the `grad` inputs."""
    z, theta = args(c, "z", "theta", grad=grad)
    f = fn.apply(z, theta, c["eps"])
    expect_tensor(f, c["z"].shape, "f")
    named = {"z": z, "theta": theta}
    return f, dict(zip(grad, grads((f * c["G"]).sum(), [named[n] for n in grad])))


def _jump_forward(fn, c):
    f, _ = _jump(fn, c)
    expect_close(f, c["z"] * (c["z"] > c["theta"]), "f")


def _jump_z_gradient(fn, c):
    _, g = _jump(fn, c, grad=("z",))
    expect_close(g["z"], c["G"] * (c["z"] > c["theta"]), "dL/dz")


def _jump_window(fn, c):
    outside = ((c["z"] - c["theta"]).abs() >= c["eps"] / 2)
    _, g = _jump(fn, dict(c, G=c["G"] * outside), grad=("theta",))
    if (g["theta"] != 0).any():
        raise Failed(f"dL/dtheta = {show(g['theta'])} from entries outside the window, expected zeros")


def _jump_eq11(fn, c):
    _, g = _jump(fn, c, grad=("theta",))
    z, theta, G, eps = c["z"].tolist(), c["theta"].tolist(), c["G"].tolist(), c["eps"]
    want = [sum(-(theta[i] / eps) * (abs(z[b][i] - theta[i]) < eps / 2) * G[b][i] for b in range(len(z)))
            for i in range(len(theta))]  # the naive reference: a loop over samples and latents
    expect_close(g["theta"], torch.tensor(want, dtype=torch.float64), "dL/dtheta")


def _jump_minisae(fn, c):
    f, g = _jump(fn, c, grad=("z", "theta"))
    f_ref, g_ref = _jump(ref_JumpReLUFn, c, grad=("z", "theta"))
    expect_close(f, f_ref, "f")
    expect_close(g["z"], g_ref["z"], "dL/dz")
    expect_close(g["theta"], g_ref["theta"], "dL/dtheta")


AUX = ("x", "pre", "x_hat", "W_dec", "dead", "k_aux", "aux_coef")


def _aux_cases(all_live=False):
    st = strategies()
    dead = (lambda s: st.just(torch.zeros(s["F"], dtype=torch.bool))) if all_live else ("F", BOOLS)
    return cases(x="BD", pre="BF", x_hat="BD", W_dec="FD", dead=dead,
                 k_aux=lambda s: st.integers(1, s["F"]), aux_coef=st.sampled_from([1.0, 0.5, 2.0]))


def _aux_scalar(fn, c):
    expect_tensor(fn(*args(c, *AUX)), (), "the AuxK loss")


def _aux_none_dead(fn, c):
    loss = fn(*args(c, *AUX))
    if loss.item() != 0:
        raise Failed(f"the loss is {show(loss.item())} with no dead latent, expected 0.0")


def _aux_detached(fn, c):
    a = args(c, *AUX, grad=("x_hat",))
    (g,) = grads(fn(*a), [a[2]])
    if (g != 0).any():
        raise Failed(f"d loss / d x_hat = {show(g)}, expected zeros (e = x - x_hat is a constant target)")


def _aux_live_no_grad(fn, c):
    a = args(c, *AUX, grad=("pre", "W_dec"))
    g_pre, g_W = grads(fn(*a), [a[1], a[3]])
    live = ~c["dead"]
    if (g_pre[:, live] != 0).any() or (g_W[live] != 0).any():
        raise Failed(f"live latents {show(live.nonzero().flatten())} get gradients: d/dpre = {show(g_pre)}, "
                     f"d/dW_dec = {show(g_W)}")


def _aux_no_tie(c):
    """No tie at the k_aux-th place among the dead latents (either may be chosen)."""
    vals = c["pre"][:, c["dead"]].sort(-1, descending=True).values
    k = c["k_aux"]
    if k < vals.shape[1]:
        assume(((vals[:, k - 1] - vals[:, k] > 1e-9) | (vals[:, k - 1] <= 0)).all())


def _aux_naive(fn, c):
    _aux_no_tie(c)
    x, pre, x_hat, W = (c[n].tolist() for n in ("x", "pre", "x_hat", "W_dec"))
    dead = [i for i, d in enumerate(c["dead"].tolist()) if d]
    total = 0.0
    for b in range(len(x)):  # the naive reference: one sample at a time
        chosen = sorted(dead, key=lambda i: pre[b][i], reverse=True)[:c["k_aux"]]
        e_hat = [sum(max(pre[b][i], 0.0) * W[i][j] for i in chosen) for j in range(len(x[b]))]
        total += sum((x[b][j] - x_hat[b][j] - e_hat[j]) ** 2 for j in range(len(x[b])))
    want = torch.tensor(c["aux_coef"] * total / len(x) if dead else 0.0, dtype=torch.float64)
    expect_close(fn(*args(c, *AUX)), want, "the AuxK loss")


def _aux_minisae(fn, c):
    _aux_no_tie(c)
    a, r = args(c, *AUX, grad=("pre", "W_dec")), args(c, *AUX, grad=("pre", "W_dec"))
    loss, ref = fn(*a), ref_auxk_loss(*r)
    expect_close(loss, ref, "the AuxK loss")
    (g_pre, g_W), (ref_pre, ref_W) = grads(loss, [a[1], a[3]]), grads(ref, [r[1], r[3]])
    expect_close(g_pre, ref_pre, "d/dpre")
    expect_close(g_W, ref_W, "d/dW_dec")


# -- chapter 7: the paired test against the shuffled control ------------------------------

def _p(fn, c):
    p = fn(c["d"].clone())
    p = float(p) if torch.is_tensor(p) else p
    if not isinstance(p, float):
        raise Failed(f"the p-value is a {type(p).__name__}, not a float (or a 0-dim tensor)")
    return p


def _sign_range(fn, c):
    p = _p(fn, c)
    if not 0 < p <= 1:
        raise Failed(f"p = {p}: a p-value lies in (0, 1] (the observed signs themselves are one of the flips)")


def _sign_two_sided(fn, c):
    p, q = _p(fn, c), _p(fn, {"d": -c["d"]})
    if abs(p - q) > 1e-12:
        raise Failed(f"p(d) = {p} but p(-d) = {q}: the test is two-sided (|mean|), so flipping every sign "
                     f"changes nothing; d = {show(c['d'])}")


def _sign_zeros(fn, c):
    p = _p(fn, {"d": torch.zeros_like(c["d"])})
    if p != 1.0:
        raise Failed(f"p = {p} for d = 0: every flip ties the observed mean, so p = 1 (count ties as 'at least')")


def _sign_naive(fn, c):
    d = c["d"].tolist()
    t = abs(sum(d) / len(d))
    flips = list(itertools.product((1, -1), repeat=len(d)))  # every sign pattern: the loop reference
    want = sum(abs(sum(e * x for e, x in zip(signs, d)) / len(d)) >= t - 1e-12 for signs in flips) / len(flips)
    got = _p(fn, c)
    if abs(got - want) > 1e-12:
        raise Failed(f"p = {got}, expected {want} = #(flips with |mean| >= observed) / 2^n for d = {show(c['d'])}")


def _sign_minisae(fn, c):
    got, want = _p(fn, c), ref_sign_flip_p(c["d"].clone())
    if abs(got - want) > 1e-12:
        raise Failed(f"p = {got}, minisae's stats.sign_flip_test gives {want} for d = {show(c['d'])}")


# -- chapter 10: the Matryoshka loss -----------------------------------------------------

MAT = ("x", "f", "W_dec", "b_dec", "prefixes")


def _mat_cases(**more):
    """prefixes: a strictly increasing tuple in 1..F ending at F (the whole dictionary)."""
    st = strategies()
    prefixes = lambda s: st.sets(st.integers(1, s["F"])).map(lambda ms: tuple(sorted(ms | {s["F"]})))
    return cases(x="BD", f=("BF", NONNEG), W_dec="FD", b_dec="D", prefixes=prefixes, **more)


def _mat_scalar(fn, c):
    expect_tensor(fn(*args(c, *MAT)), (), "the loss")


def _mat_whole(fn, c):
    n = c["W_dec"].shape[0]  # F
    err = c["x"] - (c["f"] @ c["W_dec"] + c["b_dec"])  # (B, D)
    expect_close(fn(*args(dict(c, prefixes=(n,)), *MAT)), err.pow(2).sum(-1).mean(),
                 f"the loss with prefixes = ({n},)")


def _mat_naive(fn, c):
    x, f, W, b = (c[n].tolist() for n in ("x", "f", "W_dec", "b_dec"))
    total = 0.0
    for m in c["prefixes"]:  # the naive reference: a loop over prefixes, samples, dimensions
        for xb, fb in zip(x, f):
            x_hat = [sum(fb[i] * W[i][j] for i in range(m)) + b[j] for j in range(len(b))]
            total += sum((xb[j] - x_hat[j]) ** 2 for j in range(len(b))) / len(x)
    expect_close(fn(*args(c, *MAT)), torch.tensor(total, dtype=torch.float64), "the loss")


def _mat_permuted(c):
    """The latents reordered inside each group [a, m) between two prefix boundaries,
    in the order `perm` gives them."""
    order, a = [], 0
    for m in c["prefixes"]:
        order += sorted(range(a, m), key=lambda i: c["perm"][i])
        a = m
    return dict(c, f=c["f"][:, order], W_dec=c["W_dec"][order])


def _mat_permute(fn, c):
    expect_close(fn(*args(_mat_permuted(c), *MAT)), fn(*args(c, *MAT)),
                 "the loss with latents permuted inside their groups", ON_INPUT)


def _mat_grad(fn, c):
    a, r = args(c, *MAT, grad=("W_dec",)), args(c, *MAT, grad=("W_dec",))
    (g,), (g_ref,) = grads(fn(*a), [a[2]]), grads(ref_matryoshka_loss(*r), [r[2]])
    expect_close(g, g_ref, "d loss / d W_dec")


def _mat_minisae(fn, c):
    expect_close(fn(*args(c, *MAT)), ref_matryoshka_loss(*args(c, *MAT)), "the loss")


# -- chapter 11: one attribution edge ----------------------------------------------------

EDGE = ("x", "f_a", "W_dec_a", "layer", "W_enc_b", "b_enc_b", "b_dec_b", "i", "j")
FD_STEP = 1e-6  # central difference step: truncation ~ (step |f_a_i d_i|)^2, rounding ~ 1e-16 |m_j| / step
FD_TOL = dict(rtol=1e-6, atol=1e-6)


class MixLayer:
    """x_b = layer(x): x_b(t) = x(t) + tanh((x(0) + ... + x(t)) @ M), a residual layer that
    mixes positions causally, as attention does, so that g_j(t) gets terms from later t."""

    def __init__(self, M):
        self.M = M  # (D, D)

    def __call__(self, x):  # x (T, D)
        return x + torch.tanh(torch.cumsum(x, 0) @ self.M)  # (T, D)

    def __repr__(self):
        return f"x + tanh(cumsum(x, 0) @ M) with M = {show(self.M)}"


class Identity:
    def __call__(self, x):
        return x

    def __repr__(self):
        return "x (the identity)"


def _edge_cases(layer=True):
    """T = B positions; A and B have F latents each; i, j any latent."""
    st = strategies()
    index = lambda s: st.integers(0, s["F"] - 1)
    more = dict(M="DD") if layer else {}
    return cases(then=lambda c: {**{k: v for k, v in c.items() if k != "M"},
                                 "layer": MixLayer(c["M"]) if layer else Identity()},
                 x="BD", f_a=("BF", NONNEG), W_dec_a="FD", W_enc_b="FD", b_enc_b="F", b_dec_b="D",
                 i=index, j=index, **more)


def _m_j(c, x):
    """m_j = sum_t ReLU(W_enc_b[j] . (layer(x)(t) - b_dec_b) + b_enc_b[j]), and the pre-activations (T,)."""
    pre = (c["layer"](x) - c["b_dec_b"]) @ c["W_enc_b"][c["j"]] + c["b_enc_b"][c["j"]]  # (T,)
    return pre.clamp(min=0).sum(), pre


def _edge_scalar(fn, c):
    expect_tensor(fn(*args(c, *EDGE)), (), "the edge")


def _edge_linear(fn, c):
    scaled = c["f_a"].clone()
    scaled[:, c["i"]] *= c["c"]
    expect_close(fn(*args(dict(c, f_a=scaled), *EDGE)), c["c"] * fn(*args(c, *EDGE)),
                 f"the edge with latent i's codes times {show(c['c'])}", "but c times the edge on the input is")


def _edge_naive(fn, c):
    x, f, Wd, We, be, bd = (c[n].tolist() for n in ("x", "f_a", "W_dec_a", "W_enc_b", "b_enc_b", "b_dec_b"))
    i, j, total = c["i"], c["j"], 0.0
    for t in range(len(x)):  # identity layer: g_j(t) = 1[pre_j(t) > 0] W_enc_b[j] at position t alone
        pre = sum(We[j][d] * (x[t][d] - bd[d]) for d in range(len(bd))) + be[j]
        if pre > 0:
            total += f[t][i] * sum(Wd[i][d] * We[j][d] for d in range(len(bd)))
    expect_close(fn(*args(c, *EDGE)), torch.tensor(total / len(x), dtype=torch.float64), "the edge")


def _edge_finite_difference(fn, c):
    c = dict(c, b_enc_b=c["b_enc_b"] + 1 / 7)  # off the grid of quarters: no pre-activation sits at a kink
    delta = c["f_a"][:, c["i"], None] * c["W_dec_a"][c["i"]]  # (T, D): latent i's term at every position
    (m_up, pre_up), (m_down, pre_down) = _m_j(c, c["x"] + FD_STEP * delta), _m_j(c, c["x"] - FD_STEP * delta)
    assume(torch.cat([pre_up, pre_down]).abs().min() > 1e-4)  # the step crosses no ReLU kink
    want = (m_up - m_down) / (2 * FD_STEP) / len(c["x"])
    got = fn(*args(c, *EDGE))
    if not torch.allclose(got.detach(), want, **FD_TOL):
        raise Failed(f"the edge = {show(got.detach())}, but the central difference (m_j(x + h delta) - "
                     f"m_j(x - h delta)) / (2 h T), delta = latent i's term, h = {FD_STEP:g}, is {show(want)}")


def _edge_minisae(fn, c):
    expect_close(fn(*args(c, *EDGE)), ref_attribution_edge(*args(c, *EDGE)), "the edge")


def exercises():
    """{name: [Property, ...]}, the properties in the order they are checked: the cheap,
    specific ones first, so that a failure names the mistake; minisae's code last."""
    st = strategies()

    def enc(**more):
        return cases(x="BD", W_enc="FD", b_enc="F", b_dec="D", **more)

    def l1():
        return cases(f=("BF", NONNEG), W_dec="FD", coef=st.sampled_from([1.0, 0.5, 2.0, 0.0]), c=("F", SCALES))

    def topk():
        return cases(pre=("BF", INTEGERS), k=lambda s: st.integers(1, s["F"]))

    def gated():
        r_mag = tuple(v for v in VALUES if abs(v) <= 2)
        return cases(x="BD", W_gate="FD", b_gate="F", r_mag=("F", r_mag), b_mag="F", b_dec="D")

    def diffs():
        values = tuple(v for v in VALUES if abs(v) <= 2)
        return st.lists(st.sampled_from(values), min_size=1, max_size=8).map(
            lambda v: {"d": torch.tensor(v, dtype=torch.float64)})  # (n,), n <= 8: exact

    P = Property
    return {
        "encode": [
            P("shape", "f is a (B, F) float64 tensor for x (B, D) and W_enc (F, D)", enc, _encode_shape),
            P("nonnegative", "f >= 0 everywhere (the ReLU)", enc, lambda fn, c: nonnegative(fn, c, ENC)),
            P("centring", "shifting x and b_dec by the same vector leaves f unchanged (x - b_dec is encoded)",
              lambda: enc(shift="D"), _encode_centring),
            P("minisae", "f equals minisae's SAE.encode (a ReLU SAE with these weights)", enc, _encode_minisae)],
        "l1_loss": [
            P("scalar", "the loss is one number for the batch (a 0-dim float64 tensor)", l1, _l1_scalar),
            P("norm_invariance", "f_i * c_i and W_dec[i] / c_i give the same loss (the chapter-2 cheat does not pay)",
              l1, _l1_norm_invariance),
            P("batch_mean", "the loss is a mean over the batch: the batch repeated twice gives the same loss",
              l1, _l1_batch_mean),
            P("minisae", "loss = coef * mean_b sum_i f_bi ||W_dec[i]||: minisae's ReLU.loss_terms on the code with "
              "the decoder norms folded in (fold_decoder_norm_)", l1, _l1_minisae)],
        "topk_activation": [
            P("shape", "f has the shape and dtype of pre", topk, _topk_shape),
            P("nonnegative", "f >= 0 (the ReLU after TopK)", topk, lambda fn, c: nonnegative(fn, c, ("pre", "k"))),
            P("at_most_k", "at most k entries of each row are nonzero", topk, _topk_at_most_k),
            P("kept_unshrunk", "each entry of f is 0 or its own pre-activation", topk, _topk_kept_unshrunk),
            P("largest", "each row keeps its largest positive pre-activations, min(k, #positive) of them "
              "(a per-row sort loop)", topk, _topk_largest),
            P("minisae", "f equals minisae's TopK.forward", topk, _topk_minisae)],
        "gated_forward": [
            P("shape", "f is a (B, F) float64 tensor for x (B, D) and W_gate (F, D)", gated, _gated_shape),
            P("nonnegative", "f >= 0", gated, lambda fn, c: nonnegative(fn, c, GATED)),
            P("gate_closed", "f = 0 wherever the gate pi_gate = W_gate (x - b_dec) + b_gate is <= 0",
              gated, _gated_closed),
            P("no_gate_gradient", "no gradient reaches b_gate through f (the step 1[pi_gate > 0] passes none, "
              "and W_mag (x - b_dec) + b_mag does not contain b_gate)", gated, _gated_no_gate_gradient),
            P("tied", "with r_mag = 0 and b_mag = b_gate, f = ReLU(pi_gate) (W_mag = exp(r_mag) W_gate)",
              gated, _gated_tied),
            P("minisae", "f equals minisae's Gated SAE encode", gated, _gated_minisae)],
        "JumpReLUFn": [
            P("forward", "JumpReLUFn.apply(z, theta, eps) = z where z > theta, 0 elsewhere",
              _jump_cases, _jump_forward),
            P("z_gradient", "dL/dz = G * 1[z > theta] (the true gradient; L = sum(f * G))",
              _jump_cases, _jump_z_gradient),
            P("window", "theta gets a gradient only from entries with |z - theta| < eps/2 (the rectangle kernel)",
              _jump_cases, _jump_window),
            P("eq11", "dL/dtheta_i = -(theta_i / eps) sum_b 1[|z_bi - theta_i| < eps/2] G_bi (Jumping Ahead eq. 11; "
              "a naive loop)", _jump_cases, _jump_eq11),
            P("minisae", "f and both gradients equal minisae's _JumpReLUFn", _jump_cases, _jump_minisae)],
        "auxk_loss": [
            P("scalar", "the loss is one number for the batch (a 0-dim float64 tensor)", _aux_cases, _aux_scalar),
            P("none_dead", "the loss is 0 when no latent is dead", lambda: _aux_cases(all_live=True), _aux_none_dead),
            P("detached", "x_hat gets no gradient: the error e = x - x_hat is detached", _aux_cases, _aux_detached),
            P("live_no_grad", "live latents get no gradient (pre[:, live], W_dec[live])",
              _aux_cases, _aux_live_no_grad),
            P("naive", "loss = aux_coef * mean_b ||e_b - W_dec^T ReLU(TopK_k_aux(pre_b[dead]))||^2, no b_dec "
              "(a loop over samples)", _aux_cases, _aux_naive),
            P("minisae", "the loss and its gradients equal minisae's variants.auxk_loss", _aux_cases, _aux_minisae)],
        "sign_flip_p": [
            P("range", "0 < p <= 1", diffs, _sign_range),
            P("two_sided", "p(d) = p(-d): the statistic is |mean d|", diffs, _sign_two_sided),
            P("zeros", "p = 1 for d = 0 (ties count as at least as extreme)", diffs, _sign_zeros),
            P("naive", "p = #(sign patterns e with |mean(e d)| >= |mean d|) / 2^n (a loop over all 2^n)",
              diffs, _sign_naive),
            P("minisae", "p equals minisae's stats.sign_flip_test (exact for n <= 16)", diffs, _sign_minisae)],
        "matryoshka_loss": [
            P("scalar", "the loss is one number for the batch (a 0-dim float64 tensor)", _mat_cases, _mat_scalar),
            P("whole", "with one prefix, the whole dictionary (prefixes = (F,)), the loss is the plain "
              "reconstruction error mean_b ||x_b - (f_b W_dec + b_dec)||^2, b_dec included", _mat_cases, _mat_whole),
            P("naive", "loss = sum over m in prefixes (not a mean) of mean_b ||x_b - (f_b[:m] W_dec[:m] + b_dec)||^2, "
              "f_b[:m] the first m latents 0..m-1 (a loop over prefixes and samples)", _mat_cases, _mat_naive),
            P("permute", "reordering the latents inside one group [a, m) between two prefix boundaries (f's "
              "columns and W_dec's rows together) changes nothing",
              lambda: _mat_cases(perm=lambda s: strategies().permutations(range(s["F"]))), _mat_permute),
            P("grad_W_dec", "d loss / d W_dec equals minisae's: every prefix's term trains the decoder",
              _mat_cases, _mat_grad),
            P("minisae", "the loss equals minisae's SAE.loss \"recon\" + MatryoshkaBatchTopK's \"prefixes\" term",
              _mat_cases, _mat_minisae)],
        "attribution_edge": [
            P("scalar", "the edge is one number (a 0-dim float64 tensor)", _edge_cases, _edge_scalar),
            P("linear", "the edge is linear in latent i's codes: f_a[:, i] times c gives c times the edge (a first-"
              "order term, not the ablation m_j(x) - m_j(x - delta))",
              lambda: _edge_cases().map(lambda c: {**c, "c": c["f_a"].new_tensor(2.5)}), _edge_linear),
            P("naive", "with the identity layer, edge = (1/T) sum_t f_a_i(t) 1[pre_j(t) > 0] W_dec_a[i] . W_enc_b[j] "
              "(a loop over positions)", lambda: _edge_cases(layer=False), _edge_naive),
            P("finite_difference", "the edge equals the central difference of m_j along latent i's term, divided "
              "by T: the layer mixes positions, so g_j(t) has terms from every later position",
              _edge_cases, _edge_finite_difference),
            P("minisae", "the edge equals (1/T) sum_t f_a_i(t) W_dec_a[i] . g_j(t) with g_j from autograd through "
              "minisae's ReLU SAE encode", _edge_cases, _edge_minisae)],
    }



# -- the references: minisae's own code in the exercises' signatures (exercises/solutions.py) --

def _sae(variant, W_enc, b_enc, b_dec, **part):
    """A minisae SAE of `variant` holding these encoder weights (W_dec is not used here)."""
    sae = make_sae(variant, W_enc.shape[1], W_enc.shape[0]).to(W_enc.dtype)
    with torch.no_grad():
        for name, value in dict(W_enc=W_enc, b_enc=b_enc, b_dec=b_dec).items():
            getattr(sae, name).copy_(value)
        for name, value in part.items():
            getattr(sae.activation, name).copy_(value)
    return sae


def ref_encode(x, W_enc, b_enc, b_dec):
    return _sae("relu", W_enc, b_enc, b_dec).encode(x)  # (B, F)


def ref_l1_loss(f, W_dec, coef):
    # fold_decoder_norm_ makes the rows unit norm and multiplies latent i's code by ||W_dec[i]||
    folded = f * W_dec.norm(dim=-1)  # (B, F)
    return ReLU(coef).loss_terms(x=None, pre=None, f=folded, x_hat=None, sae=None)["l1"]


def ref_topk_activation(pre, k):
    return TopK(pre.shape[-1], k).forward(pre, sae=None)  # (B, F)


def ref_gated_forward(x, W_gate, b_gate, r_mag, b_mag, b_dec):
    return _sae("gated", W_gate, b_gate, b_dec, r_mag=r_mag, b_mag=b_mag).encode(x)  # (B, F)


def ref_auxk_loss(x, pre, x_hat, W_dec, dead, k_aux, aux_coef):
    sae = SimpleNamespace(W_dec=W_dec, samples_since_fired=dead.long())  # dead: fired >= 1 sample ago
    return auxk_loss(x, pre, x_hat, sae, k_aux=k_aux, aux_coef=aux_coef, dead_after=1)


def ref_sign_flip_p(d):
    return sign_flip_test(d.tolist())  # exact: n <= 16 here


def ref_attribution_edge(x, f_a, W_dec_a, layer, W_enc_b, b_enc_b, b_dec_b, i, j):
    # the first-order term of minisae/interp/attribution.py for one (i, j), B's code from minisae's SAE
    x = x.detach().requires_grad_()
    m_j = _sae("relu", W_enc_b, b_enc_b, b_dec_b).encode(layer(x))[:, j].sum()  # sum_t f_b_j(t)
    g, = torch.autograd.grad(m_j, x)  # (T, D): g_j(t) = dm_j / dx(t)
    return (f_a[:, i, None] * W_dec_a[i] * g).sum() / len(x)


def ref_matryoshka_loss(x, f, W_dec, b_dec, prefixes):
    # SAE.loss's "recon" (the term m = F) + MatryoshkaBatchTopK.loss_terms's "prefixes" (m < F)
    part = MatryoshkaBatchTopK(W_dec.shape[0], k=1, prefixes=tuple(prefixes))
    sae = SimpleNamespace(W_dec=W_dec, b_dec=b_dec, d=W_dec.shape[1],
                          samples_since_fired=torch.zeros(W_dec.shape[0]))  # no latent dead: AuxK is 0
    x_hat = torch.addmm(b_dec, f, W_dec)  # (B, D) = SAE.decode(f)
    recon = (x_hat - x).pow(2).sum(-1).mean()
    return recon + part.loss_terms(x, pre=f, f=f, x_hat=x_hat, sae=sae)["prefixes"]
