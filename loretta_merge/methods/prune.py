"""Sparsification of one task vector: which entries are kept, and the optional rescale.

Every function takes an fp32 delta and returns the pruned delta (a new tensor); a density
of 1 keeps everything (and draws nothing). Definitions follow mergekit 0.1.5 (see
docs/merge-methods.md for where PEFT's differ).
"""

from __future__ import annotations

import torch

from . import select

RESCALE_EPS = 1e-7  # below this L1 norm (before or after) a pruned delta is not rescaled


def rescale_l1(delta: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``delta * kept`` scaled so its L1 norm equals ``delta``'s (unchanged when either
    norm is below :data:`RESCALE_EPS`)."""
    pruned = delta * kept
    before, after = delta.abs().sum(), pruned.abs().sum()
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return pruned
    return pruned * (before / after)


def _apply(delta: torch.Tensor, kept: torch.Tensor, rescale: bool) -> torch.Tensor:
    """``delta`` where ``kept`` (a 0/1 float or a bool mask), else 0; optionally rescaled."""
    return rescale_l1(delta, kept) if rescale else delta * kept


def _kept_mask(magnitude: torch.Tensor, start: int, stop: int, mergekit_choice) -> torch.Tensor:
    """True at the entries of ranks ``start..stop-1`` of ``magnitude`` (flat fp32) in
    ascending order. The set is cut by value (:mod:`.select`, no sort) when no run of equal
    magnitudes crosses a cut, as it then is the only possible set. When equal magnitudes
    straddle a cut (common in deltas of bf16 weights), which of them are kept is up to a
    sort: ``mergekit_choice(magnitude, start, stop)`` gives the entries mergekit's own
    function keeps (its sort, its slice), so the same ones are kept here."""
    n = magnitude.numel()
    if stop <= start:
        return torch.zeros_like(magnitude, dtype=torch.bool)
    kept = select.largest_mask(magnitude, n - start, strict=True)  # ranks start..n-1
    if kept is not None and stop < n:
        above = select.largest_mask(magnitude, n - stop, strict=True)  # ranks stop..n-1
        kept = None if above is None else kept & ~above
    if kept is None:
        kept = torch.zeros_like(magnitude, dtype=torch.bool)
        kept[mergekit_choice(magnitude, start, stop)] = True
    return kept


def _descending_argsort(magnitude: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """mergekit's ``magnitude``: ``argsort(descending=True)[:k]`` (here ``stop`` is n)."""
    return torch.argsort(magnitude, descending=True)[:stop - start]


def _ascending_sort(magnitude: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """mergekit's ``magnitude_outliers``: ``sort(descending=False).indices[start:stop]``."""
    return torch.sort(magnitude, descending=False).indices[start:stop]


def largest(delta: torch.Tensor, density: float, *, rescale: bool = False,
            ties_as: str = "magnitude") -> torch.Tensor:
    """Keep the ``max(1, int(density * n))`` entries of largest magnitude (TIES' trim).
    Among equal magnitudes at the cut, the ones mergekit keeps (:func:`_kept_mask`) in its
    ``magnitude`` (``ties_as="magnitude"``: TIES) or in its ``magnitude_outliers`` with
    gamma 0 (``"outliers"``: its breadcrumbs, mergekit's form of magnitude_prune)."""
    if density >= 1:
        return delta
    n = delta.numel()
    if n == 0:
        return delta.clone()
    keep = max(1, int(density * n))
    choice = _descending_argsort if ties_as == "magnitude" else _ascending_sort
    mask = _kept_mask(select.magnitude(delta).reshape(-1), n - keep, n, choice)
    return _apply(delta, mask.view_as(delta), rescale)


def largest_below_outliers(delta: torch.Tensor, density: float, gamma: float, *,
                           rescale: bool = False) -> torch.Tensor:
    """Model Breadcrumbs: drop the ``int(gamma * n)`` largest magnitudes (outliers), then
    keep the next ``int(density * n)`` (fewer outliers dropped when both cannot fit); among
    equal magnitudes at a cut, the ones mergekit keeps (:func:`_kept_mask`)."""
    if density >= 1:
        return delta
    n = delta.numel()
    keep, outliers = int(density * n), int(gamma * n)
    smallest = max(0, n - keep - outliers)  # the entries dropped at the bottom
    mask = _kept_mask(select.magnitude(delta).reshape(-1), smallest, smallest + keep, _ascending_sort)
    return _apply(delta, mask.view_as(delta), rescale)


def draw_bernoulli(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Bernoulli draws with ``probs``, made on the generator's device (the merge's seeded
    generators are CPU ones: a GPU merge draws on the CPU and moves the mask over, so the same
    seed keeps the same entries on every device)."""
    if probs.device == generator.device:
        return torch.bernoulli(probs, generator=generator)
    return torch.bernoulli(probs.to(generator.device), generator=generator).to(probs.device)


def random_keep(delta: torch.Tensor, density: float, generator: torch.Generator, *,
                rescale: bool = True) -> torch.Tensor:
    """DARE: keep each entry independently with probability ``density``."""
    if density >= 1:
        return delta
    kept = draw_bernoulli(torch.full_like(delta, density), generator)
    return _apply(delta, kept, rescale)


def magnitude_ranked_keep(delta: torch.Tensor, density: float, epsilon: float,
                          generator: torch.Generator, *, rescale: bool = True) -> torch.Tensor:
    """DELLA's MagPrune: within each row (a 1-D tensor is one row), the entry of rank k
    (1 = smallest magnitude) of c is kept with probability
    ``density - epsilon + 2 * epsilon * (k - 1) / (c - 1)`` (``density`` when c is 1)."""
    if density >= 1:
        return delta
    rows = delta.reshape(1, -1) if delta.ndim < 2 else delta
    order = torch.argsort(rows.abs(), dim=1)  # the rank of each entry: its inverse permutation
    steps = torch.arange(rows.shape[1], dtype=delta.dtype, device=delta.device).expand_as(rows)
    ranks = torch.empty_like(rows).scatter_(1, order, steps)  # 0-based
    cols = rows.shape[1]
    position = ranks / (cols - 1) if cols > 1 else torch.full_like(ranks, 0.5)
    probs = (density - epsilon) + position * (2 * epsilon)
    kept = draw_bernoulli(probs, generator).reshape(delta.shape)
    return _apply(delta, kept, rescale)
