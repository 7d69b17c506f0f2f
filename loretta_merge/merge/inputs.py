"""The adapters of a merge: read them, attach their weights, refuse what cannot be merged.

Everything here looks at adapter tensors only (small); no base weight is read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..errors import ConfigError, NumericsError
from ..formats import (
    Adapter,
    AdpModule,
    LoraModule,
    RepModule,
    TTDenseModule,
    is_model_dir,
    read_adapter,
)


@dataclass
class LoadedAdapter:
    """One adapter of the merge, the weight its delta is scaled by, and how to name it."""

    adapter: Adapter
    weight: float
    label: str
    full: Any = None  # a fully fine-tuned checkpoint (merge.full.FullCheckpoint); ``adapter``
    # then stands in for it, with no modules: its deltas are read at run time


def load_adapters(adapters: Sequence, *, allow_unsafe_pickle: bool) -> list[LoadedAdapter]:
    """``adapters`` is a list of ``path``, ``Adapter`` or ``(path or Adapter, weight)``; a
    path may also be a fully fine-tuned model directory (:mod:`.full`)."""
    if not adapters:
        raise ConfigError("no adapter given (adapters=[]); pass at least one adapter directory")
    out = []
    for item in adapters:
        spec, weight = (item if isinstance(item, (tuple, list)) else (item, 1.0))
        try:
            weight = float(weight)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"adapter weight {weight!r} is not a number; give a number such "
                              f"as ADAPTER:0.7") from exc
        if not math.isfinite(weight):
            raise ConfigError(f"adapter weight {weight!r} must be finite; give a number such "
                              f"as ADAPTER:0.7")
        in_memory = isinstance(spec, Adapter)
        if in_memory:
            adapter, label = spec, str(spec.path or "<in memory>")
        elif is_model_dir(spec):  # a fine-tune of the base: its task vector is W_i - W0
            from .full import open_checkpoint

            full = open_checkpoint(spec)
            out.append(LoadedAdapter(full.adapter(), weight, str(spec), full))
            continue
        else:
            adapter = read_adapter(spec, allow_unsafe_pickle=allow_unsafe_pickle)
            label = str(spec)
        refuse_unmergeable(adapter, label)
        # read_adapter has already checked every tensor of the file it read
        check_finite_adapter(adapter, label, tensors=in_memory)
        out.append(LoadedAdapter(adapter, weight, label))
    return out


def refuse_unmergeable(adapter: Adapter, label: str) -> None:
    """adp adapters (a non-linearity between two projections) cannot be folded into weights."""
    adp = [m for m, mod in adapter.modules.items() if isinstance(mod, AdpModule)]
    if adapter.method == "adp" or adp:
        raise ConfigError(
            f"adapter {label} is LoRETTA_adp (bottleneck adapters with a non-linearity), which "
            f"cannot be folded into the base weights; deploy it unmerged instead: "
            f"`loretta-merge export onnx MODEL --adapter {label} -o OUT`")


def _not_finite(t: torch.Tensor) -> bool:
    return t.is_floating_point() and not bool(torch.isfinite(t).all())


def _parts(mod) -> dict[str, list[torch.Tensor]]:
    if isinstance(mod, RepModule):
        return {"lora_A": mod.a.cores, "lora_B": mod.b.cores}
    if isinstance(mod, LoraModule):
        parts = {"lora_A": [mod.a], "lora_B": [mod.b]}
        if mod.magnitude is not None:
            parts["magnitude"] = [mod.magnitude]
        return parts
    return {"tt_dense": mod.weight.cores, "bias": [mod.bias] if mod.bias is not None else []}


def check_finite_adapter(adapter: Adapter, label: str, *, tensors: bool = True) -> None:
    """NaN/Inf anywhere in the adapter is refused before any base weight is read;
    ``tensors=False``: the scales only (the tensors were checked when the file was read)."""
    for m, mod in adapter.modules.items():
        for part, parts in (_parts(mod).items() if tensors else ()):
            if any(_not_finite(t) for t in parts):
                raise NumericsError(f"adapter {label}: module {m} ({part}) holds NaN or Inf "
                                    f"values; the adapter is corrupt or its training diverged; "
                                    f"retrain it or pass another adapter (nothing was written)")
        if not math.isfinite(float(getattr(mod, "scale", 1.0))):
            raise NumericsError(f"adapter {label}: module {m} has a non-finite scale {mod.scale}; "
                                f"fix lora_alpha/r in its adapter_config.json")
    for name, t in (adapter.tensors.items() if tensors else ()):
        if _not_finite(t):
            raise NumericsError(f"adapter {label}: tensor {name} holds NaN or Inf values; the "
                                f"adapter is corrupt or its training diverged; retrain it or "
                                f"pass another adapter (nothing was written)")


def module_dims(mod) -> tuple[int, int]:
    """(in features, out features) of the layer an adapter module changes."""
    if isinstance(mod, RepModule):
        return mod.a.rows, mod.b.cols
    if isinstance(mod, LoraModule):
        return int(mod.a.shape[1]), int(mod.b.shape[0])
    if isinstance(mod, TTDenseModule):
        return mod.weight.rows, mod.weight.cols
    raise ConfigError(f"adapter module of kind {type(mod).__name__} cannot be merged; "
                      f"convert the adapter to rep or LoRA first")
