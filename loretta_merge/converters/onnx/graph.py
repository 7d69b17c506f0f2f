"""Tracing a wrapper into an ONNX file: the dynamo exporter first, TorchScript as fallback."""

from __future__ import annotations

import contextlib
import inspect
import logging
import warnings
from pathlib import Path

from ...errors import FormatError


def export_graph(wrapper, args: tuple, *, input_names, output_names, dynamic, opset,
                 path: Path, external_data: bool) -> tuple[str, str | None]:
    """Export ``wrapper`` to ``path``; the dynamo exporter first, TorchScript as fallback.
    Returns (exporter used, reason for the fallback or None)."""
    import torch

    # the exporter logs a warning per torchvision op it cannot register: not our business
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), shared_op_registry():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(wrapper, args, dynamo=True, input_names=input_names,
                                        output_names=output_names,
                                        dynamic_shapes=dynamic["shapes"], opset_version=opset,
                                        optimize=False, verbose=False)
            optimize(program)
            program.save(str(path), external_data=external_data)
        return "dynamo", None
    except Exception as exc:  # noqa: BLE001 - any exporter failure -> try the other one
        note = f"dynamo exporter failed ({type(exc).__name__}: {str(exc).splitlines()[0][:300]})"
    for p in path.parent.iterdir():  # drop anything the failed attempt left behind
        if p.is_file():
            p.unlink()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapper, args, str(path), dynamo=False, input_names=input_names,
                              output_names=output_names, dynamic_axes=dynamic["axes"],
                              opset_version=opset or 17, do_constant_folding=True)
    except Exception as exc:  # noqa: BLE001
        raise FormatError(f"ONNX export failed with both exporters: {note}; TorchScript "
                          f"exporter: {type(exc).__name__}: {str(exc)[:300]}; this model's "
                          f"architecture cannot be exported yet: report it, or export the "
                          f"merged model with another --task/--opset") from exc
    if external_data:  # TorchScript writes one file per tensor: gather them into one
        to_single_data_file(path)
    return "torchscript", note


# Rewrite rules of onnxscript's default optimizer that this exporter leaves out. SlicesSplit
# (two Slices of one tensor -> one Split) matches pairs of Slice nodes: its time grows with
# the square of their number, and an adapter bank's graph has a few per adapted module and
# slot. On a tiny Llama bank it was 40% of the optimizer's time at 2 layers and most of its
# 58 s at 8 (benchmarks/bench_onnx_optimize.py); on every graph it measures, and on the test
# suite's, the optimizer's output is the same without it.
SKIPPED_REWRITE_RULES = ("SlicesSplit",)


def optimize(program) -> None:
    """The exporter's own optimization of ``program`` (constant folding, rewrite rules,
    dead-code removal, fusions), without :data:`SKIPPED_REWRITE_RULES`."""
    with skipped_rewrite_rules():
        program.optimize()


@contextlib.contextmanager
def skipped_rewrite_rules(skipped: tuple[str, ...] = SKIPPED_REWRITE_RULES):
    """Within the block, onnxscript's default optimizer runs without the ``skipped`` rules.
    Where onnxscript no longer keeps its default rules where this looks for them, its
    optimizer runs as it is."""
    from onnxscript import rewriter

    rules = getattr(rewriter, "_DEFAULT_REWRITE_RULES", None)
    if not isinstance(rules, tuple):
        yield
        return
    # the optimizer reads the tuple when it runs; it is restored on the way out
    rewriter._DEFAULT_REWRITE_RULES = tuple(r for r in rules
                                            if getattr(r, "name", None) not in skipped)
    try:
        yield
    finally:
        rewriter._DEFAULT_REWRITE_RULES = rules


# The dynamo exporter builds its table of ONNX implementations of ATen ops (onnxscript's
# torchlib: every function's signature re-read from its Python source) on every call: 0.41 s
# of a tiny model's ~3 s export, measured on a warm process. Once built it is only read
# (custom translation tables, which would add to it, are not used here), so the exports of
# one process share one table per opset version. What a table holds depends on which of
# torchlib's ops torch has loaded when it is built: importing torch.ao's quantization, for
# one, adds the quantized_decomposed ops. So each table is kept with the op names torch had
# then, and is rebuilt when torch has since loaded an op that torchlib implements. The check
# is 3 ms; torchlib's op names (0.3 s to list) are read only when torch's ops have changed,
# as they do during a process's first export (inductor's prims, none of them in torchlib).
_SHARED_REGISTRIES: dict = {}
_TORCHLIB_NAMES: list = []  # filled once, when first needed


def _registered_ops() -> frozenset:
    import torch

    return frozenset(torch._C._dispatch_get_all_op_names())


def _still_current(built_under: frozenset, ops: frozenset) -> bool:
    """Whether a table built when torch had the ops ``built_under`` is what one built with
    ``ops`` would be: the same of torchlib's ops are there."""
    if built_under == ops:
        return True
    if not _TORCHLIB_NAMES:
        from torch.onnx._internal.exporter import _registration

        _TORCHLIB_NAMES.append(frozenset(
            m.qualified_name for m in _registration.onnxscript_apis.get_torchlib_ops()))
    names = _TORCHLIB_NAMES[0]
    return built_under & names == ops & names


@contextlib.contextmanager
def shared_op_registry():
    """Within the block, ``torch.onnx``'s ``ONNXRegistry.from_torchlib`` builds its table once
    per process and opset version (again when torch has loaded more of torchlib's ops since)
    and hands out that one. Where torch no longer has the registry where this looks for it,
    the exporter runs as it is."""
    try:
        from torch.onnx._internal.exporter import _registration
        registry_cls = _registration.ONNXRegistry
    except (ImportError, AttributeError):
        yield
        return
    original = registry_cls.__dict__.get("from_torchlib")
    if not isinstance(original, classmethod) or getattr(original.__func__, "shared", False):
        yield  # not where this looks for it, or an enclosing block already shares it
        return

    signature = inspect.signature(original.__func__)

    def from_torchlib(cls, *args, **kwargs):
        bound = signature.bind(cls, *args, **kwargs)  # opset_version=23 and (23,): one key
        bound.apply_defaults()
        key = (cls, *list(bound.arguments.items())[1:])
        ops = _registered_ops()
        built_under, table = _SHARED_REGISTRIES.get(key, (None, None))
        if table is None or not _still_current(built_under, ops):
            table = original.__func__(cls, *args, **kwargs)
        _SHARED_REGISTRIES[key] = (ops, table)
        return table

    from_torchlib.shared = True
    registry_cls.from_torchlib = classmethod(from_torchlib)
    try:
        yield
    finally:
        registry_cls.from_torchlib = original


def to_single_data_file(path: Path) -> None:
    """Rewrite ``path`` so that all its large tensors live in one ``<name>.data`` file."""
    import onnx

    before = set(path.parent.iterdir())
    model = onnx.load(str(path), load_external_data=True)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)
    for p in before - {path}:
        if p.is_file() and p.name != path.name + ".data":
            p.unlink()


def check_and_opset(path: Path) -> int:
    """Run the ONNX checker on ``path``; return the default-domain opset it uses."""
    import onnx

    onnx.checker.check_model(str(path))
    proto = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
