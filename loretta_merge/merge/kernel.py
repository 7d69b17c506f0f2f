"""The per-tensor update: ``W = W0 + sum_i w_i * delta_i`` in fp32, cast once, checked.

A delta is an adapter's low-rank product, a full tensor it replaces (``w * (new - W0)``), or
a fine-tuned checkpoint's tensor (``w * (W_i - W0)``, the difference of the upcast values).

Two variants of one arithmetic (:func:`_update`):

- CPU (:func:`merge_tensor_cpu`): a 2-D tensor is processed in blocks of rows that fit in
  cache, through one reusable fp32 scratch buffer, so the upcast, the rank-r update, the
  min/max scan and the cast back each touch a block while it is in cache, and no buffer
  is allocated per tensor. The result goes into a caller-owned output buffer.
- device (:func:`merge_tensor_device`): the tensor as stored (bf16, say) is copied from a
  pinned buffer to the device without blocking; the upcast, update, scan and cast run on
  the device; the result is copied back into a pinned buffer without blocking. Nothing
  here waits for the device: the min/max stay on the device until :func:`check_ranges`
  looks at a whole shard's worth at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import tt
from ..errors import NumericsError
from ..io import dtype_name
from .plan import Op, OpKind

BLOCK_ELEMS = 256 * 1024  # fp32 elements per CPU block: 1 MiB, cache-sized
FULL_BLOCK_ELEMS = 64 * 1024  # with fine-tunes' differences beside it (merge_tensor_cpu)
_FACTOR_BATCH_BYTES = 256 * 2**20  # TT reconstruction chunk budget


def full_scratch_elems(n_full: int) -> int:
    """The fp32 elements of :func:`merge_tensor_cpu`'s ``delta_scratch`` for ``n_full``
    FULL ops (one block of differences each)."""
    return n_full * FULL_BLOCK_ELEMS


@dataclass
class RangeCheck:
    """The min and max of one merged tensor (0-d tensors, possibly still on the device)."""

    name: str
    ops: list[Op]
    low: torch.Tensor
    high: torch.Tensor
    dtype: torch.dtype


def materialize_factors(rep_factors: list[tuple], device: torch.device) -> None:
    """Fill ``left``/``right`` of every rep op with its TT factors, reconstructed on
    ``device`` in batches of same-shaped TTs: A (in, r), B (r, out)."""
    groups: dict[tuple, list[tuple]] = {}
    for mod, op in rep_factors:
        for part, ttm in (("a", mod.a), ("b", mod.b)):
            sig = (tuple(tuple(c.shape) for c in ttm.cores), ttm.rows, ttm.cols)
            groups.setdefault(sig, []).append((ttm, op, part))
    factors: dict[int, dict[str, torch.Tensor]] = {}
    for (_, rows, cols), items in groups.items():
        chunk = max(1, _FACTOR_BATCH_BYTES // max(1, rows * cols * 4))
        for start in range(0, len(items), chunk):
            part_items = items[start:start + chunk]
            cores = tt.stack_tts([[c.to(device, torch.float32) for c in ttm.cores]
                                  for ttm, _, _ in part_items])
            mats = tt.reconstruct_batched(cores, rows, cols, dtype=torch.float32)
            for (_, op, part), mat in zip(part_items, mats):
                factors.setdefault(id(op), {})[part] = mat.clone()
    for _, op in rep_factors:
        a, b = factors[id(op)]["a"], factors[id(op)]["b"]
        # Linear W (out, in) += s * B.T @ A.T ; Conv1D W (in, out) += s * A @ B
        left, right = (b.T, a.T) if op.transpose else (a, b)
        op.left, op.right = left.contiguous(), right.contiguous()


def ops_to(ops: list[Op], device: torch.device) -> None:
    """Move the small per-op tensors (LoRA factors, DoRA norms) to ``device`` once."""
    for op in ops:
        if op.left is not None:
            op.left, op.right = op.left.to(device), op.right.to(device)
        if op.magnitude is not None:
            op.magnitude = op.magnitude.to(device)


def _full_values(ops: list[Op], device: torch.device) -> dict[int, torch.Tensor]:
    """fp32 values of the ops that replace the whole tensor, in the stored orientation."""
    values = {}
    for op in ops:
        if op.kind is OpKind.REPLACE:
            values[id(op)] = op.value.to(device, torch.float32)
        elif op.kind is OpKind.DENSE:
            mat = op.value.matrix(dtype=torch.float32).to(device)
            values[id(op)] = mat.T if op.transpose else mat
    return values


def _update(acc: torch.Tensor, rows, ops: list[Op], values: dict[int, torch.Tensor],
            w0_rows: torch.Tensor | None = None, full: dict[int, torch.Tensor] | None = None,
            delta: torch.Tensor | None = None,
            deltas: dict[int, torch.Tensor] | None = None) -> None:
    """``acc`` holds W0's ``rows`` in fp32 (any content when W0 is absent); add the ops.
    FULL ops add ``deltas[id(op)]`` when given (:func:`_full_deltas`, taken before ``acc``
    changed), else read the fine-tune's ``full[id(op)][rows]`` and ``w0_rows`` (W0's
    ``rows``, in any float dtype: fp32 is fastest), with ``delta`` a scratch of ``acc``'s
    shape for their fp32 difference (None: allocated)."""
    for op in ops:  # at most one replacement (checked in the plan), applied first
        if op.kind in (OpKind.REPLACE, OpKind.DENSE):
            new = values[id(op)][rows]
            if op.weight == 1.0:
                acc.copy_(new)
            else:  # W = w * new + (1 - w) * W0
                acc.lerp_(new, op.weight)
    for op in ops:
        if op.kind is OpKind.LOW_RANK:
            acc.addmm_(op.left[rows], op.right, alpha=op.weight)
    for op in ops:
        if op.kind is OpKind.FULL:  # W += w * (W_i - W0): the difference of the upcast values
            if deltas is not None:
                acc.add_(deltas[id(op)], alpha=op.weight)
                continue
            delta = torch.empty_like(acc) if delta is None else delta
            delta.copy_(full[id(op)][rows])
            delta.sub_(w0_rows)
            acc.add_(delta, alpha=op.weight)
    for op in ops:
        if op.magnitude is not None:  # DoRA (PEFT's merge): W' = m * W / ||W||, per output
            if op.norm_dim == 1:
                acc.mul_((op.magnitude[rows] / torch.linalg.norm(acc, dim=1))[:, None])
            else:
                acc.mul_((op.magnitude / torch.linalg.norm(acc, dim=0))[None, :])


def _full_deltas(acc: torch.Tensor, rows, ops: list[Op], full: dict[int, torch.Tensor],
                 scratch: torch.Tensor) -> dict[int, torch.Tensor]:
    """``W_i - W0`` of ``rows`` for every FULL op, each in fp32 in its own slice of
    ``scratch``, taken from ``acc`` while it still holds W0's rows (so no fp32 copy of W0's
    block is needed: one pass fewer than :func:`_update`'s own way, same bits)."""
    n = acc.numel()
    deltas = {}
    for i, op in enumerate(o for o in ops if o.kind is OpKind.FULL):
        d = scratch[i * n:(i + 1) * n].view(acc.shape)
        d.copy_(full[id(op)][rows])
        deltas[id(op)] = d.sub_(acc)
    return deltas


def _blockable(w0: torch.Tensor | None, ops: list[Op]) -> bool:
    return (w0 is not None and w0.ndim == 2
            and not any(op.magnitude is not None and op.norm_dim == 0 for op in ops))


def merge_tensor_cpu(name: str, w0: torch.Tensor | None, ops: list[Op], out: torch.Tensor,
                     scratch: torch.Tensor, full: dict[int, torch.Tensor] | None = None,
                     delta_scratch: torch.Tensor | None = None) -> RangeCheck:
    """Write W0 + deltas into ``out`` (the output dtype); ``scratch`` is a reusable fp32
    buffer of at least :data:`BLOCK_ELEMS` elements. ``w0`` None: the ops alone define it.
    ``full``: the fine-tunes' tensors of FULL ops (by ``id(op)``); ``delta_scratch``, a
    buffer of :func:`full_scratch_elems` elements for their differences (None: allocated).
    Each difference is taken of the block upcast to fp32 (an fp32-fp32 subtraction, about
    1.6x faster on CPU than subtracting the stored bf16 block, measured on 1 MiB blocks);
    with FULL ops a block is :data:`FULL_BLOCK_ELEMS` long, so the block, its upcast W0 and
    the differences stay in a core's L2 cache together (2 MiB on the development machine,
    where the kernel ran about 20% faster so)."""
    values = _full_values(ops, torch.device("cpu"))
    low = torch.full((), math.inf)
    high = torch.full((), -math.inf)
    if not _blockable(w0, ops):
        acc = w0.to(torch.float32, copy=True) if w0 is not None else torch.zeros(out.shape)
        _update(acc, ..., ops, values, w0, full)
        if acc.numel():
            low, high = torch.aminmax(acc)
        out.copy_(acc)
        return RangeCheck(name, ops, low, high, out.dtype)
    rows, cols = (int(s) for s in w0.shape)
    n_full = sum(op.kind is OpKind.FULL for op in ops)
    block = min(scratch.numel(), FULL_BLOCK_ELEMS) if n_full else scratch.numel()
    step = max(1, min(rows, block // max(1, cols)))
    if n_full and (delta_scratch is None or delta_scratch.numel() < n_full * step * cols):
        delta_scratch = torch.empty(n_full * step * cols, dtype=torch.float32)
    for start in range(0, rows, step):
        rs = slice(start, min(rows, start + step))
        acc = scratch[:(rs.stop - start) * cols].view(rs.stop - start, cols)
        acc.copy_(w0[rs])  # the upcast, into cache
        deltas = _full_deltas(acc, rs, ops, full, delta_scratch) if n_full else None
        _update(acc, rs, ops, values, full=full, deltas=deltas)
        if acc.numel():
            lo, hi = torch.aminmax(acc)
            torch.minimum(low, lo, out=low)
            torch.maximum(high, hi, out=high)
        out[rs].copy_(acc)  # the one cast
    return RangeCheck(name, ops, low, high, out.dtype)


def merge_tensor_device(name: str, w0_pinned: torch.Tensor | None, ops: list[Op],
                        out_pinned: torch.Tensor, device: torch.device,
                        full: dict[int, torch.Tensor] | None = None) -> RangeCheck:
    """The same update on ``device``: the stored bytes go over, the result comes back into
    ``out_pinned``; nothing waits for the device (see :func:`check_ranges`). ``full``: the
    fine-tunes' tensors of FULL ops (pinned), moved over as stored."""
    values = _full_values(ops, device)
    full = {k: v.to(device, non_blocking=True) for k, v in (full or {}).items()}
    moved = None
    if w0_pinned is not None:
        moved = w0_pinned.to(device, non_blocking=True)  # the stored bytes, as stored
        # upcast on the device; a copy where the move was none (an fp32 tensor already there)
        acc = moved.to(torch.float32, copy=moved.data_ptr() == w0_pinned.data_ptr())
    else:
        acc = torch.zeros(tuple(out_pinned.shape), device=device)
    if full and moved is not None and moved.data_ptr() == acc.data_ptr():
        moved = moved.clone()  # an fp32 W0 is updated in place: FULL ops need it as read
    _update(acc, ..., ops, values, moved, full)
    if acc.numel():
        low, high = torch.aminmax(acc)
    else:
        low = torch.full((), math.inf, device=device)
        high = torch.full((), -math.inf, device=device)
    out_pinned.copy_(acc.to(out_pinned.dtype), non_blocking=True)
    return RangeCheck(name, ops, low, high, out_pinned.dtype)


def check_ranges(checks: list[RangeCheck]) -> None:
    """Raise NumericsError for the first tensor with NaN/Inf or values beyond its dtype.
    One transfer for all of them (one device synchronisation per call)."""
    if not checks:
        return
    stats = torch.stack([torch.stack([c.low.float(), c.high.float()]) for c in checks]).cpu()
    for check, (low, high) in zip(checks, stats.tolist()):
        if not (math.isfinite(low) and math.isfinite(high)):
            if low == math.inf and high == -math.inf:
                continue  # an empty tensor
            sources = ", ".join(op.source for op in check.ops)
            raise NumericsError(f"merging {sources} into {check.name} gives NaN or Inf values; "
                                f"the adapter (or its weight) is unusable; lower the weight or "
                                f"retrain the adapter (nothing was written)")
        limit = torch.finfo(check.dtype).max if check.dtype.is_floating_point else math.inf
        if max(-low, high) > limit:
            raise NumericsError(f"{check.name} has values up to {max(-low, high):.3g} after "
                                f"merging, beyond {dtype_name(check.dtype)}'s range "
                                f"({limit:.3g}); choose --dtype float32 or bfloat16")
