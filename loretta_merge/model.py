"""Injecting LoRETTA adapters into a transformers model, and getting them back out.

- :func:`get_loretta_model` wraps the targeted ``nn.Linear``/``Conv1D`` modules in place,
  freezes everything else, unfreezes norms / heads / ``modules_to_save`` and, for
  sequence classification, replaces the pooler or classifier dense by a square TT layer
  (the paper's recipe).
- :func:`adapter_from_model` / :func:`save_loretta_adapter` collect every trained tensor
  into a :class:`formats.Adapter` and write it; :func:`load_loretta_model` rebuilds the
  wrappers from an adapter (ours or the authors' format) with every shape checked.
- :func:`merge_loretta_model` folds rep adapters into the base weights.

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
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch import nn

from . import tt
from .config import (AdpConfig, RepConfig, config_from_dict, default_targets, key_matches,
                     placement_for, target_matches, unsupported_architecture_hint)
from .errors import ConfigError, FormatError, LorettaError, ShapeError
from .layers import AdapterLinear, RepLinear, TTLinear, is_conv1d, linear_dims
from .pooling import POOLING_CONFIG_KEY, apply_pooling, resolve_pooling  # noqa: F401 (re-exported)

if TYPE_CHECKING:  # formats.py is written alongside; imported lazily at call time
    from .formats import Adapter

HEAD_NAMES = ("classifier", "score", "pre_classifier")  # pre_classifier: DistilBERT's dense
_FULL = "loretta_full_tensors"  # model attribute: names of trained full tensors


# --------------------------------------------------------------------------- discovery

def is_norm(module: nn.Module) -> bool:
    """LayerNorm / RMSNorm-like: class name ends with "Norm" or contains LayerNorm/RMSNorm."""
    name = type(module).__name__
    return name.endswith("Norm") or "LayerNorm" in name or "RMSNorm" in name


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_candidates(model: nn.Module) -> list[str]:
    """Linear/Conv1D module names of ``model``, deduplicated by their last component."""
    seen: dict[str, None] = {}
    for name, module in model.named_modules():
        if name and _is_linear(module) and not isinstance(module, TTLinear):
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
        if not _is_linear(module):
            raise ConfigError(f"{what} {targets!r} matches module {name}, a {type(module).__name__}; "
                              f"only nn.Linear and Conv1D can be wrapped; pick a more specific key "
                              f"(Linear/Conv1D modules: {linear_candidates(model)})")
        plan[name] = hit
    if not plan:
        raise ConfigError(f"{what} {targets!r} matches no module of {cls} (model_type {model_type!r}); "
                          f"keys match a full module name or its '.'-separated suffix (never a "
                          f"substring); its Linear/Conv1D modules are: {linear_candidates(model)}; set {what} to some of them")
    return plan


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
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


def _tt_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if isinstance(module, (RepLinear, AdapterLinear)):
            yield name, module
        elif isinstance(module, TTLinear) and not _inside_wrapper(name, model):
            yield name, module


def _inside_wrapper(name: str, model: nn.Module) -> bool:
    parent = name.rpartition(".")[0]
    return bool(parent) and isinstance(model.get_submodule(parent), (RepLinear, AdapterLinear))


def _set_trainable(model: nn.Module, *, trainable: bool) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    if not trainable:
        return
    for _, module in _tt_layers(model):
        for pname, p in module.named_parameters():
            if not pname.startswith("base_layer."):
                p.requires_grad_(True)
    for pname in getattr(model, _FULL, []):
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
        _set_module(model, name, new)
    if dense is not None:
        old = model.get_submodule(dense)
        n_in, n_out = linear_dims(old)
        _set_module(model, dense, TTLinear(
            n_in, n_out, mode_shapes_for(config, n_in, n_out, module=dense), config.tensor_rank,
            bias=True, dtype=old.weight.dtype, device=old.weight.device))
    resolved: dict[str, Any] = {"task_type": task, "replace_dense": replace, "pooling": pooling}
    if isinstance(config, RepConfig) and config.target_modules is None:
        resolved["target_modules"] = default_targets(model.config.model_type, "rep")
    if isinstance(config, AdpConfig) and config.placement is None:
        resolved["placement"] = default_targets(model.config.model_type, "adp")
    model.loretta_config = dataclasses.replace(config, **resolved)
    setattr(model, _FULL, _full_tensor_names(model, config, task))
    _set_trainable(model, trainable=True)
    return model


# --------------------------------------------------------------------------- reporting

def trainable_parameters(model: nn.Module) -> dict[str, int]:
    """Trainable parameter counts: ``tt_cores``, ``biases`` (of TT layers), ``norms``,
    ``heads`` (heads and modules_to_save), ``total_trainable`` and ``total``."""
    kinds: dict[int, str] = {}
    for _, module in _tt_layers(model):
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


def print_trainable_parameters(model: nn.Module) -> None:
    """One line, PEFT style, plus the breakdown."""
    c = trainable_parameters(model)
    pct = 100.0 * c["total_trainable"] / max(c["total"], 1)
    print(f"trainable params: {c['total_trainable']:,} || all params: {c['total']:,} || "
          f"trainable%: {pct:.4f} (TT cores {c['tt_cores']:,}, biases {c['biases']:,}, "
          f"norms {c['norms']:,}, heads/modules_to_save {c['heads']:,})")


# --------------------------------------------------------------------------- save / load

def _tt_matrix(layer: TTLinear):
    from .formats import TTMatrix

    return TTMatrix(cores=[c.detach() for c in layer.tt_cores], rows=layer.rows, cols=layer.cols)


def adapter_from_model(model: nn.Module) -> "Adapter":
    """Every trained tensor of a LoRETTA model as a :class:`formats.Adapter`: TT cores,
    adapter biases, replaced dense layers, norms, heads and modules_to_save."""
    from .formats import Adapter, AdpModule, RepModule, TTDenseModule

    config = getattr(model, "loretta_config", None)
    if config is None:
        raise ConfigError(f"this {type(model).__name__} has no LoRETTA adapters; "
                          f"call get_loretta_model or load_loretta_model first")
    modules: dict[str, Any] = {}
    fan_in_fan_out: set[str] = set()
    for name, m in _tt_layers(model):
        if isinstance(m, RepLinear):
            modules[name] = RepModule(a=_tt_matrix(m.lora_A), b=_tt_matrix(m.lora_B), scale=m.scale)
        elif isinstance(m, AdapterLinear):
            modules[name] = AdpModule(down=_tt_matrix(m.adapter_down), down_bias=m.adapter_down.bias.detach(),
                                      up=_tt_matrix(m.adapter_up), up_bias=m.adapter_up.bias.detach(),
                                      placement=m.placement, non_linearity=m.non_linearity,
                                      scaling=m.scaling)
        else:
            bias = m.bias.detach() if m.bias is not None else None
            modules[name] = TTDenseModule(weight=_tt_matrix(m), bias=bias)
        if getattr(m, "fan_in_fan_out", False):
            fan_in_fan_out.add(name)
    tensors = _full_tensors(model)
    base = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    cfg = config.to_dict()
    # what a merge into a bare base checkpoint needs to write the task model's config
    cfg["model_class"] = type(model).__name__
    id2label = getattr(getattr(model, "config", None), "id2label", None)
    if config.task_type == "SEQ_CLS" and id2label:
        cfg["id2label"] = {str(k): str(v) for k, v in id2label.items()}
    return Adapter(method=config.method, source="loretta-merge", modules=modules, tensors=tensors,
                   config=cfg, fan_in_fan_out=fan_in_fan_out,
                   base_model_name_or_path=base, path=None)


def _clean(pname: str) -> str:
    return pname.replace(".base_layer.", ".")


def _aliases(model: nn.Module) -> dict[int, list[str]]:
    """Every name of every parameter, shared ones (tied embeddings) under all their names."""
    out: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        out.setdefault(id(p), []).append(_clean(name))
    return out


def _full_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained full tensors by parameter name. A tensor shared by several modules (tied
    input/output embeddings) is recorded under every name it has: training changed all of
    them, so every reader (merge, PEFT conversion, export) gets the trained value for each
    name without knowing about ties."""
    aliases = _aliases(model)
    tensors: dict[str, torch.Tensor] = {}
    for pname in getattr(model, _FULL, []):
        p = model.get_parameter(pname)
        for name in aliases.get(id(p), [_clean(pname)]):
            tensors[name] = p.detach()
    return tensors


def save_loretta_adapter(model: nn.Module, path: str | Path, *, force: bool = False,
                         base_model_name_or_path: str | None = None) -> Path:
    """Write the model's adapter directory (our format) atomically; returns the path."""
    from .formats import write_adapter

    adapter = adapter_from_model(model)
    if base_model_name_or_path is not None:
        adapter.base_model_name_or_path = base_model_name_or_path
    write_adapter(adapter, Path(path), force=force)
    return Path(path)


def _fit(name: str, what: str, got: tuple, want: tuple) -> None:
    if tuple(got) != tuple(want):
        raise ShapeError(f"adapter module {name}: {what} has shape {tuple(got)} but the model needs "
                         f"{tuple(want)}; pass the base model the adapter was trained on")


def _tt_from(mat, name: str, *, like: torch.Tensor, bias: torch.Tensor | None = None) -> TTLinear:
    cores = [c.to(device=like.device, dtype=like.dtype) for c in mat.cores]
    b = bias.to(device=like.device, dtype=like.dtype) if bias is not None else None
    return TTLinear.from_cores(cores, mat.rows, mat.cols, bias=b, name=name)


def _config_of(adapter: "Adapter") -> RepConfig | AdpConfig:
    data = {**adapter.config, "method": adapter.method}
    try:
        return config_from_dict(data)
    except (ConfigError, TypeError):
        return RepConfig() if adapter.method == "rep" else AdpConfig()


def load_loretta_model(model: nn.Module, adapter: "str | Path | Adapter", *,
                       is_trainable: bool = False) -> nn.Module:
    """Attach an adapter (a directory in any supported format, or an ``Adapter``) to
    ``model`` in place. Every shape is checked against the model first (ShapeError names
    the module and both shapes). With ``is_trainable=False`` everything is frozen."""
    from .formats import AdpModule, RepModule, TTDenseModule, read_adapter

    if not hasattr(adapter, "modules"):
        adapter = read_adapter(Path(adapter))  # type: ignore[arg-type]
    if adapter.method not in ("rep", "adp"):
        raise FormatError(f"adapter {adapter.path or ''} is a plain {adapter.method!r} adapter, not "
                          f"LoRETTA; load it with peft, or convert it with `loretta-merge convert "
                          f"lora-to-tt`")
    if getattr(model, "loretta_config", None) is not None:
        raise ConfigError(f"this {type(model).__name__} already has LoRETTA adapters; "
                          f"load into a fresh base model")
    named = dict(model.named_modules())
    params = dict(model.named_parameters(remove_duplicate=False))  # tied tensors: every name
    for name, mod in adapter.modules.items():  # check everything before changing anything
        target = named.get(name)
        if target is None:
            raise ShapeError(f"adapter module {name} is not in this {type(model).__name__}; "
                             f"pass the base model the adapter was trained on")
        if not _is_linear(target):
            raise ShapeError(f"adapter module {name} needs an nn.Linear/Conv1D, the model has a "
                             f"{type(target).__name__}; pass the base model the adapter was trained on")
        n_in, n_out = linear_dims(target)
        if isinstance(mod, RepModule):
            _fit(name, "lora_A (in, r)", (mod.a.rows, mod.a.cols), (n_in, mod.b.rows))
            _fit(name, "lora_B (r, out)", (mod.b.rows, mod.b.cols), (mod.a.cols, n_out))
        elif isinstance(mod, AdpModule):
            dim = n_in if mod.placement == "input" else n_out
            _fit(name, "adapter_down (dim, b)", (mod.down.rows, mod.down.cols), (dim, mod.up.rows))
            _fit(name, "adapter_up (b, dim)", (mod.up.rows, mod.up.cols), (mod.down.cols, dim))
            _fit(name, "adapter_down bias", tuple(mod.down_bias.shape), (mod.down.cols,))
            _fit(name, "adapter_up bias", tuple(mod.up_bias.shape), (dim,))
        elif isinstance(mod, TTDenseModule):
            _fit(name, "dense (in, out)", (mod.weight.rows, mod.weight.cols), (n_in, n_out))
            if mod.bias is not None:
                _fit(name, "dense bias", tuple(mod.bias.shape), (n_out,))
        else:
            raise FormatError(f"adapter module {name} is a {type(mod).__name__}, which LoRETTA "
                              f"models cannot hold; convert the adapter first")
    for pname, tensor in adapter.tensors.items():
        if pname not in params:
            raise ShapeError(f"adapter tensor {pname} is not a parameter of this {type(model).__name__}; "
                             f"pass the base model the adapter was trained on")
        _fit(pname, "tensor", tuple(tensor.shape), tuple(params[pname].shape))
    cfg = _config_of(adapter)
    drop_rep = cfg.lora_dropout if isinstance(cfg, RepConfig) else 0.0
    drop_adp = cfg.adapter_dropout if isinstance(cfg, AdpConfig) else 0.0
    for name, mod in adapter.modules.items():
        base = named[name]
        w = base.weight
        if isinstance(mod, RepModule):
            new: nn.Module = RepLinear.from_tt(base, _tt_from(mod.a, f"{name}.lora_A", like=w),
                                               _tt_from(mod.b, f"{name}.lora_B", like=w),
                                               scale=mod.scale, dropout=drop_rep)
        elif isinstance(mod, AdpModule):
            new = AdapterLinear.from_tt(
                base, _tt_from(mod.down, f"{name}.adapter_down", like=w, bias=mod.down_bias),
                _tt_from(mod.up, f"{name}.adapter_up", like=w, bias=mod.up_bias),
                placement=mod.placement, non_linearity=mod.non_linearity, scaling=mod.scaling,
                dropout=drop_adp)
        else:
            new = _tt_from(mod.weight, f"{name}.tt_dense", like=w, bias=mod.bias)
        _set_module(model, name, new)
    with torch.no_grad():
        for pname, tensor in adapter.tensors.items():
            p = params[pname]
            p.copy_(tensor.to(device=p.device, dtype=p.dtype))
    if cfg.pooling == "mean":
        apply_pooling(model, "mean")
    model.loretta_config = cfg
    names = {id(p): n for n, p in model.named_parameters()}  # names after wrapping
    setattr(model, _FULL, list(dict.fromkeys(names[id(params[n])] for n in adapter.tensors)))
    _set_trainable(model, trainable=is_trainable)
    if not is_trainable:
        model.eval()
    return model


# --------------------------------------------------------------------------- merge

def merge_loretta_model(model: nn.Module) -> nn.Module:
    """Fold rep adapters into the base weights (fp32 sum, one cast) and turn replaced dense
    layers back into ``nn.Linear``; returns the plain transformers model (in place)."""
    adp = [n for n, m in model.named_modules() if isinstance(m, AdapterLinear)]
    if adp:
        raise ConfigError(f"LoRETTA_adp adapters ({adp[0]} and {len(adp) - 1} more) are not linear in "
                          f"their input and cannot be merged into the base weights; deploy them "
                          f"unmerged (e.g. `loretta-merge export onnx`)")
    shared = _shared_parameter_ids(model)
    untied = False
    for name, m in list(_tt_layers(model)):
        if isinstance(m, RepLinear):
            untied |= id(m.base_layer.weight) in shared
            _set_module(model, name, m.merge())  # a new weight: a tied partner keeps its own
        elif isinstance(m, TTLinear):
            w = m.tt_cores[0]
            lin = nn.Linear(m.rows, m.cols, bias=m.bias is not None, device=w.device, dtype=w.dtype)
            with torch.no_grad():
                lin.weight.copy_(m.matrix(torch.float32).T.to(w.dtype))
                if m.bias is not None:
                    lin.bias.copy_(m.bias)
            _set_module(model, name, lin)
    if untied:  # the output projection got its own delta: save and reload it untied
        _untie_config(model)
    for attr in ("loretta_config", _FULL):
        if hasattr(model, attr):
            delattr(model, attr)
    return model


def _shared_parameter_ids(model: nn.Module) -> set[int]:
    return {pid for pid, names in _aliases(model).items() if len(names) > 1}


def _untie_config(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    if config is None:
        return
    config.tie_word_embeddings = False
    text = config.get_text_config() if hasattr(config, "get_text_config") else None
    if text is not None and text is not config:
        text.tie_word_embeddings = False
