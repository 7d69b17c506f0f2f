"""The authors' ``loretta`` 0.1 package's adapters (read only).

What it saves (read from its source, checked against its layers by
tests/fixtures/make_loretta01.py): ``peft_type`` ``LORA`` with TT keys
``...lora_A.layer.tensor.factors.<k>``, or ``BOTTLENECK`` with ``tensorized``; usually a
pickled ``adapter_model.bin``. TT layers compute ``x @ full(cores).reshape(in, out)``, so
``lora_A`` is ``(in, r)``, ``lora_B`` ``(r, out)``, ``adapter_down`` ``(dim, b)`` and
``adapter_up`` ``(b, dim)``, with ``dim`` the wrapped linear's in_features for input ("mh")
adapters and out_features for output adapters. Placement is NOT in its config: the package
picks it from the target's last name, which :data:`_AUTHORS_PLACEMENT` mirrors. Scales:
``lora_alpha / r``; adp ``scaling`` (or a saved ``adapter_scaling`` when "learned"). It
saves only ``lora_*`` / ``adapter_*`` keys plus, for SEQ_CLS, keys containing
"classifier"/"score" (the TT-replaced ``classifier.dense`` and ``out_proj``); trained norms
are not saved.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from .. import tt
from ..errors import ConfigError, FormatError, ShapeError
from .common import (PREFIX, MAX_DIM, check_bias, collect_cores, group_modules, leftover_check,
                     check_non_linearity, to_number, check_pairs, pop_bias, split_cores, scale_for)
from .types import AdpModule, Module, RepModule, TTDenseModule, TTMatrix

# The authors' package decides input ("mh") vs output placement from the target's last name
# (its TRANSFORMERS_MODELS_TO_ADAPTER_TYPE_MAPPING); the config does not record it.
_AUTHORS_PLACEMENT = {
    "gate_proj": "input", "up_proj": "input", "down_proj": "output", "fc1": "input",
    "fc2": "output", "fc_in": "input", "fc_out": "output", "c_fc": "input", "c_proj": "output",
    "dense_h_to_4h": "input", "dense_4h_to_h": "output", "dense": "output",
}
_AUTHORS_CORES = re.compile(r"^(?P<m>.+?)(?:\.(?P<part>lora_A|lora_B|adapter_down|adapter_up))?"
                            r"\.layer\.tensor\.factors\.(?P<k>0|[1-9]\d*)$")


def _int_field(config: dict, key: str, source: Path) -> int:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_DIM:
        raise ConfigError(f"{source}: '{key}' must be an integer in [1, {MAX_DIM}], got {str(value)[:40]}; fix it in adapter_config.json")
    return value


def _read_dense(name: str, parts: dict, rest: dict, source: Path) -> TTDenseModule:
    """A dense layer replaced by a square TT layer (pooler / classifier dense)."""
    cores = collect_cores(parts.pop(None), f"{name}.layer", source)
    tt.validate_cores(cores, name=f"{name}.layer.tensor")
    n = math.prod(tt.tt_modes_of(cores))
    side = math.isqrt(n)
    if side * side != n:
        raise ShapeError(f"{source}: replaced dense layer {name}: modes {tt.tt_modes_of(cores)} "
                         f"multiply to {n}, not a square; expected a (hidden, hidden) layer; re-save or re-download the adapter")
    bias = pop_bias(rest, f"{name}.layer.bias", source, required=False)
    if bias is not None:
        check_bias(bias, side, f"{name}.layer.bias")
    if parts:
        raise FormatError(f"{source}: module {name} has both a replaced dense layer and "
                          f"{sorted(parts)} tensors; re-save or re-download the adapter")
    return TTDenseModule(weight=TTMatrix(cores, side, side), bias=bias)


def _read_rep(name: str, parts: dict, r: int, scale: float, source: Path) -> RepModule:
    if set(parts) - {"lora_A", "lora_B"}:
        raise FormatError(f"{source}: module {name} has {sorted(parts)} tensors in a rep adapter; re-save or re-download the adapter")
    a, b = _tt_pair(name, parts, ("lora_A", "lora_B"), r, "r", source)
    return RepModule(a=a, b=b, scale=scale)


def _tt_pair(name: str, parts: dict, pair: tuple[str, str], known: int, known_name: str,
             source: Path):
    """The two TT matrices of a factor pair: the first is (width, known), the second
    (known, width); ``known`` is the rank or bottleneck the config gives."""
    first, second = pair
    return (split_cores(collect_cores(parts[first], f"{name}.{first}", source), known=known,
                   known_is_rows=False, what=f"{name}.{first}", known_name=known_name),
            split_cores(collect_cores(parts[second], f"{name}.{second}", source), known=known,
                   known_is_rows=True, what=f"{name}.{second}", known_name=known_name))


def _scaling(config: dict, name: str, rest: dict, source: Path) -> float:
    scaling = config.get("scaling", 1.0)
    if scaling == "learned":
        learned = pop_bias(rest, f"{name}.adapter_scaling", source)
        if learned.numel() != 1:
            raise ShapeError(f"{source}: {PREFIX}{name}.adapter_scaling has shape "
                             f"{tuple(learned.shape)}, expected one value; re-save or re-download the adapter")
        scaling = float(learned.reshape(()))
    return to_number(scaling, f"{source}: scaling")


def _read_adp(name: str, parts: dict, rest: dict, config: dict, source: Path) -> AdpModule:
    b, act = config["bottleneck_size"], check_non_linearity(config.get("non_linearity"), str(source))
    if set(parts) - {"adapter_down", "adapter_up"}:
        raise FormatError(f"{source}: module {name} has {sorted(parts)} tensors in an adp adapter; re-save or re-download the adapter")
    down, up = _tt_pair(name, parts, ("adapter_down", "adapter_up"), b, "bottleneck_size", source)
    if down.rows != up.cols:
        raise ShapeError(f"{source}: module {name}: down is ({down.rows}, {down.cols}), up is "
                         f"({up.rows}, {up.cols}); both must use the same width; re-save or re-download the adapter")
    db = pop_bias(rest, f"{name}.adapter_down.layer.bias", source)
    ub = pop_bias(rest, f"{name}.adapter_up.layer.bias", source)
    check_bias(db, b, f"{name}.adapter_down.layer.bias")
    check_bias(ub, down.rows, f"{name}.adapter_up.layer.bias")
    leaf = name.rsplit(".", 1)[-1]
    if leaf not in _AUTHORS_PLACEMENT:
        raise FormatError(f"{source}: cannot tell whether the adapter on {name} is an input or an "
                          f"output adapter: the loretta 0.1 package decides by the module's last "
                          f"name, and {leaf!r} is not one it knows ({sorted(_AUTHORS_PLACEMENT)}); set adapter_placement for it in adapter_config.json")
    return AdpModule(down=down, down_bias=db, up=up, up_bias=ub, placement=_AUTHORS_PLACEMENT[leaf],
                     non_linearity=act, scaling=_scaling(config, name, rest, source))


def _check_adp_config(config: dict, source: Path) -> None:
    if config.get("tensorized") is not True:
        raise FormatError(f"{source}: BOTTLENECK adapter with tensorized={config.get('tensorized')!r}; "
                          f"only the tensorized (LoRETTA_adp) kind is supported; pass a LoRETTA_adp (tensorized) adapter")
    if config.get("use_parallel_adapter") or config.get("use_adapterp"):
        raise FormatError(f"{source}: parallel adapters are not supported (use_parallel_adapter / "
                          f"use_adapterp is set); only sequential LoRETTA_adp adapters are; retrain with sequential adapters")
    _int_field(config, "bottleneck_size", source)
    check_non_linearity(config.get("non_linearity"), str(source))


def read_authors(config: dict, state: dict, source: Path, method: str) -> tuple[str, dict, dict]:
    """``(method, modules, full tensors)`` of a loretta 0.1 adapter (``method`` from detection)."""
    groups, rest = group_modules(state, _AUTHORS_CORES)
    paired = {n: p for n, p in groups.items() if None not in p}
    if method == "rep":
        r = _int_field(config, "r", source)
        scale = scale_for({"r": r, "lora_alpha": config.get("lora_alpha")}, "")
        check_pairs(paired, "lora_A", "lora_B", source, "layer.tensor.factors")
    else:
        _check_adp_config(config, source)
        check_pairs(paired, "adapter_down", "adapter_up", source, "layer.tensor.factors")
    modules: dict[str, Module] = {}
    for name, parts in groups.items():
        if None in parts:
            modules[name] = _read_dense(name, parts, rest, source)
        elif method == "rep":
            modules[name] = _read_rep(name, parts, r, scale, source)
        else:
            modules[name] = _read_adp(name, parts, rest, config, source)
    leftover_check(rest, source, (".lora_A", ".lora_B", ".adapter_down.", ".adapter_up.", ".tensor.factors."))
    return method, modules, rest
