"""Describe adapter and model directories; count what an adapter would train.

- :func:`describe` reads an adapter directory (any supported format) or a model directory
  (``config.json`` + safetensors headers only; no weights are loaded).
- :func:`count_params` builds a model from its ``config.json`` on the meta device (no
  memory for weights, so a 70B config counts in seconds), applies
  :func:`model.get_loretta_model` there and returns what it would train, next to LoRA of
  the same ``r`` on the same modules.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .errors import ConfigError, FormatError

ENCODER_TYPES = ("bert", "roberta", "xlm-roberta", "deberta", "deberta-v2", "electra", "distilbert")
TASKS = {"seq-cls": "SEQ_CLS", "causal-lm": "CAUSAL_LM"}


# --------------------------------------------------------------------------- helpers

def is_norm_tensor(name: str) -> bool:
    """A full tensor that belongs to a normalisation layer, judged by its owner's name
    (``...LayerNorm.weight``, ``...input_layernorm.weight``, GPT-2 ``ln_1``/``ln_f``)."""
    owner = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else name
    return "norm" in owner.lower() or re.fullmatch(r"ln(_\w+)?", owner) is not None


def _tt_info(m) -> dict[str, Any]:
    from . import tt

    return {"shape": [m.rows, m.cols], "modes": tt.tt_modes_of(m.cores),
            "ranks": [1] + [int(c.shape[-1]) for c in m.cores], "params": m.num_params()}


def _describe_adapter(path: Path) -> dict[str, Any]:
    from .formats import AdpModule, LoraModule, RepModule, TTDenseModule, read_adapter

    ad = read_adapter(path)
    modules: dict[str, Any] = {}
    counts = {"tt_cores": 0, "biases": 0, "norms": 0, "heads": 0}
    lora_same_r = 0  # rep: LoRA of the same r on the same modules
    dense_bottleneck = 0  # adp: an ordinary (dense) bottleneck adapter of the same size
    widths: set[int] = set()
    for name, m in ad.modules.items():
        if isinstance(m, RepModule):
            info = {"kind": "rep", "scale": m.scale, "lora_A": _tt_info(m.a), "lora_B": _tt_info(m.b)}
            counts["tt_cores"] += m.a.num_params() + m.b.num_params()
            lora_same_r += m.a.cols * (m.a.rows + m.b.cols)
            widths |= {m.a.rows, m.b.cols}
        elif isinstance(m, AdpModule):
            info = {"kind": "adp", "placement": m.placement, "non_linearity": m.non_linearity,
                    "scaling": m.scaling, "adapter_down": _tt_info(m.down), "adapter_up": _tt_info(m.up)}
            counts["tt_cores"] += m.down.num_params() + m.up.num_params()
            counts["biases"] += m.down_bias.numel() + m.up_bias.numel()
            dense_bottleneck += 2 * m.down.rows * m.down.cols + m.down.rows + m.down.cols
            widths.add(m.down.rows)
        elif isinstance(m, TTDenseModule):
            info = {"kind": "tt_dense", "weight": _tt_info(m.weight)}
            counts["tt_cores"] += m.weight.num_params()
            counts["biases"] += m.bias.numel() if m.bias is not None else 0
            widths |= {m.weight.rows, m.weight.cols}
        elif isinstance(m, LoraModule):
            info = {"kind": "lora", "r": int(m.a.shape[0]), "shape": [int(m.a.shape[1]), int(m.b.shape[0])],
                    "params": m.num_params()}
            lora_same_r += m.num_params()
            widths |= {int(m.a.shape[1]), int(m.b.shape[0])}
        else:  # pragma: no cover - formats only produces the kinds above
            info = {"kind": type(m).__name__}
        modules[name] = info
    for name, t in ad.tensors.items():
        counts["norms" if is_norm_tensor(name) else "heads"] += t.numel()
    total = sum(counts.values())
    out: dict[str, Any] = {
        "kind": "adapter", "path": str(path), "method": ad.method, "source": ad.source,
        "base_model_name_or_path": ad.base_model_name_or_path,
        "targets": sorted({n.rsplit(".", 1)[-1] for n, m in modules.items() if m["kind"] != "tt_dense"}),
        "num_modules": len(modules), "widths": sorted(widths),
        "tensor_rank": ad.config.get("tensor_rank"), "modules": modules,
        "full_tensors": sorted(ad.tensors), "trainable_params": total, "breakdown": counts,
    }
    adapter_only = counts["tt_cores"] + counts["biases"]
    if ad.method == "rep" and lora_same_r:
        out["lora_params_same_r"] = lora_same_r
        out["compression_vs_lora"] = round(lora_same_r / max(adapter_only, 1), 2)
    if ad.method == "adp" and dense_bottleneck:
        out["dense_adapter_params"] = dense_bottleneck
        out["compression_vs_dense_adapter"] = round(dense_bottleneck / max(adapter_only, 1), 2)
    return out


def _describe_model(path: Path) -> dict[str, Any]:
    from .io import read_model_config, read_safetensors_header

    config = read_model_config(path, required=True)
    if (path / "model.safetensors.index.json").is_file() or (path / "model.safetensors").is_file():
        from .io import CheckpointReader

        CheckpointReader(path).close()  # checks the index, every shard's header and size, escapes
    shards = sorted(path.glob("*.safetensors"))
    n_params, dtypes, shard_info = 0, {}, []
    for shard in shards:
        header = read_safetensors_header(shard)
        count = 0
        for key, info in header.items():
            if key == "__metadata__":
                continue
            n = 1
            for s in info["shape"]:
                n *= int(s)
            count += n
            dtypes[info["dtype"]] = dtypes.get(info["dtype"], 0) + n
        n_params += count
        shard_info.append({"file": shard.name, "bytes": shard.stat().st_size, "params": count})
    pickled = sorted(p.name for p in path.glob("*.bin"))
    from .quant import describe_quantization

    quantization = describe_quantization(path, config) if shards or (path / "qmodel.pt").is_file() \
        else None
    return {"kind": "model", "quantization": quantization, "path": str(path), "model_type": config.get("model_type"),
            "architectures": config.get("architectures"), "hidden_size": config.get("hidden_size"),
            "num_hidden_layers": config.get("num_hidden_layers"),
            "params": n_params if shards else None, "dtypes": dtypes, "shards": shard_info,
            "pickled_files_not_opened": pickled}


def describe(path: str | Path) -> dict[str, Any]:
    """Describe an adapter directory (``adapter_config.json``) or a model directory
    (``config.json``); nothing but headers and adapter tensors is read."""
    path = Path(path)
    if (path / "adapter_config.json").is_file():
        return _describe_adapter(path)
    if (path / "config.json").is_file():
        return _describe_model(path)
    raise FormatError(f"{path}: neither an adapter directory (no adapter_config.json) nor a model "
                      f"directory (no config.json); pass the directory that holds one of them")


# --------------------------------------------------------------------------- counting on meta

def _meta_model(config_json: Path, task: str, num_labels: int | None):
    import torch
    import transformers

    from .io import read_model_config

    data = read_model_config(config_json, required=True)
    model_type = data.pop("model_type", None)
    if not model_type:
        raise ConfigError(f"{config_json}: no 'model_type'; is this a transformers config.json?; pass a transformers config.json to --config")
    try:
        cfg = transformers.AutoConfig.for_model(model_type, **data)
    except ValueError as exc:
        raise ConfigError(f"{config_json}: transformers {transformers.__version__} does not know "
                          f"model_type {model_type!r}; check the spelling in config.json, or use a "
                          f"transformers version that has it") from None
    if num_labels is not None:
        cfg.num_labels = num_labels
    auto = transformers.AutoModelForSequenceClassification if task == "SEQ_CLS" \
        else transformers.AutoModelForCausalLM
    try:
        with torch.device("meta"):
            return auto.from_config(cfg)
    except ValueError as exc:
        raise ConfigError(f"{config_json}: no {task} model class for model_type {model_type!r} ({exc}); "
                          f"pass the other --task") from None


def count_params(config_json: str | Path, method: str, *, r: int = 8, tensor_rank: int = 5,
                 bottleneck: int = 64, task: str | None = None, lora_alpha: float = 16,
                 non_linearity: str = "relu", train_norms: bool = True, shapes: str = "paper",
                 target_modules: list[str] | None = None, num_labels: int | None = None) -> dict[str, Any]:
    """What LoRETTA_``method`` would train on the model ``config_json`` describes.

    ``task`` is "seq-cls" or "causal-lm" (default: seq-cls for encoders, else causal-lm).
    Returns ``trainable_params`` (int), its ``breakdown`` and ``lora_params``: LoRA with
    the same ``r`` on the same modules (its matrices only, no norms or heads).
    """
    from .adapters.config import AdpConfig, RepConfig
    from .adapters.layers import AdapterLinear, RepLinear
    from .adapters.inject import get_loretta_model, trainable_parameters

    if method not in ("rep", "adp"):
        raise ConfigError(f"method must be 'rep' or 'adp', got {method!r}; pass --method rep or --method adp")
    config_json = Path(config_json)
    if config_json.is_dir():
        config_json = config_json / "config.json"
    if task is None:
        from .io import read_model_config

        model_type = read_model_config(config_json, required=True).get("model_type")
        task = "seq-cls" if model_type in ENCODER_TYPES else "causal-lm"
    if task not in TASKS:
        raise ConfigError(f"task must be one of {list(TASKS)}, got {task!r}; pass --task seq-cls or --task causal-lm")
    task_type = TASKS[task]
    model = _meta_model(config_json, task_type, num_labels)
    base_total = sum(p.numel() for p in model.parameters())
    if method == "rep":
        cfg: RepConfig | AdpConfig = RepConfig(r=r, lora_alpha=lora_alpha, tensor_rank=tensor_rank,
                                               target_modules=target_modules, train_norms=train_norms,
                                               shapes=shapes, task_type=task_type)
    else:
        placement = {k: "output" for k in target_modules} if target_modules else None
        cfg = AdpConfig(bottleneck_size=bottleneck, non_linearity=non_linearity, tensor_rank=tensor_rank,
                        placement=placement, train_norms=train_norms, shapes=shapes, task_type=task_type)
    get_loretta_model(model, cfg)
    counts = trainable_parameters(model)
    wrapped = [m for m in model.modules() if isinstance(m, (RepLinear, AdapterLinear))]
    lora = sum(r * (m.in_features + m.out_features) for m in wrapped)
    trainable = counts["total_trainable"]
    return {
        "config": str(config_json), "model_type": model.config.model_type,
        "architecture": type(model).__name__, "task": task, "method": method,
        "settings": {"r": r, "lora_alpha": lora_alpha, "tensor_rank": tensor_rank,
                     "bottleneck": bottleneck, "non_linearity": non_linearity,
                     "train_norms": train_norms, "shapes": shapes},
        "targets": model.loretta_config.target_modules if method == "rep" else model.loretta_config.placement,
        "num_wrapped_modules": len(wrapped),
        "trainable_params": int(trainable),
        "breakdown": {k: int(counts[k]) for k in ("tt_cores", "biases", "norms", "heads")},
        "base_params": int(base_total),
        "trainable_percent": round(100.0 * trainable / max(base_total, 1), 6),
        "lora_r": r, "lora_params": int(lora),
        "lora_over_tt_adapter": round(lora / max(counts["tt_cores"] + counts["biases"], 1), 2),
    }


# --------------------------------------------------------------------------- text output

def format_report(info: dict[str, Any]) -> str:
    """A human-readable table of :func:`describe` / :func:`count_params` output."""
    lines: list[str] = []

    def row(key: str, value: Any) -> None:
        if isinstance(value, int) and not isinstance(value, bool):
            value = f"{value:,}"
        lines.append(f"  {key:<28} {value}")

    if "breakdown" in info and "lora_params" in info:  # count_params
        lines.append(f"LoRETTA_{info['method']} on {info['architecture']} ({info['config']}), task {info['task']}")
        row("targets", info["targets"])
        row("wrapped modules", info["num_wrapped_modules"])
        for k, v in info["breakdown"].items():
            row(f"trainable: {k}", v)
        row("trainable params", info["trainable_params"])
        row("base model params", info["base_params"])
        row("trainable %", f"{info['trainable_percent']:.4f}")
        row(f"LoRA r={info['lora_r']} same modules", info["lora_params"])
        row("LoRA / TT adapter", info["lora_over_tt_adapter"])
    elif info.get("kind") == "adapter":
        kind = "LoRA" if info["method"] == "lora" else f"LoRETTA_{info['method']}"
        lines.append(f"adapter {info['path']}: {kind} ({info['source']} format)")
        for k in ("base_model_name_or_path", "targets", "num_modules", "widths", "tensor_rank"):
            row(k, info[k])
        for k, v in info["breakdown"].items():
            row(f"trainable: {k}", v)
        row("trainable params", info["trainable_params"])
        for k in ("lora_params_same_r", "compression_vs_lora", "dense_adapter_params",
                  "compression_vs_dense_adapter"):
            if k in info:
                row(k, info[k])
        lines.append("  modules:")
        for name, m in info["modules"].items():
            parts = [f"{p}: {m[p]['shape'][0]}x{m[p]['shape'][1]} modes {m[p]['modes']} ranks {m[p]['ranks']}"
                     for p in ("lora_A", "lora_B", "adapter_down", "adapter_up", "weight") if p in m]
            extra = f" [{m['placement']}]" if "placement" in m else ""
            lines.append(f"    {name} ({m['kind']}{extra}): " + "; ".join(parts))
    else:
        lines.append(f"model {info['path']}")
        for k in ("model_type", "architectures", "hidden_size", "num_hidden_layers", "params", "dtypes"):
            row(k, info[k])
        row("shards", len(info["shards"]))
        for s in info["shards"]:
            lines.append(f"    {s['file']}: {s['bytes']:,} bytes, {s['params']:,} params")
        if info["pickled_files_not_opened"]:
            row("pickled files (not opened)", info["pickled_files_not_opened"])
        _quant_rows(info.get("quantization"), row, lines)
    return "\n".join(lines)


def _quant_rows(quant: dict | None, row, lines: list[str]) -> None:
    """The quantized-base part of a model report: format, bits, group size, weights."""
    if not quant:
        return
    if not quant["mergeable"]:
        row("quantized", f"{quant['format']}; cannot be merged")
        lines.append(f"    {quant['reason']}")
        return
    row("quantized", quant["format"])
    for key in ("bits", "group_size", "double_quant", "symmetric", "act_order", "checkpoint_format"):
        if quant.get(key) is not None:
            row(key.replace("_", " "), quant[key])
    weights = quant["quantized_weights"]
    row("quantized weights", len(weights))
    for name in weights:
        lines.append(f"    {name}")
