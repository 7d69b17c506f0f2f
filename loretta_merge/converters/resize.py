"""``convert resize``: lower the rank of an adapter, with the same rank rules and report as
``extract``.

* PEFT LoRA: per module the SVD of ``scale * B @ A`` is computed from QR factorisations of
  the two factors (``A^T = Q_a R_a``, ``B = Q_b R_b``, then the SVD of the small ``(r, r)``
  matrix ``R_b R_a^T``), never forming the ``(out, in)`` product. The kept part is written
  with ``lora_alpha = r`` (scale 1), its singular values split evenly between B and A.
  This is the best approximation of each delta at the chosen rank (Eckart-Young).
* LoRETTA_rep: each factor's TT is rounded (``tt.tt_round``: orthogonalisation and
  truncated SVDs of the cores, never the full tensor) to inner ranks ``<= rank`` or to a
  relative error ``eps`` per factor (``energy=E`` means ``eps = sqrt(1 - E)``); the LoRA rank
  ``r`` of the module stays. TT-replaced dense layers and full tensors are kept as they are.

Every module's delta error is MEASURED from the written factors (small Gram matrices,
:mod:`.reports`).
"""

from __future__ import annotations

import math
import time

import torch

from .. import tt
from ..errors import FormatError
from ..formats import (
    Adapter,
    LoraModule,
    RepModule,
    TTMatrix,
    peft_lora_config,
    as_adapter,
)
from .lowrank import RankReport, RankRow, check_rank_options, choose_rank, kept_energy
from .reports import rel_delta_error

__all__ = ["lora_svd", "resize"]


def lora_svd(a: torch.Tensor, b: torch.Tensor, scale: float):
    """``scale * b @ a`` (``a (r, in)``, ``b (out, r)``) as ``U S Vh`` with ``U (out, r)``,
    ``S (r,)``, ``Vh (r, in)``, from QR of the factors (float64; no ``(out, in)`` matrix)."""
    qa, ra = torch.linalg.qr(a.double().T)            # a^T = qa ra: (in, r), (r, r)
    qb, rb = torch.linalg.qr(b.double())              # b = qb rb: (out, r), (r, r)
    u, s, vh = torch.linalg.svd(rb @ ra.T)            # b a = qb (rb ra^T) qa^T
    sign = -1.0 if scale < 0 else 1.0
    return qb @ u, s * abs(scale), sign * (vh @ qa.T)


def _resize_lora(name: str, m: LoraModule, *, rank, energy, eps, where) -> tuple[LoraModule, RankRow]:
    if m.magnitude is not None:
        raise FormatError(f"{where}: module {name} is DoRA (lora_magnitude_vector); its merged "
                          f"weight is rescaled by norms of the base weight, so a lower-rank LoRA "
                          f"cannot stand for it; merge it with PEFT's merge_and_unload instead")
    r = int(m.a.shape[0])
    u, s, vh = lora_svd(m.a, m.b, m.scale)
    k = choose_rank(s, rank=min(rank, r) if rank is not None else None, energy=energy, eps=eps)
    root = s[:k].sqrt()
    b = (u[:, :k] * root).float().contiguous()
    a = (root[:, None] * vh[:k]).float().contiguous()
    out = LoraModule(a=a, b=b, scale=1.0)
    err = rel_delta_error(m.a.T.float() * float(m.scale), m.b.T.float(), a.T, b.T)
    n_out, n_in = int(m.b.shape[0]), int(m.a.shape[1])
    row = RankRow(name=name, out_features=n_out, in_features=n_in, rank=k, rank_before=r,
                  energy=kept_energy(s, k), err=err, params=k * (n_in + n_out),
                  params_before=r * (n_in + n_out))
    return out, row


def _rep_error(m: RepModule, m2: RepModule) -> float:
    a, b = m.a.matrix(torch.float32) * float(m.scale), m.b.matrix(torch.float32)
    a2, b2 = m2.a.matrix(torch.float32) * float(m2.scale), m2.b.matrix(torch.float32)
    return rel_delta_error(a, b, a2, b2)


def _resize_rep(name: str, m: RepModule, *, rank, eps) -> tuple[RepModule, RankRow]:
    def round_tt(x: TTMatrix) -> TTMatrix:
        res = tt.tt_round([c.float() for c in x.cores], max_rank=rank, eps=eps)
        return TTMatrix(cores=[c.contiguous() for c in res.cores], rows=x.rows, cols=x.cols)

    out = RepModule(a=round_tt(m.a), b=round_tt(m.b), scale=float(m.scale))
    err = _rep_error(m, out)

    def ranks(t: TTMatrix) -> list[int]:
        return [1] + [int(c.shape[-1]) for c in t.cores]

    row = RankRow(name=name, out_features=m.b.cols, in_features=m.a.rows,
                  rank=max(ranks(out.a) + ranks(out.b)), rank_before=max(ranks(m.a) + ranks(m.b)),
                  energy=max(0.0, 1.0 - err * err), err=err, params=out.num_params(),
                  params_before=m.num_params(), ranks_a=ranks(out.a), ranks_b=ranks(out.b))
    return out, row


def resize(adapter, *, rank: int | None = None, energy: float | None = None,
           eps: float | None = None, allow_unsafe_pickle: bool = False) -> tuple[Adapter, RankReport]:
    """A lower-rank copy of a PEFT LoRA or LoRETTA_rep adapter (directory or ``Adapter``).

    LoRA: ``rank`` / ``energy`` / ``eps`` choose each module's LoRA rank (:mod:`.lowrank`;
    a rank above a module's own rank keeps it). rep: ``rank`` caps the inner TT ranks,
    ``eps`` (or ``energy = 1 - eps^2``) is the relative error target of each factor's
    rounding. Write a LoRA result with ``formats.write_peft_lora``, a rep one with
    ``formats.write_adapter``. Returns ``(Adapter, RankReport)``."""
    check_rank_options(rank, energy, eps, command="convert resize")
    start = time.perf_counter()
    src = as_adapter(adapter, allow_unsafe_pickle=allow_unsafe_pickle)
    where = src.path or "<in-memory adapter>"
    if src.method not in ("lora", "rep"):
        raise FormatError(f"{where}: is a {src.method!r} adapter; resize handles PEFT LoRA and "
                          f"LoRETTA_rep adapters (LoRETTA_adp bottlenecks have no rank to lower); pass a LoRA or rep adapter")
    rows: list[RankRow] = []
    modules: dict = {}
    kind = "lora" if src.method == "lora" else "tt"
    report = RankReport(command="resize", output_kind=kind, modules=rows, rank=rank, energy=energy,
                        eps=eps, tensor_rank=rank if kind == "tt" else None)
    capped = []
    for name, m in src.modules.items():
        if isinstance(m, LoraModule):
            modules[name], row = _resize_lora(name, m, rank=rank, energy=energy, eps=eps, where=where)
            if rank is not None and rank > row.rank_before:
                capped.append(name)
        elif isinstance(m, RepModule):
            tt_eps = eps if eps is not None else (math.sqrt(max(0.0, 1.0 - energy)) if energy is not None else None)
            modules[name], row = _resize_rep(name, m, rank=rank, eps=tt_eps)
        else:
            modules[name] = m          # a TT-replaced dense layer: kept as it is
            continue
        rows.append(row)
    if not rows:
        raise FormatError(f"{where}: the adapter has no LoRA or rep modules to resize; pass a LoRA or rep adapter")
    tensors = {k: v.detach().clone() for k, v in src.tensors.items()}
    report.carried = {k: list(v.shape) for k, v in tensors.items()}
    report.carried_params = sum(v.numel() for v in tensors.values())
    if capped:
        report.notes.append(f"--rank {rank} is above the rank of {len(capped)} module(s), kept at "
                            f"their own rank (e.g. {capped[0]})")
    if kind == "lora":
        cfg = src.config
        out = Adapter(method="lora", source="peft", modules=modules, tensors=tensors,
                      config={"task_type": cfg.get("task_type"), "use_rslora": False,
                              "lora_dropout": float(cfg.get("lora_dropout", 0.0) or 0.0)},
                      fan_in_fan_out=set(src.fan_in_fan_out) & set(modules),
                      base_model_name_or_path=src.base_model_name_or_path, path=None)
        out.config = peft_lora_config(out)
        if src.config.get("modules_to_save") and out.config.get("modules_to_save") is None:
            out.config["modules_to_save"] = src.config["modules_to_save"]
    else:
        cfg = dict(src.config)
        cfg["tensor_rank"] = max((max(r.ranks_a + r.ranks_b) for r in rows), default=cfg.get("tensor_rank"))
        cfg["resized"] = {"rank": rank, "energy": energy, "eps": eps}
        out = Adapter(method="rep", source="loretta-merge", modules=modules, tensors=tensors,
                      config=cfg, fan_in_fan_out=set(src.fan_in_fan_out),
                      base_model_name_or_path=src.base_model_name_or_path, path=None)
    if report.summary()["params"] >= report.summary()["params_before"]:
        report.notes.append("nothing was made smaller: every module already fits the rank rule")
    report.seconds = time.perf_counter() - start
    return out, report
