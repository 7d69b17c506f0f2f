"""Streaming merge of adapters into a base checkpoint: one loop over the base tensors.

Plan first (map every adapter module to a base tensor, check every shape, check the
adapter for non-finite values) without reading any base weight; then read the base one
tensor at a time, add ``sum_i w_i * delta_i`` in fp32 on the chosen device, cast once to
the output dtype and write it. Three stages overlap: a reader thread fetches the next
tensor, the main thread computes, a writer thread puts the previous result on disk. The
output shards are laid out from the plan, so each tensor is written as soon as it is
computed: peak memory is a few tensors, whatever the model or shard size.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from . import __version__, quant, tt
from .errors import ConfigError, NumericsError, OutputExistsError, ShapeError
from .io import (CheckpointReader, read_model_config, StreamingShardWriter, atomic_output_dir, dtype_name,
                 parse_dtype, parse_size, resolve_device)

PROVENANCE_NAME = "loretta_merge_provenance.json"
# files of a base directory that are weights (never copied as-is)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack",
                    ".onnx", ".onnx_data")
_KNOWN_PREFIXES = ("model", "transformer", "bert", "roberta", "deberta", "gpt_neox", "decoder")
# tolerance of --verify on max |logit difference| / max(1, max |logit|), by output dtype
VERIFY_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}
_BATCH_BYTES = 256 * 2**20  # reconstruction chunk budget
_BLOCK_ELEMS = 256 * 1024  # rows per CPU block: about 1 MB of fp32, cache-sized


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
    shards: int = 0
    total_bytes: int = 0
    largest_shard_bytes: int = 0
    seconds: float = 0.0
    verify: dict | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class _Op:
    """One contribution to a base tensor: ``kind`` is lora (W += alpha * m1 @ m2),
    full (the tensor becomes ``value``; weighted as W += w * (value - W0)),
    or dense (a TT matrix replaces the weight)."""

    kind: str
    weight: float
    m1: Any = None
    m2: Any = None
    value: Any = None
    transpose: bool = False
    source: str = ""
    magnitude: Any = None  # DoRA: per-output-feature norms of the merged weight


# --------------------------------------------------------------------------- planning

def _load_adapters(adapters: Sequence, allow_unsafe_pickle: bool) -> list[tuple[Any, float, str]]:
    from .formats import Adapter, read_adapter

    if not adapters:
        raise ConfigError("no adapter given; pass at least one adapter directory")
    out = []
    for item in adapters:
        spec, weight = (item if isinstance(item, (tuple, list)) else (item, 1.0))
        try:
            weight = float(weight)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"adapter weight {weight!r} is not a number") from exc
        if not math.isfinite(weight):
            raise ConfigError(f"adapter weight {weight!r} must be finite")
        adapter = spec if isinstance(spec, Adapter) else read_adapter(
            spec, allow_unsafe_pickle=allow_unsafe_pickle)
        label = str(adapter.path or "<in memory>") if isinstance(spec, Adapter) else str(spec)
        _refuse_unmergeable(adapter, label)
        out.append((adapter, weight, label))
    return out


def _refuse_unmergeable(adapter, label: str) -> None:
    from .formats import AdpModule

    adp = [m for m, mod in adapter.modules.items() if isinstance(mod, AdpModule)]
    if adapter.method == "adp" or adp:
        raise ConfigError(
            f"adapter {label} is LoRETTA_adp (bottleneck adapters with a non-linearity), which "
            f"cannot be folded into the base weights; deploy it unmerged instead: "
            f"`loretta-merge export onnx MODEL --adapter {label} -o OUT`")


def _tied_pairs(base_dir: Path, config: dict) -> dict[str, str]:
    """{output embedding key: input embedding key} when the config ties them."""
    if not config.get("tie_word_embeddings", True):
        return {}
    pairs: dict[str, str] = {}
    try:
        import transformers

        for arch in config.get("architectures") or []:
            keys = getattr(getattr(transformers, arch, None), "_tied_weights_keys", None)
            if isinstance(keys, dict):
                pairs.update({str(k): str(v) for k, v in keys.items()})
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    return pairs


def _name_transforms(base_keys: set[str]) -> list[tuple[str, Any]]:
    firsts = sorted({k.split(".", 1)[0] for k in base_keys if "." in k} | set(_KNOWN_PREFIXES))
    out: list[tuple[str, Any]] = [("as is", lambda n: n)]
    for p in firsts:
        out.append((f"without '{p}.'", lambda n, p=p: n[len(p) + 1:] if n.startswith(p + ".") else n))
        out.append((f"with '{p}.'", lambda n, p=p: f"{p}.{n}"))
    return out


def _targets_of(adapter) -> list[str]:
    """Every base tensor name the adapter touches, as the adapter names them."""
    from .formats import TTDenseModule

    names = []
    for m, mod in adapter.modules.items():
        names.append(f"{m}.weight")
        if isinstance(mod, TTDenseModule):
            names.append(f"{m}.bias")
    return names + list(adapter.tensors)


def _pick_transform(adapter, known: set[str]):
    """The renaming (as is / add or drop a base-model prefix such as ``model.``) that maps
    the most adapter targets onto tensors of the base, so an adapter trained on
    ``*ForSequenceClassification`` still matches a bare base checkpoint and vice versa."""
    targets = _targets_of(adapter)
    best = None
    for label, fn in _name_transforms(known):
        hits = sum(fn(t) in known for t in targets)
        if best is None or hits > best[0]:
            best = (hits, label, fn)
    return best[1], best[2]


def _head_class(config: dict, adapter) -> str | None:
    """The transformers class of the task model an adapter was trained on (for a base
    checkpoint saved as a bare model): recorded in the adapter config, else derived from
    its task type and the base's model_type."""
    cls = adapter.config.get("model_class")
    if cls:
        return str(cls)
    task = str(adapter.config.get("task_type") or "").upper()
    try:
        from transformers.models.auto import modeling_auto as ma
    except ImportError:  # pragma: no cover
        return None
    table = {"SEQ_CLS": ma.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
             "CAUSAL_LM": ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
             "TOKEN_CLS": ma.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES}.get(task)
    return table.get(config.get("model_type")) if table else None


def _dims(mod) -> tuple[int, int]:
    from .formats import LoraModule, RepModule

    if isinstance(mod, RepModule):
        return mod.a.rows, mod.b.cols
    if isinstance(mod, LoraModule):
        return int(mod.a.shape[1]), int(mod.b.shape[0])
    return mod.weight.rows, mod.weight.cols  # TTDenseModule


def _check_finite_adapter(adapter, label: str) -> None:
    from .formats import LoraModule, RepModule

    def bad(t: torch.Tensor) -> bool:
        return t.is_floating_point() and not bool(torch.isfinite(t).all())

    for m, mod in adapter.modules.items():
        if isinstance(mod, RepModule):
            parts = {"lora_A": mod.a.cores, "lora_B": mod.b.cores}
        elif isinstance(mod, LoraModule):
            parts = {"lora_A": [mod.a], "lora_B": [mod.b]}
        else:
            parts = {"tt_dense": mod.weight.cores, "bias": [mod.bias] if mod.bias is not None else []}
        for part, ts in parts.items():
            if any(bad(t) for t in ts):
                raise NumericsError(f"adapter {label}: module {m} ({part}) holds NaN or Inf "
                                    f"values; the adapter is corrupt or its training diverged; "
                                    f"nothing was written")
        if not math.isfinite(float(getattr(mod, "scale", 1.0))):
            raise NumericsError(f"adapter {label}: module {m} has a non-finite scale {mod.scale}")
    for name, t in adapter.tensors.items():
        if bad(t):
            raise NumericsError(f"adapter {label}: tensor {name} holds NaN or Inf values; the "
                                f"adapter is corrupt or its training diverged; nothing was written")


def _plan(reader: CheckpointReader, loaded, tied: dict[str, str]):
    """Map every adapter target to a base tensor and check shapes; no weights are read.

    Returns ``(ops by base key, rep jobs, untie)``; ``untie`` maps each output embedding
    that must stop being tied to the input embedding it is written from ("" when the
    checkpoint stores it already). Raises one ShapeError listing every mismatch.
    """
    from .formats import LoraModule, RepModule, TTDenseModule

    present = set(reader.keys())
    virtual = {t: s for t, s in tied.items() if t not in present and s in present}
    known = present | set(virtual)

    def shape(key: str) -> tuple[int, ...]:
        return reader.shape(virtual.get(key, key))

    ops: dict[str, list[_Op]] = {}
    new: dict[str, tuple[torch.Tensor, str]] = {}  # tensors the base lacks (a new task head)
    head_of: dict[str, Any] = {}
    w_of: dict[int, float] = {}  # adapter weight of each DoRA op
    rep_jobs: list[tuple[Any, _Op]] = []
    problems: list[str] = []
    for adapter, w, label in loaded:
        _check_finite_adapter(adapter, label)
        how, rename = _pick_transform(adapter, known)
        # adapter trained on a task model (names "bert.encoder...") over a bare base
        # checkpoint ("encoder..."): tensors outside "bert." (the new head) are added
        prefix = how[len("without '"):-2] if how.startswith("without '") else None
        for m, mod in adapter.modules.items():
            key = rename(f"{m}.weight")
            if key not in known:
                problems.append(f"{label}: module {m} has no base tensor {key}")
                continue
            found = shape(key)
            n_in, n_out = _dims(mod)
            fifo = m in adapter.fan_in_fan_out
            want = (n_in, n_out) if fifo else (n_out, n_in)
            if found != want:
                if found == want[::-1] and len(found) == 2:
                    fifo = not fifo  # the base stores the other orientation (Linear vs Conv1D)
                else:
                    problems.append(f"{label}: module {m} expects {key} of shape {want}, the base "
                                    f"has {found}")
                    continue
            transpose = not fifo  # Linear weights are (out, in) = delta.T
            if isinstance(mod, LoraModule):
                a, b = mod.a.float(), mod.b.float()
                # delta (in, out) = s * (B @ A).T ; Linear W (out, in) += s * B @ A
                op = (_Op("lora", w * mod.scale, b, a, source=f"{label}:{m}") if transpose else
                      _Op("lora", w * mod.scale, a.T, b.T, source=f"{label}:{m}"))
                if mod.magnitude is not None:
                    op.magnitude, op.transpose = mod.magnitude.float().reshape(-1), transpose
                    w_of[id(op)] = w
            elif isinstance(mod, RepModule):
                op = _Op("lora", w * mod.scale, transpose=transpose, source=f"{label}:{m}")
                rep_jobs.append((mod, op))
            elif isinstance(mod, TTDenseModule):
                op = _Op("dense", w, value=mod.weight, transpose=transpose, source=f"{label}:{m}")
                bias_key = rename(f"{m}.bias")
                if bias_key in known:
                    bias = (mod.bias.float() if mod.bias is not None
                            else torch.zeros(shape(bias_key)))
                    if tuple(bias.shape) != shape(bias_key):
                        problems.append(f"{label}: module {m} has a bias of shape "
                                        f"{tuple(bias.shape)}, the base has {shape(bias_key)}")
                    ops.setdefault(bias_key, []).append(_Op("full", w, value=bias,
                                                            source=f"{label}:{m}.bias"))
            else:  # pragma: no cover - refused earlier
                raise ConfigError(f"{label}: module {m} of kind {type(mod).__name__} cannot be merged")
            ops.setdefault(key, []).append(op)
        for name, t in adapter.tensors.items():
            key = rename(name)
            if key not in known and prefix and not name.startswith(prefix + "."):
                if name in new and not torch.equal(new[name][0], t):
                    problems.append(f"{label}: new tensor {name} is also given by {new[name][1]}")
                new[name] = (t, label)
                head_of.setdefault("prefix", prefix)
                head_of.setdefault("adapter", adapter)
                continue
            if key not in known:
                problems.append(f"{label}: tensor {name} has no base tensor {key}")
            elif tuple(t.shape) != shape(key):
                problems.append(f"{label}: tensor {name} has shape {tuple(t.shape)}, the base "
                                f"tensor {key} has {shape(key)}")
            else:
                ops.setdefault(key, []).append(_Op("full", w, value=t, source=f"{label}:{name}"))
    if problems:
        shown = "; ".join(problems[:20]) + (f"; ... and {len(problems) - 20} more"
                                          if len(problems) > 20 else "")
        raise ShapeError(f"{len(problems)} adapter target(s) do not fit the base checkpoint "
                         f"{reader.model_dir}: {shown}. Is BASE the model the adapter was "
                         f"trained on? Pass that base (nothing was written)")
    for key, key_ops in ops.items():
        dora = [op for op in key_ops if op.magnitude is not None]
        if dora and (len(key_ops) > 1 or w_of[id(dora[0])] != 1.0):
            raise ConfigError(f"{key}: a DoRA module ({dora[0].source}) rescales the whole merged "
                              f"weight, so it cannot be summed with other adapters or weighted; "
                              f"merge it alone with weight 1")
        if sum(op.kind in ("full", "dense") for op in key_ops) > 1:
            srcs = ", ".join(op.source for op in key_ops if op.kind in ("full", "dense"))
            raise ConfigError(f"tensor {key} is replaced by several adapters ({srcs}); a full "
                              f"replacement cannot be summed; merge these adapters one at a time")
    untie = {t: s for t, s in virtual.items() if t in ops or s in ops}
    # both stored but tied by the config: a changed one must not be re-tied on load
    untie.update({t: "" for t, s in tied.items()
                  if t in present and s in present and (t in ops or s in ops)})
    head = None
    if new:
        head = {"prefix": head_of["prefix"], "adapter": head_of["adapter"],
                "tensors": {n: t for n, (t, _) in new.items()}}
    return ops, rep_jobs, untie, head


def _reconstruct_rep_factors(rep_jobs, device: torch.device) -> None:
    """Fill ``op.m1, op.m2`` of every rep op: the TT factors A (in, r) and B (r, out),
    reconstructed in batches of same-shaped TTs on ``device``."""
    groups: dict[tuple, list[tuple[Any, _Op, str]]] = {}
    for mod, op in rep_jobs:
        for part, ttm in (("a", mod.a), ("b", mod.b)):
            sig = (tuple(tuple(c.shape) for c in ttm.cores), ttm.rows, ttm.cols)
            groups.setdefault(sig, []).append((ttm, op, part))
    for (_, rows, cols), items in groups.items():
        chunk = max(1, _BATCH_BYTES // max(1, rows * cols * 4))
        for start in range(0, len(items), chunk):
            part_items = items[start:start + chunk]
            cores = tt.stack_tts([[c.to(device, torch.float32) for c in ttm.cores]
                                  for ttm, _, _ in part_items])
            mats = tt.reconstruct_batched(cores, rows, cols, dtype=torch.float32)
            for (_, op, part), mat in zip(part_items, mats):
                mat = mat.clone()
                if part == "a":
                    op.m1 = mat
                else:
                    op.m2 = mat
    for _, op in rep_jobs:
        a, b = op.m1, op.m2  # (in, r), (r, out); Linear W (out, in) += s * B.T @ A.T
        op.m1, op.m2 = ((b.T, a.T) if op.transpose else (a, b))
        op.m1, op.m2 = op.m1.contiguous(), op.m2.contiguous()


# --------------------------------------------------------------------------- the loop

def _apply(key: str, w0: torch.Tensor, ops: list[_Op], device: torch.device,
           out_dtype: torch.dtype) -> torch.Tensor:
    """W0 + sum of the ops' deltas, accumulated in fp32 on ``device``, cast once.

    On CPU a 2-D tensor is processed in blocks of rows that fit in cache (rows are
    independent in every op), so the upcast, the rank-r update, the finiteness scan and
    the cast back each touch memory once instead of streaming the whole fp32 copy.
    """
    rows = int(w0.shape[0]) if w0.ndim else 1
    whole = (device.type != "cpu" or w0.ndim != 2
             or any(op.magnitude is not None and not op.transpose for op in ops))  # Conv1D DoRA: column norms
    step = rows if whole else max(1, _BLOCK_ELEMS // max(1, int(w0.shape[1])))
    replacements = []
    for op in ops:  # W = w * new + (1 - w) * W0 (exactly new when w = 1)
        if op.kind == "full":
            replacements.append((op, op.value.to(device, torch.float32)))
        elif op.kind == "dense":  # a TT matrix (in, out) replaces the weight
            mat = op.value.matrix(dtype=torch.float32).to(device)
            replacements.append((op, mat.T if op.transpose else mat))
    out = torch.empty(tuple(w0.shape), dtype=out_dtype, device=device)
    low, high = math.inf, -math.inf
    for start in range(0, rows, step):
        rs = slice(start, start + step)

        def part(t: torch.Tensor) -> torch.Tensor:
            return t[rs] if t.ndim else t

        src = part(w0)
        base = src.to(device, torch.float32, non_blocking=True)
        acc = base.clone() if base.data_ptr() == src.data_ptr() else base  # never change w0
        for op, new in replacements:
            acc = part(new).clone() if op.weight == 1.0 else torch.lerp(base, part(new), op.weight)
        for op in ops:
            if op.kind == "lora":
                acc.addmm_(op.m1[rs].to(device), op.m2.to(device), alpha=op.weight)
            if op.magnitude is not None:  # DoRA (PEFT's merge): W' = m * W / ||W||, per output
                if op.transpose:  # Linear (out, in): one norm per row
                    acc = acc * (op.magnitude[rs].to(device) / torch.linalg.norm(acc, dim=1))[:, None]
                else:  # Conv1D (in, out): one norm per column (whole tensor in one block)
                    acc = acc * (op.magnitude.to(device) / torch.linalg.norm(acc, dim=0))[None, :]
        if acc.numel():  # min/max propagate NaN and show Inf: one cheap pass
            lo, hi = (float(x) for x in torch.aminmax(acc))
            low, high = min(low, lo), max(high, hi)
            if not (math.isfinite(lo) and math.isfinite(hi)):
                low = high = math.nan
                break
        out[rs] = acc
    if w0.numel() and not (math.isfinite(low) and math.isfinite(high)):
        raise NumericsError(f"merging {', '.join(op.source for op in ops)} into {key} gives "
                            f"NaN or Inf values; the adapter (or its weight) is unusable; "
                            f"nothing was written")
    limit = torch.finfo(out_dtype).max if out_dtype.is_floating_point else math.inf
    if w0.numel() and max(-low, high) > limit:
        raise NumericsError(f"{key} has values up to {max(-low, high):.3g} after merging, beyond "
                            f"{dtype_name(out_dtype)}'s range ({limit:.3g}); choose --dtype "
                            f"float32 or bfloat16")
    return out.cpu() if device.type != "cpu" else out


def _prefetched(reader: CheckpointReader, keys: list[str],
                pin: set[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (key, tensor) while the next tensor is read in a background thread, so disk
    reads overlap compute and writing."""
    def load(key: str) -> torch.Tensor:
        t = reader.get(key)
        return t.pin_memory() if key in pin else t  # pinned: a non-blocking copy to the GPU

    if not keys:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="loretta-read") as pool:
        future = pool.submit(load, keys[0])
        try:
            for i, key in enumerate(keys):
                tensor = future.result()
                if i + 1 < len(keys):
                    future = pool.submit(load, keys[i + 1])
                yield key, tensor
        finally:
            future.cancel()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def _copy_side_files(base: Path, out: Path, *, config: dict, note: str) -> None:
    """Copy config, generation config, tokenizer files, chat template and the model card."""
    for p in sorted(base.iterdir()):
        name = p.name
        if (not p.is_file() or name.startswith(".") or name.endswith(_WEIGHT_SUFFIXES)
                or name.endswith(".index.json") or name in ("config.json", PROVENANCE_NAME)
                or name in quant.QUANT_SIDE_FILES):  # quant: the output is not quantized
            continue
        if name.lower() == "readme.md":
            text = p.read_text(errors="replace")
            if text.startswith("---\n") and "\n---" in text[4:]:
                end = text.index("\n---", 4) + 4
                text = text[:end] + "\n\n" + note + "\n" + text[end:]
            else:
                text = note + "\n\n" + text
            (out / name).write_text(text)
        else:
            shutil.copyfile(p, out / name)
    if config:
        (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def merge(base_dir: str | os.PathLike, adapters: Sequence, out_dir: str | os.PathLike, *,
          dtype: str | torch.dtype | None = None, device: str = "auto",
          max_shard_bytes: int | str = 5 * 10**9, force: bool = False, verify: bool = False,
          progress: bool = True, allow_unsafe_pickle: bool = False,
          awq_adapter_trained_on: str | None = None) -> MergeReport:
    """Merge ``adapters`` (a list of ``(path or Adapter, weight)``) into the checkpoint at
    ``base_dir`` and write a plain transformers checkpoint to ``out_dir``.

    ``dtype`` None/"auto" keeps each base tensor's dtype (bf16 for a quantized base, which
    is read dequantized: see :mod:`loretta_merge.quant`; ``awq_adapter_trained_on`` says
    whether adapters for an AWQ base were trained on the AWQ model or the original one).
    Everything that can be checked (names, shapes, finiteness of the adapter) is checked
    before any base weight is read;
    the output appears only when complete (see :func:`io.atomic_output_dir`).
    """
    start = time.perf_counter()
    base_dir = Path(base_dir)
    out_dtype = parse_dtype(dtype)
    dev = resolve_device(device)
    max_bytes = parse_size(max_shard_bytes)
    config = read_model_config(base_dir)  # a malformed one is an error, never copied
    quant.check_base(base_dir, config)  # quant: HQQ, optimum-quanto, unknown quant_method
    reader = CheckpointReader(base_dir)
    dequantized = quant.open_base(base_dir, config, reader)  # quant: None unless quantized
    if dequantized is not None:  # quant: merge into true weights, write an ordinary checkpoint
        reader, config = dequantized, quant.strip_quant_config(config)
        out_dtype = out_dtype or torch.bfloat16
    loaded = _load_adapters(adapters, allow_unsafe_pickle)
    quant.check_adapters(reader, loaded, awq_adapter_trained_on=awq_adapter_trained_on)  # quant
    ops, rep_jobs, untie, head = _plan(reader, loaded, _tied_pairs(base_dir, config))
    # a new task head: write the task model's checkpoint (base keys get the prefix back)
    out_name = (lambda k: f"{head['prefix']}.{k}") if head else (lambda k: k)
    head_tensors = head["tensors"] if head else {}
    # refuse an existing OUT before any heavy work
    out_path = Path(os.path.abspath(out_dir))
    if out_path.exists() and not force:
        raise OutputExistsError(f"output {out_path} already exists; pass --force to replace it, "
                                f"or choose another output path")
    _reconstruct_rep_factors(rep_jobs, dev)

    keys = reader.keys()
    float_dtypes = [reader.dtype(k) for k in keys if reader.dtype(k).is_floating_point]
    main_dtype = out_dtype or (max(set(float_dtypes), key=float_dtypes.count) if float_dtypes
                               else torch.float32)
    report = MergeReport(base=str(base_dir), out=str(out_path),
                         adapters=[{"path": label, "weight": w, "method": a.method,
                                    "source": a.source, "modules": len(a.modules),
                                    "tensors": len(a.tensors)} for a, w, label in loaded],
                         dtype=dtype_name(main_dtype), device=str(dev),
                         untied=sorted(untie))
    sources: dict[str, list[str]] = {}  # input embedding key -> output embeddings written from it
    for t, s in untie.items():
        if s:
            sources.setdefault(s, []).append(t)

    def dtype_of(src: str) -> torch.dtype:
        d = reader.dtype(src)
        return out_dtype if (out_dtype is not None and d.is_floating_point) else d

    # every output tensor is known now, so shards are laid out up front and each tensor
    # goes to disk as soon as it is computed
    layout = [(out_name(name), reader.shape(key), dtype_of(key))
              for key in keys for name in [key] + sources.get(key, [])]
    head_dtype = out_dtype or main_dtype
    layout += [(n, tuple(t.shape), head_dtype) for n, t in head_tensors.items()]
    bar = None
    if progress and sys.stderr.isatty():
        from tqdm import tqdm
        bar = tqdm(total=reader.total_bytes(), unit="B", unit_scale=True, desc="merging",
                   file=sys.stderr, leave=False)
    try:
        with atomic_output_dir(out_path, force=force) as tmp:
            writer = StreamingShardWriter(tmp, layout, max_bytes)
            stream = _prefetched(reader, keys, pin=set(ops) if dev.type == "cuda" else set())
            # a writer thread: the disk write of one tensor overlaps the next one's compute
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="loretta-write") as wpool:
                pending = None

                def put(name: str, tensor: torch.Tensor) -> None:
                    nonlocal pending
                    if pending is not None:
                        pending.result()
                    pending = wpool.submit(writer.add, name, tensor)

                try:
                    for key, w0 in stream:
                        kind_dtype = dtype_of(key)
                        for name in [key] + sources.get(key, []):
                            key_ops = ops.get(name)
                            if key_ops:
                                put(out_name(name), _apply(name, w0, key_ops, dev, kind_dtype))
                                if any(op.kind != "full" for op in key_ops):
                                    report.merged_tensors += 1
                                else:
                                    report.replaced_tensors += 1
                            else:
                                put(out_name(name), w0 if kind_dtype == w0.dtype else w0.to(kind_dtype))
                                report.copied_tensors += 1
                            report.tensors += 1
                        if bar is not None:
                            bar.update(reader.nbytes(key))
                    for name, t in head_tensors.items():
                        if not bool(torch.isfinite(t).all()):
                            raise NumericsError(f"adapter tensor {name} holds NaN or Inf values")
                        put(name, t.detach().to("cpu", head_dtype).contiguous())
                        report.replaced_tensors += 1
                        report.tensors += 1
                    if pending is not None:
                        pending.result()
                finally:
                    stream.close()
                    reader.close()
            files = writer.close()
            report.shards = sum(f.endswith(".safetensors") for f in files)
            report.total_bytes = writer.total_bytes
            report.largest_shard_bytes = writer.largest_shard_bytes
            out_config = dict(config)
            if out_config:
                if out_dtype is not None:
                    out_config["dtype"] = dtype_name(out_dtype)
                    if "torch_dtype" in out_config:
                        out_config["torch_dtype"] = dtype_name(out_dtype)
                if untie:
                    out_config["tie_word_embeddings"] = False
                if head:
                    _task_config(out_config, head)
            names = " + ".join(f"`{label}` (weight {w:g})" for _, w, label in loaded)
            note = (f"> **Merged model.** This checkpoint is `{base_dir.name}` with the adapter(s) "
                    f"{names} merged into its weights by loretta-merge {__version__}; see "
                    f"`{PROVENANCE_NAME}`.")
            _copy_side_files(base_dir, tmp, config=out_config, note=note)
            provenance = {
                "tool": "loretta-merge", "version": __version__,
                "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "base": str(base_dir.resolve()),
                "adapters": [{"path": label, "weight": w, "method": a.method, "source": a.source,
                              "base_model_name_or_path": a.base_model_name_or_path}
                             for a, w, label in loaded],
                "dtype": dtype_name(main_dtype), "untied": sorted(untie),
            }
            (tmp / PROVENANCE_NAME).write_text(json.dumps(provenance, indent=2) + "\n")
            if verify:  # on the finished temp dir, so a failed check leaves no output
                report.verify = verify_merge(base_dir, loaded, tmp, dtype=main_dtype)
    finally:
        if bar is not None:
            bar.close()
    report.seconds = round(time.perf_counter() - start, 3)
    return report


# --------------------------------------------------------------------------- verify

def _auto_class(config: dict):
    import transformers

    for arch in config.get("architectures") or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    return transformers.AutoModel


def _logits(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    for name in ("logits", "last_hidden_state"):
        value = getattr(out, name, None)
        if value is not None:
            return value.float()
    return out[0].float()


def _task_config(out_config: dict, head: dict) -> None:
    """Turn a bare model's config into its task model's: architectures and labels."""
    adapter = head["adapter"]
    cls = _head_class(out_config, adapter)
    if cls:
        out_config["architectures"] = [cls]
    id2label = adapter.config.get("id2label")
    if not id2label:
        rows = [int(t.shape[0]) for n, t in head["tensors"].items()
                if n.endswith(".weight") and t.ndim == 2]
        if rows and str(adapter.config.get("task_type", "")).upper() == "SEQ_CLS":
            id2label = {str(i): f"LABEL_{i}" for i in range(rows[-1])}
    if id2label:
        out_config["id2label"] = {str(k): v for k, v in id2label.items()}
        out_config["label2id"] = {v: int(k) for k, v in id2label.items()}


def verify_merge(base_dir: str | os.PathLike, loaded, out_dir: str | os.PathLike, *,
                 dtype: torch.dtype) -> dict:
    """Compare the merged model with base + adapter(s) in memory on a small probe batch.

    Both run in fp32 (the merged weights are upcast exactly), so the difference measures
    the merge and its one cast. Raises NumericsError above ``VERIFY_TOLERANCE[dtype]``
    relative to the logit scale.
    """
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    if len(loaded) != 1 or loaded[0][1] != 1.0:
        return {"skipped": "verify compares one adapter with weight 1 against its in-memory model"}
    adapter, _, label = loaded[0]
    config = _read_json(out_dir / "config.json") or _read_json(base_dir / "config.json")
    cls = _auto_class(config)  # the output's class: a task model when a head was added
    base = (quant.load_dequantized_model(base_dir, cls)  # quant: None unless quantized
            or cls.from_pretrained(base_dir, dtype=torch.float32)).eval()
    if adapter.method == "lora" and adapter.source == "peft" and adapter.path is not None:
        from peft import PeftModel

        reference = PeftModel.from_pretrained(base, adapter.path).eval()
    else:
        from .model import load_loretta_model

        reference = load_loretta_model(base, adapter).eval()
    merged = cls.from_pretrained(out_dir, dtype=torch.float32).eval()
    vocab = int(config.get("vocab_size") or 100)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(min(3, vocab - 1), min(vocab, 1000), (2, 8), generator=g)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    want, got = _logits(reference, inputs), _logits(merged, inputs)
    diff = float((want - got).abs().max())
    scale = max(1.0, float(want.abs().max()))
    tol = VERIFY_TOLERANCE.get(dtype, 3e-2) * scale
    result = {"max_abs_logit_diff": diff, "logit_scale": scale, "tolerance": tol,
              "passed": diff <= tol}
    if not diff <= tol:
        raise NumericsError(f"verify: the merged model in {out_dir} differs from base + {label} "
                            f"by {diff:.3g} in logits (tolerance {tol:.3g} for "
                            f"{dtype_name(dtype)}); no output was written")
    return result
