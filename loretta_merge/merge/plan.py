"""The merge plan: every output tensor, where it comes from and what is added to it.

Built from the base checkpoint's header (names, shapes, dtypes) and the adapters alone, so
every mismatch is found, and reported all at once, before any base weight is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable

import torch

from ..errors import ConfigError, ShapeError
from ..formats import Adapter, LoraModule, RepModule, TTDenseModule, TTMatrix
from ..io import CheckpointReader
from .inputs import LoadedAdapter, module_dims
from .task import TaskModel, plan_task_model

_KNOWN_PREFIXES = ("model", "transformer", "bert", "roberta", "deberta", "gpt_neox", "decoder")


class OpKind(Enum):
    LOW_RANK = "low-rank"  # W += weight * left @ right
    REPLACE = "replace"  # W becomes value: W = weight * value + (1 - weight) * W0
    DENSE = "dense"  # a TT matrix replaces W, weighted like REPLACE
    FULL = "full"  # a fine-tuned checkpoint's tensor W_i: W += weight * (W_i - W0)


@dataclass
class Op:
    """One adapter's contribution to one tensor."""

    kind: OpKind
    weight: float
    source: str  # "adapter label:module" for messages
    left: torch.Tensor | None = None  # LOW_RANK (rows, r), fp32
    right: torch.Tensor | None = None  # LOW_RANK (r, cols), fp32
    value: torch.Tensor | TTMatrix | Any = None  # REPLACE tensor, DENSE TT matrix (in, out),
    # FULL: the fine-tune's tensor to read beside the base (a merge.full.FullTensor)
    transpose: bool = False  # DENSE: the stored weight is the TT matrix transposed
    magnitude: torch.Tensor | None = None  # DoRA: the merged weight's per-output norms
    norm_dim: int = 1  # DoRA: 1 = one norm per row (Linear), 0 = per column (Conv1D)
    adapter_weight: float = 1.0  # the weight the user gave the adapter
    input: int = -1  # which adapter of the merge (its index) the op comes from


@dataclass
class OutputTensor:
    """One tensor of the output checkpoint."""

    name: str
    source: str | None  # the base tensor it is computed from; None: from the adapter alone
    shape: tuple[int, ...]
    dtype: torch.dtype
    ops: list[Op] = field(default_factory=list)  # none: a plain copy


@dataclass
class MergePlan:
    adapters: list[LoadedAdapter]
    outputs: list[OutputTensor]  # in the order they are written
    rep_factors: list[tuple[RepModule, Op]]  # LOW_RANK ops whose factors are TT-reconstructed
    main_dtype: torch.dtype
    untied: list[str] = field(default_factory=list)  # output embeddings no longer tied
    task: TaskModel | None = None  # set when the output is a task model, not the base layout
    task_vectors: Any = None  # a merge.task_vectors.TaskVectorMerge for a method not linear

    def reads(self) -> list[str]:
        """Base tensors to read, in checkpoint order, each once."""
        return list(dict.fromkeys(o.source for o in self.outputs if o.source is not None))

    def elements(self) -> int:
        return sum(_numel(o.shape) for o in self.outputs)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


# --------------------------------------------------------------------------- naming

def _renamings(base_keys: set[str]) -> list[Callable[[str], str]]:
    firsts = sorted({k.split(".", 1)[0] for k in base_keys if "." in k} | set(_KNOWN_PREFIXES))
    out: list[Callable[[str], str]] = [lambda n: n]
    for p in firsts:
        out.append(lambda n, p=p: n[len(p) + 1:] if n.startswith(p + ".") else n)
        out.append(lambda n, p=p: f"{p}.{n}")
    return out


def _targets_of(adapter: Adapter) -> list[str]:
    names = [f"{m}.weight" for m in adapter.modules]
    names += [f"{m}.bias" for m, mod in adapter.modules.items() if isinstance(mod, TTDenseModule)]
    return names + list(adapter.tensors)


def pick_renaming(adapter: Adapter, known: set[str]) -> Callable[[str], str]:
    """The renaming (as is, or a base-model prefix such as ``bert.`` added or dropped) that
    maps the most adapter targets onto base tensors."""
    targets = _targets_of(adapter)
    return max(_renamings(known), key=lambda fn: sum(fn(t) in known for t in targets))


def tied_pairs(config: dict) -> dict[str, str]:
    """{output embedding: input embedding} when the config ties them."""
    if not config.get("tie_word_embeddings", True):
        return {}
    import transformers

    pairs: dict[str, str] = {}
    for arch in config.get("architectures") or []:
        keys = getattr(getattr(transformers, arch, None), "_tied_weights_keys", None)
        if isinstance(keys, dict):
            pairs.update({str(k): str(v) for k, v in keys.items()})
    return pairs


# --------------------------------------------------------------------------- ops

@dataclass
class _Collected:
    ops: dict[str, list[Op]] = field(default_factory=dict)  # by base key
    new: dict[str, tuple[tuple[int, ...], Op, str]] = field(default_factory=dict)  # by adapter name
    rep: list[tuple[RepModule, Op]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    head: LoadedAdapter | None = None


def _module_op(mod, w: float, source: str, fifo: bool) -> Op:
    transpose = not fifo  # a Linear stores (out, in) = delta.T
    if isinstance(mod, LoraModule):
        a, b = mod.a.float(), mod.b.float()  # (r, in), (out, r)
        left, right = (b, a) if transpose else (a.T.contiguous(), b.T.contiguous())
        magnitude = mod.magnitude.float().reshape(-1) if mod.magnitude is not None else None
        return Op(OpKind.LOW_RANK, w * mod.scale, source, left=left, right=right,
                  magnitude=magnitude, norm_dim=1 if transpose else 0, adapter_weight=w)
    if isinstance(mod, RepModule):
        return Op(OpKind.LOW_RANK, w * mod.scale, source, transpose=transpose)
    return Op(OpKind.DENSE, w, source, value=mod.weight, transpose=transpose)


def _add_new(col: _Collected, item: LoadedAdapter, name: str, shape: tuple, op: Op) -> None:
    """A full tensor the base lacks (a task head, a pooler the base never had)."""
    if op.weight != 1.0:
        col.problems.append(f"{item.label}: tensor {name} is not in the base, so it cannot be "
                            f"weighted ({op.weight:g}); merge this adapter with weight 1")
        return
    if name in col.new:
        col.problems.append(f"{item.label}: tensor {name} is also given by {col.new[name][2]}")
        return
    col.new[name] = (shape, op, item.label)
    col.head = col.head or item


def _collect_modules(col: _Collected, item: LoadedAdapter, rename, known: set, shape_of) -> None:
    adapter, label = item.adapter, item.label
    for m, mod in adapter.modules.items():
        key, n_in, n_out = rename(f"{m}.weight"), *module_dims(mod)
        fifo = m in adapter.fan_in_fan_out
        want = (n_in, n_out) if fifo else (n_out, n_in)
        if key not in known:
            if isinstance(mod, TTDenseModule):  # the whole weight: a tensor the base lacks
                _add_new(col, item, f"{m}.weight", want, _module_op(mod, item.weight, f"{label}:{m}", fifo))
                if mod.bias is not None:
                    _add_new(col, item, f"{m}.bias", tuple(mod.bias.shape),
                             Op(OpKind.REPLACE, item.weight, f"{label}:{m}.bias", value=mod.bias))
            else:
                col.problems.append(f"{label}: module {m} has no base tensor {key}")
            continue
        found = shape_of(key)
        if found != want:
            if found == want[::-1] and len(found) == 2:
                fifo = not fifo  # the base stores the other orientation (Linear vs Conv1D)
            else:
                col.problems.append(f"{label}: module {m} expects {key} of shape {want}, the base "
                                    f"has {found}")
                continue
        op = _module_op(mod, item.weight, f"{label}:{m}", fifo)
        if isinstance(mod, RepModule):
            col.rep.append((mod, op))
        col.ops.setdefault(key, []).append(op)
        if isinstance(mod, TTDenseModule) and rename(f"{m}.bias") in known:
            _dense_bias(col, item, m, mod, rename(f"{m}.bias"), shape_of)


def _dense_bias(col: _Collected, item: LoadedAdapter, m: str, mod, key: str, shape_of) -> None:
    bias = mod.bias.float() if mod.bias is not None else torch.zeros(shape_of(key))
    if tuple(bias.shape) != shape_of(key):
        col.problems.append(f"{item.label}: module {m} has a bias of shape {tuple(bias.shape)}, "
                            f"the base has {shape_of(key)}")
        return
    col.ops.setdefault(key, []).append(Op(OpKind.REPLACE, item.weight, f"{item.label}:{m}.bias",
                                          value=bias))


def _collect_tensors(col: _Collected, item: LoadedAdapter, rename, known: set, shape_of) -> None:
    for name, t in item.adapter.tensors.items():
        key = rename(name)
        op = Op(OpKind.REPLACE, item.weight, f"{item.label}:{name}", value=t)
        if key not in known:
            _add_new(col, item, name, tuple(t.shape), op)
        elif tuple(t.shape) != shape_of(key):
            col.problems.append(f"{item.label}: tensor {name} has shape {tuple(t.shape)}, the base "
                                f"tensor {key} has {shape_of(key)}")
        else:
            col.ops.setdefault(key, []).append(op)


def _check_combinations(ops: dict[str, list[Op]]) -> None:
    for key, key_ops in ops.items():
        dora = [op for op in key_ops if op.magnitude is not None]
        if dora and (len(key_ops) > 1 or dora[0].adapter_weight != 1.0):
            raise ConfigError(f"{key}: a DoRA module ({dora[0].source}) rescales the whole merged "
                              f"weight, so it cannot be summed with other adapters or weighted; "
                              f"merge it alone with weight 1")
        full = [op.source for op in key_ops if op.kind in (OpKind.REPLACE, OpKind.DENSE)]
        if len(full) > 1:
            raise ConfigError(f"tensor {key} is replaced by several adapters ({', '.join(full)}); "
                              f"a full replacement cannot be summed; merge these adapters one at a time")


def _raise_problems(problems: list[str], base_dir) -> None:
    if problems:
        shown = "; ".join(problems[:20]) + (f"; ... and {len(problems) - 20} more"
                                          if len(problems) > 20 else "")
        raise ShapeError(f"{len(problems)} adapter target(s) do not fit the base checkpoint "
                         f"{base_dir}: {shown}. Is BASE the model the adapter was trained on? "
                         f"Pass that base (nothing was written)")


# --------------------------------------------------------------------------- the plan

def build_plan(reader: CheckpointReader, config: dict, adapters: list[LoadedAdapter], *,
               out_dtype: torch.dtype | None) -> MergePlan:
    """Map every adapter target onto the base (or onto the task model the adapter was
    trained on), check every shape, and lay out the output. Reads no base weight."""
    present = set(reader.keys())
    tied = tied_pairs(config)
    virtual = {t: s for t, s in tied.items() if t not in present and s in present}
    known = present | set(virtual)

    def shape_of(key: str) -> tuple[int, ...]:
        return reader.shape(virtual.get(key, key))

    from .full import full_ops

    col = _Collected()
    for index, item in enumerate(adapters):
        if item.full is not None:  # a fine-tuned checkpoint: one FULL op per tensor it holds
            for key, op in full_ops(item, index, virtual, reader, config).items():
                col.ops.setdefault(key, []).append(op)
            continue
        rename = pick_renaming(item.adapter, known)
        _collect_modules(col, item, rename, known, shape_of)
        _collect_tensors(col, item, rename, known, shape_of)
        for op in [op for ops in col.ops.values() for op in ops] + [n[1] for n in col.new.values()]:
            if op.input < 0:
                op.input = index
    _raise_problems(col.problems, reader.model_dir)
    _check_combinations(col.ops)
    dtypes = [reader.dtype(k) for k in reader.keys() if reader.dtype(k).is_floating_point]
    main = out_dtype or (max(set(dtypes), key=dtypes.count) if dtypes else torch.float32)

    def dtype_of(key: str) -> torch.dtype:
        stored = reader.dtype(virtual.get(key, key))
        return out_dtype if (out_dtype is not None and stored.is_floating_point) else stored

    plan = MergePlan(adapters=adapters, outputs=[], rep_factors=col.rep, main_dtype=main)
    if col.new:
        _lay_out_task_model(plan, reader, config, col, dtype_of)
    else:
        _lay_out_base(plan, reader, tied, virtual, col.ops, dtype_of)
    return plan


def _lay_out_base(plan: MergePlan, reader: CheckpointReader, tied: dict, virtual: dict,
                  ops: dict[str, list[Op]], dtype_of) -> None:
    """Output = the base layout; an output embedding tied to a changed input embedding is
    written untied (from the input embedding's stored values)."""
    present = set(reader.keys())
    from .full import stays_tied

    # a pair that only tied fine-tunes change (through its one stored embedding) stays tied
    untie = {t: s for t, s in virtual.items()
             if (t in ops or s in ops) and not stays_tied(ops.get(t), ops.get(s))}
    # both stored but tied by the config: a changed one must not be re-tied on load
    stored_twice = [t for t, s in tied.items() if t in present and s in present
                    and (t in ops or s in ops)]
    plan.untied = sorted(list(untie) + stored_twice)
    for key in reader.keys():
        plan.outputs.append(OutputTensor(key, key, reader.shape(key), dtype_of(key), ops.get(key, [])))
        for t in sorted(t for t, s in untie.items() if s == key):
            plan.outputs.append(OutputTensor(t, key, reader.shape(key), dtype_of(t), ops.get(t, [])))


def _lay_out_task_model(plan: MergePlan, reader: CheckpointReader, config: dict, col: _Collected,
                        dtype_of) -> None:
    """Output = the task model the adapter was trained on: base tensors under its names,
    the adapter's new tensors, the base's own head (an MLM head, say) dropped."""
    head = col.head
    base_shapes = {k: reader.shape(k) for k in reader.keys()}
    task = plan_task_model(config, head.adapter, head.label, base_shapes,
                           {n: shape for n, (shape, _, _) in col.new.items()}, str(reader.model_dir))
    task_name = {b: t for t, b in task.base_names.items()}
    lost = sorted(k for k in col.ops if k not in task_name)
    if lost:
        raise ShapeError(f"the adapter changes {', '.join(lost[:5])}, which {task.class_name} "
                         f"does not have; is BASE the model the adapter was trained on? Pass "
                         f"that base (nothing was written)")
    for key in reader.keys():
        if key in task_name:
            plan.outputs.append(OutputTensor(task_name[key], key, reader.shape(key), dtype_of(key),
                                             col.ops.get(key, [])))
    for name, (shape, op, _) in col.new.items():
        plan.outputs.append(OutputTensor(name, None, tuple(shape), plan.main_dtype, [op]))
    plan.task = task
