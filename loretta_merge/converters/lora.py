"""Convert between PEFT LoRA and LoRETTA_rep (tensor-train) adapters, with error reports.

The relation (../shared/docs/LORETTA.md, section 2): a rep module stores the LoRA factors
as two TT matrices, ``A : (in, r)`` and ``B : (r, out)``, and its delta is
``scale * A @ B`` (``(in, out)``). PEFT stores ``lora_A.weight = A.T`` ``(r, in)`` and
``lora_B.weight = B.T`` ``(out, r)`` with the same ``r``/``lora_alpha`` and so the same scale.

* :func:`tt_to_lora` is exact (reconstruct the two TTs), optionally followed by an SVD
  truncation of the delta to a lower rank, whose error is reported.
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
report gives the bound AND the measured delta error, computed exactly from small Gram
matrices without ever forming an ``(in, out)`` matrix.
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import tt
from ..errors import ConfigError, FormatError, ShapeError

PREFIX = "base_model.model."


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


# --------------------------------------------------------------------------- helpers

def _formats():
    from .. import formats  # written by another module owner; imported late on purpose

    return formats


def _load(source, kind: str, allow_unsafe_pickle: bool):
    formats = _formats()
    if isinstance(source, formats.Adapter):
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise ConfigError(f"expected a {kind} adapter directory or a loretta_merge.formats.Adapter, "
                          f"got {type(source).__name__}; pass the adapter directory")
    path = Path(source)
    if not path.is_dir():
        raise FormatError(f"{path}: not a directory; give the {kind} adapter directory "
                          f"(with adapter_config.json and adapter_model.safetensors)")
    return formats.read_adapter(path, allow_unsafe_pickle=allow_unsafe_pickle)


def _peft_scale(alpha: float, r: int, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


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


def _rel_delta_error(a: torch.Tensor, b: torch.Tensor, a2: torch.Tensor, b2: torch.Tensor) -> float:
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


def _rel_errors(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per row ``||x - y|| / ||x||`` of ``(G, N)`` batches (0 where both are zero)."""
    den = torch.linalg.vector_norm(x, dim=-1).double()
    num = torch.linalg.vector_norm(x - y, dim=-1).double()
    out = torch.where(den > 0, num / den.clamp_min(1e-300),
                      torch.where(num > 0, torch.full_like(num, math.inf), torch.zeros_like(num)))
    return out.float()


def _module_of(param_name: str) -> str:
    return param_name.rsplit(".", 1)[0] if "." in param_name else param_name


# --------------------------------------------------------------------------- LoRA -> TT

def lora_to_tt(lora, *, tensor_rank: int | None = None, eps: float | None = None,
               shapes: str = "paper", device: str | torch.device = "cpu",
               allow_unsafe_pickle: bool = False):
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
    formats = _formats()
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
    from ..io import resolve_device

    device = resolve_device(device)
    start = time.perf_counter()
    adapter = _load(lora, "PEFT LoRA", allow_unsafe_pickle)
    where = adapter.path or "<in-memory adapter>"
    if adapter.method != "lora":
        raise FormatError(f"{where}: is a {adapter.method!r} adapter ({adapter.source}), not a PEFT "
                          f"LoRA; lora-to-tt converts LoRA adapters (use tt-to-lora for TT ones)")
    if not adapter.modules:
        raise FormatError(f"{where}: the adapter has no LoRA modules to convert; pass a PEFT LoRA adapter directory")
    for name, m in adapter.modules.items():
        if not isinstance(m, formats.LoraModule):
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

    # Every factor matrix as (module, side, rows, cols, matrix), grouped by mode list.
    items: list[tuple[str, str, int, int, torch.Tensor]] = []
    for name, m in adapter.modules.items():
        r, n_in = m.a.shape
        n_out = m.b.shape[0]
        items.append((name, "a", n_in, r, m.a.T))
        items.append((name, "b", r, n_out, m.b.T))
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (_, _, rows, cols, _) in enumerate(items):
        groups.setdefault(tuple(tt.matrix_modes(rows, cols, shapes=shapes)), []).append(i)

    cores_of: dict[int, list[torch.Tensor]] = {}
    recon_of: dict[int, torch.Tensor] = {}
    err_of: dict[int, float] = {}
    for modes, idx in groups.items():
        x = torch.stack([items[i][4].detach().to(device=device, dtype=torch.float32).reshape(-1)
                         for i in idx])                                      # (G, N)
        dec = tt.tt_svd_batched(x, list(modes), max_rank=tensor_rank, eps=eps)
        full = tt.reconstruct_batched(dec.cores, 1, x.shape[1])[:, 0]        # (G, N)
        errs = _rel_errors(x, full).tolist()                                 # measured, not predicted
        cores = [c.to("cpu") for c in dec.cores]
        full = full.to("cpu")
        for j, i in enumerate(idx):
            cores_of[i] = [c[j].contiguous() for c in cores]
            recon_of[i] = full[j].reshape(items[i][2], items[i][3])
            err_of[i] = errs[j]

    # Delta errors, batched over modules of the same (in, r, out).
    shape_groups: dict[tuple[int, int, int], list[int]] = {}
    for k in range(0, len(items), 2):
        shape_groups.setdefault((items[k][2], items[k][3], items[k + 1][3]), []).append(k)
    delta_of: dict[int, float] = {}
    for ks in shape_groups.values():
        st = lambda j, src: torch.stack([src(k + j).float() for k in ks])  # noqa: E731
        errs = delta_errors(st(0, lambda i: items[i][4]), st(1, lambda i: items[i][4]),
                            st(0, recon_of.__getitem__), st(1, recon_of.__getitem__)).tolist()
        delta_of.update(zip(ks, errs))

    modules, reports = {}, []
    for k in range(0, len(items), 2):
        name, _, n_in, r, _ = items[k]
        n_out = items[k + 1][3]
        ca, cb = cores_of[k], cores_of[k + 1]
        mod = adapter.modules[name]
        modules[name] = formats.RepModule(a=formats.TTMatrix(cores=ca, rows=n_in, cols=r),
                                          b=formats.TTMatrix(cores=cb, rows=r, cols=n_out),
                                          scale=float(mod.scale))
        err_a, err_b = err_of[k], err_of[k + 1]
        reports.append(ModuleReport(
            name=name, in_features=n_in, out_features=n_out, r=r, err_a=err_a, err_b=err_b,
            err_delta=delta_of[k],
            params_before=r * (n_in + n_out), params_after=sum(c.numel() for c in ca + cb),
            modes_a=tt.tt_modes_of(ca), modes_b=tt.tt_modes_of(cb),
            ranks_a=[1] + [int(c.shape[-1]) for c in ca], ranks_b=[1] + [int(c.shape[-1]) for c in cb],
            delta_bound=(1 + err_a) * (1 + err_b) - 1))

    report = ConversionReport(direction="lora-to-tt", modules=reports, eps=eps,
                              tensor_rank=tensor_rank, full_tensors=sorted(adapter.tensors))
    if eps is not None:
        missed = [m.name for m in reports if max(m.err_a, m.err_b) > eps]
        report.eps_met = not missed
        if missed:
            why = (f"the tensor-rank cap {tensor_rank} binds" if tensor_rank is not None
                   else "fp32 rounding exceeds so small an eps")
            report.notes.append(f"eps={eps} not met by {len(missed)} module(s) ({why}), e.g. {missed[0]}")
    if report.compression < 1.0:
        report.notes.append(f"the TT form is larger than the LoRA ({report.params_after:,} vs "
                            f"{report.params_before:,} parameters): these factors have little TT "
                            f"structure; use a smaller --tensor-rank or a larger --eps")
    cfg = adapter.config
    max_inner = max(max(m.ranks_a + m.ranks_b) for m in reports)
    config = {
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
    out = formats.Adapter(method="rep", source="loretta-merge", modules=modules,
                          tensors={k: v.clone() for k, v in adapter.tensors.items()},
                          config=config, fan_in_fan_out=set(adapter.fan_in_fan_out),
                          base_model_name_or_path=adapter.base_model_name_or_path, path=None)
    report.seconds = time.perf_counter() - start
    return out, report


# --------------------------------------------------------------------------- TT -> LoRA

def _truncate_pair(a: torch.Tensor, b: torch.Tensor, k: int):
    """Best rank-k factors of ``a @ b`` (``a (in, r)``, ``b (r, out)``) without forming it:
    QR both sides, SVD the small (r, r) core. Returns (a_k, b_k, relative error)."""
    qa, ra = torch.linalg.qr(a.double())              # (in, r), (r, r)
    qb, rb = torch.linalg.qr(b.double().T)            # (out, r), (r, r)
    u, s, vh = torch.linalg.svd(ra @ rb.T)            # a @ b = qa u diag(s) vh qb^T
    total = float((s ** 2).sum())
    err = math.sqrt(float((s[k:] ** 2).sum()) / total) if total > 0 else 0.0
    root = s[:k].sqrt()
    a_k = (qa @ u[:, :k]) * root                      # (in, k)
    b_k = root[:, None] * (vh[:k] @ qb.T)             # (k, out)
    return a_k.float(), b_k.float(), err


def tt_to_lora(tt_adapter, *, rank: int | None = None, allow_unsafe_pickle: bool = False):
    """Convert a LoRETTA_rep adapter (ours or the authors' ``loretta`` 0.1 format) to an
    ordinary PEFT LoRA ``Adapter`` (write it with :func:`write_peft_lora`).

    Exact without ``rank``: ``lora_A.weight = reconstruct(A).T``, ``lora_B.weight =
    reconstruct(B).T``, with ``r``/``lora_alpha`` (and per-module patterns) chosen so that
    PEFT's scale equals each module's scale. With ``rank=k`` the delta ``A @ B`` is
    truncated to its best rank-k approximation (SVD; the report gives each module's
    relative error). Trained full tensors (norms, heads) and TT-replaced dense layers
    (rebuilt as full ``nn.Linear`` weights) become PEFT ``modules_to_save``.
    """
    formats = _formats()
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ConfigError(f"rank (--rank) must be an integer >= 1, got {rank!r}; pass e.g. --rank 4, or omit it for the exact conversion")
    start = time.perf_counter()
    adapter = _load(tt_adapter, "LoRETTA_rep", allow_unsafe_pickle)
    where = adapter.path or "<in-memory adapter>"
    if adapter.method != "rep":
        why = ("LoRETTA_adp is a non-linear bottleneck adapter, which no LoRA can represent; "
               "deploy it unmerged (e.g. export onnx)" if adapter.method == "adp"
               else "it is already a LoRA: use it as it is (e.g. `loretta-merge merge BASE ADAPTER`)")
        raise FormatError(f"{where}: is a {adapter.method!r} adapter, not LoRETTA_rep; {why}")
    cfg = adapter.config
    rslora = bool(cfg.get("use_rslora", False))
    modules, reports, tensors = {}, [], {}
    replaced = []
    for name, m in adapter.modules.items():
        if isinstance(m, formats.TTDenseModule):
            w = m.weight.matrix(torch.float32).T.contiguous()      # nn.Linear weight (out, in)
            tensors[f"{name}.weight"] = w
            if m.bias is not None:
                tensors[f"{name}.bias"] = m.bias.detach().float().clone()
            replaced.append(name)
            continue
        if not isinstance(m, formats.RepModule):
            raise FormatError(f"{where}: module {name} is a {type(m).__name__}; only rep modules "
                              f"and TT dense layers convert to LoRA; pass a LoRETTA_rep adapter")
        a = m.a.matrix(torch.float32)                              # (in, r)
        b = m.b.matrix(torch.float32)                              # (r, out)
        r = a.shape[1]
        err = 0.0
        if rank is not None and rank < r:
            a2, b2, err = _truncate_pair(a, b, rank)
            measured = _rel_delta_error(a, b, a2, b2)
            err = max(err, measured) if math.isfinite(measured) else err
            a, b = a2, b2
        modules[name] = formats.LoraModule(a=a.T.contiguous(), b=b.T.contiguous(), scale=float(m.scale))
        reports.append(ModuleReport(
            name=name, in_features=a.shape[0], out_features=b.shape[1], r=a.shape[1],
            err_a=0.0, err_b=0.0, err_delta=err,
            params_before=sum(c.numel() for c in m.a.cores + m.b.cores),
            params_after=a.shape[1] * (a.shape[0] + b.shape[1]),
            modes_a=tt.tt_modes_of(m.a.cores), modes_b=tt.tt_modes_of(m.b.cores)))
    if not modules:
        raise FormatError(f"{where}: the adapter has no rep modules to convert; pass a LoRETTA_rep adapter directory")
    for key, value in adapter.tensors.items():
        tensors[key] = value.detach().clone()
    # Per-module r and alpha so that PEFT's scale alpha/r (alpha/sqrt(r)) is each module's scale.
    ranks = {n: int(m.a.shape[0]) for n, m in modules.items()}
    alphas = {n: modules[n].scale * (math.sqrt(ranks[n]) if rslora else ranks[n]) for n in modules}
    for n, val in alphas.items():  # undo float noise: 16.000000001 -> 16
        if abs(val - round(val)) < 1e-6 * max(1.0, abs(val)):
            alphas[n] = float(round(val))
    r0 = Counter(ranks.values()).most_common(1)[0][0]
    alpha0 = Counter(alphas.values()).most_common(1)[0][0]
    alpha0 = int(alpha0) if float(alpha0).is_integer() else alpha0
    save = sorted({_module_of(k) for k in tensors})
    config = {
        "peft_type": "LORA", "task_type": cfg.get("task_type"), "r": r0, "lora_alpha": alpha0,
        "use_rslora": rslora, "target_modules": sorted(modules),
        "rank_pattern": {n: v for n, v in ranks.items() if v != r0},
        "alpha_pattern": {n: v for n, v in alphas.items() if v != alpha0},
        "modules_to_save": save or None, "lora_dropout": float(cfg.get("lora_dropout", 0.0) or 0.0),
        "bias": "none", "use_dora": False,
        "fan_in_fan_out": bool(modules) and all(n in adapter.fan_in_fan_out for n in modules),
    }
    out = formats.Adapter(method="lora", source="peft", modules=modules, tensors=tensors,
                          config=config, fan_in_fan_out=set(adapter.fan_in_fan_out) & set(modules),
                          base_model_name_or_path=adapter.base_model_name_or_path, path=None)
    report = ConversionReport(direction="tt-to-lora", modules=reports, rank=rank,
                              full_tensors=sorted(adapter.tensors), modules_to_save=save,
                              replaced_dense=sorted(replaced))
    if replaced:
        report.notes.append(f"{len(replaced)} TT-replaced dense layer(s) rebuilt as full Linear "
                            f"weights in modules_to_save: {', '.join(sorted(replaced))}")
    if adapter.tensors:
        report.notes.append(f"{len(adapter.tensors)} trained full tensor(s) (norms, heads) carried "
                            f"in modules_to_save")
    report.seconds = time.perf_counter() - start
    return out, report


# --------------------------------------------------------------------------- PEFT writer

def _peft_config(adapter) -> dict[str, Any]:
    """adapter_config.json for peft 0.21 ``LoraConfig`` (unknown fields are tolerated by
    PEFT, missing ones take its defaults; we write the ones that change behaviour)."""
    cfg = adapter.config
    names = sorted(adapter.modules)
    ranks = {n: int(adapter.modules[n].a.shape[0]) for n in names}
    r0 = cfg.get("r") or Counter(ranks.values()).most_common(1)[0][0]
    rslora = bool(cfg.get("use_rslora", False))
    alpha0 = cfg.get("lora_alpha") or r0
    rank_pattern = {n: v for n, v in ranks.items() if v != r0}
    alpha_pattern = {}
    for n in names:  # make PEFT's scale equal the module's scale whatever the input config said
        r = ranks[n]
        alpha = adapter.modules[n].scale * (math.sqrt(r) if rslora else r)
        if abs(_peft_scale(alpha0, r, rslora) - adapter.modules[n].scale) > 1e-7 * abs(adapter.modules[n].scale):
            alpha_pattern[n] = float(round(alpha)) if abs(alpha - round(alpha)) < 1e-6 * max(1, abs(alpha)) else alpha
    save = sorted({_module_of(k) for k in adapter.tensors})
    fifo = bool(names) and all(n in adapter.fan_in_fan_out for n in names)
    return {
        "peft_type": "LORA", "task_type": cfg.get("task_type"),
        "base_model_name_or_path": adapter.base_model_name_or_path,
        "revision": None, "inference_mode": True,
        "r": int(r0), "lora_alpha": alpha0, "lora_dropout": float(cfg.get("lora_dropout", 0.0) or 0.0),
        "target_modules": names, "exclude_modules": None,
        "fan_in_fan_out": fifo, "bias": "none", "use_rslora": rslora, "use_dora": False,
        "modules_to_save": save or None, "init_lora_weights": True,
        "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "lora_bias": False, "target_parameters": None,
    }


def write_peft_lora(adapter, path: str | os.PathLike, *, force: bool = False) -> Path:
    """Write a LoRA ``Adapter`` as a PEFT LoRA directory (``adapter_config.json`` +
    ``adapter_model.safetensors``) that ``peft.PeftModel.from_pretrained`` loads with no
    missing or unexpected keys. Keys: ``base_model.model.<m>.lora_A.weight`` ``(r, in)``,
    ``...lora_B.weight`` ``(out, r)``; full tensors as ``base_model.model.<param>``, their
    modules listed in ``modules_to_save`` (PEFT saves a wrapped module's tensors under its
    own parameter names). Written to a temp directory and renamed into place."""
    import json

    formats = _formats()
    if adapter.method != "lora":
        raise FormatError(f"write_peft_lora writes LoRA adapters; got a {adapter.method!r} adapter "
                          f"(convert it with tt_to_lora first)")
    state: dict[str, torch.Tensor] = {}
    for name, m in adapter.modules.items():
        if not isinstance(m, formats.LoraModule) or m.magnitude is not None:
            raise FormatError(f"module {name}: only plain LoRA modules can be written as PEFT LoRA; convert the adapter with tt-to-lora first")
        state[f"{PREFIX}{name}.lora_A.weight"] = m.a.detach().contiguous()
        state[f"{PREFIX}{name}.lora_B.weight"] = m.b.detach().contiguous()
    for key, value in adapter.tensors.items():
        state[f"{PREFIX}{key}"] = value.detach().contiguous()
    config = _peft_config(adapter)
    out = Path(path)

    def write(tmp: Path) -> None:
        formats.save_safetensors(state, tmp / "adapter_model.safetensors")
        formats._write_bytes(tmp / "adapter_config.json",
                             (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())

    from ..io import atomic_output_dir

    with atomic_output_dir(out, force=force) as tmp:
        try:
            write(tmp)
        except OSError as exc:
            raise formats.disk_full_error(exc, out) from None
    return out
