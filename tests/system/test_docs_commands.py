"""Every command the docs give runs as written, in reading order (README.md, then
docs/01.. in order), on a fresh clone:

- each `python -m minisae CMD ...` parses with the real command line (the --help level:
  flags exist, values have the right type, required flags are there), and every command
  prints its --help;
- each `python -m MODULE` names a module that exists, each `pytest PATH` a test file;
- the files a command reads (an SAE for features / steer / links / explain / convert, a
  file for check) were written by an earlier command of the docs: lm writes
  OUT/saes/VARIANT-KNOBVALUE for every value of its sweep, layers writes
  OUT/saes/blocks.L.hook_SITE-VARIANT-KNOBVALUE, convert writes DST, cp writes its target;
- a layer asked for exists in the model (gpt2-random has 4 layers, SmolLM2 30).

A command that reads the reader's own file says so in its comment ("# ... your own ..."
or "# an old minisae .pt file"); hf: sources are downloads. Those are not checked.

Nothing is run beyond argument parsing, so this is fast enough for every CI run; the
commands themselves were walked by hand (docs/README timings say how long each took)."""

import re
import shlex
from pathlib import Path

import pytest

from minisae import cli
from minisae.models.gpt2 import CONFIGS as GPT2_CONFIGS
from minisae.pipeline.sweep import LAYERS_SETTING, SWEEPS, parse_sweep

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
N_LAYER = {**{name: c.n_layer for name, c in GPT2_CONFIGS.items()}, "smollm2": 30}  # SmolLM2-135M: 30 blocks
ENV = re.compile(r"^(?:[A-Z_][A-Z0-9_]*=\S*\s+)+")


def commands(page: Path):
    """[(line number, argv, comment)] of the shell commands on `page`: lines (in code blocks or
    indented) that start with `python -m`, `pytest`, `cp` or `pip`, after an optional `$ `
    prompt and environment assignments; `\\` continuations and quotes over several lines
    joined; `a && b` split; the comment after `#` (if any) returned beside the argv."""
    lines = page.read_text(encoding="utf-8").splitlines()
    out, i = [], 0
    while i < len(lines):
        start, text = i + 1, lines[i].strip()
        i += 1
        if text.startswith("$ "):
            text = text[2:]
        text = ENV.sub("", text)
        if not re.match(r"(python -m |pytest\b|cp |pip install )", text):
            continue
        while True:
            if text.endswith("\\") and i < len(lines):
                text, i = text[:-1] + " " + lines[i].strip(), i + 1
                continue
            try:
                argv = shlex.split(text, comments=True)
            except ValueError:  # a quote still open: the argument goes on on the next line
                if i >= len(lines):
                    raise
                text, i = text + "\n" + lines[i], i + 1
                continue
            break
        comment = text.split(" #", 1)[1] if " #" in text else ""
        part = []
        for tok in argv + ["&&"]:
            if tok == "&&":
                if part:
                    out.append((start, part, comment))
                part = []
            else:
                part.append(tok)
    return out


def all_commands():
    return [(page, n, argv, comment) for page in PAGES for n, argv, comment in commands(page)]


def minisae_commands():
    return [(p, n, argv[3:]) for p, n, argv, _ in all_commands() if argv[:3] == ["python", "-m", "minisae"]]


def where(page, n):
    return f"{page.relative_to(ROOT)}:{n}"


def test_the_docs_have_commands():
    names = {argv[0] for _, _, argv in minisae_commands()}
    assert {"toy", "lm", "layers", "features", "steer", "links"} <= names


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_every_command_prints_its_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        cli.parser().parse_args([name, "--help"])
    assert e.value.code == 0 and f"python -m minisae {name}" in capsys.readouterr().out


def test_every_documented_command_parses():
    bad = []
    for page, n, argv in minisae_commands():
        if "..." in argv:
            bad.append(f"{where(page, n)}: '...' in {' '.join(argv)}")
            continue
        try:
            cli.parser().parse_args(argv)
        except SystemExit:
            bad.append(f"{where(page, n)}: does not parse: python -m minisae {' '.join(argv)}")
    assert not bad, "\n".join(bad)


def test_documented_modules_and_test_files_exist():
    import importlib.util
    for page, n, argv, _ in all_commands():
        if argv[:2] == ["python", "-m"] and argv[2] != "minisae":
            assert importlib.util.find_spec(argv[2]) is not None, f"{where(page, n)}: no module {argv[2]}"
        if argv[0] == "pytest":
            args = argv[1:]
            for i, path in enumerate(args):
                if not path.startswith("-") and not (i and args[i - 1] in ("-m", "-k")):  # -m/-k take an expression
                    assert (ROOT / path.split("::")[0]).exists(), f"{where(page, n)}: no test file {path}"


def sae_names(args) -> list:
    """The SAE folders an `lm` or `layers` command writes under OUT/saes/."""
    out = Path(args.out) / "saes"
    if args.command == "lm":
        sweeps = {**{v: SWEEPS[v] for v in args.variants if v in SWEEPS}, **parse_sweep(args.sweep)}
        return [out / f"{v}-{knob}{value}" for v in args.variants for knob, values in [sweeps[v]] for value in values]
    from minisae.pipeline.layers import parse_layers
    setting = args.setting or f"{SWEEPS[args.variant][0]}={LAYERS_SETTING[args.variant]}"
    (knob, (value,)), = parse_sweep([f"{args.variant}:{setting}"]).values()
    layers = parse_layers(args.layers, N_LAYER[args.model])
    return [out / f"blocks.{L}.hook_{args.site}-{args.variant}-{knob}{value}" for L in layers]


def test_files_a_command_reads_come_from_an_earlier_command():
    """Walk the docs in order, keeping the set of paths the commands so far have written."""
    made, bad = set(), []
    own = re.compile(r"\byour own\b|\bold minisae\b")

    def need(page, n, path, what):
        if str(path).startswith("hf:") or own.search(comment):
            return
        if Path(path) not in made:
            bad.append(f"{where(page, n)}: {what} {path} is written by no earlier command of the docs")

    for page, n, argv, comment in all_commands():
        if argv[0] == "cp":
            src, dst = argv[-2:]
            if not (ROOT / src).exists() and Path(src) not in made:
                bad.append(f"{where(page, n)}: cp from {src}, which is not in the repository")
            made.add(Path(dst))
            continue
        if argv[:3] != ["python", "-m", "minisae"]:
            continue
        try:
            args = cli.parser().parse_args(argv[3:])
        except SystemExit:
            continue  # reported by test_every_documented_command_parses
        if args.command in ("lm", "layers"):
            if args.model not in N_LAYER:
                bad.append(f"{where(page, n)}: unknown model {args.model}")
                continue
            if args.command == "lm" and not 0 <= args.layer < N_LAYER[args.model]:
                bad.append(f"{where(page, n)}: --layer {args.layer}, but {args.model} has layers "
                           f"0..{N_LAYER[args.model] - 1}")
                continue
            try:
                names = sae_names(args)
            except ValueError as e:
                bad.append(f"{where(page, n)}: {e}")
                continue
            made.update(names)
            made.add(Path(args.out))  # explain --sae RUN reads a whole lm run folder
        elif args.command in ("features", "steer", "explain"):
            need(page, n, args.sae, "the SAE")
        elif args.command == "links":
            need(page, n, args.sae, "SAE A")
            need(page, n, args.sae_b, "SAE B")
        elif args.command == "convert":
            need(page, n, args.src, "the SAE")
            made.add(Path(args.dst))
        elif args.command == "check":
            if not (ROOT / args.file).exists() and Path(args.file) not in made:
                bad.append(f"{where(page, n)}: check {args.file}, which no earlier command writes")
    assert not bad, "\n".join(bad)


def test_the_walk_checks_itself():
    """The extractor and the walk catch what they are for."""
    fake = ROOT / "tests" / "_doc_commands_fixture.md"
    fake.write_text("```\n$ OMP_NUM_THREADS=1 python -m minisae lm --model gpt2-random --layer 6 \\\n"
                    "    --variants topk --sweep topk:k=8 --out runs/x   # a comment\n"
                    "python -m minisae steer --sae runs/x/saes/topk-k8 --latent 1 --strength 2 --prompt \"a\nb\"\n"
                    "pip install -e . && python -m minisae toy\n```\n", encoding="utf-8")
    try:
        got = commands(fake)
    finally:
        fake.unlink()
    assert [a[:4] for _, a, _ in got] == [["python", "-m", "minisae", "lm"], ["python", "-m", "minisae", "steer"],
                                       ["pip", "install", "-e", "."], ["python", "-m", "minisae", "toy"]]
    assert got[0][1][-1] == "runs/x" and got[1][1][-1] == "a\nb" and got[0][2] == " a comment"
    args = cli.parser().parse_args(got[0][1][3:])
    assert sae_names(args) == [Path("runs/x/saes/topk-k8")]
    assert not 0 <= args.layer < N_LAYER[args.model]  # the walk reports this one
