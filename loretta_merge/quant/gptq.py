"""GPTQ (``quant_method: gptq``) and AWQ GEMM (``quant_method: awq``): int32-packed codes
with per-group scales and packed zero points, stored input-major.

GPTQ: ``qweight`` int32 ``(in*b/32, out)`` (value j of a word at bits j*b, inputs along
dim 0), ``qzeros`` int32 ``(groups, out*b/32)``, ``scales`` ``(groups, out)``, ``g_idx``
``(in,)`` (the group of each input; permuted under act-order). Checkpoint format ``gptq``
(v1) stores zero - 1: ``W[o, i] = scales[g[i], o] * (q[i, o] - (qz[g[i], o] + 1))``;
``gptq_v2`` stores the zero itself.

AWQ GEMM: ``qweight`` int32 ``(in, out/8)``, ``qzeros`` ``(groups, out/8)``, ``scales``
``(groups, out)``; logical value j of a word sits in nibble ``[0, 4, 1, 5, 2, 6, 3, 7][j]``.
``W = ((q - z) * s)^T``. AWQ folds activation scales into the preceding norms, so these
weights are those of the AWQ model, not of the original one.
"""

from __future__ import annotations

import torch

from .base import (QuantLayout, QuantWeight, TensorView, ceil_div, disagree, expect_group,
                   expect_shape, modules_with, unpack_bits, unpack_nibbles)

_AWQ_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)


def _parts(have: set[str], fmt: str, module: str, roles: tuple[str, ...]) -> dict[str, str]:
    parts = {r: f"{module}.{r}" for r in roles}
    for role, key in parts.items():
        if key not in have:
            raise disagree(fmt, key, f"is missing (the {role} of {module}.qweight)")
    return parts


def _group(qconfig: dict, fmt: str, key: str, width: int) -> int:
    g = int(qconfig.get("group_size") or -1)
    if g == -1:
        return width
    expect_group(fmt, key, width, g)
    return g


def _gptq_weight(view: TensorView, have: set[str], module: str, qconfig: dict) -> QuantWeight:
    fmt, bits = "GPTQ", int(qconfig.get("bits") or 4)
    parts = _parts(have, fmt, module, ("qweight", "qzeros", "scales"))
    if f"{module}.g_idx" in have:
        parts["g_idx"] = f"{module}.g_idx"
    scales = view.shape(parts["scales"])
    if len(scales) != 2 or len(view.shape(parts["qweight"])) != 2:
        raise disagree(fmt, parts["scales"], f"has shape {scales}; GPTQ stores (groups, out)")
    out = scales[1]
    rows = view.shape(parts["qweight"])[0]
    inp = rows * 32 // bits
    expect_shape(fmt, parts["qweight"], view.shape(parts["qweight"]), (rows, out),
                 f"{bits}-bit packing of {out} outputs")
    group = _group(qconfig, fmt, parts["qweight"], inp)
    expect_shape(fmt, parts["scales"], scales, (inp // group, out),
                 f"bits={bits} (qweight {(rows, out)} holds {inp} inputs) with group size {group}")
    expect_shape(fmt, parts["qzeros"], view.shape(parts["qzeros"]), (inp // group, ceil_div(out * bits, 32)),
                 f"{bits}-bit zeros of {out} outputs")
    if "g_idx" in parts:
        expect_shape(fmt, parts["g_idx"], view.shape(parts["g_idx"]), (inp,), "one group per input")
    v1 = str(qconfig.get("checkpoint_format") or qconfig.get("format") or "gptq") == "gptq"
    return QuantWeight(f"{module}.weight", (out, inp), parts,
                       {"bits": bits, "group": group, "v1": v1})


def _decode_gptq(w: QuantWeight, t: dict[str, torch.Tensor]) -> torch.Tensor:
    out, inp = w.shape
    bits, group = w.params["bits"], w.params["group"]
    q = unpack_bits(t["qweight"].T.contiguous(), bits, inp)  # (out, in)
    zeros = unpack_bits(t["qzeros"], bits, out) + (1 if w.params["v1"] else 0)  # (groups, out)
    g = t["g_idx"].to(torch.int64) if "g_idx" in t else torch.arange(inp) // group
    return t["scales"].float().T[:, g] * (q - zeros.T[:, g]).float()


def _awq_weight(view: TensorView, have: set[str], module: str, qconfig: dict) -> QuantWeight:
    fmt = "AWQ"
    parts = _parts(have, fmt, module, ("qweight", "qzeros", "scales"))
    qw = view.shape(parts["qweight"])
    if len(qw) != 2:
        raise disagree(fmt, parts["qweight"], f"has shape {qw}; AWQ GEMM stores (in, out/8)")
    inp, out = qw[0], qw[1] * 8
    group = _group(qconfig, fmt, parts["qweight"], inp)
    expect_shape(fmt, parts["scales"], view.shape(parts["scales"]), (inp // group, out),
                 f"group size {group} over {inp} inputs and {out} outputs")
    expect_shape(fmt, parts["qzeros"], view.shape(parts["qzeros"]), (inp // group, out // 8),
                 "4-bit zeros packed 8 per int32")
    if f"{module}.g_idx" in have:  # gptqmodel stores one; AWQ has no act-order, so it must be plain
        parts["g_idx"] = f"{module}.g_idx"
        g = view.get(parts["g_idx"]).to(torch.int64)
        if tuple(g.shape) != (inp,) or bool((g != torch.arange(inp) // group).any()):
            raise disagree(fmt, parts["g_idx"], "is not the plain group index i // group_size; AWQ "
                           "GEMM has no activation reordering")
    return QuantWeight(f"{module}.weight", (out, inp), parts, {"bits": 4, "group": group})


def _decode_awq(w: QuantWeight, t: dict[str, torch.Tensor]) -> torch.Tensor:
    group = w.params["group"]
    q = unpack_nibbles(t["qweight"], _AWQ_ORDER)  # (in, out)
    n_in, n_out = q.shape
    z = unpack_nibbles(t["qzeros"], _AWQ_ORDER)  # (groups, out)
    w = (q.view(-1, group, n_out) - z.unsqueeze(1)).float() * t["scales"].float().unsqueeze(1)
    return w.view(n_in, n_out).T


def detect(qconfig: dict, view: TensorView) -> QuantLayout | None:
    method = qconfig.get("quant_method")
    if method not in ("gptq", "awq"):
        return None
    keys = view.keys()
    have = set(keys)
    modules = modules_with(keys, ".qweight")
    fmt = method.upper()
    if not modules:
        raise disagree(fmt, "*.qweight", f"no tensor of this kind exists, but quantization_config "
                                         f"says {method}")
    bits = int(qconfig.get("bits") or 4)
    if method == "gptq":
        if bits not in (2, 4, 8):
            raise disagree(fmt, "quantization_config", f"says bits={bits}; loretta-merge reads "
                           f"GPTQ at 2, 4 or 8 bits", "dequantize with gptqmodel and save in bf16")
        weights = [_gptq_weight(view, have, m, qconfig) for m in modules]
        decode = _decode_gptq
        extra = {"act_order": bool(qconfig.get("desc_act")) or any(
            "g_idx" in w.parts and _permuted(view, w) for w in weights[:1]),
                 "checkpoint_format": "gptq" if weights[0].params["v1"] else "gptq_v2"}
    else:
        version = str(qconfig.get("version") or qconfig.get("format") or "gemm").lower()
        if version != "gemm" or bits != 4:
            raise disagree(fmt, "quantization_config", f"says version {version!r}, bits {bits}; "
                           f"loretta-merge reads AWQ GEMM at 4 bits",
                           "dequantize with gptqmodel or autoawq and save in bf16")
        weights = [_awq_weight(view, have, m, qconfig) for m in modules]
        decode = _decode_awq
        extra = {"version": "gemm"}
    summary = {"format": fmt, "bits": bits, "group_size": int(qconfig.get("group_size") or -1),
               "symmetric": qconfig.get("sym"), **extra}
    return QuantLayout(method, {w.name: w for w in weights}, decode, summary)


def _permuted(view: TensorView, w: QuantWeight) -> bool:
    g = view.get(w.parts["g_idx"]).to(torch.int64)
    return bool((g != torch.arange(g.numel()) // w.params["group"]).any())
