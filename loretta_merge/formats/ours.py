"""This project's adapter format (``format_version`` 1): reader and writer.

``adapter_config.json``: ``peft_type`` ``LORETTA_REP``/``LORETTA_ADP``, ``format_version``,
every config field, plus ``module_shapes`` ({module: {part: [rows, cols]}}, so a reader never
guesses a row/column split), ``module_scales``, ``tt_dense_modules``,
``fan_in_fan_out_modules`` and, for adp, ``adapter_placement`` and ``adapter_non_linearity``.
``adapter_model.safetensors`` keys (``P`` = ``base_model.model.<module>``):
``P.lora_A.tt_cores.<k>``, ``P.lora_B.tt_cores.<k>`` (rep); ``P.adapter_down.tt_cores.<k>``,
``P.adapter_down.bias``, ``P.adapter_up...`` (adp); ``P.tt_dense.tt_cores.<k>``,
``P.tt_dense.bias`` (a dense layer replaced by a TT layer); full tensors as
``base_model.model.<parameter name>``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from ..errors import ConfigError, FormatError, OutputExistsError, ShapeError
from ..io import atomic_output_dir, write_file, write_safetensors
from .common import (CONFIG_NAME, FORMAT_VERSION, PREFIX, SAFETENSORS_NAME, check_bias, check_finite,
                     collect_cores, group_modules, leftover_check, module_map, check_non_linearity, to_number,
                     check_pairs, pop_bias, shape_pair, tt_from_cores, scale_for)
from .types import Adapter, AdpModule, Module, RepModule, TTDenseModule, TTMatrix

_OURS_CORES = re.compile(r"^(?P<m>.+)\.(?P<part>lora_A|lora_B|adapter_down|adapter_up|tt_dense)"
                         r"\.tt_cores\.(?P<k>0|[1-9]\d*)$")


# --------------------------------------------------------------------------- reading

def _read_dense(name: str, parts: dict, rest: dict, shapes: dict, source: Path) -> TTDenseModule:
    rows, cols = shape_pair(shapes, name, "weight")
    w = tt_from_cores(collect_cores(parts.pop("tt_dense"), f"{name}.tt_dense", source), rows, cols,
            f"{name}.tt_dense")
    bias = pop_bias(rest, f"{name}.tt_dense.bias", source, required=False)
    if bias is not None:
        check_bias(bias, cols, f"{name}.tt_dense.bias")
    if parts:
        raise FormatError(f"{source}: module {name} has both tt_dense and {sorted(parts)} tensors; re-save or re-download the adapter")
    return TTDenseModule(weight=w, bias=bias)


def _read_rep(name: str, parts: dict, config: dict, source: Path) -> RepModule:
    shapes, scales = module_map(config, "module_shapes"), module_map(config, "module_scales")
    if set(parts) - {"lora_A", "lora_B"}:
        raise FormatError(f"{source}: module {name} has {sorted(parts)} tensors in a LORETTA_REP adapter; re-save or re-download the adapter")
    a = tt_from_cores(collect_cores(parts["lora_A"], f"{name}.lora_A", source),
            *shape_pair(shapes, name, "a"), f"{name}.lora_A")
    b = tt_from_cores(collect_cores(parts["lora_B"], f"{name}.lora_B", source),
            *shape_pair(shapes, name, "b"), f"{name}.lora_B")
    if a.cols != b.rows:
        raise ShapeError(f"{source}: module {name}: A is ({a.rows}, {a.cols}) but B is "
                         f"({b.rows}, {b.cols}); A's columns must equal B's rows (r); re-save or re-download the adapter")
    scale = scales.get(name)
    scale = scale_for(config, name) if scale is None else to_number(scale, f"module_scales[{name!r}]")
    return RepModule(a=a, b=b, scale=scale)


def _read_adp(name: str, parts: dict, rest: dict, config: dict, source: Path) -> AdpModule:
    shapes, scales = module_map(config, "module_shapes"), module_map(config, "module_scales")
    if set(parts) - {"adapter_down", "adapter_up"}:
        raise FormatError(f"{source}: module {name} has {sorted(parts)} tensors in a LORETTA_ADP adapter; re-save or re-download the adapter")
    down = tt_from_cores(collect_cores(parts["adapter_down"], f"{name}.adapter_down", source),
               *shape_pair(shapes, name, "down"), f"{name}.adapter_down")
    up = tt_from_cores(collect_cores(parts["adapter_up"], f"{name}.adapter_up", source),
             *shape_pair(shapes, name, "up"), f"{name}.adapter_up")
    if (down.rows, down.cols) != (up.cols, up.rows):
        raise ShapeError(f"{source}: module {name}: down is ({down.rows}, {down.cols}) but up is "
                         f"({up.rows}, {up.cols}); they must be (dim, b) and (b, dim); re-save or re-download the adapter")
    db = pop_bias(rest, f"{name}.adapter_down.bias", source)
    ub = pop_bias(rest, f"{name}.adapter_up.bias", source)
    check_bias(db, down.cols, f"{name}.adapter_down.bias")
    check_bias(ub, up.cols, f"{name}.adapter_up.bias")
    where = module_map(config, "adapter_placement").get(name)
    if where not in ("input", "output"):
        raise ConfigError(f"{source}: adapter_placement[{name!r}] is {where!r}; "
                          f"expected 'input' or 'output'; set it to 'input' or 'output' in adapter_config.json")
    acts = module_map(config, "adapter_non_linearity")
    act = check_non_linearity(acts.get(name, config.get("non_linearity", "relu")), f"module {name}")
    scaling = scales.get(name, config.get("scaling", 1.0))
    return AdpModule(down=down, down_bias=db, up=up, up_bias=ub, placement=where,
                     non_linearity=act, scaling=to_number(scaling, f"scaling of module {name}"))


def read_ours(config: dict, state: dict, source: Path) -> tuple[str, dict, dict]:
    """``(method, modules, full tensors)`` of an adapter in this project's format."""
    version = config.get("format_version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise FormatError(f"{source}: format_version {version!r}; this loretta-merge reads version "
                          f"{FORMAT_VERSION}; upgrade loretta-merge")
    method = "rep" if config["peft_type"] == "LORETTA_REP" else "adp"
    groups, rest = group_modules(state, _OURS_CORES)
    if method == "rep":
        check_pairs(groups, "lora_A", "lora_B", source, "tt_cores")
    else:
        check_pairs(groups, "adapter_down", "adapter_up", source, "tt_cores")
    modules: dict[str, Module] = {}
    for name, parts in groups.items():
        if "tt_dense" in parts:
            modules[name] = _read_dense(name, parts, rest, module_map(config, "module_shapes"), source)
        elif method == "rep":
            modules[name] = _read_rep(name, parts, config, source)
        else:
            modules[name] = _read_adp(name, parts, rest, config, source)
    leftover_check(rest, source, (".tt_cores.", ".lora_A", ".lora_B", ".adapter_down.", ".adapter_up."))
    return method, modules, rest


def fan_in_fan_out_of(config: dict, config_path: Path) -> set[str]:
    fifo = config.get("fan_in_fan_out_modules") or []
    if not isinstance(fifo, list) or not all(isinstance(x, str) for x in fifo):
        raise ConfigError(f"{config_path}: fan_in_fan_out_modules must be a list of module names; fix it in adapter_config.json")
    return set(fifo)


# --------------------------------------------------------------------------- writing

class _Collected:
    """The tensors and per-module config entries of an adapter being written."""

    def __init__(self) -> None:
        self.state: dict[str, torch.Tensor] = {}
        self.shapes: dict[str, dict] = {}
        self.scales: dict[str, float] = {}
        self.placement: dict[str, str] = {}
        self.acts: dict[str, str] = {}
        self.dense: list[str] = []

    def tt(self, key: str, m: TTMatrix) -> list[int]:
        if not isinstance(m, TTMatrix):
            raise ConfigError(f"{key}: expected a TTMatrix, got {type(m).__name__}; pass TTMatrix modules")
        tt_from_cores(list(m.cores), m.rows, m.cols, key)  # never write what the reader would refuse
        for k, core in enumerate(m.cores):
            self.state[f"{PREFIX}{key}.tt_cores.{k}"] = core
        return [m.rows, m.cols]


def _put_dense(c: _Collected, name: str, mod: TTDenseModule) -> None:
    c.shapes[name] = {"weight": c.tt(f"{name}.tt_dense", mod.weight)}
    if mod.bias is not None:
        check_bias(mod.bias, mod.weight.cols, f"{name}.tt_dense.bias")
        c.state[f"{PREFIX}{name}.tt_dense.bias"] = mod.bias
    c.dense.append(name)


def _put_rep(c: _Collected, name: str, mod: RepModule) -> None:
    c.shapes[name] = {"a": c.tt(f"{name}.lora_A", mod.a), "b": c.tt(f"{name}.lora_B", mod.b)}
    if mod.a.cols != mod.b.rows:
        raise ShapeError(f"module {name}: A is ({mod.a.rows}, {mod.a.cols}), B is ({mod.b.rows}, "
                         f"{mod.b.cols}); A's columns must equal B's rows (r); pass A and B with a shared r")
    c.scales[name] = to_number(float(mod.scale), f"scale of module {name}")


def _put_adp(c: _Collected, name: str, mod: AdpModule) -> None:
    c.shapes[name] = {"down": c.tt(f"{name}.adapter_down", mod.down),
                      "up": c.tt(f"{name}.adapter_up", mod.up)}
    if (mod.down.rows, mod.down.cols) != (mod.up.cols, mod.up.rows):
        raise ShapeError(f"module {name}: down is ({mod.down.rows}, {mod.down.cols}), up is "
                         f"({mod.up.rows}, {mod.up.cols}); they must be (dim, b) and (b, dim); pass down (dim, b) and up (b, dim)")
    check_bias(mod.down_bias, mod.down.cols, f"{name}.adapter_down.bias")
    check_bias(mod.up_bias, mod.up.cols, f"{name}.adapter_up.bias")
    if mod.placement not in ("input", "output"):
        raise ConfigError(f"module {name}: placement {mod.placement!r}; expected 'input' or 'output'; set it to 'input' or 'output'")
    c.state[f"{PREFIX}{name}.adapter_down.bias"] = mod.down_bias
    c.state[f"{PREFIX}{name}.adapter_up.bias"] = mod.up_bias
    c.scales[name] = to_number(float(mod.scaling), f"scaling of module {name}")
    c.placement[name] = mod.placement
    c.acts[name] = check_non_linearity(mod.non_linearity, f"module {name}")


def _collect(adapter: Adapter) -> _Collected:
    c = _Collected()
    for name, mod in sorted(adapter.modules.items()):
        if isinstance(mod, TTDenseModule):
            _put_dense(c, name, mod)
        elif isinstance(mod, RepModule) and adapter.method == "rep":
            _put_rep(c, name, mod)
        elif isinstance(mod, AdpModule) and adapter.method == "adp":
            _put_adp(c, name, mod)
        else:
            raise ConfigError(f"module {name} is a {type(mod).__name__}, which a {adapter.method!r} "
                              f"adapter cannot hold; pass modules of that adapter's kind only")
    for name, value in adapter.tensors.items():
        key = PREFIX + name
        if key in c.state:
            raise ConfigError(f"full tensor {name} collides with an adapter tensor key {key}; rename the full tensor")
        c.state[key] = value
    for key, value in c.state.items():
        if not isinstance(value, torch.Tensor):
            raise ConfigError(f"{key} is a {type(value).__name__}, not a tensor; pass tensors only")
    return c


def _state_and_config(adapter: Adapter) -> tuple[dict[str, torch.Tensor], dict]:
    if adapter.method not in ("rep", "adp"):
        raise ConfigError(f"write_adapter writes LoRETTA adapters (method 'rep' or 'adp'), got method "
                          f"{adapter.method!r}; convert a LoRA adapter to TT first (lora_to_tt)")
    c = _collect(adapter)
    config = {k: v for k, v in adapter.config.items()
              if k not in ("module_shapes", "module_scales", "adapter_placement", "adapter_non_linearity")}
    config.update({
        "peft_type": "LORETTA_REP" if adapter.method == "rep" else "LORETTA_ADP",
        "format_version": FORMAT_VERSION,
        "base_model_name_or_path": adapter.base_model_name_or_path,
        "fan_in_fan_out_modules": sorted(adapter.fan_in_fan_out),
        "tt_dense_modules": c.dense,
        "module_shapes": c.shapes,
        "module_scales": c.scales,
    })
    if adapter.method == "adp":
        config["adapter_placement"] = c.placement
        config["adapter_non_linearity"] = c.acts
    return c.state, config


def write_adapter_files(out: Path, state: dict[str, torch.Tensor], config: dict, *,
                        force: bool) -> None:
    """``adapter_model.safetensors`` + ``adapter_config.json`` into ``out``, atomically,
    through the one writer (shared by our format and PEFT's)."""
    try:
        config_text = json.dumps(config, indent=2, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"adapter config cannot be written as JSON ({exc}); keep config values to "
                          f"numbers, strings, lists and mappings") from None
    with atomic_output_dir(out, force=force) as tmp:
        write_safetensors(tmp / SAFETENSORS_NAME, state)
        write_file(tmp / CONFIG_NAME, config_text + "\n")


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
    check_finite(state, path)
    write_adapter_files(path, state, config, force=force)
    return path
