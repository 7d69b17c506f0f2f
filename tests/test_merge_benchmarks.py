"""The merge benchmarks run at a tiny size, so they cannot rot unnoticed (their figures are
measured by the scripts themselves, never asserted here)."""

from __future__ import annotations

import json

import pytest

from fixtures.scripts import run_ok


@pytest.mark.slow
def test_bench_merge_smoke(tmp_path):
    out = tmp_path / "merge.json"
    run_ok("benchmarks/bench_merge.py", "--smoke", "--work", str(tmp_path / "work"), "--output", str(out))
    result = json.loads(out.read_text())
    assert result["size"] == "smoke" and result["page_cache"] == "warm"
    assert set(result["cases"]) == {"floor", "floor-nosync", "copy-direct", "lora", "rep", "peft"}
    for case in result["cases"].values():
        assert case["wall_s"] > 0 and case["cpu_s"] >= 0 and len(case["runs"]) == result["rounds"]
    assert set(result["ratios"]["lora"]) == {"wall_over_floor", "wall_over_floor_nosync",
                                             "wall_over_copy_direct", "peft_wall_over_ours"}
    positions = {(r["round"], r["position_in_round"]) for c in result["cases"].values() for r in c["runs"]}
    assert len(positions) == len(result["cases"]) * result["rounds"]  # one case per slot
    assert not (tmp_path / "work").exists()  # generated files removed


def test_gpu_merge_smoke_runs_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    stdout = run_ok("benchmarks/gpu_merge.py", "--smoke", "--work", str(tmp_path / "work"), "--output", str(out))
    result = json.loads(out.read_text())
    assert "GB/s" in stdout and result["floor"]["gb_per_s"] > 0
    for adapter in ("lora", "rep", "ties", "ties-first"):
        assert result["cases"][adapter]["cpu"]["gb_per_s"] > 0
        assert ("cuda" in result["cases"][adapter]) == (result["cuda_skipped"] is None)
    # issue 25: TIES of the three adapters bench_methods.py merges
    assert result["cases"]["ties"]["inputs"] == ["lora r16", "rep", "lora r8"]
    extract = result["cases"]["extract"]          # issue 26: extract on each device
    assert extract["devices"]["cpu"]["median_s"] > 0 and extract["floor_s"] > 0
    assert extract["devices"]["cpu"]["max_err"] < 0.5
    assert ("cuda" in extract["devices"]) == (result["cuda_skipped"] is None) == ("cuda_vs_cpu" in extract)
