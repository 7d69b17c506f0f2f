"""The CPU kernel's thread count (issue 24, point 7): chosen from the cores available to the
process, overridden by LORETTA_KERNEL_THREADS (validated), and without effect on the bytes
written; the CLI's OMP_WAIT_POLICY and MKL_CBWR defaults."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from conftest import run_main
from loretta_merge.errors import ConfigError
from loretta_merge.merge import merge
from loretta_merge.merge import run as merge_run
from loretta_merge.merge import task_vectors

ROOT = Path(__file__).resolve().parents[1]
ENV = "LORETTA_KERNEL_THREADS"


@pytest.fixture
def cores(monkeypatch):
    """Pretend the process may run on ``n`` cores (its affinity), whatever the machine."""
    monkeypatch.delenv(ENV, raising=False)

    def set_cores(n: int) -> None:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(100, 100 + n)))

    return set_cores


@pytest.mark.parametrize("n, want", [(1, 1), (2, 1), (3, 2), (8, 7), (64, 63)])
def test_chooser_takes_the_cores_available_minus_one(cores, n, want):
    cores(n)
    assert merge_run.available_cores() == n
    assert merge_run.kernel_threads() == want

@pytest.mark.parametrize("policy, n", [(None, 2), ("ACTIVE", 8), ("PASSIVE", 2), ("passive", 8)])
def test_a_method_takes_every_core_whatever_the_wait_policy(cores, monkeypatch, policy, n):
    """A task-vector method is CPU-bound: every core, as tensor workers on one intra-op
    thread each, so OpenMP's wait policy (the CLI sets PASSIVE) does not matter."""
    cores(n)
    if policy is None:
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    else:
        monkeypatch.setenv("OMP_WAIT_POLICY", policy)
    assert merge_run.kernel_threads(cpu_bound=True) == n
    assert merge_run.kernel_threads() == max(1, n - 1)


def test_chooser_follows_affinity_not_the_machine(cores, monkeypatch):
    cores(3)
    monkeypatch.setattr(os, "cpu_count", lambda: 96)  # the machine's count is not the budget
    assert merge_run.kernel_threads() == 2


@pytest.mark.parametrize("value, want", [("1", 1), ("2", 2), (" 3 ", 3), ("16", 16), ("", 3)])
def test_override(cores, monkeypatch, value, want):
    cores(4)
    monkeypatch.setenv(ENV, value)  # empty: as if unset
    assert merge_run.kernel_threads() == want


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5", "2x", "auto"])
def test_bad_override_is_a_clear_error(cores, monkeypatch, value):
    cores(4)
    monkeypatch.setenv(ENV, value)
    with pytest.raises(ConfigError) as info:
        merge_run.kernel_threads()
    msg = str(info.value)
    assert f"{ENV}={value!r}" in msg and "whole number of 1 or more" in msg and "unset" in msg


def test_bad_override_refused_before_any_work(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from loretta_merge.adapters import get_loretta_model, save_loretta_adapter
    from loretta_merge.adapters.config import RepConfig
    from conftest import build_tiny

    save_loretta_adapter(get_loretta_model(build_tiny("opt"), RepConfig(r=4, tensor_rank=3)),
                         tmp_path / "rep")
    monkeypatch.setenv(ENV, "0")
    code, out, err = run_main([f"{tiny_model_dir('opt')}+{tmp_path / 'rep'}", "-o",
                               tmp_path / "out", "-q"], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith(f"error: {ENV}='0' is not a thread count")
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="session")
def smoke_checkpoint(tmp_path_factory):
    """bench_merge's LLaMA-shaped bf16 checkpoint at its smallest size (tensors large enough
    for torch to split across threads) with its LoRA and rep adapters."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from bench_merge import generate
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    work = tmp_path_factory.mktemp("threads-ckpt")
    generate(work, "smoke")
    return work


def _shards(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))}


def _bytes_on_one_and_two_threads(monkeypatch, tmp_path, run,
                                  workers: bool = False) -> dict[str, dict[str, bytes]]:
    """``run(out)`` (a merge) with LORETTA_KERNEL_THREADS 1 and 2: each output's shards,
    after checking the kernel ran on that many threads: intra-op threads, or with
    ``workers`` (a task-vector method) that many tensor workers on one intra-op thread each,
    whose threads did merge tensors."""
    seen: list[int] = []
    real = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (seen.append(n), real(n)))
    chosen: list[int] = []
    real_workers = merge_run.method_workers
    monkeypatch.setattr(merge_run, "method_workers",
                        lambda *a: (chosen.append(real_workers(*a)), chosen[-1])[1])
    merged_in: set[str] = set()
    real_merge = task_vectors.merge_tensor_task_vectors
    monkeypatch.setattr(task_vectors, "merge_tensor_task_vectors",
                        lambda *a, **k: (merged_in.add(threading.current_thread().name),
                                         real_merge(*a, **k))[1])
    outs = {}
    for threads in ("1", "2"):
        monkeypatch.setenv(ENV, threads)
        seen.clear()
        chosen.clear()
        merged_in.clear()
        out = tmp_path / f"out-{threads}"
        run(out)
        n = int(threads)
        assert chosen == [n if workers else 1]
        assert seen and seen[0] == (1 if workers else n)  # intra-op threads of the kernel
        if workers and n > 1:
            assert merged_in and all(t.startswith("loretta-method") for t in merged_in)
        outs[threads] = _shards(out)
    return outs


@pytest.mark.parametrize("adapter", ["lora", "rep"])
def test_one_and_two_threads_write_identical_bytes(smoke_checkpoint, tmp_path, monkeypatch,
                                                   adapter):
    import loretta_merge.merge.kernel as kernel

    monkeypatch.setattr(kernel, "BLOCK_ELEMS", 64 * 1024)  # several blocks per tensor
    outs = _bytes_on_one_and_two_threads(monkeypatch, tmp_path, lambda out: merge(
        smoke_checkpoint / "base", [(smoke_checkpoint / adapter, 0.7)], out, device="cpu",
        progress=False))
    assert outs["1"] and outs["1"] == outs["2"]


@pytest.mark.parametrize("var, default, mine", [("OMP_WAIT_POLICY", "PASSIVE", "ACTIVE"),
                                                 ("MKL_CBWR", "AUTO,STRICT", "COMPATIBLE")])
def test_cli_sets_its_threading_defaults_unless_the_user_did(var, default, mine):
    """In a fresh process (OpenMP reads its policy when torch loads, MKL its mode at its first
    call): the CLI's default, or the user's value kept."""
    code = ("import os, sys\n"
            "from loretta_merge.cli import main\n"
            "assert 'torch' not in sys.modules\n"
            "try:\n    main(['--version'])\nexcept SystemExit:\n    pass\n"
            f"print(os.environ[{var!r}])\n")
    env = {k: v for k, v in os.environ.items() if k != var}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    got = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert got.returncode == 0, got.stderr
    assert got.stdout.strip().splitlines()[-1] == default
    got = subprocess.run([sys.executable, "-c", code], env=dict(env, **{var: mine}),
                         capture_output=True, text=True)
    assert got.stdout.strip().splitlines()[-1] == mine


@pytest.mark.parametrize("method, params, seed", [
    ("ties", {"density": 0.5}, None),
    ("ties", {"density": 0.5, "tie_break": "first"}, None),
    ("dare_ties", {"density": 0.5}, 3),
    ("della", {"density": 0.5, "epsilon": 0.1}, 3),
])
def test_methods_write_identical_bytes_on_one_and_two_threads(smoke_checkpoint, tmp_path,
                                                              monkeypatch, method, params, seed):
    """A task-vector method runs on every core by default (it is CPU-bound); its bytes do
    not depend on the thread count: elementwise passes, integer histograms, the rescale's
    sums in a fixed order, sorts and draws that do not split by threads."""
    from loretta_merge.methods import stream

    monkeypatch.setattr(stream, "CHUNK_ENTRIES", 8 * 1024)  # several chunks per tensor
    inputs = [(smoke_checkpoint / "lora", 1.0), (smoke_checkpoint / "rep", 0.7)]
    outs = _bytes_on_one_and_two_threads(monkeypatch, tmp_path, lambda out: merge(
        smoke_checkpoint / "base", inputs, out, device="cpu", progress=False, method=method,
        method_params=params, seed=seed), workers=True)
    assert outs["1"] and outs["1"] == outs["2"]


def test_a_workers_error_is_the_runs_and_nothing_is_written(smoke_checkpoint, tmp_path,
                                                            monkeypatch):
    """With two tensor workers, an error raised while one merges a tensor (here: a range
    check that fails on the third tensor) ends the merge with that error; no output."""
    from loretta_merge.errors import NumericsError

    monkeypatch.setenv(ENV, "2")
    real = task_vectors.merge_tensor_task_vectors
    calls: list[str] = []

    def failing(name, *args, **kwargs):
        calls.append(name)
        if len(calls) == 3:
            raise NumericsError(f"{name}: merged values out of range (test)")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(task_vectors, "merge_tensor_task_vectors", failing)
    out = tmp_path / "out"
    with pytest.raises(NumericsError, match="out of range \\(test\\)"):
        merge(smoke_checkpoint / "base", [(smoke_checkpoint / "lora", 1.0),
                                          (smoke_checkpoint / "rep", 0.7)], out,
              device="cpu", progress=False, method="ties", method_params={"density": 0.5})
    assert not out.exists() and len(calls) >= 3
    assert not [p for p in tmp_path.iterdir() if p.name != "out"]  # no temporary left


@pytest.mark.parametrize("method, params, threads, device, want", [
    ("ties", {"density": 0.5}, 2, "cpu", 2),
    ("ties", {"density": 0.5}, 16, "cpu", merge_run.METHOD_WORKERS),  # memory: two at most
    ("ties", {"density": 0.5}, 1, "cpu", 1),
    ("dare_ties", {"density": 0.5}, 8, "cpu", 2),
    ("ties", {"density": 0.5}, 8, "cuda", 1),
    ("task_arithmetic", {}, 8, "cpu", 1),  # no pruning: one pass of a few ops per chunk
    ("ties_svd", {"density": 0.5}, 8, "cpu", 1),  # whole dense deltas per tensor
])
def test_which_merges_run_tensors_side_by_side(method, params, threads, device, want):
    from types import SimpleNamespace

    tv = task_vectors.resolve_method(method, params, 3 if method.startswith("dare") else None,
                                     [1.0, 0.5])
    plan = SimpleNamespace(task_vectors=tv)
    assert merge_run.method_workers(plan, torch.device(device), threads) == want
    assert merge_run.method_workers(SimpleNamespace(task_vectors=None), torch.device("cpu"),
                                    threads) == 1  # linear
