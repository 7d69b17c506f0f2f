"""Adapter directories of every supported kind, read into ONE in-memory form: :class:`Adapter`.

Kinds read (detected by ``adapter_config.json`` AND the tensor key names):

- ``loretta-merge``: this project's format (``peft_type`` ``LORETTA_REP`` / ``LORETTA_ADP``,
  ``format_version`` 1, ``adapter_model.safetensors``), the only kind written;
- ``loretta-0.1``: the authors' reference package (``peft_type`` ``LORA`` + TT keys
  ``...lora_A.layer.tensor.factors.<k>``, or ``BOTTLENECK`` with ``tensorized``), usually a
  pickled ``adapter_model.bin``;
- ``peft``: ordinary PEFT LoRA (``...lora_A.weight`` / ``...lora_B.weight``), DoRA magnitudes
  included (the merge refuses them).

Module names are relative to the trained model; on disk every key carries PEFT's
``base_model.model.`` prefix.

What the authors' package saves (read from its source, checked against its layers by
tests/fixtures/make_loretta01.py): TT layers compute ``x @ full(cores).reshape(in, out)``,
so ``lora_A`` is ``(in, r)``, ``lora_B`` ``(r, out)``, ``adapter_down`` ``(dim, b)`` and
``adapter_up`` ``(b, dim)``, with ``dim`` the wrapped linear's in_features for input ("mh")
adapters and out_features for output adapters. Placement is NOT in its config: the package
picks it from the target's last name, which :data:`_AUTHORS_PLACEMENT` mirrors. Scales:
``lora_alpha / r``; adp ``scaling`` (or a saved ``adapter_scaling`` when "learned"). It
saves only ``lora_*`` / ``adapter_*`` keys plus, for SEQ_CLS, keys containing
"classifier"/"score" (the TT-replaced ``classifier.dense`` and ``out_proj``); trained norms
are not saved.

Loading is safe: safetensors, or ``torch.load`` with ``weights_only=True``; config paths are
information only and never opened.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch

from . import tt
from .errors import (ConfigError, FormatError, LorettaError, NumericsError, OutputExistsError,
                     ShapeError, UnsafeInputError)

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
FORMAT_VERSION = 1
_MAX_DIM = 2**31  # larger ranks / bottlenecks are corrupt configs, not models
NON_LINEARITIES = ("relu", "gelu", "silu", "tanh")
_ACT_ALIASES = {"swish": "silu"}
# The authors' package decides input ("mh") vs output placement from the target's last name
# (its TRANSFORMERS_MODELS_TO_ADAPTER_TYPE_MAPPING); the config does not record it.
_AUTHORS_PLACEMENT = {
    "gate_proj": "input", "up_proj": "input", "down_proj": "output", "fc1": "input",
    "fc2": "output", "fc_in": "input", "fc_out": "output", "c_fc": "input", "c_proj": "output",
    "dense_h_to_4h": "input", "dense_4h_to_h": "output", "dense": "output",
}


# --------------------------------------------------------------------------- in-memory form

@dataclass
class TTMatrix:
    """One TT-stored ``(rows, cols)`` matrix ``M`` (the layer computes ``y = x @ M``)."""

    cores: list[torch.Tensor]
    rows: int
    cols: int

    def matrix(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return tt.reconstruct(self.cores, self.rows, self.cols, dtype=dtype)

    def num_params(self) -> int:
        return sum(c.numel() for c in self.cores)


@dataclass
class RepModule:
    """LoRETTA_rep on one Linear/Conv1D: ``delta = scale * A @ B`` with TT factors."""

    a: TTMatrix  # (in, r)
    b: TTMatrix  # (r, out)
    scale: float

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The ``(in, out)`` weight change, computed in fp32 and cast once to ``dtype``."""
        ma = self.a.matrix(torch.float32)
        mb = self.b.matrix(torch.float32)
        return ((ma @ mb) * self.scale).to(dtype)

    def num_params(self) -> int:
        return self.a.num_params() + self.b.num_params()


@dataclass
class LoraModule:
    """Plain PEFT LoRA on one Linear/Conv1D: ``delta = scale * (B @ A).T``."""

    a: torch.Tensor  # lora_A.weight (r, in)
    b: torch.Tensor  # lora_B.weight (out, r)
    scale: float
    magnitude: torch.Tensor | None = None  # DoRA lora_magnitude_vector

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The ``(in, out)`` weight change, computed in fp32 and cast once to ``dtype``."""
        return ((self.b.float() @ self.a.float()).T * self.scale).to(dtype)

    def num_params(self) -> int:
        extra = self.magnitude.numel() if self.magnitude is not None else 0
        return self.a.numel() + self.b.numel() + extra


@dataclass
class AdpModule:
    """LoRETTA_adp bottleneck adapter: ``h + scaling * up(act(down(h)))``."""

    down: TTMatrix  # (dim, bottleneck)
    down_bias: torch.Tensor  # (bottleneck,)
    up: TTMatrix  # (bottleneck, dim)
    up_bias: torch.Tensor  # (dim,)
    placement: str  # "input" | "output"
    non_linearity: str
    scaling: float

    def num_params(self) -> int:
        return self.down.num_params() + self.up.num_params() + self.down_bias.numel() + self.up_bias.numel()


@dataclass
class TTDenseModule:
    """A dense layer replaced by a TT layer: ``nn.Linear`` weight = ``weight.matrix().T``."""

    weight: TTMatrix  # (in, out)
    bias: torch.Tensor | None

    def num_params(self) -> int:
        return self.weight.num_params() + (self.bias.numel() if self.bias is not None else 0)


Module = Union[RepModule, LoraModule, AdpModule, TTDenseModule]


@dataclass
class Adapter:
    """Everything an adapter directory holds, whatever its on-disk kind."""

    method: str  # "rep" | "adp" | "lora"
    source: str  # "loretta-merge" | "loretta-0.1" | "peft"
    modules: dict[str, Module]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    fan_in_fan_out: set[str] = field(default_factory=set)
    base_model_name_or_path: str | None = None
    path: Path | None = None

    def num_params(self) -> int:
        """Trained parameters: adapter modules plus full tensors (norms, heads)."""
        return sum(m.num_params() for m in self.modules.values()) + sum(t.numel() for t in self.tensors.values())


# --------------------------------------------------------------------------- config rules

def _pattern_key(patterns: dict, name: str, field_name: str) -> str | None:
    """PEFT's rule: the first key (in dict order) for which ``(.*\\.)?key$`` matches ``name``."""
    for key in patterns:
        try:
            if re.match(rf"(.*\.)?({key})$", name):
                return key
        except (re.error, TypeError) as exc:
            raise ConfigError(f"{field_name} key {key!r} is not a valid regular expression ({exc}); "
                              f"use a module name or suffix such as 'q_proj'") from None
    return None


def _positive_number(value: Any, what: str) -> float:
    return _number(value, what, positive=True)


def _number(value: Any, what: str, *, positive: bool = False) -> float:
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
    key = _pattern_key(patterns, module_name, "rank_pattern")
    r = patterns[key] if key is not None else config.get("r", 8)
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= _MAX_DIM:
        where = f"rank_pattern[{key!r}]" if key is not None else "r"
        raise ConfigError(f"{where} must be an integer in [1, {_MAX_DIM}], got {str(r)[:40]} "
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
    key = _pattern_key(patterns, module_name, "alpha_pattern")
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


# --------------------------------------------------------------------------- safe file access

def _check_link(path: Path, root: Path, allow_symlinks: bool) -> None:
    if allow_symlinks or not path.is_symlink():
        return
    target = path.resolve()
    if not target.is_relative_to(root.resolve()):
        raise UnsafeInputError(f"{path} is a symlink to {target}, outside the adapter directory {root}; "
                               f"copy the file in, or pass allow_symlinks=True if you trust it")


def _adapter_files(path: Path, allow_symlinks: bool) -> tuple[Path, Path]:
    """The config and weights files of an adapter directory (existence and symlinks checked)."""
    if not path.exists():
        raise FormatError(f"adapter directory {path} does not exist; pass the path of an adapter "
                          f"directory (the one that holds {CONFIG_NAME})")
    if not path.is_dir():
        raise FormatError(f"{path} is not a directory; pass the adapter directory that holds {CONFIG_NAME}")
    config_path = path / CONFIG_NAME
    if not config_path.is_file():
        raise FormatError(f"{path} has no {CONFIG_NAME}; is this an adapter directory? Pass the directory "
                          f"that holds {CONFIG_NAME} and the adapter weights")
    _check_link(config_path, path, allow_symlinks)
    for name in (SAFETENSORS_NAME, BIN_NAME):
        weights = path / name
        if weights.is_file():
            _check_link(weights, path, allow_symlinks)
            return config_path, weights
    raise FormatError(f"{path} has no {SAFETENSORS_NAME} or {BIN_NAME}; the adapter weights are missing; copy the weights file into the directory, or re-save the adapter")


def _read_config(config_path: Path) -> dict:
    try:
        data = config_path.read_bytes()
    except OSError as exc:
        raise FormatError(f"cannot read {config_path}: {exc}; fix its permissions or re-save the adapter") from None
    return parse_config(data, source=str(config_path))


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # SafetensorError (corrupt header, truncated data), OSError
        raise FormatError(f"{path}: not a readable safetensors file ({exc}); "
                          f"the file is truncated or corrupt, re-save or re-download it") from None


def _load_bin(path: Path, *, allow_unsafe_pickle: bool, mmap: bool = False) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        msg = str(exc)
        if "Weights only load failed" in msg and ("GLOBAL" in msg.upper() or "Unsupported" in msg):
            if not allow_unsafe_pickle:
                first = msg.split("\n")[0][:300]
                raise UnsafeInputError(
                    f"{path}: loading needs full unpickling, which can run arbitrary code ({first}); "
                    f"convert it to safetensors in a trusted environment, or pass "
                    f"allow_unsafe_pickle=True only if you trust its author") from None
            state = torch.load(str(path), map_location="cpu", weights_only=False)
        else:
            raise FormatError(f"{path}: not a readable torch checkpoint ({msg.splitlines()[0][:200]}); "
                              f"the file is corrupt or not a state dict; re-download it, or re-save it as safetensors") from None
    except Exception as exc:  # zip errors, EOF on truncation
        raise FormatError(f"{path}: not a readable torch checkpoint ({type(exc).__name__}: "
                          f"{str(exc)[:200]}); the file is truncated or corrupt; re-download or re-save it") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise FormatError(f"{path}: expected a dict of tensor name -> tensor, got {type(state).__name__}; re-save the adapter as safetensors")
    return state


def _load_weights(path: Path, *, allow_unsafe_pickle: bool) -> dict[str, torch.Tensor]:
    if path.name.endswith(".safetensors"):
        return _load_safetensors(path)
    return _load_bin(path, allow_unsafe_pickle=allow_unsafe_pickle)


def _weight_keys(path: Path) -> list[str]:
    """Tensor names without loading the data (safetensors header; memory-mapped .bin)."""
    if path.name.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return list(f.keys())
        except Exception as exc:
            raise FormatError(f"{path}: not a readable safetensors file ({exc}); "
                              f"the file is truncated or corrupt; re-save or re-download it") from None
    try:
        return list(_load_bin(path, allow_unsafe_pickle=False, mmap=True))
    except FormatError:  # mmap needs the zip format; old-style pickles load in full
        return list(_load_bin(path, allow_unsafe_pickle=False))


def _check_finite(state: dict[str, torch.Tensor], source: Path) -> None:
    for key, value in state.items():
        if value.is_floating_point() or value.is_complex():
            finite = torch.isfinite(value)
            if not bool(finite.all()):
                bad = int((~finite).sum())
                raise NumericsError(f"{source}: tensor {key} {tuple(value.shape)} has {bad} NaN/Inf "
                                    f"value(s); the adapter diverged in training or the file is damaged: retrain it, or use "
                                    f"an earlier checkpoint")


# --------------------------------------------------------------------------- kind detection

_AUTHORS_TT = re.compile(r"\.(lora_A|lora_B|adapter_down|adapter_up)\.layer\.tensor\.factors\.\d+$")
_PEFT_LORA = re.compile(r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)(\.weight)?$")


def _kind(config: dict, keys: list[str], source: Path) -> str:
    peft_type = config.get("peft_type")
    if peft_type == "LORETTA_REP":
        return "loretta-merge:rep"
    if peft_type == "LORETTA_ADP":
        return "loretta-merge:adp"
    if peft_type == "BOTTLENECK":
        return "loretta-0.1:adp"
    if peft_type == "LORA":
        if any(_AUTHORS_TT.search(k) for k in keys):
            return "loretta-0.1:rep"
        if any(_PEFT_LORA.search(k) for k in keys):
            return "peft:lora"
        raise FormatError(f"{source}: peft_type LORA but no LoRA tensors (neither PEFT's "
                          f"'...lora_A.weight' nor the authors' '...lora_A.layer.tensor.factors.<k>'); "
                          f"{len(keys)} keys, e.g. {keys[:3]}; re-save the adapter with PEFT's save_pretrained")
    where = source if source.name == CONFIG_NAME else source.parent / CONFIG_NAME
    raise FormatError(f"{where}: unknown peft_type {peft_type!r}; supported: LORETTA_REP, LORETTA_ADP, "
                      f"LORA (PEFT or the authors' loretta 0.1), BOTTLENECK (loretta 0.1 tensorized); pass an adapter of one of these types")


def detect_adapter_kind(path: str | os.PathLike, *, allow_symlinks: bool = False) -> str:
    """``"loretta-merge:rep"``, ``"loretta-merge:adp"``, ``"loretta-0.1:rep"``,
    ``"loretta-0.1:adp"`` or ``"peft:lora"``, from the config and tensor names only (the
    safetensors header, or a memory-mapped ``weights_only`` load of a ``.bin``)."""
    path = Path(path)
    config_path, weights_path = _adapter_files(path, allow_symlinks)
    config = _read_config(config_path)
    if config.get("peft_type") in ("LORETTA_REP", "LORETTA_ADP", "BOTTLENECK"):
        return _kind(config, [], config_path)
    return _kind(config, _weight_keys(weights_path), weights_path)


# --------------------------------------------------------------------------- parsing helpers

def _strip_prefix(state: dict[str, torch.Tensor], source: Path) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if not key.startswith(PREFIX):
            raise FormatError(f"{source}: tensor key {key!r} lacks the '{PREFIX}' prefix every adapter "
                              f"key carries; was this file written by PEFT or loretta? Re-save the "
                              f"adapter with PEFT's save_pretrained (or save_loretta_adapter)")
        out[key[len(PREFIX):]] = value
    return out


def _collect_cores(found: dict[int, torch.Tensor], what: str, source: Path) -> list[torch.Tensor]:
    indices = sorted(found)
    if indices != list(range(len(indices))):
        missing = sorted(set(range(max(indices) + 1)) - set(indices))
        raise FormatError(f"{source}: {what} has cores {indices}, core(s) {missing} missing; "
                          f"the file is incomplete; re-save or re-download the adapter")
    return [found[k] for k in indices]


def _tt(cores: list[torch.Tensor], rows: int, cols: int, what: str) -> TTMatrix:
    for side in (rows, cols):
        if isinstance(side, bool) or not isinstance(side, int) or side < 1:
            raise ShapeError(f"{what}: rows and cols must be positive integers, got ({rows!r}, {cols!r}); re-save or re-download the adapter")
    tt.validate_cores(cores, name=what)
    n = math.prod(tt.tt_modes_of(cores))
    if n != rows * cols:
        raise ShapeError(f"{what}: modes {tt.tt_modes_of(cores)} multiply to {n}, expected "
                         f"{rows} x {cols} = {rows * cols}; the cores do not fit the recorded shape: re-save the adapter or fix module_shapes in adapter_config.json")
    return TTMatrix(cores=cores, rows=rows, cols=cols)


def _split(cores: list[torch.Tensor], *, known: int, known_is_rows: bool, what: str,
           known_name: str) -> TTMatrix:
    """A TTMatrix whose one side is known (r or bottleneck); the other is product / known."""
    tt.validate_cores(cores, name=what)
    n = math.prod(tt.tt_modes_of(cores))
    if n % known:
        raise ShapeError(f"{what}: modes {tt.tt_modes_of(cores)} multiply to {n}, not a multiple of "
                         f"{known_name} = {known}; the config's {known_name} does not match the cores; fix module_shapes in adapter_config.json or re-save the adapter")
    other = n // known
    return TTMatrix(cores, known, other) if known_is_rows else TTMatrix(cores, other, known)


def _group(state: dict[str, torch.Tensor], pattern: re.Pattern) -> tuple[dict, dict]:
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


def _pop_bias(rest: dict, key: str, source: Path, *, required: bool = True) -> torch.Tensor | None:
    if key in rest:
        return rest.pop(key)
    if required:
        raise FormatError(f"{source}: tensor {PREFIX}{key} is missing; the adapter is incomplete; re-save or re-download the adapter")
    return None


def _check_bias(bias: torch.Tensor, size: int, key: str) -> None:
    if not isinstance(bias, torch.Tensor):
        raise ShapeError(f"tensor {PREFIX}{key} is a {type(bias).__name__}, expected a ({size},) tensor; re-save or re-download the adapter")
    if tuple(bias.shape) != (size,):
        raise ShapeError(f"tensor {PREFIX}{key} has shape {tuple(bias.shape)}, expected ({size},); re-save or re-download the adapter")


def _pairs(groups: dict, first: str, second: str, source: Path, suffix: str) -> None:
    for name, parts in groups.items():
        for p, q in ((first, second), (second, first)):
            if p in parts and q not in parts:
                raise FormatError(f"{source}: module {name} has {p} tensors but no {q} "
                                  f"('{PREFIX}{name}.{q}.{suffix}...'); the adapter is incomplete; re-save or re-download the adapter")


def _non_linearity(value: Any, where: str) -> str:
    act = _ACT_ALIASES.get(value, value) if isinstance(value, str) else value
    if act not in NON_LINEARITIES:
        raise ConfigError(f"{where}: non_linearity {value!r} is not supported; use one of {NON_LINEARITIES}")
    return act


def _module_map(config: dict, key: str) -> dict:
    value = config.get(key) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"{CONFIG_NAME}: '{key}' must be a mapping of module name -> value, got {value!r}; fix it in adapter_config.json")
    return value


def _shape_pair(shapes: dict, name: str, part: str) -> tuple[int, int]:
    entry = shapes.get(name)
    dims = entry.get(part) if isinstance(entry, dict) else None
    if (not isinstance(dims, list) or len(dims) != 2
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in dims)):
        raise ConfigError(f"{CONFIG_NAME}: module_shapes[{name!r}][{part!r}] must be [rows, cols] "
                          f"(positive integers), got {dims!r}; the config is damaged; re-save the adapter")
    return dims[0], dims[1]


def _leftover_check(rest: dict, source: Path, markers: tuple[str, ...]) -> None:
    for key in rest:
        if any(mark in key for mark in markers):
            raise FormatError(f"{source}: unexpected tensor {PREFIX}{key}: it looks like an adapter "
                              f"tensor but fits no known key pattern; remove it, or re-save the adapter with this version")


# --------------------------------------------------------------------------- readers per kind

_OURS_CORES = re.compile(r"^(?P<m>.+)\.(?P<part>lora_A|lora_B|adapter_down|adapter_up|tt_dense)"
                         r"\.tt_cores\.(?P<k>0|[1-9]\d*)$")
_AUTHORS_CORES = re.compile(r"^(?P<m>.+?)(?:\.(?P<part>lora_A|lora_B|adapter_down|adapter_up))?"
                            r"\.layer\.tensor\.factors\.(?P<k>0|[1-9]\d*)$")


def _read_ours(config: dict, state: dict, source: Path) -> tuple[str, dict, dict]:
    version = config.get("format_version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise FormatError(f"{source}: format_version {version!r}; this loretta-merge reads version "
                          f"{FORMAT_VERSION}; upgrade loretta-merge")
    method = "rep" if config["peft_type"] == "LORETTA_REP" else "adp"
    shapes = _module_map(config, "module_shapes")
    scales = _module_map(config, "module_scales")
    groups, rest = _group(state, _OURS_CORES)
    modules: dict[str, Module] = {}
    if method == "rep":
        _pairs(groups, "lora_A", "lora_B", source, "tt_cores")
    else:
        _pairs(groups, "adapter_down", "adapter_up", source, "tt_cores")
        placement = _module_map(config, "adapter_placement")
        acts = _module_map(config, "adapter_non_linearity")
    for name, parts in groups.items():
        if "tt_dense" in parts:
            rows, cols = _shape_pair(shapes, name, "weight")
            w = _tt(_collect_cores(parts.pop("tt_dense"), f"{name}.tt_dense", source), rows, cols,
                    f"{name}.tt_dense")
            bias = _pop_bias(rest, f"{name}.tt_dense.bias", source, required=False)
            if bias is not None:
                _check_bias(bias, cols, f"{name}.tt_dense.bias")
            modules[name] = TTDenseModule(weight=w, bias=bias)
            if parts:
                raise FormatError(f"{source}: module {name} has both tt_dense and {sorted(parts)} tensors; re-save or re-download the adapter")
            continue
        if method == "rep":
            if set(parts) - {"lora_A", "lora_B"}:
                raise FormatError(f"{source}: module {name} has {sorted(parts)} tensors in a LORETTA_REP adapter; re-save or re-download the adapter")
            a = _tt(_collect_cores(parts["lora_A"], f"{name}.lora_A", source),
                    *_shape_pair(shapes, name, "a"), f"{name}.lora_A")
            b = _tt(_collect_cores(parts["lora_B"], f"{name}.lora_B", source),
                    *_shape_pair(shapes, name, "b"), f"{name}.lora_B")
            if a.cols != b.rows:
                raise ShapeError(f"{source}: module {name}: A is ({a.rows}, {a.cols}) but B is "
                                 f"({b.rows}, {b.cols}); A's columns must equal B's rows (r); re-save or re-download the adapter")
            scale = scales.get(name)
            scale = scale_for(config, name) if scale is None else _number(scale, f"module_scales[{name!r}]")
            modules[name] = RepModule(a=a, b=b, scale=scale)
        else:
            if set(parts) - {"adapter_down", "adapter_up"}:
                raise FormatError(f"{source}: module {name} has {sorted(parts)} tensors in a LORETTA_ADP adapter; re-save or re-download the adapter")
            down = _tt(_collect_cores(parts["adapter_down"], f"{name}.adapter_down", source),
                       *_shape_pair(shapes, name, "down"), f"{name}.adapter_down")
            up = _tt(_collect_cores(parts["adapter_up"], f"{name}.adapter_up", source),
                     *_shape_pair(shapes, name, "up"), f"{name}.adapter_up")
            if (down.rows, down.cols) != (up.cols, up.rows):
                raise ShapeError(f"{source}: module {name}: down is ({down.rows}, {down.cols}) but up is "
                                 f"({up.rows}, {up.cols}); they must be (dim, b) and (b, dim); re-save or re-download the adapter")
            db = _pop_bias(rest, f"{name}.adapter_down.bias", source)
            ub = _pop_bias(rest, f"{name}.adapter_up.bias", source)
            _check_bias(db, down.cols, f"{name}.adapter_down.bias")
            _check_bias(ub, up.cols, f"{name}.adapter_up.bias")
            where = placement.get(name)
            if where not in ("input", "output"):
                raise ConfigError(f"{source}: adapter_placement[{name!r}] is {where!r}; "
                                  f"expected 'input' or 'output'; set it to 'input' or 'output' in adapter_config.json")
            act = _non_linearity(acts.get(name, config.get("non_linearity", "relu")), f"module {name}")
            scaling = scales.get(name, config.get("scaling", 1.0))
            modules[name] = AdpModule(down=down, down_bias=db, up=up, up_bias=ub, placement=where,
                                      non_linearity=act, scaling=_number(scaling, f"scaling of module {name}"))
    _leftover_check(rest, source, (".tt_cores.", ".lora_A", ".lora_B", ".adapter_down.", ".adapter_up."))
    return method, modules, rest


def _int_field(config: dict, key: str, source: Path) -> int:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _MAX_DIM:
        raise ConfigError(f"{source}: '{key}' must be an integer in [1, {_MAX_DIM}], got {str(value)[:40]}; fix it in adapter_config.json")
    return value


def _read_authors(config: dict, state: dict, source: Path, method: str) -> tuple[str, dict, dict]:
    groups, rest = _group(state, _AUTHORS_CORES)
    modules: dict[str, Module] = {}
    if method == "rep":
        r = _int_field(config, "r", source)
        scale = scale_for({"r": r, "lora_alpha": config.get("lora_alpha")}, "")
        _pairs({n: p for n, p in groups.items() if None not in p}, "lora_A", "lora_B", source,
               "layer.tensor.factors")
    else:
        if config.get("tensorized") is not True:
            raise FormatError(f"{source}: BOTTLENECK adapter with tensorized={config.get('tensorized')!r}; "
                              f"only the tensorized (LoRETTA_adp) kind is supported; pass a LoRETTA_adp (tensorized) adapter")
        if config.get("use_parallel_adapter") or config.get("use_adapterp"):
            raise FormatError(f"{source}: parallel adapters are not supported (use_parallel_adapter / "
                              f"use_adapterp is set); only sequential LoRETTA_adp adapters are; retrain with sequential adapters")
        b = _int_field(config, "bottleneck_size", source)
        act = _non_linearity(config.get("non_linearity"), str(source))
        _pairs({n: p for n, p in groups.items() if None not in p}, "adapter_down", "adapter_up", source,
               "layer.tensor.factors")
    for name, parts in groups.items():
        if None in parts:  # a dense layer replaced by a TT layer (pooler / classifier dense)
            cores = _collect_cores(parts.pop(None), f"{name}.layer", source)
            tt.validate_cores(cores, name=f"{name}.layer.tensor")
            n = math.prod(tt.tt_modes_of(cores))
            side = math.isqrt(n)
            if side * side != n:
                raise ShapeError(f"{source}: replaced dense layer {name}: modes {tt.tt_modes_of(cores)} "
                                 f"multiply to {n}, not a square; expected a (hidden, hidden) layer; re-save or re-download the adapter")
            bias = _pop_bias(rest, f"{name}.layer.bias", source, required=False)
            if bias is not None:
                _check_bias(bias, side, f"{name}.layer.bias")
            modules[name] = TTDenseModule(weight=TTMatrix(cores, side, side), bias=bias)
            if parts:
                raise FormatError(f"{source}: module {name} has both a replaced dense layer and "
                                  f"{sorted(parts)} tensors; re-save or re-download the adapter")
            continue
        if method == "rep":
            if set(parts) - {"lora_A", "lora_B"}:
                raise FormatError(f"{source}: module {name} has {sorted(parts)} tensors in a rep adapter; re-save or re-download the adapter")
            a = _split(_collect_cores(parts["lora_A"], f"{name}.lora_A", source), known=r,
                       known_is_rows=False, what=f"{name}.lora_A", known_name="r")
            bm = _split(_collect_cores(parts["lora_B"], f"{name}.lora_B", source), known=r,
                        known_is_rows=True, what=f"{name}.lora_B", known_name="r")
            modules[name] = RepModule(a=a, b=bm, scale=scale)
        else:
            if set(parts) - {"adapter_down", "adapter_up"}:
                raise FormatError(f"{source}: module {name} has {sorted(parts)} tensors in an adp adapter; re-save or re-download the adapter")
            down = _split(_collect_cores(parts["adapter_down"], f"{name}.adapter_down", source), known=b,
                          known_is_rows=False, what=f"{name}.adapter_down", known_name="bottleneck_size")
            up = _split(_collect_cores(parts["adapter_up"], f"{name}.adapter_up", source), known=b,
                        known_is_rows=True, what=f"{name}.adapter_up", known_name="bottleneck_size")
            if down.rows != up.cols:
                raise ShapeError(f"{source}: module {name}: down is ({down.rows}, {down.cols}), up is "
                                 f"({up.rows}, {up.cols}); both must use the same width; re-save or re-download the adapter")
            db = _pop_bias(rest, f"{name}.adapter_down.layer.bias", source)
            ub = _pop_bias(rest, f"{name}.adapter_up.layer.bias", source)
            _check_bias(db, b, f"{name}.adapter_down.layer.bias")
            _check_bias(ub, down.rows, f"{name}.adapter_up.layer.bias")
            leaf = name.rsplit(".", 1)[-1]
            if leaf not in _AUTHORS_PLACEMENT:
                raise FormatError(f"{source}: cannot tell whether the adapter on {name} is an input or an "
                                  f"output adapter: the loretta 0.1 package decides by the module's last "
                                  f"name, and {leaf!r} is not one it knows ({sorted(_AUTHORS_PLACEMENT)}); set adapter_placement for it in adapter_config.json")
            scaling = config.get("scaling", 1.0)
            if scaling == "learned":
                learned = _pop_bias(rest, f"{name}.adapter_scaling", source)
                if learned.numel() != 1:
                    raise ShapeError(f"{source}: {PREFIX}{name}.adapter_scaling has shape "
                                     f"{tuple(learned.shape)}, expected one value; re-save or re-download the adapter")
                scaling = float(learned.reshape(()))
            modules[name] = AdpModule(down=down, down_bias=db, up=up, up_bias=ub,
                                      placement=_AUTHORS_PLACEMENT[leaf], non_linearity=act,
                                      scaling=_number(scaling, f"{source}: scaling"))
    _leftover_check(rest, source, (".lora_A", ".lora_B", ".adapter_down.", ".adapter_up.", ".tensor.factors."))
    return method, modules, rest


_PEFT_KEY = re.compile(r"^(?P<m>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_magnitude_vector"
                       r"(?:\.weight)?|lora_embedding_A|lora_embedding_B|lora_B\.bias)$")


def _read_peft(config: dict, state: dict, source: Path) -> tuple[str, dict, dict]:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    rest = {}
    for key, value in state.items():
        m = _PEFT_KEY.match(key)
        if m:
            groups.setdefault(m["m"], {})[m["part"].split(".")[0] if "magnitude" in m["part"] else m["part"]] = value
        else:
            rest[key] = value
    modules: dict[str, Module] = {}
    for name, parts in groups.items():
        if "lora_embedding_A" in parts or "lora_embedding_B" in parts:
            raise FormatError(f"{source}: module {name} is an embedding LoRA (lora_embedding_A/B): "
                              f"embedding LoRA not supported; merge it with PEFT's merge_and_unload")
        if "lora_B.bias" in parts:
            raise FormatError(f"{source}: module {name} has a LoRA bias (lora_B.bias, PEFT lora_bias=True), "
                              f"which is not supported; merge it with PEFT's merge_and_unload")
        for p, q in (("lora_A.weight", "lora_B.weight"), ("lora_B.weight", "lora_A.weight")):
            if q not in parts:
                have = p if p in parts else "lora_magnitude_vector"
                raise FormatError(f"{source}: module {name} has {have} but no {q} "
                                  f"('{PREFIX}{name}.{q}'); the adapter is incomplete; re-save or re-download the adapter")
        a, b = parts["lora_A.weight"], parts["lora_B.weight"]
        if a.ndim != 2 or b.ndim != 2:
            raise FormatError(f"{source}: module {name}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} are "
                              f"not matrices (convolution LoRA?); only Linear/Conv1D LoRA is supported; merge it with PEFT's merge_and_unload instead")
        r = rank_for(config, name)
        if a.shape[0] != r or b.shape[1] != r:
            raise ShapeError(f"{source}: module {name}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} "
                             f"do not have rank r = {r} from the config (r / rank_pattern); fix r or rank_pattern in "
                             f"{CONFIG_NAME} to match the tensors")
        mag = parts.get("lora_magnitude_vector")
        if mag is not None and mag.numel() != b.shape[0]:
            raise ShapeError(f"{source}: module {name}: lora_magnitude_vector has {mag.numel()} values, "
                             f"expected out_features = {b.shape[0]}; re-save or re-download the adapter")
        modules[name] = LoraModule(a=a, b=b, scale=scale_for(config, name), magnitude=mag)
    _leftover_check(rest, source, (".lora_", "trainable_tokens"))
    # modules_to_save: PEFT 0.21 saves them as <module>.<param>; older PEFT kept the wrapper infix
    rest = {k.replace(".modules_to_save.", "."): v for k, v in rest.items()}
    return "lora", modules, rest


# --------------------------------------------------------------------------- public API

def read_adapter(path: str | os.PathLike, *, allow_unsafe_pickle: bool = False,
                 allow_symlinks: bool = False) -> Adapter:
    """Read an adapter directory of any supported kind into an :class:`Adapter`.

    ``allow_unsafe_pickle`` lets a pickled ``adapter_model.bin`` that ``weights_only``
    loading refuses be fully unpickled (runs code from the file: trusted files only).
    ``allow_symlinks`` accepts config/weights symlinks pointing outside the directory.
    """
    path = Path(path)
    config_path, weights_path = _adapter_files(path, allow_symlinks)
    config = _read_config(config_path)
    state = _load_weights(weights_path, allow_unsafe_pickle=allow_unsafe_pickle)
    if not state:
        raise FormatError(f"{weights_path}: holds no tensors; re-save or re-download the adapter")
    kind = _kind(config, list(state), weights_path)
    _check_finite(state, weights_path)
    state = _strip_prefix(state, weights_path)
    source, _ = kind.split(":")
    if source == "loretta-merge":
        method, modules, rest = _read_ours(config, state, weights_path)
        fifo = config.get("fan_in_fan_out_modules") or []
        if not isinstance(fifo, list) or not all(isinstance(x, str) for x in fifo):
            raise ConfigError(f"{config_path}: fan_in_fan_out_modules must be a list of module names; fix it in adapter_config.json")
        fan_in_fan_out = set(fifo)
    elif source == "loretta-0.1":
        method, modules, rest = _read_authors(config, state, weights_path, kind.split(":")[1])
        fan_in_fan_out = {n for n, m in modules.items() if isinstance(m, RepModule)} \
            if config.get("fan_in_fan_out") else set()
    else:
        method, modules, rest = _read_peft(config, state, weights_path)
        fan_in_fan_out = set(modules) if config.get("fan_in_fan_out") else set()
    if not modules:
        raise FormatError(f"{weights_path}: no adapter modules found ({len(rest)} plain tensors only); pass an adapter directory (LoRA or LoRETTA), not a model")
    base = config.get("base_model_name_or_path")
    return Adapter(method=method, source=source, modules=modules, tensors=rest, config=config,
                   fan_in_fan_out=fan_in_fan_out,
                   base_model_name_or_path=base if isinstance(base, str) and base else None, path=path)


def _tt_entries(key: str, m: TTMatrix, out: dict) -> list[int]:
    if not isinstance(m, TTMatrix):
        raise ConfigError(f"{key}: expected a TTMatrix, got {type(m).__name__}; pass TTMatrix modules")
    _tt(list(m.cores), m.rows, m.cols, key)  # never write what the reader would refuse
    for k, core in enumerate(m.cores):
        out[f"{PREFIX}{key}.tt_cores.{k}"] = core
    return [m.rows, m.cols]


def _state_and_config(adapter: Adapter) -> tuple[dict[str, torch.Tensor], dict]:
    if adapter.method not in ("rep", "adp"):
        raise ConfigError(f"write_adapter writes LoRETTA adapters (method 'rep' or 'adp'), got method "
                          f"{adapter.method!r}; convert a LoRA adapter to TT first (lora_to_tt)")
    state: dict[str, torch.Tensor] = {}
    shapes: dict[str, dict] = {}
    scales: dict[str, float] = {}
    placement: dict[str, str] = {}
    acts: dict[str, str] = {}
    dense: list[str] = []
    for name, mod in sorted(adapter.modules.items()):
        if isinstance(mod, TTDenseModule):
            shapes[name] = {"weight": _tt_entries(f"{name}.tt_dense", mod.weight, state)}
            if mod.bias is not None:
                _check_bias(mod.bias, mod.weight.cols, f"{name}.tt_dense.bias")
                state[f"{PREFIX}{name}.tt_dense.bias"] = mod.bias
            dense.append(name)
        elif isinstance(mod, RepModule) and adapter.method == "rep":
            shapes[name] = {"a": _tt_entries(f"{name}.lora_A", mod.a, state),
                            "b": _tt_entries(f"{name}.lora_B", mod.b, state)}
            if mod.a.cols != mod.b.rows:
                raise ShapeError(f"module {name}: A is ({mod.a.rows}, {mod.a.cols}), B is ({mod.b.rows}, "
                                 f"{mod.b.cols}); A's columns must equal B's rows (r); pass A and B with a shared r")
            scales[name] = _number(float(mod.scale), f"scale of module {name}")
        elif isinstance(mod, AdpModule) and adapter.method == "adp":
            shapes[name] = {"down": _tt_entries(f"{name}.adapter_down", mod.down, state),
                            "up": _tt_entries(f"{name}.adapter_up", mod.up, state)}
            if (mod.down.rows, mod.down.cols) != (mod.up.cols, mod.up.rows):
                raise ShapeError(f"module {name}: down is ({mod.down.rows}, {mod.down.cols}), up is "
                                 f"({mod.up.rows}, {mod.up.cols}); they must be (dim, b) and (b, dim); pass down (dim, b) and up (b, dim)")
            _check_bias(mod.down_bias, mod.down.cols, f"{name}.adapter_down.bias")
            _check_bias(mod.up_bias, mod.up.cols, f"{name}.adapter_up.bias")
            if mod.placement not in ("input", "output"):
                raise ConfigError(f"module {name}: placement {mod.placement!r}; expected 'input' or 'output'; set it to 'input' or 'output'")
            state[f"{PREFIX}{name}.adapter_down.bias"] = mod.down_bias
            state[f"{PREFIX}{name}.adapter_up.bias"] = mod.up_bias
            scales[name] = _number(float(mod.scaling), f"scaling of module {name}")
            placement[name] = mod.placement
            acts[name] = _non_linearity(mod.non_linearity, f"module {name}")
        else:
            raise ConfigError(f"module {name} is a {type(mod).__name__}, which a {adapter.method!r} "
                              f"adapter cannot hold; pass modules of that adapter's kind only")
    for name, value in adapter.tensors.items():
        key = PREFIX + name
        if key in state:
            raise ConfigError(f"full tensor {name} collides with an adapter tensor key {key}; rename the full tensor")
        state[key] = value
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ConfigError(f"{key} is a {type(value).__name__}, not a tensor; pass tensors only")
    config = {k: v for k, v in adapter.config.items()
              if k not in ("module_shapes", "module_scales", "adapter_placement", "adapter_non_linearity")}
    config.update({
        "peft_type": "LORETTA_REP" if adapter.method == "rep" else "LORETTA_ADP",
        "format_version": FORMAT_VERSION,
        "base_model_name_or_path": adapter.base_model_name_or_path,
        "fan_in_fan_out_modules": sorted(adapter.fan_in_fan_out),
        "tt_dense_modules": dense,
        "module_shapes": shapes,
        "module_scales": scales,
    })
    if adapter.method == "adp":
        config["adapter_placement"] = placement
        config["adapter_non_linearity"] = acts
    return state, config


def write_adapter(adapter: Adapter, path: str | os.PathLike, *, force: bool = False) -> Path:
    """Write ``adapter`` in this project's format (``format_version`` 1) to directory ``path``.

    The files are written into a temporary directory beside ``path`` and renamed into place
    when complete. An existing ``path`` is refused unless ``force``; with ``force`` it is
    replaced only after the new directory is complete. Returns ``path``.
    """
    path = Path(path)
    if path.exists() and not force:
        raise OutputExistsError(f"{path} already exists; choose another output path or pass force=True")
    state, config = _state_and_config(adapter)
    _check_finite(state, path)
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    try:
        config_text = json.dumps(config, indent=2, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"adapter config cannot be written as JSON ({exc}); keep config values to "
                          f"numbers, strings, lists and mappings") from None
    from .io import atomic_output_dir

    with atomic_output_dir(path, force=force) as tmp:
        try:
            save_safetensors(state, tmp / SAFETENSORS_NAME)
            _write_bytes(tmp / CONFIG_NAME, (config_text + "\n").encode())
        except OSError as exc:
            raise disk_full_error(exc, path) from None
    return path


def _write_bytes(path: Path, data: bytes) -> None:
    """Every adapter file is written here, with a plain open(): its mode follows the umask
    (safetensors' own save_file creates files 0600 whatever the umask). Tests simulate a
    full disk by replacing this function."""
    with open(path, "wb") as f:
        f.write(data)


def save_safetensors(state: dict[str, torch.Tensor], path: Path) -> None:
    """Write ``state`` as one safetensors file at ``path`` (mode by the umask)."""
    from safetensors.torch import save

    _write_bytes(Path(path), save(state, metadata={"format": "pt"}))


def disk_full_error(exc: OSError, out: Path) -> OSError:
    """A full disk (ENOSPC/EDQUOT) while writing ``out``, said plainly; other errors as they are."""
    import errno

    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return OSError(exc.errno, f"no space left on the device holding {out}; free space or choose "
                                  f"an output on another disk; nothing was written to the output")
    return exc


__all__ = ["TTMatrix", "RepModule", "LoraModule", "AdpModule", "TTDenseModule", "Adapter",
           "read_adapter", "write_adapter", "detect_adapter_kind", "scale_for", "rank_for",
           "parse_config", "LorettaError"]
