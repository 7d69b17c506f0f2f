"""Checkpoint reader, shard writer and atomic output directories (real files on disk)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from loretta_merge.errors import ConfigError, FormatError, OutputError, OutputExistsError
from loretta_merge.io import (CheckpointReader, StreamingShardWriter, atomic_output_dir, parse_dtype,
                              parse_size, resolve_device)


# --------------------------------------------------------------------------- parsing

@pytest.mark.parametrize("text,expected", [
    ("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30), ("40KB", 40_000),
    ("1.5GB", 1_500_000_000), ("64KiB", 65536), ("1234", 1234), (4096, 4096), ("10 mib", 10 * 2**20),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "5 parsecs", "GB", "-1GB", "0", 0, "1e9", True])
def test_parse_size_rejects(bad):
    with pytest.raises(ConfigError, match="size"):
        parse_size(bad)


def test_parse_dtype():
    assert parse_dtype("auto") is None and parse_dtype(None) is None
    assert parse_dtype("bf16") is parse_dtype("bfloat16") is torch.bfloat16
    assert parse_dtype("fp16") is torch.float16 and parse_dtype("float32") is torch.float32
    with pytest.raises(ConfigError, match="int8"):
        parse_dtype("int8")


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="--device cpu"):
            resolve_device("cuda:0")


# --------------------------------------------------------------------------- reader

def test_reader_sharded_checkpoint(tiny_model_dir):
    d = tiny_model_dir("llama")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # the fixture is sharded
    reader = CheckpointReader(d)
    assert sorted(reader.keys()) == sorted(index["weight_map"])
    opened = set()
    for key in reader.keys():
        t = reader.get(key)
        assert tuple(t.shape) == reader.shape(key) and t.dtype == reader.dtype(key)
        assert t.nbytes == reader.nbytes(key)
        opened.add(reader._open_name)
        assert reader._open_name == index["weight_map"][key]  # one shard open at a time
    assert opened == set(index["weight_map"].values())
    ref = load_file(d / index["weight_map"]["lm_head.weight"])["lm_head.weight"]
    assert torch.equal(reader.get("lm_head.weight"), ref)


def test_reader_missing_and_corrupt_shards(tiny_model_dir, tmp_path):
    src = tiny_model_dir("llama")
    d = tmp_path / "ck"
    shutil.copytree(src, d)
    shard = sorted(d.glob("model-*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError, match=f"{shard.name}.*model.safetensors.index.json.*truncated"):
        CheckpointReader(d)
    shard.unlink()
    with pytest.raises(FormatError, match=f"lists shard {shard.name}, which is missing"):
        CheckpointReader(d)
    shard.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(FormatError, match=shard.name):
        CheckpointReader(d)


def test_reader_refuses_pickled_and_missing(tmp_path):
    (tmp_path / "bin").mkdir()
    torch.save({"w": torch.zeros(2)}, tmp_path / "bin" / "pytorch_model.bin")
    with pytest.raises(FormatError, match="pickled.*safetensors.*save_pretrained"):
        CheckpointReader(tmp_path / "bin")
    with pytest.raises(FormatError, match="does not exist"):
        CheckpointReader(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FormatError, match="neither"):
        CheckpointReader(tmp_path / "empty")


def test_reader_single_file(tmp_path):
    save_file({"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)},
              tmp_path / "model.safetensors", metadata={"format": "pt"})
    reader = CheckpointReader(tmp_path)
    assert set(reader.keys()) == {"a", "b"} and reader.metadata == {"format": "pt"}
    assert reader.shape("a") == (2, 3) and reader.dtype("b") == torch.bfloat16
    assert torch.equal(reader.get("a"), torch.arange(6.0).reshape(2, 3))


# --------------------------------------------------------------------------- writer

def _tensors(n=10, size=1000):
    g = torch.Generator().manual_seed(0)
    return {f"layer.{i}.weight": torch.randn(size, generator=g) for i in range(n)}  # 4000 B each


def write_all(out, tensors: dict, max_shard_bytes):
    """Lay out and write ``tensors`` in order; the files written."""
    w = StreamingShardWriter(out, [(k, tuple(t.shape), t.dtype) for k, t in tensors.items()],
                             max_shard_bytes)
    for k, t in tensors.items():
        w.add(k, t)
    return w.close()


def test_writer_shards_by_bytes(tmp_path):
    tensors = _tensors()
    files = write_all(tmp_path, tensors, 10_000)  # two 4000-byte tensors per shard
    shards = sorted(f for f in files if f.endswith(".safetensors"))
    assert shards == [f"model-{i:05d}-of-00005.safetensors" for i in range(1, 6)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 40_000
    assert sorted(os.listdir(tmp_path)) == sorted(files)  # no temporary names left
    back = {}
    for s in shards:
        assert (tmp_path / s).stat().st_size <= 10_000 + 1000  # budget + header
        back.update(load_file(tmp_path / s))
    assert set(back) == set(tensors) and all(torch.equal(back[k], tensors[k]) for k in tensors)
    assert index["weight_map"] == {k: s for s in shards for k in load_file(tmp_path / s)}
    reader = CheckpointReader(tmp_path)  # what we write, we read
    assert sorted(reader.keys()) == sorted(tensors)


def test_writer_single_shard_and_big_tensor(tmp_path):
    (tmp_path / "one").mkdir()
    assert write_all(tmp_path / "one", {"a": torch.ones(3)}, "1MB") == ["model.safetensors"]
    assert not (tmp_path / "one" / "model.safetensors.index.json").exists()
    (tmp_path / "big").mkdir()
    # "huge" is larger than the budget: a shard of its own
    files = write_all(tmp_path / "big", {"small": torch.ones(2), "huge": torch.ones(1000),
                                          "tail": torch.ones(2)}, 100)
    assert len([f for f in files if f.endswith(".safetensors")]) == 3


def test_writer_shared_memory_tensors(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    # "tied" shares storage, "row" is a view into it, "t" is non-contiguous
    write_all(tmp_path, {"full": base, "tied": base, "row": base[1], "t": base.T}, "1GB")
    back = load_file(tmp_path / "model.safetensors")
    assert torch.equal(back["tied"], base) and torch.equal(back["row"], base[1])
    assert torch.equal(back["t"], base.T)


# --------------------------------------------------------------------------- atomic output

def _temps(parent):
    return [p.name for p in parent.iterdir() if ".loretta-" in p.name]


def test_atomic_success_and_umask(tmp_path):
    out = tmp_path / "out"
    old = os.umask(0o027)
    try:
        with atomic_output_dir(out) as tmp:
            assert tmp.parent == tmp_path and tmp.name.startswith(".out.loretta-tmp-")
            (tmp / "f").write_text("x")
    finally:
        os.umask(old)
    assert (out / "f").read_text() == "x" and not _temps(tmp_path)
    assert (out.stat().st_mode & 0o777) == 0o750


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_atomic_failure_leaves_nothing(tmp_path, exc):
    out = tmp_path / "out"
    with pytest.raises(exc):
        with atomic_output_dir(out) as tmp:
            (tmp / "f").write_text("x")
            raise exc()
    assert not out.exists() and not _temps(tmp_path)


def test_atomic_existing_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("old")
    with pytest.raises(OutputExistsError, match="--force"):
        with atomic_output_dir(out):
            pass
    with pytest.raises(RuntimeError):  # a failing forced run keeps the old output
        with atomic_output_dir(out, force=True) as tmp:
            (tmp / "new").write_text("new")
            raise RuntimeError("boom")
    assert os.listdir(out) == ["keep"] and not _temps(tmp_path)
    with atomic_output_dir(out, force=True) as tmp:
        (tmp / "new").write_text("new")
    assert os.listdir(out) == ["new"] and not _temps(tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputExistsError, match="is a file"):
        with atomic_output_dir(tmp_path / "file", force=True):
            pass


def _dead_pid() -> int:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(dead.stdout)


def test_atomic_temp_names_carry_the_host():
    from loretta_merge.io.atomic import _TEMP_RE, host_tag

    assert host_tag() and re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", host_tag())
    m = _TEMP_RE.fullmatch(".out.v2.loretta-tmp-node-12.cluster-345-0a1b2c3d")
    assert m and (m["name"], m["host"], m["pid"]) == ("out.v2", "node-12.cluster", "345")


def test_atomic_removes_stale_temps_of_dead_processes_of_this_host(tmp_path):
    from loretta_merge.io.atomic import host_tag

    pid, host = _dead_pid(), host_tag()
    stale = tmp_path / f".out.loretta-tmp-{host}-{pid}-abcd1234"
    stale.mkdir()
    (stale / "model-part").write_text("x")
    live = tmp_path / f".out.loretta-tmp-{host}-{os.getppid()}-abcd1234"  # a running process's
    live.mkdir()
    other = tmp_path / f".other.loretta-tmp-{host}-{pid}-abcd1234"  # another output's
    other.mkdir()
    with atomic_output_dir(tmp_path / "out") as tmp:
        assert tmp.name.startswith(f".out.loretta-tmp-{host}-{os.getpid()}-")
        (tmp / "f").write_text("x")
    assert not stale.exists() and live.exists() and other.exists()


def test_atomic_leaves_temps_of_other_hosts_alone(tmp_path):
    """On shared storage a temp's PID belongs to its own node: the same number being dead
    here says nothing about it. Temps of another host, and old names without a host, stay."""
    from loretta_merge.io.atomic import host_tag

    pid = _dead_pid()
    foreign_host = "other-node-7" if host_tag() != "other-node-7" else "other-node-8"
    foreign = tmp_path / f".out.loretta-tmp-{foreign_host}-{pid}-abcd1234"
    foreign.mkdir()
    (foreign / "model-part").write_text("x")
    foreign_old = tmp_path / f".out.loretta-old-{foreign_host}-{pid}-abcd1234"
    foreign_old.mkdir()
    hostless = tmp_path / f".out.loretta-tmp-{pid}-abcd1234"
    hostless.mkdir()
    with atomic_output_dir(tmp_path / "out") as tmp:
        (tmp / "f").write_text("x")
    assert foreign.exists() and (foreign / "model-part").exists()
    assert foreign_old.exists() and hostless.exists()
    assert (tmp_path / "out" / "f").exists()  # the run itself succeeded


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_atomic_unwritable_parent(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        # a file-system failure, not a config value: OutputError (was ConfigError, issue 12)
        with pytest.raises(OutputError, match="cannot write"):
            with atomic_output_dir(ro / "out"):
                pass
    finally:
        ro.chmod(0o755)


def test_streaming_writer_matches_layout(tmp_path):
    from loretta_merge.io import StreamingShardWriter

    tensors = _tensors(5)
    tensors["half"] = torch.ones(3, 2, dtype=torch.bfloat16)
    layout = [(k, tuple(t.shape), t.dtype) for k, t in tensors.items()]
    w = StreamingShardWriter(tmp_path, layout, max_shard_bytes=10_000)
    with pytest.raises(ValueError, match="expects 'layer.0.weight'"):
        w.add("half", tensors["half"])
    for k, t in tensors.items():
        w.add(k, t)
    files = w.close()
    assert files[-1] == "model.safetensors.index.json" and len(files) == 4  # 3 shards + index
    back = {}
    for f in files[:-1]:
        back.update(load_file(tmp_path / f))
    assert all(torch.equal(back[k], t) for k, t in tensors.items())
    assert w.largest_shard_bytes <= 10_000 and sorted(os.listdir(tmp_path)) == sorted(files)
    w = StreamingShardWriter(tmp_path / "x", [("a", (2,), torch.float32)], max_shard_bytes=100)
    with pytest.raises(ValueError, match="never added"):
        w.close()


def test_reshard_checkpoint(tiny_model_dir, tmp_path):
    from loretta_merge.converters.safetensors import reshard_checkpoint

    src = tiny_model_dir("opt")
    summary = reshard_checkpoint(src, tmp_path / "one", dtype="bf16")
    assert summary["shards"] == 1 and (tmp_path / "one" / "model.safetensors").exists()
    assert json.loads((tmp_path / "one" / "config.json").read_text())["dtype"] == "bfloat16"
    a, b = CheckpointReader(src), CheckpointReader(tmp_path / "one")
    assert sorted(a.keys()) == sorted(b.keys())
    for k in a.keys():
        assert torch.equal(b.get(k), a.get(k).to(torch.bfloat16))
    summary = reshard_checkpoint(tmp_path / "one", tmp_path / "many", max_shard_bytes="30KB")
    assert summary["shards"] > 2 and summary["largest_shard_bytes"] <= 30_000
    with pytest.raises(OutputExistsError):
        reshard_checkpoint(src, tmp_path / "many")


def test_atomic_unwritable_parent_as_root_is_an_output_error(tmp_path):
    """/proc refuses new directories even for root: OutputError (exit 2), naming the parent."""
    with pytest.raises(OutputError, match="cannot write to /proc.*choose an output path"):
        with atomic_output_dir("/proc/loretta-out"):
            pass


def test_disk_full_in_the_body_is_one_output_error_naming_the_output(tmp_path, monkeypatch):
    import errno

    import loretta_merge.io.writer as writer
    from loretta_merge.io import DiskFullError, write_safetensors

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer, "write_bytes", full)
    out = tmp_path / "out"
    with pytest.raises(DiskFullError) as info:
        with atomic_output_dir(out) as tmp:
            write_safetensors(tmp / "w.safetensors", {"x": torch.ones(1000)})
    msg = str(info.value)
    assert info.value.exit_code == 1 and info.value.errno == errno.ENOSPC
    assert f"{out}/w.safetensors" in msg and "loretta-tmp" not in msg and "[Errno" not in msg
    assert "free space or choose an output on another disk" in msg and "GB needed" in msg
    assert not out.exists() and not _temps(tmp_path)
    with pytest.raises(OutputError, match="cannot write .*plain.*choose an output path"):
        with atomic_output_dir(tmp_path / "o2") as tmp:
            raise PermissionError(errno.EACCES, "Permission denied", str(tmp / "plain"))


# --------------------------------------------------------------------------- model directory

def test_read_model_config(tmp_path):
    from loretta_merge.io import read_model_config

    assert read_model_config(tmp_path) == {}
    with pytest.raises(FormatError, match="no config.json.*save_pretrained"):
        read_model_config(tmp_path, required=True)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(FormatError, match="config.json is not valid JSON"):
        read_model_config(tmp_path)
    (tmp_path / "config.json").write_text("[1]")
    with pytest.raises(FormatError, match="JSON object"):
        read_model_config(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    assert read_model_config(tmp_path) == {"model_type": "bert"}


def test_copy_side_files_policy(tmp_path):
    from loretta_merge.errors import UnsafeInputError
    from loretta_merge.io import copy_side_files

    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "generation_config.json", "chat_template.jinja", "vocab.txt", "README.md", "modules.json",
                 "config_sentence_transformers.json", "sentence_bert_config.json",
                 "model.safetensors", "model-00001-of-00002.safetensors", "model.safetensors.index.json",
                 "pytorch_model.bin", "training_args.bin", "model.onnx", ".hidden"):
        (src / name).write_text(name)
    (src / "modules.json").write_text(json.dumps([{"path": ""}, {"path": "1_Pooling"}, {"path": "2_Dense"}]))
    (src / "1_Pooling").mkdir()
    (src / "1_Pooling" / "config.json").write_text("{}")
    (src / "2_Dense").mkdir()
    (src / "2_Dense" / "model.safetensors").write_text("dense weights: a module's own")
    (src / "checkpoints").mkdir()
    (src / "checkpoints" / "x.json").write_text("{}")
    copied = copy_side_files(src, dst, exclude=("config.json",))
    assert sorted(copied) == sorted(["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                                     "generation_config.json", "chat_template.jinja", "vocab.txt",
                                     "README.md", "modules.json", "config_sentence_transformers.json",
                                     "sentence_bert_config.json", "1_Pooling/", "2_Dense/"])
    assert sorted(os.listdir(dst)) == sorted(c.rstrip("/") for c in copied)
    assert (dst / "1_Pooling" / "config.json").read_text() == "{}"
    assert (dst / "2_Dense" / "model.safetensors").is_file()
    assert (dst / "tokenizer.json").read_text() == "tokenizer.json"
    # a symlink leading out of the directory is refused, never followed
    outside = tmp_path / "secret.txt"
    outside.write_text("secret")
    (src / "tokenizer.model").symlink_to(outside)
    dst2 = tmp_path / "dst2"
    dst2.mkdir()
    with pytest.raises(UnsafeInputError, match="tokenizer.model.*outside.*copy the file"):
        copy_side_files(src, dst2)
    assert not (dst2 / "tokenizer.model").exists()
