"""Grade a learner's exercises by the invariants minisae's own tests use.

    python -m minisae check my_exercises.py

exercises/ch2_sae.py and exercises/ch3_variants.py are templates: a learner copies one and
fills in its functions. For each exercise found in the file the checker runs its properties
in order; Hypothesis draws small float64 inputs, and when a property fails it shrinks the
input to a small one, so the report names the property, says what went wrong and shows an
input that shows it. The first failing property ends that exercise. An exercise that still
raises NotImplementedError is skipped.

Why properties: comparing with a solution on a few fixed inputs misses the edge cases a
learner gets wrong (ties at the k-th place, a negative bias, a pre-activation just inside
the kernel's window, a batch with no dead latent); Hypothesis looks for them.

The references are minisae's own code: the `ref_*` functions at the end call
minisae/sae.py and minisae/variants.py in the exercises' signatures, and
exercises/solutions.py is them under the exercises' names. Conventions as in sae.py:
W_enc, W_dec (F, D); x_hat = f @ W_dec + b_dec; squared errors summed over D, averaged over B.
"""

import importlib.util
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from minisae.sae import ReLU, make_sae
from minisae.variants import TopK, auxk_loss
from minisae.variants import _JumpReLUFn as ref_JumpReLUFn  # the reference for the JumpReLUFn exercise

MAX_EXAMPLES = 100  # inputs per property; all six exercises on the reference: about 9 s of one core
TOL = dict(rtol=1e-9, atol=1e-9)  # inputs are float64; a correct answer differs only by rounding


class Failed(AssertionError):
    """A property does not hold; the message says how."""


@dataclass
class Property:
    key: str  # short name (tests use it)
    says: str  # the property, as the report prints it
    cases: object  # () -> Hypothesis strategy of input dicts
    check: object  # (learner's function, case) -> None, raises Failed


@dataclass
class Result:
    exercise: str
    status: str  # PASS, FAIL or SKIP
    prop: Property = None  # the property that failed
    why: str = ""
    case: dict = None  # the (shrunk) input it failed on


# -- inputs ------------------------------------------------------------------------------

# Entry values: multiples of 1/4 in [-3, 3], simplest first (integers, halves, quarters;
# small before large). Exact in binary, so sums are exact and ties, zeros and thresholds
# are hit exactly: the edge cases a learner misses.
VALUES = tuple(sorted({i / 4 for i in range(-12, 13)}, key=lambda v: (v % 0.5 != 0, v % 1 != 0, abs(v), v < 0)))
INTEGERS = VALUES[:7]  # -3..3: ties are common (TopK must keep at most k of them)
NONNEG = tuple(v for v in VALUES if v >= 0)
SCALES = tuple(v for v in VALUES if v > 0)
BOOLS = (False, True)


def cases(then=None, **fields):
    """Dicts of inputs. A field given as letters is a tensor of that shape, spelled in B, D,
    F (sizes drawn once per case: B 1-3, D 1-3, F 1-4), with entries from VALUES; as
    (letters, values) with entries from `values`; a callable gets the sizes and returns a
    strategy; anything else is a strategy. `then` derives more fields from the drawn ones.

    A tensor is drawn as one byte string, each byte picking an entry (byte 0 the first,
    simplest value): five times faster than drawing floats one by one, and Hypothesis
    shrinks it towards 0, 1, -1."""
    st = _st()

    @st.composite
    def draw_case(draw):
        size = {"B": draw(st.integers(1, 3)), "D": draw(st.integers(1, 3)), "F": draw(st.integers(1, 4))}
        case = {}
        for name, spec in fields.items():
            if isinstance(spec, (str, tuple)):
                letters, values = (spec, VALUES) if isinstance(spec, str) else spec
                shape = tuple(size[c] for c in letters)
                raw = draw(st.binary(min_size=math.prod(shape), max_size=math.prod(shape)))
                dtype = torch.bool if values is BOOLS else torch.float64
                case[name] = torch.tensor([values[b % len(values)] for b in raw], dtype=dtype).reshape(shape)
            else:
                case[name] = draw(spec(size) if callable(spec) else spec)
        return then(case) if then else case
    return draw_case()


def _st():
    from hypothesis import strategies as st
    return st


def assume(condition):
    """Skip a drawn input (Hypothesis draws another) where the answer is not well defined."""
    from hypothesis import assume as hypothesis_assume
    hypothesis_assume(bool(condition))


def args(case, *names, grad=()):
    """Fresh copies of the named inputs (a learner may change them in place); `grad` ones require grad."""
    return [case[n].clone().requires_grad_(n in grad) if torch.is_tensor(case[n]) else case[n] for n in names]


def show(v):
    if torch.is_tensor(v):
        v = v.tolist()
    if isinstance(v, list):
        return "[" + ", ".join(show(u) for u in v) + "]"
    if isinstance(v, float):
        s = f"{v:.6g}"
        return s if any(c in s for c in ".en") else s + ".0"  # 2.0, not 2: a float, not an int
    return repr(v)


def expect_tensor(out, shape, what):
    if not torch.is_tensor(out):
        raise Failed(f"{what} should be a torch tensor, got {type(out).__name__}")
    if tuple(out.shape) != tuple(shape) or out.dtype != torch.float64:
        raise Failed(f"{what} is {tuple(out.shape)} {out.dtype}, expected {tuple(shape)} torch.float64")


ON_INPUT = "but on the input it is"  # for an invariance: the value that should not have changed


def expect_close(got, want, what, expected="expected"):
    if not torch.allclose(got.detach(), want.detach(), **TOL):
        raise Failed(f"{what} = {show(got.detach())}, {expected} {show(want.detach())}")


def grads(out, inputs):
    """d out / d inputs, zeros where out does not depend on an input."""
    if not out.requires_grad:
        return [torch.zeros_like(t) for t in inputs]
    gs = torch.autograd.grad(out, inputs, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(gs, inputs)]


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
    return cases(then, u=("BF", WINDOW_OFFSETS), theta="F", eps=_st().sampled_from([1.0, 0.5, 0.1]), G="BF")


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
    st = _st()
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


def exercises():
    """{name: [Property, ...]}, the properties in the order they are checked: the cheap,
    specific ones first, so that a failure names the mistake; minisae's code last."""
    st = _st()

    def enc(**more):
        return cases(x="BD", W_enc="FD", b_enc="F", b_dec="D", **more)

    def l1():
        return cases(f=("BF", NONNEG), W_dec="FD", coef=st.sampled_from([1.0, 0.5, 2.0, 0.0]), c=("F", SCALES))

    def topk():
        return cases(pre=("BF", INTEGERS), k=lambda s: st.integers(1, s["F"]))

    def gated():
        r_mag = tuple(v for v in VALUES if abs(v) <= 2)
        return cases(x="BD", W_gate="FD", b_gate="F", r_mag=("F", r_mag), b_mag="F", b_dec="D")

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
    }


# -- running the checks --------------------------------------------------------------------

def check_property(fn, prop: Property, max_examples: int = MAX_EXAMPLES, shrink: bool = True):
    """None if the property holds on every drawn input; "todo" if the learner's code raises
    NotImplementedError; else (why, the input, shrunk unless shrink=False: tests use that to
    save time, since which property fails does not depend on shrinking)."""
    from hypothesis import HealthCheck, Phase, Verbosity, given, settings

    seen = {}
    phases = list(Phase) if shrink else [Phase.explicit, Phase.generate]

    @settings(max_examples=max_examples, phases=phases, deadline=None, derandomize=True, database=None,
              print_blob=False, report_multiple_bugs=False, suppress_health_check=list(HealthCheck),
              verbosity=Verbosity.quiet)
    @given(prop.cases())
    def run(case):
        seen["case"] = case  # Hypothesis replays the shrunk failing input last
        try:
            prop.check(fn, case)
        except NotImplementedError:
            seen["todo"] = True
    try:
        run()
    except Failed as e:
        return str(e), seen.get("case")
    except Exception as e:  # the learner's code may raise anything
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return f"raised {type(e).__name__}: {first}", seen.get("case")
    return "todo" if seen.get("todo") else None


def check_exercise(name: str, fn, max_examples: int = MAX_EXAMPLES, shrink: bool = True) -> Result:
    props = exercises()[name]
    if check_property(fn, props[0], max_examples=1, shrink=False) == "todo":  # one input tells
        return Result(name, "SKIP", why="still raises NotImplementedError")
    for prop in props:
        out = check_property(fn, prop, max_examples, shrink)
        if out == "todo":
            return Result(name, "SKIP", why="still raises NotImplementedError")
        if out is not None:
            return Result(name, "FAIL", prop, *out)
    return Result(name, "PASS")


def load(path) -> object:
    """The learner's file, imported as a module. ValueError for a missing or broken file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file (give your copy of exercises/ch2_sae.py or ch3_variants.py)")
    spec = importlib.util.spec_from_file_location(f"minisae_exercises_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise ValueError(f"{path}: importing it raised {type(e).__name__}: {e}") from e
    return module


def report(result: Result) -> str:
    line = f"  {result.exercise:<16} {result.status}"
    if result.status == "SKIP":
        return f"{line}  ({result.why})"
    if result.status == "PASS":
        return line
    case = ", ".join(f"{k} = {show(v)}" for k, v in (result.case or {}).items())
    return (f"{line}  property {result.prop.key}: {result.prop.says}\n"
            f"      {result.why}\n      input: {case}")


def main(path) -> int:
    """Check every exercise defined in the file at `path`; print one line per exercise
    (and for a failure the property, why, and the input). 0 if nothing failed, 1 if an
    exercise failed, 2 if the file cannot be read or defines no exercise."""
    if importlib.util.find_spec("hypothesis") is None:
        print("minisae check: the checker draws its inputs with Hypothesis: pip install hypothesis", file=sys.stderr)
        return 2
    try:
        module = load(path)
    except ValueError as e:
        print(f"minisae check: {e}", file=sys.stderr)
        return 2
    found = {name: getattr(module, name) for name in exercises() if hasattr(module, name)}
    if not found:
        print(f"minisae check: {path} defines none of the exercises {', '.join(exercises())}", file=sys.stderr)
        return 2
    results = [check_exercise(name, fn) for name, fn in found.items()]
    for r in results:
        print(report(r))
    n = {s: sum(r.status == s for r in results) for s in ("PASS", "FAIL", "SKIP")}
    print(f"{path}: {n['PASS']} passed, {n['FAIL']} failed, {n['SKIP']} not done yet")
    return 1 if n["FAIL"] else 0


# -- the references: minisae's own code in the exercises' signatures ------------------------

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
    from types import SimpleNamespace
    sae = SimpleNamespace(W_dec=W_dec, samples_since_fired=dead.long())  # dead: fired >= 1 sample ago
    return auxk_loss(x, pre, x_hat, sae, k_aux=k_aux, aux_coef=aux_coef, dead_after=1)
