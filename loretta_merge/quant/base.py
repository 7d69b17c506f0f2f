"""What every quantization format module provides, and the bit-unpacking they share.

A format module (``bnb``, ``torchao``, ``ctensors``, ``gptq``) exposes one function,
``detect(qconfig, view) -> QuantLayout | None``: given ``config.json``'s
``quantization_config`` and a :class:`TensorView` of the stored checkpoint (names, shapes,
dtypes, the shards' ``__metadata__``, and small tensor reads), it returns the layout of
every quantized weight, checked against the config, or ``None`` when the config is not its
format. :meth:`QuantLayout.dequantize` turns one weight's stored tensors into its fp32
``(out, in)`` matrix. Pure torch: no quantization package is imported at run time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch

from ..errors import FormatError


class TensorView(Protocol):
    """The part of :class:`loretta_merge.io.CheckpointReader` the detectors use."""

    model_dir: Any

    def keys(self) -> list[str]: ...
    def shape(self, key: str) -> tuple[int, ...]: ...
    def dtype(self, key: str) -> torch.dtype: ...
    def get(self, key: str) -> torch.Tensor: ...


@dataclass(frozen=True)
class QuantWeight:
    """One quantized Linear weight: its logical name and (out, in) shape, the stored
    tensors it is made of (role -> stored key), and what its format needs to decode it."""

    name: str
    shape: tuple[int, int]
    parts: dict[str, str]
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class QuantLayout:
    """Every quantized weight of one checkpoint and how to dequantize it.

    ``hidden`` are stored tensors that are neither a weight's part nor kept in the
    output (e.g. bitsandbytes' ``weight_format``); ``summary`` is what ``inspect`` shows
    (format, bits, group size...).
    """

    format: str
    weights: dict[str, QuantWeight]
    decode: Callable[[QuantWeight, dict[str, torch.Tensor]], torch.Tensor]
    summary: dict[str, Any]
    hidden: set[str] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)

    def dequantize(self, weight: QuantWeight, get: Callable[[str], torch.Tensor]) -> torch.Tensor:
        """The fp32 (out, in) matrix of ``weight``, read through ``get(stored_key)``."""
        tensors = {role: get(key) for role, key in weight.parts.items()}
        w = self.decode(weight, tensors)
        if tuple(w.shape) != weight.shape:  # pragma: no cover - the detectors check shapes
            raise FormatError(f"{weight.name}: dequantized to {tuple(w.shape)}, expected {weight.shape}; re-download or re-quantize the checkpoint")
        return w.to(torch.float32).contiguous()

    def stored_keys(self) -> set[str]:
        return {k for w in self.weights.values() for k in w.parts.values()} | self.hidden


def disagree(fmt: str, key: str, problem: str, fix: str = "") -> FormatError:
    """The one-line error for a checkpoint whose tensors disagree with its config."""
    fix = fix or ("re-save the model with the quantization package that made it, or "
                  "dequantize it there and pass the bf16 checkpoint")
    return FormatError(f"{fmt} base: tensor {key}: {problem}; the checkpoint does not match its "
                       f"quantization_config (nothing was written); {fix}")


def expect_shape(fmt: str, key: str, got: tuple, want: tuple, what: str) -> None:
    if tuple(got) != tuple(want):
        raise disagree(fmt, key, f"has shape {tuple(got)}, but {what} needs {tuple(want)}")


def expect_group(fmt: str, key: str, width: int, group: int) -> None:
    if group <= 0 or width % group:
        raise disagree(fmt, key, f"group size {group} does not divide the input width {width}",
                       "set group_size in quantization_config to the one the model was quantized with")


def modules_with(keys: list[str], suffix: str) -> list[str]:
    """Module names ``m`` for every stored key ``m + suffix``, in checkpoint order."""
    return [k[:-len(suffix)] for k in keys if k.endswith(suffix)]


# --------------------------------------------------------------------------- bit unpacking

def unpack_bits(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The first ``count`` unsigned ``bits``-wide values of each row of ``words`` (int32,
    last dim), read as one little-endian bit stream per row: value i starts at bit
    i * bits and may straddle two words. Returns an integer tensor (..., count)."""
    if 32 % bits == 0:  # values never straddle words: shift and mask, no gather
        per = 32 // bits
        shifts = torch.arange(per, dtype=torch.int32) * bits
        vals = (words.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
        return vals.reshape(*words.shape[:-1], -1)[..., :count]
    w = words.to(torch.int64) & 0xFFFFFFFF  # (..., n_words) unsigned
    start = torch.arange(count, dtype=torch.int64) * bits
    word, offset = start // 32, start % 32
    lo = w[..., word] >> offset
    spill = (offset + bits) > 32
    if bool(spill.any()):
        nxt = torch.clamp(word + 1, max=w.shape[-1] - 1)
        lo = lo | torch.where(spill, w[..., nxt] << (32 - offset), torch.zeros_like(lo))
    return lo & ((1 << bits) - 1)


def unpack_nibbles(words: torch.Tensor, order: tuple[int, ...] = tuple(range(8))) -> torch.Tensor:
    """4-bit values packed 8 per int32 along the last dim; ``order[j]`` is the nibble that
    holds logical value j of each word. Returns int32 (..., 8 * n_words)."""
    shifts = torch.tensor(order, dtype=torch.int32) * 4  # (arithmetic shift: masked below)
    vals = (words.to(torch.int32).unsqueeze(-1) >> shifts) & 0xF  # (..., n_words, 8)
    return vals.reshape(*words.shape[:-1], words.shape[-1] * 8)


def nibble_lookup(packed: torch.Tensor, table: torch.Tensor, *, high_first: bool) -> torch.Tensor:
    """Float values of the 4-bit codes in the bytes of ``packed`` (any integer dtype, read as
    its little-endian bytes in memory order): ``table[code]`` for the two codes of each byte,
    the high nibble first (bitsandbytes) or the low one (a little-endian bit stream, as
    compressed-tensors packs). One gather per byte from a 256 x 2 table instead of a shift,
    a mask and a gather per value: about 4x faster on one CPU thread, the same values."""
    codes = torch.arange(256, device=table.device)
    high, low = table[codes >> 4], table[codes & 0xF]
    pairs = torch.stack([high, low] if high_first else [low, high], dim=-1)  # (256, 2)
    raw = packed.contiguous().view(torch.uint8).reshape(-1)
    return torch.nn.functional.embedding(raw.to(torch.int32), pairs).reshape(-1)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def numel(shape: tuple[int, ...]) -> int:
    return math.prod(int(s) for s in shape)
