"""``export_onnx``: check the options, load the model, trace it, validate it, publish it.

Every check on the options and inputs runs before the model is loaded; the output appears
at ``out_dir`` only after the graph (and every switchable adapter, and the int8 graph) has
passed validation in ONNX Runtime.
"""

from __future__ import annotations

import time
from pathlib import Path

from ...deps import require
from ...io import copy_side_files
from ...pooling import apply_pooling
from ...errors import ConfigError, FormatError, NumericsError, OutputExistsError, UnsafeInputError
from . import adapters as switching
from . import bank_export as banking
from .graph import check_and_opset, export_graph
from .reports import (INT8_MAX_REL_ERROR, INT8_MIN_AGREEMENT, ONNX_NAME, QUANTIZE_CHOICES, TASKS,
                      ExportReport, SwitchableReport)
from .validate import failure_message, open_session, probe_batch, validate_onnx
from .wrappers import build_wrapper, decoder_dims, dynamic_spec, uses_token_types



def resolve_task(config: dict, task: str = "auto") -> str:
    """The export task: as given, or guessed from ``config.architectures``."""
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
    if task != "auto":
        return task
    for arch in config.get("architectures") or []:
        if arch.endswith(("ForCausalLM", "LMHeadModel")):
            return "causal-lm"
        if arch.endswith("ForSequenceClassification"):
            return "seq-cls"
    return "feature-extraction"


def _read_config(model_dir: Path) -> dict:
    from ...io import read_model_config

    if not (model_dir / "config.json").is_file():
        raise FormatError(f"{model_dir} has no config.json; pass a transformers "
                          f"model directory (save_pretrained output, or a merged output)")
    return read_model_config(model_dir)


def _refuse_remote_code(config: dict, model_dir: Path, trust_remote_code: bool) -> None:
    if not config.get("auto_map") or trust_remote_code:
        return
    auto_map = config["auto_map"]
    refs = auto_map.values() if isinstance(auto_map, dict) else []
    code = sorted({v.split("--")[-1].split(".")[0] + ".py" for v in refs if isinstance(v, str)})
    raise UnsafeInputError(f"{model_dir / 'config.json'} names custom model code (auto_map: "
                           f"{', '.join(code) or '?'}); loading it would run that code. Pass "
                           f"--trust-remote-code (trust_remote_code=True) only if you trust "
                           f"the model's author")


def _check_options(task: str, *, with_past: bool, opset, atol, quantize, switchable, adapter,
                   model_dir: Path, int8_max_error=None, eval_file=None,
                   int8_min_agreement=None, bank: int | None = None) -> None:
    if with_past and task != "causal-lm":
        raise ConfigError(f"--with-past exports a KV-cache decoder and needs task causal-lm; "
                          f"{model_dir} resolves to task {task!r}; drop --with-past, or pass --task causal-lm for a decoder")
    if opset is not None and not 14 <= int(opset) <= 23:
        raise ConfigError(f"opset {opset} is outside the supported range 14..23; pass --opset "
                          f"between 14 and 23, or leave it out")
    if atol is not None and not atol > 0:
        raise ConfigError(f"atol must be positive, got {atol}; pass e.g. --atol 1e-3")
    if quantize is not None and quantize not in QUANTIZE_CHOICES:
        raise ConfigError(f"--quantize {quantize!r} is not supported; use --quantize "
                          f"{' or '.join(QUANTIZE_CHOICES)} (ONNX Runtime dynamic quantization)")
    if int8_max_error is not None and not (quantize and 0 < int8_max_error < 1):
        raise ConfigError(f"--int8-max-error {int8_max_error} needs --quantize int8 and a value "
                          f"between 0 and 1, e.g. --int8-max-error 0.2; pass both, or omit --int8-max-error")
    if int8_min_agreement is not None and not (quantize and task == "seq-cls"
                                               and 0 < int8_min_agreement <= 1):
        raise ConfigError(f"--int8-min-agreement {int8_min_agreement} needs --quantize int8, a "
                          f"seq-cls model and a value in (0, 1], e.g. --int8-min-agreement 0.95; "
                          f"pass those, or omit --int8-min-agreement")
    # --eval-file belongs to the int8 check (fp32 and int8 accuracy side by side); alone it
    # would be silently ignored, so it is refused, as on a head that does not classify
    if eval_file is not None and not quantize:
        raise ConfigError(f"--eval-file {eval_file} is used only with --quantize int8 (it reports "
                          f"the accuracy of the fp32 and int8 graphs); add --quantize int8, or "
                          f"drop --eval-file")
    if eval_file is not None and task != "seq-cls":
        raise ConfigError(f"--eval-file scores a seq-cls model's labels; {model_dir} resolves to "
                          f"task {task!r}; drop --eval-file")
    if quantize and switchable:
        raise ConfigError("--quantize with --switchable-adapter is not supported: the quantizer "
                          "rewrites the adapter weights the adapter files override; export the "
                          "switchable graph in float32, or merge each adapter and quantize that")
    if bank is not None and quantize:
        raise ConfigError("--quantize with --adapter-bank is not supported: the quantizer "
                          "rewrites the bank tensors a server overrides; export the bank in float32")
    if bank is not None and adapter is not None:
        raise ConfigError("--adapter and --adapter-bank cannot be combined; merge the --adapter "
                          "into the base first (`loretta-merge BASE+ADAPTER -o MERGED`) and bank MERGED")
    if switchable and adapter is not None:
        raise ConfigError("--adapter and --switchable-adapter cannot be combined; merge the "
                          "--adapter into the base first (`loretta-merge BASE+ADAPTER -o MERGED`)")


def _check_output(out_dir, force: bool) -> None:
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise OutputExistsError(f"output {out_dir} exists and is a file; choose a directory path")
    if Path(out_dir).exists() and not force:  # fail before the (possibly long) model load
        raise OutputExistsError(f"output {out_dir} already exists; pass --force (force=True) "
                                f"to replace it, or choose another output path")


def _read_applied_adapter(adapter):
    from ...formats import Adapter, read_adapter

    if adapter is None or isinstance(adapter, Adapter):
        return adapter
    loaded = read_adapter(adapter)  # a bad adapter fails before the model load
    loaded.path = Path(adapter)
    if loaded.method not in ("rep", "adp"):
        raise ConfigError(f"{adapter} is a {loaded.method!r} adapter ({loaded.source}); export "
                          f"onnx applies LoRETTA adapters only: merge it first (`loretta-merge "
                          f"merge MODEL ADAPTER -o MERGED`) and export MERGED, or pass it as "
                          f"--switchable-adapter NAME={adapter}")
    return loaded


def load_model(model_dir: Path, task: str, dtype, trust_remote_code: bool):
    """The transformers model for ``task``, in eval mode with gradients off."""
    import transformers
    from transformers.utils import logging as hf_logging

    auto = {"causal-lm": transformers.AutoModelForCausalLM,
            "seq-cls": transformers.AutoModelForSequenceClassification,
            "feature-extraction": transformers.AutoModel}[task]
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
    apply_pooling(model)  # a merged mean-pooling classifier says so in its config
    model.eval()
    model.requires_grad_(False)
    return model


def align_names(adapter, model):
    """The adapter with its module/tensor names fitted to ``model``: an adapter trained on a
    task model (``roberta.encoder...``) exported as feature-extraction (the bare encoder,
    ``encoder...``) loses the prefix (and the head tensors the bare encoder lacks), and an
    adapter trained on a bare encoder gains the prefix for a task model."""
    import dataclasses

    named = dict(model.named_modules())
    prefix = getattr(model, "base_model_prefix", "") or ""
    if not prefix or all(m in named for m in adapter.modules):
        return adapter
    lead = prefix + "."
    if all(m.startswith(lead) and m[len(lead):] in named for m in adapter.modules):
        rename = lambda n: n[len(lead):]  # noqa: E731
        tensors = {rename(k): v for k, v in adapter.tensors.items() if k.startswith(lead)}
    elif all(lead + m in named for m in adapter.modules):
        rename = lambda n: lead + n  # noqa: E731
        params = dict(model.named_parameters())
        tensors = {(lead + k if lead + k in params else k): v for k, v in adapter.tensors.items()}
    else:
        return adapter  # the fit check names the module that does not fit
    return dataclasses.replace(adapter, modules={rename(k): v for k, v in adapter.modules.items()},
                               tensors=tensors)


def _apply_adapter(model, adapter) -> tuple[object, bool]:
    """Attach a LoRETTA adapter; a rep adapter is merged into the weights (a plain graph, no
    TT reconstruction per inference). Returns (model, merged)."""
    from ...adapters.files import load_loretta_model, merge_loretta_model

    model = load_loretta_model(model, align_names(adapter, model))
    merged = adapter.method == "rep"
    if merged:
        model = merge_loretta_model(model)
    model.eval()
    model.requires_grad_(False)
    return model, merged


def export_onnx(model_dir, out_dir, *, adapter=None, task: str = "auto", with_past: bool = False,
                opset: int | None = None, dtype=None, atol: float | None = None,
                validate: bool = True, external_data_threshold_bytes: int = 2_000_000_000,
                force: bool = False, trust_remote_code: bool = False,
                switchable_adapters=(), switch_layout: str = "tt", quantize: str | None = None,
                eval_file=None, provider: str = "auto",
                int8_max_error: float | None = None,
                int8_min_agreement: float | None = None,
                adapter_bank: int | None = None) -> ExportReport:
    """Export MODEL_DIR (+ a LoRETTA adapter, or switchable adapters) to ``out_dir/model.onnx``.

    ``dtype`` (None/"auto" keeps the checkpoint's) casts the model before export. With
    ``validate`` (default) the graph is run in ONNX Runtime (``provider``: auto, cpu, cuda)
    and compared with PyTorch; a mismatch raises :class:`NumericsError` and nothing is
    written. ``switchable_adapters``: ``NAME=DIR`` specs, each written to
    ``out_dir/adapters/NAME.onnx_adapter``. ``quantize="int8"``: dynamic int8 quantization,
    checked against the fp32 graph on real text (``eval_file``, else the embedded calibration
    sentences): seq-cls by class agreement (at least ``int8_min_agreement``, default
    ``INT8_MIN_AGREEMENT``; accuracy of both when labelled), other tasks by relative error (at
    most ``int8_max_error``, default ``INT8_MAX_REL_ERROR``); see ``quantize.py``.
    ``adapter_bank``: a graph serving a different adapter per batch row from a bank of that
    many slots, the ``switchable_adapters`` filling slots 0, 1, ... (see ``bank.py``).
    """
    from ...io import CheckpointReader, atomic_output_dir, parse_dtype

    require("onnx", extra="onnx", purpose="export onnx")
    require("onnxscript", extra="onnx", purpose="export onnx")
    require("onnxruntime", extra="onnx", purpose="export onnx")
    model_dir = Path(model_dir)
    config = _read_config(model_dir)
    _refuse_remote_code(config, model_dir, trust_remote_code)
    task = resolve_task(config, task)
    switchable = list(switchable_adapters or ())
    _check_options(task, with_past=with_past, opset=opset, atol=atol, quantize=quantize,
                   switchable=switchable, adapter=adapter, model_dir=model_dir,
                   int8_max_error=int8_max_error, eval_file=eval_file,
                   int8_min_agreement=int8_min_agreement, bank=adapter_bank)
    if adapter_bank is not None:  # the size is checked before the model load
        banking.check_size(adapter_bank, len(switchable))
    torch_dtype = parse_dtype(dtype)
    _check_output(out_dir, force)
    # transformers may load a damaged checkpoint without complaint; check the index, each
    # shard's header and size, and that no shard lies outside MODEL_DIR first. Pickled
    # weights (.bin) are refused here, as by merge: loading them could run code.
    CheckpointReader(model_dir).close()
    adapter = _read_applied_adapter(adapter)
    if adapter_bank is not None:
        to_switch = banking.read_all(switchable)
    else:
        to_switch = switching.read_all(switchable, layout=switch_layout) if switchable else {}
    model = load_model(model_dir, task, torch_dtype, trust_remote_code)
    to_switch = {name: align_names(a, model) for name, a in to_switch.items()}
    plan = bank = None
    if adapter_bank is not None:
        bank = banking.plan_bank(to_switch, model, adapter_bank, layout=switch_layout)
    elif switchable:
        plan = switching.plan_switchable(to_switch, model, layout=switch_layout)
    merged = False
    if adapter is not None:
        model, merged = _apply_adapter(model, adapter)
    job = _Job(model_dir, model, task, with_past, opset, atol, validate, provider,
               external_data_threshold_bytes, plan)
    job.bank, job.bank_adapters = bank, to_switch
    with atomic_output_dir(out_dir, force=force) as tmp:
        report = job.run(tmp, Path(out_dir))
        report.adapter = None if adapter is None else str(adapter.path or adapter)
        report.adapter_merged = merged
        if quantize:
            from .quantize import quantize_int8

            report.quantize = quantize_int8(tmp / ONNX_NAME, model, task=task, names=job.names,
                                            model_dir=model_dir, eval_file=eval_file,
                                            external=report.external_data, provider=provider,
                                            max_rel_error=int8_max_error or INT8_MAX_REL_ERROR,
                                            min_agreement=int8_min_agreement or INT8_MIN_AGREEMENT)
            report.files = sorted(p.name for p in tmp.iterdir())
    return report


class _Job:
    """One export into a temporary directory: trace, check, validate."""

    def __init__(self, model_dir, model, task, with_past, opset, atol, validate, provider,
                 threshold, plan):
        self.model_dir, self.model, self.task, self.with_past = model_dir, model, task, with_past
        self.opset, self.atol, self.validate, self.provider = opset, atol, validate, provider
        self.plan = plan
        self.bank, self.bank_adapters = None, {}
        self.names = ["input_ids", "attention_mask"] + (
            ["token_type_ids"] if uses_token_types(model) else [])
        params = list(model.parameters()) + list(model.buffers())
        self.weight_bytes = sum(t.numel() * t.element_size() for t in params)
        self.external = self.weight_bytes > threshold

    def run(self, tmp: Path, out: Path) -> ExportReport:
        import torch

        from ...io import dtype_name

        model = self.model
        switch = tuple(switching.inject(model, self.plan)) if self.plan else ()
        slot_names: tuple[str, ...] = ()
        if self.bank is not None:
            tensors, slot_names = banking.inject_bank(model, self.bank, self.bank_adapters)
            switch = tuple(tensors)
        layers = decoder_dims(model.config)[0] if self.with_past else 0
        example = probe_batch(model.config, self.names, 2, 5, seed=0)
        wrapper, args, input_names, output_names = build_wrapper(
            model, self.task, self.names, with_past=self.with_past, layers=layers,
            example=example, switch=switch, slot_names=slot_names)
        onnx_path = tmp / ONNX_NAME
        t0 = time.perf_counter()
        with torch.no_grad():
            exporter, note = export_graph(
                wrapper, args, input_names=input_names, output_names=output_names,
                dynamic=dynamic_spec(self.names, self.with_past, layers, len(switch),
                                     bank=self.bank is not None),
                opset=self.opset, path=onnx_path, external_data=self.external)
            if switch:
                values = banking.defaults(self.bank, switch) if self.bank else list(switch)
                switching.make_overridable(onnx_path, values, external=self.external)
        seconds = time.perf_counter() - t0
        opset = check_and_opset(onnx_path)
        copy_side_files(self.model_dir, tmp)  # the one side-file policy (io.model_dir)
        files = switching.write_adapter_files(tmp, self.plan, model) if self.plan else {}
        graph_inputs = [n for n in input_names if n not in dict(switch)]
        if self.bank is not None:
            banking.write_bank_file(tmp, self.bank, task=self.task, with_past=self.with_past,
                                    inputs=graph_inputs,
                                    dtype=dtype_name(next(model.parameters()).dtype))
        report = ExportReport(
            onnx_path=str(out.absolute() / ONNX_NAME), task=self.task, exporter=exporter,
            exporter_note=note, opset=opset, dtype=dtype_name(next(model.parameters()).dtype),
            with_past=self.with_past, adapter=None, external_data=self.external,
            files=sorted(p.name for p in tmp.iterdir()),
            num_parameters=sum(p.numel() for n, p in model.named_parameters()
                               if ".switch." not in n and ".bank." not in n),
            weight_bytes=self.weight_bytes, export_seconds=round(seconds, 3),
            inputs=graph_inputs, outputs=output_names,
            switch_layout=self.plan.layout if self.plan else None)
        report.switchable = [self._adapter_report(name, path) for name, path in files.items()]
        if self.bank is not None:
            report.bank = banking.bank_report(self.bank, switch)
            report.files = sorted(p.name for p in tmp.iterdir())
        if self.validate:
            t0 = time.perf_counter()
            self._validate(onnx_path, report)
            report.validate_seconds = round(time.perf_counter() - t0, 3)
        return report

    def _adapter_report(self, name: str, path: Path) -> SwitchableReport:
        adapter = self.plan.adapters[name]
        values = switching.adapter_values(name, self.plan, self.model)
        return SwitchableReport(name=name, source=str(adapter.path), method=adapter.method,
                                file=str(Path(switching.ADAPTERS_DIR) / path.name),
                                file_bytes=path.stat().st_size,
                                tensor_bytes=sum(v.nbytes for v in values.values()),
                                tensors=len(values))

    def _validate(self, onnx_path: Path, report: ExportReport) -> None:
        session = open_session(onnx_path, self.provider)
        kw = dict(task=self.task, with_past=self.with_past, input_names=self.names,
                  atol=self.atol, session=session)
        if self.bank is not None:
            kw["slot"] = banking.NO_ADAPTER
        report.validation = validate_onnx(onnx_path, self.model, **kw)
        if not report.validation.passed:
            raise NumericsError(failure_message(report.validation, self.model_dir))
        if self.bank is not None:
            banking.validate_bank(session, self.model, self.bank, report.bank, kw,
                                  self.model_dir)
        for entry in report.switchable:
            options, _loaded = switching.run_options_for(onnx_path.parent / entry.file)
            with switching.merged_into(self.model, self.plan, entry.name) as merged:
                entry.validation = validate_onnx(onnx_path, merged, run_options=options, **kw)
            entry.validation.adapter = entry.name
            if not entry.validation.passed:
                raise NumericsError(failure_message(entry.validation, self.model_dir))
