"""Text for the language model to read: an offline corpus, a held-out split, and contexts.

An SAE is trained on a language model's activations, so it needs text. Every Python
installation carries a few million words of English prose that needs no download: the
docstrings of the standard library and of numpy, torch and matplotlib, plus the help
topics in `pydoc_data.topics`: about 11M characters, 3.6M GPT-2 tokens (counts depend on
the versions installed). It is technical English, full of code and reST markup, so features
found here lean towards code and documentation; pass your own text files for anything
else (`text_file_documents`).

    documents      (source, text) pairs: one per module (all its docstrings, in source
                   order) or one per ~20k-character chunk of a text file
    split          by a hash of the source name, so no module is in both halves, and a
                   module's side never changes when other modules are added or removed
    token stream   documents in a fixed hash order (so any prefix mixes all libraries),
                   joined with the BOS token as separator:  doc1 BOS doc2 BOS doc3 ...
    contexts       (N, T): each row is BOS + the next T-1 tokens of the stream

BOS doubles as the document separator, as in GPT-2's training data (<|endoftext|>
between documents) and SAELens's default; every document start is then preceded by a
BOS, at position 0 or inside a context. Position 0 always holds a BOS because the first
position of a context is special for the model (attention sinks, huge norms: Xiao et al.
2023, "Efficient Streaming Language Models with Attention Sinks"): the activation
collector drops it and the evaluation leaves it clean, so no SAE learns or replaces it.

Extracting the docstrings parses ~60 MB of source with `ast` (no imports, no side
effects; ~30 CPU-seconds, spread over a process pool), so the result is cached as JSON;
the tokenised stream (pure-Python BPE, ~10 s) as `corpus-<name>-<hash>.npy`. Both live
in ~/.cache/minisae, or $MINISAE_CACHE.
"""

import ast
import hashlib
import importlib.metadata
import importlib.util
import inspect
import json
import os
import re
import sys
import sysconfig
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from pydoc_data.topics import topics

import numpy as np
import torch

from minisae.utils import Progress, atomic_write, cache_dir

LIBRARIES = ("numpy", "torch", "matplotlib")  # besides the standard library
# functions that attach a docstring (their last argument) to a C function or method:
# torch's add_docstr(obj, doc), numpy's add_newdoc(place, obj, doc or (method, doc))
DOCSTRING_SETTERS = {"add_docstr", "_add_docstr", "add_docstr_all", "add_newdoc"}
CORPUS_FORMAT = 2  # bump when the extraction changes, to invalidate cached corpora


# ---------------------------------------------------------------- documents

def _string_value(node):
    """The text of a string literal, `"...".format(...)` (torch's templates, kept with
    their {placeholders}), a `+` of such, or the doc of a (method, doc) pair; else None."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.Tuple) and len(node.elts) == 2:
        return _string_value(node.elts[1])
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr == "format"):
        return _string_value(node.func.value)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _string_value(node.left), _string_value(node.right)
        return None if left is None or right is None else left + right
    return None


def source_docstrings(source: str) -> list:
    """Docstrings of a module, its classes and functions, in source order, cleaned with
    inspect.cleandoc; plus the docstrings that torch and numpy attach to C functions.
    Returns [] for source that does not parse (a newer Python's syntax)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    found = []  # (line, text)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                found.append((getattr(node, "lineno", 0), doc))
        elif isinstance(node, ast.Call) and len(node.args) >= 2:
            name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
            doc = _string_value(node.args[-1]) if name in DOCSTRING_SETTERS else None
            if doc and doc.strip():
                found.append((node.lineno, inspect.cleandoc(doc)))
    return [text for _, text in sorted(found, key=lambda p: p[0])]


def module_files(root, package: str = "") -> list:
    """[(module name, path)] for the .py files under `root`, skipping test suites, test
    helpers and anything that is not an importable name."""
    root = Path(root)
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root).parts
        dirnames[:] = sorted(d for d in dirnames if d.isidentifier() and not _is_test(d))
        for fn in sorted(filenames):
            stem = fn[:-3]
            if not fn.endswith(".py") or not stem.isidentifier() or _is_test(stem):
                continue
            parts = ([package] if package else []) + list(rel) + ([] if stem == "__init__" else [stem])
            if parts:
                files.append((".".join(parts), os.path.join(dirpath, fn)))
    return files


def file_docstrings(path) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return "\n\n".join(source_docstrings(f.read()))


def package_documents(root, package: str = "", map_fn=map) -> list:
    """[(module name, its docstrings joined by blank lines)] for a package directory;
    map_fn maps file_docstrings over the paths (a process pool's map runs them in parallel)."""
    files = module_files(root, package)
    texts = map_fn(file_docstrings, [path for _, path in files])
    return [(name, text) for (name, _), text in zip(files, texts) if text]


def _is_test(name: str) -> bool:
    """Test suites and test helpers: test, tests, testing, test_x, x_test, conftest,
    _pytesttester; their docstrings describe tests, not the library."""
    return (name.startswith("test") or name.endswith("_test") or name == "conftest"
            or (name.startswith("_") and "test" in name))


def default_corpus(cache: bool = True, verbose: bool = True) -> list:
    """[(module, text)]: docstrings of the stdlib, numpy, torch and matplotlib, and the
    pydoc help topics. Cached per Python and library versions."""

    versions = {"python": sys.version.split()[0], "format": CORPUS_FORMAT}
    versions.update({lib: importlib.metadata.version(lib) for lib in LIBRARIES})
    key = hashlib.sha256(json.dumps(versions, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir() / f"docstrings-{key}.json"
    if cache and path.exists():
        with open(path, encoding="utf-8") as f:
            return [tuple(d) for d in json.load(f)]


    docs = [(f"pydoc_data.topics.{name}", text) for name, text in sorted(topics.items())]
    roots = [("", sysconfig.get_paths()["stdlib"])]
    roots += [(lib, importlib.util.find_spec(lib).submodule_search_locations[0]) for lib in LIBRARIES]
    with ProcessPoolExecutor() as pool:  # parsing is CPU-bound: one process per core
        for package, root in roots:
            t0 = time.time()
            found = package_documents(root, package, lambda f, xs: pool.map(f, xs, chunksize=8))
            docs += found
            if verbose:
                print(f"docstrings of {package or 'the standard library'}: {len(found)} modules, "
                      f"{sum(len(t) for _, t in found):,} characters, {time.time() - t0:.1f}s",
                      file=sys.stderr, flush=True)
    if cache:
        atomic_write(path, lambda f: f.write(json.dumps(docs).encode("utf-8")))
    return docs


def text_file_documents(paths, chunk_chars: int = 20_000) -> list:
    """[(path:i, text)] from your own UTF-8 text files. Each file is cut at blank lines
    into chunks of about `chunk_chars`, so even a single file gets a held-out part."""
    docs = []
    for p in paths:
        if not os.path.isfile(p):
            raise ValueError(f"text file {p!r} does not exist")
        with open(p, encoding="utf-8", errors="replace") as f:
            paragraphs = re.split(r"\n\s*\n", f.read())
        chunk = []
        for para in paragraphs + [None]:  # None flushes the last chunk
            if chunk and (para is None or sum(map(len, chunk)) >= chunk_chars):
                docs.append((f"{p}:{len(docs)}", "\n\n".join(chunk)))
                chunk = []
            if para is not None and para.strip():
                chunk.append(para)
    if not docs:
        raise ValueError(f"no text in {list(paths)}")
    return docs


# ---------------------------------------------------------------- split and order

def _unit_hash(text: str) -> float:
    """A stable pseudo-random number in [0, 1) for a string (Python's hash() is salted)."""
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:16], 16) / 2.0**64


def is_heldout(source: str, heldout_frac: float = 0.05) -> bool:
    return _unit_hash("split:" + source) < heldout_frac


def check_text_files(text_paths, heldout_frac: float = 0.05):
    """Before a model is loaded: your text files give both splits some text (each file is
    cut into chunks of about 20,000 characters, and the held-out chunks are chosen by hash)."""
    if not text_paths:
        return
    train, heldout = split_documents(text_file_documents(text_paths), heldout_frac)
    for split, docs in (("train", train), ("heldout", heldout)):
        if not docs:
            raise ValueError(f"--text: the {split} split of your text is empty (about {heldout_frac:.0%} of its "
                             "chunks of ~20,000 characters are held out); give more text")


def split_documents(docs, heldout_frac: float = 0.05):
    """(train, heldout) by a hash of each document's source: all of a module on one side."""
    if not 0.0 <= heldout_frac <= 1.0:
        raise ValueError(f"heldout_frac must be in [0, 1], got {heldout_frac}")
    train = [d for d in docs if not is_heldout(d[0], heldout_frac)]
    heldout = [d for d in docs if is_heldout(d[0], heldout_frac)]
    return train, heldout


# ---------------------------------------------------------------- tokens and contexts

PROBE = "The quick brown fox, 12345 naïve Ωμέγα\n\tdef f(x): return x  # probe"


def token_stream(docs, tokenizer, name: str = "", max_tokens=None, cache: bool = True,
                 verbose: bool = True) -> np.ndarray:
    """All documents, in hash order, tokenised and joined with BOS: (N,) int32.

    With max_tokens, the first max_tokens tokens of that same stream (sliced from the
    cached full stream if there is one, else only as many documents as needed are
    tokenised). The full stream is cached under a hash of the texts and the tokenizer.
    """
    bos = getattr(tokenizer, "bos_id", None)
    if bos is None:
        raise ValueError("the tokenizer has no bos_id; contexts need a BOS token at position 0")
    if max_tokens is not None and max_tokens <= 0:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    docs = sorted(docs, key=lambda d: _unit_hash("order:" + d[0]))
    h = hashlib.sha256(json.dumps([name, bos, tokenizer.encode(PROBE)]).encode())
    for source, text in docs:
        h.update(f"\0{source}\0{len(text)}\0".encode() + text.encode("utf-8", "surrogatepass"))
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name or type(tokenizer).__name__)
    path = cache_dir() / f"corpus-{safe}-{h.hexdigest()[:16]}.npy"
    if cache and path.exists():
        stream = np.load(path)
        return stream if max_tokens is None else stream[:max_tokens]

    total_chars = sum(len(t) for _, t in docs)
    show = verbose and max_tokens is None  # a prefix is quick, and its total is unknown
    bar = Progress(f"tokenising {len(docs)} documents", total_chars, "chars") if show else None
    pieces, n_tok, n_chars = [], 0, 0
    for i, (_, text) in enumerate(docs):
        if i > 0:
            pieces.append(np.array([bos], dtype=np.int32))  # separator between documents
        ids = np.asarray(tokenizer.encode(text), dtype=np.int32)
        pieces.append(ids)
        n_tok, n_chars = n_tok + len(ids) + (i > 0), n_chars + len(text)
        if bar:
            bar.update(n_chars)
        if max_tokens is not None and n_tok >= max_tokens:
            break
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
    if bar:
        bar.close(n_chars)
    if max_tokens is not None:
        return stream[:max_tokens]
    if cache:
        atomic_write(path, lambda f: np.save(f, stream))
    return stream


def make_contexts(stream, bos_id: int, ctx_len: int = 128) -> torch.Tensor:
    """(N, T) LongTensor: row i = [BOS] + stream[i*(T-1) : (i+1)*(T-1)]; a leftover shorter
    than T-1 tokens is dropped."""
    if ctx_len < 2:
        raise ValueError(f"ctx_len must be >= 2 (BOS + at least one token), got {ctx_len}")
    n = len(stream) // (ctx_len - 1)
    ctx = np.empty((n, ctx_len), dtype=np.int64)  # (N, T)
    ctx[:, 0] = bos_id
    ctx[:, 1:] = np.asarray(stream[: n * (ctx_len - 1)]).reshape(n, ctx_len - 1)
    return torch.from_numpy(ctx)


def load_contexts(tokenizer, name: str = "", split: str = "train", ctx_len: int = 128,
                  max_tokens=None, text_paths=None, heldout_frac: float = 0.05,
                  cache: bool = True, verbose: bool = True) -> torch.Tensor:
    """Contexts (N, T) of one split of the default corpus, or of your `text_paths`.

    max_tokens bounds N * T (BOS included), taking the same first contexts every time.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    docs = text_file_documents(text_paths) if text_paths else default_corpus(cache, verbose)
    train, heldout = split_documents(docs, heldout_frac)
    docs = train if split == "train" else heldout
    if not docs:
        raise ValueError(f"the {split} split is empty (heldout_frac={heldout_frac}, "
                         "sources split by hash); give more text or change heldout_frac")
    budget = None if max_tokens is None else (max_tokens // ctx_len) * (ctx_len - 1)
    if budget == 0:
        raise ValueError(f"max_tokens={max_tokens} is less than one context of {ctx_len} tokens")
    stream = token_stream(docs, tokenizer, name, budget, cache, verbose)
    contexts = make_contexts(stream, tokenizer.bos_id, ctx_len)
    if len(contexts) == 0:
        raise ValueError(f"the {split} split has {len(stream)} tokens, less than one context")
    return contexts
