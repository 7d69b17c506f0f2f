"""Exporting an adapter bank: plan the layout, wrap the model, fill the slots, write
``bank.json``, check the graph per slot and on a mixed batch (:mod:`.bank` holds the layout
and the fit of an adapter into a slot, which the serving API shares)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np

from ...errors import ConfigError
from .bank import (BANK_FILE, MAX_BANK_SIZE, NO_ADAPTER, SLOT_INPUT, BankLayout, check_bankable,
                   dense_as_tensors, layout_to_dict, read_bankable, slot_values)
from .reports import BankReport

__all__ = ["NO_ADAPTER", "bank_report", "check_size", "defaults", "inject_bank", "plan_bank",
           "read_all", "validate_bank", "write_bank_file"]


def default_template(model):
    """The default LoRETTA_rep layout of ``model`` (its default targets, r 8, TT rank 5, the
    norms, head and pooler ``train`` trains) as an adapter: only its shapes are used, so it is
    built on the meta device (no memory; a copy of the model where that fails)."""
    import torch

    from ...adapters import get_loretta_model
    from ...adapters.config import RepConfig
    from ...adapters.files import adapter_from_model

    from .bank_layers import row_kind

    try:
        with torch.device("meta"):
            shell = type(model)(model.config)
    except Exception:  # noqa: BLE001 - a model class that cannot be built on meta
        shell = copy.deepcopy(model)
    shell = get_loretta_model(shell, RepConfig(lora_dropout=0.0))
    template = dense_as_tensors(adapter_from_model(shell))
    del shell
    named = dict(model.named_modules())
    # a default layout holds the per-row tensors a bank can switch, and drops the others
    template.tensors = {t: v for t, v in template.tensors.items()
                        if row_kind(named.get(t.rpartition(".")[0])) is not None}
    return template


def check_size(size, filled: int) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_BANK_SIZE:
        raise ConfigError(f"--adapter-bank {size!r} must be a whole number of slots from 1 to "
                          f"{MAX_BANK_SIZE}; pass e.g. --adapter-bank 8")
    if filled > size:
        raise ConfigError(f"the bank is full: {filled} --switchable-adapter for "
                          f"--adapter-bank {size}; give a bank of at least {filled} slots")


def read_all(specs) -> dict[str, object]:
    """Parse ``NAME=DIR`` specs and read every adapter for a bank (before the model load)."""
    from .adapters import parse_specs

    return {name: read_bankable(name, path) for name, path in parse_specs(specs)}


def plan_bank(adapters: dict[str, object], model, size: int, *, layout: str = "tt") -> BankLayout:
    """Check the adapters, lay out the bank, fill slots 0, 1, ... with the adapters in order."""
    from ...adapters.layers import linear_dims
    from .adapters import plan_switchable

    check_size(size, len(adapters))
    for name, adapter in adapters.items():
        check_bankable(name, adapter)
    shapes = adapters or {"default": default_template(model)}
    plan = plan_switchable(shapes, model, layout=layout)
    modules = {}
    for module, branches in plan.branches.items():
        n_in, n_out = linear_dims(model.get_submodule(module))
        modules[module] = {"in": n_in, "out": n_out,
                           "branches": [layout_to_dict(b) for b in branches]}
    tensors = _row_tensors(shapes, model, modules)
    bank = BankLayout(size=size, modules=modules,
                      prefix=getattr(model, "base_model_prefix", "") or "",
                      slots=list(adapters) + [None] * (size - len(adapters)), tensors=tensors)
    bank.switch_plan = plan if adapters else None  # type: ignore[attr-defined]
    return bank


MAX_ROW_ELEMENTS = 1 << 22  # a full tensor switched per row: at most 16 MB per slot in fp32


def _row_tensors(adapters: dict, model, modules: dict) -> dict[str, dict]:
    """owner module -> {"kind", "leaves": {leaf: shape}} for every full tensor the adapters
    train; refuses a tensor no row can switch."""
    from .bank_layers import row_kind

    named = dict(model.named_modules())
    shared: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        shared.setdefault(id(p), []).append(pname)
    params = dict(model.named_parameters(remove_duplicate=False))
    out: dict[str, dict] = {}
    for name, adapter in adapters.items():
        for pname in adapter.tensors:
            owner, _, leaf = pname.rpartition(".")
            module = named.get(owner)
            kind = row_kind(module) if module is not None else None
            why = None
            if kind is None or leaf not in ("weight", "bias"):
                why = (f"a tensor of a {type(module).__name__}; a bank switches the weight and "
                       f"bias of nn.Linear, nn.LayerNorm and Llama-style RMSNorm per row")
            elif owner in modules:
                why = "a tensor of a projection that also holds a low-rank adapter in the bank"
            elif len(shared.get(id(params[pname]), [])) > 1:
                why = f"tied to {', '.join(n for n in shared[id(params[pname])] if n != pname)}"
            elif params[pname].numel() > MAX_ROW_ELEMENTS:
                why = (f"{params[pname].numel():,} values, above the {MAX_ROW_ELEMENTS:,} a bank "
                       f"switches per row")
            if why:
                raise ConfigError(f"adapter {name!r} trains {pname}, {why}; merge the adapter "
                                  f"and serve it on its own, or train it without that tensor")
            spec = out.setdefault(owner, {"kind": kind, "leaves": {}})
            spec["leaves"][leaf] = list(params[pname].shape)
    return out


def inject_bank(model, bank: BankLayout, adapters: dict[str, object]):
    """Wrap the targeted projections, fill the slots; return (bank tensors (graph input
    name, value) in graph order, slot buffer names). The tensors hold at least two slots
    (the exporter makes an axis of size 1 static); :func:`defaults` cuts them to the bank."""
    import torch

    from .bank_layers import BankedLinear, RowParams

    for module in bank.modules:
        parent, _, child = module.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, BankedLinear(owner.get_submodule(child), bank.branches(module),
                                           max(bank.size, 2)))
    for module, spec in bank.tensors.items():
        parent, _, child = module.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, RowParams(owner.get_submodule(child), list(spec["leaves"]),
                                        max(bank.size, 2)))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for slot, name in enumerate(bank.slots):
            if name is None:
                continue
            for pname, value in slot_values(name, adapters[name], bank).items():
                params[pname][slot].copy_(torch.from_numpy(value).to(params[pname].dtype))
    tensors = [(n, params[n]) for n in bank.input_names()]
    slots = tuple(f"{module}.slot" for module in [*bank.modules, *bank.tensors])
    return tensors, slots


def defaults(bank: BankLayout, tensors) -> list:
    """The graph's default bank values: the traced tensors cut to the bank's size."""
    return [(n, t[:bank.size]) for n, t in tensors]


def write_bank_file(out: Path, bank: BankLayout, *, task: str, with_past: bool,
                    inputs: list[str], dtype: str) -> Path:
    from ...io.writer import write_file

    data = {"format_version": 1, "task": task, "with_past": with_past, "dtype": dtype,
            "inputs": inputs, **bank.to_dict()}
    path = out / BANK_FILE
    write_file(path, json.dumps(data, indent=2))
    return path


def bank_report(bank: BankLayout, tensors) -> BankReport:
    nbytes = sum(t[:bank.size].numel() * t.element_size() for _, t in tensors)
    return BankReport(size=bank.size, slots=list(bank.slots), modules=len(bank.modules),
                      tensors=len(tensors), bank_bytes=nbytes, bytes_per_slot=nbytes // bank.size)


def validate_bank(session, model, bank: BankLayout, report, kw: dict, model_dir) -> None:
    """Each filled slot (every row in it) against PyTorch with that adapter merged; then one
    mixed batch (rows: the base, then each filled slot) row by row against each row run alone
    with its adapter merged. Raises NumericsError on a mismatch."""
    import torch

    from ...errors import NumericsError
    from .adapters import merged_into
    from .validate import compare, failure_message, probe_batch, tolerances, validate_onnx
    from .wrappers import PlainWrapper, decoder_dims, past_names

    plan = bank.switch_plan  # type: ignore[attr-defined]
    filled = [(slot, name) for slot, name in enumerate(bank.slots) if name is not None]
    for slot, name in filled:
        with merged_into(model, plan, name) as merged:
            v = validate_onnx(Path(ONNX_PLACEHOLDER), merged, **{**kw, "slot": slot})
        v.adapter = name
        report.slot_validation.append(v)
        if not v.passed:
            raise NumericsError(failure_message(v, model_dir))
    rows = [NO_ADAPTER] + [slot for slot, _ in filled]
    rows = rows * (1 if len(rows) > 2 else 2)
    names = kw["input_names"]
    feed = probe_batch(model.config, names, len(rows), 9, seed=300)
    ort_feed = {n: feed[n].numpy() for n in names}
    ort_feed[SLOT_INPUT] = np.asarray(rows, dtype=np.int64)
    if kw["with_past"]:
        layers, kv, hd = decoder_dims(model.config)
        dtype = np.float16 if next(model.parameters()).dtype == torch.float16 else np.float32
        ort_feed |= {n: np.zeros((len(rows), kv, 0, hd), dtype) for n in past_names(layers)}
    got = np.asarray(session.run(None, ort_feed)[0], dtype=np.float32)
    atol, rtol = tolerances(next(model.parameters()).dtype, kw["atol"], None)
    worst, ok = 0.0, True
    plain = PlainWrapper(model, kw["task"]).eval()
    for i, slot in enumerate(rows):
        one = [feed[n][i:i + 1] for n in names]
        with merged_into(model, plan, bank.slots[slot]) if slot >= 0 else _nothing(), \
                torch.no_grad():
            ref = plain(*one).float().numpy()
        keep = None if kw["task"] == "seq-cls" else feed["attention_mask"][i:i + 1].numpy().astype(bool)
        max_abs, _, passed = compare(got[i:i + 1], ref, keep, atol, rtol)
        worst, ok = max(worst, max_abs), ok and passed
    report.mixed_rows, report.mixed_max_abs_diff, report.mixed_passed = rows, worst, ok
    if not ok:
        raise NumericsError(f"ONNX export of {model_dir} with --adapter-bank failed the mixed-batch "
                            f"check: rows in slots {rows} differ from each row run alone with its "
                            f"adapter merged in PyTorch by up to {worst:.3g} (tolerance "
                            f"atol={atol:g} + rtol={rtol:g}*|torch|); no output was written; "
                            f"report the model architecture")


ONNX_PLACEHOLDER = "model.onnx"  # validate_onnx opens nothing when given a session


def _nothing():
    import contextlib

    return contextlib.nullcontext()
