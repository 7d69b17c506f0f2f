"""Exact selection of the k largest magnitudes of a tensor, in a few linear passes.

``torch.topk`` sorts its way to the k-th value (about 20 ns per entry on one CPU thread) and
returns indices a merge does not need. TIES and breadcrumbs need only *which* entries are
kept, so this module finds the k-th largest magnitude from histograms of the float bits (a
non-negative float32 orders like its bit pattern as an int32): one pass over the high 16 bits,
one over the low 16 bits of the entries in the chosen bucket, one comparison. Exactly k
entries are kept; when equal magnitudes straddle the cut, the first in memory order are, or
(``strict``) the caller is told so and chooses (the merge methods then ask mergekit's sort).
float16/bfloat16 are selected as float32 (exact); float64 goes through ``torch.topk``.
"""

from __future__ import annotations

import torch

_BUCKETS = 1 << 16


def _kth_from_top(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """The bucket holding the k-th largest entry, and how many of the bucket are needed."""
    at_least = hist.flip(0).cumsum(0).flip(0)  # entries in this bucket or above
    bucket = int(torch.nonzero(at_least >= k)[-1])
    return bucket, k - int(at_least[bucket] - hist[bucket])


def largest_mask(magnitude: torch.Tensor, k: int, *, strict: bool = False) -> torch.Tensor | None:
    """A bool mask (same shape) with exactly ``k`` True: the ``k`` largest entries of the
    non-negative ``magnitude``. Equal magnitudes at the cut: the first in memory order are
    kept; with ``strict``, None is returned instead when only some of them fit and they are
    not zeros (the set is then not determined by the values, and the caller decides; which
    zeros are kept never changes a pruned delta)."""
    n = magnitude.numel()
    if k >= n:
        return torch.ones_like(magnitude, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(magnitude, dtype=torch.bool)
    if magnitude.dtype in (torch.float16, torch.bfloat16):  # exact in float32, same order
        magnitude = magnitude.float()
    if magnitude.dtype != torch.float32:
        flat = magnitude.reshape(-1)
        cut = torch.topk(flat, k, sorted=False).values.min()
        above, equal = flat > cut, flat == cut
        ties, present = k - int(above.sum()), int(equal.sum())
        if strict and ties < present and cut != 0:
            return None
        above[torch.nonzero(equal).reshape(-1)[:ties]] = True
        return above.view_as(magnitude)
    bits = magnitude.contiguous().view(torch.int32).reshape(-1)
    high = bits >> 16
    bucket, need = _kth_from_top(torch.bincount(high, minlength=_BUCKETS), k)
    low = bits[high == bucket] & 0xFFFF
    low_hist = torch.bincount(low, minlength=_BUCKETS)
    value, ties = _kth_from_top(low_hist, need)
    threshold = (bucket << 16) | value
    if strict and ties < int(low_hist[value]) and threshold != 0:
        return None
    mask = bits > threshold
    if ties:
        mask[torch.nonzero(bits == threshold).reshape(-1)[:ties]] = True
    return mask.view_as(magnitude)


def magnitude(delta: torch.Tensor) -> torch.Tensor:
    """``|delta|``; for float32, the sign bit cleared (the same values, one pass)."""
    if delta.dtype == torch.float32:
        return (delta.contiguous().view(torch.int32) & 0x7FFFFFFF).view(torch.float32)
    return delta.abs()
