"""Writing a GGUF file (llama.cpp's format, version 3), in plain Python and NumPy.

The layout, as ``gguf_read.py`` reads it and llama.cpp's ``gguf.c`` writes it: the magic, the
version, the tensor and metadata counts; the metadata entries (key, type, value); the tensor table
(name, dimensions innermost first, ggml type, offset into the data); then the data, every tensor
starting on a multiple of the alignment. Metadata entries are taken as encoded bytes, so a file
derived from another copies its entries exactly (their GGUF types included); ``kv_u32``
encodes a new one.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, List, Sequence, Tuple

import numpy as np

from .gguf_read import DEFAULT_ALIGNMENT, MAGIC, TENSOR_TYPES

VERSION = 3
_TYPE_IDS = {name: i for i, (name, _, _) in TENSOR_TYPES.items()}
# What a tensor can be written as here, and the file type (llama.cpp's llama_ftype) each gives.
WRITABLE = ("F32", "F16", "Q8_0")
FILE_TYPES = {"F32": 0, "F16": 1, "Q8_0": 7}
_U32 = 4  # GGUF's metadata type of an unsigned 32-bit integer


def _string(text: str) -> bytes:
    data = text.encode("utf-8")
    return struct.pack("<Q", len(data)) + data


def kv_u32(key: str, value: int) -> bytes:
    """A metadata entry holding an unsigned 32-bit integer (GGUF type 4)."""
    return _string(key) + struct.pack("<II", _U32, value)


def q8_0(a: np.ndarray) -> bytes:
    """ggml's Q8_0 blocks of a float array whose last axis is a multiple of 32: per block of 32
    values a float16 scale ``max|x| / 127`` and 32 int8 values ``round(x / scale)``."""
    blocks = np.asarray(a, dtype=np.float32).reshape(-1, 32)
    scale = np.abs(blocks).max(axis=1, keepdims=True) / 127.0
    safe = np.where(scale == 0, 1.0, scale)
    q = np.clip(np.round(blocks / safe), -127, 127).astype(np.int8)
    out = np.empty(len(blocks), dtype=[("d", "<f2"), ("q", "i1", (32,))])
    out["d"], out["q"] = scale[:, 0].astype(np.float16), q
    return out.tobytes()


def tensor_bytes(a: np.ndarray, type_name: str) -> bytes:
    """``a`` stored as ``type_name`` (one of ``WRITABLE``), in row-major order."""
    if type_name == "F32":
        return np.ascontiguousarray(a, dtype="<f4").tobytes()
    if type_name == "F16":
        return np.ascontiguousarray(a, dtype="<f2").tobytes()
    if type_name == "Q8_0":
        if a.shape[-1] % 32:
            raise ValueError(f"Q8_0 needs rows of a multiple of 32 values, not {a.shape[-1]}")
        return q8_0(a)
    raise ValueError(f"cannot write tensors as {type_name} (writable: {', '.join(WRITABLE)})")


def _pad(f: BinaryIO, alignment: int) -> None:
    f.write(b"\0" * (-f.tell() % alignment))


def write_gguf(f: BinaryIO, kvs: Sequence[bytes],
               tensors: Sequence[Tuple[str, Tuple[int, ...], str, Callable[[], bytes]]],
               alignment: int = DEFAULT_ALIGNMENT) -> None:
    """Write a GGUF file to the binary stream ``f`` (positioned at its start).

    ``kvs``: encoded metadata entries (copied from a read file, or from ``kv_u32``);
    a ``general.alignment`` among them must equal ``alignment``. ``tensors``: (name, row-major
    shape, ggml type name, a function giving its bytes), in the order they are stored; each
    tensor's bytes are asked for when it is written, so one tensor's are in memory at a time.
    """
    table: List[Tuple[str, Tuple[int, ...], str, int, int]] = []
    offset = 0
    for name, shape, type_name, _ in tensors:
        _, block, block_bytes = TENSOR_TYPES[_TYPE_IDS[type_name]]
        n = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if n % block:
            raise ValueError(f"tensor {name}: {shape} is not a whole number of {type_name} blocks")
        size = n // block * block_bytes
        table.append((name, tuple(shape), type_name, size, offset))
        offset += size + (-size % alignment)
    f.write(MAGIC + struct.pack("<IQQ", VERSION, len(table), len(kvs)))
    for kv in kvs:
        f.write(kv)
    for name, shape, type_name, _, at in table:
        dims = tuple(reversed(shape))  # GGUF lists dimensions innermost first
        f.write(_string(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, _TYPE_IDS[type_name], at))
    _pad(f, alignment)
    for (name, shape, type_name, size, _), (_, _, _, data) in zip(table, tensors):
        chunk = data()
        if len(chunk) != size:
            raise ValueError(f"tensor {name}: {len(chunk)} bytes do not hold {shape} as {type_name}")
        f.write(chunk)
        _pad(f, alignment)


def raw_kvs(path: Path, spans: Iterable[Tuple[int, int]]) -> List[bytes]:
    """The encoded metadata entries at ``spans`` (``GGUFHeader.kv_spans``) of the file ``path``."""
    with open(path, "rb") as f:
        out = []
        for start, end in spans:
            f.seek(start)
            out.append(f.read(end - start))
    return out
