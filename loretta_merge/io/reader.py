"""Read a (sharded) safetensors checkpoint one tensor at a time.

:class:`CheckpointReader` reads and checks every shard's header up front (so shapes and
dtypes need no data), keeps one shard open at a time and reads each tensor with positioned
reads into a fresh CPU tensor (no memory map, whose touched pages would stay resident and
count against a streaming merge's memory bound).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import FormatError
from .header import ST_DTYPES, header_length, read_safetensors_header

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def _check_dir(d: Path) -> None:
    if not d.exists():
        raise FormatError(f"base checkpoint {d} does not exist; pass a local model directory")
    if not d.is_dir():
        raise FormatError(f"base checkpoint {d} is a file; pass the model directory that "
                          f"holds config.json and the *.safetensors files")


def _read_index(index: Path) -> tuple[dict[str, str], dict]:
    """``(weight_map, metadata)`` of a ``model.safetensors.index.json``."""
    try:
        data = json.loads(index.read_text())
        weight_map = data["weight_map"]
        metadata = dict(data.get("metadata") or {})
        if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) and v for k, v in weight_map.items()):
            raise TypeError("'weight_map' must map tensor names to shard file names")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise FormatError(f"{index}: not a valid safetensors index ({exc}); it needs a "
                          f"'weight_map' of tensor name -> shard file: re-save the model "
                          f"with save_pretrained or fix the index") from exc
    return weight_map, metadata


def _no_safetensors(d: Path) -> FormatError:
    pickled = [p.name for p in d.glob("*.bin")] + [p.name for p in d.glob("*.pt*")]
    if pickled:
        return FormatError(
            f"{d} holds only pickled weights ({', '.join(sorted(pickled)[:3])}); "
            f"loretta-merge reads safetensors only, because unpickling can run code. "
            f"Convert it once from a trusted copy: python -c \"import transformers as t; "
            f"t.AutoModel.from_pretrained('{d}').save_pretrained('{d}-st')\"")
    return FormatError(f"{d} has neither {INDEX_NAME} nor {SINGLE_NAME}; pass a "
                       f"transformers model directory (save_pretrained output with "
                       f"config.json and *.safetensors)")


def _shard_path(d: Path, index: Path, shard: str) -> Path:
    """The shard's resolved path, refused when it leaves ``d`` or is missing."""
    if "\x00" in shard:
        raise FormatError(f"{index}: shard name {shard!r} is not a file name; re-save the "
                          f"model with save_pretrained or fix the index")
    path = (d / shard).resolve()
    if Path(shard).is_absolute() or ".." in Path(shard).parts or d.resolve() not in path.parents:
        raise FormatError(f"{index}: shard name {shard!r} points outside {d} (a path or a "
                          f"symlink leaving the directory); copy the shard into {d} and "
                          f"fix the index")
    if not path.is_file():
        raise FormatError(f"{index} lists shard {shard}, which is missing from {d}; "
                          f"the checkpoint is incomplete: re-download the missing file")
    return path


class CheckpointReader:
    """A transformers checkpoint directory in safetensors form, sharded (with
    ``model.safetensors.index.json``) or single (``model.safetensors``).

    Every shard's header is read and checked when the reader is made, so ``keys()``,
    ``shape()`` and ``dtype()`` need no tensor data. ``get(key)`` reads one tensor from its
    shard (one shard file open at a time) into a new CPU tensor.
    """

    def __init__(self, model_dir: str | os.PathLike) -> None:
        self.model_dir = d = Path(model_dir)
        _check_dir(d)
        index = d / INDEX_NAME
        self.metadata: dict = {}
        if index.is_file():
            weight_map, self.metadata = _read_index(index)
            shards = sorted(set(weight_map.values()))
        elif (d / SINGLE_NAME).is_file():
            weight_map, shards = None, [SINGLE_NAME]
        else:
            raise _no_safetensors(d)
        self._headers: dict[str, dict] = {}
        self._header_len: dict[str, int] = {}
        self._paths: dict[str, Path] = {}  # resolved, checked to lie inside the directory
        for shard in shards:
            self._load_shard(index, shard, listed=weight_map is not None)
        if weight_map is None:
            header = self._headers[SINGLE_NAME]
            self.metadata = dict(header.get("__metadata__") or {})
            weight_map = {k: SINGLE_NAME for k in header if k != "__metadata__"}
        else:
            for key, shard in weight_map.items():
                if key not in self._headers[shard]:
                    raise FormatError(f"{index} maps {key!r} to {shard}, but that shard has no "
                                      f"such tensor; the index and shards do not belong together: "
                                      f"re-download the checkpoint or fix the index")
        # checkpoint order: shard by shard, tensors by file offset (sequential reads)
        order = sorted(weight_map, key=lambda k: (weight_map[k],
                                                  self._headers[weight_map[k]][k]["data_offsets"][0]))
        self._weight_map = {k: weight_map[k] for k in order}
        self._open_name: str | None = None
        self._open = None

    def _load_shard(self, index: Path, shard: str, *, listed: bool) -> None:
        path = _shard_path(self.model_dir, index, shard)
        try:
            header = read_safetensors_header(path)
        except FormatError as exc:
            where = f" (listed in {index.name})" if listed else ""
            raise FormatError(f"shard {shard}{where}: {exc}") from exc
        self._headers[shard] = header
        self._paths[shard] = path
        self._header_len[shard] = header_length(path)

    def keys(self) -> list[str]:
        return list(self._weight_map)

    def __contains__(self, key: str) -> bool:
        return key in self._weight_map

    def shard_of(self, key: str) -> str:
        return self._weight_map[key]

    def _info(self, key: str) -> dict:
        if key not in self._weight_map:
            raise KeyError(f"{self.model_dir} has no tensor {key!r}")
        return self._headers[self._weight_map[key]][key]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(int(x) for x in self._info(key)["shape"])

    def dtype(self, key: str) -> torch.dtype:
        name = self._info(key)["dtype"]
        if name not in ST_DTYPES:
            raise FormatError(f"{self.model_dir}: tensor {key!r} has dtype {name}, which this "
                              f"torch build cannot hold; upgrade torch or re-save the checkpoint "
                              f"in bfloat16/float16/float32")
        return ST_DTYPES[name]

    def nbytes(self, key: str) -> int:
        start, end = self._info(key)["data_offsets"]
        return int(end) - int(start)

    def total_bytes(self) -> int:
        return sum(self.nbytes(k) for k in self._weight_map)

    def _span(self, key: str) -> tuple[str, int, int]:
        """``(shard, file offset, byte count)`` of ``key``'s data."""
        shard = self._weight_map.get(key)
        if shard is None:
            raise KeyError(f"{self.model_dir} has no tensor {key!r}")
        start, end = (int(x) for x in self._headers[shard][key]["data_offsets"])
        return shard, 8 + self._header_len[shard] + start, end - start

    def _read(self, key: str, shard: str, fd: int, offset: int, view: memoryview, done: int,
              total: int) -> int:
        """One positioned read into ``view`` (a read returns at most ~2 GB on Linux)."""
        got = os.preadv(fd, [view], offset + done)
        if got <= 0:
            raise FormatError(f"{self.model_dir / shard}: short read of {key!r} "
                              f"({done} of {total} bytes); the file changed or is "
                              f"truncated: re-download or re-save it")
        return got

    def get(self, key: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor ``key`` as a new CPU tensor. Reads its bytes with positioned reads
        (no memory map: mapped pages would stay resident and count against the merge's
        memory bound until the shard is closed). ``out``: a contiguous uint8 CPU tensor of
        at least ``nbytes(key)`` bytes to read into instead (a reused buffer: no fresh pages
        to fault in); the result is a view of it."""
        shard, offset, total = self._span(key)
        if out is not None and (out.dtype != torch.uint8 or not out.is_contiguous()
                                or out.device.type != "cpu" or out.numel() < total):
            raise ValueError(f"get({key!r}, out=...): out must be a contiguous uint8 CPU tensor "
                             f"of at least {total} bytes, got {out.dtype} {tuple(out.shape)}")
        if shard != self._open_name:  # the shard's file stays open until another is read
            self.close()
            self._open = open(self._paths[shard], "rb")  # noqa: SIM115 - closed in close()
            self._open_name = shard
        buf = torch.empty(total, dtype=torch.uint8) if out is None else out[:total]
        view, done = memoryview(buf.numpy()), 0
        while done < total:
            done += self._read(key, shard, self._open.fileno(), offset, view[done:], done, total)
        return buf.view(self.dtype(key)).reshape(self.shape(key))

    def iter_bytes(self, key: str, chunk: int = 16 * 2**20):
        """The stored bytes of ``key`` in pieces of at most ``chunk`` bytes, read into one
        reused buffer (each piece is valid until the next is read): compare or hash a big
        tensor without holding it."""
        shard, offset, total = self._span(key)
        buf = torch.empty(min(chunk, max(total, 1)), dtype=torch.uint8)
        view, done = memoryview(buf.numpy()), 0
        with open(self._paths[shard], "rb") as f:  # its own file: get() may run in between
            while done < total:
                got = self._read(key, shard, f.fileno(), offset,
                                 view[:min(len(view), total - done)], done, total)
                yield buf[:got]
                done += got

    def close(self) -> None:
        if self._open is not None:
            self._open.close()
        self._open, self._open_name = None, None

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
