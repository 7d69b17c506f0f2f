"""bitsandbytes: 4-bit NF4/FP4 (with or without double quantization) and LLM.int8.

4-bit: ``<m>.weight`` holds the flattened (out, in) weight as 4-bit codes, two per byte
(element 2i in the high nibble of byte i); ``weight.quant_map`` is the 16-entry codebook
(NF4 or FP4) and ``weight.absmax`` one scale per block of ``blocksize`` elements:
``w[k] = quant_map[code[k]] * absmax[k // blocksize]``. With double quantization
``absmax`` is itself uint8 codes: ``absmax = nested_quant_map[a] * nested_absmax[j //
nested_blocksize] + nested_offset``. A JSON blob ``weight.quant_state.bitsandbytes__<type>``
carries the shape, block sizes and offset.

int8: ``<m>.weight`` int8 with one scale per row ``<m>.SCB``: ``W = q * SCB[:, None] / 127``.
"""

from __future__ import annotations

import json

import torch

from .base import (QuantLayout, QuantWeight, TensorView, ceil_div, disagree, expect_shape,
                   modules_with, nibble_lookup, numel)

FMT = "bitsandbytes"
_STATE = ".weight.quant_state.bitsandbytes__"


def _state_of(view: TensorView, key: str) -> dict:
    try:
        blob = view.get(key).view(torch.uint8).reshape(-1)
        state = json.loads(bytes(blob.tolist()).decode())
        if not isinstance(state, dict):
            raise TypeError("not a JSON object")
        return state
    except (ValueError, TypeError, UnicodeDecodeError) as exc:
        raise disagree(FMT, key, f"is not a bitsandbytes quant_state JSON blob ({exc})") from None


def _four_bit(view: TensorView, keys: set[str], blob_key: str) -> QuantWeight:
    name = blob_key.split(".quant_state.", 1)[0]  # "<m>.weight"
    state = _state_of(view, blob_key)
    qtype = blob_key.rsplit("__", 1)[-1]
    parts = {"packed": name, "absmax": f"{name}.absmax", "quant_map": f"{name}.quant_map",
             "state": blob_key}
    nested = state.get("nested_blocksize") is not None or f"{name}.nested_absmax" in keys
    if nested:
        parts.update(nested_absmax=f"{name}.nested_absmax", nested_quant_map=f"{name}.nested_quant_map")
    for role, key in parts.items():
        if key not in keys:
            raise disagree(FMT, key, f"is missing (the {role} of the {qtype} weight {name})")
    try:
        shape = tuple(int(s) for s in state["shape"])
        block = int(state["blocksize"])
    except (KeyError, TypeError, ValueError) as exc:
        raise disagree(FMT, blob_key, f"lacks {exc} in its quant_state") from None
    if len(shape) != 2 or block <= 0:
        raise disagree(FMT, blob_key, f"declares shape {shape} and blocksize {block}; only "
                                      f"2-D Linear weights with a positive blocksize can be read")
    n = numel(shape)
    stored = numel(view.shape(name)) * view.dtype(name).itemsize
    if stored != ceil_div(n, 2):
        raise disagree(FMT, name, f"holds {stored} bytes, but a {shape} weight at 4 bits "
                                  f"packs into {ceil_div(n, 2)}")
    blocks = ceil_div(n, block)
    expect_shape(FMT, parts["absmax"], (numel(view.shape(parts["absmax"])),), (blocks,),
                 f"blocksize {block} over {n} elements")
    expect_shape(FMT, parts["quant_map"], view.shape(parts["quant_map"]), (16,), "a 4-bit codebook")
    params = {"shape": shape, "blocksize": block, "quant_type": qtype, "double_quant": nested}
    if nested:
        nb = int(state.get("nested_blocksize") or 256)
        expect_shape(FMT, parts["nested_absmax"], (numel(view.shape(parts["nested_absmax"])),),
                     (ceil_div(blocks, nb),), f"nested blocksize {nb} over {blocks} blocks")
        expect_shape(FMT, parts["nested_quant_map"], view.shape(parts["nested_quant_map"]), (256,),
                     "an 8-bit codebook")
        params.update(nested_blocksize=nb, nested_offset=float(state.get("nested_offset", 0.0)))
    return QuantWeight(name, shape, parts, params)


def _decode_4bit(w: QuantWeight, t: dict[str, torch.Tensor]) -> torch.Tensor:
    p = w.params
    n = numel(p["shape"])
    block = p["blocksize"]
    values = nibble_lookup(t["packed"], t["quant_map"].float(), high_first=True)[:n]
    absmax = t["absmax"].reshape(-1)
    if p["double_quant"]:
        outer = t["nested_absmax"].float().reshape(-1)
        idx = torch.arange(absmax.numel()) // p["nested_blocksize"]
        absmax = t["nested_quant_map"].float()[absmax.long()] * outer[idx] + p["nested_offset"]
    if n % block == 0:  # the usual case: one broadcast multiply per block
        return values.view(-1, block).mul_(absmax.float().view(-1, 1)).reshape(p["shape"])
    return (values * absmax.float().repeat_interleave(block)[:n]).reshape(p["shape"])


def _int8(view: TensorView, keys: set[str], module: str) -> QuantWeight:
    name, scb = f"{module}.weight", f"{module}.SCB"
    if name not in keys:
        raise disagree(FMT, scb, f"has no int8 weight {name} beside it")
    if view.dtype(name) != torch.int8 or len(view.shape(name)) != 2:
        raise disagree(FMT, name, f"is {view.dtype(name)} {view.shape(name)}; LLM.int8 stores a "
                                  f"2-D int8 weight")
    out, inp = view.shape(name)
    expect_shape(FMT, scb, view.shape(scb), (out,), f"one scale per row of {name} {(out, inp)}")
    return QuantWeight(name, (out, inp), {"q": name, "scb": scb}, {"shape": (out, inp)})


def _decode_int8(w: QuantWeight, t: dict[str, torch.Tensor]) -> torch.Tensor:
    return t["q"].float() * (t["scb"].float()[:, None] / 127.0)


def detect(qconfig: dict, view: TensorView) -> QuantLayout | None:
    if qconfig.get("quant_method") != FMT:
        return None
    keys = view.keys()
    have = set(keys)
    four = bool(qconfig.get("load_in_4bit") or qconfig.get("_load_in_4bit"))
    eight = bool(qconfig.get("load_in_8bit") or qconfig.get("_load_in_8bit"))
    blobs = [k for k in keys if _STATE in k]
    scbs = modules_with(keys, ".SCB")
    if four:
        if not blobs:
            raise disagree(FMT, "*" + _STATE + "*", "no tensor of this kind exists, but "
                           "quantization_config says load_in_4bit")
        weights = [_four_bit(view, have, b) for b in blobs]
        kind = {w.params["quant_type"] for w in weights}
        dq = any(w.params["double_quant"] for w in weights)
        summary = {"format": f"bitsandbytes {'/'.join(sorted(kind))}", "bits": 4,
                   "group_size": weights[0].params["blocksize"], "double_quant": dq}
        decode = _decode_4bit
    elif eight:
        if not scbs:
            raise disagree(FMT, "*.SCB", "no tensor of this kind exists, but quantization_config "
                                         "says load_in_8bit")
        weights = [_int8(view, have, m) for m in scbs]
        summary = {"format": "bitsandbytes int8", "bits": 8, "group_size": None}
        decode = _decode_int8
    else:
        raise disagree(FMT, "quantization_config", "says neither load_in_4bit nor load_in_8bit")
    hidden = {k for k in keys if k.endswith(".weight_format")}
    return QuantLayout(FMT, {w.name: w for w in weights}, decode, summary, hidden)
