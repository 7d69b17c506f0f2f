"""Extract a low-rank adapter from a fine-tuned checkpoint: ``W_ft - W0`` -> LoRA or TT.

Both checkpoints are read tensor by tensor (``io.CheckpointReader``: headers first, then
one positioned read per tensor), so memory holds a few tensors whatever the model. Per
targeted Linear (or GPT-2 ``Conv1D``) weight the delta is formed in fp32, decomposed by an
exact truncated SVD (``torch.linalg.svd``), and its rank chosen by
:func:`.lowrank.choose_rank` (a fixed rank, the energy kept, or a relative error target).
With ``D = U S V^T`` (``D`` in ``(out, in)`` orientation) the LoRA factors are
``lora_B = U_k sqrt(S_k)`` and ``lora_A = sqrt(S_k) V_k^T`` with ``lora_alpha = r`` (scale
1), so PEFT's delta is exactly the truncated SVD.

``to="tt"`` turns each module's factors into LoRETTA_rep cores: first the TT-SVD of the
factors (``converters.lora.lora_to_tt``), then cores fitted to the delta itself
(:mod:`.ttfit`); the one with the smaller measured delta error is kept and both errors are
reported.

Tensors that changed but are not targets (norms, biases, heads, embeddings, untargeted
Linear weights) are carried whole (PEFT ``modules_to_save`` in a LoRA; full tensors in our
TT adapter, which ``loretta-merge`` writes over the base's). Unchanged tensors are not
written. Everything is checked from the headers before a tensor is read: shapes, the
architecture, a resized vocabulary, the rank against each module's size.
"""

from __future__ import annotations

import math
import os
import time

import torch

from ..errors import ConfigError, FormatError, ShapeError
from ..formats import Adapter, LoraModule, RepModule, TTMatrix
from ..formats.peft import exact_keys
from ..io import CheckpointReader, resolve_device
from .extract_plan import ALL_LINEAR, ExtractPlan, looks_like_embedding, plan_extract
from .extract_reads import DeltaPrefetch
from .lowrank import (CONVERGED, NESTED, OVERSAMPLE, POWER_ITERS, RankReport, RankRow, check_rank_options,
                      choose_rank, frobenius_sq, kept_energy, residual_error, sketch_svd)

__all__ = ["ALL_LINEAR", "ExtractPlan", "extract", "plan_extract"]  # planning: .extract_plan

# --------------------------------------------------------------------------- the work

def _decompose(d: torch.Tensor, *, rank, energy, eps, svd: str = "exact",
               norm_sq: float | None = None) -> tuple[LoraModule, float, int, float | None, int | None]:
    """Truncated SVD of ``d (out, in)`` as LoRA factors (scale 1): ``(lora, energy kept, k,
    err, subspace iterations)``, on ``d``'s device.

    ``svd="exact"``: ``torch.linalg.svd`` and the rank rule; ``err`` None (the caller
    measures the residual) and iterations None. ``svd="randomized"`` (a fixed rank only):
    :func:`.lowrank.sketch_svd`, the top ``rank`` triplets from a sketch; the energy is the
    kept singular values' against ``||d||_F^2`` and ``err`` the factors' exact error from the
    norms (None where that loses digits: the caller measures the residual)."""
    err = iters = None
    if svd == "randomized":
        total = frobenius_sq(d) if norm_sq is None else norm_sq
        sk = sketch_svd(d, rank, norm_sq=total)
        u, s, vh, k, err, iters = sk.u, sk.s, sk.vh, rank, sk.err, sk.iters
        kept = float((s[:k].double() ** 2).sum()) / total if total > 0 else 1.0
    else:
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        k = choose_rank(s, rank=rank, energy=energy, eps=eps)
        kept = kept_energy(s, k)
    root = s[:k].clamp_min(0).sqrt()
    b = (u[:, :k] * root).contiguous()                  # (out, k)
    a = (root[:, None] * vh[:k]).contiguous()           # (k, in)
    return LoraModule(a=a, b=b, scale=1.0), min(kept, 1.0), k, err, iters


def _use_randomized(svd: str, shape, rank, energy, eps) -> bool:
    """``auto``: randomized for a fixed rank well below the module's size (the exact SVD
    costs O(m n min(m, n)); the sketch O(m n (rank + oversampling)))."""
    if svd == "exact" or energy is not None or eps is not None or rank is None:
        return False
    if svd == "randomized":
        return True
    return min(shape) >= 256 and 4 * (rank + OVERSAMPLE) <= min(shape)


def _rel(d: torch.Tensor, approx: torch.Tensor) -> float:
    n = float(torch.linalg.matrix_norm(d))
    return float(torch.linalg.matrix_norm(d - approx)) / n if n > 0 else 0.0


def tt_module(name: str, lora: LoraModule, d: torch.Tensor, *, tensor_rank: int, shapes: str,
               fit_steps: int, fit_to: str = "svd", als_max_entries: int = 20_000_000
               ) -> tuple[RepModule, float, float | None, str]:
    """LoRETTA_rep cores for one module: TT-SVD of its factors, then cores fitted to the
    delta (alternating least squares when its linear systems are small, else ``fit_steps``
    Adam steps); the better of the two by the measured delta error. ``fit_to``: "svd"
    fits the product of the cores to the rank-k truncated SVD ``lora`` holds; "delta" to
    ``d`` itself (through its full thin SVD, so no ``(out, in)`` residual is formed).
    ``als_max_entries``: ALS only where one core's explicit map has at most this many entries
    (its linear systems grow with the core: a lower cap trades ALS for Adam, faster).
    Returns (module, err TT-SVD, err fit, "tt-svd" | "als" | "adam": the one kept)."""
    from .lora import lora_to_tt
    from .ttfit import als_budget_ok, als_rep_cores, fit_rep_cores

    k = lora.a.shape[0]
    one = Adapter(method="lora", source="peft", modules={name: lora}, config={"r": k, "lora_alpha": k})
    rep, _ = lora_to_tt(one, tensor_rank=tensor_rank, shapes=shapes)
    m0 = rep.modules[name]
    err_svd = _rel(d, m0.delta().T)
    if fit_steps <= 0:
        return m0, err_svd, None, "tt-svd"
    if fit_to not in ("svd", "delta"):
        raise ConfigError(f"fit_to must be 'svd' or 'delta', got {fit_to!r}; pass fit_to='svd' "
                          f"or fit_to='delta'")
    if fit_to == "delta":
        u, s, vh = torch.linalg.svd(d.float(), full_matrices=False)
        root = s.clamp_min(0).sqrt()
        p, q = (root[:, None] * vh).T.contiguous(), (u * root).T.contiguous()
    else:
        p, q = lora.a.T.contiguous(), lora.b.T.contiguous()
    if als_budget_ok(p.shape[0], k, q.shape[1], m0.a.cores, m0.b.cores, max_entries=als_max_entries):
        ca, cb, _, _ = als_rep_cores(p, q, m0.a.cores, m0.b.cores)
        how = "als"
    else:
        ca, cb, _, _ = fit_rep_cores(p, q, m0.a.cores, m0.b.cores, steps=fit_steps)
        how = "adam"
    m1 = RepModule(a=TTMatrix(cores=ca, rows=m0.a.rows, cols=m0.a.cols),
                   b=TTMatrix(cores=cb, rows=m0.b.rows, cols=m0.b.cols), scale=1.0)
    err_fit = _rel(d, m1.delta().T)
    return (m1, err_svd, err_fit, how) if err_fit < err_svd else (m0, err_svd, err_fit, "tt-svd")


def _config(plan: ExtractPlan, modules: dict, to: str, *, rank, energy, eps, tensor_rank, shapes,
            fit_steps) -> dict:
    ranks = {n: (m.a.shape[0] if isinstance(m, LoraModule) else m.a.cols) for n, m in modules.items()}
    r0 = max(set(ranks.values()), key=list(ranks.values()).count) if ranks else 1
    keys = exact_keys(sorted(modules))
    pattern = {keys[n]: r for n, r in sorted(ranks.items()) if r != r0}
    cfg = {"r": r0, "lora_alpha": r0, "use_rslora": False, "lora_dropout": 0.0,
           "rank_pattern": pattern, "alpha_pattern": dict(pattern), "task_type": None,
           "target_modules": sorted(modules)}
    if to == "tt":
        cfg.update({"tensor_rank": tensor_rank, "bias": "none",
                    "modules_to_save": None,
                    "extracted_from": {"base": str(plan.base_dir), "finetuned": str(plan.ft_dir),
                                       "rank": rank, "energy": energy, "eps": eps,
                                       "tensor_rank": tensor_rank, "shapes": shapes,
                                       "fit_steps": fit_steps}})
    return cfg


def extract(base, finetuned, *, to: str = "lora", rank: int | None = None,
            energy: float | None = None, eps: float | None = None, target_modules=None,
            tensor_rank: int = 5, shapes: str = "paper", fit_steps: int = 300,
            svd: str = "auto", progress=None, fit_to: str = "svd",
            device: str = "cpu", refine=None) -> tuple[Adapter, RankReport]:
    """The adapter that turns checkpoint ``base`` into (an approximation of) ``finetuned``.

    ``to``: ``"lora"`` (PEFT LoRA, write with ``formats.write_peft_lora``) or ``"tt"``
    (LoRETTA_rep, write with ``formats.write_adapter``). Rank rule: ``rank`` / ``energy`` /
    ``eps`` (:mod:`.lowrank`). ``target_modules``: PEFT-style keys, ``"all-linear"``, or
    None for the architecture's defaults (all Linear weights when it has none).
    ``tensor_rank`` / ``shapes`` / ``fit_steps``: the TT form (``to="tt"``); ``fit_to``:
    what the cores are fitted to, the rank-k truncated SVD (``"svd"``) or the delta itself
    (``"delta"``, through its full SVD: the lower error against the delta).
    ``svd``: ``"exact"`` (``torch.linalg.svd``), ``"randomized"`` (a fixed ``rank`` only:
    :func:`.lowrank.sketch_svd`) or ``"auto"`` (randomized for a fixed rank at most a
    quarter of a module's smaller side less the oversampling, else exact); each module's
    error is measured either way (from the written factors, or exactly from the norms).
    ``device``: where the deltas are formed and decomposed (``cpu``, ``cuda``, ``cuda:N``,
    ``auto``); the tensors are read on the CPU, the factors come back to it, and ``to="tt"``
    fits the cores on the CPU.
    ``progress(i, n, key)`` is called before each tensor.
    ``refine``: a :class:`.refine.RefineOptions` to distil the extracted modules towards the
    fine-tune's outputs on unlabelled text afterwards (:func:`.refine.refine_adapter`; each
    module's error is then measured again, the report's ``refine`` says what it did).
    Returns ``(Adapter, RankReport)``.
    """
    check_rank_options(rank, energy, eps, command="extract")
    if svd not in ("auto", "exact", "randomized"):
        raise ConfigError(f"--svd must be auto, exact or randomized, got {svd!r}; pass one of "
                          "those (auto: randomized for a fixed rank well below the module's size)")
    if svd == "randomized" and (energy is not None or eps is not None):
        raise ConfigError("--svd randomized needs a fixed --rank (--energy / --eps choose the "
                          "rank from all singular values); pass --svd exact or auto")
    n_randomized, iter_counts = 0, {}
    dev = resolve_device(device)
    if to not in ("lora", "tt"):
        raise ConfigError(f"--to must be 'lora' or 'tt', got {to!r}; pass --to lora or --to tt")
    if to == "tt" and (isinstance(tensor_rank, bool) or not isinstance(tensor_rank, int) or tensor_rank < 1):
        raise ConfigError(f"--tensor-rank must be an integer >= 1, got {tensor_rank!r}; pass e.g. --tensor-rank 5")
    if fit_to not in ("svd", "delta"):
        raise ConfigError(f"--fit-to must be 'svd' or 'delta', got {fit_to!r}; pass --fit-to svd "
                          f"or --fit-to delta")
    if to == "tt" and shapes not in ("paper", "auto"):
        raise ConfigError(f"--shapes must be 'paper' or 'auto', got {shapes!r}; pass --shapes paper or --shapes auto")
    texts = refine.texts() if refine is not None else None     # bad data fails before the work
    start = time.perf_counter()
    # a fixed rank must fit every module; as a cap (with --energy/--eps) it is clamped per module
    fixed = rank if energy is None and eps is None else None
    plan = plan_extract(base, finetuned, target_modules=target_modules, rank=fixed)
    modules: dict = {}
    tensors: dict[str, torch.Tensor] = {}
    rows: list[RankRow] = []
    report = RankReport(command="extract", output_kind=to, modules=rows, rank=rank, energy=energy,
                        eps=eps, tensor_rank=tensor_rank if to == "tt" else None,
                        added=list(plan.added), dropped=list(plan.dropped))
    with CheckpointReader(plan.base_dir) as base_r, CheckpointReader(plan.ft_dir) as ft_r:
        keys = plan.common + plan.added
        reader = DeltaPrefetch(plan, base_r, ft_r, keys, dev)
        try:
            for i, (kind, key, payload, norm_sq) in enumerate(reader):
                if progress is not None:
                    progress(i, len(keys), key)
                if kind == "same":
                    report.unchanged += 1
                    if key in plan.targets:
                        report.unchanged_targets.append(plan.targets[key])
                    continue
                if kind == "carry":
                    tensors[key] = payload
                    continue
                if kind == "nonfinite":
                    raise FormatError(f"{key}: the delta has NaN/Inf values (one of the checkpoints "
                                      f"holds non-finite weights); re-save the checkpoints")
                name = plan.targets[key]
                d, token = payload                        # fp32, on the device
                if name in plan.conv1d:
                    d = d.T                               # Conv1D stores (in, out)
                how = "randomized" if _use_randomized(svd, d.shape, rank, energy, eps) else "exact"
                n_randomized += how == "randomized"
                lora, kept, k, err_svd, iters = _decompose(d, rank=rank, energy=energy, eps=eps,
                                                           svd=how, norm_sq=norm_sq)
                if err_svd is None:
                    err_svd = residual_error(d, lora.b, lora.a, norm_sq=norm_sq)
                if iters is not None:
                    iter_counts[iters] = iter_counts.get(iters, 0) + 1
                if dev.type != "cpu":
                    lora = LoraModule(a=lora.a.cpu(), b=lora.b.cpu(), scale=lora.scale)
                row = RankRow(name=name, out_features=d.shape[0], in_features=d.shape[1], rank=k,
                              energy=kept, err=err_svd, err_svd=err_svd,
                              params=k * sum(d.shape), params_before=d.numel())
                if to == "tt":
                    mod, e_svd, e_fit, how = tt_module(name, lora, d.cpu(), tensor_rank=tensor_rank,
                                                        shapes=shapes, fit_steps=fit_steps,
                                                        fit_to=fit_to)
                    row.err_tt_svd, row.err_tt_fit, row.tt_method = e_svd, e_fit, how
                    row.err = min(e_svd, e_fit if e_fit is not None else math.inf)
                    row.params = mod.num_params()
                    row.ranks_a = [1] + [int(c.shape[-1]) for c in mod.a.cores]
                    row.ranks_b = [1] + [int(c.shape[-1]) for c in mod.b.cores]
                    modules[name] = mod
                else:
                    modules[name] = lora
                del d
                reader.release(token)
                rows.append(row)
        finally:
            reader.close()
        if to == "lora":
            _whole_modules_for_peft(plan, ft_r, modules, rows, tensors, report)
    if not modules:
        raise ShapeError(f"{plan.ft_dir}: no targeted weight differs from {plan.base_dir} "
                         f"({plan.target_source}); nothing to extract. Check the pair, or pass "
                         f"--target-modules naming the Linear modules that were trained")
    report.carried = {k: list(v.shape) for k, v in tensors.items()}
    report.carried_params = sum(v.numel() for v in tensors.values())
    _notes(report, plan)
    if n_randomized:
        its = ", ".join(f"{n} with {i}" for i, n in sorted(iter_counts.items()))
        report.notes.append(f"{n_randomized} module(s) by a randomized SVD (rank {rank}, "
                            f"{OVERSAMPLE} extra sketch columns; subspace iterations until the "
                            f"sketch with {NESTED} columns fewer gives the same error within "
                            f"{CONVERGED:.1%}, at most {POWER_ITERS}: {its}); their errors are "
                            f"exact (||D||^2 - ||U_k^T D||^2, the written factors being the "
                            f"projection U_k U_k^T D); --svd exact for the exact SVD")
    method = "rep" if to == "tt" else "lora"
    adapter = Adapter(method=method, source="loretta-merge" if to == "tt" else "peft",
                      modules=modules, tensors=tensors,
                      config=_config(plan, modules, to, rank=rank, energy=energy, eps=eps,
                                     tensor_rank=tensor_rank, shapes=shapes, fit_steps=fit_steps),
                      fan_in_fan_out=set(plan.conv1d) & set(modules),
                      base_model_name_or_path=str(plan.base_dir), path=None)
    if refine is not None:
        from .refine import refine_adapter

        record, _ = refine_adapter(adapter, plan.base_dir, plan.ft_dir, texts, seconds=refine.seconds,
                                   max_steps=refine.max_steps, lr=refine.lr,
                                   batch_size=refine.batch_size, max_length=refine.max_length,
                                   progress=refine.progress)
        for row in rows:
            row.err_before_refine, row.err = row.err, record["delta_errors"].get(row.name, row.err)
        record["data"] = refine.data
        report.refine = record
        report.notes.append(f"refined on {record['texts']} unlabelled texts of {refine.data}: "
                            f"{record['steps']} steps in {record['seconds']:.0f} s (stopped by "
                            f"{record['stopped_by']}), loss {record['loss_first']:.4g} -> "
                            f"{record['loss_last']:.4g}; err is the refined delta's")
    report.seconds = time.perf_counter() - start
    return adapter, report


def _owner(key: str) -> str:
    return key.rsplit(".", 1)[0] if "." in key else key


def _whole_modules_for_peft(plan: ExtractPlan, ft: CheckpointReader, modules: dict,
                            rows: list[RankRow], tensors: dict, report: RankReport) -> None:
    """PEFT's ``modules_to_save`` replaces whole modules and expects every parameter of each
    in the file: carry the unchanged siblings of carried tensors too. A targeted module whose
    own bias (or other parameter) changed cannot also be a LoRA module there, so its weight
    is carried whole instead of as LoRA factors (``--to tt`` keeps it low-rank)."""
    owners = {_owner(k) for k in tensors}
    clash = sorted(m for m in modules if m in owners)
    for name in clash:
        key = next(k for k, m in plan.targets.items() if m == name)
        tensors[key] = ft.get(key)
        del modules[name]
        rows[:] = [r for r in rows if r.name != name]
    if clash:
        report.notes.append(f"{len(clash)} targeted module(s) also changed their bias, which a PEFT "
                            f"LoRA module cannot carry: their weights are carried whole (e.g. "
                            f"{clash[0]}); --to tt keeps them low-rank")
    siblings = [k for k in plan.common + plan.added
                if _owner(k) in owners and k not in tensors and k not in plan.targets]
    for key in siblings:
        tensors[key] = ft.get(key)
    if siblings:
        report.notes.append(f"{len(siblings)} unchanged tensor(s) carried beside changed ones of "
                            f"the same module (PEFT's modules_to_save holds whole modules), e.g. "
                            f"{siblings[0]}")


def _notes(report: RankReport, plan: ExtractPlan) -> None:
    report.notes.append(f"targets: {plan.target_source}")
    if plan.dtype_changes:
        report.notes.append(f"{len(plan.dtype_changes)} tensor(s) are stored in another dtype in "
                            f"the fine-tune (e.g. {plan.dtype_changes[0]}): rounding alone changes "
                            f"them, so they count as changed; save both checkpoints in one dtype "
                            f"to carry only what training changed")
    linear_carried = [k for k in report.carried if k.endswith(".weight") and len(report.carried[k]) == 2
                      and not looks_like_embedding(k)]
    if linear_carried:
        report.notes.append(f"{len(linear_carried)} changed 2-D weight(s) outside the targets are "
                            f"carried whole (e.g. {linear_carried[0]}); --target-modules "
                            f"{ALL_LINEAR} extracts them low-rank")
    if plan.added:
        report.notes.append(f"{len(plan.added)} tensor(s) only in the fine-tune carried whole "
                            f"(e.g. {plan.added[0]})")
    if report.unchanged_targets:
        report.notes.append(f"{len(report.unchanged_targets)} targeted module(s) unchanged, not "
                            f"written (e.g. {report.unchanged_targets[0]})")


def output_exists_check(out, force: bool) -> None:
    """Refuse an existing OUT before any work (the writers check again, atomically)."""
    from ..errors import OutputExistsError

    if os.path.exists(out) and not force:
        raise OutputExistsError(f"{out} already exists; choose another output or pass --force")
