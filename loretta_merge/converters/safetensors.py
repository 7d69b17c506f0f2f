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

from ..io import (CheckpointReader, StreamingShardWriter, atomic_output_dir, dtype_name, parse_dtype,
                  parse_size)

_SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")


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
                writer.add(key, reader.get(key).to(dtype_of(key)))
        finally:
            reader.close()
        files = writer.close()
        for p in sorted(model_dir.iterdir()):
            if (p.is_file() and not p.name.startswith(".") and not p.name.endswith(_SKIP_SUFFIXES)
                    and not p.name.endswith(".index.json")):
                data = p.read_bytes()
                if p.name == "config.json" and out_dtype is not None:
                    config = json.loads(data)
                    config["dtype"] = dtype_name(out_dtype)
                    if "torch_dtype" in config:
                        config["torch_dtype"] = dtype_name(out_dtype)
                    data = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
                (tmp / p.name).write_bytes(data)
    return {"base": str(model_dir), "out": str(Path(out_dir)), "tensors": len(reader.keys()),
            "shards": sum(f.endswith(".safetensors") for f in files), "files": files,
            "total_bytes": writer.total_bytes, "largest_shard_bytes": writer.largest_shard_bytes,
            "dtype": dtype_name(out_dtype) if out_dtype else "auto",
            "seconds": round(time.perf_counter() - start, 3)}
