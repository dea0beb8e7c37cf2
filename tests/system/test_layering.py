"""The layering rule: imports only go down.

The package is read top to bottom as a stack of layers. Each module may import only
modules listed before it in ORDER (the lower layers, and earlier files of its own
layer); an import that goes up or sideways out of order, or a cycle, fails this test.
Every import is read from the source with `ast`, function-local ones included: a cycle
hidden inside a function is still a cycle. Function-local imports are allowed only for
heavy or optional dependencies, each listed below with its reason.

    toy_models   synthetic data and the toy model of superposition; imports no minisae
    core         the SAE, its parts, the fast path, the loop, metrics, configs, plots
    models       language models with hook points, their files and tokenizers
    formats      SAE files: SAELens, sparsify, the old .pt; detect, load, save, convert
    pipeline     corpus -> activations -> batches -> SAE at a hook -> evaluation -> runs
    interp       features, feature pages, logit lens, steering, cross-layer links
    autointerp   examples, prompts, chat backends, scoring, stats, surprisal, intruder, verdict, the explain run
    toy          the SAE experiments on toy data (the main job)
    grading      the property machinery, the exercises, the check command
    cli          the command line
"""

import ast
from pathlib import Path


ROOT = Path(__file__).resolve().parents[2]

LAYERS = {
    "toy_models": ["toy_models", "toy_models.sparse_features", "toy_models.superposition"],
    "core": ["minisae", "minisae.utils", "minisae.configs", "minisae.metrics", "minisae.truth_metrics",
             "minisae.codes", "minisae.variants", "minisae.matryoshka", "minisae.sae", "minisae.sparse_decode",
             "minisae.distributed", "minisae.train", "minisae.stacked", "minisae.multi_train", "minisae.plots"],
    "models": ["minisae.models.hooks", "minisae.models.linear", "minisae.models.safetensors", "minisae.models.gguf",
               "minisae.models.bpe", "minisae.models.http", "minisae.models.hub", "minisae.models.gpt2", "minisae.models.llama",
               "minisae.models.llama_gguf", "minisae.models.kv_cache", "minisae.models"],
    "formats": ["minisae.formats.common", "minisae.formats.releases", "minisae.formats.saelens", "minisae.formats.sparsify",
                "minisae.formats.legacy", "minisae.formats.npz", "minisae.formats.foreign_pt", "minisae.formats"],
    "pipeline": ["minisae.pipeline", "minisae.pipeline.rate", "minisae.pipeline.data", "minisae.pipeline.store",
                 "minisae.pipeline.activations", "minisae.pipeline.batches", "minisae.pipeline.hooked_sae", "minisae.pipeline.evaluate",
                 "minisae.pipeline.sweep", "minisae.pipeline.lm", "minisae.pipeline.layers",
                 "minisae.pipeline.norms", "minisae.pipeline.transcoder"],
    "interp": ["minisae.interp", "minisae.interp.lens", "minisae.interp.feature_page", "minisae.interp.features",
               "minisae.interp.steer", "minisae.interp.links", "minisae.interp.attribution",
               "minisae.interp.circuit", "minisae.interp.circuit_page", "minisae.interp.interventions",
               "minisae.interp.probe", "minisae.interp.first_letter"],
    "autointerp": ["minisae.autointerp", "minisae.autointerp.chat", "minisae.autointerp.endpoint",
                   "minisae.autointerp.examples",
                   "minisae.autointerp.prompts", "minisae.autointerp.scoring", "minisae.autointerp.stats",
                   "minisae.autointerp.surprisal", "minisae.autointerp.intruder", "minisae.autointerp.verdict",
                   "minisae.autointerp.explain"],
    "toy": ["minisae.toy", "minisae.toy.superposition_sae", "minisae.toy.run", "minisae.toy.absorption"],
    "grading": ["minisae.grading", "minisae.grading.properties", "minisae.grading.exercises",
                "minisae.grading.check"],
    "cli": ["minisae.cli", "minisae.__main__"],
}
ORDER = [m for layer in LAYERS.values() for m in layer]

# Function-local imports of the project's own modules, and why each stays inside its function.
LOCAL_OK = {
    ("minisae.cli", "*"): "each command imports its module (and torch) when it runs: --help stays under 2 s",
    ("minisae.models", "minisae.models.gpt2"): "load_model imports the model it loads; MODEL_NAMES stays torch-free for --help",
    ("minisae.models", "minisae.models.llama_gguf"): "as above",
}
# Third-party modules that may be imported inside a function: heavy or optional.
HEAVY = {"matplotlib": "slow to import, only for figures", "jinja2": "optional: only for a GGUF chat template",
         "yaml": "optional: only to regenerate minisae/formats/releases.json.gz from sae-lens's yaml",
         "hypothesis": "a test-time dependency of the grader", "torch.distributed": "only under torchrun"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def sources():
    for pkg in ("minisae", "toy_models"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            yield module_name(path), path


def own(name: str) -> bool:
    return name == "minisae" or name.startswith(("minisae.", "toy_models"))


def imports(path: Path, name: str):
    """(imported module, line, function-local?) for each import in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    local_lines = {n.lineno for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, node.lineno, node.lineno in local_lines
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for a in node.names:  # `from pkg import mod` imports the module pkg.mod when there is one
                sub = f"{base}.{a.name}"
                yield (sub if sub in ORDER else base), node.lineno, node.lineno in local_lines


def violations(files):
    bad = []
    position = {m: i for i, m in enumerate(ORDER)}
    for name, path in files:
        if name not in position:
            bad.append(f"{name}: not in the layer order (add it to LAYERS where it belongs)")
            continue
        for target, line, local in imports(path, name):
            where = f"{path.relative_to(ROOT)}:{line}"
            if own(target):
                if target not in position:
                    bad.append(f"{where}: imports {target}, which is not a module of the layer order")
                elif name.startswith("toy_models") and target.startswith("minisae"):
                    bad.append(f"{where}: toy_models imports nothing from minisae, got {target}")
                elif position[target] >= position[name] and target != name:
                    bad.append(f"{where}: {name} imports {target}, which is above it (or beside it, later)")
                if local and (name, "*") not in LOCAL_OK and (name, target) not in LOCAL_OK:
                    bad.append(f"{where}: function-local import of {target}; import it at the top of the module")
            elif local:
                top = target.split(".")[0]
                if target not in HEAVY and top not in HEAVY and top != "torch" or target == "torch":
                    bad.append(f"{where}: function-local import of {target}; only heavy or optional "
                               "dependencies are imported inside functions (HEAVY)")
    return bad


def test_every_import_goes_down():
    bad = violations(list(sources()))
    assert not bad, "layering violations:\n" + "\n".join(bad)


def test_the_order_names_only_real_modules():
    real = {name for name, _ in sources()}
    missing = [m for m in ORDER if m not in real]
    assert not missing, f"LAYERS names modules that do not exist: {missing}"


def test_an_upward_import_fails(tmp_path):
    """The rule bites: a core module that imports the pipeline, a toy_models module that
    imports minisae, a hidden function-local cycle and a module outside the order all fail."""
    fake = {
        "minisae.sae": "from minisae.pipeline.sweep import SWEEPS\n",
        "toy_models.superposition": "import minisae.metrics\n",
        "minisae.train": "def f():\n    from minisae.sparse_decode import SparseCode\n",
        "minisae.metrics": "def g():\n    from minisae.train import train\n",
    }
    files = []
    for name, text in fake.items():
        path = ROOT / (name.replace(".", "/") + ".py")
        copy = tmp_path / path.name
        copy.write_text(text)
        files.append((name, copy))
    bad = []
    for name, copy in files:
        bad += [b for b in violations_of_text(name, copy)]
    assert any("minisae.sae imports minisae.pipeline.sweep" in b for b in bad)
    assert any("toy_models imports nothing from minisae" in b for b in bad)
    assert any("function-local import of minisae.sparse_decode" in b for b in bad)
    assert any("minisae.metrics imports minisae.train, which is above it" in b for b in bad)


def violations_of_text(name, path):
    """violations() for one file outside the tree, reported under `name`."""
    position = {m: i for i, m in enumerate(ORDER)}
    out = []
    for target, line, local in imports(path, name):
        if own(target) and target in position:
            if name.startswith("toy_models") and target.startswith("minisae"):
                out.append(f"{name}: toy_models imports nothing from minisae, got {target}")
            elif position[target] >= position[name]:
                out.append(f"{name}: {name} imports {target}, which is above it (or beside it, later)")
            if local and (name, "*") not in LOCAL_OK and (name, target) not in LOCAL_OK:
                out.append(f"{name}: function-local import of {target}; import it at the top of the module")
    return out
