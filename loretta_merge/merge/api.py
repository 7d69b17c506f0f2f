"""``merge()``: plan, run, finish, all inside one atomic output directory."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import quant
from ..errors import ConfigError, OutputExistsError
from ..io import (CheckpointReader, atomic_output_dir, dtype_name, parse_dtype, parse_size,
                  read_model_config, resolve_device)
from .finish import finish_output, merged_pooling
from .inputs import load_adapters
from .kernel import materialize_factors
from .plan import MergePlan, build_plan
from .run import RunResult, kernel_threads, run_plan
from .task_vectors import check_plan, resolve_method
from .verify import check_verify_fits, verify_merge


@dataclass
class MergeReport:
    """What a merge did; ``to_dict()`` is the ``--json`` output."""

    base: str
    out: str
    adapters: list[dict]
    dtype: str
    device: str
    tensors: int = 0
    merged_tensors: int = 0
    replaced_tensors: int = 0
    copied_tensors: int = 0
    untied: list[str] = field(default_factory=list)
    task_model: str | None = None  # the class written when it differs from the base's
    dropped: list[str] = field(default_factory=list)  # base tensors the task model lacks
    shards: int = 0
    total_bytes: int = 0
    largest_shard_bytes: int = 0
    seconds: float = 0.0
    verify: dict | None = None
    method: dict | None = None  # {"method", "params", "seed"} for a method other than linear

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _report(base_dir: Path, out: Path, plan: MergePlan, device: torch.device,
            run: RunResult) -> MergeReport:
    return MergeReport(
        base=str(base_dir), out=str(out), device=str(device), dtype=dtype_name(plan.main_dtype),
        adapters=[{"path": a.label, "weight": a.weight, "method": a.adapter.method,
                   "source": a.adapter.source, "modules": len(a.adapter.modules),
                   "tensors": len(a.full.reader.keys()) if a.full else len(a.adapter.tensors)}
                  for a in plan.adapters],
        tensors=run.tensors, merged_tensors=run.merged, replaced_tensors=run.replaced,
        copied_tensors=run.copied, untied=list(plan.untied),
        task_model=plan.task.class_name if plan.task else None,
        dropped=list(plan.task.dropped) if plan.task else [],
        shards=sum(f.endswith(".safetensors") for f in run.files), total_bytes=run.total_bytes,
        largest_shard_bytes=run.largest_shard_bytes)


def merge(base_dir: str | os.PathLike, adapters: Sequence, out_dir: str | os.PathLike, *,
          dtype: str | torch.dtype | None = None, device: str = "auto",
          max_shard_bytes: int | str = 5 * 10**9, force: bool = False, verify: bool = False,
          progress: bool = True, allow_unsafe_pickle: bool = False,
          awq_adapter_trained_on: str | None = None, method: str = "linear",
          method_params: Mapping[str, Any] | None = None, seed: int | None = None) -> MergeReport:
    """Merge ``adapters`` (a list of ``(path or Adapter, weight)``) into the checkpoint at
    ``base_dir`` and write a plain transformers checkpoint to ``out_dir``. A path may also be
    a fully fine-tuned checkpoint of the base: its delta is ``W_i - W0`` (:mod:`.full`).

    ``dtype`` None/"auto" keeps each base tensor's dtype (bf16 for a quantized base, which
    is read dequantized: see :mod:`loretta_merge.quant`; ``awq_adapter_trained_on`` says
    whether adapters for an AWQ base were trained on the AWQ model or the original one).
    Everything that can be checked
    (names, shapes, finiteness of the adapter, memory for ``verify``) is checked before any
    base weight is read; the output appears only when complete.

    ``method`` (:mod:`loretta_merge.methods`: ``ties``, ``dare_ties``, ...) combines the
    adapters' deltas tensor by tensor with ``method_params`` (``density``, ``lambda``,
    ``epsilon``, ``gamma``, ``majority_sign``, ``normalize``, ``rescale``; None values are
    the method's defaults); the random ones need ``seed``. ``linear`` is ``W0 + Σ w_i Δ_i``.
    """
    start = time.perf_counter()
    weights = [a[1] if isinstance(a, (tuple, list)) else 1.0 for a in adapters]
    try:
        weights = [float(w) for w in weights]
    except (TypeError, ValueError):
        weights = [1.0] * len(weights)  # load_adapters names the bad weight
    tv = resolve_method(method, method_params, seed, weights)  # refused before any read
    if tv is not None and verify:
        raise ConfigError(f"--verify compares with base + adapters in memory, which is the "
                          f"linear merge; it does not apply to --method {method}: remove "
                          f"--verify")
    base_dir, out = Path(base_dir), Path(os.path.abspath(out_dir))
    out_dtype, dev = parse_dtype(dtype), resolve_device(device)
    max_bytes = parse_size(max_shard_bytes)
    config = read_model_config(base_dir)  # a malformed one is an error, never copied
    quant.check_base(base_dir, config)  # HQQ, optimum-quanto, unknown quant_method: refused
    reader = CheckpointReader(base_dir)
    dequantized = quant.open_base(base_dir, config, reader)  # None unless quantized
    if dequantized is not None:  # merge into the true weights, write an ordinary checkpoint
        reader, config = dequantized, quant.strip_quant_config(config)
        out_dtype = out_dtype or torch.bfloat16
    loaded = load_adapters(adapters, allow_unsafe_pickle=allow_unsafe_pickle)
    full = [a.label for a in loaded if a.full is not None]
    if full and verify:
        raise ConfigError(f"--verify compares with base + adapters in memory; {full[0]} is a "
                          f"fully fine-tuned checkpoint (a whole second model, not an adapter): "
                          f"remove --verify (nothing was written)")
    merged_pooling(loaded)  # adapters that pool differently: refused before any work
    quant.check_adapters(reader, loaded, awq_adapter_trained_on=awq_adapter_trained_on)
    if tv is None:
        plan = build_plan(reader, config, loaded, out_dtype=out_dtype)
    else:  # each op carries its adapter's own delta; the weights go to the method
        tv.weights = [a.weight for a in loaded]
        unit = [dataclasses.replace(a, weight=1.0) for a in loaded]
        plan = build_plan(reader, config, unit, out_dtype=out_dtype)
        plan.adapters, plan.task_vectors = loaded, tv
        check_plan(plan, tv)
    if out.exists() and not force:  # refused before any heavy work
        raise OutputExistsError(f"output {out} already exists; pass --force to replace it, "
                                f"or choose another output path")
    # a bad LORETTA_KERNEL_THREADS is refused before any work
    threads = kernel_threads(cpu_bound=tv is not None)
    if verify:
        check_verify_fits(plan, config)
    materialize_factors(plan.rep_factors, dev)
    try:
        with atomic_output_dir(out, force=force) as tmp:
            run = run_plan(plan, reader, tmp, device=dev, max_shard_bytes=max_bytes,
                           progress=progress, threads=threads)
            finish_output(base_dir, tmp, config, plan, out_dtype)
            report = _report(base_dir, out, plan, dev, run)
            report.method = tv.describe() if tv is not None else None
            if verify:  # on the finished temp dir, so a failed check leaves no output
                report.verify = verify_merge(base_dir, loaded, tmp, dtype=plan.main_dtype)
    finally:
        reader.close()
    report.seconds = round(time.perf_counter() - start, 3)
    return report
