"""Adapter directories of every supported kind, read into ONE in-memory form: :class:`Adapter`.

| module | owns |
|---|---|
| ``types``   | :class:`Adapter`, :class:`TTMatrix`, :class:`RepModule`, :class:`LoraModule`, :class:`AdpModule`, :class:`TTDenseModule` |
| ``common``  | file and key names (``PREFIX`` once), ``parse_config``, ``rank_for``/``scale_for`` (PEFT's pattern rule via :mod:`loretta_merge.patterns`), tensor and core checks |
| ``loading`` | safe file access: symlinks, safetensors, ``weights_only`` pickles (full unpickling only with ``allow_unsafe_pickle``) |
| ``ours``    | this project's format (``format_version`` 1): reader and writer (:func:`write_adapter`) |
| ``authors`` | the authors' ``loretta`` 0.1 format: reader only |
| ``peft``    | PEFT LoRA: reader, the one PEFT config builder, writer (:func:`write_peft_lora`) |
| ``detect``  | kind detection, :func:`read_adapter`, :func:`is_model_dir` (a fine-tuned model, not an adapter) |

Every file goes to disk through :mod:`loretta_merge.io`'s one writer, atomically.
"""

from __future__ import annotations

from ..errors import LorettaError
from .common import (BIN_NAME, CONFIG_NAME, FORMAT_VERSION, NON_LINEARITIES, PREFIX, SAFETENSORS_NAME,
                     parse_config, rank_for, scale_for)
from .detect import as_adapter, detect_adapter_kind, is_model_dir, read_adapter
from .ours import write_adapter
from .peft import peft_lora_config, write_peft_lora
from .types import Adapter, AdpModule, LoraModule, Module, RepModule, TTDenseModule, TTMatrix

__all__ = ["TTMatrix", "RepModule", "LoraModule", "AdpModule", "TTDenseModule", "Adapter", "Module",
           "read_adapter", "as_adapter", "write_adapter", "write_peft_lora", "peft_lora_config",
           "detect_adapter_kind", "is_model_dir",
           "scale_for", "rank_for", "parse_config", "LorettaError", "PREFIX", "CONFIG_NAME",
           "SAFETENSORS_NAME", "BIN_NAME", "FORMAT_VERSION", "NON_LINEARITIES"]
