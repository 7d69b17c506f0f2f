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
from contextlib import contextmanager, nullcontext
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
POWER_ITERS = 2        # most subspace iterations (randomized SVD)
NESTED = 5             # the convergence check's smaller sketch: this many columns fewer
CONVERGED = 5e-3       # ... whose rank-k error within this (relative) of the full sketch's stops
FORMULA_MIN_ERR = 1e-2  # below this error, measure the residual explicitly (cancellation)


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


def frobenius_sq(d: torch.Tensor) -> float:
    """``||d||_F^2`` to about 1e-8 relative: fp32 norms of the rows (short sums) added in
    float64 (one fp32 norm over millions of elements is off by ~1e-4, too coarse for
    :func:`sketch_svd`'s error, which is a difference of two such squares). ``d`` is taken
    along its contiguous dimension. Non-finite values give a non-finite result."""
    dim = -1 if d.ndim < 2 or d.stride(-1) == 1 else 0
    return float(torch.linalg.vector_norm(d, dim=dim).double().square().sum())


@dataclass
class Sketch:
    """:func:`sketch_svd`'s result: the top ``rank`` triplets and what they leave out."""

    u: torch.Tensor             # (m, rank)
    s: torch.Tensor             # (rank,)
    vh: torch.Tensor            # (rank, n)
    err: float | None           # relative Frobenius error of u s vh against d, from the
                                # norms; None below FORMULA_MIN_ERR (measure the residual)
    iters: int                  # subspace iterations run


def sketch_svd(d: torch.Tensor, rank: int, *, oversample: int = OVERSAMPLE,
               power_iters: int | None = None, seed: int = 0,
               norm_sq: float | None = None) -> Sketch:
    """The top ``rank`` singular triplets of ``d (m, n)`` from a Gaussian sketch: randomized
    range finder with subspace iteration, re-orthonormalised at each step; a fixed seed (drawn
    on the CPU, so every device starts from the same sketch), reproducible.

    Each iteration costs two passes over ``d``: ``Y = d W`` (``W`` the sketch, then the
    previous ``d^T Q`` orthonormalised), ``Q = qr(Y)``, ``Z = d^T Q``; ``Z^T = Q^T d`` is the
    projected matrix, whose SVD gives the triplets. Its rank-``k`` truncation ``P d``
    (``P = U_k U_k^T``, an orthogonal projection) has the exact error
    ``||d - P d||^2 = ||d||^2 - sum_{i<=k} s_i^2``, read from the norms with no pass over
    ``d``, good to about 1e-6 of ``||d||^2`` (fp32 products). Below ``FORMULA_MIN_ERR`` that
    difference of two near-equal squares loses too many digits: ``err`` is None there, and
    the caller measures the residual (:func:`residual_error`).

    ``power_iters`` None: as many iterations as needed, at most ``POWER_ITERS``: the first
    ``q - NESTED`` columns of every ``Q`` are exactly the same algorithm run with ``NESTED``
    fewer sketch columns (a QR keeps nested column spans), so both errors come from one
    ``Z``; when they agree within ``CONVERGED`` (relative), more columns or iterations would
    change the error little, and the loop stops. An int: exactly that many iterations.
    ``norm_sq``: ``||d||_F^2`` when the caller has it (:func:`frobenius_sq`).
    Cost: ``O(m n q)`` per pass with ``q = rank + oversample``, against ``O(m n min(m, n))``
    for the exact SVD."""
    m, n = d.shape
    q = min(rank + oversample, m, n)
    small_q = q - NESTED if q - NESTED >= rank else None
    total = frobenius_sq(d) if norm_sq is None else norm_sq
    g = torch.Generator(device="cpu").manual_seed(seed)
    w = torch.randn(n, q, generator=g, dtype=torch.float32).to(d.device, d.dtype)
    lapack = _one_thread if d.device.type == "cpu" else nullcontext

    def orth(y: torch.Tensor) -> torch.Tensor:
        with lapack():
            return torch.linalg.qr(y).Q

    def err_sq(s: torch.Tensor) -> float:
        kept = float(s[:rank].double().square().sum())
        return max(total - kept, 0.0) / total if total > 0 else 0.0

    most = POWER_ITERS if power_iters is None else power_iters
    iters = 0
    while True:
        basis = orth(d @ w)                                    # (m, q)
        z = d.T @ basis                                        # (n, q) = (Q^T d)^T
        if iters >= most:
            break
        if power_iters is None and small_q is not None:
            with lapack():
                e_small = err_sq(torch.linalg.svdvals(z[:, :small_q]))
                e_full = err_sq(torch.linalg.svdvals(z))
            if math.sqrt(e_small) - math.sqrt(e_full) <= CONVERGED * math.sqrt(e_small):
                break
        w = orth(z)
        iters += 1
    with lapack():
        ub, s, vh = torch.linalg.svd(z.T, full_matrices=False)  # (q, q), (q,), (q, n)
    u, s, vh = (basis @ ub[:, :rank]), s[:rank], vh[:rank]
    e2 = err_sq(s)
    err = math.sqrt(e2) if e2 >= FORMULA_MIN_ERR ** 2 or total == 0 else None
    return Sketch(u=u, s=s, vh=vh, err=err, iters=iters)


def residual_error(d: torch.Tensor, b: torch.Tensor, a: torch.Tensor, *, rows: int = 512,
                   norm_sq: float | None = None) -> float:
    """``||d - b a||_F / ||d||_F`` with the residual formed ``rows`` rows at a time (two
    ``(rows, in)`` temporaries instead of two of ``d``'s size), exactly."""
    total = frobenius_sq(d) if norm_sq is None else norm_sq
    if total == 0:
        return 0.0
    sq = 0.0
    for i in range(0, d.shape[0], rows):
        r = torch.addmm(d[i:i + rows], b[i:i + rows], a, alpha=-1)
        sq += float(torch.linalg.vector_norm(r, dim=-1).double().square().sum())
    return math.sqrt(sq / total)


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
