"""GGUF, the single-file model format of llama.cpp, read with numpy alone.

A GGUF file is a header, a table of contents and one blob of tensor data
(spec: github.com/ggml-org/ggml/blob/master/docs/gguf.md). Every number is little-endian.

    magic          4 bytes  b"GGUF"
    version        uint32   2 or 3 (version 1 used 32-bit counts; 3 only adds big-endian files)
    tensor_count   uint64
    kv_count       uint64
    kv_count x     key: string, value_type: uint32, value    (the metadata)
    tensor_count x name: string, n_dims: uint32, dims: uint64[n_dims],
                   ggml_type: uint32, offset: uint64          (the tensor infos)
    padding        zeros up to a multiple of `general.alignment` (default 32, a power of 2)
    tensor data    each tensor at data_start + offset, in the order of the tensor infos, each
                   padded with zeros to the alignment: offset_0 = 0,
                   offset_{i+1} = offset_i + roundup(nbytes_i, alignment)

    string = uint64 length + that many UTF-8 bytes (no terminator)
    value  = one of UINT8 INT8 UINT16 INT16 UINT32 INT32 FLOAT32 BOOL STRING ARRAY
             UINT64 INT64 FLOAT64 (type ids 0..12); an ARRAY is elem_type: uint32,
             count: uint64, then count values of elem_type.

`dims` lists the innermost (fastest-varying) axis first, as ggml's `ne` does, so the
numpy shape is `dims` reversed: a matrix stored as dims [in, out] is a (out, in) array,
which is exactly torch's nn.Linear weight layout.

A quantised tensor is a run of blocks, each covering 32 consecutive values of a row:

    Q8_0 block (34 bytes):  d: f16, q: int8[32]               x[j] = d * q[j]
    Q4_1 block (20 bytes):  d: f16, m: f16, qs: uint8[16]     x[j] = d * q[j] + m, with
                            q[j] = qs[j] & 0xF (j < 16) and q[j] = qs[j-16] >> 4 (j >= 16)

(ggml's `dequantize_row_q8_0` / `dequantize_row_q4_1`). Q4_1 spends 5 bits per weight and
keeps a per-block minimum, so an all-positive block loses nothing to the sign.

Every length and offset read from the file is checked against the file's size before it
is used: a corrupt or truncated file gives a ValueError naming the file and what is wrong,
never a huge allocation or a silent garbage tensor. The offsets must follow the rule above
exactly, as llama.cpp's reader demands (gguf.cpp, gguf_init_from_file_impl: "tensor '%s'
has offset %lu, expected %zu"): so no two tensors share bytes, none leaves a gap, and a
tensor whose type or shape was changed no longer fits the offset of the one after it.
"""

import os
import struct
from dataclasses import dataclass

import numpy as np

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4          # GGML_MAX_DIMS
MAX_ARRAY_NESTING = 8  # arrays of arrays are legal; deeper than this is a corrupt file

# metadata value types: id -> (name, struct format); STRING (8) and ARRAY (9) are special
VALUE_TYPES = {
    0: ("UINT8", "<B"), 1: ("INT8", "<b"), 2: ("UINT16", "<H"), 3: ("INT16", "<h"),
    4: ("UINT32", "<I"), 5: ("INT32", "<i"), 6: ("FLOAT32", "<f"), 7: ("BOOL", "<?"),
    8: ("STRING", None), 9: ("ARRAY", None),
    10: ("UINT64", "<Q"), 11: ("INT64", "<q"), 12: ("FLOAT64", "<d"),
}
STRING, ARRAY = 8, 9

# ggml tensor types: id -> (name, values per block, bytes per block). Enough of the table to
# size any tensor in common files; only DEQUANTIZE below can turn one into floats.
GGML_TYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8),
    28: ("F64", 1, 8), 30: ("BF16", 1, 2),
}

# the C structs block_q8_0 and block_q4_1, as packed numpy records
Q8_0_BLOCK = np.dtype([("d", "<f2"), ("q", "i1", (32,))])                 # 34 bytes
Q4_1_BLOCK = np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", (16,))])  # 20 bytes


def dequantize_q8_0(raw: np.ndarray) -> np.ndarray:
    """Q8_0 bytes -> float32 values, in file order: x = d * q per block of 32."""
    blocks = raw.view(Q8_0_BLOCK)                                   # (n_blocks,)
    d = blocks["d"].astype(np.float32)[:, None]                     # (n_blocks, 1)
    return (d * blocks["q"].astype(np.float32)).reshape(-1)         # (n_blocks * 32,)


def dequantize_q4_1(raw: np.ndarray) -> np.ndarray:
    """Q4_1 bytes -> float32 values, in file order: x = d * q + m per block of 32.

    The 16 bytes hold 32 nibbles: the low nibbles are values 0..15 of the block and the
    high nibbles values 16..31 (not the interleaved order one might guess)."""
    blocks = raw.view(Q4_1_BLOCK)                                   # (n_blocks,)
    d = blocks["d"].astype(np.float32)[:, None]                     # (n_blocks, 1)
    m = blocks["m"].astype(np.float32)[:, None]                     # (n_blocks, 1)
    qs = blocks["qs"]                                               # (n_blocks, 16)
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)  # (n_blocks, 32)
    return (d * q + m).reshape(-1)


DEQUANTIZE = {
    "F32": lambda raw: raw.view("<f4").astype(np.float32),
    "F16": lambda raw: raw.view("<f2").astype(np.float32),
    "Q8_0": dequantize_q8_0,
    "Q4_1": dequantize_q4_1,
}


def ggml_type_name(ggml_type: int) -> str:
    return GGML_TYPES[ggml_type][0] if ggml_type in GGML_TYPES else f"unknown type id {ggml_type}"


def dequantize(raw: np.ndarray, ggml_type: int, shape: tuple) -> np.ndarray:
    """Raw tensor bytes (uint8) of a ggml type -> float32 array of `shape` (numpy order)."""
    name = ggml_type_name(ggml_type)
    if name not in DEQUANTIZE:
        raise ValueError(f"unsupported quantisation type {name} (ggml type {ggml_type}); "
                         f"this reader dequantizes {', '.join(DEQUANTIZE)}")
    n_values = int(np.prod(shape, dtype=np.int64))
    _, block_size, type_size = GGML_TYPES[ggml_type]
    if n_values % block_size or raw.size != n_values // block_size * type_size:
        raise ValueError(f"{raw.size} bytes do not hold a {name} tensor of shape {tuple(shape)}")
    return DEQUANTIZE[name](np.ascontiguousarray(raw, dtype=np.uint8)).reshape(shape)


@dataclass
class GGUFTensor:
    name: str
    shape: tuple       # numpy order: the file's dims reversed
    ggml_type: int
    offset: int        # absolute byte offset of the data in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        return ggml_type_name(self.ggml_type)


class _Cursor:
    """Reads typed values from a byte buffer, refusing to read past its end."""

    def __init__(self, buf, path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int, what: str) -> int:
        """Reserve n bytes, return where they start; a ValueError if the file is too short."""
        if n < 0 or self.pos + n > len(self.buf):
            raise ValueError(f"corrupt or truncated GGUF file {self.path}: {what} needs {n} bytes "
                             f"at offset {self.pos}, but the file has {len(self.buf)} bytes")
        start, self.pos = self.pos, self.pos + n
        return start

    def scalar(self, fmt: str, what: str):
        return struct.unpack_from(fmt, self.buf, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.scalar("<Q", f"length of {what}")
        start = self.take(n, what)     # checks n against the bytes left before reading them
        try:
            return bytes(self.buf[start:start + n]).decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"corrupt GGUF file {self.path}: {what} is not UTF-8 ({e})") from None

    def value(self, vtype: int, what: str, depth: int = 0):
        if vtype not in VALUE_TYPES:
            raise ValueError(f"corrupt GGUF file {self.path}: {what} has unknown value type {vtype}")
        if vtype == STRING:
            return self.string(what)
        if vtype == ARRAY:
            if depth >= MAX_ARRAY_NESTING:
                raise ValueError(f"corrupt GGUF file {self.path}: {what} nests arrays too deeply")
            etype = self.scalar("<I", f"element type of {what}")
            count = self.scalar("<Q", f"length of {what}")
            if etype not in VALUE_TYPES:
                raise ValueError(f"corrupt GGUF file {self.path}: {what} has unknown element type {etype}")
            # an element takes at least 8 bytes for a string (its length), 12 for an array (its
            # header), else its own size: reject an absurd count before looping over it
            min_size = {STRING: 8, ARRAY: 12}.get(etype) or struct.calcsize(VALUE_TYPES[etype][1])
            if count * min_size > len(self.buf) - self.pos:
                raise ValueError(f"corrupt or truncated GGUF file {self.path}: {what} claims {count} "
                                 f"elements but only {len(self.buf) - self.pos} bytes remain")
            if etype in (STRING, ARRAY):
                return [self.value(etype, f"{what}[{i}]", depth + 1) for i in range(count)]
            start = self.take(count * min_size, what)
            return np.frombuffer(self.buf, dtype=VALUE_TYPES[etype][1], count=count, offset=start).tolist()
        return self.scalar(VALUE_TYPES[vtype][1], what)


class GGUFFile:
    """The metadata and tensor table of a GGUF file; tensor data is read on demand.

        f = GGUFFile(path)
        f.metadata["llama.block_count"]      # 30
        f.tensors["blk.0.attn_q.weight"]     # GGUFTensor(shape=(576, 576), type Q4_1, ...)
        f.dequantize("blk.0.attn_q.weight")  # float32 array (576, 576)
    """

    def __init__(self, path):
        self.path = str(path)
        # np.memmap refuses an empty file; let that one reach the "truncated" error instead
        empty = os.path.getsize(self.path) == 0
        self.buf = np.zeros(0, np.uint8) if empty else np.memmap(self.path, dtype=np.uint8, mode="r")
        cur = _Cursor(self.buf, self.path)

        start = cur.take(4, "magic")
        magic = bytes(self.buf[start:start + 4])
        if magic != GGUF_MAGIC:
            raise ValueError(f"{self.path} is not a GGUF file: magic is {magic!r}, expected {GGUF_MAGIC!r}")
        self.version = cur.scalar("<I", "version")
        if self.version not in SUPPORTED_VERSIONS:
            raise ValueError(f"unsupported GGUF version {self.version} in {self.path}; this reader "
                             f"handles versions {SUPPORTED_VERSIONS} (little-endian)")
        n_tensors = cur.scalar("<Q", "tensor count")
        n_kv = cur.scalar("<Q", "metadata count")
        # a key/value pair takes at least 12 bytes and a tensor info at least 24
        if n_kv * 12 + n_tensors * 24 > len(self.buf) - cur.pos:
            raise ValueError(f"corrupt or truncated GGUF file {self.path}: header claims {n_kv} metadata "
                             f"entries and {n_tensors} tensors, more than its {len(self.buf)} bytes can hold")

        self.metadata = {}
        for i in range(n_kv):
            key = cur.string(f"metadata key {i}")
            if key in self.metadata:
                raise ValueError(f"corrupt GGUF file {self.path}: metadata key {key!r} appears twice")
            self.metadata[key] = cur.value(cur.scalar("<I", f"value type of {key!r}"), f"metadata {key!r}")

        self.alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        # llama.cpp rounds with GGML_PAD(x, n) = (x + n - 1) & ~(n - 1): n must be a power of 2
        if not isinstance(self.alignment, int) or isinstance(self.alignment, bool) \
                or self.alignment <= 0 or self.alignment & (self.alignment - 1):
            raise ValueError(f"corrupt GGUF file {self.path}: general.alignment = {self.alignment!r:.50}, "
                             "expected a power of 2")

        infos = []
        for i in range(n_tensors):
            name = cur.string(f"name of tensor {i}")
            n_dims = cur.scalar("<I", f"n_dims of {name!r}")
            if not 1 <= n_dims <= MAX_DIMS:
                raise ValueError(f"corrupt GGUF file {self.path}: tensor {name!r} has n_dims = {n_dims}, "
                                 f"expected 1..{MAX_DIMS}")
            dims = [cur.scalar("<Q", f"dims of {name!r}") for _ in range(n_dims)]
            ggml_type = cur.scalar("<I", f"type of {name!r}")
            offset = cur.scalar("<Q", f"offset of {name!r}")
            infos.append((name, dims, ggml_type, offset))

        data_start = self._round_up(cur.pos)
        self._check_padding(cur.pos, data_start, "the end of the header")
        self.tensors = {}
        expected_offset = 0  # where the next tensor must start: the previous ones, each padded
        for name, dims, ggml_type, offset in infos:
            if name in self.tensors:
                raise ValueError(f"corrupt GGUF file {self.path}: tensor {name!r} appears twice")
            if ggml_type not in GGML_TYPES:
                raise ValueError(f"unsupported quantisation type in {self.path}: tensor {name!r} has ggml "
                                 f"type id {ggml_type}, unknown to this reader")
            type_name, block_size, type_size = GGML_TYPES[ggml_type]
            n_values = int(np.prod(dims, dtype=object))  # Python ints: absurd dims cannot overflow
            if n_values >= 2**63 or max(dims) >= 2**63:  # llama.cpp: "invalid number of elements"
                raise ValueError(f"corrupt GGUF file {self.path}: tensor {name!r} has dims {dims}, more than "
                                 f"2^63 - 1 values or in one dimension")
            if dims[0] % block_size:
                raise ValueError(f"corrupt GGUF file {self.path}: tensor {name!r} of type {type_name} has "
                                 f"rows of {dims[0]} values, not a multiple of its block size {block_size}")
            nbytes = n_values // block_size * type_size
            if offset % self.alignment:
                raise ValueError(f"corrupt GGUF file {self.path}: tensor {name!r} is misaligned: data offset "
                                 f"{offset} is not a multiple of the alignment {self.alignment}")
            if offset != expected_offset:
                raise ValueError(f"corrupt GGUF file {self.path}: tensor {name!r} has data offset {offset}, "
                                 f"expected {expected_offset}: tensors must follow each other in order, each "
                                 f"the size its type and shape require, padded to the alignment")
            if data_start + offset + nbytes > len(self.buf):
                raise ValueError(f"corrupt or truncated GGUF file {self.path}: tensor {name!r} ({nbytes} bytes "
                                 f"at data offset {offset}) runs past the end of the {len(self.buf)}-byte file")
            expected_offset = self._round_up(offset + nbytes)
            self._check_padding(data_start + offset + nbytes, data_start + expected_offset, f"tensor {name!r}")
            self.tensors[name] = GGUFTensor(name, tuple(reversed(dims)), ggml_type, data_start + offset, nbytes)
        # Stricter than llama.cpp: nothing but alignment padding may follow the last tensor
        # (its writer pads after every tensor; the SmolLM2 file ends right after its last).
        # Otherwise a last tensor whose type shrank (F32 -> F16) would be read as half its bytes.
        last = max(self.tensors.values(), key=lambda t: (t.offset, t.nbytes), default=None)
        end = last.offset + last.nbytes if last else cur.pos
        if len(self.buf) > self._round_up(end):
            raise ValueError(f"corrupt GGUF file {self.path}: {len(self.buf) - end} bytes follow the last "
                             f"tensor (at most the padding to a multiple of {self.alignment} may): a tensor "
                             f"type or shape in the header is wrong, or the file has trailing data")

    def _check_padding(self, start: int, stop: int, after: str):
        """The padding bytes [start, stop) must be zeros. The spec leaves their value open, but
        the writers of llama.cpp and gguf-py write zeros, and the check catches a type change
        that shrinks a tensor within its padding (F32 -> F16 of 3 values: 12 -> 6 bytes, both
        padded to 32), unless the bytes it drops happen to be zeros. Stricter than llama.cpp."""
        if np.any(self.buf[start:min(stop, len(self.buf))]):
            raise ValueError(f"corrupt GGUF file {self.path}: the padding after {after} (bytes {start}.."
                             f"{stop}) is not zeros: a tensor type or shape in the header is wrong")

    def _round_up(self, n: int) -> int:
        """n rounded up to a multiple of the alignment (ggml's GGML_PAD)."""
        return -(-n // self.alignment) * self.alignment

    def raw(self, name: str) -> np.ndarray:
        """The bytes of one tensor, as stored (a read-only view into the file)."""
        if name not in self.tensors:
            raise KeyError(f"no tensor {name!r} in {self.path}")
        t = self.tensors[name]
        return self.buf[t.offset:t.offset + t.nbytes]

    def dequantize(self, name: str) -> np.ndarray:
        """One tensor as a float32 array in numpy order (a fresh array, not tied to the file)."""
        raw = self.raw(name)
        t = self.tensors[name]
        try:
            return dequantize(raw, t.ggml_type, t.shape)
        except ValueError as e:
            raise ValueError(f"GGUF file {self.path}: tensor {name!r}: {e}") from None

