"""PEFT's LoRA adapters: reader, the one PEFT config builder, and the writer.

On disk (peft 0.21): ``base_model.model.<m>.lora_A.weight`` ``(r, in)``,
``...lora_B.weight`` ``(out, r)``, DoRA's ``...lora_magnitude_vector`` and full tensors of
``modules_to_save`` as ``base_model.model.<param>``; ``adapter_config.json`` with ``r``,
``lora_alpha``, ``use_rslora``, ``rank_pattern``/``alpha_pattern`` (matched by
:mod:`loretta_merge.patterns`) and the rest of ``LoraConfig``.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from ..errors import FormatError, ShapeError
from ..patterns import pattern_key
from .common import CONFIG_NAME, PREFIX, leftover_check, rank_for, scale_for
from .ours import write_adapter_files
from .types import Adapter, LoraModule, Module

_PEFT_KEY = re.compile(r"^(?P<m>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_magnitude_vector"
                       r"(?:\.weight)?|lora_embedding_A|lora_embedding_B|lora_B\.bias)$")


# --------------------------------------------------------------------------- reading

def _check_parts(name: str, parts: dict, source: Path) -> None:
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


def _read_module(name: str, parts: dict, config: dict, source: Path) -> LoraModule:
    _check_parts(name, parts, source)
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
    return LoraModule(a=a, b=b, scale=scale_for(config, name), magnitude=mag)


def read_peft(config: dict, state: dict, source: Path) -> tuple[str, dict, dict]:
    """``("lora", modules, full tensors)`` of a PEFT LoRA adapter."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    rest = {}
    for key, value in state.items():
        m = _PEFT_KEY.match(key)
        if m:
            part = "lora_magnitude_vector" if "magnitude" in m["part"] else m["part"]
            groups.setdefault(m["m"], {})[part] = value
        else:
            rest[key] = value
    modules: dict[str, Module] = {name: _read_module(name, parts, config, source)
                                  for name, parts in groups.items()}
    leftover_check(rest, source, (".lora_", "trainable_tokens"))
    # modules_to_save: PEFT 0.21 saves them as <module>.<param>; older PEFT kept the wrapper infix
    rest = {k.replace(".modules_to_save.", "."): v for k, v in rest.items()}
    return "lora", modules, rest


# --------------------------------------------------------------------------- the PEFT config

def _module_of(param_name: str) -> str:
    return param_name.rsplit(".", 1)[0] if "." in param_name else param_name


def _clean(value: float) -> float | int:
    """Undo float noise: 16.000000001 -> 16."""
    if abs(value - round(value)) < 1e-6 * max(1.0, abs(value)):
        return int(round(value))
    return value


def exact_keys(names: list[str]) -> dict[str, str]:
    """A ``rank_pattern``/``alpha_pattern`` key per module name that, under PEFT's rule,
    matches that module and no other of ``names``: the plain name when that is already so
    (the readable common case), else the escaped name anchored at the start."""
    keys = {}
    for n in names:
        clash = any(m != n and pattern_key({n: 0}, m) is not None for m in names)
        keys[n] = "^" + re.escape(n) if clash else n
    return keys


def peft_lora_config(adapter: Adapter) -> dict[str, Any]:
    """THE ``adapter_config.json`` for peft 0.21's ``LoraConfig`` of a LoRA ``Adapter``:
    ``r``/``lora_alpha`` (from its config, else the most common values) with per-module
    ``rank_pattern``/``alpha_pattern`` entries wherever PEFT's scale would otherwise differ
    from the module's own scale."""
    cfg, names = adapter.config, sorted(adapter.modules)
    rslora = bool(cfg.get("use_rslora", False))
    ranks = {n: int(adapter.modules[n].a.shape[0]) for n in names}
    alphas = {n: _clean(adapter.modules[n].scale * (math.sqrt(ranks[n]) if rslora else ranks[n]))
              for n in names}
    r0 = cfg.get("r") or Counter(ranks.values()).most_common(1)[0][0]
    alpha0 = cfg.get("lora_alpha") or Counter(alphas.values()).most_common(1)[0][0]
    keys = exact_keys(names)
    rank_pattern = {keys[n]: ranks[n] for n in names if ranks[n] != r0}
    alpha_pattern = {}
    for n in names:
        scale = adapter.modules[n].scale
        default = alpha0 / (math.sqrt(ranks[n]) if rslora else ranks[n])
        if abs(default - scale) > 1e-7 * abs(scale):
            alpha_pattern[keys[n]] = alphas[n]
    save = _modules_to_save(adapter.tensors, cfg.get("task_type"))
    return {
        "peft_type": "LORA", "task_type": cfg.get("task_type"),
        "base_model_name_or_path": adapter.base_model_name_or_path,
        "revision": None, "inference_mode": True,
        "r": int(r0), "lora_alpha": alpha0, "lora_dropout": float(cfg.get("lora_dropout", 0.0) or 0.0),
        "target_modules": names, "exclude_modules": None,
        "fan_in_fan_out": bool(names) and all(n in adapter.fan_in_fan_out for n in names),
        "bias": "none", "use_rslora": rslora, "use_dora": False,
        "modules_to_save": save or None, "init_lora_weights": True,
        "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "lora_bias": False, "target_parameters": None,
    }


# PEFT's SEQ_CLS models wrap these head modules whole (ModulesToSaveWrapper); a sub-module
# of one listed as well makes PeftModel.from_pretrained fail with a KeyError
_SEQ_CLS_HEADS = ("classifier", "score")


def _modules_to_save(tensors: dict, task_type: str | None) -> list[str]:
    """The modules owning the full tensors, with sub-modules of a SEQ_CLS head listed as
    the head itself (RoBERTa's ``classifier.dense`` + ``classifier.out_proj`` -> ``classifier``)."""
    mods = {_module_of(k) for k in tensors}
    if task_type == "SEQ_CLS":
        mods = {next((h for h in _SEQ_CLS_HEADS if m == h or m.startswith(h + ".")), m)
                for m in mods}
    return sorted(mods)


# --------------------------------------------------------------------------- writing

def write_peft_lora(adapter: Adapter, path: str | os.PathLike, *, force: bool = False) -> Path:
    """Write a LoRA ``Adapter`` as a PEFT LoRA directory (``adapter_config.json`` +
    ``adapter_model.safetensors``) that ``peft.PeftModel.from_pretrained`` loads with no
    missing or unexpected keys; full tensors go under their own parameter names, their
    modules listed in ``modules_to_save``. Written to a temp directory and renamed into place."""
    if adapter.method != "lora":
        raise FormatError(f"write_peft_lora writes LoRA adapters; got a {adapter.method!r} adapter "
                          f"(convert it with tt_to_lora first)")
    state: dict[str, torch.Tensor] = {}
    for name, m in adapter.modules.items():
        if not isinstance(m, LoraModule) or m.magnitude is not None:
            raise FormatError(f"module {name}: only plain LoRA modules can be written as PEFT LoRA; "
                              f"merge a DoRA adapter with PEFT's merge_and_unload instead")
        state[f"{PREFIX}{name}.lora_A.weight"] = m.a.detach()
        state[f"{PREFIX}{name}.lora_B.weight"] = m.b.detach()
    for key, value in adapter.tensors.items():
        state[f"{PREFIX}{key}"] = value.detach()
    out = Path(path)
    write_adapter_files(out, state, peft_lora_config(adapter), force=force)
    return out
