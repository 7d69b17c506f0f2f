"""The one safetensors writer, the header validator and durable outputs (real files).

- Mixed dtypes in one shard: every tensor's data starts at a multiple of its element size,
  and safetensors' own ``safe_open`` reads the file back bit for bit.
- fsync: files, the temporary directory and the parent directory are synced (os.fsync is
  watched with monkeypatch, through the real writer and atomic directory).
- Headers whose offsets disagree with shape x dtype are one-line FormatErrors (exit 2)
  instead of a RuntimeError from deep inside the reader; the parser is fuzzed.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from conftest import run_main
from loretta_merge.errors import FormatError
from loretta_merge.io import (CheckpointReader, StreamingShardWriter, atomic_output_dir,
                              read_safetensors_header, write_safetensors)


def _mixed() -> dict[str, torch.Tensor]:
    """fp32, bf16, int8 and bool tensors whose sizes are odd, so a back-to-back layout in
    this order would misalign every tensor after the first byte-sized one."""
    g = torch.Generator().manual_seed(0)
    return {
        "flag": torch.rand(3, generator=g) > 0.5,                            # 3 bytes
        "codes": torch.randint(-100, 100, (5,), generator=g, dtype=torch.int8),  # 5 bytes
        "half": torch.randn(3, 3, generator=g).to(torch.bfloat16),           # 18 bytes
        "weight": torch.randn(7, 3, generator=g),                            # 84 bytes
        "ids": torch.arange(3, dtype=torch.int64),                           # 24 bytes
        "norm": torch.randn(1, generator=g).to(torch.float16),               # 2 bytes
        "empty": torch.zeros(0, 4),
    }


def _assert_aligned_and_readable(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    header = read_safetensors_header(path)
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
    assert (8 + n) % 8 == 0
    for key, t in tensors.items():
        start = header[key]["data_offsets"][0]
        assert (8 + n + start) % t.element_size() == 0, (key, t.dtype, start)
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == set(tensors)
        for key, t in tensors.items():
            back = f.get_tensor(key)
            assert back.dtype == t.dtype and torch.equal(back, t), key


def test_streaming_writer_aligns_mixed_dtypes_in_one_shard(tmp_path):
    tensors = _mixed()
    w = StreamingShardWriter(tmp_path, [(k, tuple(t.shape), t.dtype) for k, t in tensors.items()], "1GB")
    for k, t in tensors.items():  # added in the caller's order, whatever the file order
        w.add(k, t)
    assert w.close() == ["model.safetensors"]
    _assert_aligned_and_readable(tmp_path / "model.safetensors", tensors)
    reader = CheckpointReader(tmp_path)
    assert all(torch.equal(reader.get(k), t) for k, t in tensors.items())


def test_streaming_writer_aligns_every_shard(tmp_path):
    tensors = {f"{k}.{i}": t for i in range(3) for k, t in _mixed().items()}
    w = StreamingShardWriter(tmp_path, [(k, tuple(t.shape), t.dtype) for k, t in tensors.items()], 140)
    for k, t in tensors.items():
        w.add(k, t)
    files = w.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 1
    for shard in shards:
        _assert_aligned_and_readable(tmp_path / shard,
                                     {k: tensors[k] for k, s in index["weight_map"].items() if s == shard})


def test_write_safetensors_aligns_and_copies_shared_memory(tmp_path):
    tensors = _mixed()
    tensors["tied"] = tensors["weight"]  # shares storage: written as a copy
    size = write_safetensors(tmp_path / "a.safetensors", tensors, metadata={"note": "x"})
    assert size == (tmp_path / "a.safetensors").stat().st_size
    _assert_aligned_and_readable(tmp_path / "a.safetensors", tensors)
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "note": "x"}


def test_reshard_of_a_mixed_dtype_checkpoint_keeps_alignment(tmp_path, capsys):
    from safetensors.torch import save_file

    base = tmp_path / "base"
    base.mkdir()
    tensors = _mixed()
    save_file(tensors, base / "model.safetensors")
    (base / "config.json").write_text(json.dumps({"model_type": "llama"}))
    for dtype in ("auto", "bfloat16"):
        out = tmp_path / f"out-{dtype}"
        code, _, err = run_main(["export", "safetensors", base, "-o", out, "--dtype", dtype], capsys)
        assert code == 0, err
        want = {k: (t.to(torch.bfloat16) if dtype == "bfloat16" and t.is_floating_point() else t)
                for k, t in tensors.items()}
        _assert_aligned_and_readable(out / "model.safetensors", want)


# --------------------------------------------------------------------------- durability

@pytest.fixture
def synced(monkeypatch) -> list[str]:
    """Every path os.fsync is called on, in order (the real fsync still runs)."""
    calls: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        calls.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return calls


def test_writer_fsyncs_each_file(tmp_path, synced):
    write_safetensors(tmp_path / "a.safetensors", {"x": torch.ones(3)})
    assert synced == [str(tmp_path / "a.safetensors")]
    w = StreamingShardWriter(tmp_path / "s", [("a", (300,), torch.float32), ("b", (300,), torch.float32)], 1500)
    (tmp_path / "s").mkdir()
    w.add("a", torch.ones(300))
    w.add("b", torch.ones(300))
    files = w.close()
    assert synced[1:] == [str(tmp_path / "s" / f) for f in files]


def test_atomic_dir_fsyncs_files_and_directories_before_and_after_rename(tmp_path, synced):
    out = tmp_path / "out"
    with atomic_output_dir(out) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "plain.txt").write_text("written without the writer")
        (tmp / "sub" / "f.json").write_text("{}")
        write_safetensors(tmp / "w.safetensors", {"x": torch.ones(2)})
        synced.clear()  # only what the atomic directory itself syncs from here
    published = {str(tmp / "plain.txt"), str(tmp / "sub" / "f.json"), str(tmp / "w.safetensors")}
    assert published <= set(synced)
    # files before their directory, the temp directory before the rename, the parent after it
    assert synced.index(str(tmp / "sub" / "f.json")) < synced.index(str(tmp / "sub"))
    assert synced.index(str(tmp)) < synced.index(str(tmp_path))
    assert synced[-1] == str(tmp_path) and out.is_dir() and not tmp.exists()


def test_adapter_writer_is_durable(tmp_path, synced):
    from loretta_merge.formats import Adapter, RepModule, TTMatrix, write_adapter

    cores = [torch.ones(1, 4, 2), torch.ones(2, 2, 1)]
    adapter = Adapter(method="rep", source="loretta-merge",
                      modules={"q": RepModule(a=TTMatrix(cores, 4, 2), b=TTMatrix(cores, 2, 4), scale=2.0)})
    write_adapter(adapter, tmp_path / "ad")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert sum(p.endswith(name) for p in synced) >= 2  # by the writer, then before the rename
    assert synced[-1] == str(tmp_path)


# --------------------------------------------------------------------------- header validation

def _corrupt_offsets(path: Path, key: str, delta: int) -> None:
    """Shift ``key``'s end offset by ``delta`` bytes, keeping the header length."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    header[key]["data_offsets"][1] += delta
    new = json.dumps(header, separators=(",", ":")).encode()
    assert len(new) <= n
    path.write_bytes(raw[:8] + new + b" " * (n - len(new)) + raw[8 + n:])


def test_header_offsets_disagreeing_with_shape_is_one_line_error(tiny_model_dir, tmp_path, capsys):
    """Before this check the reader accepted the header and failed later in ``get`` with
    ``RuntimeError: shape '[...]' is invalid for input of size ...`` (a traceback)."""
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir("llama"), base)
    shard = sorted(base.glob("model-*.safetensors"))[0]
    key = next(k for k in read_safetensors_header(shard) if k != "__metadata__")
    _corrupt_offsets(shard, key, -4)
    with pytest.raises(FormatError, match=rf"{shard.name}.*{key}.*shape.*data_offsets.*needs.*re-download"):
        CheckpointReader(base)
    out = tmp_path / "out"
    code, _, err = run_main(["export", "safetensors", base, "-o", out], capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and key in err and not out.exists()


def test_header_overlap_and_out_of_bounds(tmp_path):
    from safetensors.torch import save_file

    save_file({"a": torch.ones(4), "b": torch.ones(4)}, tmp_path / "x.safetensors")
    raw = (tmp_path / "x.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])

    def write(h: dict, data: bytes) -> Path:
        new = json.dumps(h).encode()
        p = tmp_path / "y.safetensors"
        p.write_bytes(struct.pack("<Q", len(new)) + new + data)
        return p

    overlap = json.loads(json.dumps(header))
    overlap["b"]["data_offsets"] = [8, 24]
    with pytest.raises(FormatError, match="'a'.*'b'.*overlap|'b'.*'a'.*overlap"):
        read_safetensors_header(write(overlap, raw[8 + n:]))
    with pytest.raises(FormatError, match="ends past the data section.*truncated"):
        read_safetensors_header(write(header, raw[8 + n:-4]))
    bad_dtype = json.loads(json.dumps(header))
    bad_dtype["a"]["dtype"] = "F13"
    with pytest.raises(FormatError, match="dtype 'F13'"):
        read_safetensors_header(write(bad_dtype, raw[8 + n:]))


_DTYPES = ["F32", "F16", "BF16", "I8", "BOOL", "I64", "U8", "F64", "F4", "X"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(entries=st.lists(st.tuples(st.sampled_from(_DTYPES), st.lists(st.integers(0, 4), max_size=3),
                                  st.integers(0, 40), st.integers(-3, 3)), max_size=4),
       data_len=st.integers(0, 120))
def test_fuzz_header_offsets(entries, data_len):
    """Random entries, offsets near the right ones: the parser raises FormatError or accepts,
    and whatever it accepts the reader can read, every tensor at its own size."""
    from loretta_merge.io.header import DTYPE_BITS

    header = {}
    for i, (dtype, shape, start, jitter) in enumerate(entries):
        size = math.ceil(math.prod(shape) * DTYPE_BITS.get(dtype, 8) / 8)
        header[f"t{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [start, start + size + jitter]}
    raw = json.dumps(header).encode()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "model.safetensors"
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(data_len))
        try:
            accepted = read_safetensors_header(path)
        except FormatError:
            return
        reader = CheckpointReader(d) if all(e["dtype"] in ("F32", "F16", "BF16", "I8", "BOOL", "I64", "U8",
                                                             "F64") for e in header.values()) else None
        if reader is not None:
            with reader:
                for key in reader.keys():
                    t = reader.get(key)
                    assert list(t.shape) == accepted[key]["shape"]
