"""Reading a GGUF file (llama.cpp's format): its header, metadata and tensors, as MLX arrays.

The header is parsed here in plain Python, before any tensor is touched, so that a truncated or
foreign file and a tensor type nothing here can read are one-line errors naming the file (MLX's
own reader fails on them with a C++ message, or reads past the end). The tensors then come from
``mx.load``, which reads F32/F16/BF16 as they are and keeps Q4_0, Q4_1 and Q8_0 quantized as MLX
affine weights (group 32). Files with other quantizations (the K-quants: Q4_K, Q5_K, Q6_K, ...)
are read with the ``gguf`` package (llama.cpp's own Python reader, NumPy only; the ``gguf`` extra):
each such tensor is dequantized to float32 and re-quantized by MLX (``requantize_bits``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Dict, List, Tuple

import mlx.core as mx
import numpy as np

from .errors import UserError, first_line

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# ggml's tensor types: name, elements per block, bytes per block (ggml.h / gguf-py constants).
TENSOR_TYPES: Dict[int, Tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 36),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292), 16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2),
    26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
}
# What mx.load reads itself (the rest of a file's tensors must go through the gguf package).
NATIVE = {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q8_0"}
FLOAT = {"F32", "F16", "BF16", "F64"}

# GGUF metadata value types: struct format of the scalars; 8 = string, 9 = array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class GGUFError(UserError, ValueError):
    """A GGUF file that cannot be read or converted; the message names the file."""


@dataclass
class TensorInfo:
    name: str
    shape: Tuple[int, ...]  # row-major, as NumPy and MLX write it (GGUF lists dims innermost first)
    type_name: str
    offset: int  # from the start of the file
    nbytes: int


@dataclass
class GGUFHeader:
    path: Path
    version: int
    metadata: Dict[str, Any]
    tensors: List[TensorInfo]
    # Where each metadata entry's bytes (key, type, value) lie in the file: a GGUF file written
    # from this one copies them as they are, so every value keeps its exact GGUF type.
    kv_spans: Dict[str, Tuple[int, int]] = field(default_factory=dict)

    def arch(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def types(self) -> Dict[str, str]:
        return {t.name: t.type_name for t in self.tensors}


class _Reader:
    """Little-endian reads that turn a short read into ``GGUFError`` (a truncated file)."""

    def __init__(self, f: BinaryIO, path: Path, size: int):
        self.f, self.path, self.size = f, path, size

    def take(self, n: int) -> bytes:
        if n < 0 or self.f.tell() + n > self.size:
            raise GGUFError(f"{self.path}: truncated GGUF file (the header runs past its {self.size} bytes)")
        return self.f.read(n)

    def scalar(self, fmt: str) -> Any:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return self.take(self.scalar("Q")).decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            itype, count = self.scalar("I"), self.scalar("Q")
            if itype in _SCALARS:  # numbers in one read (token types, scores: 100k+ entries)
                fmt = _SCALARS[itype]
                return list(struct.unpack(f"<{count}{fmt}", self.take(count * struct.calcsize(fmt))))
            return [self.value(itype) for _ in range(count)]
        raise GGUFError(f"{self.path}: unknown metadata value type {vtype} (damaged file?)")


def read_header(path: Path) -> GGUFHeader:
    """The metadata and tensor table of the GGUF file at ``path``, checked against its size."""
    path = Path(path)
    try:
        size = path.stat().st_size
        f = open(path, "rb")
    except OSError as e:
        raise GGUFError(f"{path}: cannot read ({e.strerror or first_line(e)})") from None
    with f:
        r = _Reader(f, path, size)
        if size < 24 or r.take(4) != MAGIC:
            raise GGUFError(f"{path}: not a GGUF file (no GGUF magic at its start)")
        version = r.scalar("I")
        if version not in (2, 3):
            raise GGUFError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
        n_tensors, n_kv = r.scalar("Q"), r.scalar("Q")
        if n_tensors > size or n_kv > size:  # each entry takes bytes: a count beyond the size is damage
            raise GGUFError(f"{path}: damaged GGUF header ({n_tensors} tensors, {n_kv} metadata keys)")
        metadata: Dict[str, Any] = {}
        spans: Dict[str, Tuple[int, int]] = {}
        for _ in range(n_kv):
            at = f.tell()
            key = r.string()
            metadata[key] = r.value(r.scalar("I"))
            spans[key] = (at, f.tell())
        raw = []
        for _ in range(n_tensors):
            name = r.string()
            n_dims = r.scalar("I")
            if n_dims > 8:
                raise GGUFError(f"{path}: tensor {name} has {n_dims} dimensions (damaged file?)")
            dims = [r.scalar("Q") for _ in range(n_dims)]
            raw.append((name, dims, r.scalar("I"), r.scalar("Q")))
        align = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT)) or DEFAULT_ALIGNMENT
        start = -(-f.tell() // align) * align
    tensors = []
    for name, dims, ttype, offset in raw:
        if ttype not in TENSOR_TYPES:
            raise GGUFError(f"{path}: tensor {name} has ggml type {ttype}, which no reader here knows")
        tname, block, block_bytes = TENSOR_TYPES[ttype]
        n = int(np.prod(dims, dtype=np.int64)) if dims else 1
        if n % block:
            raise GGUFError(f"{path}: tensor {name} ({tname}) has {n} elements, not a whole number of blocks")
        t = TensorInfo(name, tuple(int(d) for d in reversed(dims)), tname, start + offset, n // block * block_bytes)
        if t.offset + t.nbytes > size:
            raise GGUFError(f"{path}: truncated GGUF file (tensor {name} ends at byte "
                            f"{t.offset + t.nbytes}, the file has {size})")
        tensors.append(t)
    return GGUFHeader(path, version, metadata, tensors, spans)


def requantize_bits(type_name: str) -> int:
    """The MLX bit width a tensor of another quantization is re-quantized to: 4 bits for types of
    at most ~4.5 bits a weight, 8 for the finer ones, so no tensor loses more than its file did."""
    return 8 if type_name in ("Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0", "Q8_1", "Q8_K") else 4


# Weights in MLX's layout: name -> array, plus the quantized ones' (group_size, bits), by the name
# of their weight without ".weight".
Weights = Tuple[Dict[str, mx.array], Dict[str, Tuple[int, int]]]


def load_tensors(header: GGUFHeader, group_size: int = 32) -> Weights:
    """The file's tensors as MLX arrays: quantized ones as MLX affine ``weight``/``scales``/``biases``.

    F32/F16/BF16 and Q4_0/Q4_1/Q8_0 come from ``mx.load`` exactly; other types need the ``gguf``
    package and are dequantized, then re-quantized by MLX (``requantize_bits``, ``group_size``).
    """
    types = header.types()
    other = sorted({t for t in types.values() if t not in NATIVE})
    if not other:
        try:
            arrays = mx.load(str(header.path), format="gguf")  # Ollama's blobs have no suffix
        except Exception as e:  # the header was sound, so the data is damaged
            raise GGUFError(f"{header.path}: cannot read its tensors ({first_line(e)})") from None
        for t in header.tensors:
            if t.type_name == "BF16":  # mx.load gives float16; read the bits as they are
                arrays[t.name] = _bfloat16(header.path, t)
        quant = {_stem(name): (32, 8 if t == "Q8_0" else 4)
                 for name, t in types.items() if t in ("Q4_0", "Q4_1", "Q8_0")}
        return arrays, quant
    return _load_with_gguf_package(header, other, group_size)


def _stem(name: str) -> str:
    """A weight's module name: ``blk.0.attn_q.weight`` -> ``blk.0.attn_q`` (where MLX puts
    ``.scales`` and ``.biases`` beside it)."""
    return name[: -len(".weight")] if name.endswith(".weight") else name


def _bfloat16(path: Path, t: TensorInfo) -> mx.array:
    bits = np.fromfile(path, dtype="<u2", count=t.nbytes // 2, offset=t.offset).astype(np.uint32) << 16
    return mx.array(bits.view(np.float32).reshape(t.shape)).astype(mx.bfloat16)


def _load_with_gguf_package(header: GGUFHeader, other: List[str], group_size: int) -> Weights:
    try:
        from gguf import GGUFReader
        from gguf.quants import dequantize
    except ImportError:
        raise GGUFError(
            f"{header.path}: its tensors of type {', '.join(other)} need the gguf package to be read: "
            'pip install -e ".[gguf]" (or pip install gguf)'
        ) from None
    try:
        reader = GGUFReader(str(header.path))
    except Exception as e:
        raise GGUFError(f"{header.path}: cannot read its tensors ({first_line(e)})") from None
    arrays: Dict[str, mx.array] = {}
    quant: Dict[str, Tuple[int, int]] = {}
    infos = {t.name: t for t in header.tensors}  # the same table, already read and checked
    for t in reader.tensors:
        tname, info = t.tensor_type.name, infos[t.name]
        if tname == "BF16":
            arrays[t.name] = _bfloat16(header.path, info)
            continue
        if tname in FLOAT:
            arrays[t.name] = mx.array(np.asarray(t.data).reshape(info.shape))
            continue
        try:
            values = dequantize(np.asarray(t.data), t.tensor_type).reshape(info.shape).astype(np.float32)
        except NotImplementedError:
            raise GGUFError(f"{header.path}: tensor {t.name} has type {tname}, which the gguf package "
                            "cannot dequantize") from None
        stem = _stem(t.name)
        bits = requantize_bits(tname)
        if values.ndim == 2 and values.shape[-1] % group_size == 0:
            w, s, b = mx.quantize(mx.array(values), group_size=group_size, bits=bits)
            mx.eval(w, s, b)  # now: a lazy graph would keep every tensor's float32 copy alive
            arrays[t.name], arrays[f"{stem}.scales"], arrays[f"{stem}.biases"] = w, s, b
            quant[stem] = (group_size, bits)
        else:  # a vector or a row MLX cannot group: keep the dequantized values
            arrays[t.name] = mx.array(values)
    return arrays, quant
