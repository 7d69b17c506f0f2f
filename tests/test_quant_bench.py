"""benchmarks/bench_quant.py --smoke runs end to end and writes its JSON (figures are not
asserted: timings belong to the benchmark, not to tests)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_quant_smoke(tmp_path):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed")
    out = tmp_path / "quant.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_quant.py"), "--smoke",
                           "--output", str(out), "--work", str(tmp_path / "work")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["size"] == "smoke" and set(data["ratios"]) == {"nf4", "w4a16"}
    for fmt in ("nf4", "w4a16"):
        merge = data["cases"][f"merge_{fmt}"]
        assert merge["output_bytes"] > 0 and merge["peak_rss_bytes"] > 0
        assert all(math.isfinite(v) and v > 0 for v in data["ratios"][fmt].values())
    assert not (tmp_path / "work").exists()  # scratch checkpoints are cleaned up
