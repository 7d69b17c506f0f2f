"""Parsing of the options every writing command shares: sizes, dtypes, devices.

Each parser turns a user's text into a value or raises :class:`ConfigError` naming the
text and the accepted spellings.
"""

from __future__ import annotations

import math
import re

import torch

from ..errors import ConfigError

_DTYPE_NAMES = {
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
    "fp16": torch.float16, "half": torch.float16, "float32": torch.float32, "fp32": torch.float32,
    "float": torch.float32,
}
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int | float) -> int:
    """Bytes from ``"5GB"`` (KB/MB/GB/TB are powers of 1000), ``"512MiB"`` (KiB/MiB/GiB are
    powers of 1024) or a plain integer count of bytes."""
    if isinstance(text, bool):
        raise ConfigError(f"size must be bytes such as 5GB or 500MiB, got {text!r}; use e.g. 5GB, 500MB or 2GiB")
    if isinstance(text, (int, float)):
        if not math.isfinite(text) or text <= 0 or text != int(text):
            raise ConfigError(f"size must be a positive whole number of bytes, got {text!r}; use e.g. 5GB, 500MB or 2GiB")
        return int(text)
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).upper() if m else None
    if not m or unit not in _SIZE_UNITS:
        raise ConfigError(f"cannot read size {text!r}: use bytes with a unit such as 5GB, "
                          f"500MB or 2GiB (KB/MB/GB = 1000^n, KiB/MiB/GiB = 1024^n)")
    value = int(float(m.group(1)) * _SIZE_UNITS[unit])
    if value <= 0:
        raise ConfigError(f"size must be positive, got {text!r}; use e.g. 5GB")
    return value


def parse_dtype(text: str | torch.dtype | None) -> torch.dtype | None:
    """``"auto"``/None -> None (keep each tensor's dtype); otherwise bf16, fp16 or fp32."""
    if text is None or isinstance(text, torch.dtype):
        if text is not None and text not in _DTYPE_NAMES.values():
            raise ConfigError(f"dtype {text} is not supported; use bfloat16, float16 or float32")
        return text
    key = str(text).strip().lower().removeprefix("torch.")
    if key == "auto":
        return None
    if key not in _DTYPE_NAMES:
        raise ConfigError(f"unknown dtype {text!r}: use auto, bfloat16, float16 or float32")
    return _DTYPE_NAMES[key]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the spelling transformers configs use)."""
    return str(dtype).removeprefix("torch.")


def resolve_device(text: str | torch.device | None = "auto") -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda``/``cuda:N`` must be available."""
    key = "auto" if text is None else str(text).strip().lower()
    if key == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if key == "cpu":
        return torch.device("cpu")
    m = re.fullmatch(r"cuda(?::([0-9]+))?", key)
    if not m:
        raise ConfigError(f"unknown device {text!r}: use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ConfigError(f"device {text!r} asked for, but this torch build sees no CUDA GPU "
                          f"(torch {torch.__version__}); use --device cpu, or install a CUDA "
                          f"build of torch on a machine with an NVIDIA GPU")
    index = int(m.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise ConfigError(f"device {text!r} asked for, but only {torch.cuda.device_count()} "
                          f"CUDA device(s) exist; use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    return torch.device("cuda", index)
