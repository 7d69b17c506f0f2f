"""Data-parallel training with torchrun: 2 CPU processes (gloo) through the same train()."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from test_train import FILLER, _csv, _jsonl, _sentences, _tokenizer

HERE = Path(__file__).parent


@pytest.mark.slow
def test_two_processes_train_identical_adapters(tiny_model_dir, tmp_path):
    import shutil

    model = tmp_path / "bert"
    shutil.copytree(tiny_model_dir("bert"), model)
    _tokenizer(model, causal=False)
    data = _csv(tmp_path / "train.csv", _sentences(32, 0))
    out, dumps = tmp_path / "out", tmp_path / "dumps"
    dumps.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", "0", "--standalone", str(HERE / "_torchrun_train.py"),
           str(model), str(data), str(out), str(dumps)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]

    ranks = [load_file(dumps / f"rank{r}.safetensors") for r in (0, 1)]
    for r in (0, 1):
        with safe_open(dumps / f"rank{r}.safetensors", "pt") as f:
            assert f.metadata() == {"world_size": "2", "steps": "3"}
    assert ranks[0].keys() == ranks[1].keys() and ranks[0]
    for name in ranks[0]:
        assert torch.equal(ranks[0][name], ranks[1][name]), name
    # exactly one adapter directory, written by rank 0, holding rank 0's weights
    configs = sorted(p.parent for p in tmp_path.rglob("adapter_config.json"))
    assert configs == [out]
    saved = load_file(out / "adapter_model.safetensors")
    cores = [k for k in saved if ".lora_A.tt_cores." in k or ".lora_B.tt_cores." in k]
    assert cores
    for key in cores:  # base_model.model.<module>.lora_A.tt_cores.<k> -> <module>.lora_A.tt_cores.<k>
        name = key.removeprefix("base_model.model.")
        torch.testing.assert_close(saved[key], ranks[0][name], rtol=0, atol=0)
    assert not list(out.glob(".adapter-tmp-*"))


@pytest.mark.slow
def test_fsdp_two_processes_match_data_parallel_and_resume(tiny_model_dir, tmp_path):
    """``--fsdp`` under torchrun (2 CPU processes, gloo): the adapter equals the
    data-parallel run's with the same seed and global batch, and an FSDP run killed after
    its checkpoint at step 2 and resumed ends where the uninterrupted one does.

    Tolerance: FSDP reduce-scatters the gradients where DDP all-reduces them; both average
    the same per-rank sums, and AdamW is element-wise, so the runs agree up to the order
    of float additions inside the collectives (measured: bit-identical here). 1e-6
    absolute (the tensors are O(1)) leaves room for another reduction order, and is far
    below one update (lr 1e-2), so any real divergence (a wrong shard, a lost step, a
    missed gradient average) fails it."""
    import shutil

    model = tmp_path / "bert"
    shutil.copytree(tiny_model_dir("bert"), model)
    _tokenizer(model, causal=False)
    data = _csv(tmp_path / "train.csv", _sentences(32, 0))
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", "0", "--standalone", str(HERE / "_torchrun_train.py"),
           str(model), str(data), str(out), "-", "fsdp"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]

    ddp, sharded, resumed = (load_file(out / d / "adapter_model.safetensors")
                             for d in ("ddp", "fsdp", "resumed"))
    assert ddp.keys() == sharded.keys() == resumed.keys() and ddp
    for name in ddp:  # full tensors (not shards) with the data-parallel shapes
        assert sharded[name].shape == ddp[name].shape, name
        torch.testing.assert_close(sharded[name], ddp[name], rtol=0, atol=1e-6, msg=name)
        torch.testing.assert_close(resumed[name], sharded[name], rtol=0, atol=1e-6, msg=name)
    ckpt = out / "fsdp" / "checkpoints"
    step2, step4 = (load_file(ckpt / c / "trained_tensors.safetensors")
                    for c in ("checkpoint-2", "checkpoint-4"))
    moved = max((step4[k] - step2[k]).abs().max().item() for k in step4 if ".tt_cores." in k)
    assert moved > 1e-3  # steps 3-4 changed the cores: the comparison above is not vacuous
    # one adapter directory per run, written once (rank 0), no temporary directories left
    assert sorted(p.parent.name for p in out.rglob("adapter_config.json")) == ["ddp", "fsdp", "resumed"]
    assert not [p for p in out.rglob("*") if ".loretta-" in p.name or p.name == ".partial"]


@pytest.mark.slow
def test_fsdp_bf16_base_saves_fp32_master_weights(tiny_model_dir, tmp_path):
    """--fsdp --bf16 on a bf16 Llama: the shards of the trained tensors are float32 and the
    adapter written by rank 0 holds them in float32 (not the gathered bf16 compute copies)."""
    import random
    import shutil

    model = tmp_path / "llama"
    shutil.copytree(tiny_model_dir("llama", torch.bfloat16), model)
    _tokenizer(model, causal=True)
    rng = random.Random(0)
    data = _jsonl(tmp_path / "lm.jsonl", [{"text": " ".join(rng.sample(FILLER, 5))}
                                          for _ in range(24)])
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", "0", "--standalone", str(HERE / "_torchrun_train.py"),
           str(model), str(data), str(out), "-", "fsdp-bf16"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with safe_open(out / "adapter_model.safetensors", "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes and set(dtypes.values()) == {"F32"}, dtypes
    assert any(k.endswith("model.norm.weight") for k in dtypes)  # the root unit's norm too
