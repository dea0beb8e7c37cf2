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

This file is the machinery: drawing inputs, running a property with Hypothesis, reporting.
What each exercise must satisfy, and its reference (minisae's own code in the exercise's
signature), is in minisae/exercise_checks.py.
"""

import importlib.util
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

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
    """hypothesis.strategies, imported when first needed: `import minisae.check` stays cheap."""
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


def check_exercise(name: str, fn, max_examples: int = MAX_EXAMPLES, shrink: bool = True) -> Result:
    """Run the exercise's properties in order on the learner's `fn`; the first failure ends it."""
    from minisae.exercise_checks import exercises
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
    from minisae.exercise_checks import exercises
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
