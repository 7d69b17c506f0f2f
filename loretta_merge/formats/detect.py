"""Which kind an adapter directory is, and :func:`read_adapter`, which reads any kind into
one :class:`Adapter`.

Kinds (detected by ``adapter_config.json`` AND the tensor key names): ``loretta-merge``
(this project's format, :mod:`.ours`), ``loretta-0.1`` (the authors' package,
:mod:`.authors`), ``peft`` (ordinary PEFT LoRA, DoRA magnitudes included, :mod:`.peft`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import FormatError
from .authors import read_authors
from .common import CONFIG_NAME, check_finite, strip_prefix
from .loading import adapter_files, load_weights, read_config, weight_keys
from .ours import fan_in_fan_out_of, read_ours
from .peft import read_peft
from .types import Adapter, RepModule

_AUTHORS_TT = re.compile(r"\.(lora_A|lora_B|adapter_down|adapter_up)\.layer\.tensor\.factors\.\d+$")
_PEFT_LORA = re.compile(r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)(\.weight)?$")


def _kind(config: dict, keys: list[str], source: Path) -> str:
    peft_type = config.get("peft_type")
    if peft_type == "LORETTA_REP":
        return "loretta-merge:rep"
    if peft_type == "LORETTA_ADP":
        return "loretta-merge:adp"
    if peft_type == "BOTTLENECK":
        return "loretta-0.1:adp"
    if peft_type == "LORA":
        if any(_AUTHORS_TT.search(k) for k in keys):
            return "loretta-0.1:rep"
        if any(_PEFT_LORA.search(k) for k in keys):
            return "peft:lora"
        raise FormatError(f"{source}: peft_type LORA but no LoRA tensors (neither PEFT's "
                          f"'...lora_A.weight' nor the authors' '...lora_A.layer.tensor.factors.<k>'); "
                          f"{len(keys)} keys, e.g. {keys[:3]}; re-save the adapter with PEFT's save_pretrained")
    where = source if source.name == CONFIG_NAME else source.parent / CONFIG_NAME
    raise FormatError(f"{where}: unknown peft_type {peft_type!r}; supported: LORETTA_REP, LORETTA_ADP, "
                      f"LORA (PEFT or the authors' loretta 0.1), BOTTLENECK (loretta 0.1 tensorized); pass an adapter of one of these types")


def is_model_dir(path: str | os.PathLike) -> bool:
    """A transformers model directory (``config.json``, no ``adapter_config.json``): a fully
    fine-tuned checkpoint when given where an adapter is expected. Its weights and tensor
    names are checked by the merge (:mod:`loretta_merge.merge.full`)."""
    path = Path(path)
    return (path.is_dir() and not (path / CONFIG_NAME).exists()
            and (path / "config.json").is_file())


def detect_adapter_kind(path: str | os.PathLike, *, allow_symlinks: bool = False) -> str:
    """``"loretta-merge:rep"``, ``"loretta-merge:adp"``, ``"loretta-0.1:rep"``,
    ``"loretta-0.1:adp"`` or ``"peft:lora"``, from the config and tensor names only (the
    safetensors header, or a memory-mapped ``weights_only`` load of a ``.bin``)."""
    path = Path(path)
    config_path, weights_path = adapter_files(path, allow_symlinks)
    config = read_config(config_path)
    if config.get("peft_type") in ("LORETTA_REP", "LORETTA_ADP", "BOTTLENECK"):
        return _kind(config, [], config_path)
    return _kind(config, weight_keys(weights_path), weights_path)



def _read_kind(kind: str, config: dict, state: dict, config_path: Path,
               weights_path: Path) -> tuple[str, dict, dict, set[str]]:
    """``(method, modules, full tensors, fan_in_fan_out modules)`` by the detected kind."""
    source, method = kind.split(":")
    if source == "loretta-merge":
        method, modules, rest = read_ours(config, state, weights_path)
        return method, modules, rest, fan_in_fan_out_of(config, config_path)
    if source == "loretta-0.1":
        method, modules, rest = read_authors(config, state, weights_path, method)
        fifo = {n for n, m in modules.items() if isinstance(m, RepModule)} \
            if config.get("fan_in_fan_out") else set()
        return method, modules, rest, fifo
    method, modules, rest = read_peft(config, state, weights_path)
    return method, modules, rest, set(modules) if config.get("fan_in_fan_out") else set()


def read_adapter(path: str | os.PathLike, *, allow_unsafe_pickle: bool = False,
                 allow_symlinks: bool = False) -> Adapter:
    """Read an adapter directory of any supported kind into an :class:`Adapter`.

    ``allow_unsafe_pickle`` lets a pickled ``adapter_model.bin`` that ``weights_only``
    loading refuses be fully unpickled (runs code from the file: trusted files only).
    ``allow_symlinks`` accepts config/weights symlinks pointing outside the directory.
    """
    path = Path(path)
    config_path, weights_path = adapter_files(path, allow_symlinks)
    config = read_config(config_path)
    state = load_weights(weights_path, allow_unsafe_pickle=allow_unsafe_pickle)
    if not state:
        raise FormatError(f"{weights_path}: holds no tensors; the adapter file is empty: re-save "
                          f"or re-download it")
    kind = _kind(config, list(state), weights_path)
    check_finite(state, weights_path)
    state = strip_prefix(state, weights_path)
    method, modules, rest, fan_in_fan_out = _read_kind(kind, config, state, config_path, weights_path)
    if not modules:
        raise FormatError(f"{weights_path}: no adapter modules found ({len(rest)} plain tensors "
                          f"only); pass an adapter directory")
    base = config.get("base_model_name_or_path")
    return Adapter(method=method, source=kind.split(":")[0], modules=modules, tensors=rest,
                   config=config, fan_in_fan_out=fan_in_fan_out,
                   base_model_name_or_path=base if isinstance(base, str) and base else None, path=path)


def as_adapter(source, *, allow_unsafe_pickle: bool = False) -> Adapter:
    """An :class:`Adapter` as it is, or the adapter directory ``source`` read; anything else
    (a file, a missing path, another type) is refused naming what to pass instead."""
    if isinstance(source, Adapter):
        return source
    if not isinstance(source, (str, os.PathLike)) or not Path(source).is_dir():
        raise FormatError(f"{source}: not a directory; give a PEFT LoRA or LoRETTA_rep adapter "
                          f"directory (adapter_config.json and adapter_model.safetensors)")
    return read_adapter(source, allow_unsafe_pickle=allow_unsafe_pickle)
