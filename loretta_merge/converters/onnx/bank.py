"""Adapter banks: one ONNX graph whose batch rows each run their own low-rank adapter.

Export side (``export onnx --adapter-bank SIZE``): the bank's *layout* is laid out once,
from the adapters given to fill its first slots (``--switchable-adapter``, in order) or, with
none, from the default LoRETTA_rep layout of the base (its default targets, r 8, TT rank 5).
Per targeted module it holds one branch per distinct shape (:class:`.switch_layers.
BranchLayout`), and every branch tensor gains a leading slot axis (:mod:`.bank_layers`);
full tensors the adapters train (norms, heads, a replaced dense layer as its merged weight)
are switched per row by their owner module (:class:`.bank_layers.RowParams`).
The graph takes one more input, ``adapter_slot`` (int64, one per row; -1 = the base), and
every bank tensor is an input with a default value (the slots filled at export), so a
server passes the whole bank (kilobytes per slot) with each run and changes a slot by
writing into its arrays: no re-export.

Both the exporter and the serving API (:mod:`loretta_merge.serving`) fit an adapter into a
slot with :func:`slot_values`, and both read the layout from ``bank.json``.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ...errors import ConfigError, ShapeError
from .switch_layers import BranchLayout

BANK_FILE = "bank.json"
SLOT_INPUT = "adapter_slot"
NO_ADAPTER = -1
MAX_BANK_SIZE = 4096


@dataclass
class BankLayout:
    """What a bank holds: per module its (in, out) and its branches; the slot names."""

    size: int
    modules: dict[str, dict]                       # module -> {"in", "out", "branches": [...]}
    prefix: str = ""                               # the base model's base_model_prefix
    slots: list[str | None] = field(default_factory=list)   # adapter name per slot, or None
    tensors: dict[str, dict] = field(default_factory=dict)  # owner -> {"kind", "leaves": {leaf: shape}}

    def branches(self, module: str) -> list[BranchLayout]:
        return [layout_from_dict(b) for b in self.modules[module]["branches"]]

    def input_names(self) -> list[str]:
        """Every bank tensor's graph input name, in graph order."""
        names = []
        for module in self.modules:
            for j, lay in enumerate(self.branches(module)):
                names += branch_names(module, j, lay)
        for owner, spec in self.tensors.items():
            for leaf in spec["leaves"]:
                names += [f"{owner}.rows.{leaf}", f"{owner}.rows.{leaf}_on"]
        return names

    def to_dict(self) -> dict:
        return {"size": self.size, "slot_input": SLOT_INPUT, "no_adapter": NO_ADAPTER,
                "prefix": self.prefix, "slots": self.slots, "modules": self.modules,
                "tensors": self.tensors}

    @classmethod
    def from_dict(cls, data: dict) -> "BankLayout":
        return cls(size=int(data["size"]), modules=data["modules"], prefix=data.get("prefix", ""),
                   slots=list(data.get("slots") or [None] * int(data["size"])),
                   tensors=data.get("tensors") or {})


def layout_to_dict(lay: BranchLayout) -> dict:
    return {"kind": lay.kind, "rows_a": lay.rows_a, "cols_a": lay.cols_a, "rows_b": lay.rows_b,
            "cols_b": lay.cols_b, "modes_a": list(lay.modes_a), "modes_b": list(lay.modes_b),
            "ranks_a": list(lay.ranks_a), "ranks_b": list(lay.ranks_b)}


def layout_from_dict(d: dict) -> BranchLayout:
    lay = BranchLayout(d["kind"], d["rows_a"], d["cols_a"], d["rows_b"], d["cols_b"],
                       tuple(d["modes_a"]), tuple(d["modes_b"]))
    lay.ranks_a, lay.ranks_b = list(d["ranks_a"]), list(d["ranks_b"])
    return lay


def branch_names(module: str, j: int, lay: BranchLayout) -> list[str]:
    """The graph input names of branch ``j`` of ``module`` (the parameter names of
    :class:`.bank_layers.BankedLinear` after wrapping)."""
    prefix = f"{module}.bank.{j}"
    if lay.kind == "tt":
        return ([f"{prefix}.lora_A.{k}" for k in range(len(lay.modes_a))]
                + [f"{prefix}.lora_B.{k}" for k in range(len(lay.modes_b))] + [f"{prefix}.scale"])
    return [f"{prefix}.lora_A", f"{prefix}.lora_B", f"{prefix}.scale"]


# --------------------------------------------------------------------------- reading adapters

def check_bankable(name: str, adapter) -> None:
    """Refuse what a bank row cannot hold: adp, DoRA (full tensors are checked against the
    layout: :func:`plan_bank`, :func:`slot_values`)."""
    from ...formats import LoraModule, RepModule, TTDenseModule

    where = f"adapter {name!r} ({adapter.path})"
    if adapter.method == "adp":
        raise ConfigError(f"{where} is LoRETTA_adp, whose bottleneck is not linear in the input, "
                          f"so it cannot be a row of a bank of low-rank adapters; export it in "
                          f"its own graph with --adapter {adapter.path}")
    for module, mod in adapter.modules.items():
        if not isinstance(mod, (RepModule, LoraModule, TTDenseModule)):  # dense: full tensors
            raise ConfigError(f"{where}: module {module} is a {type(mod).__name__}, which a bank "
                              f"row cannot switch; merge the adapter (`loretta-merge "
                              f"BASE+{adapter.path} -o MERGED`) and serve MERGED on its own")
        if isinstance(mod, LoraModule) and mod.magnitude is not None:
            raise ConfigError(f"{where}: module {module} is DoRA (it has a magnitude vector), "
                              f"which is not a low-rank sum; merge it and serve it on its own")


def dense_as_tensors(adapter):
    """A dense layer the adapter replaces by a TT layer (the paper's pooler/classifier dense)
    becomes full tensors ``<module>.weight`` (the TT matrix, transposed) and ``.bias``:
    the value a merge writes, switched per row like a trained head."""
    import dataclasses

    from ...formats import TTDenseModule

    dense = {m: mod for m, mod in adapter.modules.items() if isinstance(mod, TTDenseModule)}
    if not dense:
        return adapter
    tensors = dict(adapter.tensors)
    for module, mod in dense.items():
        tensors[f"{module}.weight"] = mod.weight.matrix().T.contiguous()
        if mod.bias is not None:
            tensors[f"{module}.bias"] = mod.bias
    return dataclasses.replace(adapter, tensors=tensors,
                               modules={m: v for m, v in adapter.modules.items() if m not in dense})


def read_bankable(name: str, path) -> object:
    from ...formats import read_adapter

    adapter = read_adapter(path)
    adapter.path = Path(path)
    check_bankable(name, adapter)
    return dense_as_tensors(adapter)


def align_modules(adapter, layout: BankLayout):
    """The adapter with module names fitted to the bank's (a task model's ``bert.`` prefix
    added or dropped, as :func:`.export.align_names` does against a live model)."""
    import dataclasses

    have = set(layout.modules) | set(layout.tensors)
    lead = layout.prefix + "." if layout.prefix else ""
    names = list(adapter.modules) + [t.rpartition(".")[0] for t in adapter.tensors]
    if not lead or all(m in have for m in names):
        return adapter
    if all(m.startswith(lead) and m[len(lead):] in have for m in names):
        rename = lambda n: n[len(lead):]  # noqa: E731
    elif all(lead + m in have for m in names):
        rename = lambda n: lead + n  # noqa: E731
    else:
        return adapter  # the fit check names what does not fit
    return dataclasses.replace(adapter, modules={rename(m): v for m, v in adapter.modules.items()},
                               tensors={rename(t): v for t, v in adapter.tensors.items()})


# --------------------------------------------------------------------------- fitting a slot

def _describe(mod) -> str:
    if hasattr(mod, "magnitude"):
        return f"LoRA A {tuple(mod.a.shape[::-1])} B {tuple(mod.b.shape[::-1])} (rank {mod.a.shape[0]})"
    ra = [1] + [int(c.shape[2]) for c in mod.a.cores]
    rb = [1] + [int(c.shape[2]) for c in mod.b.cores]
    return (f"rep A ({mod.a.rows}, {mod.a.cols}) modes {[int(c.shape[1]) for c in mod.a.cores]} "
            f"TT ranks {ra}, B ({mod.b.rows}, {mod.b.cols}) modes "
            f"{[int(c.shape[1]) for c in mod.b.cores]} TT ranks {rb}")


def _describe_branch(lay: BranchLayout) -> str:
    if lay.kind == "tt":
        return (f"rep A ({lay.rows_a}, {lay.cols_a}) modes {list(lay.modes_a)} TT ranks <= "
                f"{lay.ranks_a}, B ({lay.rows_b}, {lay.cols_b}) modes {list(lay.modes_b)} TT "
                f"ranks <= {lay.ranks_b}")
    return f"factors A ({lay.rows_a}, <= {lay.cols_a}) B (<= {lay.rows_b}, {lay.cols_b})"


def _fits_tt(mod, lay: BranchLayout) -> bool:
    if lay.kind != "tt" or hasattr(mod, "magnitude"):
        return False
    modes_a = tuple(int(c.shape[1]) for c in mod.a.cores)
    modes_b = tuple(int(c.shape[1]) for c in mod.b.cores)
    if (mod.a.rows, mod.a.cols, modes_a, mod.b.rows, mod.b.cols, modes_b) != (
            lay.rows_a, lay.cols_a, lay.modes_a, lay.rows_b, lay.cols_b, lay.modes_b):
        return False
    return all(all(x <= y for x, y in zip(c.shape, s))
               for cores, which in ((mod.a.cores, "a"), (mod.b.cores, "b"))
               for c, s in zip(cores, lay.core_shapes(which)))


def _fits_factors(mod, lay: BranchLayout, n_in: int, n_out: int, rank: int) -> bool:
    return lay.kind == "factors" and (lay.rows_a, lay.cols_b) == (n_in, n_out) and rank <= lay.cols_a


def slot_values(name: str, adapter, layout: BankLayout) -> dict[str, np.ndarray]:
    """One slot's values of every bank tensor ``adapter`` uses (float32, zero-padded to the
    branch shapes), by graph input name. Raises ShapeError naming the module and both shapes
    when a module does not fit any branch of the bank."""
    import torch

    from .adapters import factor_matrices, factors_shape
    from .switch_layers import pad_to

    adapter = align_modules(adapter, layout)
    values: dict[str, np.ndarray] = {}
    for module, mod in adapter.modules.items():
        if module not in layout.modules:
            raise ShapeError(f"adapter {name!r}: module {module} is not in this bank (its "
                             f"modules: {', '.join(list(layout.modules)[:4])}"
                             f"{', ...' if len(layout.modules) > 4 else ''}); export a bank "
                             f"laid out with an adapter that targets it (--switchable-adapter)")
        n_in, rank, n_out = factors_shape(mod)
        spec = layout.modules[module]
        branches = layout.branches(module)
        j = next((i for i, lay in enumerate(branches) if _fits_tt(mod, lay)), None)
        if j is None:
            j = next((i for i, lay in enumerate(branches)
                      if _fits_factors(mod, lay, n_in, n_out, rank)), None)
        if j is None:
            have = "; ".join(_describe_branch(b) for b in branches)
            raise ShapeError(f"adapter {name!r}: module {module} ({spec['in']} -> {spec['out']}) "
                             f"is {_describe(mod)}, which fits none of the bank's layouts for it "
                             f"({have}); export a bank laid out with an adapter of this shape "
                             f"(--switchable-adapter)")
        lay, names = branches[j], branch_names(module, j, branches[j])
        if lay.kind == "tt":
            cores = list(mod.a.cores) + list(mod.b.cores)
            shapes = lay.core_shapes("a") + lay.core_shapes("b")
            tensors = [pad_to(c.float(), s) for c, s in zip(cores, shapes)]
        else:
            a, b = factor_matrices(mod)
            tensors = [pad_to(a, (lay.rows_a, lay.cols_a)), pad_to(b, (lay.rows_b, lay.cols_b))]
        tensors.append(torch.tensor(float(mod.scale)))
        for n, t in zip(names, tensors):
            values[n] = t.detach().float().contiguous().numpy()
    for pname, tensor in adapter.tensors.items():
        owner, _, leaf = pname.rpartition(".")
        spec = layout.tensors.get(owner)
        if spec is None or leaf not in spec["leaves"]:
            held = ", ".join(f"{o}.{lf}" for o, sp in list(layout.tensors.items())[:3]
                             for lf in sp["leaves"]) or "none"
            raise ShapeError(f"adapter {name!r} trains the full tensor {pname}, which this bank "
                             f"does not switch per row (it switches: {held}"
                             f"{', ...' if len(layout.tensors) > 3 else ''}); export a bank laid "
                             f"out with an adapter that trains it (--switchable-adapter)")
        want = tuple(spec["leaves"][leaf])
        if tuple(tensor.shape) != want:
            raise ShapeError(f"adapter {name!r}: tensor {pname} has shape {tuple(tensor.shape)}, "
                             f"the bank's {want}; is the adapter from another base?")
        values[f"{owner}.rows.{leaf}"] = tensor.detach().float().contiguous().numpy()
        values[f"{owner}.rows.{leaf}_on"] = np.ones((), np.float32)
    return values


# --------------------------------------------------------------------------- export side

def default_template(model):
    """The default LoRETTA_rep layout of ``model`` (its default targets, r 8, TT rank 5) as
    an adapter of a freshly initialised copy: only its shapes are used."""
    from ...adapters import get_loretta_model
    from ...adapters.config import RepConfig
    from ...adapters.files import adapter_from_model

    from .bank_layers import row_kind

    shell = get_loretta_model(copy.deepcopy(model), RepConfig(lora_dropout=0.0))
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
                          f"{MAX_BANK_SIZE}, e.g. --adapter-bank 8")
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


def read_bank_file(folder: Path) -> tuple[dict, BankLayout]:
    from ...errors import FormatError

    path = Path(folder) / BANK_FILE
    if not path.is_file():
        raise FormatError(f"{folder} has no {BANK_FILE}: it is not an adapter-bank export; "
                          f"export one with `loretta-merge export onnx BASE -o OUT "
                          f"--adapter-bank SIZE`")
    try:
        data = json.loads(path.read_text())
        return data, BankLayout.from_dict(data)
    except (ValueError, KeyError, TypeError) as exc:
        raise FormatError(f"{path} is not a valid bank description ({exc}); export the bank "
                          f"again") from exc


def bank_report(bank: BankLayout, tensors) -> "BankReport":
    from .reports import BankReport

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
