"""Convert between PEFT LoRA and LoRETTA_rep (tensor-train) adapters, with error reports.

The relation (../shared/docs/LORETTA.md, section 2): a rep module stores the LoRA factors
as two TT matrices, ``A : (in, r)`` and ``B : (r, out)``, and its delta is
``scale * A @ B`` (``(in, out)``). PEFT stores ``lora_A.weight = A.T`` ``(r, in)`` and
``lora_B.weight = B.T`` ``(out, r)`` with the same ``r``/``lora_alpha`` and so the same scale.

* :func:`tt_to_lora` reconstructs the two TTs (exact), optionally followed by an SVD
  truncation of the delta to a lower rank. Its report MEASURES, per module, the delta PEFT
  will compute from the written adapter (factors, and the scale that PEFT's
  ``r``/``lora_alpha``/``rank_pattern``/``alpha_pattern`` rule gives) against the TT delta.
* :func:`lora_to_tt` is a TT-SVD of each factor, approximate unless the TT ranks are large
  enough. Factors that share a mode list are decomposed in one batched call.
  DoRA is refused: its magnitude vector rescales the columns of the MERGED weight by norms
  that depend on the base weight, so no pair of TT factors (rep adapter) reproduces it.

Error bound used in the reports. TT-SVD discards at most ``(eps / sqrt(d - 1))**2 * ||X||**2``
of energy at each of its ``d - 1`` steps, on orthonormal projections, so the factor error is
``||X - X'|| <= eps * ||X||`` (Oseledets 2011, Theorem 2.2). For the product,
``A B - A'B' = (A - A')B + A'(B - B')`` gives
``||AB - A'B'|| <= eA ||A|| ||B|| + (1 + eA) eB ||A|| ||B||``; relative to ``||A|| ||B||``
that is ``(1 + eA)(1 + eB) - 1``. It bounds the delta error relative to ``||A|| ||B||``
(not to ``||A B||``, which can be much smaller when A and B are nearly orthogonal), so the
report gives the bound AND the measured delta error (:mod:`.reports`).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch

from .. import tt
from ..errors import ConfigError, FormatError, ShapeError
from ..formats import (Adapter, LoraModule, RepModule, TTDenseModule, TTMatrix, peft_lora_config,
                       read_adapter, scale_for, write_peft_lora)
from ..io import resolve_device
from .reports import ConversionReport, ModuleReport, delta_errors, rel_delta_error, rel_errors

__all__ = ["lora_to_tt", "tt_to_lora", "write_peft_lora", "ConversionReport", "ModuleReport",
           "delta_errors"]


def _load(source, kind: str, allow_unsafe_pickle: bool) -> Adapter:
    if isinstance(source, Adapter):
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise ConfigError(f"expected a {kind} adapter directory or a loretta_merge.formats.Adapter, "
                          f"got {type(source).__name__}; pass the adapter directory")
    path = Path(source)
    if not path.is_dir():
        raise FormatError(f"{path}: not a directory; give the {kind} adapter directory "
                          f"(with adapter_config.json and adapter_model.safetensors)")
    return read_adapter(path, allow_unsafe_pickle=allow_unsafe_pickle)


def _module_of(param_name: str) -> str:
    return param_name.rsplit(".", 1)[0] if "." in param_name else param_name


# --------------------------------------------------------------------------- LoRA -> TT

def _check_lora_to_tt_options(tensor_rank: int | None, eps: float | None, shapes: str) -> None:
    if tensor_rank is None and eps is None:
        raise ConfigError("lora-to-tt needs --tensor-rank N (a maximum TT rank), --eps E "
                          "(a relative error target in (0, 1)), or both; pass at least one of them")
    if eps is not None and (isinstance(eps, bool) or not isinstance(eps, (int, float))
                            or not math.isfinite(eps) or not 0 < eps < 1):
        raise ConfigError(f"eps must be a relative error in (0, 1), got {eps!r}; pass e.g. --eps 0.05")
    if tensor_rank is not None and (isinstance(tensor_rank, bool) or not isinstance(tensor_rank, int)
                                    or tensor_rank < 1):
        raise ConfigError(f"tensor_rank (--tensor-rank) must be an integer >= 1, got {tensor_rank!r}; pass e.g. --tensor-rank 5")
    if shapes not in ("paper", "auto"):
        raise ConfigError(f"shapes must be 'paper' or 'auto', got {shapes!r}; pass --shapes paper or --shapes auto")


def _check_lora_modules(adapter: Adapter) -> None:
    where = adapter.path or "<in-memory adapter>"
    if adapter.method != "lora":
        raise FormatError(f"{where}: is a {adapter.method!r} adapter ({adapter.source}), not a PEFT "
                          f"LoRA; lora-to-tt converts LoRA adapters (use tt-to-lora for TT ones)")
    if not adapter.modules:
        raise FormatError(f"{where}: the adapter has no LoRA modules to convert; pass a PEFT LoRA adapter directory")
    for name, m in adapter.modules.items():
        if not isinstance(m, LoraModule):
            raise FormatError(f"{where}: module {name} is a {type(m).__name__}, expected a LoRA "
                              f"module (lora_A/lora_B weights); convert only LoRA adapters (use tt-to-lora for TT ones)")
        if m.magnitude is not None:
            raise ConfigError(
                f"{where}: module {name} is DoRA (it has lora_magnitude_vector of shape "
                f"{tuple(m.magnitude.shape)}); DoRA rescales every column of the merged weight by "
                f"a norm that depends on the base weight, so a TT of its factors is not a "
                f"LoRETTA_rep adapter. Merge the DoRA adapter into the base first, or convert a "
                f"plain LoRA (use_dora=false)")
        if m.a.ndim != 2 or m.b.ndim != 2 or m.a.shape[0] != m.b.shape[1]:
            raise ShapeError(f"{where}: module {name} has lora_A.weight {tuple(m.a.shape)} and "
                             f"lora_B.weight {tuple(m.b.shape)}; expected (r, in) and (out, r) "
                             f"with the same r; re-save or re-download the adapter")


class _Factors:
    """Every factor matrix of a LoRA as items ``2k`` (A, ``(in, r)``) and ``2k + 1`` (B,
    ``(r, out)``) of module ``k``, with their TT cores, reconstructions and errors."""

    def __init__(self, adapter: Adapter) -> None:
        self.names: list[str] = []
        self.mats: list[torch.Tensor] = []
        for name, m in adapter.modules.items():
            self.names.append(name)
            self.mats += [m.a.T, m.b.T]
        self.cores: dict[int, list[torch.Tensor]] = {}
        self.recon: dict[int, torch.Tensor] = {}
        self.err: dict[int, float] = {}
        self.delta_err: dict[int, float] = {}

    def decompose(self, *, shapes: str, device: torch.device, tensor_rank: int | None,
                  eps: float | None) -> None:
        """Batched TT-SVD of the factors sharing a mode list; errors MEASURED on the cores."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, x in enumerate(self.mats):
            groups.setdefault(tuple(tt.matrix_modes(*x.shape, shapes=shapes)), []).append(i)
        for modes, idx in groups.items():
            x = torch.stack([self.mats[i].detach().to(device=device, dtype=torch.float32).reshape(-1)
                             for i in idx])                                   # (G, N)
            dec = tt.tt_svd_batched(x, list(modes), max_rank=tensor_rank, eps=eps)
            full = tt.reconstruct_batched(dec.cores, 1, x.shape[1])[:, 0]     # (G, N)
            errs = rel_errors(x, full).tolist()
            cores, full = [c.to("cpu") for c in dec.cores], full.to("cpu")
            for j, i in enumerate(idx):
                self.cores[i] = [c[j].contiguous() for c in cores]
                self.recon[i] = full[j].reshape(self.mats[i].shape)
                self.err[i] = errs[j]

    def measure_deltas(self) -> None:
        """Delta errors of every module, batched over modules of the same (in, r, out)."""
        by_shape: dict[tuple[int, int, int], list[int]] = {}
        for k in range(0, len(self.mats), 2):
            by_shape.setdefault((*self.mats[k].shape, self.mats[k + 1].shape[1]), []).append(k)
        for ks in by_shape.values():
            def stack(src, j, ks=ks):
                return torch.stack([src[k + j].float() for k in ks])
            errs = delta_errors(stack(self.mats, 0), stack(self.mats, 1),
                                stack(self.recon, 0), stack(self.recon, 1)).tolist()
            self.delta_err.update(zip(ks, errs))

    def module(self, k: int, scale: float) -> tuple[RepModule, ModuleReport]:
        (n_in, r), n_out = self.mats[k].shape, self.mats[k + 1].shape[1]
        ca, cb = self.cores[k], self.cores[k + 1]
        mod = RepModule(a=TTMatrix(cores=ca, rows=n_in, cols=r),
                        b=TTMatrix(cores=cb, rows=r, cols=n_out), scale=float(scale))
        err_a, err_b = self.err[k], self.err[k + 1]
        report = ModuleReport(
            name=self.names[k // 2], in_features=n_in, out_features=n_out, r=r, err_a=err_a,
            err_b=err_b, err_delta=self.delta_err[k],
            params_before=r * (n_in + n_out), params_after=sum(c.numel() for c in ca + cb),
            modes_a=tt.tt_modes_of(ca), modes_b=tt.tt_modes_of(cb),
            ranks_a=[1] + [int(c.shape[-1]) for c in ca], ranks_b=[1] + [int(c.shape[-1]) for c in cb],
            delta_bound=(1 + err_a) * (1 + err_b) - 1)
        return mod, report


def _lora_to_tt_notes(report: ConversionReport, eps: float | None, tensor_rank: int | None) -> None:
    if eps is not None:
        missed = [m.name for m in report.modules if max(m.err_a, m.err_b) > eps]
        report.eps_met = not missed
        if missed:
            why = (f"the tensor-rank cap {tensor_rank} binds" if tensor_rank is not None
                   else "fp32 rounding exceeds so small an eps")
            report.notes.append(f"eps={eps} not met by {len(missed)} module(s) ({why}), e.g. {missed[0]}")
    if report.compression < 1.0:
        report.notes.append(f"the TT form is larger than the LoRA ({report.params_after:,} vs "
                            f"{report.params_before:,} parameters): these factors have little TT "
                            f"structure; use a smaller --tensor-rank or a larger --eps")


def _rep_config(adapter: Adapter, reports: list[ModuleReport], *, tensor_rank: int | None,
                eps: float | None, shapes: str) -> dict:
    cfg = adapter.config
    max_inner = max(max(m.ranks_a + m.ranks_b) for m in reports)
    return {
        "r": cfg.get("r"), "lora_alpha": cfg.get("lora_alpha"),
        "use_rslora": bool(cfg.get("use_rslora", False)),
        "rank_pattern": dict(cfg.get("rank_pattern") or {}),
        "alpha_pattern": dict(cfg.get("alpha_pattern") or {}),
        "tensor_rank": tensor_rank if tensor_rank is not None else max_inner,
        "target_modules": sorted(adapter.modules),
        "modules_to_save": cfg.get("modules_to_save"),
        "task_type": cfg.get("task_type"),
        "lora_dropout": cfg.get("lora_dropout", 0.0),
        "bias": cfg.get("bias", "none"),
        "converted_from": "peft-lora",
        "conversion": {"eps": eps, "tensor_rank": tensor_rank, "shapes": shapes},
    }


def lora_to_tt(lora, *, tensor_rank: int | None = None, eps: float | None = None,
               shapes: str = "paper", device: str | torch.device = "cpu",
               allow_unsafe_pickle: bool = False) -> tuple[Adapter, ConversionReport]:
    """TT-decompose every factor of a PEFT LoRA adapter into a LoRETTA_rep adapter.

    ``lora`` is a PEFT LoRA directory or a ``formats.Adapter`` with method ``"lora"``.
    ``tensor_rank`` caps every inner TT rank; ``eps`` in (0, 1) is a target on the
    relative Frobenius error of each factor (TT-SVD with per-step budget
    ``eps / sqrt(d - 1)``); at least one is required. Factors with the same mode list
    (``A`` and ``B`` of all same-shaped modules) are decomposed together on ``device``.

    Returns ``(Adapter, ConversionReport)``. The report's errors are MEASURED by
    reconstructing the cores (not taken from the singular values), and ``eps_met`` is
    true only if every measured factor error is <= eps. With both options the rank cap
    wins, so ``eps_met`` can be false; the report says which modules missed it.
    Items decomposed together share their TT ranks (the largest any of them needs), so
    with ``eps`` a module may keep more rank than it alone would need, never less.
    """
    _check_lora_to_tt_options(tensor_rank, eps, shapes)
    device = resolve_device(device)
    start = time.perf_counter()
    adapter = _load(lora, "PEFT LoRA", allow_unsafe_pickle)
    _check_lora_modules(adapter)
    factors = _Factors(adapter)
    factors.decompose(shapes=shapes, device=device, tensor_rank=tensor_rank, eps=eps)
    factors.measure_deltas()
    modules, reports = {}, []
    for k, name in zip(range(0, 2 * len(factors.names), 2), factors.names):
        modules[name], report = factors.module(k, adapter.modules[name].scale)
        reports.append(report)
    report = ConversionReport(direction="lora-to-tt", modules=reports, eps=eps,
                              tensor_rank=tensor_rank, full_tensors=sorted(adapter.tensors))
    _lora_to_tt_notes(report, eps, tensor_rank)
    out = Adapter(method="rep", source="loretta-merge", modules=modules,
                  tensors={k: v.clone() for k, v in adapter.tensors.items()},
                  config=_rep_config(adapter, reports, tensor_rank=tensor_rank, eps=eps, shapes=shapes),
                  fan_in_fan_out=set(adapter.fan_in_fan_out),
                  base_model_name_or_path=adapter.base_model_name_or_path, path=None)
    report.seconds = time.perf_counter() - start
    return out, report


# --------------------------------------------------------------------------- TT -> LoRA

def _truncate_pair(a: torch.Tensor, b: torch.Tensor, k: int):
    """Best rank-k factors of ``a @ b`` (``a (in, r)``, ``b (r, out)``) without forming it:
    QR both sides, SVD the small (r, r) core. Returns (a_k, b_k)."""
    qa, ra = torch.linalg.qr(a.double())              # (in, r), (r, r)
    qb, rb = torch.linalg.qr(b.double().T)            # (out, r), (r, r)
    u, s, vh = torch.linalg.svd(ra @ rb.T)            # a @ b = qa u diag(s) vh qb^T
    root = s[:k].sqrt()
    a_k = (qa @ u[:, :k]) * root                      # (in, k)
    b_k = root[:, None] * (vh[:k] @ qb.T)             # (k, out)
    return a_k.float(), b_k.float()


def _lora_module(m: RepModule, rank: int | None) -> LoraModule:
    """The PEFT LoRA factors of one rep module: the reconstructed TTs, truncated to ``rank``."""
    a = m.a.matrix(torch.float32)                     # (in, r)
    b = m.b.matrix(torch.float32)                     # (r, out)
    if rank is not None and rank < a.shape[1]:
        a, b = _truncate_pair(a, b, rank)
    return LoraModule(a=a.T.contiguous(), b=b.T.contiguous(), scale=float(m.scale))


def measured_delta_error(m: RepModule, lora: LoraModule, peft_scale: float) -> float:
    """``||s A B - s' A' B'|| / ||s A B||``: the TT delta of ``m`` against the delta PEFT
    computes from ``lora``'s factors with scale ``peft_scale`` (a few small matmuls)."""
    a = m.a.matrix(torch.float32) * float(m.scale)
    b = m.b.matrix(torch.float32)
    a2 = lora.a.T.float() * float(peft_scale)
    b2 = lora.b.T.float()
    return rel_delta_error(a, b, a2, b2)


def _check_rep(adapter: Adapter, *, ignore_pooling: bool = False) -> None:
    where = adapter.path or "<in-memory adapter>"
    if adapter.method != "rep":
        why = ("LoRETTA_adp is a non-linear bottleneck adapter, which no LoRA can represent; "
               "deploy it unmerged (e.g. export onnx)" if adapter.method == "adp"
               else "it is already a LoRA: use it as it is (e.g. `loretta-merge merge BASE ADAPTER`)")
        raise FormatError(f"{where}: is a {adapter.method!r} adapter, not LoRETTA_rep; {why}")
    for name, m in adapter.modules.items():
        if not isinstance(m, (RepModule, TTDenseModule)):
            raise FormatError(f"{where}: module {name} is a {type(m).__name__}; only rep modules "
                              f"and TT dense layers convert to LoRA; pass a LoRETTA_rep adapter")
    if not any(isinstance(m, RepModule) for m in adapter.modules.values()):
        raise FormatError(f"{where}: the adapter has no rep modules to convert; pass a LoRETTA_rep adapter directory")
    if adapter.config.get("pooling") is not None and not ignore_pooling:
        raise FormatError(f"{where}: the adapter was trained with {adapter.config['pooling']} pooling, "
                          f"which a PEFT model (first-token pooler) does not do, so the LoRA would "
                          f"classify differently; merge it instead (`loretta-merge BASE+ADAPTER -o "
                          f"OUT` writes a model that pools as trained), export it to ONNX, or pass "
                          f"--ignore-pooling to convert the weights alone")


def _full_tensors(adapter: Adapter) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Trained full tensors plus TT-replaced dense layers rebuilt as ``nn.Linear`` weights."""
    tensors, replaced = {}, []
    for name, m in adapter.modules.items():
        if isinstance(m, TTDenseModule):
            tensors[f"{name}.weight"] = m.weight.matrix(torch.float32).T.contiguous()  # (out, in)
            if m.bias is not None:
                tensors[f"{name}.bias"] = m.bias.detach().float().clone()
            replaced.append(name)
    for key, value in adapter.tensors.items():
        tensors[key] = value.detach().clone()
    return tensors, sorted(replaced)


def _tt_to_lora_report(adapter: Adapter, out: Adapter, rank: int | None,
                       replaced: list[str]) -> ConversionReport:
    reports = []
    for name, lora in out.modules.items():
        m = adapter.modules[name]
        r, n_in, n_out = lora.a.shape[0], lora.a.shape[1], lora.b.shape[0]
        reports.append(ModuleReport(
            name=name, in_features=n_in, out_features=n_out, r=r, err_a=0.0, err_b=0.0,
            err_delta=measured_delta_error(m, lora, scale_for(out.config, name)),
            params_before=sum(c.numel() for c in m.a.cores + m.b.cores), params_after=r * (n_in + n_out),
            modes_a=tt.tt_modes_of(m.a.cores), modes_b=tt.tt_modes_of(m.b.cores)))
    report = ConversionReport(direction="tt-to-lora", modules=reports, rank=rank,
                              full_tensors=sorted(adapter.tensors),
                              modules_to_save=out.config.get("modules_to_save") or [],
                              replaced_dense=replaced)
    if replaced:
        report.notes.append(f"{len(replaced)} TT-replaced dense layer(s) rebuilt as full Linear "
                            f"weights in modules_to_save: {', '.join(replaced)}")
    if adapter.tensors:
        report.notes.append(f"{len(adapter.tensors)} trained full tensor(s) (norms, heads) carried "
                            f"in modules_to_save")
    return report


def tt_to_lora(tt_adapter, *, rank: int | None = None, allow_unsafe_pickle: bool = False,
               ignore_pooling: bool = False) -> tuple[Adapter, ConversionReport]:
    """Convert a LoRETTA_rep adapter (ours or the authors' ``loretta`` 0.1 format) to an
    ordinary PEFT LoRA ``Adapter`` (write it with :func:`write_peft_lora`).

    Exact without ``rank``: ``lora_A.weight = reconstruct(A).T``, ``lora_B.weight =
    reconstruct(B).T``, with ``r``/``lora_alpha`` (and per-module patterns) chosen so that
    PEFT's scale equals each module's scale. With ``rank=k`` the delta ``A @ B`` is
    truncated to its best rank-k approximation (SVD). Each module's ``err_delta`` is
    measured: the delta PEFT computes from the result against the TT delta. Trained full
    tensors (norms, heads) and TT-replaced dense layers (rebuilt as full ``nn.Linear``
    weights) become PEFT ``modules_to_save``.

    An adapter trained with mean pooling (:mod:`loretta_merge.pooling`) is refused unless
    ``ignore_pooling``: PEFT's model pools the first token, so only the weights carry over
    (the report's notes say so).
    """
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ConfigError(f"rank (--rank) must be an integer >= 1, got {rank!r}; pass e.g. --rank 4, or omit it for the exact conversion")
    start = time.perf_counter()
    adapter = _load(tt_adapter, "LoRETTA_rep", allow_unsafe_pickle)
    _check_rep(adapter, ignore_pooling=ignore_pooling)
    modules = {name: _lora_module(m, rank) for name, m in adapter.modules.items()
               if isinstance(m, RepModule)}
    tensors, replaced = _full_tensors(adapter)
    cfg = adapter.config
    out = Adapter(method="lora", source="peft", modules=modules, tensors=tensors,
                  config={"task_type": cfg.get("task_type"), "use_rslora": bool(cfg.get("use_rslora", False)),
                          "lora_dropout": float(cfg.get("lora_dropout", 0.0) or 0.0)},
                  fan_in_fan_out=set(adapter.fan_in_fan_out) & set(modules),
                  base_model_name_or_path=adapter.base_model_name_or_path, path=None)
    out.config = peft_lora_config(out)
    report = _tt_to_lora_report(adapter, out, rank, replaced)
    if cfg.get("pooling") is not None:
        report.notes.append(f"trained with {cfg['pooling']} pooling: PEFT pools the first token; "
                            f"call loretta_merge.pooling.apply_pooling(model, 'mean') on the "
                            f"PeftModel's base model to classify as trained")
    report.seconds = time.perf_counter() - start
    return out, report
