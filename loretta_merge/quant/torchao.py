"""torchao (``quant_method: torchao``): int8, intx (int4 unpacked to int8) and float8.

transformers saves a torchao tensor subclass as its plain parts, ``<m>._weight_qdata``,
``<m>._weight_scale`` and (int types) ``<m>._weight_zero_point``, and records per weight
in the safetensors ``__metadata__`` (key ``<m>.weight``) a JSON object with ``_type``
(``Int8Tensor``, ``IntxUnpackedToInt8Tensor``, ``Float8Tensor``) and ``_data.block_size``.
``W = (q - zero_point) * scale``, each scale entry covering one block of ``block_size``.
"""

from __future__ import annotations

import json

import torch

from .base import QuantLayout, QuantWeight, TensorView, disagree, expect_shape

FMT = "torchao"
_SUPPORTED = {"Int8Tensor": 8, "IntxUnpackedToInt8Tensor": None, "Float8Tensor": 8}


def _entries(metadata: dict) -> dict[str, dict]:
    """{logical weight name: parsed metadata} for every torchao tensor subclass."""
    out = {}
    for key, text in metadata.items():
        if not isinstance(text, str) or not text.startswith("{"):
            continue
        try:
            info = json.loads(text)
        except ValueError:
            continue
        if isinstance(info, dict) and info.get("_type") not in (None, "Tensor"):
            out[key] = info
    return out


def _weight(view: TensorView, have: set[str], name: str, info: dict) -> QuantWeight:
    kind = info["_type"]
    if kind not in _SUPPORTED:
        raise disagree(FMT, name, f"is a torchao {kind}, which loretta-merge cannot dequantize "
                       f"(it reads {', '.join(_SUPPORTED)})",
                       "dequantize it with torchao (model.dequantize()) and save in bf16, then merge")
    module = name[:-len(".weight")] if name.endswith(".weight") else name
    roles = info.get("_tensor_data_names") or (["qdata", "scale"] if kind == "Float8Tensor"
                                               else ["qdata", "scale", "zero_point"])
    parts = {r: f"{module}._weight_{r}" for r in roles if r in ("qdata", "scale", "zero_point")}
    for role, key in parts.items():
        if key not in have:
            raise disagree(FMT, key, f"is missing (the {role} of the {kind} weight {name})")
    q = parts["qdata"]
    if len(view.shape(q)) != 2:
        raise disagree(FMT, q, f"has shape {view.shape(q)}; only 2-D Linear weights can be read")
    out, inp = view.shape(q)
    data = info.get("_data") or {}
    block = data.get("block_size") or [1, inp]
    try:
        bh, bw = (int(b) for b in block)
    except (TypeError, ValueError):
        raise disagree(FMT, name, f"has block_size {block!r} in its metadata; expected two integers") from None
    if bh <= 0 or bw <= 0 or out % bh or inp % bw:
        raise disagree(FMT, name, f"block_size {[bh, bw]} does not tile the weight {(out, inp)}")
    grid = (out // bh, inp // bw)
    for role in ("scale", "zero_point"):
        if role in parts:
            expect_shape(FMT, parts[role], view.shape(parts[role]), grid,
                         f"block_size {[bh, bw]} over {(out, inp)}")
    bits = _SUPPORTED[kind] or {"int1": 1, "int2": 2, "int3": 3, "int4": 4, "int5": 5, "int6": 6,
                                "int7": 7, "int8": 8}.get(
        str((data.get("target_dtype") or {}).get("_data", "")), 8)
    return QuantWeight(name, (out, inp), parts, {"block": (bh, bw), "type": kind, "bits": bits})


def _decode(w: QuantWeight, t: dict[str, torch.Tensor]) -> torch.Tensor:
    bh, bw = w.params["block"]
    q = t["qdata"].float()
    if "zero_point" in t:
        zp = t["zero_point"].float().repeat_interleave(bh, 0).repeat_interleave(bw, 1)
        q = q - zp
    return q * t["scale"].float().repeat_interleave(bh, 0).repeat_interleave(bw, 1)


def detect(qconfig: dict, view: TensorView, metadata: dict) -> QuantLayout | None:
    if qconfig.get("quant_method") != FMT:
        return None
    entries = _entries(metadata)
    if not entries:
        raise disagree(FMT, "__metadata__", "the safetensors files carry no torchao tensor "
                       "descriptions, but quantization_config says torchao")
    have = set(view.keys())
    weights = [_weight(view, have, name, info) for name, info in entries.items()]
    order = {k: i for i, k in enumerate(view.keys())}
    weights.sort(key=lambda w: order[w.parts["qdata"]])
    types = sorted({w.params["type"] for w in weights})
    bits = sorted({w.params["bits"] for w in weights})
    widths = sorted({"per-channel" if w.params["block"][1] == w.shape[1] else w.params["block"][1]
                     for w in weights}, key=str)
    summary = {"format": f"torchao {'/'.join(types)}", "bits": bits[0] if len(bits) == 1 else bits,
               "group_size": widths[0] if len(widths) == 1 else widths,
               "config": (qconfig.get("quant_type") or {}).get("default", {}).get("_type")}
    return QuantLayout(FMT, {w.name: w for w in weights}, _decode, summary)
