"""GPU path check: the same merge on CPU and on CUDA, timed, outputs compared (not a test).

Reuses the synthetic LLaMA-shaped bf16 checkpoint and adapters of ``bench_merge.py``.
On CUDA the merge reconstructs the TT factors on the GPU, pins each base tensor in the
reader thread and copies it with ``non_blocking``; the CPU run is the reference. Prints
the times and the largest difference between the two outputs (bf16: at most one ulp is
expected, from a different summation order), and writes ``benchmarks/results/gpu_merge.json``.

    python benchmarks/gpu_merge.py --size small
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["small", "full"], default="full")
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print(f"no CUDA device visible to torch {torch.__version__}; this script measures the GPU "
              f"path and needs a CUDA build of torch on a GPU machine. Nothing was run.")
        raise SystemExit(0)
    from bench_merge import generate

    from loretta_merge.io import CheckpointReader
    from loretta_merge.merge import merge

    work = args.work or Path(f"/tmp/loretta-bench-{args.size}")
    generate(work, args.size)
    results: dict = {"size": args.size, "gpu": torch.cuda.get_device_name(0), "cases": {}}
    for adapter in ("rep", "lora"):
        outs = {}
        for device in ("cpu", "cuda"):
            out = work / f"gpu-out-{adapter}-{device}"
            shutil.rmtree(out, ignore_errors=True)
            if device == "cuda":  # warm the CUDA context outside the timing
                torch.ones(1, device="cuda").sum().item()
            start = time.perf_counter()
            report = merge(work / "base", [(work / adapter, 1.0)], out, device=device, progress=False)
            outs[device] = (out, time.perf_counter() - start, report)
        cpu_r, gpu_r = CheckpointReader(outs["cpu"][0]), CheckpointReader(outs["cuda"][0])
        worst_ulps = 0.0
        for key in cpu_r.keys():
            a, b = cpu_r.get(key).double(), gpu_r.get(key).double()
            ulp = torch.exp2(torch.floor(torch.log2(a.abs().clamp_min(1e-30))) - 7)
            worst_ulps = max(worst_ulps, float(((a - b).abs() / ulp).max()))
        results["cases"][adapter] = {
            "cpu_seconds": outs["cpu"][1], "cuda_seconds": outs["cuda"][1],
            "speedup": outs["cpu"][1] / outs["cuda"][1], "max_diff_bf16_ulps": worst_ulps,
            "report_device": outs["cuda"][2].device,
        }
        print(f"{adapter:5s} cpu {outs['cpu'][1]:7.2f}s  cuda {outs['cuda'][1]:7.2f}s  "
              f"speedup {outs['cpu'][1] / outs['cuda'][1]:5.2f}x  max diff {worst_ulps:.2f} bf16 ulp")
        for out, _, _ in outs.values():
            shutil.rmtree(out, ignore_errors=True)
    res = ROOT / "benchmarks" / "results"
    res.mkdir(parents=True, exist_ok=True)
    (res / "gpu_merge.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {res / 'gpu_merge.json'}")


if __name__ == "__main__":
    main()
