"""Re-shard and/or cast a safetensors checkpoint with the merge's streaming reader/writer.

Used by ``loretta-merge export safetensors``: the same bounded-memory loop as the merge
(one tensor read at a time, shards flushed at a byte budget, atomic output) with no adapter.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from ..errors import NumericsError
from ..io import (CONFIG_NAME, CheckpointReader, StreamingShardWriter, atomic_output_dir,
                  copy_side_files, dtype_name, parse_dtype, parse_size, read_model_config,
                  write_file)


def _cast(key: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor`` in ``dtype``; a finite value that overflows the new dtype is an error."""
    out = tensor.to(dtype)
    if dtype != tensor.dtype and out.is_floating_point() and tensor.is_floating_point():
        overflow = torch.isinf(out) & torch.isfinite(tensor)
        if bool(overflow.any()):
            worst = float(tensor[overflow].abs().max())
            raise NumericsError(f"tensor {key} {tuple(tensor.shape)} has values up to {worst:.4g}, "
                                f"beyond the range of {dtype_name(dtype)}; use --dtype bfloat16 "
                                f"or float32 (nothing was written)")
    return out


def _write_config(model_dir: Path, tmp: Path, out_dtype: torch.dtype) -> None:
    """``config.json`` with the new dtype (copied unchanged by the side-file policy otherwise)."""
    config = read_model_config(model_dir)
    if not config:
        return
    config["dtype"] = dtype_name(out_dtype)
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype_name(out_dtype)
    write_file(tmp / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True) + "\n")


def reshard_checkpoint(model_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                       dtype: str | torch.dtype | None = None, max_shard_bytes: int | str = 5 * 10**9,
                       force: bool = False) -> dict:
    """Copy the checkpoint at ``model_dir`` to ``out_dir`` with shards of at most
    ``max_shard_bytes`` (bytes, or a size such as ``"2GB"``), casting floating tensors to
    ``dtype`` when given. Side files (config, tokenizer, ...) are copied; ``config.json``
    gets the new dtype. Returns a summary dict."""
    start = time.perf_counter()
    out_dtype = parse_dtype(dtype)
    budget = parse_size(max_shard_bytes)
    model_dir = Path(model_dir)
    reader = CheckpointReader(model_dir)

    def dtype_of(key: str) -> torch.dtype:
        d = reader.dtype(key)
        return out_dtype if (out_dtype is not None and d.is_floating_point) else d

    layout = [(k, reader.shape(k), dtype_of(k)) for k in reader.keys()]
    with atomic_output_dir(out_dir, force=force) as tmp:
        writer = StreamingShardWriter(tmp, layout, budget)
        try:
            for key in reader.keys():
                writer.add(key, _cast(key, reader.get(key), dtype_of(key)))
        except BaseException:
            writer.abort()
            raise
        finally:
            reader.close()
        files = writer.close()
        copy_side_files(model_dir, tmp, exclude=(CONFIG_NAME,) if out_dtype else ())
        if out_dtype is not None:
            _write_config(model_dir, tmp, out_dtype)
    return {"base": str(model_dir), "out": str(Path(out_dir)), "tensors": len(reader.keys()),
            "shards": sum(f.endswith(".safetensors") for f in files), "files": files,
            "total_bytes": writer.total_bytes, "largest_shard_bytes": writer.largest_shard_bytes,
            "dtype": dtype_name(out_dtype) if out_dtype else "auto",
            "seconds": round(time.perf_counter() - start, 3)}
