"""Conversion reports and the error measurements behind them.

Errors are relative Frobenius errors. The delta error of a pair of factors is computed
exactly from small Gram matrices, without ever forming an ``(in, out)`` matrix:
``a b - a2 b2 = [a - a2, a2] @ [b; b - b2]``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

# --------------------------------------------------------------------------- reports

@dataclass
class ModuleReport:
    """Figures for one converted module. Errors are relative Frobenius errors."""

    name: str
    in_features: int
    out_features: int
    r: int
    err_a: float
    err_b: float
    err_delta: float
    params_before: int
    params_after: int
    modes_a: list[int] = field(default_factory=list)
    modes_b: list[int] = field(default_factory=list)
    ranks_a: list[int] = field(default_factory=list)
    ranks_b: list[int] = field(default_factory=list)
    delta_bound: float = 0.0

    @property
    def compression(self) -> float:
        return self.params_before / max(self.params_after, 1)


@dataclass
class ConversionReport:
    """What a conversion did and how close it is. ``to_dict()`` gives the JSON form."""

    direction: str                      # "lora-to-tt" | "tt-to-lora"
    modules: list[ModuleReport]
    eps: float | None = None
    tensor_rank: int | None = None
    rank: int | None = None
    eps_met: bool | None = None         # lora-to-tt with eps: every measured factor error <= eps
    full_tensors: list[str] = field(default_factory=list)       # carried unchanged
    modules_to_save: list[str] = field(default_factory=list)    # tt-to-lora: PEFT modules_to_save
    replaced_dense: list[str] = field(default_factory=list)     # tt-to-lora: TT dense -> Linear
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def params_before(self) -> int:
        return sum(m.params_before for m in self.modules)

    @property
    def params_after(self) -> int:
        return sum(m.params_after for m in self.modules)

    @property
    def compression(self) -> float:
        return self.params_before / max(self.params_after, 1)

    def _stat(self, attr: str, fn) -> float:
        vals = [getattr(m, attr) for m in self.modules]
        return float(fn(vals)) if vals else 0.0

    @property
    def worst_module(self) -> str | None:
        if not self.modules:
            return None
        return max(self.modules, key=lambda m: m.err_delta).name

    def summary(self) -> dict[str, Any]:
        mean = lambda v: sum(v) / len(v)  # noqa: E731
        return {
            "modules": len(self.modules),
            "params_before": self.params_before, "params_after": self.params_after,
            "compression": self.compression,
            "max_err_a": self._stat("err_a", max), "mean_err_a": self._stat("err_a", mean),
            "max_err_b": self._stat("err_b", max), "mean_err_b": self._stat("err_b", mean),
            "max_err_delta": self._stat("err_delta", max),
            "mean_err_delta": self._stat("err_delta", mean),
            "max_delta_bound": self._stat("delta_bound", max),
            "worst_module": self.worst_module,
        }

    def to_dict(self) -> dict[str, Any]:
        mods = []
        for m in self.modules:
            d = asdict(m)
            d["compression"] = m.compression
            mods.append(d)
        return {"direction": self.direction, "eps": self.eps, "tensor_rank": self.tensor_rank,
                "rank": self.rank, "eps_met": self.eps_met, "summary": self.summary(),
                "full_tensors": self.full_tensors, "modules_to_save": self.modules_to_save,
                "replaced_dense": self.replaced_dense, "seconds": self.seconds,
                "notes": self.notes, "modules": mods}


# --------------------------------------------------------------------------- error measurements

def delta_errors(a: torch.Tensor, b: torch.Tensor, a2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """Per item ``||a b - a2 b2||_F / ||a b||_F`` for batches ``a, a2 (M, in, r)``,
    ``b, b2 (M, r, out)``, without forming any ``(in, out)`` matrix.

    ``a b - a2 b2 = [a - a2, a2] @ [b; b - b2]``, so its squared norm is ``tr(G1 G2)`` with
    the ``(2r, 2r)`` Gram matrices ``G1 = L^T L``, ``G2 = R R^T``. Written with the
    differences (not ``[a, -a2] [b; b2]``) the terms are all of the error's own size, so
    there is no cancellation: fp32 Grams give the error to fp32 relative accuracy.
    """
    left = torch.cat([a - a2, a2], dim=-1)                       # (M, in, 2r)
    right = torch.cat([b, b - b2], dim=-2)                       # (M, 2r, out)
    g1 = (left.transpose(-1, -2) @ left).double()                # (M, 2r, 2r)
    g2 = (right @ right.transpose(-1, -2)).double()
    num = (g1 * g2).sum((-1, -2)).clamp_min(0)
    den = ((a.transpose(-1, -2) @ a).double() * (b @ b.transpose(-1, -2)).double()).sum((-1, -2))
    out = (num / den.clamp_min(1e-300)).sqrt()
    out = torch.where(den > 0, out, torch.where(num > 0, torch.full_like(out, math.inf), torch.zeros_like(out)))
    return out.float()


def rel_delta_error(a: torch.Tensor, b: torch.Tensor, a2: torch.Tensor, b2: torch.Tensor) -> float:
    """:func:`delta_errors` of one pair ``a (in, r), b (r, out)``. When ``a2, b2`` have
    another rank (a truncation), ``[a, -a2] [b; b2]`` is used, in float64."""
    if a.shape == a2.shape:
        f = lambda t: t.float().unsqueeze(0)  # noqa: E731
        return float(delta_errors(f(a), f(b), f(a2), f(b2))[0])
    left = torch.cat([a, -a2], dim=1).double()       # (in, r + k)
    right = torch.cat([b, b2], dim=0).double()       # (r + k, out)
    num = float(((left.T @ left) * (right @ right.T)).sum().clamp_min(0))
    den = float(((a.T.double() @ a.double()) * (b.double() @ b.T.double())).sum())
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return math.sqrt(num / den)


def rel_errors(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per row ``||x - y|| / ||x||`` of ``(G, N)`` batches (0 where both are zero)."""
    den = torch.linalg.vector_norm(x, dim=-1).double()
    num = torch.linalg.vector_norm(x - y, dim=-1).double()
    out = torch.where(den > 0, num / den.clamp_min(1e-300),
                      torch.where(num > 0, torch.full_like(num, math.inf), torch.zeros_like(num)))
    return out.float()
