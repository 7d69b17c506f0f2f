"""compressed-tensors (``quant_method: compressed-tensors``): float-quantized (FP8),
int-quantized (INT8) and pack-quantized (W4A16 and other 2-8 bit widths, sym or asym).

Per module: ``weight`` (float8_e4m3fn or int8) or ``weight_packed`` (int32, values stored
as ``q + 2^(b-1)``, value i at bit i*b of a little-endian stream per row) with
``weight_shape``; ``weight_scale`` per tensor ``(1,)``, per channel ``(out, 1)``, per group
``(out, in/g)`` or per block ``(ceil(O/bh), ceil(I/bw))``; asymmetric adds
``weight_zero_point`` (packed along dim 0 in pack-quantized); activation ordering adds
``weight_g_idx``. ``W = (q - zero_point) * scale``. The scheme of each module is found from
its tensors and checked against ``config_groups``.
"""

from __future__ import annotations

import sys

import torch

from .base import (QuantLayout, QuantWeight, TensorView, ceil_div, disagree, expect_group,
                   modules_with, nibble_lookup, unpack_bits)

FMT = "compressed-tensors"
_FORMATS = {"float-quantized", "int-quantized", "naive-quantized", "pack-quantized"}


def _schemes(qconfig: dict) -> list[dict]:
    out = []
    for gname, group in (qconfig.get("config_groups") or {}).items():
        args = (group or {}).get("weights")
        if args:
            fmt = group.get("format") or qconfig.get("format")
            out.append({**args, "format": fmt, "group": gname})
    return out


def _scale_shape(args: dict, out: int, inp: int) -> tuple[int, ...] | None:
    strategy = args.get("strategy")
    if strategy == "tensor":
        return (1,)
    if strategy == "channel":
        return (out, 1)
    if strategy in ("group", "tensor_group"):
        g = int(args.get("group_size") or 0)
        return (out, inp // g) if g > 0 and inp % g == 0 else None
    if strategy == "block":
        bh, bw = (int(b) for b in args.get("block_structure") or (0, 0))
        return (ceil_div(out, bh), ceil_div(inp, bw)) if bh > 0 and bw > 0 else None
    return None


def _weight(view: TensorView, have: set[str], module: str, schemes: list[dict]) -> QuantWeight:
    packed = f"{module}.weight_packed" in have
    parts = {"scale": f"{module}.weight_scale"}
    if parts["scale"] not in have:
        raise disagree(FMT, parts["scale"], f"is missing (the scale of {module}.weight_packed)")
    if packed:
        parts.update(q=f"{module}.weight_packed", shape=f"{module}.weight_shape")
        if parts["shape"] not in have:
            raise disagree(FMT, parts["shape"], "is missing (pack-quantized weights need it)")
        out, inp = (int(x) for x in view.get(parts["shape"]).tolist())
        kind = "int"
    else:
        parts["q"] = f"{module}.weight"
        if parts["q"] not in have or len(view.shape(parts["q"])) != 2:
            raise disagree(FMT, parts["scale"], f"has no 2-D quantized weight {parts['q']} beside it")
        out, inp = view.shape(parts["q"])
        dt = view.dtype(parts["q"])
        kind = "float" if dt.is_floating_point and dt.itemsize == 1 else "int" if dt == torch.int8 else None
        if kind is None:
            raise disagree(FMT, parts["q"], f"is {dt}; a quantized weight is float8 or int8")
    for extra in ("zero_point", "g_idx"):
        if f"{module}.weight_{extra}" in have:
            parts[extra] = f"{module}.weight_{extra}"
    scale = view.shape(parts["scale"])
    tried = []
    for args in schemes:
        bits = int(args.get("num_bits") or 0)
        if args.get("type", "int") != kind or (packed and args.get("format") != "pack-quantized"):
            continue
        if packed and view.shape(parts["q"]) != (out, ceil_div(inp * bits, 32)):
            tried.append(f"{args['group']}: {bits}-bit packs {(out, inp)} into "
                         f"{(out, ceil_div(inp * bits, 32))}, the file has {view.shape(parts['q'])}")
            continue
        if args.get("strategy") == "group":
            expect_group(FMT, parts["q"], inp, int(args.get("group_size") or 0))
        want = _scale_shape(args, out, inp)
        if want is None or tuple(scale) not in (want, (1, 1) if want == (1,) else want):
            tried.append(f"{args['group']}: {args.get('strategy')} scales {want}, the file has {scale}")
            continue
        if not args.get("symmetric", True) and "zero_point" not in parts:
            raise disagree(FMT, f"{module}.weight_zero_point", "is missing, but the scheme is asymmetric")
        return QuantWeight(f"{module}.weight", (out, inp), parts,
                           {"bits": bits, "args": args, "packed": packed})
    raise disagree(FMT, parts["q"], f"fits no weights scheme of config_groups ({'; '.join(tried) or kind})")


def _expand(t: torch.Tensor, args: dict, out: int, inp: int, g_idx: torch.Tensor | None) -> torch.Tensor:
    """A per-tensor/channel/group/block parameter broadcast to (out, inp)."""
    t = t.float()
    if t.numel() == 1:
        return t.reshape(1, 1).expand(out, inp)
    if args.get("strategy") == "block":
        bh, bw = (int(b) for b in args["block_structure"])
        return t.repeat_interleave(bh, 0)[:out].repeat_interleave(bw, 1)[:, :inp]
    if t.shape[1] == 1:
        return t.expand(out, inp)
    if g_idx is not None:
        return t[:, g_idx.to(torch.int64)]
    return t.repeat_interleave(inp // t.shape[1], dim=1)


def _decode(w: QuantWeight, t: dict[str, torch.Tensor]) -> torch.Tensor:
    out, inp = w.shape
    bits, args = w.params["bits"], w.params["args"]
    offset = 1 << (bits - 1)
    if w.params["packed"] and bits == 4 and sys.byteorder == "little" and t["q"].shape[-1] * 8 >= inp:
        # two codes per byte of the little-endian words: one table gather (base.nibble_lookup)
        table = torch.arange(16, dtype=torch.float32) - offset
        q = nibble_lookup(t["q"], table, high_first=False).view(out, -1)[:, :inp].contiguous()
    elif w.params["packed"]:
        q = (unpack_bits(t["q"], bits, inp) - offset).float()
    else:
        q = t["q"].to(torch.float32, copy=True)  # its own copy: scaled in place below
    g_idx = t.get("g_idx")
    scale = t["scale"]
    if (args.get("strategy") == "group" and g_idx is None and scale.ndim == 2
            and scale.shape[1] > 1):  # the usual W4A16 case: broadcast per group
        groups = scale.shape[1]
        q = q.view(out, groups, inp // groups)
        if "zero_point" in t:
            zp = t["zero_point"]
            if w.params["packed"]:
                zp = (unpack_bits(zp.T.contiguous(), bits, out) - offset).T
            q = q - zp.float().unsqueeze(-1)
        return q.mul_(scale.float().unsqueeze(-1)).view(out, inp)  # q is this call's own
    if "zero_point" in t:
        zp = t["zero_point"]
        if w.params["packed"]:  # packed along dim 0: one bit stream per column of groups
            zp = (unpack_bits(zp.T.contiguous(), bits, out) - offset).T
        q = q - _expand(zp, args, out, inp, g_idx)
    return q * _expand(t["scale"], args, out, inp, g_idx)


def detect(qconfig: dict, view: TensorView) -> QuantLayout | None:
    if qconfig.get("quant_method") != FMT:
        return None
    status = qconfig.get("quantization_status")
    if status not in (None, "compressed"):
        raise disagree(FMT, "quantization_config", f"has quantization_status {status!r}; only "
                       f"'compressed' checkpoints store quantized weights that loretta-merge reads")
    schemes = _schemes(qconfig)
    bad = sorted({s["format"] for s in schemes if s["format"] not in _FORMATS}, key=str)
    if bad:
        raise disagree(FMT, "quantization_config", f"uses format {', '.join(map(str, bad))}; "
                       f"loretta-merge reads {', '.join(sorted(_FORMATS))}",
                       "dequantize with compressed-tensors (ModelCompressor.decompress_model) and "
                       "save in bf16, then merge")
    keys = view.keys()
    have = set(keys)
    found = set(modules_with(keys, ".weight_scale")) | set(modules_with(keys, ".weight_packed"))
    modules = [k[:-len(".weight_scale")] for k in keys if k.endswith(".weight_scale")]
    modules += sorted(found - set(modules))  # a packed weight without its scale: refused below
    if not modules:
        raise disagree(FMT, "*.weight_scale", "no tensor of this kind exists, but "
                       "quantization_config says compressed-tensors")
    weights = [_weight(view, have, m, schemes) for m in modules]
    used = {w.params["args"]["group"] for w in weights}
    fmts = sorted({w.params["args"]["format"] for w in weights})
    summary = {"format": f"compressed-tensors {'/'.join(fmts)}",
               "bits": sorted({w.params["bits"] for w in weights}),
               "group_size": sorted({w.params["args"].get("group_size") or w.params["args"].get("strategy")
                                     for w in weights}, key=str),
               "symmetric": sorted({bool(w.params["args"].get("symmetric", True)) for w in weights}),
               "config_groups": sorted(used)}
    for k in ("bits", "group_size", "symmetric"):
        if len(summary[k]) == 1:
            summary[k] = summary[k][0]
    return QuantLayout(FMT, {w.name: w for w in weights}, _decode, summary)
