"""The safetensors header: read it, and check every tensor's offsets before any data is read.

A safetensors file is an 8-byte little-endian header length ``n``, ``n`` bytes of JSON
(``{name: {"dtype", "shape", "data_offsets": [start, end]}, "__metadata__": {...}}``) and the
data section; offsets are relative to the data section. :func:`read_safetensors_header`
rejects, with one :class:`FormatError` line naming the file, the tensor, its shape, dtype and
offsets and what to do, any header a reader could trip on later: a tensor whose byte span
disagrees with shape x element size, a span past the end of the file, two spans that overlap.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import torch

from ..errors import FormatError

MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit

# header dtype string -> bits per element (all dtypes of the format, held by torch or not)
DTYPE_BITS = {
    "F64": 64, "F32": 32, "F16": 16, "BF16": 16, "I64": 64, "I32": 32, "I16": 16, "I8": 8,
    "U64": 64, "U32": 32, "U16": 16, "U8": 8, "BOOL": 8, "F8_E4M3": 8, "F8_E5M2": 8,
    "F8_E8M0": 8, "F6_E2M3": 6, "F6_E3M2": 6, "F4": 4, "C64": 64,
}

# header dtype string -> torch dtype, for the dtypes this torch build holds
ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
                     ("F8_E8M0", "float8_e8m0fnu"), ("U16", "uint16"), ("U32", "uint32"),
                     ("U64", "uint64"), ("C64", "complex64")):
    if hasattr(torch, _attr):
        ST_DTYPES[_name] = getattr(torch, _attr)
ST_NAMES: dict[torch.dtype, str] = {v: k for k, v in ST_DTYPES.items()}

_FIX = "the file is corrupt or was written by a faulty tool: re-download it or re-save it with save_pretrained"


def expected_nbytes(dtype: str, shape: list[int]) -> int:
    """Bytes a tensor of ``dtype`` (header string) and ``shape`` takes in the data section."""
    return math.ceil(math.prod(shape) * DTYPE_BITS[dtype] / 8)


def _read_raw(path: Path) -> tuple[dict, int, int]:
    """The parsed JSON header, its length ``n`` and the file size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise FormatError(f"{path}: only {size} bytes, too short for a safetensors file; "
                                  f"{_FIX}")
            n = struct.unpack("<Q", raw)[0]
            if n > min(size - 8, MAX_HEADER_BYTES):
                raise FormatError(f"{path}: header length {n} does not fit in a {size}-byte "
                                  f"file; the file is truncated or not safetensors: re-download "
                                  f"or re-save it")
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise FormatError(f"{path}: cannot read the safetensors header ({exc}); the file is "
                          f"corrupt or not safetensors; re-download or re-save it") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: the safetensors header is not a JSON object; {_FIX}")
    return header, n, size


def _entry(path: Path, key: str, info: object) -> tuple[str, list[int], int, int]:
    """``(dtype, shape, start, end)`` of one header entry, each field type-checked."""
    try:
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]  # type: ignore[index]
        ok = (isinstance(dtype, str) and isinstance(shape, list) and isinstance(offsets, list)
              and len(offsets) == 2
              and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in shape + offsets))
    except (KeyError, TypeError, IndexError):
        ok = False
    if not ok:
        raise FormatError(f"{path}: header entry {key!r} is malformed ({str(info)[:120]}); every "
                          f"tensor needs a dtype string, a shape of non-negative integers and "
                          f"data_offsets [start, end]; {_FIX}")
    if dtype not in DTYPE_BITS:
        raise FormatError(f"{path}: tensor {key!r} has dtype {dtype!r}, which is not a safetensors "
                          f"dtype this reader knows ({', '.join(sorted(DTYPE_BITS))}); re-save the "
                          f"checkpoint in a supported dtype")
    return dtype, shape, offsets[0], offsets[1]


def validate_header(path: Path, header: dict, data_bytes: int) -> None:
    """Every tensor's span agrees with shape x element size, lies inside the ``data_bytes``
    of the data section, and overlaps no other tensor's span."""
    spans = []
    for key, info in header.items():
        if key == "__metadata__":
            if info is not None and not isinstance(info, dict):
                raise FormatError(f"{path}: __metadata__ must be a JSON object; {_FIX}")
            continue
        dtype, shape, start, end = _entry(path, key, info)
        where = f"{path}: tensor {key!r} ({dtype}, shape {shape}, data_offsets [{start}, {end}])"
        need = expected_nbytes(dtype, shape)
        if end < start or end - start != need:
            raise FormatError(f"{where} spans {end - start} bytes, but shape x dtype needs {need}; "
                              f"{_FIX}")
        if end > data_bytes:
            raise FormatError(f"{where} ends past the data section ({data_bytes} bytes); the file "
                              f"is truncated (an interrupted download or copy?): re-download or "
                              f"re-save it")
        spans.append((start, end, key))
    spans.sort()
    for (s0, e0, k0), (s1, e1, k1) in zip(spans, spans[1:]):
        if s1 < e0 and e1 > s1:  # empty tensors overlap nothing
            raise FormatError(f"{path}: tensors {k0!r} (bytes [{s0}, {e0}]) and {k1!r} (bytes "
                              f"[{s1}, {e1}]) overlap; {_FIX}")


def read_safetensors_header(path: str | Path) -> dict:
    """The JSON header of a safetensors file (tensor name -> dtype, shape, offsets), every
    entry checked by :func:`validate_header`. Reads only the header bytes."""
    path = Path(path)
    header, n, size = _read_raw(path)
    validate_header(path, header, size - 8 - n)
    return header


def header_length(path: str | Path) -> int:
    """The JSON header's length ``n``: tensor data starts at byte ``8 + n``."""
    with open(path, "rb") as f:
        return struct.unpack("<Q", f.read(8))[0]
