"""Export a transformers model (optionally with a LoRETTA adapter applied) to ONNX, and
check the result in ONNX Runtime against PyTorch before publishing it.

Why: a deployed graph that silently disagrees with the trained model is worse than no
export. So every export is run in ONNX Runtime on padded probe batches of two shapes and
compared with PyTorch eager at the positions the attention mask keeps (padded positions are
free to differ), the execution provider that really ran is reported, and a failing check
raises :class:`NumericsError` before anything appears at the output path.

Layout of an output directory::

    model.onnx            the graph (dynamic batch and sequence axes)
    model.onnx.data       all weights, when they exceed ``external_data_threshold_bytes``
    config.json, generation_config.json, tokenizer files   copied from MODEL_DIR

Inputs: ``input_ids``, ``attention_mask`` (+ ``token_type_ids`` for models with segment
embeddings). Outputs: ``logits`` (causal-lm, seq-cls) or ``last_hidden_state``
(feature-extraction). With ``with_past`` (causal-lm only) the graph also takes
``past_key_values.{i}.key/value`` of shape (batch, kv_heads, past_len, head_dim), with
``past_len`` possibly 0 for the first step, and ``attention_mask`` covers past + new tokens;
it returns ``present.{i}.key/value`` to feed back at the next step. Position ids are derived
inside the graph from the attention mask (``cumsum - 1``), so left-padded batches work.
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..deps import require
from ..errors import ConfigError, FormatError, NumericsError, OutputExistsError

TASKS = ("auto", "causal-lm", "seq-cls", "feature-extraction")
ONNX_NAME = "model.onnx"
COPIED_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt",
    "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "chat_template.jinja",
    "chat_template.json", "preprocessor_config.json",
)
# default tolerances by dtype: pass when |onnx - torch| <= atol + rtol * |torch| everywhere
_TOLERANCES = {"float32": (1e-4, 1e-4), "float16": (1e-2, 1e-2), "bfloat16": (5e-2, 5e-2)}
# (batch, sequence) of the probe batches; the first row of each is right-padded
PROBE_SHAPES = ((2, 7), (3, 16))
GENERATION_STEPS = 5


@dataclass
class ProbeResult:
    batch: int
    sequence: int
    max_abs_diff: float
    max_rel_diff: float     # max |onnx - torch| / max |torch| over kept positions
    passed: bool


@dataclass
class ValidationReport:
    providers: list[str]                 # session.get_providers(): what actually ran
    atol: float
    rtol: float
    max_abs_diff: float
    max_rel_diff: float
    probes: list[ProbeResult]
    passed: bool
    generation_tokens_onnx: list[list[int]] | None = None
    generation_tokens_torch: list[list[int]] | None = None
    generation_match: bool | None = None
    generation_max_abs_diff: float | None = None   # last-position logits over the cached steps


@dataclass
class ExportReport:
    onnx_path: str
    task: str
    exporter: str                        # "dynamo" or "torchscript"
    exporter_note: str | None            # why the fallback was used, if it was
    opset: int
    dtype: str
    with_past: bool
    adapter: str | None
    external_data: bool
    files: list[str]
    num_parameters: int
    weight_bytes: int
    export_seconds: float
    inputs: list[str]
    outputs: list[str]
    validation: ValidationReport | None = None
    validate_seconds: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- model loading

def _read_config(model_dir: Path) -> dict:
    cfg = model_dir / "config.json"
    if not cfg.is_file():
        raise FormatError(f"{model_dir} has no config.json; pass a transformers "
                          f"model directory (save_pretrained output, or a merged output)")
    try:
        return json.loads(cfg.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise FormatError(f"{cfg}: cannot read ({exc}); the file is corrupt: fix the JSON or "
                          f"re-save the model with save_pretrained") from exc


def _formats():
    from .. import formats

    return formats


def resolve_task(config: dict, task: str = "auto") -> str:
    """The export task: as given, or guessed from ``config.architectures``."""
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
    if task != "auto":
        return task
    archs = config.get("architectures") or []
    for arch in archs:
        if arch.endswith(("ForCausalLM", "LMHeadModel")):
            return "causal-lm"
        if arch.endswith("ForSequenceClassification"):
            return "seq-cls"
    return "feature-extraction"


def _load_model(model_dir: Path, task: str, dtype, trust_remote_code: bool):
    import torch
    import transformers

    auto = {"causal-lm": transformers.AutoModelForCausalLM,
            "seq-cls": transformers.AutoModelForSequenceClassification,
            "feature-extraction": transformers.AutoModel}[task]
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # stderr carries only our one-line errors
    try:
        model = auto.from_pretrained(model_dir, dtype=dtype if dtype is not None else "auto",
                                     local_files_only=True, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        raise ConfigError(f"cannot load {model_dir} for task {task!r} ({exc}); choose the "
                          f"--task that matches the model's head") from exc
    except OSError as exc:
        raise FormatError(f"cannot load the model in {model_dir}: {exc}; pass a directory that "
                          f"holds a complete transformers checkpoint") from exc
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    model.eval()
    model.requires_grad_(False)
    return model, torch


def _uses_token_types(model) -> bool:
    import inspect

    if getattr(model.config, "type_vocab_size", 0) <= 1:
        return False
    return "token_type_ids" in inspect.signature(model.forward).parameters


def _decoder_dims(config) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of a decoder's KV cache."""
    cfg = config.get_text_config(decoder=True)
    layers = cfg.num_hidden_layers
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return layers, kv, head_dim


# --------------------------------------------------------------------------- wrappers

def _make_wrappers():
    import torch

    class PlainWrapper(torch.nn.Module):
        """Explicit tensors in, one plain tensor out: the signature the exporter sees."""

        def __init__(self, model, task: str):
            super().__init__()
            self.model, self.task = model, task

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            kw = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
            if self.task == "causal-lm":
                kw["use_cache"] = False
            out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                             return_dict=True, **kw)
            return out.logits if self.task != "feature-extraction" else out.last_hidden_state

    class PastWrapper(torch.nn.Module):
        """Decoder step, KV cache as flat tensors: (ids, mask, past) -> (logits, *present)."""

        def __init__(self, model, layers: int):
            super().__init__()
            self.model, self.layers = model, layers

        def forward(self, input_ids, attention_mask, past):
            from transformers import DynamicCache

            cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1])
                                                 for i in range(self.layers)],
                                 config=self.model.config)
            seq = input_ids.shape[1]
            # positions count kept tokens only, so left padding works; (B, seq)
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seq:]
            out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                             position_ids=position_ids, use_cache=True, return_dict=True,
                             **_cache_kwargs(self.model, cache))
            present = []
            for layer in _cache_of(out).layers[: self.layers]:
                present += [layer.keys, layer.values]
            return (out.logits, *present)

    return PlainWrapper, PastWrapper


def _cache_kwargs(model, cache) -> dict:
    """transformers 5.x names the cache argument ``cache``; older releases ``past_key_values``."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return {"cache": cache} if "cache" in params else {"past_key_values": cache}


def _cache_of(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def _past_names(layers: int) -> list[str]:
    names = []
    for i in range(layers):
        names += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
    return names


# --------------------------------------------------------------------------- export

def _export_graph(wrapper, args: tuple, *, input_names, output_names, dynamic, opset, path: Path,
                  external_data: bool) -> tuple[str, str | None]:
    """Export ``wrapper`` to ``path``; the dynamo exporter first, TorchScript as fallback.
    Returns (exporter used, reason for the fallback or None)."""
    import logging

    import torch

    # the exporter logs a warning per torchvision op it cannot register: not our business
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(wrapper, args, dynamo=True, input_names=input_names,
                                        output_names=output_names,
                                        dynamic_shapes=dynamic["shapes"], opset_version=opset,
                                        optimize=True, verbose=False)
            program.save(str(path), external_data=external_data)
        return "dynamo", None
    except Exception as exc:  # noqa: BLE001 - any exporter failure -> try the other one
        note = f"dynamo exporter failed ({type(exc).__name__}: {str(exc).splitlines()[0][:300]})"
    for p in path.parent.iterdir():  # drop anything the failed attempt left behind
        p.unlink()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapper, args, str(path), dynamo=False, input_names=input_names,
                              output_names=output_names, dynamic_axes=dynamic["axes"],
                              opset_version=opset or 17, do_constant_folding=True)
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"ONNX export failed with both exporters: {note}; TorchScript "
                          f"exporter: {type(exc).__name__}: {exc}; rerun with --debug for the traceback and report it") from exc
    if external_data:  # TorchScript writes one file per tensor: gather them into one
        _to_single_data_file(path)
    return "torchscript", note


def _to_single_data_file(path: Path) -> None:
    import onnx

    before = set(path.parent.iterdir())
    model = onnx.load(str(path), load_external_data=True)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)
    for p in before - {path}:
        if p.name != path.name + ".data":
            p.unlink()


def _dynamic_spec(names: list[str], with_past: bool, layers: int):
    import torch

    B, S = torch.export.Dim("batch"), torch.export.Dim("sequence")
    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    shapes: dict[str, Any] = {n: {0: B, 1: S} for n in names}
    if with_past:
        P, T = torch.export.Dim("past_sequence"), torch.export.Dim("total_sequence")
        shapes = {"input_ids": {0: B, 1: S}, "attention_mask": {0: B, 1: T},
                  "past": tuple({0: B, 2: P} for _ in range(2 * layers))}
        axes["attention_mask"] = {0: "batch", 1: "total_sequence"}
        for n in _past_names(layers):
            axes[n] = {0: "batch", 2: "past_sequence"}
            axes[n.replace("past_key_values", "present")] = {0: "batch", 2: "total_sequence"}
    return {"shapes": shapes, "axes": axes}


def export_onnx(model_dir, out_dir, *, adapter=None, task: str = "auto", with_past: bool = False,
                opset: int | None = None, dtype=None, atol: float | None = None,
                validate: bool = True, external_data_threshold_bytes: int = 2_000_000_000,
                force: bool = False, trust_remote_code: bool = False) -> ExportReport:
    """Export MODEL_DIR (+ an in-memory LoRETTA adapter) to ``out_dir/model.onnx``.

    ``dtype`` (None/"auto" keeps the checkpoint's) casts the model before export. With
    ``validate`` (default) the graph is run in ONNX Runtime and compared with PyTorch;
    a mismatch raises :class:`NumericsError` and nothing is written at ``out_dir``.
    ``out_dir`` must not exist unless ``force``.
    """
    from ..io import atomic_output_dir, dtype_name, parse_dtype

    model_dir = Path(model_dir)
    config = _read_config(model_dir)
    if config.get("auto_map") and not trust_remote_code:
        from ..errors import UnsafeInputError

        auto_map = config["auto_map"]
        refs = auto_map.values() if isinstance(auto_map, dict) else []
        code = sorted({v.split("--")[-1].split(".")[0] + ".py" for v in refs if isinstance(v, str)})
        raise UnsafeInputError(f"{model_dir / 'config.json'} names custom model code (auto_map: "
                               f"{', '.join(code) or '?'}); loading it would run that code. Pass "
                               f"--trust-remote-code (trust_remote_code=True) only if you trust "
                               f"the model's author")
    task = resolve_task(config, task)
    if with_past and task != "causal-lm":
        raise ConfigError(f"--with-past exports a KV-cache decoder and needs task causal-lm; "
                          f"{model_dir} resolves to task {task!r}; drop --with-past, or pass --task causal-lm for a decoder")
    if opset is not None and not 14 <= int(opset) <= 23:
        raise ConfigError(f"--opset {opset} is outside the supported range 14..23; pass one in it, or omit --opset")
    if atol is not None and not atol > 0:
        raise ConfigError(f"--atol must be positive, got {atol}; pass e.g. --atol 1e-4, or omit it for the default")
    torch_dtype = parse_dtype(dtype)
    for module in ("onnx", "onnxruntime") if validate else ("onnx",):  # before any work
        require(module, extra="onnx", purpose="export onnx")
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise OutputExistsError(f"output {out_dir} exists and is a file; choose a directory path")
    if Path(out_dir).exists() and not force:  # fail before the (possibly long) model load
        raise OutputExistsError(f"output {out_dir} already exists; pass --force (force=True) "
                                f"to replace it, or choose another output path")
    from ..io import CheckpointReader

    # transformers may load a damaged checkpoint without complaint; check the index, each
    # shard's header and size, and that no shard lies outside MODEL_DIR first. Pickled
    # weights (.bin) are refused here, as by merge: loading them could run code.
    CheckpointReader(model_dir).close()
    adapter_label = None if adapter is None else str(getattr(adapter, "path", None) or adapter)
    if adapter is not None and not isinstance(adapter, _formats().Adapter):
        adapter_path = adapter
        adapter = _formats().read_adapter(adapter)  # a bad adapter fails before the model load
        adapter.path = Path(adapter_path)
    if adapter is not None and adapter.method not in ("rep", "adp"):
        raise ConfigError(f"{adapter.path or 'the adapter'} is a {adapter.method!r} adapter "
                          f"({adapter.source}); export onnx applies LoRETTA adapters only: merge it "
                          f"first (`loretta-merge merge MODEL ADAPTER -o MERGED`) and export MERGED")

    model, torch = _load_model(model_dir, task, torch_dtype, trust_remote_code)
    if adapter is not None:
        from ..model import load_loretta_model

        model = load_loretta_model(model, adapter)
        model.eval()
        model.requires_grad_(False)
    run_dtype = next(model.parameters()).dtype
    weight_bytes = sum(t.numel() * t.element_size()
                       for t in list(model.parameters()) + list(model.buffers()))
    external = weight_bytes > external_data_threshold_bytes

    PlainWrapper, PastWrapper = _make_wrappers()
    layers = _decoder_dims(model.config)[0] if with_past else 0
    names = ["input_ids", "attention_mask"]
    if _uses_token_types(model):
        names.append("token_type_ids")
    example = _probe_batch(model.config, names, 2, 5, seed=0)
    if with_past:
        wrapper = PastWrapper(model, layers).eval()
        _, kv, hd = _decoder_dims(model.config)
        past = tuple(torch.zeros(2, kv, 3, hd, dtype=run_dtype) for _ in range(2 * layers))
        example["attention_mask"] = torch.ones(2, 8, dtype=torch.long)
        args = (example["input_ids"], example["attention_mask"], past)
        input_names = names + _past_names(layers)
        output_names = ["logits"] + [n.replace("past_key_values", "present")
                                     for n in _past_names(layers)]
    else:
        wrapper = PlainWrapper(model, task).eval()
        args = tuple(example[n] for n in names)
        input_names = names
        output_names = ["last_hidden_state" if task == "feature-extraction" else "logits"]

    with atomic_output_dir(out_dir, force=force) as tmp:
        onnx_path = tmp / ONNX_NAME
        t0 = time.perf_counter()
        with torch.no_grad():
            exporter, note = _export_graph(wrapper, args, input_names=input_names,
                                           output_names=output_names,
                                           dynamic=_dynamic_spec(names, with_past, layers),
                                           opset=opset, path=onnx_path, external_data=external)
        export_seconds = time.perf_counter() - t0
        import onnx

        onnx.checker.check_model(str(onnx_path))
        proto = onnx.load(str(onnx_path), load_external_data=False)
        used_opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
        del proto
        for name in COPIED_FILES:
            if (model_dir / name).is_file():
                shutil.copy2(model_dir / name, tmp / name)
        report = ExportReport(
            onnx_path=str(Path(out_dir).absolute() / ONNX_NAME), task=task, exporter=exporter,
            exporter_note=note, opset=used_opset, dtype=dtype_name(run_dtype),
            with_past=with_past, adapter=adapter_label,
            external_data=external, files=sorted(p.name for p in tmp.iterdir()),
            num_parameters=sum(p.numel() for p in model.parameters()),
            weight_bytes=weight_bytes, export_seconds=round(export_seconds, 3),
            inputs=input_names, outputs=output_names)
        if validate:
            t0 = time.perf_counter()
            report.validation = validate_onnx(onnx_path, model, task=task, with_past=with_past,
                                              input_names=names, atol=atol)
            report.validate_seconds = round(time.perf_counter() - t0, 3)
            if not report.validation.passed:
                raise NumericsError(_failure_message(report.validation, model_dir))
    return report


def _failure_message(v: ValidationReport, model_dir: Path) -> str:
    worst = max(v.probes, key=lambda p: p.max_abs_diff)
    msg = (f"ONNX export of {model_dir} failed validation on {v.providers[0]}: max |onnx - torch| "
           f"= {v.max_abs_diff:.3g} (relative {v.max_rel_diff:.3g}) at probe batch={worst.batch} "
           f"seq={worst.sequence}, tolerance atol={v.atol:g} + rtol={v.rtol:g}*|torch|")
    if v.generation_match is False:
        msg += (f"; greedy tokens through the KV cache differ: onnx {v.generation_tokens_onnx} "
                f"vs torch {v.generation_tokens_torch}")
    return msg + ("; no output was written. If the difference is expected for this dtype, "
                  "raise --atol; otherwise report the model architecture")


# --------------------------------------------------------------------------- validation

def _probe_batch(config, names: list[str], batch: int, seq: int, *, seed: int) -> dict:
    """Random token ids with the first row right-padded (its last ``seq // 3`` tokens)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    vocab = config.get_text_config().vocab_size
    ids = torch.randint(min(3, vocab - 1), vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, seq - max(1, seq // 3):] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in names:
        types = torch.zeros(batch, seq, dtype=torch.long)
        types[:, seq // 2:] = 1
        out["token_type_ids"] = types
    return out


def _session(path: Path):
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    if ort.get_device() == "GPU" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    except Exception as exc:  # noqa: BLE001 - e.g. an op without a kernel for this dtype
        raise NumericsError(f"ONNX Runtime cannot load the exported {path.name} ({exc}); "
                            f"nothing was written. Export in float32 (--dtype float32), or "
                            f"skip the check with --no-validate") from exc


def _compare(onnx_out: np.ndarray, ref: np.ndarray, keep: np.ndarray | None, atol: float,
             rtol: float) -> tuple[float, float, bool]:
    """(max abs diff, max abs diff / max |ref|, within atol + rtol*|ref|) over kept entries."""
    o, r = onnx_out.astype(np.float64), ref.astype(np.float64)
    if keep is not None:  # (B, S) mask over (B, S, ...) outputs
        o, r = o[keep], r[keep]
    if not np.isfinite(o).all():
        return float("inf"), float("inf"), False
    diff = np.abs(o - r)
    max_abs = float(diff.max(initial=0.0))
    max_rel = max_abs / max(float(np.abs(r).max(initial=0.0)), 1e-12)
    return max_abs, max_rel, bool((diff <= atol + rtol * np.abs(r)).all())


def validate_onnx(onnx_path, model, *, task: str, with_past: bool = False,
                  input_names: list[str] | None = None, atol: float | None = None,
                  rtol: float | None = None) -> ValidationReport:
    """Run ``onnx_path`` in ONNX Runtime on padded probes of two shapes and compare with
    ``model`` in PyTorch at kept positions; with ``with_past`` also compare greedy tokens."""
    import torch

    from ..io import dtype_name

    dtype = next(model.parameters()).dtype
    base_atol, base_rtol = _TOLERANCES.get(dtype_name(dtype), _TOLERANCES["float32"])
    atol = base_atol if atol is None else float(atol)
    rtol = base_rtol if rtol is None else float(rtol)
    names = input_names or ["input_ids", "attention_mask"]
    session = _session(Path(onnx_path))
    PlainWrapper, _ = _make_wrappers()
    plain = PlainWrapper(model, task).eval()
    max_pos = getattr(model.config.get_text_config(), "max_position_embeddings", None) or 512
    probes = []
    layers = kv = hd = 0
    if with_past:
        layers, kv, hd = _decoder_dims(model.config)
    for i, (b, s) in enumerate(PROBE_SHAPES):
        s = min(s, max_pos)
        feed = _probe_batch(model.config, names, b, s, seed=100 + i)
        with torch.no_grad():
            ref = plain(*(feed[n] for n in names)).float().numpy()
        ort_feed = {n: feed[n].numpy() for n in names}
        if with_past:
            np_dtype = np.float16 if dtype == torch.float16 else np.float32
            for n in _past_names(layers):
                ort_feed[n] = np.zeros((b, kv, 0, hd), dtype=np_dtype)
        got = np.asarray(session.run(None, ort_feed)[0], dtype=np.float32)
        keep = feed["attention_mask"].numpy().astype(bool) if task != "seq-cls" else None
        if got.shape != ref.shape:
            raise NumericsError(f"ONNX output shape {got.shape} != PyTorch {ref.shape} for "
                                f"probe batch={b} seq={s}; the export is broken; rerun with --debug and report it (pass --no-validate only to inspect the graph)")
        max_abs, max_rel, ok = _compare(got, ref, keep, atol, rtol)
        probes.append(ProbeResult(b, s, max_abs, max_rel, ok))
    report = ValidationReport(providers=session.get_providers(), atol=atol, rtol=rtol,
                              max_abs_diff=max(p.max_abs_diff for p in probes),
                              max_rel_diff=max(p.max_rel_diff for p in probes), probes=probes,
                              passed=all(p.passed for p in probes))
    if with_past:
        got_tokens, ref_tokens, got, ref = _greedy_check(session, model, layers, kv, hd)
        report.generation_tokens_onnx, report.generation_tokens_torch = got_tokens, ref_tokens
        report.generation_match = got_tokens == ref_tokens
        # the logits of every cached step must agree too, not only their argmax
        max_abs, max_rel, ok = _compare(got, ref, None, atol, rtol)
        report.generation_max_abs_diff = max_abs
        report.max_abs_diff = max(report.max_abs_diff, max_abs)
        report.max_rel_diff = max(report.max_rel_diff, max_rel)
        report.passed = report.passed and ok and report.generation_match
    return report


def _greedy_check(session, model, layers: int, kv: int, hd: int,
                  steps: int = GENERATION_STEPS):
    """Greedy tokens for a left-padded batch of two prompts, step by step through the KV
    cache: ONNX Runtime (the exported graph) vs PyTorch (the model with a DynamicCache).
    Returns (onnx tokens, torch tokens, per-step last-position logits of each)."""
    import torch
    from transformers import DynamicCache

    prompt = _probe_batch(model.config, ["input_ids"], 2, 6, seed=7)["input_ids"]
    mask = torch.ones_like(prompt)
    mask[0, :2] = 0  # left padding on the first prompt
    np_dtype = np.float16 if next(model.parameters()).dtype == torch.float16 else np.float32

    past = {n: np.zeros((2, kv, 0, hd), dtype=np_dtype) for n in _past_names(layers)}
    ids, am, onnx_tokens, onnx_logits = prompt.numpy(), mask.numpy(), [], []
    for _ in range(steps):
        outs = session.run(None, {"input_ids": ids, "attention_mask": am, **past})
        onnx_logits.append(np.asarray(outs[0])[:, -1].astype(np.float32))
        nxt = onnx_logits[-1].argmax(-1)
        onnx_tokens.append(nxt.tolist())
        past = dict(zip(_past_names(layers), outs[1:]))
        ids = nxt[:, None].astype(np.int64)
        am = np.concatenate([am, np.ones((2, 1), dtype=am.dtype)], axis=1)

    cache = DynamicCache(config=model.config)
    ids, am, torch_tokens, torch_logits = prompt, mask, [], []
    with torch.no_grad():
        for _ in range(steps):
            pos = (am.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
            out = model(input_ids=ids, attention_mask=am, position_ids=pos, use_cache=True,
                        return_dict=True, **_cache_kwargs(model, cache))
            torch_logits.append(out.logits[:, -1].float().numpy())
            nxt = out.logits[:, -1].float().argmax(-1)
            torch_tokens.append(nxt.tolist())
            cache = _cache_of(out)
            ids = nxt[:, None]
            am = torch.cat([am, torch.ones(2, 1, dtype=am.dtype)], dim=1)
    transpose = lambda steps_: [list(t) for t in zip(*steps_)]  # noqa: E731 - per prompt
    return (transpose(onnx_tokens), transpose(torch_tokens), np.stack(onnx_logits),
            np.stack(torch_logits))
