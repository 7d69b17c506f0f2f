"""Rank choice and the report shared by ``extract`` and ``convert resize``.

A delta with singular values ``s_1 >= s_2 >= ...`` keeps the top ``k``. Three rules pick
``k`` (exactly one of ``energy`` / ``eps`` may be given; ``rank`` alone is a fixed rank,
with one of the others it is a cap):

* ``rank=R``: ``k = R``;
* ``energy=E`` in (0, 1]: the smallest ``k`` whose kept energy ``sum_{i<=k} s_i^2 /
  sum s_i^2`` is at least ``E`` (the rule PEFT's ``convert_to_lora`` uses for a float rank);
* ``eps=X`` in (0, 1): the smallest ``k`` whose relative Frobenius error
  ``sqrt(sum_{i>k} s_i^2 / sum s_i^2)`` is at most ``X``.

``k`` is at least 1. Energies are summed in float64.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..errors import ConfigError


def check_rank_options(rank: int | None, energy: float | None, eps: float | None, *,
                       command: str) -> None:
    """One ConfigError line for a bad combination or value of --rank / --energy / --eps."""
    if rank is None and energy is None and eps is None:
        raise ConfigError(f"{command} needs --rank R, --energy E or --eps X to choose each "
                          f"module's rank; pass one of them (e.g. --rank 16 or --energy 0.99)")
    if energy is not None and eps is not None:
        raise ConfigError(f"{command}: --energy and --eps are two rules for the same choice; "
                          f"pass one of them (--rank may cap either)")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ConfigError(f"--rank must be an integer >= 1, got {rank!r}; pass e.g. --rank 16")
    if energy is not None and (isinstance(energy, bool) or not isinstance(energy, (int, float))
                               or not math.isfinite(energy) or not 0 < energy <= 1):
        raise ConfigError(f"--energy is the fraction of squared singular values to keep and "
                          f"must be in (0, 1], got {energy!r}; pass e.g. --energy 0.99")
    if eps is not None and (isinstance(eps, bool) or not isinstance(eps, (int, float))
                            or not math.isfinite(eps) or not 0 < eps < 1):
        raise ConfigError(f"--eps is a relative Frobenius error target and must be in (0, 1), "
                          f"got {eps!r}; pass e.g. --eps 0.05")


def energies(s: torch.Tensor) -> torch.Tensor:
    """Squared singular values in float64."""
    return s.detach().to("cpu", torch.float64) ** 2


def choose_rank(s: torch.Tensor, *, rank: int | None = None, energy: float | None = None,
                eps: float | None = None) -> int:
    """The number of singular values (``s`` sorted descending) to keep; see the module doc."""
    e = energies(s)
    n = int(e.numel())
    if n == 0:
        return 0
    total = float(e.sum())
    k = n
    if total > 0 and energy is not None:
        kept = torch.cumsum(e, 0) / total
        # tolerance: energy=1 must not demand more than the last ulp of the sum
        k = int(torch.searchsorted(kept, torch.tensor([energy - 1e-12], dtype=torch.float64))[0]) + 1
    elif total > 0 and eps is not None:
        tail = (total - torch.cumsum(e, 0)).clamp_min(0) / total     # tail[j]: error^2 keeping j+1
        ok = torch.nonzero(tail.sqrt() <= eps)
        k = int(ok[0, 0]) + 1 if ok.numel() else n
    elif total == 0:
        k = 1
    if rank is not None:
        k = min(k, rank) if (energy is not None or eps is not None) else rank
    return max(1, min(k, n))


def kept_energy(s: torch.Tensor, k: int) -> float:
    """Fraction of squared singular values in the top ``k`` (1.0 for a zero delta)."""
    e = energies(s)
    total = float(e.sum())
    return float(e[:k].sum()) / total if total > 0 else 1.0


def tail_error(s: torch.Tensor, k: int) -> float:
    """Relative Frobenius error of the rank-``k`` truncation, from the singular values."""
    e = energies(s)
    total = float(e.sum())
    return math.sqrt(max(float(e[k:].sum()), 0.0) / total) if total > 0 else 0.0


OVERSAMPLE = 10        # sketch columns beyond the rank (randomized SVD)
POWER_ITERS = 2        # subspace iterations (randomized SVD)


@contextmanager
def _one_thread():
    """Small LAPACK calls (QR of an ``(m, q)`` panel, SVD of a ``(q, n)`` one) under one
    thread: their work is tiny, and a team of threads on a busy machine spends far more
    waiting for each other (measured: 1.3 ms against 331 ms for one 5632x26 QR, load 7 on
    2 cores)."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def randomized_svd(d: torch.Tensor, rank: int, *, oversample: int = OVERSAMPLE,
                   power_iters: int = POWER_ITERS, seed: int = 0):
    """The top ``rank`` singular triplets of ``d (m, n)`` from a Gaussian sketch (randomized
    range finder with subspace iteration, re-orthonormalised at each step; a fixed seed, so
    a run is reproducible). Returns ``(U (m, rank), S (rank,), Vh (rank, n))``. Cost:
    ``O(m n q)`` with ``q = rank + oversample``, against ``O(m n min(m, n))`` exact."""
    m, n = d.shape
    q = min(rank + oversample, m, n)
    g = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn(n, q, generator=g, dtype=torch.float32).to(d.device, d.dtype)

    def orth(y: torch.Tensor) -> torch.Tensor:
        with _one_thread():
            return torch.linalg.qr(y).Q

    basis = orth(d @ omega)                                    # (m, q)
    for _ in range(power_iters):
        basis = orth(d.T @ basis)                              # (n, q)
        basis = orth(d @ basis)                                # (m, q)
    small = basis.T @ d                                        # (q, n)
    with _one_thread():
        ub, s, vh = torch.linalg.svd(small, full_matrices=False)
    return (basis @ ub)[:, :rank], s[:rank], vh[:rank]


# --------------------------------------------------------------------------- report

@dataclass
class RankRow:
    """One module: its chosen rank and how much of its delta the result keeps."""

    name: str
    out_features: int
    in_features: int
    rank: int
    energy: float               # fraction of squared singular values kept
    err: float                  # relative Frobenius error of the written delta (measured)
    params: int                 # parameters written for this module
    params_before: int          # dense delta (extract) or the input adapter's (resize)
    rank_before: int | None = None
    err_svd: float | None = None        # error of the truncated SVD alone
    err_tt_svd: float | None = None     # --to tt: TT-SVD of the factors
    err_tt_fit: float | None = None     # --to tt: cores fitted to the delta
    tt_method: str | None = None        # which of the two was kept
    err_before_refine: float | None = None  # extract --refine-data: the error before distillation
    ranks_a: list[int] = field(default_factory=list)
    ranks_b: list[int] = field(default_factory=list)


@dataclass
class RankReport:
    """What ``extract`` / ``convert resize`` wrote. ``to_dict()`` is the ``--json`` form."""

    command: str                        # "extract" | "resize" | "combine"
    output_kind: str                    # "lora" | "tt"
    modules: list[RankRow]
    rank: int | None = None
    energy: float | None = None
    eps: float | None = None
    tensor_rank: int | None = None
    carried: dict[str, list[int]] = field(default_factory=dict)   # full tensor -> shape
    carried_params: int = 0
    unchanged: int = 0
    unchanged_targets: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)       # in the fine-tune only (carried)
    dropped: list[str] = field(default_factory=list)     # in the base only (not written)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    refine: dict[str, Any] | None = None   # extract --refine-data: what the distillation did

    def summary(self) -> dict[str, Any]:
        mods = self.modules
        params = sum(m.params for m in mods)
        before = sum(m.params_before for m in mods)
        sq = sum((m.err ** 2) for m in mods)
        return {
            "modules": len(mods),
            "params": params, "params_before": before,
            "carried_tensors": len(self.carried), "carried_params": self.carried_params,
            "total_params": params + self.carried_params,
            "min_rank": min((m.rank for m in mods), default=0),
            "max_rank": max((m.rank for m in mods), default=0),
            "mean_energy": sum(m.energy for m in mods) / len(mods) if mods else 1.0,
            "max_err": max((m.err for m in mods), default=0.0),
            "rms_err": math.sqrt(sq / len(mods)) if mods else 0.0,
            "worst_module": max(mods, key=lambda m: m.err).name if mods else None,
        }

    def to_dict(self) -> dict[str, Any]:
        return {"command": self.command, "to": self.output_kind, "rank": self.rank,
                "energy": self.energy, "eps": self.eps, "tensor_rank": self.tensor_rank,
                "summary": self.summary(), "carried": self.carried,
                "unchanged": self.unchanged, "unchanged_targets": self.unchanged_targets,
                "added": self.added, "dropped": self.dropped, "seconds": self.seconds,
                "notes": self.notes, "refine": self.refine,
                "modules": [asdict(m) for m in self.modules]}

    def table(self, *, limit: int = 12) -> str:
        """The human summary: the worst ``limit`` modules, then the totals."""
        s = self.summary()
        tt = self.output_kind == "tt"
        stage = tt and self.command == "combine"   # combine: the SVD stage's error too
        lines = [f"{'module':<46} {'shape':>11} {'r':>4} {'energy':>8} {'err':>9} "
                 + (f"{'svd':>9} " if stage else "")
                 + (f"{'tt-svd':>9} {'tt-fit':>9} " if tt else "") + f"{'params':>9}"]
        for m in sorted(self.modules, key=lambda m: m.err, reverse=True)[:limit]:
            name = m.name if len(m.name) <= 46 else "..." + m.name[-43:]
            shape = f"{m.out_features}x{m.in_features}"

            def f(x):
                return f"{x:>9.2e}" if x is not None else f"{'-':>9}"
            lines.append(f"{name:<46} {shape:>11} {m.rank:>4} {m.energy:>8.4f} {m.err:>9.2e} "
                         + (f"{f(m.err_svd)} " if stage else "")
                         + (f"{f(m.err_tt_svd)} {f(m.err_tt_fit)} " if tt else "")
                         + f"{m.params:>9,}")
        if len(self.modules) > limit:
            lines.append(f"... {len(self.modules) - limit} more module(s) with smaller error "
                         f"(--json lists all)")
        lines.append(f"modules: {s['modules']}   ranks {s['min_rank']}..{s['max_rank']}   "
                     f"parameters: {s['params']:,} (from {s['params_before']:,})   "
                     f"time: {self.seconds:.2f} s")
        lines.append(f"delta error (relative Frobenius): max {s['max_err']:.3e}, "
                     f"rms {s['rms_err']:.3e}, worst {s['worst_module']}; "
                     f"mean energy kept {s['mean_energy']:.4f}")
        if self.carried:
            names = sorted(self.carried)
            lines.append(f"full tensors carried ({len(names)}, {self.carried_params:,} "
                         f"parameters): " + ", ".join(names[:6]) + (" ..." if len(names) > 6 else ""))
        if self.command == "extract":
            lines.append(f"unchanged tensors (not written): {self.unchanged}")
        if self.dropped:
            lines.append(f"in the base only (not written): {len(self.dropped)}, e.g. {self.dropped[0]}")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)
