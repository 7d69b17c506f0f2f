"""Quantized bases: detect the format, list the quantized weights, dequantize them.

A merge into a quantized base reads it through :func:`open_base`, which returns a
reader that presents the dequantized (fp32) checkpoint: the merge adds its deltas to true
weights, never to stored codes, and writes an ordinary checkpoint. One small module per
format family (``bnb``, ``torchao``, ``ctensors``, ``gptq``) implements ``detect``; all
are pure torch. What cannot be done honestly is refused with the reason:
optimum-quanto and HQQ checkpoints, unknown ``quant_method`` values, checkpoints whose
tensors disagree with their ``quantization_config``, and AWQ with an adapter trained on
the original (unquantized) model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ..errors import ConfigError, FormatError
from . import bnb, ctensors, gptq, torchao
from .base import QuantLayout, QuantWeight
from .reader import DequantizedReader

__all__ = ["DequantizedReader", "QUANT_SIDE_FILES", "QuantLayout", "QuantWeight", "SUPPORTED",
           "check_adapters", "check_base", "describe_quantization", "load_dequantized_model",
           "open_base", "strip_quant_config"]

# quant_method -> what is read (for messages and docs)
SUPPORTED = {
    "bitsandbytes": "NF4/FP4 (with or without double quantization), int8",
    "torchao": "int8, intx (int4) weight-only, float8 weight-only",
    "compressed-tensors": "FP8, INT8, pack-quantized W4A16 (sym/asym)",
    "gptq": "4-bit (2/8 too), act-order",
    "awq": "GEMM 4-bit",
}
AWQ_TRAINED_ON = ("awq", "original")
# side files of quantized checkpoints that must not follow the dequantized output
QUANT_SIDE_FILES = ("quantize_config.json", "quant_config.json", "quanto_qmap.json", "recipe.yaml")


def _unsupported(base_dir: Path, method: str) -> FormatError:
    if method == "hqq":
        return FormatError(f"{base_dir} is an HQQ checkpoint, stored as a pickle (qmodel.pt) that "
                           f"loretta-merge will not unpickle and transformers cannot load; "
                           f"dequantize it with hqq in a trusted session and save the bf16 model with "
                           f"save_pretrained, then merge into that")
    if method == "quanto":
        return FormatError(f"{base_dir} is an optimum-quanto checkpoint (no quantization_config; "
                           f"transformers cannot load it); dequantize it with optimum-quanto "
                           f"(load with QuantizedModelForCausalLM.from_pretrained, then dequantize "
                           f"and save_pretrained in bf16), then merge into that")
    known = ", ".join(f"{k} ({v})" for k, v in SUPPORTED.items())
    return FormatError(f"{base_dir}/config.json: quantization_config has quant_method {method!r}, "
                       f"which loretta-merge cannot dequantize (it reads {known}); dequantize the "
                       f"model with its own package, save it in bf16 with save_pretrained, and "
                       f"merge into that")


# suffixes of stored tensors that only exist as parts of a quantized weight, by quant_method:
# one left over (its weight not recognised) means the checkpoint disagrees with its config
_AUX_SUFFIXES = {
    "bitsandbytes": (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".SCB",
                     ".quant_state.bitsandbytes__nf4", ".quant_state.bitsandbytes__fp4"),
    "torchao": ("._weight_qdata", "._weight_scale", "._weight_zero_point"),
    "compressed-tensors": (".weight_packed", ".weight_scale", ".weight_zero_point", ".weight_shape",
                           ".weight_g_idx"),
    "gptq": (".qweight", ".qzeros", ".scales", ".g_idx"),
    "awq": (".qweight", ".qzeros", ".scales", ".g_idx"),
}


def _quanto_marks(base_dir: Path, keys: Sequence[str] = ()) -> bool:
    if (base_dir / "quanto_qmap.json").is_file():
        return True
    return any(".weight._data" in k or k.endswith(".weight._scale") for k in keys)


def _check_leftovers(method: str, layout: QuantLayout, keys: Sequence[str]) -> None:
    used = layout.stored_keys()
    for key in keys:
        if key not in used and key.endswith(_AUX_SUFFIXES.get(method, ())):
            from .base import disagree

            raise disagree(layout.format, key, "belongs to no quantized weight that loretta-merge "
                           "recognised (its other parts are missing or do not match)")


def check_base(base_dir: str | Path, config: dict) -> None:
    """Refuse, before any reader is opened, the quantized bases that cannot be read:
    HQQ (a pickle), optimum-quanto, unknown ``quant_method`` values."""
    base_dir = Path(base_dir)
    qc = config.get("quantization_config")
    if qc is not None and not isinstance(qc, dict):
        raise FormatError(f"{base_dir}/config.json: quantization_config must be an object, got "
                          f"{type(qc).__name__}; re-save the model with save_pretrained")
    method = str((qc or {}).get("quant_method") or "")
    if method == "hqq" or (base_dir / "qmodel.pt").is_file():
        raise _unsupported(base_dir, "hqq")
    if _quanto_marks(base_dir):
        raise _unsupported(base_dir, "quanto")
    if qc and method not in SUPPORTED:
        raise _unsupported(base_dir, method or "<missing>")


def _shard_metadata(reader) -> dict:
    """Every shard's safetensors ``__metadata__``, merged (torchao keeps its per-weight
    descriptions there)."""
    from ..io import read_safetensors_header

    out: dict = {}
    for shard in sorted({reader.shard_of(k) for k in reader.keys()}):
        out.update(read_safetensors_header(Path(reader.model_dir) / shard).get("__metadata__") or {})
    return out


def detect(base_dir: str | Path, config: dict, reader) -> QuantLayout | None:
    """The quantization layout of the checkpoint ``reader`` reads, checked against
    ``config``'s ``quantization_config``; None for an ordinary checkpoint."""
    check_base(base_dir, config)
    if _quanto_marks(Path(base_dir), reader.keys()):
        raise _unsupported(Path(base_dir), "quanto")
    qc = config.get("quantization_config")
    if not qc:
        return None
    method = qc.get("quant_method")
    layout = None
    if method == "torchao":
        layout = torchao.detect(qc, reader, _shard_metadata(reader))
    for module in (bnb, ctensors, gptq):
        layout = layout or module.detect(qc, reader)
    if layout is None:  # pragma: no cover - check_base refused it
        raise _unsupported(Path(base_dir), str(method))
    _check_leftovers(str(method), layout, reader.keys())
    return layout


def open_base(base_dir: str | Path, config: dict, reader) -> DequantizedReader | None:
    """``reader`` seen as the dequantized checkpoint it stands for, or None when the base is
    not quantized. Raises FormatError for a format that cannot be read honestly."""
    layout = detect(base_dir, config, reader)
    return DequantizedReader(reader, layout) if layout is not None else None


def strip_quant_config(config: dict) -> dict:
    """The config of the merged (dequantized) model: no ``quantization_config``."""
    return {k: v for k, v in config.items() if k != "quantization_config"}


def check_adapters(reader, loaded: Sequence[Any], *,
                   awq_adapter_trained_on: str | None = None) -> None:
    """Refuse what cannot merge exactly into this quantized base.

    AWQ folds activation scales into the preceding norms, so its dequantized Linear
    weights are ``W · diag(s)``: an adapter trained on the AWQ model merges as is, one
    trained on the original model does not (``s`` is not stored). The tool assumes the
    adapter was trained on the AWQ model unless the user says otherwise
    (``awq_adapter_trained_on="original"``, which is refused). Only that option decides:
    the adapter's ``base_model_name_or_path`` is never followed (an adapter file is input
    that may come from anyone; the path it names is not opened).
    """
    if not isinstance(reader, DequantizedReader) or reader.layout.format != "awq":
        return
    if awq_adapter_trained_on not in (None, *AWQ_TRAINED_ON):
        raise ConfigError(f"--awq-adapter-trained-on must be one of {AWQ_TRAINED_ON}, got "
                          f"{awq_adapter_trained_on!r}; pass one of them, or omit the option")
    if awq_adapter_trained_on != "original":
        return
    labels = ", ".join(str(item.label) for item in loaded)  # merge's LoadedAdapter: .label
    raise ConfigError(
        f"adapter {labels} was trained on the original (unquantized) model (as "
        f"--awq-adapter-trained-on original says), but the base {reader.model_dir} is AWQ: AWQ "
        f"folds activation scales into the norms, so its weights are W·diag(s) with s not "
        f"stored, and the merge would be wrong; merge into the original model instead (then "
        f"re-quantize with AWQ), or, if the adapter was in fact trained on this AWQ model, pass "
        f"--awq-adapter-trained-on awq")


def describe_quantization(base_dir: str | Path, config: dict) -> dict | None:
    """What ``inspect`` shows of a quantized base: format, bits, group size, the quantized
    weights; ``mergeable: False`` and the reason for a base that cannot be merged."""
    from ..io import CheckpointReader

    base_dir = Path(base_dir)
    qc = config.get("quantization_config")
    try:
        check_base(base_dir, config)
        if not qc and not _quanto_marks(base_dir):
            with CheckpointReader(base_dir) as reader:
                if not _quanto_marks(base_dir, reader.keys()):
                    return None
                raise _unsupported(base_dir, "quanto")
        with CheckpointReader(base_dir) as reader:
            layout = detect(base_dir, config, reader)
    except FormatError as exc:
        method = (qc or {}).get("quant_method") if isinstance(qc, dict) else None
        name = ("HQQ" if method == "hqq" or (base_dir / "qmodel.pt").is_file() else
                "optimum-quanto" if "optimum-quanto" in str(exc) else method or "unrecognised")
        return {"quant_method": method, "format": name, "mergeable": False, "reason": str(exc)}
    if layout is None:  # pragma: no cover - qc was set
        return None
    return {"quant_method": qc.get("quant_method"), **layout.summary, "mergeable": True,
            "quantized_weights": sorted(layout.weights)}


def load_dequantized_model(base_dir: str | Path, cls):
    """The transformers model ``cls`` holding the dequantized weights of a quantized base
    (fp32, in memory: for ``--verify`` on small models), or None when the base is not
    quantized."""
    import torch

    from ..io import CheckpointReader, read_model_config

    config = read_model_config(base_dir)
    if not config.get("quantization_config"):
        return None
    with CheckpointReader(base_dir) as raw:
        reader = open_base(base_dir, config, raw)
        state = {k: reader.get(k).to(torch.float32) for k in reader.keys()}
    import transformers

    plain = transformers.AutoConfig.for_model(**strip_quant_config(config))
    model = cls.from_config(plain) if cls is transformers.AutoModel else cls(plain)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if k not in _tied_keys(model)]:
        raise FormatError(f"{base_dir}: the dequantized tensors do not fit {cls.__name__} (missing "
                          f"{missing[:3]}, unexpected {unexpected[:3]}); verify cannot build the base: rerun without --verify, or report the model architecture")
    model.tie_weights()
    return model.to(torch.float32).eval()


def _tied_keys(model) -> set[str]:
    keys = getattr(model, "_tied_weights_keys", None) or {}
    return set(keys) if isinstance(keys, (dict, list, set, tuple)) else set()
