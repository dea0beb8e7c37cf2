"""Corrupt files, at random: the safetensors and GGUF loaders either load exactly what the
valid file holds or raise their clear error (a ValueError naming the file), in bounded time
and memory.

Each test starts from a small valid file written here (tests/models/test_gguf.py writes the tiny
Llama GGUF field by field, so it knows where every length, count, type and value lies) and
applies one class of damage, drawn by Hypothesis:

    byte flips       1-3 bytes XORed with a random non-zero byte, anywhere in the file
                     (half of the draws in the header, where the structure is)
    truncations      the file cut at any length, or junk appended to it
    absurd lengths   one length, count, dimension, offset, type id or hyper-parameter set to
                     an absurd value: 0, 2^31, 2^32 - 1, 2^63, 2^64 - 1, 10^30, -1, the file
                     size, the old value +-1, +-8, x2, ...

"Exactly what the valid file holds" allows one thing: a flipped byte inside a value that is
data, not structure, may change that value and nothing else. A byte of a tensor's data
changes that tensor (unless it makes a NaN, which the Llama loader refuses); a byte of a
token string changes that token; a byte of the RMS epsilon changes the epsilon. No format
can tell such a file from a valid one that holds other numbers. So the loader reports the
items it loaded that differ from the valid file's, and each must be a value whose bytes
were damaged. Structure (counts, lengths, offsets, dimensions, types, the block count,
widths and vocab size that the tensors pin down) may never change the result silently.

The loaders run in a worker process whose address space is capped (RLIMIT_AS) at what it
has mapped after importing, plus a margin: a parser that tries to allocate gigabytes for an
absurd length gets MemoryError there, which fails the test, instead of swapping the
machine. Each load must answer within TIME_LIMIT seconds.

A few hundred examples in all, a few seconds per file format. For a deeper run:
MINISAE_FUZZ_SCALE=20 pytest tests/system/test_parser_fuzz.py (20x the examples).
"""

import json
import os
import re
import select
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from models.test_gguf import tiny_llama_gguf  # tests/ is on sys.path (conftest.py)

SCALE = int(os.environ.get("MINISAE_FUZZ_SCALE", "1"))
TIME_LIMIT = 30  # seconds for one load; a valid tiny file takes milliseconds
MARGIN = {"gguf": 1 << 30, "safetensors": 1 << 29}  # bytes of address space a load may add
OUTCOMES = Counter()  # (format, damage, outcome) -> count, printed at the end with -s


def fuzz_settings(n):
    return settings(max_examples=n * SCALE, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---- the worker: loads files by path, in a process with a memory cap --------------------------

WORKER = r'''
import dataclasses, hashlib, json, resource, sys


def digest(a):
    import numpy as np
    a = np.ascontiguousarray(a)
    return f"{a.dtype.str} {a.shape} " + hashlib.sha1(a.tobytes()).hexdigest()


def load_gguf(path):
    """Everything load_smollm2 would hand out: the config, every tensor, the tokenizer."""
    from minisae.models.gguf import GGUFFile
    from minisae.models.llama_gguf import gguf_tokenizer, load_llama_gguf
    f = GGUFFile(path)
    model = load_llama_gguf(f)   # its weights are a function of the config and the tensors below
    tok = gguf_tokenizer(f.metadata, bos_id=0, source=f"GGUF file {path}")
    items = {f"cfg.{k}": repr(v) for k, v in dataclasses.asdict(model.cfg).items()}
    items.update({f"data:{name}": digest(f.dequantize(name)) for name in f.tensors})
    items.update({f"tokens[{i}]": t for t, i in tok.encoder.items()})
    items.update({f"special[{i}]": True for i in tok.special_tokens.values()})
    items.update({f"merges[{r}]": list(p) for p, r in tok.bpe_ranks.items()})
    items["split_digits"] = tok.split_digits
    return items


def load_safetensors(path):
    """Every tensor (name, dtype, values), in the order of their bytes, and the metadata."""
    from minisae.models import safetensors
    tensors, metadata, _ = safetensors.read_header(path)
    arrays = safetensors.load_safetensors(path)
    order = sorted(tensors, key=lambda name: tensors[name][2])
    items = {f"tensor#{k}": [name, tensors[name][0], digest(arrays[name])] for k, name in enumerate(order)}
    items["metadata"] = metadata
    return items


kind, valid, margin = sys.argv[1], sys.argv[2], int(sys.argv[3])
load = {"gguf": load_gguf, "safetensors": load_safetensors}[kind]
reference = load(valid)
with open("/proc/self/status") as f:
    mapped = 1024 * next(int(line.split()[1]) for line in f if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (mapped + margin, resource.getrlimit(resource.RLIMIT_AS)[1]))
print(json.dumps({"ready": sorted(reference)}), flush=True)
for line in sys.stdin:
    path = line.rstrip("\n")
    try:
        got = load(path)
    except ValueError as e:      # the loaders' clear error
        answer = {"error": str(e)}
    except BaseException as e:   # MemoryError, RecursionError, TypeError, ...: a bug
        answer = {"crash": f"{type(e).__name__}: {e}"[:2000]}
    else:
        answer = {"diff": sorted(k for k in reference.keys() | got.keys() if reference.get(k) != got.get(k))}
    print(json.dumps(answer), flush=True)
'''


class Worker:
    """One worker process for one file format; load(content) -> its answer (a dict)."""

    def __init__(self, kind: str, valid: bytes, directory):
        self.kind, self.path = kind, str(directory / f"damaged.{kind}")
        valid_path = directory / f"valid.{kind}"
        valid_path.write_bytes(valid)
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER, kind, str(valid_path), str(MARGIN[kind])],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.items = self._answer(timeout=300)["ready"]  # the first answer: after the imports

    def _answer(self, timeout: float) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.proc.kill()
            pytest.fail(f"the {self.kind} loader gave no answer within {timeout} s")
        line = self.proc.stdout.readline()
        if not line:
            pytest.fail(f"the {self.kind} worker died (exit status {self.proc.wait()})")
        return json.loads(line)

    def load(self, content: bytes) -> dict:
        with open(self.path, "wb") as f:
            f.write(content)
        self.proc.stdin.write(self.path + "\n")
        self.proc.stdin.flush()
        return self._answer(TIME_LIMIT)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def check(worker, content: bytes, touched: set, spans_of, damage: str):
    """The property: a clear error naming the file, or the valid file's items, except items
    that are data and had a byte of theirs damaged (spans_of(item): their byte ranges)."""
    answer = worker.load(content)
    assert "crash" not in answer, f"{damage}: the loader failed with {answer['crash']}"
    if "error" in answer:
        assert worker.path in answer["error"], f"{damage}: the error does not name the file: {answer['error']}"
        OUTCOMES[worker.kind, damage.split()[0], "clear error"] += 1
        return
    unexplained = [item for item in answer["diff"]
                   if not any(start <= p < stop for start, stop in spans_of(item) for p in touched)]
    assert not unexplained, f"{damage}: loaded without an error, but {unexplained} differ from the valid file"
    OUTCOMES[worker.kind, damage.split()[0], "changed data" if answer["diff"] else "same as valid"] += 1


@pytest.fixture(scope="module", autouse=True)
def report_outcomes():
    yield
    for key, n in sorted(OUTCOMES.items()):
        print(f"{' / '.join(key)}: {n}")


def flips(size: int, header_size: int):
    """1-3 (position, xor mask) pairs; half the positions drawn from the header."""
    position = st.one_of(st.integers(0, header_size - 1), st.integers(0, size - 1))
    return st.lists(st.tuples(position, st.integers(1, 255)), min_size=1, max_size=3, unique_by=lambda f: f[0])


def apply_flips(content: bytes, flipped) -> bytes:
    out = bytearray(content)
    for position, mask in flipped:
        out[position] ^= mask
    return bytes(out)


resize = st.one_of(st.tuples(st.just("cut"), st.integers(0, 1 << 20)),
                   st.tuples(st.just("append"), st.binary(min_size=1, max_size=64)))


def apply_resize(content: bytes, change) -> bytes:
    how, arg = change
    return content[:arg % len(content)] if how == "cut" else content + arg


def absurd_values(original: int, size: int, file_size: int) -> list:
    top = 1 << (8 * size)
    values = {0, 1, 1 << 31, top - 1, top >> 1, (top >> 1) - 1, 1_000_000, file_size, file_size + 1,
              original - 1, original + 1, original - 8, original + 8, original + 32, 2 * original, original + (1 << 32)}
    return sorted({v % top for v in values} - {original})


# ---- GGUF: a tiny Llama with its tokenizer ---------------------------------------------------

GGUF, GGUF_SPANS, GGUF_FIELDS = tiny_llama_gguf()
GGUF_HEADER = min(start for name, (start, _) in GGUF_SPANS.items() if name.startswith("data:"))
# items that are data: which metadata value or tensor bytes each comes from (see the worker)
GGUF_DATA_ITEMS = {"cfg.n_ctx": "llama.context_length", "cfg.rope_base": "llama.rope.freq_base",
                   "cfg.norm_eps": "llama.attention.layer_norm_rms_epsilon",
                   # two head counts changed in proportion leave every shape as it was
                   "cfg.n_head": "llama.attention.head_count", "cfg.n_kv_head": "llama.attention.head_count_kv",
                   "split_digits": "tokenizer.ggml.pre"}


def gguf_spans_of(item: str) -> list:
    """Byte ranges of a data item; [] for structure (the block count, widths, vocab size, ...)."""
    m = re.fullmatch(r"(tokens|special|merges)\[(\d+)\]", item)
    if m:
        key = {"tokens": "tokens", "special": "token_type", "merges": "merges"}[m.group(1)]
        name = f"tokenizer.ggml.{key}[{m.group(2)}]"
    else:
        name = GGUF_DATA_ITEMS.get(item, item)
    return [GGUF_SPANS[name]] if name in GGUF_SPANS else []


@pytest.fixture(scope="module")
def gguf_worker(tmp_path_factory):
    worker = Worker("gguf", GGUF, tmp_path_factory.mktemp("gguf_fuzz"))
    assert "cfg.n_layer" in worker.items and "data:blk.1.ffn_down.weight" in worker.items
    yield worker
    worker.close()


def test_valid_gguf_loads_the_same(gguf_worker):
    assert gguf_worker.load(GGUF) == {"diff": []}


@fuzz_settings(150)
@given(flipped=flips(len(GGUF), GGUF_HEADER))
def test_gguf_byte_flips(gguf_worker, flipped):
    check(gguf_worker, apply_flips(GGUF, flipped), {p for p, _ in flipped}, gguf_spans_of, f"flips {flipped}")


@fuzz_settings(60)
@given(change=resize)
def test_gguf_truncations(gguf_worker, change):
    check(gguf_worker, apply_resize(GGUF, change), set(), gguf_spans_of, f"truncation {change[0]} {change[1]!r:.40}")


@fuzz_settings(120)
@given(data=st.data())
def test_gguf_absurd_lengths(gguf_worker, data):
    start, size, what = data.draw(st.sampled_from(GGUF_FIELDS))
    original = int.from_bytes(GGUF[start:start + size], "little")
    value = data.draw(st.sampled_from(absurd_values(original, size, len(GGUF))))
    content = GGUF[:start] + value.to_bytes(size, "little") + GGUF[start + size:]
    check(gguf_worker, content, set(range(start, start + size)), gguf_spans_of, f"absurd {what} = {value}")


def test_gguf_issue_example_block_count(gguf_worker):
    """llama.block_count set to 10^6 in place (a one-field change)."""
    start, size, _ = next(f for f in GGUF_FIELDS if f[2] == "llama.block_count")
    answer = gguf_worker.load(GGUF[:start] + (10**6).to_bytes(size, "little") + GGUF[start + size:])
    assert "llama.block_count) = 1000000" in answer.get("error", "")


# ---- safetensors: every dtype, an empty tensor in the middle, metadata ------------------------

def safetensors_file():
    """(bytes, spans, number fields) of a small safetensors file written by our writer.
    spans: 'tensor#k' (k-th in data order) -> the byte ranges of its name, dtype and shape
    in the header and of its data; 'metadata' -> the metadata object. Fields: (start, stop)
    of each number in a shape or data_offsets list of the header."""
    from minisae.models.safetensors import save_safetensors
    rng = np.random.default_rng(0)
    tensors = {"f32": rng.standard_normal((3, 5)).astype(np.float32), "i64": rng.integers(-9, 9, 4),
               "empty": np.zeros((0, 4), np.float32), "f16": rng.standard_normal((2, 2, 2)).astype(np.float16),
               "u8": rng.integers(0, 255, 6).astype(np.uint8), "scalar": np.array(3.5, np.float64)}
    path = f"/tmp/minisae_fuzz_{os.getpid()}.safetensors"
    save_safetensors(path, tensors, metadata={"format": "np", "note": "fuzz"})
    with open(path, "rb") as f:
        content = f.read()
    os.remove(path)
    n = int.from_bytes(content[:8], "little")
    text = content[8:8 + n].decode()  # our writer's compact JSON: no spaces, no nested objects in entries
    header = json.loads(text)
    at = text.index('"__metadata__":') + len('"__metadata__":')
    spans = {"metadata": [(8 + at, 8 + at + len(json.dumps(header.pop("__metadata__"), separators=(",", ":"))))]}
    fields = []
    for k, (name, entry) in enumerate(sorted(header.items(), key=lambda e: e[1]["data_offsets"])):
        at = text.index(f'"{name}":{{')
        entry_text = text[at:text.index("}", at)]

        def where(pattern):
            m = re.search(pattern, entry_text)
            return 8 + at + m.start(1), 8 + at + m.end(1)

        shape, offsets = where(r'"shape":(\[[^\]]*\])'), where(r'"data_offsets":(\[[^\]]*\])')
        for lo, hi in (shape, offsets):
            fields += [(lo + d.start(), lo + d.end()) for d in re.finditer(r"\d+", content[lo:hi].decode())]
        begin, end = entry["data_offsets"]
        spans[f"tensor#{k}"] = [(8 + at + 1, 8 + at + 1 + len(name)), where(r'"dtype":("[^"]*")'), shape,
                                (8 + n + begin, 8 + n + end)]
    return content, spans, fields


ST, ST_SPANS, ST_NUMBERS = safetensors_file()
ST_HEADER = 8 + int.from_bytes(ST[:8], "little")


def st_spans_of(item: str) -> list:
    return ST_SPANS.get(item, [])


@pytest.fixture(scope="module")
def st_worker(tmp_path_factory):
    worker = Worker("safetensors", ST, tmp_path_factory.mktemp("safetensors_fuzz"))
    assert worker.items == sorted([f"tensor#{k}" for k in range(6)] + ["metadata"])
    yield worker
    worker.close()


def test_valid_safetensors_loads_the_same(st_worker):
    assert st_worker.load(ST) == {"diff": []}
    assert ST[ST_HEADER - 2:ST_HEADER] == b"  "  # padded header: the short-length case below can occur


@fuzz_settings(150)
@given(flipped=flips(len(ST), ST_HEADER))
def test_safetensors_byte_flips(st_worker, flipped):
    check(st_worker, apply_flips(ST, flipped), {p for p, _ in flipped}, st_spans_of, f"flips {flipped}")


@fuzz_settings(60)
@given(change=resize)
def test_safetensors_truncations(st_worker, change):
    check(st_worker, apply_resize(ST, change), set(), st_spans_of, f"truncation {change[0]} {change[1]!r:.40}")


@fuzz_settings(40)
@given(value=st.sampled_from(absurd_values(ST_HEADER - 8, 8, len(ST)) + [ST_HEADER - 8 - k for k in range(2, 8)]))
def test_safetensors_absurd_header_length(st_worker, value):
    check(st_worker, value.to_bytes(8, "little") + ST[8:], set(range(8)), st_spans_of, f"absurd-length header length = {value}")


@fuzz_settings(80)
@given(field=st.sampled_from(ST_NUMBERS), data=st.data())
def test_safetensors_absurd_numbers(st_worker, field, data):
    """A number of a shape or data_offsets list replaced by an absurd one (or by another JSON
    type); the header length is rewritten to fit, so only that number is wrong."""
    lo, hi = field
    original = int(ST[lo:hi])
    value = data.draw(st.sampled_from(["-1", "0", str(1 << 63), str(1 << 64), "1" + "0" * 30, "1e3", "1.5", "true",
                                       "null", '"4"', "[]", "{}", *(str(original + d) for d in (-1, 1, 8) if original + d >= 0),
                                       str(2 * original + 1)]))
    text = ST[8:lo] + value.encode() + ST[hi:ST_HEADER]
    content = len(text).to_bytes(8, "little") + text + ST[ST_HEADER:]
    check(st_worker, content, set(range(lo, hi)), st_spans_of, f"absurd-number {ST[lo:hi].decode()} -> {value}")
