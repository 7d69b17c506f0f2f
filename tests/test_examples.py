"""The scripts in examples/ run, end to end, on the real embedded model (so they cannot rot)."""

from __future__ import annotations

import json

import pytest

from fixtures.scripts import run_ok


def run_example(name: str, *args: str) -> str:
    """``python examples/NAME ARGS`` (in this worker: fixtures/scripts.py); its stdout."""
    return run_ok(f"examples/{name}", *args)


@pytest.fixture(scope="session")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("examples")


@pytest.mark.slow
def test_finetune(work):
    out = run_example("finetune.py", "--output", str(work / "adapter"), "--max-steps", "6",
                "--max-train-samples", "64", "--max-eval-samples", "64")
    assert "trainable parameters" in out and (work / "adapter" / "adapter_config.json").exists()
    # MiniLM is a sentence-transformers model that mean-pools: --pooling auto follows it
    assert json.loads((work / "adapter" / "adapter_config.json").read_text())["pooling"] == "mean"


@pytest.mark.slow
def test_merge_export_chain(minilm_adapter, work):
    """merge.py, then export_onnx.py on its output, with the session's trained MiniLM adapter
    (the same method, pooling and base as finetune.py's)."""
    from loretta_merge.embedded import default_model_path

    out = run_example("merge.py", str(default_model_path()), str(minilm_adapter.path), "--output", str(work / "merged"))
    diff = float(out.split("unmerged model:")[1].split()[0])
    assert diff < 1e-4
    assert json.loads((work / "merged" / "config.json").read_text())["loretta_pooling"] == "mean"

    out = run_example("export_onnx.py", str(work / "merged"), "--output", str(work / "onnx"), "--task", "seq-cls")
    assert "validated on CPUExecutionProvider" in out
    assert (work / "onnx" / "model.onnx").exists()


def test_lora_roundtrip(work):
    out = run_example("lora_roundtrip.py", "--workdir", str(work / "roundtrip"), "--eps", "0.05")
    assert "met: True" in out
    exact = float(out.split("max delta error")[-1].split()[0])
    assert exact < 1e-5
    for d in ("lora", "tt", "lora-again"):
        assert (work / "roundtrip" / d / "adapter_config.json").exists()
