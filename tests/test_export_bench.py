"""The ONNX benchmark, the GPU script and the serving example run at tiny sizes, so none of
them can rot unnoticed. Figures are not checked (they are measurements), only that each
script runs, writes its JSON and reports the providers that really ran."""

from __future__ import annotations

import json

import pytest

from fixtures.scripts import run_ok

pytest.importorskip("onnxruntime")


@pytest.mark.slow
def test_bench_export_smoke(tmp_path):
    out = tmp_path / "export.json"
    run_ok("benchmarks/bench_export.py", "--smoke", "--output", str(out))
    data = json.loads(out.read_text())
    model = data["models"][0]
    assert model["rows"] and model["int8"]["int8_bytes"] < model["int8"]["fp32_bytes"]
    assert model["providers"]["fp32"][0] == "CPUExecutionProvider"
    layouts = data["switchable"]["layouts"]
    assert set(layouts) == {"tt", "factors"}
    # TT cores are smaller than the precomputed factors they stand for
    assert layouts["tt"]["adapter_file_bytes"]["a"] < layouts["factors"]["adapter_file_bytes"]["a"]


@pytest.mark.slow
def test_gpu_onnx_smoke_reports_the_provider_that_ran(tmp_path):
    import onnxruntime as ort

    out = tmp_path / "gpu.json"
    text = run_ok("benchmarks/gpu_onnx.py", "--smoke", "--output", str(out))
    data = json.loads(out.read_text())
    cuda_run = data["exports"]["float32"]["runs"][1]
    assert cuda_run["asked"] == "cuda"
    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    if not has_cuda:  # a CPU build must say so, not report a CPU time as a GPU time
        assert cuda_run["cuda_fallback_to_cpu"] and cuda_run["providers"][0] == "CPUExecutionProvider"
        assert "CPU fallback" in text


@pytest.mark.slow
def test_serve_adapters_example(tmp_path):
    text = run_ok("examples/serve_adapters.py", "--requests", "8", "--work", str(tmp_path))
    assert "adapter support:" in text and "merged support" in text
    assert (tmp_path / "served" / "adapters" / "legal.onnx_adapter").is_file()


def test_bench_onnx_optimize_smoke_gives_the_same_graph(tmp_path):
    """One traced tiny-Llama bank graph optimized with onnxscript's default rules and with
    export onnx's (graph.SKIPPED_REWRITE_RULES left out): the same graph, byte for byte."""
    out = tmp_path / "o.json"
    run_ok("benchmarks/bench_onnx_optimize.py", "--smoke", "--out", str(out))
    data = json.loads(out.read_text())
    assert data["smoke"] and data["skipped_rules"]
    (row,) = data["rows"]
    assert row["slice_nodes"] > 0 and row["same_graph"] is True
