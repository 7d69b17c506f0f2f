"""Checkpoint I/O: read safetensors checkpoints, write them through ONE writer, publish
output directories atomically and durably, and the model directory around the weights.

| module | owns |
|---|---|
| ``header``    | reading and validating a safetensors header (offsets vs shape x dtype) |
| ``reader``    | :class:`CheckpointReader`: one tensor at a time from a (sharded) checkpoint |
| ``writer``    | THE safetensors writer (:class:`StreamingShardWriter`, :func:`write_safetensors`), alignment, fsync, the one disk-error mapper |
| ``atomic``    | :func:`atomic_output_dir`: temp dir beside OUT, fsync, rename, stale-temp cleanup |
| ``model_dir`` | :func:`read_model_config`, :func:`copy_side_files` (the one side-file policy), :func:`has_tokenizer` |
| ``options``   | :func:`parse_size`, :func:`parse_dtype`, :func:`dtype_name`, :func:`resolve_device` |
"""

from __future__ import annotations

from .atomic import atomic_output_dir, fsync_path, fsync_tree, remove_stale_temps
from .header import DTYPE_BITS, ST_DTYPES, ST_NAMES, read_safetensors_header, validate_header
from .model_dir import (CONFIG_NAME, TOKENIZER_FILES, WEIGHT_SUFFIXES, copy_side_files, has_tokenizer,
                        read_model_config)
from .options import dtype_name, parse_dtype, parse_size, resolve_device
from .reader import INDEX_NAME, SINGLE_NAME, CheckpointReader
from .writer import (DiskFullError, StreamingShardWriter, TensorSlot, layout_file, output_error,
                     write_file, write_safetensors)

__all__ = [
    "CheckpointReader", "StreamingShardWriter", "write_safetensors", "write_file", "atomic_output_dir",
    "read_model_config", "copy_side_files", "has_tokenizer", "TOKENIZER_FILES", "read_safetensors_header", "validate_header",
    "parse_size", "parse_dtype", "dtype_name", "resolve_device", "output_error", "DiskFullError",
    "remove_stale_temps", "fsync_path", "fsync_tree", "layout_file", "TensorSlot",
    "INDEX_NAME", "SINGLE_NAME", "CONFIG_NAME", "WEIGHT_SUFFIXES", "ST_DTYPES", "ST_NAMES", "DTYPE_BITS",
]
