"""A checkpoint reader that shows a quantized checkpoint as the plain one it stands for.

:class:`DequantizedReader` wraps a :class:`loretta_merge.io.CheckpointReader` and a
:class:`QuantLayout`: every quantized weight appears once, under its logical name
``<module>.weight``, as an fp32 ``(out, in)`` tensor dequantized when it is read; the
tensors it is stored as (codes, scales, zero points, absmax, quant_state blobs, g_idx,
weight_shape...) are hidden; every other tensor passes through unchanged. The key order
is the checkpoint's, so reads stay sequential; one weight is decoded at a time.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .base import QuantLayout


class DequantizedReader:
    """Reader-like view of a quantized checkpoint (same methods merge uses on
    :class:`~loretta_merge.io.CheckpointReader`)."""

    def __init__(self, reader, layout: QuantLayout) -> None:
        self.reader = reader
        self.layout = layout
        self.model_dir: Path = reader.model_dir
        self.metadata: dict = getattr(reader, "metadata", {})
        owner = {stored: name for name, w in layout.weights.items() for stored in w.parts.values()}
        keys: list[str] = []
        seen: set[str] = set()
        for k in reader.keys():  # a weight takes the place of its first stored part
            name = owner.get(k, k)
            if name in seen or (k not in owner and k in layout.hidden):
                continue
            seen.add(name)
            keys.append(name)
        self._keys = keys
        self._hidden_keys = layout.stored_keys() - set(layout.weights)
        self._main = {name: self._main_part(w.parts) for name, w in layout.weights.items()}

    @staticmethod
    def _main_part(parts: dict[str, str]) -> str:
        for role in ("packed", "q", "qweight", "qdata"):
            if role in parts:
                return parts[role]
        return next(iter(parts.values()))

    # -- the CheckpointReader interface -------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._keys)

    def __contains__(self, key: str) -> bool:
        return key in self.layout.weights or (key in self.reader and key not in self._hidden_keys)

    def is_quantized(self, key: str) -> bool:
        return key in self.layout.weights

    def shard_of(self, key: str) -> str:
        return self.reader.shard_of(self._main.get(key, key))

    def shape(self, key: str) -> tuple[int, ...]:
        w = self.layout.weights.get(key)
        return tuple(w.shape) if w is not None else self.reader.shape(key)

    def dtype(self, key: str) -> torch.dtype:
        return torch.float32 if key in self.layout.weights else self.reader.dtype(key)

    def nbytes(self, key: str) -> int:
        """Bytes of the logical tensor (shape x dtype), like CheckpointReader.nbytes."""
        if key in self.layout.weights:
            return math.prod(self.layout.weights[key].shape) * 4
        return self.reader.nbytes(key)

    def stored_nbytes(self, key: str) -> int:
        """Bytes read from disk for ``key`` (all its stored parts)."""
        w = self.layout.weights.get(key)
        return sum(self.reader.nbytes(p) for p in w.parts.values()) if w else self.reader.nbytes(key)

    def total_bytes(self) -> int:
        return sum(self.nbytes(k) for k in self._keys)

    def get(self, key: str) -> torch.Tensor:
        w = self.layout.weights.get(key)
        if w is None:
            if key in self._hidden_keys:
                raise KeyError(f"{self.model_dir}: {key!r} is part of a quantized weight")
            return self.reader.get(key)
        return self.layout.dequantize(w, self.reader.get)

    def close(self) -> None:
        self.reader.close()

    def __enter__(self) -> "DequantizedReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
