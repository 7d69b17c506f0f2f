"""Data-parallel training with torchrun: 2 CPU processes (gloo) through the same train().

The three jobs (data-parallel, FSDP with resume, FSDP on a bf16 base) run in one torchrun
launch (``_torchrun_train.py``), made once per session by the ``launch`` fixture; each test
checks its own job's outputs.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from test_train import FILLER, _csv, _jsonl, _sentences, _tokenizer

HERE = Path(__file__).parent


@dataclass(frozen=True)
class Launch:
    root: Path
    proc: subprocess.CompletedProcess

    def job(self, name: str) -> Path:
        """The output folder of job ``name``; fails with the job's own traceback when it
        (or the launch) failed."""
        out = self.root / name / "out"
        failed = sorted(out.parent.glob("out.failed-rank*"))
        if failed:
            pytest.fail(f"torchrun job {name} failed:\n" + failed[0].read_text()[-4000:])
        if not out.exists():  # the launch ended before this job (an earlier one's failure)
            pytest.fail(f"torchrun exited {self.proc.returncode} before job {name}:\n"
                        + self.proc.stderr[-4000:])
        return out


@pytest.fixture(scope="session")
def launch(tiny_model_dir, tmp_path_factory) -> Launch:
    root = tmp_path_factory.mktemp("torchrun")
    jobs = []
    for name, mode in (("dp", "dp"), ("fsdp", "fsdp")):
        model = root / name / "bert"
        shutil.copytree(tiny_model_dir("bert"), model)
        _tokenizer(model, causal=False)
        job = dict(mode=mode, model=str(model), out=str(root / name / "out"),
                   data=str(_csv(root / name / "train.csv", _sentences(32, 0))))
        if mode == "dp":
            (root / name / "dumps").mkdir()
            job["dumps"] = str(root / name / "dumps")
        jobs.append(job)
    model = root / "bf16" / "llama"
    shutil.copytree(tiny_model_dir("llama", torch.bfloat16), model)
    _tokenizer(model, causal=True)
    rng = random.Random(0)
    data = _jsonl(root / "bf16" / "lm.jsonl", [{"text": " ".join(rng.sample(FILLER, 5))}
                                               for _ in range(24)])
    jobs.append(dict(mode="fsdp-bf16", model=str(model), data=str(data), out=str(root / "bf16" / "out")))
    (root / "jobs.json").write_text(json.dumps(jobs))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", "0", "--standalone", str(HERE / "_torchrun_train.py"),
           str(root / "jobs.json")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    return Launch(root, proc)


@pytest.mark.slow
def test_two_processes_train_identical_adapters(launch):
    out = launch.job("dp")
    dumps = out.parent / "dumps"
    ranks = [load_file(dumps / f"rank{r}.safetensors") for r in (0, 1)]
    for r in (0, 1):
        with safe_open(dumps / f"rank{r}.safetensors", "pt") as f:
            assert f.metadata() == {"world_size": "2", "steps": "3"}
    assert ranks[0].keys() == ranks[1].keys() and ranks[0]
    for name in ranks[0]:
        assert torch.equal(ranks[0][name], ranks[1][name]), name
    # exactly one adapter directory, written by rank 0, holding rank 0's weights
    configs = sorted(p.parent for p in out.parent.rglob("adapter_config.json"))
    assert configs == [out]
    saved = load_file(out / "adapter_model.safetensors")
    cores = [k for k in saved if ".lora_A.tt_cores." in k or ".lora_B.tt_cores." in k]
    assert cores
    for key in cores:  # base_model.model.<module>.lora_A.tt_cores.<k> -> <module>.lora_A.tt_cores.<k>
        name = key.removeprefix("base_model.model.")
        torch.testing.assert_close(saved[key], ranks[0][name], rtol=0, atol=0)
    assert not list(out.glob(".adapter-tmp-*"))


@pytest.mark.slow
def test_fsdp_two_processes_match_data_parallel_and_resume(launch):
    """``--fsdp`` under torchrun (2 CPU processes, gloo): the adapter equals the
    data-parallel run's with the same seed and global batch, and an FSDP run killed after
    its checkpoint at step 2 and resumed ends where the uninterrupted one does.

    Tolerance: FSDP reduce-scatters the gradients where DDP all-reduces them; both average
    the same per-rank sums, and AdamW is element-wise, so the runs agree up to the order
    of float additions inside the collectives (measured: bit-identical here). 1e-6
    absolute (the tensors are O(1)) leaves room for another reduction order, and is far
    below one update (lr 1e-2), so any real divergence (a wrong shard, a lost step, a
    missed gradient average) fails it."""
    out = launch.job("fsdp")

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
def test_fsdp_bf16_base_saves_fp32_master_weights(launch):
    """--fsdp --bf16 on a bf16 Llama: the shards of the trained tensors are float32 and the
    adapter written by rank 0 holds them in float32 (not the gathered bf16 compute copies)."""
    out = launch.job("bf16")
    with safe_open(out / "adapter_model.safetensors", "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes and set(dtypes.values()) == {"F32"}, dtypes
    assert any(k.endswith("model.norm.weight") for k in dtypes)  # the root unit's norm too
