"""Which model a merge writes, when the adapter was trained on a task model.

A user fine-tunes ``RobertaForSequenceClassification`` on a checkpoint saved from
``RobertaForMaskedLM`` (``roberta.*`` and an MLM head ``lm_head.*``), or
``BertForSequenceClassification`` on one saved from ``BertForMaskedLM`` (no pooler) or
``BertModel`` (no prefix). The adapter then holds tensors the base lacks (the new head, and
whatever the task model initialised fresh). The merge writes the task model's checkpoint:
its tensor names and layout come from the task class itself, built on the meta device from
the base config (no memory, no weights read), so every tensor it needs is accounted for:
from the base (renamed), from the adapter, or refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import ShapeError
from ..formats import Adapter

_TASK_TABLES = {"SEQ_CLS": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
                "CAUSAL_LM": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
                "TOKEN_CLS": "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES"}


@dataclass
class TaskModel:
    """The task model a merge writes instead of the base checkpoint's own layout."""

    class_name: str  # e.g. "RobertaForSequenceClassification"
    shapes: dict[str, tuple[int, ...]]  # every tensor it saves, by its own name
    base_names: dict[str, str]  # task tensor name -> base tensor it comes from
    id2label: dict[str, str] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)  # base tensors it does not have


def task_class_name(config: dict, adapter: Adapter) -> str | None:
    """The transformers class the adapter was trained on: recorded in its config, else
    derived from its task type and the base's ``model_type``."""
    recorded = adapter.config.get("model_class")
    if recorded:
        return str(recorded)
    table = _TASK_TABLES.get(str(adapter.config.get("task_type") or "").upper())
    if table is None:
        return None
    from transformers.models.auto import modeling_auto

    return getattr(modeling_auto, table).get(config.get("model_type"))


def _labels(adapter: Adapter, new_shapes: dict[str, tuple[int, ...]]) -> dict[str, str]:
    id2label = adapter.config.get("id2label")
    if id2label:
        return {str(k): str(v) for k, v in id2label.items()}
    rows = [shape[0] for name, shape in new_shapes.items()
            if name.endswith(".weight") and len(shape) == 2]
    if rows and str(adapter.config.get("task_type", "")).upper() == "SEQ_CLS":
        return {str(i): f"LABEL_{i}" for i in range(rows[-1])}
    return {}


def _task_shapes(class_name: str, base_dir: str, id2label: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor the task class saves, with shapes, from a model built on the meta device."""
    import transformers

    cls = getattr(transformers, class_name)
    model_config = transformers.AutoConfig.from_pretrained(base_dir, local_files_only=True)
    if id2label:
        model_config.id2label = {int(k): v for k, v in id2label.items()}
        model_config.label2id = {v: int(k) for k, v in id2label.items()}
    with torch.device("meta"):
        model = cls(model_config)
    shapes = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    tied = getattr(model, "_tied_weights_keys", None)
    if isinstance(tied, dict) and getattr(model_config, "tie_word_embeddings", False):
        for target in tied:
            shapes.pop(str(target), None)
    return shapes


def _base_renaming(task_names: list[str], base_keys: set[str], prefix: str):
    """task name -> base name: as is, without the task model's base prefix, or with it."""
    def strip(n: str) -> str:
        return n[len(prefix) + 1:] if prefix and n.startswith(prefix + ".") else n

    def add(n: str) -> str:
        return f"{prefix}.{n}" if prefix else n

    candidates = [lambda n: n, strip, add]
    return max(candidates, key=lambda fn: sum(fn(n) in base_keys for n in task_names))


def plan_task_model(config: dict, adapter: Adapter, label: str, base_shapes: dict[str, tuple],
                    new_shapes: dict[str, tuple[int, ...]], base_dir: str) -> TaskModel:
    """The task model for an adapter that brings tensors the base lacks (``new_shapes``,
    by task name). Raises ShapeError naming what neither the base nor the adapter holds."""
    class_name = task_class_name(config, adapter)
    import transformers

    if not class_name or getattr(transformers, class_name, None) is None:
        names = ", ".join(sorted(new_shapes)[:6])
        raise ShapeError(f"adapter {label} brings tensor(s) {names} that the base checkpoint "
                         f"{base_dir} lacks, and does not say which model class it was trained "
                         f"on; is BASE the model the adapter was trained on? Pass that base "
                         f"(nothing was written)")
    id2label = _labels(adapter, new_shapes)
    shapes = _task_shapes(class_name, base_dir, id2label)
    prefix = getattr(getattr(transformers, class_name), "base_model_prefix", "") or ""
    rename = _base_renaming(list(shapes), set(base_shapes), prefix)
    base_names, problems, missing = {}, [], []
    for name, shape in shapes.items():
        if name in new_shapes:
            if tuple(new_shapes[name]) != shape:
                problems.append(f"{label}: tensor {name} has shape {tuple(new_shapes[name])}, "
                                f"{class_name} needs {shape}")
        elif rename(name) in base_shapes:
            if tuple(base_shapes[rename(name)]) != shape:
                problems.append(f"base tensor {rename(name)} has shape "
                                f"{tuple(base_shapes[rename(name)])}, {class_name} needs {shape}")
            base_names[name] = rename(name)
        else:
            missing.append(name)
    problems += [f"{label}: tensor {n} is not a tensor of {class_name}"
                 for n in sorted(set(new_shapes) - set(shapes))]
    if problems:
        raise ShapeError(f"{len(problems)} tensor(s) do not fit {class_name} built from "
                         f"{base_dir}: {'; '.join(problems[:10])}. Is BASE the model the "
                         f"adapter was trained on? Pass that base (nothing was written)")
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise ShapeError(f"{class_name} needs {shown}, which neither the base checkpoint "
                         f"{base_dir} nor the adapter {label} holds (the task model initialised "
                         f"them fresh in training, so only the adapter can supply them); retrain "
                         f"with a loretta-merge that saves them in the adapter, or merge into a "
                         f"checkpoint that has them (nothing was written)")
    used = set(base_names.values())
    dropped = sorted(k for k in base_shapes if k not in used)
    return TaskModel(class_name=class_name, shapes=shapes, base_names=base_names,
                     id2label=id2label, dropped=dropped)
