"""``combine``: several adapters into ONE new adapter (not a merged model).

Per module: every input's delta ``Δ_i`` in fp32 (zeros where an input lacks the module),
combined by a merge method (:mod:`loretta_merge.methods`, the same functions ``merge
--method`` runs, with the same per-tensor seeds), then compressed
(:mod:`.compress`): truncated SVD to LoRA factors, and for ``to="tt"`` LoRETTA_rep cores.
The output is a PEFT LoRA directory (``to="lora"``) or this tool's rep adapter (``to="tt"``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..converters.extract import output_exists_check
from ..converters.lowrank import RankReport, RankRow
from ..errors import ConfigError, NumericsError
from ..formats import (
    Adapter,
    LoraModule,
    peft_lora_config,
    write_adapter,
    write_peft_lora,
)
from ..formats.peft import exact_keys
from ..merge.task_vectors import resolve_method
from ..methods import get_method, tensor_generator
from .compress import compress
from .inputs import CombineInputs, read_inputs


@dataclass
class CombineReport(RankReport):
    """What ``combine`` wrote: RankReport's rows (rank, energy, error of each stage,
    parameters) plus the method and the inputs."""

    method: dict[str, Any] = field(default_factory=dict)
    inputs: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d.update({"method": self.method, "inputs": self.inputs})
        return d

    def table(self, *, limit: int = 12) -> str:
        m = self.method
        params = ", ".join(f"{k} {v}" for k, v in m.get("params", {}).items())
        head = (f"method {m.get('method')}" + (f" ({params})" if params else "")
                + (f", seed {m['seed']}" if m.get("seed") is not None else "")
                + "; inputs: " + ", ".join(f"{x['path']}:{x['weight']:g}" for x in self.inputs))
        return head + "\n" + super().table(limit=limit)


def _check_options(to: str, rank, eps, tensor_rank, shapes, fit_steps) -> None:
    if to not in ("lora", "tt"):
        raise ConfigError(f"--to must be 'lora' or 'tt', got {to!r}; pass --to lora or --to tt")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ConfigError(f"--rank must be an integer >= 1, got {rank!r}; pass e.g. --rank 8")
    if eps is not None and (isinstance(eps, bool) or not isinstance(eps, (int, float))
                            or not math.isfinite(eps) or not 0 < eps < 1):
        raise ConfigError(f"--eps is a relative Frobenius error target and must be in (0, 1), "
                          f"got {eps!r}; pass e.g. --eps 0.05")
    if to == "tt":
        if isinstance(tensor_rank, bool) or not isinstance(tensor_rank, int) or tensor_rank < 1:
            raise ConfigError(f"--tensor-rank must be an integer >= 1, got {tensor_rank!r}; "
                              f"pass e.g. --tensor-rank 5")
        if shapes not in ("paper", "auto"):
            raise ConfigError(f"--shapes must be 'paper' or 'auto', got {shapes!r}; pass --shapes "
                              f"paper or --shapes auto")
        if isinstance(fit_steps, bool) or not isinstance(fit_steps, int) or fit_steps < 0:
            raise ConfigError(f"--fit-steps must be an integer >= 0, got {fit_steps!r}; pass e.g. "
                              f"--fit-steps 300 (0: TT-SVD only)")


def _check_rank_fits(inp: CombineInputs, rank: int | None, eps: float | None, to: str) -> None:
    """A fixed rank must fit every module: a delta of (out, in) has at most min(out, in)
    singular values, and for TT the factors (in, R) and (R, out) would be padded with zeros."""
    if rank is None or eps is not None:
        return
    small = [m for m in inp.modules.values() if rank > min(m.out_features, m.in_features)]
    if small:
        m = min(small, key=lambda m: min(m.out_features, m.in_features))
        limit = min(m.out_features, m.in_features)
        what = (f"cannot be split into the modes of module {m.name}: its TT factors would be "
                f"({m.in_features}, {rank}) and ({rank}, {m.out_features}), beyond the "
                f"{limit} singular values its delta has" if to == "tt" else
                f"is larger than min(out, in) = {limit} of module {m.name} "
                f"({m.out_features}x{m.in_features})")
        raise ConfigError(f"--rank {rank} {what}; pass --rank <= {limit}, or --eps with --rank "
                          f"as a cap")


def _combined(mod, inp: CombineInputs, method, params, seed) -> torch.Tensor:
    """The combined delta of one module, as the weight is stored, fp32."""
    deltas = [mod.delta(i) for i in range(len(inp.adapters))]
    first = next(d for d in deltas if d is not None)
    full = [torch.zeros_like(first) if d is None else d for d in deltas]
    gen = tensor_generator(seed, f"{mod.name}.weight") if method.random else None
    d = method.combine(full, inp.weights, params, gen)
    if not math.isfinite(float(torch.linalg.vector_norm(d))):
        raise NumericsError(f"module {mod.name}: the combined delta has NaN/Inf values (an input "
                            f"holds non-finite or huge factors); re-save the adapters with finite "
                            f"weights, or lower the input weights")
    return d


def _config(inp: CombineInputs, modules: dict, to: str, describe: dict, *, rank, eps,
            tensor_rank, shapes, fit_steps) -> dict:
    ranks = {n: int(m.a.shape[0]) if isinstance(m, LoraModule) else int(m.a.cols)
             for n, m in modules.items()}
    r0 = max(set(ranks.values()), key=list(ranks.values()).count)
    combined_from = {"inputs": [str(a.path) if a.path else None for a in inp.adapters],
                     "weights": inp.weights, **describe, "rank": rank, "eps": eps}
    if to == "lora":
        return {"task_type": inp.task_type, "use_rslora": False, "lora_dropout": 0.0}
    keys = exact_keys(sorted(modules))
    pattern = {keys[n]: r for n, r in sorted(ranks.items()) if r != r0}
    return {"r": r0, "lora_alpha": r0, "use_rslora": False, "lora_dropout": 0.0,
            "rank_pattern": pattern, "alpha_pattern": dict(pattern), "task_type": inp.task_type,
            "target_modules": sorted(modules), "tensor_rank": tensor_rank, "bias": "none",
            "modules_to_save": None,
            "combined_from": {**combined_from, "tensor_rank": tensor_rank, "shapes": shapes,
                              "fit_steps": fit_steps}}


def combine(inputs, *, method: str = "linear", params: dict[str, Any] | None = None,
            seed: int | None = None, to: str = "lora", rank: int | None = None,
            eps: float | None = None, tensor_rank: int = 5, shapes: str = "paper",
            fit_steps: int = 300, drop_full_tensors: bool = False,
            allow_unsafe_pickle: bool = False) -> tuple[Adapter, CombineReport]:
    """Combine ``inputs`` (``[(adapter directory or Adapter, weight), ...]``) into one
    in-memory adapter; see :func:`combine_adapters` (which also writes it)."""
    start = time.perf_counter()
    _check_options(to, rank, eps, tensor_rank, shapes, fit_steps)
    n = len(inputs)
    tv = resolve_method(method, params, seed, [1.0] * max(n, 1))   # raises on bad parameters
    m = get_method(method)
    resolved = tv.params if tv is not None else m.resolve(params, n_inputs=max(n, 1))
    describe = {"method": method, "params": {k: list(v) if isinstance(v, tuple) else v
                                              for k, v in resolved.items()}, "seed": seed}
    inp = read_inputs(inputs, drop_full_tensors=drop_full_tensors,
                      allow_unsafe_pickle=allow_unsafe_pickle)
    _check_rank_fits(inp, rank, eps, to)
    default_rank = inp.max_rank() if rank is None and eps is None else None
    rows: list[RankRow] = []
    modules: dict = {}
    zero: list[str] = []
    for mod in inp.modules.values():
        d = _combined(mod, inp, m, resolved, seed)
        if mod.fan_in_fan_out:
            d = d.T                                      # Conv1D stores (in, out)
        if not bool(d.any()):
            zero.append(mod.name)
            continue
        k_rank = rank if default_rank is None else min(default_rank, *d.shape)
        c = compress(mod.name, d, to=to, rank=k_rank, eps=eps, tensor_rank=tensor_rank,
                     shapes=shapes, fit_steps=fit_steps)
        modules[mod.name] = c.module
        row = RankRow(name=mod.name, out_features=mod.out_features, in_features=mod.in_features,
                      rank=c.rank, energy=c.energy, err=c.err, params=c.module.num_params(),
                      params_before=mod.params_before(), rank_before=mod.rank_before(),
                      err_svd=c.err_svd, err_tt_svd=c.err_tt_svd, err_tt_fit=c.err_tt_fit,
                      tt_method=c.tt_method)
        if to == "tt":
            row.ranks_a = [1] + [int(x.shape[-1]) for x in c.module.a.cores]
            row.ranks_b = [1] + [int(x.shape[-1]) for x in c.module.b.cores]
        rows.append(row)
    if not modules:
        raise NumericsError(f"every combined delta is zero (e.g. {zero[0]}): --method {method} "
                            f"with these weights and parameters cancels all changes; raise "
                            f"--density or choose other weights")
    report = CombineReport(command="combine", output_kind=to, modules=rows, rank=rank, eps=eps,
                           tensor_rank=tensor_rank if to == "tt" else None, method=describe,
                           inputs=[{"path": str(a.path) if a.path else f"input {i + 1}",
                                    "kind": a.method, "weight": w}
                                   for i, (a, w) in enumerate(zip(inp.adapters, inp.weights))])
    report.notes.extend(inp.notes)
    said = [default_rank is not None and f"no --rank or --eps: rank {default_rank}, the "
            f"largest input rank (PEFT's default svd_rank)",
            zero and f"{len(zero)} module(s) whose combined delta is zero are not written "
            f"(e.g. {zero[0]})",
            inp.dropped and f"--drop-full-tensors: {len(inp.dropped)} full tensor(s) left out, "
            f"e.g. {inp.dropped[0]}"]
    report.notes.extend(note for note in said if note)
    fifo = {n for n in modules if inp.modules[n].fan_in_fan_out}
    if to == "lora":
        out = Adapter(method="lora", source="peft", modules=modules, tensors={},
                      config=_config(inp, modules, to, describe, rank=rank, eps=eps,
                                     tensor_rank=tensor_rank, shapes=shapes, fit_steps=fit_steps),
                      fan_in_fan_out=fifo, base_model_name_or_path=inp.base_model_name_or_path)
        out.config = peft_lora_config(out)
    else:
        out = Adapter(method="rep", source="loretta-merge", modules=modules, tensors={},
                      config=_config(inp, modules, to, describe, rank=rank, eps=eps,
                                     tensor_rank=tensor_rank, shapes=shapes, fit_steps=fit_steps),
                      fan_in_fan_out=fifo, base_model_name_or_path=inp.base_model_name_or_path)
    report.seconds = time.perf_counter() - start
    return out, report


def combine_adapters(inputs, out, *, method: str = "linear", params: dict[str, Any] | None = None,
                     seed: int | None = None, to: str = "lora", rank: int | None = None,
                     eps: float | None = None, tensor_rank: int = 5, shapes: str = "paper",
                     fit_steps: int = 300, drop_full_tensors: bool = False, force: bool = False,
                     allow_unsafe_pickle: bool = False,
                     base_model_name_or_path: str | None = None) -> CombineReport:
    """Combine adapters into ONE new adapter written to ``out`` (atomically; an existing
    ``out`` is refused unless ``force``). Returns the report.

    ``inputs``: ``[(adapter directory or formats.Adapter, weight), ...]``: PEFT LoRA or
    LoRETTA_rep adapters of one base (any ranks). ``method`` / ``params`` / ``seed``: as
    ``merge --method`` (docs/merge-methods.md; PEFT's own definitions under its names
    ``svd``, ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd``).
    ``to``: ``"lora"`` (PEFT LoRA) or ``"tt"`` (LoRETTA_rep; ``tensor_rank`` / ``shapes`` /
    ``fit_steps`` as ``extract``). ``rank``: the LoRA rank of every module; ``eps``: the
    smallest rank whose relative error is <= eps (``rank`` then caps it); neither: the
    largest input rank. ``drop_full_tensors``: leave out the inputs' full tensors (norms,
    heads) instead of refusing them. ``base_model_name_or_path`` overrides the inputs'.
    """
    output_exists_check(out, force)
    adapter, report = combine(inputs, method=method, params=params, seed=seed, to=to, rank=rank,
                              eps=eps, tensor_rank=tensor_rank, shapes=shapes,
                              fit_steps=fit_steps, drop_full_tensors=drop_full_tensors,
                              allow_unsafe_pickle=allow_unsafe_pickle)
    if base_model_name_or_path is not None:
        adapter.base_model_name_or_path = base_model_name_or_path
        if to == "lora":
            adapter.config["base_model_name_or_path"] = base_model_name_or_path
    (write_peft_lora if to == "lora" else write_adapter)(adapter, out, force=force)
    return report
