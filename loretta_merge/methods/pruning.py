"""How one input's task vector is pruned, one chunk of rows at a time.

A :class:`Pruning` sees the delta of one input to one tensor as chunks of consecutive rows
(fp32; ``offset`` is the chunk's first entry in the flat tensor). Before it prunes, it may
ask for passes over the chunks (:meth:`Pruning.next_pass`): a magnitude cut needs two
histograms of the whole delta, an L1 rescale the norms before and after pruning. The
runner (:mod:`.stream`) computes the chunks again for every pass, so no pass holds a whole
tensor; then :meth:`Pruning.apply` prunes each chunk in place.

Which entries a cut keeps is decided by value, with no sort: a non-negative float32 orders
like its bit pattern as an int32, so the k-th largest magnitude is found from a histogram
of the high 16 bits, then one of the low 16 bits inside the chosen bucket, each summed over
the chunks. When equal magnitudes straddle a cut (common in deltas of bf16 weights, and in
fp32 products by chance), which of them are kept is up to a sort: ``choice`` then gives the
entries mergekit keeps (its own sort of the magnitude, gathered whole for that one input
and tensor), and only the tied ones it keeps are remembered. Definitions follow mergekit 0.1.5 (docs/merge-methods.md).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

RESCALE_EPS = 1e-7  # below this L1 norm (before or after) a pruned delta is not rescaled
Pass = tuple[Callable[[torch.Tensor, int], None], Callable[[], None]]  # (observe, end)


_BUCKETS = 1 << 16  # a histogram of 16 of the 32 bits


def _kth_from_top(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """The bucket holding the k-th largest entry, and how many of the bucket are needed."""
    at_least = hist.flip(0).cumsum(0).flip(0)  # entries in this bucket or above
    bucket = int(torch.nonzero(at_least >= k)[-1])
    return bucket, k - int(at_least[bucket] - hist[bucket])


# On the CPU the integer and compare passes below run in numpy: its SIMD loops for int32
# `&`, `>>`, compares and sparse selection took a quarter to a half of torch's time on
# 1 MiB chunks (one thread, the development machine's AVX-512 Xeon); the results are the
# same integers and booleans, as torch tensors sharing numpy's memory. On a GPU, torch.


def magnitude_bits(chunk: torch.Tensor) -> torch.Tensor:
    """The int32 bits of ``|chunk|`` (fp32), flat: they order as the magnitudes do."""
    flat = chunk.contiguous().view(torch.int32).reshape(-1)
    if flat.device.type == "cpu":
        return torch.from_numpy(np.bitwise_and(flat.detach().numpy(), 0x7FFFFFFF))
    return flat & 0x7FFFFFFF


def _times_mask(values: torch.Tensor, kept: torch.Tensor) -> None:
    """``values *= kept`` in place (a bool mask, or 0/1 floats): IEEE products by 1 and 0,
    as torch's (torch's float-by-bool product is its slow path: 4x numpy's)."""
    if (values.device.type == "cpu" and kept.dtype == torch.bool and values.is_contiguous()
            and kept.is_contiguous() and kept.shape == values.shape
            and values.dtype in (torch.float32, torch.float64)):
        v = values.detach().numpy()
        np.multiply(v, kept.detach().numpy(), out=v)
    else:
        values.mul_(kept)


def _compare(bits: torch.Tensor, op: str, value: int) -> torch.Tensor:
    """``bits >= value``, ``bits > value`` or ``bits == value`` as a bool tensor."""
    if bits.device.type == "cpu":
        b = bits.numpy()
        return torch.from_numpy(b >= value if op == "ge" else b > value if op == "gt"
                                else b == value)
    return bits >= value if op == "ge" else bits > value if op == "gt" else bits == value


def _sum64(values: torch.Tensor) -> float:
    """The float64 sum of ``values``, in an order fixed by the shape alone: numpy's pairwise
    sum on one thread (torch's CPU sum splits the work by the thread count, which would
    make a rescaled merge's bytes depend on the machine's cores); on a GPU, torch's."""
    if values.device.type != "cpu":
        return float(values.sum(dtype=torch.float64))
    return float(np.asarray(values.detach().numpy(), dtype=np.float64).sum())


class Pruning:
    """Keeps every entry (density 1, or the base of the others): no passes, no change;
    with ``rescale``, the kept entries are scaled so the L1 norm is the delta's."""

    draws = False  # whether it draws random numbers (one per entry)

    def __init__(self, rescale: bool = False):
        self.rescale = rescale
        self.factor = 1.0
        self._l1: list[float] | None = None  # [before, after] while the rescale pass runs
        self._rescaled = False

    # -- what subclasses provide
    def keep(self, chunk: torch.Tensor, offset: int) -> torch.Tensor | None:
        """The kept entries of ``chunk`` (a bool or 0/1 float mask), None for all."""
        return None

    def _own_pass(self) -> Pass | None:
        return None

    def _mark(self) -> None:
        """Before the L1 pass, which calls :meth:`keep` ahead of :meth:`apply` (random
        ones start keeping the masks they draw here)."""

    # -- what the runner calls
    def next_pass(self) -> Pass | None:
        """The next pass this pruning needs over the chunks, or None when it can prune."""
        own = self._own_pass()
        if own is not None:
            return own
        if self.rescale and not self._rescaled and self._prunes():
            self._l1 = [0.0, 0.0]
            self._mark()
            return self._observe_l1, self._end_l1
        return None

    def apply(self, chunk: torch.Tensor, offset: int) -> torch.Tensor:
        """``chunk`` (ours: changed in place) pruned, rescaled."""
        kept = self.keep(chunk, offset)
        if kept is None:
            return chunk
        _times_mask(chunk, kept)
        if self.factor != 1.0:
            chunk.mul_(self.factor)
        return chunk

    def _prunes(self) -> bool:
        return type(self).keep is not Pruning.keep

    def _observe_l1(self, chunk: torch.Tensor, offset: int) -> None:
        size = chunk.abs()
        self._l1[0] += _sum64(size)
        kept = self.keep(chunk, offset)
        if kept is not None:
            _times_mask(size, kept)
        self._l1[1] += _sum64(size)

    def _end_l1(self) -> None:
        before, after = self._l1
        self._rescaled, self._l1 = True, None
        if before >= RESCALE_EPS and after >= RESCALE_EPS:
            self.factor = before / after


# --------------------------------------------------------------------------- by magnitude

class _Cut:
    """The ``m`` largest magnitudes of ``n``: found as a rule on the bits of each entry."""

    def __init__(self, m: int, n: int):
        self.m = m
        self.rule = "all" if m >= n else "none" if m <= 0 else None  # or "ge", "gt" on t
        self.t = 0
        self.bucket = self.need = -1
        self.ties = 0  # how many entries equal to t are among the m
        self.straddles = False

    def after_high(self, hist: torch.Tensor) -> None:
        if self.rule is None:
            self.bucket, self.need = _kth_from_top(hist, self.m)

    def after_low(self, low_hist: torch.Tensor) -> None:
        if self.rule is not None:
            return
        value, ties = _kth_from_top(low_hist, self.need)
        self.t, self.ties = (self.bucket << 16) | value, ties
        if ties == int(low_hist[value]):
            self.rule = "ge"  # every equal magnitude fits
        else:
            self.rule = "gt"  # zeros: which are kept changes no value
            self.straddles = self.t != 0

    def mask(self, bits: torch.Tensor) -> torch.Tensor:
        if self.rule in ("all", "none"):
            return torch.full_like(bits, self.rule == "all", dtype=torch.bool)
        return _compare(bits, self.rule, self.t)


def _equal_to_any(bits: torch.Tensor, values: list[int]) -> torch.Tensor:
    """Where ``bits`` is one of the (one or two) ``values``: compares, not ``torch.isin``."""
    hit = _compare(bits, "eq", values[0])
    for value in values[1:]:
        hit |= _compare(bits, "eq", value)
    return hit


Choice = Callable[[torch.Tensor, int, int], torch.Tensor]  # (magnitude, start, stop) -> indices


class RankRange(Pruning):
    """Keep the entries whose magnitude has ascending rank ``start..stop-1`` (of ``n``):
    TIES' trim is ``n-k..n``, breadcrumbs' a middle range. Among equal magnitudes at a cut,
    the ones ``choice`` (mergekit's own sort of the whole magnitude) keeps, or with
    ``choice`` None the first in memory order (no sort: counted chunk by chunk)."""

    def __init__(self, n: int, start: int, stop: int, choice: Choice | None,
                 rescale: bool = False):
        super().__init__(rescale)
        self.n, self.start, self.stop, self.choice = n, start, stop, choice
        self.empty = stop <= start
        self.cuts = [] if self.empty else [_Cut(n - start, n), _Cut(n - stop, n)]
        self._stage = "high" if any(c.rule is None for c in self.cuts) else "done"
        self._hist: torch.Tensor | None = None
        self._low: dict[int, torch.Tensor] = {}
        self._gathered: torch.Tensor | None = None
        self._special: list[int] | None = None  # tied magnitudes (bits) decided by ``choice``
        self._special_kept: torch.Tensor | None = None  # their flat indices it keeps, sorted
        self._seen: list[int] = []  # choice None: tied entries met so far, per cut

    def _own_pass(self) -> Pass | None:
        if self._stage == "high":
            return self._observe_high, self._end_high
        if self._stage == "low":
            return self._observe_low, self._end_low
        if self._stage == "gather":
            self._gathered = torch.empty(self.n, dtype=torch.float32)
            return self._observe_gather, self._end_gather
        return None

    def _observe_high(self, chunk: torch.Tensor, offset: int) -> None:
        bits = magnitude_bits(chunk)
        high = torch.from_numpy(bits.numpy() >> 16) if bits.device.type == "cpu" else bits >> 16
        hist = torch.bincount(high, minlength=_BUCKETS)
        self._hist = hist if self._hist is None else self._hist.add_(hist)

    def _end_high(self) -> None:
        hist = self._hist.cpu()
        for cut in self.cuts:
            cut.after_high(hist)
        self._low = {c.bucket: None for c in self.cuts if c.rule is None}
        self._hist, self._stage = None, "low"

    def _observe_low(self, chunk: torch.Tensor, offset: int) -> None:
        bits = magnitude_bits(chunk)
        b = bits.numpy() if bits.device.type == "cpu" else None
        high = b >> 16 if b is not None else bits >> 16
        for bucket, acc in self._low.items():
            if b is not None:  # a few entries in a thousand: numpy's compress
                inside = torch.from_numpy(np.compress(high == bucket, b) & 0xFFFF)
            else:
                inside = bits[high == bucket] & 0xFFFF
            hist = torch.bincount(inside, minlength=_BUCKETS)
            self._low[bucket] = hist if acc is None else acc.add_(hist)

    def _end_low(self) -> None:
        for cut in self.cuts:
            cut.after_low(self._low[cut.bucket].cpu() if cut.rule is None else None)
        self._low = {}
        straddles = any(c.straddles for c in self.cuts)
        self._stage = "gather" if straddles and self.choice is not None else "done"

    def _observe_gather(self, chunk: torch.Tensor, offset: int) -> None:
        size = chunk.numel()
        self._gathered[offset:offset + size] = magnitude_bits(chunk).view(torch.float32).cpu()

    def _end_gather(self) -> None:
        magnitude, self._gathered = self._gathered, None
        kept = self.choice(magnitude, self.start, self.stop)
        self._special = sorted({c.t for c in self.cuts if c.straddles})
        tied = _equal_to_any(magnitude.view(torch.int32)[kept], self._special)
        self._special_kept = torch.sort(kept[tied]).values
        self._stage = "done"

    def keep(self, chunk: torch.Tensor, offset: int) -> torch.Tensor:
        if self.empty:
            return torch.zeros_like(chunk, dtype=torch.bool)
        bits = magnitude_bits(chunk)
        # in the top n-start, and in the top n-stop (none of them for TIES' trim: no mask)
        top = [cut.mask(bits) if cut.rule != "none" else None for cut in self.cuts]
        if self.choice is None and any(c.straddles for c in self.cuts):
            if offset == 0:  # each pass visits the chunks in order from the first
                self._seen = [0, 0]
            for j, cut in enumerate(self.cuts):
                if cut.straddles:  # the first ``cut.ties`` entries equal to t are in its top
                    at = torch.nonzero(_compare(bits, "eq", cut.t)).reshape(-1)
                    take = max(0, min(at.numel(), cut.ties - self._seen[j]))
                    top[j][at[:take]] = True
                    self._seen[j] += at.numel()
        kept = top[0]
        if top[1] is not None:
            kept.logical_and_(top[1].logical_not_())
        if self._special is not None:
            kept &= ~_equal_to_any(bits, self._special)
            lo, hi = torch.searchsorted(self._special_kept,
                                        torch.tensor([offset, offset + bits.numel()])).tolist()
            kept[(self._special_kept[lo:hi] - offset).to(bits.device)] = True
        return kept.view(chunk.shape)


def descending_argsort(magnitude: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """mergekit's ``magnitude``: ``argsort(descending=True)[:k]`` (here ``stop`` is n)."""
    return torch.argsort(magnitude, descending=True)[:stop - start]


def ascending_sort(magnitude: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """mergekit's ``magnitude_outliers``: ``sort(descending=False).indices[start:stop]``."""
    return torch.sort(magnitude, descending=False).indices[start:stop]


_CHOICES = {"magnitude": descending_argsort, "outliers": ascending_sort, "first": None}


def largest(n: int, density: float, *, rescale: bool = False,
            ties_as: str = "magnitude") -> Pruning:
    """Keep the ``max(1, int(density * n))`` entries of largest magnitude (TIES' trim);
    equal magnitudes at the cut as mergekit's ``magnitude`` (``ties_as="magnitude"``) or its
    ``magnitude_outliers`` with gamma 0 (``"outliers"``: its breadcrumbs) keeps them, or
    the first in memory order (``"first"``)."""
    if density >= 1 or n == 0:
        return Pruning()
    keep = max(1, int(density * n))
    return RankRange(n, n - keep, n, _CHOICES[ties_as], rescale)


def largest_below_outliers(n: int, density: float, gamma: float, *,
                           rescale: bool = False, ties_as: str = "outliers") -> Pruning:
    """Model Breadcrumbs: drop the ``int(gamma * n)`` largest magnitudes (outliers), then
    keep the next ``int(density * n)`` (fewer outliers dropped when both cannot fit)."""
    if density >= 1:
        return Pruning()
    keep, outliers = int(density * n), int(gamma * n)
    smallest = max(0, n - keep - outliers)  # the entries dropped at the bottom
    return RankRange(n, smallest, smallest + keep, _CHOICES[ties_as], rescale)


# --------------------------------------------------------------------------- random

def draw_bernoulli(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Bernoulli draws with ``probs``, made on the generator's device (the merge's seeded
    generators are CPU ones: a GPU merge draws on the CPU and moves the mask over, so the same
    seed keeps the same entries on every device). Draws are made entry by entry in memory
    order, so chunks drawn in turn are the whole tensor's draws."""
    if probs.device == generator.device:
        return torch.bernoulli(probs, generator=generator)
    return torch.bernoulli(probs.to(generator.device), generator=generator).to(probs.device)


_BIT = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_mask(kept: torch.Tensor) -> torch.Tensor:
    """A 0/1 mask as bits, 8 entries a byte (flat, padded with zeros)."""
    flat = kept.reshape(-1).to(torch.uint8)
    pad = -flat.numel() % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, 8).mul_(_BIT.to(flat.device)).sum(1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The bool mask :func:`pack_mask` packed, shaped as ``like``."""
    bits = packed.unsqueeze(1).bitwise_and(_BIT.to(packed.device)).ne_(0)
    return bits.reshape(-1)[:like.numel()].view(like.shape)


class _Random(Pruning):
    """A pruning that draws its mask: with a rescale, the masks drawn in the L1 pass are
    kept as bits (1/16 of the tensor's bf16 size) for :meth:`apply`, rather than drawn or
    ranked again."""

    draws = True

    def __init__(self, generator: torch.Generator, rescale: bool):
        super().__init__(rescale)
        self.generator = generator
        self._drawn: dict[int, torch.Tensor] | None = None  # offset -> packed mask

    def _mark(self) -> None:
        self._drawn = {}

    def keep(self, chunk: torch.Tensor, offset: int) -> torch.Tensor:
        if self._rescaled and self._drawn:
            return unpack_mask(self._drawn.pop(offset), chunk)
        kept = self._draw(chunk)
        if self._drawn is not None and not self._rescaled:
            self._drawn[offset] = pack_mask(kept)
        return kept

    def _draw(self, chunk: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class RandomKeep(_Random):
    """DARE: keep each entry independently with probability ``density``."""

    def __init__(self, density: float, generator: torch.Generator, rescale: bool = True):
        super().__init__(generator, rescale)
        self.density = density

    def _draw(self, chunk: torch.Tensor) -> torch.Tensor:
        return draw_bernoulli(torch.full_like(chunk, self.density), self.generator)


class RowRankedKeep(_Random):
    """DELLA's MagPrune: within each row (a 1-D tensor is one row), the entry of rank k
    (1 = smallest magnitude) of c is kept with probability
    ``density - epsilon + 2 * epsilon * (k - 1) / (c - 1)`` (``density`` when c is 1)."""

    def __init__(self, density: float, epsilon: float, generator: torch.Generator,
                 rescale: bool = True):
        super().__init__(generator, rescale)
        self.density, self.epsilon = density, epsilon

    def _draw(self, chunk: torch.Tensor) -> torch.Tensor:
        rows = chunk.reshape(1, -1) if chunk.ndim < 2 else chunk
        # each entry's rank: the inverse permutation of the row's argsort by magnitude, sorted
        # as its int32 bits (they order as the floats; ~15% faster; the tests compare the
        # masks with mergekit's, which sorts the floats, bit for bit)
        order = torch.argsort(rows.contiguous().view(torch.int32) & 0x7FFFFFFF, dim=1)
        steps = torch.arange(rows.shape[1], dtype=chunk.dtype, device=chunk.device)
        ranks = torch.empty_like(rows).scatter_(1, order, steps.expand_as(rows))  # 0-based
        cols = rows.shape[1]
        position = ranks / (cols - 1) if cols > 1 else torch.full_like(ranks, 0.5)
        probs = (self.density - self.epsilon) + position * (2 * self.epsilon)
        return draw_bernoulli(probs, self.generator).reshape(chunk.shape)


def random_keep(density: float, generator: torch.Generator, *, rescale: bool = True) -> Pruning:
    return Pruning() if density >= 1 else RandomKeep(density, generator, rescale)


def magnitude_ranked_keep(density: float, epsilon: float, generator: torch.Generator, *,
                          rescale: bool = True) -> Pruning:
    return Pruning() if density >= 1 else RowRankedKeep(density, epsilon, generator, rescale)
