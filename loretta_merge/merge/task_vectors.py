"""Merges by a task-vector method other than ``linear`` (``--method ties``, ``dare_ties``...).

Per base tensor: each input's delta in fp32 (an adapter's low-rank product, as the linear
merge adds it; a full tensor the adapter replaces, or a fine-tuned checkpoint's tensor: its
value minus W0, both upcast first), zeros for an input that does not touch the tensor; the
method (:mod:`loretta_merge.methods`) combines them; ``W0 + combined`` is cast once.

A method with a recipe (every method but PEFT's ``*_svd`` forms) runs in chunks of rows
(:mod:`loretta_merge.methods.stream`): the deltas are computed chunk by chunk, again for
each pass the method needs over the whole tensor (the histograms of a magnitude cut, the
norms of a rescale), so memory is a few chunks per input, not whole fp32 copies; the one
exception is a cut through equal magnitudes, where that input's magnitude is gathered once
and sorted as mergekit sorts it. The other methods get whole tensors (about inputs + 4 fp32
copies of the tensor).

The plan is built with every adapter at weight 1 (so an op's delta is the adapter's own),
and the user's weights go to the method, as mergekit passes them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConfigError
from ..methods import Method, OwnedDeltas, get_method, tensor_generator
from .kernel import RangeCheck
from .plan import MergePlan, Op, OpKind


@dataclass
class TaskVectorMerge:
    """The method of a merge, its resolved parameters, the inputs' weights and the seed."""

    method: Method
    params: dict[str, Any]
    weights: list[float]
    seed: int | None = None

    def generator(self, tensor: str) -> torch.Generator | None:
        return tensor_generator(self.seed, tensor) if self.method.random else None

    def describe(self) -> dict:
        params = {k: list(v) if isinstance(v, tuple) else v for k, v in self.params.items()}
        return {"method": self.method.name, "params": params, "seed": self.seed}


def resolve_method(name: str, params: Mapping[str, Any] | None, seed: int | None,
                   weights: Sequence[float]) -> TaskVectorMerge | None:
    """Check the method, its parameters and the seed (before anything is read); None for
    ``linear`` with no parameters (the streaming kernel's own rule)."""
    method = get_method(name)
    resolved = method.resolve(params, n_inputs=len(weights))
    if method.random and seed is None:
        raise ConfigError(f"--method {name} draws random masks; pass --seed N so the merge "
                          f"can be reproduced (the same seed gives the same bytes)")
    if not method.random and seed is not None:
        raise ConfigError(f"--seed applies to the methods that draw random masks; "
                          f"--method {name} draws none: remove --seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ConfigError(f"--seed {seed!r}: give a non-negative integer, e.g. --seed 0")
    if name == "linear":
        return None
    return TaskVectorMerge(method, resolved, [float(w) for w in weights], seed)


def check_plan(plan: MergePlan, tv: TaskVectorMerge) -> None:
    """What a task-vector method cannot combine, refused before any base weight is read."""
    name = tv.method.name
    if plan.task is not None:
        raise ConfigError(f"an adapter brings tensors the base lacks ({plan.task.class_name}'s "
                          f"head); --method {name} combines changes of tensors the base has: "
                          f"merge it with --method linear")
    for out in plan.outputs:
        for op in out.ops:
            if op.magnitude is not None:
                raise ConfigError(f"{op.source} is DoRA, which rescales the whole merged weight "
                                  f"rather than adding a delta; --method {name} cannot combine "
                                  f"it: merge it alone with --method linear")


def _op_delta(op: Op, w0: torch.Tensor, device: torch.device,
              full: dict[int, torch.Tensor]) -> torch.Tensor:
    """One op's change of the tensor in fp32, in the stored orientation (``w0``: fp32)."""
    if op.kind is OpKind.LOW_RANK:
        return torch.mm(op.left.to(device), op.right.to(device)).mul_(op.weight)
    if op.kind is OpKind.FULL:  # a fine-tuned checkpoint's tensor, read beside W0
        new = full[id(op)].to(device, torch.float32)
    elif op.kind is OpKind.REPLACE:
        new = op.value.to(device, torch.float32)
    else:  # DENSE: a TT matrix (in, out)
        mat = op.value.matrix(dtype=torch.float32).to(device)
        new = mat.T if op.transpose else mat
    return (new.reshape(w0.shape) - w0) * op.weight


def merge_tensor_task_vectors(name: str, w0: torch.Tensor, ops: list[Op], out: torch.Tensor,
                              tv: TaskVectorMerge, device: torch.device,
                              full: dict[int, torch.Tensor] | None = None) -> RangeCheck:
    """Write ``W0 + method(deltas)`` into ``out`` (the output dtype): one cast, its range.
    ``full``: the fine-tunes' tensors of FULL ops, by ``id(op)``."""
    if tv.method.recipe is not None:
        return _merge_streamed(name, w0, ops, out, tv, device, full or {})
    base = w0.to(device, torch.float32, copy=True)
    deltas: list[torch.Tensor | None] = [None] * len(tv.weights)
    d = None
    for op in ops:
        d = _op_delta(op, base, device, full or {})
        deltas[op.input] = d if deltas[op.input] is None else deltas[op.input].add_(d)
    # handed over: the method drops each delta once it is pruned (its memory returns early)
    given = OwnedDeltas(torch.zeros_like(base) if d is None else d for d in deltas)
    del deltas, d
    combined = tv.method.combine(given, tv.weights, tv.params, tv.generator(name))
    base.add_(combined.reshape(base.shape))
    return _range_and_copy(name, ops, base, out, None)


def _range_and_copy(name: str, ops: list[Op], merged: torch.Tensor, out: torch.Tensor,
                    rows: slice | None, seen: RangeCheck | None = None) -> RangeCheck:
    """Copy ``merged`` (fp32) into ``out[rows]`` and widen ``seen``'s range by it."""
    if merged.numel():
        low, high = torch.aminmax(merged)
    else:
        low, high = torch.full((), math.inf), torch.full((), -math.inf)
    (out if rows is None else out[rows]).copy_(merged.to(out.device))
    if seen is None:
        return RangeCheck(name, ops, low, high, out.dtype)
    seen.low, seen.high = torch.minimum(seen.low, low), torch.maximum(seen.high, high)
    return seen


def _merge_streamed(name: str, w0: torch.Tensor, ops: list[Op], out: torch.Tensor,
                    tv: TaskVectorMerge, device: torch.device,
                    full: dict[int, torch.Tensor]) -> RangeCheck:
    """The method's recipe run over ``rows`` chunks (:mod:`loretta_merge.methods.stream`):
    each input's delta is computed per chunk, again for each pass the method needs (a
    low-rank product of those rows, a fine-tune's rows minus W0's), so memory is a few
    chunks rather than inputs + 4 fp32 copies of the tensor."""
    shape = tuple(w0.shape)
    w0 = w0.to(device)  # once (a GPU merge reads its rows in every pass)
    by_input: list[list[Op]] = [[] for _ in tv.weights]
    for op in ops:
        by_input[op.input].append(op)
    whole = {}  # the values of REPLACE / DENSE ops, in the stored orientation, fp32
    for op in ops:
        if op.kind is OpKind.REPLACE:
            whole[id(op)] = op.value.to(device, torch.float32).reshape(shape)
        elif op.kind is OpKind.DENSE:
            mat = op.value.matrix(dtype=torch.float32).to(device)
            whole[id(op)] = (mat.T if op.transpose else mat).reshape(shape)
        elif op.kind is OpKind.FULL:
            whole[id(op)] = full[id(op)].to(device).reshape(shape)
        elif op.kind is OpKind.LOW_RANK:
            op.left, op.right = op.left.to(device), op.right.to(device)

    def rows_of(t: torch.Tensor, rows: slice | None) -> torch.Tensor:
        return t if rows is None else t[rows]

    def source(rows: slice | None, i: int) -> torch.Tensor:
        w0_rows = None
        delta = None
        for op in by_input[i]:
            if op.kind is OpKind.LOW_RANK:
                d = torch.mm(rows_of(op.left, rows), op.right)
                d = d.reshape(rows_of(w0, rows).shape)
            else:
                if w0_rows is None:
                    w0_rows = rows_of(w0, rows).to(device, torch.float32)
                d = rows_of(whole[id(op)], rows).to(device, torch.float32, copy=True)
                d.sub_(w0_rows)
            if op.weight != 1:
                d.mul_(op.weight)
            delta = d if delta is None else delta.add_(d)
        if delta is None:
            delta = torch.zeros(rows_of(w0, rows).shape, dtype=torch.float32, device=device)
        return delta

    from ..methods.stream import stream
    seen = None
    for rows, combined in stream(tv.method.recipe(tv.params), tv.weights, shape, source,
                                 tv.generator(name)):
        merged = rows_of(w0, rows).to(device, torch.float32, copy=True)
        merged.add_(combined.reshape(merged.shape))
        seen = _range_and_copy(name, ops, merged, out, rows, seen)
    return seen
