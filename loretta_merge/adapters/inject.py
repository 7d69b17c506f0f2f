"""Injecting LoRETTA adapters into a transformers model, and getting them back out.

- :func:`get_loretta_model` wraps the targeted ``nn.Linear``/``Conv1D`` modules in place,
  freezes everything else, unfreezes norms / heads / ``modules_to_save`` and, for
  sequence classification, replaces the pooler or classifier dense by a square TT layer
  (the paper's recipe).
- Saving, loading and merging such a model live in :mod:`loretta_merge.adapters.files`.

Tied embeddings: a tensor shared by the input embedding and the output projection is one
parameter while training, so a trained full tensor is recorded under every name it has
(the merge then writes both, with the trained value); a rep adapter on the output
projection changes only the output side, so merging gives that module its own weight and
the config ``tie_word_embeddings = False`` (the streamed merge does the same).
Sentence-transformers bases mean-pool: see :mod:`loretta_merge.pooling`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterator

from torch import nn

from .. import tt
from ..errors import ConfigError
from ..pooling import apply_pooling, resolve_pooling
from .config import (AdpConfig, RepConfig, default_targets, key_matches,
                     placement_for, target_matches, unsupported_architecture_hint)
from .layers import AdapterLinear, RepLinear, TTLinear, is_conv1d, linear_dims

HEAD_NAMES = ("classifier", "score", "pre_classifier")  # pre_classifier: DistilBERT's dense
FULL_TENSORS_ATTR = "loretta_full_tensors"  # model attribute: names of trained full tensors


# --------------------------------------------------------------------------- discovery

def is_norm(module: nn.Module) -> bool:
    """LayerNorm / RMSNorm-like: class name ends with "Norm" or contains LayerNorm/RMSNorm."""
    name = type(module).__name__
    return name.endswith("Norm") or "LayerNorm" in name or "RMSNorm" in name


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_candidates(model: nn.Module) -> list[str]:
    """Linear/Conv1D module names of ``model``, deduplicated by their last component."""
    seen: dict[str, None] = {}
    for name, module in model.named_modules():
        if name and is_linear(module) and not isinstance(module, TTLinear):
            seen.setdefault(name.rsplit(".", 1)[-1], None)
    return list(seen)


def _task_type(model: nn.Module, config: RepConfig | AdpConfig) -> str:
    if config.task_type:
        return config.task_type
    cls = type(model).__name__
    if cls.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if cls.endswith(("ForCausalLM", "LMHeadModel")):
        return "CAUSAL_LM"
    return "FEATURE_EXTRACTION"


def _dense_to_replace(model: nn.Module) -> str | None:
    """The paper's replaced dense: RoBERTa's ``classifier.dense`` (DistilBERT's
    ``pre_classifier``, its equivalent), else a ``*pooler.dense``."""
    names = dict(model.named_modules())
    for name, module in names.items():
        if (key_matches(name, "classifier.dense") or name == "pre_classifier") \
                and isinstance(module, nn.Linear):
            return name
    for name, module in names.items():
        if key_matches(name, "pooler.dense") and isinstance(module, nn.Linear):
            return name
    return None


def mode_shapes_for(config: RepConfig | AdpConfig, rows: int, cols: int, *, module: str) -> list[int]:
    """Modes of the TT of a ``(rows, cols)`` matrix: ``mode_shapes`` overrides first
    (``"rows x cols"``, then per-side widths), else :func:`tt.matrix_modes`."""
    over = config.mode_shapes or {}
    if f"{rows}x{cols}" in over:
        modes = list(over[f"{rows}x{cols}"])
    elif str(rows) in over or str(cols) in over:
        modes = []
        for side in (rows, cols):
            if str(side) in over:
                modes += over[str(side)]
            elif side > 1:
                modes += tt.factorize(side)
    else:
        modes = tt.matrix_modes(rows, cols, shapes=config.shapes)
    if math.prod(modes) != rows * cols:
        raise ConfigError(f"module {module}: modes {modes} do not multiply to {rows} x {cols} = "
                          f"{rows * cols}; fix mode_shapes (key '{rows}x{cols}' or the widths)")
    return modes


def _plan(model: nn.Module, config: RepConfig | AdpConfig) -> dict[str, str]:
    """Module name -> "rep" | "input" | "output" for every module the config targets."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    cls = type(model).__name__
    if isinstance(config, RepConfig):
        targets = config.target_modules or default_targets(model_type, "rep")
        what = "target_modules"
    else:
        targets = config.placement or default_targets(model_type, "adp")
        what = "placement"
    if targets is None:
        hint = unsupported_architecture_hint(model_type, linear_candidates(model), method=config.method)
        raise ConfigError(f"{cls} is not a supported architecture for LoRETTA_{config.method}: {hint}")
    plan: dict[str, str] = {}
    for name, module in model.named_modules():
        if not name:
            continue
        if isinstance(config, RepConfig):
            hit = "rep" if target_matches(name, targets) else None  # type: ignore[arg-type]
        else:
            hit = placement_for(name, targets)  # type: ignore[arg-type]
        if hit is None:
            continue
        if isinstance(module, (RepLinear, AdapterLinear)):
            raise ConfigError(f"module {name} already holds a LoRETTA adapter; "
                              f"build the model afresh before adding another")
        if not is_linear(module):
            raise ConfigError(f"{what} {targets!r} matches module {name}, a {type(module).__name__}; "
                              f"only nn.Linear and Conv1D can be wrapped; pick a more specific key "
                              f"(Linear/Conv1D modules: {linear_candidates(model)})")
        plan[name] = hit
    if not plan:
        raise ConfigError(f"{what} {targets!r} matches no module of {cls} (model_type {model_type!r}); "
                          f"keys match a full module name or its '.'-separated suffix (never a "
                          f"substring); its Linear/Conv1D modules are: {linear_candidates(model)}; set {what} to some of them")
    return plan


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


# --------------------------------------------------------------------------- injection

def _full_tensor_names(model: nn.Module, config: RepConfig | AdpConfig, task: str) -> list[str]:
    """Trained full tensors: norms (if asked), SEQ_CLS heads, modules_to_save. TT layers
    are excluded (they are saved as TT modules)."""
    picked: list[str] = []
    for name, module in model.named_modules():
        take = (config.train_norms and is_norm(module)) \
            or (task == "SEQ_CLS" and any(key_matches(name, h) for h in HEAD_NAMES)) \
            or any(key_matches(name, k) for k in (config.modules_to_save or []))
        if not take:
            continue
        for pname, p in module.named_parameters(prefix=name):
            if ".tt_cores." in pname or isinstance(_owner(model, pname), TTLinear):
                continue
            if pname not in picked:
                picked.append(pname)
    return picked


def _owner(model: nn.Module, pname: str) -> nn.Module:
    return model.get_submodule(pname.rpartition(".")[0])


def tt_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if isinstance(module, (RepLinear, AdapterLinear)):
            yield name, module
        elif isinstance(module, TTLinear) and not _inside_wrapper(name, model):
            yield name, module


def _inside_wrapper(name: str, model: nn.Module) -> bool:
    parent = name.rpartition(".")[0]
    return bool(parent) and isinstance(model.get_submodule(parent), (RepLinear, AdapterLinear))


def set_trainable(model: nn.Module, *, trainable: bool) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    if not trainable:
        return
    for _, module in tt_layers(model):
        for pname, p in module.named_parameters():
            if not pname.startswith("base_layer."):
                p.requires_grad_(True)
    for pname in getattr(model, FULL_TENSORS_ATTR, []):
        model.get_parameter(pname).requires_grad_(True)


def get_loretta_model(model: nn.Module, config: RepConfig | AdpConfig) -> nn.Module:
    """Add LoRETTA adapters to ``model`` in place and return it.

    New parameters land on each wrapped module's device and dtype. Everything except the
    adapters, the norms (``train_norms``), the SEQ_CLS head (``classifier``/``score``), the
    replaced dense and ``modules_to_save`` is frozen. The resolved config is recorded as
    ``model.loretta_config``. Seed ``torch.manual_seed`` for a reproducible init.
    """
    if not isinstance(config, (RepConfig, AdpConfig)):
        raise ConfigError(f"config must be a RepConfig or AdpConfig, got {type(config).__name__}; pass a RepConfig or an AdpConfig")
    if getattr(model, "loretta_config", None) is not None:
        raise ConfigError(f"this {type(model).__name__} already has LoRETTA adapters; "
                          f"build the model afresh before adding another")
    task = _task_type(model, config)
    replace = config.replace_dense if config.replace_dense is not None else task == "SEQ_CLS"
    plan = _plan(model, config)
    pooling = resolve_pooling(model, config.pooling, task)
    if pooling is not None:  # before the dense is picked: a mean-pooled encoder has no pooler dense
        apply_pooling(model, pooling)
    dense = _dense_to_replace(model) if replace and task == "SEQ_CLS" else None
    if dense is not None and dense in plan:
        raise ConfigError(f"module {dense} is both an adapter target and the dense the paper replaces "
                          f"by a TT layer; drop it from the targets or set replace_dense=False")
    for name, hit in plan.items():
        base = model.get_submodule(name)
        n_in, n_out = linear_dims(base)
        if isinstance(config, RepConfig):
            r = config.rank_for(name)
            new: nn.Module = RepLinear(
                base, r=r, scale=config.scale_for(name), tensor_rank=config.tensor_rank,
                modes_a=mode_shapes_for(config, n_in, r, module=name),
                modes_b=mode_shapes_for(config, r, n_out, module=name),
                dropout=config.lora_dropout, init=config.init)
        else:
            dim, b = (n_in if hit == "input" else n_out), config.bottleneck_size
            new = AdapterLinear(
                base, placement=hit, bottleneck_size=b, tensor_rank=config.tensor_rank,
                modes_down=mode_shapes_for(config, dim, b, module=name),
                modes_up=mode_shapes_for(config, b, dim, module=name),
                non_linearity=config.non_linearity, dropout=config.adapter_dropout,
                scaling=config.scaling, init=config.init)
        set_module(model, name, new)
    if dense is not None:
        old = model.get_submodule(dense)
        n_in, n_out = linear_dims(old)
        set_module(model, dense, TTLinear(
            n_in, n_out, mode_shapes_for(config, n_in, n_out, module=dense), config.tensor_rank,
            bias=True, dtype=old.weight.dtype, device=old.weight.device))
    resolved: dict[str, Any] = {"task_type": task, "replace_dense": replace, "pooling": pooling}
    if isinstance(config, RepConfig) and config.target_modules is None:
        resolved["target_modules"] = default_targets(model.config.model_type, "rep")
    if isinstance(config, AdpConfig) and config.placement is None:
        resolved["placement"] = default_targets(model.config.model_type, "adp")
    model.loretta_config = dataclasses.replace(config, **resolved)
    setattr(model, FULL_TENSORS_ATTR, _full_tensor_names(model, config, task))
    set_trainable(model, trainable=True)
    return model


# --------------------------------------------------------------------------- reporting

def trainable_parameters(model: nn.Module) -> dict[str, int]:
    """Trainable parameter counts: ``tt_cores``, ``biases`` (of TT layers), ``norms``,
    ``heads`` (heads and modules_to_save), ``total_trainable`` and ``total``."""
    kinds: dict[int, str] = {}
    for _, module in tt_layers(model):
        for pname, p in module.named_parameters():
            if not pname.startswith("base_layer."):
                kinds[id(p)] = "tt_cores" if "tt_cores" in pname else "biases"
    for module in model.modules():
        if is_norm(module):
            for p in module.parameters(recurse=False):
                kinds.setdefault(id(p), "norms")
    out = {"tt_cores": 0, "biases": 0, "norms": 0, "heads": 0, "total_trainable": 0, "total": 0}
    for p in model.parameters():
        n = p.numel()
        out["total"] += n
        if p.requires_grad:
            out[kinds.get(id(p), "heads")] += n
            out["total_trainable"] += n
    return out


# --------------------------------------------------------------------------- save / load
