"""The combination step every task-vector method shares: weight, elect signs, sum,
normalise, scale by lambda. Each method supplies only how one delta is pruned.

For N deltas of one tensor, ``weighted_i = w_i * prune_i(Δ_i)``; then

- without sign election: ``mixed = Σ weighted_i``, normaliser ``Σ w_i`` (1 when ~0);
- with sign election (TIES): the sign of each entry is elected from the weighted deltas
  ("total": the sign of their sum; "frequency": the sign most of them have, ties going to
  +), entries of another sign are dropped: ``mixed = Σ weighted_i [sign agrees]``,
  normaliser ``Σ w_i [sign agrees]`` (1 where nothing agrees);

``normalize`` divides by the normaliser, and the result is multiplied by ``lambda``.
This is mergekit's generalized task arithmetic; docs/merge-methods.md says where PEFT's
definitions differ.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Prune = Callable[[torch.Tensor, int], torch.Tensor]  # (delta, input index) -> pruned delta


def _elected_positive(weighted: torch.Tensor, majority_sign: str) -> torch.Tensor:
    """(N, ...) weighted deltas -> (...) bool: where the elected sign is + (ties go to +)."""
    votes = weighted.sum(dim=0) if majority_sign == "total" else weighted.sign().sum(dim=0)
    return votes >= 0


def elected_signs(weighted: torch.Tensor, majority_sign: str) -> torch.Tensor:
    """(N, ...) weighted deltas -> (N, ...) bool: the entries whose sign is the elected one
    (a zero entry agrees with neither sign)."""
    positive = _elected_positive(weighted, majority_sign)
    return torch.where(positive, weighted > 0, weighted < 0)


def combine_task_vectors(deltas: Sequence[torch.Tensor], weights: Sequence[float], *,
                         prune: Prune | None = None, majority_sign: str | None = None,
                         normalize: bool = False, lam: float = 1.0) -> torch.Tensor:
    """The combined delta of one tensor (see the module docstring)."""
    if not deltas:
        raise ValueError("combine_task_vectors needs at least one delta")
    first = deltas[0]
    stacked = first.new_empty((len(deltas), *first.shape))  # (N, *shape)
    for i, d in enumerate(deltas):  # one pruned delta alive at a time
        stacked[i] = prune(d, i) if prune is not None else d
    w = torch.tensor([float(x) for x in weights], dtype=stacked.dtype, device=stacked.device)
    w = w.reshape(-1, *([1] * (stacked.ndim - 1)))
    stacked.mul_(w)
    if majority_sign is not None:
        positive = _elected_positive(stacked, majority_sign)
        mixed = torch.zeros_like(first)
        norm = torch.zeros_like(first)
        for i, weighted in enumerate(stacked):  # one input at a time: no (N, ...) temporaries
            agree = torch.where(positive, weighted > 0, weighted < 0)
            mixed.add_(weighted * agree)
            norm.add_(agree, alpha=float(weights[i]))
        norm.masked_fill_(norm == 0, 1)
    else:
        mixed = stacked.sum(dim=0)
        norm = w.sum(dim=0)
        norm[norm.abs() < 1e-8] = 1
    if normalize:
        mixed /= norm
    if lam != 1:
        mixed *= lam
    return mixed
