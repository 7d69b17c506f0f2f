"""CPU and GPU merges side by side on a generated checkpoint, in GB/s against the I/O floor.

One short prepared script for a GPU machine: generates the LLaMA-shaped bf16 checkpoint and
the rep and LoRA adapters of ``bench_merge.py``, then times, in this process, the floor
(safetensors ``load_file`` + ``save_file``), the CPU merge and (when CUDA is present) the
GPU merge of each adapter and of both by ``--method ties``, and compares the GPU output with the CPU output tensor by
tensor (bf16 ulps). Throughput is checkpoint bytes / wall seconds. JSON to ``--output``.

    python benchmarks/gpu_merge.py --smoke             # CPU only where no GPU: seconds
    python benchmarks/gpu_merge.py --size 2gb --output benchmarks/results/gpu_merge.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def worst_ulps(a_dir: Path, b_dir: Path) -> float:
    import torch

    from loretta_merge.io import CheckpointReader

    a_r, b_r = CheckpointReader(a_dir), CheckpointReader(b_dir)
    worst = 0.0
    for key in a_r.keys():
        a, b = a_r.get(key).double(), b_r.get(key).double()
        big = torch.maximum(a.abs(), b.abs()).clamp_min(1e-30)
        ulp = torch.exp2(torch.floor(torch.log2(big)) - 7)
        worst = max(worst, float(((a - b).abs() / ulp).max()))
    return worst


def main() -> None:
    from bench_merge import SIZES, _floor, generate

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=list(SIZES), default="2gb")
    ap.add_argument("--smoke", action="store_true", help="tiny checkpoint (CI; CPU where no GPU)")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--output", type=Path, default=None)
    args = ap.parse_args()
    import torch

    from loretta_merge.merge import merge

    size = "smoke" if args.smoke else args.size
    work = args.work or Path(tempfile.gettempdir()) / f"loretta-gpu-bench-{size}"
    generate(work, size)
    base = work / "base"
    gb = sum(p.stat().st_size for p in base.glob("*.safetensors")) / 1e9
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if "cuda" in devices:
        torch.ones(1, device="cuda").sum().item()  # the CUDA context, outside the timings
    result = {"size": size, "checkpoint_gb": gb, "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name(0) if "cuda" in devices else None,
              "cuda_skipped": None if "cuda" in devices else "no CUDA device visible to torch",
              "cases": {}}
    floor_out = work / "out-floor"
    shutil.rmtree(floor_out, ignore_errors=True)
    floor = _timed(lambda: _floor(base, floor_out, 5 * 10**9))
    shutil.rmtree(floor_out, ignore_errors=True)
    result["floor"] = {"seconds": floor, "gb_per_s": gb / floor}
    print(f"checkpoint {gb:.2f} GB; floor {floor:.2f}s = {gb / floor:.2f} GB/s")
    try:
        for adapter in ("lora", "rep"):
            outs, case = {}, {}
            for device in devices:
                outs[device] = work / f"out-{adapter}-{device}"
                shutil.rmtree(outs[device], ignore_errors=True)
                secs = _timed(lambda: merge(base, [(work / adapter, 1.0)], outs[device],
                                            device=device, progress=False))
                case[device] = {"seconds": secs, "gb_per_s": gb / secs, "over_floor": secs / floor}
                print(f"{adapter:4s} {device:4s} {secs:7.2f}s = {gb / secs:6.2f} GB/s "
                      f"({secs / floor:.2f}x the floor)")
            if "cuda" in outs:
                case["cuda_vs_cpu_max_bf16_ulps"] = worst_ulps(outs["cuda"], outs["cpu"])
                print(f"{adapter:4s} cuda vs cpu: at most {case['cuda_vs_cpu_max_bf16_ulps']:.2f} bf16 ulp")
            result["cases"][adapter] = case
        # a task-vector method (issue 25): TIES of both adapters, its kernels on each device
        outs, case = {}, {}
        for device in devices:
            outs[device] = work / f"out-ties-{device}"
            shutil.rmtree(outs[device], ignore_errors=True)
            secs = _timed(lambda: merge(base, [(work / "lora", 1.0), (work / "rep", 0.7)], outs[device],
                                        device=device, progress=False, method="ties",
                                        method_params={"density": 0.5}))
            case[device] = {"seconds": secs, "gb_per_s": gb / secs, "over_floor": secs / floor}
            print(f"ties {device:4s} {secs:7.2f}s = {gb / secs:6.2f} GB/s ({secs / floor:.2f}x the floor)")
        if "cuda" in outs:
            case["cuda_vs_cpu_max_bf16_ulps"] = worst_ulps(outs["cuda"], outs["cpu"])
            print(f"ties cuda vs cpu: at most {case['cuda_vs_cpu_max_bf16_ulps']:.2f} bf16 ulp")
        result["cases"]["ties"] = case
    finally:
        for p in work.glob("out-*"):
            shutil.rmtree(p, ignore_errors=True)
        if args.smoke:
            shutil.rmtree(work, ignore_errors=True)
    output = args.output or Path(tempfile.gettempdir()) / f"gpu_merge-{size}.json"
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
