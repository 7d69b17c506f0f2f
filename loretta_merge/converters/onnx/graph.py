"""Tracing a wrapper into an ONNX file: the dynamo exporter first, TorchScript as fallback."""

from __future__ import annotations

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
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(wrapper, args, dynamo=True, input_names=input_names,
                                        output_names=output_names,
                                        dynamic_shapes=dynamic["shapes"], opset_version=opset,
                                        optimize=True, verbose=False)
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
