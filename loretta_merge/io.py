"""Checkpoint I/O for streaming merges: read a (sharded) safetensors checkpoint one tensor
at a time, write output shards as they fill, and publish an output directory atomically.

Why: a merge must never hold the whole model (tens of GB) in memory and must never leave a
half-written output behind. :class:`CheckpointReader` keeps one shard open at a time and
reads each tensor with one positioned read (no memory map, whose touched pages would stay
resident); :class:`StreamingShardWriter` writes each tensor the moment it is added into
shards laid out in advance (a merge and a re-shard know every output tensor before the
first write); :func:`atomic_output_dir` writes into a temporary directory beside the
output and renames it into place only on success.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import secrets
import shutil
import struct
import time
from pathlib import Path
from typing import Iterator

import torch

from .errors import ConfigError, FormatError, OutputExistsError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

# safetensors header dtype strings -> torch dtypes
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
                     ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        _ST_DTYPES[_name] = getattr(torch, _attr)

_DTYPE_NAMES = {
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
    "fp16": torch.float16, "half": torch.float16, "float32": torch.float32, "fp32": torch.float32,
    "float": torch.float32,
}
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def read_model_config(model_dir: str | os.PathLike) -> dict:
    """A model directory's config.json as data ({} when absent); malformed JSON or a
    non-object is a FormatError naming the file. Never imports or runs anything."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FormatError(f"{path} is not valid JSON ({exc}); fix it or re-save the model "
                          f"with save_pretrained") from exc
    if not isinstance(data, dict):
        raise FormatError(f"{path} must hold a JSON object; re-save the model with save_pretrained")
    return data


# --------------------------------------------------------------------------- option parsing

def parse_size(text: str | int | float) -> int:
    """Bytes from ``"5GB"`` (KB/MB/GB/TB are powers of 1000), ``"512MiB"`` (KiB/MiB/GiB are
    powers of 1024) or a plain integer count of bytes."""
    if isinstance(text, bool):
        raise ConfigError(f"size must be bytes such as 5GB or 500MiB, got {text!r}; use e.g. 5GB, 500MB or 2GiB")
    if isinstance(text, (int, float)):
        if not math.isfinite(text) or text <= 0 or text != int(text):
            raise ConfigError(f"size must be a positive whole number of bytes, got {text!r}; use e.g. 5GB, 500MB or 2GiB")
        return int(text)
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).upper() if m else None
    if not m or unit not in _SIZE_UNITS:
        raise ConfigError(f"cannot read size {text!r}: use bytes with a unit such as 5GB, "
                          f"500MB or 2GiB (KB/MB/GB = 1000^n, KiB/MiB/GiB = 1024^n)")
    value = int(float(m.group(1)) * _SIZE_UNITS[unit])
    if value <= 0:
        raise ConfigError(f"size must be positive, got {text!r}; use e.g. 5GB")
    return value


def parse_dtype(text: str | torch.dtype | None) -> torch.dtype | None:
    """``"auto"``/None -> None (keep each tensor's dtype); otherwise bf16, fp16 or fp32."""
    if text is None or isinstance(text, torch.dtype):
        if text is not None and text not in _DTYPE_NAMES.values():
            raise ConfigError(f"dtype {text} is not supported; use bfloat16, float16 or float32")
        return text
    key = str(text).strip().lower().removeprefix("torch.")
    if key == "auto":
        return None
    if key not in _DTYPE_NAMES:
        raise ConfigError(f"unknown dtype {text!r}: use auto, bfloat16, float16 or float32")
    return _DTYPE_NAMES[key]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the spelling transformers configs use)."""
    return str(dtype).removeprefix("torch.")


def resolve_device(text: str | torch.device | None = "auto") -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda``/``cuda:N`` must be available."""
    key = "auto" if text is None else str(text).strip().lower()
    if key == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if key == "cpu":
        return torch.device("cpu")
    m = re.fullmatch(r"cuda(?::([0-9]+))?", key)
    if not m:
        raise ConfigError(f"unknown device {text!r}: use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ConfigError(f"device {text!r} asked for, but this torch build sees no CUDA GPU "
                          f"(torch {torch.__version__}); use --device cpu, or install a CUDA "
                          f"build of torch on a machine with an NVIDIA GPU")
    index = int(m.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise ConfigError(f"device {text!r} asked for, but only {torch.cuda.device_count()} "
                          f"CUDA device(s) exist; use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    return torch.device("cuda", index)


# --------------------------------------------------------------------------- reading

def read_safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file (tensor name -> dtype, shape, offsets), checked
    against the file size. Reads only the header bytes."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise FormatError(f"{path}: only {size} bytes, too short for a safetensors file; re-download or re-save the file")
            n = struct.unpack("<Q", raw)[0]
            if n > min(size - 8, 100 * 2**20):
                raise FormatError(f"{path}: header length {n} does not fit in a {size}-byte "
                                  f"file; the file is truncated or not safetensors; re-download or re-save it")
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{path}: cannot read the safetensors header ({exc}); the file is "
                          f"corrupt or not safetensors; re-download or re-save it") from exc
    if not isinstance(header, dict):
        raise FormatError(f"{path}: the safetensors header is not a JSON object; re-download or re-save the file")
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
            _ = info["dtype"], list(info["shape"])
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise FormatError(f"{path}: header entry {key!r} is malformed ({exc}); re-download or re-save the file") from exc
    if 8 + n + end > size:
        raise FormatError(f"{path}: header says tensor data ends at byte {8 + n + end}, but the "
                          f"file has {size} bytes; the file is truncated (an interrupted "
                          f"download or copy?); re-download or re-save it")
    return header


class CheckpointReader:
    """A transformers checkpoint directory in safetensors form, sharded (with
    ``model.safetensors.index.json``) or single (``model.safetensors``).

    Every shard's header is read and checked when the reader is made, so ``keys()``,
    ``shape()`` and ``dtype()`` need no tensor data. ``get(key)`` reads one tensor from its
    shard (one shard file open at a time) into a new CPU tensor.
    """

    def __init__(self, model_dir: str | os.PathLike) -> None:
        self.model_dir = Path(model_dir)
        d = self.model_dir
        if not d.exists():
            raise FormatError(f"base checkpoint {d} does not exist; pass a local model directory")
        if not d.is_dir():
            raise FormatError(f"base checkpoint {d} is a file; pass the model directory that "
                              f"holds config.json and the *.safetensors files")
        index = d / INDEX_NAME
        self._weight_map: dict[str, str] = {}
        self.metadata: dict = {}
        if index.is_file():
            try:
                data = json.loads(index.read_text())
                weight_map = data["weight_map"]
                self.metadata = dict(data.get("metadata") or {})
                if not isinstance(weight_map, dict) or not all(
                        isinstance(k, str) and isinstance(v, str) and v for k, v in weight_map.items()):
                    raise TypeError("'weight_map' must map tensor names to shard file names")
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise FormatError(f"{index}: not a valid safetensors index ({exc}); it needs a "
                                  f"'weight_map' of tensor name -> shard file: re-save the model "
                                  f"with save_pretrained or fix the index") from exc
            shards = sorted(set(weight_map.values()))
        elif (d / SINGLE_NAME).is_file():
            weight_map, shards = None, [SINGLE_NAME]
        else:
            pickled = [p.name for p in d.glob("*.bin")] + [p.name for p in d.glob("*.pt*")]
            if pickled:
                raise FormatError(
                    f"{d} holds only pickled weights ({', '.join(sorted(pickled)[:3])}); "
                    f"loretta-merge reads safetensors only, because unpickling can run code. "
                    f"Convert it once from a trusted copy: python -c \"import transformers as t; "
                    f"t.AutoModel.from_pretrained('{d}').save_pretrained('{d}-st')\"")
            raise FormatError(f"{d} has neither {INDEX_NAME} nor {SINGLE_NAME}; pass a "
                              f"transformers model directory (save_pretrained output with "
                              f"config.json and *.safetensors)")
        self._headers: dict[str, dict] = {}
        self._header_len: dict[str, int] = {}
        self._paths: dict[str, Path] = {}  # resolved, checked to lie inside the directory
        for shard in shards:
            if "\x00" in shard:
                raise FormatError(f"{index}: shard name {shard!r} is not a file name; re-save the "
                                  f"model with save_pretrained or fix the index")
            path = (d / shard).resolve()
            if (Path(shard).is_absolute() or ".." in Path(shard).parts
                    or d.resolve() not in path.parents):
                raise FormatError(f"{index}: shard name {shard!r} points outside {d} (a path or a "
                                  f"symlink leaving the directory); copy the shard into {d} and "
                                  f"fix the index")
            if not path.is_file():
                raise FormatError(f"{index} lists shard {shard}, which is missing from {d}; "
                                  f"the checkpoint is incomplete: re-download the missing file")
            try:
                header = read_safetensors_header(path)
            except FormatError as exc:
                where = f" (listed in {index.name})" if weight_map is not None else ""
                raise FormatError(f"shard {shard}{where}: {exc}") from exc
            self._headers[shard] = header
            self._paths[shard] = path
            with open(path, "rb") as f:
                self._header_len[shard] = struct.unpack("<Q", f.read(8))[0]
        if weight_map is None:
            header = self._headers[SINGLE_NAME]
            self.metadata = dict(header.get("__metadata__") or {})
            weight_map = {k: SINGLE_NAME for k in header if k != "__metadata__"}
        else:
            for key, shard in weight_map.items():
                if key not in self._headers[shard]:
                    raise FormatError(f"{index} maps {key!r} to {shard}, but that shard has no "
                                      f"such tensor; the index and shards do not belong together; re-save the model with save_pretrained or fix the index")
        # checkpoint order: shard by shard, tensors by file offset (sequential reads)
        def order(key: str) -> tuple:
            shard = weight_map[key]
            return (shard, self._headers[shard][key]["data_offsets"][0])
        self._weight_map = {k: weight_map[k] for k in sorted(weight_map, key=order)}
        self._open_name: str | None = None
        self._open = None

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
        if name not in _ST_DTYPES:
            raise FormatError(f"{self.model_dir}: tensor {key!r} has dtype {name}, which this "
                              f"torch build cannot hold; upgrade torch, or re-save the checkpoint in another dtype")
        return _ST_DTYPES[name]

    def nbytes(self, key: str) -> int:
        start, end = self._info(key)["data_offsets"]
        return int(end) - int(start)

    def total_bytes(self) -> int:
        return sum(self.nbytes(k) for k in self._weight_map)

    def get(self, key: str) -> torch.Tensor:
        """The tensor ``key`` as a new CPU tensor. Reads its bytes with one positioned
        read (no memory map: mapped pages would stay resident and count against the
        merge's memory bound until the shard is closed)."""
        shard = self._weight_map.get(key)
        if shard is None:
            raise KeyError(f"{self.model_dir} has no tensor {key!r}")
        if shard != self._open_name:
            self.close()
            self._open = open(self._paths[shard], "rb")  # noqa: SIM115 - closed in close()
            self._open_name = shard
        header = self._headers[shard]
        start, end = (int(x) for x in header[key]["data_offsets"])
        base = 8 + self._header_len[shard]
        buf = torch.empty(end - start, dtype=torch.uint8)
        view, done = memoryview(buf.numpy()), 0
        while done < end - start:  # one read returns at most ~2 GB on Linux
            got = os.preadv(self._open.fileno(), [view[done:]], base + start + done)
            if got <= 0:
                raise FormatError(f"{self.model_dir / shard}: short read of {key!r} "
                                  f"({done} of {end - start} bytes); the file changed or is truncated; re-download or re-save it")
            done += got
        return buf.view(self.dtype(key)).reshape(self.shape(key))

    def close(self) -> None:
        if self._open is not None:
            self._open.close()
        self._open, self._open_name = None, None

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------- writing

_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


def _header_bytes(entries: list[tuple[str, tuple, torch.dtype, int]], metadata: dict) -> bytes:
    """The 8-byte length and the JSON header of a safetensors file holding ``entries``
    ``(key, shape, dtype, nbytes)`` stored back to back in that order."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for key, shape, dtype, nbytes in entries:
        header[key] = {"dtype": _ST_NAMES[dtype], "shape": list(shape),
                       "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(raw)) + raw


def _write_bytes(f, data) -> None:
    """Every byte the writers put on disk goes through here (tests simulate a full disk)."""
    f.write(data)


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _disk_error(exc: OSError, out_dir: Path, shard_bytes: int, written: int) -> OSError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return OSError(exc.errno, f"no space left on the device holding {out_dir} while writing a "
                       f"{shard_bytes / 1e9:.2f} GB shard (about {written / 1e9:.2f} GB written "
                       f"so far); free space or choose an output on another disk; nothing was "
                       f"written to the output")
    return exc


def _shard_names(n: int) -> list[str]:
    return [SINGLE_NAME] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def _write_index(out_dir: Path, weight_map: dict[str, str], total: int) -> None:
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


class StreamingShardWriter:
    """A shard writer for when every output tensor is known up front (name, shape, dtype),
    as in a merge, whose plan knows them all before any weight is read.

    The shard layout is fixed at construction (start a new shard when the next tensor
    would pass ``max_shard_bytes``; a larger tensor gets a shard of its own), so every
    shard's header can be written first and each tensor goes to disk the moment it is
    added, in layout order. Peak memory is one tensor, whatever the shard size.
    """

    def __init__(self, out_dir: str | os.PathLike,
                 layout: list[tuple[str, tuple[int, ...], torch.dtype]],
                 max_shard_bytes: int | str = 5 * 10**9) -> None:
        self.out_dir = Path(out_dir)
        budget = parse_size(max_shard_bytes)
        groups: list[list[tuple[str, tuple, torch.dtype, int]]] = []
        size = 0
        for key, shape, dtype in layout:
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            if not groups or (groups[-1] and size + nbytes > budget):
                groups.append([])
                size = 0
            groups[-1].append((key, tuple(int(x) for x in shape), dtype, nbytes))
            size += nbytes
        if not groups:
            raise ValueError("StreamingShardWriter: empty layout")
        self._groups = groups
        self._names = _shard_names(len(groups))
        self._queue = [(i, e) for i, g in enumerate(groups) for e in g]
        self._pos = 0
        self._file = None
        self._file_index = -1
        self.total_bytes = sum(e[3] for _, e in self._queue)
        self.largest_shard_bytes = max(sum(e[3] for e in g) for g in groups)
        self.written_bytes = 0
        self.files: list[str] = []
        self._slow = float(os.environ.get("LORETTA_TEST_SLOW_WRITE", "0") or 0)  # tests only

    def add(self, key: str, tensor: torch.Tensor) -> None:
        if self._pos >= len(self._queue):
            raise ValueError(f"StreamingShardWriter: {key!r} is not in the layout (all written)")
        index, (want, shape, dtype, nbytes) = self._queue[self._pos]
        if key != want or tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ValueError(f"StreamingShardWriter: got {key!r} {tuple(tensor.shape)} {tensor.dtype}, "
                             f"the layout expects {want!r} {shape} {dtype} next")
        t = tensor.detach().to("cpu").contiguous()
        try:
            if index != self._file_index:
                self._close_file()
                self._file = open(self.out_dir / self._names[index], "wb")  # noqa: SIM115
                self._file_index = index
                _write_bytes(self._file, _header_bytes(self._groups[index], {"format": "pt"}))
            if nbytes:
                _write_bytes(self._file, _tensor_bytes(t))
        except OSError as exc:
            self._close_file()
            shard = sum(e[3] for e in self._groups[index])
            raise _disk_error(exc, self.out_dir, shard, self.written_bytes) from exc
        self.written_bytes += nbytes
        self._pos += 1
        if self._slow:
            time.sleep(self._slow)

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self.files.append(self._names[self._file_index])
            self._file = None

    def close(self) -> list[str]:
        """Finish the last shard and write the index. Returns the file names written."""
        if self._pos != len(self._queue):
            missing = [e[0] for _, e in self._queue[self._pos:]]
            raise ValueError(f"StreamingShardWriter: {len(missing)} tensor(s) never added, "
                             f"first {missing[0]!r}")
        self._close_file()
        if len(self._groups) > 1:
            _write_index(self.out_dir, {e[0]: self._names[i] for i, e in self._queue},
                         self.total_bytes)
            self.files.append(INDEX_NAME)
        return list(self.files)


# --------------------------------------------------------------------------- atomic output

_TEMP_RE = re.compile(r"\.(?P<name>.+)\.loretta-(?:tmp|old)-(?P<pid>[0-9]+)-[0-9a-f]+")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(out: Path) -> list[Path]:
    """Remove temporary directories beside ``out`` left by runs that were killed (their
    process no longer exists). Returns what was removed."""
    removed = []
    with contextlib.suppress(OSError):
        for p in out.parent.iterdir():
            m = _TEMP_RE.fullmatch(p.name)
            if m and m.group("name") == out.name and not _pid_alive(int(m.group("pid"))):
                if ".loretta-old-" in p.name and not out.exists():
                    os.replace(p, out)  # a --force run was killed between its two renames
                    continue
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``out``; on success rename it to ``out``.

    On any exception (KeyboardInterrupt included) the temporary directory is removed and
    ``out`` is left as it was. An existing ``out`` is refused unless ``force``; with
    ``force`` the old ``out`` stays intact until the new one is complete. Temporary
    directories of killed runs are removed on the next run.
    """
    out = Path(os.path.abspath(out))
    parent = out.parent
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output {out} exists and is a file; choose a directory path")
    if out.exists() and not force:
        raise OutputExistsError(f"output {out} already exists; pass --force (force=True) to "
                                f"replace it, or choose another output path")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create {parent} for the output {out}: {exc}; choose an output path you can write to") from exc
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write {out}: {parent} is not writable (permission denied); choose an output "
                          f"path in a directory you can write to")
    remove_stale_temps(out)
    tag = f"{os.getpid()}-{secrets.token_hex(4)}"
    tmp = parent / f".{out.name}.loretta-tmp-{tag}"
    try:
        os.mkdir(tmp)  # mode 0o777 minus the umask, like any new directory
    except OSError as exc:  # root passes os.access on read-only mounts such as /proc
        raise ConfigError(f"cannot write {out} in {parent} ({exc.strerror or exc}); choose an output "
                          f"path in a directory you can write to") from exc
    try:
        yield tmp
        if out.exists():
            if not force:
                raise OutputExistsError(f"output {out} appeared while writing; the new result "
                                        f"was discarded; pass --force to replace it")
            old = parent / f".{out.name}.loretta-old-{tag}"
            os.replace(out, old)
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old, out)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
