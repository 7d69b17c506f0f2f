"""The tensor-train math core: pure functions, no model code.

Convention (the one LoRETTA checkpoints use, see docs): a TT is a list of ``d`` cores,
core ``k`` of shape ``(r_{k-1}, n_k, r_k)`` with ``r_0 = r_d = 1``. Contracting the cores
left to right over their shared rank index gives a tensor of shape ``(n_1, ..., n_d)``;
reshaping that in C order to ``(rows, cols)`` gives the matrix. The modes need not line up
with the row/column split. :func:`reconstruct` owns this convention; every layer, merge
and converter calls it.

Batched forms take cores with a leading batch dimension, ``(B, r_{k-1}, n_k, r_k)``.
Half-precision cores are contracted in fp32.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Sequence

import torch

from .errors import ConfigError, ShapeError
from .modes import (PAPER_SHAPES, PAPER_SQUARE_SHAPES, check_int, factorize,  # noqa: F401
                    matrix_modes)

Cores = Sequence[torch.Tensor]

# --------------------------------------------------------------------------- validation

def validate_cores(cores: Cores, *, batched: bool = False, name: str = "TT") -> list[int]:
    """Check that ``cores`` form a TT and return its ranks ``[1, r_1, ..., r_{d-1}, 1]``.

    Rule: core k is ``(r_{k-1}, n_k, r_k)`` (with a leading batch dimension when
    ``batched``), ``r_0 = r_d = 1``, and core k starts with the rank core k-1 ends with.
    """
    if isinstance(cores, torch.Tensor) or not isinstance(cores, (list, tuple)) or not cores:
        raise ShapeError(f"{name}: expected a non-empty list of cores, got {type(cores).__name__}; pass a list of 3-D cores (r_prev, n, r_next)")
    ndim = 4 if batched else 3
    batch = None
    ranks = [1]
    for k, core in enumerate(cores):
        if not isinstance(core, torch.Tensor):
            raise ShapeError(f"{name}: core {k} is a {type(core).__name__}, not a tensor; re-save the adapter, or pass tensors as cores")
        if core.ndim != ndim:
            want = "(B, r_prev, n, r_next)" if batched else "(r_prev, n, r_next)"
            raise ShapeError(f"{name}: core {k} has shape {tuple(core.shape)}; "
                             f"every core must be {ndim}-D {want}; re-save the adapter, or pass {ndim}-D cores")
        if not (core.is_floating_point() or core.is_complex()):
            raise ShapeError(f"{name}: core {k} has dtype {core.dtype}; cores must be floating point; convert the cores to a float dtype (e.g. .float())")
        shape = tuple(core.shape[1:]) if batched else tuple(core.shape)
        if batched:
            if batch is None:
                batch = core.shape[0]
            elif core.shape[0] != batch:
                raise ShapeError(f"{name}: core {k} has batch size {core.shape[0]}, core 0 has {batch}; pass cores with one batch size")
        if min(shape) < 1:
            raise ShapeError(f"{name}: core {k} has an empty dimension, shape {tuple(core.shape)}; re-save the adapter, or pass cores without empty dimensions")
        if shape[0] != ranks[-1]:
            expected = "1 (the first rank of a TT is 1)" if k == 0 else f"{ranks[-1]} from core {k - 1}"
            raise ShapeError(f"{name}: core {k} has shape {tuple(core.shape)}, "
                             f"its rank r_{k} = {shape[0]}, expected {expected}; re-save the adapter, or pass cores whose ranks chain")
        ranks.append(shape[2])
    if ranks[-1] != 1:
        raise ShapeError(f"{name}: the last core has shape {tuple(cores[-1].shape)}; "
                         f"its last rank must be 1, got {ranks[-1]}; re-save the adapter, or pass cores whose last rank is 1")
    devices = {c.device for c in cores}
    if len(devices) > 1:
        raise ShapeError(f"{name}: cores live on several devices {sorted(map(str, devices))}; move every core to one device first")
    return ranks


def tt_modes_of(cores: Cores, *, batched: bool = False) -> list[int]:
    """The mode sizes ``[n_1, ..., n_d]`` of a TT."""
    return [int(c.shape[2 if batched else 1]) for c in cores]


def _check_modes(modes: object) -> list[int]:
    if isinstance(modes, (str, bytes)) or not isinstance(modes, Sequence) or not modes:
        raise ConfigError(f"modes must be a non-empty list of positive integers, got {modes!r}; pass positive integers, e.g. [8, 12, 8]")
    # numpy / torch integer scalars are modes too; floats and bools are not
    return [check_int(f"mode {i}", int(n) if isinstance(n, numbers.Integral) and not isinstance(n, bool)
                       else n) for i, n in enumerate(modes)]


def tt_num_params(modes: Sequence[int], rank: int | Sequence[int]) -> int:
    """Parameters of a TT with the given modes; ``rank`` is the inner rank R or the full
    rank list ``[1, r_1, ..., 1]``."""
    modes = _check_modes(modes)
    if isinstance(rank, int) and not isinstance(rank, bool):
        ranks = tt_ranks(modes, rank)
    elif isinstance(rank, Sequence) and not isinstance(rank, (str, bytes)):
        ranks = [check_int(f"rank {i}", r) for i, r in enumerate(rank)]
    else:
        raise ConfigError(f"rank must be an integer or a list of ranks, got {rank!r}; pass an int such as 5 or a list of ranks")
    if len(ranks) != len(modes) + 1:
        raise ConfigError(f"rank list {ranks} needs {len(modes) + 1} entries for {len(modes)} modes; give {len(modes) + 1} ranks or a single integer")
    return sum(ranks[k] * n * ranks[k + 1] for k, n in enumerate(modes))


def tt_ranks(modes: Sequence[int], rank: int, *, cap: bool = False) -> list[int]:
    """Ranks ``[1, R, ..., R, 1]``. With ``cap``, each inner rank is also limited to what
    the modes allow (``min(prod(left modes), prod(right modes))``); the paper does not cap."""
    check_int("tensor rank", rank)
    modes = _check_modes(modes)
    d = len(modes)
    ranks = [1] + [rank] * (d - 1) + [1]
    if cap:
        for k in range(1, d):
            ranks[k] = min(ranks[k], math.prod(modes[:k]), math.prod(modes[k:]))
    return ranks


# --------------------------------------------------------------------------- reconstruction

def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _split_point(modes: Sequence[int]) -> int:
    """Index k so that modes[:k] and modes[k:] have products closest to each other."""
    total = math.prod(modes)
    best, best_k = None, 1
    left = 1
    for k in range(1, len(modes)):
        left *= modes[k - 1]
        gap = abs(math.log(left) - math.log(total / left))
        if best is None or gap < best:
            best, best_k = gap, k
    return best_k


def _contract_batched(cores: Cores, dtype: torch.dtype) -> torch.Tensor:
    """(B, N) full tensors of batched TTs, flattened in C order: contract the left and
    right halves separately, then one matmul (cheaper than a left-to-right chain)."""
    cores = [c.to(dtype) for c in cores]
    b = cores[0].shape[0]
    d = len(cores)
    if d == 1:
        return cores[0].reshape(b, -1)
    k = _split_point(tt_modes_of(cores, batched=True))
    left = cores[0].reshape(b, -1, cores[0].shape[-1])  # (B, n_1, r_1)
    for core in cores[1:k]:
        r_prev, n, r_next = core.shape[1:]
        left = torch.matmul(left, core.reshape(b, r_prev, n * r_next)).reshape(b, -1, r_next)
    right = cores[-1].reshape(b, cores[-1].shape[1], -1)  # (B, r_{d-1}, n_d)
    for core in reversed(cores[k:-1]):
        r_prev, n, r_next = core.shape[1:]
        right = torch.matmul(core.reshape(b, r_prev * n, r_next), right).reshape(b, r_prev, -1)
    return torch.matmul(left, right).reshape(b, -1)  # (B, N_left * N_right)


def _check_matrix(modes: Sequence[int], rows: int, cols: int, name: str) -> None:
    check_int("rows", rows)
    check_int("cols", cols)
    if math.prod(modes) != rows * cols:
        raise ShapeError(f"{name}: modes {list(modes)} multiply to {math.prod(modes)}, "
                         f"but a ({rows}, {cols}) matrix has {rows * cols} entries; "
                         f"the product of the modes must equal rows * cols; pick modes whose product is {rows * cols}")


def tt_to_tensor(cores: Cores, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The full tensor ``(n_1, ..., n_d)`` of a TT."""
    validate_cores(cores)
    out_dtype = dtype or cores[0].dtype
    full = _contract_batched([c.unsqueeze(0) for c in cores], _work_dtype(cores[0].dtype))
    return full.reshape(tt_modes_of(cores)).to(out_dtype)


def reconstruct(cores: Cores, rows: int, cols: int, *, dtype: torch.dtype | None = None,
                name: str = "TT") -> torch.Tensor:
    """The ``(rows, cols)`` matrix stored by ``cores``, on the cores' device.

    Half-precision cores are contracted in fp32; the result has ``dtype`` (default: the
    cores' dtype).
    """
    validate_cores(cores, name=name)
    _check_matrix(tt_modes_of(cores), rows, cols, name)
    full = _contract_batched([c.unsqueeze(0) for c in cores], _work_dtype(cores[0].dtype))
    return full.reshape(rows, cols).to(dtype or cores[0].dtype)


def reconstruct_batched(cores: Cores, rows: int, cols: int, *, dtype: torch.dtype | None = None,
                        name: str = "TT") -> torch.Tensor:
    """Reconstruct B same-shaped TTs at once: cores ``(B, r_{k-1}, n_k, r_k)`` ->
    ``(B, rows, cols)``."""
    validate_cores(cores, batched=True, name=name)
    _check_matrix(tt_modes_of(cores, batched=True), rows, cols, name)
    full = _contract_batched(cores, _work_dtype(cores[0].dtype))
    return full.reshape(-1, rows, cols).to(dtype or cores[0].dtype)


def stack_tts(tts: Sequence[Cores]) -> list[torch.Tensor]:
    """Stack TTs of identical core shapes into batched cores."""
    if not tts:
        raise ShapeError("stack_tts: no TTs given; pass at least one TT")
    shapes = [tuple(tuple(c.shape) for c in tt) for tt in tts]
    for i, s in enumerate(shapes):
        if s != shapes[0]:
            raise ShapeError(f"stack_tts: TT {i} has core shapes {list(s)}, TT 0 has {list(shapes[0])}; pass TTs that all share TT 0's core shapes")
    return [torch.stack([tt[k] for tt in tts]) for k in range(len(tts[0]))]


def unstack_tts(cores: Cores) -> list[list[torch.Tensor]]:
    """Inverse of :func:`stack_tts`."""
    return [[c[i] for c in cores] for i in range(cores[0].shape[0])]


# --------------------------------------------------------------------------- decomposition

@dataclass
class TTDecomposition:
    """Result of :func:`tt_svd` / :func:`tt_round`.

    ``rel_error`` is the achieved relative Frobenius error ``||x - tt|| / ||x||`` (per
    item for batched calls), computed from the discarded singular values, which is exact
    for TT-SVD because every step projects onto orthonormal bases.
    """

    cores: list[torch.Tensor]
    rel_error: torch.Tensor
    ranks: list[int]


def _check_eps(eps: float | None) -> None:
    if eps is not None and (isinstance(eps, bool) or not isinstance(eps, (int, float))
                            or not math.isfinite(eps) or not 0 <= eps < 1):
        raise ConfigError(f"eps (relative error target) must be in [0, 1), got {eps!r}; pass eps in [0, 1), e.g. 0.05")


def _truncate(mat: torch.Tensor, max_rank: int | None, delta_sq: torch.Tensor, *, gram: bool = True):
    """Batched truncated factorisation ``mat (B, m, n) ~= U (B, m, r) @ C (B, r, n)`` with
    orthonormal U and the smallest common r whose discarded energy is <= delta_sq for every
    item (then capped by max_rank). Returns (U, C, discarded energy per item).

    The Gram route (wide matrices) is fast but squares the condition number: in fp32 it
    resolves relative errors down to about 1e-3; pass ``gram=False`` (plain SVD) for more."""
    b, m, n = mat.shape
    if gram and m <= n:
        # Gram route: eigen-decompose the small (m, m) Gram matrix in the working dtype
        # (fp32 eigh is ~2x faster than fp64 on stacks of Grams); energies and their tail
        # sums are accumulated in float64.
        gram = torch.matmul(mat, mat.transpose(1, 2))
        evals, evecs = torch.linalg.eigh(gram)
        evals = evals.to(torch.float64).flip(-1).clamp_min(0)
        basis = evecs.flip(-1)
    else:
        u, s, _ = torch.linalg.svd(mat, full_matrices=False)
        evals = (s.to(torch.float64) ** 2)
        basis = u
    kmax = evals.shape[-1]
    # tails[:, j] = energy discarded when keeping j components
    tails = torch.flip(torch.cumsum(torch.flip(evals, [-1]), -1), [-1])
    tails = torch.cat([tails, torch.zeros_like(tails[:, :1])], dim=-1)
    ok = tails <= delta_sq.unsqueeze(-1)  # (B, kmax + 1)
    need = torch.where(ok.any(-1), ok.to(torch.int8).argmax(-1), torch.full_like(ok[:, 0], kmax,
                                                                               dtype=torch.long))
    r = max(1, int(need.max()))
    if max_rank is not None:
        r = min(r, max_rank)
    r = min(r, kmax)
    u = basis[..., :r]
    carry = torch.matmul(u.transpose(1, 2), mat)
    return u, carry, tails[:, r]


def tt_svd_batched(x: torch.Tensor, modes: Sequence[int], *, max_rank: int | None = None,
                   eps: float | None = None, dtype: torch.dtype | None = None) -> TTDecomposition:
    """TT-SVD (Oseledets 2011) of B tensors at once: ``x`` is ``(B, ...)`` with
    ``prod(modes)`` entries per item, read in C order.

    Truncation: at each of the d-1 steps discard at most ``(eps / sqrt(d-1))**2 * ||x||^2``
    of energy, so ``||x - tt|| <= eps * ||x||``; ranks are then capped at ``max_rank``
    (which can break the eps bound: the returned ``rel_error`` tells). With neither, the
    decomposition is exact. Items share ranks (the largest any item needs), so the result
    is a batched TT. Computation is in fp32 (fp64 for fp64 input) on x's device.
    """
    _check_eps(eps)
    if max_rank is not None:
        check_int("max_rank", max_rank)
    modes = _check_modes(modes)
    if not isinstance(x, torch.Tensor) or x.ndim < 1:
        raise ShapeError("tt_svd_batched: x must be a tensor with a leading batch dimension; pass a tensor of shape (batch, ...)")
    b = x.shape[0]
    if x[0].numel() != math.prod(modes):
        raise ShapeError(f"tt_svd: an item of shape {tuple(x.shape[1:])} has {x[0].numel()} entries, "
                         f"modes {modes} multiply to {math.prod(modes)}; pick modes whose product is {x[0].numel()}")
    work = _work_dtype(x.dtype) if x.is_floating_point() else torch.float32
    out_dtype = dtype or (x.dtype if x.is_floating_point() else torch.float32)
    x = x.to(work).reshape(b, -1)
    norm_sq = (x.to(torch.float64) ** 2).sum(-1)
    d = len(modes)
    delta_sq = norm_sq * ((eps or 0.0) ** 2) / max(d - 1, 1)
    cores: list[torch.Tensor] = []
    discarded = torch.zeros_like(norm_sq)
    rank = 1
    carry = x.reshape(b, 1, -1)
    for k in range(d - 1):
        mat = carry.reshape(b, rank * modes[k], -1)
        u, carry, tail = _truncate(mat, max_rank, delta_sq)
        new_rank = u.shape[-1]
        cores.append(u.reshape(b, rank, modes[k], new_rank))
        discarded += tail
        rank = new_rank
    cores.append(carry.reshape(b, rank, modes[-1], 1))
    rel = torch.where(norm_sq > 0, (discarded / norm_sq.clamp_min(1e-300)).clamp_min(0).sqrt(),
                      torch.zeros_like(norm_sq))
    cores = [c.to(out_dtype) for c in cores]
    return TTDecomposition(cores=cores, rel_error=rel.to(torch.float32),
                           ranks=[1] + [int(c.shape[-1]) for c in cores])


def tt_svd(x: torch.Tensor, modes: Sequence[int], *, max_rank: int | None = None,
           eps: float | None = None, dtype: torch.dtype | None = None) -> TTDecomposition:
    """TT-SVD of one matrix or tensor ``x`` (read in C order) with the given modes.
    See :func:`tt_svd_batched`; ``rel_error`` is a 0-d tensor here."""
    if not isinstance(x, torch.Tensor):
        raise ShapeError(f"tt_svd: x must be a tensor, got {type(x).__name__}; pass a torch.Tensor")
    res = tt_svd_batched(x.unsqueeze(0), modes, max_rank=max_rank, eps=eps, dtype=dtype)
    return TTDecomposition(cores=[c[0] for c in res.cores], rel_error=res.rel_error[0],
                           ranks=res.ranks)


def tt_round(cores: Cores, *, max_rank: int | None = None, eps: float | None = None) -> TTDecomposition:
    """Re-compress a TT to lower ranks without forming the full tensor (Oseledets 2011,
    Algorithm 2): right-to-left orthogonalisation, then left-to-right truncated SVDs with
    the same per-step budget as :func:`tt_svd`. ``rel_error`` is relative to the input TT."""
    validate_cores(cores)
    _check_eps(eps)
    if max_rank is not None:
        check_int("max_rank", max_rank)
    out_dtype = cores[0].dtype
    work = _work_dtype(out_dtype)
    cs = [c.to(work).clone() for c in cores]
    d = len(cs)
    # right-to-left: make cores 1..d-1 right-orthonormal
    for k in range(d - 1, 0, -1):
        r_prev, n, r_next = cs[k].shape
        q, r = torch.linalg.qr(cs[k].reshape(r_prev, n * r_next).T)  # (n r_next, r'), (r', r_prev)
        cs[k] = q.T.reshape(-1, n, r_next)
        cs[k - 1] = torch.tensordot(cs[k - 1], r.T, dims=([2], [0]))
    norm_sq = (cs[0].to(torch.float64) ** 2).sum().reshape(1)
    delta_sq = norm_sq * ((eps or 0.0) ** 2) / max(d - 1, 1)
    discarded = torch.zeros_like(norm_sq)
    for k in range(d - 1):
        r_prev, n, r_next = cs[k].shape
        u, carry, tail = _truncate(cs[k].reshape(1, r_prev * n, r_next), max_rank, delta_sq,
                                   gram=False)
        new_rank = u.shape[-1]
        cs[k] = u[0].reshape(r_prev, n, new_rank)
        cs[k + 1] = torch.tensordot(carry[0], cs[k + 1], dims=([1], [0]))
        discarded += tail
    rel = torch.where(norm_sq > 0, (discarded / norm_sq.clamp_min(1e-300)).sqrt(), torch.zeros_like(norm_sq))
    out = [c.to(out_dtype) for c in cs]
    return TTDecomposition(cores=out, rel_error=rel[0].to(torch.float32),
                           ranks=[1] + [int(c.shape[-1]) for c in out])


def random_cores(modes: Sequence[int], rank: int, rows: int, cols: int, *,
                 generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> list[torch.Tensor]:
    """The paper's initialisation: core k ~ N(0, 1) / sqrt(r_k) * sigma**(1/d) with
    ``sigma = sqrt(1 / (rows + cols))``, so reconstructed entries have std about sigma."""
    _check_matrix(modes, rows, cols, "random_cores")
    ranks = tt_ranks(modes, rank)
    d = len(modes)
    sigma = math.sqrt(1.0 / (rows + cols))
    cores = []
    for k, n in enumerate(modes):
        g = torch.randn(ranks[k], n, ranks[k + 1], generator=generator, dtype=torch.float32)
        cores.append((g / math.sqrt(ranks[k + 1]) * sigma ** (1.0 / d)).to(dtype=dtype, device=device))
    return cores
