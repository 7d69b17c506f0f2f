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
from ..methods.stream import stream
from . import kernel
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


def merge_tensor_task_vectors(name: str, w0: torch.Tensor, ops: list[Op], out: torch.Tensor,
                              tv: TaskVectorMerge, device: torch.device,
                              full: dict[int, torch.Tensor] | None = None) -> RangeCheck:
    """Write ``W0 + method(deltas)`` into ``out`` (the output dtype): one cast, its range.
    ``full``: the fine-tunes' tensors of FULL ops, by ``id(op)``."""
    w0 = w0.to(device)  # once (a GPU merge reads its rows in every pass)
    source = _delta_source(w0, ops, len(tv.weights), device, full or {})
    if tv.method.recipe is not None:
        return _merge_streamed(name, w0, ops, out, tv, source)
    # PEFT's *_svd forms: whole dense deltas, handed over (the method drops each once it is
    # pruned, so its memory returns early)
    given = OwnedDeltas(source(None, i) for i in range(len(tv.weights)))
    combined = tv.method.combine(given, tv.weights, tv.params, tv.generator(name))
    base = w0.to(torch.float32, copy=True)
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


def _rows_of(t: torch.Tensor, rows: slice | None) -> torch.Tensor:
    return t if rows is None else t[rows]


def _delta_source(w0: torch.Tensor, ops: list[Op], n_inputs: int, device: torch.device,
                  full: dict[int, torch.Tensor]):
    """``source(rows, i)``: input ``i``'s change of ``rows`` of the tensor (None: all of it)
    in fp32, in the stored orientation, as a new tensor: its ops' low-rank products of those
    rows, or their full values (a fine-tune's tensor, one the adapter replaces, a TT matrix)
    minus W0's rows, each times its weight; zeros where the input does not touch it."""
    shape = tuple(w0.shape)
    kernel.ops_to(ops, device)
    whole = {k: v.reshape(shape) for k, v in kernel._full_values(ops, device).items()}
    whole.update({id(op): full[id(op)].to(device).reshape(shape)
                  for op in ops if op.kind is OpKind.FULL})
    by_input: list[list[Op]] = [[] for _ in range(n_inputs)]
    for op in ops:
        by_input[op.input].append(op)

    def source(rows: slice | None, i: int) -> torch.Tensor:
        w0_rows = None
        delta = None
        for op in by_input[i]:
            if op.kind is OpKind.LOW_RANK:
                d = torch.mm(_rows_of(op.left, rows), op.right)
                d = d.reshape(_rows_of(w0, rows).shape)
            else:
                if w0_rows is None:
                    w0_rows = _rows_of(w0, rows).to(device, torch.float32)
                d = _rows_of(whole[id(op)], rows).to(device, torch.float32, copy=True)
                d.sub_(w0_rows)
            if op.weight != 1:
                d.mul_(op.weight)
            delta = d if delta is None else delta.add_(d)
        if delta is None:
            delta = torch.zeros(_rows_of(w0, rows).shape, dtype=torch.float32, device=device)
        return delta

    return source


def _merge_streamed(name: str, w0: torch.Tensor, ops: list[Op], out: torch.Tensor,
                    tv: TaskVectorMerge, source) -> RangeCheck:
    """The method's recipe run over chunks of rows (:mod:`loretta_merge.methods.stream`):
    ``source`` computes each input's delta per chunk, again for each pass the method needs,
    so memory is a few chunks rather than inputs + 4 fp32 copies of the tensor."""
    seen = None
    for rows, combined in stream(tv.method.recipe(tv.params), tv.weights, tuple(w0.shape),
                                 source, tv.generator(name)):
        merged = _rows_of(w0, rows).to(torch.float32, copy=True)
        merged.add_(combined.reshape(merged.shape))
        seen = _range_and_copy(name, ops, merged, out, rows, seen)
    return seen
