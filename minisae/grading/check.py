"""Grade a learner's exercises by the invariants minisae's own tests use.

    python -m minisae check my_exercises.py

exercises/ch2_sae.py, ch3_variants.py, ch7_autointerp.py, ch10_absorption.py and ch11_circuits.py are
templates: a learner copies one and fills in its functions. For each exercise found in the
file the checker runs its properties in order; Hypothesis draws small float64 inputs, and
when a property fails it shrinks the input to a small one, so the report names the
property, says what went wrong and shows an input that shows it. The first failing
property ends that exercise. An exercise that still raises NotImplementedError is skipped.

Why properties: comparing with a solution on a few fixed inputs misses the edge cases a
learner gets wrong (ties at the k-th place, a negative bias, a pre-activation just inside
the kernel's window, a batch with no dead latent); Hypothesis looks for them.

This file is the command: load the learner's file, run each exercise, report. The
machinery (drawing inputs, running a property with Hypothesis) is minisae/grading/properties.py;
what each exercise must satisfy, and its reference (minisae's own code in the exercise's
signature), is minisae/grading/exercises.py.
"""

import importlib.util
import sys
from pathlib import Path

from minisae.grading.exercises import exercises
from minisae.grading.properties import MAX_EXAMPLES, Result, check_property, show


def check_exercise(name: str, fn, max_examples: int = MAX_EXAMPLES, shrink: bool = True) -> Result:
    """Run the exercise's properties in order on the learner's `fn`; the first failure ends it."""
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
        raise ValueError(f"{path}: no such file (give your copy of exercises/ch2_sae.py, ch3_variants.py, "
                         "ch7_autointerp.py, ch10_absorption.py or ch11_circuits.py)")
    if path.suffix != ".py":
        raise ValueError(f"{path}: not a Python file; give your copy of exercises/ch2_sae.py, "
                         "ch3_variants.py, ch7_autointerp.py, ch10_absorption.py or ch11_circuits.py")
    spec = importlib.util.spec_from_file_location(f"minisae_exercises_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SystemExit as e:  # not an Exception: it would end the checker itself, with the file's status
        raise ValueError(f"{path}: importing it called sys.exit({e.code!r}); the checker imports your file, "
                         "so keep script code under `if __name__ == \"__main__\":`") from None
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
        print(f"minisae: error: {e}", file=sys.stderr)
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
