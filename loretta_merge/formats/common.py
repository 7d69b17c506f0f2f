"""What every adapter format shares: file and key names, the config rules (per-module rank
and scale by PEFT's pattern rule), and the checks each reader applies to tensors and cores.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch

from .. import tt
from ..errors import ConfigError, FormatError, NumericsError, ShapeError
from ..patterns import pattern_key
from .types import TTMatrix

PREFIX = "base_model.model."  # PEFT's prefix of every adapter tensor key on disk
CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
FORMAT_VERSION = 1
MAX_DIM = 2**31  # larger ranks / bottlenecks are corrupt configs, not models
NON_LINEARITIES = ("relu", "gelu", "silu", "tanh")
_ACT_ALIASES = {"swish": "silu"}


# --------------------------------------------------------------------------- config rules

def _positive_number(value: Any, what: str) -> float:
    return to_number(value, what, positive=True)


def to_number(value: Any, what: str, *, positive: bool = False) -> float:
    """``value`` as a finite float (JSON ints may be too large for a float)."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float))
    try:
        number = float(value) if ok else math.nan
    except OverflowError:
        number = math.inf
    if not math.isfinite(number) or (positive and number <= 0):
        kind = "a positive" if positive else "a finite"
        raise ConfigError(f"{what} must be {kind} number, got {str(value)[:40]}; fix that value in adapter_config.json")
    return number


def rank_for(config: dict, module_name: str) -> int:
    """The LoRA rank ``r`` of one module: ``rank_pattern`` override or ``r``."""
    patterns = config.get("rank_pattern") or {}
    if not isinstance(patterns, dict):
        raise ConfigError(f"rank_pattern must be a mapping of module pattern -> rank, got {str(patterns)[:80]}; fix rank_pattern in adapter_config.json")
    key = pattern_key(patterns, module_name, field_name="rank_pattern")
    r = patterns[key] if key is not None else config.get("r", 8)
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= MAX_DIM:
        where = f"rank_pattern[{key!r}]" if key is not None else "r"
        raise ConfigError(f"{where} must be an integer in [1, {MAX_DIM}], got {str(r)[:40]} "
                          f"(module {module_name}); fix r / rank_pattern in adapter_config.json")
    return r


def scale_for(config: dict, module_name: str) -> float:
    """PEFT's LoRA scale for one module: ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with
    ``use_rslora``; ``rank_pattern`` / ``alpha_pattern`` keys override per module (first key
    in order whose regex ``(.*\\.)?key$`` matches the full module name)."""
    if not isinstance(config, dict):
        raise ConfigError(f"adapter config must be a mapping, got {type(config).__name__}; pass a dict")
    r = rank_for(config, module_name)
    patterns = config.get("alpha_pattern") or {}
    if not isinstance(patterns, dict):
        raise ConfigError(f"alpha_pattern must be a mapping of module pattern -> alpha, got {str(patterns)[:80]}; fix alpha_pattern in adapter_config.json")
    key = pattern_key(patterns, module_name, field_name="alpha_pattern")
    alpha = patterns[key] if key is not None else config.get("lora_alpha", 8)
    if alpha is None:
        raise ConfigError(f"lora_alpha is missing (null) in the adapter config; set it (module {module_name})")
    alpha = _positive_number(alpha, f"alpha for module {module_name}")
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def parse_config(data: bytes | str, *, source: str = CONFIG_NAME) -> dict:
    """Parse ``adapter_config.json`` text; errors name ``source`` and the line."""
    try:
        text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
    except UnicodeDecodeError as exc:
        raise FormatError(f"{source}: not UTF-8 text ({exc}); is this really an adapter config? Pass the directory of a saved adapter") from None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise FormatError(f"{source}: malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}; "
                          f"fix the file or re-save the adapter") from None
    except RecursionError:
        raise FormatError(f"{source}: JSON nested too deeply; re-save the adapter") from None
    if not isinstance(config, dict):
        raise FormatError(f"{source}: expected a JSON object at the top level, got {type(config).__name__}; re-save the adapter")
    peft_type = config.get("peft_type")
    if not isinstance(peft_type, str):
        raise FormatError(f"{source}: 'peft_type' is missing or not a string ({peft_type!r}); "
                          f"expected LORETTA_REP, LORETTA_ADP, LORA or BOTTLENECK; set peft_type in adapter_config.json")
    return config


def check_finite(state: dict[str, torch.Tensor], source: Path) -> None:
    for key, value in state.items():
        if value.is_floating_point() or value.is_complex():
            finite = torch.isfinite(value)
            if not bool(finite.all()):
                bad = int((~finite).sum())
                raise NumericsError(f"{source}: tensor {key} {tuple(value.shape)} has {bad} NaN/Inf "
                                    f"value(s); the adapter diverged in training or the file is damaged: retrain it, or use "
                                    f"an earlier checkpoint")



# --------------------------------------------------------------------------- parsing helpers

def strip_prefix(state: dict[str, torch.Tensor], source: Path) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if not key.startswith(PREFIX):
            raise FormatError(f"{source}: tensor key {key!r} lacks the '{PREFIX}' prefix every adapter "
                              f"key carries; was this file written by PEFT or loretta? Re-save the "
                              f"adapter with PEFT's save_pretrained (or save_loretta_adapter)")
        out[key[len(PREFIX):]] = value
    return out


def collect_cores(found: dict[int, torch.Tensor], what: str, source: Path) -> list[torch.Tensor]:
    indices = sorted(found)
    if indices != list(range(len(indices))):
        missing = sorted(set(range(max(indices) + 1)) - set(indices))
        raise FormatError(f"{source}: {what} has cores {indices}, core(s) {missing} missing; "
                          f"the file is incomplete; re-save or re-download the adapter")
    return [found[k] for k in indices]


def tt_from_cores(cores: list[torch.Tensor], rows: int, cols: int, what: str) -> TTMatrix:
    for side in (rows, cols):
        if isinstance(side, bool) or not isinstance(side, int) or side < 1:
            raise ShapeError(f"{what}: rows and cols must be positive integers, got ({rows!r}, {cols!r}); re-save or re-download the adapter")
    tt.validate_cores(cores, name=what)
    n = math.prod(tt.tt_modes_of(cores))
    if n != rows * cols:
        raise ShapeError(f"{what}: modes {tt.tt_modes_of(cores)} multiply to {n}, expected "
                         f"{rows} x {cols} = {rows * cols}; the cores do not fit the recorded shape: re-save the adapter or fix module_shapes in adapter_config.json")
    return TTMatrix(cores=cores, rows=rows, cols=cols)


def split_cores(cores: list[torch.Tensor], *, known: int, known_is_rows: bool, what: str,
           known_name: str) -> TTMatrix:
    """A TTMatrix whose one side is known (r or bottleneck); the other is product / known."""
    tt.validate_cores(cores, name=what)
    n = math.prod(tt.tt_modes_of(cores))
    if n % known:
        raise ShapeError(f"{what}: modes {tt.tt_modes_of(cores)} multiply to {n}, not a multiple of "
                         f"{known_name} = {known}; the config's {known_name} does not match the cores; fix module_shapes in adapter_config.json or re-save the adapter")
    other = n // known
    return TTMatrix(cores, known, other) if known_is_rows else TTMatrix(cores, other, known)


def group_modules(state: dict[str, torch.Tensor], pattern: re.Pattern) -> tuple[dict, dict]:
    """Split keys matched by ``pattern`` (groups m, part, k) into {module: {part: {k: t}}}; the
    rest is returned as-is."""
    groups: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
    rest = {}
    for key, value in state.items():
        m = pattern.match(key)
        if m:
            groups.setdefault(m["m"], {}).setdefault(m["part"], {})[int(m["k"])] = value
        else:
            rest[key] = value
    return groups, rest


def pop_bias(rest: dict, key: str, source: Path, *, required: bool = True) -> torch.Tensor | None:
    if key in rest:
        return rest.pop(key)
    if required:
        raise FormatError(f"{source}: tensor {PREFIX}{key} is missing; the adapter is incomplete; re-save or re-download the adapter")
    return None


def check_bias(bias: torch.Tensor, size: int, key: str) -> None:
    if not isinstance(bias, torch.Tensor):
        raise ShapeError(f"tensor {PREFIX}{key} is a {type(bias).__name__}, expected a ({size},) tensor; re-save or re-download the adapter")
    if tuple(bias.shape) != (size,):
        raise ShapeError(f"tensor {PREFIX}{key} has shape {tuple(bias.shape)}, expected ({size},); re-save or re-download the adapter")


def check_pairs(groups: dict, first: str, second: str, source: Path, suffix: str) -> None:
    for name, parts in groups.items():
        for p, q in ((first, second), (second, first)):
            if p in parts and q not in parts:
                raise FormatError(f"{source}: module {name} has {p} tensors but no {q} "
                                  f"('{PREFIX}{name}.{q}.{suffix}...'); the adapter is incomplete; re-save or re-download the adapter")


def check_non_linearity(value: Any, where: str) -> str:
    act = _ACT_ALIASES.get(value, value) if isinstance(value, str) else value
    if act not in NON_LINEARITIES:
        raise ConfigError(f"{where}: non_linearity {value!r} is not supported; use one of {NON_LINEARITIES}")
    return act


def module_map(config: dict, key: str) -> dict:
    value = config.get(key) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"{CONFIG_NAME}: '{key}' must be a mapping of module name -> value, got {value!r}; fix it in adapter_config.json")
    return value


def shape_pair(shapes: dict, name: str, part: str) -> tuple[int, int]:
    entry = shapes.get(name)
    dims = entry.get(part) if isinstance(entry, dict) else None
    if (not isinstance(dims, list) or len(dims) != 2
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in dims)):
        raise ConfigError(f"{CONFIG_NAME}: module_shapes[{name!r}][{part!r}] must be [rows, cols] "
                          f"(positive integers), got {dims!r}; the config is damaged; re-save the adapter")
    return dims[0], dims[1]


def leftover_check(rest: dict, source: Path, markers: tuple[str, ...]) -> None:
    for key in rest:
        if any(mark in key for mark in markers):
            raise FormatError(f"{source}: unexpected tensor {PREFIX}{key}: it looks like an adapter "
                              f"tensor but fits no known key pattern; remove it, or re-save the adapter with this version")


