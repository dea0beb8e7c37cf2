"""The property machinery of the grader: what an exercise's property is, how inputs are
drawn (small float64 values with ties and edge cases first), how Hypothesis runs a
property and shrinks a failing input, and how a failure is told.

What each exercise must satisfy is in minisae/grading/exercises.py; the `check` command
that runs them on a learner's file is minisae/grading/check.py.
"""

import math
from dataclasses import dataclass

import torch

MAX_EXAMPLES = 100  # inputs per property (the reference solutions of all exercises pass in seconds)
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
    st = strategies()

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


def strategies():
    """hypothesis.strategies, imported when first needed: `import minisae.grading.check` stays cheap."""
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
