"""Direct I/O in the one safetensors writer (real files, real O_DIRECT where the file system
takes it).

The writer stages a file written in order in an aligned buffer and writes whole blocks with
O_DIRECT; the bytes on disk must be exactly those of the page-cache path, whatever the
tensor sizes (block boundaries inside tensors, a tail shorter than a block, tensors larger
than the stage), when tensors arrive out of file order (mixed dtypes: the writer falls
back mid-file), on a full disk, and with ``LORETTA_DIRECT_IO=0``.
"""

from __future__ import annotations

import errno
import os

import pytest
import torch
from safetensors import safe_open

import loretta_merge.io.writer as writer_mod
from loretta_merge.errors import OutputError
from loretta_merge.io import StreamingShardWriter, write_safetensors


def _direct_works(directory) -> bool:
    if not hasattr(os, "O_DIRECT"):
        return False
    probe = directory / "probe"
    probe.write_bytes(b"")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_DIRECT)
    except OSError:
        return False
    os.close(fd)
    probe.unlink()
    return True


@pytest.fixture
def small_direct(monkeypatch):
    """Direct I/O for files of any size, with a 3-block stage, so small tensors cross
    stage and block boundaries."""
    monkeypatch.setattr(writer_mod, "DIRECT_MIN_BYTES", 0)
    monkeypatch.setattr(writer_mod, "STAGE_BYTES", 3 * writer_mod.DIRECT_ALIGN)
    monkeypatch.setattr(writer_mod, "_STAGES", writer_mod._Stages())  # stages of that size
    modes = []
    real_finish = writer_mod._FileWriter.finish

    def finish(self):
        modes.append(self.mode)
        real_finish(self)

    monkeypatch.setattr(writer_mod._FileWriter, "finish", finish)
    return modes


def _tensors(seed: int, sizes: list[int], dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"t{i}": torch.randn(n, generator=g).to(dtype) for i, n in enumerate(sizes)}


# sizes in elements: inside one block, across a block, across the 3-block stage, one
# larger than the stage, and an odd tail
SIZES = [3, 2047, 2049, 6145, 20000, 1]


def test_direct_bytes_equal_buffered_bytes(tmp_path, small_direct, monkeypatch):
    tensors = _tensors(0, SIZES)
    write_safetensors(tmp_path / "direct.safetensors", tensors)
    monkeypatch.setenv("LORETTA_DIRECT_IO", "0")
    write_safetensors(tmp_path / "buffered.safetensors", tensors)
    assert small_direct[-1] == "buffered"
    assert small_direct[0] == ("direct" if _direct_works(tmp_path) else "buffered")
    assert (tmp_path / "direct.safetensors").read_bytes() == (tmp_path / "buffered.safetensors").read_bytes()
    with safe_open(str(tmp_path / "direct.safetensors"), "pt") as f:
        for key, t in tensors.items():
            assert torch.equal(f.get_tensor(key), t)


def test_streaming_shards_direct_and_out_of_order_fallback(tmp_path, small_direct, monkeypatch):
    """Two shards written in order (direct), then a mixed-dtype file whose bf16 tensor is
    added before the fp32 one it is stored after: the writer falls back mid-file."""
    bf = _tensors(1, SIZES)
    layout = [(k, tuple(t.shape), t.dtype) for k, t in bf.items()]
    out = tmp_path / "direct"
    out.mkdir()
    w = StreamingShardWriter(out, layout, max_shard_bytes=30000)
    for k, t in bf.items():
        w.add(k, t)
    files = w.close()
    assert len(files) > 2  # shards and the index

    mixed = {"half": torch.randn(5000).to(torch.bfloat16), "full": torch.randn(3000),
             "more": torch.randn(777).to(torch.bfloat16)}
    (tmp_path / "mixed").mkdir()
    w = StreamingShardWriter(tmp_path / "mixed", [(k, tuple(t.shape), t.dtype) for k, t in mixed.items()])
    for k, t in mixed.items():
        w.add(k, t)
    w.close()

    monkeypatch.setenv("LORETTA_DIRECT_IO", "0")
    ref = tmp_path / "buffered"
    ref.mkdir()
    w = StreamingShardWriter(ref, layout, max_shard_bytes=30000)
    for k, t in bf.items():
        w.add(k, t)
    w.close()
    (tmp_path / "mixed-ref").mkdir()
    w = StreamingShardWriter(tmp_path / "mixed-ref", [(k, tuple(t.shape), t.dtype) for k, t in mixed.items()])
    for k, t in mixed.items():
        w.add(k, t)
    w.close()

    for name in files:
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    assert ((tmp_path / "mixed" / "model.safetensors").read_bytes()
            == (tmp_path / "mixed-ref" / "model.safetensors").read_bytes())
    with safe_open(str(tmp_path / "mixed" / "model.safetensors"), "pt") as f:
        for key, t in mixed.items():
            assert torch.equal(f.get_tensor(key), t)


def test_direct_write_on_a_full_disk_is_one_output_error(tmp_path, small_direct, monkeypatch):
    real = writer_mod.write_bytes
    calls = []

    def full_after_two(fd, data, offset):
        calls.append(offset)
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data, offset)

    monkeypatch.setattr(writer_mod, "write_bytes", full_after_two)
    with pytest.raises(OutputError, match="no space left"):
        write_safetensors(tmp_path / "x.safetensors", _tensors(2, [30000, 30000]))


def test_einval_from_a_direct_write_falls_back_to_the_same_bytes(tmp_path, small_direct, monkeypatch):
    """A file system that accepts O_DIRECT at open and refuses the write (EINVAL)."""
    real = writer_mod.write_bytes
    refused = []

    def picky(fd, data, offset):
        if fd_is_direct(fd):
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        real(fd, data, offset)

    def fd_is_direct(fd):
        import fcntl
        return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0))

    tensors = _tensors(3, SIZES)
    monkeypatch.setattr(writer_mod, "write_bytes", picky)
    write_safetensors(tmp_path / "a.safetensors", tensors)
    monkeypatch.setattr(writer_mod, "write_bytes", real)
    monkeypatch.setenv("LORETTA_DIRECT_IO", "0")
    write_safetensors(tmp_path / "b.safetensors", tensors)
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    if _direct_works(tmp_path):
        assert refused  # the direct descriptor was tried and refused
