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


def elected_signs(weighted: torch.Tensor, majority_sign: str) -> torch.Tensor:
    """(N, ...) weighted deltas -> (N, ...) bool: the entries whose sign is the elected one."""
    signs = weighted.sign()
    votes = weighted.sum(dim=0) if majority_sign == "total" else signs.sum(dim=0)
    elected = torch.where(votes >= 0, 1.0, -1.0).to(weighted.dtype)
    return signs == elected


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
        agree = elected_signs(stacked, majority_sign).to(stacked.dtype)
        mixed = (stacked * agree).sum(dim=0)
        norm = (w * agree).sum(dim=0)
        norm[norm == 0] = 1
    else:
        mixed = stacked.sum(dim=0)
        norm = w.sum(dim=0)
        norm[norm.abs() < 1e-8] = 1
    if normalize:
        mixed /= norm
    if lam != 1:
        mixed *= lam
    return mixed
