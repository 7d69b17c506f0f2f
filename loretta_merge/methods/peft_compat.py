"""PEFT's definitions, under PEFT's names: ``svd``, ``ties_svd``, ``dare_linear_svd``,
``dare_ties_svd``, ``magnitude_prune_svd`` (``add_weighted_adapter``'s combination types).

These combine the deltas the way peft 0.21's ``add_weighted_adapter`` does before its SVD,
so ``combine --method ties_svd --rank R`` gives PEFT's adapter, and ``merge --method
ties_svd`` gives what PEFT's full-rank ``ties_svd`` merged into the base gives. Where they
differ from the mergekit definitions (``ties``, ``dare_*``, ``magnitude_prune``):

- pruning keeps ``int(density * n)`` entries (none when that is 0), not at least one;
- DARE divides the kept entries by the density (no L1 rescale);
- TIES elects each entry's sign from the UNWEIGHTED pruned deltas and divides the agreeing
  weighted sum by the NUMBER of agreeing inputs (not by their weights);
- an input whose delta is all zero (an adapter that does not touch the tensor) takes no
  part, as PEFT skips adapters that lack the module: it draws no random mask.

docs/combine.md gives the comparison with PEFT itself.
"""

from __future__ import annotations

import torch

from .base import Method, at, register
from .core import elected_signs
from .pruning import draw_bernoulli


def _live(deltas, weights):
    """(index, delta, weight) of the inputs that change the tensor."""
    return [(i, d, float(w)) for i, (d, w) in enumerate(zip(deltas, weights)) if bool(d.any())]


def _top(delta: torch.Tensor, density: float) -> torch.Tensor:
    """PEFT's magnitude pruning: the ``int(density * n)`` largest magnitudes kept."""
    if density >= 1:
        return delta
    mask = torch.zeros(delta.numel(), dtype=delta.dtype, device=delta.device)
    mask[torch.topk(delta.abs().reshape(-1), k=int(density * delta.numel())).indices] = 1
    return delta * mask.reshape(delta.shape)


def _dropped(delta: torch.Tensor, density: float, generator) -> torch.Tensor:
    """PEFT's random pruning: each entry kept with probability ``density``, then / density."""
    if density >= 1:
        return delta
    kept = draw_bernoulli(torch.full_like(delta, density), generator)
    return delta * kept / density


def _weighted_sum(pruned: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    stacked = torch.stack(pruned)                                   # (N, *shape)
    w = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device)
    return (stacked * w.reshape(-1, *([1] * (stacked.ndim - 1)))).sum(dim=0)


def _disjoint(pruned: list[torch.Tensor], weights: list[float], majority_sign: str) -> torch.Tensor:
    stacked = torch.stack(pruned)                                   # (N, *shape)
    agree = elected_signs(stacked, majority_sign)                   # from the unweighted deltas
    w = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device)
    weighted = stacked * w.reshape(-1, *([1] * (stacked.ndim - 1)))
    return (weighted * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)


def _combine(deltas, weights, prune, mix):
    live = _live(deltas, weights)
    if not live:
        return torch.zeros_like(deltas[0])
    return mix([prune(d, i) for i, d, _ in live], [w for _, _, w in live])


def svd(deltas, weights, params, generator=None):
    return _combine(deltas, weights, lambda d, i: d, _weighted_sum)


def magnitude_prune_svd(deltas, weights, params, generator=None):
    return _combine(deltas, weights, lambda d, i: _top(d, at(params["density"], i)), _weighted_sum)


def ties_svd(deltas, weights, params, generator=None):
    return _combine(deltas, weights, lambda d, i: _top(d, at(params["density"], i)),
                    lambda p, w: _disjoint(p, w, params["majority_sign"]))


def dare_linear_svd(deltas, weights, params, generator):
    return _combine(deltas, weights, lambda d, i: _dropped(d, at(params["density"], i), generator),
                    _weighted_sum)


def dare_ties_svd(deltas, weights, params, generator):
    return _combine(deltas, weights, lambda d, i: _dropped(d, at(params["density"], i), generator),
                    lambda p, w: _disjoint(p, w, params["majority_sign"]))


_REF = "PEFT 0.21 add_weighted_adapter combination_type"
register(Method("svd", svd, {}, reference=f"{_REF} 'svd'",
                summary="PEFT's svd: weighted sum of the deltas (the same as linear)"))
register(Method("ties_svd", ties_svd, {"density": 1.0, "majority_sign": "total"},
                reference=f"{_REF} 'ties_svd'",
                summary="PEFT's TIES: signs elected unweighted, divided by the agreeing count"))
register(Method("dare_linear_svd", dare_linear_svd, {"density": 1.0}, random=True,
                reference=f"{_REF} 'dare_linear_svd'",
                summary="PEFT's DARE: drop at random, divide by the density, weighted sum"))
register(Method("dare_ties_svd", dare_ties_svd, {"density": 1.0, "majority_sign": "total"},
                random=True, reference=f"{_REF} 'dare_ties_svd'",
                summary="PEFT's DARE pruning with PEFT's TIES election"))
register(Method("magnitude_prune_svd", magnitude_prune_svd, {"density": 1.0},
                reference=f"{_REF} 'magnitude_prune_svd'",
                summary="PEFT's magnitude pruning (int(density * n) kept), weighted sum"))
