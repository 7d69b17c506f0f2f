"""Switchable adapters: one ONNX base graph, one small ``.onnx_adapter`` file per adapter.

Plan (all checks before any export work): parse ``NAME=DIR`` specs, read each adapter, check
that every module and tensor fits the base, and lay out per targeted module one branch per
distinct shape (see :mod:`.switch_layers`). Then the projections are wrapped in the model,
the branch tensors (and any full tensors the adapters train, e.g. a classifier head) become
graph inputs with default values (zeros; the base's value for full tensors): ONNX Runtime
treats such initializers as overridable, and ``RunOptions.add_active_adapter`` replaces them
with one adapter file's tensors for one ``run``.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ...errors import ConfigError, FormatError, ShapeError
from .reports import ADAPTER_SUFFIX, ADAPTERS_DIR
from .bank_layers import BankedLinear, RowParams
from .switch_layers import BranchLayout, SwitchableLinear, pad_to

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
LAYOUTS = ("tt", "factors")


@dataclass
class SwitchPlan:
    """Adapters by name, and for every targeted module its branch layouts."""

    adapters: dict[str, object]                      # name -> formats.Adapter
    layout: str
    branches: dict[str, list[BranchLayout]] = field(default_factory=dict)
    slot: dict[tuple[str, str], int] = field(default_factory=dict)  # (adapter, module) -> branch
    tensor_names: list[str] = field(default_factory=list)           # full tensors, model names


def parse_specs(specs) -> list[tuple[str, Path]]:
    """``NAME=DIR`` strings (or pairs) -> [(name, dir)]; names must be valid file names."""
    parsed: list[tuple[str, Path]] = []
    for spec in specs:
        if isinstance(spec, str):
            name, sep, path = spec.partition("=")
            if not sep or not path:
                raise ConfigError(f"--switchable-adapter {spec!r} must be NAME=ADAPTER_DIR, "
                                  f"e.g. --switchable-adapter sentiment=./adapter; pass it in that form")
        else:
            name, path = spec
        if not _NAME.match(name) or name in (".", ".."):
            raise ConfigError(f"switchable adapter name {name!r} is not a valid file name; use "
                              f"letters, digits, '.', '_' or '-' (at most 100), e.g. sentiment-v2")
        if name in {n for n, _ in parsed}:
            raise ConfigError(f"switchable adapter name {name!r} is given twice; give each "
                              f"--switchable-adapter a different NAME")
        parsed.append((name, Path(path)))
    return parsed


def read_switchable(name: str, path: Path):
    """Read one adapter and refuse the kinds a graph cannot switch."""
    from ...formats import LoraModule, RepModule, read_adapter

    adapter = read_adapter(path)
    adapter.path = Path(path)
    if adapter.method == "adp":
        raise ConfigError(f"switchable adapter {name!r} ({path}) is a LoRETTA_adp adapter, whose "
                          f"bottleneck is not linear and cannot be switched by overriding "
                          f"weights; export it in its own graph with --adapter {path}")
    for module, mod in adapter.modules.items():
        if not isinstance(mod, (RepModule, LoraModule)):
            raise ConfigError(f"switchable adapter {name!r}: module {module} is a "
                              f"{type(mod).__name__} (it replaces the base weight); merge the "
                              f"adapter (`loretta-merge BASE+{path} -o MERGED`) and export MERGED")
        if isinstance(mod, LoraModule) and mod.magnitude is not None:
            raise ConfigError(f"switchable adapter {name!r}: module {module} is DoRA (it has a "
                              f"magnitude vector), which is not a low-rank sum; merge it first "
                              f"and export the merged model")
    return adapter


def factors_shape(mod) -> tuple[int, int, int]:
    """(in, r, out) of a rep or LoRA module."""
    if hasattr(mod, "magnitude"):  # LoraModule: a (r, in), b (out, r)
        return int(mod.a.shape[1]), int(mod.a.shape[0]), int(mod.b.shape[0])
    return mod.a.rows, mod.a.cols, mod.b.cols


def check_fit(name: str, adapter, model) -> None:
    """Every module and tensor of ``adapter`` exists in ``model`` with matching shapes."""
    from ...adapters.layers import linear_dims

    named, params = dict(model.named_modules()), dict(model.named_parameters())
    for module, mod in adapter.modules.items():
        target = named.get(module)
        if target is None or not hasattr(target, "weight"):
            raise ShapeError(f"switchable adapter {name!r}: module {module} is not a projection "
                             f"of this {type(model).__name__}; is the adapter from another base? "
                             f"Export the base it was trained on")
        n_in, n_out = linear_dims(target)
        got_in, _, got_out = factors_shape(mod)
        if (got_in, got_out) != (n_in, n_out):
            raise ShapeError(f"switchable adapter {name!r}: module {module} maps {got_in} -> "
                             f"{got_out} features, the base's projection {n_in} -> {n_out}; "
                             f"export the base the adapter was trained on")
    for pname, tensor in adapter.tensors.items():
        if pname not in params or tuple(params[pname].shape) != tuple(tensor.shape):
            have = tuple(params[pname].shape) if pname in params else "no such parameter"
            raise ShapeError(f"switchable adapter {name!r}: tensor {pname} has shape "
                             f"{tuple(tensor.shape)}, the base: {have}; export the base the "
                             f"adapter was trained on")


def _layout_of(mod, layout: str) -> tuple[BranchLayout, list[int], list[int], int]:
    n_in, rank, n_out = factors_shape(mod)
    if layout == "tt" and not hasattr(mod, "magnitude"):
        lay = BranchLayout("tt", mod.a.rows, mod.a.cols, mod.b.rows, mod.b.cols,
                           [int(c.shape[1]) for c in mod.a.cores],
                           [int(c.shape[1]) for c in mod.b.cores])
        ranks_a = [1] + [int(c.shape[2]) for c in mod.a.cores]
        ranks_b = [1] + [int(c.shape[2]) for c in mod.b.cores]
        return lay, ranks_a, ranks_b, rank
    return BranchLayout("factors", n_in, rank, rank, n_out), [], [], rank


def read_all(specs, *, layout: str = "tt") -> dict[str, object]:
    """Parse the specs and read every adapter (before the base model is loaded)."""
    if layout not in LAYOUTS:
        raise ConfigError(f"unknown switch layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    return {name: read_switchable(name, path) for name, path in parse_specs(specs)}


def plan_switchable(adapters: dict[str, object], model, *, layout: str = "tt") -> SwitchPlan:
    """Check every adapter against ``model`` and lay out the branches; raises before
    anything is exported."""
    plan = SwitchPlan(adapters={}, layout=layout)
    for name, adapter in adapters.items():
        check_fit(name, adapter, model)
        plan.adapters[name] = adapter
        for module, mod in adapter.modules.items():
            lay, ranks_a, ranks_b, rank = _layout_of(mod, layout)
            branches = plan.branches.setdefault(module, [])
            match = next((i for i, b in enumerate(branches) if b.signature() == lay.signature()),
                         None)
            if match is None:
                branches.append(lay)
                match = len(branches) - 1
            branches[match].widen(ranks_a, ranks_b, rank)
            plan.slot[(name, module)] = match
        plan.tensor_names += [t for t in adapter.tensors if t not in plan.tensor_names]
    return plan


def inject(model, plan: SwitchPlan) -> list[tuple[str, torch.Tensor]]:
    """Wrap the targeted projections; return the switch tensors (graph input name, default)
    in a fixed order: branch tensors, then full tensors under their names after wrapping."""
    params = dict(model.named_parameters())
    full = [params[n] for n in plan.tensor_names]
    for module, layouts in plan.branches.items():
        parent, _, child = module.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, SwitchableLinear(owner.get_submodule(child), layouts))
    switch = [(n, p) for n, p in model.named_parameters() if ".switch." in n]
    renamed = {id(p): n for n, p in model.named_parameters()}
    switch += [(renamed[id(p)], p) for p in full]
    return switch


def adapter_values(name: str, plan: SwitchPlan, model) -> dict[str, np.ndarray]:
    """The tensors of adapter ``name`` under their graph names, padded to the branch shapes."""
    adapter = plan.adapters[name]
    dtype = next(model.parameters()).dtype
    values: dict[str, torch.Tensor] = {}
    for module, mod in adapter.modules.items():
        j = plan.slot[(name, module)]
        lay = plan.branches[module][j]
        prefix = f"{module}.switch.{j}"
        if lay.kind == "tt":
            for which, cores in (("a", mod.a.cores), ("b", mod.b.cores)):
                for k, (core, shape) in enumerate(zip(cores, lay.core_shapes(which))):
                    values[f"{prefix}.lora_{which.upper()}.{k}"] = pad_to(core, shape)
        else:
            a, b = factor_matrices(mod)
            values[f"{prefix}.lora_A"] = pad_to(a, (lay.rows_a, lay.cols_a))
            values[f"{prefix}.lora_B"] = pad_to(b, (lay.rows_b, lay.cols_b))
        values[f"{prefix}.scale"] = torch.tensor([mod.scale])
    names = _current_names(model, plan.tensor_names)
    for pname, tensor in adapter.tensors.items():
        values[names[pname]] = tensor
    return {k: v.detach().to(dtype).contiguous().numpy() for k, v in values.items()}


def factor_matrices(mod) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (in, r), B (r, out)) in fp32: LoRA's transposed factors, or rep's reconstructed TTs."""
    if hasattr(mod, "magnitude"):
        return mod.a.float().T, mod.b.float().T
    return mod.a.matrix(torch.float32), mod.b.matrix(torch.float32)


def _current_names(model, original: list[str]) -> dict[str, str]:
    """Full-tensor names before wrapping -> names after (``x.bias`` -> ``x.base_layer.bias``)."""
    out = {}
    for pname in original:
        module, _, leaf = pname.rpartition(".")
        try:
            owner = model.get_submodule(module) if module else model
        except AttributeError:
            owner = None
        wrapped = isinstance(owner, (SwitchableLinear, BankedLinear, RowParams))
        out[pname] = f"{module}.base_layer.{leaf}" if wrapped else pname
    return out


@contextlib.contextmanager
def merged_into(model, plan: SwitchPlan, name: str):
    """The wrapped model with adapter ``name`` merged into its base weights (fp32 sum, one
    cast), branches left at zero; restored exactly on exit."""
    adapter = plan.adapters[name]
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    names = _current_names(model, plan.tensor_names)
    params = dict(model.named_parameters())
    try:
        with torch.no_grad():
            for module, mod in adapter.modules.items():
                layer = model.get_submodule(module)
                w = layer.base_layer.weight
                saved.append((w, w.detach().clone()))
                delta = mod.delta(torch.float32)  # (in, out)
                conv1d = type(layer.base_layer).__name__ == "Conv1D"
                w.copy_((w.float() + (delta if conv1d else delta.T)).to(w.dtype))
            for pname, tensor in adapter.tensors.items():
                p = params[names[pname]]
                saved.append((p, p.detach().clone()))
                p.copy_(tensor.to(p.dtype))
        yield model
    finally:
        with torch.no_grad():
            for p, old in saved:
                p.copy_(old)


def make_overridable(onnx_path: Path, defaults: list[tuple[str, torch.Tensor]], *,
                     external: bool) -> None:
    """Give every switch input of the graph an initializer of the same name holding its
    default value: ONNX Runtime then treats it as an overridable initializer."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(onnx_path), load_external_data=True)
    inputs = {i.name for i in proto.graph.input}
    for name, tensor in defaults:
        if name not in inputs:
            raise FormatError(f"the exporter dropped the switchable input {name}; the module "
                              f"it belongs to is not used by this model's forward pass: leave "
                              f"that adapter out, or merge it and export the merged model")
        arr = tensor.detach().cpu().contiguous().numpy()
        proto.graph.initializer.append(numpy_helper.from_array(arr, name))
    for p in onnx_path.parent.glob(onnx_path.name + "*"):
        p.unlink()
    onnx.save_model(proto, str(onnx_path), save_as_external_data=external,
                    all_tensors_to_one_file=True, location=onnx_path.name + ".data",
                    size_threshold=1024)


def write_adapter_files(out: Path, plan: SwitchPlan, model) -> dict[str, Path]:
    """``out/adapters/NAME.onnx_adapter`` for every adapter: only its own tensors."""
    import onnxruntime as ort

    folder = out / ADAPTERS_DIR
    folder.mkdir()
    files = {}
    for name in plan.adapters:
        fmt = ort.AdapterFormat()
        fmt.set_adapter_version(1)
        fmt.set_model_version(1)
        # an OrtValue only points at the numpy buffer: keep ``values`` alive until written
        values = adapter_values(name, plan, model)
        fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in values.items()})
        files[name] = folder / f"{name}{ADAPTER_SUFFIX}"
        fmt.export_adapter(str(files[name]))
        del fmt, values
    return files


def run_options_for(path: Path):
    """(RunOptions with the adapter file at ``path`` active, the loaded adapter); keep the
    adapter referenced while the options are in use."""
    import onnxruntime as ort

    adapter = ort.LoraAdapter()
    adapter.Load(str(path))
    options = ort.RunOptions()
    options.add_active_adapter(adapter)
    return options, adapter
