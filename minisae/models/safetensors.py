"""The safetensors file format, read and written with numpy (no `safetensors` package).

The format is short enough to show in full (https://github.com/huggingface/safetensors):

    bytes 0..8         N, the header length: unsigned 64-bit little-endian integer
    bytes 8..8+N       JSON header, UTF-8 (may be padded with spaces):
                         {"wte.weight": {"dtype": "F32", "shape": [50257, 768],
                                         "data_offsets": [begin, end]},
                          ...,
                          "__metadata__": {"format": "pt"}}        (optional, str -> str)
    bytes 8+N..        the tensors' raw bytes, little-endian, C order; a tensor's bytes are
                       data[begin:end], offsets counted from the start of this data block

Nothing in it is executable (unlike pickle checkpoints), but a file from the internet
still deserves checks before we trust its numbers: a header length that fits the file,
JSON that parses (no repeated names), a known dtype, a byte range whose size is
prod(shape) * itemsize, and byte ranges that tile the data block exactly: sorted by
offset, each tensor starts where the previous one ends, the first at 0, the last at the
end of the file (the `safetensors` library's own rule, "file not fully covered"). The
last check is what catches a header length a few bytes short: the JSON still parses
(the cut falls in its padding spaces), but the data block then starts early and every
tensor would be read shifted.
"""

import json
import math
import os

import numpy as np
import torch

# safetensors dtype name -> numpy dtype of the stored bytes. numpy has no bfloat16, so
# BF16 is read as uint16 and widened to float32 (a bf16 number is the top 16 bits of a float32).
DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
MAX_HEADER_BYTES = 100_000_000  # real headers are kilobytes; a bigger N is a corrupt or hostile file


def _unique_keys(pairs) -> dict:
    """json object_pairs_hook: a name given twice is an error, not "the last one wins"."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"name {key!r} appears twice")
        out[key] = value
    return out


def _is_uint(x) -> bool:
    """A JSON number that can be a size: JSON true is a Python int, and numpy takes no
    dimension from 2^63 on (an empty tensor of shape [0, 10^30] would pass the size check)."""
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**63


def read_header(path) -> tuple:
    """(tensors, metadata, data_start): tensors maps name -> (dtype, shape, (begin, end)),
    every entry checked against the file size. Raises ValueError on anything malformed."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: truncated: {size} bytes, a safetensors file starts with an 8-byte header length")
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER_BYTES:
            raise ValueError(f"{path}: absurd header length {n} bytes (limit {MAX_HEADER_BYTES}); not a safetensors file?")
        if n > size - 8:
            raise ValueError(f"{path}: truncated: header length {n} but only {size - 8} bytes follow")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"{path}: header is not valid JSON: {e}") from None
    except RecursionError:
        raise ValueError(f"{path}: header is not valid JSON: nested too deeply") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: header must be a JSON object, got {type(header).__name__}")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError(f"{path}: __metadata__ must map strings to strings, got {metadata!r:.200}")
    data_start, data_size = 8 + n, size - 8 - n
    tensors = {}
    for name, info in header.items():
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise ValueError(f"{path}: tensor {name!r}: header entry needs dtype, shape and data_offsets, "
                             f"got {info!r:.200}")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise ValueError(f"{path}: tensor {name!r}: unknown dtype {dtype!r:.50}; supported: {', '.join(DTYPES)}")
        if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
            raise ValueError(f"{path}: tensor {name!r}: shape must be a list of ints in 0..2^63-1, got {shape!r:.200}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_uint(o) for o in offsets)):
            raise ValueError(f"{path}: tensor {name!r}: data_offsets must be [begin, end], got {offsets!r:.200}")
        begin, end = offsets
        if not begin <= end <= data_size:
            raise ValueError(f"{path}: tensor {name!r}: data_offsets {offsets} outside the data block "
                             f"of {data_size} bytes (truncated file?)")
        nbytes = math.prod(shape) * DTYPES[dtype].itemsize
        if end - begin != nbytes:
            raise ValueError(f"{path}: tensor {name!r}: {end - begin} bytes for shape {shape} {dtype}, expected {nbytes}")
        tensors[name] = (dtype, tuple(shape), (begin, end))
    # the byte ranges must tile [0, data_size): no overlap, no gap, nothing after the last one
    covered = 0
    for begin, end, name in sorted((b, e, name) for name, (_, _, (b, e)) in tensors.items()):
        if begin != covered:
            problem = "overlaps the tensor before it" if begin < covered else "leaves unused bytes before it"
            raise ValueError(f"{path}: tensor {name!r} at data offset {begin} {problem} (the previous one ends "
                             f"at {covered}); tensors must tile the data block exactly")
        covered = end
    if covered != data_size:
        raise ValueError(f"{path}: the tensors cover {covered} bytes of a {data_size}-byte data block; the header "
                         f"length {n} is wrong or the file has trailing bytes")
    return tensors, metadata, data_start


def load_safetensors(path, names=None) -> dict:
    """name -> numpy array for every tensor (or only `names`). F32/F16/int arrays are
    read-only views of the file (np.memmap: nothing is read until used; copy to modify);
    BF16 tensors come back as new float32 arrays."""
    tensors, _, data_start = read_header(path)
    if names is not None:
        unknown = [n for n in names if n not in tensors]
        if unknown:
            raise ValueError(f"{path}: no tensor(s) {unknown}; the file has {len(tensors)} tensors")
        tensors = {n: tensors[n] for n in names}
    if not tensors:
        return {}
    data = np.asarray(np.memmap(path, dtype=np.uint8, mode="r", offset=data_start)) \
        if os.path.getsize(path) > data_start else np.zeros(0, np.uint8)
    out = {}
    for name, (dtype, shape, (begin, end)) in tensors.items():
        arr = data[begin:end].view(DTYPES[dtype]).reshape(shape)
        if dtype == "BF16":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)  # bf16 bits are the high half of f32
        out[name] = arr
    return out


def _to_numpy(name, x) -> tuple:
    """(safetensors dtype name, little-endian C-order numpy array) for a numpy array or torch tensor."""
    if type(x).__module__.startswith("torch"):
        x = x.detach().cpu().contiguous()
        if x.dtype == torch.bfloat16:
            return "BF16", x.view(torch.int16).numpy().view("<u2")
        x = x.numpy()
    x = np.asarray(x)
    for key, dt in DTYPES.items():
        if key != "BF16" and x.dtype.newbyteorder("<") == dt:
            return key, np.asarray(x, dtype=dt, order="C")  # (ascontiguousarray makes 0-d 1-d)
    raise ValueError(f"tensor {name!r}: dtype {x.dtype} has no safetensors equivalent; supported: {', '.join(DTYPES)}")


def save_safetensors(path, tensors: dict, metadata=None) -> None:
    """Write name -> array (numpy or torch, bf16 included) as a safetensors file.
    `metadata` is an optional str -> str dict stored under '__metadata__'."""
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError("metadata must map str to str (safetensors stores strings only)")
    header, blobs, offset = {}, [], 0
    for name, x in tensors.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise ValueError(f"invalid tensor name {name!r}")
        dtype, arr = _to_numpy(name, x)
        blob = arr.tobytes()
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    if metadata:
        header["__metadata__"] = dict(metadata)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # pad so the data block starts 8-byte aligned, as the reference writer does
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for blob in blobs:
            f.write(blob)
