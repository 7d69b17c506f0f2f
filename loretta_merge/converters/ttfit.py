"""Fit LoRETTA_rep cores to a low-rank delta directly.

TT-SVD of the two factors (``converters.lora.lora_to_tt``) bounds each factor's error but
does not minimise the error of their PRODUCT, which is what a merge adds to the weights.
:func:`fit_rep_cores` starts from those cores and runs Adam on
``||P Q - A(cores_a) B(cores_b)||_F^2 / ||P Q||_F^2`` for a target given by its factors
``P (in, k)`` and ``Q (k, out)`` (the truncated SVD of the delta). The loss never forms an
``(in, out)`` matrix: ``P Q - A B = [P, -A] [Q; B]``, so its squared norm is the trace of a
product of two ``(2k, 2k)`` Gram matrices. Every step costs a reconstruction of the two TTs
and two thin Gram products; the best cores seen are returned.
"""

from __future__ import annotations

import math

import torch


def _full(cores: list[torch.Tensor], rows: int, cols: int) -> torch.Tensor:
    """The TT's matrix, contracted left to right (the convention of ``tt.reconstruct``,
    without its checks: the cores were checked when they were made)."""
    out = cores[0].reshape(-1, cores[0].shape[-1])
    for c in cores[1:]:
        out = (out @ c.reshape(c.shape[0], -1)).reshape(-1, c.shape[-1])
    return out.reshape(rows, cols)


def _inner(cores_a, rows_a: int) -> int:
    """The inner width ``k`` of the TT factor ``A (rows_a, k)`` from its cores' mode sizes;
    it may differ from the target's ``p.shape[1]`` (a target given by its full SVD)."""
    return math.prod(int(c.shape[1]) for c in cores_a) // rows_a


def _loss(p, q, ca, cb, den, rows_a, k, cols_b):
    a = _full(ca, rows_a, k)
    b = _full(cb, k, cols_b)
    left = torch.cat([p, -a], dim=1)             # (in, 2k)
    right = torch.cat([q, b], dim=0)             # (2k, out)
    num = ((left.T @ left) * (right @ right.T)).sum()
    return num / den


def fit_rep_cores(p: torch.Tensor, q: torch.Tensor, cores_a: list[torch.Tensor],
                  cores_b: list[torch.Tensor], *, steps: int = 300, lr: float = 3e-2,
                  seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor], float, float]:
    """Adam on the TT cores of ``A (in, k)`` and ``B (k, out)`` so that ``A @ B`` approaches
    ``p @ q``. Returns ``(cores_a, cores_b, start_error, best_error)`` with relative
    Frobenius errors against ``p @ q``; the cores returned are the best seen (the start
    cores when no step improved on them). Runs in float64 on the CPU (small problems) or in
    float32 (large ones), on ``p``'s device; the cores come back in fp32."""
    del seed  # deterministic: no randomness is used
    rows_a, cols_b = p.shape[0], q.shape[1]
    k = _inner(cores_a, rows_a)
    big = rows_a * k + k * cols_b > 4_000_000 or p.device.type != "cpu"
    dtype = torch.float32 if big else torch.float64
    na = float(p.norm()) or 1.0
    nb = float(q.norm()) or 1.0
    P, Q = (p.to(dtype) / na), (q.to(dtype) / nb)
    den = ((P.T @ P) * (Q @ Q.T)).sum().clamp_min(1e-300)
    ca = [c.detach().to(device=p.device, dtype=dtype).clone() for c in cores_a]
    cb = [c.detach().to(device=p.device, dtype=dtype).clone() for c in cores_b]
    ca[-1] /= na
    cb[-1] /= nb
    # spread each TT's norm evenly over its cores, so one Adam step size suits them all
    for cs in (ca, cb):
        norms = [float(c.norm()) for c in cs]
        g = math.exp(sum(math.log(max(n, 1e-30)) for n in norms) / len(cs))
        for c, n in zip(cs, norms):
            c *= g / max(n, 1e-30)
    params = [c.requires_grad_(True) for c in ca + cb]
    with torch.no_grad():
        start = float(_loss(P, Q, ca, cb, den, rows_a, k, cols_b).clamp_min(0).sqrt())
    best, best_cores = start, [c.detach().clone() for c in params]
    if steps > 0 and start > 0:
        opt = torch.optim.Adam(params, lr=lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=lr * 1e-2)
        mark = best
        for step in range(steps):
            opt.zero_grad(set_to_none=True)
            loss = _loss(P, Q, ca, cb, den, rows_a, k, cols_b)
            err = float(loss.detach().clamp_min(0).sqrt())
            if err < best and math.isfinite(err):
                best, best_cores = err, [c.detach().clone() for c in params]
            if step % 50 == 49:  # stalled: under 0.1% better than 50 steps ago
                if best > mark * (1 - 1e-3):
                    break
                mark = best
            loss.backward()
            opt.step()
            sched.step()
        with torch.no_grad():
            err = float(_loss(P, Q, ca, cb, den, rows_a, k, cols_b).clamp_min(0).sqrt())
        if err < best and math.isfinite(err):
            best, best_cores = err, [c.detach().clone() for c in params]
    out_a = [c.float() for c in best_cores[:len(ca)]]
    out_b = [c.float() for c in best_cores[len(ca):]]
    out_a[-1] = out_a[-1] * na
    out_b[-1] = out_b[-1] * nb
    return out_a, out_b, start, best


# --------------------------------------------------------------------------- ALS

def _core_map(cores: list[torch.Tensor], j: int) -> torch.Tensor:
    """``M`` with ``vec(TT) = M @ vec(core j)``: ``(N, r_{j-1} n_j r_j)``, C order."""
    left = torch.ones(1, 1, dtype=cores[0].dtype, device=cores[0].device)
    for c in cores[:j]:
        left = (left @ c.reshape(c.shape[0], -1)).reshape(-1, c.shape[-1])       # (N_left, r_{j-1})
    right = torch.ones(1, 1, dtype=cores[0].dtype, device=cores[0].device)
    for c in reversed(cores[j + 1:]):
        right = (c.reshape(-1, c.shape[-1]) @ right).reshape(c.shape[0], -1)      # (r_j, N_right)
    n = cores[j].shape[1]
    eye = torch.eye(n, dtype=left.dtype, device=left.device)
    # M[(l, i, r), (a, i', b)] = left[l, a] * eye[i, i'] * right[b, r]
    m = torch.einsum("la,ij,br->lirajb", left, eye, right)
    return m.reshape(left.shape[0] * n * right.shape[1], -1)


def _solve(h: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    ridge = 1e-12 * float(torch.diagonal(h).abs().mean().clamp_min(1e-300))
    h = h + ridge * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    return torch.linalg.lstsq(h, rhs.unsqueeze(-1)).solution.squeeze(-1)


def als_budget_ok(rows_a: int, k: int, cols_b: int, cores_a, cores_b, *,
                  max_entries: int = 20_000_000) -> bool:
    """Whether one ALS step's explicit core map fits the budget (``N * core size`` entries)."""
    biggest = max(c.numel() for c in list(cores_a) + list(cores_b))
    return max(rows_a, cols_b) * k * biggest <= max_entries


def als_rep_cores(p: torch.Tensor, q: torch.Tensor, cores_a: list[torch.Tensor],
                  cores_b: list[torch.Tensor], *, sweeps: int = 20
                  ) -> tuple[list[torch.Tensor], list[torch.Tensor], float, float]:
    """Alternating least squares on the cores: each core in turn gets the exact minimiser of
    ``||p q - A B||_F`` with the other cores fixed (a ``(size, size)`` linear system built from
    the core's explicit linear map). Same contract as :func:`fit_rep_cores`. Float64.
    ``p``/``q`` may be wider than the TT's inner width (e.g. the delta's full SVD factors,
    to fit the delta itself rather than its rank-k truncation)."""
    rows_a, cols_b = p.shape[0], q.shape[1]
    k = _inner(cores_a, rows_a)
    dt = torch.float64
    na = float(p.norm()) or 1.0
    nb = float(q.norm()) or 1.0
    P, Q = p.to(dt) / na, q.to(dt) / nb
    den = ((P.T @ P) * (Q @ Q.T)).sum().clamp_min(1e-300)
    ca = [c.detach().to(dt).clone() for c in cores_a]
    cb = [c.detach().to(dt).clone() for c in cores_b]
    ca[-1] /= na
    cb[-1] /= nb

    def err() -> float:
        return float(_loss(P, Q, ca, cb, den, rows_a, k, cols_b).clamp_min(0).sqrt())

    start = err()
    best, best_cores = start, [c.clone() for c in ca + cb]
    mark = best
    for sweep in range(sweeps):
        b_mat = _full(cb, k, cols_b)
        g_b, c_rhs = b_mat @ b_mat.T, P @ (Q @ b_mat.T)                    # (k, k), (in, k)
        for j in range(len(ca)):
            m = _core_map(ca, j).reshape(rows_a, k, -1)
            wm = torch.einsum("icp,cd->idp", m, g_b)
            h = torch.einsum("icp,icq->pq", m, wm)
            ca[j] = _solve(h, torch.einsum("icp,ic->p", m, c_rhs)).reshape(ca[j].shape)
        a_mat = _full(ca, rows_a, k)
        g_a, d_rhs = a_mat.T @ a_mat, (a_mat.T @ P) @ Q                     # (k, k), (k, out)
        for j in range(len(cb)):
            m = _core_map(cb, j).reshape(k, cols_b, -1)
            wm = torch.einsum("cd,dop->cop", g_a, m)
            h = torch.einsum("cop,coq->pq", m, wm)
            cb[j] = _solve(h, torch.einsum("cop,co->p", m, d_rhs)).reshape(cb[j].shape)
        e = err()
        if e < best and math.isfinite(e):
            best, best_cores = e, [c.clone() for c in ca + cb]
        if sweep % 5 == 4:
            if best > mark * (1 - 1e-4):
                break
            mark = best
    out_a = [c.float() for c in best_cores[:len(ca)]]
    out_b = [c.float() for c in best_cores[len(ca):]]
    out_a[-1] = out_a[-1] * na
    out_b[-1] = out_b[-1] * nb
    return out_a, out_b, start, best
