"""Adapter banks: one ONNX graph whose batch rows each run their own low-rank adapter.

The export side (``export onnx --adapter-bank SIZE``, :mod:`.bank_export`) lays the bank's
*layout* out once, from the adapters given to fill its first slots (``--switchable-adapter``,
in order) or, with none, from the default LoRETTA_rep adapter of the base.
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
                             f"the bank's {want}; load an adapter trained on the bank's base, or re-export the "
                             f"bank with this adapter among --switchable-adapter")
        values[f"{owner}.rows.{leaf}"] = tensor.detach().float().contiguous().numpy()
        values[f"{owner}.rows.{leaf}_on"] = np.ones((), np.float32)
    return values


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

