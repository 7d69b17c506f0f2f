"""Reusable byte buffers for the streaming merge, and reads of base tensors into them.

A fresh buffer per tensor costs a page fault per 4 KiB page on first touch (the kernel
zeroes each page): on a multi-GB checkpoint that is most of the system time of a merge.
The pool hands out buffers that were used before; the pipeline has only a few tensors in
flight (one being read, one being merged, one being written), so a handful of buffers
serve the whole run. For a GPU run the buffers are pinned, so copies to and from the
device are asynchronous DMA.
"""

from __future__ import annotations

import os
import struct
import threading
from pathlib import Path

import torch

from ..errors import FormatError
from ..io import CheckpointReader, read_safetensors_header

_KEEP = 6  # free buffers kept at most (by default; more when fine-tunes are read too)


class BufferPool:
    """Byte buffers of at least ``common_bytes`` (the size most tensors fit in), reused.

    A request above ``common_bytes`` (an embedding, say) gets a buffer of its own that is
    released after use, so a few large tensors do not pin that much memory for the run.
    A buffer given back with a CUDA event is reused only after the event has completed
    (the device has finished reading or writing it).
    """

    def __init__(self, common_bytes: int, *, pin: bool = False, keep: int = _KEEP) -> None:
        self.common_bytes = max(1, int(common_bytes))
        self.pin, self.keep = pin, keep
        self._free: list[tuple[torch.Tensor, object]] = []
        self._lock = threading.Lock()
        self.allocated = 0  # buffers ever allocated (for the benchmark's profile)

    def take(self, nbytes: int) -> torch.Tensor:
        """A uint8 buffer of at least ``nbytes``."""
        if nbytes <= self.common_bytes:
            with self._lock:
                item = self._free.pop() if self._free else None
            if item is not None:
                buf, event = item
                if event is not None:
                    event.synchronize()
                return buf
            nbytes = self.common_bytes
        self.allocated += 1
        return torch.empty(max(1, nbytes), dtype=torch.uint8, pin_memory=self.pin)

    def give(self, buf: torch.Tensor | None, event: object = None) -> None:
        if buf is None or buf.numel() != self.common_bytes:
            return  # an oversized one-off: freed now
        with self._lock:
            if len(self._free) < self.keep:
                self._free.append((buf, event))


def typed_view(buf: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The first bytes of ``buf`` as a contiguous tensor of ``shape`` and ``dtype``."""
    n = 1
    for s in shape:
        n *= int(s)
    nbytes = n * torch.empty((), dtype=dtype).element_size()
    return buf[:nbytes].view(dtype).view(shape)


class BaseReads:
    """Reads base tensors into pool buffers with one positioned read each.

    Works from the reader's public description of the checkpoint (shard of each tensor,
    safetensors headers). A reader of another kind (one that converts what it reads, such
    as a dequantizing reader) is used through its ``get``: its tensors are its own.
    """

    def __init__(self, reader: CheckpointReader, pool: BufferPool) -> None:
        self.reader, self.pool = reader, pool
        self.direct = type(reader) is CheckpointReader
        self._shards: dict[str, tuple[dict, int]] = {}
        self._fd: int | None = None
        self._fd_shard: str | None = None

    def _locate(self, key: str) -> tuple[int, int]:
        shard = self.reader.shard_of(key)
        if shard not in self._shards:
            path = Path(self.reader.model_dir) / shard
            with open(path, "rb") as f:
                data_start = 8 + struct.unpack("<Q", f.read(8))[0]
            self._shards[shard] = (read_safetensors_header(path), data_start)
        header, data_start = self._shards[shard]
        start, end = (int(x) for x in header[key]["data_offsets"])
        if shard != self._fd_shard:
            self.close()
            self._fd = os.open(Path(self.reader.model_dir) / shard, os.O_RDONLY)
            self._fd_shard = shard
        return data_start + start, end - start

    def read(self, key: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the tensor, the pool buffer holding it, or None when it is not pooled)."""
        if not self.direct:
            return self.reader.get(key), None
        offset, nbytes = self._locate(key)
        buf = self.pool.take(nbytes)
        view, done = memoryview(buf.numpy())[:nbytes], 0
        while done < nbytes:  # one read returns at most ~2 GB on Linux
            got = os.preadv(self._fd, [view[done:]], offset + done)
            if got <= 0:
                raise FormatError(f"{self.reader.model_dir / self._fd_shard}: short read of "
                                  f"{key!r} ({done} of {nbytes} bytes); the file changed or is "
                                  f"truncated; re-download it")
            done += got
        return typed_view(buf, self.reader.shape(key), self.reader.dtype(key)), buf

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._fd, self._fd_shard = None, None
