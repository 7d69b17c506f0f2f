"""`train` output is atomic and durable: a checkpoint appears whole or not at all, the
final directory is renamed into place complete, and its files are fsynced first."""

from __future__ import annotations

import errno
import os

import pytest

from loretta_merge.train import train
from test_train import FAST, _csv, _sentences, with_tokenizer


@pytest.fixture(scope="session")
def bert(tiny_model_dir, tmp_path_factory):
    return with_tokenizer(tiny_model_dir, tmp_path_factory, "bert", "outputs-bert", causal=False)


def test_failed_checkpoint_leaves_no_partial_one_and_resume_continues(bert, tmp_path, monkeypatch):
    import loretta_merge.train.trainer as T

    real, calls = T.write_tensors, []

    def full_disk_on_second(state, path):
        calls.append(path)
        if len(calls) == 2:  # the checkpoint of step 2, halfway through its files
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(state, path)

    monkeypatch.setattr(T, "write_tensors", full_disk_on_second)
    kw = dict(model=bert, train_file=_csv(tmp_path / "d.csv", _sentences(24, 0)), eval_split=0,
              max_steps=3, save_steps=1, learning_rate=1e-2, **FAST)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="No space left"):
        train(output_dir=out, **kw)
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["checkpoint-1", "run_config.json"], ckpts  # no checkpoint-2, no .partial
    assert not (out / "adapter_config.json").exists()
    monkeypatch.setattr(T, "write_tensors", real)
    done = train(output_dir=out, resume=True, **kw)
    assert done.resumed_from_step == 1 and done.steps == 3


def test_final_files_are_fsynced_before_the_rename(bert, tmp_path, monkeypatch):
    synced: list[str] = []
    real = os.fsync

    def spy(fd):
        try:
            synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
        return real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    out = tmp_path / "out"
    train(model=bert, train_file=_csv(tmp_path / "d.csv", _sentences(16, 0)), eval_split=0,
          max_steps=2, save_steps=1, output_dir=out, **FAST)
    names = {os.path.basename(p) for p in synced}
    assert {"adapter_model.safetensors", "adapter_config.json", "train_summary.json",
            "trained_tensors.safetensors"} <= names, names
    # the summary was synced inside the temporary directory, i.e. before the rename
    assert any(".loretta-tmp-" in p and p.endswith("train_summary.json") for p in synced)
    assert not [p for p in tmp_path.iterdir() if ".loretta-" in p.name]
