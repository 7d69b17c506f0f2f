"""Getting LoRETTA adapters back out of a model, and into one: :func:`adapter_from_model`,
:func:`save_loretta_adapter`, :func:`load_loretta_model` (every shape checked) and
:func:`merge_loretta_model` (folds rep adapters into the base weights; a tied output
projection gets its own weight). The injection half is :mod:`loretta_merge.adapters.inject`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .config import AdpConfig, RepConfig, config_from_dict
from ..errors import ConfigError, FormatError, ShapeError
from .layers import AdapterLinear, RepLinear, TTLinear, linear_dims
from .inject import FULL_TENSORS_ATTR, is_linear, set_module, set_trainable, tt_layers
from ..pooling import apply_pooling

if TYPE_CHECKING:
    from ..formats import Adapter

def _tt_matrix(layer: TTLinear):
    from ..formats import TTMatrix

    return TTMatrix(cores=[c.detach() for c in layer.tt_cores], rows=layer.rows, cols=layer.cols)


def adapter_from_model(model: nn.Module) -> "Adapter":
    """Every trained tensor of a LoRETTA model as a :class:`formats.Adapter`: TT cores,
    adapter biases, replaced dense layers, norms, heads and modules_to_save."""
    from ..formats import Adapter, AdpModule, RepModule, TTDenseModule

    config = getattr(model, "loretta_config", None)
    if config is None:
        raise ConfigError(f"this {type(model).__name__} has no LoRETTA adapters; "
                          f"call get_loretta_model or load_loretta_model first")
    modules: dict[str, Any] = {}
    fan_in_fan_out: set[str] = set()
    for name, m in tt_layers(model):
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
    for pname in getattr(model, FULL_TENSORS_ATTR, []):
        p = model.get_parameter(pname)
        for name in aliases.get(id(p), [_clean(pname)]):
            tensors[name] = p.detach()
    return tensors


def save_loretta_adapter(model: nn.Module, path: str | Path, *, force: bool = False,
                         base_model_name_or_path: str | None = None) -> Path:
    """Write the model's adapter directory (our format) atomically; returns the path."""
    from ..formats import write_adapter

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
    from ..formats import AdpModule, RepModule, TTDenseModule, read_adapter

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
        if not is_linear(target):
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
        set_module(model, name, new)
    with torch.no_grad():
        for pname, tensor in adapter.tensors.items():
            p = params[pname]
            p.copy_(tensor.to(device=p.device, dtype=p.dtype))
    if cfg.pooling == "mean":
        apply_pooling(model, "mean")
    model.loretta_config = cfg
    names = {id(p): n for n, p in model.named_parameters()}  # names after wrapping
    setattr(model, FULL_TENSORS_ATTR, list(dict.fromkeys(names[id(params[n])] for n in adapter.tensors)))
    set_trainable(model, trainable=is_trainable)
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
    for name, m in list(tt_layers(model)):
        if isinstance(m, RepLinear):
            untied |= id(m.base_layer.weight) in shared
            set_module(model, name, m.merge())  # a new weight: a tied partner keeps its own
        elif isinstance(m, TTLinear):
            w = m.tt_cores[0]
            lin = nn.Linear(m.rows, m.cols, bias=m.bias is not None, device=w.device, dtype=w.dtype)
            with torch.no_grad():
                lin.weight.copy_(m.matrix(torch.float32).T.to(w.dtype))
                if m.bias is not None:
                    lin.bias.copy_(m.bias)
            set_module(model, name, lin)
    if untied:  # the output projection got its own delta: save and reload it untied
        _untie_config(model)
    for attr in ("loretta_config", FULL_TENSORS_ATTR):
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
